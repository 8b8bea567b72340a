#!/usr/bin/env bash
# The GPU check of aikd (issue 25) in one call on a GPU machine: correctness tests, scoring and training speed
# against the AI-KD paper's path on the same GPU, evaluation at 1e9 comparisons; a log, the figures as JSON and the
# README table (docs/gpu.md filled in) under $OUT.
#
#   bash bench/gpu_check.sh            # on the GPU machine, from the repository root; about 6 minutes
#   bash bench/gpu_check.sh --dry      # here, without a GPU: every step at tiny sizes on the CPU (CUDA parts skipped)
#
# Needs no network: aikd runs from src/ (PYTHONPATH), with the machine's own python3 and packages. What does not
# ship with the machine travels in the carried folder .gpu/ (ignored by git, .git/info/exclude):
#   .gpu/site/face_recognition_models/models/dlib_face_recognition_resnet_model_v1.dat  dlib-r29's weights, found as
#       the face-recognition-models package would install them (a namespace package on PYTHONPATH);
#   .gpu/faces/*.jpg  the three aligned LFW sample faces (shared/data/faces; AIKD_SHARED_DATA=.gpu);
#   .gpu/*.whl        wheels to install first, if any (pip --no-index --no-deps into /tmp/site).
# Each step has its own time limit and the whole run a budget (GPU_CHECK_BUDGET seconds, default 500): a step that
# fails or runs out of time is recorded and the next one runs. GPU_CHECK_STEPS (comma-separated, default all:
# env,tests,score,models,train,evaluate,compile) runs a subset, e.g. for a rerun of what failed; GPU_TEST_FILTER
# (pytest -k), GPU_SCORE_VARIANTS (empty: none) and GPU_SCORE_LIMIT (seconds) narrow the tests and the scoring.
# $OUT gets: gpu_check.log (everything), gpu.json (every figure), gpu_table.md (the README table), junit.xml and
# figures.jsonl (the tests' results and measured figures).
set -u -o pipefail

DRY=0
[[ "${1:-}" == "--dry" ]] && DRY=1
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-/tmp/aikd-gpu-check-out}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/aikd-gpu-check.XXXXXX)
LOG=$OUT/gpu_check.log
: > "$LOG"
BUDGET=${GPU_CHECK_BUDGET:-500}
STEPS=${GPU_CHECK_STEPS:-env,tests,score,models,train,evaluate,compile}
RESERVE=15  # seconds kept for the report
T0=$SECONDS
if (( DRY )); then PY=${PYTHON:-$ROOT/.venv/bin/python}; else PY=${PYTHON:-python3}; fi
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH="$ROOT/src:$ROOT/.gpu/site${PYTHONPATH:+:$PYTHONPATH}"
export AIKD_SHARED_DATA="$ROOT/.gpu"
[[ -d "$AIKD_SHARED_DATA/faces" ]] || export AIKD_SHARED_DATA=/work/shared/data  # here, for --dry
export MPLBACKEND=Agg TQDM_DISABLE=1

say() { echo "$*" | tee -a "$LOG"; }

wanted() { [[ ",$STEPS," == *",$1,"* ]]; }

# step NAME LIMIT COMMAND...: run COMMAND within LIMIT seconds (less if the budget is short), its output to the log
# and to $WORK/NAME.out; record "NAME exit-status seconds limit" in $WORK/steps.tsv.
step() {
    local name=$1 limit=$2
    shift 2
    wanted "$name" || return 0
    local left=$(( BUDGET - (SECONDS - T0) - RESERVE ))
    (( limit > left )) && limit=$left
    if (( limit < 20 )); then
        say "== $name: skipped, ${left}s of the budget left"
        printf '%s\tskipped\t0\t0\n' "$name" >> "$WORK/steps.tsv"
        return 0
    fi
    say "== $name (limit ${limit}s) at +$(( SECONDS - T0 ))s: $*"
    local start=$SECONDS
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG" > "$WORK/$name.out"
    local status=${PIPESTATUS[0]}
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(( SECONDS - start ))" "$limit" >> "$WORK/steps.tsv"
    say "== $name: exit $status in $(( SECONDS - start ))s$( (( status == 124 || status == 137 )) && echo ' (time limit)')"
}

