"""The built-in held-out evaluators against hand-computed scores, on tiny transformers models."""

from __future__ import annotations

import json
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from merge_ops.errors import EvaluatorError
from merge_ops.evaluators import EvaluatorSpec, build_evaluator
from merge_ops.evaluators import base as evaluators_base

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

WORDS = "the a movie film was great good bad awful plot actor boring fun dog cat ran sat on mat".split()  # noqa: SIM905


def write_tokenizer(folder: Path) -> None:
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        eos_token="[SEP]",
    )
    fast.save_pretrained(str(folder))


def vocab_size() -> int:
    return len(WORDS) + 5


def tiny_bert_config(**extra: object) -> transformers.BertConfig:
    return transformers.BertConfig(
        vocab_size=vocab_size(),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        **extra,
    )


def save_model(model: torch.nn.Module, folder: Path) -> Path:
    model.save_pretrained(str(folder))
    write_tokenizer(folder)
    return folder


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def state_dict_of(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


TEXTS = [
    "the movie was great",
    "a boring plot",
    "the dog sat on the mat",
    "fun",
    "awful actor was bad film",
    "the cat ran",
]


@pytest.fixture
def causal_lm(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=vocab_size(), n_positions=32, n_embd=16, n_layer=1, n_head=2)
    return save_model(transformers.GPT2LMHeadModel(config), tmp_path / "lm")


def test_causal_lm_loss_is_minus_the_token_weighted_mean(causal_lm: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "held.jsonl", [{"text": t} for t in TEXTS])
    spec = EvaluatorSpec(kind="causal_lm_loss", data=str(data), batch_size=4)  # padded batches
    evaluator = build_evaluator(spec, model_dir=causal_lm)
    sd = state_dict_of(causal_lm)  # GPT-2 ties lm_head to the embeddings: the file has no lm_head
    model = transformers.GPT2LMHeadModel.from_pretrained(str(causal_lm)).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(causal_lm))
    total = count = 0.0
    with torch.no_grad():
        for text in TEXTS:  # one unpadded row at a time: HF's own mean loss
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            if ids.shape[1] < 2:
                continue
            n = ids.shape[1] - 1
            total += float(model(input_ids=ids, labels=ids).loss) * n
            count += n
    assert evaluator.score(sd) == pytest.approx(-total / count, rel=1e-5)


def test_causal_lm_loss_follows_the_state_dict(causal_lm: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "held.jsonl", [{"text": t} for t in TEXTS])
    evaluator = build_evaluator(EvaluatorSpec(kind="causal_lm_loss", data=str(data)), model_dir=causal_lm)
    sd = state_dict_of(causal_lm)
    first = evaluator.score(sd)
    other = {k: v + 0.5 * torch.randn_like(v) if v.is_floating_point() else v for k, v in sd.items()}
    assert evaluator.score(other) != pytest.approx(first)
    assert evaluator.score(sd) == pytest.approx(first, abs=1e-6)  # nothing of the other model leaks


def test_sequence_classification_accuracy(tmp_path: Path) -> None:
    torch.manual_seed(1)
    folder = save_model(
        transformers.BertForSequenceClassification(tiny_bert_config(num_labels=3)), tmp_path / "cls"
    )
    rows = [{"text": t, "label": i % 3} for i, t in enumerate(TEXTS)]
    data = write_jsonl(tmp_path / "held.jsonl", rows)
    evaluator = build_evaluator(
        EvaluatorSpec(kind="sequence_classification_accuracy", data=str(data), batch_size=4), model_dir=folder
    )
    model = transformers.BertForSequenceClassification.from_pretrained(str(folder)).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    with torch.no_grad():
        predicted = [int(model(**tokenizer(r["text"], return_tensors="pt")).logits.argmax()) for r in rows]
    expected = sum(p == r["label"] for p, r in zip(predicted, rows, strict=True)) / len(rows)
    assert evaluator.score(state_dict_of(folder)) == pytest.approx(expected)
    # the same rows with class names instead of ids
    named = write_jsonl(
        tmp_path / "named.jsonl", [{"text": r["text"], "label": "xyz"[r["label"]]} for r in rows]
    )
    by_name = build_evaluator(
        EvaluatorSpec(kind="sequence_classification_accuracy", data=str(named), classes=["x", "y", "z"]),
        model_dir=folder,
    )
    assert by_name.score(state_dict_of(folder)) == pytest.approx(expected)


def test_checkpoint_names_with_or_without_the_base_model_prefix(tmp_path: Path) -> None:
    """``bert.`` is optional; a checkpoint without the head, or with foreign tensors, is a typed error."""
    folder = save_model(
        transformers.BertForSequenceClassification(tiny_bert_config(num_labels=2)), tmp_path / "c"
    )
    data = write_jsonl(tmp_path / "held.jsonl", [{"text": "fun", "label": 1}])
    evaluator = build_evaluator(
        EvaluatorSpec(kind="sequence_classification_accuracy", data=str(data)), model_dir=folder
    )
    sd = state_dict_of(folder)
    stripped = {k.removeprefix("bert."): v for k, v in sd.items()}
    assert evaluator.score(stripped) == evaluator.score(sd)  # the prefix is optional
    with pytest.raises(EvaluatorError, match="lacks tensors"):
        evaluator.score({k: v for k, v in stripped.items() if not k.startswith("classifier")})
    with pytest.raises(EvaluatorError, match="not in the evaluator"):
        evaluator.score({**sd, "extra.weight": torch.zeros(2)})


def manual_embed(model: torch.nn.Module, tokenizer: object, texts: list[str]) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for text in texts:
            enc = tokenizer(text, return_tensors="pt")  # type: ignore[operator]
            out.append(torch.nn.functional.normalize(model(**enc).last_hidden_state[0].mean(0), dim=-1))
    return torch.stack(out)


