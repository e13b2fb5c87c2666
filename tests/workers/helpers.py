"""Models, recipes and the output oracle shared by the worker tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from tests.utils.factories import load_all, make_llama_like


def make_models(
    root: Path, *, hidden: int = 16, layers: int = 2, vocab: int = 32, k: int = 2
) -> tuple[Path, list[Path]]:
    base = make_llama_like(root / "base", hidden=hidden, layers=layers, vocab=vocab)
    finetunes = [make_llama_like(root / f"ft{i}", perturb_from=base, seed=i + 1) for i in range(k)]
    return base, finetunes


def task_arithmetic_recipe(
    base: Path,
    finetunes: list[Path],
    output: Path | None,
    *,
    lam: float = 0.5,
    weights: list[float] | None = None,
) -> dict[str, Any]:
    weights = weights or [1.0] * len(finetunes)
    recipe: dict[str, Any] = {
        "method": "task_arithmetic",
        "base": str(base),
        "models": [{"source": str(f), "weight": w} for f, w in zip(finetunes, weights, strict=True)],
        "params": {"lambda": lam},
    }
    if output is not None:
        recipe["output"] = {"path": str(output)}
    return recipe


def expected_task_arithmetic(
    base: Path, finetunes: list[Path], *, lam: float, weights: list[float]
) -> dict[str, torch.Tensor]:
    """θ_0 + λ Σ w_t (θ_t − θ_0) for float tensors (in float32, cast to the base dtype); others copied."""
    base_t = load_all(base)
    tuned = [load_all(f) for f in finetunes]
    out: dict[str, torch.Tensor] = {}
    for name, b in base_t.items():
        if not b.is_floating_point():
            out[name] = b
            continue
        delta = sum(w * (t[name].float() - b.float()) for w, t in zip(weights, tuned, strict=True))
        out[name] = (b.float() + lam * delta).to(b.dtype)
    return out


def load_output(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def long_recipe(
    base: Path,
    finetunes: list[Path],
    output: Path | None,
    *,
    lam: float = 0.5,
    weights: list[float] | None = None,
) -> dict[str, Any]:
    """The task-arithmetic model, computed through the generic [K, *S] path: magnitude sparsify at density 1 is
    the identity but runs an exact top-k over every element. Real work, seconds on 2 cores, so tests can cancel
    or kill a worker mid-merge (the fused task-arithmetic path finishes the same model in a fraction of that)."""
    recipe = task_arithmetic_recipe(base, finetunes, output, lam=lam, weights=weights)
    recipe.update(method="stages", params={"lambda": lam, "sparsify": "magnitude", "density": 1.0})
    return recipe


def assert_output_matches(folder: Path, expected: dict[str, torch.Tensor]) -> None:
    got = load_output(folder)
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype, name
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def stray_files(data_dir: Path) -> list[Path]:
    """Scratch folders or temp files left anywhere under the data dir."""
    return [p for p in data_dir.rglob("*") if ".alloy-tmp-" in p.name or ".alloy-scratch" in p.name]
