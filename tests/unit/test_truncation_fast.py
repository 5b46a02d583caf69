"""The fast truncation path (``spectra="fast"``) against the float64 reference (``spectra="exact"``).

The fast path takes the spectra in the core's precision and, where a mode's rank cap is below its augmented
size, only the leading Ritz pairs of one block power step from the leading coordinates. It must keep the
ranks the exact path keeps wherever the spectrum decides them clearly, respect the truncation error bound
always, and leave orthonormal factors.
"""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tdlrt_cli.lowrank import TDLRT, LowRankLinear, ToleranceRule, TuckerConv2d, spectra, truncate_layers, unfold
from tdlrt_cli.lowrank import integrator

f64 = torch.float64


def ortho_error(u):
    return float((u.T @ u - torch.eye(u.shape[1], dtype=u.dtype)).abs().max())


def rotate(core, i, q):
    return torch.movedim(torch.tensordot(q, core, dims=([1], [i])), 0, i)


def core_with_spectra(shape, sigmas, g):
    """A random core whose mode-i unfolding (i < len(sigmas)) has singular values proportional to sigmas[i],
    in random directions (no warm start for the Ritz path)."""
    core = torch.randn(shape, dtype=f64, generator=g)
    for i, s in enumerate(sigmas):
        q, _ = torch.linalg.qr(torch.randn(shape[i], shape[i], dtype=f64, generator=g))
        core = rotate(core, i, q * s)
    return core


def gap(n, keep, ratio=1e-3):
    return torch.cat([torch.linspace(3, 1, keep, dtype=f64), torch.full((n - keep,), ratio, dtype=f64)])


def augmented_core(shape, old, g, step=1e-2):
    """What truncation sees in training: an all-orthogonal core of size ``old`` (mode-0/1 singular values
    decaying 3 -> 0.3), zero-padded to ``shape`` (augmentation), plus a small dense step."""
    c = core_with_spectra(old, [torch.linspace(3, 0.3, old[0], dtype=f64), torch.linspace(3, 0.3, old[1], dtype=f64)], g)
    for i in (0, 1):  # make it all-orthogonal: rotate each mode to its left singular vectors
        u, _, _ = torch.linalg.svd(unfold(c, i), full_matrices=False)
        c = rotate(c, i, u.T)
    padded = torch.zeros(shape, dtype=f64)
    padded[tuple(slice(0, s) for s in old)] = c
    return padded + step * torch.randn(shape, dtype=f64, generator=g)


def make_layers(specs, dtype, g):
    """Layers whose cores are given (float64) and whose rank caps are ``hi`` for modes 0 and 1."""
    layers = []
    for core, hi in specs:
        shape = tuple(core.shape)
        n = [2 * s for s in shape[:2]]
        if len(shape) == 4:
            layer = TuckerConv2d(n[1], n[0], shape[2], ranks=[shape[0], shape[1], None, None], dtype=dtype,
                                 generator=g, rank_bounds=[(1, hi[0]), (1, hi[1]), (shape[2],) * 2, (shape[3],) * 2])
        else:
            layer = LowRankLinear(n[1], n[0], ranks=list(shape), dtype=dtype, generator=g,
                                  rank_bounds=[(1, hi[0]), (1, hi[1])])
        layer.core.data = core.to(dtype)
        layers.append(layer)
    return layers


def both_paths(layers, tau):
    """Truncate deep copies of ``layers`` with each path; returns (before, exact, fast) kernels and infos."""
    before = [layer.weight_full().detach().to(f64) for layer in layers]
    exact, fast = copy.deepcopy(layers), copy.deepcopy(layers)
    info_exact = truncate_layers(exact, ToleranceRule(tau, spectra="exact"))
    info_fast = truncate_layers(fast, ToleranceRule(tau, spectra="fast"))
    return before, (exact, info_exact), (fast, info_fast)


def gap_specs(g):
    return [
        (core_with_spectra((16, 12, 3, 3), [gap(16, 5), gap(12, 4)], g), (16, 12)),   # full eigh (cap >= size)
        (core_with_spectra((32, 24, 3, 3), [gap(32, 9), gap(24, 3)], g), (16, 12)),   # Ritz (cap < size)
        (core_with_spectra((32, 32, 3, 3), [gap(32, 7), gap(32, 12)], g), (16, 16)),  # Ritz, same group
        (core_with_spectra((8, 8, 1, 1), [gap(8, 3), gap(8, 3)], g), (4, 8)),         # Ritz and full eigh
        (core_with_spectra((20, 14), [gap(20, 6), gap(14, 6)], g), (10, 14)),          # order 2
        (augmented_core((32, 32, 3, 3), (16, 16, 3, 3), g), (16, 16)),               # a training-like core
    ]


