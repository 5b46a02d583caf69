"""The real `tdlrt` command line, in subprocesses, on tiny synthetic data."""
import csv
import json

import pytest
import torch

from conftest import TINY, run_dirs, run_tdlrt


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_help_lists_subcommands_and_config_groups(tmp_path):
    out = run_tdlrt(["--help"], tmp_path).stdout
    assert all(command in out for command in ("train", "report", "export", "eval", "bench"))
    assert "merge=chain|auto|dense" in run_tdlrt(["export", "--help"], tmp_path).stdout
    assert "cost report" in run_tdlrt(["eval", "--help"], tmp_path).stdout
    out = run_tdlrt(["train", "--help"], tmp_path).stdout
    for group, options in (("model", "alexnet, lenet5, resnet18, torchvision, vgg16"), ("optimizer", "adam, adamw, sgd"),
                           ("scheduler", "cosine, none, onecycle, plateau, step"),
                           ("method", "cp, dense, dlrt, grasp, imp, matrix, snip, tdlrt, tdlrt_target, tt, tucker"),
                           ("data", "cifar10, cifar100, fashion_mnist, imagefolder, mnist, synthetic")):
        assert f"  {group:<10} {options}" in out


def test_unknown_subcommand_fails_clearly(tmp_path):
    proc = run_tdlrt(["trian"], tmp_path, check=False)
    assert proc.returncode == 2
    assert "unknown subcommand 'trian'" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("method", ["dense", "tdlrt"])