say "aikd GPU check $(date -u +%FT%TZ), dry=$DRY, budget ${BUDGET}s, steps $STEPS, work $WORK"
say "git: $(git rev-parse --short HEAD 2>/dev/null || echo '?') $(git status --porcelain 2>/dev/null | wc -l) changed files"
if compgen -G "$ROOT/.gpu/*.whl" > /dev/null; then
    say "installing carried wheels: $(ls "$ROOT"/.gpu/*.whl | xargs -n1 basename | tr '\n' ' ')"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$ROOT"/.gpu/*.whl 2>&1 | tee -a "$LOG" && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
command -v nvidia-smi > /dev/null && nvidia-smi 2>&1 | head -20 | tee -a "$LOG"
say "dlib weights: $(ls "$ROOT"/.gpu/site/face_recognition_models/models/*.dat 2>/dev/null || echo 'not carried')"

# GPU utilisation (the share of time a kernel runs), sampled every 200 ms for the whole run: the scoring step's
# windows are read out of it by the report.
UTIL_PID=
if (( ! DRY )) && command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits -lms 200 \
        > "$WORK/util.csv" 2> /dev/null &
    UTIL_PID=$!
fi

if (( DRY )); then
    step env 60 "$PY" bench/gpu_env.py
    AIKD_GPU_TEST_DEVICE=cpu AIKD_GPU_TEST_ARCH=tiny AIKD_GPU_FIGURES="$WORK/figures.jsonl" \
        step tests 300 "$PY" -m pytest -m gpu tests/test_gpu.py -k "checkpoints or score_command" \
        -p no:cacheprovider -v -rA --junitxml "$WORK/junit.xml"
    step score 300 "$PY" bench/gpu_score.py --device cpu --arch r18 --images 64 --small 16 --paths paper,fp32,bf16 \
        --variants bf16:1:16 --workers 2 --batch-size 32 --json "$WORK/score.json"
    step models 200 "$PY" bench/gpu_models.py --device cpu --arch tiny --batch 16 --small-batch 8 --large-batch 32 \
        --repeats 2
    step train 200 "$PY" bench/train.py --arch tiny --batch 4 --device cpu --amp off --regions paper,trunk \
        --warmup 1 --repeats 2
    step evaluate 60 "$PY" bench/gpu_evaluate.py --comparisons 1e5 1e6
else
    step env 40 "$PY" bench/gpu_env.py
    # Every test module with GPU-marked tests (not the whole suite: fewer imports, nothing unrelated failing).
    mapfile -t GPU_TESTS < <(grep -l "mark.gpu" tests/test_*.py)
    PYTEST_ARGS=(-m gpu "${GPU_TESTS[@]}" -p no:cacheprovider -v -rA --durations 12 --junitxml "$WORK/junit.xml")
    "$PY" -c "import pytest_timeout" 2> /dev/null && PYTEST_ARGS+=(--timeout 100)
    [[ -n "${GPU_TEST_FILTER:-}" ]] && PYTEST_ARGS+=(-k "$GPU_TEST_FILTER")
    AIKD_GPU_FIGURES="$WORK/figures.jsonl" step tests 150 "$PY" -m pytest "${PYTEST_ARGS[@]}"
    step score "${GPU_SCORE_LIMIT:-170}" "$PY" bench/gpu_score.py --json "$WORK/score.json" \
        --variants "${GPU_SCORE_VARIANTS-bf16:6:256,bf16:14:512}"
    step models 90 "$PY" bench/gpu_models.py
    step train 90 "$PY" bench/train.py --arch r100 --batch 64 --device cuda --regions paper,trunk --warmup 2 \
        --repeats 5
    step evaluate 110 "$PY" bench/gpu_evaluate.py --comparisons 1e8 1e9
    step compile 150 "$PY" bench/gpu_models.py --only-compile --batch 256
fi

[[ -n "$UTIL_PID" ]] && kill "$UTIL_PID" 2> /dev/null
say "== report at +$(( SECONDS - T0 ))s"
timeout -k 5 60 "$PY" bench/gpu_report.py --work "$WORK" --out "$OUT" --template docs/gpu.md 2>&1 | tee -a "$LOG"
cp "$WORK/junit.xml" "$WORK/figures.jsonl" "$OUT/" 2> /dev/null
say "== done in $(( SECONDS - T0 ))s; $OUT: $(ls "$OUT" | tr '\n' ' ')"
