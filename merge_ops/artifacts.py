"""Task vectors as artifacts: extraction, ComPEFT compression and exact decompression (the formats they write
are ``merge_ops.compressed``'s).

``extract_task_vector`` writes a task-vector folder of float32 τ = θ_t − θ_0 for every floating tensor of the
fine-tune; ``decompress`` restores one from a compressed task vector, exactly.

``compress_task_vector`` (ComPEFT, Yadav et al. 2023, arXiv:2311.13171): τ̃ = α·σ·sgn(τ) ⊙ topk(|τ|), exactly the
merge pipeline's ``compeft`` sparsifier (``merge_ops.methods.sparsify``) applied to this one task vector: the same
scope units (``_scope.scope_view``), k = ⌊density·n⌋ (at least 1, ``_scope.kept_count``), ties at the threshold
broken by lowest flat index (``kernels.topk_mask``; ``global``: in sorted-name order, ``merge_ops.global_stats``),
σ the unbiased std of the uncompressed τ over the scope unit and the float32 scale σ·α
(``sparsify.ternary_scale``; a unit of one element has no unbiased std: its scale is |τ|). Kept positions
exclude τ = 0 (sgn 0), so decompression yields exactly ±scale or 0: τ̃.

Memory stays bounded by a few tensors: ``global`` scope runs the merge pipeline's streaming first pass
(``compute_global_stats``: σ and an exact radix select of the k-th largest |τ|, three passes over the tensors)
with this vector as its one model, then applies it in a last pass.
"""

from __future__ import annotations

import json
import math
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel

from kernels import pack_bits, topk_mask
from merge_ops.checkpoint import DTYPES, Checkpoint, TensorInfo
from merge_ops.compressed import (
    COMPRESSED_FORMAT,
    COMPRESSION_KEY,
    FORMAT_KEY,
    SOURCE_DTYPES_KEY,
    SPARSE_KEY,
    TASK_VECTOR_FORMAT,
    VERSION_KEY,
    CompressedTaskVector,
    TailHeaderWriter,
)
from merge_ops.errors import (
    CorruptCheckpointError,
    IncompatibleModelsError,
    InvalidArgumentError,
    NonFiniteTensorError,
    OutputError,
    maps_kernel_errors,
)
from merge_ops.global_stats import GlobalStats, compute_global_stats
from merge_ops.methods._scope import kept_count, scope_view
from merge_ops.methods.sparsify import ternary_scale
from merge_ops.params import CompeftParams, Scope
from merge_ops.registry import TensorContext
from merge_ops.writer import ShardedWriter

if TYPE_CHECKING:
    from merge_ops.sources import ModelSource


DEFAULT_SHARD_SIZE = 5 * 10**9
SCOPES = ("per_tensor", "per_row", "global")


# --------------------------------------------------------------------------------------------- extraction


def extract_task_vector(
    base: Path,
    finetuned: Path,
    out: Path,
    *,
    shard_size: int = DEFAULT_SHARD_SIZE,
    allow_pickle: bool = False,
) -> Path:
    """Write τ = θ_ft − θ_base (float32) for every floating tensor of ``finetuned`` into the folder ``out``.
    Every such tensor must exist in ``base`` with the same shape (``IncompatibleModelsError`` otherwise)."""
    with (
        Checkpoint.open(base, allow_pickle=allow_pickle) as base_ckpt,
        Checkpoint.open(finetuned, allow_pickle=allow_pickle) as ft_ckpt,
    ):
        names = [n for n, info in ft_ckpt.infos.items() if info.torch_dtype.is_floating_point]
        for name in names:
            info, base_info = ft_ckpt.infos[name], base_ckpt.infos.get(name)
            if base_info is None:
                raise IncompatibleModelsError(
                    f"tensor {name!r} of {finetuned} is missing from the base {base}",
                    tensor=name,
                    sources=[str(base), str(finetuned)],
                )
            if base_info.shape != info.shape:
                raise IncompatibleModelsError(
                    f"tensor {name!r}: {finetuned} has shape {list(info.shape)}, the base {base} "
                    f"{list(base_info.shape)}",
                    tensor=name,
                    sources=[str(base), str(finetuned)],
                )
        metadata = {
            FORMAT_KEY: TASK_VECTOR_FORMAT,
            VERSION_KEY: "1",
            SOURCE_DTYPES_KEY: json.dumps({n: ft_ckpt.infos[n].dtype for n in names}, separators=(",", ":")),
            SPARSE_KEY: "false",
            "alloy_base": str(base),
            "alloy_finetuned": str(finetuned),
        }
        plan = [(n, torch.float32, ft_ckpt.infos[n].shape) for n in names]
        with scratch_folder(out) as scratch:
            writer = ShardedWriter(scratch, plan=plan, shard_size=shard_size, metadata=metadata)
            with writer:
                for name in names:
                    tau = ft_ckpt.load(name).to(torch.float32) - base_ckpt.load(name).to(torch.float32)
                    writer.write(name, tau)
    return Path(out)