def test_train_writes_every_run_file(tmp_path, method):
    run_tdlrt(["train", *TINY, f"method={method}"], tmp_path)
    (run,) = run_dirs(tmp_path / "outputs")
    assert run.parent.parent.name == "train"  # outputs/<task>/<date>/<time>
    for name in (".hydra/config.yaml", "metrics.csv", "summary.json", "checkpoints/last.pt", "checkpoints/best.pt",
                 "train.log"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    rows = read_csv(run / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for key in ("train_loss", "train_acc", "test_loss", "test_acc", "lr", "epoch_time_s", "images_per_s"):
        assert float(rows[-1][key]) == float(rows[-1][key])  # present and numeric
    summary = json.loads((run / "summary.json").read_text())
    for key in ("test_acc", "checkpoint", "test_acc_final", "test_acc_max_epoch", "params", "wall_time_s", "config",
                "compression_rate",
                "compression_rate_total", "ranks", "flops_forward", "flops_train"):
        assert key in summary, key
    assert summary["config"]["model"]["name"] == "vgg16" and summary["config"]["method"]["name"] == method
    assert summary["test_acc"] == summary["test_acc_final"] == pytest.approx(float(rows[-1]["test_acc"]))
    assert summary["checkpoint"] == "last.pt"  # no validation split: the network after the last epoch
    if method == "tdlrt":
        assert 0 < summary["compression_rate"] < 100
        assert len(summary["ranks"]) == 12  # 13 convs, the first stays dense
        ranks = read_csv(run / "ranks.csv")
        assert {int(r["epoch"]) for r in ranks} == {1, 2} and len(ranks) == 24
        for r in ranks:
            assert 1 <= int(r["r_out"]) <= int(r["n_out"]) // 2 and 1 <= int(r["r_in"]) <= int(r["n_in"]) // 2
        steps = read_csv(run / "ranks_steps.csv")
        assert {int(r["step"]) for r in steps} == {0, summary["steps"] // 2, summary["steps"]}  # step 0, epoch ends
        assert set(summary["pinned_modes"]) == {"r_max", "r_min"}
    else:
        assert summary["compression_rate"] == 0 and summary["ranks"] == {}


def test_ranks_every_logging_step_and_a_warning_for_modes_left_at_their_cap(tmp_path):
    """tau=0.01 cuts nothing in one short epoch: every adapted mode ends at r_max, which the run says, since
    the compression it reports is then the starting cap's and not an adaptation."""
    args = [a for a in TINY if not a.startswith("epochs")]
    proc = run_tdlrt(["train", *args, "epochs=1", "method=tdlrt", "tau=0.01", "log_every_n_steps=1"], tmp_path)
    (run,) = run_dirs(tmp_path / "outputs")
    steps = read_csv(run / "ranks_steps.csv")
    assert sorted({int(r["step"]) for r in steps}) == [0, 1, 2, 3, 4]  # 256 images / 64 per step
    assert len(steps) == 5 * 12
    summary = json.loads((run / "summary.json").read_text())
    assert len(summary["pinned_modes"]["r_max"]) == 24 and summary["pinned_modes"]["r_min"] == []
    assert "24 of 24 adapted modes finished at r_max" in proc.stderr


def test_validation_split_selects_best_checkpoint(tmp_path):
    """data.val_split=0.25 holds out the last quarter of the training images; best.pt is the epoch with the best
    validation accuracy, and summary.json gives the test accuracy of it and of the last epoch, labelled."""
    args = [a for a in TINY if not a.startswith("epochs")]
    run_tdlrt(["train", *args, "epochs=3", "method=dense", "data.val_split=0.25", "cost_report=false"], tmp_path)
    (run,) = run_dirs(tmp_path / "outputs")
    rows = read_csv(run / "metrics.csv")
    assert all("val_acc" in r and float(r["val_acc"]) >= 0 for r in rows)
    summary = json.loads((run / "summary.json").read_text())
    sel = summary["selected"]
    best_row = max(rows, key=lambda r: float(r["val_acc"]))  # the first epoch with the best val accuracy
    assert sel["by"] == "val_acc" and sel["epoch"] == int(best_row["epoch"])
    assert sel["test_acc"] == pytest.approx(float(best_row["test_acc"]))
    assert torch.load(run / "checkpoints" / "best.pt", weights_only=True)["epoch"] == sel["epoch"]
    assert summary["steps"] == 3 * ((256 - 64) // 64)  # the held-out images are not trained on
    assert summary["test_acc"] == pytest.approx(float(best_row["test_acc"])) and summary["checkpoint"] == "best.pt"
    assert summary["test_acc_final"] == pytest.approx(float(rows[-1]["test_acc"]))
    assert summary["test_acc_max_epoch"] == pytest.approx(max(float(r["test_acc"]) for r in rows))


def test_summary_is_strict_json_and_an_untrained_run_reports_its_start(tmp_path):
    """epochs=0 evaluates the network as built; no NaN/Infinity token in summary.json (not JSON)."""
    args = [a for a in TINY if not a.startswith("epochs")]
    run_tdlrt(["train", *args, "epochs=0", "method=dense", "cost_report=false"], tmp_path)
    (run,) = run_dirs(tmp_path / "outputs")
    text = (run / "summary.json").read_text()
    summary = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON token {c}"))
    assert 0 <= summary["test_acc"] <= 100 and summary["selected"] is None


def test_multirun_two_jobs(tmp_path):
    args = [a for a in TINY if not a.startswith("epochs")]
    run_tdlrt(["train", "-m", *args, "epochs=1", "method=dense", "seed=0,1"], tmp_path)
    runs = run_dirs(tmp_path / "outputs")
    assert len(runs) == 2 and runs[0].parent == runs[1].parent and runs[0].parents[2].name == "multirun"
    seeds = {json.loads((r / "summary.json").read_text())["config"]["seed"] for r in runs}
    assert seeds == {0, 1}


@pytest.mark.parametrize("method", ["dense", "tdlrt"])
def test_resume_continues_at_the_right_epoch(tmp_path, method):
    args = [a for a in TINY if not a.startswith("epochs")] + [f"method={method}"]
    run_tdlrt(["train", *args, "epochs=1"], tmp_path)
    (run,) = run_dirs(tmp_path / "outputs")
    ckpt = run / "checkpoints" / "last.pt"
    first = torch.load(ckpt, weights_only=True)
    assert first["epoch"] == 1
    proc = run_tdlrt(["train", *args, "epochs=3", f"ckpt_path={ckpt}"], tmp_path)
    assert "resuming" in proc.stderr
    assert run_dirs(tmp_path / "outputs") == [run]  # same run folder, no new one
    assert (run / ".hydra" / "config.yaml").is_file() and list((run / ".hydra").glob("resume-*/config.yaml"))
    rows = read_csv(run / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert torch.load(ckpt, weights_only=True)["epoch"] == 3
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 * first["global_step"]


def test_method_hooks_finetune_freezes_ranks_and_imp_runs_its_rounds(tmp_path):
    """The loop's method hooks: tdlrt's last finetune_epochs keep the bases (ranks) fixed; imp trains
    epochs x (rounds + 1) epochs, pruning at each round's start."""
    args = [a for a in TINY if not a.startswith("epochs")] + ["cost_report=false", "log_every_n_steps=1"]
    run_tdlrt(["train", *args, "epochs=3", "method=tdlrt", "tau=0.3", "method.tau_warmup_epochs=0",
               "method.finetune_epochs=2", "hydra.run.dir=ft"], tmp_path)
    steps = read_csv(tmp_path / "ft" / "ranks_steps.csv")
    frozen = {(r["layer"], r["r_out"], r["r_in"]) for r in steps if int(r["step"]) >= 4}
    assert len(frozen) == len({r["layer"] for r in steps})  # one rank pair per layer over the frozen epochs
    run_tdlrt(["train", *args, "epochs=2", "method=imp", "method.rounds=1", "method.rewind_epoch=1",
               "method.sparsity=0.5", "hydra.run.dir=imp"], tmp_path)
    summary = json.loads((tmp_path / "imp" / "summary.json").read_text())
    assert summary["epochs"] == 4 and len(read_csv(tmp_path / "imp" / "metrics.csv")) == 4
    state = torch.load(tmp_path / "imp" / "checkpoints" / "last.pt", weights_only=True)["model"]
    masks = [v for k, v in state.items() if k.endswith("weight_mask")]
    kept = sum(float(m.sum()) for m in masks) / sum(m.numel() for m in masks)
    assert masks and kept == pytest.approx(0.5, abs=0.01)
