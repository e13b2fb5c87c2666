"""Job submission, lookup and cancellation: the one implementation behind the API, the web form and the CLI.

Order of a submission (style.md, habit 8): validate the recipe and confine its paths, pin Hub sources, insert the
row, commit, and only then enqueue the id, so a worker never receives an id it cannot read.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app import crud
from app.core.config import Settings
from app.core.queue import enqueue_job
from app.models import ACTIVE_STATUSES, JOB_STATUSES, ApiToken, Batch, Job
from app.services.errors import (
    BatchNotFoundError,
    BrokerUnavailableError,
    IdempotencyKeyReusedError,
    InvalidCursorError,
    JobNotCancellableError,
    JobNotFoundError,
)
from app.services.paths import confine_analysis_sources, confine_recipe_paths
from merge_ops.errors import OutputError
from merge_ops.mergekit_refs import local_roots
from merge_ops.recipe import HubSource, Recipe, Source, load_recipe, parse_source

#: Pins a Hub source to a commit (``merge_ops.hub.HubClient.resolve``); raises HubError subclasses.
SourcePinner = Callable[[HubSource], HubSource]


@dataclass(frozen=True)
class Submission:
    job: Job
    created: bool  # False: an existing job was returned (Idempotency-Key or identical active recipe)


def prepare_recipe(raw: dict[str, Any] | str, *, settings: Settings) -> Recipe:
    """Parse (Alloy or mergekit), validate and confine paths; raises RecipeError listing every problem."""
    with local_roots(settings.data_dirs):  # a mergekit `model: org/name` that exists there is a local folder
        recipe = load_recipe(raw)
    return confine_recipe_paths(recipe, roots=settings.data_dirs)


class _Pins:
    """Pins each Hub repo@revision once per submission, remembering {as written: pinned} for the job row."""

    def __init__(self, pinner: SourcePinner) -> None:
        self._pinner = pinner
        self.pinned: dict[str, HubSource] = {}

    def __call__(self, source: Source) -> Source:
        parsed = parse_source(source)
        if not isinstance(parsed, HubSource):
            return source
        key = parsed.uri()
        if key not in self.pinned:
            self.pinned[key] = self._pinner(parsed)
        pinned = self.pinned[key]
        return pinned.uri() if isinstance(source, str) else pinned

    def table(self) -> dict[str, str]:
        return {written: pinned.uri() for written, pinned in self.pinned.items()}


def pin_recipe(recipe: Recipe, pinner: SourcePinner | None) -> tuple[Recipe, dict[str, str]]:
    """The recipe with every Hub source pinned to a commit, as it is stored (every attempt reads the same
    bytes; the worker never looks pins up), and {as written: pinned} for the job's ``pinned_sources``."""
    if pinner is None:
        return recipe, {}
    pins = _Pins(pinner)
    pinned = recipe.with_sources(lambda _loc, source: pins(source))
    return pinned, pins.table()


def pin_analysis(
    analysis: dict[str, Any], pinner: SourcePinner | None
) -> tuple[dict[str, Any], dict[str, str]]:
    """An analysis request with its Hub sources pinned, as ``pin_recipe`` does for a recipe."""
    if pinner is None:
        return analysis, {}
    pins = _Pins(pinner)

    def pin(source: Any) -> Any:
        if source is None:
            return None
        pinned = pins(HubSource.model_validate(source) if isinstance(source, dict) else source)
        return pinned.model_dump(mode="json") if isinstance(pinned, HubSource) else pinned

    out = {**analysis, "sources": [pin(s) for s in analysis["sources"]], "base": pin(analysis.get("base"))}
    return out, pins.table()


def _existing_for_key(session: Session, *, owner: ApiToken, key: str) -> Job | None:
    return session.scalars(
        select(Job).where(Job.owner_token_id == owner.id, Job.idempotency_key == key)
    ).first()


def _existing_active(session: Session, *, owner: ApiToken, digest: str, kind: str) -> Job | None:
    return session.scalars(
        select(Job)
        .where(
            Job.owner_token_id == owner.id,
            Job.recipe_digest == digest,
            Job.kind == kind,
            Job.status.in_(ACTIVE_STATUSES),
            Job.batch_id.is_(None),
        )
        .order_by(Job.created_at.desc())
    ).first()


def _enqueue_or_fail(session: Session, job: Job, *, settings: Settings, hf_token: str | None) -> None:
    try:
        enqueue_job(job.id, priority=job.priority, hf_token=hf_token, settings=settings)
    except Exception as exc:  # any broker failure: the row must not stay queued with no message behind it
        error = BrokerUnavailableError(f"the job queue is unreachable: {type(exc).__name__}")
        crud.finish_job(session, job_id=job.id, status="failed", error=error.to_dict())
        # free the Idempotency-Key so the client's retry with the same key submits again
        session.execute(update(Job).where(Job.id == job.id).values(idempotency_key=None))
        session.commit()
        raise error from None


