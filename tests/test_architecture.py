"""The architecture, read from the imports: three rooms (starcoder2, engine, web) and one door.

- starcoder2/ is the model's facts in plain Python: it imports neither engine nor web, nor any of
  torch, exllamav2, triton or gradio;
- web/ and app.py reach the engine only through engine.api;
- the engine never imports the web;
- only engine/gpu/ imports torch, exllamav2 or triton.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GPU_LIBRARIES = ("torch", "exllamav2", "triton")
DOOR = "engine.api"


def modules_imported(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import in a file, nested ones included, relative ones resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            # `from engine import api` imports engine.api: name the module, not the package.
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def sources(*places: str) -> list[Path]:
    paths: list[Path] = []
    for place in places:
        target = ROOT / place
        paths += sorted(target.rglob("*.py")) if target.is_dir() else [target]
    return paths


def named(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(f"{p}.") for p in packages)


def breaches(paths: list[Path], rule) -> list[str]:
    return [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in paths
        for line, module in modules_imported(path)
        if rule(module)
    ]


def test_the_model_core_imports_neither_the_engine_nor_the_web_nor_a_runtime():
    core = sources("starcoder2")
    assert core, "starcoder2/ is missing"
    assert (
        breaches(core, lambda m: named(m, "engine", "web", "app", "gradio", *GPU_LIBRARIES)) == []
    )


def test_the_web_and_app_reach_the_engine_only_through_its_door():
    front = sources("web", "app.py")
    assert breaches(front, lambda m: named(m, "engine") and not named(m, DOOR)) == []


def test_the_engine_never_imports_the_web():
    assert breaches(sources("engine"), lambda m: named(m, "web", "app", "gradio")) == []


def test_only_engine_gpu_imports_torch_exllamav2_or_triton():
    outside = [p for p in sources("starcoder2", "engine", "web", "app.py") if "gpu" not in p.parts]
    assert breaches(outside, lambda m: named(m, *GPU_LIBRARIES)) == []


def test_the_door_is_light_enough_for_the_web_process_to_import():
    """engine.api's own imports reach no GPU library, at any depth outside engine/gpu/."""
    seen: set[str] = set()
    todo = [DOOR]
    while todo:
        module = todo.pop()
        path = ROOT / (module.replace(".", "/") + ".py")
        if module in seen or not path.is_file():
            continue
        seen.add(module)
        assert not named(module, "engine.gpu"), f"{DOOR} reaches {module} at import time"
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:  # top-level imports only: a function may import late
            if isinstance(node, ast.ImportFrom) and node.module:
                todo += [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                todo += [a.name for a in node.names]
    assert not [m for m in seen if named(m, *GPU_LIBRARIES)]


@pytest.mark.parametrize(
    ("source", "rule", "expected"),
    [
        ("from engine.client import EngineProcess\n", "door", True),
        ("from engine import api\n", "door", False),
        ("from engine.api import EngineClient\n", "door", False),
        ("def f():\n    import torch\n", "gpu", True),
        ("import web.chat\n", "web", True),
        ("from . import probe\n", "door", True),
    ],
)
def test_the_import_reader_sees_what_each_rule_forbids(tmp_path, source, rule, expected):
    """The rules above would fail on a breach: nested, relative and package-form imports count."""
    package = tmp_path / "engine" / "sub"
    package.mkdir(parents=True)
    path = package / "probe.py"
    path.write_text(source)
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        found = [module for _, module in modules_imported(path)]
    finally:
        ROOT = saved
    checks = {
        "door": lambda m: named(m, "engine") and not named(m, DOOR),
        "gpu": lambda m: named(m, *GPU_LIBRARIES),
        "web": lambda m: named(m, "web"),
    }
    assert any(checks[rule](module) for module in found) is expected, found


OWN_PACKAGES = ("starcoder2", "engine", "web", "tests")


@functools.cache  # a module imported from many files is read once
def defined_names(path: Path) -> set[str]:
    """What a module defines at its top level: functions, classes, assignments and imports."""
    names: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def module_file(root: Path, module: str) -> Path | None:
    base = root / module.replace(".", "/")
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def unresolved(path: Path, root: Path = ROOT) -> list[str]:
    """Imports of our own code in a file that name a missing module, or a name its module lacks."""
    where = path.relative_to(root)
    missing = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and not node.level and node.module:
            if not named(node.module, *OWN_PACKAGES):
                continue
            source = module_file(root, node.module)
            if source is None:
                missing.append(f"{where}:{node.lineno} {node.module}")
                continue
            for alias in node.names:
                if alias.name not in defined_names(source):
                    if module_file(root, f"{node.module}.{alias.name}") is None:
                        missing.append(f"{where}:{node.lineno} {node.module}.{alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if named(alias.name, *OWN_PACKAGES) and module_file(root, alias.name) is None:
                    missing.append(f"{where}:{node.lineno} {alias.name}")
    return missing


def test_every_import_of_our_own_code_in_the_benchmarks_and_tests_names_what_exists():
    """Benchmarks import late and GPU test modules skip first on a CPU machine: read them."""
    files = sources("bench", "tests")
    assert len(files) > 20
    assert [line for path in files for line in unresolved(path)] == []


def test_the_import_reader_finds_a_name_its_module_no_longer_has(tmp_path):
    (tmp_path / "engine" / "gpu").mkdir(parents=True)
    (tmp_path / "engine" / "__init__.py").write_text("")
    (tmp_path / "engine" / "gpu" / "__init__.py").write_text("")
    (tmp_path / "engine" / "gpu" / "exl2_matmul.py").write_text("def prepare():\n    pass\n")
    (tmp_path / "bench").mkdir()
    probe = tmp_path / "bench" / "probe.py"
    probe.write_text(
        "def main():\n"
        "    from engine.gpu.exl2_matmul import prepare\n"
        "    from engine.gpu import exl2_matmul, prepare\n"
        "    import engine.cpu\n"
    )
    assert unresolved(probe, tmp_path) == [
        "bench/probe.py:3 engine.gpu.prepare",
        "bench/probe.py:4 engine.cpu",
    ]
