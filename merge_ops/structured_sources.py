"""Sources that reshape what a merge reads: a model with a LoRA applied, and a model read through a slice plan.

Both look like full checkpoints to the engine (``infos`` + ``load``), so the streaming merge is unchanged:
  - ``LoraMergedSource``: θ + s·B·A on the adapter's targets (its full weights replace the model's), the way
    mergekit's ``model+lora`` runs PEFT's ``merge_and_unload`` before merging; computed in float32, stored back in
    the model's dtype, one tensor at a time.
  - ``SlicedSource``: the output's tensor names (layers renumbered) -> a tensor of one of the opened models, per
    ``merge_ops.slices.plan_slices``.
``open_structured_sources`` is the preflight hook: it opens each distinct model once and returns the ``Sources`` of
a recipe with ``slices`` (or with LoRA-adapted models).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from merge_ops.checkpoint import TensorInfo
from merge_ops.errors import IncompatibleModelsError
from merge_ops.lora import LoraAdapter
from merge_ops.slices import (
    LAYER_COUNT_KEYS,
    Feed,
    SliceSpec,
    layer_count_problems,
    layer_of,
    plan_slices,
    split_slice,
)
from merge_ops.sources import ModelSource, SourceKind
from merge_ops.tokenizer import VOCAB_TENSOR


class LoraMergedSource(ModelSource):
    """A full checkpoint with a PEFT LoRA adapter merged into it (mergekit ``model+lora``). θ + s·B·A is summed in
    float32 and rounded once to the model's dtype (PEFT rounds ΔW to a half-precision model's dtype first: the
    results agree exactly on float32 models, and to half-precision rounding otherwise)."""

    kind: SourceKind = "checkpoint"
    is_delta = False

    def __init__(self, model: ModelSource, adapter: LoraAdapter, *, label: str) -> None:
        super().__init__(label)
        if model.is_delta:
            raise IncompatibleModelsError(
                f"{model.label} is a {model.kind}; a LoRA can only be applied to a full checkpoint",
                source=model.label,
            )
        self.model, self.adapter = model, adapter
        unknown = sorted(set(adapter.infos) - set(model.infos))
        if unknown:
            raise IncompatibleModelsError(
                f"{label}: the adapter changes tensors {model.label} lacks: {', '.join(unknown[:5])}",
                source=label,
            )
        for name, info in adapter.infos.items():
            if tuple(info.shape) != tuple(model.infos[name].shape):
                raise IncompatibleModelsError(
                    f"{label}: tensor {name!r} is {list(info.shape)} in the adapter but "
                    f"{list(model.infos[name].shape)} in {model.label}",
                    source=label,
                    tensor=name,
                )

    @property
    def infos(self) -> dict[str, TensorInfo]:
        return self.model.infos

    def load(self, name: str) -> torch.Tensor:
        weight = self.model.load(name)
        if name in self.adapter.pairs:
            return (weight.to(torch.float32) + self.adapter.delta(name)).to(weight.dtype)
        if name in self.adapter.full:  # modules_to_save: the adapter's copy replaces the module's weight
            return self.adapter.checkpoint.load(self.adapter.full[name]).to(weight.dtype)
        return weight

    def task_vector(self, name: str, base: torch.Tensor) -> torch.Tensor:
        return self.load(name).to(device=base.device, dtype=torch.float32) - base.to(torch.float32)

    def close(self) -> None:
        self.adapter.close()
        self.model.close()


class SlicedSource(ModelSource):
    """Output tensor names -> tensors of the opened models (``feeds``: name -> (model, its tensor name))."""

    kind: SourceKind = "checkpoint"
    is_delta = False

    def __init__(self, feeds: dict[str, tuple[ModelSource, str]], *, label: str) -> None:
        super().__init__(label)
        self.feeds = feeds
        self._infos = {
            out: TensorInfo(name=out, dtype=info.dtype, shape=info.shape, file=info.file)
            for out, (src, name) in feeds.items()
            for info in [src.infos[name]]
        }

    @property
    def infos(self) -> dict[str, TensorInfo]:
        return self._infos

    def load(self, name: str) -> torch.Tensor:
        src, source_name = self.feeds[name]
        return src.load(source_name)

    def task_vector(self, name: str, base: torch.Tensor) -> torch.Tensor:
        return self.load(name).to(device=base.device, dtype=torch.float32) - base.to(torch.float32)

    def close(self) -> None:
        # several sliced sources share the opened models; closing a checkpoint twice is harmless
        close_all(list({id(src): src for src, _ in self.feeds.values()}.values()))


def open_with_lora(open_: Callable[[Any], ModelSource], source: Any, lora: Any, label: str) -> ModelSource:
    """``source`` opened, with the adapter at ``lora`` merged in when set."""
    model = open_(source)
    if lora is None:
        return model
    adapter_src = open_(lora)
    adapter = getattr(adapter_src, "adapter", None)
    if not isinstance(adapter, LoraAdapter):
        raise IncompatibleModelsError(f"{label}: {lora} is not a PEFT LoRA adapter folder", source=str(lora))
    return LoraMergedSource(model, adapter, label=f"{label}+{lora}")


def open_sliced(
    specs: list[SliceSpec],
    base: Any,
    open_: Callable[[Any], ModelSource],
    label_of: Callable[[Any], str],
    base_lora: Any = None,
) -> tuple[SlicedSource | None, list[SlicedSource], list[ModelSource]]:
    """(the sliced θ_0 or None, the sliced input of each slot, the opened models to close)."""
    opened: dict[int, ModelSource] = {}

    def names_of(key: int, pair: tuple[Any, Any]) -> list[str]:
        if key not in opened:
            source, lora = as_source(pair[0]), as_source(pair[1])
            opened[key] = open_with_lora(open_, source, lora, label_of(source))
        return list(opened[key].infos)

    try:
        plan = plan_slices(specs, base, names_of, base_lora)
        counts = {key: _layer_count(src) for key, src in opened.items()}
        problems = layer_count_problems(specs, counts, plan)
        if problems:
            raise IncompatibleModelsError(
                "slices do not fit the models: " + "; ".join(problems), problems=problems
            )
    except BaseException:
        close_all(list(opened.values()))
        raise

    def sliced(table: dict[str, Feed], label: str) -> SlicedSource:
        return SlicedSource({out: (opened[f.key], f.name) for out, f in table.items()}, label=label)

    inputs_per_slice = [split_slice(spec, base, base_lora)[1] for spec in specs]
    labels = [
        " + ".join(
            f"{label_of(as_source(ins[j].source))}[{ins[j].layers[0]}:{ins[j].layers[1]}]"
            for ins in inputs_per_slice
        )
        for j in range(len(plan.slots))
    ]
    inputs = [sliced(table, label) for table, label in zip(plan.slots, labels, strict=True)]
    reference = sliced(plan.reference, label_of(base)) if plan.reference is not None else None
    return reference, inputs, list(opened.values())


def as_source(value: Any) -> Any:
    """A slice's raw source (a string or a {repo, revision, subfolder} mapping) as a recipe ``Source``."""
    from merge_ops.recipe import HubSource

    return HubSource.model_validate(value) if isinstance(value, dict) else value


