"""Bad input to `tdlrt export` through the real CLI: each ends with exit status 2 and exactly one line on
stderr, `tdlrt: error: ...`, naming the key or path, without a traceback, and leaves every file written before
as it was; stale temporaries are removed, and a full disk or a Ctrl-C during the write keeps the earlier
export."""
import json
import os

import pytest

from conftest import dead_pid, one_error_line, run_tdlrt, snapshot, stopped_by_ctrl_c, unchanged


def test_export_and_eval_bad_input(tmp_path):
    proc = run_tdlrt(["export", str(tmp_path / "nowhere")], tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("tdlrt: error:") and "nowhere" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    not_export = tmp_path / "x.pt2"
    not_export.write_bytes(b"nope")
    proc = run_tdlrt(["eval", str(not_export)], tmp_path, check=False)
    assert proc.returncode == 2 and "cannot load the exported program" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_export_bad_out(trained_run, tmp_path):
    (tmp_path / "afile").write_text("keep me\n")
    (tmp_path / "folder").mkdir()
    run = str(trained_run)
    cases = [
        ([f"out={tmp_path / 'afile' / 'x.pt2'}"], ["afile", "does not exist"]),
        ([f"out={tmp_path / 'nowhere' / 'x.pt2'}"], ["nowhere", "does not exist", "create it"]),
        ([f"out={tmp_path / 'folder'}"], ["folder", "is a folder", "model.pt2"]),
        ([f"out={tmp_path / 'x.txt'}"], ["x.txt", "must end in .pt2"]),
        (["device=tpu"], ["device=tpu"]),
    ]
    if os.path.isdir("/proc/self"):  # a folder nobody can create files in, also root
        cases.append((["out=/proc/x.pt2"], ["/proc", "cannot write"]))
    for args, needles in cases:
        one_error_line(["export", run, *args, "merge=chain"], tmp_path, *needles)
    assert not (tmp_path / "nowhere").exists()


def test_export_removes_stale_temporaries_and_writes_the_sidecar_after_the_model(trained_run, tmp_path):
    out = tmp_path / "net.pt2"
    stale = [tmp_path / f".tmp-{dead_pid()}-net.pt2", tmp_path / ".tmp-net.pt2"]
    for s in stale:
        s.write_bytes(b"half an export")
    other = tmp_path / f".tmp-{dead_pid()}-other.pt2"
    other.write_bytes(b"not ours")
    proc = run_tdlrt(["export", str(trained_run), f"out={out}", "merge=auto", "repeat=3"], tmp_path)
    meta = json.loads((tmp_path / "net.pt2.json").read_text())["tdlrt_export"]
    assert out.is_file() and not any(s.exists() for s in stale) and other.exists()
    decisions = [line for line in proc.stderr.splitlines() if line.startswith("tdlrt: merge=auto: ")]
    assert len(decisions) == len(meta["layers"]) > 0
    for layer in meta["layers"]:
        assert len(layer["chain_times_ms"]) == len(layer["dense_times_ms"]) == 3 and layer["reason"]
        assert f"{layer['layer']}: {layer['exported']} (" in proc.stderr


def test_a_full_disk_during_export_is_one_line_and_keeps_the_old_files(trained_run, tmp_path):
    """The .pt2 write fails with ENOSPC half-way: one line (torch's zip writer, given the file, aborted the
    process with a C++ `terminate called ... c10::Error`, exit 134), the earlier export and sidecar kept."""
    out = tmp_path / "net.pt2"
    out.write_bytes(b"old model")
    (tmp_path / "net.pt2.json").write_text("{}")
    before = snapshot(tmp_path)
    proc = run_tdlrt(["export", str(trained_run), f"out={out}", "merge=chain"], tmp_path,
                     env={"TDLRT_FAULT_DISK_FULL_IN_EXPORT": "1"}, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith(f"tdlrt: error: no space left on the device of {tmp_path} while writing net.pt2")
    assert "free space and run the command again" in lines[0]
    unchanged(before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.pt2", "net.pt2.json"]


@pytest.mark.parametrize("sig", ["INT", pytest.param("TERM", marks=pytest.mark.slow),
                                 pytest.param("HUP", marks=pytest.mark.slow)])  # (one code path: exit_on_interrupt)
def test_ctrl_c_during_export_is_one_line_and_keeps_the_earlier_files(trained_run, tmp_path, sig):
    """Interrupted with the new program written to its temporary file (Ctrl-C, a scheduler's SIGTERM, the
    terminal closed): the earlier export and its sidecar stay as they were, no temporary is left; with no
    earlier export, no file at all."""
    out = tmp_path / "net.pt2"
    stopped_by_ctrl_c(["export", str(trained_run), f"out={out}", "merge=chain"], tmp_path, "export_write", sig)
    assert list(tmp_path.iterdir()) == []
    out.write_bytes(b"old model")
    (tmp_path / "net.pt2.json").write_text("{}")
    before = snapshot(tmp_path)
    stopped_by_ctrl_c(["export", str(trained_run), f"out={out}", "merge=chain"], tmp_path, "export_write", sig)
    unchanged(before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.pt2", "net.pt2.json"]
