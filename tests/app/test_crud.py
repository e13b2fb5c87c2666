"""crud: conditional state changes that make redelivered messages and racing reapers harmless."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session

from app import crud
from app.db import init_db, make_engine, session_factory
from app.models import Job, utcnow
from app.services.tokens import create_token, ensure_token, find_token


@pytest.fixture
def session(database_url: str) -> Iterator[Session]:
    engine = make_engine(database_url)
    init_db(engine)
    init_db(engine)  # idempotent
    with session_factory(engine)() as session:
        yield session
    engine.dispose()


def _job(session: Session, **fields) -> str:
    owner = ensure_token(session, name="owner")
    job = Job(
        owner_token_id=owner.id, recipe_json=json.dumps({"method": "ties"}), recipe_digest="d", **fields
    )
    session.add(job)
    session.commit()
    return job.id


def test_claim_job_is_a_conditional_update(session: Session) -> None:
    job_id = _job(session)
    claimed = crud.claim_job(session, job_id=job_id, worker="w1")
    assert claimed is not None and claimed.status == "running" and claimed.worker == "w1"
    assert claimed.started_at is not None and claimed.heartbeat_at is not None
    # a redelivered message (or a second worker) finds it running and backs off
    assert crud.claim_job(session, job_id=job_id, worker="w2") is None
    assert crud.get_job(session, job_id=job_id).worker == "w1"
    assert crud.claim_job(session, job_id="missing", worker="w1") is None


def test_claim_refuses_cancelled_and_finished_jobs(session: Session) -> None:
    cancelled = _job(session)
    assert crud.cancel_job(session, job_id=cancelled) == "cancelled"
    assert crud.claim_job(session, job_id=cancelled, worker="w") is None
    done = _job(session)
    crud.claim_job(session, job_id=done, worker="w")
    assert crud.finish_job(session, job_id=done, status="succeeded")
    assert crud.claim_job(session, job_id=done, worker="w") is None


def test_progress_heartbeat_and_finish_only_touch_active_jobs(session: Session) -> None:
    job_id = _job(session)
    assert not crud.record_progress(session, job_id=job_id, done=1, total=4)  # not running yet
    crud.claim_job(session, job_id=job_id, worker="w")
    assert crud.record_progress(
        session, job_id=job_id, done=2, total=4, bytes_done=20, bytes_total=40, eta_s=1.5
    )
    assert crud.heartbeat(session, job_id=job_id)
    job = crud.get_job(session, job_id=job_id)
    assert (job.tensors_done, job.tensors_total, job.bytes_done, job.bytes_total, job.eta_s) == (
        2,
        4,
        20,
        40,
        1.5,
    )
    error = {"code": "output_error", "detail": "disk full", "context": {"free": 0}}
    assert crud.finish_job(session, job_id=job_id, status="failed", error=error, report={"partial": True})
    assert not crud.finish_job(session, job_id=job_id, status="succeeded")  # already ended
    job = crud.get_job(session, job_id=job_id)
    assert job.status == "failed" and job.error == error and job.report == {"partial": True}
    assert job.duration_s is not None and job.duration_s >= 0
    assert not crud.heartbeat(session, job_id=job_id)
    with pytest.raises(ValueError):
        crud.finish_job(session, job_id=job_id, status="running")


def test_cancel_requested_for_running_jobs(session: Session) -> None:
    job_id = _job(session)
    crud.claim_job(session, job_id=job_id, worker="w")
    assert not crud.is_cancel_requested(session, job_id=job_id)
    assert crud.cancel_job(session, job_id=job_id) == "running"
    assert crud.is_cancel_requested(session, job_id=job_id)


def test_stale_jobs_are_requeued_with_attempts(session: Session) -> None:
    fresh, stale = _job(session), _job(session)
    for job_id in (fresh, stale):
        crud.claim_job(session, job_id=job_id, worker="w")
    session.execute(update(Job).where(Job.id == stale).values(heartbeat_at=utcnow() - timedelta(minutes=10)))
    session.commit()
    for older_than in (120, timedelta(minutes=2), utcnow() - timedelta(minutes=2)):
        assert [job.id for job in crud.stale_running_jobs(session, older_than=older_than)] == [stale]
    assert crud.requeue_job(session, job_id=stale)
    assert not crud.requeue_job(session, job_id=stale)  # only from running
    job = crud.get_job(session, job_id=stale)
    assert job.status == "queued" and job.attempts == 1 and job.worker is None
    assert crud.claim_job(session, job_id=stale, worker="w2") is not None


def test_set_output_attaches_a_late_hub_push(session: Session) -> None:
    job_id = _job(session)
    crud.claim_job(session, job_id=job_id, worker="w")
    crud.finish_job(session, job_id=job_id, status="succeeded", output_path=Path("/out"))
    crud.set_output(session, job_id=job_id, output_url="https://hf.co/org/m", output_commit="a" * 40)
    job = crud.get_job(session, job_id=job_id)
    assert (job.output_path, job.output_url, job.output_commit) == ("/out", "https://hf.co/org/m", "a" * 40)


def test_tokens_are_found_by_secret_only(session: Session) -> None:
    secret = create_token(session, name="ci", admin=True)
    token = find_token(session, secret=secret)
    assert token is not None and token.admin and token.name == "ci"
    assert find_token(session, secret=secret + "x") is None
    assert ensure_token(session, name="ci").id == token.id