def _layer_count(src: ModelSource) -> int:
    layers = [layer for name in src.infos if (layer := layer_of(name)) is not None]
    return 1 + max(layers) if layers else 0


def close_all(sources: list[ModelSource]) -> None:
    for src in sources:
        with contextlib.suppress(Exception):
            src.close()


def open_structured_sources(
    recipe: Any,
    open_: Callable[[Any], ModelSource],
    label_of: Callable[[Any], str],
    resolve: Callable[[Any], Path],
) -> Any:
    """The preflight hook for recipes with ``slices``, LoRA-adapted models or a ``tokenizer``: their ``Sources``.
    ``resolve`` gives a source's local folder (the tokenizer a recipe names)."""
    from merge_ops.slices import SliceSpec as _Spec
    from merge_ops.sources import Sources

    opened: list[ModelSource] = []
    reference: ModelSource | None
    inputs: list[ModelSource]
    try:
        if recipe.slices is not None:
            specs = [s if isinstance(s, _Spec) else _Spec.model_validate(s) for s in recipe.slices]
            sliced_reference, sliced_inputs, opened = open_sliced(
                specs, recipe.base, open_, label_of, recipe.base_lora
            )
            reference, inputs = sliced_reference, list(sliced_inputs)
            labels = [src.label for src in inputs]
        else:
            inputs = [open_with_lora(open_, m.source, m.lora, label_of(m.source)) for m in recipe.models]
            opened = list(inputs)
            labels = [src.label for src in inputs]
            reference = (
                open_with_lora(open_, recipe.base, recipe.base_lora, label_of(recipe.base))
                if recipe.base is not None
                else None
            )
            if reference is not None:
                opened.append(reference)
        ref_is_input = reference is None
        if reference is None:  # no base: input 0 is the reference, its task vector is zero
            reference = inputs[0]
        if getattr(recipe, "tokenizer", None) is not None:
            reference, inputs = align_vocabulary(recipe, reference, inputs, ref_is_input, resolve)
        return Sources(
            reference,
            label_of(recipe.base) if recipe.base is not None else labels[0],
            list(inputs),
            labels,
            recipe.model_weights(),
            ref_is_input,
        )
    except BaseException:
        close_all(opened)
        raise


