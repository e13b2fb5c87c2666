"""Sparse model soups end to end: the identity, the pattern check and the two mask rules, through ``run_merge``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from merge_ops.errors import IncompatibleModelsError
from merge_ops.pipeline import REPORT_NAME, run_merge
from merge_ops.recipe import load_recipe
from tests.utils.factories import load_all, make_checkpoint

SHAPES = {"layers.0.mlp.weight": (8, 6), "layers.0.attn.weight": (5, 7), "norm.weight": (6,)}


def pruned(
    seed: int, *, pattern_seed: int = 0, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Random weights with about half the entries zeroed by a pattern that depends only on ``pattern_seed``."""
    values = torch.Generator().manual_seed(seed)
    masks = torch.Generator().manual_seed(1000 + pattern_seed)
    out = {}
    for name, shape in SHAPES.items():
        weight = torch.randn(shape, generator=values)
        keep = torch.rand(shape, generator=masks) < 0.5
        out[name] = (weight * keep).to(dtype)
    return out


def soup(tmp_path: Path, models: list[dict[str, torch.Tensor]], **fields: Any) -> tuple[dict, dict]:
    sources = [make_checkpoint(tmp_path / f"m{i}", tensors) for i, tensors in enumerate(models)]
    out = tmp_path / "out"
    recipe = {
        "method": "sparse_soup",
        "models": [{"source": str(s)} for s in sources],
        "output": {"path": str(out)},
        **fields,
    }
    run_merge(load_recipe(recipe))
    return load_all(out), json.loads((out / REPORT_NAME).read_text())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_soup_of_identical_models_is_that_model(tmp_path: Path, dtype: torch.dtype) -> None:
    model = pruned(1, dtype=dtype)
    got, report = soup(tmp_path, [model, model, model])
    for name, tensor in model.items():
        assert got[name].dtype == dtype
        assert torch.equal(got[name], tensor), name
    zeros = sum(int((t == 0).sum()) for t in model.values())
    assert report["totals"]["sparsity"] == pytest.approx(
        zeros / sum(t.numel() for t in model.values()), abs=1e-6
    )


def test_shared_pattern_is_kept_and_the_values_are_the_weighted_mean(tmp_path: Path) -> None:
    models = [pruned(seed) for seed in (1, 2, 3)]
    weights = [1.0, 2.0, 0.5]
    sources = [make_checkpoint(tmp_path / f"m{i}", m) for i, m in enumerate(models)]
    out = tmp_path / "out"
    recipe = {
        "method": "sparse_soup",
        "models": [{"source": str(s), "weight": w} for s, w in zip(sources, weights, strict=True)],
        "output": {"path": str(out)},
    }
    run_merge(load_recipe(recipe))
    got = load_all(out)
    report = json.loads((out / REPORT_NAME).read_text())
    for name in SHAPES:
        want = sum(w * m[name].double() for w, m in zip(weights, models, strict=True)) / sum(weights)
        assert torch.equal(got[name] == 0, models[0][name] == 0), name
        torch.testing.assert_close(got[name].double(), want, rtol=1e-6, atol=1e-6)
    rows = {r["name"]: r for r in report["tensors"]}
    for name in SHAPES:
        assert rows[name]["sparsity"] == pytest.approx(float((models[0][name] == 0).float().mean()), abs=1e-6)


def test_different_patterns_are_refused_naming_the_first_tensor(tmp_path: Path) -> None:
    first, other = pruned(1), pruned(2, pattern_seed=7)
    other["layers.0.mlp.weight"] = first["layers.0.mlp.weight"] * 2  # same pattern in this one tensor
    order = [n for n in sorted(SHAPES) if n != "layers.0.mlp.weight"]
    with pytest.raises(IncompatibleModelsError) as caught:
        soup(tmp_path, [first, other])
    assert caught.value.context["tensor"] == order[0]
    assert "models[1]" in caught.value.detail and "params.mask" in caught.value.detail
    assert not (tmp_path / "out").exists()


def test_intersection_zeroes_where_any_model_is_zero_and_union_is_the_plain_mean(tmp_path: Path) -> None:
    models = [pruned(1), pruned(2, pattern_seed=3)]
    inter, inter_report = soup(tmp_path / "i", models, params={"mask": "intersection"})
    union, union_report = soup(tmp_path / "u", models, params={"mask": "union"})
    for name in SHAPES:
        a, b = models[0][name], models[1][name]
        mean = (a.double() + b.double()) / 2
        any_zero = (a == 0) | (b == 0)
        torch.testing.assert_close(union[name].double(), mean, rtol=1e-6, atol=1e-7)
        assert torch.equal(union[name] == 0, (a == 0) & (b == 0))
        assert torch.equal(inter[name] == 0, any_zero)
        torch.testing.assert_close(
            inter[name].double(), mean.masked_fill(any_zero, 0.0), rtol=1e-6, atol=1e-7
        )
    assert inter_report["totals"]["sparsity"] > union_report["totals"]["sparsity"]


def test_mask_is_validated_at_the_edge() -> None:
    with pytest.raises(Exception, match="mask"):
        load_recipe({"method": "sparse_soup", "models": [{"source": "./a"}], "params": {"mask": "xor"}})


def test_delta_sources_are_refused(tmp_path: Path) -> None:
    from merge_ops.artifacts import extract_task_vector

    first, second = (make_checkpoint(tmp_path / n, pruned(1)) for n in ("a", "b"))
    tv = extract_task_vector(first, second, tmp_path / "tv")
    recipe = {"method": "sparse_soup", "models": [{"source": str(first)}, {"source": str(tv)}]}
    with pytest.raises(IncompatibleModelsError, match="averages full weights"):
        run_merge(load_recipe({**recipe, "output": {"path": str(tmp_path / "out")}}))
