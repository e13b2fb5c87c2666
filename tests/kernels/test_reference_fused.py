"""The torch reference of ``fused_sparse_merge`` (the CPU path of every ``stages`` merge) against the composition
of the reference ops it fuses: ``topk_mask`` / ``select_by_threshold`` / ``dare_keep_mask`` -> ``where`` /
``ternarize`` -> ``disjoint_merge`` or the weighted sum, and its report counts against direct counting."""

from __future__ import annotations

import pytest
import torch

from kernels import reference


def _stack(k: int, rows: int, m: int, seed: int) -> torch.Tensor:
    x = torch.randn(k, rows, m, generator=torch.Generator().manual_seed(seed))
    x[..., ::4] = x[..., 5:6]  # many exact ties
    x[..., ::8] = -x[..., ::8]
    x[..., 3] = 0.0  # exact zeros never count as kept or as conflicts
    return x


def _expected(sparse: torch.Tensor, weights: torch.Tensor, *, consensus: bool, mean: bool):
    nonzero = (sparse != 0).sum(dim=0)
    if consensus:
        merged, contributors = reference.disjoint_merge(sparse, weights, mean=mean)
        return merged, int(nonzero.sum()), int((nonzero > contributors).sum())
    merged = (sparse * weights.reshape(-1, 1, 1)).sum(dim=0)
    if mean:
        merged = merged / float(weights.sum())
    return merged, int(nonzero.sum()), 0


def _assert_matches(x, weights, sparse, **kwargs):
    for consensus in (True, False):
        for mean in (True, False):
            merged, kept, conflicts = reference.fused_sparse_merge(
                x, weights, consensus=consensus, mean=mean, **kwargs
            )
            want = _expected(sparse, weights, consensus=consensus, mean=mean)
            torch.testing.assert_close(merged, want[0], rtol=1e-6, atol=1e-7)
            assert (int(kept), int(conflicts)) == want[1:]


@pytest.mark.parametrize(("k", "rows", "m"), [(1, 1, 1023), (3, 1, 4097), (4, 5, 129)])
def test_fused_reference_top_k_band_and_ternary(k, rows, m):
    x = _stack(k, rows, m, seed=k + rows)
    weights = torch.linspace(0.5, 1.5, k)
    flat = x.reshape(k * rows, m)
    keep = torch.randint(1, m // 2, (k * rows,), generator=torch.Generator().manual_seed(1))
    skip = torch.randint(0, m // 4, (k * rows,), generator=torch.Generator().manual_seed(2))
    top = reference.topk_mask(flat, keep=keep)
    _assert_matches(x, weights, torch.where(top, flat, 0.0).view_as(x), keep=keep)
    band = reference.topk_mask(flat, keep=keep, skip=skip)
    _assert_matches(x, weights, torch.where(band, flat, 0.0).view_as(x), keep=keep, skip=skip)
    scale = torch.rand(k * rows) + 0.1
    ternary = reference.ternarize(flat, top, scale).view_as(x)
    _assert_matches(x, weights, ternary, keep=keep, scale=scale, ternary=True)


def test_fused_reference_rows_are_selected_in_chunks(monkeypatch):
    # many rows per chunk boundary: the chunked selection equals one whole-stack selection
    monkeypatch.setattr(reference, "_SELECT_CHUNK", 300)
    x = _stack(3, 7, 128, seed=9)
    keep = torch.arange(1, 22)
    flat = x.reshape(21, 128)
    sparse = torch.where(reference.topk_mask(flat, keep=keep), flat, 0.0).view_as(x)
    _assert_matches(x, torch.ones(3), sparse, keep=keep)


def test_fused_reference_global_boundaries():
    x = _stack(3, 1, 999, seed=3)
    flat = x.reshape(3, -1)
    upper = (flat.abs()[:, 5].clone(), torch.tensor([0, 7, 300]))
    lower = (torch.full((3,), 2.0), torch.zeros(3, dtype=torch.int64))
    mask = reference.select_by_threshold(flat, *upper) & ~reference.select_by_threshold(flat, *lower)
    sparse = torch.where(mask, flat, 0.0).view_as(x)
    _assert_matches(x, torch.tensor([1.0, -0.5, 2.0]), sparse, boundary=upper, lower_boundary=lower)


def test_fused_reference_dare_mask_and_rescale():
    x = _stack(3, 2, 500, seed=4)
    densities = [0.3, 0.7, 1.0]
    keys = [reference.dare_key(seed=11, source_index=t, name="w") for t in range(3)]
    scale = torch.tensor([1 / d for d in densities])
    sparse = torch.stack(
        [
            torch.where(
                reference.dare_keep_mask((2, 500), density=d, seed=11, source_index=t, name="w"), x[t], 0.0
            )
            * scale[t]
            for t, d in enumerate(densities)
        ]
    )
    _assert_matches(x, torch.ones(3), sparse, dare=(keys, densities), scale=scale)


def test_fused_reference_rejects_two_selections_and_ternary_without_scale():
    x = torch.ones(2, 1, 4)
    with pytest.raises(ValueError, match="one of"):
        reference.fused_sparse_merge(
            x, torch.ones(2), consensus=False, mean=False, keep=torch.tensor(1), dare=([1, 2], [0.5, 0.5])
        )
    with pytest.raises(ValueError, match="ternary"):
        reference.fused_sparse_merge(x, torch.ones(2), consensus=False, mean=False, ternary=True)
