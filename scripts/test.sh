#!/usr/bin/env bash
# Sets up a fresh machine and runs the whole test suite (CPU only; Triton kernels run under TRITON_INTERPRET=1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
export PYTHONUNBUFFERED=1
python3 -m ruff check .
python3 -m ruff format --check .
python3 -m mypy
python3 -m pytest -q -p no:cacheprovider "$@"
