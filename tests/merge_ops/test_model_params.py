"""Per-model params in native recipes (``models[].params``): validation, per-tensor resolution, the merge."""

from __future__ import annotations

import json

import pytest
import torch

from merge_ops.errors import RecipeError
from merge_ops.pipeline import run_merge
from merge_ops.recipe import load_recipe
from tests.utils.factories import load_all, make_llama_like


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("model-params")
    base = make_llama_like(root / "base", layers=4, seed=0)
    return {
        "base": base,
        "a": make_llama_like(root / "a", layers=4, perturb_from=base, seed=1, scale=0.05),
        "b": make_llama_like(root / "b", layers=4, perturb_from=base, seed=2, scale=0.05),
    }


def _recipe(tiny, method, models, **extra):
    return {
        "method": method,
        "base": str(tiny["base"]),
        "models": [{"source": str(tiny[name]), **entry} for name, entry in models],
        **extra,
    }


@pytest.mark.parametrize(
    ("params", "loc", "text"),
    [
        ({"gamma": 0.1}, ["models", "0", "params", "gamma"], "takes no per-model 'gamma'"),
        ({"density": 1.5}, ["models", "0", "params", "density"], "less than or equal to 1"),
        ({"top_removed": [0.1, 0.95]}, ["models", "0", "params", "top_removed"], "density + top_removed"),
        ({"weight": [{"filter": "mlp", "value": 500}]}, ["models", "0", "params", "weight"], "[-100, 100]"),
    ],
)
def test_per_model_params_are_validated(tiny, params, loc, text):
    data = _recipe(tiny, "breadcrumbs", [("a", {"params": params}), ("b", {})])
    with pytest.raises(RecipeError) as info:
        load_recipe(data)
    matching = [e for e in info.value.context["errors"] if e["loc"] == loc]
    assert matching and text in matching[0]["msg"], info.value.context["errors"]


def test_per_model_params_need_a_local_scope(tiny):
    data = _recipe(tiny, "compeft", [("a", {"params": {"density": 0.3}}), ("b", {})])
    with pytest.raises(RecipeError) as info:
        load_recipe(data)
    assert ["models", "0", "params"] in [e["loc"] for e in info.value.context["errors"]]


def test_per_model_top_removed_is_each_models_own(tiny, tmp_path):
    """A sum-aggregated Breadcrumbs merge of two models is the sum of each model's own Breadcrumbs delta."""
    shared = {"params": {"density": 0.5, "top_removed": 0.0, "lambda": 1.0}}
    both = _recipe(
        tiny,
        "breadcrumbs",
        [("a", {"params": {"top_removed": 0.05}}), ("b", {"params": {"top_removed": 0.2}})],
        **shared,
    )
    merged = load_all(run_merge(load_recipe(both), output_dir=tmp_path / "both").output_path)
    parts = []
    for name, top in (("a", 0.05), ("b", 0.2)):
        one = _recipe(
            tiny, "breadcrumbs", [(name, {})], params={"density": 0.5, "top_removed": top, "lambda": 1.0}
        )
        parts.append(load_all(run_merge(load_recipe(one), output_dir=tmp_path / name).output_path))
    base = load_all(tiny["base"])
    for tensor, value in merged.items():
        if value.is_floating_point():
            want = parts[0][tensor] + parts[1][tensor] - base[tensor]
            torch.testing.assert_close(value, want, rtol=1e-6, atol=1e-6, msg=tensor)


def test_per_model_weight_gradient_spreads_over_the_layers(tiny, tmp_path):
    data = _recipe(tiny, "task_arithmetic", [("a", {"params": {"weight": [0.0, 1.0]}})], dtype="float16")
    report = run_merge(load_recipe(data), output_dir=tmp_path / "out")
    merged, base, a = load_all(report.output_path), load_all(tiny["base"]), load_all(tiny["a"])
    name = "model.layers.{}.mlp.up_proj.weight"
    torch.testing.assert_close(merged[name.format(0)], base[name.format(0)].half())
    torch.testing.assert_close(merged[name.format(3)], a[name.format(3)].half())
    mid = base[name.format(1)] + (a[name.format(1)] - base[name.format(1)]) / 3
    torch.testing.assert_close(merged[name.format(1)], mid.half())
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["torch_dtype"] == "float16"  # config.json states the written dtype


def _merged(tiny, tmp_path, name, method, models, **extra):
    recipe = load_recipe(_recipe(tiny, method, models, **extra))
    return load_all(run_merge(recipe, output_dir=tmp_path / name).output_path)


