"""The controls of TDLRT's margin through the real CLI: gradual pruning without the integrator
(method=tucker_prune), fixed-rank Tucker at another run's ranks (method.ranks_from) and the one-shot compression
of a trained network (init_from with a fixed-rank method); the changed defaults (old runs resume as they were)."""
import json

import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf

from conftest import TINY, run_tdlrt, same_final_weights, straight_and_resumed
from reference import tt_reference
from tdlrt_cli.lowrank.tucker import hosvd, reconstruct


def summary(run):
    return json.loads((run / "summary.json").read_text())


def one_line_error(proc, says):
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "warning" not in line]
    assert len(lines) == 1 and says in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("dense")
    run_tdlrt(["train", *TINY, "method=dense", "cost_report=false", f"hydra.run.dir={base}/run"], cwd=base)
    return base / "run"


def test_cli_decomposing_a_trained_network_keeps_its_kernels(tmp_path, dense_run):
    """method=tucker init_from=<dense checkpoint> starts from the truncated HOSVD of the trained kernels: at full
    rank the starting network is the dense network (same test accuracy), never a random one."""
    ckpt = dense_run / "checkpoints" / "last.pt"
    run_tdlrt(["train", *TINY, "method=tucker", "method.target_cr=null", "method.rank_frac=1", f"init_from={ckpt}",
               "epochs=1", "cost_report=false", f"hydra.run.dir={tmp_path}/full"], cwd=tmp_path)
    s = summary(tmp_path / "full")
    dense_acc = summary(dense_run)["test_acc_final"]  # init_from= its last.pt
    assert s["test_acc_at_start"] == pytest.approx(dense_acc, abs=1e-6)
    assert s["sources"]["init_from"]["config"]["method"]["name"] == "dense"
    assert "has test acc" in (tmp_path / "full" / "train.log").read_text()
    # with a target: ranks by the global allocation, landing on the compression asked for
    proc = run_tdlrt(["train", *TINY, "method=tucker", "method.target_cr=80", f"init_from={ckpt}", "epochs=1",
                      "cost_report=false", f"hydra.run.dir={tmp_path}/cr80"], cwd=tmp_path)
    s80 = summary(tmp_path / "cr80")
    assert 80 <= s80["compression_rate"] <= 81
    assert "(decomposed)" in proc.stderr + (tmp_path / "cr80" / "train.log").read_text()
    # eval and export rebuild the network at the checkpoint's ranks, without the dense checkpoint
    ckpt.rename(ckpt.with_suffix(".moved"))
    try:
        out = run_tdlrt(["eval", str(tmp_path / "cr80")], cwd=tmp_path)
        assert "test accuracy" in out.stdout + out.stderr
    finally:
        ckpt.with_suffix(".moved").rename(ckpt)


