"""Greedy soup (Wortsman et al., 2022; survey §3.2): choose which fine-tunes to average by a held-out score.

1. Score every ingredient on its own with the evaluator (higher is better).
2. Sort by score, best first; equal scores keep the recipe's input order (a stable sort on −score).
3. The soup starts as the best ingredient, whose score is not re-evaluated.
4. Visit each remaining ingredient once, in that order: the candidate is the running uniform mean with it added;
   it joins iff the candidate's score is *strictly* higher than the best so far (the reference code's ``>``; with
   a constant evaluator only the best ingredient is kept).

Unlike the streaming merge, this evaluates whole models, so it holds complete state dicts in memory (float32):
the running soup, the ingredient being tried and the candidate — about 3× the float32 model size — plus the
evaluator's own model. Ingredients are full checkpoints (not LoRA/task-vector files). ``run_greedy_soup`` only
chooses; the pipeline then writes the final soup as a ``linear`` merge of the chosen models with weight 1
(``soup_recipe``), so the output is streamed, sharded and reported like any other merge.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from merge_ops.checkpoint import Checkpoint
from merge_ops.errors import EvaluatorError, MergeCancelled
from merge_ops.evaluators.base import Evaluator
from merge_ops.recipe import Recipe, Source
from merge_ops.report import Chosen, Progress, WholeModelRun
from merge_ops.sources import SourceResolver, local_path

StateDict = dict[str, torch.Tensor]


class IngredientScore(BaseModel):
    index: int
    source: str
    score: float


class SoupStep(BaseModel):
    """One visit of step 4: the candidate soup with ``index`` added, its score, and whether it was kept."""

    index: int
    score: float
    accepted: bool


class GreedySoupResult(BaseModel):
    ingredients: list[IngredientScore]
    #: model indices sorted by individual score (best first, ties by input order)
    order: list[int]
    steps: list[SoupStep]
    #: model indices in the order they joined the soup; the first is the best individual
    chosen: list[int]
    final_score: float
    evaluations: int
    seconds: float


def evaluator_model_dir(recipe: Recipe, *, resolver: SourceResolver | None = None) -> Path:
    """The folder whose config/tokenizer the evaluator uses: ``evaluator.model``, else the base, else model 0."""
    spec = getattr(recipe, "evaluator", None)
    source: Source = (
        (spec.model if spec is not None and spec.model else None) or recipe.base or recipe.models[0].source
    )
    return local_path(source, resolver=resolver)


def recipe_evaluator(
    recipe: Recipe, *, resolver: SourceResolver | None, data_root: Path | None, device: str
) -> Any:
    """The recipe's evaluator, built on ``evaluator_model_dir`` (greedy soup scores with it, aTLAS trains on it).
    A relative ``evaluator.data`` is read from ``data_root`` (the caller confines it)."""
    from merge_ops.evaluators.base import build_evaluator

    assert recipe.evaluator is not None  # the recipe validator requires it
    return build_evaluator(
        recipe.evaluator,
        model_dir=evaluator_model_dir(recipe, resolver=resolver),
        data_root=data_root,
        device=device,
    )


def load_state_dict(path: Path, *, allow_pickle: bool = False) -> StateDict:
    """All tensors of a checkpoint; floating ones as float32 (the soup is averaged in float32)."""
    with Checkpoint.open(path, allow_pickle=allow_pickle) as checkpoint:
        loaded = {name: checkpoint.load(name) for name in checkpoint.infos}
    return {name: t.float() if t.is_floating_point() else t for name, t in loaded.items()}


def run_greedy_soup(
    recipe: Recipe,
    *,
    evaluator: Evaluator,
    resolver: SourceResolver | None = None,
    progress: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> GreedySoupResult:
    """Choose the soup's ingredients among ``recipe.models`` (see the module docstring).

    ``progress(evaluations_done, evaluations_total)`` is called after each evaluation (the total is the
    worst case, 2N − 1). Recipe weights are ignored: a greedy soup is a uniform average of its ingredients.
    """
    started = time.perf_counter()
    paths = [local_path(m.source, resolver=resolver) for m in recipe.models]
    labels = [m.source if isinstance(m.source, str) else m.source.uri() for m in recipe.models]
    total = 2 * len(paths) - 1
    done = 0

    def evaluate(state_dict: StateDict) -> float:
        nonlocal done
        if should_cancel is not None and should_cancel():
            raise MergeCancelled("greedy soup cancelled")
        value = float(evaluator.score(state_dict))
        if value != value:  # NaN would make every comparison false and silently stop the soup
            raise EvaluatorError("the evaluator returned NaN")
        done += 1
        if progress is not None:
            progress(done, total)
        return value

    scores = [evaluate(load_state_dict(p, allow_pickle=recipe.allow_pickle)) for p in paths]
    order = sorted(range(len(paths)), key=lambda i: -scores[i])  # stable: ties keep input order
    soup = load_state_dict(paths[order[0]], allow_pickle=recipe.allow_pickle)
    chosen, best, steps = [order[0]], scores[order[0]], []
    for index in order[1:]:
        ingredient = load_state_dict(paths[index], allow_pickle=recipe.allow_pickle)
        candidate = _add_to_mean(soup, ingredient, count=len(chosen), label=labels[index])
        del ingredient
        score = evaluate(candidate)
        accepted = score > best
        steps.append(SoupStep(index=index, score=score, accepted=accepted))
        if accepted:
            soup, best = candidate, score
            chosen.append(index)
    return GreedySoupResult(
        ingredients=[IngredientScore(index=i, source=labels[i], score=s) for i, s in enumerate(scores)],
        order=order,
        steps=steps,
        chosen=chosen,
        final_score=best,
        evaluations=done,
        seconds=round(time.perf_counter() - started, 4),
    )


def _add_to_mean(soup: StateDict, ingredient: StateDict, *, count: int, label: str) -> StateDict:
    """The uniform mean of ``count`` models (``soup``) with one more added; non-float tensors stay the soup's."""
    if soup.keys() != ingredient.keys():
        missing = sorted(soup.keys() ^ ingredient.keys())
        raise EvaluatorError(
            f"{label} does not have the same tensors as the soup: {', '.join(missing[:5])}",
            tensors=missing[:20],
        )
    mixed = {}
    for name, tensor in soup.items():
        other = ingredient[name]
        if tensor.shape != other.shape:
            raise EvaluatorError(
                f"{label}: tensor {name} has shape {tuple(other.shape)}, the soup has {tuple(tensor.shape)}",
                tensor=name,
            )
        mixed[name] = (tensor * count + other) / (count + 1) if tensor.is_floating_point() else tensor
    return mixed


