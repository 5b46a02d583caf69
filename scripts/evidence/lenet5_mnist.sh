#!/usr/bin/env bash
# The paper's small setting, on full MNIST: LeNet5, 5 epochs, SGD momentum 0.9, cosine, batch 128, lr 0.05
# (the lr the sweep in lenet5_lr_sweep.sh chose for every method), weight decay 5e-4.
#   stage 1: dense (seeds 0-2); TDLRT at tau 0.1, 0.2, 0.3 and the plain rule at tau 0.2 (seed 0)
#   stage 2: TDLRT tau 0.2 (the headline point) at seeds 1-2
#   stage 3: fixed-rank Tucker, CP and matrix at TDLRT tau 0.2's conv compression rate (seed 0's, read
#            from its summary.json); SNIP and IMP (one round) at the same conv parameter count
#   stage 4: fixed-rank Tucker and matrix (the closest baselines) at seeds 1-2
# Two streams side by side, one thread each (a 2-core machine):   bash scripts/evidence/lenet5_mnist.sh
# Rerun a stage alone with STAGES="3" bash scripts/evidence/lenet5_mnist.sh
set -euo pipefail
STAGES=${STAGES:-"1 2 3 4"}
out=outputs/lenet5_mnist
common="model=lenet5 data=mnist data.val_split=0 epochs=5 batch_size=128 lr=0.05 progress=false cost_report=false task_name=lenet5_mnist"
export OMP_NUM_THREADS=1

if [[ " $STAGES " == *" 1 "* ]]; then
  tdlrt train -m $common +variant=dense seed=0,1,2 &
  tdlrt train -m $common method=tdlrt tau=0.1,0.2,0.3 seed=0 &
  wait
  tdlrt train -m $common method=tdlrt tau=0.2 method.tau_warmup_epochs=0 seed=0
fi
if [[ " $STAGES " == *" 2 "* ]]; then
  tdlrt train -m $common method=tdlrt tau=0.2 seed=1,2
fi
if [[ " $STAGES " == *" 3 "* || " $STAGES " == *" 4 "* ]]; then
  # the conv compression rate of TDLRT tau 0.2, seed 0 (default warm-up), and the pruning sparsity with the
  # same number of conv weights (pruning leaves the first conv dense, as the factorisations do)
  read -r cr sparsity < <(python - "$out" <<'PY'
import json, sys, pathlib
import torch.nn as nn
from tdlrt_cli.models import build_model
for s in sorted(pathlib.Path(sys.argv[1]).rglob("summary.json")):
    c = json.loads(s.read_text())["config"]
    if c["method"]["name"] == "tdlrt" and c["tau"] == 0.2 and c["seed"] == 0 and c["method"]["tau_warmup_epochs"] == 1.0:
        cr = json.loads(s.read_text())["compression_rate"]
        convs = [m.weight.numel() for m in build_model("lenet5", 1, 10, 28).modules() if isinstance(m, nn.Conv2d)]
        print(f"{cr:.2f} {cr / 100 * sum(convs) / sum(convs[1:]):.4f}")
        break
else:
    sys.exit("no finished TDLRT tau=0.2 seed=0 run under " + sys.argv[1])
PY
)
  echo "matching conv c.r. ${cr}% (pruning sparsity ${sparsity})"
fi
if [[ " $STAGES " == *" 3 "* ]]; then
  # (one method per command: method.target_cr is not a key of the default method, so it cannot ride a
  # sweep over method=)
  ( tdlrt train -m $common method=tucker method.target_cr=$cr seed=0
    tdlrt train -m $common method=cp method.target_cr=$cr seed=0 ) &
  tdlrt train -m $common method=matrix method.target_cr=$cr seed=0 &
  wait
  tdlrt train -m $common method=snip method.sparsity=$sparsity seed=0 &
  tdlrt train -m $common method=imp method.sparsity=$sparsity method.rounds=1 method.rewind_epoch=1 seed=0 &
  wait
fi
if [[ " $STAGES " == *" 4 "* ]]; then
  tdlrt train -m $common method=tucker method.target_cr=$cr seed=1,2 &
  tdlrt train -m $common method=matrix method.target_cr=$cr seed=1,2 &
  wait
fi
tdlrt report $out out=results/lenet5_mnist
