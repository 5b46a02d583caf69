"""summary.json records where a run came from: versions, source revision, command line, host, start time."""
import datetime
import importlib.metadata
import json
import platform
import shlex
import socket
import subprocess
import time

import torch

from conftest import ROOT, TINY, run_dirs, run_tdlrt

from tdlrt_cli import provenance as prov


def git(*args):
    try:
        proc = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def test_summary_records_provenance(tmp_path):
    before = time.time()
    args = ["train", *[a for a in TINY if not a.startswith("epochs")], "epochs=1", "method=dense", "cost_report=false"]
    run_tdlrt(args, tmp_path)
    (run,) = run_dirs(tmp_path / "outputs")
    p = json.loads((run / "summary.json").read_text())["provenance"]
    assert p["torch"] == torch.__version__ and p["cuda"] == torch.version.cuda
    assert p["cudnn"] == (torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
    assert p["tdlrt"] == importlib.metadata.version("tdlrt")
    assert p["python"] == platform.python_version()
    head = git("rev-parse", "HEAD")
    if head is not None:  # the tests run from a git checkout of the project
        assert p["git_commit"] == head and isinstance(p["git_dirty"], bool)
    else:
        assert p["git_commit"] is None and p["git_dirty"] is None
    assert p["argv"][0] == "tdlrt-train" and p["argv"][1:len(args)] == args[1:]
    assert all(a.startswith("hydra.run.dir=") for a in p["argv"][len(args):])  # the folder checked before Hydra
    assert shlex.split(p["command"]) == ["tdlrt", "train", *p["argv"][1:]]  # a command a shell runs again
    assert p["orig_argv"][-len(args):] == args  # the process as started: ... tdlrt train <overrides>
    assert p["host"] == socket.gethostname()
    started = datetime.datetime.fromisoformat(p["started"])
    assert started.tzinfo is not None and before - 1 <= started.timestamp() <= time.time()


def test_provenance_outside_a_git_checkout_or_without_git(tmp_path, monkeypatch):
    monkeypatch.setattr(prov, "SOURCE_ROOT", tmp_path)  # not a git checkout
    p = prov.provenance(0.0)
    assert (p["git_commit"], p["git_dirty"]) == (None, None)
    assert p["torch"] == torch.__version__ and p["tdlrt"] and p["host"] == socket.gethostname()
    assert datetime.datetime.fromisoformat(p["started"]).timestamp() == 0.0
    json.dumps(p)  # plain JSON
    monkeypatch.setattr(prov, "SOURCE_ROOT", ROOT)
    monkeypatch.setenv("PATH", str(tmp_path))  # no git program at all
    assert prov.git_state() == {"commit": None, "dirty": None}
    assert prov.provenance()["git_commit"] is None


def test_the_recorded_command_pastes_back_into_a_shell():
    import shlex

    from tdlrt_cli.provenance import paste_back

    argv = ["/usr/bin/tdlrt-train", "model=vgg16", "task_name=a b", "data.mean=[0.5,0.5,0.5]"]
    command = paste_back(argv)
    assert command.startswith("tdlrt train model=vgg16 ")
    assert shlex.split(command)[2:] == argv[1:]  # each argument back as it was, quoted once
