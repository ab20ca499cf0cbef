"""Make a CUDA_HOME out of PyPI's CUDA 13 wheels so exllamav2 can compile its extension.

PyPI's torch 2.13.0 is built with CUDA 13.0; exllamav2 0.3.2 compiles its extension on first import
with `torch.utils.cpp_extension.load`, which needs `nvcc` and the CUDA headers under CUDA_HOME. The
wheels from requirements.txt (cuda-toolkit[nvcc,cccl]==13.0.3, Linux) install
them into `site-packages/nvidia/cu13`, but torch links with `-L$CUDA_HOME/lib64 -lcudart`, and the
wheels ship only `libcudart.so.13`. So we assemble a small folder of symlinks (bin, include, nvvm,
lib64 with unversioned library names) and point CUDA_HOME at it.

Standard library only. Call `ensure_cuda_home()` before anything imports
`torch.utils.cpp_extension` (exllamav2 does on its first import), or run
`export CUDA_HOME="$(python -m engine.gpu.toolchain)"` in a shell. The engine calls it before its
first import of exllamav2.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import sys
import threading
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from pathlib import Path

CUDA_MAJOR = 13
# The parts of a toolkit that nvcc and torch's extension builder look for under CUDA_HOME.
LINKED_DIRS = ("bin", "include", "nvvm")
_VERSIONED_LIBRARY = re.compile(r"^(lib.+\.so)\.\d+(\.\d+)*$")


def find_pip_cuda_root(search_paths: Iterable[str] | None = None) -> Path | None:
    """The `nvidia/cu13` folder of PyPI's CUDA wheels that holds bin/nvcc, or None."""
    for entry in sys.path if search_paths is None else search_paths:
        root = Path(entry or ".") / "nvidia" / f"cu{CUDA_MAJOR}"
        if is_toolkit(root):
            return root.resolve()
    return None


def default_cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where the assembled folder lives: a user-writable cache (site-packages may be read-only)."""
    env = os.environ if environ is None else environ
    base = Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "starcoder2-chat" / f"cuda-{CUDA_MAJOR}"


def _replace_symlink(link: Path, target: Path) -> None:
    if link.is_symlink() and Path(os.readlink(link)) == target:
        return
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.exists():
        shutil.rmtree(link)
    link.symlink_to(target)


def assemble_cuda_home(root: Path, target: Path) -> Path:
    """Fill `target` with symlinks into the wheels' `root` so it works as CUDA_HOME; idempotent."""
    target.mkdir(parents=True, exist_ok=True)
    for name in LINKED_DIRS:
        if (root / name).is_dir():
            _replace_symlink(target / name, root / name)
    lib64 = target / "lib64"
    lib64.mkdir(exist_ok=True)
    libraries = sorted(root.joinpath("lib").iterdir()) if (root / "lib").is_dir() else []
    for library in libraries:
        _replace_symlink(lib64 / library.name, library)
        # The linker resolves `-lcudart` through the unversioned name the wheels leave out.
        match = _VERSIONED_LIBRARY.match(library.name)
        if match and not (root / "lib" / match.group(1)).exists():
            _replace_symlink(lib64 / match.group(1), library)
    _replace_symlink(target / "lib", Path("lib64"))
    return target


def is_toolkit(home: Path) -> bool:
    """True when `home` has what torch's extension builder uses: nvcc and the runtime headers."""
    return (home / "bin" / "nvcc").is_file() and (home / "include" / "cuda_runtime.h").is_file()


def ensure_cuda_home(
    environ: MutableMapping[str, str] | None = None,
    search_paths: Iterable[str] | None = None,
    cache_dir: Path | None = None,
) -> str | None:
    """The CUDA_HOME torch will use; set it to the pip toolchain when none is usable. None: none."""
    env = os.environ if environ is None else environ
    configured = env.get("CUDA_HOME") or env.get("CUDA_PATH")
    if configured:
        return configured
    nvcc = shutil.which("nvcc", path=env.get("PATH"))
    # torch takes the folder above nvcc's as CUDA_HOME; a wrapper script elsewhere breaks that.
    if nvcc and is_toolkit(Path(nvcc).parent.parent):
        return str(Path(nvcc).parent.parent)
    root = find_pip_cuda_root(search_paths)
    if root is None:
        return None
    home = str(assemble_cuda_home(root, cache_dir or default_cache_dir(env)))
    env["CUDA_HOME"] = home
    # torch reads CUDA_HOME once, when torch.utils.cpp_extension is first imported.
    extension_module = sys.modules.get("torch.utils.cpp_extension")
    if environ is None and extension_module is not None:
        setattr(extension_module, "CUDA_HOME", home)  # noqa: B010 (not a declared attribute)
    return home


# exllamav2 0.3.2 compiles these many sources on its first import (exllamav2/ext.py).
EXTENSION_NAME = "exllamav2_ext"
EXTENSION_SOURCES = 48


def extension_build_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where torch's extension builder puts exllamav2's build (torch.utils.cpp_extension's rule)."""
    env = os.environ if environ is None else environ
    base = env.get("TORCH_EXTENSIONS_DIR")
    if base:
        return Path(base) / EXTENSION_NAME
    import torch

    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    cuda = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    return Path.home() / ".cache" / "torch_extensions" / f"{python}_{cuda}" / EXTENSION_NAME


def extension_needs_build(build_dir: Path) -> bool:
    """True when importing exllamav2 will compile its extension (no prebuilt module, no build)."""
    if importlib.util.find_spec(EXTENSION_NAME) is not None:
        return False
    return not (build_dir / f"{EXTENSION_NAME}.so").is_file()


def watch_extension_build(
    build_dir: Path, report: Callable[[int, int], None], every_s: float = 2.0
) -> Callable[[], None]:
    """Call report(objects built, sources) every few seconds until the returned stop() is called."""
    stopped = threading.Event()

    def built() -> int:
        count = len(list(build_dir.glob("*.o"))) if build_dir.is_dir() else 0
        return min(count, EXTENSION_SOURCES)

    def run() -> None:
        while not stopped.wait(every_s):
            report(built(), EXTENSION_SOURCES)

    report(built(), EXTENSION_SOURCES)  # at once: the page says "compiling" from the start
    threading.Thread(target=run, name="extension-build-watch", daemon=True).start()
    return stopped.set


def main() -> int:
    """Print the CUDA_HOME to use, or explain on stderr why there is none."""
    home = ensure_cuda_home()
    if home is None:
        print(
            "No CUDA toolkit found: install one with `pip install -r requirements.txt` (Linux).",
            file=sys.stderr,
        )
        return 1
    print(home)
    return 0


if __name__ == "__main__":
    sys.exit(main())
