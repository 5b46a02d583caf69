#!/usr/bin/env bash
# The ill-conditioned start (LeNet5, full MNIST): Tucker cores / CP terms whose singular values decay like
# 10^-k, ranks over-estimated (half the channels); TDLRT (tau 0.1) against directly trained Tucker and CP,
# 2 epochs, seed 0 (the preset runs 10 epochs and 3 seeds). Report: table and ill_conditioned_loss.png.
#   bash scripts/evidence/ill_conditioned.sh
set -euo pipefail
export OMP_NUM_THREADS=1
tdlrt train -m +experiment=ill_conditioned data.val_split=0 epochs=2 seed=0 progress=false cost_report=false
tdlrt report outputs/ill_conditioned out=results/ill_conditioned
# A harder start: singular values decaying like 10^-3k (1 epoch, TDLRT and Tucker)
tdlrt train -m +experiment=ill_conditioned data.val_split=0 epochs=1 seed=0 method.init_decay=3 progress=false cost_report=false \
  +variant=tdlrt_ill,tucker_ill
tdlrt report outputs/ill_conditioned out=results/ill_conditioned
