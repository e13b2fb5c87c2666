"""mergekit YAML -> Alloy recipe: semantics, defaults, rejections, and (when mergekit is installed) parity."""

from __future__ import annotations

import dataclasses
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
    assert recipe["warnings"] == []
    load_recipe(config(method))  # the translation is a valid Alloy recipe


def test_linear_model_stock_and_fields():
    cfg = config("linear", dtype="bfloat16", tokenizer_source="base")
    del cfg["base_model"]
    recipe = translate_mergekit(cfg)
    assert recipe["method"] == "linear" and recipe["params"] == {"normalize": True}
    assert recipe["dtype"] == "bfloat16" and "base" not in recipe
    stock = translate_mergekit(config("model_stock", params={"filter_wise": True}))
    assert stock["params"] == {"filter_wise": True, "cosine_clamp": "mergekit"}
    assert stock["base"] == "hf://org/base"
    assert translate_mergekit(config("ties", params={"normalize": False}))["params"]["aggregate"] == "sum"


def test_linear_with_base_model_adds_it_as_an_input_like_mergekit():
    """mergekit gives linear no base: base_model is one more input, weighted by the top-level weight."""
    recipe = translate_mergekit(config("linear", params={"weight": 0.5}, models=[{"model": "org/a"}]))
    assert recipe["models"] == [
        {"source": "hf://org/a", "weight": 0.5},
        {"source": "hf://org/base", "weight": 0.5},
    ]
    with pytest.raises(RecipeError) as info:
        translate_mergekit(config("linear"))  # no weight for the base: mergekit fails too
    assert ["base_model", "parameters", "weight"] in [e["loc"] for e in info.value.context["errors"]]


def test_breadcrumbs_gamma_and_density():
    params = translate_mergekit(config("breadcrumbs", params={"density": 0.5, "gamma": 0.05}))["params"]
    assert (params["density"], params["top_removed"]) == (0.5, 0.05)
    clamped = translate_mergekit(config("breadcrumbs", params={"density": 0.98, "gamma": 0.05}))["params"]
    assert clamped["top_removed"] == pytest.approx(0.02)
    assert "gamma" not in clamped
    unpruned = translate_mergekit(config("breadcrumbs", params={"gamma": 0.05}))["params"]
    assert (unpruned["density"], unpruned["top_removed"]) == (1.0, 0.0)  # density 1: mergekit prunes nothing


def test_per_model_gamma_is_each_models_own():
    """The issue's silent wrong merge: gamma set per model must be that model's removed top."""
    models = [
        {"model": "org/a", "parameters": {"weight": 1.0, "density": 0.3, "gamma": 0.05}},
        {"model": "org/b", "parameters": {"weight": 1.0, "density": 0.4, "gamma": 0.02}},
    ]
    recipe = load_recipe(config("breadcrumbs", models=models))
    assert [m.density for m in recipe.models] == [0.3, 0.4]
    assert recipe.model_params_for("w") == ({"top_removed": 0.05}, {"top_removed": 0.02})
    same = translate_mergekit(
        config("breadcrumbs_ties", models=[{**m, "parameters": {**models[0]["parameters"]}} for m in models])
    )
    assert (same["params"]["density"], same["params"]["top_removed"]) == (0.3, 0.05)  # shared: method-level


def test_per_model_density_and_top_level_weight():
    models = [{"model": "org/a", "parameters": {"density": 0.3}}, {"model": "org/b"}]
    recipe = translate_mergekit(config("ties", params={"weight": 0.5, "density": 0.7}, models=models))
    assert recipe["models"] == [
        {"source": "hf://org/a", "weight": 0.5, "density": 0.3},
        {"source": "hf://org/b", "weight": 0.5, "density": 0.7},
    ]


def test_per_model_gradients_and_filters_resolve_per_tensor():
    models = [
        {
            "model": "org/a",
            "parameters": {"weight": [0.0, 1.0], "density": [{"filter": "mlp", "value": 0.2}]},
        },
        {"model": "org/b", "parameters": {"weight": [{"filter": "self_attn", "value": 0.7}, {"value": 0.1}]}},
    ]
    recipe = load_recipe(config("ties", params={"density": 0.9}, models=models))
    assert recipe.model_params_for("model.layers.2.mlp.up.weight", layer=2, num_layers=3) == (
        {"weight": 1.0, "density": 0.2},
        {"weight": 0.1},
    )
    assert recipe.models[1].density == 0.9
    assert recipe.model_params_for("model.layers.1.self_attn.q.weight", layer=1, num_layers=3) == (
        {"weight": 0.5, "density": 0.9},  # the model's filter matches nothing: the top-level density
        {"weight": 0.7},
    )


