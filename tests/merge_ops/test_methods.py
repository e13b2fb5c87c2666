"""Every registered method against the float64 oracle of the spec, plus the per-method edge cases."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from merge_ops.params import CATALOG, Scope
from merge_ops.registry import TensorContext, get_method, registered_names
from tests.merge_ops import method_oracle as oracle

STAGE_PRESETS = [
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "compeft",
]
SHAPES = [(), (1,), (7,), (5, 9), (4, 3, 6)]


def make_ctx(
    k: int,
    *,
    name: str = "model.layers.0.mlp.weight",
    weights=None,
    scope=Scope.per_tensor,
    densities=None,
    seed: int = 3,
    sources=None,
    global_stats=None,
) -> TensorContext:
    w = torch.ones(k) if weights is None else torch.tensor(weights, dtype=torch.float32)
    return TensorContext(
        name=name,
        weights=w,
        seed=seed,
        source_indices=tuple(sources or range(k)),
        scope=scope,
        densities=None if densities is None else tuple(densities),
        global_stats=global_stats,
    )


def run(method: str, tv: torch.Tensor, ctx: TensorContext, **params) -> torch.Tensor:
    registered = get_method(method)
    return registered.fn(tv, ctx, registered.params_model.model_validate(params))


def oracle_stages(method: str, tv: torch.Tensor, ctx: TensorContext, **overrides) -> torch.Tensor:
    p = CATALOG[method].params.model_validate(overrides)
    k = tv.shape[0]
    densities = list(ctx.densities) if ctx.densities else [p.density] * k
    sparse = oracle.sparsify(
        tv,
        kind=p.sparsify.value,
        densities=densities,
        top_removed=p.top_removed,
        alpha=p.alpha,
        rescale=p.rescale,
        scope=ctx.scope.value,
        name=ctx.name,
        seed=ctx.seed,
        sources=list(ctx.source_indices),
    )
    return oracle.aggregate(
        sparse, ctx.weights.tolist(), consensus=p.consensus.value, mean=p.aggregate == "mean"
    )


def random_tv(k: int, shape, seed: int) -> torch.Tensor:
    return torch.randn(k, *shape, generator=torch.Generator().manual_seed(seed))


# -- contract ---------------------------------------------------------------------------------------------------
def test_every_catalog_method_is_registered():
    assert sorted(CATALOG) == registered_names()


#: values for the params that have no default (mergekit requires them too)
REQUIRED_PARAMS = {"slerp": {"t": 0.3}, "nearswap": {"t": 0.05}}


def contract_inputs(method: str) -> tuple[int, bool]:
    """(K, whether the recipe has a base) that the method's input contract accepts, as many models as allowed."""
    info = CATALOG[method]
    if method == "transfer":
        return 1, True
    if info.max_inputs is not None:
        return info.max_inputs, False  # the first model is the reference
    return (info.max_models or 3), True


@pytest.mark.parametrize("method", registered_names())
@pytest.mark.parametrize("shape", SHAPES)
def test_contract_float32_shape_finite_deterministic(method, shape):
    k, with_base = contract_inputs(method)
    tv = random_tv(k, shape, seed=len(shape))
    if not with_base:
        tv[0].zero_()  # the reference's own task vector
    weights = [0.5, 1.0, 2.0][:k]
    info = CATALOG[method]
    scope = Scope.per_tensor if info.default_scope == Scope.global_ else info.default_scope
    params = info.params.model_validate(REQUIRED_PARAMS.get(method, {}))

    def context() -> TensorContext:
        ctx = make_ctx(k, weights=weights, scope=scope)
        if not info.needs_base_weights:
            return ctx
        base = random_tv(1, shape, seed=99)[0]
        return dataclasses.replace(ctx, base=base, reference_is_input=not with_base)

    ctx = context()
    before = tv.clone()
    first = get_method(method).fn(tv, ctx, params)
    second = get_method(method).fn(tv, context(), params)
    assert first.dtype == torch.float32
    assert first.shape == torch.Size(shape)
    assert torch.isfinite(first).all()
    assert torch.equal(first, second)
    assert torch.equal(tv, before), "methods must not modify their input"
    # report statistics are numbers, or one number per model (ComPEFT's σ and scale)
    assert all(
        isinstance(v, float) or (isinstance(v, list) and all(isinstance(x, float) for x in v))
        for v in ctx.report.values()
    )


