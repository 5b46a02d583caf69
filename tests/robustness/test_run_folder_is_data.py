"""A run folder is data, never code: resuming, evaluating or reporting a folder someone handed over never runs
what its files name, never writes outside the folder it was asked to write into or over a run's own files, and
every numeric key has a finite range checked before a folder is made. Each case plants one payload or bad value
and checks that it is refused in one line (exit 2) with nothing run and nothing the run wrote touched."""
import json
import os
import shutil

import pytest
import torch

from conftest import TINY, make, one_line, run_tdlrt
from tdlrt_cli.bench import BenchConfig
from tdlrt_cli.config import ConfigError, from_dictconfig
from tdlrt_cli.data import DeviceLoader, ImageTensors, seed64
from tdlrt_cli.lowrank.convert import RankPolicy

BASE = [a for a in TINY if not a.startswith("epochs")] + ["epochs=1", "method=dense", "cost_report=false"]


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.is_symlink() and p.name != ".lock"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One finished one-epoch run (dense, tiny), copied by each test before it plants anything."""
    base = tmp_path_factory.mktemp("trained")
    run_tdlrt(["train", *BASE, f"hydra.run.dir={base / 'run'}"], base)
    return base / "run"


@pytest.fixture
def run(trained, tmp_path):
    dest = tmp_path / "run"
    shutil.copytree(trained, dest, symlinks=True)
    (dest / ".lock").unlink(missing_ok=True)
    return dest


def append_overrides(run, *lines):
    path = run / ".hydra" / "overrides.yaml"
    path.write_text(path.read_text() + "".join(f"- {json.dumps(line)}\n" for line in lines))


# ------------------------------------------------------------------ code named by a run folder's files

def test_a_hydra_callback_planted_in_overrides_yaml_is_refused_and_never_runs(run, tmp_path):
    sentinel = tmp_path / "pwned"
    append_overrides(run, "+hydra.callbacks.evil._target_=builtins.open", f"+hydra.callbacks.evil._args_=[{sentinel},w]")
    before = snapshot(run)
    for how in ([f"resume={run}"], [*BASE, f"hydra.run.dir={run}"]):  # a resume, and the auto-resume of a requeue
        proc = run_tdlrt(["train", *how, "epochs=2"], tmp_path, check=False)
        one_line(proc, "overrides.yaml", "hydra.callbacks", "not a tdlrt setting", "nothing it names was run")
        assert not sentinel.exists()
    assert snapshot(run) == before


@pytest.mark.parametrize("line, says", [
    ("method=../../../evil", "names no method preset of tdlrt"),
    ("task_name=${oc.env:HOME}", "an interpolation"),
    ("+model._target_=builtins.open", "not a tdlrt setting"),
    ("hydra.job.env_set.PYTHONPATH=/tmp", "not a tdlrt setting"),
    ("+not_a_key=1", "not a tdlrt setting"),
], ids=["group-path", "interpolation", "target", "hydra-env", "unknown-key"])
def test_other_payloads_in_overrides_yaml_are_refused(run, tmp_path, line, says):
    (tmp_path / "evil.yaml").write_text(f"# @package _global_\nhydra:\n  callbacks:\n    evil:\n      _target_: "
                                        f"builtins.open\n      _args_: [{tmp_path / 'pwned'}, w]\n")
    append_overrides(run, line)
    before = snapshot(run)
    one_line(run_tdlrt(["train", f"resume={run}", "epochs=2"], tmp_path, check=False), "overrides.yaml", says)
    assert snapshot(run) == before and not (tmp_path / "pwned").exists()


def test_an_interpolation_in_a_checkpoints_config_is_refused(run, tmp_path):
    last = run / "checkpoints" / "last.pt"
    state = torch.load(last, map_location="cpu", weights_only=True)
    state["config"]["task_name"] = "${oc.env:HOME}"
    torch.save(state, last)
    before = snapshot(run)
    one_line(run_tdlrt(["train", f"resume={run}", "epochs=2"], tmp_path, check=False), "last.pt", "interpolation")
    one_line(run_tdlrt(["eval", str(run), "checkpoint=last"], tmp_path, check=False), "last.pt", "interpolation")
    assert snapshot(run) == before


# ------------------------------------------------------------------ writes outside the folder, or over a run's files

@pytest.mark.parametrize("target", ["checkpoints/last.pt", "summary.json", "metrics.csv"])
def test_eval_out_may_not_name_a_file_of_the_run(run, tmp_path, target):
    before = snapshot(run)
    one_line(run_tdlrt(["eval", str(run), f"out={run / target}"], tmp_path, check=False), "is a file of the run")
    (tmp_path / "link.json").symlink_to(run / target)  # ... nor through a link
    one_line(run_tdlrt(["eval", str(run), f"out={tmp_path / 'link.json'}"], tmp_path, check=False),
             "is a file of the run")
    assert snapshot(run) == before


@pytest.mark.parametrize("name", ["train.log", "tensorboard"])
def test_a_symlink_in_a_run_folder_is_not_followed_for_writing(run, tmp_path, name):
    outside = tmp_path / "outside"
    shutil.move(str(run / name), str(outside))
    (run / name).symlink_to(outside, target_is_directory=outside.is_dir())
    before = snapshot(outside) if outside.is_dir() else outside.read_bytes()
    one_line(run_tdlrt(["train", f"resume={run}", "epochs=2"], tmp_path, check=False), name, "symbolic link")
    assert (snapshot(outside) if outside.is_dir() else outside.read_bytes()) == before


def test_a_folder_or_binary_file_in_place_of_metrics_csv_is_one_line(run, tmp_path):
    (run / "metrics.csv").unlink()
    (run / "metrics.csv").mkdir()
    one_line(run_tdlrt(["train", f"resume={run}", "epochs=2"], tmp_path, check=False), "metrics.csv", "not a file")
    (run / "metrics.csv").rmdir()
    (run / "metrics.csv").write_bytes(b"epoch,\x00\xff\xfe\x00garbage\n")
    one_line(run_tdlrt(["train", f"resume={run}", "epochs=2"], tmp_path, check=False), "metrics.csv",
             "not a CSV file written by tdlrt")


def test_a_hand_edited_csv_header_loses_no_column_on_resume(run, tmp_path):
    path = run / "metrics.csv"
    path.write_text(path.read_text().replace("test_acc", "test_accuracy", 1))
    run_tdlrt(["train", f"resume={run}", "epochs=2"], tmp_path)
    header, *rows = [line.split(",") for line in path.read_text().splitlines()]
    assert "test_accuracy" in header and "test_acc" in header and len(rows) == 2
    assert rows[-1][header.index("test_acc")] != "" and rows[0][header.index("test_accuracy")] != ""


@pytest.mark.parametrize("name", ["../../escaped", "$\\frac{a}{$", "a/b/c"])
def test_report_file_names_come_from_the_project_not_the_data(run, tmp_path, name):
    summary = json.loads((run / "summary.json").read_text())
    summary["config"]["model"]["name"] = name
    (run / "summary.json").write_text(json.dumps(summary))
    out = tmp_path / "deep" / "report"
    proc = run_tdlrt(["report", str(run), f"out={out}"], tmp_path, check=False)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    written = [p for p in tmp_path.rglob("*") if p.is_file() and run not in p.parents and p != run]
    assert written and all(out in p.parents for p in written), written
    assert all(p.parent == out and not p.name.startswith(".") for p in written)


def test_a_deeply_nested_summary_is_listed_as_damaged_not_a_traceback(run, tmp_path):
    (run / "summary.json").write_text('{"config": ' + "[" * 100_000 + "]" * 100_000 + "}")
    proc = run_tdlrt(["report", str(run), f"out={tmp_path / 'report'}"], tmp_path, check=False)
    assert "Traceback" not in proc.stderr and "damaged" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("band", ["1e-320", "inf", "0"])
def test_report_band_out_of_range_is_one_line(run, tmp_path, band):
    one_line(run_tdlrt(["report", str(run), f"band={band}", f"out={tmp_path / 'r'}"], tmp_path, check=False),
             f"band={band} must be a number of percentage points in [0.01, 100]")
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------ numbers: finite, in range, before any folder

@pytest.mark.parametrize("overrides, says", [
    (["model.width_mult=inf"], "model.width_mult=inf must be a finite number"),
    (["method.tau_warmup_epochs=inf"], "method.tau_warmup_epochs=inf must be a finite number"),
    (["lr=inf"], "lr=inf must be a finite number"),
    (["lr=1e308"], "lr=1e+308 is larger than tdlrt takes"),
    (["weight_decay=inf"], "weight_decay=inf must be a finite number"),
    (["method.init_decay=inf"], "method.init_decay=inf must be a finite number"),
    (["data=synthetic", "data.image_size=-4"], "data.image_size=-4 must be >= 1"),
    (["threads=1000000000000"], "threads=1000000000000 is larger than tdlrt takes"),
    (["optimizer=adam", "optimizer.eps=inf"], "optimizer.eps=inf must be a finite number"),
    (["scheduler.warmup_epochs=1000000000000000000000"], "scheduler.warmup_epochs=1000000000000000000000 is larger"),
    (["epochs=10", "scheduler.warmup_epochs=11"], "scheduler.warmup_epochs=11 is longer than the run (epochs=10)"),
    (["batch_size=1000000000"], "batch_size=1000000000 is larger than tdlrt takes"),
    (["data=synthetic", "data.train_size=10000000000"], "data.train_size=10000000000 is larger"),
    (["method=tdlrt_target", "method.ramp_end=nan"], "method.ramp_end=nan must be a finite number"),
    (["+data.mean=[0.5,inf,0.5]"], "data.mean=[0.5, inf, 0.5] must be a finite number"),
], ids=lambda v: v[-1] if isinstance(v, list) else None)
def test_every_number_is_finite_and_in_range(overrides, says):
    with pytest.raises(ConfigError) as exc:
        from_dictconfig(make(overrides))
    assert says in str(exc.value)


def test_the_data_pipeline_takes_any_63_bit_seed_and_keeps_the_batches_of_small_seeds():
    data = ImageTensors(torch.randint(0, 255, (8, 3, 8, 8), dtype=torch.uint8), torch.arange(8))
    for seed in (20251204, 2 ** 63 - 1):
        x, _ = next(iter(DeviceLoader(data, 4, torch.device("cpu"), [0.5] * 3, [0.5] * 3, True, True, seed=seed)))
        assert x.shape == (4, 3, 8, 8)
    assert seed64(12345) == 12345 and seed64(2 ** 64 + 7) == 7


def test_a_rank_cap_that_falls_to_zero_is_refused():
    with pytest.raises(ValueError, match=r"r_max_frac=1e-09 caps a mode of size 16 at rank 0, below r_min=2"):
        RankPolicy(r_max_frac=1e-9).layout((16, 16, 3, 3))
    assert RankPolicy(r_max_frac=0.5).layout((3, 16, 3, 3))[1][0] == (1, 1)  # a tiny mode stays as it was


def test_cli_tiny_rank_caps_and_a_network_without_a_low_rank_layer_are_one_line(tmp_path):
    one_line(run_tdlrt(["train", *TINY, "method=tdlrt", "method.r_max_frac=1e-9"], tmp_path, check=False),
             "r_max_frac=1e-09 caps a mode")
    one_line(run_tdlrt(["train", *TINY, "method=tdlrt", "model.width_mult=0.001"], tmp_path, check=False),
             "no layer of vgg16 at model.width_mult=0.001 can be factorised")
    assert not (tmp_path / "outputs").exists()


def test_resume_and_ckpt_path_together_are_refused(run, tmp_path):
    other = tmp_path / "other.pt"
    shutil.copy(run / "checkpoints" / "last.pt", other)
    one_line(run_tdlrt(["train", f"resume={run}", f"ckpt_path={other}", "epochs=2"], tmp_path, check=False),
             "give one")


def test_a_finite_lr_too_large_to_decompose_stops_in_one_line(tmp_path):
    """lr=1e6 keeps the loss finite at step 1 and makes the cores too large for the eigendecomposition of the
    truncation: the run stops like at a NaN loss, not with a linear-algebra traceback."""
    proc = run_tdlrt(["train", *TINY, "method=tdlrt", "lr=1e6", "cost_report=false"], tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("tdlrt: error: ")


def test_bench_refuses_an_augmentation_clock_it_could_not_finish():
    with pytest.raises(ConfigError, match=r"augment_every=\[1000000000000000000000000\] must all be <= 10000"):
        BenchConfig(augment_every=[10 ** 24]).validate()
    with pytest.raises(ConfigError, match="steps=10000000 is larger"):
        BenchConfig(steps=10 ** 7).validate()



def test_a_sweep_the_scheduler_refuses_is_one_line_and_leaves_no_folder(tmp_path):
    """A stand-in ``sbatch`` that refuses the submission as SLURM does (exit 1, the reason on stderr)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in {"sbatch": 'echo "sbatch: error: Batch job submission failed: Invalid partition name specified" >&2\n'
                                 "exit 1\n", "srun": "exit 0\n"}.items():
        (bin_dir / name).write_text("#!/bin/sh\n" + body)
        (bin_dir / name).chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    proc = run_tdlrt(["train", "-m", "hydra/launcher=slurm", *BASE, "seed=0,1"], work, check=False,
                     env={"PATH": f"{bin_dir}:{os.environ['PATH']}"})
    one_line(proc, "the scheduler refused the sweep", "Invalid partition name specified")
    assert list(work.iterdir()) == []