def test_cli_a_checkpoint_holding_nan_is_refused_before_anything_is_decomposed(tmp_path, dense_run):
    state = torch.load(dense_run / "checkpoints" / "last.pt", weights_only=True)
    key = next(k for k in state["model"] if k.endswith("7.weight"))
    state["model"][key].view(-1)[0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    for method in ("tucker", "tucker_prune"):
        proc = run_tdlrt(["train", *TINY, f"method={method}", f"init_from={tmp_path}/nan.pt",
                          f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path, check=False)
        one_line_error(proc, f"{key} holds NaN or Inf")
        assert not (tmp_path / "run").exists()


def test_cli_cp_cannot_be_decomposed_from_a_trained_network(tmp_path, dense_run):
    proc = run_tdlrt(["train", *TINY, "method=cp", f"init_from={dense_run}/checkpoints/last.pt",
                      f"hydra.run.dir={tmp_path}/cp"], cwd=tmp_path, check=False)
    one_line_error(proc, "a CP decomposition has no closed form")
    assert not (tmp_path / "cp").exists()


@pytest.mark.slow
def test_cli_tt_and_matrix_decompose_a_trained_network(tmp_path, dense_run):
    ckpt = dense_run / "checkpoints" / "last.pt"
    for method in ("tt", "matrix"):
        run_tdlrt(["train", *TINY, f"method={method}", "method.target_cr=80", f"init_from={ckpt}", "epochs=1",
                   "cost_report=false", f"hydra.run.dir={tmp_path}/{method}"], cwd=tmp_path)
        s = summary(tmp_path / method)
        assert s["test_acc_at_start"] is not None and 80 <= s["compression_rate"] <= 82, method


@pytest.mark.parametrize("method", ["tucker", "tt", "matrix"])
def test_init_from_decomposes_the_loaded_kernels(dense_run, method):
    """What a fixed-rank run starts from with init_from: the decomposition of each loaded dense kernel
    (float64 references: truncated HOSVD, TT-SVD, best rank-r matrix), never a random factorisation."""
    from tdlrt_cli.checkpoint import load_dense_weights
    from tdlrt_cli.config import TrainConfig
    from tdlrt_cli.methods import factorise
    from tdlrt_cli.models import build_model

    cfg = TrainConfig()
    cfg.model.name, cfg.model.width_mult = "vgg16", 0.125
    cfg.method.name, cfg.method.target_cr, cfg.init_from = method, 80.0, str(dense_run / "checkpoints" / "last.pt")
    model = build_model("vgg16", 3, 10, 32, 0.125)
    load_dense_weights(model, cfg.init_from)
    dense = {n: m.weight.detach().double().clone() for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    factorise(cfg, model, torch.Generator().manual_seed(0))
    checked = 0
    for name, layer in model.named_modules():
        if not hasattr(layer, "dense_num_params") or name not in dense:
            continue
        w, got = dense[name], layer.weight_full().detach().double()
        if method == "tucker":
            core, factors = hosvd(w, [layer.ranks[0], layer.ranks[1], None, None])
            want = reconstruct(core, factors)
        elif method == "tt":
            want = tt_reference(w, layer.ranks[0])
        else:
            u, s_, vh = torch.linalg.svd(w.reshape(w.shape[0], -1), full_matrices=False)
            r = layer.ranks[0]
            want = ((u[:, :r] * s_[:r]) @ vh[:r]).reshape(w.shape)
        assert torch.allclose(got, want, atol=1e-5 * float(w.abs().max())), name
        checked += 1
    assert checked == len(dense) - 1  # every conv but the first


def test_cli_tucker_at_another_runs_ranks(tmp_path):
    run_tdlrt(["train", *TINY, "method=tdlrt", "method.target_cr=85", "method.augment_every=2", "cost_report=false",
               f"hydra.run.dir={tmp_path}/src"], cwd=tmp_path)
    run_tdlrt(["train", *TINY, "method=tucker", f"method.ranks_from={tmp_path}/src", "epochs=1", "cost_report=false",
               f"hydra.run.dir={tmp_path}/alloc"], cwd=tmp_path)
    src, alloc = summary(tmp_path / "src"), summary(tmp_path / "alloc")
    assert {k: v[:2] for k, v in alloc["ranks"].items()} == {k: v[:2] for k, v in src["ranks"].items()}
    assert alloc["conv_params"] == src["conv_params"]
    assert alloc["sources"]["method.ranks_from"]["config"]["method"]["target_cr"] == 85
    assert alloc["config"]["method"]["ranks_from"] == f"{tmp_path}/src"
    # killed, then resumed after the source moved away: the ranks come from the checkpoint
    killed = run_tdlrt(["train", *TINY, "method=tucker", f"method.ranks_from={tmp_path}/src", "epochs=2",
                        "cost_report=false", "checkpoint.every_n_steps=2", f"hydra.run.dir={tmp_path}/alloc2"],
                       cwd=tmp_path, env={"TDLRT_FAULT_KILL_AT_STEP": "3"}, check=False)
    assert killed.returncode == 137
    (tmp_path / "src").rename(tmp_path / "src_moved")
    run_tdlrt(["train", f"resume={tmp_path}/alloc2"], cwd=tmp_path)
    assert summary(tmp_path / "alloc2")["sources"]["method.ranks_from"]["config"]["method"]["target_cr"] == 85
    (tmp_path / "src_moved").rename(tmp_path / "src")
    refusals = [
        (["model.width_mult=0.25"], "is a run of model=vgg16 (width 0.125)"),
        ([f"method.ranks_from={tmp_path}/nothing"], "no summary.json there"),
        (["method.target_cr=95"], "method.target_cr=95 is not used with method.ranks_from"),
        (["method.target_cr=null", "method.rank_frac=0.5"], "cannot be combined with method.ranks_from"),
    ]
    for extra, says in refusals:
        proc = run_tdlrt(["train", *TINY, "method=tucker", f"method.ranks_from={tmp_path}/src", *extra,
                          f"hydra.run.dir={tmp_path}/refused"], cwd=tmp_path, check=False)
        one_line_error(proc, says)
        assert not (tmp_path / "refused").exists()


PRUNE = ["train", *TINY, "method=tucker_prune", "method.target_cr=85", "method.augment_every=2", "epochs=3",
         "deterministic=true", "cost_report=false", "checkpoint.every_n_steps=3"]


def test_cli_gradual_pruning_lands_on_the_target_and_resumes_bitwise_after_a_kill(tmp_path):
    straight, run = straight_and_resumed(PRUNE, tmp_path, kill_at=4)
    same_final_weights(straight, run)
    s = summary(straight)
    assert 85 <= s["compression_rate"] <= 86
    assert (straight / "ranks_steps.csv").is_file()
    best = torch.load(straight / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)
    assert {k: list(v) for k, v in best["best"]["ranks"].items()} == s["ranks"]  # best.pt at the final ranks
    run_tdlrt(["eval", str(straight)], cwd=tmp_path)
    run_tdlrt(["export", str(straight)], cwd=tmp_path)


def test_cli_gradual_pruning_refuses_what_it_would_ignore(tmp_path):
    for extra, says in [(["method.target_cr=null"], "method.target_cr=None must be in (0, 100)"),
                        (["tau=0.1"], "tau=0.1 applies to method=tdlrt or dlrt only"),
                        (["+method.finetune_epochs=2"], "method=tucker_prune does not use method.finetune_epochs")]:
        proc = run_tdlrt(["train", *TINY, "method=tucker_prune", *extra, f"hydra.run.dir={tmp_path}/r"], cwd=tmp_path,
                         check=False)
        one_line_error(proc, says)


def test_cli_runs_made_before_the_defaults_changed_resume_as_they_were(tmp_path):
    """A run whose command did not name the keys whose defaults changed (lr warm-up, the target rule's caps,
    start and ramp) resumes with its saved values, not the new defaults."""
    old = ["scheduler.warmup_epochs=0", "method.r_max_frac=0.5", "method.ramp_end=0.5"]
    args = ["train", *TINY, "method=tdlrt", "method.target_cr=85", "epochs=3", "cost_report=false",
            "checkpoint.every_n_steps=3"]
    killed = run_tdlrt(args + old + [f"hydra.run.dir={tmp_path}/run"], tmp_path,
                       env={"TDLRT_FAULT_KILL_AT_STEP": "4"}, check=False)
    assert killed.returncode == 137
    overrides = tmp_path / "run" / ".hydra" / "overrides.yaml"  # as an older tdlrt wrote it: defaults not named
    OmegaConf.save([o for o in OmegaConf.load(overrides) if o not in old], overrides)
    run_tdlrt(["train", f"resume={tmp_path}/run"], tmp_path)
    s = summary(tmp_path / "run")
    assert s["config"]["scheduler"]["warmup_epochs"] == 0
    assert s["config"]["method"]["r_max_frac"] == 0.5 and s["config"]["method"]["ramp_end"] == 0.5
    fresh = run_tdlrt(["train", *TINY, "method=tdlrt", "method.target_cr=85", "--cfg", "job"], tmp_path)
    cfg = OmegaConf.create(fresh.stdout)
    assert cfg.scheduler.warmup_epochs == 1 and cfg.method.ramp_end == 0.75 and cfg.method.r_max_frac is None


@pytest.mark.slow
def test_report_groups_runs_started_from_the_seeds_of_one_setting(tmp_path):
    for seed in (0, 1):
        run_tdlrt(["train", *TINY, "epochs=1", "method=tdlrt", "method.target_cr=85", "cost_report=false",
                   f"seed={seed}", f"hydra.run.dir={tmp_path}/src{seed}"], cwd=tmp_path)
        run_tdlrt(["train", *TINY, "epochs=1", "method=tucker", f"method.ranks_from={tmp_path}/src{seed}",
                   "cost_report=false", f"seed={seed}", f"hydra.run.dir={tmp_path}/runs/alloc{seed}"], cwd=tmp_path)
    run_tdlrt(["report", str(tmp_path / "runs"), f"out={tmp_path}/report"], cwd=tmp_path)
    rows = [line for line in (tmp_path / "report" / "table.md").read_text().splitlines() if "ranks of another run" in line]
    assert len(rows) == 1 and "| 2 |" in rows[0], rows  # the two seeds' runs in one row


@pytest.mark.slow
def test_cli_gradual_pruning_from_a_trained_network(tmp_path, dense_run):
    """tucker_prune with init_from starts from the truncated HOSVD at its starting ranks, then prunes."""
    run_tdlrt(["train", *TINY, "method=tucker_prune", "method.target_cr=85", f"init_from={dense_run}/checkpoints/last.pt",
               "epochs=1", "cost_report=false", f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path)
    s = summary(tmp_path / "run")
    assert s["test_acc_at_start"] is not None and 85 <= s["compression_rate"] <= 86


def test_cli_a_sweep_made_before_the_defaults_changed_extends_as_it_was(tmp_path):
    """A sweep run again over folders of runs made with the old defaults (not named on its command) continues
    them with their saved values: the check before Hydra and each job agree."""
    sweep = ["train", "-m", *TINY, "method=tdlrt", "method.target_cr=85", "seed=0,1", "cost_report=false",
             f"hydra.sweep.dir={tmp_path}/sweep"]
    old = ["scheduler.warmup_epochs=0", "method.r_max_frac=0.5", "method.ramp_end=0.5"]
    run_tdlrt(sweep + old + ["epochs=1"], tmp_path)
    proc = run_tdlrt(sweep + ["epochs=2"], tmp_path)
    for job in (tmp_path / "sweep").glob("[0-9]*"):
        s = summary(job)
        assert s["epochs"] == 2 and s["config"]["scheduler"]["warmup_epochs"] == 0, proc.stderr
        assert s["config"]["method"]["r_max_frac"] == 0.5 and s["config"]["method"]["ramp_end"] == 0.5
