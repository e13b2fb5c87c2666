"""Enqueueing by task name through a Celery *client* app: the API never imports ``workers/``.

Messages carry the job id (and, when a request sent one, the Hub token — see ``enqueue_job``); everything else
is read from the job row by the worker.
"""

from __future__ import annotations

import contextlib
import os
import time
from functools import lru_cache
from typing import Any

from celery import Celery

from app.core.config import Settings, get_settings

#: The task names and queues, once: the API and the reaper send by name, the workers register these names.
RUN_JOB_TASK = "alloy.run_job"
PUBLISH_JOB_TASK = "alloy.publish_job"
REAP_TASK = "alloy.reap"
MERGE_QUEUE = "merge"  # compute (GPU or CPU): one task per GPU
IO_QUEUE = "io"  # Hub uploads: a slow upload never holds a GPU
MAX_PRIORITY = 9


@lru_cache(maxsize=4)
def _client_for(broker_url: str, transport_options: tuple[tuple[str, Any], ...]) -> Celery:
    client = Celery("alloy-client", broker=broker_url, set_as_current=False)
    client.conf.update(
        broker_transport_options=dict(transport_options),
        broker_connection_retry_on_startup=False,
        broker_connection_max_retries=1,
        task_serializer="json",
        accept_content=["json"],
        task_queue_max_priority=MAX_PRIORITY,
        task_default_priority=MAX_PRIORITY // 2,
    )
    return client


def celery_client(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    options = tuple(sorted(settings.broker_transport_options().items()))
    return _client_for(settings.celery_broker_url(), options)


def broker_priority(priority: int, *, broker_url: str) -> int:
    """Alloy priorities are 0..9, higher first. Redis (kombu) pops the *lowest* number first, AMQP the highest."""
    priority = max(0, min(MAX_PRIORITY, priority))
    return (
        MAX_PRIORITY - priority
        if broker_url.startswith(("redis://", "rediss://", "sentinel://"))
        else priority
    )


def enqueue_job(
    job_id: str,
    *,
    priority: int = 5,
    queue: str = MERGE_QUEUE,
    hf_token: str | None = None,
    settings: Settings | None = None,
) -> None:
    """Send ``alloy.run_job(job_id)`` after the job row is committed.

    The Hub token (from ``X-HF-Token``) travels only as the message kwarg ``hf_token``: it is never stored in the
    job row, the report or logs, so it lives in the broker until a worker takes the message and then only in that
    worker's memory. A job re-enqueued by the reaper has lost it and falls back to the server's ``ALLOY_HF_TOKEN``.
    Encrypting it into the row instead would keep a long-lived secret at rest for the life of the job table.
    """
    settings = settings or get_settings()
    _send(
        RUN_JOB_TASK,
        job_id,
        {},
        hf_token=hf_token,
        queue=queue,
        settings=settings,
        priority=broker_priority(priority, broker_url=settings.broker_url),
        retry=False,
    )


def enqueue_publish(
    job_id: str, *, output_path: str, hf_token: str | None = None, settings: Settings | None = None
) -> None:
    """Send ``alloy.publish_job(job_id, output_path)`` to the io queue (the Hub token as for ``enqueue_job``)."""
    _send(
        PUBLISH_JOB_TASK,
        job_id,
        {"output_path": output_path},
        hf_token=hf_token,
        queue=IO_QUEUE,
        settings=settings or get_settings(),
    )


def _send(
    task: str,
    job_id: str,
    kwargs: dict[str, Any],
    *,
    hf_token: str | None,
    queue: str,
    settings: Settings,
    **options: Any,
) -> None:
    if hf_token:
        kwargs = {**kwargs, "hf_token": hf_token}
    celery_client(settings).send_task(
        task,
        args=[job_id],
        kwargs=kwargs,
        queue=queue,
        routing_key=queue,
        # Celery logs and stores kwargsrepr in headers; mask the token there
        kwargsrepr=repr({k: ("***" if k == "hf_token" else v) for k, v in kwargs.items()}),
        **options,
    )


def broker_uptime_s(settings: Settings, *, timeout_s: float = 5.0) -> float | None:
    """How long the Redis broker has run (a restart without persistence lost every queued message); None for
    other brokers, or when it can't be asked."""
    if not settings.broker_url.startswith(("redis://", "rediss://")):
        return None
    import redis

    try:
        return float(_redis_client(settings.broker_url, timeout_s).info("server")["uptime_in_seconds"])
    except (redis.RedisError, OSError, KeyError, ValueError):
        return None


@lru_cache(maxsize=4)
def _redis_client(url: str, timeout_s: float) -> Any:
    # one client (and connection pool) per broker: the reaper asks every few seconds
    import redis

    return redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)


def check_broker(settings: Settings, *, timeout_s: float) -> None:
    """Raise if the broker can't be reached within the timeout."""
    with celery_client(settings).connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, timeout=timeout_s)


def ping_workers(settings: Settings, *, timeout_s: float) -> list[str]:
    """Names of the workers that answered a control ping within the timeout."""
    replies = celery_client(settings).control.ping(timeout=timeout_s) or []
    return sorted(name for reply in replies for name in reply)


#: Suffix of the filesystem broker's message files for control queues (worker mailboxes and ping replies).
_CONTROL_SUFFIX = ".celery.pidbox.msg"


def sweep_control_messages(settings: Settings, *, older_than_s: float) -> int:
    """Delete unread control messages (pings, replies) older than ``older_than_s`` from a filesystem broker.

    A ping is broadcast to every mailbox ever bound, and the filesystem transport never unbinds a worker that
    died, so each ping leaves one file per dead worker name that nothing reads. A live worker reads its mailbox
    within a second and a ping is void after its timeout, so old control files are garbage; task messages
    (queues ``merge``, ``io``) are never touched. Returns how many files were removed; 0 for other brokers."""
    folder = settings.broker_dir
    if folder is None:
        return 0
    queue_dir = folder / "queue"
    cutoff = time.time() - older_than_s
    removed = 0
    with contextlib.suppress(FileNotFoundError), os.scandir(queue_dir) as entries:
        for entry in entries:
            if not entry.name.endswith(_CONTROL_SUFFIX):
                continue
            with contextlib.suppress(FileNotFoundError):  # a worker may take it meanwhile
                if entry.stat().st_mtime < cutoff:
                    os.remove(entry.path)
                    removed += 1
    return removed
