"""Files the tests write by hand (no training): run folders for `tdlrt report`, a CIFAR-10 copy in its pickle
format, and a pickle payload that would create a file if it were ever unpickled."""
import copy
import csv
import json
import pickle

import numpy as np

# --------------------------------------------------------------------------- run folders for `tdlrt report`

# a run's config as summary.json records it (write_run)
CONFIG = {"data": {"name": "cifar10", "root": "data", "download": True, "num_workers": 4},
          "model": {"name": "vgg16", "width_mult": 1.0},
          "method": {"name": "tdlrt", "default_tau": 0.1, "r_min": 2}, "optimizer": {"name": "sgd", "nesterov": False},
          "scheduler": {"name": "cosine", "min_lr": 0.0}, "checkpoint": {"every_n_steps": 0, "auto_resume": True},
          "task_name": "train", "tau": 0.1, "lr": 0.05, "weight_decay": 5e-4, "epochs": 30, "seed": 0,
          "device": "auto", "progress": True, "log_every_n_steps": 50, "eval_batch_size": 1024,
          "cost_report": True, "cost_repeat": 10, "ckpt_path": None}
# the few keys a row needs (finished_run)
SHORT_CONFIG = {"data": {"name": "synthetic"}, "model": {"name": "vgg16"}, "method": {"name": "tdlrt"}, "tau": 0.1,
                "epochs": 1, "seed": 0}


def write_run(folder, final, best=None, cr=91.0, selected=None, **changes):
    """A finished run folder holding only summary.json; ``changes``: dotted config keys -> values;
    ``selected``: the test accuracy of a validation-selected best.pt."""
    config = copy.deepcopy(CONFIG)
    for key, value in changes.items():
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    folder.mkdir(parents=True)
    summary = {"config": config, "test_acc": final, "compression_rate": cr}
    if best is not None:
        summary["best_test_acc"] = best
    if selected is not None:
        summary["selected"] = {"by": "val_acc", "epoch": 3, "val_acc": 99.0, "test_acc": selected}
    (folder / "summary.json").write_text(json.dumps(summary))


def finished_run(folder, test_acc=50.0, epochs=1, **summary):
    """A finished run folder with summary.json, metrics.csv and ranks.csv (``summary``: its keys replaced)."""
    folder.mkdir(parents=True)
    s = {"config": dict(SHORT_CONFIG, epochs=epochs), "test_acc": test_acc, "best_test_acc": test_acc,
         "compression_rate": 90.0, "epochs": epochs, **summary}
    (folder / "summary.json").write_text(json.dumps(s))
    (folder / "metrics.csv").write_text("epoch,train_loss,test_acc\r\n1,2.0,50.0\r\n")
    (folder / "ranks.csv").write_text("epoch,layer,r_out,r_in\r\n1,features.3,4,4\r\n")
    return folder


def write_ranks(folder, steps, layers=(("features.3", 16, 16), ("features.7", 16, 32))):
    """ranks_steps.csv (``steps``: (step, rank) rows, every layer at rank, r_out one higher for the 2nd layer)
    and a ranks.csv with the layers' sizes."""
    (folder / "ranks_steps.csv").write_text("step,epoch,layer,r_out,r_in,r_kh,r_kw\n" + "".join(
        f"{s},0,{name},{r + j},{r},3,3\n" for s, r in steps for j, (name, _, _) in enumerate(layers)))
    (folder / "ranks.csv").write_text("epoch,layer,r_out,r_in,r_kh,r_kw,n_out,n_in,n_kh,n_kw\n" + "".join(
        f"1,{name},4,4,3,3,{n_out},{n_in},3,3\n" for name, n_in, n_out in layers))


def table(out):
    """The rows of the report's table.csv in ``out``."""
    with open(out / "table.csv", newline="") as fh:
        return list(csv.DictReader(fh))


# --------------------------------------------------------------------------- data

def write_cifar10(root, n=20, seed=0):
    """A small CIFAR-10 copy in the original pickle format (checksums differ from the originals)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        with open(folder / name, "wb") as fh:
            pickle.dump({"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         "labels": rng.integers(0, 10, n).tolist()}, fh)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, fh)
    return folder


class CreatesFile:
    """Unpickling it creates the file ``path``: stands for any code a crafted pickle can run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")
