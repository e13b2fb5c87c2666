"""The methods that interpolate or re-weight models, each against mergekit 0.1.5's own per-tensor function.

mergekit is the oracle: ``mergekit.merge_methods.api.merge_tensors`` runs the registered mergekit method on one
tensor group, with the base last (as mergekit's planner appends it) and per-model parameters in model order.
Alloy gets what its pipeline passes: task vectors against the reference (the base, or the first model when
there is none), ``ctx.base`` and the per-model parameters. Both compute in float32; the merged tensors must agree
to about 1e-6. DELLA's mask is random in both: the test hands mergekit Alloy's mask (in place of
``torch.bernoulli``) so everything but the random draw is compared exactly, and the statistics of the draw apart.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
import torch

from kernels.reference import counter_bits24, dare_key
from merge_ops.errors import IncompatibleModelsError, RecipeError
from merge_ops.params import CATALOG, Scope
from merge_ops.registry import TensorContext, get_method

mk_api = pytest.importorskip("mergekit.merge_methods.api")

SHAPES = [(13,), (6, 11), (3, 4, 5)]
NAME = "model.layers.0.mlp.down_proj.weight"


def rand(shape: Sequence[int], seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def fine_tunes(base: torch.Tensor, k: int, seed: int, scale: float = 0.1) -> list[torch.Tensor]:
    return [base + rand(base.shape, seed + 100 + i, scale) for i in range(k)]


def alloy(
    method: str,
    models: list[torch.Tensor],
    *,
    base: torch.Tensor | None = None,
    params: Mapping[str, Any] | None = None,
    weights: Sequence[float] | None = None,
    model_params: Sequence[Mapping[str, Any]] = (),
    seed: int = 0,
    name: str = NAME,
) -> torch.Tensor:
    """The merged tensor as Alloy's pipeline computes it: reference + λ·method(τ, ctx)."""
    reference = base if base is not None else models[0]
    taus = torch.stack([m - reference for m in models]) if models else torch.zeros(0, *reference.shape)
    if base is None:
        taus[0].zero_()
    info = CATALOG[method]
    p = info.params.model_validate(dict(params or {}))
    ctx = TensorContext(
        name=name,
        weights=torch.tensor(list(weights) if weights is not None else [1.0] * len(models)),
        seed=seed,
        source_indices=tuple(range(len(models))),
        scope=Scope.per_tensor,
        base=reference.clone() if info.needs_base_weights else None,
        reference_is_input=base is None,
        model_params=tuple(model_params),
    )
    delta = get_method(method).fn(taus, ctx, p)
    return reference + float(getattr(p, "lambda_", 1.0)) * delta


def mergekit(
    method: str,
    models: list[torch.Tensor],
    *,
    base: torch.Tensor | None = None,
    parameters: Mapping[str, Any] | None = None,
) -> torch.Tensor:
    inputs = [*models, base] if base is not None else list(models)
    base_index = len(models) if base is not None else None
    return mk_api.merge_tensors(
        [t.clone() for t in inputs],
        method,
        parameters=dict(parameters or {}),
        base_index=base_index,
        name=NAME,
    )


def assert_same(
    got: torch.Tensor, want: torch.Tensor, *, reference: torch.Tensor, rtol: float = 2e-6
) -> None:
    """Merged tensors equal to ``rtol`` of the reference's scale (the deltas are compared, not the weights)."""
    scale = max(float(want.abs().max()), float(reference.abs().max()), 1e-12)
    err = float((got.double() - want.double()).abs().max())
    assert err <= rtol * scale, f"max |Δ| {err:.3g} > {rtol:g} · {scale:.3g}"


# -- slerp ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0, 1.4, -0.25])
def test_slerp_matches_mergekit(shape, t):
    base = rand(shape, 1)
    other = rand(shape, 2)
    got = alloy("slerp", [other], base=base, params={"t": t})
    assert_same(got, mergekit("slerp", [other], base=base, parameters={"t": t}), reference=base)
    # without a base: the first model is t = 0 (mergekit: that model as the base)
    got2 = alloy("slerp", [base, other], params={"t": t})
    assert_same(got2, mergekit("slerp", [other], base=base, parameters={"t": t}), reference=base)


