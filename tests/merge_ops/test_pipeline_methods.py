"""The new methods end to end: a recipe through ``run_merge`` on tiny float32 checkpoints, every merged tensor
against mergekit 0.1.5's per-tensor function on the same inputs; and the recipe rules of their input contracts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from merge_ops.errors import RecipeError
from merge_ops.pipeline import run_merge
from merge_ops.recipe import load_recipe
from tests.utils.factories import load_all, make_llama_like

mk_api = pytest.importorskip("mergekit.merge_methods.api")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    base = make_llama_like(root / "base", seed=0)
    return {
        "base": base,
        **{
            name: make_llama_like(root / name, seed=seed, perturb_from=base, scale=0.05)
            for name, seed in (("a", 1), ("b", 2), ("c", 3))
        },
    }


def merged(tmp_path: Path, **fields: Any) -> dict[str, torch.Tensor]:
    out = tmp_path / "out"
    run_merge(load_recipe({"output": {"path": str(out)}, **fields}))
    return load_all(out)


def mergekit_per_tensor(
    method: str, paths: list[Path], *, base: Path | None, parameters: dict[str, Any]
) -> dict[str, torch.Tensor]:
    inputs = [load_all(p) for p in paths] + ([load_all(base)] if base is not None else [])
    out = {}
    for name, tensor in inputs[0].items():
        if not tensor.is_floating_point():
            out[name] = tensor
            continue
        out[name] = mk_api.merge_tensors(
            [m[name] for m in inputs],
            method,
            parameters=parameters,
            base_index=len(paths) if base is not None else None,
            name=name,
        )
    return out


def assert_all_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name, tensor in want.items():
        if not tensor.is_floating_point():
            assert torch.equal(got[name], tensor), name
            continue
        scale = max(float(tensor.abs().max()), 1e-6)
        err = float((got[name].double() - tensor.double()).abs().max())
        assert err <= 2e-6 * scale, f"{name}: max |Δ| {err:.3g}"


CASES = {
    "slerp": ({"base": "base", "models": ["a"]}, {"t": 0.35}, {"t": 0.35}),
    "slerp_no_base": ({"models": ["base", "a"]}, {"t": 0.7}, {"t": 0.7}),
    "nuslerp": ({"base": "base", "models": ["a", "b"], "weights": [0.3, 0.7]}, {}, {"weight": [0.3, 0.7]}),
    "nuslerp_no_base": (
        {"models": ["a", "b"], "weights": [1.0, 2.0]},
        {"nuslerp_flatten": False},
        {"weight": [1.0, 2.0], "nuslerp_flatten": False},
    ),
    "multislerp": ({"base": "base", "models": ["a", "b", "c"]}, {}, {"weight": [1.0, 1.0, 1.0]}),
    "karcher": ({"base": "base", "models": ["a", "b"]}, {"max_iter": 5}, {"max_iter": 5}),
    "karcher_no_base": ({"models": ["a", "b", "c"]}, {}, {}),
    "nearswap": ({"base": "base", "models": ["a"]}, {"t": 0.02}, {"t": 0.02}),
    "sce": ({"base": "base", "models": ["a", "b", "c"]}, {"select_topk": 0.4}, {"select_topk": 0.4}),
    "ram": ({"base": "base", "models": ["a", "b"]}, {"epsilon": 0.03}, {"epsilon": 0.03}),
    "ramplus_tl": (
        {"base": "base", "models": ["a", "b"]},
        {"epsilon": 0.03, "r": 0.5},
        {"epsilon": 0.03, "r": 0.5},
    ),
    "arcee_fusion": ({"base": "base", "models": ["b"]}, {}, {}),
    "passthrough": ({"models": ["c"]}, {"scale": 0.5}, {"scale": 0.5}),
    "della": (
        {"base": "base", "models": ["a", "b"], "weights": [1.0, 0.5]},
        {"density": 1.0},  # no pruning: the deterministic part, exactly
        {"weight": [1.0, 0.5], "density": 1.0, "lambda": 1.0},
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_run_merge_equals_mergekit_per_tensor(case, models, tmp_path):
    layout, params, mk_params = CASES[case]
    method = case.removesuffix("_no_base")
    weights = layout.get("weights")
    recipe_models = [
        {"source": str(models[m]), **({"weight": weights[i]} if weights else {})}
        for i, m in enumerate(layout["models"])
    ]
    base = models[layout["base"]] if "base" in layout else None
    got = merged(
        tmp_path,
        method=method,
        models=recipe_models,
        params=params,
        **({"base": str(base)} if base is not None else {}),
    )
    if case == "slerp_no_base":  # mergekit's slerp needs a base: the first model is it
        want = mergekit_per_tensor("slerp", [models["a"]], base=models["base"], parameters=mk_params)
    else:
        want = mergekit_per_tensor(
            method, [models[m] for m in layout["models"]], base=base, parameters=mk_params
        )
    assert_all_close(got, want)


def test_della_pruning_end_to_end_is_seeded(models, tmp_path):
    fields = {
        "method": "della_linear",
        "base": str(models["base"]),
        "models": [{"source": str(models["a"])}, {"source": str(models["b"])}],
        "params": {"density": 0.4, "epsilon": 0.1},
        "seed": 5,
    }
    first = merged(tmp_path / "1", **fields)
    second = merged(tmp_path / "2", **fields)
    assert all(torch.equal(first[n], second[n]) for n in first)
    base = load_all(models["base"])
    name = "model.layers.0.mlp.up_proj.weight"
    delta = first[name] - base[name]
    assert 0.5 < float((delta != 0).float().mean()) < 0.8  # 1 − (1 − 0.4)² = 0.64 expected


def test_della_per_model_density_field_and_recipe_default(models, tmp_path):
    """A model without its own ``density`` uses the recipe's; one with it uses its own (1: unpruned)."""
    fields = {
        "method": "della_linear",
        "base": str(models["base"]),
        "models": [{"source": str(models["a"]), "density": 1.0}, {"source": str(models["b"])}],
        "params": {"density": 0.4, "epsilon": 0.1},
    }
    out = merged(tmp_path, **fields)
    base, a, b = (load_all(models[k]) for k in ("base", "a", "b"))
    name = "model.layers.1.self_attn.q_proj.weight"
    kept_b = (out[name] - base[name] - (a[name] - base[name])).abs() > 1e-7
    assert 0.3 < float(kept_b.float().mean()) < 0.5  # b pruned at density 0.4, a kept whole


