"""kernels/ sits at the bottom of the dependency arrows: it imports torch (and triton, lazily), never the engine
or the service. Its typed error is its own (``kernels.KernelUnavailable``); merge_ops maps it."""

from __future__ import annotations

import ast
from pathlib import Path

KERNELS = Path(__file__).resolve().parents[2] / "kernels"
FORBIDDEN = ("merge_ops", "app", "workers")


def _imported_modules(path: Path) -> list[str]:
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def test_kernels_import_nothing_above_them() -> None:
    files = sorted(KERNELS.rglob("*.py"))
    assert files
    offending = {
        str(path.relative_to(KERNELS)): name
        for path in files
        for name in _imported_modules(path)
        if name.split(".")[0] in FORBIDDEN
    }
    assert offending == {}


def test_triton_is_imported_only_by_the_triton_files() -> None:
    allowed = {"triton_ops.py"} | {f"triton/{p.name}" for p in (KERNELS / "triton").glob("*.py")}
    importers = {
        str(path.relative_to(KERNELS))
        for path in KERNELS.rglob("*.py")
        if any(name.split(".")[0] == "triton" for name in _imported_modules(path))
    }
    assert importers <= allowed
