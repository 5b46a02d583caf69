"""The target rule (method.target_cr): global rank allocation under a parameter budget on a cubic schedule,
against float64 references (the allocation's optimality conditions, the truncated HOSVD at the allocated ranks,
ranks found on regressions with known Tucker ranks, a bitwise resume mid-ramp)."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tdlrt_cli.lowrank import TDLRT, BudgetRule, BudgetSchedule, TuckerConv2d, allocate_ranks, augment, truncate_to_budget
from tdlrt_cli.lowrank.allocation import layer_params
from tdlrt_cli.lowrank.integrator import basis_gradients
from tdlrt_cli.lowrank.tucker import hosvd, reconstruct

f64 = torch.float64


# --------------------------------------------------------------------------- the schedule

def test_budget_schedule_is_the_cubic_ramp_of_gradual_pruning():
    s = BudgetSchedule(dense=1000, fixed=100, target=0.9, start=10, end=110)
    assert s.compression(0) == 0 and s.compression(10) == 0
    assert s.compression(60) == pytest.approx(0.9 * (1 - 0.5 ** 3))
    assert s.compression(110) == s.compression(10 ** 6) == pytest.approx(0.9)
    values = [s.compression(t) for t in range(0, 130)]
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert s.params(200) == pytest.approx(0.1 * 1000 - 100)
    with pytest.raises(ValueError):
        BudgetSchedule(dense=10, fixed=0, target=1.0, start=0, end=1)
    with pytest.raises(ValueError):
        BudgetSchedule(dense=10, fixed=0, target=0.5, start=5, end=1)


# --------------------------------------------------------------------------- the allocation

def random_problem(seed):
    """Three layers with channel modes adapted (kernel 3x3 kept), random decaying spectra per mode."""
    g = torch.Generator().manual_seed(seed)
    sizes = [(16, 8, 3, 3), (32, 16, 3, 3), (32, 32, 3, 3)]
    shapes = [(8, 8, 3, 3), (16, 16, 3, 3), (16, 16, 3, 3)]
    jobs, spectra, bounds = [], [], []
    for li, shape in enumerate(shapes):
        energy = float(torch.rand((), generator=g)) + 0.5
        for i in (0, 1):
            lam = torch.rand(shape[i], generator=g, dtype=f64).sort(descending=True).values
            lam = lam ** (1 + 4 * float(torch.rand((), generator=g)))
            jobs.append((li, (i,)))
            spectra.append((lam / lam.sum() * energy).tolist())
            bounds.append((2, shape[i]))
    return jobs, spectra, shapes, sizes, bounds


def params_of(ranks, jobs, shapes, sizes):
    per_layer = {li: list(shape) for li, shape in enumerate(shapes)}
    for (li, modes), r in zip(jobs, ranks):
        for i in modes:
            per_layer[li][i] = r
    return sum(layer_params(per_layer[li], sizes[li], [True, True, False, False]) for li in per_layer)


@pytest.mark.parametrize("seed", range(6))
def test_allocation_spends_the_budget_and_never_exceeds_it(seed):
    jobs, spectra, shapes, sizes, bounds = random_problem(seed)
    floor = params_of([lo for lo, _ in bounds], jobs, shapes, sizes)
    full = params_of([hi for _, hi in bounds], jobs, shapes, sizes)
    for budget in (floor, floor + 0.3 * (full - floor), floor + 0.8 * (full - floor), full, 10 * full):
        ranks = allocate_ranks(spectra, jobs, shapes, sizes, bounds, budget)
        spent = params_of(ranks, jobs, shapes, sizes)
        assert all(lo <= r <= hi for r, (lo, hi) in zip(ranks, bounds))
        assert spent <= budget
        # tight: no mode below its cap could take one more direction within the budget
        for j, r in enumerate(ranks):
            if r < bounds[j][1]:
                grown = list(ranks)
                grown[j] += 1
                assert params_of(grown, jobs, shapes, sizes) > budget
    assert allocate_ranks(spectra, jobs, shapes, sizes, bounds, 10 * full) == [hi for _, hi in bounds]
    assert allocate_ranks(spectra, jobs, shapes, sizes, bounds, 0) == [lo for lo, _ in bounds]


def greedy_reference(spectra, units, shapes, sizes, bounds, budget):
    """The allocation rule written plainly: rescore every unit at every pick (no heap, no versions)."""
    ranks = {li: list(shape) for li, shape in enumerate(shapes)}
    adapted = {li: [False] * len(shape) for li, shape in enumerate(shapes)}
    for (li, modes), (lo, _) in zip(units, bounds):
        for i in modes:
            ranks[li][i], adapted[li][i] = lo, True
    energy = {li: max(sum(lam) for (l2, _), lam in zip(units, spectra) if l2 == li) for li in ranks}

    def params(li, r):
        return layer_params(r, sizes[li], adapted[li])

    def cost(u):
        li, modes = units[u]
        grown = list(ranks[li])
        for i in modes:
            grown[i] += 1
        return params(li, grown) - params(li, ranks[li])

    spent = sum(params(li, ranks[li]) for li in ranks)
    withdrawn = set()
    while True:
        offers = [(spectra[u][ranks[li][modes[0]]] / energy[li] / cost(u), -u)
                  for u, (li, modes) in enumerate(units) if ranks[li][modes[0]] < bounds[u][1] and u not in withdrawn]
        if not offers:
            break
        u = -max(offers)[1]
        li, modes = units[u]
        if spent + cost(u) > budget:
            withdrawn.add(u)
            continue
        spent += cost(u)
        for i in modes:
            ranks[li][i] += 1
        withdrawn -= {k for k, (l2, _) in enumerate(units) if l2 == li}
    return [ranks[li][modes[0]] for li, modes in units]


@pytest.mark.parametrize("seed", range(8))
def test_allocation_equals_the_plain_greedy_rule(seed):
    jobs, spectra, shapes, sizes, bounds = random_problem(seed)
    full = params_of([hi for _, hi in bounds], jobs, shapes, sizes)
    for fraction in (0.1, 0.25, 0.5, 0.75):
        budget = fraction * full
        assert allocate_ranks(spectra, jobs, shapes, sizes, bounds, budget) == \
            greedy_reference(spectra, jobs, shapes, sizes, bounds, budget)


def test_allocation_gives_rank_to_the_layer_whose_energy_is_spread():
    # two identical layers: A's energy spread evenly over 8 directions per mode, B's in 2
    shapes, sizes = [(8, 8, 3, 3)] * 2, [(16, 16, 3, 3)] * 2
    spread = [1.0 / 8] * 8
    peaked = [0.5, 0.5] + [1e-6] * 6
    jobs = [(0, (0,)), (0, (1,)), (1, (0,)), (1, (1,))]
    spectra = [spread, spread, peaked, peaked]
    bounds = [(1, 8)] * 4
    budget = params_of([8, 8, 2, 2], jobs, shapes, sizes)
    assert allocate_ranks(spectra, jobs, shapes, sizes, bounds, budget) == [8, 8, 2, 2]


def test_allocation_weighs_each_direction_by_the_parameters_it_costs():
    # equal shares of energy, but a direction of the large layer costs 8x the parameters: the small one wins
    jobs = [(0, (0,)), (1, (0,))]
    shapes, sizes = [(4, 64), (4, 8)], [(512, 64), (64, 8)]  # order-2 layers, only mode 0 adapted
    spectra = [[0.25] * 4, [0.25] * 4]
    bounds = [(1, 4), (1, 4)]

    def params(r):
        return sum(math.prod(s) for s in ((r[0], 64), (r[1], 8))) + 512 * r[0] + 64 * r[1]

    budget = params([1, 4])
    ranks = allocate_ranks(spectra, jobs, shapes, sizes, bounds, budget)
    assert ranks == [1, 4]


# --------------------------------------------------------------------------- the truncation step

def stepped_layers(seed=0):
    """Two float64 Tucker layers after an augmentation and a core step: C_hat in augmented bases."""
    g = torch.Generator().manual_seed(seed)
    layers = [TuckerConv2d(12, 16, 3, padding=1, ranks=[6, 5, None, None], rank_bounds=[(1, 8), (1, 6), (3, 3), (3, 3)],
                           dtype=f64, generator=g),
              TuckerConv2d(16, 24, 3, padding=1, ranks=[8, 6, None, None], rank_bounds=[(2, 12), (2, 8), (3, 3), (3, 3)],
                           dtype=f64, generator=g)]
    net = nn.Sequential(*layers)
    x = torch.randn(8, 12, 6, 6, dtype=f64, generator=g)
    for layer in layers:
        layer.capture = True
    net(x).pow(2).sum().backward()
    with torch.no_grad():
        for layer in layers:
            augment(layer, basis_gradients(layer))
            layer.core.add_(0.05 * torch.randn(layer.core.shape, dtype=f64, generator=g))
            layer.clear_capture()
    return layers


@pytest.mark.parametrize("fraction", [0.35, 0.6, 1.5])
def test_truncation_to_a_budget_is_the_truncated_hosvd_at_the_allocated_ranks(fraction):
    layers = stepped_layers()
    before = [layer.weight_full().detach().clone() for layer in layers]
    total = sum(layer.num_params() for layer in layers)
    infos = truncate_to_budget(layers, fraction * total)
    assert sum(layer.num_params() for layer in layers) <= fraction * total
    for layer, w_hat, info in zip(layers, before, infos):
        ranks = [r if a else None for r, a in zip(layer.ranks, layer.adapted)]
        core, factors = hosvd(w_hat, ranks)  # float64 reference: truncated HOSVD of W_hat at these ranks
        assert torch.allclose(layer.weight_full(), reconstruct(core, factors), atol=1e-10)
        err = float((layer.weight_full().detach() - w_hat).norm() / w_hat.norm())
        assert err <= info.rel_error + 1e-12  # the bound: sqrt(sum of discarded tails) / ||C_hat||
        for i, u in enumerate(layer.factors):
            if u is not None:
                assert torch.allclose(u.T @ u, torch.eye(u.shape[1], dtype=f64), atol=1e-12)
                lo, hi = layer.rank_bounds[i]
                assert lo <= layer.ranks[i] <= hi
    if fraction > 1:  # a budget above the current size lets ranks grow into the augmented directions
        assert any(info.ranks[i] > r for info, layer in zip(infos, layers)
                   for i, r in enumerate((6, 5) if layer.full_shape[0] == 16 else (8, 6)))


def test_matrix_layers_keep_one_rank_for_both_modes():
    """DLRT's matrix layers: both unfoldings have the same spectrum, so the budget buys directions of the
    matrix, one rank for both modes (never a dead column in the cheaper mode)."""
    from tdlrt_cli.lowrank import convert_to_lowrank, ConversionRules, RankPolicy

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 64, 3, padding=1), nn.Conv2d(64, 64, 3, padding=1))
    convert_to_lowrank(net, RankPolicy(r_min=1), ConversionRules(), conv_format="matrix",
                       generator=torch.Generator().manual_seed(0))
    layers = [m for m in net.modules() if hasattr(m, "core")]
    assert layers and all(layer.order == 2 for layer in layers)
    total = sum(layer.num_params() for layer in layers)
    truncate_to_budget(layers, 0.5 * total)
    assert sum(layer.num_params() for layer in layers) <= 0.5 * total
    for layer in layers:
        assert layer.ranks[0] == layer.ranks[1]


def test_schedule_edges_a_zero_length_ramp_and_the_last_adapting_step():
    from tdlrt_cli.methods import target_budget
    from tdlrt_cli.lowrank import convert_to_lowrank, ConversionRules, RankPolicy

    step = BudgetSchedule(dense=100, fixed=0, target=0.8, start=5, end=5)
    assert (step.compression(0), step.compression(5), step.compression(6)) == (0.0, 0.8, 0.8)
    net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 32, 3), nn.Conv2d(32, 32, 3))
    convert_to_lowrank(net, RankPolicy(), ConversionRules(), generator=torch.Generator().manual_seed(0))
    # 30 adapting steps, adapting every 10th (steps 0, 10, 20): the ramp must end by step 20
    schedule = target_budget(net, 75.0, 0.0, 1.0, 30, augment_every=10)
    assert schedule.end == 20 and schedule.compression(20) == pytest.approx(0.75)
    assert target_budget(net, 75.0, 0.0, 0.5, 30, augment_every=1).end == 15


# --------------------------------------------------------------------------- over a training run

def two_layer_regression(target_ranks, seed=0, n=48):
    """Two independent 12 -> 16 convs side by side, each fitting a target kernel of known Tucker ranks."""
    g = torch.Generator().manual_seed(seed)
    targets = [TuckerConv2d(12, 16, 3, padding=1, ranks=[*r, None, None], dtype=f64, generator=g) for r in target_ranks]
    x = torch.randn(n, 12, 6, 6, dtype=f64, generator=g)
    ys = [F.conv2d(x, t.weight_full().detach(), padding=1) for t in targets]
    return x, ys


class Pair(nn.Module):
    def __init__(self, seed=1, ranks=(8, 8), bounds=((1, 8), (1, 8))):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a, self.b = (TuckerConv2d(12, 16, 3, padding=1, ranks=[*ranks, None, None],
                                       rank_bounds=[*bounds, (3, 3), (3, 3)], dtype=f64, generator=g)
                          for _ in range(2))

    def loss(self, x, ys):
        return F.mse_loss(self.a(x), ys[0]) + F.mse_loss(self.b(x), ys[1])


def fit(model, integrator, x, ys, steps):
    for _ in range(steps):
        integrator.zero_grad()
        model.loss(x, ys).backward()
        integrator.step()
    return float(model.loss(x, ys).detach())


def pair_budget(ranks_a, ranks_b, steps, dense=2 * 16 * 12 * 9):
    need = sum(layer_params([*r, 3, 3], (16, 12, 3, 3), [True, True, False, False]) for r in (ranks_a, ranks_b))
    return BudgetSchedule(dense=dense, fixed=0, target=1 - need / dense, start=0, end=steps)


def test_target_rule_finds_each_layers_ranks_within_one_budget():
    """Layer a's target kernel has Tucker ranks (6, 5), b's (2, 2); one budget that fits exactly those ranks:
    the rule gives each layer what its spectrum asks for (equal ranks for both would not fit the targets)."""
    x, ys = two_layer_regression([(6, 5), (2, 2)])
    model = Pair()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    integrator = TDLRT(model, opt, BudgetRule(pair_budget((6, 5), (2, 2), 60)))
    start = float(model.loss(x, ys).detach())
    end = fit(model, integrator, x, ys, 400)
    assert model.a.ranks[:2] == (6, 5) and model.b.ranks[:2] == (2, 2)
    assert end < 1e-8 * start


def test_ranks_grow_back_when_a_layer_needs_more_later():
    """Regrowth: under a fixed budget, layer a first fits a rank-(2, 2) kernel and b a rank-(6, 5) one; then the
    targets swap. The directions b no longer needs lose their energy and a takes the rank back."""
    x, first = two_layer_regression([(2, 2), (6, 5)], seed=3)
    model = Pair()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    integrator = TDLRT(model, opt, BudgetRule(pair_budget((6, 5), (2, 2), 50)))
    fit(model, integrator, x, first, 300)
    assert model.a.ranks[:2] == (2, 2) and model.b.ranks[:2] == (6, 5)
    swapped = [first[1], first[0]]
    start = float(model.loss(x, swapped).detach())
    end = fit(model, integrator, x, swapped, 600)
    assert model.a.ranks[:2] == (6, 5) and model.b.ranks[:2] == (2, 2)
    assert end < 1e-6 * start


def assert_resume_is_bitwise(fresh, x, ys, saved_at, then, path):
    """Train ``fresh()``'s pair ``saved_at`` steps, checkpoint it, continue it and a fresh pair loaded from the
    checkpoint for ``then`` more steps: the same ranks and kernels, bitwise."""
    model, integrator = fresh()
    fit(model, integrator, x, ys, saved_at)
    torch.save({"model": model.state_dict(), "integrator": integrator.state_dict()}, path)
    state = torch.load(path, weights_only=True)
    model2, integrator2 = fresh()
    model2.load_state_dict(state["model"])
    integrator2.load_state_dict(state["integrator"])
    fit(model, integrator, x, ys, then)
    fit(model2, integrator2, x, ys, then)
    for a, b in ((model.a, model2.a), (model.b, model2.b)):
        assert a.ranks == b.ranks
        assert torch.equal(a.weight_full(), b.weight_full())


def test_resume_in_the_middle_of_the_ramp_is_bitwise(tmp_path):
    x, ys = two_layer_regression([(6, 5), (2, 2)])

    def fresh():
        model = Pair()
        opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
        return model, TDLRT(model, opt, BudgetRule(pair_budget((6, 5), (2, 2), 60)), augment_every=3)

    assert_resume_is_bitwise(fresh, x, ys, 25, 40, tmp_path / "ck.pt")


def test_report_labels_target_runs_by_their_target_not_by_the_unused_tau():
    from tdlrt_cli.report.collect import knob_of

    assert knob_of({"tau": 0.1, "method": {"name": "tdlrt", "target_cr": 90.0}}) == "target c.r.=90%"
    assert knob_of({"tau": 0.1, "method": {"name": "tdlrt", "target_cr": None}}) == "tau=0.1"
    assert knob_of({"tau": 0.2, "method": {"name": "dlrt"}}) == "tau=0.2"


def test_a_non_finite_core_stops_the_target_rule_before_any_decomposition():
    from tdlrt_cli.lowrank import NonFiniteCore

    layers = stepped_layers()
    layers[1].core.data[0, 0, 0, 0] = float("inf")
    with pytest.raises(NonFiniteCore):
        truncate_to_budget(layers, 1e9)
