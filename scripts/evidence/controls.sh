#!/usr/bin/env bash
# The controls of TDLRT's margin on proxy P (VGG16 at width 0.25, CIFAR-10's first 10,000 training images,
# data.val_split=0.1, the full test set, 20 epochs, batch 128, SGD momentum 0.9, lr 0.05 cosine), every method
# with the same 1-epoch linear lr warm-up (scheduler.warmup_epochs=1), 3 seeds, at 90% and 97% conv c.r.:
#   dense        the uncompressed network
#   tdlrt        TDLRT, recommended settings: the target rule with rank caps at the full channel count, starting
#                at half of them, reaching the target at 3/4 of training (method=tdlrt_target)
#   tucker       uniform fixed-rank Tucker at the target c.r. (one rank fraction for every layer), trained directly
#   alloc        fixed-rank Tucker at the final per-layer ranks of the same seed's tdlrt run
#                (method.ranks_from=<that run>): rank allocation alone, no pruning, no integrator
#   prune        gradual pruning without the integrator (method=tucker_prune): Tucker factors and core trained by
#                the optimizer every step, ranks cut on the target rule's schedule with its allocation
#   finetune     train dense for 10 epochs (dense10), then compress it in one shot to the target (truncated HOSVD,
#                ranks by the target rule's allocation from the trained kernels' spectra) and fine-tune for 10
# The lr check (seed 0, 90%): lr 0.02 and 0.1 for dense, tdlrt and the gradual-pruning baseline.
# Every run has a fixed folder under outputs/controls_p/ and writes checkpoints/last.pt every 100 steps: running
# the script again resumes unfinished runs and skips finished ones. A job whose input run (ranks_from,
# init_from) is not finished yet waits for it. Finished runs' small files are copied to results/controls_p/runs/
# and `tdlrt report results/controls_p/runs out=results/controls_p` regenerates the tables and plots,
# `python scripts/evidence/controls_report.py` the study's own tables (controls.md, headline.md) and figure.
#   bash scripts/evidence/controls.sh                   every job, two side by side
#   bash scripts/evidence/controls.sh tdlrt_cr90_s0     the named jobs only (in the order given)
#   JOBS_PARALLEL=1 bash scripts/evidence/controls.sh ...
set -euo pipefail
cd "$(dirname "$0")/../.."
study=controls_p
out=${OUT:-outputs/$study}      # run folders (checkpoints included)
keep=${KEEP:-results/$study/runs}  # their small files, committed
common="model=vgg16 model.width_mult=0.25 data=cifar10 data.limit_train=10000 data.val_split=0.1 epochs=20
        batch_size=128 optimizer=sgd momentum=0.9 lr=0.05 scheduler=cosine scheduler.warmup_epochs=1
        progress=false cost_report=false checkpoint.every_n_steps=100 task_name=$study"
rec="method=tdlrt_target method.r_max_frac=1 method.init_rank_frac=0.5 method.ramp_end=0.75"
prune="method=tucker_prune method.r_max_frac=1 method.init_rank_frac=0.5 method.ramp_end=0.75"

jobs_list() {  # NAME OVERRIDES... (the first batch needs no other run; the second reads runs of the first)
  for s in 0 1 2; do
    echo "dense10_s$s method=dense epochs=10 seed=$s"
    echo "dense_s$s method=dense seed=$s"
    for c in 90 97; do
      echo "tdlrt_cr${c}_s$s $rec method.target_cr=$c seed=$s"
      echo "tucker_cr${c}_s$s method=tucker method.target_cr=$c seed=$s"
    done
  done
  for s in 0 1 2; do
    for c in 90 97; do
      echo "finetune_cr${c}_s$s method=tucker method.target_cr=$c epochs=10 init_from=$out/dense10_s$s/checkpoints/best.pt seed=$s"
      echo "prune_cr${c}_s$s $prune method.target_cr=$c seed=$s"
      echo "alloc_cr${c}_s$s method=tucker method.ranks_from=$out/tdlrt_cr${c}_s$s seed=$s"
    done
  done
  for lr in 0.02 0.1; do
    echo "dense_lr${lr}_s0 method=dense lr=$lr seed=0"
    echo "tdlrt_cr90_lr${lr}_s0 $rec method.target_cr=90 lr=$lr seed=0"
    echo "prune_cr90_lr${lr}_s0 $prune method.target_cr=90 lr=$lr seed=0"
  done
}

source scripts/evidence/jobs.sh
run_selected "$@"
python -m tdlrt_cli report "$keep" out="$(dirname "$keep")"
python scripts/evidence/controls_report.py "$keep" --out "$(dirname "$keep")"
