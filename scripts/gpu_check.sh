#!/usr/bin/env bash
# One prepared GPU check (issue 14): the gpu-marked kernel tests, the kernel benchmark and the whole merge on a
# Llama-shaped bf16 model with K = 3, every table into one log. Sized for ~8 minutes on one H200.
#
#   bash scripts/gpu_check.sh --fetch-wheels   # where pip reaches PyPI: the wheels the GPU machine lacks -> .whl/
#   bash scripts/gpu_check.sh                  # on the GPU machine, from the repo root (.whl/ carried along)
#   bash scripts/gpu_check.sh --dry-run        # any machine, CPU only: tiny sizes, Triton interpreter, same steps
#
# Log: ${OUT:-/tmp/alloy-gpu-check}/gpu_check.log (the device tool brings $OUT back). Models go to local disk under
# ${ALLOY_GPU_WORKDIR:-/tmp/alloy-gpu-check}. Each step has its own time limit and the script goes on after a
# failed one; the summary at the end lists every step's exit status and seconds. Exit status: 0 if all passed.
#
# The GPU machine has torch, triton, safetensors, numpy, pyyaml, psutil and pytest but not pydantic (the recipe
# model) nor the service packages. The merge path imports only pydantic beyond those (the CLI's merge command
# loads no service module), so the wheels are pydantic and its own needs, for CPython 3.12 on x86-64 Linux.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
PY="${PYTHON:-python3}"
WHEELS=(pydantic==2.13.4 pydantic_core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2
  typing_extensions==4.16.0)
MODE=gpu
case "${1:-}" in
  --fetch-wheels) MODE=fetch ;;
  --dry-run) MODE=dry ;;
  "") ;;
  *) echo "usage: bash scripts/gpu_check.sh [--fetch-wheels | --dry-run]" >&2; exit 2 ;;
esac

if [[ $MODE == fetch ]]; then
  mkdir -p .whl
  exec "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${WHEELS[@]}"
fi

WORK="${ALLOY_GPU_WORKDIR:-/tmp/alloy-gpu-check}"
OUT_DIR="${OUT:-$WORK}"
mkdir -p "$OUT_DIR" "$WORK"
LOG="$OUT_DIR/gpu_check.log"
: >"$LOG"
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT"
unset ALLOY_KERNELS

if [[ $MODE == dry ]]; then
  # CPU: interpreted kernels, a model of a few MB; checks that every step starts, runs and logs
  export TRITON_INTERPRET=1
  MODEL=(--hidden 64 --layers 2 --vocab 256)
  KERNEL_ARGS=(--numel 4097 --k 1,3 --rows 4 --repeat 1)
  # no GPU test can run here: the interpreted whole-merge comparison stands in for them
  PYTEST_ARGS=(tests/kernels/test_triton_merge.py -k "not compiled")
  DEVICE=cpu
  LIMITS=(120 120 240)
else
  # ~1.04B parameters per model (hidden 2048, MLP 5504, 18 layers, vocab 32000), bf16: 2.1 GB each, 8.3 GB
  # for base + 3 fine-tunes; the largest tensor (embed/lm_head, 65.5M) is what the GPU-memory bound uses
  unset TRITON_INTERPRET
  MODEL=(--hidden 2048 --layers 18 --vocab 32000)
  KERNEL_ARGS=()
  PYTEST_ARGS=(-m gpu tests/kernels)
  DEVICE=cuda
  LIMITS=(150 120 240)
fi
METHODS=task_arithmetic,ties,dare_ties,breadcrumbs_ties,compeft,della