def _submit(
    session: Session,
    *,
    kind: str,
    payload: dict[str, Any],
    digest: str,
    owner: ApiToken,
    settings: Settings,
    idempotency_key: str | None,
    hf_token: str | None,
    priority: int,
    pinned: dict[str, str],
    dedupe_active: bool,
) -> Submission:
    if idempotency_key:
        existing = _existing_for_key(session, owner=owner, key=idempotency_key)
        if existing is not None:
            if existing.recipe_digest != digest:
                raise IdempotencyKeyReusedError(
                    "this Idempotency-Key was used with a different request", job_id=existing.id
                )
            return Submission(existing, created=False)
    if dedupe_active:
        existing = _existing_active(session, owner=owner, digest=digest, kind=kind)
        if existing is not None:
            return Submission(existing, created=False)
    job = Job(
        kind=kind,
        owner_token_id=owner.id,
        status="queued",
        recipe_json=json.dumps(payload),
        recipe_digest=digest,
        idempotency_key=idempotency_key or None,
        priority=priority,
        pinned_sources_json=json.dumps(pinned) if pinned else None,
    )
    session.add(job)
    try:
        session.commit()
    except IntegrityError:
        # a concurrent request with the same Idempotency-Key won the insert
        session.rollback()
        existing = _existing_for_key(session, owner=owner, key=idempotency_key or "")
        if existing is None:
            raise
        return Submission(existing, created=False)
    _enqueue_or_fail(session, job, settings=settings, hf_token=hf_token)
    return Submission(job, created=True)


def submit_merge(
    session: Session,
    recipe: Recipe,
    *,
    owner: ApiToken,
    settings: Settings,
    idempotency_key: str | None = None,
    hf_token: str | None = None,
    priority: int = 5,
    pinner: SourcePinner | None = None,
) -> Submission:
    """Record and enqueue a merge of a recipe from ``prepare_recipe``. The same ``idempotency_key``, or the
    same recipe while an earlier job for it is queued or running, returns that job instead."""
    recipe, pinned = pin_recipe(recipe, pinner)
    payload = recipe.model_dump(mode="json", by_alias=True, exclude_none=True)
    return _submit(
        session,
        kind="merge",
        payload=payload,
        digest=recipe.digest(),
        owner=owner,
        settings=settings,
        idempotency_key=idempotency_key,
        hf_token=hf_token,
        priority=priority,
        pinned=pinned,
        dedupe_active=True,
    )


def prepare_analysis(request: dict[str, Any], *, settings: Settings) -> dict[str, Any]:
    """An analysis request with confined paths, as stored in the job row: {sources, base, allow_pickle}."""
    sources, base = confine_analysis_sources(
        request["sources"], request.get("base"), roots=settings.data_dirs
    )
    return {"sources": sources, "base": base, "allow_pickle": bool(request.get("allow_pickle", False))}


def submit_analysis(
    session: Session,
    analysis: dict[str, Any],
    *,
    owner: ApiToken,
    settings: Settings,
    idempotency_key: str | None = None,
    hf_token: str | None = None,
    priority: int = 5,
    pinner: SourcePinner | None = None,
) -> Submission:
    """Record and enqueue an ``analyze`` job (the worker runs the engine's inspect; its report holds the stats)."""
    analysis, pinned = pin_analysis(analysis, pinner)
    digest = hashlib.sha256(json.dumps({"analyze": analysis}, sort_keys=True).encode()).hexdigest()
    return _submit(
        session,
        kind="analyze",
        payload=analysis,
        digest=digest,
        owner=owner,
        settings=settings,
        idempotency_key=idempotency_key,
        hf_token=hf_token,
        priority=priority,
        pinned=pinned,
        dedupe_active=True,
    )


def submit_batch(
    session: Session,
    recipes: Sequence[Recipe],
    *,
    owner: ApiToken,
    settings: Settings,
    priority: int = 5,
    hf_token: str | None = None,
    pinner: SourcePinner | None = None,
) -> tuple[Batch, list[Job]]:
    """One job per recipe (no de-duplication: a batch asks for each), committed together, then enqueued."""
    pinned_recipes = [pin_recipe(r, pinner) for r in recipes]
    batch = Batch(owner_token_id=owner.id, priority=priority)
    session.add(batch)
    session.flush()
    jobs = [
        Job(
            kind="merge",
            owner_token_id=owner.id,
            status="queued",
            batch_id=batch.id,
            priority=priority,
            recipe_json=json.dumps(r.model_dump(mode="json", by_alias=True, exclude_none=True)),
            recipe_digest=r.digest(),
            pinned_sources_json=json.dumps(p) if p else None,
        )
        for r, p in pinned_recipes
    ]
    session.add_all(jobs)
    session.commit()
    for job in jobs:
        _enqueue_or_fail(session, job, settings=settings, hf_token=hf_token)
    return batch, jobs


