"""Decode speed of the tiny StarCoder2 (FP16): stock exllamav2 0.3.2 vs ours, a process each.

Usage (GPU): python bench/tiny_decode.py [--tokens 256]. Stock exllamav2 cannot read the real
config key `norm_epsilon`, so it runs on a copy whose config.json also carries `layer_norm_epsilon`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def run_variant(folder: str, variant: str, tokens: int) -> float:
    """Greedy decode of `tokens` tokens after a 100-token prompt; returns decode tok/s."""
    import torch
    from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config, ExLlamaV2Tokenizer
    from exllamav2.generator import ExLlamaV2DynamicGenerator, ExLlamaV2DynamicJob, ExLlamaV2Sampler

    if variant.startswith("ours"):
        from engine.gpu import compat

        compat.apply_all()
    config = ExLlamaV2Config(folder)
    config.max_seq_len = 2048
    config.no_sdpa = variant == "stock-no_sdpa"
    model = ExLlamaV2(config)
    cache = ExLlamaV2Cache(model, max_seq_len=2048, lazy=True)
    model.load_autosplit(cache)
    generator = ExLlamaV2DynamicGenerator(
        model, cache, ExLlamaV2Tokenizer(config), paged=variant == "ours-paged"
    )
    prompt = torch.randint(100, 1000, (1, 100))
    for _ in range(2):  # the first run warms up kernels
        job = ExLlamaV2DynamicJob(
            input_ids=prompt,
            max_new_tokens=tokens,
            stop_conditions=[],
            gen_settings=ExLlamaV2Sampler.Settings.greedy(),
        )
        generator.enqueue(job)
        result = {}
        while generator.num_remaining_jobs():
            for r in generator.iterate():
                if r.get("eos"):
                    result = r
    torch.cuda.synchronize()
    return (result["new_tokens"] - 1) / result["time_generate"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps({"tok_s": run_variant(args.folder, args.variant, args.tokens)}))
        return
    from tests.fakes.tiny_starcoder2 import build_tiny_starcoder2

    work = Path(tempfile.mkdtemp())
    ours = build_tiny_starcoder2(work / "tiny")
    stock = work / "stock"
    shutil.copytree(ours, stock)
    config = json.loads((stock / "config.json").read_text())
    config["layer_norm_epsilon"] = config["norm_epsilon"]
    (stock / "config.json").write_text(json.dumps(config))
    rows = []
    for variant, folder in [
        ("stock-sdpa", stock),
        ("stock-no_sdpa", stock),
        ("ours-unpaged", ours),
        ("ours-paged", ours),
    ]:
        out = (
            subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--variant",
                    variant,
                    "--folder",
                    str(folder),
                    "--tokens",
                    str(args.tokens),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        rows.append((variant, json.loads(out)["tok_s"]))
    print("| variant | decode tok/s |\n|---|---|")
    for variant, tok_s in rows:
        print(f"| {variant} | {tok_s:.0f} |")


if __name__ == "__main__":
    main()
