"""Full fine-tuning of the shared MiniLM encoder on one task, with the fixed class-prompt head.

The head is the evaluator's (``merge_ops.evaluators.embedding_prompt_accuracy``): the base model's normalised
mean-pooled embedding of each class prompt, frozen. Logits are ``scale · cos(embedding(text), head)``; every
encoder weight trains, the head never does, so all fine-tunes share one architecture and one head per task —
the setting of task vectors on CLIP. Fine-tunes are saved with exactly the base's tensor names and dtypes
(non-float buffers copied from the base) plus its config and tokenizer, in Hugging Face layout.
"""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from benchmarks.quality.data import Task
from merge_ops.evaluators.embedding_prompt_accuracy import embed

LOGIT_SCALE = 20.0
SIDE_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)


def class_heads(
    model: torch.nn.Module, tokenizer: Any, prompts: list[str], *, max_length: int
) -> torch.Tensor:
    with torch.no_grad():
        batch = tokenizer(
            prompts,
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        return embed(model, dict(batch), pooling="mean", device=torch.device("cpu"))


def finetune(
    task: Task,
    *,
    base_dir: Path,
    out_dir: Path,
    seed: int,
    steps: int,
    batch_size: int = 16,
    lr: float = 5e-5,
    max_length: int = 48,
) -> float:
    """Fine-tune on ``task.train`` for ``steps`` AdamW steps (linear decay); save to ``out_dir``; seconds."""
    from transformers import AutoModel, AutoTokenizer

    started = time.perf_counter()
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    model = AutoModel.from_pretrained(str(base_dir), dtype=torch.float32)
    model.eval()
    heads = class_heads(
        model, tokenizer, [task.template.format(c) for c in task.classes], max_length=max_length
    )
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            fresh = list(range(len(task.train)))
            rng.shuffle(fresh)
            order += fresh
        rows = [task.train[i] for i in order[:batch_size]]
        del order[:batch_size]
        batch = tokenizer(
            [t for t, _ in rows], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        logits = LOGIT_SCALE * embed(model, dict(batch), pooling="mean", device=torch.device("cpu")) @ heads.T
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor([y for _, y in rows]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    save_like_base(model, base_dir=base_dir, out_dir=out_dir)
    return time.perf_counter() - started


def save_like_base(model: torch.nn.Module, *, base_dir: Path, out_dir: Path) -> None:
    """Write ``model`` with the base file's tensor names/dtypes (non-float tensors: the base's bytes)."""
    own = model.state_dict()
    tensors = {}
    with safe_open(str(base_dir / "model.safetensors"), "pt") as base:
        for name in base.keys():  # noqa: SIM118 - safe_open has keys() but no __iter__
            original = base.get_tensor(name)
            trained = own.get(name)
            if trained is None or not original.is_floating_point():
                tensors[name] = original
            else:
                tensors[name] = trained.detach().to(original.dtype).contiguous().clone()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    for side in SIDE_FILES:
        if (base_dir / side).exists():
            shutil.copy2(base_dir / side, out_dir / side)