def finish_side_files(recipe: Any, sources: Any, folder: Path) -> list[str]:
    """After the side files are copied: ``config.json`` gets the sliced output's layer count; the tokenizer of
    ``recipe.tokenizer`` (with its ``vocab_size``) and the ``chat_template`` replace the copied tokenizer files.
    Returns the names of the files written or changed."""
    from merge_ops import tokenizer as tok

    changed: list[str] = []
    vocabulary = getattr(sources.reference, "vocabulary", None)
    template = getattr(recipe, "chat_template", None)
    if vocabulary is not None or template is not None:
        members = [sources.reference, *sources.inputs]
        folders = list(dict.fromkeys(model_folder(m, next(iter(m.infos)))[2] for m in members if m.infos))
        picked = tok.pick_chat_template(template, folders) if template is not None else None
        if vocabulary is not None:
            changed += tok.save_tokenizer(
                vocabulary.tokenizer, folder, chat_template=picked, vocab_size=vocabulary.size
            )
        elif picked is not None and sources.side_files_from is not None:
            donor = tok.load_tokenizer(sources.side_files_from)
            changed += tok.save_tokenizer(donor, folder, chat_template=picked, vocab_size=None)
        if vocabulary is not None:
            changed.append("config.json")
    if recipe.slices is not None:
        config = folder / "config.json"
        if config.is_file():
            data = json.loads(config.read_text(encoding="utf-8"))
            layers = sum(
                SliceSpec.model_validate(s).length if isinstance(s, dict) else s.length for s in recipe.slices
            )
            key = next((k for k in LAYER_COUNT_KEYS if k in data), "num_hidden_layers")
            data[key] = layers
            config.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
            changed.append(config.name)
    return changed


# ---------------------------------------------------------------------------------------------------------------
# vocabulary alignment (merge_ops.tokenizer)


def model_folder(src: ModelSource, name: str) -> tuple[ModelSource, str, Path]:
    """The opened model behind ``src`` for tensor ``name``: (that model, its tensor name, its folder)."""
    if isinstance(src, SlicedSource):
        inner, inner_name = src.feeds[name]
        return model_folder(inner, inner_name)
    if isinstance(src, VocabAlignedSource):
        return model_folder(src.inner, name)
    if isinstance(src, LoraMergedSource):
        return src, name, Path(src.model.label)
    return src, name, Path(src.label)