_LOCAL_DENSITY_CASES = [
    ("ties", {"params": {"density": 0.3}}),
    ("dare_ties", {"params": {"density": 0.3}}),
    ("dare_linear", {"params": {"density": 0.3, "rescale": "l1"}}),
    ("breadcrumbs", {"params": {"density": 0.3, "top_removed": 0.05, "lambda": 1.0}}),
    ("della", {"params": {"density": 0.4, "epsilon": 0.1}}),
    ("della_linear", {"params": {"density": 0.4, "epsilon": 0.1}}),
    ("ties", {}),  # no recipe-level density: the method's default (0.2)
]


@pytest.mark.parametrize(
    ("method", "extra", "where"),
    [
        *[(m, e, w) for m, e in _LOCAL_DENSITY_CASES for w in ("field", "params")],
        # per-model params need a local scope, so the global first pass sees the field only
        ("compeft", {"params": {"density": 0.3}, "scope": "global"}, "field"),
    ],
)
def test_a_model_without_its_own_density_gets_the_method_level_one(tiny, tmp_path, method, extra, where):
    """One model sets a density, the other does not: the other merges with the recipe's (or the method's
    default) density, as if it had set that itself (it used to get 0, keeping about one entry)."""
    default = extra.get("params", {}).get("density", 0.2)
    own = {"density": 0.6} if where == "field" else {"params": {"density": 0.6}}
    mixed = _merged(tiny, tmp_path, "mixed", method, [("a", own), ("b", {})], **extra)
    explicit = _merged(
        tiny, tmp_path, "explicit", method, [("a", {"density": 0.6}), ("b", {"density": default})], **extra
    )
    for tensor, value in mixed.items():
        torch.testing.assert_close(value, explicit[tensor], rtol=0, atol=0, msg=tensor)


def test_a_model_density_follows_a_filtered_method_level_density(tiny, tmp_path):
    """The method-level density of a tensor (an override by name) is the fallback of that tensor."""
    overrides = [{"filter": "mlp", "params": {"density": 0.7}}]
    mixed = _merged(
        tiny,
        tmp_path,
        "mixed",
        "ties",
        [("a", {"density": 0.5}), ("b", {})],
        params={"density": 0.3},
        overrides=overrides,
    )
    b_mlp = {"params": {"density": [{"filter": "mlp", "value": 0.7}, {"value": 0.3}]}}
    explicit = _merged(
        tiny,
        tmp_path,
        "explicit",
        "ties",
        [("a", {"density": 0.5}), ("b", b_mlp)],
        params={"density": 0.3},
        overrides=overrides,
    )
    for tensor, value in mixed.items():
        torch.testing.assert_close(value, explicit[tensor], rtol=0, atol=0, msg=tensor)


@pytest.mark.parametrize(
    ("method", "params", "entry", "loc", "text"),
    [
        (
            "slerp",
            {"t": 0.5},
            {"params": {"t": 0.9}},
            ["models", "0", "params", "t"],
            "'t' holds for all models",
        ),
        ("nearswap", {"t": 0.01}, {"params": {"t": 0.9}}, ["models", "0", "params", "t"], "holds for all"),
        ("ram", {}, {"params": {"epsilon": 0.1}}, ["models", "0", "params", "epsilon"], "holds for all"),
        (
            "ramplus_tl",
            {},
            {"params": {"epsilon": 0.1}},
            ["models", "0", "params", "epsilon"],
            "holds for all",
        ),
        (
            "sce",
            {},
            {"params": {"select_topk": 0.5}},
            ["models", "0", "params", "select_topk"],
            "holds for all",
        ),
        (
            "karcher",
            {},
            {"params": {"weight": 0.5}},
            ["models", "0", "params", "weight"],
            "no per-model params",
        ),
        ("model_stock", {}, {"weight": 0.5}, ["models", "0", "weight"], "does not weight its models"),
        ("sce", {}, {"weight": 2.0}, ["models", "0", "weight"], "does not weight its models"),
    ],
)
def test_a_value_the_method_would_ignore_is_refused(tiny, method, params, entry, loc, text):
    """Per-model values that the method never reads per model (mergekit's shared params) and weights of
    methods that weigh no models used to be accepted and ignored: a silent difference."""
    models = [("a", entry)] if method in ("slerp", "nearswap") else [("a", entry), ("b", {})]
    with pytest.raises(RecipeError) as info:
        load_recipe(_recipe(tiny, method, models, params=params))
    matching = [e for e in info.value.context["errors"] if e["loc"] == loc]
    assert matching and text in matching[0]["msg"], info.value.context["errors"]