def test_embedding_prompt_accuracy_uses_fixed_heads_from_the_reference_model(tmp_path: Path) -> None:
    torch.manual_seed(2)
    reference = save_model(transformers.BertModel(tiny_bert_config()), tmp_path / "ref")
    torch.manual_seed(3)
    candidate = save_model(transformers.BertModel(tiny_bert_config()), tmp_path / "cand")
    classes = {"sentiment": ["good", "bad"], "animal": ["dog", "cat", "movie"]}
    rows = [
        {"text": t, "label": classes["sentiment"][i % 2], "task": "sentiment"} for i, t in enumerate(TEXTS)
    ]
    rows += [{"text": t, "label": i % 3, "task": "animal"} for i, t in enumerate(TEXTS[:4])]
    data = write_jsonl(tmp_path / "held.jsonl", rows)
    spec = EvaluatorSpec(
        kind="embedding_prompt_accuracy",
        data=str(data),
        task_field="task",
        classes=classes,
        prompt_template="a {}",
        batch_size=3,
    )
    evaluator = build_evaluator(spec, model_dir=reference)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(reference))
    ref_model = transformers.BertModel.from_pretrained(str(reference)).eval()
    cand_model = transformers.BertModel.from_pretrained(str(candidate)).eval()
    accuracies = []
    for task, names in classes.items():
        heads = manual_embed(ref_model, tokenizer, [f"a {n}" for n in names])  # heads: the reference's
        task_rows = [r for r in rows if r["task"] == task]
        emb = manual_embed(cand_model, tokenizer, [r["text"] for r in task_rows])
        predicted = (emb @ heads.T).argmax(-1).tolist()
        labels = [names.index(r["label"]) if isinstance(r["label"], str) else r["label"] for r in task_rows]
        accuracies.append(sum(p == y for p, y in zip(predicted, labels, strict=True)) / len(task_rows))
    assert evaluator.score(state_dict_of(candidate)) == pytest.approx(sum(accuracies) / 2)


def test_spec_validation() -> None:
    with pytest.raises(ValidationError, match="unknown evaluator"):
        EvaluatorSpec(kind="nope", data="x.jsonl")
    with pytest.raises(ValidationError, match="needs classes"):
        EvaluatorSpec(kind="embedding_prompt_accuracy", data="x.jsonl")
    with pytest.raises(ValidationError, match="task_field"):
        EvaluatorSpec(kind="embedding_prompt_accuracy", data="x.jsonl", classes={"t": ["a"]})
    with pytest.raises(ValidationError, match="exactly one"):
        EvaluatorSpec(kind="embedding_prompt_accuracy", data="x.jsonl", classes=["a"], prompt_template="x")
    with pytest.raises(ValidationError):
        EvaluatorSpec(kind="causal_lm_loss", data="x.jsonl", batch_size=0)


def test_data_errors_are_typed(causal_lm: Path, tmp_path: Path) -> None:
    spec = EvaluatorSpec(kind="causal_lm_loss", data=str(tmp_path / "missing.jsonl"))
    with pytest.raises(EvaluatorError, match="not found"):
        build_evaluator(spec, model_dir=causal_lm)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fun"}\n{oops\n')
    with pytest.raises(EvaluatorError, match="bad.jsonl:2"):
        build_evaluator(EvaluatorSpec(kind="causal_lm_loss", data=str(bad)), model_dir=causal_lm)
    no_field = write_jsonl(tmp_path / "nofield.jsonl", [{"body": "fun"}])
    with pytest.raises(EvaluatorError, match="no field 'text'"):
        build_evaluator(EvaluatorSpec(kind="causal_lm_loss", data=str(no_field)), model_dir=causal_lm)
    # relative paths resolve against the data root
    write_jsonl(tmp_path / "ok.jsonl", [{"text": "the movie was fun"}])
    evaluator = build_evaluator(
        EvaluatorSpec(kind="causal_lm_loss", data="ok.jsonl"), model_dir=causal_lm, data_root=tmp_path
    )
    assert evaluator.score(state_dict_of(causal_lm)) < 0


class _LengthEvaluator:
    """A plugin: scores a model by the (negated) squared norm of its weights."""

    def __init__(
        self, spec: EvaluatorSpec, *, model_dir: Path, data_path: Path, device: torch.device
    ) -> None:
        self.scale = float(spec.options.get("scale", 1.0))

    def score(self, state_dict: dict[str, torch.Tensor], /) -> float:
        return -self.scale * sum(float(t.float().square().sum()) for t in state_dict.values())


def make_length_evaluator(spec: EvaluatorSpec, **kwargs: object) -> _LengthEvaluator:
    return _LengthEvaluator(spec, **kwargs)  # type: ignore[arg-type]


def test_plugin_entry_point(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    plugin = EntryPoint(
        name="weight_norm", value=f"{__name__}:make_length_evaluator", group="alloy.evaluators"
    )

    def fake_entry_points(*, group: str) -> list[EntryPoint]:
        return [plugin] if group == "alloy.evaluators" else []

    monkeypatch.setattr("importlib.metadata.entry_points", fake_entry_points)
    monkeypatch.setattr(evaluators_base, "entry_points", fake_entry_points)
    data = write_jsonl(tmp_path / "held.jsonl", [{"text": "x"}])
    spec = EvaluatorSpec(kind="weight_norm", data=str(data), options={"scale": 2.0})
    evaluator = build_evaluator(spec, model_dir=tmp_path)
    assert evaluator.score({"w": torch.ones(3)}) == -6.0
