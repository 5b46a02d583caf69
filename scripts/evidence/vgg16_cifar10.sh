#!/usr/bin/env bash
# VGG16 on full CIFAR-10, 20 epochs, SGD momentum 0.9, cosine, batch 128, lr 0.05, seed 0: dense, TDLRT at
# tau 0.1 and 0.2, then fixed-rank Tucker at TDLRT tau 0.1's conv compression rate.
# WIDTH=0.25 (default: VGG16 at 1/4 width, the CPU setting) or WIDTH=1 (the paper's network, for a GPU).
# Every run has a fixed folder under outputs/vgg16_w<WIDTH>_cifar10/ and checkpoints every 100 steps: running
# this script again resumes unfinished runs where they stopped and skips finished ones.
#   bash scripts/evidence/vgg16_cifar10.sh               (two runs side by side, one thread each)
#   WIDTH=1 DEVICE=cuda bash scripts/evidence/vgg16_cifar10.sh
set -euo pipefail
WIDTH=${WIDTH:-0.25}
DEVICE=${DEVICE:-auto}
out=outputs/vgg16_w${WIDTH}_cifar10
common="model=vgg16 model.width_mult=$WIDTH data=cifar10 data.val_split=0 epochs=20 batch_size=128 lr=0.05 progress=false
        device=$DEVICE cost_report=false checkpoint.every_n_steps=100 task_name=vgg16_w${WIDTH}_cifar10"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

run() {  # run NAME OVERRIDES...: train into $out/NAME unless it has finished
  local name=$1; shift
  if [[ -f $out/$name/summary.json ]]; then echo "$name: finished"; return; fi
  echo "$(date +%T) start $name (progress: tail -f $out/$name.log)"
  tdlrt train $common "$@" hydra.run.dir=$out/$name >> "$out/$name.log" 2>&1 || { echo "$name failed: $out/$name.log"; return 1; }
  echo "$(date +%T) done $name: $(tail -n 1 "$out/$name.log")"
}
mkdir -p "$out"
( run dense_s0 method=dense seed=0 && run tdlrt_tau0.2_s0 method=tdlrt tau=0.2 seed=0 ) &
( run tdlrt_tau0.1_s0 method=tdlrt tau=0.1 seed=0 ) &
wait
cr=$(python -c "import json; print(round(json.load(open('$out/tdlrt_tau0.1_s0/summary.json'))['compression_rate'], 2))")
echo "fixed-rank Tucker at TDLRT tau 0.1's conv c.r. ${cr}%"
run tucker_s0 method=tucker method.target_cr=$cr seed=0
tdlrt report "$out" out=results/vgg16_w${WIDTH}_cifar10
