"""/v1/recipes: validation and import helpers for editors (the web form); they create no job."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from app.api.deps import CurrentToken, RecipeBody, SettingsDep, ValidationAllowed
from app.api.openapi_docs import PROBLEM_RESPONSES, recipe_request_body
from app.services import jobs
from merge_ops.recipe import load_recipe

router = APIRouter(prefix="/recipes", tags=["recipes"], responses=PROBLEM_RESPONSES)


@router.post(
    "/validate",
    response_model=dict[str, Any],
    dependencies=[ValidationAllowed],
    openapi_extra=recipe_request_body(),
    summary="Validate a recipe",
)
def validate_recipe(body: RecipeBody, settings: SettingsDep, caller: CurrentToken) -> dict[str, Any]:
    """Every check a submission makes (recipe and path confinement), without creating a job: the normalized
    recipe, or a 422 listing every problem."""
    recipe = jobs.prepare_recipe(body, settings=settings)
    return recipe.model_dump(mode="json", by_alias=True, exclude_none=True)


@router.post(
    "/import",
    response_model=dict[str, Any],
    dependencies=[ValidationAllowed],
    openapi_extra=recipe_request_body(),
    summary="Import a recipe",
)
def import_recipe(body: RecipeBody, caller: CurrentToken) -> dict[str, Any]:
    """An Alloy or mergekit recipe (YAML or JSON) as a normalized Alloy recipe. Paths are not checked here, so
    an imported recipe can be edited before it is validated."""
    return load_recipe(body).model_dump(mode="json", by_alias=True, exclude_none=True)
