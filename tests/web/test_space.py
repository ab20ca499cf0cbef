"""The Hugging Face Space configuration (README front matter) and the CUDA toolchain helper."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import yaml

from engine.gpu import toolchain
from starcoder2.branches import BRANCHES, DEFAULT_REPO, estimate_vram_gb

ROOT = Path(__file__).resolve().parents[2]
REQUIRED_KEYS = {
    "title", "emoji", "colorFrom", "colorTo", "sdk", "sdk_version", "app_file", "python_version",
    "suggested_hardware", "models", "short_description", "startup_duration_timeout", "pinned",
    "license",
}  # fmt: skip
# CPython versions with a Linux wheel of PyPI's torch 2.13.0 that exllamav2 0.3.2 runs on.
SUPPORTED_PYTHONS = {"3.10", "3.11", "3.12", "3.13"}
SPACE_COLORS = {"red", "yellow", "green", "blue", "indigo", "purple", "pink", "gray"}
# Spaces GPU flavours with their VRAM in GB.
GPU_HARDWARE_GB = {"t4-small": 16, "t4-medium": 16, "l4x1": 24, "a10g-small": 24, "a10g-large": 24}


def front_matter() -> dict:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.match(r"---\n(.*?)\n---\n", text, re.DOTALL)
    assert match, "README.md must start with YAML front matter between --- lines"
    return yaml.safe_load(match.group(1))


def pinned_version(package: str) -> str:
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        match = re.match(rf"{re.escape(package)}==([\w.]+)", line.strip())
        if match:
            return match.group(1)
    raise AssertionError(f"{package} is not pinned with == in requirements.txt")


def parse_duration(text: str) -> timedelta:
    match = re.fullmatch(r"(\d+)([mh])", str(text))
    assert match, f"startup_duration_timeout must look like 30m or 1h (got {text!r})"
    value, unit = int(match.group(1)), match.group(2)
    return timedelta(minutes=value) if unit == "m" else timedelta(hours=value)


# ---- README front matter ------------------------------------------------------------------------


def test_front_matter_has_every_key_a_gradio_space_needs():
    config = front_matter()
    assert REQUIRED_KEYS <= config.keys()
    assert config["sdk"] == "gradio"
    assert config["pinned"] is False
    assert config["colorFrom"] in SPACE_COLORS and config["colorTo"] in SPACE_COLORS


def test_space_runs_the_gradio_version_pinned_in_requirements():
    assert str(front_matter()["sdk_version"]) == pinned_version("gradio")


def test_space_app_file_exists_and_python_version_is_supported():
    config = front_matter()
    assert (ROOT / config["app_file"]).is_file()
    assert config["app_file"] == "app.py"
    assert str(config["python_version"]) in SUPPORTED_PYTHONS


def test_space_names_the_exl2_model_repo_the_app_downloads():
    assert DEFAULT_REPO in front_matter()["models"]


def test_short_description_fits_the_60_character_limit():
    description = front_matter()["short_description"]
    assert 0 < len(description) <= 60


def test_suggested_hardware_is_a_gpu_that_fits_the_largest_branch_at_full_context():
    hardware = front_matter()["suggested_hardware"]
    assert hardware in GPU_HARDWARE_GB
    largest = list(BRANCHES)[-1]
    assert estimate_vram_gb(largest, 16384, "fp16") < GPU_HARDWARE_GB[hardware] * 0.9


def test_startup_timeout_leaves_time_for_download_build_and_load():
    assert parse_duration(front_matter()["startup_duration_timeout"]) >= timedelta(minutes=45)


def test_license_is_the_app_code_licence_and_readme_names_the_model_licence():
    assert front_matter()["license"] in {"apache-2.0", "mit"}
    assert "bigcode-openrail-m" in (ROOT / "README.md").read_text(encoding="utf-8")


# ---- CUDA toolchain from PyPI wheels ------------------------------------------------------------


def fake_wheel_tree(site: Path) -> Path:
    """The layout PyPI's nvidia-cuda-nvcc, -runtime, -crt, nvvm and -cccl wheels install."""
    root = site / "nvidia" / "cu13"
    for folder in ("bin", "include/crt", "include/cccl/cub", "nvvm/bin", "lib"):
        (root / folder).mkdir(parents=True)
    for name in ("bin/nvcc", "include/cuda_runtime.h", "nvvm/bin/cicc"):
        (root / name).write_text("")
    for name in ("libcudart.so.13", "libnvvm.so.4", "libnvrtc-builtins.so.13.0", "libcudadevrt.a"):
        (root / "lib" / name).write_text(name)
    return root


