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

A sparse task vector is a delta source (read by ``compressed.SparseTaskVector``, opened by ``sources.open_source``):
any method takes it in ``models`` next to checkpoints, LoRA adapters and dense or ComPEFT task vectors;
composing several (task + language, as in the paper) is ``task_arithmetic`` over them. Memory: extraction and
reading hold one tensor (and its pieces) at a time; the header is written last (``compressed.TailHeaderWriter``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from kernels import topk_mask
from merge_ops.artifacts import scratch_folder
from merge_ops.checkpoint import DTYPES, Checkpoint
from merge_ops.compressed import (
    FORMAT_KEY,
    SOURCE_DTYPES_KEY,
    SPARSE_FORMAT,
    SPARSE_KEY,
    SPARSE_META_KEY,
    VERSION_KEY,
    TailHeaderWriter,
)
from merge_ops.errors import IncompatibleModelsError, NonFiniteTensorError
from merge_ops.methods._scope import kept_count

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
        with scratch_folder(out) as scratch, TailHeaderWriter(scratch / FILE_NAME) as writer:
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
                FORMAT_KEY: SPARSE_FORMAT,
                VERSION_KEY: "1",
                SPARSE_KEY: "false",
                SOURCE_DTYPES_KEY: json.dumps(
                    {n: e["dtype"] for n, e in entries.items()}, separators=(",", ":")
                ),
                SPARSE_META_KEY: json.dumps(
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
    writer: TailHeaderWriter, name: str, tau: torch.Tensor, *, density: float
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
    encoding, positions, position_bytes = writer.add_positions(name, mask)
    writer.add(f"{name}::values", flat[positions].contiguous())
    kept = positions.numel()
    return {"shape": list(tau.shape), "encoding": encoding, "kept": kept}, position_bytes + 4 * kept
