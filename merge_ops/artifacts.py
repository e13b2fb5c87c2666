"""Task vectors as artifacts: extraction, ComPEFT compression and exact decompression.

**Task-vector folder** (``extract_task_vector``, ``decompress``): an HF-layout folder (``model.safetensors`` or
shards + index) of float32 τ = θ_t − θ_0 for every floating tensor of the fine-tune, each shard's metadata
holding ``alloy_format: task_vector``, the fine-tune's dtype per tensor (``alloy_source_dtypes``, JSON) and
``alloy_sparse_coverage`` (true when absent tensors are zero deltas, e.g. a compressed LoRA).

**Compressed task vector** (``compress_task_vector``; ComPEFT, Yadav et al. 2023, arXiv:2311.13171):
τ̃ = α·σ·sgn(τ) ⊙ topk(|τ|), σ the unbiased std of the uncompressed τ over the scope, k = ⌊density·n⌋ (at least
1), ties at the threshold broken by lowest flat index (``global``: in sorted-name order). One
``model.safetensors``, metadata ``alloy_format: compressed_task_vector`` and ``alloy_compression`` (JSON: per
tensor shape, source dtype, encoding, kept count; the parameters and the ratio). Per tensor ``<name>::mask``
(positions, bit-packed by ``kernels.pack_bits``: bit b of byte j is flat element 8j+b) or ``<name>::indices``
(int32/int64 sorted flat positions), whichever is smaller (ties go to the mask); ``<name>::signs`` (one bit
per kept entry in position order, 1 = negative); ``<name>::scale`` (float32 α·σ: one value, or one per row
for ``per_row``). Kept positions exclude τ = 0 (sgn 0), so decompression yields exactly ±scale or 0: τ̃.

Memory stays bounded by a few tensors: ``global`` scope streams three passes (σ + a histogram of the high 16
bits of the float32 |τ| bit patterns; a histogram of the low 16 bits inside the threshold bin — together the
exact k-th largest; then apply). The compressed pieces go to a scratch data file and the header is written
last, because kept counts (hence shapes) are only known after the data pass.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import torch
from pydantic import BaseModel

from kernels import pack_bits, unpack_bits
from merge_ops.checkpoint import DTYPES, Checkpoint, TensorInfo, dtype_code
from merge_ops.errors import (
    CorruptCheckpointError,
    IncompatibleModelsError,
    NonFiniteTensorError,
    OutputError,
)
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
    """Uniform float32 τ access over any source kind; ``base`` is needed for checkpoint and LoRA sources."""

    def __init__(self, source: ModelSource, base: Checkpoint | None) -> None:
        self.source = source
        self.base = base
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
        if not bool(torch.isfinite(tau).all()):
            raise NonFiniteTensorError(
                f"{self.source.label}: task vector of {name!r} is not finite",
                tensor=name,
                source=self.source.label,
            )
        return tau

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.infos:
            yield name, self.tau(name)


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
        raise ValueError(f"density must be in (0, 1], got {density}")
    if not alpha > 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    scope = str(getattr(scope, "value", scope))
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    owned = isinstance(source, str | Path)  # a source we open is a source we close
    src = open_source(Path(source), allow_pickle=allow_pickle) if isinstance(source, str | Path) else source
    base_ckpt = Checkpoint.open(base, allow_pickle=allow_pickle) if base is not None else None
    try:
        reader = _TauReader(src, base_ckpt)
        global_plan = _global_threshold(reader, density=density, alpha=alpha) if scope == "global" else None
        with _scratch_folder(out) as scratch:
            stats = _write_compressed(
                reader,
                scratch / "model.safetensors",
                density=density,
                alpha=alpha,
                scope=scope,
                global_plan=global_plan,
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
        sigma=global_plan.sigma if global_plan else None,
        file_bytes=(Path(out) / "model.safetensors").stat().st_size,
        **stats,
    )


@dataclass(frozen=True)
class _GlobalThreshold:
    sigma: float
    k: int
    #: float32 bit pattern of the k-th largest |τ|; entries above it are kept, ``ties`` entries equal to it
    bits: int
    ties: int


def _global_threshold(reader: _TauReader, *, density: float, alpha: float) -> _GlobalThreshold:
    """Exact global k-th largest |τ| and σ in two streaming passes (bounded memory: two histograms)."""
    moments = (0, 0.0, 0.0)
    high = torch.zeros(1 << 15, dtype=torch.int64)  # |τ| is non-negative: its sign bit is 0
    for _, tau in reader:
        moments = _combine_moments(moments, _moments(tau.reshape(-1)))
        high += torch.bincount(_abs_bits(tau) >> 16, minlength=1 << 15)
    count, _, m2 = moments
    if count == 0:
        return _GlobalThreshold(sigma=0.0, k=0, bits=0, ties=0)
    sigma = math.sqrt(m2 / (count - 1)) if count > 1 else 0.0
    k = max(1, math.floor(density * count))
    bits, ties = _kth_largest_bits(high, k, lambda: (_abs_bits(tau) for _, tau in reader))
    return _GlobalThreshold(sigma=sigma, k=k, bits=bits, ties=ties)


def _kth_largest_bits(
    high: torch.Tensor, k: int, second_pass: Callable[[], Iterable[torch.Tensor]]
) -> tuple[int, int]:
    """From the histogram of the high 16 bits of every |τ| bit pattern and one more pass over the patterns:
    the exact pattern T of the k-th largest, and how many entries equal to T are kept (k minus those above T)."""
    h, above = _bin_of_kth(high, k)
    low = torch.zeros(1 << 16, dtype=torch.int64)
    for bits in second_pass():
        low += torch.bincount(bits[(bits >> 16) == h] & 0xFFFF, minlength=1 << 16)
    lo, above_in_bin = _bin_of_kth(low, k - above)
    return (h << 16) | lo, k - above - above_in_bin


#: elements per float64 chunk when summing moments: temporaries stay at 32 MiB whatever the tensor size
_CHUNK = 1 << 22

Moments = tuple[int, float, float]  # count, mean, M2 = Σ(x − mean)²


def _moments(flat: torch.Tensor) -> Moments:
    out: Moments = (0, 0.0, 0.0)
    for chunk in flat.split(_CHUNK):
        c64 = chunk.to(torch.float64)
        c_mean = float(c64.mean())
        out = _combine_moments(out, (chunk.numel(), c_mean, float(c64.sub_(c_mean).square_().sum())))
    return out


def _combine_moments(a: Moments, b: Moments) -> Moments:
    """Chan et al.'s pairwise update: σ over the whole vector without holding it."""
    (na, ma, m2a), (nb, mb, m2b) = a, b
    if nb == 0:
        return a
    n = na + nb
    delta = mb - ma
    return n, ma + delta * nb / n, m2a + m2b + delta * delta * na * nb / n