@pytest.mark.parametrize("case", ["colinear", "antipodal", "zero_base", "identical", "fine_tune"])
def test_slerp_edge_cases_match_mergekit(case):
    base = rand((8, 5), 3)
    other = {
        "colinear": 2.0 * base,
        "antipodal": -0.5 * base,
        "zero_base": rand((8, 5), 4),
        "identical": base.clone(),
        "fine_tune": base + rand((8, 5), 5, 1e-3),  # cos > 0.9995: the lerp fallback
    }[case]
    if case == "zero_base":
        base = torch.zeros_like(base)
    for t in (0.0, 0.35, 1.0):
        got = alloy("slerp", [other], base=base, params={"t": t})
        assert_same(got, mergekit("slerp", [other], base=base, parameters={"t": t}), reference=other)


def test_slerp_endpoints_and_report():
    base, other = rand((9, 4), 6), rand((9, 4), 7)
    torch.testing.assert_close(alloy("slerp", [other], base=base, params={"t": 0.0}), base)
    torch.testing.assert_close(alloy("slerp", [other], base=base, params={"t": 1.0}), other)
    ctx = TensorContext(
        name=NAME, weights=torch.ones(1), seed=0, source_indices=(0,), scope=Scope.per_tensor, base=base
    )
    get_method("slerp").fn((2 * base - base).unsqueeze(0), ctx, CATALOG["slerp"].params(t=0.5))
    assert ctx.report["slerp_lerp"] == 1.0


# -- nuslerp ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("row_wise", [False, True])
@pytest.mark.parametrize("flatten", [True, False])
@pytest.mark.parametrize("with_base", [True, False])
def test_nuslerp_matches_mergekit(shape, row_wise, flatten, with_base):
    base = rand(shape, 10)
    a, b = fine_tunes(base, 2, seed=10, scale=0.5)
    weights = [0.3, 0.9]
    params = {"nuslerp_row_wise": row_wise, "nuslerp_flatten": flatten}
    if with_base:
        got = alloy("nuslerp", [a, b], base=base, params=params, weights=weights)
        want = mergekit("nuslerp", [a, b], base=base, parameters={**params, "weight": weights})
    else:
        got = alloy("nuslerp", [a, b], params=params, weights=weights)
        want = mergekit("nuslerp", [a, b], parameters={**params, "weight": weights})
    assert_same(got, want, reference=base)


@pytest.mark.parametrize("weights", [[1.0, -1.0], [0.0, 2.0], [1.0, 1.0]])
def test_nuslerp_weight_edge_cases_and_colinear(weights):
    base = rand((5, 6), 11)
    a = base + rand((5, 6), 12, 0.3)
    b = base + 3.0 * (a - base)  # colinear task vectors
    for models in ([a, b], [a, base + rand((5, 6), 13, 0.3)]):
        got = alloy("nuslerp", models, base=base, weights=weights)
        assert_same(
            got, mergekit("nuslerp", models, base=base, parameters={"weight": weights}), reference=base
        )


# -- multislerp -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("normalize_weights", [True, False])
def test_multislerp_matches_mergekit(shape, k, with_base, normalize_weights):
    base = rand(shape, 20)
    models = fine_tunes(base, k, seed=20, scale=0.4)
    weights = [0.5 + 0.25 * i for i in range(k)]
    params = {"normalize_weights": normalize_weights}
    got = alloy("multislerp", models, base=base if with_base else None, params=params, weights=weights)
    want = mergekit(
        "multislerp", models, base=base if with_base else None, parameters={**params, "weight": weights}
    )
    assert_same(got, want, reference=base)


def test_multislerp_antipodal_two_falls_back_and_three_is_an_error():
    base = torch.zeros(4, 4)  # exact antipodes (θ − θ_0 of a non-zero base rounds)
    tau = rand((4, 4), 22)
    two = [base + tau, base - tau]
    got = alloy("multislerp", two, base=base)
    assert_same(
        got, mergekit("multislerp", two, base=base, parameters={"weight": [1.0, 1.0]}), reference=base
    )
    three = [base + tau, base - tau, base + tau]
    with pytest.raises(IncompatibleModelsError, match="weighted sum"):
        alloy("multislerp", three, base=base, weights=[1.0, 2.0, 1.0])
    with pytest.raises(ValueError, match="weighted sum"):
        mergekit("multislerp", three, base=base, parameters={"weight": [1.0, 2.0, 1.0]})


def test_multislerp_of_unchanged_tensors_is_the_base():
    """Three fine-tunes that leave a tensor unchanged: the base (mergekit raises its antipodal error)."""
    base = rand((4, 4), 25)
    assert torch.equal(alloy("multislerp", [base.clone()] * 3, base=base), base)
    with pytest.raises(ValueError, match="weighted sum"):
        mergekit("multislerp", [base.clone()] * 3, base=base, parameters={"weight": [1.0] * 3})