log() { printf '%s\n' "$*" | tee -a "$LOG"; }
SUMMARY=()
FAILED=0
# the whole run ends (summary written) within this many seconds (8 minutes: a 15-minute lease can run it twice);
# steps that would start past it are skipped, and a step's limit is cut to the time left
DEADLINE_S="${ALLOY_GPU_DEADLINE_S:-480}"
step() {  # step NAME LIMIT_S CMD...: run, tee into the log, record the exit status and wall seconds
  local name=$1 limit=$2
  shift 2
  local left=$((DEADLINE_S - SECONDS - 10))
  if ((left < 20)); then
    SUMMARY+=("$(printf '%-28s skipped: %ss left of %ss' "$name" "$((DEADLINE_S - SECONDS))" "$DEADLINE_S")")
    FAILED=1
    return
  fi
  ((limit > left)) && limit=$left
  log ""
  log "=== $name (limit ${limit}s): $(printf '%.150s' "$*" | head -1)"
  local start=$SECONDS rc
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  SUMMARY+=("$(printf '%-28s rc=%-4s %5ss' "$name" "$rc" "$((SECONDS - start))")")
  [[ $rc == 0 ]] || FAILED=1
}

log "=== alloy gpu_check ($MODE) $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
if ! "$PY" -c "import pydantic" 2>/dev/null; then
  if [[ -d .whl ]]; then
    step "install wheels" 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$WORK/site" .whl/*.whl
    export PYTHONPATH="$ROOT:$WORK/site"
  else
    log "pydantic is missing and there is no .whl/: run 'bash scripts/gpu_check.sh --fetch-wheels' where pip works"
    log "and bring .whl/ along (the device tool: carry [\".whl\"])"
  fi
fi
step "environment" 60 "$PY" -c '
import platform, torch, pydantic, safetensors
print("python", platform.python_version(), "torch", torch.__version__, "pydantic", pydantic.VERSION,
      "safetensors", safetensors.__version__)
try:
    import triton
    print("triton", triton.__version__)
except ImportError as exc:
    print("triton missing:", exc)
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
'
command -v nvidia-smi >/dev/null && step "nvidia-smi" 30 nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv

# The models first, timed on their own; merge_speed.py then finds them (same spec, same folder, its stamp). Its
# generate() writes them one after another on one core (~30 s per 1B-parameter fine-tune); here each
# write_synthetic_model call it makes runs in its own process instead, so the four take the time of one.
step "generate models" 150 "$PY" -c '
import multiprocessing, sys, time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
sys.path.insert(0, "benchmarks")
import merge_ops.demo
from merge_speed import folder_bytes, generate
hidden, layers, vocab = map(int, sys.argv[2:5])
start = time.perf_counter()
original = merge_ops.demo.write_synthetic_model
def write(*args, **kwargs):  # runs in a forked child, where `original` is the real one
    return original(*args, **kwargs)
with ProcessPoolExecutor(4, mp_context=multiprocessing.get_context("fork")) as pool:
    jobs = []
    merge_ops.demo.write_synthetic_model = lambda *a, **kw: jobs.append(pool.submit(write, *a, **kw))
    base, models = generate(Path(sys.argv[1]), k=3, hidden=hidden, layers=layers, vocab=vocab, dtype="bfloat16")
    try:
        for job in jobs:
            job.result()
    except BaseException:
        (Path(sys.argv[1]) / "models.json").unlink(missing_ok=True)  # half-written: merge_speed regenerates
        raise
print(f"base + {len(models)} fine-tunes, {folder_bytes(base) / 2 / 1e9:.3f}B parameters each (bf16),"
      f" {folder_bytes(base) * 4 / 1e9:.2f} GB on disk, {len(jobs)} written in {time.perf_counter() - start:.1f}s")
' "$WORK/bench/models" "${MODEL[1]}" "${MODEL[3]}" "${MODEL[5]}"

step "pytest ${PYTEST_ARGS[*]}" "${LIMITS[0]}" "$PY" -m pytest -q -p no:cacheprovider "${PYTEST_ARGS[@]}"
step "benchmarks/kernels.py" "${LIMITS[1]}" "$PY" benchmarks/kernels.py "${KERNEL_ARGS[@]}"
step "benchmarks/merge_speed.py" "${LIMITS[2]}" "$PY" benchmarks/merge_speed.py "${MODEL[@]}" --k 3 \
  --dtype bfloat16 --device "$DEVICE" --methods "$METHODS" --no-mergekit --workdir "$WORK/bench"

log ""
log "=== summary ($MODE)"
for line in "${SUMMARY[@]}"; do log "$line"; done
log "log: $LOG"
exit "$FAILED"
