"""The torchvision study's table, from the committed run files of `scripts/evidence/torchvision.sh`.

    python scripts/evidence/torchvision_report.py [--runs results/torchvision/runs] [--out results/torchvision]

Writes torchvision.md: torchvision's ResNet-18 on proxy P, dense, then at 90% conv c.r. by four routes: its
one-shot decomposition (no training), decompose + fine-tune the fixed-rank factors, `tdlrt compress` (TDLRT
fine-tuning from the decomposition) and TDLRT with the target rule from scratch; test accuracy (at the checkpoint
each run hands on), conv c.r., epochs and training wall time of each step. Runs that are not there yet are listed
as missing, never filled in.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from tdlrt_cli.files import atomic_write_text
from tdlrt_cli.summary import accuracies

ROWS = (  # (label, run folder under --runs, what it is)
    ("Dense", "tv_dense_s0", "20 epochs from a random start"),
    ("One-shot decomposition", "compress_cr90/oneshot", "truncated HOSVD of the dense kernels at the one-shot "
                                                        "allocation's ranks, no training"),
    ("Decompose + fine-tune (fixed-rank Tucker)", "tv_tucker_ft_cr90_s0", "the same decomposition, its factors "
                                                                           "fine-tuned 5 epochs at lr 0.01"),
    ("tdlrt compress (TDLRT fine-tuning)", "compress_cr90/finetuned", "HOSVD at the target rule's starting ranks, "
                                                                      "5 epochs of TDLRT at lr 0.01 to 90%"),
    ("TDLRT from scratch (target rule)", "tv_tdlrt_cr90_s0", "20 epochs from a random start to 90%"),
)


def row(runs: Path, folder: str):
    path = runs / folder / "summary.json"
    if not path.is_file():
        return None
    s = json.loads(path.read_text())
    return {"acc": accuracies(s)["test_acc"], "cr": s.get("compression_rate", 0.0), "epochs": s.get("epochs"),
            "wall_min": (s.get("wall_time_s") or 0) / 60}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("results/torchvision/runs"))
    parser.add_argument("--out", type=Path, default=Path("results/torchvision"))
    args = parser.parse_args()
    lines = ["torchvision's ResNet-18 compressed to 90% conv c.r.: `model=torchvision model.arch=resnet18` (random initialisation) on proxy P: CIFAR-10's first 10,000 "
             "training images (9,000 for training, 1,000 for validation), the full test set, 32x32, batch 128, SGD "
             "momentum 0.9, cosine lr, seed 0; made by `bash scripts/evidence/torchvision.sh`, this table by "
             "`python scripts/evidence/torchvision_report.py`. Test accuracy of the network each run hands on "
             "(best.pt, chosen on the validation split). One seed: differences under about 1 point are within "
             "run-to-run noise.", "",
             "| route | what it is | conv c.r. | test acc | epochs | wall time |", "|---|---|---:|---:|---:|---:|"]
    missing = []
    dense = None
    for label, folder, what in ROWS:
        r = row(args.runs, folder)
        if r is None:
            missing.append(folder)
            lines.append(f"| {label} | {what} | not run yet | | | |")
            continue
        dense = r["acc"] if folder == "tv_dense_s0" else dense
        gap = f" ({r['acc'] - dense:+.2f})" if dense is not None and folder != "tv_dense_s0" else ""
        wall = f"{r['wall_min']:.0f} min" if r["epochs"] else "evaluation only"
        lines.append(f"| {label} | {what} | {r['cr']:.1f}% | {r['acc']:.2f}%{gap} | {r['epochs']} | {wall} |")
    lines += ["", "In brackets: the difference to dense in points. Wall times are of one process on one CPU thread of "
              "the 2-core machine the runs were made on, with another run beside it (each run's train.log and "
              "summary.json give its host, commit and times)."]
    if missing:
        lines += ["", f"Not run yet: {', '.join(missing)} (running the script again runs them)."]
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "torchvision.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