@pytest.mark.parametrize("dtype", [f64, torch.float32])
def test_fast_keeps_the_exact_ranks_and_kernels_at_a_clear_gap(dtype):
    g = torch.Generator().manual_seed(0)
    layers = make_layers(gap_specs(g), dtype, g)
    for tau in (0.01, 0.05):
        before, (exact, info_exact), (fast, info_fast) = both_paths(layers, tau)
        for le, lf, ie, i_f, w in zip(exact, fast, info_exact, info_fast, before):
            assert lf.ranks == le.ranks, (tau, lf.ranks, le.ranks)
            # squared relative errors: discarded energy over ||C||^2, equal up to round-off of float32 Gram matrices
            assert abs(i_f.rel_error ** 2 - ie.rel_error ** 2) <= (1e-5 if dtype == torch.float32 else 1e-12)
            # float64: all eigenpairs, as the exact path; float32: round-off, and one power step leaves the Ritz
            # subspace about (lambda_{m+1} / lambda_k) tan(angle) from the dominant one
            diff = float((lf.weight_full().detach().to(f64) - le.weight_full().detach().to(f64)).norm())
            assert diff <= (1e-5 if dtype == torch.float32 else 1e-12) * float(w.norm())
        if tau == 0.01:  # the gaps decide: modes 0 and 1 keep the large singular values; the cap binds the last
            assert [layer.ranks[:2] for layer in fast] == [(5, 4), (9, 3), (7, 12), (3, 3), (6, 6), (16, 16)]


def assert_within_bound(layers, infos, before, tau, dtype):
    """||W_new - W_hat|| <= rel_error ||W_hat||, and rel_error <= sqrt(|A|) tau where no cap binds; up to the
    round-off of the tails: n eps ||C||^2 on a squared error (about 3e-5 ||C||^2 in float32, n <= 256)."""
    slack_sq = 3e-5 if dtype == torch.float32 else 1e-14
    for layer, info, w in zip(layers, infos, before):
        err_sq = float((layer.weight_full().detach().to(f64) - w).pow(2).sum() / w.pow(2).sum())
        assert err_sq <= info.rel_error ** 2 + slack_sq
        modes = [i for i, a in enumerate(layer.adapted) if a]
        if all(layer.ranks[i] < layer.rank_bounds[i][1] for i in modes):  # no cap binds: the tau rule alone
            assert info.rel_error ** 2 <= len(modes) * tau ** 2 + slack_sq
        for i in modes:
            lo, hi = layer.rank_bounds[i]
            assert lo <= layer.ranks[i] <= hi
            assert ortho_error(layer.factors[i]) < (1e-5 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("dtype", [f64, torch.float32])
def test_fast_is_within_the_error_bound_with_orthonormal_factors(dtype):
    g = torch.Generator().manual_seed(1)
    layers = make_layers(gap_specs(g), dtype, g)
    for tau in (0.01, 0.1, 0.3):
        before, _, (fast, infos) = both_paths(layers, tau)
        assert_within_bound(fast, infos, before, tau, dtype)


def flat(n, g, spread=1.0):
    """Near-degenerate singular values: all within ``spread`` percent of each other."""
    return 1 + spread / 100 * torch.rand(n, dtype=f64, generator=g)


@pytest.mark.parametrize("dtype", [f64, torch.float32])
def test_fast_is_within_the_error_bound_without_a_gap(dtype):
    """No gap (flat, slowly decaying or clustered spectra): the Ritz subspace of one power step is far from
    converged, yet every tail is the exact discarded energy of the projection applied, so the bound holds;
    and Ritz values never exceed eigenvalues (interlacing), so the fast path keeps at least the exact rank."""
    g = torch.Generator().manual_seed(2)
    specs = [
        (core_with_spectra((32, 32, 3, 3), [flat(32, g), flat(32, g)], g), (16, 16)),
        (core_with_spectra((32, 24, 3, 3), [torch.linspace(1, 0.5, 32, dtype=f64),
                                            torch.linspace(1, 0.9, 24, dtype=f64)], g), (20, 12)),
        (core_with_spectra((24, 24, 3, 3), [torch.cat([torch.ones(12, dtype=f64), flat(12, g) * 0.9]),
                                            0.5 ** torch.arange(24, dtype=f64) ** 0.5], g), (24, 12)),
        (core_with_spectra((30, 30), [flat(30, g, 10.0), flat(30, g, 10.0)], g), (15, 30)),
    ]
    layers = make_layers(specs, dtype, g)
    for tau in (0.05, 0.2, 0.5, 0.8):
        before, (exact, _), (fast, infos) = both_paths(layers, tau)
        assert_within_bound(fast, infos, before, tau, dtype)
        for le, lf in zip(exact, fast):
            assert all(rf >= re for rf, re in zip(lf.ranks, le.ranks))


def test_decisions_at_the_threshold_are_redone_exactly(monkeypatch):
    """A float32 tail within round-off of tau^2 ||C||^2 could fall on either side: such decisions are redone in
    float64 and then equal the exact path's, on both sides of the threshold."""
    g = torch.Generator().manual_seed(3)
    layer = make_layers([(core_with_spectra((24, 20, 3, 3), [torch.linspace(2, 1, 24, dtype=f64),
                                                             torch.linspace(2, 1, 20, dtype=f64)], g), (24, 20))],
                        torch.float32, g)[0]
    c = layer.core.detach().to(f64)
    lam = torch.linalg.svdvals(unfold(c, 0)).pow(2)
    tails = lam.flip(0).cumsum(0).flip(0)
    redone = []
    exact_decisions = spectra.exact_tolerance_decisions

    def spy(layers, cores, jobs, tau):
        redone.extend(jobs)
        return exact_decisions(layers, cores, jobs, tau)

    monkeypatch.setattr(spectra, "exact_tolerance_decisions", spy)
    for k in (6, 12, 18):
        for side in (1 - 1e-9, 1 + 1e-9):  # tau^2 ||C||^2 = t_k (1 -+ 1e-9): t_k above / below the threshold
            tau = math.sqrt(float(tails[k] / c.pow(2).sum()) * side)
            redone.clear()
            fast, exact = copy.deepcopy(layer), copy.deepcopy(layer)
            truncate_layers([fast], ToleranceRule(tau, spectra="fast"))
            truncate_layers([exact], ToleranceRule(tau, spectra="exact"))
            assert fast.ranks == exact.ranks
            assert fast.ranks[0] == (k + 1 if side < 1 else k)
            assert (0, 0) in redone


def test_symmetric_block_gram_equals_the_product():
    g = torch.Generator().manual_seed(4)
    for n in (5, 64, 127, 128, 200, 257):
        m = torch.randn(n, 37, dtype=f64, generator=g)
        assert torch.allclose(spectra.gram(m), m @ m.T, atol=1e-12)
    m = torch.randn(300, 50, generator=g).to(torch.bfloat16)
    assert spectra.gram(m).dtype == torch.float32  # bf16 cores: Gram matrices in float32


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a = TuckerConv2d(16, 32, 3, padding=1, ranks=[8, 8, None, None],
                              rank_bounds=[(2, 8), (2, 8), (3, 3), (3, 3)], generator=torch.Generator().manual_seed(0))
        self.b = TuckerConv2d(32, 32, 3, padding=1, ranks=[8, 8, None, None],
                              rank_bounds=[(2, 16), (2, 16), (3, 3), (3, 3)], generator=torch.Generator().manual_seed(1))
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.a(x))
        x = F.relu(self.b(x))
        return self.head(x.mean((2, 3)))


