"""mergekit slices whose parameters differ between slices (``merge_ops.mergekit_slices``): parity with mergekit 0.1.5.

Each config is merged by mergekit in-process and by Alloy on the tiny float32 checkpoints of ``mergekit_harness``
(4 layers), and the outputs compared at 1e-6 relative on the merged delta. Slice-level parameters, per-source
parameters, gradients within each slice and filtered values all resolve in the slice that writes the tensor.
"""

from __future__ import annotations

import copy

import pytest

from merge_ops.errors import RecipeError
from merge_ops.recipe import load_recipe
from tests.merge_ops.mergekit_harness import compare, make_models, materialize, run_alloy, run_mergekit
from tests.utils.factories import load_all

pytest.importorskip("mergekit.merge")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_models(tmp_path_factory.mktemp("mergekit-slices-models"))


def _source(model, layers, **parameters):
    entry = {"model": f"tiny/{model}", "layer_range": list(layers)}
    if parameters:
        entry["parameters"] = parameters
    return entry


TIES_TWO_SLICES = {
    "merge_method": "ties",
    "base_model": "tiny/base",
    "dtype": "float32",
    "parameters": {"density": 0.6},
    "slices": [
        {
            "sources": [
                _source("base", (0, 2)),
                _source("ft1", (0, 2), weight=0.7, density=0.5),
                _source("ft2", (0, 2), weight=0.3, density=[0.2, 0.8]),
            ],
            "parameters": {"normalize": False},
        },
        {
            "sources": [
                _source("base", (2, 4)),
                _source("ft1", (2, 4), weight=[{"filter": "mlp", "value": 0.2}, {"value": 0.9}]),
                _source("ft2", (2, 4), weight=0.5),
            ],
            "parameters": {"density": 0.4, "lambda": 0.8},
        },
    ],
}

SLERP_THREE_SLICES = {
    "merge_method": "slerp",
    "base_model": "tiny/ft1",
    "dtype": "float32",
    "slices": [
        {
            "sources": [_source("ft1", (0, 1)), _source("ft2", (0, 1))],
            "parameters": {"t": [{"filter": "self_attn", "value": 0.1}, {"value": 0.3}]},
        },
        {"sources": [_source("ft1", (1, 3)), _source("ft2", (1, 3))], "parameters": {"t": [0.2, 0.9]}},
        {"sources": [_source("ft1", (3, 4)), _source("ft2", (3, 4))], "parameters": {"t": 0.6}},
    ],
}

# a frankenmerge-style stack: the layers come from other ranges, each slice scaled on its own
PASSTHROUGH_SCALED = {
    "merge_method": "passthrough",
    "dtype": "float32",
    "slices": [
        {"sources": [_source("ft1", (0, 2), scale=1.0)]},
        {
            "sources": [_source("ft1", (1, 3))],
            "parameters": {"scale": [{"filter": "o_proj", "value": 0.0}, {"value": 1.0}]},
        },
        {"sources": [_source("ft1", (3, 4), scale=0.5)]},
    ],
}

TASK_ARITHMETIC_TOP_FILTER = {
    "merge_method": "task_arithmetic",
    "base_model": "tiny/base",
    "dtype": "float32",
    "parameters": {"lambda": [{"filter": "mlp", "value": 0.5}, {"value": 1.0}], "weight": 0.4},
    "slices": [
        {"sources": [_source("base", (0, 2)), _source("ft1", (0, 2)), _source("ft2", (0, 2), weight=0.9)]},
        {
            "sources": [_source("base", (2, 4)), _source("ft1", (2, 4)), _source("ft2", (2, 4))],
            "parameters": {"weight": [0.1, 1.0]},
        },
    ],
}


@pytest.mark.parametrize(
    "config",
    [TIES_TWO_SLICES, SLERP_THREE_SLICES, PASSTHROUGH_SCALED, TASK_ARITHMETIC_TOP_FILTER],
    ids=["ties-two-slices", "slerp-three-slices", "passthrough-scaled", "task-arithmetic-top-filter"],
)
def test_slices_with_their_own_parameters_merge_as_mergekit(config, models, tmp_path):
    config = materialize(config, models)
    mergekit = run_mergekit(config, tmp_path / "mergekit")
    alloy, _ = run_alloy(config, tmp_path / "alloy")
    result = compare(alloy, mergekit, load_all(models["base"]))
    assert not result.missing, result.missing
    assert result.excess <= 1.0, result


