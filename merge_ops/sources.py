"""Model sources of a merge: what each local path contributes, behind one interface.

``open_source(path)`` recognises, from files and headers only:
  - ``lora``: a folder with ``adapter_config.json`` (PEFT LoRA) -> ΔW = s·B·A on its targets, zero elsewhere;
  - ``task_vector``: safetensors whose metadata says ``alloy_format: task_vector`` (``alloy extract``) -> τ;
  - ``compressed_task_vector``: ``alloy_format: compressed_task_vector`` (``alloy compress``) -> τ̃;
  - ``sparse_task_vector``: ``alloy_format: sparse_task_vector`` (``alloy extract --density``) -> τ at kept entries;
  - ``checkpoint``: any other safetensors file/folder (or pickle, with ``allow_pickle``) -> θ_t − θ_0.
Task vectors hold floating tensors only; non-float buffers (position ids, counters) are the base's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from merge_ops import artifacts
from merge_ops.checkpoint import Checkpoint, TensorInfo
from merge_ops.errors import IncompatibleModelsError, SourceNotFoundError
from merge_ops.lora import CONFIG_NAME, LoraAdapter

SourceKind = Literal["checkpoint", "lora", "task_vector", "compressed_task_vector", "sparse_task_vector"]


class ModelSource:
    """Base class; see the module docstring. ``label`` names the source in errors and reports."""

    kind: SourceKind
    is_delta: bool = True
    #: True when tensors missing from ``infos`` contribute a zero delta (LoRA) instead of being an error.
    sparse_coverage: bool = False

    def __init__(self, label: str) -> None:
        self.label = label

    @property
    def infos(self) -> dict[str, TensorInfo]:
        raise NotImplementedError

    def load(self, name: str) -> torch.Tensor:
        raise IncompatibleModelsError(
            f"{self.label} is a {self.kind}; it has no full weights to load", source=self.label, tensor=name
        )

    def task_vector(self, name: str, base: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def close(self) -> None:
        return None

    def __enter__(self) -> ModelSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.kind} {self.label!r}>"

    def _check_shape(self, name: str, base: torch.Tensor) -> TensorInfo:
        info = self.infos.get(name)
        if info is None:
            raise IncompatibleModelsError(f"{self.label}: no tensor {name!r}", source=self.label, tensor=name)
        if tuple(base.shape) != info.shape:
            raise IncompatibleModelsError(
                f"{self.label}: tensor {name!r} has shape {list(info.shape)}, the base {list(base.shape)}",
                source=self.label,
                tensor=name,
            )
        return info


class CheckpointSource(ModelSource):
    kind: SourceKind = "checkpoint"
    is_delta = False

    def __init__(self, checkpoint: Checkpoint, *, label: str) -> None:
        super().__init__(label)
        self.checkpoint = checkpoint

    @property
    def infos(self) -> dict[str, TensorInfo]:
        return self.checkpoint.infos

    @property
    def metadata(self) -> dict[str, str]:
        return self.checkpoint.metadata

    def load(self, name: str) -> torch.Tensor:
        return self.checkpoint.load(name)

    def task_vector(self, name: str, base: torch.Tensor) -> torch.Tensor:
        self._check_shape(name, base)
        return self.checkpoint.load(name).to(torch.float32) - base.to(torch.float32)

    def close(self) -> None:
        self.checkpoint.close()


class LoraSource(ModelSource):
    kind: SourceKind = "lora"
    sparse_coverage = True

    def __init__(self, adapter: LoraAdapter, *, label: str) -> None:
        super().__init__(label)
        self.adapter = adapter

    @property
    def infos(self) -> dict[str, TensorInfo]:
        return self.adapter.infos

    def task_vector(self, name: str, base: torch.Tensor) -> torch.Tensor:
        if name not in self.adapter.infos:
            return torch.zeros(base.shape, dtype=torch.float32, device=base.device)
        self._check_shape(name, base)
        return self.adapter.delta(name, base).to(base.device)

    def close(self) -> None:
        self.adapter.close()


class TaskVectorSource(ModelSource):
    """A task-vector folder written by ``extract_task_vector`` (or ``decompress``): τ stored as is."""

    kind: SourceKind = "task_vector"

    def __init__(self, checkpoint: Checkpoint, *, label: str) -> None:
        super().__init__(label)
        self.checkpoint = checkpoint
        self.sparse_coverage = checkpoint.metadata.get(artifacts.SPARSE_KEY) == "true"
        self._checked = 0

    @property
    def infos(self) -> dict[str, TensorInfo]:
        return self.checkpoint.infos

    @property
    def source_dtypes(self) -> dict[str, str]:
        """The fine-tune's dtype code per tensor (τ itself is stored in float32)."""
        return artifacts.source_dtypes(self.checkpoint.metadata)

    def stored_tau(self, name: str) -> torch.Tensor:
        return self.checkpoint.load(name).to(torch.float32)

    def task_vector(self, name: str, base: torch.Tensor) -> torch.Tensor:
        if self.sparse_coverage and name not in self.infos:
            return torch.zeros(base.shape, dtype=torch.float32, device=base.device)
        self._check_shape(name, base)
        tau = self.stored_tau(name).to(base.device)
        if self._checked < _TAU_CHECKS and base.numel() >= 16 and base.is_floating_point():
            self._checked += 1
            _refuse_full_weights(self.label, name, tau, base)
        return tau

    def close(self) -> None:
        self.checkpoint.close()


