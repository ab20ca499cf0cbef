#!/usr/bin/env bash
# Compile exllamav2's CUDA extension ahead of time with PyPI's CUDA 13.0 nvcc. Needs no GPU.
#
#   pip install -r requirements.txt
#   bash scripts/build_extension.sh
#
# Environment: PYTHON (default: python), TORCH_CUDA_ARCH_LIST (default "8.6;8.9;9.0": A10G, L4/L40S,
# H100), MAX_JOBS (parallel compiles, default: all cores; each takes up to ~2 GB of RAM),
# TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions; the app finds the build there when it
# runs with the same TORCH_CUDA_ARCH_LIST). Slow: many minutes per core; not part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.6;8.9;9.0}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
# torch runs `ninja` from PATH: use the one installed with exllamav2, also from an unactivated venv.
PATH="$(dirname "$("$PYTHON" -c 'import sys; print(sys.executable)')"):$PATH"
export PATH

CUDA_HOME="${CUDA_HOME:-$("$PYTHON" -m engine.gpu.toolchain)}"
export CUDA_HOME
echo "CUDA_HOME=$CUDA_HOME ($("$CUDA_HOME/bin/nvcc" --version | tail -n 2 | head -n 1))"
echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"

"$PYTHON" - <<'PY'
import time

import torch
from torch.utils.cpp_extension import _get_build_directory

if not torch.version.cuda:
    raise SystemExit(f"torch {torch.__version__} is a CPU build; install PyPI's CUDA build first.")
started = time.perf_counter()
# Importing exllamav2's ext module runs the same JIT build the app triggers at its first load.
import exllamav2.ext  # noqa: E402,F401

print(f"Built and loaded exllamav2_ext in {time.perf_counter() - started:.0f} s:")
print(_get_build_directory("exllamav2_ext", verbose=False))
PY
