"""The controls of TDLRT's margin: gradual pruning without the integrator (method=tucker_prune), fixed-rank
Tucker at another run's ranks (method.ranks_from) and the one-shot compression of a trained network
(init_from with a fixed-rank method); and the changed defaults (old runs resume as they were).

Mathematics against float64 references (truncated HOSVD, TT-SVD and SVD of the reconstructed kernels), then
behaviour through the real CLI.
"""
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf

from conftest import TINY, run_dirs, run_tdlrt
from tdlrt_cli.lowrank import BudgetSchedule, RankPolicy, convert_to_lowrank
from tdlrt_cli.lowrank.allocation import layer_params
from tdlrt_cli.lowrank.baselines import (FixedTuckerConv2d, MatrixFixedConv2d, TTConv2d, allocate_tucker_ranks)
from tdlrt_cli.lowrank.pruning import GradualPruning, TrainedTuckerConv2d, cut_to_budget
from tdlrt_cli.lowrank.tucker import hosvd, reconstruct

f64 = torch.float64


# --------------------------------------------------------------------------- gradual pruning: the cut

def drifted_layers(seed=0):
    """Two float64 trained-factor Tucker layers after some plain gradient steps (factors not orthonormal)."""
    g = torch.Generator().manual_seed(seed)
    layers = [TrainedTuckerConv2d(12, 16, 3, padding=1, ranks=[8, 6, None, None],
                                  rank_bounds=[(1, 16), (1, 12), (3, 3), (3, 3)], dtype=f64, generator=g),
              TrainedTuckerConv2d(16, 20, 3, padding=1, ranks=[10, 8, None, None],
                                  rank_bounds=[(2, 20), (2, 16), (3, 3), (3, 3)], dtype=f64, generator=g)]
    with torch.no_grad():
        for layer in layers:
            for p in (layer.core, layer.U0, layer.U1):
                p.add_(0.3 * torch.randn(p.shape, dtype=f64, generator=g))
    return layers


def test_trained_factors_are_parameters_the_optimizer_steps():
    layer = drifted_layers()[0]
    names = {n for n, _ in layer.named_parameters()}
    assert {"core", "U0", "U1", "bias"} <= names
    x = torch.randn(2, 12, 5, 5, dtype=f64)
    layer(x).pow(2).sum().backward()
    assert layer.U0.grad is not None and layer.U1.grad is not None and layer.core.grad is not None
    dense = F.conv2d(x, layer.weight_full().detach(), layer.bias, padding=1)
    assert torch.allclose(layer(x), dense, atol=1e-10)


@pytest.mark.parametrize("fraction", [0.3, 0.6, 2.0])
def test_cut_is_the_truncated_hosvd_of_the_kernel_at_the_allocated_ranks(fraction):
    layers = drifted_layers()
    before = [layer.weight_full().detach().clone() for layer in layers]
    ranks_before = [layer.ranks for layer in layers]
    budget = fraction * sum(layer.num_params() for layer in layers)
    infos = cut_to_budget(layers, budget)
    assert sum(layer.num_params() for layer in layers) <= budget
    for layer, w, r0, info in zip(layers, before, ranks_before, infos):
        ranks = [r if a else None for r, a in zip(layer.ranks, layer.adapted)]
        core, factors = hosvd(w, ranks)  # float64 reference, from the reconstructed kernel
        assert torch.allclose(layer.weight_full(), reconstruct(core, factors), atol=1e-10)
        for i, u in enumerate(layer.factors):
            if u is not None:
                assert layer.rank_bounds[i][0] <= layer.ranks[i] <= r0[i]  # never grows: no augmentation
                if layer.ranks != r0:  # a cut layer holds orthonormal factors
                    assert torch.allclose(u.T @ u, torch.eye(u.shape[1], dtype=f64), atol=1e-12)
        err = float((layer.weight_full().detach() - w).norm() / w.norm())
        assert err <= info.rel_error + 1e-12
    if fraction > 1:  # everything fits: nothing is touched
        untouched = drifted_layers()
        for layer, same in zip(layers, untouched):
            assert layer.ranks == same.ranks
            for a, b in zip(layer.state_dict().values(), same.state_dict().values()):
                assert torch.equal(a, b)
    else:
        assert any(layer.ranks != r0 for layer, r0 in zip(layers, ranks_before))


