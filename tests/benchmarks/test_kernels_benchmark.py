"""``benchmarks/kernels.py`` runs end to end: on a machine without a GPU through the Triton interpreter at a tiny
size (a smoke run of every benchmarked op, so the GPU table is one command away), with a GPU at that size."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_kernel_benchmark_prints_a_row_per_op():
    pytest.importorskip("triton", reason="triton is not installed (the gpu extra)")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "benchmarks/kernels.py",
            "--numel",
            "4099",
            "--k",
            "1,2",
            "--rows",
            "4",
            "--repeat",
            "1",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    table = done.stdout
    for op in (
        "fused_task_arithmetic K=2",
        "ties fused_sparse_merge K=2",
        "rank_boundary vs torch.topk",
        "rank_boundary vs torch.kthvalue",
        "topk_mask breadcrumbs band",
        "dare_keep_mask",
        "ternarize",
    ):
        assert op in table, table
    assert "nan" not in table.lower()
