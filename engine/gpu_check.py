"""Why no GPU can be used here, told apart by its remedy, without importing torch.

The engine process decides whether a GPU serves (torch.cuda); this says why not, from files alone,
so the web process can say it at once: no torch, a CPU-only torch, no NVIDIA GPU, or a driver that
CUDA cannot use.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
from collections.abc import Mapping
from pathlib import Path

NVIDIA_DRIVER = Path("/proc/driver/nvidia/version")  # present once the driver is loaded
CUDA_TORCH = (
    "install its CUDA build: pip install --force-reinstall torch==2.13.0 "
    "--index-url https://download.pytorch.org/whl/cu130"
)
SPACE_REMEDY = (
    "this Space runs on CPU hardware: on the Space's page, open the Settings tab and pick a GPU "
    "under Space hardware"
)


def torch_cuda_version(torch_dir: Path | None) -> str | None:
    """The CUDA release a torch install was built for (from torch/version.py); None if CPU-only."""
    if torch_dir is None:
        return None
    try:
        text = (torch_dir / "version.py").read_text(encoding="utf-8")
    except OSError:
        return None
    found = re.search(r"^cuda\s*(?::[^=]*)?=\s*['\"]([^'\"]+)['\"]", text, re.M)
    return found.group(1) if found else None


def installed_torch() -> tuple[Path | None, str]:
    """torch's package folder (None when absent) and its version, found without importing it."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None, ""
    from importlib.metadata import PackageNotFoundError, version

    try:
        shown = version("torch")
    except PackageNotFoundError:
        shown = "unknown version"
    return Path(list(spec.submodule_search_locations)[0]), shown


def no_gpu_message(
    environ: Mapping[str, str],
    torch_dir: Path | None,
    torch_version: str,
    driver: Path = NVIDIA_DRIVER,
) -> str:
    """One message: which of the causes this machine has, and what to do about it."""
    if torch_dir is None:
        cause = "torch is not installed"
        remedy = "pip install -r requirements.txt"
    elif torch_cuda_version(torch_dir) is None:
        cause = f"the installed torch {torch_version} is a CPU-only build"
        remedy = CUDA_TORCH
    elif not driver.exists():
        cause = "this machine has no NVIDIA GPU, or its driver is not loaded (nvidia-smi fails)"
        remedy = "run on a machine with an NVIDIA GPU and driver 580 or newer"
    else:
        first_line = driver.read_text(encoding="utf-8", errors="replace").splitlines()[:1]
        found = re.search(r"Kernel Module(?: for \S+)?\s+(\d[\d.]*)", "".join(first_line))
        shown = f"driver {found.group(1)}" if found else "its driver"
        cause = (
            f"the NVIDIA GPU cannot be used: torch is built for CUDA "
            f"{torch_cuda_version(torch_dir)}, and {shown} does not serve it (or the GPU is "
            "hidden by CUDA_VISIBLE_DEVICES)"
        )
        remedy = "update the NVIDIA driver to 580 or newer and check nvidia-smi"
    if environ.get("SPACE_ID") and torch_dir is not None:
        remedy = SPACE_REMEDY
    return f"No GPU to run the model: {cause}; {remedy}. exllamav2 runs only on NVIDIA GPUs."


@functools.cache
def no_gpu_here() -> str:
    """no_gpu_message for the running machine (it does not change while the app runs)."""
    torch_dir, torch_version = installed_torch()
    return no_gpu_message(os.environ, torch_dir, torch_version)
