"""End-to-end merges on tiny generated checkpoints: results against float64 formulas, and every bad input."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from merge_ops.errors import (
    CorruptCheckpointError,
    IncompatibleModelsError,
    MergeCancelled,
    NonFiniteTensorError,
    OutputError,
    SourceNotFoundError,
    UnsafeCheckpointError,
)
from merge_ops.pipeline import plan_merge, run_merge
from merge_ops.recipe import load_recipe
from tests.utils.factories import load_all, make_checkpoint, make_llama_like, make_lora_adapter


def _recipe(out: Path, **fields: object) -> object:
    return load_recipe({"output": {"path": str(out)}, **fields})


def _merge(out: Path, **fields: object) -> dict[str, torch.Tensor]:
    run_merge(_recipe(out, **fields))
    return load_all(out)


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if "alloy-tmp" in p.name]


def test_task_arithmetic_matches_float64_formula(models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "ta"
    merged = _merge(
        out,
        method="task_arithmetic",
        base=str(models["base"]),
        models=[{"source": str(models["a"]), "weight": 0.7}, {"source": str(models["b"]), "weight": -0.3}],
        params={"lambda": 0.9},
    )
    base, a, b = (load_all(models[k]) for k in ("base", "a", "b"))
    for name, tensor in base.items():
        if tensor.is_floating_point():
            expected = base[name].double() + 0.9 * (
                0.7 * (a[name].double() - base[name].double())
                - 0.3 * (b[name].double() - base[name].double())
            )
            torch.testing.assert_close(merged[name].double(), expected, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(merged[name], tensor)  # non-float buffers copied byte for byte


def test_output_layout_card_report_and_provenance(models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "ties"
    recipe = _recipe(
        out,
        method="ties",
        base=str(models["base"]),
        models=[{"source": str(models["a"])}, {"source": str(models["b"])}],
        output={"path": str(out), "shard_size": 4096},
    )
    report = run_merge(recipe)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted({*index["weight_map"].values()})
    assert len(shards) > 1 and all((out / s).exists() for s in shards)
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "tags:" in card and "- ties" in card and "method: ties" in card
    # the card names local sources by folder, never by the server's absolute paths (it may be pushed)
    assert str(tmp_path) not in card and f"- {models['a'].name} (weight 1.0)" in card
    data = json.loads((out / "alloy-report.json").read_text())
    assert data["method"] == "ties" and data["totals"]["merged"] == report.totals["merged"] > 0
    assert 0 < data["totals"]["kept_density"] <= 0.2 + 1e-6
    assert "sign_conflict_rate" in data["totals"]
    assert data["copied_non_float"] == ["model.position_ids"]
    with safe_open(str(out / shards[0]), "pt") as f:
        meta = f.metadata()
    assert meta["alloy_method"] == "ties" and meta["alloy_recipe_sha256"] == recipe.digest()
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "method",
    [
        "linear",
        "model_soup",
        "task_arithmetic",
        "ties",
        "dare_linear",
        "dare_ties",
        "breadcrumbs",
        "breadcrumbs_ties",
        "compeft",
        "model_stock",
        "lines",
        "stages",
    ],
)
def test_every_method_runs_end_to_end(method: str, models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / method
    merged = _merge(
        out,
        method=method,
        base=str(models["base"]),
        models=[{"source": str(models[k])} for k in ("a", "b", "c")],
    )
    base = load_all(models["base"])
    assert set(merged) == set(base)
    for name, tensor in merged.items():
        assert tensor.shape == base[name].shape and tensor.dtype == base[name].dtype
        if tensor.is_floating_point():
            assert torch.isfinite(tensor).all()


def test_identical_models_soup_is_that_model(models: dict[str, Path], tmp_path: Path) -> None:
    merged = _merge(
        tmp_path / "soup",
        method="model_soup",
        models=[{"source": str(models["a"])}, {"source": str(models["a"])}],
    )
    for name, tensor in load_all(models["a"]).items():
        assert torch.equal(merged[name], tensor), name


def test_lines_identity_and_global_scope(models: dict[str, Path], tmp_path: Path) -> None:
    plain = _merge(
        tmp_path / "plain",
        method="task_arithmetic",
        base=str(models["base"]),
        models=[{"source": str(models["a"])}],
    )
    flat = _merge(
        tmp_path / "flat",
        method="task_arithmetic",
        base=str(models["base"]),
        models=[{"source": str(models["a"])}],
        lines={"alpha": 1.0, "beta": 0.0},
    )
    for name in plain:
        assert torch.equal(plain[name], flat[name]), name
    report = run_merge(
        _recipe(
            tmp_path / "glob",
            method="ties",
            base=str(models["base"]),
            scope="global",
            models=[{"source": str(models["a"])}, {"source": str(models["b"])}],
        )
    )
    assert report.scope == "global"


@pytest.mark.parametrize("weights", [(1.0, 1.0), (2.0, 2.0), (1.0, 0.5), (0.8, -0.3)])
def test_lines_automatic_alpha_is_the_norm_ratio_over_the_model(
    models: dict[str, Path], tmp_path: Path, weights: tuple[float, float]
) -> None:
    # α = (‖Σ_t τ_t‖₁ / ‖Σ_t w_t·τ_t‖₁)/T over every merged tensor; equal weights take it without the pass
    report = run_merge(
        _recipe(
            tmp_path / "lines",
            method="lines",
            base=str(models["base"]),
            models=[{"source": str(models[m]), "weight": w} for m, w in zip("ab", weights, strict=True)],
        )
    )
    base, a, b = (load_all(models[m]) for m in ("base", "a", "b"))
    plain = weighted = 0.0
    for name, theta in base.items():
        if theta.is_floating_point():
            ta, tb = a[name].double() - theta.double(), b[name].double() - theta.double()
            plain += float((ta + tb).abs().sum())
            weighted += float((weights[0] * ta + weights[1] * tb).abs().sum())
    assert report.lines is not None and report.lines["alpha_auto"]
    assert report.lines["alpha"] == pytest.approx(plain / weighted / 2, rel=1e-5)
    assert ("lines_alpha_s" in report.timings) == (weights[0] != weights[1])


def test_lora_source_contributes_scaled_ba(models: dict[str, Path], tmp_path: Path) -> None:
    adapter = make_lora_adapter(tmp_path / "lora", base_dir=models["base"], r=2, alpha=4)
    merged = _merge(
        tmp_path / "out",
        method="task_arithmetic",
        base=str(models["base"]),
        models=[{"source": str(adapter)}],
    )
    base, lora = load_all(models["base"]), load_all(adapter)
    name = "model.layers.0.self_attn.q_proj.weight"
    a = lora["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].double()
    b = lora["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].double()
    torch.testing.assert_close(merged[name].double(), base[name].double() + 2.0 * b @ a, rtol=1e-5, atol=1e-6)
    untouched = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(merged[untouched], base[untouched])


def test_transfer_onto_the_source_base_gives_the_finetune(models: dict[str, Path], tmp_path: Path) -> None:
    merged = _merge(
        tmp_path / "t",
        method="transfer",
        source_base=str(models["base"]),
        source_finetuned=str(models["a"]),
        target_base=str(models["base"]),
    )
    for name, tensor in load_all(models["a"]).items():
        torch.testing.assert_close(merged[name], tensor, rtol=0, atol=1e-6)


def test_filters_copy_excluded_tensors(models: dict[str, Path], tmp_path: Path) -> None:
    merged = _merge(
        tmp_path / "f",
        method="task_arithmetic",
        base=str(models["base"]),
        models=[{"source": str(models["a"])}],
        filters={"exclude": [r"^lm_head\."]},
    )
    base = load_all(models["base"])
    assert torch.equal(merged["lm_head.weight"], base["lm_head.weight"])
    assert not torch.equal(merged["model.norm.weight"], base["model.norm.weight"])


def test_output_dtype_is_cast_once(models: dict[str, Path], tmp_path: Path) -> None:
    merged = _merge(
        tmp_path / "bf",
        method="task_arithmetic",
        base=str(models["base"]),
        dtype="bfloat16",
        models=[{"source": str(models["a"])}],
    )
    assert merged["lm_head.weight"].dtype == torch.bfloat16
    assert merged["model.position_ids"].dtype == torch.int64


def test_dry_run_plan_reads_headers_only(models: dict[str, Path]) -> None:
    plan = plan_merge(
        load_recipe(
            {
                "method": "ties",
                "base": str(models["base"]),
                "models": [{"source": str(models["a"])}, {"source": str(models["b"])}],
            }
        )
    )
    assert plan.passes == 1 and plan.estimated_peak_bytes > 0
    assert {t.action for t in plan.tensors} == {"merge", "copy"}
    assert "estimated peak memory" in plan.summary()


def test_progress_and_cancel_leave_nothing(models: dict[str, Path], tmp_path: Path) -> None:
    seen = []
    out = tmp_path / "cancelled"
    with pytest.raises(MergeCancelled):
        run_merge(
            _recipe(
                out, method="task_arithmetic", base=str(models["base"]), models=[{"source": str(models["a"])}]
            ),
            progress=seen.append,
            should_cancel=lambda: len(seen) >= 3,
        )
    assert len(seen) == 3 and seen[-1].tensors_done == 3
    assert not out.exists() and _leftovers(tmp_path) == []


# ---- bad inputs: a typed error naming the culprit, and no partial output -------------------------------------


def _assert_fails(tmp_path: Path, error: type[Exception], match: str, **fields: object) -> None:
    out = tmp_path / "out"
    with pytest.raises(error, match=match):
        run_merge(_recipe(out, **fields))
    assert not out.exists()
    assert _leftovers(tmp_path) == []


def test_missing_tensor(models: dict[str, Path], tmp_path: Path) -> None:
    tensors = load_all(models["a"])
    del tensors["model.layers.1.mlp.up_proj.weight"]
    broken = make_checkpoint(tmp_path / "broken", tensors)
    _assert_fails(
        tmp_path,
        IncompatibleModelsError,
        r"lacks tensors.*model\.layers\.1\.mlp\.up_proj\.weight",
        method="ties",
        base=str(models["base"]),
        models=[{"source": str(broken)}],
    )


def test_shape_mismatch_names_tensor_and_source(models: dict[str, Path], tmp_path: Path) -> None:
    other = make_llama_like(tmp_path / "wide", hidden=24)
    _assert_fails(
        tmp_path,
        IncompatibleModelsError,
        r"shape .* in .*wide",
        method="task_arithmetic",
        base=str(models["base"]),
        models=[{"source": str(other)}],
    )


def test_vocab_policy_allows_extra_embedding_rows(models: dict[str, Path], tmp_path: Path) -> None:
    tensors = load_all(models["a"])
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        tensors[name] = torch.cat([tensors[name], torch.randn(4, tensors[name].shape[1])])
    bigger = make_checkpoint(tmp_path / "bigger", tensors)
    _assert_fails(
        tmp_path,
        IncompatibleModelsError,
        "shape",
        method="task_arithmetic",
        base=str(models["base"]),
        models=[{"source": str(bigger)}],
    )
    merged = _merge(
        tmp_path / "ok",
        method="task_arithmetic",
        base=str(models["base"]),
        models=[{"source": str(bigger)}],
        vocab_policy="truncate",
    )
    torch.testing.assert_close(merged["lm_head.weight"], tensors["lm_head.weight"][:32])


def test_nan_input_names_tensor_and_source(models: dict[str, Path], tmp_path: Path) -> None:
    tensors = load_all(models["a"])
    tensors["model.norm.weight"][3] = float("nan")
    poisoned = make_checkpoint(tmp_path / "poisoned", tensors)
    _assert_fails(
        tmp_path,
        NonFiniteTensorError,
        r"model\.norm\.weight.*poisoned",
        method="ties",
        base=str(models["base"]),
        models=[{"source": str(models["b"])}, {"source": str(poisoned)}],
    )


def test_nan_is_found_by_the_lines_alpha_pass_and_blamed_on_its_source(
    models: dict[str, Path], tmp_path: Path
) -> None:
    """Unequal weights: LiNeS' α pass reads every input first (from the stored tensors), and a NaN stops it there,
    named, with nothing written."""
    tensors = load_all(models["a"])
    tensors["model.layers.0.mlp.up_proj.weight"][1, 2] = float("nan")
    poisoned = make_checkpoint(tmp_path / "poisoned", tensors)
    _assert_fails(
        tmp_path,
        NonFiniteTensorError,
        r"model\.layers\.0\.mlp\.up_proj\.weight.*poisoned",
        method="lines",
        base=str(models["base"]),
        models=[{"source": str(models["b"]), "weight": 1.0}, {"source": str(poisoned), "weight": 0.5}],
    )


@pytest.mark.parametrize("method", ["ties", "task_arithmetic"])
def test_fp16_overflow_is_refused_after_the_cast(tmp_path: Path, method: str) -> None:
    """Finite in float32 (60000 + 3·(4000 + 5000) = 87000) but Inf once cast to float16: refused on the generic
    (ties) and the fused (task arithmetic) path alike, naming the tensor and the dtype, with nothing written."""

    def model(value: float) -> Path:
        return make_checkpoint(
            tmp_path / f"m{int(value)}", {"w": torch.full((4, 8), value, dtype=torch.float16)}
        )

    params = {"lambda": 3.0, "density": 1.0} if method == "ties" else {"lambda": 3.0}
    _assert_fails(
        tmp_path,
        NonFiniteTensorError,
        r"merging w overflowed.*float16",
        method=method,
        base=str(model(60000)),
        models=[{"source": str(model(64000))}, {"source": str(model(65000))}],
        params=params,
        dtype="float16",
    )


def test_nan_in_a_float32_fine_tune_is_blamed_on_it_on_the_fused_path(tmp_path: Path) -> None:
    """A float32 base: ``.float()`` is the base itself, which the fused path used to add into (then the NaN of the
    fine-tune was found in the base)."""
    base = make_checkpoint(tmp_path / "base", {"w": torch.randn(16, 8)})
    fine = load_all(base)
    fine["w"][2, 3] = float("nan")
    poisoned = make_checkpoint(tmp_path / "poisoned", fine)
    other = make_checkpoint(tmp_path / "other", {"w": torch.randn(16, 8)})
    with pytest.raises(NonFiniteTensorError) as err:
        run_merge(
            _recipe(
                tmp_path / "out",
                method="task_arithmetic",
                base=str(base),
                models=[{"source": str(other)}, {"source": str(poisoned)}],
            )
        )
    assert err.value.context["source"] == str(poisoned)


def test_truncated_safetensors(models: dict[str, Path], tmp_path: Path) -> None:
    folder = make_llama_like(tmp_path / "trunc", seed=5, perturb_from=models["base"])
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) - 100])
    _assert_fails(
        tmp_path,
        CorruptCheckpointError,
        "trunc",
        method="task_arithmetic",
        base=str(models["base"]),
        models=[{"source": str(folder)}],
    )


def test_hostile_header_length(models: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "hostile"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", 2**40) + b"{}")
    _assert_fails(
        tmp_path,
        CorruptCheckpointError,
        "hostile",
        method="task_arithmetic",
        base=str(models["base"]),
        models=[{"source": str(folder)}],
    )


def test_pickle_refused_without_opt_in(models: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    torch.save(load_all(models["a"]), folder / "pytorch_model.bin")
    _assert_fails(
        tmp_path,
        UnsafeCheckpointError,
        "pickle",
        method="task_arithmetic",
        base=str(models["base"]),
        models=[{"source": str(folder)}],
    )
    merged = _merge(
        tmp_path / "allowed",
        method="task_arithmetic",
        base=str(models["base"]),
        allow_pickle=True,
        models=[{"source": str(folder)}],
    )
    torch.testing.assert_close(merged["lm_head.weight"], load_all(models["a"])["lm_head.weight"])


def test_missing_source(models: dict[str, Path], tmp_path: Path) -> None:
    _assert_fails(
        tmp_path,
        SourceNotFoundError,
        "nowhere",
        method="task_arithmetic",
        base=str(models["base"]),
        models=[{"source": str(tmp_path / "nowhere")}],
    )


def test_existing_output_is_never_overwritten(models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(OutputError, match="not empty"):
        run_merge(
            _recipe(
                out, method="task_arithmetic", base=str(models["base"]), models=[{"source": str(models["a"])}]
            )
        )
    assert (out / "precious.txt").read_text() == "keep me"


def test_fused_path_equals_generic_path(models: dict[str, Path], tmp_path: Path) -> None:
    """task_arithmetic takes the one-pass fused kernel; magnitude sparsify at density 1 (the identity) takes the
    generic [K, *S] path: both must give the same model."""
    members = [{"source": str(models["a"]), "weight": 0.6}, {"source": str(models["c"]), "weight": 0.4}]
    fused = _merge(
        tmp_path / "fused",
        method="task_arithmetic",
        base=str(models["base"]),
        models=members,
        params={"lambda": 1.3},
    )
    generic = _merge(
        tmp_path / "generic",
        method="stages",
        base=str(models["base"]),
        models=members,
        params={"lambda": 1.3, "sparsify": "magnitude", "density": 1.0},
    )
    for name in fused:
        torch.testing.assert_close(fused[name], generic[name], rtol=1e-6, atol=1e-7)


def test_unnormalized_linear_is_the_plain_weighted_sum(models: dict[str, Path], tmp_path: Path) -> None:
    merged = _merge(
        tmp_path / "sum",
        method="linear",
        params={"normalize": False},
        models=[{"source": str(models["a"]), "weight": 0.5}, {"source": str(models["b"]), "weight": 0.8}],
    )
    a, b = load_all(models["a"]), load_all(models["b"])
    for name, tensor in a.items():
        if tensor.is_floating_point():
            torch.testing.assert_close(
                merged[name].double(), 0.5 * a[name].double() + 0.8 * b[name].double(), rtol=1e-6, atol=1e-7
            )


def test_an_output_filled_while_the_merge_runs_is_an_output_error(
    models: dict[str, Path], tmp_path: Path
) -> None:
    """The output was empty at the start and filled before the final rename: an OutputError naming it (it was
    an internal_error from the rmdir), and the scratch folder is gone."""
    from merge_ops.errors import OutputError

    out = tmp_path / "late"
    recipe = _recipe(
        out,
        method="task_arithmetic",
        base=str(models["base"]),
        models=[{"source": str(models["a"])}],
        output={"path": str(out)},
    )

    def fill(progress: Any) -> None:
        out.mkdir(exist_ok=True)
        (out / "someone-else.txt").write_text("x")

    with pytest.raises(OutputError, match="choose an empty or new output folder"):
        run_merge(recipe, progress=fill)
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("scope", ["per_tensor", "global"])
def test_the_compeft_report_gives_sigma_and_scale_per_tensor(
    scope: str, models: dict[str, Path], tmp_path: Path
) -> None:
    """The README promises ComPEFT's σ per tensor: each model's σ of τ (global: one σ over the whole τ) and the
    scale α·σ its kept entries become."""
    out = tmp_path / scope
    report = run_merge(
        _recipe(
            out,
            method="compeft",
            base=str(models["base"]),
            models=[{"source": str(models[k])} for k in ("a", "b")],
            params={"alpha": 2.0},
            scope=scope,
        )
    )
    base, a = load_all(models["base"]), load_all(models["a"])
    rows = [r for r in report.tensors if r["action"] == "merge" and len(r["shape"]) == 2]
    assert rows and all(len(r["compeft_sigma"]) == 2 for r in rows)
    for row in rows:
        assert row["compeft_scale"] == pytest.approx([2.0 * s for s in row["compeft_sigma"]], rel=1e-6)
    if scope == "per_tensor":
        row = rows[0]
        tau = a[row["name"]].double() - base[row["name"]].double()
        assert row["compeft_sigma"][0] == pytest.approx(float(tau.std(correction=1)), rel=1e-5)
    else:  # one σ per model over every tensor
        assert len({tuple(r["compeft_sigma"]) for r in rows}) == 1