def test_model_references_in_mergekits_mapping_forms():
    models = [
        {"model": {"model": {"path": "org/a", "revision": "abc123"}}, "parameters": {"weight": 1}},
        {"model": "org/b@v2", "parameters": {"weight": 1}},
        {"model": {"model": {"path": "org/base"}}},
    ]
    recipe = translate_mergekit(config("task_arithmetic", models=models))
    assert [m["source"] for m in recipe["models"]] == ["hf://org/a@abc123", "hf://org/b@v2"]
    with pytest.raises(RecipeError) as info:
        translate_mergekit(config("ties", models=[{"model": {"model": "org/a", "lora": "org/l"}}]))
    assert ["models", 0, "model"] in [e["loc"] for e in info.value.context["errors"]]


def test_the_base_listed_in_models_is_dropped():
    models = [
        {"model": "org/base"},
        {"model": "org/a", "parameters": {"weight": 0.6}},
        {"model": "org/b", "parameters": {"weight": 0.4}},
    ]
    for method in ("task_arithmetic", "dare_ties", "model_stock"):
        recipe = translate_mergekit(config(method, models=models))
        assert [m["source"] for m in recipe["models"]] == ["hf://org/a", "hf://org/b"], method


def test_shared_filtered_and_gradient_params_become_overrides():
    cfg = config(
        "task_arithmetic",
        params={
            "lambda": [
                {"filter": "mlp", "value": [0.2, 0.8]},
                {"filter": "self_attn", "value": 0.3},
                {"value": 0.9},
            ]
        },
    )
    recipe = load_recipe(cfg)
    assert recipe.params_for("model.layers.0.mlp.up.weight", layer=0, num_layers=3).lambda_ == 0.2
    assert recipe.params_for("model.layers.2.mlp.up.weight", layer=2, num_layers=3).lambda_ == 0.8
    assert recipe.params_for("model.layers.1.self_attn.q.weight").lambda_ == 0.3
    assert recipe.params_for("model.norm.weight").lambda_ == 0.9


def test_filters_are_substrings_as_in_mergekit():
    """mergekit 0.1.5 matches ``filter in tensor_name``; glob characters are literal there."""
    models = [
        {"model": "org/a", "parameters": {"weight": [{"filter": "*mlp*", "value": 0.4}, {"value": 1.0}]}}
    ]
    recipe = load_recipe(config("task_arithmetic", models=models))
    assert recipe.model_params_for("x.mlp.w") == ({"weight": 1.0},)
    assert recipe.model_params_for("x.*mlp*.w") == ({"weight": 0.4},)


@pytest.mark.parametrize(
    ("cfg", "loc", "text"),
    [
        (config("ties", nomalize=True), ["nomalize"], "did you mean 'normalize'"),
        (config("ties", params={"lamda": 0.5}), ["parameters", "lamda"], "did you mean 'lambda'"),
        (config("ties", params={"normalize": 1.0}), ["parameters", "normalize"], "reads 1.0 as True"),
        (config("ties", params={"epsilon": 0.1}), ["parameters", "epsilon"], "ignores"),
        (config("ties", dpyte="float16"), ["dpyte"], "did you mean 'dtype'"),
        (
            config("ties", models=[{"model": "org/a", "parameters": {"weight": 1, "normalize": True}}]),
            ["models", 0, "parameters", "normalize"],
            "only from the top-level",
        ),
        (
            config("ties", models=[{"model": "org/a", "weight": 1, "parameters": {"weight": 1}}]),
            ["models", 0, "weight"],
            "ignores the model field",
        ),
        (config("task_arithmetic", params={"density": 0.5}), ["parameters", "density"], "no effect"),
    ],
)
def test_lenient_where_mergekit_is_lenient(cfg, loc, text):
    recipe = load_recipe(cfg)
    matching = [w for w in recipe.warnings if w.loc == loc]
    assert matching and text in matching[0].msg, recipe.warnings


