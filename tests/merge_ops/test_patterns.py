"""merge_ops.patterns: RE2 for every regex from a recipe or an adapter config (issue 17, item 2)."""

from __future__ import annotations

import fnmatch
import re
import time

import pytest

from merge_ops.lora import _pattern_value
from merge_ops.patterns import compile_pattern, glob_regex, search


@pytest.mark.parametrize("pattern", ["mlp", r"layers\.\d+\.", "^model\\.embed", "(q|k|v)_proj$", "[ab]+x"])
@pytest.mark.parametrize(
    "name", ["model.layers.3.mlp.up_proj.weight", "model.embed_tokens.weight", "a.q_proj", "abx", ""]
)
def test_search_agrees_with_python_re(pattern: str, name: str) -> None:
    assert search(pattern, name) == bool(re.search(pattern, name))


@pytest.mark.parametrize("glob", ["mlp", "*.weight", "a?b", "[ab]x", "[!a]b", "x[", "self_attn*proj"])
@pytest.mark.parametrize("name", ["mlp.x", "foo.weight", "aXb", "ax", "bx", "cb", "x[", "l.self_attn.q_proj"])
def test_glob_regex_matches_like_mergekit_fnmatch(glob: str, name: str) -> None:
    assert search(glob_regex(glob), name) == fnmatch.fnmatchcase(name, f"*{glob}*")


def test_the_look_ahead_conjunction_alloy_writes_is_evaluated_without_look_around() -> None:
    pattern = f"^(?!.*(?:{glob_regex('mlp')}))(?=.*(?:{glob_regex('attn*q')}))"
    assert search(pattern, "l.attn.q") and not search(pattern, "l.mlp.attn.q") and not search(pattern, "x")
    assert search(pattern, "l.attn.q") == bool(re.search(pattern.replace("(?s:", "(?:"), "l.attn.q"))


def test_catastrophic_patterns_are_linear() -> None:
    started = time.monotonic()
    assert not search("^(.+)+z$", "a" * 100_000)
    assert _pattern_value({"(a+)+$": 4}, "a" * 5_000 + "!", 8) == 8  # an adapter's rank_pattern
    assert time.monotonic() - started < 1


@pytest.mark.parametrize("bad", ["(", "(?!a)b", r"(a)\1", "x" * 1001, "a\x00"])
def test_bad_patterns_raise_value_error(bad: str) -> None:
    with pytest.raises(ValueError, match="regex"):
        compile_pattern(bad)
