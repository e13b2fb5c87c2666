"""open_source: kinds told apart from files and headers; each kind's task vector."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from merge_ops.artifacts import compress_task_vector, extract_task_vector
from merge_ops.errors import IncompatibleModelsError, SourceNotFoundError, UnsafeCheckpointError
from merge_ops.sources import open_source
from tests.utils.factories import load_all, make_checkpoint, make_llama_like, make_lora_adapter


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    base = make_llama_like(tmp_path / "base")
    return {
        "base": base,
        "ft": make_llama_like(tmp_path / "ft", perturb_from=base, seed=1, sharded_max_bytes=3000),
        "lora": make_lora_adapter(tmp_path / "lora", base_dir=base, r=2, alpha=4),
    }


def test_checkpoint_source(models: dict[str, Path]) -> None:
    base, ft = load_all(models["base"]), load_all(models["ft"])
    with open_source(models["ft"]) as src:
        assert (src.kind, src.is_delta, src.sparse_coverage) == ("checkpoint", False, False)
        assert src.label == str(models["ft"])
        assert set(src.infos) == set(ft)
        name = "model.layers.0.mlp.up_proj.weight"
        assert torch.equal(src.load(name), ft[name])
        torch.testing.assert_close(src.task_vector(name, base[name]), ft[name] - base[name], rtol=0, atol=0)
        with pytest.raises(IncompatibleModelsError, match="shape"):
            src.task_vector(name, base[name][:3])


def test_lora_source_is_sparse(models: dict[str, Path]) -> None:
    base = load_all(models["base"])
    with open_source(models["lora"]) as src:
        assert (src.kind, src.is_delta, src.sparse_coverage) == ("lora", True, True)
        q = "model.layers.0.self_attn.q_proj.weight"
        assert q in src.infos and src.infos[q].shape == tuple(base[q].shape)
        assert src.task_vector(q, base[q]).abs().sum() > 0
        untouched = "model.layers.0.mlp.up_proj.weight"
        assert untouched not in src.infos
        assert torch.equal(src.task_vector(untouched, base[untouched]), torch.zeros_like(base[untouched]))
        with pytest.raises(IncompatibleModelsError):
            src.load(q)


def test_task_vector_and_compressed_sources(tmp_path: Path, models: dict[str, Path]) -> None:
    base, ft = load_all(models["base"]), load_all(models["ft"])
    tv = extract_task_vector(models["base"], models["ft"], tmp_path / "tv")
    packed = tmp_path / "c"
    compress_task_vector(tv, packed, density=0.5, alpha=1.0, scope="per_tensor")
    name = "model.layers.1.self_attn.o_proj.weight"
    with open_source(tv) as src:
        assert (src.kind, src.is_delta, src.sparse_coverage) == ("task_vector", True, False)
        assert "model.position_ids" not in src.infos  # task vectors hold floating tensors only
        assert torch.equal(src.task_vector(name, base[name]), ft[name].float() - base[name].float())
    with open_source(packed) as src:
        assert (src.kind, src.is_delta, src.sparse_coverage) == ("compressed_task_vector", True, False)
        assert src.infos[name].shape == tuple(base[name].shape)
        tau = src.task_vector(name, base[name])
        assert tau.shape == base[name].shape
        assert len(tau.abs().unique()) == 2  # {0, α·σ}
        with pytest.raises(IncompatibleModelsError, match="shape"):
            src.task_vector(name, base[name].t()[:2])


def test_compressed_lora_keeps_sparse_coverage(tmp_path: Path, models: dict[str, Path]) -> None:
    compress_task_vector(models["lora"], tmp_path / "c", density=0.25, base=models["base"])
    base = load_all(models["base"])
    with open_source(tmp_path / "c") as src:
        assert src.sparse_coverage
        name = "model.norm.weight"
        assert torch.equal(src.task_vector(name, base[name]), torch.zeros_like(base[name]))


def test_single_file_source_and_errors(tmp_path: Path) -> None:
    folder = make_checkpoint(tmp_path / "m", {"w": torch.ones(2)})
    with open_source(folder / "model.safetensors") as src:
        assert src.kind == "checkpoint"
    with pytest.raises(SourceNotFoundError):
        open_source(tmp_path / "missing")
    torch.save({"w": torch.ones(2)}, tmp_path / "w.bin")
    with pytest.raises(UnsafeCheckpointError):
        open_source(tmp_path / "w.bin")
    with open_source(tmp_path / "w.bin", allow_pickle=True) as src:
        assert torch.equal(src.load("w"), torch.ones(2))
    odd = make_checkpoint(tmp_path / "odd", {"w": torch.ones(2)}, metadata={"alloy_format": "mystery"})
    with pytest.raises(IncompatibleModelsError, match="mystery"):
        open_source(odd)
