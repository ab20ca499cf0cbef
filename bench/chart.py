"""Draw docs/decode_vs_context.png from bench/results/bench-*.json (needs matplotlib)."""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LABELS = {
    "ours-graph": "ours: CUDA graphs + GPU sampling",
    "ours-graph-sync": "ours: the same, each step's tokens read first",
    "ours-eager": "ours: eager (--no-cuda-graphs)",
    "ours-previous": "ours before the decode kernel",
    "stock-no_sdpa": "stock, no_sdpa (causal, no window)",
    "stock-sdpa": "stock default (no causal mask)",
}


def main() -> None:
    files = sorted((ROOT / "bench" / "results").glob("bench-*.json"))
    figure, axes = plt.subplots(1, len(files), figsize=(5.5 * len(files), 4), sharey=True)
    for axis, file in zip(axes, files, strict=True):
        results = json.loads(file.read_text())
        bound = results["bandwidth_gbps"] * 1e9 / results["weight_bytes_per_token"]
        for color, (variant, label) in enumerate(LABELS.items()):
            if "contexts" not in results.get(variant, {}):
                continue  # not in this run
            rows = results[variant]["contexts"]
            contexts = [int(c) for c in rows]
            decode = [rows[c]["decode_tok_s"] for c in rows]
            axis.plot(contexts, decode, marker="o", color=f"C{color}", label=label)
        axis.set_xscale("log", base=2)
        axis.set_xticks(contexts, [f"{c:,}" for c in contexts])
        axis.set_title(
            f"{file.stem.removeprefix('bench-')} bpw (bandwidth bound {bound:.0f} tok/s)"
        )
        axis.axhline(bound, color="grey", linestyle=":", label="bandwidth bound")
        axis.set_xlabel("context (tokens)")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("batch-1 decode (tokens/s)")
    # One legend for every variant any run has: a variant keeps its colour in every panel.
    handles = {h.get_label(): h for axis in axes for h in axis.get_lines()}
    figure.legend(handles.values(), handles.keys(), loc="lower center", ncol=3, fontsize=9)
    gpu = json.loads(files[0].read_text()).get("gpu", "GPU")
    figure.suptitle(f"StarCoder2-15B-shaped EXL2, {gpu}: batch-1 decode vs context")
    figure.tight_layout(rect=(0, 0.14, 1, 1))
    figure.savefig(ROOT / "docs" / "decode_vs_context.png", dpi=110)


if __name__ == "__main__":
    main()
