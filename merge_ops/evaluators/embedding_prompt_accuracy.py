"""``embedding_prompt_accuracy``: accuracy of an embedding model with fixed class-prompt heads.

Each class's head is the embedding of ``prompt_template.format(class_name)``, computed once, at build time, by
the evaluator's reference model (``spec.model``, default the recipe's base): the heads stay fixed while
candidate encoders change, as CLIP's zero-shot heads do in the task-vector literature. A text is classified by
the highest cosine between its embedding (mean- or CLS-pooled) and the heads. With ``task_field`` the file
mixes tasks, each with its own class names, and the score is the unweighted mean of per-task accuracies.
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
    read_jsonl,
    tokenize_batches,
)
from merge_ops.evaluators.spec import EvaluatorSpec


def embed(model: Any, batch: dict[str, torch.Tensor], *, pooling: str, device: torch.device) -> torch.Tensor:
    """L2-normalised sentence embeddings (mean pooling over real tokens, or the first token)."""
    batch = {k: v.to(device) for k, v in batch.items()}
    hidden = model(**batch).last_hidden_state.float()
    if pooling == "cls":
        pooled = hidden[:, 0]
    else:
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
    return torch.nn.functional.normalize(pooled, dim=-1)


class EmbeddingPromptAccuracyEvaluator:
    def __init__(
        self, spec: EvaluatorSpec, *, model_dir: Path, data_path: Path, device: torch.device
    ) -> None:
        from transformers import AutoModel

        rows = read_jsonl(data_path, max_examples=spec.max_examples)
        texts = [str(t) for t in field_values(rows, spec.text_field, path=data_path)]
        labels = field_values(rows, spec.label_field, path=data_path)
        if spec.task_field is None:
            assert isinstance(spec.classes, list)  # the spec's validator guarantees it
            classes_by_task: dict[str, list[str]] = {"": spec.classes}
            tasks = [""] * len(rows)
        else:
            assert isinstance(spec.classes, dict)
            classes_by_task = spec.classes
            tasks = [str(t) for t in field_values(rows, spec.task_field, path=data_path)]
        self.pooling, self.device = spec.pooling, device
        self.model = load_pretrained(AutoModel, model_dir, device=device)
        tokenizer = load_evaluation_tokenizer(model_dir)
        # per row: its task, and its label as an index into that task's class list
        self.task_names = sorted(set(tasks))
        self.row_task = torch.tensor([self.task_names.index(t) for t in tasks])
        self.row_label = torch.tensor(
            [
                _label_index(label, classes_by_task, task, row, data_path)
                for row, (label, task) in enumerate(zip(labels, tasks, strict=True), start=1)
            ]
        )
        with torch.no_grad():
            self.heads = {
                t: torch.cat(
                    [
                        embed(self.model, b, pooling=self.pooling, device=device)
                        for b in tokenize_batches(
                            tokenizer,
                            [spec.prompt_template.format(c) for c in classes_by_task[t]],
                            batch_size=spec.batch_size,
                            max_length=spec.max_length,
                        )
                    ]
                )
                for t in self.task_names
            }
        self.batches = tokenize_batches(
            tokenizer, texts, batch_size=spec.batch_size, max_length=spec.max_length
        )

    @torch.no_grad()
    def per_task_accuracy(self, state_dict: StateDict) -> dict[str, float]:
        load_into(self.model, state_dict)
        embeddings = torch.cat(
            [embed(self.model, b, pooling=self.pooling, device=self.device) for b in self.batches]
        )
        result = {}
        for index, task in enumerate(self.task_names):
            rows = self.row_task == index
            predicted = (embeddings[rows.to(embeddings.device)] @ self.heads[task].T).argmax(-1).cpu()
            result[task] = float((predicted == self.row_label[rows]).double().mean())
        return result

    def score(self, state_dict: StateDict, /) -> float:
        accuracies = self.per_task_accuracy(state_dict)
        return sum(accuracies.values()) / len(accuracies)


def _label_index(label: Any, classes: dict[str, list[str]], task: str, row: int, path: Path) -> int:
    names = classes.get(task)
    if names is None:
        raise EvaluatorError(f"{path.name}: row {row}: task {task!r} has no class names", row=row)
    if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(names):
        return label
    if isinstance(label, str) and label in names:
        return names.index(label)
    raise EvaluatorError(f"{path.name}: row {row}: label {label!r} is not one of {names}", row=row)
