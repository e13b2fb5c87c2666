"""Kernel benchmark: per op, Triton time, effective GB/s, the device-to-device copy bandwidth measured in the same
run, the ratio to it, and the torch eager (reference) time.

    python benchmarks/kernels.py [--numel 58720256] [--k 1,2,5,8] [--dtype bfloat16] [--rows 4096] [--repeat 20]

Needs a CUDA GPU and triton; without them it says so and exits with status 2, unless ``TRITON_INTERPRET=1`` is
set: then it runs on the CPU through the Triton interpreter as a smoke test (use a small ``--numel``; the timings
mean nothing). Merging is memory-bound: the
floor of a K-way merge is reading K+1 tensors and writing one, so "ratio" = effective GB/s of the op over the
copy's (read + write) GB/s; 1.0 means the op runs at copy speed. Effective bytes count each input read once and
each output written once (the radix select's 4 histogram passes and the select pass each count as a read).
The torch column is the eager reference twin of each op; the selection rows also compare the exact radix select
(``rank_boundary``) with ``torch.topk`` and ``torch.kthvalue`` finding the same k-th largest magnitude.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _time_ms(fn: Callable[[], object], repeat: int) -> float:
    import torch

    fn()  # compile / warm up
    if not torch.cuda.is_available():  # interpreter smoke run: wall clock
        start_s = time.perf_counter()
        for _ in range(repeat):
            fn()
        return (time.perf_counter() - start_s) * 1e3 / repeat
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeat):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]  # median


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--numel", type=int, default=14336 * 4096, help="elements per tensor (llama MLP weight)"
    )
    parser.add_argument("--k", default="1,2,5,8", help="comma-separated numbers of fine-tuned models")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--rows", type=int, default=4096, help="rows of the per-row selection benchmark")
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args(argv)

    import torch

    interpreter = not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "1"
    if not torch.cuda.is_available() and not interpreter:
        print(
            "benchmarks/kernels.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing measured."
        )
        return 2
    try:
        import kernels.triton_ops as tri
    except Exception as exc:  # triton missing or broken
        print(f"benchmarks/kernels.py needs triton: {type(exc).__name__}: {exc}")
        return 2
    from kernels import reference as ref

    dtype = getattr(torch, args.dtype)
    size = torch.empty(0, dtype=dtype).element_size()
    n = args.numel
    dev = torch.device("cpu" if interpreter else "cuda")
    gen = torch.Generator(device=dev).manual_seed(0)

    def randn(*shape: int, dt: torch.dtype = dtype) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=dev, dtype=torch.float32).to(dt)

    src, dst = randn(n), torch.empty(n, dtype=dtype, device=dev)
    copy_ms = _time_ms(lambda: dst.copy_(src), args.repeat)
    copy_gbs = 2 * n * size / copy_ms / 1e6
    device_name = "CPU, Triton interpreter (smoke run)" if interpreter else torch.cuda.get_device_name(dev)
    print(
        f"device: {device_name}; copy of {n} x {args.dtype}: {copy_ms:.3f} ms, "
        f"{copy_gbs:.0f} GB/s (read + write)\n"
    )

    rows: list[tuple[str, float, int, float]] = []  # op, triton ms, bytes moved, torch ms

    def bench(
        name: str, triton_fn: Callable[[], object], torch_fn: Callable[[], object], nbytes: int
    ) -> None:
        rows.append((name, _time_ms(triton_fn, args.repeat), nbytes, _time_ms(torch_fn, args.repeat)))

    base = randn(n)
    for k in (int(v) for v in args.k.split(",")):
        thetas = [randn(n) for _ in range(k)]
        weights = [1.0 / k] * k
        bench(
            f"fused_task_arithmetic K={k}",
            lambda t=thetas, w=weights: tri.fused_task_arithmetic(base, t, w, scale=0.5, out_dtype=dtype),
            lambda t=thetas, w=weights: ref.fused_task_arithmetic(base, t, w, scale=0.5, out_dtype=dtype),
            (k + 2) * n * size,
        )
        stack = torch.stack(thetas).float()
        stack[torch.rand(stack.shape, generator=gen, device=dev) < 0.8] = 0
        wt = torch.ones(k, device=dev)
        bench(
            f"disjoint_merge K={k} (fp32 in)",
            lambda s=stack, w=wt: tri.disjoint_merge(s, w, mean=True),
            lambda s=stack, w=wt: ref.disjoint_merge(s, w, mean=True),
            k * n * 4 + n * (4 + 8),
        )
        tv = torch.stack(thetas).view(k, 1, n)  # stored dtype, as the pipeline reads it
        keep_k = torch.full((k,), n // 5, device=dev)
        ties = {"keep": keep_k, "consensus": True, "mean": True}
        bench(
            f"ties fused_sparse_merge K={k}",
            lambda tv=tv, w=wt, a=ties: tri.fused_sparse_merge(tv, w, **a),
            lambda tv=tv, w=wt, a=ties: ref.fused_sparse_merge(tv, w, **a),
            5 * k * n * size + n * 4,
        )
        del thetas, stack, tv

    x = randn(1, n)
    keep = torch.tensor([n // 5], device=dev)
    skip = torch.tensor([n // 200], device=dev)
    bench(
        "topk_mask per_tensor (density 0.2)",
        lambda: tri.topk_mask(x, keep=keep),
        lambda: ref.topk_mask(x, keep=keep),
        5 * n * size + n,
    )
    rank = keep
    magnitude = x.float().abs()
    bench(
        "rank_boundary vs torch.topk",
        lambda: tri.rank_boundary(x, rank),
        lambda: torch.topk(magnitude, n // 5, dim=1, sorted=False),
        4 * n * size,
    )
    bench(
        "rank_boundary vs torch.kthvalue",
        lambda: tri.rank_boundary(x, rank),
        lambda: torch.kthvalue(magnitude, n - n // 5 + 1, dim=1),
        4 * n * size,
    )
    bench(
        "topk_mask breadcrumbs band",
        lambda: tri.topk_mask(x, keep=keep, skip=skip),
        lambda: ref.topk_mask(x, keep=keep, skip=skip),
        9 * n * size + n,
    )
    xr = x.view(-1)[: (n // args.rows) * args.rows].view(args.rows, -1)
    keep_r = torch.full((args.rows,), xr.shape[1] // 5, device=dev)
    bench(
        f"topk_mask per_row ({args.rows} rows)",
        lambda: tri.topk_mask(xr, keep=keep_r),
        lambda: ref.topk_mask(xr, keep=keep_r),
        5 * n * size + n,
    )
    prefix = torch.zeros(1, dtype=torch.int64, device=dev)
    hist = {"prefix": prefix, "prefix_shift": 31, "digit_shift": 20, "digit_bits": 11}
    bench(
        "magnitude_histogram 11 bits",
        lambda: tri.magnitude_histogram(x, **hist),
        lambda: ref.magnitude_histogram(x, **hist),
        n * size,
    )
    mask = torch.rand(n, generator=gen, device=dev) < 0.2
    bench(
        "dare_keep_mask",
        lambda: tri.dare_keep_mask((n,), density=0.1, seed=1, source_index=0, name="w", device=dev),
        lambda: ref.dare_keep_mask((n,), density=0.1, seed=1, source_index=0, name="w", device=dev),
        n,
    )
    bench("pack_bits", lambda: tri.pack_bits(mask), lambda: ref.pack_bits(mask), n + n // 8)
    packed = tri.pack_bits(mask)
    bench("unpack_bits", lambda: tri.unpack_bits(packed, n), lambda: ref.unpack_bits(packed, n), n + n // 8)
    scale = torch.ones(1, device=dev)
    bench(
        "ternarize",
        lambda: tri.ternarize(x, mask.view(1, -1), scale),
        lambda: ref.ternarize(x, mask.view(1, -1), scale),
        n * (size + 1 + 4),
    )

    print(
        f"{'op':<38} {'triton ms':>10} {'GB/s':>8} {'copy GB/s':>10} {'ratio':>6} {'torch ms':>10} {'speedup':>8}"
    )
    for name, ms, nbytes, torch_ms in rows:
        gbs = nbytes / ms / 1e6
        print(
            f"{name:<38} {ms:>10.3f} {gbs:>8.0f} {copy_gbs:>10.0f} {gbs / copy_gbs:>6.2f} {torch_ms:>10.3f} "
            f"{torch_ms / ms:>7.1f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
