#!/usr/bin/env bash
# The whole GPU check of issue 19 in one run of at most 8 minutes (benchmarks/gpu/README.md).
#
#   bash benchmarks/gpu/run.sh OUTDIR [--dry-run] [--quick] [--steps "0 1 2 3 5"] [--budget SECONDS]
#
# Steps, each time-boxed with `timeout`; a failed or timed-out step is recorded and the
# next one runs:
#   0. environment and compatibility probe (env_probe.py)            -> env.json
#   1. correctness on CUDA: pytest tests/test_cuda.py                -> tests.xml
#   2. kernels vs torch's native BN: python -m batchnorm.bench_gpu   -> bench.json
#   3. ResNet-50 / CSPDarkNet-53 training step (model_step.py)       -> model_step.json
#   4. summary against the issue's targets (summarize.py)            -> summary.json, summary.md
#   5. (asked for only) where a layer's step spends its time (profile_layer.py) -> profile.json
# Everything printed also goes to OUTDIR/run.log.
#
# --dry-run: on CPU, without CUDA: step 1 runs the same tests on CPU tensors in Triton's
# interpreter (BATCHNORM_CUDA_TESTS_ON_CPU=1 TRITON_INTERPRET=1) plus tests/test_kernels_triton.py,
# step 2 times two tiny shapes in the interpreter, step 3 runs small stand-in models on CPU.
# Its numbers check the script, not the speed; its budget is larger (slow shared CPUs).
#
# --quick: the second run of a session (what is left of the device time after the first):
# shorter step limits, step 3 eager only (the compiled steps take a minute each to compile).
#
# The project runs from this tree (PYTHONPATH=src): nothing is installed. Python: $PYTHON,
# else .venv/bin/python where it runs, else python3 (the GPU machine's).

set -u -o pipefail

usage() { echo "usage: bash benchmarks/gpu/run.sh OUTDIR [--dry-run] [--quick] [--steps \"0 1 2 3 5\"] [--budget SECONDS]" >&2; exit 2; }
[ $# -ge 1 ] || usage
OUT=$1; shift
DRY=0
QUICK=0
STEPS="0 1 2 3"
BUDGET=
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --quick) QUICK=1 ;;
    --steps) [ $# -ge 2 ] || usage; STEPS=$2; shift ;;
    --budget) [ $# -ge 2 ] && [[ $2 =~ ^[0-9]+$ ]] || usage; BUDGET=$2; shift ;;
    *) usage ;;
  esac
  shift
done
for s in $STEPS; do case "$s" in 0|1|2|3|5) ;; *) usage ;; esac; done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d)
STATUS=$WORK/steps.tsv
: > "$STATUS"
exec > >(tee -a "$OUT/run.log") 2>&1
TEE_PID=$!

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ] && .venv/bin/python -c 'import torch' 2>/dev/null; then PY=.venv/bin/python
else PY=python3
fi
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export PYTHONDONTWRITEBYTECODE=1

