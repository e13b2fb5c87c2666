"""Merge speed: wall time, peak RSS and effective GB/s per method, against the I/O floor and mergekit.

    python benchmarks/merge_speed.py [--hidden 1024 --layers 24 --vocab 32000] [--k 3] [--dtype bfloat16]
                                     [--methods task_arithmetic,ties,...] [--device cpu|cuda] [--workdir DIR]
                                     [--repeat N]

Generates a llama-shaped base and K fine-tunes (about 0.37B parameters each with the defaults), then runs each
merge in a fresh subprocess (so peak RSS is the merge's own) and prints a table. "floor" reads the K+1 inputs and
writes one output once, with nothing computed: the target is a merge within 1.5× of it. When mergekit is
installed (`mergekit-yaml` on PATH), the same merges run with mergekit in the same invocation, computing in the
models' dtype (``native``, as users' configs ask) and in float32 (``--mergekit-dtype`` picks one), and the table
shows the time and peak-RSS ratios. The rows come from ``METHODS`` (one entry per method, with the same density on
both sides). Effective GB/s = (bytes read + bytes written) / wall time. "CPU s" is the user + system time of the
merge's process tree: the work done, which a shared machine disturbs far less than the wall time. With
``--device cuda`` a last column gives the merge's peak GPU memory (``alloy-report.json``) over 2·(K+1)·the largest
tensor (float32 bytes), the bound the kernels are built to (≤ 1.0 is within it). ``--repeat N`` runs the floor
and each Alloy merge N times and keeps the fastest (and the largest peak RSS): on a shared machine the minimum is
the least disturbed run (mergekit, minutes a merge, runs once).

Before the timed runs each method merges a tiny model once (``warm_up``): the first merge on a machine compiles
Alloy's CPU loops into numba's on-disk cache, which every later merge only loads (~1.3 s of numba import and
start-up per process, inside the timed rows).

Indented rows under the floor say what bounds it, in the same invocation: the floor's own time after its
imports; ``cat``/``cp``/``sync`` moving the same bytes (the page-cache and disk bound); ``import torch`` alone;
and ``alloy merge --help`` (the CLI's start, which imports no torch).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Bench:
    """One row: the Alloy recipe's params, and mergekit's per-model parameters (None: no mergekit counterpart).
    Both sides get the same density, so the rows compare the same work."""

    params: dict[str, float] = field(default_factory=dict)
    mergekit: dict[str, float] | None = None
    #: how many of the K fine-tunes the merge takes (None: all); slerp's contract is the base and one model
    fine_tunes: int | None = None
    #: mergekit's slerp configs list the base as an input too and take ``t`` as a global parameter
    mergekit_lists_base: bool = False
    #: the recipe's method when the row is a variant of one (None: the row's name)
    method: str | None = None
    #: per-model weights (None: each model's default)
    weights: tuple[float, ...] | None = None


SPARSE = {"density": 0.2}
#: the rows the benchmark knows; add a method here (with its mergekit counterpart, if any) to benchmark it
METHODS: dict[str, Bench] = {
    "task_arithmetic": Bench(mergekit={}),
    "linear": Bench(mergekit={}),
    "model_soup": Bench(),
    "lines": Bench(),
    # unequal weights: LiNeS' automatic α then needs its own pass over the model (equal weights have it in closed form)
    "lines_weighted": Bench(method="lines", weights=(1.0, 0.6, 0.3)),
    "ties": Bench(SPARSE, SPARSE),
    "breadcrumbs": Bench(SPARSE, SPARSE),
    "breadcrumbs_ties": Bench(SPARSE, SPARSE),
    "dare_linear": Bench(SPARSE, SPARSE),
    "dare_ties": Bench(SPARSE, SPARSE),
    "compeft": Bench(),
    "model_stock": Bench(),
    "slerp": Bench({"t": 0.5}, {"t": 0.5}, fine_tunes=1, mergekit_lists_base=True),
    "della": Bench({"density": 0.5, "epsilon": 0.1}, {"density": 0.5, "epsilon": 0.1}),
}
DEFAULT_METHODS = "task_arithmetic,linear,lines,ties,breadcrumbs,dare_linear,dare_ties,compeft,slerp,della"
MERGEKIT_DTYPES = ("native", "float32")

# Alloy's own reader and writer, nothing computed: every tensor of the K+1 inputs read, the base's written, one
# fsync per file (as a merge does). A merge's time over this is its compute cost.
_FLOOR = """
import os, sys, time
from pathlib import Path
from merge_ops.checkpoint import Checkpoint
from merge_ops.writer import ShardedWriter
started = time.perf_counter()
sources = [Checkpoint.open(Path(p)) for p in sys.argv[1:-1]]
out = Path(sys.argv[-1])
plan = [(name, info.torch_dtype, info.shape) for name, info in sources[0].infos.items()]
writer = ShardedWriter(out, plan=plan, shard_size=5 * 10**9, metadata={"format": "pt"})
for name, _, _ in plan:
    tensors = [src.load(name) for src in sources]
    writer.write(name, tensors[0])