class _Aligner:
    """Re-indexes the token rows of every member for one tensor at a time (the last one is cached: the engine
    asks for the same tensor once per member)."""

    def __init__(self, vocabulary: Any, members: list[ModelSource]) -> None:
        self.vocabulary, self.members = vocabulary, members
        self._name: str | None = None
        self._aligned: list[torch.Tensor] = []
        self._served: set[int] = set()

    def aligned(self, name: str, position: int) -> torch.Tensor:
        if name != self._name:
            tensors = []
            for member in self.members:
                model, inner_name, folder = model_folder(member, name)
                tensors.append((str(folder), model.load(inner_name)))
            self._aligned = self.vocabulary.align(tensors)
            self._name, self._served = name, set()
        self._served.add(position)
        tensor = self._aligned[position]
        if len(self._served) == len(self.members):  # every member has its rows: hold nothing past this tensor
            self._name, self._aligned = None, []
        return tensor


class VocabAlignedSource(ModelSource):
    """A full checkpoint whose embedding / lm_head rows follow the output vocabulary."""

    kind: SourceKind = "checkpoint"
    is_delta = False

    def __init__(self, inner: ModelSource, aligner: _Aligner, position: int) -> None:
        super().__init__(inner.label)
        self.inner, self.aligner, self.position = inner, aligner, position
        size = aligner.vocabulary.size
        self._infos = {
            name: TensorInfo(name=name, dtype=info.dtype, shape=(size, *info.shape[1:]), file=info.file)
            if VOCAB_TENSOR.search(name)
            else info
            for name, info in inner.infos.items()
        }

    @property
    def vocabulary(self) -> Any:
        return self.aligner.vocabulary

    @property
    def infos(self) -> dict[str, TensorInfo]:
        return self._infos

    def load(self, name: str) -> torch.Tensor:
        if VOCAB_TENSOR.search(name):
            return self.aligner.aligned(name, self.position)
        return self.inner.load(name)

    def task_vector(self, name: str, base: torch.Tensor) -> torch.Tensor:
        return self.load(name).to(device=base.device, dtype=torch.float32) - base.to(torch.float32)

    def close(self) -> None:
        self.inner.close()


def align_vocabulary(
    recipe: Any,
    reference: ModelSource,
    inputs: list[ModelSource],
    ref_is_input: bool,
    resolve: Callable[[Any], Path],
) -> tuple[ModelSource, list[ModelSource]]:
    """``reference`` and ``inputs`` re-indexed to the vocabulary ``recipe.tokenizer`` asks for."""
    from merge_ops.tokenizer import build_vocabulary

    members = inputs if ref_is_input else [*inputs, reference]  # mergekit appends the base after the models
    for member in members:
        if member.is_delta:
            raise IncompatibleModelsError(
                f"tokenizer: {member.label} is a {member.kind}; re-indexing token rows needs full checkpoints",
                source=member.label,
            )
    folders: list[Path] = []
    for member in members:
        names = [n for n in member.infos if VOCAB_TENSOR.search(n)] or list(member.infos)[:1]
        for name in names:
            folder = model_folder(member, name)[2]
            if folder not in folders:
                folders.append(folder)
    base = None if ref_is_input else model_folder(reference, next(iter(reference.infos)))[2]
    spec = recipe.tokenizer
    source = None if spec.source in ("base", "union") else resolve(spec.source)
    vocabulary = build_vocabulary(spec, base=base, models=folders, source=source, resolve=resolve)
    aligner = _Aligner(vocabulary, members)
    wrapped: list[ModelSource] = [VocabAlignedSource(m, aligner, i) for i, m in enumerate(members)]
    new_inputs = wrapped[: len(inputs)]
    new_reference = new_inputs[0] if ref_is_input else wrapped[-1]
    return new_reference, new_inputs
