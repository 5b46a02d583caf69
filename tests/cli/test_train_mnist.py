"""Real learning on the offline MNIST copy, through the real CLI (skipped where the copy is absent)."""
import json

import pytest

from conftest import run_dirs, run_tdlrt

COMMON = ["model=lenet5", "data=mnist", "data.limit_train=10000", "batch_size=64", "data.download=false", "progress=false",
          "device=cpu", "seed=0"]


def summary_of(tmp_path, task):
    (run,) = run_dirs(tmp_path / "outputs" / task)
    return json.loads((run / "summary.json").read_text())


@pytest.mark.slow
def test_lenet5_learns_mnist_and_tdlrt_ends_within_one_point_of_dense(tmp_path, real_data):
    for method in ("dense", "tdlrt method.convert_linear=true"):
        name = method.split()[0]
        run_tdlrt(["train", *COMMON, f"data.root={real_data}", *f"method={method}".split(), "epochs=2",
                   f"task_name={name}"], tmp_path)
    dense, tdlrt = summary_of(tmp_path, "dense"), summary_of(tmp_path, "tdlrt")
    (run,) = run_dirs(tmp_path / "outputs" / "dense")
    first_epoch = (run / "metrics.csv").read_text().splitlines()[1].split(",")
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert float(first_epoch[header.index("test_acc")]) >= 95.0  # dense LeNet5 after its first epoch
    assert tdlrt["test_acc"] >= dense["test_acc"] - 1.0, (tdlrt["test_acc"], dense["test_acc"])
    assert tdlrt["compression_rate"] > 50 and tdlrt["compression_rate_total"] > 50
    assert set(tdlrt["ranks"]) == {"features.3", "classifier.1"}
