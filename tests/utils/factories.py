"""Tiny model factories shared by every test suite.

They write real Hugging Face-layout folders (config.json, a dummy tokenizer.json, model.safetensors or shards +
index) with ``safetensors.torch.save_file`` directly, so tests of Alloy's own reader/writer never use the code they
test to build their fixtures. Everything is seeded and small (a llama-like model is a few KB).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from merge_ops.demo import llama_shapes

INDEX_NAME = "model.safetensors.index.json"


def make_checkpoint(
    dir: Path,
    tensors: Mapping[str, torch.Tensor],
    *,
    sharded_max_bytes: int | None = None,
    config: dict | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write ``tensors`` as an HF folder; shard greedily (in insertion order) when ``sharded_max_bytes`` is set."""
    folder = Path(dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config if config is not None else {"model_type": "tiny"}))
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "WordLevel"}}))
    meta = {"format": "pt", **(metadata or {})}
    # save_file refuses views sharing storage; contiguous clones make fixtures independent of the caller's tensors.
    owned = {name: t.detach().contiguous().clone() for name, t in tensors.items()}
    if sharded_max_bytes is None:
        save_file(owned, str(folder / "model.safetensors"), metadata=meta)
        return folder
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in owned.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > sharded_max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards, start=1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / filename), metadata=meta)
        for name, tensor in shard.items():
            weight_map[name] = filename
            total += tensor.numel() * tensor.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2))
    return folder


def llama_like_shapes(*, layers: int, hidden: int, vocab: int) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a tiny llama-style decoder (lm_head untied), MLP width 2·hidden."""
    return llama_shapes(layers=layers, hidden=hidden, vocab=vocab, intermediate=2 * hidden)


def make_llama_like(
    dir: Path,
    *,
    layers: int = 2,
    hidden: int = 16,
    vocab: int = 32,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    perturb_from: Path | None = None,
    scale: float = 0.01,
    sharded_max_bytes: int | None = None,
) -> Path:
    """A tiny llama-like checkpoint. With ``perturb_from``, a "fine-tune": that model's float tensors plus
    ``scale``·N(0, 1) noise (seeded by ``seed``), integer buffers copied unchanged. ``model.position_ids``
    is an int64 buffer so every consumer sees a non-float tensor."""
    gen = torch.Generator().manual_seed(seed)
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 2,
        "vocab_size": vocab,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    tensors: dict[str, torch.Tensor] = {}
    if perturb_from is not None:
        for name, base in load_all(perturb_from).items():
            if base.is_floating_point():
                noise = torch.randn(base.shape, generator=gen, dtype=torch.float32) * scale
                tensors[name] = (base.float() + noise).to(base.dtype)
            else:
                tensors[name] = base.clone()
        return make_checkpoint(dir, tensors, sharded_max_bytes=sharded_max_bytes, config=config)
    for name, shape in llama_like_shapes(layers=layers, hidden=hidden, vocab=vocab).items():
        if name.endswith("norm.weight"):
            value = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            value = torch.randn(shape, generator=gen) / hidden**0.5
        tensors[name] = value.to(dtype)
    tensors["model.position_ids"] = torch.arange(8, dtype=torch.int64).unsqueeze(0)
    return make_checkpoint(dir, tensors, sharded_max_bytes=sharded_max_bytes, config=config)


def make_lora_adapter(
    dir: Path,
    *,
    base_dir: Path,
    targets: Iterable[str] = ("q_proj", "v_proj"),
    r: int = 4,
    alpha: float = 8,
    seed: int = 0,
    use_rslora: bool = False,
    fan_in_fan_out: bool = False,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """A PEFT LoRA adapter folder for the 2-D ``*.weight`` tensors of ``base_dir`` whose module name ends with
    one of ``targets``. B is random (not PEFT's zero init) so ΔW ≠ 0. ``rank_pattern`` keys are matched as
    suffixes of the module name, like PEFT. With ``fan_in_fan_out`` the base weight is read as (in, out)."""
    folder = Path(dir)
    folder.mkdir(parents=True, exist_ok=True)
    targets = list(targets)
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, shape in read_shapes(base_dir).items():
        module = name.removesuffix(".weight")
        if not name.endswith(".weight") or len(shape) != 2 or not any(module.endswith(t) for t in targets):
            continue
        rank = _pattern_value(module, rank_pattern, r)
        # PEFT: lora_A is (r, in_features), lora_B is (out_features, r); Conv1D-style weights are (in, out).
        out_features, in_features = (shape[1], shape[0]) if fan_in_fan_out else shape
        prefix = f"base_model.model.{module}"
        tensors[prefix + ".lora_A.weight"] = (torch.randn(rank, in_features, generator=gen) * 0.1).to(dtype)
        tensors[prefix + ".lora_B.weight"] = (torch.randn(out_features, rank, generator=gen) * 0.1).to(dtype)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_dir),
        "r": r,
        "lora_alpha": alpha,
        "target_modules": targets,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "use_rslora": use_rslora,
        "rank_pattern": rank_pattern or {},
        "alpha_pattern": alpha_pattern or {},
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder


def _pattern_value(module: str, pattern: dict | None, default):
    for key, value in (pattern or {}).items():
        if module == key or module.endswith("." + key):
            return value
    return default


def _safetensors_files(folder: Path) -> list[Path]:
    folder = Path(folder)
    if folder.is_file():
        return [folder]
    index = folder / INDEX_NAME
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / f for f in dict.fromkeys(weight_map.values())]
    if (folder / "model.safetensors").exists():
        return [folder / "model.safetensors"]
    return sorted(folder.glob("*.safetensors"))  # adapters, task vectors


def read_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """{name: shape} of every tensor in a factory-made folder or file (headers only)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path in _safetensors_files(folder):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def load_all(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a factory-made (or Alloy-written) folder or file, eagerly — test-sized models only."""
    out: dict[str, torch.Tensor] = {}
    for path in _safetensors_files(folder):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118
                out[name] = f.get_tensor(name)
    return out


def write_word_tokenizer(folder: Path, *, vocab: int | list[str], chat_template: str | None = None) -> None:
    """A real (loadable) word-level fast tokenizer in ``folder``, replacing the dummy tokenizer.json: tokens
    ``[UNK] <s> </s> t3 t4 ...`` (``vocab`` of them), or the given token list. Needs ``transformers``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = (
        vocab if isinstance(vocab, list) else ["[UNK]", "<s>", "</s>", *(f"t{i}" for i in range(3, vocab))]
    )
    inner = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(tokens)}, unk_token="[UNK]"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=inner, unk_token="[UNK]", bos_token="<s>", eos_token="</s>"
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    (Path(folder) / "tokenizer.json").unlink(missing_ok=True)
    fast.save_pretrained(str(folder))
