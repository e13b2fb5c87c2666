"""Checkpoint reading: a hostile-safe safetensors header parser, lazy tensor loading, sharded indexes, and the
pickle guard.

Every safetensors file is validated from its header alone before any tensor is touched: the 8-byte header
length against the file size, the JSON (no duplicate keys), dtype codes, shapes against byte ranges, and
offsets in range and contiguous (no overlap, no hole — the layout ``safetensors`` itself writes and accepts).
The header is parsed once, when the checkpoint is opened; tensors are then read one at a time, zero-copy from a
memory map of the tensor's own byte range (``read_tensor``; no re-parse of the header per read, which a 50 MB
header made cost 0.1 s a tensor through ``safe_open``).
Headers are bounded (``MAX_HEADER_BYTES``) far below safetensors' own 100 MB. Pickle files
(``.bin``/``.pt``) are refused unless ``allow_pickle`` and then only go through ``torch.load(weights_only=True)``.
Errors name the file and, where there is one, the tensor.
"""

from __future__ import annotations

import ctypes
import json
import math
import mmap
import os
import re
import struct
import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from merge_ops.errors import (
    CorruptCheckpointError,
    IncompatibleModelsError,
    SourceNotFoundError,
    UnsafeCheckpointError,
)

#: safetensors dtype code -> (torch dtype, bytes per element). Sub-byte codes (F4, F6_*) are not supported.
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "BOOL": (torch.bool, 1),
    "U8": (torch.uint8, 1),
    "I8": (torch.int8, 1),
    "I16": (torch.int16, 2),
    "U16": (torch.uint16, 2),
    "I32": (torch.int32, 4),
    "U32": (torch.uint32, 4),
    "I64": (torch.int64, 8),
    "U64": (torch.uint64, 8),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "F32": (torch.float32, 4),
    "F64": (torch.float64, 8),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
}
DTYPE_CODES: dict[torch.dtype, str] = {dtype: code for code, (dtype, _) in DTYPES.items()}
#: The header (JSON) size limit. safetensors allows 100 MB, but real headers are ~100 bytes a tensor (a 10,000-tensor
#: shard is ~1 MB): 16 MiB is generous for any model and keeps a hostile header from costing seconds to parse.
MAX_HEADER_BYTES = 16 * 2**20
INDEX_NAME = "model.safetensors.index.json"
PICKLE_INDEX_NAME = "pytorch_model.bin.index.json"
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl"}