def visible_job(session: Session, job_id: str, *, caller: ApiToken) -> Job:
    """The job if the caller owns it (or is an admin); others' jobs are indistinguishable from missing ones."""
    job = crud.get_job(session, job_id=job_id)
    if job is None or not (caller.admin or job.owner_token_id == caller.id):
        raise JobNotFoundError(f"no job {job_id}")
    return job


def cancel(session: Session, job_id: str, *, caller: ApiToken) -> Job:
    """A queued job is cancelled at once and never starts (workers claim only queued rows); a running one gets
    ``cancel_requested`` and its worker stops between tensors. Cancelling a cancelled job is a no-op."""
    job = visible_job(session, job_id, caller=caller)
    if job.status in {"succeeded", "failed"}:
        raise JobNotCancellableError(f"job {job_id} already {job.status}", status=job.status)
    crud.cancel_job(session, job_id=job_id)
    return visible_job(session, job_id, caller=caller)


def retry_publish(
    session: Session, job_id: str, *, caller: ApiToken, settings: Settings, hf_token: str | None
) -> Job:
    """A merge whose Hub push failed keeps its finished folder: queue it again. The worker finds the complete
    output (``workers.pipeline.completed_output``) and hands it to the publisher: one new commit, nothing merged
    again. OutputError (409) for a job with no finished merge waiting for its upload."""
    job = visible_job(session, job_id, caller=caller)
    recipe = json.loads(job.recipe_json)
    folder = Path(job.output_path) if job.output_path else None
    if not (
        job.status == "failed"
        and (recipe.get("output") or {}).get("hub")
        and job.report_json is not None  # recorded when the merge handed its folder to the publisher
        and folder is not None
        and folder.is_dir()
    ):
        raise OutputError(
            f"job {job_id} has no finished merge waiting for its Hub upload (status {job.status}); "
            "submit the recipe again instead",
            status=job.status,
        )
    crud.reopen_failed_job(session, job_id=job.id)
    _enqueue_or_fail(session, job, settings=settings, hf_token=hf_token)
    session.refresh(job)
    return job


def _encode_cursor(job: Job) -> str:
    raw = json.dumps([job.created_at.isoformat(), job.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        created, job_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        when = datetime.fromisoformat(created)
        if when.tzinfo is None:  # compared with UTC columns: a naive datetime can't be (it was a 500)
            raise ValueError("no timezone")
        return when, str(job_id)
    except (ValueError, TypeError, binascii.Error, RecursionError):
        raise InvalidCursorError("malformed cursor; pass next_cursor from the previous page") from None


def list_jobs(
    session: Session,
    *,
    caller: ApiToken,
    status: str | None = None,
    kind: str | None = None,
    batch_id: str | None = None,
    cursor: str | None = None,
    limit: int = 50,
) -> tuple[list[Job], str | None]:
    """Newest first, keyset-paginated on (created_at, id); only the caller's jobs unless it is an admin."""
    query = select(Job)
    if not caller.admin:
        query = query.where(Job.owner_token_id == caller.id)
    if status:
        query = query.where(Job.status == status)
    if kind:
        query = query.where(Job.kind == kind)
    if batch_id:
        query = query.where(Job.batch_id == batch_id)
    if cursor:
        created, job_id = _decode_cursor(cursor)
        query = query.where(or_(Job.created_at < created, and_(Job.created_at == created, Job.id < job_id)))
    rows = list(session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)).all())
    next_cursor = _encode_cursor(rows[limit - 1]) if len(rows) > limit else None
    return rows[:limit], next_cursor


def batch_status(
    session: Session, batch_id: str, *, caller: ApiToken
) -> tuple[Batch, dict[str, int], list[Job]]:
    batch = session.get(Batch, batch_id)
    if batch is None or not (caller.admin or batch.owner_token_id == caller.id):
        raise BatchNotFoundError(f"no batch {batch_id}")
    counts = dict.fromkeys(JOB_STATUSES, 0)
    for status, count in session.execute(
        select(Job.status, func.count()).where(Job.batch_id == batch_id).group_by(Job.status)
    ):
        counts[status] = count
    jobs = list(session.scalars(select(Job).where(Job.batch_id == batch_id).order_by(Job.created_at, Job.id)))
    return batch, counts, jobs
