"""The evaluator protocol, the registry (built-ins + ``alloy.evaluators`` entry points) and shared helpers.

An evaluator is built once per job from an ``EvaluatorSpec`` (it reads and tokenizes the held-out file and loads
the architecture once) and then scores many candidate state dicts: ``score(state_dict) -> float``, higher is
better. A plugin is an entry point in the ``alloy.evaluators`` group naming a factory with the built-ins'
signature ``factory(spec, *, model_dir, data_path, device) -> Evaluator``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from importlib import import_module
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from merge_ops.errors import EvaluatorError
from merge_ops.evaluators.spec import ENTRY_POINT_GROUP, EvaluatorSpec

StateDict = Mapping[str, torch.Tensor]


@runtime_checkable
class Evaluator(Protocol):
    """Scores a full state dict on held-out data; higher is better (losses are negated)."""

    def score(self, state_dict: StateDict, /) -> float: ...


@runtime_checkable
class DifferentiableEvaluator(Evaluator, Protocol):
    """An evaluator that can also return a differentiable loss (lower is better) of a state dict whose tensors
    may require grad: aTLAS (``merge_ops.atlas``) trains coefficients through it. ``objective`` is
    ``supervised`` (cross-entropy on the labelled rows) or ``entropy`` (mean prediction entropy, no labels)."""

    def loss(self, state_dict: StateDict, /, *, objective: str) -> torch.Tensor: ...


EvaluatorFactory = Callable[..., Evaluator]

_BUILTINS = {
    "causal_lm_loss": "merge_ops.evaluators.causal_lm_loss:CausalLMLossEvaluator",
    "sequence_classification_accuracy": "merge_ops.evaluators.sequence_classification_accuracy:SequenceClassificationAccuracyEvaluator",
    "embedding_prompt_accuracy": "merge_ops.evaluators.embedding_prompt_accuracy:EmbeddingPromptAccuracyEvaluator",
}


def get_evaluator_factory(kind: str) -> EvaluatorFactory:
    """A built-in by name, else the ``alloy.evaluators`` entry point of that name."""
    if kind in _BUILTINS:
        module, attr = _BUILTINS[kind].split(":")
        return getattr(import_module(module), attr)  # type: ignore[no-any-return]
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == kind:
            try:
                return ep.load()  # type: ignore[no-any-return]
            except Exception as exc:  # a broken plugin is the user's error, reported with its name
                raise EvaluatorError(f"cannot load evaluator plugin {kind!r}: {exc}", evaluator=kind) from exc
    raise EvaluatorError(f"unknown evaluator {kind!r}", evaluator=kind)


def build_evaluator(
    spec: EvaluatorSpec, *, model_dir: Path, data_root: Path | None = None, device: str | torch.device = "cpu"
) -> Evaluator:
    """Build the evaluator of ``spec``. ``model_dir`` gives the architecture/config/tokenizer (``spec.model``
    overrides it); a relative ``spec.data`` is resolved against ``data_root`` (the caller confines it)."""
    data_path = Path(spec.data)
    if not data_path.is_absolute() and data_root is not None:
        data_path = data_root / data_path
    if not data_path.is_file():
        raise EvaluatorError(f"evaluator data file not found: {spec.data}", path=spec.data)
    folder = Path(spec.model) if spec.model else model_dir
    factory = get_evaluator_factory(spec.kind)
    evaluator = factory(spec, model_dir=folder, data_path=data_path, device=torch.device(device))
    if not callable(getattr(evaluator, "score", None)):
        raise EvaluatorError(f"evaluator {spec.kind!r} has no score(state_dict) method", evaluator=spec.kind)
    return evaluator


def read_jsonl(path: Path, *, max_examples: int | None = None) -> list[dict[str, Any]]:
    """Rows of a JSONL file (blank lines skipped); a malformed line is an error naming its number."""
    rows: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise EvaluatorError(
                    f"{path.name}:{number}: not valid JSON ({exc.msg})", line=number
                ) from None
            if not isinstance(row, dict):
                raise EvaluatorError(f"{path.name}:{number}: each line must be a JSON object", line=number)
            rows.append(row)
            if max_examples is not None and len(rows) >= max_examples:
                break
    if not rows:
        raise EvaluatorError(f"evaluator data file {path.name} has no rows")
    return rows


def field_values(rows: list[dict[str, Any]], field: str, *, path: Path) -> list[Any]:
    missing = [i for i, row in enumerate(rows, start=1) if field not in row]
    if missing:
        raise EvaluatorError(
            f"{path.name}: row {missing[0]} has no field {field!r}", field=field, row=missing[0]
        )
    return [row[field] for row in rows]


def load_into(model: torch.nn.Module, state_dict: StateDict) -> None:
    """Copy a checkpoint's tensors into ``model``, accepting names with or without the architecture's
    base-model prefix (a ``BertModel`` checkpoint into ``BertForSequenceClassification``: ``bert.``).

    Every model parameter must be covered, except ones tied to a covered tensor (lm_head ↔ embeddings);
    non-float extras in the checkpoint (position_ids buffers) are ignored, float extras are an error.
    """
    own = model.state_dict()
    with torch.no_grad():
        for name, tensor in model_names(model, state_dict).items():
            own[name].copy_(tensor.to(own[name].dtype))


def model_names(model: torch.nn.Module, state_dict: StateDict) -> dict[str, torch.Tensor]:
    """``state_dict``'s tensors under the model's own names (see ``load_into`` for the rules), without
    copying: ``torch.func.functional_call`` with this dict keeps the graph to tensors that require grad."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    own = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    extras: list[str] = []
    for name, tensor in state_dict.items():
        for candidate in (name, f"{prefix}.{name}" if prefix else name, name.removeprefix(f"{prefix}.")):
            if candidate in own:
                mapped[candidate] = tensor
                break
        else:
            if tensor.is_floating_point():
                extras.append(name)
    if extras:
        raise EvaluatorError(
            f"checkpoint tensors not in the evaluator's architecture: {', '.join(extras[:5])}",
            tensors=extras[:20],
        )
    loaded_ptrs = {own[k].data_ptr() for k in mapped}
    missing = [
        k
        for k in own
        if k not in mapped and own[k].is_floating_point() and own[k].data_ptr() not in loaded_ptrs
    ]
    if missing:
        raise EvaluatorError(
            f"checkpoint lacks tensors the evaluator needs: {', '.join(missing[:5])}", tensors=missing[:20]
        )
    return mapped


def load_pretrained(auto_class: Any, model_dir: Path, *, device: torch.device, **kwargs: Any) -> Any:
    """``auto_class.from_pretrained`` in float32 eval mode, with a typed error for unusable folders."""
    try:
        model = auto_class.from_pretrained(str(model_dir), dtype=torch.float32, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise EvaluatorError(f"cannot load the evaluator's model from {model_dir}: {exc}") from exc
    return model.to(device).eval()


def load_evaluation_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError, KeyError) as exc:
        raise EvaluatorError(f"cannot load a tokenizer from {model_dir}: {exc}") from exc
    if tokenizer.pad_token is None:
        # causal LMs often ship without a pad token; padding is masked out of every score
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def tokenize_batches(
    tokenizer: Any, texts: list[str], *, batch_size: int, max_length: int
) -> list[dict[str, torch.Tensor]]:
    """Tokenize once, at build time, in file order (each batch padded to its longest row)."""
    batches = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        batches.append(
            dict(tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt"))
        )
    return batches