def soup_recipe(recipe: Recipe, result: GreedySoupResult) -> Recipe:
    """The ``linear`` recipe that writes the chosen soup: the chosen models (in joining order), weight 1 each."""
    data = recipe.model_dump(mode="json", by_alias=True, exclude={"evaluator"})
    data.update(
        method="linear",
        params={},
        overrides=[],
        weights=None,
        models=[{**data["models"][i], "weight": 1.0} for i in result.chosen],
    )
    return Recipe.model_validate(data)


def choose_soup(recipe: Recipe, run: WholeModelRun) -> Chosen:
    """``run_merge``'s first step for ``greedy_soup``: choose the ingredients with the evaluator (whole models in
    memory, see above); the pipeline then streams ``soup_recipe`` while the report, card and digest stay the
    greedy soup's. A relative ``evaluator.data`` is read from ``data_root`` (the caller confines it)."""
    evaluator = recipe_evaluator(recipe, resolver=run.resolver, data_root=run.data_root, device=run.device)

    def evaluated(done: int, total: int) -> None:
        if run.progress is not None:
            run.progress(Progress(done, total, 0, 0, None, phase="evaluate"))

    result = run_greedy_soup(
        recipe,
        evaluator=evaluator,
        resolver=run.resolver,
        progress=evaluated,
        should_cancel=run.should_cancel,
    )
    return Chosen(
        streamed=soup_recipe(recipe, result),
        sections={"greedy_soup": result.model_dump(mode="json")},
        timings={"select_s": result.seconds},
    )