for path in writer.close():
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())
(out / "io_s.txt").write_text(str(time.perf_counter() - started))  # the floor without its imports
"""

# The same bytes moved by the OS's own tools (the page-cache/disk bound of the floor): the K+1 inputs read by
# cat, the base copied by cp and fsync'd by `sync FILE` (what the floor's one fsync per file does).
_OS_COPY = (
    'cat "$@" > /dev/null && mkdir -p "$OUT" && cp "$BASE"/*.safetensors "$OUT"/ && sync "$OUT"/*.safetensors'
)


def generate(
    workdir: Path, *, k: int, hidden: int, layers: int, vocab: int, dtype: str
) -> tuple[Path, list[Path]]:
    import torch

    from merge_ops.demo import write_synthetic_model

    torch_dtype = getattr(torch, dtype)
    spec = {"hidden": hidden, "layers": layers, "vocab": vocab, "dtype": dtype, "k": k}
    stamp = workdir / "models.json"
    base = workdir / "base"
    models = [workdir / f"ft{i}" for i in range(1, k + 1)]
    if stamp.exists() and json.loads(stamp.read_text()) == spec:
        return base, models
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    write_synthetic_model(
        base, layers=layers, hidden=hidden, vocab=vocab, seed=0, dtype=torch_dtype, shard_size=2 * 10**9
    )
    for i, folder in enumerate(models, start=1):
        write_synthetic_model(
            folder,
            layers=layers,
            hidden=hidden,
            vocab=vocab,
            seed=i,
            base_seed=0,
            dtype=torch_dtype,
            shard_size=2 * 10**9,
        )
    stamp.write_text(json.dumps(spec))
    return base, models


Measured = tuple[float, int, float]


def run_measured(cmd: list[str], *, cwd: Path | None = None) -> Measured:
    """Wall seconds, peak RSS (bytes, sampled every 20 ms over the process tree) and CPU seconds (user + system
    of the reaped process tree: on a shared machine the work done, less disturbed by others than the wall)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = psutil.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peak = 0
    while proc.poll() is None:
        try:
            rss = proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.02)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    output = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{output[-3000:]}")
    return wall, peak, cpu


def best_of(repeat: int, measure: Callable[[], Measured]) -> Measured:
    """The fastest wall time of ``repeat`` runs, the largest peak RSS and the least CPU time among them."""
    runs = [measure() for _ in range(max(1, repeat))]
    return min(r[0] for r in runs), max(r[1] for r in runs), min(r[2] for r in runs)


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def largest_tensor_numel(folder: Path) -> int:
    from safetensors import safe_open

    largest = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                numel = 1
                for dim in handle.get_slice(name).get_shape():
                    numel *= dim
                largest = max(largest, numel)
    return largest


def warm_up(workdir: Path, args: argparse.Namespace) -> None:
    """Merge a tiny model of the same dtype and K with every method once, untimed: the first merge on a machine
    compiles the CPU loops (numba, ``kernels/cpu_jit.py``) into their on-disk cache; a timed merge then only loads
    them, as every later merge of a user does. The tiny embedding (4096 × 64) is long enough for the compiled
    exact selection, so every loop a timed merge runs is compiled here."""
    base, models = generate(workdir / "warm-up", k=args.k, hidden=64, layers=2, vocab=4096, dtype=args.dtype)
    for method in args.methods.split(","):
        out = workdir / "warm-up" / f"out-{method}"
        _, command = alloy_merge(
            method, base, models, out, workdir / "warm-up" / f"{method}.yaml", args.device
        )
        subprocess.run(command, cwd=ROOT, check=True)
        shutil.rmtree(out, ignore_errors=True)


