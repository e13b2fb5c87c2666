"""The ``alloy`` command line as a user runs it: real subprocesses, exit codes and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.utils.factories import load_all, make_llama_like

ROOT = Path(__file__).resolve().parents[2]


def alloy(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args], capture_output=True, text=True, cwd=cwd or ROOT, timeout=300
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli-models")
    base = make_llama_like(root / "base", seed=0)
    return {
        "base": base,
        "a": make_llama_like(root / "a", seed=1, perturb_from=base),
        "b": make_llama_like(root / "b", seed=2, perturb_from=base),
    }


def test_merge_dry_run_and_real_run(models: dict[str, Path], tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "method": "ties",
                "base": str(models["base"]),
                "models": [{"source": str(models["a"])}, {"source": str(models["b"])}],
            }
        )
    )
    dry = alloy("merge", str(recipe), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "estimated peak memory" in dry.stdout and not (tmp_path / "out").exists()
    run = alloy("merge", str(recipe), "--out", str(tmp_path / "out"))
    assert run.returncode == 0, run.stderr
    assert "merged" in run.stdout and (tmp_path / "out" / "model.safetensors").exists()
    assert run.stderr == ""  # no progress bar when not a terminal


def test_mergekit_recipe_runs(models: dict[str, Path], tmp_path: Path) -> None:
    recipe = tmp_path / "mk.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "task_arithmetic",
                "base_model": str(models["base"]),
                "dtype": "float32",
                "models": [{"model": str(models["a"]), "parameters": {"weight": 0.5}}],
            }
        )
    )
    run = alloy("merge", str(recipe), "--out", str(tmp_path / "out"))
    assert run.returncode == 0, run.stderr
    merged, base, a = load_all(tmp_path / "out"), load_all(models["base"]), load_all(models["a"])
    expected = base["lm_head.weight"] + 0.5 * (a["lm_head.weight"] - base["lm_head.weight"])
    torch.testing.assert_close(merged["lm_head.weight"], expected)


def test_errors_are_one_line_with_nonzero_exit(models: dict[str, Path], tmp_path: Path) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(
        yaml.safe_dump({"method": "ties", "models": [{"source": "x"}], "params": {"density": 2}})
    )
    run = alloy("merge", str(recipe))
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("alloy: error [invalid_recipe]")
    assert "params.density" in lines[0] and "base" in lines[0]


def test_extract_compress_decompress_inspect(models: dict[str, Path], tmp_path: Path) -> None:
    tv = tmp_path / "tv"
    assert alloy("extract", str(models["base"]), str(models["a"]), "--out", str(tv)).returncode == 0
    packed = tmp_path / "packed"
    comp = alloy("compress", str(tv), "--out", str(packed), "--density", "0.2")
    assert comp.returncode == 0, comp.stderr
    assert "ratio" in comp.stdout
    restored = tmp_path / "restored"
    dec = alloy("decompress", str(packed), "--out", str(restored))
    assert dec.returncode == 0, dec.stderr
    table = alloy("inspect", str(models["base"]), str(models["a"]), str(models["b"]))
    assert table.returncode == 0, table.stderr
    assert "sign conflicts" in table.stdout and "cosine" in table.stdout
    data = json.loads(
        alloy("inspect", str(models["base"]), str(models["a"]), str(models["b"]), "--json").stdout
    )
    assert len(data["cosine"]) == 2 and data["cosine"][0][0] == pytest.approx(1.0)
    assert any(row["index"] == 1 for row in data["layers"])


def test_demo_is_the_readme_main_command(tmp_path: Path) -> None:
    run = alloy("demo", "--dir", str(tmp_path / "demo"))
    assert run.returncode == 0, run.stderr
    result = Path(run.stdout.strip().splitlines()[-1].removeprefix("result: "))
    assert (result / "model.safetensors").exists() and (result / "README.md").exists()


def test_greedy_soup_end_to_end(tmp_path: Path) -> None:
    """A real tiny causal LM, two fine-tunes (one useful, one destroyed), the built-in loss evaluator: the soup
    keeps the useful one and the report lists every score."""
    transformers = pytest.importorskip("transformers")
    from tests.merge_ops.test_evaluators import TEXTS, save_model, vocab_size, write_jsonl

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=vocab_size(), n_positions=32, n_embd=16, n_layer=1, n_head=2)
    base = save_model(transformers.GPT2LMHeadModel(config), tmp_path / "base")
    good = tmp_path / "good"
    model = transformers.GPT2LMHeadModel.from_pretrained(str(base))
    save_model(model, good)
    bad = transformers.GPT2LMHeadModel.from_pretrained(str(base))
    with torch.no_grad():
        for p in bad.parameters():
            p.add_(torch.randn_like(p) * 5.0)
    save_model(bad, tmp_path / "bad")
    data = write_jsonl(tmp_path / "heldout.jsonl", [{"text": t} for t in TEXTS])
    recipe = tmp_path / "greedy.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "method": "greedy_soup",
                "models": [{"source": str(tmp_path / "bad")}, {"source": str(good)}],
                "evaluator": {"kind": "causal_lm_loss", "data": str(data), "model": str(base)},
                "output": {"path": str(tmp_path / "soup")},
            }
        )
    )
    run = alloy("merge", str(recipe))
    assert run.returncode == 0, run.stderr
    report = json.loads((tmp_path / "soup" / "alloy-report.json").read_text())
    assert report["method"] == "greedy_soup"
    scores = {row["index"]: row["score"] for row in report["greedy_soup"]["ingredients"]}
    assert scores[1] > scores[0]  # the destroyed model scores worse
    assert report["greedy_soup"]["chosen"] == [1]
    merged, chosen = load_all(tmp_path / "soup"), load_all(good)
    for name, tensor in chosen.items():
        assert torch.equal(merged[name], tensor), name
    # written once, as a greedy soup (it used to be a nested linear merge: card "Linear", a digest no retry
    # recognised, so a worker retry after a crash failed with output_error)
    from merge_ops.params import CATALOG
    from merge_ops.recipe import load_recipe
    from workers.pipeline import completed_output

    asked = load_recipe(recipe)
    assert report["recipe_digest"] == asked.digest()
    card = (tmp_path / "soup" / "README.md").read_text()
    assert CATALOG["greedy_soup"].pretty_name in card and CATALOG["linear"].pretty_name not in card
    assert completed_output(tmp_path / "soup", asked) == report


def test_merge_prints_mergekit_warnings(models: dict[str, Path], tmp_path: Path) -> None:
    """What mergekit ignores (a typo) is accepted with a warning naming it and the likely key; the report lists it."""
    recipe = tmp_path / "mergekit.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "task_arithmetic",
                "base_model": str(models["base"]),
                "models": [{"model": str(models["a"]), "parameters": {"weight": 0.5}}],
                "parameters": {"lamda": 0.5},
            }
        )
    )
    out = tmp_path / "out"
    run = alloy("merge", str(recipe), "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert "warning: parameters.lamda:" in run.stderr and "did you mean 'lambda'" in run.stderr
    report = json.loads((out / "alloy-report.json").read_text())
    assert [w["loc"] for w in report["warnings"]] == [["parameters", "lamda"]]
