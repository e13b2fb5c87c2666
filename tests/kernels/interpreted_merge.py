"""Whole merges twice, ``ALLOY_KERNELS=torch`` and ``ALLOY_KERNELS=triton``, for ``test_triton_merge.py``.

Run as ``TRITON_INTERPRET=1 python -m tests.kernels.interpreted_merge WORKDIR``: the variable must be set before
triton is first imported (``@triton.jit`` picks the interpreter then), which a fresh process guarantees whatever
the pytest process imported before. It writes tiny llama-like models, merges every case of ``merge_cases()`` in
both modes into ``WORKDIR/out/<case>/<mode>``, ComPEFT-compresses and decompresses one task vector in both modes
into ``WORKDIR/artifacts/<mode>``, and writes ``WORKDIR/results.json``: per case and mode the report totals and
which implementation (``triton``/``torch``) served each kernel op dispatched. Nothing is compared here.

The model is as small as the interpreter needs to stay fast (one layer, hidden 8: each tensor still takes every
radix pass, tie split and grid-stride tail of the kernels), K = 3, one fine-tune sharded, one in bfloat16.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MODES = ("torch", "triton")
_MODELS = ("base", "a", "b", "c")


def merge_cases() -> dict[str, dict[str, Any]]:
    """Recipe fields per case (``{base}``/``{a}``... stand for the model folders): every registered method with
    its defaults, plus the scopes and seeds whose kernels differ (per-row and global selection, DARE's seeded
    masks, the composable stages). A method whose inputs are not ``base`` + ``models`` needs its own entry here;
    an unknown kind fails loudly, so a new method can't drop out of the comparison silently."""
    from merge_ops.params import CATALOG
    from merge_ops.registry import registered_names

    three = [
        {"source": "{a}", "weight": 0.9},
        {"source": "{b}", "weight": 0.6},
        {"source": "{c}", "weight": 1.2},
    ]
    cases: dict[str, dict[str, Any]] = {}
    for name in registered_names():
        info = CATALOG[name]
        if info.kind == "transfer":
            cases[name] = {
                "method": name,
                "source_base": "{base}",
                "source_finetuned": "{a}",
                "target_base": "{c}",
            }
        elif name == "greedy_soup":
            # the evaluator chooses the ingredients (a forward pass, no kernels); the tensors it writes are the
            # uniform linear merge of the chosen ones (merge_ops.greedy_soup), the `model_soup` case below
            continue
        elif name == "atlas":
            # training is a torch autograd loop on the evaluator's model (no kernels); with zero steps the written
            # tensors are θ_0 + λ·Σ τ through the same streaming merge
            cases[name] = {**_default_case(info, three), "params": {"steps": 0}}
        else:
            cases[name] = _default_case(info, three)
    # per-row selection launches one radix select per row: under the interpreter that costs seconds per
    # tensor, so this case merges two tensors (a matrix and a vector) and copies the rest from the base
    cases["ties-per_row"] = {
        "method": "ties",
        "base": "{base}",
        "models": three,
        "scope": "per_row",
        "filters": {"include": [r"layers\.0\.self_attn\.q_proj", r"^model\.norm"]},
    }
    cases["ties-global"] = {"method": "ties", "base": "{base}", "models": three, "scope": "global"}
    cases["dare_ties-seed"] = {
        "method": "dare_ties",
        "base": "{base}",
        "models": three,
        "params": {"density": 0.5},
        "seed": 7,
    }
    cases["stages-dare-sign-mean"] = {
        "method": "stages",
        "base": "{base}",
        "models": three,
        "params": {"sparsify": "dare", "consensus": "ties_sign", "aggregate": "mean", "density": 0.4},
        "seed": 3,
    }
    return cases


#: values for params a method requires (no default), by field name; a new required field fails the case loudly
REQUIRED_PARAMS: dict[str, Any] = {"t": 0.5}


