"""Task-vector norms and cosines in the job report (issue 16): per tensor, per layer and for the whole model,
against a direct float64 torch computation on generated checkpoints, on the fused path (task arithmetic), the
generic one (TIES), in chunks smaller than a tensor, and for a LoRA source (its own delta)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from kernels import cpu_fused, reference
from merge_ops import task_vector_stats
from merge_ops.pipeline import run_merge
from merge_ops.recipe import load_recipe
from tests.utils.factories import load_all, make_llama_like, make_lora_adapter


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tv-models")
    base = make_llama_like(root / "base", seed=0, layers=3, dtype=torch.bfloat16)
    return {
        "base": base,
        "a": make_llama_like(root / "a", seed=1, perturb_from=base, dtype=torch.bfloat16),
        "b": make_llama_like(root / "b", seed=2, perturb_from=base, dtype=torch.bfloat16, scale=0.03),
        "c": make_llama_like(root / "c", seed=3, perturb_from=base, dtype=torch.bfloat16),
    }


def _report(out: Path, **fields: object) -> dict:
    run_merge(load_recipe({"output": {"path": str(out)}, **fields}))
    return json.loads((out / "alloy-report.json").read_text())


def _expected(task_vectors: dict[str, list[torch.Tensor]], names: list[str]) -> torch.Tensor:
    """G_ij = <τ_i, τ_j> over ``names``, the task vectors concatenated, in float64."""
    flat = torch.stack(
        [torch.cat([task_vectors[n][i].double().reshape(-1) for n in names]) for i in range(3)]
    )
    return flat @ flat.T


def _cosine(gram: torch.Tensor) -> torch.Tensor:
    norms = gram.diagonal().sqrt()
    return gram / torch.outer(norms, norms)


def _check(report: dict, task_vectors: dict[str, list[torch.Tensor]]) -> None:
    rows = {r["name"]: r for r in report["tensors"] if r["action"] == "merge"}
    assert set(rows) == set(task_vectors)
    for name, row in rows.items():
        torch.testing.assert_close(
            torch.tensor(row["task_vector_gram"], dtype=torch.float64),
            _expected(task_vectors, [name]),
            rtol=1e-5,
            atol=1e-12,
        )
    stats = report["totals"]["task_vectors"]
    whole = _expected(task_vectors, list(rows))
    torch.testing.assert_close(
        torch.tensor(stats["norms"], dtype=torch.float64), whole.diagonal().sqrt(), rtol=1e-5, atol=0
    )
    torch.testing.assert_close(
        torch.tensor(stats["cosine"], dtype=torch.float64), _cosine(whole), rtol=1e-5, atol=1e-6
    )
    layers = sorted({r["layer"] for r in rows.values() if r["layer"] is not None})
    assert [entry["layer"] for entry in stats["layers"]] == layers == [0, 1, 2]
    for entry in stats["layers"]:
        names = [n for n, r in rows.items() if r["layer"] == entry["layer"]]
        gram = _expected(
            task_vectors, names
        )  # the layer's tensors concatenated: exact, not a mean of cosines
        torch.testing.assert_close(
            torch.tensor(entry["norms"], dtype=torch.float64), gram.diagonal().sqrt(), rtol=1e-5, atol=0
        )
        torch.testing.assert_close(
            torch.tensor(entry["cosine"], dtype=torch.float64), _cosine(gram), rtol=1e-5, atol=1e-6
        )


def _full_task_vectors(models: dict[str, Path]) -> dict[str, list[torch.Tensor]]:
    base, fts = load_all(models["base"]), [load_all(models[k]) for k in "abc"]
    return {
        name: [ft[name].float() - t.float() for ft in fts]
        for name, t in base.items()
        if t.is_floating_point()
    }


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])  # the fused path and the generic one
@pytest.mark.parametrize("chunk", [None, 7])  # 7: many blocks / chunks per tensor, odd tails
@pytest.mark.parametrize("kernels_mode", ["auto", "torch"])  # the CPU twin's in-pass Gram and the reference's
def test_norms_and_cosines_match_torch(
    models: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    chunk: int | None,
    kernels_mode: str,
) -> None:
    if chunk is not None:
        monkeypatch.setattr(reference, "GRAM_CHUNK", chunk)
        monkeypatch.setattr(cpu_fused, "BLOCK", chunk)
    monkeypatch.setenv("ALLOY_KERNELS", kernels_mode)
    report = _report(
        tmp_path / "out",
        method=method,
        base=str(models["base"]),
        models=[{"source": str(models[k])} for k in "abc"],
    )
    _check(report, _full_task_vectors(models))


def test_a_lora_source_reports_its_own_delta_and_a_zero_vector_has_no_cosine(
    models: dict[str, Path], tmp_path: Path
) -> None:
    adapter = make_lora_adapter(
        tmp_path / "lora", base_dir=models["base"], r=2, alpha=4, dtype=torch.bfloat16
    )
    report = _report(
        tmp_path / "out",
        method="task_arithmetic",
        base=str(models["base"]),
        models=[{"source": str(models["a"])}, {"source": str(adapter)}, {"source": str(models["c"])}],
    )
    task_vectors = _full_task_vectors(models)
    lora = load_all(adapter)
    for name, taus in task_vectors.items():
        stem = name.removesuffix(".weight")
        a_key = f"base_model.model.{stem}.lora_A.weight"
        taus[1] = (
            2.0 * (lora[f"base_model.model.{stem}.lora_B.weight"].float() @ lora[a_key].float())
            if a_key in lora
            else torch.zeros_like(taus[0])
        )
    _check(report, task_vectors)
    # a tensor the adapter does not touch: model 2's task vector is zero there, so its cosines are None
    untouched = next(r for r in report["tensors"] if re.search(r"mlp\.up_proj", r["name"]))
    assert task_vector_stats.summarize(untouched["task_vector_gram"])["cosine"][0][1] is None
