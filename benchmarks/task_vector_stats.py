"""Cost of the report's task-vector Gram matrices against the fused merge of the same tensor.

    python benchmarks/task_vector_stats.py [--numel 16777216] [--k 3] [--dtype bfloat16] [--repeat 7] [--threads N]

One tensor of ``--numel`` elements, a base and K fine-tunes: times ``kernels.fused_task_arithmetic`` (the merge
of a plain weighted sum) and ``merge_ops.task_vector_stats.task_vector_gram`` (what the report adds per tensor),
interleaved, the fastest of ``--repeat`` runs each (a shared machine disturbs the slower ones), in wall time and
in CPU time (user + system of this process: the work done, which a busy machine disturbs far less), with ratios. The Gram matrix reads the same K+1 inputs once more; K²·N multiply-adds on top.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

# run as a script, this folder comes first on sys.path and its kernels.py (the kernel benchmark) would shadow the
# package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
import kernels  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--numel", type=int, default=4096 * 4096)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(args.numel, generator=gen)
    inputs = [(base + 0.01 * torch.randn(args.numel, generator=gen)).to(dtype) for _ in range(args.k)]
    taus = torch.stack([t.float() - base.float() for t in inputs])
    base = base.to(dtype)

    def fused(gram: bool) -> None:
        g = torch.zeros((args.k, args.k), dtype=torch.float64) if gram else None
        kernels.fused_task_arithmetic(base, inputs, [1.0] * args.k, scale=1.0, out_dtype=dtype, gram=g)

    runs = {
        "fused merge": lambda: fused(False),
        "fused + Gram": lambda: fused(True),  # what a task-arithmetic merge runs: the Gram inside the pass
        "Gram of taus": lambda: kernels.task_vector_gram(taus),  # what the other methods add per tensor
    }
    wall = dict.fromkeys(runs, float("inf"))
    cpu = dict.fromkeys(runs, float("inf"))
    for _ in range(args.repeat):
        for name, run in runs.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            run()
            wall[name] = min(wall[name], time.perf_counter() - start)
            cpu[name] = min(cpu[name], time.process_time() - start_cpu)
    print(f"# {args.numel} elements, K={args.k}, {args.dtype}, {torch.get_num_threads()} threads")
    print(f"{'':14}{'wall ms':>10}{'x fused':>10}{'CPU ms':>10}{'x fused':>10}")
    for name in runs:
        print(
            f"{name:14}{wall[name] * 1e3:10.1f}{wall[name] / wall['fused merge']:10.2f}"
            f"{cpu[name] * 1e3:10.1f}{cpu[name] / cpu['fused merge']:10.2f}"
        )


if __name__ == "__main__":
    main()
