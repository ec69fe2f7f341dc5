#!/usr/bin/env bash
# One GPU run of the CUDA path, sized for about 8 minutes on an H100 (docs/PERFORMANCE.md, "GPU").
#
#   bash experiments/gpu_check.sh             # on the GPU machine, from the repository root
#   bash experiments/gpu_check.sh --dry-run   # anywhere: collect the CUDA tests, run gpu_bench.py --dry-run
#
# On the GPU machine it first installs the wheels in .whl/ (pydantic and fla, fetched with the
# `pip download` line in docs/PERFORMANCE.md, "GPU") into /tmp/site, then runs, each step time-boxed and logging to
# $OUT (default results/gpu_check) as it goes, so a cut-off run still returns what finished:
#   1. pytest: every test marked `cuda` (CUDA backends vs the float64 reference, the kit on CUDA,
#      the captured-graph decode)                      -> pytest.log, failures.log (each failure as it happens)
#   2. graph: CUDA-graph decode of paper-size models vs eager tokens -> graph.log, bench.json, bench.md
#   3. bench: decode latency, streaming FPS, prefill, op times       -> bench.log, bench.json, bench.md
#   4. bench again: streaming FPS at 256 tokens per frame, frames compiled -> bench.log, bench.json, bench.md
# plus gpu_check.log (steps, exit codes, seconds) and env.txt (device, versions): 8 files, the most $OUT returns.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-results/gpu_check}"
PYTHON="${PYTHON:-python3}"
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/gpu_check.log"; }

# step NAME SECONDS COMMAND...: run with a time limit, output to $OUT/NAME.log; returns the command's exit
# code (the script goes on either way: no `set -e`).
step() {
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  log "step $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" >>"$OUT/$name.log" 2>&1
  rc=$?
  log "step $name: exit $rc after $((SECONDS - start))s$([[ $rc == 124 || $rc == 137 ]] && echo ' (TIME LIMIT)')"
  return $rc
}

CUDA_TESTS=$(grep -l "pytest.mark.cuda" tests/test_*.py | tr '\n' ' ')

if (( DRY )); then
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  log "dry run: collect the CUDA tests ($CUDA_TESTS), then gpu_bench.py --dry-run"
  failed=0
  step collect 180 "$PYTHON" -m pytest -m cuda -q --collect-only -p no:cacheprovider $CUDA_TESTS || failed=1
  step bench 300 "$PYTHON" experiments/gpu_bench.py --dry-run --out "$OUT" || failed=1
  (( failed )) && { log "dry run FAILED: see $OUT/collect.log and $OUT/bench.log"; exit 1; }
  log "dry run passed"
  exit 0
fi

if ! ls .whl/*.whl >/dev/null 2>&1; then
  log "no wheels in .whl/: fetch pydantic and fla into .whl/ with the pip download line of docs/PERFORMANCE.md (GPU)"
  exit 1
fi
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  >>"$OUT/gpu_check.log" 2>&1 || { log "wheel install failed"; exit 1; }
export PYTHONPATH="/tmp/site:$PWD"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  "$PYTHON" -c "import importlib.metadata as m; print('fla-core', m.version('fla-core'), 'pydantic', m.version('pydantic'))"
  nproc
} >"$OUT/env.txt" 2>&1
log "env: $(head -2 "$OUT/env.txt" | tail -1)"

# On the GPU image: xdist spreads the Triton / inductor compiles over 8 processes (the first run, 4,
# reached 84% of the tests in 180 s: compiles dominate), and pytest-timeout
# fails a hung test (with its stack) instead of the step's limit cutting off the whole report. -v logs
# each result as it comes; --maxfail=10 rather than -x: one run should show every failure it can.
EXTRA=$("$PYTHON" -c "import xdist" 2>/dev/null && echo "-n 8")
EXTRA="$EXTRA $("$PYTHON" -c "import pytest_timeout" 2>/dev/null && echo "--timeout 90")"
MIXERZOO_FAILURE_LOG="$OUT/failures.log" step pytest 210 "$PYTHON" -m pytest -m cuda -v -ra --maxfail=10 --durations=15 -p no:cacheprovider $EXTRA $CUDA_TESTS
step graph 80 "$PYTHON" experiments/gpu_bench.py --out "$OUT" --sections graph
step bench 190 "$PYTHON" experiments/gpu_bench.py --out "$OUT" --sections decode stream prefill ops
step bench 120 "$PYTHON" experiments/gpu_bench.py --out "$OUT" --sections stream-compiled  # into bench.log: 8 files
log "done: $(tail -1 "$OUT/pytest.log" 2>/dev/null)"
