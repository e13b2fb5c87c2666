"""Confine local source, output and evaluator (``data``, ``model``) paths to the data dirs (``ALLOY_DATA_DIRS``).

A path is accepted when its ``os.path.realpath`` lies inside the realpath of a root: this catches ``..``,
symlinks that leave a root and absolute paths elsewhere. ``..`` is refused outright even when it would land back
inside. A relative path is looked up in each root in order; the first root where it exists decides (an escaping
symlink there is an error, not a reason to try the next root). Accepted paths are rewritten to their absolute
realpath, so the worker reads exactly what was checked and the recipe digest does not depend on spelling.
Hub sources (``hf://`` or a ``{repo, revision}`` object) are not paths and pass through. Every entry of an
accepted source folder must resolve inside a root too (``merge_ops.confine``: a symlinked shard or config.json).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path, PurePath
from typing import Any

from app.services.errors import PathNotAllowedError
from merge_ops.confine import escaping_files
from merge_ops.recipe import HubSource, Recipe


class _Refused(ValueError):
    pass


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def confine_path(raw: str, *, roots: Sequence[Path], must_exist: bool) -> Path:
    """The absolute realpath of ``raw`` inside one of ``roots``; raises ValueError saying why not."""
    if ".." in PurePath(raw).parts:
        raise _Refused("'..' is not allowed in paths")
    real_roots = [os.path.realpath(root) for root in roots]
    if os.path.isabs(raw):
        real = os.path.realpath(raw)
        if not any(_inside(real, root) for root in real_roots):
            raise _Refused(f"{raw!r} is outside the data dirs")
        if must_exist and not os.path.exists(real):
            raise _Refused(f"{raw!r} does not exist")
        return Path(real)
    for root in real_roots:
        if os.path.lexists(os.path.join(root, raw)):
            real = os.path.realpath(os.path.join(root, raw))
            if not _inside(real, root):
                raise _Refused(f"{raw!r} resolves outside the data dirs (symlink)")
            if must_exist and not os.path.exists(real):
                raise _Refused(f"{raw!r} does not exist")
            return Path(real)
    if must_exist or not real_roots:
        raise _Refused(f"{raw!r} was not found in the data dirs")
    real = os.path.realpath(os.path.join(real_roots[0], raw))
    if not _inside(real, real_roots[0]):
        raise _Refused(f"{raw!r} resolves outside the data dirs (symlink)")
    return Path(real)


def _refuse_file_ancestor(path: Path) -> None:
    """An output under a file can never be created; say so now, not as a failed job later."""
    for parent in (path, *path.parents):
        if parent.exists():
            if not parent.is_dir():
                raise _Refused(f"{str(parent)!r} is a file, so no output folder can be created under it")
            return


def _confine_source(value: Any, loc: list[str], roots: Sequence[Path], errors: list[dict[str, Any]]) -> Any:
    if value is None or isinstance(value, dict | HubSource) or str(value).startswith("hf://"):
        return value
    try:
        real = confine_path(str(value), roots=roots, must_exist=True)
    except _Refused as exc:
        errors.append({"loc": loc, "msg": str(exc)})
        return value
    _confine_files(real, loc, roots, errors)
    return str(real)


def _confine_files(real: Path, loc: list[str], roots: Sequence[Path], errors: list[dict[str, Any]]) -> None:
    """Files inside an accepted folder may still link out (a shard, config.json, tokenizer.json)."""
    escaping = escaping_files(real, roots=roots)
    if escaping:
        errors.append({"loc": loc, "msg": f"links outside the data dirs: {', '.join(escaping)}"})


def confine_recipe_paths(recipe: Recipe, *, roots: Sequence[Path]) -> Recipe:
    """The recipe with every local path absolute and inside ``roots``; PathNotAllowedError lists each offender."""
    errors: list[dict[str, Any]] = []
    confined = recipe.with_sources(
        lambda loc, source: _confine_source(source, [str(part) for part in loc], roots, errors)
    )
    output = confined.output
    if output.path:
        try:
            real_output = confine_path(output.path, roots=roots, must_exist=False)
            _refuse_file_ancestor(real_output)
            output = output.model_copy(update={"path": str(real_output)})
        except _Refused as exc:
            errors.append({"loc": ["output", "path"], "msg": str(exc)})
    evaluator = confined.evaluator
    if evaluator is not None:
        update: dict[str, str] = {}
        for field in ("data", "model"):
            value = getattr(evaluator, field, None)
            if not value:
                continue
            try:
                real = confine_path(value, roots=roots, must_exist=True)
            except _Refused as exc:
                errors.append({"loc": ["evaluator", field], "msg": str(exc)})
            else:
                update[field] = str(real)
                _confine_files(real, ["evaluator", field], roots, errors)
        evaluator = evaluator.model_copy(update=update)
    if errors:
        raise _not_allowed(errors)
    return confined.model_copy(update={"output": output, "evaluator": evaluator})


def confine_analysis_sources(
    sources: Sequence[Any], base: Any, *, roots: Sequence[Path]
) -> tuple[list[Any], Any]:
    """Confine an analysis request's ``sources`` and ``base``, reporting the problems of both at once."""
    errors: list[dict[str, Any]] = []
    confined = [_confine_source(s, ["sources", str(i)], roots, errors) for i, s in enumerate(sources)]
    confined_base = _confine_source(base, ["base"], roots, errors)
    if errors:
        raise _not_allowed(errors)
    return confined, confined_base


def _not_allowed(errors: list[dict[str, Any]]) -> PathNotAllowedError:
    summary = "; ".join(f"{'.'.join(e['loc'])}: {e['msg']}" for e in errors)
    return PathNotAllowedError(f"path not allowed: {summary}", errors=errors)
