#!/usr/bin/env bash
# The benchmark behind the table of docs/deploy.md ("Benchmark"): VGG16, batch 128, CIFAR shapes.
# Prints ratios to the dense step; add format=json for one JSON object. On a GPU, add precision=bf16
# channels_last=true to measure at the precision and layout you train with.
set -euo pipefail
tdlrt bench model=vgg16 batch_size=128 rank_fracs=[0.25,0.1] augment_every=[1,4] "$@"
