"""Recipe validation: every problem listed at once, before any file is read."""

from __future__ import annotations

import pytest

from merge_ops.errors import RecipeError
from merge_ops.params import CATALOG, Scope, TiesParams
from merge_ops.recipe import HubSource, load_recipe, parse_size, parse_source


def _errors(data: dict) -> dict[str, str]:
    with pytest.raises(RecipeError) as info:
        load_recipe(data)
    return {".".join(e["loc"]): e["msg"] for e in info.value.context["errors"]}


def test_valid_recipe_resolves_params_overrides_and_gradients() -> None:
    recipe = load_recipe(
        {
            "method": "ties",
            "base": "./base",
            "models": [{"source": "./a"}, {"source": "hf://org/b@v1", "weight": 0.5}],
            "params": {"density": [0.1, 0.5], "lambda": 0.8},
            "overrides": [{"filter": r"mlp", "params": {"density": 0.9}}],
            "output": {"path": "out", "shard_size": "2MB"},
        }
    )
    first = recipe.params_for("model.layers.0.self_attn.q_proj.weight", layer=0, num_layers=3)
    middle = recipe.params_for("model.layers.1.self_attn.q_proj.weight", layer=1, num_layers=3)
    assert isinstance(first, TiesParams)
    assert first.density == pytest.approx(0.1) and middle.density == pytest.approx(0.3)
    assert recipe.params_for("model.layers.1.mlp.up_proj.weight", layer=1, num_layers=3).density == 0.9
    assert first.lambda_ == 0.8
    assert recipe.output.shard_size == 2_000_000
    assert recipe.model_weights() == [1.0, 0.5]
    assert recipe.effective_scope() is Scope.per_tensor


def test_every_problem_is_listed_at_once() -> None:
    errors = _errors(
        {
            "method": "ties",
            "models": [{"source": "./a"}],
            "weights": [1.0, 2.0],
            "params": {"density": 1.5, "bogus": 1},
            "seed": -1,
        }
    )
    assert "base" in errors and "needs a base model" in errors["base"]
    assert "weights" in errors and "2 weights for 1 models" in errors["weights"]
    assert "params.density" in errors
    assert "params.bogus" in errors
    assert "seed" in errors


def test_unknown_method_names_the_known_ones() -> None:
    errors = _errors({"method": "frankenmerge", "base": "b", "models": [{"source": "a"}]})
    assert "unknown method 'frankenmerge'" in errors["method"]
    assert "ties" in errors["method"]


@pytest.mark.parametrize(
    ("params", "loc"),
    [
        ({"density": 0}, "params.density"),
        ({"density": 1.01}, "params.density"),
        ({"top_removed": 1.0}, "params.top_removed"),
        ({"lambda": 11}, "params.lambda"),
        ({"density": [0.5, 2.0]}, "params.density"),
        ({"density": []}, "params.density"),
    ],
)
def test_out_of_range_params_are_errors_not_clamps(params: dict, loc: str) -> None:
    errors = _errors({"method": "breadcrumbs", "base": "b", "models": [{"source": "a"}], "params": params})
    assert loc in errors


def test_breadcrumbs_fractions_must_fit() -> None:
    errors = _errors(
        {
            "method": "breadcrumbs",
            "base": "b",
            "models": [{"source": "a"}],
            "params": {"density": 0.6, "top_removed": 0.5},
        }
    )
    assert any("density + top_removed" in msg for msg in errors.values())


def test_transfer_needs_its_three_models() -> None:
    errors = _errors({"method": "transfer", "base": "b"})
    assert {"source_base", "source_finetuned", "target_base"} <= set(errors)


def test_unknown_fields_and_bad_regex_are_reported() -> None:
    errors = _errors(
        {"method": "linear", "models": [{"source": "a"}], "colour": "red", "filters": {"exclude": ["("]}}
    )
    assert "colour" in errors
    assert any(k.startswith("filters.exclude") for k in errors)


def test_hub_sources_parse() -> None:
    assert parse_source("hf://org/name@abc123") == HubSource(repo="org/name", revision="abc123")
    assert parse_source("hf://org/name/sub/dir") == HubSource(
        repo="org/name", revision="main", subfolder="sub/dir"
    )
    with pytest.raises(ValueError, match="malformed"):
        parse_source("hf://not a repo")


def test_yaml_text_and_sizes() -> None:
    recipe = load_recipe(
        "method: model_soup\nmodels:\n  - {source: a}\n  - {source: b}\noutput: {shard_size: 1GiB}\n"
    )
    assert recipe.output.shard_size == 2**30
    assert parse_size(4096) == 4096
    with pytest.raises(ValueError):
        parse_size("12 parsecs")


def test_invalid_yaml_is_a_recipe_error() -> None:
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe("method: [unclosed\n")


def test_digest_is_stable_and_sensitive() -> None:
    data = {"method": "task_arithmetic", "base": "b", "models": [{"source": "a"}]}
    assert load_recipe(data).digest() == load_recipe(dict(data)).digest()
    assert load_recipe(data).digest() != load_recipe({**data, "seed": 1}).digest()


def test_catalog_params_models_are_torch_free_and_have_schemas() -> None:
    for info in CATALOG.values():
        schema = info.params.model_json_schema()
        assert schema["additionalProperties"] is False, info.name
        required = {n: 0.5 for n, f in info.params.model_fields.items() if f.is_required()}  # slerp's t
        info.params.model_validate(required)  # every default is valid


def test_validation_does_not_import_torch() -> None:
    """The API process validates recipes and lists methods without torch (the slim API image has none)."""
    import subprocess
    import sys

    code = (
        "import sys; from merge_ops.recipe import load_recipe; import merge_ops.params;"
        "load_recipe({'merge_method': 'ties', 'base_model': 'b', 'models': [{'model': 'a', 'parameters': {'weight': 1}}]});"
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
