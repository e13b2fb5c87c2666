#!/usr/bin/env bash
# Sets up a fresh machine and runs the whole test suite (CPU only; Triton kernels run under TRITON_INTERPRET=1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
export PYTHONUNBUFFERED=1
python3 -m ruff check .
python3 -m ruff format --check .
python3 -m mypy
# compile the CPU loops (numba) into their on-disk cache first, so no test's timing pays for a first compile
python3 -m kernels.cpu_jit
python3 -m pytest -q -p no:cacheprovider "$@"
