"""Prometheus metrics computed from the job store at scrape time (the DB is the source of truth, and every API
process then reports the same numbers)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from app.models import JOB_KINDS, JOB_STATUSES, Job

DURATION_BUCKETS_S = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600)


class JobStoreCollector(Collector):
    def __init__(self, sessionmaker: Callable[[], Session]) -> None:
        self._sessionmaker = sessionmaker

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily]:
        with self._sessionmaker() as session:
            by_status = session.execute(
                select(Job.kind, Job.status, func.count()).group_by(Job.kind, Job.status)
            ).all()
            buckets = session.execute(
                select(
                    *[func.sum(case((Job.duration_s <= bound, 1), else_=0)) for bound in DURATION_BUCKETS_S],
                    func.count(),
                    func.coalesce(func.sum(Job.duration_s), 0.0),
                ).where(Job.status == "succeeded", Job.kind == "merge", Job.duration_s.is_not(None))
            ).one()
            merged_bytes = session.scalar(
                select(func.coalesce(func.sum(Job.bytes_done), 0)).where(
                    Job.status == "succeeded", Job.kind == "merge"
                )
            )
        jobs = GaugeMetricFamily(
            "alloy_jobs", "Jobs in the store by kind and status.", labels=["kind", "status"]
        )
        counts = {(kind, status): 0 for kind in JOB_KINDS for status in JOB_STATUSES}
        counts.update({(kind, status): count for kind, status, count in by_status})
        for (kind, status), count in sorted(counts.items()):
            jobs.add_metric([kind, status], count)
        yield jobs
        depth = GaugeMetricFamily("alloy_queue_depth", "Jobs waiting for a worker (queued rows).")
        depth.add_metric([], sum(count for (_, status), count in counts.items() if status == "queued"))
        yield depth
        *cumulative, total, duration_sum = buckets
        histogram = HistogramMetricFamily("alloy_merge_duration_seconds", "Wall time of succeeded merges.")
        histogram.add_metric(
            [],
            [(str(float(b)), float(c or 0)) for b, c in zip(DURATION_BUCKETS_S, cumulative, strict=True)]
            + [("+Inf", float(total))],
            sum_value=float(duration_sum),
        )
        yield histogram
        merged = CounterMetricFamily("alloy_merged_bytes", "Bytes written by succeeded merges.")
        merged.add_metric([], float(merged_bytes or 0))
        yield merged


def make_registry(sessionmaker: Callable[[], Session]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(JobStoreCollector(sessionmaker))
    return registry
