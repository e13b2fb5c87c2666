"""scope=global: the streamed two-pass computation equals the computation on the concatenated model."""

from __future__ import annotations

import math

import pytest
import torch

from kernels import compiled
from merge_ops.global_stats import compute_global_stats
from merge_ops.params import CATALOG, Scope
from merge_ops.registry import get_method
from tests.merge_ops import method_oracle as oracle
from tests.merge_ops.test_methods import make_ctx

SHAPES = {
    "embed.weight": (6, 5),
    "layers.0.w": (4, 7),
    "layers.0.b": (7,),
    "logit_scale": (),
    "layers.1.w": (3, 3, 2),
}


def model(k: int, seed: int, *, integers: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if integers:  # many exact ties, across tensors too
        return {n: torch.randint(-3, 4, (k, *s), generator=g).float() for n, s in SHAPES.items()}
    return {n: torch.randn(k, *s, generator=g) * (1 + i) for i, (n, s) in enumerate(SHAPES.items())}


def concatenated(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    k = next(iter(tensors.values())).shape[0]
    return torch.cat([t.reshape(k, -1) for t in tensors.values()], dim=1)


def split(flat: torch.Tensor, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, start = {}, 0
    for name, t in tensors.items():
        n = t[0].numel()
        out[name] = flat[..., start : start + n].reshape((*flat.shape[:-1], *t.shape[1:]))
        start += n
    return out


def merge_global(method: str, tensors, *, densities=None, weights=(1.0, 0.5, 2.0), **params):
    registered = get_method(method)
    p = registered.params_model.model_validate(params)
    k = len(weights)
    stats = compute_global_stats(
        lambda: iter(tensors.items()), params=p, densities=densities, seed=3, source_indices=list(range(k))
    )
    out = {}
    for name, tv in tensors.items():
        ctx = make_ctx(
            k, name=name, weights=list(weights), scope=Scope.global_, densities=densities, global_stats=stats
        )
        out[name] = registered.fn(tv, ctx, p)
    return out, stats


def oracle_concat(method: str, tensors, *, densities=None, weights=(1.0, 0.5, 2.0), **params):
    p = CATALOG[method].params.model_validate(params)
    flat = concatenated(tensors).double()
    k = flat.shape[0]
    sparse = oracle.sparsify(
        flat,
        kind=p.sparsify.value,
        densities=list(densities or [p.density] * k),
        top_removed=p.top_removed,
        alpha=p.alpha,
    )
    mean = p.aggregate == "mean"
    out = split(oracle.aggregate(sparse, list(weights), consensus=p.consensus.value, mean=mean), tensors)
    if p.sparsify == "breadcrumbs":  # 0-dim tensors pass Breadcrumbs unchanged, whatever the scope
        for name, t in tensors.items():
            if t.dim() == 1:
                out[name] = oracle.aggregate(
                    t.double(), list(weights), consensus=p.consensus.value, mean=mean
                )
    return out


@pytest.mark.parametrize("integers", [False, True])
@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("ties", {}),
        ("ties", {"density": 0.5}),
        ("compeft", {"density": 0.3, "alpha": 1.5}),
        ("breadcrumbs", {"density": 0.4, "top_removed": 0.1}),
        ("breadcrumbs_ties", {}),
        ("stages", {"sparsify": "magnitude", "density": 0.05}),
    ],
)
def test_global_scope_equals_concatenated_model(method, params, integers):
    tensors = model(3, seed=1, integers=integers)
    got, _ = merge_global(method, tensors, **params)
    want = oracle_concat(method, tensors, **params)
    for name in tensors:
        torch.testing.assert_close(got[name].double(), want[name], rtol=1e-5, atol=1e-5, msg=name)


def test_global_scope_with_per_model_densities():
    tensors = model(3, seed=2, integers=True)
    got, stats = merge_global("ties", tensors, densities=[0.1, 0.5, 1.0])
    want = oracle_concat("ties", tensors, densities=[0.1, 0.5, 1.0])
    for name in tensors:
        torch.testing.assert_close(got[name].double(), want[name], rtol=1e-5, atol=1e-5)
    n = concatenated(tensors).shape[1]
    assert stats.upper.rank == tuple(max(1, math.floor(d * n)) for d in (0.1, 0.5, 1.0))


def test_global_stats_sigma_l1_and_exact_counts():
    tensors = model(3, seed=3, integers=False)
    flat = concatenated(tensors).double()
    p = CATALOG["compeft"].params(density=0.25)
    stats = compute_global_stats(lambda: iter(tensors.items()), params=p)
    assert stats.numel == flat.shape[1]
    torch.testing.assert_close(torch.tensor(stats.sigma, dtype=torch.float64), flat.std(dim=1, correction=1))
    torch.testing.assert_close(torch.tensor(stats.l1, dtype=torch.float64), flat.abs().sum(dim=1))
    kept = sum(stats.selection_mask(n, t.reshape(3, -1)).sum(dim=1) for n, t in tensors.items())
    assert kept.tolist() == [math.floor(0.25 * flat.shape[1])] * 3


def test_global_ties_fill_in_iteration_order():
    # every magnitude equal: the kept elements are the first ⌊d·N⌋ in iteration order, tensor by tensor
    tensors = {"a": torch.ones(1, 4), "b": -torch.ones(1, 6), "c": torch.ones(1, 5)}
    p = CATALOG["ties"].params(density=0.5)
    stats = compute_global_stats(lambda: iter(tensors.items()), params=p)
    masks = {n: stats.selection_mask(n, t.reshape(1, -1))[0].tolist() for n, t in tensors.items()}
    assert masks == {"a": [True] * 4, "b": [True] * 3 + [False] * 3, "c": [False] * 5}


def test_global_dare_l1_rescale_matches_the_model_norm():
    tensors = model(2, seed=4, integers=False)
    out, stats = merge_global("dare_linear", tensors, weights=(1.0, 0.0), density=0.3, rescale="l1")
    total = sum(t.abs().sum().item() for t in out.values())
    assert total == pytest.approx(stats.l1[0], rel=1e-5)


def test_global_stats_is_bounded_to_the_batches_it_is_given():
    calls = []

    def batches():
        calls.append(1)
        return iter(model(2, seed=5, integers=False).items())

    compute_global_stats(batches, params=CATALOG["breadcrumbs"].params(density=0.3, top_removed=0.05))
    assert len(calls) <= 5  # one statistics pass + two radix passes per cut (upper and lower)
    assert compute_global_stats(lambda: iter(()), params=CATALOG["ties"].params()).numel == 0


@pytest.mark.parametrize("method", ["ties", "compeft", "breadcrumbs"])
def test_two_wide_radix_passes_select_what_three_narrow_ones_do(method, monkeypatch):
    # the compiled CPU loops select with 16 + 15 bit digits, the reference (and a GPU) with 11 + 11 + 9
    tensors = model(3, seed=11, integers=True)  # integer-valued: many exact ties at the threshold
    params = CATALOG[method].params(density=0.3, **({"top_removed": 0.05} if method == "breadcrumbs" else {}))
    calls = []

    def batches():
        calls.append(1)
        return iter(tensors.items())

    jit_available = compiled.jit() is not None
    wide = compute_global_stats(batches, params=params)
    wide_calls = len(calls)
    monkeypatch.setenv("ALLOY_JIT", "off")
    calls.clear()
    narrow = compute_global_stats(batches, params=params)
    assert (wide.upper, wide.lower, wide.numel) == (narrow.upper, narrow.lower, narrow.numel)
    assert wide.sigma == pytest.approx(narrow.sigma, rel=1e-12)
    assert wide.l1 == pytest.approx(narrow.l1, rel=1e-12)
    cuts = 2 if method == "breadcrumbs" else 1  # Breadcrumbs selects a lower cut too
    assert len(calls) == 1 + 2 * cuts  # the statistics pass, then two more digits per cut
    assert wide_calls == (1 + cuts if jit_available else 1 + 2 * cuts)