@pytest.fixture(scope="module")
def onnx_export(trained, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    out = tmp_path_factory.mktemp("onnx") / "m.onnx"
    run_tdlrt(["export", str(trained), f"out={out}", "format=onnx"], out.parent)
    return out


@pytest.mark.parametrize("edit, says", [
    ({"classes": 1e30}, "input shape and classes [3, 1e+30, 32] are not (channels, classes, image size)"),
    ({"input": {"shape": ["N", 3, 32, 10 ** 20]}}, "input shape and classes [3, 10, None] are not"),
    ({"input": {"shape": ["N", 3, 10 ** 20, 10 ** 20]}}, "are not (channels, classes, image size)"),
    ({"input": 5}, "input shape and classes None are not"),  # no input spec, and no data_shape either
    ({"input": None, "data_shape": [3, 10, 1e30]}, "[3, 10, 1e+30] are not"),  # an older export's sidecar
    ({"config": None}, "holds no run configuration"),
])
def test_an_edited_onnx_sidecar_is_one_line(onnx_export, tmp_path, edit, says):
    out, sidecar = tmp_path / "m.onnx", tmp_path / "m.onnx.json"
    shutil.copy(onnx_export, out)
    shutil.copy(str(onnx_export) + ".json", sidecar)
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), **edit}))
    one_line(run_tdlrt(["eval", str(out), "latency=false"], tmp_path, check=False), "m.onnx.json", says)