@dataclass(frozen=True)
class TensorInfo:
    """Header facts about one tensor: safetensors dtype code, shape, and the file holding it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    #: absolute byte offset of the tensor's data in ``file`` (safetensors files read by ``read_safetensors_header``;
    #: None for tensors whose owner reads them another way: pickles, LoRA products, compressed task vectors)
    data_start: int | None = None

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype][0]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPES[self.dtype][1]


@dataclass(frozen=True)
class SafetensorsHeader:
    metadata: dict[str, str]
    infos: dict[str, TensorInfo]
    #: byte ranges (begin, end) relative to the data section, same keys as ``infos``
    offsets: dict[str, tuple[int, int]]


def torch_dtype(code: str) -> torch.dtype:
    """safetensors dtype code ("F32", "BF16", ...) -> torch dtype."""
    try:
        return DTYPES[code][0]
    except KeyError:
        raise ValueError(f"unknown safetensors dtype code {code!r}") from None


def dtype_code(dtype: torch.dtype) -> str:
    try:
        return DTYPE_CODES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} has no safetensors code") from None


def read_safetensors_header(path: Path) -> SafetensorsHeader:
    """Parse and validate the header of ``path``; raise ``CorruptCheckpointError`` naming file and tensor."""
    path = Path(path)
    try:
        file_size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _corrupt(path, f"file is {file_size} bytes, too short for the 8-byte header length")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES:
                raise _corrupt(
                    path,
                    f"header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit (real headers are "
                    "about 100 bytes a tensor); re-save the checkpoint with safetensors, without the oversized "
                    "__metadata__",
                )
            if 8 + header_len > file_size:
                raise _corrupt(
                    path, f"header length {header_len} runs past the end of the {file_size}-byte file"
                )
            raw = f.read(header_len)
    except FileNotFoundError:
        raise SourceNotFoundError(f"{path}: no such file", file=str(path)) from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: "[[[[..." nesting bombs
        raise _corrupt(path, f"header is not valid JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _corrupt(path, "__metadata__ must map strings to strings")
    data_size = file_size - 8 - header_len
    infos: dict[str, TensorInfo] = {}
    offsets: dict[str, tuple[int, int]] = {}
    for name, entry in header.items():
        info, span = _validate_entry(path, name, entry, data_size, data_start=8 + header_len)
        infos[name] = info
        offsets[name] = span
    _check_layout(path, offsets, data_size)
    return SafetensorsHeader(metadata=metadata, infos=infos, offsets=offsets)


def _validate_entry(
    path: Path, name: str, entry: Any, data_size: int, *, data_start: int
) -> tuple[TensorInfo, tuple[int, int]]:
    if not name:
        raise _corrupt(path, "empty tensor name")
    if not isinstance(entry, dict):
        raise _corrupt(path, "entry is not an object", tensor=name)
    dtype, shape, span = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise _corrupt(path, f"unknown dtype {dtype!r}", tensor=name)
    if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
        raise _corrupt(path, f"shape {shape!r} is not a list of non-negative integers", tensor=name)
    if not (isinstance(span, list) and len(span) == 2 and all(_is_uint(o) for o in span)):
        raise _corrupt(path, f"data_offsets {span!r} is not a pair of non-negative integers", tensor=name)
    begin, end = span
    if begin > end:
        raise _corrupt(path, f"data_offsets {span} begin after end", tensor=name)
    if end > data_size:
        raise _corrupt(
            path,
            f"data_offsets {span} run past the {data_size}-byte data section (truncated file?)",
            tensor=name,
        )
    expected = math.prod(shape) * DTYPES[dtype][1]
    if end - begin != expected:
        raise _corrupt(
            path,
            f"shape {shape} of {dtype} needs {expected} bytes but data_offsets {span} span {end - begin}",
            tensor=name,
        )
    info = TensorInfo(name=name, dtype=dtype, shape=tuple(shape), file=path, data_start=data_start + begin)
    return info, (begin, end)


def _check_layout(path: Path, offsets: dict[str, tuple[int, int]], data_size: int) -> None:
    """Byte ranges must tile the data section: no overlap (aliasing), no hole, nothing trailing."""
    cursor = 0
    previous = None
    for name, (begin, end) in sorted(offsets.items(), key=lambda item: item[1]):
        if begin < cursor:
            raise _corrupt(path, f"data_offsets [{begin}, {end}] overlap tensor {previous!r}", tensor=name)
        if begin > cursor:
            raise _corrupt(
                path, f"{begin - cursor} unaccounted bytes before data_offsets [{begin}, {end}]", tensor=name
            )
        cursor, previous = end, name
    if cursor != data_size:
        raise _corrupt(path, f"data section is {data_size} bytes but tensors cover {cursor}")


#: madvise(MADV_POPULATE_READ) (Linux 5.14+; Python has no name for it before 3.13): map the tensor's pages in
#: the loader thread, so the compute thread does not take the page faults
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22 if sys.platform.startswith("linux") else None)


def _load_madvise() -> Callable[[int, int, int], int] | None:
    """libc's madvise through ctypes, which releases the GIL for the call: ``mmap.madvise`` holds it while the
    kernel maps every page, so the loader thread's populate blocked the Python of every other thread."""
    if _MADV_POPULATE_READ is None:
        return None
    try:
        func = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    func.restype = ctypes.c_int
    return func


_madvise = _load_madvise()


_MADV_DONTNEED = 4  # Linux

#: the private file mappings ``read_tensor`` handed out, by id(tensor): (the tensor, mapping address, length);
#: an entry leaves with its tensor (a WeakKeyDictionary would compare tensors with their elementwise ``==``)
_mappings: dict[int, tuple[weakref.ref[torch.Tensor], int, int]] = {}


