#!/usr/bin/env bash
# Is one lr fair to every method? LeNet5 on full MNIST, 2 epochs, SGD momentum 0.9, cosine, batch 128:
# dense, TDLRT (tau 0.2) and fixed-rank Tucker (conv c.r. 90%) at lr 0.02, 0.05, 0.1, seed 0.
# Two sweeps side by side, one thread each:   bash scripts/evidence/lenet5_lr_sweep.sh
set -euo pipefail
common="model=lenet5 data=mnist data.val_split=0 epochs=2 batch_size=128 progress=false cost_report=false task_name=lenet5_lr_sweep"
export OMP_NUM_THREADS=1
tdlrt train -m $common +variant=tdlrt_tau0.2 lr=0.02,0.05,0.1 &
tdlrt train -m $common +variant=dense,tucker_cr90 lr=0.02,0.05,0.1 &
wait
tdlrt report outputs/lenet5_lr_sweep out=results/lenet5_lr_sweep
