"""/v1/recipes: validation and import helpers for editors (the web form); they create no job."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from app.api.deps import CurrentToken, HfToken, RecipeBody, SettingsDep, ValidationAllowed
from app.api.openapi_docs import PROBLEM_RESPONSES, recipe_request_body
from app.core.config import Settings
from app.schemas import RecipePlan
from app.services import jobs
from app.services.preflight import preflight
from merge_ops.errors import RecipeError
from merge_ops.mergekit_refs import local_roots
from merge_ops.recipe import Recipe, load_recipe

router = APIRouter(prefix="/recipes", tags=["recipes"], responses=PROBLEM_RESPONSES)


def _checked(body: RecipeBody, settings: Settings, hf_token: str | None) -> tuple[Recipe, Any, list[str]]:
    recipe = jobs.prepare_recipe(body, settings=settings)
    plan, problems, notes = preflight(recipe, hf_token=hf_token, settings=settings)
    if problems:
        raise RecipeError(
            f"the worker's preflight would fail: {len(problems)} problem{'s' if len(problems) > 1 else ''}",
            errors=problems,
        )
    return recipe, plan, notes


@router.post(
    "/validate",
    response_model=dict[str, Any],
    dependencies=[ValidationAllowed],
    openapi_extra=recipe_request_body(),
    summary="Validate a recipe",
)
def validate_recipe(
    body: RecipeBody,
    settings: SettingsDep,
    caller: CurrentToken,
    hf_token: HfToken,
    preflight_sources: Annotated[
        bool, Query(alias="preflight", description="Also run the worker's preflight (headers only).")
    ] = True,
) -> dict[str, Any]:
    """Every check a submission makes (recipe and path confinement) and the worker's preflight (sources' headers:
    names, shapes, dtypes, vocabulary; the output folder; a Hub token for a Hub destination), without creating a
    job: the normalized recipe, or a 422 listing every problem. ``preflight=false`` skips the preflight."""
    if not preflight_sources:
        recipe = jobs.prepare_recipe(body, settings=settings)
    else:
        recipe, _, _ = _checked(body, settings, hf_token)
    return recipe.model_dump(mode="json", by_alias=True, exclude_none=True)


@router.post(
    "/plan",
    response_model=RecipePlan,
    dependencies=[ValidationAllowed],
    openapi_extra=recipe_request_body(),
    summary="Plan a merge (dry run)",
)
def plan_recipe(
    body: RecipeBody, settings: SettingsDep, caller: CurrentToken, hf_token: HfToken
) -> RecipePlan:
    """What validate checks, plus the dry run's plan (``alloy merge --dry-run``): every tensor, merged or copied,
    bytes read and written, estimated peak memory. ``plan`` is null when a source is on the Hub (read at run
    time; ``notes`` says so)."""
    recipe, plan, notes = _checked(body, settings, hf_token)
    return RecipePlan(
        recipe=recipe.model_dump(mode="json", by_alias=True, exclude_none=True),
        plan=plan.model_dump(mode="json") if plan is not None else None,
        notes=notes,
    )


@router.post(
    "/import",
    response_model=dict[str, Any],
    dependencies=[ValidationAllowed],
    openapi_extra=recipe_request_body(),
    summary="Import a recipe",
)
def import_recipe(body: RecipeBody, settings: SettingsDep, caller: CurrentToken) -> dict[str, Any]:
    """An Alloy or mergekit recipe (YAML or JSON) as a normalized Alloy recipe. Paths are not checked here, so
    an imported recipe can be edited before it is validated; a mergekit reference that exists inside the data
    folders is a local folder, as in mergekit (otherwise a Hub repo id)."""
    with local_roots(settings.data_dirs):
        recipe = load_recipe(body)
    return recipe.model_dump(mode="json", by_alias=True, exclude_none=True)
