"""The sources of a merge, one owner: where each comes from (a local path, or a Hub repo fetched through a
``SourceResolver``), what it contributes (behind one ``ModelSource`` interface), and the open set of one merge
(``open_sources``: the reference θ_0 and the K inputs; slices, LoRA and tokenizer alignment through
``merge_ops.structured_sources``).

``open_source(path)`` recognises, from files and headers only:
  - ``lora``: a folder with ``adapter_config.json`` (PEFT LoRA) -> ΔW = s·B·A on its targets, zero elsewhere;
  - ``task_vector``: safetensors whose metadata says ``alloy_format: task_vector`` (``alloy extract``) -> τ;
  - ``compressed_task_vector``: ``alloy_format: compressed_task_vector`` (``alloy compress``) -> τ̃;
  - ``sparse_task_vector``: ``alloy_format: sparse_task_vector`` (``alloy extract --density``) -> τ at kept entries;
  - ``checkpoint``: any other safetensors file/folder (or pickle, with ``allow_pickle``) -> θ_t − θ_0.
Task vectors hold floating tensors only; non-float buffers (position ids, counters) are the base's.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from merge_ops import compressed
from merge_ops.checkpoint import Checkpoint, TensorInfo
from merge_ops.errors import IncompatibleModelsError, SourceNotFoundError
from merge_ops.lora import CONFIG_NAME, LoraAdapter
from merge_ops.params import MethodInfo
from merge_ops.recipe import HubSource, Recipe, Source, parse_source

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
        self.sparse_coverage = checkpoint.metadata.get(compressed.SPARSE_KEY) == "true"
        self._checked = 0

    @property
    def infos(self) -> dict[str, TensorInfo]:
        return self.checkpoint.infos

    @property
    def source_dtypes(self) -> dict[str, str]:
        """The fine-tune's dtype code per tensor (τ itself is stored in float32)."""
        return compressed.source_dtypes(self.checkpoint.metadata)

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


class PackedTaskVectorSource(ModelSource):
    """A compressed (ComPEFT) or sparse task vector; τ is unpacked one tensor at a time."""

    def __init__(self, reader: compressed.PackedTaskVector, *, kind: SourceKind, label: str) -> None:
        super().__init__(label)
        self.kind = kind
        self.reader = reader
        self.sparse_coverage = reader.sparse_coverage

    @property
    def infos(self) -> dict[str, TensorInfo]:
        return self.reader.infos

    @property
    def source_dtypes(self) -> dict[str, str]:
        return {n: e["dtype"] for n, e in self.reader.entries.items()}

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
        fmt = checkpoint.metadata.get(compressed.FORMAT_KEY)
        if fmt == compressed.TASK_VECTOR_FORMAT:
            return TaskVectorSource(checkpoint, label=label)
        if fmt == compressed.COMPRESSED_FORMAT:
            reader = compressed.CompressedTaskVector(checkpoint)
            return PackedTaskVectorSource(reader, kind="compressed_task_vector", label=label)
        if fmt == compressed.SPARSE_FORMAT:  # alloy extract --density
            sparse = compressed.SparseTaskVector(checkpoint)
            return PackedTaskVectorSource(sparse, kind="sparse_task_vector", label=label)
        if fmt is not None:
            raise IncompatibleModelsError(f"{path}: unknown alloy_format {fmt!r}", file=label)
    except BaseException:
        checkpoint.close()
        raise
    return CheckpointSource(checkpoint, label=label)


class SourceResolver(Protocol):
    """What the merge needs of a Hub client (``merge_ops.hub.HubClient``): a local snapshot of a source."""

    def fetch(self, source: HubSource, *, allow_pickle: bool = False) -> Path: ...


class TransferDelta:
    """Fine-tuning transfer's one task vector: θ_src_ft − θ_src_base, computed in float64 (spec), then float32."""

    kind = "transfer_diff"
    is_delta = True
    sparse_coverage = False

    def __init__(self, finetuned: ModelSource, base: ModelSource) -> None:
        self.finetuned, self.base = finetuned, base
        self.label = f"{finetuned.label} - {base.label}"

    @property
    def infos(self) -> dict[str, Any]:
        return self.finetuned.infos

    def task_vector(self, name: str, base: torch.Tensor) -> torch.Tensor:
        diff = self.finetuned.load(name).to(torch.float64) - self.base.load(name).to(torch.float64)
        return diff.to(device=base.device, dtype=torch.float32)

    def close(self) -> None:
        self.finetuned.close()
        self.base.close()


