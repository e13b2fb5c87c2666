"""mergekit YAML -> Alloy recipe: semantics, defaults, rejections, and (when mergekit is installed) parity."""

from __future__ import annotations

import zlib

import pytest
import torch
import yaml

from merge_ops.errors import RecipeError
from merge_ops.mergekit_compat import is_mergekit_config, translate_mergekit
from merge_ops.params import Scope
from merge_ops.recipe import load_recipe
from merge_ops.registry import get_method
from tests.merge_ops.test_methods import make_ctx


def config(method: str, *, params: dict | None = None, models: list | None = None, **extra) -> dict:
    models = models or [
        {"model": "org/a", "parameters": {"weight": 0.6}},
        {"model": "org/b", "parameters": {"weight": 0.4}},
    ]
    return {
        "merge_method": method,
        "base_model": "org/base",
        "models": models,
        "parameters": params or {},
        **extra,
    }


def test_detection():
    assert is_mergekit_config({"merge_method": "ties", "models": []})
    assert not is_mergekit_config({"method": "ties"})
    assert not is_mergekit_config(["merge_method"])


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("task_arithmetic", {"sparsify": "none", "consensus": "none", "aggregate": "sum", "lambda": 1.0}),
        ("ties", {"sparsify": "magnitude", "consensus": "ties_sign", "aggregate": "mean", "density": 1.0}),
        ("dare_linear", {"sparsify": "dare", "aggregate": "sum", "rescale": "l1", "density": 1.0}),
        ("dare_ties", {"sparsify": "dare", "consensus": "ties_sign", "aggregate": "sum", "rescale": "l1"}),
        (
            "breadcrumbs",
            {
                "sparsify": "breadcrumbs",
                "aggregate": "sum",
                "density": 1.0,
                "top_removed": 0.0,
                "lambda": 1.0,
            },
        ),
        ("breadcrumbs_ties", {"sparsify": "breadcrumbs", "consensus": "ties_sign", "aggregate": "sum"}),
    ],
)
def test_mergekit_defaults(method, expected):
    recipe = translate_mergekit(config(method))
    assert recipe["method"] == method
    assert expected.items() <= recipe["params"].items()
    assert recipe["models"] == [
        {"source": "hf://org/a", "weight": 0.6},
        {"source": "hf://org/b", "weight": 0.4},
    ]
    assert recipe["base"] == "hf://org/base"
    load_recipe(config(method))  # the translation is a valid Alloy recipe


def test_linear_model_stock_and_fields():
    recipe = translate_mergekit(config("linear", dtype="bfloat16", tokenizer_source="base"))
    assert recipe["method"] == "linear" and recipe["params"] == {"normalize": True}
    assert recipe["dtype"] == "bfloat16" and "base" not in recipe
    stock = translate_mergekit(config("model_stock", params={"filter_wise": True}))
    assert stock["params"] == {"filter_wise": True} and stock["base"] == "hf://org/base"
    assert translate_mergekit(config("ties", params={"normalize": False}))["params"]["aggregate"] == "sum"


def test_breadcrumbs_gamma_and_density():
    params = translate_mergekit(config("breadcrumbs", params={"density": 0.5, "gamma": 0.05}))["params"]
    assert (params["density"], params["top_removed"]) == (0.5, 0.05)
    clamped = translate_mergekit(config("breadcrumbs", params={"density": 0.98, "gamma": 0.05}))["params"]
    assert clamped["top_removed"] == pytest.approx(0.02)
    assert "gamma" not in clamped


def test_per_model_density_and_top_level_weight():
    models = [{"model": "org/a", "parameters": {"density": 0.3}}, {"model": "org/b"}]
    recipe = translate_mergekit(config("ties", params={"weight": 0.5, "density": 0.7}, models=models))
    assert recipe["models"] == [
        {"source": "hf://org/a", "weight": 0.5, "density": 0.3},
        {"source": "hf://org/b", "weight": 0.5, "density": 0.7},
    ]


def test_gradient_and_filtered_lists_become_overrides():
    cfg = config(
        "ties",
        params={
            "density": [
                {"filter": "mlp", "value": [0.2, 0.8]},
                {"filter": "self_attn", "value": 0.3},
                {"value": 0.9},
            ]
        },
    )
    recipe = load_recipe(cfg)
    assert recipe.params_for("model.layers.0.mlp.up.weight", layer=0, num_layers=3).density == 0.2
    assert recipe.params_for("model.layers.2.mlp.up.weight", layer=2, num_layers=3).density == 0.8
    assert recipe.params_for("model.layers.1.self_attn.q.weight").density == 0.3
    assert recipe.params_for("model.norm.weight").density == 0.9


def test_filtered_list_without_catch_all_uses_mergekit_default():
    recipe = load_recipe(config("ties", params={"density": [{"filter": "mlp", "value": 0.4}]}))
    assert recipe.params_for("x.mlp.w").density == 0.4
    assert recipe.params_for("x.attn.w").density == 1.0


