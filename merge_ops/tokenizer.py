"""The output's vocabulary and chat template: ``tokenizer: {source: base | union | <model>}``, ``chat_template``.

mergekit 0.1.5 semantics (``tokenizer/build.py``, ``tokenizer/embed.py``, ``merge.py``), kept here:
  - ``base``: the base's tokenizer (the first model's when there is no base); ``<model>``: that model's tokenizer;
    ``union``: the base's tokenizer plus, in order, every other model's tokens it lacks (regular tokens first, then
    added/special tokens). A model's tokens at ids >= its config's ``vocab_size`` are ignored.
  - Every embedding / lm_head tensor (rows = tokens) of every model is re-indexed to the output vocabulary before
    merging. A token a model lacks gets: the only model's row that has it; else the base's row when the base has
    it; else the mean of the rows of the models that have it; zeros when none has it.
  - ``pad_to_multiple_of``: the row count is rounded up; each model's padding rows are the mean of its real rows.
  - The tokenizer is saved with ``save_pretrained`` (transformers), ``config.json`` gets the new ``vocab_size``.
  - ``chat_template``: a Jinja template, or ``auto`` (the template most of the models share), set on the saved
    tokenizer.
Intended differences: mergekit walks the models in an unspecified (set) order for ``union`` and ``auto``; Alloy
uses the recipe's order (base, then the models), which only matters when two models add different new tokens.
  - ``tokens: {<token>: {source, force}}``: the token is added to the vocabulary if new, and its row comes from
    ``source`` (a model's row for it, ``{kind: model_token, model, token | token_id}`` another token's row of a
    model, or ``{kind: zero}``) for the models that lack it, or for every model with ``force``.
  - A base tokenizer with tokens at ids past its model's ``vocab_size`` is stripped of them first (fast BPE
    tokenizers only, as mergekit's ``get_stripped_tokenizer``).
Not supported (refused, naming the field): mergekit's named templates (``chatml``, ``llama3``, ...): they are
mergekit's LGPL-3.0 data files, not bundled in Alloy (Apache-2.0), so the message names the file whose text to
paste. Needs the ``transformers`` package (``pip install alloy[tokenizers]``), imported only when a recipe uses
these fields.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from merge_ops.errors import IncompatibleModelsError, RecipeError

#: tensors whose rows are tokens (mergekit's ``vocabulary_axis: 0`` weights of the decoder architectures)
VOCAB_TENSOR = re.compile(
    r"(embed_tokens|embed_in|wte|word_embeddings|tok_embeddings|lm_head|embed_out)\.weight$"
)
#: tokenizer files a saved tokenizer replaces (stale copies of the base's are removed first)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


class ModelToken(BaseModel):
    """Another token's row of one model (by id in that model, or by its text in that model's tokenizer)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["model_token"]
    model: str | dict[str, Any]
    token_id: int | None = Field(None, ge=0)
    token: str | None = None

    @model_validator(mode="after")
    def _one(self) -> ModelToken:
        if (self.token_id is None) == (self.token is None):
            raise ValueError("set exactly one of token_id and token")
        return self


