"""The controls of TDLRT's margin, against float64 references: gradual pruning without the integrator (its cut
is the truncated HOSVD of the kernel, the optimizer state follows it, ranks only shrink, a resume mid-ramp is
bitwise), and the one-shot compression of a trained kernel (truncated HOSVD, TT-SVD and best rank-r SVD, the
budget spent where the spectra need it); the report's row of a run at another run's ranks."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from reference import tt_reference
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