def local_path(source: Source, *, resolver: SourceResolver | None = None, allow_pickle: bool = False) -> Path:
    """A local folder/file for ``source``: Hub sources are fetched through the resolver (a ``HubClient``)."""
    parsed = parse_source(source)
    if isinstance(parsed, HubSource):
        if resolver is None:
            raise SourceNotFoundError(f"{parsed.uri()} is a Hub source but no Hub client is configured")
        return Path(resolver.fetch(parsed, allow_pickle=allow_pickle))
    if not parsed.exists():
        raise SourceNotFoundError(f"source not found: {parsed}", source=str(parsed))
    return parsed


@dataclass
class Sources:
    """The open sources of one merge: the reference θ_0 and the K task-vector inputs."""

    reference: ModelSource
    reference_label: str
    inputs: list[Any]
    labels: list[str]
    weights: list[float]
    #: the reference is also input 0 (a soup without a base): its task vector is zero
    reference_is_input: bool = False
    side_files_from: Path | None = None

    def close(self) -> None:
        for src in {id(s): s for s in [self.reference, *self.inputs]}.values():
            with contextlib.suppress(Exception):
                src.close()


def open_sources(recipe: Recipe, info: MethodInfo, resolver: SourceResolver | None) -> Sources:
    """Open every source of ``recipe`` (Hub ones fetched through ``resolver``) as the merge reads them."""
    opened: list[Any] = []

    def open_(source: Source) -> ModelSource:
        path = local_path(source, resolver=resolver, allow_pickle=recipe.allow_pickle)
        src = open_source(path, allow_pickle=recipe.allow_pickle)
        opened.append(src)
        return src

    try:
        if info.kind == "transfer":
            assert recipe.target_base and recipe.source_base and recipe.source_finetuned
            target = open_(recipe.target_base)
            diff = TransferDelta(open_(recipe.source_finetuned), open_(recipe.source_base))
            side = local_path(recipe.source_finetuned, resolver=resolver)
            return Sources(
                target,
                source_uri(recipe.target_base),
                [diff],
                [diff.label],
                [1.0],
                side_files_from=side if side.is_dir() else None,
            )
        copy_from = recipe.output.copy_files_from
        side_source = (
            recipe.base or recipe.models[0].source if copy_from == "base" else recipe.models[copy_from].source
        )
        if recipe.slices or recipe.tokenizer or recipe.base_lora or any(m.lora for m in recipe.models):
            from merge_ops.structured_sources import open_structured_sources

            resolve = lambda s: local_path(s, resolver=resolver, allow_pickle=recipe.allow_pickle)  # noqa: E731
            structured = open_structured_sources(recipe, open_, source_uri, resolve)
            side = local_path(side_source, resolver=resolver)
            structured.side_files_from = side if side.is_dir() else None
            return structured
        weights = recipe.model_weights()
        models = [open_(m.source) for m in recipe.models]
        labels = [source_uri(m.source) for m in recipe.models]
        if recipe.base is not None:
            reference, ref_label = open_(recipe.base), source_uri(recipe.base)
            ref_is_input = False
        else:  # a soup without a base: model 0 is the reference, its task vector is zero
            reference, ref_label, ref_is_input = models[0], labels[0], True
        if reference.is_delta:
            raise IncompatibleModelsError(
                f"the base {ref_label} is a {reference.kind}, not a full checkpoint"
            )
        side = local_path(side_source, resolver=resolver)
        return Sources(
            reference,
            ref_label,
            models,
            labels,
            weights,
            ref_is_input,
            side_files_from=side if side.is_dir() else None,
        )
    except BaseException:
        for src in opened:
            with contextlib.suppress(Exception):
                src.close()
        raise


def source_uri(source: Source) -> str:
    """A source as one string: its ``hf://`` URI or its path."""
    return source.uri() if isinstance(source, HubSource) else str(source)
