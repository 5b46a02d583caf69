"""What a researcher sees, from the functions that print it: a --help line for every config key, plain progress
lines without a terminal, the note on a long CPU epoch and the target rule's note on modes at their cap."""
from contextlib import nullcontext
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest
import torch


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
