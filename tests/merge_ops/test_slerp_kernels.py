"""slerp's two passes: the angle from float64 moments (``kernels.slerp_moments``) and the delta (``slerp_delta``),
bit for bit the reference's float32 formula given the coefficients; the merged tensor against a float64 oracle."""

from __future__ import annotations

import math
import os

import pytest
import torch

from kernels import cpu_fused, reference
from merge_ops.methods.slerp import DOT_THRESHOLD, EPS, slerp_delta


def _pair(seed: int, colinear: bool, n: tuple[int, int] = (257, 1029)) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    v0 = torch.randn(*n, generator=gen)
    v1 = v0 * 1.5 + 1e-4 * torch.randn(*n, generator=gen) if colinear else torch.randn(*n, generator=gen)
    return v0, v1 - v0  # the task vector, as the pipeline hands it over


def _oracle(v0: torch.Tensor, tau: torch.Tensor, t: float) -> tuple[torch.Tensor, bool]:
    """SLERP in float64 of v0 and v1 = τ + v0 (the float32 sum the pipeline forms), minus v0."""
    a, b = v0.double(), (tau + v0).double()
    na, nb = float(a.norm()), float(b.norm())
    na, nb = na if na > EPS else 1.0, nb if nb > EPS else 1.0
    dot = max(-1.0, min(1.0, float((a * b).sum()) / na / nb))
    if abs(dot) > DOT_THRESHOLD:
        return (1 - t) * a + t * b - a, True
    theta = math.acos(dot)
    return (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta) - a, False


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("colinear", [False, True])
def test_slerp_is_the_float64_formula_within_float32_rounding(seed: int, colinear: bool) -> None:
    v0, tau = _pair(seed, colinear)
    t = float(torch.rand((), generator=torch.Generator().manual_seed(seed))) * 1.4 - 0.2
    got, lerp = slerp_delta(v0, tau, t=t)
    want, want_lerp = _oracle(v0, tau, t)
    assert lerp == want_lerp == colinear
    assert got.dtype == torch.float32 and got.shape == v0.shape
    torch.testing.assert_close(
        got.double(), want, rtol=0, atol=2e-6 * float(v0.abs().max() + tau.abs().max())
    )


@pytest.mark.parametrize("n", [(0,), (5,), (1 << 18, 3)])
def test_the_compiled_twins_are_the_reference(n: tuple[int, ...]) -> None:
    """The moments within float64 rounding (their sums are grouped differently), the delta bit for bit."""
    gen = torch.Generator().manual_seed(len(n))
    v0, tau = torch.randn(*n, generator=gen), 0.01 * torch.randn(*n, generator=gen)
    torch.testing.assert_close(
        cpu_fused.slerp_moments(v0, tau), reference.slerp_moments(v0, tau), rtol=1e-12, atol=1e-12
    )
    got = cpu_fused.slerp_delta(v0, tau, 0.7123, -0.25)
    want = reference.slerp_delta(v0, tau, 0.7123, -0.25)
    assert got.shape == v0.shape and torch.equal(got.view(torch.int32), want.view(torch.int32))


def test_without_the_compiled_loops_slerp_gives_the_same_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    v0, tau = _pair(7, colinear=False, n=(300, 1000))
    got, _ = slerp_delta(v0, tau, t=0.4)
    monkeypatch.setitem(os.environ, "ALLOY_KERNELS", "torch")
    want, _ = slerp_delta(v0, tau, t=0.4)
    # the moments differ in float64 rounding only, so the float32 coefficients are almost always the same bits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
