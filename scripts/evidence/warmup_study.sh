#!/usr/bin/env bash
# Rank adaptation from the first step (the plain rule) against a tolerance ramp over the first epoch:
# LeNet5 on full MNIST, 3 epochs, TDLRT at tau 0.2 and 0.3, convs only and with the hidden linear layer.
# Two sweeps side by side, one thread each (a 2-core machine):   bash scripts/evidence/warmup_study.sh
set -euo pipefail
common="model=lenet5 data=mnist data.val_split=0 method=tdlrt epochs=3 batch_size=128 lr=0.05 progress=false cost_report=false"
export OMP_NUM_THREADS=1
tdlrt train -m $common task_name=warmup_study tau=0.2,0.3 method.tau_warmup_epochs=0,1 &
tdlrt train -m $common task_name=warmup_study method.convert_linear=true tau=0.3 method.tau_warmup_epochs=0,1 &
wait
tdlrt report outputs/warmup_study out=results/warmup_study
