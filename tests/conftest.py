"""Shared fixtures: tiny StarCoder2 model folders, built on first use (GPU tests use them)."""

import os
import shutil

import pytest

# Without a GPU, Triton's interpreter runs the kernels; it must be chosen before triton is imported.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.fakes.tiny_starcoder2 import build_tiny_starcoder2, quantize_exl2


@pytest.fixture(scope="session")
def fp16_dir(tmp_path_factory):
    return build_tiny_starcoder2(tmp_path_factory.mktemp("tiny") / "fp16")


@pytest.fixture(scope="session")
def windowed_dir(tmp_path_factory):
    return build_tiny_starcoder2(tmp_path_factory.mktemp("tiny") / "window32", sliding_window=32)


@pytest.fixture(scope="session")
def decisive_dir(tmp_path_factory):
    """FP16 (no EXL2 rounding) with a 10x wider lm_head: greedy answers repeat exactly."""
    return build_tiny_starcoder2(tmp_path_factory.mktemp("tiny") / "decisive", head_std=1.5)


@pytest.fixture(scope="session")
def exl2_dir(fp16_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("exl2")
    return quantize_exl2(fp16_dir, root / "model", root / "work", bits=6.0)


@pytest.fixture(scope="session")
def decisive_exl2_dir(decisive_dir, tmp_path_factory):
    """The decisive model at 4 bits per weight: exllamav2's EXL2 matmuls, still few near-ties."""
    root = tmp_path_factory.mktemp("decisive-exl2")
    return quantize_exl2(decisive_dir, root / "model", root / "work", bits=4.0)