wants() { case " $STEPS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

# Time budget in seconds. GPU run: 30 + 110 + 110 + the rest for step 3 (at least 200)
# + 15 for the summary = 480 s (8 min) at most (--budget: another total). The dry run on
# slow shared CPUs: 1800 s.
if [ "$DRY" = 1 ]; then
  TOTAL=1800; T0=120; T1=900; T2=300; T3_MIN=120; T4=60
elif [ "$QUICK" = 1 ]; then
  TOTAL=300; T0=30; T1=100; T2=75; T3_MIN=45; T4=15
else
  TOTAL=480; T0=30; T1=110; T2=110; T3_MIN=200; T4=15
fi
T5=40
MODES=(--modes eager compile)
[ "$QUICK" = 1 ] && MODES=(--modes eager)
[ -n "$BUDGET" ] && TOTAL=$BUDGET
# the caps of the steps asked for, the least step 3 gets and the summary's fit in TOTAL
NEED=$T4
wants 0 && NEED=$((NEED + T0))
wants 1 && NEED=$((NEED + T1))
wants 2 && NEED=$((NEED + T2))
wants 3 && NEED=$((NEED + T3_MIN))
wants 5 && NEED=$((NEED + T5))
if [ "$NEED" -gt "$TOTAL" ]; then
  echo "run.sh: steps '$STEPS' need ${NEED}s, more than the budget of ${TOTAL}s" >&2; exit 2
fi

say() { echo "=== [run.sh $(date -u +%H:%M:%S) +${SECONDS}s] $*"; }

# run_step NUMBER NAME SECONDS COMMAND...: run with `timeout`, record number, name, exit
# code (124: timed out), seconds taken and the limit in $STATUS.
run_step() {
  local num=$1 name=$2 limit=$3; shift 3
  local t0=$SECONDS rc
  say "step $num ($name): start, limit ${limit}s: $*"
  # SIGINT first: pytest then still writes its report; the JSON writers keep what they have
  timeout -s INT --kill-after=10 "$limit" "$@"
  rc=$?
  local took=$((SECONDS - t0))
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    say "step $num ($name): TIMED OUT after ${took}s (limit ${limit}s)"
  else
    say "step $num ($name): exit $rc after ${took}s"
  fi
  printf '%s\t%s\t%s\t%s\t%s\n' "$num" "$name" "$rc" "$took" "$limit" >> "$STATUS"
}

say "GPU check: out=$OUT dry_run=$DRY steps='$STEPS' python=$PY total budget ${TOTAL}s"
say "git: $(git rev-parse --short HEAD 2>/dev/null || echo '?') $(git status --porcelain 2>/dev/null | wc -l | tr -d ' ') changed files"

if wants 0; then
  command -v nvidia-smi >/dev/null && timeout 15 nvidia-smi
  if [ "$DRY" = 1 ]; then
    run_step 0 env "$T0" "$PY" benchmarks/gpu/env_probe.py "$OUT/env.json" --device cpu
  else
    run_step 0 env "$T0" "$PY" benchmarks/gpu/env_probe.py "$OUT/env.json"
  fi
fi

if wants 1; then
  PYTEST=("$PY" -m pytest -q -p no:cacheprovider -o addopts="-ra" --junitxml="$OUT/tests.xml")
  # tests/test_cuda.py skips (with this reason) the tests not started 30 s before the limit
  export BATCHNORM_TEST_DEADLINE=$(( $(date +%s) + T1 - 30 ))
  if [ "$DRY" = 1 ]; then
    run_step 1 tests "$T1" env BATCHNORM_CUDA_TESTS_ON_CPU=1 TRITON_INTERPRET=1 \
      "${PYTEST[@]}" tests/test_cuda.py tests/test_kernels_triton.py
  else
    # 8 workers compile the Triton kernels in parallel (16 CPU cores there)
    XDIST=()
    "$PY" -c 'import xdist' 2>/dev/null && XDIST=(-n 8)
    run_step 1 tests "$T1" "${PYTEST[@]}" ${XDIST[@]+"${XDIST[@]}"} tests/test_cuda.py
  fi
fi

if wants 2; then
  if [ "$DRY" = 1 ]; then
    run_step 2 bench "$T2" env TRITON_INTERPRET=1 "$PY" -m batchnorm.bench_gpu --dry-run \
      --out "$OUT/bench.json" --budget-s $((T2 - 30))
  else
    run_step 2 bench "$T2" "$PY" -m batchnorm.bench_gpu --reps 20 --out "$OUT/bench.json" \
      --budget-s $((T2 - 15))
  fi
fi

if wants 3; then
  T3=$((TOTAL - SECONDS - T4))
  wants 5 && T3=$((T3 - T5))
  [ "$T3" -lt "$T3_MIN" ] && T3=$T3_MIN
  if [ "$DRY" = 1 ]; then
    run_step 3 model_step "$T3" "$PY" benchmarks/gpu/model_step.py --device cpu --small \
      --out "$OUT/model_step.json" --budget-s $((T3 - 20))
  else
    run_step 3 model_step "$T3" "$PY" benchmarks/gpu/model_step.py --device cuda \
      "${MODES[@]}" --out "$OUT/model_step.json" --budget-s $((T3 - 15))
  fi
fi

if wants 5; then
  if [ "$DRY" = 1 ]; then
    run_step 5 profile "$T5" env TRITON_INTERPRET=1 "$PY" benchmarks/gpu/profile_layer.py \
      --device cpu --shape 2 8 4 4 --calls 3 --out "$OUT/profile.json"
  else
    run_step 5 profile "$T5" "$PY" benchmarks/gpu/profile_layer.py --out "$OUT/profile.json"
  fi
fi

run_step 4 summary "$T4" "$PY" benchmarks/gpu/summarize.py "$OUT" "$STATUS"
rm -f "$OUT"/*.tmp
say "done in ${SECONDS}s (budget ${TOTAL}s); files: $(cd "$OUT" && ls | tr '\n' ' ')"
# exit 0 when every step that ran exited 0
RC=0
awk -F'\t' '$3 != 0 { bad = 1 } END { exit bad }' "$STATUS" || RC=1
rm -rf "$WORK"
exec >&- 2>&-
wait "$TEE_PID" 2>/dev/null
exit $RC
