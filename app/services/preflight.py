"""The worker's preflight, run for ``POST /v1/recipes/validate`` and ``/v1/recipes/plan``: headers only (names,
shapes, dtypes, vocabulary), the output folder and the Hub token, every problem listed at once.

The checks are ``merge_ops.preflight``'s own (``open_source``, ``check_compatible``, ``build_plan``,
``check_output``), so Validate says "valid" only for a recipe whose job gets past the worker's preflight.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.core.config import Settings
from merge_ops.errors import IncompatibleModelsError, MergeError
from merge_ops.params import CATALOG
from merge_ops.recipe import HubSource, Recipe, parse_source

if TYPE_CHECKING:
    from merge_ops.preflight import MergePlan

log = logging.getLogger("alloy.api")
Problem = dict[str, Any]


def _sources_by_loc(recipe: Recipe) -> list[tuple[list[str], Any]]:
    return [([str(part) for part in loc], value) for loc, value in recipe.sources()]


def hub_token_problems(recipe: Recipe, *, hf_token: str | None, settings: Settings) -> list[Problem]:
    """A Hub destination needs a token with write access: the request's, else the server's."""
    if recipe.output.hub is not None and not (hf_token or settings.hf_token):
        return [
            {
                "loc": ["output", "hub", "repo"],
                "msg": "publishing to the Hub needs a Hub token: enter one under Tokens "
                "(sent as X-HF-Token), or set ALLOY_HF_TOKEN on the server",
            }
        ]
    return []


def output_problems(recipe: Recipe) -> list[Problem]:
    if recipe.output.path is None:
        return []  # the worker picks a fresh folder under the first data dir
    from merge_ops.preflight import check_output

    try:
        check_output(Path(recipe.output.path))
    except MergeError as exc:
        return [{"loc": ["output", "path"], "msg": exc.detail}]
    return []


def _loc_of(message: str, labelled: list[tuple[list[str], str]]) -> list[str]:
    """The source a compatibility problem names (the longest label found in it), else the models list."""
    named = [(loc, label) for loc, label in labelled if label and label in message]
    return max(named, key=lambda item: len(item[1]))[0] if named else ["models"]


#: a model of another size differs in every tensor: the first few say it, a count says the rest
MAX_PER_SOURCE = 4


def _capped(problems: list[Problem]) -> list[Problem]:
    kept: list[Problem] = []
    extra: dict[tuple[str, ...], int] = {}
    for problem in problems:
        loc = tuple(problem["loc"])
        if sum(tuple(p["loc"]) == loc for p in kept) < MAX_PER_SOURCE:
            kept.append(problem)
        else:
            extra[loc] = extra.get(loc, 0) + 1
    for loc, count in extra.items():
        kept.append({"loc": list(loc), "msg": f"and {count} more tensor(s) with the same kind of problem"})
    return kept


def source_problems(recipe: Recipe) -> tuple[MergePlan | None, list[Problem], list[str]]:
    """(plan, problems, notes): each local source opened on its own (so every unreadable one is listed), then
    the worker's compatibility check and plan over headers. Hub sources are checked when the job starts."""
    # merge_ops.preflight imports torch: loaded on the first preflight, not when the API starts
    from merge_ops.preflight import build_plan, check_compatible
    from merge_ops.sources import open_source, open_sources

    problems: list[Problem] = []
    located = _sources_by_loc(recipe)
    hub = [loc for loc, value in located if isinstance(parse_source(value), HubSource)]
    if hub:
        notes = ["Hub sources are read when the job starts, so shapes were not checked here"]
        return None, [], notes
    for loc, value in located:
        try:
            opened = open_source(Path(parse_source(value)), allow_pickle=recipe.allow_pickle)  # type: ignore[arg-type]
        except MergeError as exc:
            problems.append({"loc": loc, "msg": exc.detail})
        else:
            with contextlib.suppress(Exception):
                opened.close()
    if problems:
        return None, problems, []
    info = CATALOG[recipe.method]
    try:
        sources = open_sources(recipe, info, resolver=None)
    except MergeError as exc:
        return None, [{"loc": [], "msg": exc.detail}], []
    try:
        check_compatible(recipe, sources)
        return build_plan(recipe, info, sources), [], []
    except IncompatibleModelsError as exc:
        labelled = [(loc, str(value)) for loc, value in located if loc[0] == "models"]
        messages = exc.context.get("problems") or [exc.detail]
        return None, _capped([{"loc": _loc_of(m, labelled), "msg": m} for m in messages]), []
    except MergeError as exc:
        return None, [{"loc": [], "msg": exc.detail}], []
    finally:
        sources.close()


def preflight(
    recipe: Recipe, *, hf_token: str | None, settings: Settings
) -> tuple[MergePlan | None, list[Problem], list[str]]:
    plan, problems, notes = source_problems(recipe)
    return (
        plan,
        problems + output_problems(recipe) + hub_token_problems(recipe, hf_token=hf_token, settings=settings),
        notes,
    )
