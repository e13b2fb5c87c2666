"""Task vectors as artifacts: extraction, ComPEFT compression and exact decompression.

**Task-vector folder** (``extract_task_vector``, ``decompress``): an HF-layout folder (``model.safetensors`` or
shards + index) of float32 τ = θ_t − θ_0 for every floating tensor of the fine-tune, each shard's metadata
holding ``alloy_format: task_vector``, the fine-tune's dtype per tensor (``alloy_source_dtypes``, JSON) and
``alloy_sparse_coverage`` (true when absent tensors are zero deltas, e.g. a compressed LoRA).

**Compressed task vector** (``compress_task_vector``; ComPEFT, Yadav et al. 2023, arXiv:2311.13171):
τ̃ = α·σ·sgn(τ) ⊙ topk(|τ|), exactly the merge pipeline's ``compeft`` sparsifier (``merge_ops.methods.sparsify``)
applied to this one task vector: the same scope units (``_scope.scope_view``), k = ⌊density·n⌋ (at least 1,
``_scope.kept_count``), ties at the threshold broken by lowest flat index (``kernels.topk_mask``; ``global``: in
sorted-name order, ``merge_ops.global_stats``), σ the unbiased std of the uncompressed τ over the scope unit and the
float32 scale σ·α (``sparsify.ternary_scale``; a unit of one element has no unbiased std: its scale is |τ|). One
``model.safetensors``, metadata ``alloy_format: compressed_task_vector`` and ``alloy_compression`` (JSON: per
tensor shape, source dtype, encoding, kept count; the parameters and the ratio). Per tensor ``<name>::mask``
(positions, bit-packed by ``kernels.pack_bits``: bit b of byte j is flat element 8j+b) or ``<name>::indices``
(int32/int64 sorted flat positions), whichever is smaller (ties go to the mask); ``<name>::signs`` (one bit
per kept entry in position order, 1 = negative); ``<name>::scale`` (float32 α·σ: one value, or one per row
for ``per_row``). Kept positions exclude τ = 0 (sgn 0), so decompression yields exactly ±scale or 0: τ̃.

Memory stays bounded by a few tensors: ``global`` scope runs the merge pipeline's streaming first pass
(``compute_global_stats``: σ and an exact radix select of the k-th largest |τ|, three passes over the tensors)
with this vector as its one model, then applies it in a last pass. The compressed pieces go to a scratch data file
and the header is written last, because kept counts (hence shapes) are only known after the data pass.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import torch
from pydantic import BaseModel

from kernels import pack_bits, topk_mask, unpack_bits
from merge_ops.checkpoint import DTYPES, Checkpoint, TensorInfo, dtype_code
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

FORMAT_KEY = "alloy_format"
TASK_VECTOR_FORMAT = "task_vector"
COMPRESSED_FORMAT = "compressed_task_vector"
VERSION_KEY = "alloy_format_version"
SOURCE_DTYPES_KEY = "alloy_source_dtypes"
SPARSE_KEY = "alloy_sparse_coverage"
COMPRESSION_KEY = "alloy_compression"
DEFAULT_SHARD_SIZE = 5 * 10**9
SCOPES = ("per_tensor", "per_row", "global")


def source_dtypes(metadata: dict[str, str]) -> dict[str, str]:
    try:
        value = json.loads(metadata.get(SOURCE_DTYPES_KEY, "{}"))
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


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
        with _scratch_folder(out) as scratch:
            writer = ShardedWriter(scratch, plan=plan, shard_size=shard_size, metadata=metadata)
            with writer:
                for name in names:
                    tau = ft_ckpt.load(name).to(torch.float32) - base_ckpt.load(name).to(torch.float32)
                    writer.write(name, tau)
    return Path(out)


class _scratch_folder:  # noqa: N801 - a context manager used like a function
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
        stats = _global_stats(reader, density) if scope == "global" else None
        with _scratch_folder(out) as scratch:
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


def _global_stats(reader: _TauReader, density: float) -> GlobalStats:
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
    with _TailHeaderWriter(path) as out:
        for name, tau in reader:  # sorted-name order: the global tie rule depends on it
            flat = tau.reshape(-1)
            mask, scale = _mask_and_scale(name, tau, density=density, alpha=alpha, scope=scope, stats=stats)
            mask &= flat != 0  # sgn(0) = 0: a kept zero decompresses to zero without a position
            positions = mask.nonzero().reshape(-1)
            kept = positions.numel()
            n = flat.numel()
            index_dtype = torch.int32 if n <= 2**31 - 1 else torch.int64
            use_indices = kept * index_dtype.itemsize < (n + 7) // 8
            signs = pack_bits(flat[positions] < 0)
            if use_indices:
                out.add(f"{name}::indices", positions.to(index_dtype))
            else:
                out.add(f"{name}::mask", pack_bits(mask))
            out.add(f"{name}::signs", signs)
            out.add(f"{name}::scale", scale)
            pieces = (
                (kept * index_dtype.itemsize if use_indices else (n + 7) // 8)
                + signs.numel()
                + 4 * scale.numel()
            )
            source_dtype = reader.original_dtypes[name]
            entries[name] = {
                "shape": list(tau.shape),
                "dtype": source_dtype,
                "encoding": "indices" if use_indices else "mask",
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


class _TailHeaderWriter:
    """A single safetensors file whose header is written last: tensors stream into a scratch data file with
    running offsets, then header + data are assembled (copying only the small compressed payload)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data_path = path.with_name(path.name + ".data")
        self.header: dict[str, Any] = {}
        self.metadata: dict[str, str] = {}
        self.offset = 0
        self._data: BinaryIO = self.data_path.open("xb")

    def add(self, name: str, tensor: torch.Tensor) -> None:
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        self._data.write(data.numpy().data)
        end = self.offset + data.numel()
        self.header[name] = {
            "dtype": dtype_code(tensor.dtype),
            "shape": list(tensor.shape),
            "data_offsets": [self.offset, end],
        }
        self.offset = end

    def __enter__(self) -> _TailHeaderWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        self._data.close()
        try:
            if exc_type is None:
                raw = json.dumps(
                    {"__metadata__": self.metadata, **self.header}, separators=(",", ":")
                ).encode()
                raw += b" " * (-len(raw) % 8)
                with self.path.open("xb") as f, self.data_path.open("rb") as data:
                    f.write(struct.pack("<Q", len(raw)))
                    f.write(raw)
                    shutil.copyfileobj(data, f, length=1 << 20)
        finally:
            self.data_path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------ decompression