def alloy_merge(
    method: str, base: Path, models: list[Path], out: Path, recipe_path: Path, device: str
) -> tuple[list[Path], list[str]]:
    """Write the row's Alloy recipe (its params, the fine-tunes it takes) and return (the models it merges,
    the `alloy merge` command line)."""
    bench = METHODS[method]
    used = models[: bench.fine_tunes] if bench.fine_tunes else models
    weights = bench.weights or ()
    recipe = {
        "method": bench.method or method,
        "base": str(base),
        "models": [
            {"source": str(m)} | ({"weight": weights[i]} if i < len(weights) else {})
            for i, m in enumerate(used)
        ],
        "params": dict(bench.params),
        "output": {"path": str(out)},
    }
    recipe_path.write_text(yaml.safe_dump(recipe))
    return used, [sys.executable, "-m", "app.cli", "merge", str(recipe_path), "--quiet", "--device", device]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument(
        "--methods", default=DEFAULT_METHODS, help=f"comma-separated, from {', '.join(METHODS)}"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "alloy-bench"))
    parser.add_argument("--no-mergekit", action="store_true")
    parser.add_argument(
        "--mergekit-dtype",
        default="both",
        choices=["both", *MERGEKIT_DTYPES],
        help="mergekit's compute dtype: native (the models' dtype, as users' configs ask) and/or float32 "
        "(Alloy always computes in float32)",
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs of the floor and each Alloy merge (fastest kept)"
    )
    args = parser.parse_args()

    workdir = Path(args.workdir)
    base, models = generate(
        workdir / "models",
        k=args.k,
        hidden=args.hidden,
        layers=args.layers,
        vocab=args.vocab,
        dtype=args.dtype,
    )
    in_bytes = folder_bytes(base) * (args.k + 1)
    out_bytes = folder_bytes(base)
    params = folder_bytes(base) // {"float32": 4, "bfloat16": 2, "float16": 2}[args.dtype]
    print(
        f"# {args.k} fine-tunes + base, {params / 1e9:.3f}B parameters each, {args.dtype}, device {args.device}"
    )
    mergekit = None if args.no_mergekit else shutil.which("mergekit-yaml")
    outputs = workdir / "out"
    shutil.rmtree(outputs, ignore_errors=True)
    outputs.mkdir()

    floor_io: list[float] = []

    def floor_run() -> Measured:
        shutil.rmtree(outputs / "floor", ignore_errors=True)
        measured = run_measured(
            [sys.executable, "-c", _FLOOR, str(base), *map(str, models), str(outputs / "floor")], cwd=ROOT
        )
        floor_io.append(float((outputs / "floor" / "io_s.txt").read_text()))
        return measured

    floor_s, floor_rss, floor_cpu = best_of(args.repeat, floor_run)
    floor_io_s = min(floor_io)

    def os_copy_run() -> Measured:
        shutil.rmtree(outputs / "os-copy", ignore_errors=True)
        files = [str(f) for folder in (base, *models) for f in sorted(folder.glob("*.safetensors"))]
        env_cmd = ["env", f"BASE={base}", f"OUT={outputs / 'os-copy'}", "sh", "-c", _OS_COPY, "sh", *files]
        return run_measured(env_cmd)

    # reference rows: what bounds the floor (the OS moving the same bytes; torch's import) and the CLI's start
    references: list[tuple[str, Measured, bool]] = [
        ("  floor I/O after imports", (floor_io_s, floor_rss, floor_cpu), True),
        ("  cat K+1, cp 1 + fsync", best_of(args.repeat, os_copy_run), True),
        (
            "  python -c 'import torch'",
            best_of(args.repeat, lambda: run_measured([sys.executable, "-c", "import torch"])),
            False,
        ),
        (
            "  alloy merge --help",
            best_of(
                args.repeat,
                lambda: run_measured([sys.executable, "-m", "app.cli", "merge", "--help"], cwd=ROOT),
            ),
            False,
        ),
    ]
    shutil.rmtree(outputs / "os-copy", ignore_errors=True)
    mk_dtypes = MERGEKIT_DTYPES if args.mergekit_dtype == "both" else (args.mergekit_dtype,)
    rows: list[tuple[str, Measured, dict[str, Measured]]] = [
        ("floor (read K+1, write 1)", (floor_s, floor_rss, floor_cpu), {})
    ]
    gpu_bound = 2 * (args.k + 1) * largest_tensor_numel(base) * 4
    gpu_peaks: dict[str, float] = {}
    models_of: dict[str, list[Path]] = {}
    warm_up(workdir, args)
    for method in args.methods.split(","):
        bench = METHODS[method]
        used, command = alloy_merge(
            method, base, models, outputs / method, workdir / f"{method}.yaml", args.device
        )
        models_of[method] = used
        report: dict[str, object] = {}

        def merge_run(
            command: list[str] = command, method: str = method, report: dict[str, object] = report
        ) -> Measured:
            measured = run_measured(command, cwd=ROOT)
            report.update(json.loads((outputs / method / "alloy-report.json").read_text()))
            shutil.rmtree(outputs / method)  # 20 model-sized outputs would fill the disk and the page cache
            return measured

        alloy = best_of(args.repeat, merge_run)
        peak_cuda = report.get("peak_cuda_bytes")
        if isinstance(peak_cuda, int | float) and peak_cuda:
            gpu_peaks[method] = peak_cuda / gpu_bound
        mk: dict[str, Measured] = {}
        if mergekit and bench.mergekit is not None:
            for mk_dtype in mk_dtypes:
                mk[mk_dtype] = _run_mergekit(
                    mergekit, method, bench, base, used, workdir, outputs, args, mk_dtype
                )
        rows.append((method, alloy, mk))

    header = f"{'method':<28}{'wall s':>9}{'x floor':>9}{'CPU s':>8}{'peak RSS MiB':>14}{'GB/s':>8}"
    for mk_dtype in mk_dtypes if mergekit else ():
        header += f"{'mk ' + mk_dtype + ' s':>16}{'mk RSS MiB':>12}{'mk/alloy':>10}"
    header += f"{'GPU peak/bound':>16}" if gpu_peaks else ""
    print(header)
    for name, (wall, rss, cpu), mk in rows:
        read = in_bytes if name not in models_of else folder_bytes(base) * (len(models_of[name]) + 1)
        line = (
            f"{name:<28}{wall:>9.2f}{wall / floor_s:>9.2f}{cpu:>8.1f}{rss / 2**20:>14.0f}"
            f"{(read + out_bytes) / wall / 1e9:>8.2f}"
        )
        for mk_dtype in mk_dtypes if mergekit else ():
            if mk_dtype in mk:
                mk_s, mk_rss, _ = mk[mk_dtype]
                line += f"{mk_s:>16.2f}{mk_rss / 2**20:>12.0f}{mk_s / wall:>10.2f}"
            else:
                line += f"{'-':>16}{'-':>12}{'-':>10}"
        if gpu_peaks:
            line += f"{gpu_peaks[name]:>16.2f}" if name in gpu_peaks else f"{'-':>16}"
        print(line)
        if name == rows[0][0]:
            for ref_name, (ref_wall, ref_rss, ref_cpu), moves_bytes in references:
                in_process = ref_name == "  floor I/O after imports"  # part of the floor's own run
                print(
                    f"{ref_name:<28}{ref_wall:>9.2f}{ref_wall / floor_s:>9.2f}"
                    + (f"{'-':>8}{'-':>14}" if in_process else f"{ref_cpu:>8.1f}{ref_rss / 2**20:>14.0f}")
                    + (f"{(in_bytes + out_bytes) / ref_wall / 1e9:>8.2f}" if moves_bytes else f"{'-':>8}")
                )
    if not mergekit and not args.no_mergekit:
        print("(mergekit not installed: `pip install mergekit` to compare in the same run)")


