#!/usr/bin/env bash
# Regenerate every table and figure of the paper's CIFAR-10 / MNIST / Tiny-ImageNet experiments.
# Run from the repository root; each sweep writes outputs/<preset>/multirun/<date>/<time>/<job>/.
# GPU times are not measured yet (no GPU was available when these presets were written); on the
# project's 2-core CPU a VGG16 epoch on CIFAR-10 takes about 20 minutes, so use a GPU for these.
set -euo pipefail

# The evidence of docs/evidence.md (CPU-sized, each resumable or short): scripts/evidence/*.sh.
# Its VGG16 comparison at the paper's full width, on a GPU:
WIDTH=1 DEVICE=cuda bash scripts/evidence/vgg16_cifar10.sh

tdlrt train -m +experiment=cifar10_table      # 3 models x 12 variants x 3 seeds = 108 runs of 30 epochs
tdlrt train -m +experiment=tau_sweep          # VGG16: 12 variants x 3 seeds
tdlrt train -m +experiment=rank_evolution     # VGG16 TDLRT at tau 0.05, 0.1, 0.2
tdlrt train -m +experiment=ill_conditioned    # LeNet5/MNIST: TDLRT, Tucker, CP from 10^-k singular values
# Tiny-ImageNet needs the dataset in class folders: <root>/train/<class>/, <root>/val/<class>/
# tdlrt train -m +experiment=tiny_imagenet data.root=/path/to/tiny-imagenet-200

for preset in cifar10_table tau_sweep rank_evolution ill_conditioned; do
  tdlrt report outputs/$preset out=report/$preset
done
