"""The evaluator's score of a finished job, read from its report: what a sweep's comparison table ranks.

Only the methods that run the recipe's evaluator have one: greedy soup scores the soup it chose
(``greedy_soup.final_score``, higher is better, losses negated as every evaluator's ``score`` is) and aTLAS
trains on the evaluator's loss (``atlas.losses``, the last after training, lower is better). A plain merge does
not evaluate its output, so it has none.
"""

from __future__ import annotations

import math
from typing import Any

from app.models import Job
from app.schemas import JobScore

#: the methods whose report carries a score (the others are skipped without reading the report)
SCORING_METHODS = frozenset({"greedy_soup", "atlas"})


def job_score(job: Job) -> JobScore | None:
    """The score of one job, or None (not succeeded, a method that does not evaluate, no report)."""
    if job.status != "succeeded" or (job.recipe or {}).get("method") not in SCORING_METHODS:
        return None
    report: dict[str, Any] = job.report or {}
    soup, atlas = report.get("greedy_soup"), report.get("atlas")
    if isinstance(soup, dict) and _finite(soup.get("final_score")):
        return JobScore(
            job_id=job.id, metric="greedy_soup.final_score", value=soup["final_score"], higher_is_better=True
        )
    losses = atlas.get("losses") if isinstance(atlas, dict) else None
    if isinstance(losses, list) and losses and _finite(losses[-1]):  # empty: steps 0, nothing evaluated
        return JobScore(job_id=job.id, metric="atlas.final_loss", value=losses[-1], higher_is_better=False)
    return None


def batch_scores(jobs: list[Job]) -> list[JobScore]:
    return [score for job in jobs if (score := job_score(job)) is not None]


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
