"""Bad input to `tdlrt eval` through the real CLI: each ends with exit status 2 and exactly one line on stderr,
`tdlrt: error: ...`, naming the key or path, without a traceback, and leaves every file written before as it
was; an export holding pickled entries is refused before it is loaded, and a Ctrl-C writes no report."""
import json

import pytest
import torch

from conftest import one_error_line, run_tdlrt, snapshot, stopped_by_ctrl_c, unchanged
from handmade import CreatesFile


def test_eval_bad_input(trained_run, tmp_path):
    (tmp_path / "afile").write_text("keep me\n")
    (tmp_path / "folder").mkdir()
    run = str(trained_run)
    cases = [
        (["data.limit_test"], ["data.limit_test needs a value"]),
        (["data.limit_test=[1"], ["cannot parse data.limit_test=[1"]),
        (["batch_size=0"], ["batch_size=0 must be >= 1"]),
        (["repeat=0"], ["repeat=0 must be >= 1"]),
        ([f"out={tmp_path / 'afile' / 'r.json'}"], ["afile", "does not exist"]),
        ([f"out={tmp_path / 'folder'}"], ["folder", "is a folder", "report.json"]),
    ]
    for args, needles in cases:
        one_error_line(["eval", run, *args], tmp_path, *needles)


@pytest.mark.parametrize("key", ["model", "config"])
def test_eval_and_export_of_a_checkpoint_missing_an_entry(trained_run, tmp_path, key):
    state = torch.load(trained_run / "checkpoints" / "last.pt", weights_only=True)
    del state[key]
    torch.save(state, tmp_path / "old.pt")
    needle = f"is missing '{key}' (written by an older tdlrt or damaged)" if key == "model" else "no run configuration"
    for command in ("eval", "export"):
        one_error_line([command, str(tmp_path / "old.pt"), "latency=false" if command == "eval" else "merge=chain"],
                       tmp_path, "old.pt", needle)


def rewrite_archive(src, dst, change=lambda records: records):
    """A copy of the zip ``src`` at ``dst`` whose records (name -> bytes) are ``change(records)``."""
    import zipfile

    with zipfile.ZipFile(src) as zin:
        records = {name: zin.read(name) for name in zin.namelist()}
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for name, data in change(records).items():
            zout.writestr(name, data)


def payload(marker) -> bytes:
    """``torch.save`` of an object whose unpickling creates ``marker``."""
    import io

    buffer = io.BytesIO()
    torch.save((CreatesFile(marker),), buffer)
    return buffer.getvalue()


def pickled_weight(marker):
    """``change`` for :func:`rewrite_archive`: the first weight marked ``use_pickle``, its file replaced by a
    pickle that creates ``marker`` when loaded as ``torch.export.load`` loads such weights."""
    def change(records):
        (name,) = [n for n in records if n.endswith("data/weights/model_weights_config.json")]
        config = json.loads(records[name])
        first = next(iter(config["config"].values()))
        first["use_pickle"] = True
        records[name] = json.dumps(config).encode()
        records[name.replace("model_weights_config.json", first["path_name"])] = payload(marker)
        return records

    return change


def pickled_sample_inputs(marker):
    """``change``: sample inputs that only ``weights_only=False`` reads (torch falls back to it), creating
    ``marker``."""
    def change(records):
        (name,) = [n for n in records if n.endswith("data/sample_inputs/model.pt")]
        records[name] = payload(marker)
        return records

    return change


@pytest.mark.parametrize("craft", [pickled_weight, pickled_sample_inputs])
def test_eval_refuses_an_export_with_pickled_entries_before_loading_it(trained_run_with_linear, tmp_path, craft):
    good = tmp_path / "net.pt2"
    run_tdlrt(["export", str(trained_run_with_linear), f"out={good}", "merge=chain", "repeat=2"], tmp_path)
    marker = tmp_path / "payload-ran"
    crafted = tmp_path / "crafted.pt2"
    rewrite_archive(good, crafted, craft(marker))
    (tmp_path / "crafted.pt2.json").write_bytes((tmp_path / "net.pt2.json").read_bytes())
    proc = run_tdlrt(["eval", str(crafted), "latency=false"], tmp_path, check=False)
    assert not marker.exists(), "the pickle in the archive was executed"
    assert proc.returncode == 2 and proc.stderr.strip().startswith("tdlrt: error: refusing")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert str(crafted) in proc.stderr
    # the same rewrite with nothing changed loads (the copy itself is not what is refused)
    copy = tmp_path / "copy.pt2"
    rewrite_archive(good, copy)
    proc = run_tdlrt(["eval", str(copy), "latency=false"], tmp_path)
    assert "test accuracy" in proc.stdout


def test_ctrl_c_during_eval_is_one_line_and_writes_no_report(trained_run, tmp_path):
    out = tmp_path / "r.json"
    out.write_text('{"old": 1}')
    before = snapshot(tmp_path)
    stopped_by_ctrl_c(["eval", str(trained_run), "latency=false", f"out={out}"], tmp_path, "eval")
    unchanged(before)
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