class scratch_folder:  # noqa: N801 - a context manager used like a function
    """Build ``out`` in a sibling scratch folder and rename it into place only on success."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        if self.out.exists() and (not self.out.is_dir() or any(self.out.iterdir())):
            raise OutputError(f"{self.out} already exists and is not an empty folder", path=str(self.out))
        self.scratch = self.out.parent / f".{self.out.name}.tmp-{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> Path:
        self.scratch.mkdir(parents=True)
        return self.scratch

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
            return
        if self.out.exists():
            self.out.rmdir()  # empty (checked above); rename won't replace a folder
        self.scratch.rename(self.out)


# -------------------------------------------------------------------------------------------- compression


class CompressionReport(BaseModel):
    path: str
    scope: str
    density: float
    alpha: float
    tensors: int
    elements: int
    kept: int
    original_bytes: int  # τ at the source dtype of each tensor
    compressed_bytes: int  # mask/indices + signs + scales
    file_bytes: int
    ratio: float  # original_bytes / compressed_bytes
    sigma: float | None  # the global σ (None for per-tensor / per-row scopes)


class _TauReader:
    """Uniform float32 τ access over any source kind; ``base`` is needed for checkpoint and LoRA sources.
    Each τ is checked finite on its first read (the global scope reads every tensor four times)."""

    def __init__(self, source: ModelSource, base: Checkpoint | None) -> None:
        self.source = source
        self.base = base
        self._finite: set[str] = set()
        if source.kind in ("checkpoint", "lora") and base is None:
            raise IncompatibleModelsError(
                f"{source.label} is a {source.kind}; compressing it needs the base model", source=source.label
            )
        dtypes = getattr(source, "source_dtypes", {}) or {}
        self.infos: dict[str, TensorInfo] = {
            n: info for n, info in sorted(source.infos.items()) if DTYPES[info.dtype][0].is_floating_point
        }
        self.original_dtypes = {n: dtypes.get(n, info.dtype) for n, info in self.infos.items()}
        if base is not None:
            for name in self.infos:
                if name not in base.infos:
                    raise IncompatibleModelsError(
                        f"tensor {name!r} of {source.label} is missing from the base",
                        tensor=name,
                        source=source.label,
                    )

    def tau(self, name: str) -> torch.Tensor:
        stored_tau = getattr(self.source, "stored_tau", None)
        if stored_tau is not None:  # task-vector kinds: τ is in the file, no base needed
            tau = stored_tau(name)
        else:
            assert self.base is not None
            tau = self.source.task_vector(name, self.base.load(name)).to(torch.float32)
        if name not in self._finite:
            if not bool(torch.isfinite(tau).all()):
                raise NonFiniteTensorError(
                    f"{self.source.label}: task vector of {name!r} is not finite",
                    tensor=name,
                    source=self.source.label,
                )
            self._finite.add(name)
        return tau

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.infos:
            yield name, self.tau(name)


@maps_kernel_errors
def compress_task_vector(
    source: Path | ModelSource,
    out: Path,
    *,
    density: float,
    alpha: float = 1.0,
    scope: str = "global",
    base: Path | None = None,
    allow_pickle: bool = False,
) -> CompressionReport:
    """ComPEFT-compress a task vector (a task-vector folder, a compressed one, or — with ``base`` — a
    fine-tuned checkpoint or LoRA adapter) into the folder ``out``; return the sizes and the ratio."""
    from merge_ops.sources import open_source

    if not 0 < density <= 1:
        raise InvalidArgumentError(f"density must be in (0, 1], got {density}", argument="density")
    if not alpha > 0:
        raise InvalidArgumentError(f"alpha must be positive, got {alpha}", argument="alpha")
    scope = str(getattr(scope, "value", scope))
    if scope not in SCOPES:
        raise InvalidArgumentError(f"scope must be one of {SCOPES}, got {scope!r}", argument="scope")
    owned = isinstance(source, str | Path)  # a source we open is a source we close
    src = open_source(Path(source), allow_pickle=allow_pickle) if isinstance(source, str | Path) else source
    base_ckpt = Checkpoint.open(base, allow_pickle=allow_pickle) if base is not None else None
    try:
        reader = _TauReader(src, base_ckpt)
        stats = _compeft_global_stats(reader, density) if scope == "global" else None
        with scratch_folder(out) as scratch:
            report = _write_compressed(
                reader,
                scratch / "model.safetensors",
                density=density,
                alpha=alpha,
                scope=Scope(scope),
                stats=stats,
                sparse=src.sparse_coverage,
            )
    finally:
        if owned:
            src.close()
        if base_ckpt is not None:
            base_ckpt.close()
    return CompressionReport(
        path=str(out),
        scope=scope,
        density=density,
        alpha=alpha,
        file_bytes=(Path(out) / "model.safetensors").stat().st_size,
        **report,
    )


def _compeft_global_stats(reader: _TauReader, density: float) -> GlobalStats:
    """σ and the exact top-k of the whole task vector: the merge pipeline's streaming first pass, with this
    vector as its one model (tensors in sorted-name order, which the global tie rule follows)."""
    return compute_global_stats(
        lambda: ((name, tau.unsqueeze(0)) for name, tau in reader), params=CompeftParams(density=density)
    )


def _mask_and_scale(
    name: str, tau: torch.Tensor, *, density: float, alpha: float, scope: Scope, stats: GlobalStats | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat keep mask, float32 scale: one value, or one per row under ``per_row``) of one tensor: the selection
    and the scale of the ``compeft`` sparsifier (``stats`` for ``global``)."""
    view = scope_view(tau.unsqueeze(0), scope)
    units = view.rows.shape[0]
    if stats is not None:
        mask = stats.selection_mask(name, view.rows)
    elif view.n == 0:  # nothing to select nor to scale
        return torch.zeros(0, dtype=torch.bool), torch.zeros(units, dtype=torch.float32)
    else:
        mask = topk_mask(
            view.rows, keep=kept_count(torch.full((units,), density, dtype=torch.float64), view.n)
        )
    ctx = TensorContext(
        name=name, weights=torch.ones(1), seed=0, source_indices=(0,), scope=scope, global_stats=stats
    )
    return mask.reshape(-1), ternary_scale(view, ctx, float(alpha))