class CompressedTaskVector:
    """Reader of a compressed task vector; ``load_tau(name)`` returns float32 τ̃ in the original shape.
    The metadata and the pieces are validated against each other before use (a hostile file gets a
    ``CorruptCheckpointError`` naming file and tensor, never an out-of-range index)."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.checkpoint = checkpoint
        self.file = next(iter(checkpoint.infos.values())).file if checkpoint.infos else checkpoint.path
        meta = checkpoint.metadata
        try:
            self.params = json.loads(meta[COMPRESSION_KEY])
            entries = self.params["tensors"]
            if not isinstance(entries, dict):
                raise TypeError("tensors is not an object")
        except (KeyError, ValueError, TypeError) as exc:
            raise CorruptCheckpointError(
                f"{self.file}: bad {COMPRESSION_KEY} metadata ({exc!r})", file=str(self.file)
            ) from None
        self.sparse_coverage = meta.get(SPARSE_KEY) == "true"
        self.entries: dict[str, dict[str, Any]] = {}
        self.infos: dict[str, TensorInfo] = {}
        for name, entry in entries.items():
            self._validate(name, entry)
            self.entries[name] = entry
            self.infos[name] = TensorInfo(
                name=name,
                dtype=entry["dtype"],
                shape=tuple(entry["shape"]),
                file=checkpoint.infos[f"{name}::signs"].file,
            )

    def _bad(self, name: str, problem: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            f"{self.file}: tensor {name!r}: {problem}", file=str(self.file), tensor=name
        )

    def _validate(self, name: str, entry: Any) -> None:
        infos = self.checkpoint.infos
        if not isinstance(entry, dict) or entry.get("encoding") not in ("mask", "indices"):
            raise self._bad(name, "entry has no valid encoding")
        shape, kept, dtype = entry.get("shape"), entry.get("kept"), entry.get("dtype")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise self._bad(name, f"bad shape {shape!r}")
        if dtype not in DTYPES or not isinstance(kept, int) or not 0 <= kept <= math.prod(shape):
            raise self._bad(name, f"bad dtype {dtype!r} or kept count {kept!r}")
        n = math.prod(shape)
        expect = {f"{name}::signs": ("U8", ((kept + 7) // 8,))}
        if entry["encoding"] == "mask":
            expect[f"{name}::mask"] = ("U8", ((n + 7) // 8,))
        else:
            expect[f"{name}::indices"] = (infos.get(f"{name}::indices", _NO_INFO).dtype, (kept,))
            if expect[f"{name}::indices"][0] not in ("I32", "I64"):
                raise self._bad(name, "indices must be I32 or I64")
        for key, (code, piece_shape) in expect.items():
            info = infos.get(key)
            if info is None or info.dtype != code or info.shape != piece_shape:
                raise self._bad(name, f"piece {key!r} is missing or not {code} {list(piece_shape)}")
        scale = infos.get(f"{name}::scale")
        rows = shape[0] if self.params.get("scope") == "per_row" and len(shape) >= 2 else 1
        if scale is None or scale.dtype != "F32" or scale.shape not in ((1,), (rows,)):
            raise self._bad(name, "scale is missing or has the wrong shape")

    def load_tau(self, name: str) -> torch.Tensor:
        entry = self.entries.get(name)
        if entry is None:
            raise IncompatibleModelsError(
                f"{self.file}: no tensor {name!r}", tensor=name, file=str(self.file)
            )
        shape, kept = tuple(entry["shape"]), entry["kept"]
        n = math.prod(shape)
        if entry["encoding"] == "mask":
            mask = unpack_bits(self.checkpoint.load(f"{name}::mask"), n)
            positions = mask.nonzero().reshape(-1)
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
        if kept == 0:
            return torch.zeros(shape, dtype=torch.float32)
        negative = unpack_bits(self.checkpoint.load(f"{name}::signs"), kept)
        scale = self.checkpoint.load(f"{name}::scale").to(torch.float32)
        if scale.numel() > 1:  # per_row: row r owns flat positions [r·m, (r+1)·m)
            magnitude = scale[positions // max(1, n // scale.numel())]
        else:
            magnitude = scale.expand(kept)
        tau = torch.zeros(n, dtype=torch.float32)
        tau[positions] = torch.where(negative, -magnitude, magnitude)
        return tau.reshape(shape)

    def close(self) -> None:
        self.checkpoint.close()


_NO_INFO = TensorInfo(name="", dtype="", shape=(), file=Path())


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
            _scratch_folder(out) as scratch,
            ShardedWriter(scratch, plan=plan, shard_size=shard_size, metadata=metadata) as writer,
        ):
            for name in names:
                writer.write(name, reader.load_tau(name))
    finally:
        reader.close()
    return Path(out)
