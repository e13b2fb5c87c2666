"""slerp's in-place arithmetic (fewer full-size temporaries) is bit-identical to the out-of-place formula."""

from __future__ import annotations

import pytest
import torch

from merge_ops.methods.slerp import DOT_THRESHOLD, EPS, slerp


def _out_of_place(v0: torch.Tensor, v1: torch.Tensor, t: float) -> tuple[torch.Tensor, bool]:
    a, b = v0.reshape(-1), v1.reshape(-1)
    tt = torch.tensor(t, dtype=torch.float32)
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    na, nb = torch.where(na > EPS, na, 1.0), torch.where(nb > EPS, nb, 1.0)
    dot = ((a / na) * (b / nb)).sum().clamp(-1, 1)
    if bool(dot.abs() > DOT_THRESHOLD):
        return (1 - tt) * v0 + tt * v1, True
    theta = torch.acos(dot)
    s = torch.sin(theta)
    return torch.sin((1 - tt) * theta) / s * v0 + torch.sin(tt * theta) / s * v1, False


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("colinear", [False, True])
def test_slerp_matches_out_of_place_formula(seed: int, colinear: bool) -> None:
    gen = torch.Generator().manual_seed(seed)
    v0 = torch.randn(257, 129, generator=gen)
    v1 = (
        v0 * 1.5 + 1e-4 * torch.randn(257, 129, generator=gen)
        if colinear
        else torch.randn(257, 129, generator=gen)
    )
    t = float(torch.rand((), generator=gen)) * 1.4 - 0.2
    got, lerp = slerp(v0, v1, t=t)
    want, want_lerp = _out_of_place(v0, v1, t)
    assert lerp == want_lerp == colinear
    assert torch.equal(got, want)
