"""What a merge reports: progress while it runs, and the job report (``alloy-report.json``) when it is done."""

from __future__ import annotations

import resource
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from merge_ops import __version__
from merge_ops.preflight import MergePlan, numel
from merge_ops.task_vector_stats import aggregate

if TYPE_CHECKING:
    from merge_ops.sources import SourceResolver

REPORT_NAME = "alloy-report.json"


@dataclass(frozen=True)
class Progress:
    tensors_done: int
    tensors_total: int
    bytes_done: int
    bytes_total: int
    eta_s: float | None
    #: "merge", "evaluate" while greedy soup scores candidates (then the tensor counts are evaluations), or
    #: "train" while aTLAS learns its coefficients (then they are steps)
    phase: str = "merge"


@dataclass(frozen=True)
class WholeModelRun:
    """What a whole-model method's first step gets from ``run_merge``: where Hub sources come from, the device,
    the root of relative evaluator data, and the progress and cancel callbacks."""

    resolver: SourceResolver | None
    device: str
    data_root: Path | None
    progress: Callable[[Progress], None] | None = None
    should_cancel: Callable[[], bool] | None = None


@dataclass(frozen=True)
class Chosen:
    """What a whole-model method decided before the streaming merge: the recipe to stream (greedy soup: a linear
    merge of the chosen ingredients; aTLAS: the learned coefficients), and the report fields that record it."""

    streamed: Any  # Recipe (this module stays free of the recipe import cycle)
    sections: dict[str, Any]
    timings: dict[str, float]


class MergeReport(BaseModel):
    alloy_version: str = __version__
    method: str
    recipe_digest: str
    scope: str
    output_path: str | None
    tensors: list[dict[str, Any]]
    totals: dict[str, Any]
    timings: dict[str, float]
    peak_rss_bytes: int
    peak_cuda_bytes: int | None = None
    copied_non_float: list[str]
    lines: dict[str, Any] | None = None
    #: the README.md written beside the shards (the web form renders it)
    model_card: str | None = None
    #: greedy_soup: every ingredient's score, the order tried and the chosen ingredients
    greedy_soup: dict[str, Any] | None = None
    #: atlas: the learned coefficient per block (tensor) and model, the loss per step, the settings
    atlas: dict[str, Any] | None = None
    #: what the recipe's source format (mergekit) ignores or coerces: [{loc, msg}]
    warnings: list[dict[str, Any]] = []

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)


def merge_totals(
    rows: list[dict[str, Any]], plan: MergePlan, files: list[Path], side: list[str]
) -> dict[str, Any]:
    """The report's ``totals``: counts, bytes, files, the size-weighted means of the per-tensor statistics, and
    the task vectors' norms and cosines of the whole model and of each layer (``task_vector_stats.aggregate``)."""
    merged = [r for r in rows if r["action"] == "merge"]
    totals: dict[str, Any] = {
        "tensors": len(rows),
        "merged": len(merged),
        "copied": len(rows) - len(merged),
        "bytes_read": plan.bytes_read,
        "bytes_written": plan.bytes_written,
        "shards": [f.name for f in files],
        "side_files": side,
    }
    weights = {r["name"]: numel(r["shape"]) for r in merged}
    for key in ("kept_density", "sign_conflict_rate", "sparsity"):
        values = [(r[key], weights[r["name"]]) for r in merged if key in r]
        if values:
            totals[key] = round(sum(v * w for v, w in values) / max(1, sum(w for _, w in values)), 6)
    if (task_vectors := aggregate(merged)) is not None:
        totals["task_vectors"] = task_vectors
    return totals


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
