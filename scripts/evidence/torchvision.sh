#!/usr/bin/env bash
# Compressing a torchvision network: torchvision's ResNet-18 (model=torchvision model.arch=resnet18, random
# initialisation) on proxy P (CIFAR-10's first 10,000 training images, data.val_split=0.1, the full test set, at
# CIFAR's 32x32: the size that fits this CPU), SGD momentum 0.9, lr 0.05 cosine with the default warm-up, batch 128:
#   tv_dense_s0            dense, 20 epochs (the trained network)
#   tv_tdlrt_cr90_s0       TDLRT with the target rule from scratch to 90% conv c.r., 20 epochs
#   tv_tucker_ft_cr90_s0   what users do instead: decompose the dense network (truncated HOSVD at the one-shot
#                          allocation's ranks for 90%) and fine-tune the fixed-rank factors, 5 epochs at lr 0.01
#   compress_cr90          `tdlrt compress` of the dense run to 90%, 5 epochs at lr 0.01: the source, its one-shot
#                          decomposition (no training) and TDLRT fine-tuning, three runs of its own
# Every run has a fixed folder under outputs/torchvision/ (checkpoints every 100 steps): running the script again
# resumes unfinished runs and skips finished ones; their small files go to results/torchvision/runs/, and
# scripts/evidence/torchvision_report.py makes the table.
#   bash scripts/evidence/torchvision.sh                  every job, two side by side
#   bash scripts/evidence/torchvision.sh tv_dense_s0 ...  the named jobs only
set -euo pipefail
cd "$(dirname "$0")/../.."
study=torchvision
out=${OUT:-outputs/$study}
keep=${KEEP:-results/$study/runs}
common="model=torchvision model.arch=resnet18 data=cifar10 data.limit_train=10000 data.val_split=0.1 epochs=20
        batch_size=128 optimizer=sgd momentum=0.9 lr=0.05 scheduler=cosine progress=false cost_report=false
        checkpoint.every_n_steps=100 task_name=$study"

jobs_list() {  # NAME OVERRIDES... (longest first)
  echo "tv_dense_s0 method=dense seed=0"
  echo "tv_tdlrt_cr90_s0 method=tdlrt_target method.target_cr=90 seed=0"
  echo "tv_tucker_ft_cr90_s0 method=tucker method.target_cr=90 init_from=$out/tv_dense_s0/checkpoints/best.pt epochs=5 lr=0.01 seed=0"
}

source scripts/evidence/jobs.sh
compress() {  # `tdlrt compress` of the dense run once it is finished, then its small files
  wait_for "$out/tv_dense_s0" || { echo "$(date +%T) compress_cr90 skipped: tv_dense_s0 is not finished"; return 0; }
  echo "$(date +%T) start compress_cr90"
  python -m tdlrt_cli compress "$out/tv_dense_s0" target_cr=90 epochs=5 lr=0.01 out="$out/compress_cr90" \
    progress=false cost_report=false checkpoint.every_n_steps=100 >> "$out/compress_cr90.log" 2>&1 \
    || { echo "$(date +%T) compress_cr90 failed: see $out/compress_cr90.log"; return 0; }
  for step in dense oneshot finetuned; do
    dir=$out/compress_cr90/$step
    mkdir -p "$keep/compress_cr90/$step/.hydra"
    cp "$dir"/summary.json "$dir"/train.log "$keep/compress_cr90/$step/"
    for f in metrics.csv ranks.csv start_eval.json sources.json; do
      [[ -f $dir/$f ]] && cp "$dir/$f" "$keep/compress_cr90/$step/"
    done
    cp "$dir"/.hydra/config.yaml "$dir"/.hydra/overrides.yaml "$keep/compress_cr90/$step/.hydra/"
  done
  cp "$out"/compress_cr90/compress.json "$out"/compress_cr90/compress.md "$keep/compress_cr90/"
  echo "$(date +%T) done compress_cr90: $(tail -n 4 "$out/compress_cr90/compress.md" | tr '\n' ' ')"
}

mkdir -p "$out"
if [[ $# -gt 0 ]]; then  # the named jobs, in the order given (compress_cr90 after the others)
  selected=()
  for name in "$@"; do [[ $name != compress_cr90 ]] && selected+=("$name"); done
  if [[ ${#selected[@]} -gt 0 ]]; then run_selected "${selected[@]}"; fi
  if [[ " $* " == *" compress_cr90 "* ]]; then compress; fi
else  # two lanes side by side, one thread each: dense then compress; TDLRT from scratch then the Tucker fine-tune
  (JOBS_PARALLEL=1 run_selected tv_dense_s0; compress) &
  (JOBS_PARALLEL=1 run_selected tv_tdlrt_cr90_s0 tv_tucker_ft_cr90_s0) &
  wait
fi
python scripts/evidence/torchvision_report.py
