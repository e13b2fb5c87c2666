"""A whole merge on the CPU twins (compiled loops, reused and lent buffers, write-behind, direct I/O) against the
same merge on the torch reference: every tensor bit for bit, for each method with a twin of its own (slerp's angle
and LiNeS' α are float64 sums grouped differently: there, within float32 rounding)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from merge_ops.pipeline import run_merge
from merge_ops.recipe import load_recipe
from tests.utils.factories import load_all

#: case: (method, params, per-model weights, bit for bit); ``ties_global`` ranks the whole model (first passes)
CASES = {
    "ties": ("ties", {"density": 0.3}, (1.0, 0.6, 0.3), True),
    "ties_global": ("ties", {"density": 0.3}, None, True),
    "breadcrumbs": ("breadcrumbs", {"density": 0.3, "top_removed": 0.02}, None, True),
    "dare_ties": ("dare_ties", {"density": 0.5}, None, True),
    "compeft": ("compeft", {}, None, True),
    "della": ("della", {"density": 0.5, "epsilon": 0.1}, (1.0, 0.5, 0.25), True),
    "lines": ("lines", {}, (1.0, 0.6, 0.3), False),
    "slerp": ("slerp", {"t": 0.4}, None, False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_cpu_twins_merge_what_the_reference_merges(
    case: str, models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    method, params, weights, exact = CASES[case]
    inputs = ["a"] if method == "slerp" else ["a", "b", "c"]  # b is sharded
    entries = [
        {"source": str(models[m]), **({"weight": weights[i]} if weights else {})}
        for i, m in enumerate(inputs)
    ]

    def merged(out: Path) -> dict[str, torch.Tensor]:
        run_merge(
            load_recipe(
                {
                    "method": method,
                    "base": str(models["base"]),
                    "models": entries,
                    "params": params,
                    "output": {"path": str(out)},
                    **({"scope": "global"} if case.endswith("_global") else {}),
                }
            )
        )
        return load_all(out)

    twins = merged(tmp_path / "twins")
    monkeypatch.setenv("ALLOY_KERNELS", "torch")
    monkeypatch.setenv("ALLOY_JIT", "off")
    want = merged(tmp_path / "reference")
    assert twins.keys() == want.keys()
    for name, tensor in want.items():
        if exact or not tensor.is_floating_point():
            assert torch.equal(twins[name], tensor), name
        else:
            torch.testing.assert_close(twins[name], tensor, rtol=2e-6, atol=1e-6, msg=name)
