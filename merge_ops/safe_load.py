"""Untrusted structured text (request bodies, recipe files, mergekit configs, model-card front matter) as plain
data, with bounds: every YAML and JSON document Alloy reads from a user goes through here.

* YAML aliases are refused: ``*ref`` expands by reference, so a 600-byte "billion laughs" document becomes
  gigabytes once anything walks it (validation, JSON rendering). Anchors alone are harmless and pass.
* Nesting deeper than ``MAX_DEPTH`` is refused (the parsers and every later walk recurse).
* Text must be valid Unicode with no NUL: a lone surrogate (``"\\ud800"`` in JSON) can't be encoded as UTF-8,
  so it would break every later rendering of the stored job; NUL breaks every path API.
* Only JSON's types: YAML timestamps, ``!!binary`` and ``!!set`` are refused (quote them as text).
* Numbers must be finite and integers at most 64 bits (``1e400`` parses to inf; a 5000-digit integer raises
  inside ``int()``).

Problems raise ``UnsafeDocumentError`` (a ValueError) whose message names the location; its subclass
``MalformedDocumentError`` is for documents that can't be parsed within bounds (syntax, aliases, nesting).
"""

from __future__ import annotations

import json
import math
from typing import Any

import yaml

MAX_DEPTH = 64
_MAX_INT = 2**63


class UnsafeDocumentError(ValueError):
    """The document parses, but a value is outside Alloy's bounds (bad text, a non-finite or huge number)."""


class MalformedDocumentError(UnsafeDocumentError):
    """The document can't be parsed within Alloy's bounds: a syntax error, an alias, nesting too deep."""


class _NoAliasLoader(yaml.SafeLoader):
    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, "YAML aliases (*name) are not accepted; write the value out", event.start_mark
            )
        return super().compose_node(parent, index)


def _first_line(exc: Exception) -> str:
    """The parser's complaint with its place (1-based line and column), so an editor can point at it."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if mark is not None and problem:
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` without aliases, then ``check_plain_data``."""
    try:
        data = yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise MalformedDocumentError(f"nested deeper than {MAX_DEPTH} levels") from None
    except yaml.YAMLError as exc:
        raise MalformedDocumentError(f"not valid YAML: {_first_line(exc)}") from None
    except ValueError:  # an integer too long for int(), a timestamp out of range
        raise UnsafeDocumentError(
            "not valid YAML: a number or date is out of range (integers have at most 64 bits)"
        ) from None
    check_plain_data(data)
    return data


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise UnsafeDocumentError(f"number {text[:20]!r} is out of range (not a finite float)")
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > 19:
        raise UnsafeDocumentError(f"integer {text[:20]}... is too long (at most 64 bits)")
    return int(text)


def _no_constant(text: str) -> float:
    raise UnsafeDocumentError(f"{text} is not a number Alloy accepts (use a finite number)")


def load_json(text: str) -> Any:
    """``json.loads`` refusing NaN/Infinity, out-of-range floats and huge integers, then ``check_plain_data``."""
    try:
        data = json.loads(
            text, parse_float=_finite_float, parse_int=_bounded_int, parse_constant=_no_constant
        )
    except RecursionError:
        raise MalformedDocumentError(f"nested deeper than {MAX_DEPTH} levels") from None
    except json.JSONDecodeError as exc:
        raise MalformedDocumentError(f"not valid JSON: {_first_line(exc)}") from None
    check_plain_data(data)
    return data


def _bad_text(text: str) -> str | None:
    if "\x00" in text:
        return "contains a NUL character"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "contains a lone surrogate (not valid Unicode text)"
    return None


def _where(path: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in path) or "document"


def check_plain_data(data: Any) -> None:
    """Raise UnsafeDocumentError for deep nesting, bad text (keys too), non-finite floats or huge integers.

    Iterative, so a deep document can't exhaust the stack here."""
    stack: list[tuple[Any, tuple[Any, ...]]] = [(data, ())]
    while stack:
        value, path = stack.pop()
        if len(path) > MAX_DEPTH:
            raise MalformedDocumentError(f"nested deeper than {MAX_DEPTH} levels at {_where(path[:8])}...")
        if isinstance(value, str):
            problem = _bad_text(value)
            if problem:
                raise UnsafeDocumentError(f"{_where(path)}: text {problem}")
        elif isinstance(value, bool) or value is None:
            continue
        elif isinstance(value, int):
            if not -_MAX_INT <= value < _MAX_INT:
                raise UnsafeDocumentError(f"{_where(path)}: integer out of range (at most 64 bits)")
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise UnsafeDocumentError(f"{_where(path)}: number is not finite")
        elif isinstance(value, dict):
            for key, item in value.items():
                if isinstance(key, str) and (problem := _bad_text(key)):
                    raise UnsafeDocumentError(f"{_where(path)}: a key {problem}")
                stack.append((item, (*path, key)))
        elif isinstance(value, list | tuple):
            stack.extend((item, (*path, i)) for i, item in enumerate(value))
        else:  # YAML dates, !!binary, !!set: nothing in a recipe takes them, and JSON can't hold them
            raise UnsafeDocumentError(
                f"{_where(path)}: a {type(value).__name__} value is not accepted; quote it as text"
            )
