"""PEFT LoRA adapters: ΔW = s·B·A against a direct float64 computation, every scaling rule, refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from merge_ops.errors import CorruptCheckpointError, IncompatibleModelsError, SourceNotFoundError
from merge_ops.lora import LoraAdapter
from tests.utils.factories import load_all, make_checkpoint, make_llama_like, make_lora_adapter


@pytest.fixture
def base(tmp_path: Path) -> Path:
    return make_llama_like(tmp_path / "base")


def _expected(adapter_dir: Path, module: str, scaling: float, *, transpose: bool = False) -> torch.Tensor:
    raw = load_all(adapter_dir)
    a = raw[f"base_model.model.{module}.lora_A.weight"].double()
    b = raw[f"base_model.model.{module}.lora_B.weight"].double()
    delta = scaling * (b @ a)
    return delta.t() if transpose else delta


def test_delta_matches_float64_and_covers_only_targets(tmp_path: Path, base: Path) -> None:
    folder = make_lora_adapter(tmp_path / "lora", base_dir=base, targets=["q_proj", "v_proj"], r=4, alpha=8)
    adapter = LoraAdapter(folder)
    base_shapes = {n: t.shape for n, t in load_all(base).items()}
    assert set(adapter.infos) == {
        f"model.layers.{i}.self_attn.{p}.weight" for i in (0, 1) for p in ("q_proj", "v_proj")
    }
    for name, info in adapter.infos.items():
        assert info.shape == tuple(base_shapes[name])
        delta = adapter.delta(name)
        assert delta.dtype == torch.float32
        expected = _expected(folder, name.removesuffix(".weight"), 8 / 4)
        torch.testing.assert_close(delta.double(), expected, rtol=1e-6, atol=1e-7)
    with pytest.raises(IncompatibleModelsError):
        adapter.delta("model.layers.0.self_attn.k_proj.weight")
    adapter.close()


def test_rslora_scaling(tmp_path: Path, base: Path) -> None:
    folder = make_lora_adapter(tmp_path / "lora", base_dir=base, r=4, alpha=8, use_rslora=True)
    adapter = LoraAdapter(folder)
    name = "model.layers.1.self_attn.v_proj.weight"
    expected = _expected(folder, name.removesuffix(".weight"), 8 / math.sqrt(4))
    torch.testing.assert_close(adapter.delta(name).double(), expected, rtol=1e-6, atol=1e-7)


def test_rank_and_alpha_patterns(tmp_path: Path, base: Path) -> None:
    folder = make_lora_adapter(
        tmp_path / "lora",
        base_dir=base,
        r=4,
        alpha=8,
        rank_pattern={"layers.1.self_attn.q_proj": 2},
        alpha_pattern={"v_proj": 3},
    )
    adapter = LoraAdapter(folder)
    cases = {
        "model.layers.1.self_attn.q_proj": 8 / 2,  # rank 2 from the pattern, default alpha
        "model.layers.0.self_attn.q_proj": 8 / 4,
        "model.layers.0.self_attn.v_proj": 3 / 4,  # alpha 3 from the pattern
        "model.layers.1.self_attn.v_proj": 3 / 4,
    }
    for module, scaling in cases.items():
        torch.testing.assert_close(
            adapter.delta(module + ".weight").double(),
            _expected(folder, module, scaling),
            rtol=1e-6,
            atol=1e-7,
        )


def test_fan_in_fan_out_transposes(tmp_path: Path) -> None:
    # GPT-2 Conv1D weights are stored (in, out): make them non-square so a missing transpose can't hide
    base = make_checkpoint(tmp_path / "gpt2", {"h.0.attn.c_attn.weight": torch.randn(6, 18)})
    folder = make_lora_adapter(
        tmp_path / "lora", base_dir=base, targets=["c_attn"], r=2, alpha=4, fan_in_fan_out=True
    )
    adapter = LoraAdapter(folder)
    assert adapter.infos["h.0.attn.c_attn.weight"].shape == (6, 18)
    expected = _expected(folder, "h.0.attn.c_attn", 2.0, transpose=True)
    torch.testing.assert_close(
        adapter.delta("h.0.attn.c_attn.weight").double(), expected, rtol=1e-6, atol=1e-7
    )


def test_bf16_adapter_is_computed_in_float32(tmp_path: Path, base: Path) -> None:
    folder = make_lora_adapter(tmp_path / "lora", base_dir=base, dtype=torch.bfloat16)
    adapter = LoraAdapter(folder)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert adapter.infos[name].dtype == "BF16"
    torch.testing.assert_close(
        adapter.delta(name).double(),
        _expected(folder, name.removesuffix(".weight"), 2.0),
        rtol=1e-6,
        atol=1e-7,
    )


def _adapter(folder: Path, tensors: dict[str, torch.Tensor], **config) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2, **config})
    )
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def test_full_weights_in_adapter_are_replacements(tmp_path: Path) -> None:
    head = torch.randn(4, 3)
    folder = _adapter(
        tmp_path / "a",
        {
            "base_model.model.score.weight": head,  # modules_to_save, as PEFT saves it
            "base_model.model.x.lora_A.weight": torch.randn(2, 3),
            "base_model.model.x.lora_B.weight": torch.randn(5, 2),
        },
    )
    adapter = LoraAdapter(folder)
    base_head = torch.randn(4, 3)
    assert set(adapter.infos) == {"score.weight", "x.weight"}
    torch.testing.assert_close(adapter.delta("score.weight", base_head), head - base_head)


@pytest.mark.parametrize(
    ("tensors", "config", "error", "match"),
    [
        (
            {
                "base_model.model.emb.lora_embedding_A": torch.ones(2, 8),
                "base_model.model.emb.lora_embedding_B": torch.ones(8, 2),
            },
            {},
            IncompatibleModelsError,
            "embedding",
        ),
        (
            {
                "base_model.model.conv.lora_A.weight": torch.ones(2, 3, 3, 3),
                "base_model.model.conv.lora_B.weight": torch.ones(4, 2, 1, 1),
            },
            {},
            IncompatibleModelsError,
            "convolution",
        ),
        (
            {
                "base_model.model.x.lora_A.weight": torch.ones(2, 3),
                "base_model.model.x.lora_magnitude_vector": torch.ones(4),
            },
            {},
            IncompatibleModelsError,
            "DoRA",
        ),
        ({"base_model.model.x.lora_A.weight": torch.ones(2, 3)}, {}, CorruptCheckpointError, "partner"),
        (
            {
                "base_model.model.x.lora_A.weight": torch.ones(3, 3),
                "base_model.model.x.lora_B.weight": torch.ones(4, 3),
            },
            {},
            CorruptCheckpointError,
            "rank 2",
        ),
        (
            {"base_model.model.x.lora_A.weight": torch.ones(2, 3)},
            {"use_dora": True},
            IncompatibleModelsError,
            "DoRA",
        ),
        (
            {"base_model.model.x.lora_A.weight": torch.ones(2, 3)},
            {"peft_type": "IA3"},
            IncompatibleModelsError,
            "IA3",
        ),
    ],
    ids=["embedding", "conv", "dora_tensor", "unpaired", "rank_mismatch", "dora_config", "not_lora"],
)
def test_unsupported_or_broken_adapters_are_refused(tmp_path: Path, tensors, config, error, match) -> None:
    folder = _adapter(tmp_path / "a", tensors, **config)
    with pytest.raises(error, match=match) as err:
        LoraAdapter(folder)
    assert str(folder) in str(err.value)


def test_bad_config_and_missing_weights(tmp_path: Path) -> None:
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{oops")
    with pytest.raises(CorruptCheckpointError, match="adapter_config.json"):
        LoraAdapter(folder)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    with pytest.raises(SourceNotFoundError, match="adapter_model"):
        LoraAdapter(folder)


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"use_rslora": True},
        {"rank_pattern": {"blocks.1.q_proj": 2}, "alpha_pattern": {"v_proj": 3.0}},
        {"fan_in_fan_out": True},
    ],
    ids=["plain", "rslora", "patterns", "fan_in_fan_out"],
)
def test_delta_equals_peft_merge_and_unload(tmp_path: Path, config: dict) -> None:
    """Against PEFT itself (optional test extra): merged weight − original weight == our ΔW."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    conv1d = config.get("fan_in_fan_out", False)
    if conv1d:
        pytorch_utils = pytest.importorskip("transformers.pytorch_utils")

        def layer(i: int, o: int) -> torch.nn.Module:
            return pytorch_utils.Conv1D(o, i)  # weight stored (in, out)
    else:

        def layer(i: int, o: int) -> torch.nn.Module:
            return torch.nn.Linear(i, o, bias=False)

    blocks = torch.nn.ModuleList(
        [
            torch.nn.ModuleDict({"q_proj": layer(6, 10), "v_proj": layer(6, 10), "o_proj": layer(10, 6)})
            for _ in range(2)
        ]
    )
    model = torch.nn.Module()
    model.blocks = blocks
    original = {n: p.detach().clone() for n, p in model.state_dict().items()}
    lora_config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False, **config
    )
    wrapped = peft.get_peft_model(model, lora_config)
    wrapped.save_pretrained(tmp_path / "adapter")
    merged = {n: p.detach() for n, p in wrapped.merge_and_unload().state_dict().items()}
    adapter = LoraAdapter(tmp_path / "adapter")
    assert set(adapter.infos) == {f"blocks.{i}.{m}.weight" for i in (0, 1) for m in ("q_proj", "v_proj")}
    for name in original:
        if name in adapter.infos:
            assert adapter.infos[name].shape == tuple(original[name].shape)
            torch.testing.assert_close(
                adapter.delta(name), merged[name] - original[name], rtol=1e-5, atol=1e-6
            )
        else:
            assert torch.equal(merged[name], original[name])
