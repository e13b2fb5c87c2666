"""The Celery app of the workers, configured from the same ``Settings`` as the API.

Queues: ``merge`` (GPU or CPU compute; run one task per GPU: ``-Q merge -c <gpus>``) and ``io`` (Hub downloads
and uploads), so a slow upload never holds a GPU. Delivery is at-least-once (``acks_late``,
``reject_on_worker_lost``, prefetch 1); the job row makes redelivery harmless (claim is a conditional update)
and the reaper thread started in every worker makes loss harmless (stale heartbeats and unclaimed queued jobs
are re-sent, with bounded attempts). Start a worker with::

    celery -A workers.celery_app worker -Q merge,io -c 1      # or: alloy worker
"""

from __future__ import annotations

import gc
import logging
from typing import Any

from celery import Celery, signals
from kombu import Exchange, Queue

from app.core.config import Settings, get_settings
from app.core.queue import IO_QUEUE, MERGE_QUEUE, PUBLISH_JOB_TASK, RUN_JOB_TASK

log = logging.getLogger(__name__)

QUEUES = (MERGE_QUEUE, IO_QUEUE)


def redis_transport_options(settings: Settings) -> dict[str, Any]:
    """Consume the priority sub-queues most urgent first (kombu's default steps and separator, which producers
    use too, so any client's priorities land where this worker looks), and a visibility timeout past the longest
    task so Redis does not redeliver a message whose task is still running (the reaper covers dead workers)."""
    return {"queue_order_strategy": "priority", "visibility_timeout": settings.task_time_limit_s + 600}


def soft_time_limit_s(hard_limit: int) -> int:
    """The soft time limit for a hard one: up to a tenth (1–60 s) earlier, for the row to be failed cleanly."""
    return max(1, hard_limit - min(60, max(1, hard_limit // 10)))


def celery_config(settings: Settings) -> dict[str, Any]:
    transport = settings.broker_transport_options()
    if settings.broker_url.startswith(("redis://", "rediss://")):
        transport = {**redis_transport_options(settings), **transport}
    hard_limit = settings.task_time_limit_s
    return {
        "broker_url": settings.celery_broker_url(),
        "broker_transport_options": transport,
        "broker_connection_retry_on_startup": True,
        "task_queues": [Queue(name, Exchange(name, type="direct"), routing_key=name) for name in QUEUES],
        "task_default_queue": MERGE_QUEUE,
        "task_routes": {RUN_JOB_TASK: {"queue": MERGE_QUEUE}, PUBLISH_JOB_TASK: {"queue": IO_QUEUE}},
        # at-least-once: ack after the task body, requeue when the pool process dies under it
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # results live on the job row, never in Celery
        "task_ignore_result": True,
        "result_backend": None,
        # the soft limit raises inside the task so the row is failed with a clear error; the hard one kills
        "task_soft_time_limit": soft_time_limit_s(hard_limit),
        "task_time_limit": hard_limit,
        "task_serializer": "json",
        "accept_content": ["json"],
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
    }


def create_celery(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    celery = Celery("alloy", include=["workers.tasks"])
    celery.conf.update(celery_config(settings))
    return celery


app = create_celery()


@signals.worker_ready.connect
def _start_reaper(sender: Any = None, **_: Any) -> None:
    """Every worker reaps: with any worker alive, stale and lost jobs are recovered (conditional updates make
    several reapers safe)."""
    from workers.reaper import start_reaper_thread

    start_reaper_thread(get_settings())


@signals.worker_shutdown.connect
def _stop_reaper(sender: Any = None, **_: Any) -> None:
    from workers.reaper import stop_reaper_thread

    stop_reaper_thread()


@signals.worker_init.connect
def _preload_engine(sender: Any = None, **_: Any) -> None:
    """Import torch and the merge engine once in the parent: forked pool processes start warm (seconds saved per
    child). Nothing CUDA is touched here, so forking stays safe."""
    try:
        import merge_ops.pipeline  # noqa: F401
    except ImportError:  # a broken engine install surfaces as a failed job, with the error on the row
        log.warning("could not preload merge_ops.pipeline", exc_info=True)
    # what the imports made lives as long as the process: out of the cyclic GC's walks, and not copied into
    # each forked child when a collection there would touch it
    gc.freeze()
