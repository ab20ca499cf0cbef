"""Without a usable GPU, the message names this machine's cause and its remedy, once."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.gpu_check import no_gpu_here, no_gpu_message, torch_cuda_version

CUDA_VERSION_PY = "__version__ = '2.13.0'\ndebug = False\ncuda: Optional[str] = '13.0'\n"
CPU_VERSION_PY = "__version__ = '2.13.0+cpu'\ndebug = False\ncuda: Optional[str] = None\n"
DRIVER_LINE = (
    "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  550.54.15  Release Build  "
    "(dvs-builder@U16-I3-B03-4-3)  Tue Mar  5 22:15:33 UTC 2024\n"
)


def torch_install(tmp_path: Path, version_py: str) -> Path:
    folder = tmp_path / "torch"
    folder.mkdir(parents=True)
    (folder / "version.py").write_text(version_py)
    return folder


def driver_file(tmp_path: Path, text: str | None) -> Path:
    path = tmp_path / "nvidia-version"
    if text is not None:
        path.write_text(text)
    return path


def test_a_cpu_only_torch_is_named_with_the_cuda_build_to_install(tmp_path):
    torch_dir = torch_install(tmp_path, CPU_VERSION_PY)
    message = no_gpu_message({}, torch_dir, "2.13.0+cpu", driver_file(tmp_path, DRIVER_LINE))
    assert "torch 2.13.0+cpu is a CPU-only build" in message
    assert "download.pytorch.org/whl/cu130" in message
    assert "driver" not in message


def test_a_machine_without_an_nvidia_driver_is_told_so_not_to_reinstall_torch(tmp_path):
    torch_dir = torch_install(tmp_path, CUDA_VERSION_PY)
    message = no_gpu_message({}, torch_dir, "2.13.0", driver_file(tmp_path, None))
    assert "no NVIDIA GPU, or its driver is not loaded" in message
    assert "CPU-only" not in message and "pip install" not in message


def test_a_driver_that_cuda_cannot_use_is_named_with_its_version(tmp_path):
    torch_dir = torch_install(tmp_path, CUDA_VERSION_PY)
    message = no_gpu_message({}, torch_dir, "2.13.0", driver_file(tmp_path, DRIVER_LINE))
    assert "built for CUDA 13.0, and driver 550.54.15 does not serve it" in message
    assert "update the NVIDIA driver to 580 or newer" in message


def test_a_missing_torch_says_to_install_the_requirements(tmp_path):
    message = no_gpu_message({}, None, "", driver_file(tmp_path, None))
    assert "torch is not installed; pip install -r requirements.txt" in message


def test_on_a_space_the_remedy_is_the_hardware_under_the_spaces_settings_tab(tmp_path):
    torch_dir = torch_install(tmp_path, CUDA_VERSION_PY)
    message = no_gpu_message({"SPACE_ID": "a/b"}, torch_dir, "2.13.0", driver_file(tmp_path, None))
    assert "open the Settings tab and pick a GPU under Space hardware" in message
    assert "on the Space's page" in message  # not the page's own footer "Settings"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("cuda: Optional[str] = '13.0'", "13.0"),
        ("cuda = '12.8'", "12.8"),
        ("cuda: Optional[str] = None", None),
    ],
)
def test_the_cuda_release_is_read_from_torchs_version_file(tmp_path, line, expected):
    torch_dir = torch_install(tmp_path, f"__version__ = '2.13.0'\n{line}\n")
    assert torch_cuda_version(torch_dir) == expected


def test_every_message_is_one_line_without_repeating_itself(tmp_path):
    torch_dir = torch_install(tmp_path, CUDA_VERSION_PY)
    messages = [
        no_gpu_message({}, None, "", driver_file(tmp_path, None)),
        no_gpu_message({}, torch_install(tmp_path / "cpu", CPU_VERSION_PY), "2.13.0+cpu"),
        no_gpu_message({}, torch_dir, "2.13.0", driver_file(tmp_path, None)),
        no_gpu_message({}, torch_dir, "2.13.0", driver_file(tmp_path, DRIVER_LINE)),
        no_gpu_here(),
    ]
    for message in messages:
        assert "\n" not in message and message.count("No GPU") == 1, message
        assert message.endswith("exllamav2 runs only on NVIDIA GPUs.")


def test_this_machine_is_diagnosed_as_a_cpu_only_torch():
    torch = pytest.importorskip("torch")
    if torch.version.cuda is not None:
        pytest.skip("this torch is a CUDA build")
    assert "is a CPU-only build" in no_gpu_here()