def test_an_older_onnx_sidecar_with_data_shape_still_evaluates(onnx_export, tmp_path):
    """Exports before the input spec recorded (channels, classes, image size) as data_shape."""
    out, sidecar = tmp_path / "m.onnx", tmp_path / "m.onnx.json"
    shutil.copy(onnx_export, out)
    meta = json.loads(open(str(onnx_export) + ".json").read())
    c, k, size = meta["input"]["shape"][1], meta["classes"], meta["input"]["shape"][2]
    for key in ("input", "output", "classes", "class_names", "checkpoint"):
        meta.pop(key)
    sidecar.write_text(json.dumps({**meta, "data_shape": [c, k, size]}))
    proc = run_tdlrt(["eval", str(out), "latency=false"], tmp_path)
    assert "test accuracy" in proc.stdout and "network: exported\n" in proc.stdout + "\n", proc.stdout


def test_running_out_of_memory_is_one_line_and_leaves_no_folder(tmp_path):
    """The allocator's own error (a 4 EiB request at step 2, before any checkpoint)."""
    proc = run_tdlrt(["train", *BASE, "hydra.run.dir=oom"], tmp_path, env={"TDLRT_FAULT_OOM_AT_STEP": "2"},
                     check=False)
    last = proc.stderr.strip().splitlines()[-1]  # after the start block: the network was built
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert last.startswith("tdlrt: error: out of memory (") and "can't allocate memory" in last, last
    assert "lower batch_size" in last and not (tmp_path / "oom").exists()


