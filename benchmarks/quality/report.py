"""Tables, confidence intervals, paired tests and the plot of the merge-quality benchmark.

    python -m benchmarks.quality.report benchmarks/quality/results/seed*.json --plot docs/quality.png

Definitions (per seed, over the tasks being merged):
- accuracy: test accuracy with the fixed class-prompt head of each task;
- normalized accuracy: mean over tasks of merged accuracy / that task's own fine-tune's accuracy (same seed);
- gain kept: (mean merged − mean zero-shot) / (mean fine-tuned − mean zero-shot).
Across seeds: mean ± the half-width of a 95% t-interval over the n seeds (t_{0.975, n−1}·s/√n).

Paired comparison of each method with task arithmetic (same seed, same fine-tunes, same test rows):
- per seed: difference of normalized accuracy, mean ± 95% t-interval over seeds;
- per example, pooled over all seeds × tasks × test rows: exact McNemar test (two-sided binomial test on
  the discordant rows), p Holm-adjusted over the methods compared; and a paired bootstrap over test rows
  (rows resampled within each task, the same rows for every seed and both methods, ``BOOTSTRAP`` draws) of
  the difference of normalized accuracy (the fine-tune accuracies, the denominators, held fixed): 95%
  percentile interval.
A difference is called significant when the Holm-adjusted McNemar p < 0.05 and the bootstrap interval
excludes 0; the per-seed interval (n = 3 seeds: t = 4.30) is reported beside it: it measures the fine-tuning
seeds' spread, not the test rows'.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

REFERENCE = "task_arithmetic"
BOOTSTRAP = 4000


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


def t_interval(values: list[float]) -> tuple[float, float, int]:
    """(mean, half-width of the 95% t-interval, n); half-width nan for n < 2."""
    values = [v for v in values if v == v]
    n = len(values)
    if n == 0:
        return float("nan"), float("nan"), 0
    mean = statistics.fmean(values)
    if n < 2:
        return mean, float("nan"), n
    half = float(stats.t.ppf(0.975, n - 1)) * statistics.stdev(values) / math.sqrt(n)
    return mean, half, n


def fmt(mean: float, half: float, *, scale: float = 100.0, digits: int = 1) -> str:
    if mean != mean:
        return "—"
    if half != half:
        return f"{scale * mean:.{digits}f}"
    return f"{scale * mean:.{digits}f} ± {scale * half:.{digits}f}"


def collect(results: dict[str, Any]) -> dict[tuple[int, str], list[dict[str, Any]]]:
    """(number of tasks, row name) -> one entry per seed with accuracies, metrics, correctness, seconds."""
    rows: dict[tuple[int, str], list[dict[str, Any]]] = defaultdict(list)
    for seed in results["seeds"]:
        tasks = seed["tasks"]
        everything = len(tasks)
        rows[(everything, "zero-shot")].append(
            {
                "seed": seed["seed"],
                "acc": seed["zero_shot"],
                "correct": seed.get("zero_shot_correct"),
                **metrics(seed["zero_shot"], tasks, seed),
            }
        )
        own = {t: seed["finetuned"][t][t] for t in tasks}
        rows[(everything, "fine-tuned (own task)")].append(
            {"seed": seed["seed"], "acc": own, **metrics(own, tasks, seed)}
        )
        for record in seed["merges"]:
            subset = tasks[: record["num_tasks"]]
            rows[(record["num_tasks"], record["method"])].append(
                {
                    "seed": seed["seed"],
                    "acc": record["test"],
                    "correct": record.get("test_correct"),
                    "ft": {t: seed["finetuned"][t][t] for t in subset},
                    **metrics(record["test"], subset, seed),
                    # greedy soup: choosing (2N − 1 evaluations) + writing the linear soup; aTLAS: training too
                    "merge_s": record["merge_s"] + (record["soup"]["seconds"] if record.get("soup") else 0.0),
                    "lambda": record.get("lambda"),
                    "density": record.get("density"),
                    "chosen": len(record["soup"]["chosen"]) if record.get("soup") else None,
                }
            )
    return rows


def chosen_cell(entries: list[dict[str, Any]], k: int) -> str:
    picks = []
    for e in entries:
        if e.get("lambda") is not None:
            picks.append(f"{e['lambda']:g}" + (f"@{e['density']:g}" if e.get("density") is not None else ""))
        elif e.get("chosen"):
            picks.append(f"{e['chosen']}/{k}")
    return " ".join(picks) if picks else "—"


def table(rows: dict[tuple[int, str], list[dict[str, Any]]], k: int, tasks: list[str]) -> str:
    header = [
        "",
        *tasks,
        "mean acc %",
        "normalized %",
        "gain kept %",
        "n",
        "s/merge",
        "λ@density (val), per seed",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (count, name), entries in rows.items():
        if count != k:
            continue
        cells = [name]
        cells += [f"{100 * statistics.fmean(e['acc'][t] for e in entries):.1f}" for t in tasks]
        for key in ("mean", "normalized", "gain_kept"):
            cells.append(fmt(*t_interval([e[key] for e in entries])[:2]))
        cells.append(str(len(entries)))
        secs = [e["merge_s"] for e in entries if "merge_s" in e]
        cells.append(f"{statistics.fmean(secs):.0f}" if secs else "—")
        cells.append(chosen_cell(entries, k))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired(
    rows: dict[tuple[int, str], list[dict[str, Any]]], k: int, tasks: list[str], *, seed: int = 0
) -> list[dict[str, Any]]:
    """Each method (and zero-shot) against task arithmetic on the seeds both have; see the module docstring."""
    reference = {e["seed"]: e for e in rows.get((k, REFERENCE), [])}
    rng = np.random.default_rng(seed)
    sizes = {}
    for e in reference.values():
        sizes = {t: len(e["correct"][t]) for t in tasks}
        break
    draws = {t: rng.multinomial(n, np.full(n, 1.0 / n), size=BOOTSTRAP) for t, n in sizes.items()}
    out = []
    for (count, name), entries in rows.items():
        if count != k or name in (REFERENCE, "fine-tuned (own task)") or not reference:
            continue
        both = [(e, reference[e["seed"]]) for e in entries if e["seed"] in reference and e.get("correct")]
        if not both:
            continue
        per_seed = [e["normalized"] - r["normalized"] for e, r in both]
        wins = losses = 0
        boot = np.zeros(BOOTSTRAP)
        for e, r in both:
            for t in tasks:
                a = np.frombuffer(e["correct"][t].encode(), dtype=np.uint8) - ord("0")
                b = np.frombuffer(r["correct"][t].encode(), dtype=np.uint8) - ord("0")
                wins += int(((a == 1) & (b == 0)).sum())
                losses += int(((a == 0) & (b == 1)).sum())
                diff = (a.astype(float) - b) / r["ft"][t]
                boot += draws[t] @ diff / len(diff)
        boot /= len(both) * len(tasks)
        mean, half, n = t_interval(per_seed)
        p = float(stats.binomtest(wins, wins + losses, 0.5).pvalue) if wins + losses else 1.0
        out.append(
            {
                "method": name,
                "n_seeds": n,
                "diff": mean,
                "diff_half": half,
                "better": wins,
                "worse": losses,
                "mcnemar_p": p,
                "boot_lo": float(np.percentile(boot, 2.5)),
                "boot_hi": float(np.percentile(boot, 97.5)),
            }
        )
    # Holm's step-down adjustment over the methods compared
    order = sorted(range(len(out)), key=lambda i: out[i]["mcnemar_p"])
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(out) - rank) * out[i]["mcnemar_p"]))
        out[i]["holm_p"] = running
    for row in out:
        row["significant"] = row["holm_p"] < 0.05 and (row["boot_lo"] > 0 or row["boot_hi"] < 0)
    return out


def paired_table(comparisons: list[dict[str, Any]]) -> str:
    header = [
        f"vs {REFERENCE}",
        "Δ normalized, per seed (pp, 95% t-CI)",
        "n seeds",
        "Δ, paired bootstrap over test rows (95% CI)",
        "rows better / worse",
        "McNemar p (Holm)",
        "significant",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for c in comparisons:
        lines.append(
            "| "
            + " | ".join(
                [
                    c["method"],
                    fmt(c["diff"], c["diff_half"], digits=2),
                    str(c["n_seeds"]),
                    f"[{100 * c['boot_lo']:+.2f}, {100 * c['boot_hi']:+.2f}]",
                    f"{c['better']} / {c['worse']}",
                    f"{c['mcnemar_p']:.2g} ({c['holm_p']:.2g})",
                    ("**yes, better**" if c["diff"] > 0 else "**yes, worse**") if c["significant"] else "no",
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def load_results(paths: Path | list[Path]) -> dict[str, Any]:
    """One results file, or several (e.g. one per seed, run side by side) combined."""
    files = [paths] if isinstance(paths, Path) else paths
    loaded = [json.loads(Path(f).read_text()) for f in files]
    return {"settings": loaded[0].get("settings", {}), "seeds": [s for r in loaded for s in r["seeds"]]}


def print_report(paths: Path | list[Path], *, plot: Path | None = None) -> str:
    results = load_results(paths)
    rows = collect(results)
    tasks = results["seeds"][0]["tasks"]
    counts = sorted({k for k, _ in rows})
    seeds = results["seeds"]
    parts = [
        f"seeds: {[s['seed'] for s in seeds]} (complete: {[s['seed'] for s in seeds if s.get('done')]}); "
        f"fine-tuning seconds per task (mean): "
        f"{statistics.fmean(v for s in seeds for v in s['finetune_s'].values()):.1f}; seconds per seed: "
        + ", ".join(f"{s.get('seconds', 0):.0f}" for s in seeds)
    ]
    for k in sorted(counts, reverse=True):
        parts.append(f"\n### {k} tasks merged ({', '.join(tasks[:k])})\n")
        parts.append(table(rows, k, tasks[:k]))
        comparisons = paired(rows, k, tasks[:k])
        if comparisons:
            parts.append(f"\n#### paired with {REFERENCE}, {k} tasks\n")
            parts.append(paired_table(comparisons))
    text = "\n".join(parts)
    print(text, flush=True)
    if plot is not None:
        draw(rows, max(counts), tasks, plot)
    return text


def draw(rows: dict[tuple[int, str], list[dict[str, Any]]], k: int, tasks: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [
        name for (count, name) in rows if count == k and name not in ("zero-shot", "fine-tuned (own task)")
    ]
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5.2))
    intervals = [t_interval([e["normalized"] for e in rows[(k, m)]]) for m in methods]
    means = [m for m, _, _ in intervals]
    halves = [0.0 if h != h else h for _, h, _ in intervals]
    n = max(c for _, _, c in intervals)
    left.bar(range(len(methods)), means, yerr=halves, capsize=3, color="tab:blue")
    zs = statistics.fmean(e["normalized"] for e in rows[(k, "zero-shot")])
    left.axhline(zs, color="gray", linestyle="--", label=f"zero-shot ({zs:.3f})")
    left.axhline(1.0, color="black", linewidth=0.8, label="fine-tuned (1.0)")
    left.set_xticks(range(len(methods)), methods, rotation=45, ha="right")
    left.set_ylabel("normalized accuracy (merged / fine-tuned)")
    left.set_title(f"all {k} tasks merged (bars: 95% t-interval over n={n} seeds)")
    left.set_ylim(
        min(zs, *means) - 0.05, max(1.02, max(m + h for m, h in zip(means, halves, strict=True)) + 0.01)
    )
    left.legend(loc="lower right")
    comparisons = [c for c in paired(rows, k, tasks) if c["method"] != "zero-shot"]
    ys = range(len(comparisons))
    diffs = [100 * c["diff"] for c in comparisons]
    err = [
        [100 * c["diff"] - 100 * c["boot_lo"] for c in comparisons],
        [100 * c["boot_hi"] - 100 * c["diff"] for c in comparisons],
    ]
    colors = [
        "tab:green" if c["significant"] and c["diff"] > 0 else "tab:red" if c["significant"] else "tab:gray"
        for c in comparisons
    ]
    right.errorbar(diffs, list(ys), xerr=err, fmt="none", ecolor="black", capsize=3)
    right.scatter(diffs, list(ys), c=colors, zorder=3)
    right.axvline(0, color="black", linewidth=0.8)
    right.set_yticks(list(ys), [c["method"] for c in comparisons])
    right.invert_yaxis()
    right.set_xlabel(
        f"Δ normalized accuracy vs {REFERENCE}, pp\n(bars: paired bootstrap 95% CI over test rows)"
    )
    right.set_title("paired with task arithmetic (green/red: significant)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("results", type=Path, nargs="+")
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    print_report(args.results, plot=args.plot)
