"""LiNeS block parsing, per-stack depth, head policy and auto-α."""

from __future__ import annotations

import pytest

from merge_ops.lines import auto_alpha, block_map, block_report, find_block, lines_scales, tensor_side

LLAMA = (
    ["model.embed_tokens.weight"]
    + [f"model.layers.{i}.{p}" for i in range(4) for p in ("self_attn.q_proj.weight", "mlp.up_proj.weight")]
    + ["model.norm.weight", "lm_head.weight"]
)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("transformer.resblocks.10.mlp.c_fc.weight", ("transformer.", 10)),
        ("model.layers.7.self_attn.q_proj.weight", ("model.", 7)),
        ("transformer.h.2.attn.c_attn.weight", ("transformer.", 2)),
        ("encoder.block.3.layer.0.SelfAttention.q.weight", ("encoder.", 3)),
        ("decoder.block.3.layer.1.EncDecAttention.k.weight", ("decoder.", 3)),
        ("model.layers.5.block_sparse_moe.experts.0.w1.weight", ("model.", 5)),
        ("blocks.0.attn.qkv.weight", ("", 0)),
        ("model.layers.12.self_attn.q_proj.lora_A.weight", ("model.", 12)),
        ("model.graph.3.weight", None),  # 'h.3.' inside 'graph.3.' is not a block container
        ("model.embed_tokens.weight", None),
        ("lm_head.weight", None),
    ],
)
def test_find_block(name, expected):
    assert find_block(name) == expected


def test_llama_ramp_and_head_policy():
    scales = lines_scales(LLAMA, alpha=0.5, beta=0.3)
    assert scales["model.embed_tokens.weight"] == 0.5
    assert [scales[f"model.layers.{i}.mlp.up_proj.weight"] for i in range(4)] == pytest.approx(
        [0.5, 0.6, 0.7, 0.8]
    )
    assert scales["model.norm.weight"] == scales["lm_head.weight"] == 0.5
    head = lines_scales(LLAMA, alpha=0.5, beta=0.3, head_scale="alpha_plus_beta")
    assert head["lm_head.weight"] == head["model.norm.weight"] == pytest.approx(0.8)
    assert head["model.embed_tokens.weight"] == 0.5


def test_encoder_decoder_stacks_ramp_separately():
    names = [f"encoder.block.{i}.layer.0.w" for i in range(3)] + [
        f"decoder.block.{i}.layer.1.w" for i in range(5)
    ]
    blocks = block_map(names)
    assert blocks["encoder.block.2.layer.0.w"].num_blocks == 3
    assert blocks["decoder.block.2.layer.1.w"].num_blocks == 5
    scales = lines_scales(names, alpha=0.0, beta=1.0)
    assert scales["encoder.block.2.layer.0.w"] == 1.0
    assert scales["decoder.block.2.layer.1.w"] == 0.5
    assert scales["decoder.block.4.layer.1.w"] == 1.0


def test_scale_is_non_decreasing_and_identity_at_alpha_one_beta_zero():
    names = [f"visual.transformer.resblocks.{i}.attn.in_proj_weight" for i in range(12)] + ["visual.proj"]
    scales = lines_scales(names, alpha=0.2, beta=0.8)
    ramp = [scales[n] for n in names[:12]]
    assert ramp == sorted(ramp) and ramp[0] == 0.2 and ramp[-1] == pytest.approx(1.0)
    assert set(lines_scales(names, alpha=1.0, beta=0.0).values()) == {1.0}


def test_single_block_and_filtered_indices():
    assert lines_scales(["layers.0.w"], alpha=0.3, beta=0.7) == {"layers.0.w": 0.3}
    # a subset of layers still ramps 0..L-1 over the indices present
    scales = lines_scales(["layers.10.w", "layers.11.w", "layers.12.w"], alpha=0.0, beta=1.0)
    assert list(scales.values()) == [0.0, 0.5, 1.0]


def test_sides_and_report():
    assert tensor_side("model.embed_tokens.weight") == "embedding"
    assert tensor_side("transformer.wte.weight") == "embedding"
    assert tensor_side("transformer.ln_f.weight") == "output"
    assert tensor_side("lm_head.weight") == "output"
    assert tensor_side("visual.proj") == "output"
    assert tensor_side("model.layers.0.mlp.w") == "block"
    assert tensor_side("logit_scale") == "other"
    report = block_report(LLAMA)
    assert report["model.layers.3.mlp.up_proj.weight"] == {
        "stack": "model.",
        "block": 3,
        "depth": 3,
        "num_blocks": 4,
    }
    assert report["lm_head.weight"] == {"side": "output"}


def test_auto_alpha():
    assert auto_alpha(sum_l1=12.0, merged_l1=12.0, num_models=4) == 0.25  # task arithmetic: 1/T
    assert auto_alpha(sum_l1=12.0, merged_l1=3.0, num_models=2) == 2.0
    assert auto_alpha(sum_l1=5.0, merged_l1=0.0, num_models=5) == 0.2
    with pytest.raises(ValueError):
        auto_alpha(sum_l1=1.0, merged_l1=1.0, num_models=0)