def _abs_bits(tau: torch.Tensor) -> torch.Tensor:
    # for non-negative finite float32 the int32 bit pattern orders exactly like the value; int32 (not int64)
    # keeps the per-tensor working set at the size of τ itself
    return tau.reshape(-1).abs().view(torch.int32)


def _bin_of_kth(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest element, and how many elements lie in higher bins."""
    at_or_above = hist.flip(0).cumsum(0).flip(0)  # at_or_above[b] = count in bins >= b
    b = int((at_or_above >= k).nonzero().max())
    return b, int(at_or_above[b + 1]) if b + 1 < hist.numel() else 0


def topk_mask(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Keep exactly k entries of a 1-D float32 tensor, the largest by |value|, ties by lowest index
    (by the same bit histogram as the global scope: no sort, no int64 index tensor)."""
    if k >= flat.numel():
        return torch.ones_like(flat, dtype=torch.bool)
    bits = _abs_bits(flat)
    threshold, ties = _kth_largest_bits(torch.bincount(bits >> 16, minlength=1 << 15), k, lambda: [bits])
    mask = bits > threshold
    mask[(bits == threshold).nonzero().reshape(-1)[:ties]] = True
    return mask


def topk_rows_mask(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """Keep exactly k entries per row of a 2-D tensor, the largest by value, ties by lowest column."""
    rows, m = magnitude.shape
    if k >= m:
        return torch.ones_like(magnitude, dtype=torch.bool)
    threshold = magnitude.kthvalue(m - k + 1, dim=1, keepdim=True).values  # the k-th largest per row
    mask = magnitude >= threshold
    ties = magnitude == threshold
    need = k - (mask.sum(dim=1) - ties.sum(dim=1))  # places left for ties after the entries above
    excess = (ties.sum(dim=1) > need).nonzero().reshape(-1)
    if excess.numel():  # more equal entries than places: keep the lowest columns (rare; only those rows)
        sub = ties[excess]
        mask[excess] = (mask[excess] & ~sub) | (sub & (sub.cumsum(dim=1) <= need[excess, None]))
    return mask


def ternary_mask_and_scale(
    tau: torch.Tensor,
    *,
    density: float,
    alpha: float,
    scope: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor / per-row ComPEFT: (flat keep mask, float32 scale [rows]) for ``tau``."""
    if scope == "per_row" and tau.dim() >= 2:
        rows = tau.reshape(tau.shape[0], -1)
        m = rows.shape[1]
        if m == 0:
            return torch.zeros(0, dtype=torch.bool), torch.zeros(rows.shape[0], dtype=torch.float32)
        mask = topk_rows_mask(rows.abs(), max(1, math.floor(density * m))).reshape(-1)
        if m > 1:
            block = max(1, _CHUNK // m)  # float64 std a block of rows at a time
            sigma = torch.cat([r.to(torch.float64).std(dim=1) for r in rows.split(block)])
        else:  # the unbiased std of one element is undefined; σ = 0 makes such a row all zero
            sigma = torch.zeros(rows.shape[0], dtype=torch.float64)
        return mask, (alpha * sigma).to(torch.float32)
    flat = tau.reshape(-1)
    n = flat.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.bool), torch.zeros(1, dtype=torch.float32)
    count, _, m2 = _moments(flat)
    std = math.sqrt(m2 / (count - 1)) if count > 1 else 0.0
    return topk_mask(flat, max(1, math.floor(density * n))), torch.tensor([alpha * std], dtype=torch.float32)


def _write_compressed(
    reader: _TauReader,
    path: Path,
    *,
    density: float,
    alpha: float,
    scope: str,
    global_plan: _GlobalThreshold | None,
    sparse: bool,
) -> dict[str, Any]:
    entries: dict[str, dict[str, Any]] = {}
    elements = kept_total = original = compressed = 0
    ties_left = global_plan.ties if global_plan else 0
    with _TailHeaderWriter(path) as out:
        for name, tau in reader:  # sorted-name order: the global tie rule depends on it
            flat = tau.reshape(-1)
            if global_plan is not None:
                bits = _abs_bits(flat)
                mask = bits > global_plan.bits
                if ties_left:  # ties at the threshold: lowest flat index first, until the budget is spent
                    tie_positions = (bits == global_plan.bits).nonzero().reshape(-1)[:ties_left]
                    mask[tie_positions] = True
                    ties_left -= tie_positions.numel()
                scale = torch.tensor([alpha * global_plan.sigma], dtype=torch.float32)
            else:
                mask, scale = ternary_mask_and_scale(tau, density=density, alpha=alpha, scope=scope)
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
        stats = {
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
                    "scope": scope,
                    "density": density,
                    "alpha": alpha,
                    "sigma": global_plan.sigma if global_plan else None,
                    **stats,
                    "tensors": entries,
                },
                separators=(",", ":"),
            ),
        }
    return stats


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
