"""The spec's identities ("Identities every method must pass") as hypothesis properties."""

from __future__ import annotations

import dataclasses

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kernels
from merge_ops.lines import lines_scales
from merge_ops.params import CATALOG, Scope
from merge_ops.registry import get_method, registered_names
from tests.merge_ops.test_methods import make_ctx

PROPERTY_SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# methods that take any number of task vectors and nothing else (slerp, karcher, ... also need θ_0 or a fixed
# number of models: their identities are in test_methods_vs_mergekit.py)
TASK_VECTOR_METHODS = [
    m
    for m in registered_names()
    if m != "transfer" and not CATALOG[m].needs_base_weights and CATALOG[m].max_models is None
]
# RAM's "changed" threshold (|τ| > epsilon) and SCE's uniform-weight floor are absolute, so scaling τ moves them
SCALE_COVARIANT = [m for m in TASK_VECTOR_METHODS if m not in {"ram", "ramplus_tl", "sce"}]
SHAPES = st.sampled_from([(), (1,), (5,), (3, 4), (2, 3, 5), (17, 3)])
FINITE = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, allow_subnormal=False, width=32)


@st.composite
def stacks(draw, *, k_min: int = 1, k_max: int = 4):
    k = draw(st.integers(k_min, k_max))
    shape = draw(SHAPES)
    numel = 1
    for dim in shape:
        numel *= dim
    values = draw(st.lists(FINITE, min_size=k * numel, max_size=k * numel))
    return torch.tensor(values, dtype=torch.float32).reshape(k, *shape)


def params_for(method: str, **overrides):
    return CATALOG[method].params.model_validate(overrides)


def run(method: str, tv: torch.Tensor, *, weights=None, sources=None, scope=Scope.per_tensor, **params):
    k = tv.shape[0]
    ctx = make_ctx(k, weights=weights, sources=sources, scope=scope)
    return get_method(method).fn(tv, ctx, params_for(method, **params))


@PROPERTY_SETTINGS
@given(
    method=st.sampled_from(TASK_VECTOR_METHODS), tv=stacks(k_min=2), scope=st.sampled_from(list(Scope)[:2])
)
def test_zero_task_vectors_give_the_base(method, tv, scope):
    zero = torch.zeros_like(tv)
    assert torch.equal(run(method, zero, scope=scope), torch.zeros(tv.shape[1:]))


@PROPERTY_SETTINGS
@given(tv=stacks(k_min=1, k_max=1))
def test_task_arithmetic_one_model_lambda_one_is_that_model(tv):
    assert torch.equal(run("task_arithmetic", tv), tv[0])
    base = torch.zeros(tv.shape[1:])
    theta = base + tv[0]
    assert torch.equal(kernels.fused_task_arithmetic(base, [theta], [1.0], out_dtype=torch.float32), theta)


@PROPERTY_SETTINGS
@given(
    tv=stacks(k_min=1, k_max=1),
    sparsify=st.sampled_from(["magnitude", "dare", "breadcrumbs"]),
    scope=st.sampled_from(list(Scope)[:2]),
)
def test_density_one_without_consensus_is_the_identity(tv, sparsify, scope):
    out = run("stages", tv, sparsify=sparsify, density=1.0, top_removed=0.0, scope=scope)
    assert torch.equal(out, tv[0])


@PROPERTY_SETTINGS
@given(tv=stacks(), rescale=st.sampled_from(["inverse", "l1", "none"]), seed=st.integers(0, 2**40))
def test_dare_density_one_is_the_identity(tv, rescale, seed):
    k = tv.shape[0]
    ctx = make_ctx(k, seed=seed)
    out = get_method("dare_linear").fn(tv, ctx, params_for("dare_linear", density=1.0, rescale=rescale))
    assert torch.equal(out, run("task_arithmetic", tv))


@PROPERTY_SETTINGS
@given(
    tv=stacks(k_min=1, k_max=1),
    copies=st.integers(1, 5),
    method=st.sampled_from(["linear", "model_soup", "model_stock"]),
)
def test_soup_of_identical_models_is_that_model(tv, copies, method):
    identical = tv.repeat(copies, *([1] * (tv.dim() - 1)))
    out = run(method, identical)
    if method == "model_stock" and copies > 1:
        # cos(δ, δ) = 1 unless δ is ~0 (then t = 0, and the delta is ~0 anyway)
        torch.testing.assert_close(out, tv[0], rtol=1e-5, atol=1e-6 * max(1.0, float(tv.abs().max())))
    else:
        torch.testing.assert_close(out, tv[0], rtol=1e-6, atol=1e-6)


@PROPERTY_SETTINGS
@given(
    names=st.lists(
        st.from_regex(r"\A(model\.)?(layers|h|blocks)\.[0-9]{1,2}\.[a-z]{1,5}\Z|\A[a-z_.]{1,12}\Z"),
        min_size=1,
        max_size=20,
        unique=True,
    )
)
def test_lines_alpha_one_beta_zero_is_the_identity(names):
    assert set(lines_scales(names, alpha=1.0, beta=0.0).values()) == {1.0}
    for head in ("alpha", "alpha_plus_beta"):
        assert set(lines_scales(names, alpha=1.0, beta=0.0, head_scale=head).values()) == {1.0}


