"""``causal_lm_loss``: minus the mean next-token cross-entropy of a causal LM on a JSONL text file.

The mean is over every predicted token of the file (token-weighted, padding excluded), so batch size doesn't
change the score. Score = −loss: higher is better, as greedy soup expects.
"""

from __future__ import annotations

from pathlib import Path

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


class CausalLMLossEvaluator:
    def __init__(
        self, spec: EvaluatorSpec, *, model_dir: Path, data_path: Path, device: torch.device
    ) -> None:
        from transformers import AutoModelForCausalLM

        rows = read_jsonl(data_path, max_examples=spec.max_examples)
        texts = [str(t) for t in field_values(rows, spec.text_field, path=data_path)]
        tokenizer = load_evaluation_tokenizer(model_dir)
        self.batches = tokenize_batches(
            tokenizer, texts, batch_size=spec.batch_size, max_length=spec.max_length
        )
        if sum(int(b["attention_mask"][:, 1:].sum()) for b in self.batches) == 0:
            raise EvaluatorError(f"{data_path.name}: no text has two tokens, nothing to predict")
        self.model = load_pretrained(AutoModelForCausalLM, model_dir, device=device)
        self.device = device

    @torch.no_grad()
    def mean_loss(self, state_dict: StateDict) -> float:
        load_into(self.model, state_dict)
        total, count = 0.0, 0
        for batch in self.batches:
            ids = batch["input_ids"].to(self.device)
            mask = batch["attention_mask"].to(self.device)
            logits = self.model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            targets = ids[:, 1:]
            # a target counts when both it and its context token are real (right padding)
            valid = (mask[:, 1:] * mask[:, :-1]).bool()
            losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
            total += float(losses[valid].double().sum())
            count += int(valid.sum())
        return total / count

    def score(self, state_dict: StateDict, /) -> float:
        return -self.mean_loss(state_dict)
