import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Under pytest-xdist every worker gets one core: one thread per process avoids oversubscribing them.
PARALLEL = "PYTEST_XDIST_WORKER" in os.environ
if PARALLEL:
    import torch

    torch.set_num_threads(1)

# A tiny, fast configuration for CLI runs: VGG16 at 1/8 width on synthetic 32x32 images.
TINY = ["model=vgg16", "model.width_mult=0.125", "data=synthetic", "data.train_size=256", "data.test_size=128",
        "batch_size=64", "eval_batch_size=128", "epochs=2", "progress=false", "device=cpu", "cost_repeat=2"]


def default_signals():
    """In the child: SIGHUP and SIGINT as a terminal's command has them, also when the tests run under nohup or
    in a shell's background job (which ignore them, and tdlrt keeps a signal it was started to ignore ignored)."""
    import signal

    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def run_tdlrt(args, cwd, env=None, check=True, timeout=600):
    """Run the real console entry point in a subprocess; returns CompletedProcess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"OMP_NUM_THREADS": "1"} if PARALLEL else {}), **(env or {})}
    full_env.pop("TDLRT_DEBUG", None)
    exe = Path(sys.executable).parent / "tdlrt"
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "tdlrt_cli"]
    proc = subprocess.run([*cmd, *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout, preexec_fn=default_signals)
    if check and proc.returncode != 0:
        raise AssertionError(f"tdlrt {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def run_dirs(base: Path):
    """Run folders (those holding a .hydra folder) under base, oldest first."""
    return sorted((p.parent for p in base.rglob(".hydra")), key=lambda p: str(p))


def straight_and_resumed(args, base: Path, kill_at: int):
    """``tdlrt train args`` straight through in base/a, and in base/b killed (SIGKILL) at step ``kill_at`` and
    then resumed: the two run folders."""
    (base / "a").mkdir()
    (base / "b").mkdir()
    run_tdlrt(args, base / "a")
    (straight,) = run_dirs(base / "a" / "outputs")
    killed = run_tdlrt(args, base / "b", env={"TDLRT_FAULT_KILL_AT_STEP": str(kill_at)}, check=False)
    assert killed.returncode == 137, killed.stderr[-2000:]
    (resumed,) = run_dirs(base / "b" / "outputs")
    run_tdlrt(args + [f"resume={resumed}"], base / "b")
    return straight, resumed


def same_final_weights(a: Path, b: Path) -> dict:
    """The two runs' last.pt hold bit-identical weights; returns the first's state."""
    import torch

    sa, sb = (torch.load(r / "checkpoints" / "last.pt", weights_only=True) for r in (a, b))
    for key, value in sa["model"].items():
        assert torch.equal(value, sb["model"][key]), key
    assert sa["global_step"] == sb["global_step"] and sa.get("ranks") == sb.get("ranks")
    return sa


def torchrun(args, cwd, env=None):
    """``tdlrt train args`` under torchrun: two processes (gloo on the CPU); returns CompletedProcess."""
    exe = Path(sys.executable).parent / "torchrun"
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "torch.distributed.run"]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([*cmd, "--standalone", "--nproc_per_node=2", "-m", "tdlrt_cli", "train", *args],
                          cwd=cwd, env=full_env, capture_output=True, text=True, timeout=600)


def make(overrides=()):
    """The train config composed by Hydra's compose API from configs/ with ``overrides`` (not validated)."""
    from hydra import compose, initialize_config_dir

    from tdlrt_cli.config import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


# ----------------------------------------------------------------------------- one error line, nothing touched