@PROPERTY_SETTINGS
@given(
    method=st.sampled_from(TASK_VECTOR_METHODS),
    tv=stacks(k_min=2),
    data=st.data(),
    scope=st.sampled_from(list(Scope)[:2]),
)
def test_permuting_models_changes_nothing(method, tv, data, scope):
    k = tv.shape[0]
    perm = data.draw(st.permutations(range(k)))
    weights = data.draw(st.lists(st.sampled_from([0.25, 0.5, 1.0, 2.0]), min_size=k, max_size=k))
    sources = list(range(10, 10 + k))
    out = run(method, tv, weights=weights, sources=sources, scope=scope)
    permuted = run(
        method,
        tv[list(perm)],
        weights=[weights[i] for i in perm],
        sources=[sources[i] for i in perm],
        scope=scope,
    )
    scale = max(1.0, float(tv.abs().max()))
    torch.testing.assert_close(permuted, out, rtol=1e-5, atol=1e-5 * scale)


@PROPERTY_SETTINGS
@given(
    method=st.sampled_from(SCALE_COVARIANT),
    tv=stacks(),
    c=st.sampled_from([0.25, 0.5, 2.0, 8.0]),
    scope=st.sampled_from(list(Scope)[:2]),
)
def test_scaling_task_vectors_scales_sum_aggregated_deltas(method, tv, c, scope):
    # powers of two scale floats exactly, so rankings and ties are unchanged and the property is exact-ish
    params = {"aggregate": "sum"} if "aggregate" in CATALOG[method].params.model_fields else {}
    if method in ("linear", "model_soup"):
        params = {"normalize": False}
    out = run(method, tv, scope=scope, **params)
    scaled = run(method, tv * c, scope=scope, **params)
    scale = max(1.0, float(tv.abs().max()))
    torch.testing.assert_close(scaled, out * c, rtol=1e-5, atol=1e-5 * scale * c)


@PROPERTY_SETTINGS
@given(tv=stacks(k_min=1, k_max=1), density=st.floats(0.05, 1.0), alpha=st.floats(0.1, 4.0))
def test_compeft_decompress_of_compress_is_the_ternarized_vector(tv, density, alpha):
    ternary = run("compeft", tv, density=density, alpha=alpha)
    flat = ternary.reshape(1, -1)
    # compress: positions, signs and the one scale; decompress with kernels only
    positions = kernels.pack_bits(flat != 0)
    signs = kernels.pack_bits(flat > 0)
    scale = flat.abs().max().reshape(1) if flat.numel() else torch.zeros(1)
    n = flat.numel()
    mask = kernels.unpack_bits(positions, n).reshape(1, -1)
    sign = torch.where(kernels.unpack_bits(signs, n), 1.0, -1.0).reshape(1, -1)
    restored = kernels.ternarize(sign, mask, scale).reshape(ternary.shape)
    if tv[0].numel() >= 2:
        assert torch.equal(restored, ternary)
        assert len(ternary.abs().unique()) <= 2  # {0, ασ}


@PROPERTY_SETTINGS
@given(tv=stacks(k_min=2, k_max=2), t=st.sampled_from([0.0, 1.0]))
def test_slerp_endpoints_are_the_inputs(tv, t):
    base, tau = tv[0], tv[1]
    ctx = dataclasses.replace(make_ctx(1), base=base)
    out = base + get_method("slerp").fn(tau.unsqueeze(0), ctx, params_for("slerp", t=t))
    want = base if t == 0.0 else base + tau
    scale = max(1.0, float(tv.abs().max()))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5 * scale)


@PROPERTY_SETTINGS
@given(
    tv=stacks(k_min=1, k_max=1),
    copies=st.integers(1, 4),
    method=st.sampled_from(["multislerp", "karcher", "ram"]),
)
def test_merging_identical_models_gives_that_model(tv, copies, method):
    identical = tv.repeat(copies, *([1] * (tv.dim() - 1)))
    params = params_for(method, epsilon=0.0) if method == "ram" else params_for(method)
    if method == "karcher":  # with a base, karcher averages the base too: merge the copies alone
        ctx = dataclasses.replace(make_ctx(copies), base=tv[0], reference_is_input=True)
        out = tv[0] + get_method(method).fn(torch.zeros_like(identical), ctx, params)
    else:  # identical task vectors against a base
        ctx = dataclasses.replace(make_ctx(copies), base=torch.zeros(tv.shape[1:]))
        out = get_method(method).fn(identical, ctx, params)
    scale = max(1.0, float(tv.abs().max()))
    torch.testing.assert_close(out, tv[0], rtol=1e-5, atol=1e-5 * scale)