def train(spectra_path, steps, dtype=torch.float32, tau=0.3):
    torch.manual_seed(0)
    model = Net().to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    integrator_ = TDLRT(model, opt, ToleranceRule(tau, spectra=spectra_path))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(16, 3, 8, 8, generator=g, dtype=dtype)
    y = torch.randint(0, 10, (16,), generator=g)
    ranks, errors = [], []
    for _ in range(steps):
        integrator_.zero_grad()
        F.cross_entropy(model(x), y).backward()
        integrator_.step()
        ranks.append((model.a.ranks, model.b.ranks))
        errors.append(max(integrator.orthonormality_error(model.a), integrator.orthonormality_error(model.b)))
    return model, ranks, errors


def test_ritz_vectors_only_in_float32_work():
    """m = hi leading Ritz vectors where the cap is below the size in float32; all eigenpairs in float64."""
    g = torch.Generator().manual_seed(6)
    m = torch.randn(12, 30, dtype=f64, generator=g)
    for dtype, columns in ((torch.float32, [5, 12]), (f64, [12, 12])):
        grams = [spectra.gram(m.to(dtype))] * 2
        vectors, rows = spectra.fast_decisions(grams, [(1, 5), (1, 12)], 0.1)
        assert [v.shape[1] for v in vectors] == columns
        assert rows.dtype == f64 and rows.shape == (2, 5)


def test_ritz_vectors_are_rotated_only_where_fewer_than_all_are_kept():
    """Keeping all m Ritz vectors (k = m) needs only their span; keeping fewer needs them ordered by Ritz value."""
    g = torch.Generator().manual_seed(7)
    gram = spectra.gram(torch.randn(12, 30, generator=g))
    (every, rotated), rows = spectra.fast_decisions([gram, gram], [(5, 5), (1, 5)], 0.9)
    assert rows[:, 0].tolist() == [5, 1]
    assert torch.allclose(every @ every.T, rotated @ rotated.T, atol=1e-5)  # the same span(Q)
    h = rotated.T @ gram @ rotated
    scale = float(h.abs().max())
    assert torch.allclose(h, torch.diag(torch.diagonal(h)), atol=1e-5 * scale)  # Ritz vectors: H is diagonal ...
    assert torch.all(torch.diagonal(h)[:-1] >= torch.diagonal(h)[1:])              # ... in descending order
    assert float(rows[1, 2]) == pytest.approx(float(torch.diagonal(h)[0].sqrt()), rel=1e-4)


