#!/usr/bin/env bash
# Regenerate every table and figure of the rank-rule study from the committed run files, then their copies
# in docs/evidence.md:   bash scripts/evidence/rank_rules_report.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
tdlrt report results/frontier_p/runs out=results/frontier_p
python scripts/evidence/frontier_targets.py results/frontier_p/runs --out results/frontier_p/targets.md
python scripts/evidence/rank_dynamics.py results/frontier_p/runs --out results/frontier_p/rank_dynamics.md
tdlrt report results/cifar10_full/runs out=results/cifar10_full
tdlrt report results/schedule_p/runs results/frontier_p/runs/dense_s0 results/frontier_p/runs/target_cr80_rmax1_s0 \
  out=results/schedule_p
python scripts/evidence/readme_tables.py
