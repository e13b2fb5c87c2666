"""Greedy soup: sorting, strict acceptance, the running mean, and the linear recipe that writes the soup."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from merge_ops.errors import EvaluatorError, MergeCancelled
from merge_ops.greedy_soup import load_state_dict, run_greedy_soup, soup_recipe
from merge_ops.recipe import Recipe
from tests.utils.factories import make_checkpoint

TARGET = torch.linspace(-1, 1, 12).reshape(3, 4)


class DistanceEvaluator:
    """Higher when ``w`` is closer to TARGET; records what it saw."""

    def __init__(self) -> None:
        self.seen: list[dict[str, torch.Tensor]] = []

    def score(self, state_dict: dict[str, torch.Tensor], /) -> float:
        self.seen.append({k: v.clone() for k, v in state_dict.items()})
        return -float((state_dict["w"] - TARGET).square().sum())


class ConstantEvaluator:
    def __init__(self, value: float = 0.5) -> None:
        self.value = value
        self.calls = 0

    def score(self, state_dict: dict[str, torch.Tensor], /) -> float:
        self.calls += 1
        return self.value


def write_models(tmp_path: Path, offsets: list[torch.Tensor]) -> list[str]:
    paths = []
    for i, offset in enumerate(offsets):
        tensors = {"w": TARGET + offset, "b": torch.full((2,), float(i)), "steps": torch.tensor([7, i])}
        paths.append(str(make_checkpoint(tmp_path / f"m{i}", tensors)))
    return paths


def recipe_of(paths: list[str]) -> Recipe:
    return Recipe(method="linear", models=[{"source": p} for p in paths])


def test_constant_evaluator_keeps_only_the_first_best(tmp_path: Path) -> None:
    """Strict improvement: equal scores never join; ties in the sort keep input order."""
    paths = write_models(tmp_path, [torch.zeros(3, 4)] * 4)
    evaluator = ConstantEvaluator()
    result = run_greedy_soup(recipe_of(paths), evaluator=evaluator)
    assert result.order == [0, 1, 2, 3]
    assert result.chosen == [0]
    assert [s.accepted for s in result.steps] == [False, False, False]
    assert result.evaluations == evaluator.calls == 7  # 2N − 1
    assert result.final_score == 0.5


def test_independent_noise_averages_out_and_an_outlier_is_rejected(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    noise = [0.3 * torch.randn(3, 4, generator=gen) for _ in range(4)]
    outlier = torch.full((3, 4), 5.0)
    paths = write_models(tmp_path, [noise[0], outlier, noise[1], noise[2], noise[3]])
    evaluator = DistanceEvaluator()
    result = run_greedy_soup(recipe_of(paths), evaluator=evaluator)

    scores = [s.score for s in result.ingredients]
    assert result.order == sorted(range(5), key=lambda i: -scores[i])
    assert result.order[-1] == 1 and 1 not in result.chosen
    assert result.chosen[0] == result.order[0]
    assert len(result.chosen) >= 2  # independent noise: averaging helps
    # chosen is a subsequence of the sorted order; each accepted step strictly improved the best so far
    positions = [result.order.index(i) for i in result.chosen]
    assert positions == sorted(positions)
    best = scores[result.order[0]]
    for step in result.steps:
        assert step.accepted == (step.score > best)
        best = max(best, step.score) if step.accepted else best
    assert result.final_score == best >= max(scores)
    # the last accepted candidate is exactly the uniform mean of the chosen ingredients
    states = [load_state_dict(Path(paths[i])) for i in result.chosen]
    mean_w = torch.stack([s["w"] for s in states]).mean(0)
    assert -float((mean_w - TARGET).square().sum()) == pytest.approx(result.final_score, rel=1e-5)
    accepted_seen = [evaluator.seen[len(paths) + k] for k, s in enumerate(result.steps) if s.accepted]
    torch.testing.assert_close(accepted_seen[-1]["w"], mean_w, rtol=1e-6, atol=1e-6)
    # non-float tensors come from the best ingredient, untouched
    assert accepted_seen[-1]["steps"].tolist() == [7, result.chosen[0]]


def test_soup_recipe_is_a_linear_merge_of_the_chosen(tmp_path: Path) -> None:
    paths = write_models(tmp_path, [torch.zeros(3, 4), torch.ones(3, 4), 0.1 * torch.ones(3, 4)])
    recipe = Recipe(method="linear", models=[{"source": p, "weight": 3.0} for p in paths], seed=4)
    result = run_greedy_soup(recipe, evaluator=DistanceEvaluator())
    written = soup_recipe(recipe, result)
    assert written.method == "linear"
    assert [m.source for m in written.models] == [paths[i] for i in result.chosen]
    assert written.model_weights() == [1.0] * len(result.chosen)
    assert written.seed == 4


def test_nan_scores_and_cancellation_are_typed(tmp_path: Path) -> None:
    paths = write_models(tmp_path, [torch.zeros(3, 4), torch.ones(3, 4)])
    with pytest.raises(EvaluatorError, match="NaN"):
        run_greedy_soup(recipe_of(paths), evaluator=ConstantEvaluator(math.nan))
    with pytest.raises(MergeCancelled):
        run_greedy_soup(recipe_of(paths), evaluator=ConstantEvaluator(), should_cancel=lambda: True)


def test_progress_counts_evaluations(tmp_path: Path) -> None:
    paths = write_models(tmp_path, [torch.zeros(3, 4), torch.ones(3, 4), torch.ones(3, 4)])
    calls: list[tuple[int, int]] = []
    run_greedy_soup(
        recipe_of(paths), evaluator=ConstantEvaluator(), progress=lambda d, t: calls.append((d, t))
    )
    assert calls == [(i, 5) for i in range(1, 6)]


def test_mismatched_ingredients_are_an_error(tmp_path: Path) -> None:
    a = make_checkpoint(tmp_path / "a", {"w": torch.zeros(3, 4)})
    b = make_checkpoint(tmp_path / "b", {"w": torch.zeros(4, 3)})
    with pytest.raises(EvaluatorError, match="shape"):
        run_greedy_soup(recipe_of([str(a), str(b)]), evaluator=ConstantEvaluator())


def test_the_written_soup_is_the_mean_of_the_chosen(tmp_path: Path) -> None:
    """The pipeline writes ``soup_recipe`` as a linear merge: the uniform mean the evaluator accepted."""
    from merge_ops.pipeline import run_merge

    gen = torch.Generator().manual_seed(1)
    paths = write_models(tmp_path, [0.3 * torch.randn(3, 4, generator=gen) for _ in range(3)])
    recipe = recipe_of(paths)
    result = run_greedy_soup(recipe, evaluator=DistanceEvaluator())
    run_merge(soup_recipe(recipe, result), output_dir=tmp_path / "soup")
    written = load_state_dict(tmp_path / "soup")
    states = [load_state_dict(Path(paths[i])) for i in result.chosen]
    torch.testing.assert_close(
        written["w"], torch.stack([s["w"] for s in states]).mean(0), rtol=1e-6, atol=1e-6
    )
    assert -float((written["w"] - TARGET).square().sum()) == pytest.approx(result.final_score, rel=1e-5)
