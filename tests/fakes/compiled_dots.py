"""The EXL2 matmul kernel (engine/gpu/exl2_matmul.py) as Triton compiles it for sm_80 and sm_90,
without a GPU (TRITON_INTERPRET must be unset).

`python -m tests.fakes.compiled_dots CAPABILITY` prints, per width at the default launch, as
JSON: the tensor-core products (M, K), and the main loop's reads: the async copies into shared
memory by pointer type, the loads that are not (plain `tt.load`s), and how many steps of copies
the pipeline keeps buffered. `--launches` prints, per launch variant and width on sm_90, the
shared memory, the weight bytes a program has in flight and the main loop's instructions per
weight (from the SASS).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from engine.gpu.exl2_layout import CHUNKS, WIDTHS
from engine.gpu.exl2_matmul import DEFAULT, MAX_ROWS, Launch, _segment_kernel, step_chunks

POINTERS = {"xs": "*fp16", "scale_max": "*fp32", "bias": "*fp16", "y": "*fp16", "partial": "*fp32"}
INTEGERS = {"XK", "M", "N", "chunks", "word0", "x_row8", "x_run8", "group0", "group_shift"}
INTEGERS |= {"per_split", "slot0", "finish"}
# What a launch passes aligned: torch's buffers start at 16 bytes, the real widths and the
# gathered x's row length are multiples of 16 (the kernel's other integers are not specialized).
ALIGNED = {"xs", "XK", "q_weight", "q_scale", "scale_max", "nibbles", "bias", "y", "partial", "N"}
DOT = re.compile(r"tt\.dot .*?: tensor<(\d+)x(\d+)x")
COPY = re.compile(r"ttg\.async_copy_global_to_local .*?: tensor<([0-9x]+)x!tt\.ptr<(\w+)>")
LOAD = re.compile(r"= tt\.load .*?: tensor<([0-9x]+)x!tt\.ptr<(\w+)>")
BUFFERS = re.compile(r"ttg\.local_alloc .*?!ttg\.memdesc<(\d+)x(\d+)x(\d+)xi32")


def compile_kernel(bits: int, launch: Launch, capability: int):
    """The kernel for a segment of this width."""
    segment = (bits, *CHUNKS[bits], step_chunks(bits, launch.block_k))
    constants = dict(SEGMENT=segment, BLOCK_M=MAX_ROWS, BLOCK_N=launch.block_n, HAS_BIAS=True)
    names = _segment_kernel.arg_names
    signature = {
        name: "constexpr"
        if name in constants
        else POINTERS.get(name, "i32" if name in INTEGERS else "*i32")
        for name in names
    }
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(names) if name in ALIGNED}
    source = ASTSource(_segment_kernel, signature, constants, attrs)
    options = dict(num_warps=launch.warps, num_stages=launch.stages)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)


def main_loop(ttgir: str) -> dict:
    """The products and reads of the kernel's main loop (the scf.for bodies but the finishing
    one, which reads earlier slots)."""
    loops = [loop.split("scf.yield")[0] for loop in ttgir.split("scf.for")[1:]]
    body = "".join(loop for loop in loops if "tt.dot" in loop)
    return {
        "dots": [[int(m), int(k)] for m, k in DOT.findall(ttgir)],
        "copies": sorted(f"{shape} {kind}" for shape, kind in COPY.findall(body)),
        "plain_loads": sorted(f"{shape} {kind}" for shape, kind in LOAD.findall(body)),
        "buffers": sorted({int(n) for n, _, _ in BUFFERS.findall(ttgir)}),
    }


def _cuobjdump(cubin: bytes, *flags: str) -> str:
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        done = subprocess.run([str(cuobjdump), *flags, file.name], capture_output=True, text=True)
    done.check_returncode()
    return done.stdout


def loop_instructions(cubin: bytes) -> int:
    """SASS instructions in the kernel's longest loop (a backward branch's span)."""
    sass = _cuobjdump(cubin, "-sass")
    at = [(int(a, 16), text) for a, text in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    spans = [
        (int(m.group(1), 16), address)
        for address, text in at
        if (m := re.search(r"BRA\s+0x([0-9a-f]+)", text)) and int(m.group(1), 16) < address
    ]
    return max(sum(1 for a, _ in at if start <= a <= end) for start, end in spans)


def resources(cubin: bytes) -> tuple[int, int]:
    """Registers a thread, and bytes of stack (registers spilled, among others)."""
    usage = re.search(r"REG:(\d+) STACK:(\d+)", _cuobjdump(cubin, "-res-usage"))
    assert usage, "no resource usage"
    return int(usage.group(1)), int(usage.group(2))


# An H100's multiprocessor: shared memory (less 1 KB a program), registers, threads.
H100_SM = {"shared": 233472, "reserved": 1024, "registers": 65536, "threads": 2048}


def launch_report(launch: Launch) -> dict:
    """Per width on sm_90: shared bytes, registers and stack a thread, programs an H100
    multiprocessor holds at once, weight bytes per step and in flight a program, and the main
    loop's SASS instructions per weight."""
    out = {}
    for bits in WIDTHS:
        values, words = CHUNKS[bits]
        step = step_chunks(bits, launch.block_k)
        kernel = compile_kernel(bits, launch, 90)
        threads = launch.warps * 32
        regs, stack = resources(kernel.asm["cubin"])
        fit = min(
            H100_SM["shared"] // (kernel.metadata.shared + H100_SM["reserved"]),
            H100_SM["registers"] // (regs * threads),
            H100_SM["threads"] // threads,
        )
        per_step = step * words * launch.block_n * 4
        out[f"{bits} bits"] = {
            "shared_bytes": kernel.metadata.shared,
            "registers": regs,
            "stack_bytes": stack,
            "programs_per_h100_sm": fit,
            "rows_per_step": step * values,
            "weight_bytes_per_step": per_step,
            "weight_bytes_in_flight": per_step * (launch.stages - 1),
            "loop_instructions_per_weight": round(
                loop_instructions(kernel.asm["cubin"]) * threads / (step * values * launch.block_n),
                2,
            ),
        }
    return out


if __name__ == "__main__":
    if sys.argv[1] == "--launches":
        from engine.gpu.decode_matmul import LAUNCHES

        print(json.dumps({launch.name: launch_report(launch) for launch in LAUNCHES}, indent=1))
    else:
        capability = int(sys.argv[1])
        found = {
            f"{bits} bits": main_loop(compile_kernel(bits, DEFAULT, capability).asm["ttgir"])
            for bits in WIDTHS
        }
        print(json.dumps(found))