# -- stage presets vs the float64 oracle ------------------------------------------------------------------------
@pytest.mark.parametrize("method", STAGE_PRESETS + ["stages"])
@pytest.mark.parametrize("scope", [Scope.per_tensor, Scope.per_row])
@pytest.mark.parametrize("shape", [(), (13,), (6, 11), (3, 4, 5)])
@pytest.mark.parametrize("seed", [0, 1])
def test_presets_match_oracle(method, scope, shape, seed):
    k = 3
    tv = random_tv(k, shape, seed=seed * 10 + len(shape))
    ctx = make_ctx(k, weights=[0.7, 1.3, -0.4], scope=scope)
    got = run(method, tv, ctx)
    want = oracle_stages(method, tv, ctx)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sparsify", ["magnitude", "breadcrumbs", "compeft", "dare"])
@pytest.mark.parametrize("consensus", ["none", "ties_sign"])
@pytest.mark.parametrize("aggregate", ["sum", "mean"])
def test_stage_combinations_with_per_model_densities(sparsify, consensus, aggregate):
    tv = torch.randint(-5, 6, (3, 8, 10), generator=torch.Generator().manual_seed(9)).float()  # many ties
    params = {
        "sparsify": sparsify,
        "consensus": consensus,
        "aggregate": aggregate,
        "density": 0.3,
        "top_removed": 0.1 if sparsify == "breadcrumbs" else 0.0,
        "rescale": "l1",
    }
    ctx = make_ctx(3, densities=[0.2, 0.5, 0.9], weights=[1.0, 2.0, 0.5])
    got = run("stages", tv, ctx, **params)
    want = oracle_stages("stages", tv, ctx, **params)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


# -- method-specific rules --------------------------------------------------------------------------------------
def test_magnitude_keeps_exactly_floor_density_n_and_at_least_one():
    tv = random_tv(1, (1000,), 0)
    sparse = run("stages", tv, make_ctx(1), sparsify="magnitude", density=0.2)
    assert int((sparse != 0).sum()) == 200
    tiny = random_tv(1, (3,), 1)
    assert int((run("stages", tiny, make_ctx(1), sparsify="magnitude", density=0.1) != 0).sum()) == 1


def test_magnitude_ties_by_lowest_index():
    tv = torch.tensor([[1.0, -2.0, 2.0, 2.0, 0.5]])
    got = run("stages", tv, make_ctx(1), sparsify="magnitude", density=0.4)
    assert got.tolist() == [0.0, -2.0, 2.0, 0.0, 0.0]


def test_breadcrumbs_small_tensor_removes_nothing_at_the_top():
    # ⌊0.01·50⌋ = 0: nothing is removed and the 7 largest are kept (mergekit ≤ 0.1.4 would zero everything)
    tv = random_tv(1, (50,), 2)
    got = run("breadcrumbs", tv, make_ctx(1), density=0.15, top_removed=0.01)
    top7 = tv[0].abs().argsort(descending=True)[:7]
    assert int((got != 0).sum()) == 7
    assert torch.equal(got[top7], tv[0][top7])


