"""The merge-quality report's statistics (benchmarks/quality/report.py) on hand-made results: no model runs."""

from __future__ import annotations

import math
from typing import Any

import pytest

pytest.importorskip("scipy")

from benchmarks.quality.report import REFERENCE, collect, paired, t_interval  # noqa: E402

TASKS = ["a", "b"]
ROWS = 200


def seed_result(seed: int, correct: dict[str, dict[str, str]]) -> dict[str, Any]:
    acc = {m: {t: c.count("1") / len(c) for t, c in rows.items()} for m, rows in correct.items()}
    return {
        "seed": seed,
        "tasks": TASKS,
        "finetune_s": {t: 1.0 for t in TASKS},
        "zero_shot": {t: 0.5 for t in TASKS},
        "zero_shot_correct": {t: "10" * (ROWS // 2) for t in TASKS},
        "finetuned": {t: {t: 0.8} for t in TASKS},
        "merges": [
            {"method": m, "num_tasks": 2, "test": acc[m], "test_correct": rows, "merge_s": 1.0}
            for m, rows in correct.items()
        ],
    }


def test_t_interval_is_the_student_interval() -> None:
    mean, half, n = t_interval([1.0, 2.0, 3.0])
    assert (mean, n) == (2.0, 3)
    assert half == pytest.approx(4.302652729911275 * 1.0 / math.sqrt(3))
    assert math.isnan(t_interval([1.0])[1])


def test_paired_comparison_separates_a_real_gain_from_a_copy() -> None:
    ta = "1" * 120 + "0" * 80  # 60% right
    better = "1" * 150 + "0" * 50  # right on every row ta gets right, and 30 more
    seeds = [
        seed_result(
            s,
            {
                REFERENCE: {t: ta for t in TASKS},
                "copy": {t: ta for t in TASKS},
                "better": {t: better for t in TASKS},
            },
        )
        for s in range(3)
    ]
    comparisons = {c["method"]: c for c in paired(collect({"seeds": seeds}), 2, TASKS)}
    copy, gain = comparisons["copy"], comparisons["better"]
    assert (copy["better"], copy["worse"], copy["diff"]) == (0, 0, 0.0)
    assert copy["mcnemar_p"] == 1.0 and not copy["significant"]
    assert (gain["better"], gain["worse"], gain["n_seeds"]) == (3 * 2 * 30, 0, 3)
    assert gain["diff"] == pytest.approx((0.75 - 0.6) / 0.8)
    assert gain["boot_lo"] > 0 and gain["holm_p"] < 1e-6 and gain["significant"]
    # zero-shot (50%) against ta (60%): worse, and its discordant rows are counted per row
    assert comparisons["zero-shot"]["diff"] < 0 and comparisons["zero-shot"]["significant"]
