#!/usr/bin/env bash
# The paper's claim at the paper's width: does TDLRT's gap to dense close as VGG16 gets wider?
# Proxy P (CIFAR-10's first 10,000 training images, data.val_split=0.1, the full test set, 20 epochs, batch 128,
# SGD momentum 0.9, lr 0.05 cosine with the default 1-epoch warm-up) at widths 0.5 and 1.0 (width 0.25 is the
# controls study, scripts/evidence/controls.sh, the same setting), for
#   dense   the uncompressed network
#   tdlrt   TDLRT with the recommended defaults (method=tdlrt_target method.target_cr=C: nothing else set)
#   prune   the strongest control of the controls study, gradual pruning without the integrator
#           (method=tucker_prune method.target_cr=C, its preset)
# at 90% and 97% conv c.r.; and full CIFAR-10 (45,000 training images, 5,000 for validation) at width 0.25, 90%
# and 95%, dense and recommended TDLRT; and an lr check at width 1.0 (lr 0.02: dense, TDLRT and gradual pruning at 90% and 97%) and at width 0.5
# (lr 0.02: dense, TDLRT and gradual pruning at 90%). The jobs
# are listed longest first (width 1.0 is about an hour a run on one CPU thread). Every run has a fixed folder
# under outputs/width/ and writes checkpoints/last.pt every 100 steps: running the script again resumes
# unfinished runs and skips finished ones; their small files go to results/width/runs/, and
# scripts/evidence/width_report.py makes the table and the figure.
#   bash scripts/evidence/width.sh                          every job, two side by side
#   bash scripts/evidence/width.sh w1.0_dense_s0 ...        the named jobs only (in the order given)
set -euo pipefail
cd "$(dirname "$0")/../.."
study=width
out=${OUT:-outputs/$study}
keep=${KEEP:-results/$study/runs}
common="model=vgg16 data=cifar10 data.val_split=0.1 epochs=20 batch_size=128 optimizer=sgd momentum=0.9 lr=0.05
        scheduler=cosine progress=false cost_report=false checkpoint.every_n_steps=100 task_name=$study"
p="data.limit_train=10000"

jobs_list() {  # NAME OVERRIDES...
  for w in 1.0 0.5; do
    seeds=$([[ $w == 1.0 ]] && echo 0 || echo "0 1")
    for s in $seeds; do
      echo "w${w}_dense_s$s $p model.width_mult=$w method=dense seed=$s"
      for c in 90 97; do
        echo "w${w}_tdlrt_cr${c}_s$s $p model.width_mult=$w method=tdlrt_target method.target_cr=$c seed=$s"
        echo "w${w}_prune_cr${c}_s$s $p model.width_mult=$w method=tucker_prune method.target_cr=$c seed=$s"
      done
    done
    if [[ $w == 0.5 ]]; then
      # lr check at width 0.5 too: width 1.0 trained further at lr 0.02 (dense 76.11% against 67.42% at 0.05), so
      # the gap at 0.5 is measured at both lrs before widths are compared
      echo "w0.5_dense_lr0.02_s0 $p model.width_mult=0.5 method=dense lr=0.02 seed=0"
      echo "w0.5_tdlrt_cr90_lr0.02_s0 $p model.width_mult=0.5 method=tdlrt_target method.target_cr=90 lr=0.02 seed=0"
      echo "w0.5_prune_cr90_lr0.02_s0 $p model.width_mult=0.5 method=tucker_prune method.target_cr=90 lr=0.02 seed=0"
    fi
    if [[ $w == 1.0 ]]; then
      # lr check: dense at width 1.0 reached 74% training accuracy at lr 0.05 against 81% at width 0.5 (under
      # the standard parametrisation a wider network's best lr is smaller); dense and TDLRT 90% at lr 0.02
      echo "w1.0_dense_lr0.02_s0 $p model.width_mult=1.0 method=dense lr=0.02 seed=0"
      echo "w1.0_tdlrt_cr90_lr0.02_s0 $p model.width_mult=1.0 method=tdlrt_target method.target_cr=90 lr=0.02 seed=0"
      # ... and the rest of the width-1.0 grid at lr 0.02: TDLRT 97% and the gradual-pruning control
      echo "w1.0_tdlrt_cr97_lr0.02_s0 $p model.width_mult=1.0 method=tdlrt_target method.target_cr=97 lr=0.02 seed=0"
      echo "w1.0_prune_cr90_lr0.02_s0 $p model.width_mult=1.0 method=tucker_prune method.target_cr=90 lr=0.02 seed=0"
      echo "w1.0_prune_cr97_lr0.02_s0 $p model.width_mult=1.0 method=tucker_prune method.target_cr=97 lr=0.02 seed=0"
      # full CIFAR-10 at width 0.25: about half an hour a run
      echo "full_dense_s0 model.width_mult=0.25 method=dense seed=0"
      for c in 90 95; do
        echo "full_tdlrt_cr${c}_s0 model.width_mult=0.25 method=tdlrt_target method.target_cr=$c seed=0"
      done
    fi
  done
}

source scripts/evidence/jobs.sh
run_selected "$@"
python scripts/evidence/width_report.py
