"""Merge speed: wall time, peak RSS and effective GB/s per method, against the I/O floor and mergekit.

    python benchmarks/merge_speed.py [--hidden 1024 --layers 24 --vocab 32000] [--k 3] [--dtype bfloat16]
                                     [--methods task_arithmetic,ties,...] [--device cpu|cuda] [--workdir DIR]

Generates a llama-shaped base and K fine-tunes (about 0.37B parameters each with the defaults), then runs each
merge in a fresh subprocess (so peak RSS is the merge's own) and prints a table. "floor" reads the K+1 inputs and
writes one output once, with nothing computed: the target is a merge within 1.5× of it. When mergekit is
installed (`mergekit-yaml` on PATH), the same merges run with mergekit in the same invocation and the table shows
the time ratio. Effective GB/s = (bytes read + bytes written) / wall time. With ``--device cuda`` a last column
gives the merge's peak GPU memory (``alloy-report.json``) over 2·(K+1)·the largest tensor (float32 bytes), the
bound the kernels are built to (≤ 1.0 is within it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
MERGEKIT_METHODS = {
    "task_arithmetic",
    "linear",
    "ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "dare_linear",
    "dare_ties",
    "slerp",
    "della",
}
# methods compared with settings of their own: Alloy params (mergekit: the same, per model), and slerp merges the
# base with the first fine-tune only (its contract: two inputs)
METHOD_PARAMS: dict[str, dict[str, float]] = {"slerp": {"t": 0.5}, "della": {"density": 0.5, "epsilon": 0.1}}

_FLOOR = """
import sys
from pathlib import Path
from safetensors import safe_open
from merge_ops.checkpoint import torch_dtype
from merge_ops.writer import ShardedWriter
folders = [Path(p) for p in sys.argv[1:-1]]
out = Path(sys.argv[-1])
out.mkdir(parents=True)
def open_all(folder):
    return {n: h for h in (safe_open(str(f), "pt") for f in sorted(folder.glob("*.safetensors"))) for n in h.keys()}
sources = [open_all(f) for f in folders]
plan = []
for name, handle in sources[0].items():
    sl = handle.get_slice(name)
    plan.append((name, torch_dtype(sl.get_dtype()), tuple(sl.get_shape())))
writer = ShardedWriter(out, plan=plan, shard_size=5 * 10**9, metadata={"format": "pt"})
for name, _, _ in plan:
    tensors = [src[name].get_tensor(name) for src in sources]
    writer.write(name, tensors[0])
writer.close()
"""


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


def run_measured(cmd: list[str], *, cwd: Path | None = None) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes, sampled every 20 ms over the process tree)."""
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
    output = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{output[-3000:]}")
    return wall, peak


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
        "--methods",
        default="task_arithmetic,linear,ties,dare_ties,breadcrumbs,compeft,model_stock,slerp,della",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "alloy-bench"))
    parser.add_argument("--no-mergekit", action="store_true")
    parser.add_argument(
        "--mergekit-dtype",
        default="float32",
        choices=["float32", "native"],
        help="mergekit's compute dtype (Alloy always computes in float32)",
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

    floor_s, floor_rss = run_measured(
        [sys.executable, "-c", _FLOOR, str(base), *map(str, models), str(outputs / "floor")], cwd=ROOT
    )
    rows = [("floor (read K+1, write 1)", floor_s, floor_rss, None)]
    gpu_bound = 2 * (args.k + 1) * largest_tensor_numel(base) * 4
    gpu_peaks: dict[str, float] = {}
    models_of: dict[str, list[Path]] = {}
    for method in args.methods.split(","):
        used = models_of[method] = models[:1] if method == "slerp" else models
        recipe = {
            "method": method,
            "base": str(base),
            "models": [{"source": str(m)} for m in used],
            "params": METHOD_PARAMS.get(method, {}),
            "output": {"path": str(outputs / method)},
        }
        recipe_path = workdir / f"{method}.yaml"
        recipe_path.write_text(yaml.safe_dump(recipe))
        wall, rss = run_measured(
            [sys.executable, "-m", "app.cli", "merge", str(recipe_path), "--quiet", "--device", args.device],
            cwd=ROOT,
        )
        report = json.loads((outputs / method / "alloy-report.json").read_text())
        if report.get("peak_cuda_bytes"):
            gpu_peaks[method] = report["peak_cuda_bytes"] / gpu_bound
        mk = None
        if mergekit and method in MERGEKIT_METHODS:
            mk_cfg = {
                "merge_method": method,
                "base_model": str(base),
                "dtype": args.dtype,
                "models": [
                    {"model": str(m), "parameters": {"weight": 1.0, **_mk_params(method)}} for m in models
                ],
            }
            if method == "linear":
                mk_cfg.pop("base_model")
            if (
                method == "slerp"
            ):  # t is global; the base is listed as an input too (mergekit's slerp configs)
                mk_cfg["models"] = [{"model": str(base)}, *({"model": str(m)} for m in used)]
                mk_cfg["parameters"] = METHOD_PARAMS["slerp"]
            mk_path = workdir / f"{method}-mergekit.yaml"
            mk_path.write_text(yaml.safe_dump(mk_cfg))
            cmd = [mergekit, str(mk_path), str(outputs / f"{method}-mergekit"), "--lazy-unpickle"]
            if args.device == "cuda":
                cmd.append("--cuda")
            mk = run_measured(cmd)
        rows.append((method, wall, rss, mk))

    header = f"{'method':<28}{'wall s':>9}{'x floor':>9}{'peak RSS MiB':>14}{'GB/s':>8}"
    header += f"{'mergekit s':>12}{'mk RSS MiB':>12}{'mk/alloy':>10}" if mergekit else ""
    header += f"{'GPU peak/bound':>16}" if gpu_peaks else ""
    print(header)
    for name, wall, rss, mk in rows:
        read = in_bytes if name not in models_of else folder_bytes(base) * (len(models_of[name]) + 1)
        line = (
            f"{name:<28}{wall:>9.2f}{wall / floor_s:>9.2f}{rss / 2**20:>14.0f}"
            f"{(read + out_bytes) / wall / 1e9:>8.2f}"
        )
        if mergekit:
            line += (
                f"{mk[0]:>12.2f}{mk[1] / 2**20:>12.0f}{mk[0] / wall:>10.2f}"
                if mk
                else f"{'-':>12}{'-':>12}{'-':>10}"
            )
        if gpu_peaks:
            line += f"{gpu_peaks[name]:>16.2f}" if name in gpu_peaks else f"{'-':>16}"
        print(line)
    if not mergekit and not args.no_mergekit:
        print("(mergekit not installed: `pip install mergekit` to compare in the same run)")


def _mk_params(method: str) -> dict[str, float]:
    if method == "della":
        return METHOD_PARAMS["della"]
    return (
        {"density": 0.2}
        if method in {"ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties"}
        else {}
    )


if __name__ == "__main__":
    main()