def test_multislerp_of_identical_models_is_that_model():
    base = rand((6, 3), 23)
    model = base + rand((6, 3), 24, 0.2)
    torch.testing.assert_close(
        alloy("multislerp", [model, model, model], base=base), model, rtol=1e-5, atol=1e-6
    )


# -- karcher ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("options", [{}, {"max_iter": 3, "tol": 1e-3}, {"max_iter": 0}])
def test_karcher_matches_mergekit(shape, k, with_base, options):
    base = rand(shape, 30)
    models = fine_tunes(base, k, seed=30, scale=0.6)
    got = alloy("karcher", models, base=base if with_base else None, params=options)
    want = mergekit("karcher", models, base=base if with_base else None, parameters=options)
    assert_same(got, want, reference=base)


def test_karcher_zero_and_identical_inputs():
    zero = torch.zeros(3, 7)
    assert_same(alloy("karcher", [zero, zero]), mergekit("karcher", [zero, zero]), reference=torch.ones(1))
    one = rand((3, 7), 31)
    assert_same(alloy("karcher", [zero, one]), mergekit("karcher", [zero, one]), reference=one)
    torch.testing.assert_close(alloy("karcher", [one, one, one]), one, rtol=1e-5, atol=1e-6)


# -- nearswap ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("t", [0.0001, 0.05, 0.5, 10.0, 0.0, -1.0])
def test_nearswap_matches_mergekit(shape, t):
    base = rand(shape, 40)
    (model,) = fine_tunes(base, 1, seed=40, scale=0.2)
    got = alloy("nearswap", [model], base=base, params={"t": t})
    assert_same(got, mergekit("nearswap", [model], base=base, parameters={"t": t}), reference=base)
    if t >= 10:
        torch.testing.assert_close(got, model)  # every entry is within t: the model itself


def test_nearswap_needs_t():
    with pytest.raises(ValueError, match="t"):
        CATALOG["nearswap"].params.model_validate({})


# -- della / della_linear ---------------------------------------------------------------------------------------
class _AlloyMasks:
    """Stands in for ``torch.bernoulli`` inside mergekit's ``della_magprune``: Alloy's counter-based draw for
    model i (called in model order), from the probabilities mergekit computed."""

    def __init__(self, keys: list[int]) -> None:
        self.keys = iter(keys)
        self.calls = 0

    def __call__(self, probs: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.calls += 1
        bits = counter_bits24(probs.numel(), key=next(self.keys)).reshape(probs.shape)
        return (bits.double() < torch.floor(probs.double() * (1 << 24))).to(probs.dtype)


@pytest.mark.parametrize("method", ["della", "della_linear"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    "setting",
    [
        {"densities": [0.5, 0.5, 0.5], "epsilons": [0.15, 0.15, 0.15]},
        {"densities": [0.3, 0.6, 0.2], "epsilons": [0.1, 0.2, 0.05]},
        {"densities": [0.4, 0.4, 0.4], "epsilons": [0.1, 0.1, 0.1], "rescale": False, "normalize": True},
        {"densities": [0.7, 0.7, 0.7], "epsilons": [0.2, 0.2, 0.2], "normalize": False, "lambda": 0.7},
        {"densities": [1.0, 1.0, 1.0], "epsilons": [0.15, 0.15, 0.15]},
    ],
)
def test_della_matches_mergekit_given_the_same_mask(method, shape, setting, monkeypatch):
    base = rand(shape, 50)
    models = fine_tunes(base, 3, seed=50, scale=0.3)
    weights = [1.0, 0.6, -0.4]
    globals_ = {k: setting[k] for k in ("rescale", "normalize", "lambda") if k in setting}
    per_model = [
        {"density": d, "epsilon": e} for d, e in zip(setting["densities"], setting["epsilons"], strict=True)
    ]
    got = alloy(method, models, base=base, params=globals_, weights=weights, model_params=per_model, seed=7)
    keys = [dare_key(seed=7, source_index=i, name=NAME) for i in range(3)]
    masks = _AlloyMasks(keys)
    monkeypatch.setattr(torch, "bernoulli", masks)
    want = mergekit(
        method,
        models,
        base=base,
        parameters={
            **globals_,
            "weight": weights,
            "density": setting["densities"],
            "epsilon": setting["epsilons"],
        },
    )
    monkeypatch.undo()
    assert masks.calls == sum(d < 1 for d in setting["densities"])
    assert_same(got, want, reference=base)


@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 0.999])
def test_counter_bits_give_dares_mask_at_a_constant_probability(density):
    from kernels import dare_keep_mask

    key = dare_key(seed=3, source_index=1, name=NAME)
    bits = counter_bits24(5000, key=key)
    want = dare_keep_mask((5000,), density=density, seed=3, source_index=1, name=NAME)
    assert torch.equal(bits < int(density * (1 << 24)), want)


