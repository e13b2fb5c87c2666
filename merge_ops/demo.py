"""Small synthetic checkpoints for ``alloy demo`` and the benchmarks: a llama-shaped base and fine-tunes of it.

The fine-tunes are the base plus sparse, low-rank-ish perturbations (a few rows each), so the merge methods have
something to keep, trim and disagree about.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from merge_ops.writer import ShardedWriter


def llama_shapes(
    *, layers: int, hidden: int, vocab: int, intermediate: int | None = None
) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a llama-style decoder (untied lm_head); the MLP width defaults to ~8/3·hidden."""
    inter = intermediate or ((hidden * 8 // 3 + 63) // 64 * 64 if hidden >= 64 else 2 * hidden)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (hidden, hidden),
            p + "self_attn.k_proj.weight": (hidden, hidden),
            p + "self_attn.v_proj.weight": (hidden, hidden),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        }
    return shapes | {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}


def write_synthetic_model(
    folder: Path,
    *,
    layers: int = 2,
    hidden: int = 64,
    vocab: int = 256,
    seed: int = 0,
    base_seed: int | None = None,
    delta_scale: float = 0.01,
    dtype: torch.dtype = torch.float32,
    shard_size: int = 2**62,
) -> Path:
    """Write a llama-shaped checkpoint. With ``base_seed`` it is a fine-tune: the base of that seed plus a delta
    drawn from ``seed``. Tensors are generated one at a time, so a multi-GB model needs little memory."""
    shapes = llama_shapes(layers=layers, hidden=hidden, vocab=vocab)
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "vocab_size": vocab,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    buffer_name = "model.rotary_inv_freq_steps"  # a non-float buffer: merges copy it byte for byte
    plan = [(name, dtype, shape) for name, shape in shapes.items()] + [
        (buffer_name, torch.int64, (hidden // 2,))
    ]
    writer = ShardedWriter(folder, plan=plan, shard_size=shard_size, metadata={"format": "pt"})
    for index, (name, shape) in enumerate(shapes.items()):
        weight = _base_tensor(
            shape, seed=(base_seed if base_seed is not None else seed) * 100_003 + index, name=name
        )
        if base_seed is not None:
            gen = torch.Generator().manual_seed(seed * 7_919 + index)
            delta = torch.randn(shape, generator=gen) * delta_scale
            if len(shape) == 2:  # concentrate the update on a few rows, like a real fine-tune
                rows = torch.rand(shape[0], generator=gen) < 0.25
                delta *= rows.unsqueeze(1) * 3.0
            weight = weight + delta
        writer.write(name, weight.to(dtype))
    writer.write(buffer_name, torch.arange(hidden // 2, dtype=torch.int64))
    writer.close()
    return folder


def _base_tensor(shape: tuple[int, ...], *, seed: int, name: str) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen) * (1.0 / shape[-1] ** 0.5)