def test_optimizer_state_follows_the_parameters_through_a_cut():
    """A cut is a linear change of coordinates restricted to the kept directions, ``C' = C x_i M_i`` and
    ``U_i' = U_i N_i`` with ``M_i = U_i'^T U_i`` and ``N_i = pinv(U_i) U_i'``; the momentum buffers go through
    the same maps (so momentum keeps moving the kept part of the kernel as it did)."""
    layer = drifted_layers()[0]
    opt = torch.optim.SGD(layer.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(4, 12, 5, 5, dtype=f64)
    for _ in range(3):
        opt.zero_grad()
        layer(x).pow(2).mean().backward()
        opt.step()
    old = {name: getattr(layer, name).detach().clone() for name in ("core", "U0", "U1")}
    buf = {name: opt.state[getattr(layer, name)]["momentum_buffer"].clone() for name in ("core", "U0", "U1")}
    ranks = layer.ranks
    cut_to_budget([layer], layer.num_params() - 1, opt)  # at least one direction less
    assert layer.ranks != ranks
    maps = {i: getattr(layer, f"U{i}").detach().T @ old[f"U{i}"] for i in (0, 1)}
    right = {i: torch.linalg.pinv(old[f"U{i}"]) @ getattr(layer, f"U{i}").detach() for i in (0, 1)}
    mapped = lambda c: torch.einsum("abhw,pa,qb->pqhw", c, maps[0], maps[1])
    assert torch.allclose(layer.core.detach(), mapped(old["core"]), atol=1e-10)
    assert torch.allclose(opt.state[layer.core]["momentum_buffer"], mapped(buf["core"]), atol=1e-10)
    for i in (0, 1):
        u = getattr(layer, f"U{i}")
        assert torch.allclose(u.detach(), old[f"U{i}"] @ right[i], atol=1e-10)
        assert torch.allclose(opt.state[u]["momentum_buffer"], buf[f"U{i}"] @ right[i], atol=1e-10)
        assert opt.state[u]["momentum_buffer"].shape == u.shape


def small_net(seed=1):
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.ReLU(), nn.Conv2d(12, 16, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(16, 16, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
    net = net.double()
    convert_to_lowrank(net, RankPolicy(r_min=1, r_max_frac=1.0, init_rank_frac=0.75), generator=g,
                       conv_format="trained_tucker")
    return net


def prune_fit(net, pruner, x, y, steps):
    ranks = []
    for _ in range(steps):
        pruner.zero_grad()
        F.cross_entropy(net(x), y).backward()
        pruner.step()
        ranks.append([m.ranks[:2] for m in pruner.layers])
    return ranks


def pruner_for(net, steps, target=0.7, every=3):
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    layers = [m for m in net.modules() if isinstance(m, TrainedTuckerConv2d)]
    dense = sum(m.dense_num_params() for m in layers)
    return GradualPruning(net, opt, BudgetSchedule(dense=dense, fixed=0, target=target, start=0, end=steps // 2), every)


def test_gradual_pruning_reaches_the_budget_on_schedule_and_ranks_only_shrink():
    torch.manual_seed(0)
    x, y = torch.randn(32, 3, 6, 6, dtype=f64), torch.randint(0, 4, (32,))
    net = small_net()
    pruner = pruner_for(net, 40)
    ranks = prune_fit(net, pruner, x, y, 40)
    dense = sum(m.dense_num_params() for m in pruner.layers)
    held = sum(m.num_params() for m in pruner.layers)
    assert held <= 0.3 * dense and held > 0.25 * dense  # lands on the target (within the rank granularity)
    flat = [[r for pair in step for r in pair] for step in ranks]
    assert all(a >= b for prev, cur in zip(flat, flat[1:]) for a, b in zip(prev, cur))  # monotone
    assert flat[20:] == [flat[20]] * 20  # after the ramp's last cut (step 20) the ranks are fixed


def test_gradual_pruning_resumes_bitwise_in_the_middle_of_the_ramp(tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(32, 3, 6, 6, dtype=f64), torch.randint(0, 4, (32,))
    net = small_net()
    pruner = pruner_for(net, 40)
    prune_fit(net, pruner, x, y, 11)
    torch.save({"model": net.state_dict(), "pruner": pruner.state_dict()}, tmp_path / "ck.pt")
    state = torch.load(tmp_path / "ck.pt", weights_only=True)
    net2 = small_net(seed=5)  # other starting values and ranks: all come from the checkpoint
    pruner2 = pruner_for(net2, 40)
    net2.load_state_dict(state["model"])
    pruner2.load_state_dict(state["pruner"])
    prune_fit(net, pruner, x, y, 20)
    prune_fit(net2, pruner2, x, y, 20)
    for a, b in zip(net.state_dict().values(), net2.state_dict().values()):
        assert torch.equal(a, b)


def test_target_rule_resumes_bitwise_with_caps_at_the_full_channel_count(tmp_path):
    """With caps at the full size a mode can keep its whole basis, whose re-orthonormalised factor came from a
    triangular solve (column-major storage); a resumed run loads it row-major. The factor is stored row-major
    at every truncation, so both give the same floating-point results."""
    from test_target_rule import Pair, assert_resume_is_bitwise, pair_budget, two_layer_regression
    from tdlrt_cli.lowrank import TDLRT, BudgetRule

    x, ys = two_layer_regression([(10, 9), (2, 2)])

    def fresh():
        model = Pair(ranks=(8, 6), bounds=((1, 16), (1, 12)))
        opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
        return model, TDLRT(model, opt, BudgetRule(pair_budget((10, 9), (2, 2), 60)), augment_every=3)

    assert_resume_is_bitwise(fresh, x, ys, 13, 30, tmp_path / "ck.pt")


# --------------------------------------------------------------------------- one-shot decompositions

def kernel(seed=0, shape=(16, 12, 3, 3)):
    return torch.randn(*shape, dtype=f64, generator=torch.Generator().manual_seed(seed))


def test_fixed_tucker_from_a_trained_kernel_is_its_truncated_hosvd():
    w = kernel()
    conv = nn.Conv2d(12, 16, 3, padding=1).double()
    conv.weight.data = w.clone()
    layer = FixedTuckerConv2d(conv, 5, 4, init="hosvd")
    core, factors = hosvd(w, [5, 4, None, None])
    assert torch.allclose(layer.weight_full(), reconstruct(core, factors), atol=1e-12)
    full = FixedTuckerConv2d(conv, 16, 12, init="hosvd")  # full ranks: the kernel itself
    assert torch.allclose(full.weight_full(), w, atol=1e-12)


def tt_reference(w, r):
    """TT-SVD written out with full SVDs over (in, kh, kw, out), reconstructed to (out, in, kh, kw)."""
    n_out, n_in, kh, kw = w.shape
    t = w.permute(1, 2, 3, 0)
    cores, rest, left = [], t.reshape(n_in, -1), 1
    for n in (n_in, kh, kw):
        m = rest.reshape(left * n, -1)
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        k = min(r, s.numel())
        cores.append(u[:, :k].reshape(left, n, k))
        rest, left = s[:k, None] * vh[:k], k
    out = torch.einsum("ia,ahb,bwc,co->ihwo", cores[0][0], cores[1], cores[2], rest)
    return out.permute(3, 0, 1, 2)


@pytest.mark.parametrize("rank", [2, 5, 200])
def test_tt_from_a_trained_kernel_is_its_tt_svd(rank):
    w = kernel(1)
    conv = nn.Conv2d(12, 16, 3).double()
    conv.weight.data = w.clone()
    layer = TTConv2d(conv, rank, init="hosvd")
    assert torch.allclose(layer.weight_full(), tt_reference(w, rank), atol=1e-10)
    if rank >= 12 * 9:  # every TT rank at least the unfoldings' ranks: exact
        assert torch.allclose(layer.weight_full(), w, atol=1e-10)
    x = torch.randn(2, 12, 7, 7, dtype=f64)
    assert torch.allclose(layer(x), F.conv2d(x, layer.weight_full(), layer.bias), atol=1e-10)


def test_matrix_from_a_trained_kernel_is_its_best_rank_r_approximation():
    w = kernel(2)
    conv = nn.Conv2d(12, 16, 3).double()
    conv.weight.data = w.clone()
    layer = MatrixFixedConv2d(conv, 6, init="hosvd")
    s = torch.linalg.svdvals(w.reshape(16, -1))
    err = (layer.weight_full() - w).reshape(16, -1).norm()
    assert float(err) == pytest.approx(float(s[6:].pow(2).sum().sqrt()), rel=1e-10)  # Eckart-Young


def test_one_shot_allocation_spends_the_budget_where_the_spectra_need_it():
    """A kernel of Tucker ranks (2, 2) gets no more than that; a full-rank one takes the rest of the budget."""
    g = torch.Generator().manual_seed(3)
    low = reconstruct(torch.randn(2, 2, 3, 3, dtype=f64, generator=g),
                      [torch.linalg.qr(torch.randn(16, 2, dtype=f64, generator=g))[0],
                       torch.linalg.qr(torch.randn(12, 2, dtype=f64, generator=g))[0], None, None])
    spread = kernel(4)
    budget = 0.5 * 2 * 16 * 12 * 9
    (r_low, r_spread) = allocate_tucker_ranks([low * 10, spread], budget)
    assert r_low[0] <= 2 and r_low[1] <= 2
    used = sum(layer_params([*r, 3, 3], (16, 12, 3, 3), [True, True, False, False]) for r in (r_low, r_spread))
    assert used <= budget
    assert r_spread[0] * r_spread[1] > 4 * r_low[0] * r_low[1]


# --------------------------------------------------------------------------- through the CLI

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
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    run_tdlrt(PRUNE, tmp_path / "a")
    (straight,) = run_dirs(tmp_path / "a" / "outputs")
    killed = run_tdlrt(PRUNE, tmp_path / "b", env={"TDLRT_FAULT_KILL_AT_STEP": "4"}, check=False)
    assert killed.returncode == 137
    (run,) = run_dirs(tmp_path / "b" / "outputs")
    run_tdlrt(PRUNE + [f"resume={run}"], tmp_path / "b")
    a = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
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


def test_grouping_reads_a_source_run_by_its_setting_not_its_path():
    from tdlrt_cli.report.collect import grouping_config

    def source(seed, target):
        return {"method.ranks_from": {"path": f"/x/tdlrt_s{seed}", "seed": seed, "config": {
            "seed": seed, "epochs": 20, "method": {"name": "tdlrt", "target_cr": target}, "tau": None}}}

    config = {"seed": 0, "method": {"name": "tucker", "ranks_from": "/x/tdlrt_s0", "target_cr": None}}
    other = {**config, "seed": 1, "method": {**config["method"], "ranks_from": "/x/tdlrt_s1"}}
    a, b = grouping_config(config, source(0, 90)), grouping_config(other, source(1, 90))
    assert a == b and "run of tdlrt target c.r.=90%" in a["method.ranks_from"]
    assert grouping_config(other, source(1, 97)) != a  # another setting of the source: another row
    assert grouping_config(other)["method.ranks_from"] == "/x/tdlrt_s1"  # no record of the source: its path