def test_counter_bits_torch_path_equals_the_numpy_path():
    from kernels.reference import _counter_bits_torch

    key = dare_key(seed=11, source_index=2, name=NAME)
    assert torch.equal(
        _counter_bits_torch(70_001, key=key, device=torch.device("cpu")), counter_bits24(70_001, key=key)
    )


def test_della_global_params_equal_per_model_params():
    base = rand((10, 12), 51)
    models = fine_tunes(base, 2, seed=51)
    by_recipe = alloy("della", models, base=base, params={"density": 0.4, "epsilon": 0.1})
    by_model = alloy("della", models, base=base, model_params=[{"density": 0.4, "epsilon": 0.1}] * 2)
    assert torch.equal(by_recipe, by_model)


def test_della_keep_statistics():
    """The random part: kept fraction ≈ density, keep rate rising with magnitude, the L1 norm preserved."""
    tau = rand((200, 500), 52)
    ctx_params = {"density": 0.3, "epsilon": 0.2, "normalize": False}
    merged = alloy("della_linear", [tau], base=torch.zeros_like(tau), params=ctx_params)
    kept = merged != 0
    assert abs(float(kept.float().mean()) - 0.3) < 0.005
    order = tau.abs().argsort(dim=1)
    kept_sorted = torch.gather(kept, 1, order).float().mean(dim=0)
    low, high = float(kept_sorted[:50].mean()), float(kept_sorted[-50:].mean())
    assert low == pytest.approx(0.3 - 0.2 + 0.02, abs=0.02)
    assert high == pytest.approx(0.3 + 0.2 - 0.02, abs=0.02)
    torch.testing.assert_close(merged.abs().sum(), tau.abs().sum(), rtol=1e-5, atol=0)
    again = alloy("della_linear", [tau], base=torch.zeros_like(tau), params=ctx_params)
    assert torch.equal(merged, again), "the mask depends on (seed, source, tensor) only"
    other_seed = alloy("della_linear", [tau], base=torch.zeros_like(tau), params=ctx_params, seed=1)
    assert not torch.equal(merged, other_seed)


def test_della_epsilon_window_and_one_element_rows():
    with pytest.raises(ValueError, match="epsilon"):
        CATALOG["della"].params.model_validate({"density": 0.1, "epsilon": 0.15})
    CATALOG["della"].params.model_validate({"density": 1.0, "epsilon": 0.9})  # no pruning: no window
    base = rand((6, 1), 53)
    models = fine_tunes(base, 2, seed=53)
    with pytest.raises(RecipeError, match="epsilon"):
        alloy("della", models, base=base, model_params=[{"density": 0.5}, {"density": 0.9}])
    # rows of one element (mergekit fails on them): kept with probability density
    out = alloy("della_linear", models, base=base, params={"density": 0.5, "epsilon": 0.1})
    assert torch.isfinite(out).all()


# -- sce --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("select_topk", [1.0, 0.5, 0.1, 0.0])
def test_sce_matches_mergekit(shape, k, select_topk):
    base = rand(shape, 60)
    models = fine_tunes(base, k, seed=60 + k, scale=0.3)
    got = alloy("sce", models, base=base, params={"select_topk": select_topk})
    want = mergekit("sce", models, base=base, parameters={"select_topk": select_topk})
    assert_same(got, want, reference=base)


def test_sce_zero_task_vectors_give_the_base():
    base = rand((5, 5), 61)
    assert torch.equal(
        alloy("sce", [base.clone(), base.clone()], base=base, params={"select_topk": 0.3}), base
    )


# -- ram / ramplus_tl -------------------------------------------------------------------------------------------
def sparse_fine_tunes(base: torch.Tensor, k: int, seed: int, keep: float) -> list[torch.Tensor]:
    """Fine-tunes that each change only a random part of the entries (so some overlap and some don't)."""
    out = []
    for i in range(k):
        g = torch.Generator().manual_seed(seed + i)
        mask = torch.rand(base.shape, generator=g) < keep
        out.append(base + torch.where(mask, torch.randn(base.shape, generator=g) * 0.1, 0.0))
    return out