def _run_mergekit(
    mergekit: str,
    method: str,
    bench: Bench,
    base: Path,
    models: list[Path],
    workdir: Path,
    outputs: Path,
    args: argparse.Namespace,
    mk_dtype: str,
) -> Measured:
    """mergekit-yaml on the same merge; ``native`` computes in the models' dtype, ``float32`` in float32 (its
    output is then cast back to the models' dtype by ``out_dtype``)."""
    mk_cfg: dict[str, object] = {
        "merge_method": method,
        "base_model": str(base),
        "dtype": args.dtype if mk_dtype == "native" else "float32",
        "out_dtype": args.dtype,
        "models": [
            {"model": str(m), "parameters": {"weight": 1.0, **(bench.mergekit or {})}} for m in models
        ],
    }
    if method == "linear":
        mk_cfg.pop("base_model")
    if bench.mergekit_lists_base:
        mk_cfg["models"] = [{"model": str(base)}, *({"model": str(m)} for m in models)]
        mk_cfg["parameters"] = bench.mergekit
    mk_path = workdir / f"{method}-mergekit-{mk_dtype}.yaml"
    mk_path.write_text(yaml.safe_dump(mk_cfg))
    out = outputs / f"{method}-mergekit-{mk_dtype}"
    cmd = [mergekit, str(mk_path), str(out), "--lazy-unpickle"]
    if args.device == "cuda":
        cmd.append("--cuda")
    measured = run_measured(cmd)
    shutil.rmtree(out, ignore_errors=True)
    return measured


if __name__ == "__main__":
    main()