def test_a_resume_that_changes_the_method_names_the_method_first(run, tmp_path):
    line = one_line(run_tdlrt(["train", f"resume={run}", "method=tdlrt"], tmp_path, check=False))
    assert 'would change what is trained: method.name "dense" -> "tdlrt", ' in line, line


def test_a_checkpoint_copied_out_of_its_folder_resumes_with_its_own_settings(run, tmp_path):
    """Without its run folder the checkpoint's own configuration is rebuilt (not the defaults: `lenet5 ->
    vgg16`); a setting the command changes is still refused."""
    loose = tmp_path / "elsewhere" / "last.pt"
    loose.parent.mkdir()
    shutil.copy(run / "checkpoints" / "last.pt", loose)
    one_line(run_tdlrt(["train", f"ckpt_path={loose}", "epochs=2", "lr=0.5"], tmp_path, check=False),
             "would change what is trained: lr 0.05 -> 0.5")
    proc = run_tdlrt(["train", f"ckpt_path={loose}", "epochs=2", "hydra.run.dir=continued"], tmp_path)
    assert "note:" not in proc.stderr
    summary = json.loads((tmp_path / "continued" / "summary.json").read_text())
    assert summary["epochs"] == 2
    assert "resuming" in (tmp_path / "continued" / "train.log").read_text().splitlines()[0]
