"""Tables and the plot of the merge-quality benchmark, from ``results.json`` written by ``run.py``.

    python -m benchmarks.quality.report RESULTS.json [MORE.json ...] --plot docs/quality.png

Definitions (per seed, over the tasks being merged; then mean ± half the min–max spread over seeds):
- accuracy: test accuracy with the fixed class-prompt head of each task;
- normalized accuracy: mean over tasks of merged accuracy / that task's own fine-tune's accuracy;
- gain kept: (mean merged − mean zero-shot) / (mean fine-tuned − mean zero-shot).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any


def metrics(acc: dict[str, float], tasks: list[str], seed: dict[str, Any]) -> dict[str, float]:
    ft = {t: seed["finetuned"][t][t] for t in tasks}
    zs = {t: seed["zero_shot"][t] for t in tasks}
    mean = lambda d: sum(d[t] for t in tasks) / len(tasks)  # noqa: E731
    gain = mean(ft) - mean(zs)
    return {
        "mean": mean(acc),
        "normalized": sum(acc[t] / ft[t] for t in tasks) / len(tasks) if all(ft.values()) else float("nan"),
        "gain_kept": (mean(acc) - mean(zs)) / gain if gain else float("nan"),
    }


def collect(results: dict[str, Any]) -> dict[tuple[int, str], list[dict[str, Any]]]:
    """(number of tasks, row name) -> one entry per seed with accuracies, metrics, seconds, λ."""
    rows: dict[tuple[int, str], list[dict[str, Any]]] = defaultdict(list)
    for seed in results["seeds"]:
        tasks = seed["tasks"]
        everything = len(tasks)
        rows[(everything, "zero-shot")].append(
            {"acc": seed["zero_shot"], **metrics(seed["zero_shot"], tasks, seed)}
        )
        own = {t: seed["finetuned"][t][t] for t in tasks}
        rows[(everything, "fine-tuned (own task)")].append({"acc": own, **metrics(own, tasks, seed)})
        for t in tasks:
            rows[(everything, f"fine-tune: {t}")].append(
                {"acc": seed["finetuned"][t], **metrics(seed["finetuned"][t], tasks, seed)}
            )
        for record in seed["merges"]:
            subset = tasks[: record["num_tasks"]]
            rows[(record["num_tasks"], record["method"])].append(
                {
                    "acc": record["test"],
                    **metrics(record["test"], subset, seed),
                    # greedy soup: choosing (2N − 1 evaluations) + writing the linear soup
                    "merge_s": record["merge_s"] + (record["soup"]["seconds"] if record.get("soup") else 0.0),
                    "lambda": record.get("lambda"),
                    "chosen": len(record["soup"]["chosen"]) if record.get("soup") else None,
                }
            )
    return rows


def spread(values: list[float]) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "—"
    mean = statistics.fmean(values)
    half = (max(values) - min(values)) / 2
    return f"{mean:.3f} ± {half:.3f}" if len(values) > 1 else f"{mean:.3f}"


def table(rows: dict[tuple[int, str], list[dict[str, Any]]], k: int, tasks: list[str]) -> str:
    header = ["", *tasks, "mean acc", "normalized", "gain kept", "s/merge", "λ (val)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (count, name), entries in rows.items():
        if count != k:
            continue
        cells = [name]
        cells += [f"{statistics.fmean(e['acc'][t] for e in entries):.3f}" for t in tasks]
        cells += [
            spread([e["mean"] for e in entries]),
            spread([e["normalized"] for e in entries]),
            spread([e["gain_kept"] for e in entries]),
        ]
        secs = [e["merge_s"] for e in entries if "merge_s" in e]
        cells.append(f"{statistics.fmean(secs):.2f}" if secs else "—")
        lams = [e["lambda"] for e in entries if e.get("lambda") is not None]
        chosen = [e["chosen"] for e in entries if e.get("chosen")]
        cells.append(
            "/".join(f"{x:g}" for x in lams)
            if lams
            else (f"{'/'.join(map(str, chosen))} of {k} kept" if chosen else "—")
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def load_results(paths: Path | list[Path]) -> dict[str, Any]:
    """One ``results.json``, or several (e.g. one per seed, run side by side) combined."""
    files = [paths] if isinstance(paths, Path) else paths
    loaded = [json.loads(Path(f).read_text()) for f in files]
    return {"settings": loaded[0].get("settings", {}), "seeds": [s for r in loaded for s in r["seeds"]]}


def print_report(paths: Path | list[Path], *, plot: Path | None = None) -> str:
    results = load_results(paths)
    rows = collect(results)
    tasks = results["seeds"][0]["tasks"]
    counts = sorted({k for k, _ in rows})
    parts = [
        f"seeds: {[s['seed'] for s in results['seeds']]}; fine-tuning seconds per task (mean): "
        f"{statistics.fmean(v for s in results['seeds'] for v in s['finetune_s'].values()):.1f}"
    ]
    for k in sorted(counts, reverse=True):
        parts.append(f"\n### {k} tasks merged ({', '.join(tasks[:k])})\n")
        parts.append(table(rows, k, tasks[:k]))
    text = "\n".join(parts)
    print(text, flush=True)
    if plot is not None:
        draw(rows, counts, plot)
    return text


def draw(rows: dict[tuple[int, str], list[dict[str, Any]]], counts: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    everything = max(counts)
    methods = [
        name
        for (k, name) in rows
        if k == everything and name != "zero-shot" and not name.startswith("fine-tune")
    ]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    means = [statistics.fmean(e["normalized"] for e in rows[(everything, m)]) for m in methods]
    lows = [
        m - min(e["normalized"] for e in rows[(everything, n)]) for m, n in zip(means, methods, strict=True)
    ]
    highs = [
        max(e["normalized"] for e in rows[(everything, n)]) - m for m, n in zip(means, methods, strict=True)
    ]
    left.bar(range(len(methods)), means, yerr=[lows, highs], capsize=3, color="tab:blue")
    zs = statistics.fmean(e["normalized"] for e in rows[(everything, "zero-shot")])
    left.axhline(zs, color="gray", linestyle="--", label=f"zero-shot ({zs:.2f})")
    left.axhline(1.0, color="black", linewidth=0.8, label="fine-tuned (1.0)")
    left.set_xticks(range(len(methods)), methods, rotation=45, ha="right")
    left.set_ylabel("normalized accuracy (merged / fine-tuned)")
    left.set_title(f"all {everything} tasks merged (bars: seed min–max)")
    left.set_ylim(0, max(1.05, max(m + h for m, h in zip(means, highs, strict=True)) + 0.05))
    left.legend(loc="lower right")
    for index, method in enumerate(methods):
        ks = [k for k in counts if (k, method) in rows]
        ys = [statistics.fmean(e["normalized"] for e in rows[(k, method)]) for k in ks]
        right.plot(ks, ys, marker="o", label=method, color=plt.cm.tab20(index))
    right.set_xticks(counts)
    right.set_xlabel("number of merged tasks")
    right.set_ylabel("normalized accuracy")
    right.set_title("by number of merged tasks (mean over seeds)")
    right.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("results", type=Path, nargs="+")
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    print_report(args.results, plot=args.plot)
