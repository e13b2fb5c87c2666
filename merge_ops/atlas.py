"""aTLAS (Zhang et al., NeurIPS 2024, arXiv:2407.02880): learn one coefficient per task vector and parameter block.

θ(Λ) = θ_0 + Σ_t λ_{t,b}·w_t·τ_{t,b} per tensor b; Λ ∈ R^{B×K} starts at λ (``params.lambda``) and takes
``params.steps`` Adam steps (lr ``params.lr``) on the evaluator's differentiable loss
(``evaluators.base.DifferentiableEvaluator``): ``supervised`` cross-entropy on its labelled rows (a few shots),
or ``entropy`` of its predictions (the paper's test-time adaptation, no labels). The data are the evaluator's
``data`` rows (``max_examples`` = the shots); every step uses all of them (full-batch, deterministic).

**Memory: unlike the streaming methods, aTLAS holds the model.** Training keeps θ_0 and the K task vectors of
every merged tensor in float32 ((K+1)× the float32 model), the merged state dict and its gradient (2× more,
each step) and the evaluator's own model and activations: about (K+3)× the float32 model size plus the
evaluator. Only Λ (B×K floats) is trained. The output is then streamed like any merge: the learned Λ go into
``params.coefficients`` and ``run_merge`` writes the ``atlas`` method (``methods/atlas.py``), so with
``steps: 0`` the output is ``task_arithmetic`` at λ (up to float32 rounding: see ``methods/atlas.py``). The report's ``atlas`` section holds Λ per
block, the loss before and after each step and the settings.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from merge_ops.errors import EvaluatorError, MergeCancelled
from merge_ops.evaluators.base import Evaluator
from merge_ops.params import CATALOG, AtlasParams
from merge_ops.preflight import build_plan, check_compatible
from merge_ops.recipe import Recipe
from merge_ops.report import Chosen, Progress, WholeModelRun
from merge_ops.sources import SourceResolver, open_sources


def learn_coefficients(
    recipe: Recipe,
    *,
    evaluator: Evaluator | None,
    resolver: SourceResolver | None = None,
    device: str = "cpu",
    progress: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Λ per merged tensor (``{name: [λ_1..λ_K]}``) and the training record; see the module docstring."""
    params = AtlasParams.model_validate(recipe.params)
    started = time.perf_counter()
    dev = torch.device(device)
    sources = open_sources(recipe, CATALOG["atlas"], resolver)
    try:
        check_compatible(recipe, sources)
        plan = build_plan(recipe, CATALOG["atlas"], sources)
        merged = [tp.name for tp in plan.tensors if tp.action == "merge"]
        k = len(sources.inputs)
        lam = float(params.lambda_)
        record: dict[str, Any] = {
            "objective": params.objective,
            "steps": params.steps,
            "lr": params.lr,
            "lambda": lam,
            "blocks": len(merged),
            "losses": [],
        }
        if params.steps == 0:  # task arithmetic: nothing to load or train
            return {"coefficients": {n: [lam] * k for n in merged}, **record}
        if evaluator is None or not callable(getattr(evaluator, "loss", None)):
            kind = recipe.evaluator.kind if recipe.evaluator else None
            raise EvaluatorError(
                f"aTLAS needs an evaluator with a differentiable loss(state_dict, objective=...); {kind!r} has "
                "none (sequence_classification_accuracy has one)",
                evaluator=kind,
            )
        weights = torch.tensor(sources.weights, dtype=torch.float32, device=dev)
        state: dict[str, torch.Tensor] = {}
        taus: dict[str, torch.Tensor] = {}
        for tp in plan.tensors:
            base = sources.reference.load(tp.name).to(dev)
            if tp.action != "merge":
                state[tp.name] = base
                continue
            base_f = base.float()
            state[tp.name] = base_f
            taus[tp.name] = torch.stack([src.task_vector(tp.name, base_f).to(dev) for src in sources.inputs])
    finally:
        sources.close()

    coefficients = torch.full((len(merged), k), lam, dtype=torch.float32, device=dev, requires_grad=True)
    optimizer = torch.optim.Adam([coefficients], lr=params.lr)
    losses: list[float] = []

    def merged_state() -> dict[str, torch.Tensor]:
        out = dict(state)
        for b, name in enumerate(merged):
            scale = coefficients[b] * weights  # [K]
            out[name] = state[name] + torch.tensordot(scale, taus[name], dims=1)
        return out

    for step in range(params.steps):
        if should_cancel is not None and should_cancel():
            raise MergeCancelled("the aTLAS training was cancelled")
        optimizer.zero_grad()
        loss = evaluator.loss(merged_state(), objective=params.objective)  # type: ignore[attr-defined]
        if not bool(torch.isfinite(loss)):
            raise EvaluatorError(f"the evaluator's loss is not finite at step {step}")
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(step + 1, params.steps)
    with torch.no_grad():
        final = float(evaluator.loss(merged_state(), objective=params.objective))  # type: ignore[attr-defined]
    learned = coefficients.detach().cpu().tolist()
    record["losses"] = [*losses, final]
    record["train_s"] = round(time.perf_counter() - started, 4)
    return {"coefficients": {n: [float(c) for c in learned[b]] for b, n in enumerate(merged)}, **record}


def learn_atlas(recipe: Recipe, run: WholeModelRun) -> Chosen:
    """``run_merge``'s first step for ``atlas`` without fixed coefficients: learn Λ (the model in memory, see
    above); the pipeline then streams the merge with ``params.coefficients = Λ`` while the report, card and
    digest stay the recipe's. The report's ``atlas`` section carries Λ and the losses."""
    from merge_ops.greedy_soup import recipe_evaluator

    params = AtlasParams.model_validate(recipe.params)
    evaluator = (
        recipe_evaluator(recipe, resolver=run.resolver, data_root=run.data_root, device=run.device)
        if params.steps > 0
        else None
    )

    def trained(done: int, total: int) -> None:
        if run.progress is not None:
            run.progress(Progress(done, total, 0, 0, None, phase="train"))

    result = learn_coefficients(
        recipe,
        evaluator=evaluator,
        resolver=run.resolver,
        device=run.device,
        progress=trained,
        should_cancel=run.should_cancel,
    )
    data = recipe.model_dump(mode="json", by_alias=True)
    data["params"] = {**recipe.params, "coefficients": result["coefficients"]}
    timings = {"train_s": result["train_s"]} if "train_s" in result else {}
    return Chosen(streamed=Recipe.model_validate(data), sections={"atlas": result}, timings=timings)
