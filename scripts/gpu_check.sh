#!/usr/bin/env bash
# gpu_check.sh: the GPU checks of tdlrt in one run (at most about 8 minutes on one H100), from the repo root.
#
#   bash scripts/gpu_check.sh [--dry-run] [--out DIR]
#
# Stages, in order, each under its own time limit (LIMIT_<STAGE> seconds, environment; they add up to 460 s),
# each recorded even when it fails or runs out of time, the next one running regardless:
#   setup        hydra-core/omegaconf/antlr4 from the wheels in ./wheels (git-ignored) when they are missing
#                (pip install --no-index --find-links wheels ...), pytest too when it is missing and its wheels
#                are there, then `pip install --no-deps -e .` when the `tdlrt` command is missing
#   tests        the CUDA-relevant tests: pytest -k cuda (test names and markers) on the test files that
#                mention cuda
#   bench_fp32   tdlrt bench: VGG16, batch 128, ranks 25% and 10%, augment_every 1 and 4, fp32, eager
#                (20 timed steps after 5; medians and interquartile ranges)
#   bench_exact  fp32, ranks 25%, augment_every 1, TDLRT truncation by the float64 reference (spectra=exact)
#   bench_bf16   the same as bench_fp32 in bf16
#   bench_graph  bf16, augment_every 1, with the graph-captured dense and Tucker rows (graph=auto)
#   train_dense  VGG16 at full width, CIFAR-10 shapes, 2 epochs, dense
#   train_tdlrt  the same with method=tdlrt tau=0.1
# Training uses data=cifar10 when data/cifar-10-batches-py exists, else data=synthetic (CIFAR-10 shapes,
# 50000 + 10000 images).
#
# --dry-run (or GPU_CHECK_DRY_RUN=1): the same sequence on the CPU with tiny sizes (LeNet5, batch 8, 2 timed
# steps, no graph capture; training on 256 synthetic 32x32 images, no cost report), in well under a minute,
# with the same output structure.
#
# Output, in --out DIR (default: $OUT if set, else outputs/gpu_check/<YYYYmmdd-HHMMSS>):
#   gpu_check.json  one object:
#     meta      {date (UTC, ISO 8601), git_commit (git rev-parse HEAD, else $GPU_CHECK_COMMIT, else "unknown"),
#                git_dirty, gpu (torch.cuda.get_device_name, or "none"), torch, cuda, python, host, dry_run}
#     stages    {<stage>: {status: ok | failed | timeout | none selected, exit_code, seconds}}
#     tests     {selection, passed, failed, skipped, errors}
#     bench     [{stage, precision, method (dense | dense_graph | tucker | tucker_graph | tdlrt), rank_frac,
#                 augment_every, spectra, ms_per_step (median), ms_iqr, images_per_s, ratio_vs_dense,
#                 ratio_vs_dense_graph, truncation_share, truncation_ms, truncation_ms_iqr, peak_mem_mib,
#                 compression_rate, params, flops_forward, flops_train}]  (one per row of each bench run)
#     bench_runs  [{stage, precision, spectra, device, torch, notes}]
#     training  [{method, model, data, epochs, steps, test_acc, checkpoint, test_acc_final, test_acc_max_epoch,
#                 wall_time_s, ms_per_step,
#                 compression_rate, ranks, cost}]  (cost: the run's cost report, when it wrote one)
#   gpu_check.md    the same figures as markdown tables (meta, stages, bench, training)
#   gpu_check.log   every stage's command, stdout and stderr
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2

