"""The tensor-core products (M, K) in the EXL2 matmul kernel as Triton compiles it for sm_80 and
sm_90, per bit width, printed as JSON. Runs without a GPU; TRITON_INTERPRET must be unset."""

from __future__ import annotations

import json
import re

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from engine.gpu.exl2_layout import CHUNKS, WIDTHS
from engine.gpu.exl2_matmul import BLOCK_N, MAX_ROWS, TILE, _segment_kernel, extras

POINTERS = {"x": "*fp16", "perm": "*i16", "scale_max": "*fp32", "partial": "*fp32"}
INTEGERS = {"x_stride", "M", "N", "row0", "word0", "tiles", "per_split", "slot0"}
DOT = re.compile(r"tt\.dot .*?: tensor<(\d+)x(\d+)x")


def signature(constants: dict[str, int]) -> dict[str, str]:
    def kind(name: str) -> str:
        if name in constants:
            return "constexpr"
        return POINTERS.get(name, "i32" if name in INTEGERS else "*i32")

    return {name: kind(name) for name in _segment_kernel.arg_names}


def dots(bits: int, capability: int) -> list[list[int]]:
    values, words = CHUNKS[bits]
    rows, runs = extras(bits)
    constants = dict(
        BITS=bits, VALUES=values, WORDS=words, EXTRA=rows.numel(), EXTRA_PIECES=runs.shape[0],
        TILE=TILE, BLOCK_M=MAX_ROWS, BLOCK_N=BLOCK_N,
    )  # fmt: skip
    source = ASTSource(_segment_kernel, signature(constants), constants)
    ttgir = triton.compile(source, target=GPUTarget("cuda", capability, 32)).asm["ttgir"]
    return [[int(m), int(k)] for m, k in DOT.findall(ttgir)]


if __name__ == "__main__":
    print(json.dumps({f"sm_{c} {b} bits": dots(b, c) for c in (80, 90) for b in WIDTHS}))
