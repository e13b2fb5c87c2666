"""Tensor-name patterns: every regex a recipe carries (``filters``, ``overrides[].filter``) is compiled here.

User regexes run in the worker once per tensor name, so a backtracking engine lets one recipe (``^(.+)+z$``) pin
a worker for hours. They are compiled with RE2 (``google-re2``), which matches in time linear in the name: RE2
syntax, so no look-around and no backreferences. The one look-around form Alloy itself produces (mergekit's
filtered parameters become mutually exclusive overrides, ``merge_ops.mergekit_compat``) is a conjunction
``^(?!.*(?:A))(?=.*(?:B))...`` of "contains A" / "does not contain B"; it is recognised structurally and evaluated
as that conjunction of RE2 searches, so it stays linear too. ``glob_regex`` turns a mergekit glob into an RE2
fragment (``fnmatch.translate`` emits atomic groups and ``\\Z``, which RE2 lacks).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import re2

#: Longest pattern accepted: RE2's compile cost and memory grow with the pattern (its own budget is 8 MB).
MAX_PATTERN_CHARS = 1000
_OPTIONS = re2.Options()
_OPTIONS.log_errors = False  # a bad user pattern is a 422, not a line on the worker's stderr
_OPTIONS.max_mem = 8 << 20


@dataclass(frozen=True)
class NamePattern:
    """A compiled pattern: ``search(name)`` is True where Python's ``re.search`` would match."""

    source: str
    _must: tuple[re2._Regexp, ...]
    _must_not: tuple[re2._Regexp, ...]

    def search(self, name: str) -> bool:
        return all(r.search(name) for r in self._must) and not any(r.search(name) for r in self._must_not)


def _compile_re2(pattern: str) -> re2._Regexp:
    try:
        return re2.compile(pattern, options=_OPTIONS)
    except re2.error as exc:
        reason = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else exc
        raise ValueError(
            f"bad regex {pattern!r}: {reason} (RE2 syntax: no look-around or backreferences)"
        ) from None


def _group_end(pattern: str, start: int) -> int:
    """Index just past the ``)`` closing the group opened at ``start`` (escapes and classes skipped), or -1."""
    depth, i, in_class = 0, start, False
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\":
            i += 2
            continue
        if in_class:
            in_class = ch != "]"
        elif ch == "[":
            in_class = True
            if pattern[i + 1 : i + 2] == "]":
                i += 1  # a leading ']' is a literal inside a class
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return -1


def _split_lookaheads(pattern: str) -> tuple[list[str], list[str]] | None:
    """``^(?=.*(?:A))(?!.*(?:B))...`` -> (["A"], ["B"]); None for any other shape."""
    if not pattern.startswith("^") or len(pattern) == 1:
        return None
    must: list[str] = []
    must_not: list[str] = []
    i = 1
    while i < len(pattern):
        head = pattern[i : i + 8]
        if head not in ("(?=.*(?:", "(?!.*(?:"):
            return None
        end = _group_end(pattern, i)
        inner_end = _group_end(pattern, i + 5)
        if end < 0 or inner_end != end - 1:
            return None
        (must if head[2] == "=" else must_not).append(pattern[i + 8 : inner_end - 1])
        i = end
    return must, must_not


@lru_cache(maxsize=4096)
def compile_pattern(pattern: str) -> NamePattern:
    """The compiled pattern; raises ValueError naming the pattern and the reason (a pydantic validator's 422)."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise ValueError(f"regex longer than {MAX_PATTERN_CHARS} characters")
    if "\x00" in pattern:
        raise ValueError("a regex may not contain a NUL character")
    split = _split_lookaheads(pattern)
    if split is not None:
        must, must_not = split
        return NamePattern(
            pattern, tuple(_compile_re2(p) for p in must), tuple(_compile_re2(p) for p in must_not)
        )
    return NamePattern(pattern, (_compile_re2(pattern),), ())


def search(pattern: str, name: str) -> bool:
    """``re.search(pattern, name)`` in linear time (the pattern was validated when the recipe was)."""
    return compile_pattern(pattern).search(name)


def glob_regex(glob: str) -> str:
    """An RE2 fragment that matches where ``fnmatch(name, f"*{glob}*")`` does (mergekit's filter match):
    ``*`` any run, ``?`` one character, ``[...]``/``[!...]`` a class, everything else literal."""
    out: list[str] = []
    i = 0
    while i < len(glob):
        ch = glob[i]
        i += 1
        if ch == "*":
            out.append(".*")
        elif ch == "?":
            out.append(".")
        elif ch == "[":
            j = i
            if j < len(glob) and glob[j] == "!":
                j += 1
            if j < len(glob) and glob[j] == "]":
                j += 1
            while j < len(glob) and glob[j] != "]":
                j += 1
            if j >= len(glob):
                out.append(re2.escape("["))  # no closing bracket: fnmatch treats '[' as a literal
                continue
            body = glob[i:j]
            i = j + 1
            negate = body.startswith("!")
            body = body[1:] if negate else body
            escaped = "".join("\\" + c if c in "\\^]" else c for c in body)
            out.append(f"[{'^' if negate else ''}{escaped}]")
        else:
            out.append(re2.escape(ch))
    # (?s): fnmatch's '*' and '?' match newlines too
    return "(?s:" + "".join(out) + ")"
