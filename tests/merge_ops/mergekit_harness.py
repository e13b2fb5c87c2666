"""Run one mergekit config through Alloy and through mergekit 0.1.5 in-process, on tiny float32 checkpoints.

The models are a 4-layer, hidden-16 Llama (an architecture mergekit's tables know): ``base`` and fine-tunes
``ft1``..``ft6`` that share a common direction (so their task vectors correlate, as real fine-tunes of one base
do) plus their own noise. Configs name them ``tiny/<name>``; ``materialize`` points those at the folders.
mergekit is imported once per process (its start-up is most of its cost) and called through
``mergekit.merge.run_merge``.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from tests.utils.factories import (
    load_all,
    make_checkpoint,
    make_llama_like,
    make_lora_adapter,
    write_word_tokenizer,
)

MODEL_NAMES = ("base", "ft1", "ft2", "ft3", "ft4", "ft5", "ft6")
LAYERS = 4
CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"


def make_models(root: Path) -> dict[str, Path]:
    """base + six correlated fine-tunes (float32)."""
    root = Path(root)
    base = make_llama_like(root / "base", layers=LAYERS, hidden=16, vocab=32, seed=0)
    shared_dir = make_llama_like(root / "_direction", perturb_from=base, seed=99, scale=0.02)
    base_t, direction = load_all(base), load_all(shared_dir)
    config = (base / "config.json").read_text()
    paths = {"base": base}
    for i in range(1, len(MODEL_NAMES)):
        gen = torch.Generator().manual_seed(1000 + i)
        tensors = {}
        for name, value in base_t.items():
            if value.is_floating_point():
                common = direction[name] - value
                tensors[name] = value + common + 0.02 * torch.randn(value.shape, generator=gen)
            else:
                tensors[name] = value.clone()
        folder = make_checkpoint(root / f"ft{i}", tensors, config=yaml.safe_load(config))
        paths[f"ft{i}"] = folder
        # PEFT adapters of the base, for model+lora references
        paths[f"lora{i}"] = make_lora_adapter(root / f"lora{i}", base_dir=base, seed=i)
    # real tokenizers (one vocabulary), for the configs that name a tokenizer source or a chat template
    for name in MODEL_NAMES:
        write_word_tokenizer(paths[name], vocab=32, chat_template=None if name == "base" else CHAT_TEMPLATE)
    return paths


def materialize(config: dict[str, Any], models: dict[str, Path]) -> dict[str, Any]:
    """A copy of ``config`` with every ``tiny/<name>`` string replaced by that model's folder."""

    def walk(value: Any) -> Any:
        if isinstance(value, str):
            return re.sub(r"tiny/(\w+)", lambda m: str(models[m[1]]), value)
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        return value

    return walk(copy.deepcopy(config))


def run_mergekit(config: dict[str, Any], out: Path) -> dict[str, torch.Tensor]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    options = MergeOptions(
        device="cpu",
        copy_tokenizer=False,
        write_model_card=False,
        quiet=True,
        lazy_unpickle=False,
        lora_merge_cache=str(out) + "-lora-cache",  # model+lora references are merged there first
    )
    run_merge(MergeConfiguration.model_validate(config), str(out), options=options)
    return load_all(out)


def run_alloy(config: dict[str, Any], out: Path) -> tuple[dict[str, torch.Tensor], Any]:
    from merge_ops.pipeline import run_merge
    from merge_ops.recipe import load_recipe

    recipe = load_recipe(config)
    run_merge(recipe, output_dir=out)
    return load_all(out), recipe


#: float32 rounding of the written weights: both tools round θ (not Δ), so a small Δ on a large θ can differ by
#: a few ulps of θ whatever the merge math
_EPS32 = float(torch.finfo(torch.float32).eps)


@dataclass
class Comparison:
    #: the largest ‖alloy − mergekit‖ / ‖mergekit − θ_0‖ over the tensors (relative error of the merged delta)
    worst: float
    worst_tensor: str
    #: the largest ‖alloy − mergekit‖ / (rtol·‖Δ‖ + 4·eps32·‖θ‖): at most 1 passes
    excess: float
    missing: list[str]


def compare(
    alloy: dict[str, torch.Tensor],
    mergekit: dict[str, torch.Tensor],
    base: dict[str, torch.Tensor],
    *,
    rtol: float = 1e-6,
) -> Comparison:
    """Per tensor, in float64: the merged delta's relative error, and how it compares with ``rtol`` plus the
    float32 rounding of the written weights."""
    worst, worst_name, excess = 0.0, "", 0.0
    missing = [name for name in mergekit if name not in alloy]
    for name, want in mergekit.items():
        if name in missing:
            continue
        got, want64 = alloy[name].double(), want.double()
        reference = base[name].double() if name in base and base[name].shape == want.shape else 0 * want64
        delta_norm = float((want64 - reference).norm())
        err = float((got - want64).norm())
        rel = err / max(delta_norm, 1e-12)
        if rel > worst:
            worst, worst_name = rel, name
        bound = rtol * delta_norm + 4 * _EPS32 * float(want64.norm()) + 1e-30
        excess = max(excess, err / bound)
    return Comparison(worst, worst_name, excess, missing)


def as_float32(config: dict[str, Any]) -> dict[str, Any]:
    """The config computing and writing in float32 (mergekit computes in ``dtype``)."""
    out = copy.deepcopy(config)
    for key in ("dtype", "out_dtype"):
        if key in out:
            out[key] = "float32"
    return out


def with_density_one(config: dict[str, Any]) -> dict[str, Any]:
    """DARE's deterministic part: every density set to 1 (mergekit's and Alloy's masks then keep everything)."""

    def walk(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: (1.0 if k == "density" else walk(v)) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        return value

    return walk(copy.deepcopy(config))


def kept_fraction(merged: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> float:
    """Fraction of entries of the 2-D tensors that differ from the base (the statistics of a random mask)."""
    changed = total = 0
    for name, value in merged.items():
        if value.dim() == 2 and name in base:
            changed += int((value.double() != base[name].double()).sum())
            total += value.numel()
    return changed / max(total, 1)
