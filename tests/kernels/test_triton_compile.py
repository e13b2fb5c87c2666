"""Every Triton kernel variant the launchers use compiles to a cubin for sm_90 (H100/H200), checked without a GPU
by triton's own compiler in a fresh subprocess (the test process may hold interpreted kernels, which can't be
compiled). This catches ops the CPU interpreter accepts but the GPU backend rejects."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_triton_kernels_compile_for_sm90():
    pytest.importorskip("triton", reason="triton is not installed (the gpu extra)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run(
        [sys.executable, __file__, "90"], env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _compile_all(arch: int) -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels.triton import consensus, elementwise, fused, select

    def ta_sig(k_dtypes, out):
        sig = {"out_ptr": f"*{out}", "base_ptr": "*fp32", "acc_ptr": "*fp32"}
        for i in range(8):
            sig[f"t{i}"] = f"*{k_dtypes[i % len(k_dtypes)]}"
        for i in range(8):
            sig[f"w{i}"] = "fp32"
        sig.update(scale="fp32", n="i64")
        return sig

    CASES = (
        [
            (
                elementwise._task_arithmetic_kernel,
                ta_sig(["fp32", "bf16", "fp16"], "i16"),
                dict(K=8, HAS_ACC=True, FINAL=True, OUT_BF16=True, BLOCK=1024),
            ),
            (
                elementwise._task_arithmetic_kernel,
                ta_sig(["bf16"], "fp16"),
                dict(K=3, HAS_ACC=False, FINAL=False, OUT_BF16=False, BLOCK=1024),
            ),
            (
                elementwise._pack_bits_kernel,
                {"mask_ptr": "*u8", "out_ptr": "*u8", "n": "i64", "n_bytes": "i64"},
                dict(BLOCK_BYTES=256),
            ),
            (
                elementwise._unpack_bits_kernel,
                {"packed_ptr": "*u8", "out_ptr": "*u8", "n": "i32"},
                dict(BLOCK=1024),
            ),
            (
                elementwise._dare_keep_kernel,
                {"out_ptr": "*u8", "key": "i64", "threshold": "i32", "n": "i64"},
                dict(BLOCK=1024),
            ),
            (
                elementwise._ternarize_kernel,
                {
                    "x_ptr": "*bf16",
                    "mask_ptr": "*u8",
                    "scale_ptr": "*fp32",
                    "out_ptr": "*fp32",
                    "n": "i32",
                    "blocks_per_row": "i32",
                },
                dict(BLOCK=1024),
            ),
            (
                select._histogram_kernel,
                {
                    "x_ptr": "*fp16",
                    "prefix_ptr": "*i64",
                    "partial_ptr": "*i32",
                    "n": "i32",
                    "programs_per_row": "i32",
                    "prefix_shift": "i32",
                    "digit_shift": "i32",
                },
                dict(NUM_BINS=2048, BLOCK=1024),
            ),
            (
                select._histogram_kernel,
                {
                    "x_ptr": "*fp32",
                    "prefix_ptr": "*i64",
                    "partial_ptr": "*i32",
                    "n": "i64",
                    "programs_per_row": "i32",
                    "prefix_shift": "i32",
                    "digit_shift": "i32",
                },
                dict(NUM_BINS=256, BLOCK=1024),
            ),
            (
                select._tie_count_kernel,
                {
                    "x_ptr": "*fp32",
                    "threshold_ptr": "*fp32",
                    "counts_ptr": "*i32",
                    "n": "i32",
                    "blocks_per_row": "i32",
                },
                dict(BLOCK=1024),
            ),
        ]
        + [
            (
                select._select_kernel,
                {
                    "x_ptr": "*bf16",
                    "out_ptr": "*u8",
                    "hi_threshold": "*fp32",
                    "hi_quota": "*i64",
                    "hi_offsets": "*i64",
                    "lo_threshold": "*fp32",
                    "lo_quota": "*i64",
                    "lo_offsets": "*i64",
                    "n": "i32",
                    "blocks_per_row": "i32",
                },
                dict(HAS_LO=lo, HI_PARTIAL=hp, LO_PARTIAL=lp, BLOCK=1024),
            )
            for lo, hp, lp in [(False, False, False), (True, True, True), (True, False, True)]
        ]
        + [
            (
                consensus._consensus_kernel,
                {
                    "x_ptr": "*fp32",
                    "w_ptr": "*fp32",
                    "merged_ptr": "*fp32",
                    "contributors_ptr": "*i64",
                    "n": "i32",
                },
                dict(K=k, ELECT_ONLY=e, MEAN=m, BLOCK=1024),
            )
            for k, e, m in [(1, True, False), (5, False, True), (8, False, False)]
        ]
    )

    fused_sig = {
        "x_ptr": "*bf16",
        "w_ptr": "*fp32",
        "out_ptr": "*fp32",
        "counts_ptr": "*i32",
        "R": "i32",
        "m": "i32",
        "blocks": "i32",
    }
    fused_sig.update({name: "*fp32" for name in ("hi_thr", "lo_thr", "scale_ptr")})
    fused_sig.update(
        {name: "*i64" for name in ("hi_quota", "hi_off", "lo_quota", "lo_off", "dare_key", "dare_thr")}
    )
    fused_sig["plain_divisor"] = "fp32"
    for mode, has_lo, partial, consensus_, mean, has_scale, ternary in (
        (1, True, True, True, True, False, False),
        (1, False, False, False, True, True, True),
        (2, False, False, True, False, True, False),
        (0, False, False, False, False, False, False),
    ):
        CASES.append(
            (
                fused._fused_sparse_merge_kernel,
                fused_sig,
                dict(
                    K=5,
                    MODE=mode,
                    HAS_LO=has_lo,
                    HI_PARTIAL=partial,
                    LO_PARTIAL=partial,
                    HAS_SCALE=has_scale,
                    TERNARY=ternary,
                    CONSENSUS=consensus_,
                    MEAN=mean,
                    BLOCK=1024,
                ),
            )
        )

    failures = 0
    for fn, sig, consts in CASES:
        signature = {**sig, **{name: "constexpr" for name in consts}}
        try:
            compiled = triton.compile(
                ASTSource(fn=fn, signature=signature, constexprs=consts), target=GPUTarget("cuda", arch, 32)
            )
            assert "cubin" in compiled.asm
            print(f"ok   {fn.__name__} {consts}")
        except Exception as exc:
            failures += 1
            print(f"FAIL {fn.__name__} {consts}: {type(exc).__name__}: {exc}")
    return failures


if __name__ == "__main__":
    sys.exit(1 if _compile_all(int(sys.argv[1])) else 0)