def test_breadcrumbs_band_and_zero_dim():
    tv = torch.tensor([[10.0, -9.0, 8.0, 7.0, -6.0, 5.0, 4.0, 3.0, 2.0, 1.0]])
    got = run("breadcrumbs", tv, make_ctx(1), density=0.3, top_removed=0.2)
    assert got.tolist() == [0.0, 0.0, 8.0, 7.0, -6.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    scalar = torch.tensor([2.5, -1.0])  # two models of a 0-dim tensor
    assert torch.equal(run("breadcrumbs", scalar, make_ctx(2)), torch.tensor(1.5))


def test_dare_density_one_is_identity_and_rescale_modes():
    tv = random_tv(2, (40, 7), 4)
    torch.testing.assert_close(run("dare_linear", tv, make_ctx(2), density=1.0), tv.sum(0), rtol=0, atol=0)
    for rescale in ("inverse", "l1", "none"):
        got = run("dare_linear", tv[:1], make_ctx(1), density=0.3, rescale=rescale)
        kept = got != 0
        if rescale == "inverse":
            torch.testing.assert_close(got[kept], tv[0][kept] / 0.3)
        elif rescale == "none":
            assert torch.equal(got[kept], tv[0][kept])
        else:
            torch.testing.assert_close(got.abs().sum(), tv[0].abs().sum())


def test_dare_mask_is_order_independent():
    tv = random_tv(3, (30, 9), 5)
    ctx = make_ctx(3, sources=[4, 7, 9])
    got = run("dare_linear", tv, ctx, density=0.4)
    perm = [2, 0, 1]
    permuted = run("dare_linear", tv[perm], make_ctx(3, sources=[[4, 7, 9][i] for i in perm]), density=0.4)
    torch.testing.assert_close(got, permuted, rtol=1e-6, atol=1e-6)
    alone = run("dare_linear", tv[1:2], make_ctx(1, sources=[7]), density=0.4)
    with_others = run("stages", tv, ctx, sparsify="dare", density=0.4, aggregate="sum")
    assert torch.equal(alone != 0, (alone != 0) & ((with_others != 0) | (alone == 0)))


def test_compeft_values_are_ternary():
    tv = random_tv(1, (20, 30), 6)
    got = run("compeft", tv, make_ctx(1), density=0.25, alpha=2.0)
    sigma = tv[0].double().std().item()
    values = got.unique().tolist()
    assert len(values) == 3 and values[1] == 0.0
    assert values[0] == -values[2] == pytest.approx(-2.0 * sigma, rel=1e-6)
    assert int((got != 0).sum()) == 150
    assert torch.equal(torch.sign(got[got != 0]), torch.sign(tv[0][got != 0]))


@pytest.mark.parametrize(
    ("shape", "scope"), [((), Scope.per_tensor), ((1,), Scope.per_tensor), ((4, 1), Scope.per_row)]
)
def test_compeft_units_of_one_element_pass_unchanged_for_any_alpha(shape, scope):
    # no unbiased std of one value: such units keep τ (not α·τ)
    tv = random_tv(2, shape, 8)
    got = run("compeft", tv, make_ctx(2, scope=scope), density=0.5, alpha=2.5)
    torch.testing.assert_close(got, tv.sum(dim=0))


def test_ties_single_model_is_the_trim():
    tv = random_tv(1, (100,), 7)
    got = run("ties", tv, make_ctx(1), density=0.2)
    want = oracle.sparsify(tv, kind="magnitude", densities=[0.2])[0]
    torch.testing.assert_close(got.double(), want)


@pytest.mark.parametrize("normalize", [True, False])
def test_soup_matches_weighted_average(normalize):
    tv = random_tv(3, (4, 5), 8)
    w = [0.2, 0.3, 1.5]
    for method in ("linear", "model_soup"):
        got = run(method, tv, make_ctx(3, weights=w), normalize=normalize)
        want = sum(wi * t for wi, t in zip(w, tv.double(), strict=True))
        want = want / sum(w) if normalize else want
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("shape", [(7,), (6, 5), (2, 3, 4)])
def test_model_stock_matches_oracle(filter_wise, shape):
    common = random_tv(1, shape, 9)
    tv = common + 0.7 * random_tv(4, shape, 10)  # correlated fine-tunes: cos in (0, 1)
    got = run("model_stock", tv, make_ctx(4), filter_wise=filter_wise)
    torch.testing.assert_close(
        got.double(), oracle.model_stock(tv, filter_wise=filter_wise), rtol=1e-5, atol=1e-6
    )


def test_model_stock_edges():
    delta = random_tv(1, (10,), 11)
    identical = delta.repeat(3, 1)
    torch.testing.assert_close(run("model_stock", identical, make_ctx(3)), delta[0], rtol=1e-6, atol=1e-6)
    opposed = torch.stack([delta[0], -delta[0]])  # cos −1 clamps to 0: the base
    assert torch.equal(run("model_stock", opposed, make_ctx(2)), torch.zeros(10))
    assert torch.equal(run("model_stock", torch.zeros(3, 10), make_ctx(3)), torch.zeros(10))


def test_transfer_and_lines():
    diff = random_tv(1, (3, 4), 12)
    assert torch.equal(run("transfer", diff, make_ctx(1)), diff[0])
    tv = random_tv(2, (3, 4), 13)
    torch.testing.assert_close(run("lines", tv, make_ctx(2, weights=[1.0, -0.5])), tv[0] - 0.5 * tv[1])
