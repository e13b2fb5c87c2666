"""/v1/analyses: task-vector statistics as an ``analyze`` job (read it back at /v1/merges/{id})."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from pydantic import ValidationError

from app.api.deps import (
    CurrentToken,
    HfToken,
    IdempotencyKey,
    JsonBody,
    PinnerDep,
    SessionDep,
    SettingsDep,
    SubmissionAllowed,
)
from app.api.openapi_docs import JOB_LINKS, PROBLEM_RESPONSES, json_request_body
from app.api.views import job_out, job_url
from app.schemas import AnalysisRequest, JobOut
from app.services import jobs
from merge_ops.recipe import recipe_error

router = APIRouter(prefix="/analyses", tags=["analyses"], responses=PROBLEM_RESPONSES)


@router.post(
    "",
    status_code=202,
    response_model=JobOut,
    responses=JOB_LINKS,
    dependencies=[SubmissionAllowed],
    openapi_extra=json_request_body(AnalysisRequest),
    summary="Submit an analysis",
)
def create_analysis(
    request: Request,
    response: Response,
    body: JsonBody,
    session: SessionDep,
    settings: SettingsDep,
    caller: CurrentToken,
    pinner: PinnerDep,
    hf_token: HfToken,
    idempotency_key: IdempotencyKey = None,
) -> JobOut:
    """Queue an ``analyze`` job over ``sources`` (and ``base``); its report holds the inspect statistics."""
    try:
        analysis = AnalysisRequest.model_validate(body)
    except ValidationError as exc:
        raise recipe_error(exc) from None
    stored = jobs.prepare_analysis(analysis.model_dump(mode="json", exclude={"priority"}), settings=settings)
    submission = jobs.submit_analysis(
        session,
        stored,
        owner=caller,
        settings=settings,
        idempotency_key=idempotency_key,
        hf_token=hf_token,
        priority=analysis.priority,
        pinner=pinner,
    )
    url = job_url(request, submission.job.id)
    response.headers["Location"] = url
    if not submission.created:
        response.headers["Idempotent-Replayed"] = "true"
    return job_out(submission.job, url=url)
