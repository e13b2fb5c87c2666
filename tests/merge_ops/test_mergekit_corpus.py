"""Real mergekit configs (``mergekit_corpus/``) through Alloy and through mergekit 0.1.5, outputs compared.

Each file is a config as published (mergekit's examples, model cards, guides in public repositories), rewritten
only to point at the tiny checkpoints of ``mergekit_harness`` (``tiny/<name>``). Its header says where it came
from and what the test expects:

- ``expect: equal``: both tools merge; every tensor mergekit writes matches to 1e-6 relative on the merged
  delta (plus float32 rounding of the written weights). A config with ``dtype`` float16/bfloat16 makes
  mergekit compute in that dtype while Alloy computes in float32 (intended difference; half-precision rounding
  also flips mergekit's top-k and sign choices), so the verbatim outputs are checked for their dtypes and the
  config's float32 twin is compared at 1e-6.
- ``expect: dare``: DARE's random masks differ by design (Alloy's counter-based generator, mergekit's global RNG):
  the kept fraction matches, and with every density set to 1 the merges are equal.
- ``expect: method <name>``: a mergekit method this branch may not implement: refused naming ``merge_method``
  until it is in Alloy's catalog, then compared like ``equal`` (DELLA like ``dare``).
- ``expect: equal-values``: like ``equal`` but the output dtypes may differ (a documented difference, named in
  the config's header).
- ``expect: refused <loc>``: Alloy refuses naming that field (``(mergekit fails)``: and mergekit fails too).
- ``warns: <loc>``: Alloy accepts what mergekit ignores or coerces there, with a warning.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from merge_ops.errors import RecipeError
from merge_ops.params import CATALOG
from merge_ops.recipe import load_recipe
from tests.merge_ops.mergekit_harness import (
    as_float32,
    compare,
    kept_fraction,
    make_models,
    materialize,
    run_alloy,
    run_mergekit,
    with_density_one,
)
from tests.utils.factories import load_all

CORPUS_DIR = Path(__file__).parent / "mergekit_corpus"
CORPUS = sorted(CORPUS_DIR.glob("*.yaml"))
_HALF_DTYPES = {"float16", "bfloat16"}


def header(path: Path) -> dict[str, str]:
    fields = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if match := re.match(r"#\s*(source|expect|warns):\s*(.*)", line):
            fields[match[1]] = match[2].strip()
    return fields


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_models(tmp_path_factory.mktemp("mergekit-corpus-models"))


def test_corpus_is_large_and_documented():
    assert len(CORPUS) >= 30
    for path in CORPUS:
        head = header(path)
        assert head.get("source") and head.get("expect"), f"{path.name} needs source and expect header lines"


def _expectation(head: dict[str, str]) -> str:
    expect = head["expect"]
    if expect.startswith("method "):
        method = expect.split()[1]
        if method not in CATALOG:
            return "refused merge_method"
        return "dare" if method.startswith("della") else "equal"
    return expect.split()[0] if expect.startswith("equal-values") else expect


def _warning_locs(warnings) -> set[str]:
    return {".".join(str(p) for p in (w["loc"] if isinstance(w, dict) else w.loc)) for w in warnings}


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_corpus_config(path, models, tmp_path):
    pytest.importorskip("mergekit.merge")
    head = header(path)
    config = materialize(yaml.safe_load(path.read_text(encoding="utf-8")), models)
    expect = _expectation(head)
    wanted_warnings = set(head["warns"].split()) if head.get("warns") else set()

    if expect.startswith("refused"):
        loc = expect.split()[1]
        with pytest.raises(RecipeError) as info:
            load_recipe(config)
        locs = {".".join(str(p) for p in e["loc"]) for e in info.value.context["errors"]}
        assert loc in locs, info.value.detail
        assert wanted_warnings <= _warning_locs(info.value.context.get("warnings", []))
        if "(mergekit fails)" in expect:
            with pytest.raises(Exception):  # noqa: B017 - mergekit raises RuntimeError/ValueError/ValidationError
                run_mergekit(config, tmp_path / "mergekit")
        return

    base = load_all(models["base"])
    alloy, recipe = run_alloy(config, tmp_path / "alloy")
    assert wanted_warnings <= _warning_locs(recipe.warnings), recipe.warnings
    mergekit = run_mergekit(config, tmp_path / "mergekit")
    if expect == "dare":
        assert abs(kept_fraction(alloy, base) - kept_fraction(mergekit, base)) < 0.05
        config = with_density_one(config)
        alloy, _ = run_alloy(config, tmp_path / "alloy-density-1")
        mergekit = run_mergekit(config, tmp_path / "mergekit-density-1")
    else:
        assert expect in ("equal", "equal-values"), expect
    dtype = config.get("out_dtype") or config.get("dtype")
    if dtype in _HALF_DTYPES:
        # mergekit computed in half precision, where rounding also flips top-k and sign choices, so values are
        # compared on the float32 twin; the verbatim outputs must have the same dtypes
        if expect == "equal":
            assert {n: t.dtype for n, t in alloy.items() if n in mergekit} == {
                n: t.dtype for n, t in mergekit.items()
            }
        config = as_float32(config)
        alloy, _ = run_alloy(config, tmp_path / "alloy-float32")
        mergekit = run_mergekit(config, tmp_path / "mergekit-float32")
    result = compare(alloy, mergekit, base)
    assert not result.missing, result.missing
    assert result.excess <= 1.0, result