def test_toolchain_folder_gives_torch_the_unversioned_libraries_it_links_against(tmp_path):
    root = fake_wheel_tree(tmp_path / "site")
    home = toolchain.assemble_cuda_home(root, tmp_path / "home")
    assert (home / "bin" / "nvcc").is_file()
    assert (home / "include" / "cuda_runtime.h").is_file()
    assert (home / "nvvm" / "bin" / "cicc").is_file()
    assert (home / "lib64" / "libcudart.so").read_text() == "libcudart.so.13"
    assert (home / "lib64" / "libnvrtc-builtins.so").read_text() == "libnvrtc-builtins.so.13.0"
    assert (home / "lib64" / "libcudadevrt.a").is_file()
    assert (home / "lib" / "libnvvm.so").is_file()
    # Assembling again (every start of the app) changes nothing and does not fail.
    assert toolchain.assemble_cuda_home(root, tmp_path / "home") == home


def test_pip_toolchain_is_used_when_no_nvcc_is_on_path(tmp_path):
    fake_wheel_tree(tmp_path / "site")
    environ = {"PATH": str(tmp_path / "empty")}
    home = toolchain.ensure_cuda_home(
        environ, search_paths=[str(tmp_path / "site")], cache_dir=tmp_path / "home"
    )
    assert home == str(tmp_path / "home")
    assert environ["CUDA_HOME"] == home


def test_a_wrapper_nvcc_without_headers_beside_it_does_not_hide_the_pip_toolchain(tmp_path):
    fake_wheel_tree(tmp_path / "site")
    wrapper = tmp_path / "usr" / "bin" / "nvcc"  # torch would take tmp_path/usr as CUDA_HOME
    wrapper.parent.mkdir(parents=True)
    wrapper.write_text("#!/bin/sh\n")
    wrapper.chmod(0o755)
    environ = {"PATH": str(wrapper.parent)}
    home = toolchain.ensure_cuda_home(
        environ, search_paths=[str(tmp_path / "site")], cache_dir=tmp_path / "home"
    )
    assert environ["CUDA_HOME"] == home == str(tmp_path / "home")


def test_a_configured_cuda_home_or_a_full_toolkit_on_path_is_left_alone(tmp_path):
    fake_wheel_tree(tmp_path / "site")
    environ = {"CUDA_HOME": "/opt/cuda", "PATH": ""}
    assert toolchain.ensure_cuda_home(environ, search_paths=[str(tmp_path / "site")]) == "/opt/cuda"
    toolkit = tmp_path / "cuda-13.0"
    fake = fake_wheel_tree(tmp_path / "toolkit")
    toolkit.symlink_to(fake)
    environ = {"PATH": str(toolkit / "bin")}
    (toolkit / "bin" / "nvcc").chmod(0o755)
    assert toolchain.ensure_cuda_home(environ, search_paths=[]) == str(toolkit)
    assert "CUDA_HOME" not in environ


def test_no_toolchain_anywhere_sets_nothing(tmp_path):
    environ = {"PATH": str(tmp_path)}
    assert toolchain.ensure_cuda_home(environ, search_paths=[str(tmp_path)]) is None
    assert "CUDA_HOME" not in environ


def test_toolchain_requirement_matches_the_cuda_major_of_the_pinned_torch():
    text = (ROOT / "requirements.txt").read_text()
    assert re.search(r"^cuda-toolkit\[[^\]]*nvcc[^\]]*cccl[^\]]*\]==13\.0\.\d+", text, re.M)
    assert pinned_version("torch") == "2.13.0"  # PyPI's 2.13.0 Linux wheels are CUDA 13.0 builds
