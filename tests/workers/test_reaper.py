"""The reaper against a real SQLite job store: stale running jobs are requeued with bounded attempts, queued jobs
whose message may be lost are re-sent (at a limited rate)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import update

from app import crud
from app.models import Job, utcnow
from workers import reaper


class SentMessages:
    """Records what the reaper would send to the broker."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, int]] = []

    def __call__(self, job_id: str, *, priority: int, settings: Any) -> None:
        self.sent.append((job_id, priority))


def _running(job_store: Any, *, attempts: int = 0, heartbeat_age_s: float = 0.0, priority: int = 5) -> str:
    job_id = job_store.insert_job({"method": "task_arithmetic"}, priority=priority)
    with job_store.session() as session:
        assert crud.claim_job(session, job_id=job_id, worker="w") is not None
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(attempts=attempts, heartbeat_at=utcnow() - timedelta(seconds=heartbeat_age_s))
        )
        session.commit()
    return job_id


def _age_created(job_store: Any, job_id: str, seconds: float) -> None:
    with job_store.session() as session:
        session.execute(
            update(Job).where(Job.id == job_id).values(created_at=utcnow() - timedelta(seconds=seconds))
        )
        session.commit()


def test_stale_running_job_is_requeued_and_resent(job_store, alloy_settings):
    sent = SentMessages()
    stale = _running(job_store, heartbeat_age_s=alloy_settings.heartbeat_stale_s + 5, priority=7)
    fresh = _running(job_store, heartbeat_age_s=0)
    result = reaper.reap_once(alloy_settings, engine=job_store.engine, enqueue=sent)
    assert result.requeued == [stale] and result.failed == []
    assert sent.sent == [(stale, 7)]
    job = job_store.job(stale)
    assert (job.status, job.attempts, job.worker) == ("queued", 1, None)
    assert job_store.job(fresh).status == "running"


def test_job_that_keeps_killing_workers_fails_after_max_attempts(job_store, alloy_settings):
    sent = SentMessages()
    last_run = alloy_settings.max_attempts - 1  # attempts counts earlier runs that died
    job_id = _running(job_store, attempts=last_run, heartbeat_age_s=alloy_settings.heartbeat_stale_s + 5)
    result = reaper.reap_once(alloy_settings, engine=job_store.engine, enqueue=sent)
    assert result.failed == [job_id] and sent.sent == []
    job = job_store.job(job_id)
    assert job.status == "failed" and job.error_code == "worker_lost"
    assert f"{alloy_settings.max_attempts} times" in job.error_detail
    assert job.finished_at is not None


def test_queued_job_with_lost_message_is_resent_at_a_limited_rate(job_store, alloy_settings):
    sent = SentMessages()
    old = job_store.insert_job({"method": "task_arithmetic"}, priority=2)
    new = job_store.insert_job({"method": "task_arithmetic"})
    _age_created(job_store, old, reaper.queued_resend_s(alloy_settings) + 5)
    assert reaper.reap_once(alloy_settings, engine=job_store.engine, enqueue=sent).resent == [old]
    # the next pass comes too soon to send it again
    assert reaper.reap_once(alloy_settings, engine=job_store.engine, enqueue=sent).resent == []
    assert sent.sent == [(old, 2)]
    assert job_store.job(new).status == "queued"


def test_broker_down_keeps_the_job_queued_for_the_next_pass(job_store, alloy_settings):
    def broker_down(job_id: str, *, priority: int, settings: Any) -> None:
        raise ConnectionRefusedError("broker down")

    job_id = _running(job_store, heartbeat_age_s=alloy_settings.heartbeat_stale_s + 5)
    result = reaper.reap_once(alloy_settings, engine=job_store.engine, enqueue=broker_down)
    assert result.requeued == [job_id]
    assert job_store.job(job_id).status == "queued"
    _age_created(job_store, job_id, reaper.queued_resend_s(alloy_settings) + 5)
    sent = SentMessages()
    assert reaper.reap_once(alloy_settings, engine=job_store.engine, enqueue=sent).resent == [job_id]