def one_line(proc, *needles):
    """A finished ``run_tdlrt(..., check=False)``: exit 2, one `tdlrt: error:` line holding every needle."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("tdlrt: error: "), proc.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def snapshot(folder):
    """Every file under ``folder`` with a hash of its bytes."""
    return {p: hashlib.sha1(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


def unchanged(before):
    for path, digest in before.items():
        assert path.is_file(), f"{path} was deleted"
        assert hashlib.sha1(path.read_bytes()).hexdigest() == digest, f"{path} was changed"


def one_error_line(args, cwd, *needles):
    """Run ``tdlrt args``: exit 2, one `tdlrt: error:` line holding every needle, files before untouched."""
    before = snapshot(cwd)
    proc = run_tdlrt(args, cwd, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("tdlrt: error: "), proc.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    unchanged(before)
    assert not [p for p in cwd.rglob(".tmp-*")], "a temporary file was left behind"
    return lines[0]


def stopped_by_ctrl_c(args, cwd, point, sig="INT"):
    """Run ``tdlrt args`` with a Ctrl-C (SIGINT; or ``sig``) at ``point``: exit 128 + the signal, one
    `tdlrt: stopped:` line."""
    proc = run_tdlrt(args, cwd, env={"TDLRT_FAULT_SIGNAL_AT": point, "TDLRT_FAULT_SIGNAL": sig}, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == {"INT": 130, "TERM": 143, "HUP": 129}[sig], proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith(f"tdlrt: stopped: SIG{sig} during tdlrt {args[0]}"), proc.stderr[-2000:]
    return proc


def dead_pid():
    """The process id of a process that has ended (for the names of a killed process's temporaries)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture(scope="session")
def real_data():
    """A real MNIST copy in torchvision's layout (``MNIST/raw``) under ``$TDLRT_DATA`` or the project's
    ``data/`` folder, as `tdlrt train data=mnist` reads it; skipped where there is none (tests never download)."""
    root = Path(os.environ.get("TDLRT_DATA", ROOT / "data"))
    if not (root / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file() and \
            not (root / "MNIST" / "raw" / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"no MNIST copy in {root}/MNIST/raw (set TDLRT_DATA or put it in data/)")
    return root


# One trained run per test process (scope="session": under xdist, per worker) for the tests of export and eval,
# which only read it (they write into their own tmp_path).
@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A 1-epoch TDLRT run (tau 0.1) on TINY."""
    base = tmp_path_factory.mktemp("trained")
    run_tdlrt(["train", *[a for a in TINY if not a.startswith("epochs")], "epochs=1", "method=tdlrt", "tau=0.1"],
              base)
    (run,) = run_dirs(base / "outputs")
    return run


@pytest.fixture(scope="session")
def trained_run_with_linear(tmp_path_factory):
    """A 1-epoch TDLRT run on TINY whose linear layers are low-rank too (method.convert_linear=true)."""
    base = tmp_path_factory.mktemp("export")
    run_tdlrt(["train", *[a for a in TINY if not a.startswith("epochs")], "epochs=1", "method=tdlrt",
               "method.convert_linear=true"], base)
    (run,) = run_dirs(base / "outputs")
    return run


# ----------------------------------------------------------------------------- which tests run by default
# The default suite (`pytest`) stays under 8 minutes on 2 cores; `pytest -m slow` runs what it leaves out, and
# `pytest -m "slow or not slow"` everything. Measured with `pytest --durations=0`: the tests below are the slow
# ones whose behaviour another default test already covers (a kill at another instant, another signal, another
# refused value), or long end-to-end runs of the controls and the GPU check's dry run.
SLOW = {
    "test_compress.py::test_torchvision_weights_by_name",  # weights from $TORCH_HOME: test_train_torchvision
    "test_compress.py::test_a_state_dict_of_a_torchvision_network",
    "test_compress.py::test_a_compressed_run_is_not_a_source",
    "test_compress_stops.py::test_a_stopped_compression_says_so_in_one_line_and_the_same_command_continues",  # train's: test_faults  # its other refusals: test_bad_input_is_one_line
    "test_train_torchvision.py::test_export_and_eval_need_no_weights_file",  # rebuilt without weights: unit test
    "test_train_torchvision.py::test_convert_linear_puts_the_linear_layers_under_the_target",
    "test_gpu_check.py::test_json_holds_every_figure",        # the GPU check's dry run (run before a GPU session)
    "test_gpu_check.py::test_markdown_tables",
    "test_train_controls.py::test_cli_tucker_at_another_runs_ranks",
    "test_train_controls.py::test_cli_gradual_pruning_lands_on_the_target_and_resumes_bitwise_after_a_kill",
    "test_train_controls.py::test_cli_a_sweep_made_before_the_defaults_changed_extends_as_it_was",
    "test_run_identity.py::test_a_failed_sweep_job_does_not_stop_the_sweep_and_the_end_says_what_did_not_finish",
    "test_run_identity.py::test_a_full_disk_says_so_and_keeps_the_previous_checkpoint",
    "test_run_identity.py::test_a_full_disk_at_the_start_leaves_nothing_and_the_same_command_then_runs",
    "test_faults.py::test_the_same_job_started_again_continues_its_run",
    "test_export.py::test_export_and_eval_of_a_pruned_run",
    # measured at 8 min 43 s quiet with these in the default suite (commit 173d196); each has a default sibling:
    "test_faults.py::test_the_printed_resume_command_parses_for_a_folder_with_a_comma_a_space_and_a_non_ascii_letter",
    "test_train_controls.py::test_cli_runs_made_before_the_defaults_changed_resume_as_they_were",  # legacy upgrade: unit tests
    "test_train_launchers.py::test_local_parallel_sweep_runs_each_job_in_its_own_folder",  # the other launcher tests stay
    "test_train_experiments.py::test_tiny_imagenet_preset_on_class_folders",  # imagefolder: test_train_data_bad_input
    "test_faults.py::test_a_signal_the_run_was_started_to_ignore_stays_ignored",  # signals: the other test_faults
    "test_faults.py::test_two_runs_never_share_a_folder",  # the lock: test_run_identity's two-writer tests
    "test_eval.py::test_eval_takes_trains_name_for_the_repetitions",
    "test_export_bad_input.py::test_ctrl_c_during_export_is_one_line_and_keeps_the_earlier_files",  # train's: faults
    "test_eval.py::test_eval_reports_latency_median_and_iqr",
    "test_run_identity.py::test_a_resume_keeps_the_epochs_it_was_last_extended_to",
    "test_faults.py::test_a_run_killed_before_its_first_checkpoint_and_started_again_logs_each_row_once",
    "test_run_folder_is_data.py::test_a_checkpoint_copied_out_of_its_folder_resumes_with_its_own_settings",
}
# Parametrized CLI tests: their first N cases run by default, the others with -m slow.
FIRST_CASES = {
    "test_compress.py::test_bad_input_is_one_line": 3,
    "test_train_torchvision.py::test_bad_model_choices_are_one_line_and_write_nothing": 1,
    "test_torchvision_nets.py::test_a_network_is_fitted_to_the_datas_channels_and_classes": 2,
    "test_faults.py::test_keep_top_k_keeps_the_k_best_epochs_of_the_final_network": 1,
    "test_faults.py::test_the_run_folder_deleted_during_training_is_one_line": 1,
    "test_faults.py::test_killed_run_resumes_to_the_same_final_result_bitwise": 1,
    "test_faults.py::test_a_signal_finishes_the_step_writes_last_pt_and_the_printed_command_resumes_bitwise": 1,
    "test_faults.py::test_a_signal_outside_the_training_loop_is_one_line_and_the_run_resumes": 1,
    "test_export.py::test_export_runs_in_a_fresh_process_without_tdlrt": 1,
    "test_eval_bad_input.py::test_eval_refuses_an_export_with_pickled_entries_before_loading_it": 1,
    "test_train.py::test_resume_continues_at_the_right_epoch": 1,
    "test_run_identity.py::test_resume_restores_the_runs_own_config": 1,
    "test_train_bad_input.py::test_values_that_used_to_crash_or_train_garbage": 4,
    "test_train_bad_input.py::test_unknown_key_suggests_the_full_key": 3,
    "test_train_bad_input.py::test_percentage_where_a_fraction_belongs": 3,
    "test_train_bad_input.py::test_fraction_where_a_percentage_belongs": 1,
    "test_train_bad_input.py::test_validation_split_out_of_range": 2,
    "test_train_target_rule.py::test_cli_refuses_what_the_target_rule_would_ignore_in_one_line": 3,
    "test_run_identity.py::test_refused_input_aimed_at_a_run_folder_writes_nothing": 4,
    "test_run_identity.py::test_a_damaged_lock_is_one_line_saying_what_to_do_and_touches_nothing": 3,
    "test_run_identity.py::test_resume_that_changes_what_is_trained_is_refused_and_touches_nothing": 3,
    "test_run_identity.py::test_a_folder_name_too_long_is_one_line_before_anything_is_written": 2,
    "test_run_folder_is_data.py::test_an_edited_onnx_sidecar_is_one_line": 3,
    "test_run_folder_is_data.py::test_eval_out_may_not_name_a_file_of_the_run": 2,
    "test_run_folder_is_data.py::test_other_payloads_in_overrides_yaml_are_refused": 3,
    "test_train_data_bad_input.py::test_imagefolder_bad_input": 2,
    "test_bench_bad_input.py::test_bad_values_fail_with_one_line_naming_key_and_values": 3,
    "test_lowrank.py::test_bases_that_must_rotate_converge_with_momentum_as_fast_as_dense": 2,
}
# `pytest -m quick`: a first check in under 2 minutes: the algebra against its float64 references, the config
# schema, the import structure, and one run through the CLI with its files, export and eval.
QUICK = ("test_structure.py", "test_config.py", "test_truncation_fast.py", "test_data.py", "test_lowrank.py",
         "test_one_network.py", "test_train.py::test_train_writes_every_run_file",
         "test_train_bad_input.py::test_unknown_key_suggests_the_full_key",
         "test_train_data_bad_input.py::test_a_crafted_cifar_batch_stops_tdlrt_train_with_one_line")


def pytest_configure(config):
    config.addinivalue_line("markers", "quick: a first check in under 2 minutes (pytest -m quick)")


def pytest_collection_modifyitems(config, items):
    seen: dict = {}
    for item in items:
        name = item.path.name + "::" + item.nodeid.split("::", 1)[1]  # test_file.py::test_name[case]
        base = name.split("[", 1)[0]
        seen[base] = seen.get(base, 0) + 1
        if base in SLOW or base in FIRST_CASES and seen[base] > FIRST_CASES[base]:
            item.add_marker(pytest.mark.slow)
        if name.startswith(QUICK) and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.quick)
