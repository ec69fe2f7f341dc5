#!/usr/bin/env bash
# One GPU run of the CUDA path inside one time box (docs/PERFORMANCE.md, "GPU").
#
#   bash experiments/gpu_check.sh                    # on the GPU machine, from the repository root: every step
#   bash experiments/gpu_check.sh train zoology      # only the steps named (a later session's missing ones)
#   bash experiments/gpu_check.sh --dry-run          # anywhere: collect the CUDA tests, run gpu_bench.py --dry-run
#
# On the GPU machine it first installs the wheels in .whl/ (pydantic and fla, fetched with the
# `pip download` line in docs/PERFORMANCE.md, "GPU") into /tmp/site, then runs the steps in priority
# order, each time-boxed and logging to $OUT (default results/gpu_check) as it goes, so a cut-off run
# still returns what finished. The steps share one budget, $BUDGET seconds (default 570: the device
# tool's 600 s per command less a margin): a step gets the smaller of its own limit and what is left,
# and a step with under 30 s left is skipped with a log line (run it by name next time).
#   pytest   every test marked `cuda` (CUDA backends vs the float64 reference, the kit on CUDA,
#            the captured-graph decode)                                 -> pytest.log, failures.log
#   graph    CUDA-graph decode of paper-size models vs eager tokens      -> graph.log, bench.json, bench.md
#   bench    decode latency, streaming FPS, prefill, op times            -> bench.log, bench.json, bench.md
#   stream-compiled  streaming FPS at 256 tokens per frame, frames compiled -> bench.log, bench.json, bench.md
#   train    training tokens/s, ours vs fla's GatedDeltaNetForCausalLM  -> bench.log, bench.json, bench.md
#   speculative  draft decoding's acceptance and speed-up (experiments/speculative.py, small infinitevl and
#            transformer, the draft their first 2 layers)                -> bench.log
#   zoology  experiments/zoology-row.yaml at $ZOOLOGY_SCALE of its steps (default 0.08: 1,000 steps),
#            every run at once on the GPU; its table and runs.jsonl      -> bench.log
# plus gpu_check.log (steps, exit codes, seconds) and env.txt (device, versions): 8 files, the most $OUT returns.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-results/gpu_check}"
PYTHON="${PYTHON:-python3}"
BUDGET="${BUDGET:-570}"
ZOOLOGY_SCALE="${ZOOLOGY_SCALE:-0.08}"
ALL_STEPS=(pytest graph bench stream-compiled train speculative zoology)
DRY=0
[[ "${1:-}" == "--dry-run" ]] && { DRY=1; shift; }
STEPS=("$@")
(( ${#STEPS[@]} )) || STEPS=("${ALL_STEPS[@]}")
for name in "${STEPS[@]}"; do
  [[ " ${ALL_STEPS[*]} " == *" $name "* ]] || { echo "unknown step '$name': choose from ${ALL_STEPS[*]}" >&2; exit 2; }
done
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/gpu_check.log"; }

wanted() { [[ " ${STEPS[*]} " == *" $1 "* ]]; }

# step NAME SECONDS COMMAND...: run with the smaller of SECONDS and the budget left, output to $OUT/NAME.log;
# returns the command's exit code (the script goes on either way: no `set -e`).
step() {
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  (( limit > BUDGET - SECONDS - 10 )) && limit=$(( BUDGET - SECONDS - 10 ))
  if (( limit < 30 )); then
    log "step $name skipped: ${limit}s of the ${BUDGET}s budget left (run it by name next time): $*"
    return 0
  fi
  log "step $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" >>"$OUT/$name.log" 2>&1
  rc=$?
  log "step $name: exit $rc after $((SECONDS - start))s$([[ $rc == 124 || $rc == 137 ]] && echo ' (TIME LIMIT)')"
  return $rc
}

CUDA_TESTS=$(grep -l "pytest.mark.cuda" tests/test_*.py | tr '\n' ' ')

if (( DRY )); then
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  log "dry run: collect the CUDA tests ($CUDA_TESTS), then gpu_bench.py --dry-run and the zoology plan"
  failed=0
  step collect 180 "$PYTHON" -m pytest -m cuda -q --collect-only -p no:cacheprovider $CUDA_TESTS || failed=1
  step bench 300 "$PYTHON" experiments/gpu_bench.py --dry-run --out "$OUT" || failed=1
  step bench 60 "$PYTHON" -m mixerzoo ablate experiments/zoology-row.yaml --out /tmp/zoology --device cuda \
    --dtype bfloat16 --scale "$ZOOLOGY_SCALE" --dry-run || failed=1
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
wanted pytest && MIXERZOO_FAILURE_LOG="$OUT/failures.log" step pytest 210 "$PYTHON" -m pytest -m cuda -v -ra --maxfail=10 \
  --durations=15 -p no:cacheprovider $EXTRA $CUDA_TESTS
wanted graph && step graph 80 "$PYTHON" experiments/gpu_bench.py --out "$OUT" --sections graph
wanted bench && step bench 190 "$PYTHON" experiments/gpu_bench.py --out "$OUT" --sections decode stream prefill ops
# the next steps log into bench.log too: 8 files
wanted stream-compiled && step bench 120 "$PYTHON" experiments/gpu_bench.py --out "$OUT" --sections stream-compiled
wanted train && step bench 120 "$PYTHON" experiments/gpu_bench.py --out "$OUT" --sections train
for recipe in infinitevl transformer; do
  wanted speculative && step bench 40 "$PYTHON" experiments/speculative.py --recipe "$recipe" --device cuda --tokens 128
done
if wanted zoology; then
  step bench 200 "$PYTHON" -m mixerzoo ablate experiments/zoology-row.yaml --out /tmp/zoology --device cuda \
    --dtype bfloat16 --jobs-per-gpu 10 --scale "$ZOOLOGY_SCALE"
  cat /tmp/zoology/zoology-row/table.md /tmp/zoology/zoology-row/runs.jsonl >>"$OUT/bench.log" 2>&1  # what finished
fi
log "done: $(tail -1 "$OUT/pytest.log" 2>/dev/null)"