@pytest.mark.parametrize("method", ["ram", "ramplus_tl"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize(
    "params", [{}, {"epsilon": 0.05}, {"epsilon": 0.0, "r": 0.5, "alpha": 1.5}, {"r": 1.0, "alpha": 0.05}]
)
def test_ram_matches_mergekit(method, shape, k, params):
    if method == "ram":
        params = {key: v for key, v in params.items() if key == "epsilon"}
    base = rand(shape, 70)
    models = sparse_fine_tunes(base, k, seed=70, keep=0.4)
    got = alloy(method, models, base=base, params=params)
    assert_same(got, mergekit(method, models, base=base, parameters=params), reference=base)


def test_ram_of_one_model_is_that_model_above_epsilon():
    base = rand((7, 7), 71)
    (model,) = sparse_fine_tunes(base, 1, seed=71, keep=0.5)
    torch.testing.assert_close(alloy("ram", [model], base=base, params={"epsilon": 0.0}), model)


# -- arcee_fusion -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(13,), (6, 11), (3, 4, 5), (40, 64)])
@pytest.mark.parametrize("scale", [0.01, 0.5])
def test_arcee_fusion_matches_mergekit(shape, scale):
    base = rand(shape, 80)
    (model,) = fine_tunes(base, 1, seed=80, scale=scale)
    got = alloy("arcee_fusion", [model], base=base)
    assert_same(got, mergekit("arcee_fusion", [model], base=base), reference=base)


def test_arcee_fusion_identical_model_is_the_base():
    base = rand((8, 8), 81)
    assert torch.equal(alloy("arcee_fusion", [base.clone()], base=base), base)


# -- passthrough ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", [None, 0.0, 0.5, 2.0])
@pytest.mark.parametrize("where", ["recipe", "model"])
def test_passthrough_matches_mergekit(shape, scale, where):
    model = rand(shape, 90)
    params = {"scale": scale} if where == "recipe" else {}
    per_model = [{"scale": scale}] if where == "model" and scale is not None else []
    got = alloy("passthrough", [model], params=params, model_params=per_model)
    want = mergekit("passthrough", [model], parameters={"scale": scale})
    assert_same(got, want, reference=model)
    if scale is None:
        assert torch.equal(got, model)


# -- the identities every method must keep ----------------------------------------------------------------------
INTERPOLATING = {
    "slerp": {"t": 0.4},
    "nuslerp": {},
    "multislerp": {},
    "karcher": {},
    "nearswap": {"t": 0.01},
    "della": {"density": 0.5, "epsilon": 0.1},
    "della_linear": {"density": 0.5, "epsilon": 0.1},
    "sce": {"select_topk": 0.5},
    "ram": {},
    "ramplus_tl": {},
    "arcee_fusion": {},
}


@pytest.mark.parametrize("method", sorted(INTERPOLATING))
def test_fine_tunes_equal_to_the_base_give_the_base(method):
    base = rand((6, 7), 100)
    k = 2 if method == "nuslerp" else 1 if CATALOG[method].max_models == 1 or method == "slerp" else 3
    got = alloy(method, [base.clone() for _ in range(k)], base=base, params=INTERPOLATING[method])
    torch.testing.assert_close(got, base, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["multislerp", "karcher", "ram", "ramplus_tl", "sce"])
def test_permuting_models_changes_nothing(method):
    base = rand((5, 9), 101)
    models = fine_tunes(base, 3, seed=101)
    got = alloy(method, models, base=base, params=INTERPOLATING[method])
    permuted = alloy(method, [models[2], models[0], models[1]], base=base, params=INTERPOLATING[method])
    torch.testing.assert_close(got, permuted, rtol=1e-5, atol=1e-6)


def test_the_catalog_declares_mergekits_input_contracts():
    """Input counts as mergekit 0.1.5's InputContract declares them (the base counts as an input)."""
    from mergekit import merge_methods

    for name in INTERPOLATING | {"passthrough": {}}:
        contract = merge_methods.get(name).spec.contract
        info = CATALOG[name]
        if name == "slerp":  # base optional in Alloy: two inputs, the base counted
            assert (info.min_inputs, info.max_inputs) == (contract.min_inputs, contract.max_inputs)
        elif contract.max_inputs is not None and contract.base.value == "required":
            assert info.max_models == contract.max_inputs - 1, name
        if contract.max_non_base is not None:
            assert info.max_models == contract.max_non_base, name
        assert info.needs_base == (contract.base.value == "required" and name != "slerp"), name
    assert CATALOG["passthrough"].max_inputs == merge_methods.get("passthrough").spec.contract.max_inputs
    assert math.isclose(CATALOG["karcher"].params().tol, 1e-5)