def test_a_layer_numbered_per_model_filter_is_refused_when_slices_renumber(models):
    config = copy.deepcopy(PASSTHROUGH_SCALED)
    config["slices"][1]["sources"][0]["parameters"] = {
        "scale": [{"filter": "layers.1.", "value": 0.0}, {"value": 1.0}]
    }
    with pytest.raises(RecipeError) as info:
        load_recipe(materialize(config, models))
    errors = info.value.context["errors"]
    assert any(e["loc"] == ["slices", 1, "sources", 0, "parameters", "scale"] for e in errors), errors


# mergekit's per-slice base_model: θ_0 of its slice (here the last slice, so lm_head and the final norm too)
PER_SLICE_BASE = {
    "merge_method": "task_arithmetic",
    "base_model": "tiny/base",
    "dtype": "float32",
    "slices": [
        {
            "sources": [
                _source("base", (0, 2)),
                _source("ft1", (0, 2), weight=0.7),
                _source("ft2", (0, 2), weight=0.3),
            ]
        },
        {
            "sources": [
                _source("ft3", (2, 4)),
                _source("ft1", (2, 4), weight=0.5),
                _source("ft2", (2, 4), weight=0.6),
            ],
            "base_model": "tiny/ft3",
        },
    ],
}

# the first slice's own base: the embeddings' θ_0; ties' densities skip that slice's base
PER_SLICE_BASE_FIRST = {
    "merge_method": "ties",
    "base_model": "tiny/base",
    "dtype": "float32",
    "parameters": {"density": 0.5, "weight": 0.5},
    "slices": [
        {
            "sources": [_source("ft4", (0, 1)), _source("ft1", (0, 1)), _source("ft2", (0, 1))],
            "base_model": "tiny/ft4",
        },
        {"sources": [_source("base", (1, 4)), _source("ft1", (1, 4)), _source("ft2", (1, 4), weight=0.9)]},
    ],
}


@pytest.mark.parametrize("config", [PER_SLICE_BASE, PER_SLICE_BASE_FIRST], ids=["last-slice", "first-slice"])
def test_a_per_slice_base_model_is_that_slices_base(config, models, tmp_path):
    config = materialize(config, models)
    mergekit = run_mergekit(config, tmp_path / "mergekit")
    alloy, recipe = run_alloy(config, tmp_path / "alloy")
    assert recipe.base == str(models["base"])
    result = compare(alloy, mergekit, load_all(models["base"]))
    assert not result.missing, result.missing
    assert result.excess <= 1.0, result


def test_a_per_slice_base_model_without_a_top_level_one_is_refused(models):
    config = copy.deepcopy(PER_SLICE_BASE)
    del config["base_model"]
    with pytest.raises(RecipeError) as info:
        load_recipe(materialize(config, models))
    assert ["slices", 1, "base_model"] in [e["loc"] for e in info.value.context["errors"]]


# a slice-level filtered list with no catch-all entry: mergekit reads the top level for the tensors none of its
# filters matches (shared t of slerp, per-model weight of ties)
FALL_THROUGH = [
    {
        "merge_method": "slerp",
        "base_model": "tiny/ft1",
        "dtype": "float32",
        "parameters": {"t": [0.1, 0.9]},
        "slices": [
            {
                "sources": [_source("ft1", (0, 4)), _source("ft2", (0, 4))],
                "parameters": {"t": [{"filter": "self_attn", "value": 0.3}]},
            }
        ],
    },
    {
        "merge_method": "ties",
        "base_model": "tiny/base",
        "dtype": "float32",
        "parameters": {"weight": 0.3, "density": 0.5},
        "modules": {
            "default": {
                "parameters": {"weight": [{"filter": "mlp", "value": 0.8}]},
                "slices": [
                    {"sources": [_source("base", (0, 4)), _source("ft1", (0, 4)), _source("ft2", (0, 4))]}
                ],
            }
        },
    },
]


@pytest.mark.parametrize("config", FALL_THROUGH, ids=["slice-shared-t", "module-per-model-weight"])
def test_a_filtered_list_without_catch_all_falls_through_to_the_top_level(config, models, tmp_path):
    config = materialize(config, models)
    mergekit = run_mergekit(config, tmp_path / "mergekit")
    alloy, _ = run_alloy(config, tmp_path / "alloy")
    result = compare(alloy, mergekit, load_all(models["base"]))
    assert not result.missing, result.missing
    assert result.excess <= 1.0, result
