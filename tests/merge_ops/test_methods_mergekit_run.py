"""mergekit 0.1.5's own ``run_merge`` (in process) on mergekit-style configs of the new methods, against Alloy's
``run_merge`` on the native recipe that means the same: this checks mergekit's planner semantics the per-tensor
tests assume (the base listed in ``models`` for slerp/nearswap/arcee_fusion, the base merged as one more input by
karcher, per-model ``weight``/``scale``, top-level parameters as every model's default)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from merge_ops.pipeline import run_merge as alloy_run_merge
from merge_ops.recipe import load_recipe
from tests.utils.factories import load_all, make_llama_like

mk_merge = pytest.importorskip("mergekit.merge")
mk_config = pytest.importorskip("mergekit.config")
mk_options = pytest.importorskip("mergekit.options")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    base = make_llama_like(root / "base", seed=0)
    paths = {"base": base}
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        paths[name] = make_llama_like(root / name, seed=seed, perturb_from=base, scale=0.05)
    return {k: str(v) for k, v in paths.items()}


def m(name: str, **parameters: Any) -> dict[str, Any]:
    return {"model": name, **({"parameters": parameters} if parameters else {})}


#: case -> (mergekit config with model names, the Alloy recipe meaning the same)
CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "slerp": (
        {
            "merge_method": "slerp",
            "base_model": "base",
            "models": [m("base"), m("a")],
            "parameters": {"t": 0.3},
        },
        {"method": "slerp", "base": "base", "models": [{"source": "a"}], "params": {"t": 0.3}},
    ),
    "nuslerp": (
        {"merge_method": "nuslerp", "base_model": "base", "models": [m("a", weight=0.4), m("b", weight=0.6)]},
        {
            "method": "nuslerp",
            "base": "base",
            "models": [{"source": "a", "weight": 0.4}, {"source": "b", "weight": 0.6}],
        },
    ),
    "multislerp": (
        {
            "merge_method": "multislerp",
            "models": [m("a", weight=1.0), m("b", weight=0.5), m("c", weight=2.0)],
        },
        {
            "method": "multislerp",
            "models": [{"source": "a"}, {"source": "b", "weight": 0.5}, {"source": "c", "weight": 2.0}],
        },
    ),
    "karcher_with_base": (
        {"merge_method": "karcher", "base_model": "base", "models": [m("a"), m("b")]},
        {"method": "karcher", "base": "base", "models": [{"source": "a"}, {"source": "b"}]},
    ),
    "karcher": (
        {"merge_method": "karcher", "models": [m("a"), m("b"), m("c")], "parameters": {"max_iter": 4}},
        {
            "method": "karcher",
            "models": [{"source": "a"}, {"source": "b"}, {"source": "c"}],
            "params": {"max_iter": 4},
        },
    ),
    "nearswap": (
        {
            "merge_method": "nearswap",
            "base_model": "base",
            "models": [m("base"), m("a")],
            "parameters": {"t": 0.02},
        },
        {"method": "nearswap", "base": "base", "models": [{"source": "a"}], "params": {"t": 0.02}},
    ),
    "arcee_fusion": (
        {"merge_method": "arcee_fusion", "base_model": "base", "models": [m("base"), m("b")]},
        {"method": "arcee_fusion", "base": "base", "models": [{"source": "b"}]},
    ),
    "sce": (
        {
            "merge_method": "sce",
            "base_model": "base",
            "models": [m("a"), m("b"), m("c")],
            "parameters": {"select_topk": 0.3},
        },
        {
            "method": "sce",
            "base": "base",
            "models": [{"source": s} for s in "abc"],
            "params": {"select_topk": 0.3},
        },
    ),
    "ram": (
        {
            "merge_method": "ram",
            "base_model": "base",
            "models": [m("a"), m("b")],
            "parameters": {"epsilon": 0.02},
        },
        {
            "method": "ram",
            "base": "base",
            "models": [{"source": "a"}, {"source": "b"}],
            "params": {"epsilon": 0.02},
        },
    ),
    "ramplus_tl": (
        {
            "merge_method": "ramplus_tl",
            "base_model": "base",
            "models": [m("a"), m("b")],
            "parameters": {"epsilon": 0.02, "r": 0.4},
        },
        {
            "method": "ramplus_tl",
            "base": "base",
            "models": [{"source": "a"}, {"source": "b"}],
            "params": {"epsilon": 0.02, "r": 0.4},
        },
    ),
    "della_unpruned": (
        {
            "merge_method": "della",
            "base_model": "base",
            "models": [m("a", weight=1.0), m("b", weight=0.5)],
            "parameters": {"lambda": 0.8},
        },
        {
            "method": "della",
            "base": "base",
            "models": [{"source": "a"}, {"source": "b", "weight": 0.5}],
            "params": {"lambda": 0.8},
        },
    ),
    "della_linear_unpruned": (
        {
            "merge_method": "della_linear",
            "base_model": "base",
            "models": [m("a", weight=0.7), m("b", weight=0.3)],
        },
        {
            "method": "della_linear",
            "base": "base",
            "models": [{"source": "a", "weight": 0.7}, {"source": "b", "weight": 0.3}],
        },
    ),
    "passthrough": (
        {"merge_method": "passthrough", "models": [m("c", scale=0.5)]},
        {"method": "passthrough", "models": [{"source": "c"}], "params": {"scale": 0.5}},
    ),
}


def _resolve(value: Any, paths: dict[str, str]) -> Any:
    if isinstance(value, dict):
        return {
            k: paths[v] if k in {"model", "base_model", "source", "base"} else _resolve(v, paths)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_resolve(v, paths) for v in value]
    return value


@pytest.mark.parametrize("case", sorted(CASES))
def test_mergekit_run_merge_equals_alloy(case, models, tmp_path):
    mk_cfg, recipe = (_resolve(part, models) for part in CASES[case])
    mk_out = tmp_path / "mergekit"
    mk_merge.run_merge(
        mk_config.MergeConfiguration.model_validate({**mk_cfg, "dtype": "float32"}),
        str(mk_out),
        options=mk_options.MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True),
    )
    alloy_out = tmp_path / "alloy"
    alloy_run_merge(load_recipe({**recipe, "output": {"path": str(alloy_out)}}))
    want, got = load_all(mk_out), load_all(alloy_out)
    assert set(want) <= set(got)
    reference = load_all(Path(models["base"] if "base" in recipe else recipe["models"][0]["source"]))
    for name, tensor in want.items():
        if not tensor.is_floating_point():
            continue
        err = float((got[name].double() - tensor.double()).abs().max())
        delta = float((tensor.double() - reference[name].double()).abs().max())
        assert err <= 1e-6 * max(delta, 1e-3) + 1e-7 * float(tensor.abs().max()), (
            f"{name}: {err:.3g} vs Δ {delta:.3g}"
        )
    torch.testing.assert_close(
        got["model.embed_tokens.weight"], want["model.embed_tokens.weight"], rtol=1e-6, atol=1e-6
    )
