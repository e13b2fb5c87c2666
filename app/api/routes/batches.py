"""/v1/batches: many recipes at once, each its own job, queued with the batch's priority."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from pydantic import ValidationError

from app.api.deps import (
    CurrentToken,
    HfToken,
    JsonBody,
    PinnerDep,
    SessionDep,
    SettingsDep,
    SubmissionAllowed,
)
from app.api.openapi_docs import PROBLEM_RESPONSES, json_request_body
from app.api.views import batch_out
from app.schemas import BatchOut, BatchRequest
from app.services import jobs
from app.services.scores import batch_scores
from merge_ops.errors import RecipeError
from merge_ops.recipe import Recipe, recipe_error

router = APIRouter(prefix="/batches", tags=["batches"], responses=PROBLEM_RESPONSES)


def _prepare_all(request: BatchRequest, settings: SettingsDep) -> list[Recipe]:
    """Every recipe validated before any job exists; errors of all recipes in one 422, loc ['recipes', i, ...]."""
    recipes: list[Recipe] = []
    errors: list[dict[str, object]] = []
    for index, raw in enumerate(request.recipes):
        try:
            recipes.append(jobs.prepare_recipe(raw, settings=settings))
        except RecipeError as exc:
            items = exc.context.get("errors") or [{"loc": [], "msg": exc.detail}]
            errors += [{"loc": ["recipes", str(index), *item["loc"]], "msg": item["msg"]} for item in items]
    if errors:
        summary = "; ".join(f"{'.'.join(e['loc'])}: {e['msg']}" for e in errors)  # type: ignore[arg-type]
        raise RecipeError(f"invalid batch: {summary}", errors=errors)
    return recipes


@router.post(
    "",
    status_code=202,
    response_model=BatchOut,
    responses={
        202: {
            "links": {
                "get_batch": {
                    "operationId": "batches-get_batch",
                    "parameters": {"batch_id": "$response.body#/id"},
                }
            }
        }
    },
    dependencies=[SubmissionAllowed],
    openapi_extra=json_request_body(BatchRequest),
    summary="Submit a batch",
)
def create_batch(
    request: Request,
    response: Response,
    body: JsonBody,
    session: SessionDep,
    settings: SettingsDep,
    caller: CurrentToken,
    pinner: PinnerDep,
    hf_token: HfToken,
) -> BatchOut:
    """Validate every recipe, create one job per recipe and answer at once; jobs run by priority (higher first)."""
    try:
        batch_request = BatchRequest.model_validate(body)
    except ValidationError as exc:
        raise recipe_error(exc) from None
    recipes = _prepare_all(batch_request, settings)
    batch, created = jobs.submit_batch(
        session,
        recipes,
        owner=caller,
        settings=settings,
        priority=batch_request.priority,
        hf_token=hf_token,
        pinner=pinner,
    )
    if batch_request.names:
        for job, name in zip(created, batch_request.names, strict=True):
            job.name = name or None
        session.commit()
    batch, counts, rows = jobs.batch_status(session, batch.id, caller=caller)
    out = batch_out(request, batch, counts=counts, jobs=rows)
    out.scores = batch_scores(rows)
    response.headers["Location"] = out.url
    return out


@router.get("/{batch_id}", response_model=BatchOut, summary="Get a batch")
def get_batch(request: Request, batch_id: str, session: SessionDep, caller: CurrentToken) -> BatchOut:
    """Counts of the batch's jobs by status, the jobs, and the evaluator's score of each finished job that has
    one (a sweep's comparison table)."""
    batch, counts, rows = jobs.batch_status(session, batch_id, caller=caller)
    out = batch_out(request, batch, counts=counts, jobs=rows)
    out.scores = batch_scores(rows)
    return out