def test_training_with_fast_truncation_follows_the_exact_path():
    """Full-batch training in float32, tau = 0.3: layer a's augmented size exceeds its cap of 8 (the Ritz
    path every step), layer b's does not (all eigenpairs); the ranks adapt, both paths keep the same ranks
    and end at nearly the same network."""
    fast, ranks_fast, _ = train("fast", 30)
    exact, ranks_exact, _ = train("exact", 30)
    assert ranks_fast == ranks_exact
    assert len(set(ranks_fast)) > 2
    assert all(4 < a[0] <= 8 and 4 < a[1] <= 8 and b[0] < 8 for a, b in ranks_fast[1:])
    for name in ("a", "b"):
        w_fast = getattr(fast, name).weight_full().detach()
        w_exact = getattr(exact, name).weight_full().detach()
        assert float((w_fast - w_exact).norm()) <= 1e-3 * float(w_exact.norm())


def test_factors_stay_orthonormal_over_many_float32_steps():
    _, _, errors = train("fast", 400)
    assert max(errors) < 1e-5


def test_unknown_spectra_is_refused():
    model = Net()
    with pytest.raises(ValueError, match="spectra"):
        TDLRT(model, torch.optim.SGD(model.parameters(), lr=0.1), ToleranceRule(0.1, spectra="approximate"))
    with pytest.raises(ValueError, match="spectra"):
        truncate_layers([model.a], ToleranceRule(0.1, spectra="approximate"))


@pytest.mark.parametrize("path", ["exact", "fast"])
def test_a_non_finite_core_is_refused_before_any_decomposition(path):
    from tdlrt_cli.lowrank import NonFiniteCore

    g = torch.Generator().manual_seed(0)
    layers = [TuckerConv2d(8, 8, 3, padding=1, ranks=[4, 4, None, None], generator=g) for _ in range(2)]
    with torch.no_grad():
        layers[1].core[0, 0, 0, 0] = float("inf")
    before = [[t.clone() for t in (layer.core, *[u for u in layer.factors if u is not None])] for layer in layers]
    with pytest.raises(NonFiniteCore, match="1 of 2"):
        truncate_layers(layers, ToleranceRule(0.1, spectra=path))
    for layer, saved in zip(layers, before):  # nothing was changed
        now = [layer.core, *[u for u in layer.factors if u is not None]]
        assert all(torch.equal(a, b) for a, b in zip(now, saved))


@pytest.mark.parametrize("tau", [1e-2, 1e-5])
def test_a_binding_cap_with_the_dominant_subspace_outside_the_power_step_is_decided_exactly(tau):
    """n = 128, cap 64, eigenvalues 0.8^j of mode 0's Gram matrix in its trailing coordinates: span(G E_64)
    is (up to round-off) the leading coordinates, which hold almost none of ||C||^2. The Ritz path reaches the
    cap with a tail above tau^2 ||C||^2; nothing certifies its subspace there, so the exact path decides, and
    the fast path discards what the exact one discards (tau = 1e-2: the exact rank is below the cap;
    1e-5: the cap binds on both paths)."""
    g = torch.Generator().manual_seed(8)
    lam = 0.8 ** torch.arange(128, dtype=f64)
    v, _ = torch.linalg.qr(torch.randn(128, 128, dtype=f64, generator=g))
    core = torch.diag(lam.flip(0).sqrt()) @ v.T  # Mat_0(C) M^T = diag(0.8^127, ..., 0.8^0)
    layers = make_layers([(core, (64, 128))], torch.float32, g)
    (_, (exact, (info_exact,)), (fast, (info_fast,))) = both_paths(layers, tau)
    assert exact[0].ranks[0] == (42 if tau == 1e-2 else 64)  # 0.8^42 < tau^2 <= 0.8^41; or the cap
    assert info_exact.rel_error ** 2 < 1e-3  # the exact path keeps nearly all of ||C||^2 (both modes' tails)
    assert fast[0].ranks == exact[0].ranks
    assert info_fast.rel_error ** 2 == pytest.approx(info_exact.rel_error ** 2, rel=1e-3, abs=1e-6)
    w_fast, w_exact = (layer.weight_full().detach().to(f64) for layer in (fast[0], exact[0]))
    assert float((w_fast - w_exact).norm()) <= 1e-3 * float(w_exact.norm())
