"""dvc.yaml lists, as each stage's deps, every library module its command runs.

DVC re-runs a stage only when a listed dep changes, so a module that a stage imports but does not list
(a metric that picks the classifier's checkpoint, the h5 writer) could change the stage's output while
`dvc repro` reports it up to date. The imports are read statically (``ast``), the ones inside functions
included, and followed through the package; a few modules that cannot change what a stage writes are
exempt (PLUMBING).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"

# Argument parsing, error types, the process launcher and the package marker: they decide how a stage
# starts or fails, never the bytes it writes.
PLUMBING = {"src/weak2full/__init__.py", "src/weak2full/cli.py", "src/weak2full/errors.py",
            "src/weak2full/launch.py"}


def module_file(name: str) -> Path | None:
    """The file of module ``name`` under src/ (a package's __init__.py), or None if it is not ours."""
    path = SRC.joinpath(*name.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def imported_modules(path: Path) -> set[str]:
    """Every ``weak2full`` module (and imported name, which may be a submodule) that ``path`` imports."""
    package = list(path.relative_to(SRC).parent.parts) if SRC in path.parents else []
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return {n for n in names if n.split(".")[0] == "weak2full"}


def import_closure(entry: list[Path]) -> set[str]:
    """Repository-relative paths of every library file that the ``entry`` files import, transitively."""
    seen: set[Path] = set()
    todo = list(entry)
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imported_modules(path):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a and a.b too
                found = module_file(".".join(parts[:i]))
                if found is not None and found not in seen:
                    todo.append(found)
    return {p.relative_to(ROOT).as_posix() for p in seen if SRC in p.parents}


def stages() -> dict[str, dict]:
    raw = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: stage.get("do", stage) for name, stage in raw.items()}


@pytest.mark.parametrize("name", sorted(stages()))
def test_every_library_module_a_stage_runs_is_a_dep(name):
    stage = stages()[name]
    cmd = stage["cmd"]
    entry = [ROOT / tok for tok in cmd.split() if re.fullmatch(r"stages/\w+\.py", tok)]
    assert entry, f"stage {name}: no stages/*.py script in its cmd {cmd!r}"
    entry += [f for f in map(module_file, re.findall(r"-m (weak2full[\w.]*)", cmd)) if f is not None]
    deps = [d.rstrip("/") for d in stage.get("deps", [])]
    assert entry[0].relative_to(ROOT).as_posix() in deps, f"stage {name}: its script is not a dep"

    def listed(path: str) -> bool:
        return any(path == d or path.startswith(d + "/") for d in deps)

    missing = sorted(p for p in import_closure(entry) - PLUMBING if not listed(p))
    assert not missing, f"stage {name} runs these modules but dvc.yaml does not list them as deps: {missing}"


def test_the_import_reader_follows_relative_lazy_and_package_imports(tmp_path):
    # the reader itself, on the package: models/__init__.py imports its submodules relatively, and
    # cams.run imports weak2full.models inside the function
    closure = import_closure([SRC / "weak2full" / "cams.py"])
    assert {"src/weak2full/models/__init__.py", "src/weak2full/models/heatmap.py",
            "src/weak2full/h5.py", "src/weak2full/params.py"} <= closure
    assert "src/weak2full/report.py" not in closure