class ZeroToken(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["zero"]


class TokenEmbedding(BaseModel):
    """mergekit's ``tokens:`` entry: ``source`` a model (its row for this token), a model's other token, or
    zeros; ``force`` uses it for every model, even those that have the token."""

    model_config = ConfigDict(extra="forbid")

    source: ModelToken | ZeroToken | str | dict[str, Any]
    force: bool = False


class TokenizerSpec(BaseModel):
    """Which vocabulary the output has (mergekit's ``tokenizer:`` block / ``tokenizer_source``)."""

    model_config = ConfigDict(extra="forbid")

    source: Literal["base", "union"] | str | dict[str, Any] = Field(
        "union", description="'base', 'union', or a model's source (its tokenizer)."
    )
    pad_to_multiple_of: int | None = Field(None, ge=1, le=2**16)
    tokens: dict[str, TokenEmbedding] = Field(
        default_factory=dict,
        description="Per token: where its embedding rows come from (added to the vocabulary if new).",
    )

    @field_validator("source")
    @classmethod
    def _parse(cls, value: Any) -> Any:
        if value in ("base", "union"):
            return value
        from merge_ops.recipe import HubSource, parse_source  # recipe imports this module

        if isinstance(value, dict):
            HubSource.model_validate(value)
        else:
            parse_source(value)
        return value


#: the named templates mergekit 0.1.5 ships (``mergekit/_data/chat_templates/<name>.jinja``)
MERGEKIT_NAMED_TEMPLATES = ("alpaca", "chatml", "exaone", "llama3", "mistral")


def chat_template_problem(value: str) -> str | None:
    """Why ``value`` can't be a chat template, or None. mergekit's rule: ``auto``, one of its named templates, or
    a Jinja template of at least 20 characters. The named templates are mergekit's own data files (LGPL-3.0, in
    an Apache-2.0 project), so Alloy does not bundle them and names the file to paste instead."""
    if value == "auto" or ("{" in value and len(value) >= 20):
        return None
    if value in MERGEKIT_NAMED_TEMPLATES:
        return (
            f"chat_template {value!r} is one of mergekit's named templates, which Alloy does not bundle (they are "
            f"mergekit's LGPL-3.0 data files); paste the template text itself (mergekit's copy: "
            f"mergekit/_data/chat_templates/{value}.jinja), or use 'auto'"
        )
    return (
        f"chat_template {value[:40]!r} is not a chat template: give a Jinja template of at least 20 characters "
        f"or 'auto' (mergekit rejects it too; its named templates {', '.join(MERGEKIT_NAMED_TEMPLATES)} are "
        "not bundled with Alloy)"
    )


# ---------------------------------------------------------------------------------------------------------------
# runtime (torch, transformers)


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:  # pragma: no cover - the test extra installs it
        raise RecipeError(
            "tokenizer and chat_template need the 'transformers' package: pip install alloy[tokenizers]",
            errors=[{"loc": ["tokenizer"], "msg": "transformers is not installed"}],
        ) from None
    return transformers


def load_tokenizer(folder: Path) -> Any:
    try:
        return _transformers().AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise IncompatibleModelsError(
            f"{folder}: cannot load its tokenizer ({exc})", source=str(folder)
        ) from None


def config_vocab_size(folder: Path) -> int | None:
    try:
        value = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("vocab_size")
    except (OSError, ValueError):
        return None
    return int(value) if isinstance(value, int) else None


@dataclass
class Vocabulary:
    """The output tokenizer and, per model folder, out token id -> that model's row (-1: the model lacks it)."""

    tokenizer: Any
    size: int
    rows: dict[str, list[int]]
    base: str | None
    #: out token id -> (kind "model" | "model_token" | "zero", model folder, that model's row for model_token,
    #: force)
    rules: dict[int, tuple[str, str | None, int | None, bool]] = field(default_factory=dict)

    def align(self, tensors: list[tuple[str, Any]]) -> list[Any]:
        """``tensors``: (model folder, its [rows, *S] tensor) for the models merged into one tensor, in order.
        Returns each re-indexed to ``size`` rows (mergekit's ``PermutedVocabulary``)."""
        import torch

        vocab_len = len(self.tokenizer.get_vocab())
        index = [torch.tensor(self.rows[folder], dtype=torch.long) for folder, _ in tensors]
        present = torch.stack([i >= 0 for i in index])  # [M, V]
        count = present.sum(dim=0)
        dtype = tensors[0][1].dtype
        for _, t in tensors:
            dtype = torch.promote_types(dtype, t.dtype)
        shape = tuple(tensors[0][1].shape[1:])
        # default rows for tokens some model lacks (or that a forced rule sets)
        default = torch.zeros((vocab_len, *shape), dtype=dtype)
        has_default = torch.zeros(vocab_len, dtype=torch.bool)
        position = {folder: m for m, (folder, _) in enumerate(tensors)}
        base_pos = position.get(self.base) if self.base is not None else None
        forced = torch.zeros(vocab_len, dtype=torch.bool)
        for token, (_, _, _, force) in self.rules.items():
            forced[token] = force
        todo = ((count < len(tensors)) | forced).nonzero().flatten().tolist()
        for token in todo:
            rule = self.rules.get(token)
            holders = [m for m in range(len(tensors)) if bool(present[m, token])]
            if rule is not None:
                kind, folder, row, _ = rule
                if kind != "zero":
                    m = position.get(folder or "")
                    if m is None:
                        raise IncompatibleModelsError(
                            f"tokenizer.tokens: token {self._text(token)!r} takes its row from {folder}, which is "
                            "not one of the models merged into this tensor"
                        )
                    row = row if kind == "model_token" else int(index[m][token])
                    if row is None or row < 0 or row >= tensors[m][1].shape[0]:
                        raise IncompatibleModelsError(
                            f"tokenizer.tokens: token {self._text(token)!r}: {folder} has no such row"
                        )
                    default[token] = tensors[m][1][row]
            elif len(holders) == 1:
                default[token] = tensors[holders[0]][1][index[holders[0]][token]]
            elif base_pos is not None and holders and bool(present[base_pos, token]):
                default[token] = tensors[base_pos][1][index[base_pos][token]]
            elif holders:
                rows = [tensors[m][1][index[m][token]].to(dtype) for m in holders]
                default[token] = torch.stack(rows).sum(dim=0) / len(rows)
            has_default[token] = True  # zeros when nobody has it
        out = []
        for (_, tensor), idx in zip(tensors, index, strict=True):
            new = torch.zeros((self.size, *shape), dtype=dtype)
            have = (idx >= 0) & ~forced
            new[:vocab_len][have] = tensor.to(dtype)[idx[have]]
            new[:vocab_len][~have] = default[~have]
            if self.size > vocab_len:
                new[vocab_len:] = new[:vocab_len].mean(dim=0)
            out.append(new)
        return out

    def _text(self, token_id: int) -> str:
        return next((t for t, i in self.tokenizer.get_vocab().items() if i == token_id), str(token_id))


def strip_past_vocab(tokenizer: Any, vocab_size: int, folder: Path) -> Any:
    """The tokenizer without its tokens at ids >= ``vocab_size`` (rows the model does not have), as mergekit's
    ``get_stripped_tokenizer``: fast BPE tokenizers only; the added tokens, vocabulary entries and merges that
    name a stripped token are dropped."""
    unused = {token for token, i in tokenizer.get_vocab().items() if i >= vocab_size}
    if not unused:
        return tokenizer
    if not getattr(tokenizer, "is_fast", False):
        raise IncompatibleModelsError(
            f"{folder}: its tokenizer has tokens past the model's vocab_size {vocab_size} and is not a fast "
            "tokenizer, so they can't be stripped (mergekit refuses it too)",
            source=str(folder),
        )
    import tokenizers

    data = json.loads(tokenizer._tokenizer.to_str())
    if data["model"]["type"] != "BPE":
        raise IncompatibleModelsError(
            f"{folder}: its tokenizer has tokens past the model's vocab_size {vocab_size}; stripping them works "
            f"for BPE tokenizers only, not {data['model']['type']} (as in mergekit)",
            source=str(folder),
        )
    data["added_tokens"] = [e for e in data["added_tokens"] if e["id"] < vocab_size]
    for token in unused:
        data["model"]["vocab"].pop(token, None)

    def keep(merge: Any) -> bool:
        parts = merge.split(" ") if isinstance(merge, str) and merge.count(" ") == 1 else merge
        if not isinstance(parts, list):
            raise IncompatibleModelsError(f"{folder}: unexpected BPE merge {merge!r}", source=str(folder))
        return not any(part in unused for part in parts)

    data["model"]["merges"] = [m for m in data["model"]["merges"] if keep(m)]
    tokenizer._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(data))
    return tokenizer