#: Tensors per task-vector source checked for being full weights (a mislabelled file is so throughout).
_TAU_CHECKS = 8


def _refuse_full_weights(label: str, name: str, tau: torch.Tensor, base: torch.Tensor) -> None:
    """The ``alloy_format: task_vector`` marker is only metadata: a full checkpoint carrying it would be merged
    as a delta (θ_0 + θ_t, silently). A task vector is a small difference, nearly orthogonal to θ_0; full
    weights of a fine-tune have about θ_0's norm and point its way (cosine near 1)."""
    t, b = tau.flatten().double(), base.flatten().double()
    t_norm, b_norm = float(t.norm()), float(b.norm())
    if t_norm == 0 or b_norm == 0:
        return
    cosine = float(t @ b) / (t_norm * b_norm)
    if cosine > 0.9 and t_norm > 0.5 * b_norm:
        raise IncompatibleModelsError(
            f"{label}: marked as a task vector, but tensor {name!r} looks like full weights (cosine with the "
            f"base {cosine:.3f}, norm {t_norm / b_norm:.2f}x the base's); use the fine-tuned checkpoint "
            "itself as the source, or extract a task vector with `alloy extract`",
            source=label,
            tensor=name,
        )


class CompressedTaskVectorSource(ModelSource):
    """A ComPEFT-compressed task vector; τ̃ is decompressed one tensor at a time."""

    kind: SourceKind = "compressed_task_vector"

    def __init__(self, reader: artifacts.CompressedTaskVector, *, label: str) -> None:
        super().__init__(label)
        self.reader = reader
        self.sparse_coverage = reader.sparse_coverage

    @property
    def infos(self) -> dict[str, TensorInfo]:
        return self.reader.infos

    def stored_tau(self, name: str) -> torch.Tensor:
        return self.reader.load_tau(name)

    def task_vector(self, name: str, base: torch.Tensor) -> torch.Tensor:
        if self.sparse_coverage and name not in self.infos:
            return torch.zeros(base.shape, dtype=torch.float32, device=base.device)
        self._check_shape(name, base)
        return self.reader.load_tau(name).to(base.device)

    def close(self) -> None:
        self.reader.close()


def open_source(path: Path, *, allow_pickle: bool = False) -> ModelSource:
    """Open a local source and tell its kind from files and headers (no tensor is read)."""
    path = Path(path)
    label = str(path)
    if not path.exists():
        raise SourceNotFoundError(f"{path}: no such file or folder", file=label)
    if path.is_dir() and (path / CONFIG_NAME).is_file():
        return LoraSource(LoraAdapter(path, allow_pickle=allow_pickle), label=label)
    checkpoint = Checkpoint.open(path, allow_pickle=allow_pickle)
    try:
        fmt = checkpoint.metadata.get(artifacts.FORMAT_KEY)
        if fmt == artifacts.TASK_VECTOR_FORMAT:
            return TaskVectorSource(checkpoint, label=label)
        if fmt == artifacts.COMPRESSED_FORMAT:
            return CompressedTaskVectorSource(artifacts.CompressedTaskVector(checkpoint), label=label)
        if fmt == "sparse_task_vector":  # merge_ops.sparse_task_vector (alloy extract --density)
            from merge_ops.sparse_task_vector import open_sparse_task_vector

            return open_sparse_task_vector(checkpoint, label=label)
        if fmt is not None:
            raise IncompatibleModelsError(f"{path}: unknown alloy_format {fmt!r}", file=label)
    except BaseException:
        checkpoint.close()
        raise
    return CheckpointSource(checkpoint, label=label)