def _register_mapping(tensor: torch.Tensor, address: int, length: int) -> None:
    key = id(tensor)
    _mappings[key] = (weakref.ref(tensor, lambda _: _mappings.pop(key, None)), address, length)


def _populate(tensor: torch.Tensor, mapping_offset: int, length: int) -> None:
    """Fault in the pages of the mapping that starts ``mapping_offset`` bytes before ``tensor``'s data. Refused
    (older kernels): the pages fault in on first use instead."""
    if _madvise is not None and _MADV_POPULATE_READ is not None:
        _madvise(tensor.data_ptr() - mapping_offset, length, _MADV_POPULATE_READ)


def release_pages(tensor: torch.Tensor) -> None:
    """Take a tensor's pages out of this process's page tables now, from whichever thread calls it, when the
    tensor is a mapping ``read_tensor`` made (else nothing is done). The tensor stays valid: a later read maps
    its pages in again from the file, which it never wrote to (never written: copy-on-write pages would be lost).
    Freeing the mapping does the same work (``munmap``) wherever the last reference dies: in the merge's main
    thread that was 30 % of its samples outside imports in a task-arithmetic merge (py-spy), and the loop took
    1.5–2.5 s against 1.3–1.7 s once the loader thread called this instead."""
    entry = _mappings.get(id(tensor))
    if entry is not None and entry[0]() is tensor and _madvise is not None:
        _madvise(entry[1], entry[2], _MADV_DONTNEED)


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """The tensor ``info`` describes, zero-copy from a private memory map of just its validated byte range (one
    mapping per tensor: when the tensor is freed the mapping goes with it, so the pages it touched leave RSS; a
    handle kept per file would hold every page read so far). Copy-on-write, so an in-place op on it never reaches
    the file. A range not aligned to its element size (possible in files not written by safetensors) is copied.
    Safetensors data is little-endian, as torch's CPU storage is on every platform it supports."""
    assert info.data_start is not None
    dtype, itemsize = DTYPES[info.dtype]
    nbytes = info.nbytes
    if nbytes == 0:
        return torch.empty(info.shape, dtype=dtype)
    start = info.data_start
    page_start = start - start % mmap.ALLOCATIONGRANULARITY
    try:
        with open(info.file, "rb") as fh:
            # a file shortened since its header was read would fault (SIGBUS) on access instead of failing here
            size = os.fstat(fh.fileno()).st_size
            if size < start + nbytes:
                raise _corrupt(info.file, f"file ends {start + nbytes - size} bytes early", tensor=info.name)
            mapped = mmap.mmap(
                fh.fileno(), start - page_start + nbytes, offset=page_start, access=mmap.ACCESS_COPY
            )
    except OSError as exc:
        raise _corrupt(info.file, f"cannot read tensor data ({exc})", tensor=info.name) from exc
    offset = start - page_start
    if start % itemsize:
        raw = torch.frombuffer(mapped, dtype=torch.uint8, count=nbytes, offset=offset)
        _populate(raw, offset, len(mapped))
        return raw.clone().view(dtype).reshape(info.shape)
    flat = torch.frombuffer(mapped, dtype=dtype, count=info.numel, offset=offset)
    _populate(flat, offset, len(mapped))
    tensor = flat.reshape(info.shape)
    _register_mapping(tensor, flat.data_ptr() - offset, len(mapped))
    return tensor


