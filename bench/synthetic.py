"""A StarCoder2-15B-shaped EXL2 model with random weights, made by exllamav2's own converter.

Speed depends on shapes, bit widths and kernels, not on weight values. Converting 40 layers takes
too long, so this converts a 2-layer model of the full width and repeats its quantized layers to 40.

Usage (GPU): python bench/synthetic.py --bits 4.25 --out /dev/shm/sc2-4_25
`--bits 16` skips the converter (seconds, not minutes): the same shape in fp16, 2 bytes a weight.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPE_15B = {
    "hidden_size": 6144,
    "intermediate_size": 24576,
    "num_attention_heads": 48,
    "num_key_value_heads": 4,
    "vocab_size": 49152,
    "sliding_window": 4096,
}
LAYERS = 40


def build_fp16_source(folder: Path, layers: int = 2, shape: dict | None = None) -> Path:
    """A `layers`-deep fp16 StarCoder2 of the given width (default: the 15B's), random weights."""
    from tests.fakes.tiny_starcoder2 import real_config, write_tokenizer, write_weights

    folder.mkdir(parents=True, exist_ok=True)
    config = real_config(num_hidden_layers=layers, **(shape or SHAPE_15B))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tokens = write_tokenizer(folder)
    write_weights(folder, config, tokens, mute_eos=True)
    return folder


def repeat_layers(source: Path, output: Path, layers: int = LAYERS) -> Path:
    """Copy a quantized model, repeating its layers to `layers`, one shard per 4 layers."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    tensors = {}
    for file in sorted(source.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            for name in handle.keys():
                tensors[name] = handle.get_tensor(name)
    config = json.loads((source / "config.json").read_text())
    depth = config["num_hidden_layers"]
    output.mkdir(parents=True, exist_ok=True)
    for extra in source.iterdir():
        if (
            extra.suffix != ".safetensors"
            and extra.name not in ("config.json",)
            and extra.is_file()
        ):
            if not extra.name.endswith(".index.json"):
                shutil.copy(extra, output / extra.name)

    def layer_tensors(index: int) -> dict:
        prefix, src = f"model.layers.{index}.", f"model.layers.{index % depth}."
        return {
            prefix + name[len(src) :]: tensor.clone()  # real copies: no shared storage
            for name, tensor in tensors.items()
            if name.startswith(src)
        }

    shards = [range(start, min(start + 4, layers)) for start in range(0, layers, 4)]
    weight_map = {}
    for number, group in enumerate(shards, start=1):
        shard = {}
        for index in group:
            shard |= layer_tensors(index)
        if number == 1:
            shard |= {n: t for n, t in tensors.items() if not n.startswith("model.layers.")}
        name = f"output-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(output / name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, name)
    (output / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1)
    )
    config["num_hidden_layers"] = layers
    (output / "config.json").write_text(json.dumps(config, indent=2))
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--bits",
        type=float,
        required=True,
        help="bits per weight, e.g. 4.25; 16: fp16, unconverted",
    )
    parser.add_argument("--head-bits", type=int, default=None, help="lm_head bits (6 or 8)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (use /dev/shm)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder")
    parser.add_argument("--measurement", type=Path, default=None, help="reuse a measurement.json")
    args = parser.parse_args()
    from tests.fakes.tiny_starcoder2 import quantize_exl2

    head_bits = args.head_bits or (8 if args.bits >= 6.5 else 6)
    work = args.work or args.out.with_name(args.out.name + "-work")
    started = time.perf_counter()
    source = build_fp16_source(work / "fp16")
    built = time.perf_counter()
    if args.bits != 16:
        quantize_exl2(
            source,
            work / "exl2",
            work / "convert",
            bits=args.bits,
            head_bits=head_bits,
            measurement=args.measurement,
        )
    converted = time.perf_counter()
    repeat_layers(source if args.bits == 16 else work / "exl2", args.out)
    shutil.rmtree(work / "fp16")
    size = sum(f.stat().st_size for f in args.out.glob("*.safetensors"))
    print(
        json.dumps(
            {
                "bits": args.bits,
                "head_bits": head_bits,
                "out": str(args.out),
                "bytes": size,
                "source_s": round(built - started, 1),
                "convert_s": round(converted - built, 1),
                "repeat_s": round(time.perf_counter() - converted, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
