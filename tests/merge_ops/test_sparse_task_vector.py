"""Sparse task vectors: exact round trip against a whole-vector oracle, density 1 is the dense task vector (as a
file and as a merge source), the compression ratio, composition by task arithmetic, hostile files, the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from app.cli import main
from merge_ops.artifacts import extract_task_vector
from merge_ops.checkpoint import Checkpoint
from merge_ops.compressed import SPARSE_META_KEY as META_KEY
from merge_ops.compressed import SparseTaskVector
from merge_ops.errors import CorruptCheckpointError
from merge_ops.pipeline import run_merge
from merge_ops.recipe import load_recipe
from merge_ops.sources import open_source
from merge_ops.sparse_task_vector import extract_sparse_task_vector
from tests.utils.factories import load_all, make_checkpoint, make_llama_like


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    base = make_llama_like(root / "base", seed=0, dtype=torch.bfloat16)
    return {
        "base": base,
        "task": make_llama_like(root / "task", seed=1, perturb_from=base, scale=0.05),
        "lang": make_llama_like(root / "lang", seed=2, perturb_from=base, scale=0.05),
    }


def dense_taus(models: dict[str, Path], which: str) -> dict[str, torch.Tensor]:
    base, ft = load_all(models["base"]), load_all(models[which])
    return {n: ft[n].float() - base[n].float() for n in ft if ft[n].is_floating_point()}


def read_sparse(folder: Path) -> dict[str, torch.Tensor]:
    reader = SparseTaskVector(Checkpoint.open(folder))
    try:
        return {name: reader.load_tau(name) for name in reader.entries}
    finally:
        reader.close()


@pytest.mark.parametrize("density", [0.05, 0.3, 0.7])
def test_round_trip_is_exact_at_the_kept_positions(
    tmp_path: Path, models: dict[str, Path], density: float
) -> None:
    report = extract_sparse_task_vector(models["base"], models["task"], tmp_path / "s", density=density)
    got = read_sparse(tmp_path / "s")
    taus = dense_taus(models, "task")
    assert set(got) == set(taus)
    kept_total = 0
    for name, tau in taus.items():
        flat = tau.reshape(-1)
        k = max(1, math.floor(density * flat.numel()))
        keep = torch.zeros(flat.numel(), dtype=torch.bool)
        keep[torch.sort(-flat.abs(), stable=True).indices[:k]] = True  # ties by lowest flat index
        keep &= flat != 0
        want = torch.where(keep, flat, torch.zeros_like(flat)).reshape(tau.shape)
        assert torch.equal(got[name], want), name
        kept_total += int(keep.sum())
    assert report.kept == kept_total
    assert report.elements == sum(t.numel() for t in taus.values())


def test_density_one_is_the_dense_task_vector(tmp_path: Path, models: dict[str, Path]) -> None:
    sparse = tmp_path / "sparse"
    extract_sparse_task_vector(models["base"], models["task"], sparse, density=1.0)
    dense = extract_task_vector(models["base"], models["task"], tmp_path / "dense")
    want = load_all(dense)
    got = read_sparse(sparse)
    assert set(got) == set(want)
    for name, tau in want.items():
        assert torch.equal(got[name], tau), name
    # ... and as a merge source, for a method with selection (TIES) too
    for method in ("task_arithmetic", "ties"):
        outputs = {}
        for label, source in (("sparse", sparse), ("dense", dense), ("checkpoint", models["task"])):
            out = tmp_path / f"{method}-{label}"
            run_merge(
                load_recipe(
                    {
                        "method": method,
                        "base": str(models["base"]),
                        "models": [{"source": str(source)}],
                        "output": {"path": str(out)},
                    }
                )
            )
            outputs[label] = load_all(out)
        for name, tensor in outputs["dense"].items():
            assert torch.equal(outputs["sparse"][name], tensor), (method, name)
            assert torch.equal(outputs["checkpoint"][name], tensor), (method, name)


def test_compression_ratio_and_encodings(tmp_path: Path, models: dict[str, Path]) -> None:
    low = extract_sparse_task_vector(models["base"], models["task"], tmp_path / "low", density=0.01)
    high = extract_sparse_task_vector(models["base"], models["task"], tmp_path / "high", density=0.5)
    for report, folder in ((low, tmp_path / "low"), (high, tmp_path / "high")):
        ckpt = Checkpoint.open(folder)
        meta = json.loads(ckpt.metadata[META_KEY])
        ckpt.close()
        stored = sum(
            (e["kept"] * 4 if e["encoding"] == "indices" else (math.prod(e["shape"]) + 7) // 8)
            + 4 * e["kept"]
            for e in meta["tensors"].values()
        )
        assert report.sparse_bytes == stored
        assert report.ratio == pytest.approx(report.original_bytes / stored)
        assert report.ratio_vs_dense == pytest.approx(4 * report.elements / stored)
        assert report.file_bytes > stored  # plus the header
    encodings = lambda folder: {  # noqa: E731
        e["encoding"] for e in json.loads(Checkpoint.open(folder).metadata[META_KEY])["tensors"].values()
    }
    assert "indices" in encodings(tmp_path / "low")  # 1% of n as int32 beats n/8 bytes of mask
    assert encodings(tmp_path / "high") == {"mask"}  # half the entries: the bit mask is smaller
    # the fine-tune is bfloat16: half kept costs n/8 + 2n bytes, more than its 2n, but less than the dense 4n
    assert low.ratio > 1 > high.ratio
    assert high.ratio_vs_dense == pytest.approx(4 / (0.125 + 2), rel=0.05)


def test_composing_sparse_task_vectors_is_task_arithmetic_over_them(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    sources = {}
    for which in ("task", "lang"):
        sources[which] = tmp_path / which
        extract_sparse_task_vector(models["base"], models[which], sources[which], density=0.2)
    out = tmp_path / "out"
    run_merge(
        load_recipe(
            {
                "method": "task_arithmetic",
                "base": str(models["base"]),
                "models": [{"source": str(sources["task"])}, {"source": str(sources["lang"])}],
                "params": {"lambda": 1.0},
                "output": {"path": str(out)},
            }
        )
    )
    got, base = load_all(out), load_all(models["base"])
    taus = {which: read_sparse(sources[which]) for which in sources}
    for name, tensor in base.items():
        if not tensor.is_floating_point():
            assert torch.equal(got[name], tensor)
            continue
        want = (tensor.float() + (taus["task"][name] + taus["lang"][name])).to(tensor.dtype)
        torch.testing.assert_close(got[name], want, rtol=0, atol=0), name


def test_a_sparse_task_vector_opens_as_a_delta_source(tmp_path: Path, models: dict[str, Path]) -> None:
    extract_sparse_task_vector(models["base"], models["task"], tmp_path / "s", density=0.2)
    with open_source(tmp_path / "s") as source:
        assert source.kind == "sparse_task_vector" and source.is_delta
        assert source.infos["model.norm.weight"].dtype == "BF16"  # the fine-tune's dtype


def test_hostile_files_are_corrupt_checkpoints(tmp_path: Path, models: dict[str, Path]) -> None:
    folder = extract_sparse_task_vector(models["base"], models["task"], tmp_path / "s", density=0.01).path
    pieces = load_all(Path(folder))
    ckpt = Checkpoint.open(Path(folder))
    meta = dict(ckpt.metadata)
    ckpt.close()
    entries = json.loads(meta[META_KEY])
    name = next(n for n, e in entries["tensors"].items() if e["encoding"] == "indices" and e["kept"] > 1)
    bad_indices = dict(pieces)
    bad_indices[f"{name}::indices"] = pieces[f"{name}::indices"].flip(0).contiguous()
    make_checkpoint(tmp_path / "unsorted", bad_indices, metadata=meta)
    with pytest.raises(CorruptCheckpointError, match="strictly increasing"):
        read_sparse(tmp_path / "unsorted")
    entries["tensors"][name]["kept"] += 1
    make_checkpoint(tmp_path / "count", pieces, metadata={**meta, META_KEY: json.dumps(entries)})
    with pytest.raises(CorruptCheckpointError, match=name):
        read_sparse(tmp_path / "count")


def test_cli_extract_density(
    tmp_path: Path, models: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "s"
    assert (
        main(["extract", str(models["base"]), str(models["task"]), "--out", str(out), "--density", "0.1"])
        == 0
    )
    printed = capsys.readouterr().out
    assert "sparse task vector written" in printed and "ratio:" in printed
    assert (out / "model.safetensors").is_file()
    with pytest.raises(SystemExit):
        main(
            [
                "extract",
                str(models["base"]),
                str(models["task"]),
                "--out",
                str(tmp_path / "x"),
                "--density",
                "0",
            ]
        )
