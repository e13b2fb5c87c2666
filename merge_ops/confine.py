"""File-level confinement: every file a merge reads or copies must resolve inside the data dirs.

Confining the *folder* a recipe names is not enough: a ``model.safetensors`` inside it can be a symlink to a
checkpoint elsewhere, and a ``config.json`` or ``tokenizer.json`` linked to a secret would be copied into the
output (and pushed to the Hub). So each entry of a local source folder (files and links, not following
subfolders: nothing below the top level is read) is resolved with ``os.path.realpath`` and must lie inside a
root. The API checks at submission (``app.services.paths``) and the worker again just before the merge
(``check_recipe_files``), because a link can change after submission. Torch-free; Hub sources are not paths.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from merge_ops.errors import UnsafeCheckpointError
from merge_ops.recipe import HubSource, Recipe


def _inside(path: str, roots: Sequence[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip(os.sep) + os.sep) for root in roots)


def escaping_files(path: str | Path, *, roots: Sequence[Path]) -> list[str]:
    """Entries of the source ``path`` (itself when a file) whose realpath leaves every root, as
    ``"name -> target"``; empty when all stay inside or ``path`` does not exist (reported elsewhere)."""
    real_roots = [os.path.realpath(root) for root in roots]
    path = os.fspath(path)
    real = os.path.realpath(path)
    if not _inside(real, real_roots):
        return [f"{path} -> {real}"]
    if not os.path.isdir(real):
        return []
    escaping: list[str] = []
    with os.scandir(real) as entries:
        for entry in entries:
            target = os.path.realpath(entry.path)
            if not _inside(target, real_roots):
                escaping.append(f"{entry.name} -> {target}")
    return sorted(escaping)


def _local(value: Any) -> str | None:
    if value is None or isinstance(value, HubSource | dict) or str(value).startswith("hf://"):
        return None
    return str(value)


def recipe_local_paths(recipe: Recipe) -> list[tuple[str, str]]:
    """(field, path) of every local path a merge of ``recipe`` reads."""
    fields: list[tuple[str, Any]] = [(".".join(map(str, loc)), value) for loc, value in recipe.sources()]
    if recipe.evaluator is not None:
        fields += [("evaluator.data", recipe.evaluator.data), ("evaluator.model", recipe.evaluator.model)]
    return [(name, path) for name, value in fields if (path := _local(value)) is not None]


def check_files(paths: Iterable[tuple[str, str]], *, roots: Sequence[Path]) -> None:
    """Raise UnsafeCheckpointError naming every (field, file) that resolves outside ``roots``."""
    problems = [
        {"loc": name.split("."), "msg": f"links outside the data dirs: {', '.join(escaping)}"}
        for name, path in paths
        if (escaping := escaping_files(path, roots=roots))
    ]
    if problems:
        summary = "; ".join(f"{'.'.join(p['loc'])}: {p['msg']}" for p in problems)
        raise UnsafeCheckpointError(
            f"refused: {summary} (copy the files into a data dir instead of linking them)", errors=problems
        )


def check_recipe_files(recipe: Recipe, *, roots: Sequence[Path]) -> None:
    """The worker's run-time check: every local file of the recipe still resolves inside ``roots``."""
    check_files(recipe_local_paths(recipe), roots=roots)