def test_two_filtered_params_combine_exactly():
    cfg = config(
        "breadcrumbs",
        params={
            "density": [{"filter": "mlp", "value": 0.5}, {"value": 0.8}],
            "gamma": [{"filter": "layers.1.", "value": 0.1}, {"value": 0.01}],
        },
    )
    recipe = load_recipe(cfg)
    cases = {
        "layers.1.mlp.w": (0.5, 0.1),
        "layers.2.mlp.w": (0.5, 0.01),
        "layers.1.attn.w": (0.8, 0.1),
        "layers.2.attn.w": (0.8, 0.01),
    }
    for name, (density, top) in cases.items():
        p = recipe.params_for(name)
        assert (p.density, p.top_removed) == (density, pytest.approx(top)), name


@pytest.mark.parametrize(
    ("cfg", "loc"),
    [
        (config("slerp"), ["merge_method"]),
        (config("ties", slices=[]), ["slices"]),
        (config("ties", tokenizer_source="union", tokenizer={"source": "base"}), ["tokenizer"]),
        (config("ties", params={"epsilon": 0.1}), ["parameters", "epsilon"]),
        (config("ties", params={"rescale": True}), ["parameters", "rescale"]),
        (config("ties", slices=[{"sources": [], "residual_weight": 0.5}]), ["slices"]),
        (config("ties", models=[{"model": "org/a"}]), ["models", 0, "parameters", "weight"]),
        (
            config("ties", models=[{"model": "org/a", "parameters": {"weight": [0.1, 0.2]}}]),
            ["models", 0, "parameters", "weight"],
        ),
        (config("ties", dtype="int8"), ["dtype"]),
        (
            {"merge_method": "ties", "models": [{"model": "org/a", "parameters": {"weight": 1}}]},
            ["base_model"],
        ),
    ],
)
def test_rejections_name_the_field(cfg, loc):
    with pytest.raises(RecipeError) as info:
        translate_mergekit(cfg)
    assert loc in [e["loc"] for e in info.value.context["errors"]]


def test_load_recipe_accepts_mergekit_yaml_text():
    text = yaml.safe_dump(config("dare_ties", params={"density": 0.4, "lambda": 0.8}))
    recipe = load_recipe(text)
    assert recipe.method == "dare_ties"
    p = recipe.params_for("w")
    assert (p.density, p.lambda_, p.rescale, p.aggregate) == (0.4, 0.8, "l1", "sum")


# -- parity with mergekit itself (optional test extra) -----------------------------------------------------------
PARITY = [
    ("task_arithmetic", {"lambda": 0.7}),
    ("task_arithmetic", {"normalize": True}),
    ("linear", {}),
    ("linear", {"normalize": False}),
    ("ties", {"density": 0.3}),
    ("ties", {"density": 0.5, "normalize": False, "lambda": 1.3}),
    ("breadcrumbs", {"density": 0.4, "gamma": 0.05}),
    ("breadcrumbs", {"density": 0.2, "gamma": 0.001}),  # ⌊gamma·n⌋ = 0 on the small tensors
    ("breadcrumbs_ties", {"density": 0.3, "gamma": 0.02}),
    ("breadcrumbs_ties", {"density": 0.3, "gamma": 0.02, "normalize": True}),
]


@pytest.mark.parametrize(("method", "params"), PARITY)
@pytest.mark.parametrize("shape", [(64,), (48, 40), (3, 7, 11)])
def test_parity_with_mergekit(method, params, shape):
    api = pytest.importorskip("mergekit.merge_methods.api")
    g = torch.Generator().manual_seed(zlib.crc32(repr((method, params, shape)).encode()))
    base = torch.randn(shape, generator=g)
    thetas = [base + 0.1 * torch.randn(shape, generator=g) for _ in range(3)]
    weights = [0.5, 1.0, -0.3] if method != "linear" else [0.5, 1.0, 0.3]
    ids = ["base", "m0", "m1", "m2"]
    mk_params = {**params, "weight": dict(zip(ids[1:], weights, strict=True))}
    if "density" in params:
        mk_params["density"] = {i: params["density"] for i in ids[1:]}
    if "gamma" in params:
        mk_params["gamma"] = {i: params["gamma"] for i in ids[1:]}
    if method == "linear":
        # mergekit's linear is Σ w θ [/ Σ w] on the weights themselves: compare against a zero reference
        want = api.merge_tensors(thetas, method, parameters=mk_params, ids=ids[1:])
        reference = torch.zeros(shape)
    else:
        want = api.merge_tensors([base, *thetas], method, parameters=mk_params, ids=ids, base_index=0)
        reference = base

    models = [{"model": f"org/m{i}", "parameters": {"weight": w}} for i, w in enumerate(weights)]
    recipe = load_recipe(config(method, params=dict(params), models=models))
    p = recipe.params_for("w")
    registered = get_method(recipe.method)
    tv = torch.stack([t - reference for t in thetas])
    delta = registered.fn(tv, make_ctx(3, name="w", weights=weights, scope=Scope.per_tensor), p)
    got = reference + getattr(p, "lambda_", 1.0) * delta
    torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=1e-6)