def _is_uint(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            # json would silently keep the last one; two readers could then disagree about a tensor
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _corrupt(path: Path, problem: str, *, tensor: str | None = None) -> CorruptCheckpointError:
    where = f"{path}: tensor {tensor!r}: " if tensor is not None else f"{path}: "
    context = {"file": str(path), **({"tensor": tensor} if tensor is not None else {})}
    return CorruptCheckpointError(where + problem, **context)


class Checkpoint:
    """A checkpoint on local disk: one ``.safetensors`` file, an HF folder (single file or sharded with an
    index), or a pickle file/folder when ``allow_pickle``. ``infos`` come from headers only; ``load`` reads
    one tensor. Use ``Checkpoint.open``."""

    def __init__(self, path: Path, infos: dict[str, TensorInfo], metadata: dict[str, str]) -> None:
        self.path = path
        self.infos = infos
        self.metadata = metadata
        self._pickled: tuple[Path, dict[str, torch.Tensor]] | None = None

    @classmethod
    def open(cls, path: Path, *, allow_pickle: bool = False) -> Checkpoint:
        path = Path(path)
        if not path.exists():
            raise SourceNotFoundError(f"{path}: no such file or folder", file=str(path))
        files = _checkpoint_files(path, allow_pickle=allow_pickle)
        if files.pickle:
            return _open_pickle(path, files.weight_map)
        infos: dict[str, TensorInfo] = {}
        headers = {file: read_safetensors_header(file) for file in dict.fromkeys(files.weight_map.values())}
        # shards written together carry the same metadata; the first non-empty one speaks for the checkpoint
        metadata = next((h.metadata for h in headers.values() if h.metadata), {})
        if files.indexed:
            for name, file in files.weight_map.items():
                info = headers[file].infos.get(name)
                if info is None:
                    raise CorruptCheckpointError(
                        f"{path / INDEX_NAME}: tensor {name!r} is mapped to {file.name} which does not hold it",
                        file=str(file),
                        tensor=name,
                    )
                infos[name] = info
        else:
            (header,) = headers.values()
            infos = dict(header.infos)
        return cls(path, infos, metadata)

    def load(self, name: str) -> torch.Tensor:
        info = self.infos.get(name)
        if info is None:
            raise IncompatibleModelsError(
                f"{self.path}: no tensor {name!r}", file=str(self.path), tensor=name
            )
        if info.file.suffix.lower() in PICKLE_SUFFIXES:
            return self._load_pickled(info)
        if info.data_start is not None:
            return read_tensor(info)
        try:
            with safe_open(str(info.file), framework="pt", device="cpu") as handle:
                return handle.get_tensor(name)
        except Exception as exc:  # safetensors raises its own SafetensorError; give it a typed home
            raise _corrupt(info.file, f"cannot read tensor data ({exc})", tensor=name) from exc

    def _load_pickled(self, info: TensorInfo) -> torch.Tensor:
        # keep one pickle shard loaded (mmap'd where the format allows) so a folder of shards stays bounded
        if self._pickled is None or self._pickled[0] != info.file:
            self._pickled = (info.file, load_pickle_state_dict(info.file))
        return self._pickled[1][info.name]

    def close(self) -> None:
        self._pickled = None

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class _Files:
    weight_map: dict[str, Path]  # tensor -> file; for unindexed sources a single "" -> file entry
    indexed: bool
    pickle: bool


def _checkpoint_files(path: Path, *, allow_pickle: bool) -> _Files:
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".safetensors":
            return _Files({"": path}, indexed=False, pickle=False)
        if suffix in PICKLE_SUFFIXES:
            _guard_pickle(path, allow_pickle)
            return _Files({"": path}, indexed=False, pickle=True)
        raise SourceNotFoundError(
            f"{path}: not a checkpoint (.safetensors, or .bin/.pt with allow_pickle)", file=str(path)
        )
    if (path / INDEX_NAME).is_file():
        return _Files(_read_index(path / INDEX_NAME), indexed=True, pickle=False)
    if (path / "model.safetensors").is_file():
        return _Files({"": path / "model.safetensors"}, indexed=False, pickle=False)
    candidates = sorted(path.glob("*.safetensors"))
    if len(candidates) == 1:  # adapter_model.safetensors, task_vector.safetensors, a renamed single file
        return _Files({"": candidates[0]}, indexed=False, pickle=False)
    if len(candidates) > 1:
        raise SourceNotFoundError(
            f"{path}: {len(candidates)} .safetensors files but no {INDEX_NAME} to say how they fit together",
            file=str(path),
        )
    if (path / PICKLE_INDEX_NAME).is_file():
        _guard_pickle(path / PICKLE_INDEX_NAME, allow_pickle)
        return _Files(_read_index(path / PICKLE_INDEX_NAME), indexed=True, pickle=True)
    pickles = sorted(p for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES and p.is_file())
    if len(pickles) == 1:
        _guard_pickle(pickles[0], allow_pickle)
        return _Files({"": pickles[0]}, indexed=False, pickle=True)
    raise SourceNotFoundError(
        f"{path}: no model.safetensors, {INDEX_NAME} or single checkpoint file", file=str(path)
    )


def _read_index(index: Path) -> dict[str, Path]:
    folder = index.parent.resolve()
    try:
        raw = json.loads(index.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicate_keys)
        weight_map = raw["weight_map"]
    except (ValueError, KeyError, TypeError) as exc:
        raise _corrupt(index, f"not a valid index ({exc!r})") from None
    if not isinstance(weight_map, dict):
        raise _corrupt(index, "weight_map is not an object")
    out: dict[str, Path] = {}
    for name, filename in weight_map.items():
        if not isinstance(filename, str) or not filename:
            raise _corrupt(index, f"file {filename!r} is not a file name", tensor=name)
        file = (folder / filename).resolve()
        # "../../x" or an absolute path: an index must not reach outside its own folder
        if file.parent != folder:
            raise UnsafeCheckpointError(
                f"{index}: tensor {name!r}: shard {filename!r} is outside the checkpoint folder",
                file=str(index),
                tensor=name,
            )
        if not file.is_file():
            raise SourceNotFoundError(
                f"{index}: tensor {name!r}: shard {filename!r} is missing", file=str(file), tensor=name
            )
        out[name] = file
    return out


def _guard_pickle(path: Path, allow_pickle: bool) -> None:
    if not allow_pickle:
        raise UnsafeCheckpointError(
            f"{path}: pickle checkpoints can run arbitrary code when loaded; convert to safetensors or set "
            "allow_pickle: true in the recipe (then loaded with torch.load(weights_only=True))",
            file=str(path),
        )


def load_pickle_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)``, memory-mapped when the file is in the zip format. Non-tensor
    entries are dropped; anything the restricted unpickler refuses is an ``UnsafeCheckpointError``."""
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):  # legacy (non-zip) pickles can't be mmap'd; anything else is real
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SourceNotFoundError(f"{path}: no such file", file=str(path)) from None
    except Exception as exc:
        if type(exc).__name__ == "UnpicklingError":
            # torch's text is a multi-line essay with advice that does not apply here; keep what it refused
            found = re.search(r"unsupported global:?(?: GLOBAL)? (\S+)", str(exc), flags=re.IGNORECASE)
            what = f"it references {found[1]}" if found else "it holds objects other than tensors"
            raise UnsafeCheckpointError(
                f"{path}: refused by the weights-only loader: {what}; convert it to safetensors where you trust it",
                file=str(path),
            ) from None
        raise _corrupt(path, f"cannot load pickle ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise _corrupt(path, f"pickle holds a {type(obj).__name__}, not a state dict")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _open_pickle(path: Path, weight_map: dict[str, Path]) -> Checkpoint:
    files = list(dict.fromkeys(weight_map.values()))
    infos: dict[str, TensorInfo] = {}
    for file in files:  # shapes need the pickle itself; mmap keeps this cheap for zip-format files
        for name, tensor in load_pickle_state_dict(file).items():
            if weight_map.get(name, file) != file and "" not in weight_map:
                continue
            if tensor.dtype not in DTYPE_CODES:
                raise _corrupt(file, f"unsupported dtype {tensor.dtype}", tensor=name)
            infos[name] = TensorInfo(
                name=name, dtype=DTYPE_CODES[tensor.dtype], shape=tuple(tensor.shape), file=file
            )
    missing = [n for n in weight_map if n and n not in infos]
    if missing:
        raise CorruptCheckpointError(
            f"{path}: index maps {missing[0]!r} to a file that does not hold it",
            file=str(weight_map[missing[0]]),
            tensor=missing[0],
        )
    return Checkpoint(path, infos, {})