def _default_case(info: Any, models: list[dict[str, Any]]) -> dict[str, Any]:
    """The method with its defaults on the base and up to three fine-tunes, within its input bounds (the base
    counts as an input; it is dropped only when the method takes no base and the bounds leave no room)."""
    k = max(min(len(models), info.max_models or len(models)), info.min_models)
    with_base = True
    while info.max_inputs is not None and k + with_base > info.max_inputs:
        if k > info.min_models:
            k -= 1
        elif with_base and not info.needs_base:
            with_base = False
        else:
            break  # no valid shape: load_recipe says why
    required: dict[str, Any] = {}
    for key, field in info.params.model_fields.items():
        if field.is_required():
            param = field.alias or key
            if param not in REQUIRED_PARAMS:
                raise KeyError(f"method {info.name!r} requires {param!r}: give it a value in REQUIRED_PARAMS")
            required[param] = REQUIRED_PARAMS[param]
    # a method that weighs no models refuses weights (they would be ignored)
    chosen = models[:k] if info.weighted else [{"source": m["source"]} for m in models[:k]]
    case: dict[str, Any] = {"method": info.name, "models": chosen}
    if with_base:
        case["base"] = "{base}"
    if required:
        case["params"] = required
    return case


def make_models(root: Path) -> dict[str, Path]:
    from tests.utils.factories import make_llama_like

    shape = {"layers": 1, "hidden": 8, "vocab": 16}
    base = make_llama_like(root / "base", seed=0, **shape)
    return {
        "base": base,
        "a": make_llama_like(root / "a", seed=1, perturb_from=base, **shape),
        "b": make_llama_like(root / "b", seed=2, perturb_from=base, sharded_max_bytes=1024, **shape),
        "c": make_llama_like(root / "c", seed=3, perturb_from=base, **shape),
    }


def fill_paths(value: Any, paths: dict[str, Path]) -> Any:
    if isinstance(value, str):
        for key in _MODELS:
            value = value.replace("{" + key + "}", str(paths[key]))
        return value
    if isinstance(value, list):
        return [fill_paths(v, paths) for v in value]
    if isinstance(value, dict):
        return {k: fill_paths(v, paths) for k, v in value.items()}
    return value


def _recording_dispatch(log: list[tuple[str, str]]) -> Callable[..., Any]:
    """``kernels.kernel`` wrapped to log which implementation served each op (the public ops look it up in the
    ``kernels`` namespace at every call)."""
    import kernels

    original = kernels.dispatch.kernel

    def kernel(op_name: str, *tensors: Any) -> Callable[..., Any]:
        fn = original(op_name, *tensors)
        log.append((op_name, "triton" if fn.__module__.startswith("kernels.triton") else "torch"))
        return fn

    kernels.kernel = kernel  # type: ignore[attr-defined]
    return original


def main(workdir: Path) -> None:
    from merge_ops.artifacts import compress_task_vector, decompress, extract_task_vector
    from merge_ops.pipeline import run_merge
    from merge_ops.recipe import load_recipe

    paths = make_models(workdir / "models")
    log: list[tuple[str, str]] = []
    _recording_dispatch(log)
    results: dict[str, Any] = {}
    for case, fields in merge_cases().items():
        results[case] = {}
        for mode in MODES:
            os.environ["ALLOY_KERNELS"] = mode
            log.clear()
            out = workdir / "out" / case / mode
            started = time.perf_counter()
            report = run_merge(load_recipe({**fill_paths(fields, paths), "output": {"path": str(out)}}))
            results[case][mode] = {
                "totals": {k: v for k, v in report.totals.items() if isinstance(v, int | float)},
                "ops": sorted(set(log)),
                "seconds": round(time.perf_counter() - started, 3),
            }
    tau = extract_task_vector(paths["base"], paths["b"], workdir / "tau")
    for mode in MODES:
        os.environ["ALLOY_KERNELS"] = mode
        log.clear()
        artifacts = workdir / "artifacts" / mode
        compressed = artifacts / "compressed"
        compress_task_vector(tau, compressed, density=0.3, scope="per_tensor")
        decompress(compressed, artifacts / "restored")
        results.setdefault("compress", {})[mode] = {"ops": sorted(set(log))}
    (workdir / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