@pytest.mark.parametrize(
    ("fields", "loc", "message"),
    [
        (
            {
                "method": "slerp",
                "base": "b",
                "models": [{"source": "x"}, {"source": "y"}],
                "params": {"t": 0.5},
            },
            "models",
            "exactly 2 input",
        ),
        ({"method": "slerp", "models": [{"source": "x"}], "params": {"t": 0.5}}, "models", "exactly 2 input"),
        ({"method": "slerp", "base": "b", "models": [{"source": "x"}]}, "params.t", "required"),
        ({"method": "nearswap", "models": [{"source": "x"}], "params": {"t": 0.1}}, "base", "needs a base"),
        (
            {
                "method": "nearswap",
                "base": "b",
                "models": [{"source": "x"}, {"source": "y"}],
                "params": {"t": 0.1},
            },
            "models",
            "at most 1",
        ),
        ({"method": "nuslerp", "models": [{"source": "x"}]}, "models", "at least 2"),
        ({"method": "passthrough", "base": "b", "models": [{"source": "x"}]}, "models", "exactly 1 input"),
        ({"method": "karcher", "models": [{"source": "x"}], "lines": {"beta": 0.5}}, "lines", "LiNeS"),
        (
            {"method": "della", "base": "b", "models": [{"source": "x"}], "params": {"density": 0.1}},
            "params",
            "epsilon",
        ),
        (
            {"method": "arcee_fusion", "base": "b", "models": [{"source": "x"}], "params": {"t": 1}},
            "params.t",
            "",
        ),
    ],
)
def test_recipe_rules_name_the_field(fields, loc, message):
    with pytest.raises(RecipeError) as info:
        load_recipe({"output": {"path": "/tmp/never"}, **fields})
    errors = info.value.context["errors"]
    assert any(".".join(map(str, e["loc"])).startswith(loc) and message in e["msg"] for e in errors), errors
