"""The on-disk formats of task vectors, apart from the operations on them (``merge_ops.artifacts``,
``merge_ops.sparse_task_vector``).

**Task-vector folder**: an HF-layout folder of float32 τ, each shard's metadata holding ``alloy_format:
task_vector``, the fine-tune's dtype per tensor (``alloy_source_dtypes``, JSON) and ``alloy_sparse_coverage``
(true when absent tensors are zero deltas, e.g. a compressed LoRA).

**Packed task vectors** (``compressed_task_vector``: ComPEFT's ±scale; ``sparse_task_vector``: exact values): one
``model.safetensors`` whose metadata key (``alloy_compression`` / ``alloy_sparse_task_vector``) holds JSON with,
per tensor, ``shape``, source ``dtype``, ``encoding`` and ``kept`` count. The kept positions of a tensor are
``<name>::mask`` (bit-packed by ``kernels.pack_bits``: bit b of byte j is flat element 8j+b) or
``<name>::indices`` (int32, or int64 past 2³¹ elements: sorted flat positions), whichever is smaller (ties go to
the mask); the values are the format's own pieces. The header is written last (``TailHeaderWriter``), because
kept counts, hence shapes, are known only after the data pass. Readers check metadata and pieces against each
other first, so a hostile file gets a ``CorruptCheckpointError`` naming file and tensor, never an out-of-range
index.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path
from typing import Any, BinaryIO

import torch

from kernels import pack_bits, unpack_bits
from merge_ops.checkpoint import DTYPES, Checkpoint, TensorInfo, dtype_code
from merge_ops.errors import CorruptCheckpointError, IncompatibleModelsError

FORMAT_KEY = "alloy_format"
TASK_VECTOR_FORMAT = "task_vector"
COMPRESSED_FORMAT = "compressed_task_vector"
VERSION_KEY = "alloy_format_version"
SOURCE_DTYPES_KEY = "alloy_source_dtypes"
SPARSE_KEY = "alloy_sparse_coverage"
COMPRESSION_KEY = "alloy_compression"
SPARSE_FORMAT = "sparse_task_vector"
SPARSE_META_KEY = "alloy_sparse_task_vector"

#: a piece's name -> (allowed dtype codes, shape)
Expected = dict[str, tuple[tuple[str, ...], tuple[int, ...]]]


def source_dtypes(metadata: dict[str, str]) -> dict[str, str]:
    try:
        value = json.loads(metadata.get(SOURCE_DTYPES_KEY, "{}"))
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


class TailHeaderWriter:
    """A single safetensors file whose header is written last: tensors stream into a scratch data file with
    running offsets, then header + data are assembled (copying only the small packed payload)."""

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

    def add_positions(self, name: str, mask: torch.Tensor) -> tuple[str, torch.Tensor, int]:
        """Store the kept positions of one tensor (flat bool ``mask``) as a bit mask or indices, whichever is
        smaller; returns (encoding, the positions in order, the bytes stored)."""
        positions = mask.nonzero().reshape(-1)
        n, kept = mask.numel(), positions.numel()
        index_dtype = torch.int32 if n <= 2**31 - 1 else torch.int64
        if kept * index_dtype.itemsize < (n + 7) // 8:
            self.add(f"{name}::indices", positions.to(index_dtype))
            return "indices", positions, kept * index_dtype.itemsize
        self.add(f"{name}::mask", pack_bits(mask))
        return "mask", positions, (n + 7) // 8

    def __enter__(self) -> TailHeaderWriter:
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


class PackedTaskVector:
    """Reader of a packed task vector: validated entries, their positions; subclasses add the values."""

    meta_key: str
    #: the piece every entry has, whose file is the tensor's file
    anchor: str
    #: whether tensors absent from the file are zero deltas (a compressed LoRA)
    sparse_coverage = False

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.checkpoint = checkpoint
        self.file = next(iter(checkpoint.infos.values())).file if checkpoint.infos else checkpoint.path
        try:
            self.params: dict[str, Any] = json.loads(checkpoint.metadata[self.meta_key])
            entries = self.params["tensors"]
            if not isinstance(entries, dict):
                raise TypeError("tensors is not an object")
        except (KeyError, ValueError, TypeError) as exc:
            raise CorruptCheckpointError(
                f"{self.file}: bad {self.meta_key} metadata ({exc!r})", file=str(self.file)
            ) from None
        self.entries: dict[str, dict[str, Any]] = {}
        self.infos: dict[str, TensorInfo] = {}
        for name, entry in entries.items():
            self._validate(name, entry)
            self.entries[name] = entry
            self.infos[name] = TensorInfo(
                name=name,
                dtype=entry["dtype"],
                shape=tuple(entry["shape"]),
                file=checkpoint.infos[f"{name}{self.anchor}"].file,
            )

    def bad(self, name: str, problem: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            f"{self.file}: tensor {name!r}: {problem}", file=str(self.file), tensor=name
        )

    def value_pieces(self, name: str, entry: dict[str, Any]) -> Expected:
        raise NotImplementedError

    def load_tau(self, name: str) -> torch.Tensor:
        """float32 τ of ``name`` in its original shape."""
        raise NotImplementedError

    def _validate(self, name: str, entry: Any) -> None:
        if not isinstance(entry, dict) or entry.get("encoding") not in ("mask", "indices"):
            raise self.bad(name, "entry has no valid encoding")
        shape, kept, dtype = entry.get("shape"), entry.get("kept"), entry.get("dtype")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise self.bad(name, f"bad shape {shape!r}")
        n = math.prod(shape)
        if dtype not in DTYPES or not isinstance(kept, int) or not 0 <= kept <= n:
            raise self.bad(name, f"bad dtype {dtype!r} or kept count {kept!r}")
        expect = self.value_pieces(name, entry)
        if entry["encoding"] == "mask":
            expect[f"{name}::mask"] = (("U8",), ((n + 7) // 8,))
        else:
            expect[f"{name}::indices"] = (("I32", "I64"), (kept,))
        for key, (codes, piece_shape) in expect.items():
            info = self.checkpoint.infos.get(key)
            if info is None or info.dtype not in codes or info.shape != piece_shape:
                raise self.bad(name, f"piece {key!r} is missing or not {'/'.join(codes)} {list(piece_shape)}")

    def entry(self, name: str) -> dict[str, Any]:
        entry = self.entries.get(name)
        if entry is None:
            raise IncompatibleModelsError(
                f"{self.file}: no tensor {name!r}", tensor=name, file=str(self.file)
            )
        return entry

    def positions(self, name: str) -> torch.Tensor:
        """The kept flat positions of ``name``, in increasing order (checked against the metadata)."""
        entry = self.entry(name)
        n, kept = math.prod(entry["shape"]), entry["kept"]
        if entry["encoding"] == "mask":
            positions = unpack_bits(self.checkpoint.load(f"{name}::mask"), n).nonzero().reshape(-1)
            if positions.numel() != kept:
                raise self.bad(name, f"mask has {positions.numel()} set bits, metadata says {kept}")
            return positions
        positions = self.checkpoint.load(f"{name}::indices").to(torch.int64)
        if kept and (
            int(positions.min()) < 0
            or int(positions.max()) >= n
            or not bool((positions[1:] > positions[:-1]).all())
        ):
            raise self.bad(name, "indices are out of range or not strictly increasing")
        return positions

    def close(self) -> None:
        self.checkpoint.close()


class CompressedTaskVector(PackedTaskVector):
    """ComPEFT's τ̃: ``<name>::signs`` (one bit per kept entry in position order, 1 = negative) and
    ``<name>::scale`` (float32 α·σ: one value, or one per row for ``per_row``); ``load_tau`` is float32 τ̃."""

    meta_key = COMPRESSION_KEY
    anchor = "::signs"

    def __init__(self, checkpoint: Checkpoint) -> None:
        super().__init__(checkpoint)
        self.sparse_coverage = checkpoint.metadata.get(SPARSE_KEY) == "true"

    def value_pieces(self, name: str, entry: dict[str, Any]) -> Expected:
        shape = entry["shape"]
        rows = shape[0] if self.params.get("scope") == "per_row" and len(shape) >= 2 else 1
        scale = self.checkpoint.infos.get(f"{name}::scale")
        if scale is None or scale.dtype != "F32" or scale.shape not in ((1,), (rows,)):
            raise self.bad(name, "scale is missing or has the wrong shape")
        return {f"{name}::signs": (("U8",), ((entry["kept"] + 7) // 8,))}

    def load_tau(self, name: str) -> torch.Tensor:
        positions = self.positions(name)
        shape, kept = tuple(self.entries[name]["shape"]), self.entries[name]["kept"]
        n = math.prod(shape)
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


class SparseTaskVector(PackedTaskVector):
    """Exact values at the kept positions (``alloy extract --density``): ``<name>::values`` (float32, in position
    order); ``load_tau`` is float32 τ in the original shape."""

    meta_key = SPARSE_META_KEY
    anchor = "::values"

    def value_pieces(self, name: str, entry: dict[str, Any]) -> Expected:
        return {f"{name}::values": (("F32",), (entry["kept"],))}

    def load_tau(self, name: str) -> torch.Tensor:
        positions = self.positions(name)
        shape = tuple(self.entries[name]["shape"])
        tau = torch.zeros(math.prod(shape), dtype=torch.float32)
        if positions.numel():
            tau[positions] = self.checkpoint.load(f"{name}::values").to(torch.float32)
        return tau.reshape(shape)