def build_vocabulary(
    spec: TokenizerSpec,
    *,
    base: Path | None,
    models: list[Path],
    source: Path | None,
    resolve: Any = None,
) -> Vocabulary:
    """mergekit's ``build_tokenizer`` for ``spec``; ``source`` is the folder of ``spec.source`` when it names a
    model, ``resolve`` gives the folder of a model ``spec.tokens`` names. ``models`` are every referenced model
    folder (the base included, once)."""
    base_folder = base or models[0]
    tokenizers = {str(base_folder): load_tokenizer(base_folder)}
    base_tok = tokenizers[str(base_folder)]
    base_size = config_vocab_size(base_folder) or len(base_tok.get_vocab())
    base_tok = tokenizers[str(base_folder)] = strip_past_vocab(base_tok, base_size, base_folder)
    for folder in models:
        if str(folder) not in tokenizers:
            try:
                tokenizers[str(folder)] = load_tokenizer(folder)
            except IncompatibleModelsError:
                tokenizers[str(folder)] = base_tok  # mergekit: "Assuming same as" the base
    if spec.source == "base":
        out = base_tok
    elif spec.source == "union":
        out = _union(base_tok, tokenizers)
    else:
        assert source is not None
        out = load_tokenizer(source)
    if spec.tokens:
        out = _copy(out)  # never add to a model's own tokenizer object (its vocabulary is read below)
        existing = set(out.get_vocab())
        for token in spec.tokens:
            if token not in existing:
                out.add_tokens(token)
                existing.add(token)
    vocab_out = out.get_vocab()
    size = len(vocab_out)
    if spec.pad_to_multiple_of and size % spec.pad_to_multiple_of:
        size = (size // spec.pad_to_multiple_of + 1) * spec.pad_to_multiple_of
    rows: dict[str, list[int]] = {}
    for folder in models:
        model_vocab = tokenizers[str(folder)].get_vocab()
        limit = config_vocab_size(folder) or len(model_vocab)
        table = [-1] * len(vocab_out)
        for token, new_id in vocab_out.items():
            old = model_vocab.get(token)
            if old is not None and old < limit:
                table[new_id] = old
        rows[str(folder)] = table
    rules: dict[int, tuple[str, str | None, int | None, bool]] = {}
    for token, embedding in spec.tokens.items():
        src = embedding.source
        if isinstance(src, ZeroToken):
            rules[vocab_out[token]] = ("zero", None, None, embedding.force)
            continue
        model = src.model if isinstance(src, ModelToken) else src
        folder = Path(resolve(model)) if resolve is not None else Path(str(model))
        row = None
        if isinstance(src, ModelToken):
            row = src.token_id
            if src.token is not None:
                own = tokenizers.get(str(folder)) or load_tokenizer(folder)
                row = own.get_vocab().get(src.token)
                if row is None:
                    raise IncompatibleModelsError(
                        f"tokenizer.tokens.{token}: {folder}'s tokenizer has no token {src.token!r}",
                        source=str(folder),
                    )
        rules[vocab_out[token]] = (
            "model_token" if row is not None else "model",
            str(folder),
            row,
            embedding.force,
        )
    return Vocabulary(
        tokenizer=out, size=size, rows=rows, base=str(base) if base is not None else None, rules=rules
    )


def _copy(tokenizer: Any) -> Any:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return load_tokenizer(Path(tmp))


def _union(base_tok: Any, tokenizers: dict[str, Any]) -> Any:
    """The base's tokenizer plus every other model's tokens it lacks (mergekit's ``build_union_tokenizer``)."""
    new_tokens: dict[str, None] = {}
    added: dict[str, Any] = {}
    for folder, tok in tokenizers.items():
        limit = config_vocab_size(Path(folder)) or tok.vocab_size
        added_here = tok.added_tokens_decoder
        added_names = {info.content for info in added_here.values()}
        for token, idx in tok.get_vocab().items():
            if idx < limit and token not in added_names:
                new_tokens.setdefault(token)
        for idx, info in added_here.items():
            if idx < limit:
                added.setdefault(info.content, info)
    out = _copy(base_tok)  # never mutate the base's tokenizer object
    base_vocab = base_tok.get_vocab()
    for token in new_tokens:
        if token not in added and token not in base_vocab:
            out.add_tokens(token)
    for info in added.values():
        out.add_tokens(info)
    return out


def pick_chat_template(value: str, folders: list[Path]) -> str | None:
    """The template to save: ``value`` itself, or for ``auto`` the one most of the models share (None: none)."""
    if value != "auto":
        return value
    templates = []
    for folder in folders:
        try:
            template = load_tokenizer(folder).chat_template
        except IncompatibleModelsError:
            continue
        if isinstance(template, dict):
            template = template.get("default")
        if template:
            templates.append(template.strip())
    return Counter(templates).most_common(1)[0][0] if templates else None


def save_tokenizer(
    tokenizer: Any, folder: Path, *, chat_template: str | None, vocab_size: int | None
) -> list[str]:
    """Replace the tokenizer files in ``folder`` with ``tokenizer`` (and its chat template); set ``vocab_size``
    in config.json. Returns the names written."""
    for name in TOKENIZER_FILES:
        (folder / name).unlink(missing_ok=True)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    before = {p.name for p in folder.iterdir()}
    tokenizer.save_pretrained(str(folder))
    written = sorted({p.name for p in folder.iterdir()} - before)
    config = folder / "config.json"
    if vocab_size is not None and config.is_file():
        data = json.loads(config.read_text(encoding="utf-8"))
        data["vocab_size"] = vocab_size
        config.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return written
