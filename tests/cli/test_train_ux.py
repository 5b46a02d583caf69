"""What a researcher sees: the start block, train.log, progress without a terminal, TensorBoard's per-step
accuracy and hparams, --help with every key, completion of `tdlrt <subcommand>`."""
import os
import subprocess
from contextlib import nullcontext
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest
import torch

from conftest import TINY, run_dirs, run_tdlrt


def schema_keys(obj, prefix=""):
    for f in fields(obj):
        value = getattr(obj, f.name)
        if is_dataclass(value):
            yield from schema_keys(value, prefix + f.name + ".")
        else:
            yield prefix + f.name


def test_every_config_key_has_a_help_line():
    from tdlrt_cli.config import FIELD_HELP, TrainConfig

    keys = set(schema_keys(TrainConfig()))
    assert keys - set(FIELD_HELP) == set(), "keys without a --help line"
    assert set(FIELD_HELP) - keys == set(), "help lines of keys the schema does not have"


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


def test_plain_progress_lines_without_a_terminal(capsys):
    """stderr is not a terminal under pytest: no tqdm carriage returns, plain lines with the running figures."""
    from tdlrt_cli.logs import Console, RunLogger
    from tdlrt_cli.models import build_model
    from tdlrt_cli.loop import EpochOptions, train_one_epoch

    class Loader(list):
        def set_epoch(self, epoch, start):
            pass

    torch.manual_seed(0)
    model = build_model("lenet5", 1, 10, 28, 0.25)
    loader = Loader([(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))) for _ in range(3)])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    train_one_epoch(model, loader, opt, None, None, nullcontext, RunLogger(Path("."), write=False), True, 0, 0,
                    EpochOptions(log_every=50, say=Console(), plain_every_s=0.0))
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("epoch 1: step ")]
    assert [line.split(" | ")[0] for line in lines] == [f"epoch 1: step {i}/3" for i in (1, 2, 3)]
    assert all(" acc " in line and "img/s" in line for line in lines)


@pytest.mark.parametrize("seconds, shown", [(0.05, False), (2.0, True)])
def test_a_long_cpu_epoch_is_announced_after_the_first_steps(seconds, shown):
    from tdlrt_cli.messages import pace_note

    said = []
    pace_note(torch.device("cpu"), 390, said.append)(seconds)
    assert bool(said) == shown
    if shown:
        assert "an epoch takes about 13 min on this CPU" in said[0] and "+experiment=quick" in said[0]


@pytest.mark.parametrize("full, needle", [(False, "at their cap (a/out): the budget kept them whole "
                                                    "(method.r_max_frac raises the cap)"),
                                           (True, "at full rank (a/out): the budget kept them whole")])
def test_the_target_rules_note_on_modes_at_their_cap_names_a_cap_that_can_be_raised(full, needle):
    from tdlrt_cli.messages import warn_pinned

    said = []
    warn_pinned({"r_max": ["a/out"], "r_min": []}, 4, said.append, target=True, cap_is_full=full)
    assert said == [f"tdlrt: note: 1 of 4 adapted modes finished {needle}"]


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
