"""``sequence_classification_accuracy``: accuracy of a sequence-classification model on JSONL ``{text, label}``.

Labels are class ids (ints), or names mapped through ``spec.classes`` (their order gives the ids) or else the
model config's ``label2id``. Score = correct / rows. ``loss`` is the differentiable hook aTLAS trains through
(``DifferentiableEvaluator``): mean cross-entropy over the rows, or their mean prediction entropy (the rows still
carry a label field, which that objective does not read).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from merge_ops.errors import EvaluatorError
from merge_ops.evaluators.base import (
    StateDict,
    field_values,
    load_evaluation_tokenizer,
    load_into,
    load_pretrained,
    model_names,
    read_jsonl,
    tokenize_batches,
)
from merge_ops.evaluators.spec import EvaluatorSpec


def label_ids(
    labels: list[Any], *, names: list[str] | None, label2id: dict[str, int], num_labels: int, path: Path
) -> torch.Tensor:
    lookup = {name: i for i, name in enumerate(names)} if names else dict(label2id)
    ids = []
    for row, label in enumerate(labels, start=1):
        if isinstance(label, bool) or not isinstance(label, int | str):
            raise EvaluatorError(f"{path.name}: row {row}: label must be an int or a class name", row=row)
        value = label if isinstance(label, int) else lookup.get(label)
        if value is None or not 0 <= value < num_labels:
            raise EvaluatorError(f"{path.name}: row {row}: unknown label {label!r}", row=row)
        ids.append(value)
    return torch.tensor(ids)


class SequenceClassificationAccuracyEvaluator:
    def __init__(
        self, spec: EvaluatorSpec, *, model_dir: Path, data_path: Path, device: torch.device
    ) -> None:
        from transformers import AutoModelForSequenceClassification

        rows = read_jsonl(data_path, max_examples=spec.max_examples)
        texts = [str(t) for t in field_values(rows, spec.text_field, path=data_path)]
        self.model = load_pretrained(AutoModelForSequenceClassification, model_dir, device=device)
        names = spec.classes if isinstance(spec.classes, list) else None
        self.labels = label_ids(
            field_values(rows, spec.label_field, path=data_path),
            names=names,
            label2id=dict(self.model.config.label2id or {}),
            num_labels=int(self.model.config.num_labels),
            path=data_path,
        )
        tokenizer = load_evaluation_tokenizer(model_dir)
        self.batches = tokenize_batches(
            tokenizer, texts, batch_size=spec.batch_size, max_length=spec.max_length
        )
        self.device = device
        self.batch_size = spec.batch_size

    @torch.no_grad()
    def predict(self, state_dict: StateDict) -> torch.Tensor:
        load_into(self.model, state_dict)
        preds = [
            self.model(**{k: v.to(self.device) for k, v in b.items()}).logits.argmax(-1).cpu()
            for b in self.batches
        ]
        return torch.cat(preds)

    def score(self, state_dict: StateDict, /) -> float:
        return float((self.predict(state_dict) == self.labels).double().mean())

    def loss(self, state_dict: StateDict, /, *, objective: str = "supervised") -> torch.Tensor:
        if objective not in ("supervised", "entropy"):
            raise EvaluatorError(f"unknown objective {objective!r}; use supervised or entropy")
        weights = model_names(self.model, state_dict)
        total = torch.zeros((), device=self.device)
        for i, batch in enumerate(self.batches):
            inputs = {k: v.to(self.device) for k, v in batch.items()}
            logits = torch.func.functional_call(self.model, weights, args=(), kwargs=inputs).logits.float()
            log_p = logits.log_softmax(dim=-1)
            if objective == "supervised":
                labels = self.labels[i * self.batch_size : (i + 1) * self.batch_size].to(self.device)
                total = total + torch.nn.functional.nll_loss(log_p, labels, reduction="sum")
            else:
                total = total - (log_p.exp() * log_p).sum()
        return total / len(self.labels)
