"""What a researcher sees, through the real CLI: the start block, train.log, TensorBoard's per-step accuracy and
hparams, --help with every key, completion of `tdlrt <subcommand>`."""
import os
import subprocess
from pathlib import Path

from conftest import TINY, run_dirs, run_tdlrt


def test_train_help_lists_every_key_with_its_value_and_description(tmp_path):
    from tdlrt_cli.config import FIELD_HELP

    out = run_tdlrt(["train", "model=lenet5", "lr=0.01", "--help"], tmp_path).stdout
    assert "  model.name=lenet5 " in out and "  lr=0.01 " in out and "method     cp, dense, dlrt" in out
    for key, text in FIELD_HELP.items():
        assert any(line.strip().startswith(key + "=") and line.rstrip().endswith(text) for line in out.splitlines()), key
    assert not (tmp_path / "outputs").exists()


def complete(tmp_path, line):
    words = line.split(" ")
    script = (f'eval "$(tdlrt completion bash)"; COMP_LINE="{line}"; COMP_POINT={len(line)}; '
              f'COMP_WORDS=({" ".join(repr(w) for w in words)}); COMP_CWORD={len(words) - 1}; '
              f'_tdlrt_complete; printf "%s\\n" "${{COMPREPLY[@]}}"')
    proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PATH": f"{Path(os.sys.executable).parent}:{os.environ['PATH']}"})
    assert proc.returncode == 0, proc.stderr
    return set(proc.stdout.split())


def test_completion_of_subcommands_and_train_overrides(tmp_path):
    assert complete(tmp_path, "tdlrt tr") == {"train"}
    assert {"model=lenet5", "model=vgg16"} <= complete(tmp_path, "tdlrt train model=")
    assert "tau=" in complete(tmp_path, "tdlrt train model=lenet5 ta")
    # Hydra's own installer would register the internal name tdlrt-train; ours registers tdlrt
    script = run_tdlrt(["train", "--shell-completion", "install=bash"], tmp_path).stdout
    assert "complete -o nospace -o default -F _tdlrt_complete tdlrt" in script and "tdlrt-train\n" not in script


def test_start_block_epoch_lines_and_done_go_to_stderr_and_train_log(tmp_path):
    proc = run_tdlrt(["train", *TINY, "method=tdlrt", "tau=0.1", "cost_report=false"], tmp_path)
    (run,) = run_dirs(tmp_path / "outputs")
    assert proc.stderr.startswith(f"tdlrt train: run folder {run}")
    assert "method tdlrt tau 0.1" in proc.stderr and "2 epochs of 4 steps, batch 64" in proc.stderr
    log = (run / "train.log").read_text()
    for line in proc.stderr.strip().splitlines():
        assert line in log, line
    assert "epoch 2/2:" in log and "done: test acc" in log


def test_tensorboard_has_per_step_accuracy_and_hparams(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_tdlrt(["train", *TINY, "method=tdlrt", "tau=0.1", "cost_report=false", "log_every_n_steps=1"], tmp_path)
    (run,) = run_dirs(tmp_path / "outputs")
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/acc_step", "train/acc", "train/loss_step"} <= set(tags)
    assert len(events.Scalars("train/acc_step")) == 8  # every step of 2 epochs x 4
    assert "hparam/test_acc" in tags or any("hparams" in str(p) for p in (run / "tensorboard").rglob("*"))
    plugin = events.PluginTagToContent("hparams")
    assert plugin, "no hparams summary"


def test_start_block_says_where_a_limited_training_set_went(tmp_path):
    proc = run_tdlrt(["train", *TINY, "method=dense", "epochs=1", "data.limit_train=192", "data.val_split=64",
                      "cost_report=false"], tmp_path)
    assert ("the first 192 training images (data.limit_train): 128 train + 64 validation (data.val_split); "
            "128 test") in proc.stderr  # 2 whole batches of 64: nothing left over
    assert "1 epoch of 2 steps" in proc.stderr
