"""aTLAS on a tiny BERT classifier (CPU): zero steps is task arithmetic, fixed coefficients are θ_0 + Σ λ_{t,b}·τ,
training lowers the few-shot loss (supervised and entropy) and the report holds the learned coefficients."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from merge_ops.atlas import learn_coefficients
from merge_ops.errors import EvaluatorError, RecipeError
from merge_ops.pipeline import REPORT_NAME, run_merge
from merge_ops.recipe import load_recipe
from tests.merge_ops.test_evaluators import TEXTS, save_model, state_dict_of, tiny_bert_config, write_jsonl
from tests.utils.factories import load_all, make_checkpoint

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("atlas")
    torch.manual_seed(0)
    base = save_model(
        transformers.BertForSequenceClassification(tiny_bert_config(num_labels=2)), root / "base"
    )
    weights = state_dict_of(base)
    out: dict[str, Path] = {"base": base}
    for i, name in enumerate(("task_a", "task_b")):
        gen = torch.Generator().manual_seed(10 + i)
        tuned = {
            n: t + 0.2 * torch.randn(t.shape, generator=gen) if t.is_floating_point() else t
            for n, t in weights.items()
        }
        out[name] = make_checkpoint(root / name, tuned)
    rows = [{"text": t, "label": i % 2} for i, t in enumerate(TEXTS)] * 3  # 18 shots
    out["data"] = write_jsonl(root / "shots.jsonl", rows)
    return out


def recipe(setup: dict[str, Path], out: Path, **params: object) -> dict:
    return {
        "method": "atlas",
        "base": str(setup["base"]),
        "models": [{"source": str(setup["task_a"])}, {"source": str(setup["task_b"])}],
        "evaluator": {
            "kind": "sequence_classification_accuracy",
            "data": str(setup["data"]),
            "batch_size": 8,
        },
        "params": params,
        "output": {"path": str(out)},
    }


def test_zero_steps_is_task_arithmetic(setup: dict[str, Path], tmp_path: Path) -> None:
    report = run_merge(load_recipe(recipe(setup, tmp_path / "atlas", steps=0, **{"lambda": 0.4})))
    ta = dict(recipe(setup, tmp_path / "ta"), method="task_arithmetic", params={"lambda": 0.4})
    del ta["evaluator"]
    run_merge(load_recipe(ta))
    got, want = load_all(tmp_path / "atlas"), load_all(tmp_path / "ta")
    assert set(got) == set(want)
    for name, tensor in want.items():
        # task_arithmetic on full checkpoints takes the fused one-pass kernel: equal up to float32 rounding
        torch.testing.assert_close(got[name], tensor, rtol=1e-6, atol=1e-7, msg=name)
    assert report.atlas is not None
    assert all(c == [0.4, 0.4] for c in report.atlas["coefficients"].values())
    assert report.atlas["losses"] == []


def test_fixed_coefficients_are_the_anisotropic_sum(setup: dict[str, Path], tmp_path: Path) -> None:
    base, a, b = (load_all(setup[k]) for k in ("base", "task_a", "task_b"))
    names = [n for n, t in base.items() if t.is_floating_point()]
    coefficients = {n: [0.1 * (i % 5), 0.5 - 0.05 * (i % 7)] for i, n in enumerate(names)}
    run_merge(load_recipe(recipe(setup, tmp_path / "out", coefficients=coefficients)))
    got = load_all(tmp_path / "out")
    for name in names:
        ca, cb = coefficients[name]
        want = base[name] + ca * (a[name] - base[name]) + cb * (b[name] - base[name])
        torch.testing.assert_close(got[name], want, rtol=1e-5, atol=1e-6, msg=name)
    with pytest.raises(RecipeError, match="3 values for 2 models"):
        run_merge(load_recipe(recipe(setup, tmp_path / "bad", coefficients={names[0]: [1.0, 1.0, 1.0]})))


@pytest.mark.parametrize("objective", ["supervised", "entropy"])
def test_training_lowers_the_loss_and_reports_coefficients(
    setup: dict[str, Path], tmp_path: Path, objective: str
) -> None:
    out = tmp_path / "out"
    report = run_merge(load_recipe(recipe(setup, out, steps=12, lr=0.1, objective=objective)))
    atlas = report.atlas
    assert atlas is not None and atlas["objective"] == objective
    losses = atlas["losses"]
    assert len(losses) == 13 and losses[-1] < losses[0]
    on_disk = json.loads((out / REPORT_NAME).read_text())["atlas"]
    assert on_disk["coefficients"] == atlas["coefficients"]
    coefficients = atlas["coefficients"]
    assert len(coefficients) == atlas["blocks"] > 10
    assert any(abs(c - 0.3) > 1e-3 for pair in coefficients.values() for c in pair)  # anisotropic, learned
    # the written model is θ_0 + Σ λ_{t,b} τ_t with the reported coefficients
    base, a, b, got = (load_all(p) for p in (setup["base"], setup["task_a"], setup["task_b"], out))
    for name, (ca, cb) in coefficients.items():
        want = base[name] + ca * (a[name] - base[name]) + cb * (b[name] - base[name])
        torch.testing.assert_close(got[name], want, rtol=1e-5, atol=1e-5, msg=name)


def test_an_evaluator_without_a_loss_is_refused(setup: dict[str, Path], tmp_path: Path) -> None:
    class ScoreOnly:
        def score(self, state_dict: dict, /) -> float:
            return 0.0

    with pytest.raises(EvaluatorError, match="differentiable loss"):
        learn_coefficients(load_recipe(recipe(setup, tmp_path / "o", steps=2)), evaluator=ScoreOnly())


def test_training_needs_an_evaluator() -> None:
    with pytest.raises(RecipeError, match="evaluator"):
        load_recipe({"method": "atlas", "base": "./b", "models": [{"source": "./a"}]})
    load_recipe({"method": "atlas", "base": "./b", "models": [{"source": "./a"}], "params": {"steps": 0}})
