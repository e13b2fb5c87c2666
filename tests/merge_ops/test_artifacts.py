"""Task-vector artifacts: extraction, ComPEFT compression against a whole-vector float64 oracle, exact
decompression, the reported ratio, and hostile compressed files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from merge_ops.artifacts import compress_task_vector, decompress, extract_task_vector
from merge_ops.checkpoint import Checkpoint, read_safetensors_header
from merge_ops.compressed import COMPRESSION_KEY, CompressedTaskVector
from merge_ops.errors import (
    CorruptCheckpointError,
    IncompatibleModelsError,
    NonFiniteTensorError,
    OutputError,
)
from merge_ops.global_stats import compute_global_stats
from merge_ops.params import CompeftParams, Scope
from merge_ops.registry import get_method
from merge_ops.sources import open_source
from tests.merge_ops.test_methods import make_ctx
from tests.utils.factories import load_all, make_checkpoint, make_llama_like, make_lora_adapter

TV_META = {"alloy_format": "task_vector"}


def make_tv(folder: Path, taus: dict[str, torch.Tensor]) -> Path:
    return make_checkpoint(folder, taus, metadata=TV_META)


def oracle(taus: dict[str, torch.Tensor], *, density: float, alpha: float, scope: str):
    """ComPEFT straight from the spec on the whole vector at once: (kept mask per tensor, scale per tensor
    as float64 [rows]). Stable sort = ties by lowest flat index, in sorted-name order for global."""
    names = sorted(taus)
    if scope == "global":
        flat = torch.cat([taus[n].reshape(-1).double() for n in names])
        k = max(1, math.floor(density * flat.numel()))
        keep = torch.zeros(flat.numel(), dtype=torch.bool)
        keep[torch.sort(-flat.abs(), stable=True).indices[:k]] = True
        sigma = flat.std()
        out, start = {}, 0
        for n in names:
            size = taus[n].numel()
            out[n] = (keep[start : start + size].reshape(1, -1), (alpha * sigma).reshape(1))
            start += size
        return out
    out = {}
    for n in names:
        t = taus[n].double()
        rows = t.reshape(t.shape[0], -1) if scope == "per_row" and t.dim() >= 2 else t.reshape(1, -1)
        k = max(1, math.floor(density * rows.shape[1]))
        keep = torch.zeros_like(rows, dtype=torch.bool)
        keep.scatter_(1, torch.sort(-rows.abs(), dim=1, stable=True).indices[:, :k], True)
        out[n] = (keep, alpha * rows.std(dim=1))
    return out


def assert_matches_oracle(
    taus, restored: dict[str, torch.Tensor], stored_scales, *, density, alpha, scope
) -> None:
    expected = oracle(taus, density=density, alpha=alpha, scope=scope)
    for name, tau in taus.items():
        keep, sigma = expected[name]
        scale = stored_scales[name].double()
        torch.testing.assert_close(
            scale.expand_as(sigma) if scale.numel() == 1 else scale, sigma, rtol=2e-6, atol=0
        )
        rows = tau.reshape(keep.shape)
        # exact: the restored tensor is ±(stored float32 scale) on kept nonzero entries, 0 elsewhere
        signs = torch.sign(rows) * keep
        stored = stored_scales[name].reshape(-1, 1).float()
        want = (signs * stored).reshape(tau.shape)
        assert torch.equal(restored[name], want), name


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    base = make_llama_like(tmp_path / "base")
    return {"base": base, "ft": make_llama_like(tmp_path / "ft", perturb_from=base, seed=3)}


def test_extract_writes_float32_tau_with_marker(tmp_path: Path, models: dict[str, Path]) -> None:
    out = extract_task_vector(models["base"], models["ft"], tmp_path / "tv", shard_size=2048)
    base, ft, tv = load_all(models["base"]), load_all(models["ft"]), load_all(out)
    assert set(tv) == {n for n, t in ft.items() if t.is_floating_point()}
    for name, tau in tv.items():
        assert tau.dtype == torch.float32
        assert torch.equal(tau, ft[name].float() - base[name].float())
    assert (out / "model.safetensors.index.json").exists()
    with Checkpoint.open(out) as ckpt:
        assert ckpt.metadata["alloy_format"] == "task_vector"
        assert json.loads(ckpt.metadata["alloy_source_dtypes"])["lm_head.weight"] == "F32"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # scratch renamed away


def test_extract_refuses_mismatch_and_existing_output(tmp_path: Path, models: dict[str, Path]) -> None:
    wide = make_llama_like(tmp_path / "wide", hidden=24)
    with pytest.raises(IncompatibleModelsError, match="shape"):
        extract_task_vector(models["base"], wide, tmp_path / "tv")
    assert not (tmp_path / "tv").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(OutputError, match="already exists"):
        extract_task_vector(models["base"], models["ft"], tmp_path / "busy")


@pytest.mark.parametrize("scope", ["global", "per_tensor", "per_row"])
@pytest.mark.parametrize("density", [0.2, 1.0])
def test_compress_then_decompress_is_exact(
    tmp_path: Path, models: dict[str, Path], scope: str, density: float
) -> None:
    tv = extract_task_vector(models["base"], models["ft"], tmp_path / "tv")
    report = compress_task_vector(tv, tmp_path / "c", density=density, alpha=1.5, scope=scope)
    restored_dir = decompress(tmp_path / "c", tmp_path / "d", shard_size=4096)
    taus, restored = load_all(tv), load_all(restored_dir)
    assert set(restored) == set(taus)
    scales = {n: t for n, t in load_all(tmp_path / "c").items() if n.endswith("::scale")}
    scales = {n.removesuffix("::scale"): t for n, t in scales.items()}
    assert_matches_oracle(taus, restored, scales, density=density, alpha=1.5, scope=scope)
    n = sum(t.numel() for t in taus.values())
    assert report.elements == n
    if scope == "global":
        assert report.kept == max(1, math.floor(density * n))  # no τ is exactly 0 in this fixture
        assert report.sigma == pytest.approx(
            float(torch.cat([t.reshape(-1).double() for t in taus.values()]).std())
        )
    with Checkpoint.open(restored_dir) as ckpt:
        assert ckpt.metadata["alloy_format"] == "task_vector"


def test_ratio_is_reported_against_the_original_dtype(tmp_path: Path) -> None:
    base = make_llama_like(tmp_path / "base", dtype=torch.bfloat16)
    ft = make_llama_like(tmp_path / "ft", perturb_from=base, seed=1, scale=0.1)
    tv = extract_task_vector(base, ft, tmp_path / "tv")
    report = compress_task_vector(tv, tmp_path / "c", density=0.1, scope="global")
    path = tmp_path / "c" / "model.safetensors"
    header = read_safetensors_header(path)
    pieces = sum(i.nbytes for i in header.infos.values())
    elements = sum(t.numel() for t in load_all(tv).values())
    assert report.compressed_bytes == pieces
    assert report.original_bytes == 2 * elements  # bf16 fine-tune, though τ is stored in float32
    assert report.ratio == pytest.approx(report.original_bytes / report.compressed_bytes)
    assert report.ratio > 8
    assert report.file_bytes == path.stat().st_size
    with safe_open(str(path), framework="pt") as f:
        stored = json.loads(f.metadata()[COMPRESSION_KEY])
    assert stored["ratio"] == pytest.approx(report.ratio)
    assert stored["tensors"]["lm_head.weight"]["dtype"] == "BF16"


def test_global_ties_go_to_lowest_index_in_sorted_name_order(tmp_path: Path) -> None:
    taus = {"b": torch.tensor([1.0, -2.0, 1.0]), "a": torch.tensor([-1.0, 1.0, 1.0, 0.5])}
    tv = make_tv(tmp_path / "tv", taus)
    compress_task_vector(tv, tmp_path / "c", density=3 / 7, scope="global")
    with open_source(tmp_path / "c") as src:
        a, b = src.stored_tau("a"), src.stored_tau("b")
    scale = float(b[1].abs())
    assert torch.equal(b, torch.tensor([0.0, -scale, 0.0]))  # the 2 outranks every tie
    assert torch.equal(a, torch.tensor([-scale, scale, 0.0, 0.0]))  # then ties: a[0], a[1]


@pytest.mark.parametrize("scope", list(Scope))
def test_compression_is_the_compeft_merge_of_the_one_task_vector(tmp_path: Path, scope: Scope) -> None:
    """One top-k and one σ in the codebase: decompress(compress(τ)) is, bit for bit, what the ``compeft`` merge
    method makes of τ alone (ties, exact zeros, one-element units and per-row scales included)."""
    gen = torch.Generator().manual_seed(5)
    taus = {
        "a.weight": torch.randn(12, 9, generator=gen),
        "b.bias": torch.randn(40, generator=gen).round(decimals=1),  # many exact ties and zeros
        "c.one": torch.tensor([-0.75]),  # one element: no unbiased std
        "d.column": torch.randn(6, 1, generator=gen),  # per_row: one-element rows
        "e.tied": torch.full((5, 4), -0.5),  # σ = 0
    }
    tv = make_tv(tmp_path / "tv", taus)
    density, alpha = 0.3, 1.5
    params = CompeftParams(density=density, alpha=alpha)
    stats = None
    if scope == Scope.global_:
        stats = compute_global_stats(lambda: ((n, taus[n].unsqueeze(0)) for n in sorted(taus)), params=params)
    compress_task_vector(tv, tmp_path / "c", density=density, alpha=alpha, scope=scope)
    restored = load_all(decompress(tmp_path / "c", tmp_path / "d"))
    for name, tau in taus.items():
        ctx = make_ctx(1, name=name, scope=scope, global_stats=stats)
        merged = get_method("compeft").fn(tau.unsqueeze(0), ctx, params)
        assert torch.equal(restored[name], merged), name


def test_zeros_stay_zero_and_all_zero_vector(tmp_path: Path) -> None:
    tv = make_tv(tmp_path / "tv", {"w": torch.tensor([0.0, 0.0, 3.0, 0.0]), "z": torch.zeros(5)})
    report = compress_task_vector(tv, tmp_path / "c", density=1.0, scope="per_tensor")
    assert report.kept == 1
    with open_source(tmp_path / "c") as src:
        w = src.stored_tau("w")
        assert torch.equal(w, torch.tensor([0.0, 0.0, 1.5, 0.0]))  # σ of [0,0,3,0] is 1.5
        assert torch.equal(src.stored_tau("z"), torch.zeros(5))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_global_threshold_is_exact_over_wide_magnitudes(tmp_path: Path, seed: int) -> None:
    """The global radix select must find the exact k-th largest across exponents, subnormals and ties."""
    gen = torch.Generator().manual_seed(seed)
    taus = {}
    for i in range(4):
        t = torch.randn(37 + i * 50, generator=gen) * torch.pow(
            10.0, torch.randint(-40, 30, (37 + i * 50,), generator=gen).float()
        )
        t[::7] = 0.125  # a block of exact ties
        taus[f"t{i}"] = t
    tv = make_tv(tmp_path / "tv", taus)
    for density in (0.05, 0.3, 0.77):
        out = tmp_path / f"c{density}"
        compress_task_vector(tv, out, density=density, scope="global")
        restored = decompress(out, tmp_path / f"d{density}")
        scales = {n.removesuffix("::scale"): t for n, t in load_all(out).items() if n.endswith("::scale")}
        assert_matches_oracle(taus, load_all(restored), scales, density=density, alpha=1.0, scope="global")


def test_index_list_when_smaller_than_mask(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    tv = make_tv(
        tmp_path / "tv", {"big": torch.randn(4096, generator=gen), "small": torch.randn(64, generator=gen)}
    )
    compress_task_vector(tv, tmp_path / "sparse", density=0.01, scope="per_tensor")
    compress_task_vector(tv, tmp_path / "dense", density=0.5, scope="per_tensor")
    sparse = read_safetensors_header(tmp_path / "sparse" / "model.safetensors").infos
    dense = read_safetensors_header(tmp_path / "dense" / "model.safetensors").infos
    assert sparse["big::indices"].shape == (40,) and sparse["big::indices"].dtype == "I32"
    assert "big::mask" in dense and dense["big::mask"].shape == (512,)
    for folder in ("sparse", "dense"):
        restored = load_all(decompress(tmp_path / folder, tmp_path / f"{folder}-d"))
        with open_source(tmp_path / folder) as src:
            assert torch.equal(restored["big"], src.stored_tau("big"))


def test_compress_from_checkpoint_or_lora_needs_base(tmp_path: Path, models: dict[str, Path]) -> None:
    with pytest.raises(IncompatibleModelsError, match="needs the base"):
        compress_task_vector(models["ft"], tmp_path / "x", density=0.2)
    direct = compress_task_vector(models["ft"], tmp_path / "direct", density=0.2, base=models["base"])
    tv = extract_task_vector(models["base"], models["ft"], tmp_path / "tv")
    via_tv = compress_task_vector(tv, tmp_path / "via", density=0.2)
    assert direct.kept == via_tv.kept and direct.sigma == pytest.approx(via_tv.sigma, rel=1e-12)
    assert load_all(tmp_path / "direct").keys() == load_all(tmp_path / "via").keys()
    lora = make_lora_adapter(tmp_path / "lora", base_dir=models["base"])
    report = compress_task_vector(lora, tmp_path / "cl", density=0.3, base=models["base"])
    assert report.tensors == 4


def test_non_finite_task_vector_is_refused(tmp_path: Path) -> None:
    tv = make_tv(tmp_path / "tv", {"a": torch.ones(3), "w": torch.tensor([1.0, float("nan")])})
    with pytest.raises(NonFiniteTensorError, match="'w'"):
        compress_task_vector(tv, tmp_path / "c", density=0.5)
    assert not (tmp_path / "c").exists()


def test_bad_parameters(tmp_path: Path) -> None:
    tv = make_tv(tmp_path / "tv", {"a": torch.ones(3)})
    for kwargs in (
        {"density": 0.0},
        {"density": 1.5},
        {"density": 0.5, "alpha": 0},
        {"density": 0.5, "scope": "x"},
    ):
        with pytest.raises(ValueError):
            compress_task_vector(tv, tmp_path / "c", **kwargs)


def _rewrite(path: Path, edit) -> None:
    with safe_open(str(path), framework="pt") as f:
        tensors = {n: f.get_tensor(n) for n in f.keys()}  # noqa: SIM118
        meta = dict(f.metadata())
    info = json.loads(meta[COMPRESSION_KEY])
    edit(tensors, info)
    meta[COMPRESSION_KEY] = json.dumps(info)
    path.unlink()
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize(
    "case", ["kept_count", "shape", "indices_out_of_range", "mask_popcount", "metadata_json"]
)
def test_hostile_compressed_file_is_refused(tmp_path: Path, case: str) -> None:
    gen = torch.Generator().manual_seed(0)
    density = 0.01 if case == "indices_out_of_range" else 0.5
    tv = make_tv(tmp_path / "tv", {"w": torch.randn(4096, generator=gen)})
    compress_task_vector(tv, tmp_path / "c", density=density, scope="per_tensor")
    path = tmp_path / "c" / "model.safetensors"

    def edit(tensors, info):
        entry = info["tensors"]["w"]
        if case == "kept_count":
            entry["kept"] += 9
        elif case == "shape":
            entry["shape"] = [8192]
        elif case == "indices_out_of_range":
            tensors["w::indices"][-1] = 10**6
        elif case == "mask_popcount":
            tensors["w::mask"][0] ^= 1
        else:
            info["tensors"] = "not an object"

    _rewrite(path, edit)
    with pytest.raises(CorruptCheckpointError) as err:
        CompressedTaskVector(Checkpoint.open(tmp_path / "c")).load_tau("w")
    assert str(path) in str(err.value)
    if case != "metadata_json":
        assert err.value.context["tensor"] == "w"