DRY_RUN=${GPU_CHECK_DRY_RUN:-0}
OUT_DIR=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --out) OUT_DIR=${2:?--out needs a folder}; shift ;;
        --out=*) OUT_DIR=${1#--out=} ;;
        -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check: unknown argument $1 (use --dry-run, --out DIR)" >&2; exit 2 ;;
    esac
    shift
done
[ "$DRY_RUN" = 1 ] || DRY_RUN=0
OUT_DIR=${OUT_DIR:-${OUT:-outputs/gpu_check/$(date +%Y%m%d-%H%M%S)}}
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR=$(cd "$OUT_DIR" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 2
trap 'rm -rf "$WORK"' EXIT
LOG="$OUT_DIR/gpu_check.log"
: > "$LOG"
: > "$WORK/stages.tsv"

# stage NAME LIMIT_SECONDS COMMAND...: run it (a function too) under the limit, stdout to $WORK/NAME.out,
# everything to the log, "NAME<TAB>exit code<TAB>seconds" to $WORK/stages.tsv.
stage() {
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
    local start end rc
    start=$(date +%s%N)
    timeout --kill-after=5 "$limit" bash -c '"$@"' "$name" "$@" > "$WORK/$name.out" 2> "$WORK/$name.err"
    rc=$?
    end=$(date +%s%N)
    cat "$WORK/$name.out" "$WORK/$name.err" >> "$LOG"
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(awk "BEGIN { printf \"%.1f\", ($end - $start) / 1e9 }")" \
        >> "$WORK/stages.tsv"
    echo "   exit $rc" | tee -a "$LOG"
}

setup() {
    if ! python -c "import hydra, omegaconf, antlr4" 2>/dev/null; then
        [ -d wheels ] || { echo "hydra-core/omegaconf/antlr4 missing and no wheels/ folder"; return 1; }
        pip install --no-index --find-links wheels hydra-core omegaconf antlr4-python3-runtime || return 1
    fi
    if ! python -c "import pytest" 2>/dev/null && [ -d wheels ]; then
        pip install --no-index --find-links wheels pytest || echo "pytest missing: the tests stage will fail"
    fi
    if ! command -v tdlrt > /dev/null; then
        pip install --no-deps --no-build-isolation -e . \
            || pip install --no-deps --no-index --find-links wheels -e . || return 1
    fi
    command -v tdlrt
}

tdlrt_cmd() {  # the CLI, installed or not
    if command -v tdlrt > /dev/null; then tdlrt "$@"; else python -m tdlrt_cli "$@"; fi
}
export -f setup tdlrt_cmd

if [ "$DRY_RUN" = 1 ]; then
    export OMP_NUM_THREADS=1  # tiny CPU work: one thread each, no waiting on a busy second core
    DEVICE=cpu
    BENCH=(model=lenet5 image_size=28 channels=1 batch_size=8 steps=2 warmup=1)
    GRAPH=graph=false
    DATA=(data=synthetic data.train_size=256 data.test_size=128)
    TRAIN=(model=lenet5 batch_size=64 eval_batch_size=128 cost_report=false)
else
    DEVICE=cuda
    BENCH=(model=vgg16 batch_size=128 steps=20 warmup=5)
    GRAPH=graph=auto
    if [ -d data/cifar-10-batches-py ]; then
        DATA=(data=cifar10 data.root=data data.download=false)
    else
        DATA=(data=synthetic data.train_size=50000 data.test_size=10000)
    fi
    TRAIN=(model=vgg16 batch_size=128 cost_repeat=3)
fi
BENCH+=(format=json device=$DEVICE)
RANKS=rank_fracs=[0.25,0.1]
TRAIN+=("${DATA[@]}" epochs=2 progress=false device=$DEVICE)

stage setup "${LIMIT_SETUP:-25}" setup
mapfile -t CUDA_TESTS < <(grep -rl -i cuda --include="test_*.py" tests | sort | grep -v test_gpu_check.py)  # not itself
stage tests "${LIMIT_TESTS:-30}" python -m pytest -p no:xdist -o addopts= -q -m "not slow" -k cuda \
    --junitxml="$WORK/tests.xml" "${CUDA_TESTS[@]}"
stage bench_fp32 "${LIMIT_BENCH_FP32:-60}" tdlrt_cmd bench "${BENCH[@]}" precision=fp32 graph=false "$RANKS" \
    augment_every=[1,4]
stage bench_exact "${LIMIT_BENCH_EXACT:-30}" tdlrt_cmd bench "${BENCH[@]}" precision=fp32 graph=false spectra=exact \
    rank_fracs=[0.25] augment_every=[1]
stage bench_bf16 "${LIMIT_BENCH_BF16:-55}" tdlrt_cmd bench "${BENCH[@]}" precision=bf16 graph=false "$RANKS" \
    augment_every=[1,4]
stage bench_graph "${LIMIT_BENCH_GRAPH:-80}" tdlrt_cmd bench "${BENCH[@]}" precision=bf16 "$GRAPH" "$RANKS" \
    augment_every=[1]
stage train_dense "${LIMIT_TRAIN_DENSE:-50}" tdlrt_cmd train "${TRAIN[@]}" method=dense \
    "hydra.run.dir='$WORK/train_dense'"
stage train_tdlrt "${LIMIT_TRAIN_TDLRT:-130}" tdlrt_cmd train "${TRAIN[@]}" method=tdlrt tau=0.1 \
    "hydra.run.dir='$WORK/train_tdlrt'"

python scripts/gpu_check_collate.py --work "$WORK" --out "$OUT_DIR" --dry-run "$DRY_RUN" 2>> "$LOG" \
    || { echo "gpu_check: collation failed (see $LOG)" >&2; exit 1; }
echo "gpu_check: $OUT_DIR/gpu_check.json, $OUT_DIR/gpu_check.md"