def test_normalize_number_means_what_mergekit_reads():
    assert translate_mergekit(config("ties", params={"normalize": 0}))["params"]["aggregate"] == "sum"
    assert (
        translate_mergekit(config("task_arithmetic", params={"normalize": "yes"}))["params"]["aggregate"]
        == "mean"
    )


@pytest.mark.parametrize(
    ("cfg", "loc"),
    [
        (config("frankenmerge"), ["merge_method"]),
        (config("ties", slices=[{"sources": []}]), ["slices"]),
        (config("ties", slices=[{"sources": [], "residual_weight": 0.5}]), ["slices"]),
        (config("ties", tokenizer={"source": "base"}, tokenizer_source="base"), ["tokenizer"]),
        (config("ties", chat_template="chatml"), ["chat_template"]),
        (config("ties", params={"rescale": True}), ["parameters", "rescale"]),
        (config("ties", params={"normalize": 2}), ["parameters", "normalize"]),
        (config("ties", models=[{"model": "org/a"}]), ["models", 0, "parameters", "weight"]),
        (
            config(
                "ties", models=[{"model": "org/a", "parameters": {"weight": [{"filter": "mlp", "value": 1}]}}]
            ),
            ["models", 0, "parameters", "weight"],
        ),
        (config("ties", dtype="int8"), ["dtype"]),
        (
            {"merge_method": "ties", "models": [{"model": "org/a", "parameters": {"weight": 1}}]},
            ["base_model"],
        ),
        (config("model_stock", models=[{"model": "org/a"}]), ["models"]),
    ],
)
def test_rejections_name_the_field(cfg, loc):
    with pytest.raises(RecipeError) as info:
        translate_mergekit(cfg)
    assert loc in [e["loc"] for e in info.value.context["errors"]]


def test_messages_are_true():
    with pytest.raises(RecipeError) as info:
        translate_mergekit(config("ties", models=[{"model": "org/base"}, {"model": "org/a"}]))
    errors = info.value.context["errors"]
    assert [e["loc"] for e in errors] == [["models", 1, "parameters", "weight"]]  # not the base's
    assert "except the base" in errors[0]["msg"]
    cfg = config("ties", slices=[{"sources": [{"model": "org/a", "layer_range": [0, 2]}]}])
    del cfg["models"]
    with pytest.raises(RecipeError) as info:
        translate_mergekit(cfg)
    locs = [e["loc"] for e in info.value.context["errors"]]  # no "needs a models list", no models[] at all
    assert locs == [["slices", 0, "sources"]]  # mergekit: "Base input is not present in merge inputs"


def test_refusal_keeps_the_warnings():
    with pytest.raises(RecipeError) as info:
        translate_mergekit(config("ties", chat_template="chatml", nomalize=True))
    assert info.value.context["warnings"][0]["loc"] == ["nomalize"]


def test_load_recipe_accepts_mergekit_yaml_text():
    text = yaml.safe_dump(config("dare_ties", params={"density": 0.4, "lambda": 0.8}))
    recipe = load_recipe(text)
    assert recipe.method == "dare_ties"
    p = recipe.params_for("w")
    assert (p.density, p.lambda_, p.rescale, p.aggregate) == (0.4, 0.8, "l1", "sum")


def test_warnings_do_not_change_the_digest():
    plain = load_recipe(config("ties"))
    warned = load_recipe(config("ties", nomalize=True))
    assert warned.warnings and plain.digest() == warned.digest()


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
    cfg = config(method, params=dict(params), models=models)
    if method == "linear":
        del cfg["base_model"]  # mergekit's linear would take it as one more input
    recipe = load_recipe(cfg)
    p = recipe.params_for("w")
    registered = get_method(recipe.method)
    tv = torch.stack([t - reference for t in thetas])
    ctx = make_ctx(3, name="w", weights=weights, scope=Scope.per_tensor)
    if recipe.has_model_params():
        ctx = dataclasses.replace(ctx, model_params=recipe.model_params_for("w"))
    delta = registered.fn(tv, ctx, p)
    got = reference + getattr(p, "lambda_", 1.0) * delta
    torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=1e-6)