def test_cancelled_job_whose_worker_died_ends_cancelled_and_its_scratch_is_removed(
    job_store, alloy_settings, tmp_path
):
    """Cancel, then the worker dies: the job used to go back to queued with cancel_requested (no worker may
    claim that), be re-sent every pass forever, and leave its partial shard in .alloy-scratch/<id>/."""
    from workers.pipeline import job_scratch

    sent = SentMessages()
    output = tmp_path / "out" / "merged"
    job_id = job_store.insert_job({"method": "task_arithmetic", "output": {"path": str(output)}})
    with job_store.session() as session:
        assert crud.claim_job(session, job_id=job_id, worker="w") is not None
        assert crud.cancel_job(session, job_id=job_id) == "running"
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(heartbeat_at=utcnow() - timedelta(seconds=alloy_settings.heartbeat_stale_s + 5))
        )
        session.commit()
    scratch = job_scratch(alloy_settings, job_id, job_store.job(job_id).recipe_json)
    assert scratch is not None
    scratch.mkdir(parents=True)
    (scratch / "model-00001-of-00002.safetensors").write_bytes(b"partial")
    result = reaper.reap_once(alloy_settings, engine=job_store.engine, enqueue=sent)
    assert result.cancelled == [job_id] and result.requeued == [] and sent.sent == []
    job = job_store.job(job_id)
    assert (job.status, job.error_code) == ("cancelled", "cancelled")
    assert not scratch.exists() and not scratch.parent.exists()
    # a cancelled job that a shutdown put back in the queue ends at the next pass too
    queued = job_store.insert_job({"method": "task_arithmetic"})
    with job_store.session() as session:
        crud.claim_job(session, job_id=queued, worker="w")
        crud.cancel_job(session, job_id=queued)
        crud.requeue_job(session, job_id=queued)
    assert job_store.job(queued).status == "queued"
    result = reaper.reap_once(alloy_settings, engine=job_store.engine, enqueue=sent)
    assert result.cancelled == [queued] and sent.sent == []
    assert job_store.job(queued).status == "cancelled"


def test_a_merge_waiting_for_its_hub_push_keeps_its_lease_longer(job_store, alloy_settings):
    """A finished merge handed to the io queue has no heartbeat while it waits there; with the short lease it
    would be requeued (and pushed twice) behind any upload backlog."""
    sent = SentMessages()
    waiting = _running(job_store, heartbeat_age_s=alloy_settings.heartbeat_stale_s + 5)
    with job_store.session() as session:
        crud.set_output(session, job_id=waiting, report={"method": "task_arithmetic"})
        session.execute(
            update(Job)
            .where(Job.id == waiting)
            .values(heartbeat_at=utcnow() - timedelta(seconds=alloy_settings.heartbeat_stale_s + 5))
        )
        session.commit()
    assert reaper.reap_once(alloy_settings, engine=job_store.engine, enqueue=sent).requeued == []
    with job_store.session() as session:
        session.execute(
            update(Job)
            .where(Job.id == waiting)
            .values(heartbeat_at=utcnow() - timedelta(seconds=alloy_settings.publish_wait_s + 5))
        )
        session.commit()
    assert reaper.reap_once(alloy_settings, engine=job_store.engine, enqueue=sent).requeued == [waiting]


def test_a_redis_restart_resends_every_queued_job_at_once(job_store, alloy_settings, redis_server):
    """Redis restarted without persistence lost the queued messages: the jobs sent before its start are re-sent
    at the next pass (they used to wait ALLOY_QUEUED_RESEND_S), once, and jobs sent after it are left alone."""
    sent = SentMessages()
    import time

    waiting = job_store.insert_job({"method": "task_arithmetic"})  # younger than queued_resend_s: not due
    assert reaper.reap_once(alloy_settings, engine=job_store.engine, enqueue=sent).resent == []
    # the broker's start is known to 2 s (uptime is whole seconds on a whole-second clock, plus one second kept
    # as margin): a job sent within 2 s before the restart waits for queued_resend_s instead
    time.sleep(2.5)
    redis_server.restart()
    assert reaper.reap_once(alloy_settings, engine=job_store.engine, enqueue=sent).resent == [waiting]
    assert reaper.reap_once(alloy_settings, engine=job_store.engine, enqueue=sent).resent == []
    fresh = job_store.insert_job({"method": "task_arithmetic"})  # sent to the restarted broker
    assert fresh not in reaper.reap_once(alloy_settings, engine=job_store.engine, enqueue=sent).resent