def _write_compressed(
    reader: _TauReader,
    path: Path,
    *,
    density: float,
    alpha: float,
    scope: Scope,
    stats: GlobalStats | None,
    sparse: bool,
) -> dict[str, Any]:
    entries: dict[str, dict[str, Any]] = {}
    elements = kept_total = original = compressed = 0
    sigma = (stats.sigma[0] if stats.sigma else 0.0) if stats is not None else None
    with TailHeaderWriter(path) as out:
        for name, tau in reader:  # sorted-name order: the global tie rule depends on it
            flat = tau.reshape(-1)
            mask, scale = _mask_and_scale(name, tau, density=density, alpha=alpha, scope=scope, stats=stats)
            mask &= flat != 0  # sgn(0) = 0: a kept zero decompresses to zero without a position
            encoding, positions, position_bytes = out.add_positions(name, mask)
            kept, n = positions.numel(), flat.numel()
            signs = pack_bits(flat[positions] < 0)
            out.add(f"{name}::signs", signs)
            out.add(f"{name}::scale", scale)
            pieces = position_bytes + signs.numel() + 4 * scale.numel()
            source_dtype = reader.original_dtypes[name]
            entries[name] = {
                "shape": list(tau.shape),
                "dtype": source_dtype,
                "encoding": encoding,
                "kept": kept,
            }
            elements += n
            kept_total += kept
            original += n * DTYPES[source_dtype][1]
            compressed += pieces
        report = {
            "tensors": len(entries),
            "elements": elements,
            "kept": kept_total,
            "original_bytes": original,
            "compressed_bytes": compressed,
            "ratio": original / compressed if compressed else math.inf,
        }
        out.metadata = {
            FORMAT_KEY: COMPRESSED_FORMAT,
            VERSION_KEY: "1",
            SPARSE_KEY: "true" if sparse else "false",
            COMPRESSION_KEY: json.dumps(
                {
                    "method": "compeft",
                    "scope": scope.value,
                    "density": density,
                    "alpha": alpha,
                    "sigma": sigma,
                    **report,
                    "tensors": entries,
                },
                separators=(",", ":"),
            ),
        }
    return {**report, "sigma": sigma}


# ------------------------------------------------------------------------------------------ decompression


@maps_kernel_errors
def decompress(
    compressed: Path,
    out: Path,
    *,
    shard_size: int = DEFAULT_SHARD_SIZE,
) -> Path:
    """Restore τ̃ (float32, exactly) from a compressed task vector into a task-vector folder ``out``."""
    reader = CompressedTaskVector(Checkpoint.open(Path(compressed)))
    try:
        if reader.checkpoint.metadata.get(FORMAT_KEY) != COMPRESSED_FORMAT:
            raise CorruptCheckpointError(f"{compressed}: not a compressed task vector", file=str(compressed))
        names = list(reader.entries)
        metadata = {
            FORMAT_KEY: TASK_VECTOR_FORMAT,
            VERSION_KEY: "1",
            SOURCE_DTYPES_KEY: json.dumps(
                {n: reader.entries[n]["dtype"] for n in names}, separators=(",", ":")
            ),
            SPARSE_KEY: "true" if reader.sparse_coverage else "false",
            "alloy_decompressed_from": str(compressed),
        }
        plan = [(n, torch.float32, tuple(reader.entries[n]["shape"])) for n in names]
        with (
            scratch_folder(out) as scratch,
            ShardedWriter(scratch, plan=plan, shard_size=shard_size, metadata=metadata) as writer,
        ):
            for name in names:
                writer.write(name, reader.load_tau(name))
    finally:
        reader.close()
    return Path(out)
