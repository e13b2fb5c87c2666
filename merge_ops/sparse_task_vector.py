"""Sparse task vectors (Ansell et al., "Composable Sparse Fine-Tuning", ACL 2022, https://arxiv.org/abs/2110.07560).

``extract_sparse_task_vector(base, finetuned, out, density=d)`` keeps, per tensor, the k = ⌊d·n⌋ (at least 1)
entries of τ = θ_ft − θ_base (float32, computed exactly as ``alloy extract``) of largest |τ|, ties broken by
lowest flat index (``kernels.topk_mask``, the pipeline's magnitude sparsifier), and stores their **exact**
values: unlike ComPEFT nothing is quantized, so decompression gives τ at the kept positions and 0 elsewhere, bit
for bit, and at density 1 it is the dense task vector. Exact zeros of τ are not stored (they read back as 0).

Format: ``out/model.safetensors`` with metadata ``alloy_format: sparse_task_vector`` and
``alloy_sparse_task_vector`` (JSON: per tensor shape, the fine-tune's dtype, encoding and kept count; density
and sizes). Per tensor ``<name>::values`` (float32, kept entries in position order) and either
``<name>::indices`` (int32, or int64 past 2³¹ elements: sorted flat positions) or ``<name>::mask`` (positions
bit-packed by ``kernels.pack_bits``: bit b of byte j is flat element 8j+b), whichever is smaller (ties go to the
mask). The reported ratio is the fine-tune's bytes over the stored bytes (as ``alloy compress`` reports it),
plus the ratio to the dense float32 task vector ``alloy extract`` writes.

A sparse task vector is a delta source (``SparseTaskVectorSource``, recognised by ``sources.open_source``):
any method takes it in ``models`` next to checkpoints, LoRA adapters and dense or ComPEFT task vectors;
composing several (task + language, as in the paper) is ``task_arithmetic`` over them. Memory: extraction and
reading hold one tensor (and its pieces) at a time; the header is written last (``artifacts._TailHeaderWriter``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from kernels import pack_bits, topk_mask, unpack_bits
from merge_ops.artifacts import (
    FORMAT_KEY,
    SOURCE_DTYPES_KEY,
    SPARSE_KEY,
    VERSION_KEY,
    _scratch_folder,
    _TailHeaderWriter,
)
from merge_ops.checkpoint import DTYPES, Checkpoint, TensorInfo
from merge_ops.errors import CorruptCheckpointError, IncompatibleModelsError, NonFiniteTensorError
from merge_ops.methods._scope import kept_count
from merge_ops.sources import ModelSource, SourceKind

FORMAT = "sparse_task_vector"
META_KEY = "alloy_sparse_task_vector"
FILE_NAME = "model.safetensors"


class SparseExtractReport(BaseModel):
    path: str
    density: float
    tensors: int
    elements: int
    kept: int
    original_bytes: int  # τ at the fine-tune's dtype of each tensor
    dense_bytes: int  # the float32 task vector ``alloy extract`` writes
    sparse_bytes: int  # values + positions (indices or bit mask)
    file_bytes: int
    ratio: float  # original_bytes / sparse_bytes
    ratio_vs_dense: float  # dense_bytes / sparse_bytes


def extract_sparse_task_vector(
    base: Path, finetuned: Path, out: Path, *, density: float, allow_pickle: bool = False
) -> SparseExtractReport:
    """Write the sparse task vector of ``finetuned`` − ``base`` at ``density`` into the folder ``out``."""
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    with (
        Checkpoint.open(base, allow_pickle=allow_pickle) as base_ckpt,
        Checkpoint.open(finetuned, allow_pickle=allow_pickle) as ft_ckpt,
    ):
        names = sorted(n for n, info in ft_ckpt.infos.items() if info.torch_dtype.is_floating_point)
        for name in names:
            info, base_info = ft_ckpt.infos[name], base_ckpt.infos.get(name)
            if base_info is None or base_info.shape != info.shape:
                have = "is missing" if base_info is None else f"has shape {list(base_info.shape)}"
                raise IncompatibleModelsError(
                    f"tensor {name!r} of {finetuned} (shape {list(info.shape)}) {have} in the base {base}",
                    tensor=name,
                    sources=[str(base), str(finetuned)],
                )
        entries: dict[str, dict[str, Any]] = {}
        totals = {"elements": 0, "kept": 0, "original_bytes": 0, "dense_bytes": 0, "sparse_bytes": 0}
        with _scratch_folder(out) as scratch, _TailHeaderWriter(scratch / FILE_NAME) as writer:
            for name in names:
                tau = ft_ckpt.load(name).to(torch.float32) - base_ckpt.load(name).to(torch.float32)
                if not bool(torch.isfinite(tau).all()):
                    raise NonFiniteTensorError(
                        f"task vector of {name!r} is not finite", tensor=name, source=str(finetuned)
                    )
                entry, stored = _write_tensor(writer, name, tau, density=density)
                entries[name] = {**entry, "dtype": ft_ckpt.infos[name].dtype}
                n = tau.numel()
                totals["elements"] += n
                totals["kept"] += entry["kept"]
                totals["original_bytes"] += n * DTYPES[ft_ckpt.infos[name].dtype][1]
                totals["dense_bytes"] += 4 * n
                totals["sparse_bytes"] += stored
            sparse = totals["sparse_bytes"]
            ratio = totals["original_bytes"] / sparse if sparse else math.inf
            ratio_vs_dense = totals["dense_bytes"] / sparse if sparse else math.inf
            writer.metadata = {
                FORMAT_KEY: FORMAT,
                VERSION_KEY: "1",
                SPARSE_KEY: "false",
                SOURCE_DTYPES_KEY: json.dumps(
                    {n: e["dtype"] for n, e in entries.items()}, separators=(",", ":")
                ),
                META_KEY: json.dumps(
                    {"density": density, **totals, "ratio": ratio, "tensors": entries}, separators=(",", ":")
                ),
                "alloy_base": str(base),
                "alloy_finetuned": str(finetuned),
            }
    return SparseExtractReport(
        path=str(out),
        density=density,
        tensors=len(entries),
        file_bytes=(Path(out) / FILE_NAME).stat().st_size,
        ratio=ratio,
        ratio_vs_dense=ratio_vs_dense,
        **totals,
    )


def _write_tensor(
    writer: _TailHeaderWriter, name: str, tau: torch.Tensor, *, density: float
) -> tuple[dict[str, Any], int]:
    """Store one tensor's kept entries; returns its metadata entry (without dtype) and its stored bytes."""
    flat = tau.reshape(-1)
    n = flat.numel()
    if n:
        keep = kept_count(torch.tensor([density], dtype=torch.float64), n)
        mask = topk_mask(flat.reshape(1, -1), keep=keep).reshape(-1)
        mask &= flat != 0  # a zero reads back as zero without a position
    else:
        mask = torch.zeros(0, dtype=torch.bool)
    positions = mask.nonzero().reshape(-1)
    kept = positions.numel()
    index_dtype = torch.int32 if n <= 2**31 - 1 else torch.int64
    use_indices = kept * index_dtype.itemsize < (n + 7) // 8
    if use_indices:
        writer.add(f"{name}::indices", positions.to(index_dtype))
    else:
        writer.add(f"{name}::mask", pack_bits(mask))
    writer.add(f"{name}::values", flat[positions].contiguous())
    stored = (kept * index_dtype.itemsize if use_indices else (n + 7) // 8) + 4 * kept
    return {"shape": list(tau.shape), "encoding": "indices" if use_indices else "mask", "kept": kept}, stored


class SparseTaskVector:
    """Reader: ``load_tau(name)`` is float32 τ in the original shape (exact values at the kept positions).
    The metadata and the pieces are checked against each other first, so a hostile file gets a
    ``CorruptCheckpointError`` naming file and tensor, never an out-of-range index."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.checkpoint = checkpoint
        self.file = next(iter(checkpoint.infos.values())).file if checkpoint.infos else checkpoint.path
        try:
            params = json.loads(checkpoint.metadata[META_KEY])
            entries = params["tensors"]
            if not isinstance(entries, dict):
                raise TypeError("tensors is not an object")
        except (KeyError, ValueError, TypeError) as exc:
            raise CorruptCheckpointError(
                f"{self.file}: bad {META_KEY} metadata ({exc!r})", file=str(self.file)
            ) from None
        self.params: dict[str, Any] = params
        self.entries: dict[str, dict[str, Any]] = {}
        self.infos: dict[str, TensorInfo] = {}
        for name, entry in entries.items():
            self._validate(name, entry)
            self.entries[name] = entry
            self.infos[name] = TensorInfo(
                name=name,
                dtype=entry["dtype"],
                shape=tuple(entry["shape"]),
                file=checkpoint.infos[f"{name}::values"].file,
            )

    def _bad(self, name: str, problem: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            f"{self.file}: tensor {name!r}: {problem}", file=str(self.file), tensor=name
        )

    def _validate(self, name: str, entry: Any) -> None:
        if not isinstance(entry, dict) or entry.get("encoding") not in ("mask", "indices"):
            raise self._bad(name, "entry has no valid encoding")
        shape, kept, dtype = entry.get("shape"), entry.get("kept"), entry.get("dtype")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise self._bad(name, f"bad shape {shape!r}")
        n = math.prod(shape)
        if dtype not in DTYPES or not isinstance(kept, int) or not 0 <= kept <= n:
            raise self._bad(name, f"bad dtype {dtype!r} or kept count {kept!r}")
        expect: dict[str, tuple[tuple[str, ...], tuple[int, ...]]] = {f"{name}::values": (("F32",), (kept,))}
        if entry["encoding"] == "mask":
            expect[f"{name}::mask"] = (("U8",), ((n + 7) // 8,))
        else:
            expect[f"{name}::indices"] = (("I32", "I64"), (kept,))
        for key, (codes, piece_shape) in expect.items():
            info = self.checkpoint.infos.get(key)
            if info is None or info.dtype not in codes or info.shape != piece_shape:
                raise self._bad(
                    name, f"piece {key!r} is missing or not {'/'.join(codes)} {list(piece_shape)}"
                )

    def load_tau(self, name: str) -> torch.Tensor:
        entry = self.entries.get(name)
        if entry is None:
            raise IncompatibleModelsError(
                f"{self.file}: no tensor {name!r}", tensor=name, file=str(self.file)
            )
        shape, kept = tuple(entry["shape"]), entry["kept"]
        n = math.prod(shape)
        if entry["encoding"] == "mask":
            positions = unpack_bits(self.checkpoint.load(f"{name}::mask"), n).nonzero().reshape(-1)
            if positions.numel() != kept:
                raise self._bad(name, f"mask has {positions.numel()} set bits, metadata says {kept}")
        else:
            positions = self.checkpoint.load(f"{name}::indices").to(torch.int64)
            if kept and (
                int(positions.min()) < 0
                or int(positions.max()) >= n
                or not bool((positions[1:] > positions[:-1]).all())
            ):
                raise self._bad(name, "indices are out of range or not strictly increasing")
        tau = torch.zeros(n, dtype=torch.float32)
        if kept:
            tau[positions] = self.checkpoint.load(f"{name}::values").to(torch.float32)
        return tau.reshape(shape)

    def close(self) -> None:
        self.checkpoint.close()


class SparseTaskVectorSource(ModelSource):
    """A sparse task vector as a merge input: a delta source holding every floating tensor of the fine-tune."""

    kind: SourceKind = "sparse_task_vector"

    def __init__(self, reader: SparseTaskVector, *, label: str) -> None:
        super().__init__(label)
        self.reader = reader

    @property
    def infos(self) -> dict[str, TensorInfo]:
        return self.reader.infos

    @property
    def source_dtypes(self) -> dict[str, str]:
        return {n: e["dtype"] for n, e in self.reader.entries.items()}

    def stored_tau(self, name: str) -> torch.Tensor:
        return self.reader.load_tau(name)

    def task_vector(self, name: str, base: torch.Tensor) -> torch.Tensor:
        self._check_shape(name, base)
        return self.reader.load_tau(name).to(base.device)

    def close(self) -> None:
        self.reader.close()


def open_sparse_task_vector(checkpoint: Checkpoint, *, label: str) -> SparseTaskVectorSource:
    return SparseTaskVectorSource(SparseTaskVector(checkpoint), label=label)
