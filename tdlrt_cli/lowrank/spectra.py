"""Spectra of the mode unfoldings of a stepped core, for truncation (step 4 of the TDLRT integrator): the exact
path (:func:`mode_spectra`, one batched float64 ``eigh``) and the fast one, and the tolerance rule's decisions from
either (:func:`tolerance_decisions`).

The fast path:

Truncating mode i of a stepped core needs, for ``M = Mat_i(C_hat)`` and ``G = M M^T`` (n x n), orthonormal
vectors ``P`` (n x m) and the tails ``t_k = ||(I - P_k P_k^T) M||_F^2 = tr(G) - sum_{j<k} theta_j``, where
``P_k`` holds the first k columns of P and ``theta_j = p_j^T G p_j``. The exact path (:func:`mode_spectra`)
takes all eigenpairs of G from one float64 ``eigh``. This path works in the core's
precision (at least float32) and does less of that work:

* ``m = n`` (the rank may keep every vector, or float64 work): one ``eigh`` of G per group of equal sizes.
* ``m < n`` (the rank cap is below the augmented size, the case of large ranks; float32 work):
  Rayleigh-Ritz on the block power step ``span(G E_m)`` from the leading m coordinates. Augmentation puts
  the previous basis first and the previous truncation left the core nearly all-orthogonal, so G is
  close to ``diag(sigma_old^2, 0)`` and ``E_m`` is close to its dominant subspace; one step ``G E_m``
  improves it by the ratio ``lambda_{m+1} / lambda_m``. With ``Q = qr(G E_m)`` and
  ``Q^T G Q = Y diag(theta) Y^T``, ``P = Q Y``: an ``m x m`` eigenproblem instead of ``n x n``, and only its
  eigenvalues where the rank keeps all m vectors (then ``P = Q`` spans the same space).

``t_k`` is the exact discarded energy of the projection that is applied, so ``||W_new - W_hat||^2 <= sum_i
t_{k_i}`` holds whatever the subspace; and ``theta_j <= lambda_j`` (Cauchy interlacing) makes every ``t_k``
an upper bound of the exact tail, so the decided rank is never below the exact one. Where the rank stops
below the cap, ``t_k <= tau^2 ||C_hat||^2``: the tolerance holds too. Where it reaches the cap ``hi < n``
with ``t_k`` above that, nothing certifies the subspace: one power step cannot find dominant directions
that ``G E_m`` barely reaches (eigenvalues ``0.8^j`` in the trailing coordinates of a 128 x 128 G, cap 64:
the Ritz vectors discard nearly all of ``||C_hat||^2``, the exact ones 6e-7 of it). Such decisions are
flagged like those within round-off of the threshold (``near``, :func:`decide`) and redone by the exact
path, so the fast path saves work where the tolerance decides the rank, not where the cap does.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .tucker import unfold

SPECTRA = ("exact", "fast")


# --------------------------------------------------------------------------- the exact path

def mode_spectra(grams: List[torch.Tensor]):
    """Eigen-decompositions of many small symmetric PSD matrices in one batched float64 ``eigh``.

    Each Gram matrix is embedded in the top-left block of a common size; the padding block is
    ``-(1 + trace) I``, whose eigenvalues sort below every true one (all >= 0) and whose eigenvectors stay
    in the padding coordinates, so the true eigenpairs come out first and untouched. Returns, per matrix,
    its eigenvalues in descending order (clamped at 0) and the matching eigenvectors as columns.
    """
    size = max(g.shape[0] for g in grams)
    batch = grams[0].new_zeros(len(grams), size, size, dtype=torch.float64)
    for b, g in enumerate(grams):
        n = g.shape[0]
        batch[b, :n, :n] = g
        if n < size:
            pad = -(1.0 + torch.trace(g.to(torch.float64)))
            batch[b, n:, n:] = torch.eye(size - n, dtype=torch.float64, device=g.device) * pad
    evals, evecs = torch.linalg.eigh(batch)
    evals, evecs = evals.flip(-1), evecs.flip(-1)
    return [(evals[b, :g.shape[0]].clamp_min(0), evecs[b, :g.shape[0], :g.shape[0]]) for b, g in enumerate(grams)]


def mode_spectrum(core: torch.Tensor, mode: int):
    """Squared singular values (descending) and left singular vectors of Mat_mode(core), via its Gram matrix."""
    m = unfold(core, mode).to(torch.float64)
    return mode_spectra([m @ m.transpose(0, 1)])[0]


def exact_grams(cores, jobs) -> List[torch.Tensor]:
    """``Mat_i(C) Mat_i(C)^T`` in float64 for every job ``(layer index, mode i)``."""
    grams = []
    for li, i in jobs:
        m = unfold(cores[li], i).to(torch.float64)
        grams.append(m @ m.transpose(0, 1))
    return grams


def clipped_bounds(layer, mode: int, n: int) -> tuple:
    """The layer's rank bounds for ``mode``, clipped to ``[1, n]`` (n: the augmented size)."""
    lo, hi = layer.rank_bounds[mode]
    return max(min(lo, n), 1), max(min(hi, n), 1)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision of the fast path: the core's own, but never below float32 (bf16 cores)."""
    return torch.promote_types(dtype, torch.float32)


def gram(m: torch.Tensor, block: int = 64) -> torch.Tensor:
    """``G = M M^T`` in the fast path's precision, by symmetric blocks: with ``M = [A; B]``,
    ``G = [[A A^T, A B^T], [B A^T, B B^T]]``, the diagonal blocks recursively (5/8 of the products of one
    ``M M^T`` at two levels; blocks below ``block`` rows are multiplied directly)."""
    m = m.to(compute_dtype(m.dtype))
    n = m.shape[0]
    if n < 2 * block:
        return m @ m.transpose(0, 1)
    h = n // 2
    a, b = m[:h], m[h:]
    g = m.new_empty(n, n)
    g[:h, :h] = gram(a, block)
    g[h:, h:] = gram(b, block)
    g[:h, h:] = a @ b.transpose(0, 1)
    g[h:, :h] = g[:h, h:].transpose(0, 1)
    return g


def eigenpairs(g: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """All eigenpairs of a batch of symmetric matrices, eigenvalues descending."""
    lam, vecs = torch.linalg.eigh(g)
    return lam.flip(-1), vecs.flip(-1)


def ritz_basis(g: torch.Tensor, m: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """For a batch of symmetric G: ``Q = qr(G E_m)`` (Householder: orthonormal even if ``G E_m`` is rank
    deficient) and ``H = Q^T G Q``, whose eigenvalues are the Ritz values on ``span(G E_m)``."""
    q, _ = torch.linalg.qr(g[..., :m])
    return q, q.transpose(-1, -2) @ g @ q


def ritz_vectors(q: torch.Tensor, h: torch.Tensor, rotate: torch.Tensor) -> torch.Tensor:
    """Ritz vectors ``Q Y`` (``H = Y diag(theta) Y^T``, descending) of the matrices flagged in ``rotate``; Q
    itself for the others, which keep all m vectors: the projection ``Q Q^T`` does not depend on the basis
    of span(Q), so their m x m eigenvectors are not needed (one host synchronisation picks them)."""
    vecs = q.clone()
    chosen = rotate.nonzero().squeeze(-1)
    if chosen.numel():
        _, y = eigenpairs(h[chosen])
        vecs[chosen] = q[chosen] @ y
    return vecs


def tails(theta: torch.Tensor, total: torch.Tensor, n: int) -> torch.Tensor:
    """``t_k = total - sum_{j<k} theta_j`` for k = 0..m (batched), ``total = tr(G)``, G of size n.

    Summed from the end, ``t_k = t_m + sum_{k<=j<m} theta_j``, so that small tails keep their relative
    accuracy; ``t_m``, the energy outside the m vectors, is 0 when they span everything (m = n).
    """
    m = theta.shape[-1]
    outside = (total - theta.sum(-1)).clamp_min(0) if m < n else torch.zeros_like(total)
    inside = torch.flip(torch.cumsum(torch.flip(theta.clamp_min(0), [-1]), -1), [-1])
    inside = torch.cat([inside, inside.new_zeros(inside.shape[:-1] + (1,))], -1)
    return inside + outside.unsqueeze(-1)


def roundoff_margin(dtype: torch.dtype, n: int, total: torch.Tensor) -> torch.Tensor:
    """A bound on the round-off of a tail from an n x n Gram matrix and its eigensolver in ``dtype``:
    ``n eps ||M||_F^2``, five times the largest deviation from float64 tails measured on float32 cores of
    VGG16 during TDLRT training (0.21 n eps ||M||_F^2)."""
    return n * torch.finfo(dtype).eps * total


def decide(g: torch.Tensor, m: int, lo: torch.Tensor, hi: torch.Tensor, tau: float):
    """Truncation decisions for a batch of Gram matrices ``g`` (b x n x n) of one size, on the device.

    With theta the m leading eigenvalues of G (``m = n``) or the Ritz values of :func:`ritz_basis`
    (``m < n``), descending, ``total = tr(G) = ||M||_F^2`` and the tails ``t`` of :func:`tails`, the rank is
    the smallest k in ``[lo, hi]`` with ``t_k <= tau^2 total``; since t is non-increasing,
    ``k = lo + #{j in [lo, hi) : t_j > tau^2 total}``. ``near`` flags a decision that round-off could flip:
    some ``t_j``, j in ``[lo, hi)`` (the only tails it depends on), lies within :func:`roundoff_margin` of
    the threshold; or, on the Ritz path (``m < n``), the rank reaches the cap ``hi`` with ``t_k`` above the
    threshold (see the module's docstring). ``lo <= hi <= m`` are per-matrix bounds (long tensors).

    Returns the vectors (b x n x m, the leading k of them kept) and rows
    ``(k, t_k, sqrt(theta_{k-1}), total, near)`` (b x 5).
    """
    n = g.shape[-1]
    if m == n:
        theta, vecs = eigenpairs(g)
    else:
        q, h = ritz_basis(g, m)
        theta = torch.linalg.eigvalsh(h).flip(-1)
    total = torch.diagonal(g, dim1=-2, dim2=-1).sum(-1)
    threshold = (tau * tau * total).unsqueeze(-1)
    t = tails(theta, total, n)
    j = torch.arange(m + 1, device=g.device)
    window = (j >= lo.unsqueeze(-1)) & (j < hi.unsqueeze(-1))
    k = lo + ((t > threshold) & window).sum(-1)
    margin = roundoff_margin(g.dtype, n, total).unsqueeze(-1)
    near = (((t - threshold).abs() <= margin) & window).any(-1)
    t_k = t.gather(-1, k.unsqueeze(-1)).squeeze(-1)
    if m < n:  # the cap binds on the Ritz subspace: nothing certifies that it holds the dominant one
        near |= (k == hi) & (t_k > threshold.squeeze(-1))
    rows = torch.stack([k.to(t.dtype), t_k, theta.gather(-1, (k - 1).unsqueeze(-1)).squeeze(-1).clamp_min(0).sqrt(),
                        total, near.to(t.dtype)], -1)
    if m < n:
        vecs = ritz_vectors(q, h, k < m)
    return vecs, rows


def fast_decisions(grams: Sequence[torch.Tensor], bounds: Sequence[Tuple[int, int]], tau: float):
    """:func:`decide` for Gram matrices of any sizes, ``bounds[j] = (lo, hi)`` with ``1 <= lo <= hi <= n_j``:
    one batched call per group of equal ``(n_j, m_j)``. The rank never exceeds its cap, so ``m_j = hi_j``
    leading vectors suffice, Ritz vectors (:func:`ritz_basis`) when ``hi_j < n_j``; but only in float32 work: the Ritz
    subspace of one power step is about ``(lambda_{m+1} / lambda_m) tan(angle)`` from the dominant one, which
    moved the truncated kernels by about 1e-6 of their norm on the tests' cores: small for float32 work, far
    above float64 round-off, so float64 work gets all eigenpairs (``m_j = n_j``). Returns per matrix its
    vectors (n_j x m_j) and the rows (J x 5, float64)."""
    groups: Dict[Tuple[int, int], List[int]] = {}
    for j, (g, (_, hi)) in enumerate(zip(grams, bounds)):
        n = g.shape[0]
        groups.setdefault((n, n if g.dtype == torch.float64 else hi), []).append(j)
    vectors: List[torch.Tensor] = [None] * len(grams)  # type: ignore[list-item]
    rows: List[torch.Tensor] = [None] * len(grams)  # type: ignore[list-item]
    for (_, m), members in groups.items():
        device = grams[members[0]].device
        lo = torch.tensor([bounds[j][0] for j in members], device=device)
        hi = torch.tensor([bounds[j][1] for j in members], device=device)
        vecs, group_rows = decide(torch.stack([grams[j] for j in members]), m, lo, hi, tau)
        for b, j in enumerate(members):
            vectors[j] = vecs[b]
            rows[j] = group_rows[b]
    return vectors, torch.stack(rows).to(torch.float64)


# --------------------------------------------------------------------------- the tolerance rule's decisions

def exact_tolerance_decisions(layers, cores, jobs, tau: float):
    """Per job (layer index, mode): all eigenvectors of Mat_i(C_hat)'s Gram matrix (one batched float64
    ``eigh``, :func:`mode_spectra`) and the row ``(k, tail_k, sigma_{k-1}, ||C_hat||^2, near=0)``."""
    grams = exact_grams(cores, jobs)
    pairs = mode_spectra(grams)
    norm_sq = {li: torch.trace(grams[j]) for j, (li, _) in reversed(list(enumerate(jobs)))}
    rows, vectors = [], []
    for (li, i), (lam, vecs) in zip(jobs, pairs):
        lo, hi = clipped_bounds(layers[li], i, lam.numel())
        tails = torch.flip(torch.cumsum(torch.flip(lam, [0]), 0), [0])
        k = (tails > tau * tau * norm_sq[li]).sum().clamp(lo, hi)
        tails = torch.cat([tails, tails.new_zeros(1)])
        rows.append(torch.stack([k.to(torch.float64), tails[k], lam[k - 1].sqrt(), norm_sq[li],
                                 norm_sq[li].new_zeros(())]))
        vectors.append(vecs)
    return vectors, rows


def fast_tolerance_decisions(layers, cores, jobs, tau: float):
    """As :func:`exact_tolerance_decisions`, from :func:`fast_decisions` in the core's precision: only the
    ``min(r_max, n)`` leading (Ritz) vectors, tails ``t_k = ||C_hat||^2 - sum_{j<k} theta_j``, and
    ``near = 1`` where round-off could flip the rank or where the cap binds on a Ritz subspace with a tail
    above ``tau^2 ||C_hat||^2`` (those jobs are redone by the exact path)."""
    grams = [gram(unfold(cores[li], i)) for li, i in jobs]
    bounds = [clipped_bounds(layers[li], i, g.shape[0]) for (li, i), g in zip(jobs, grams)]
    vectors, rows = fast_decisions(grams, bounds, tau)
    return vectors, list(rows)


def tolerance_decisions(layers, cores, jobs, tau: float, spectra: str,
                        broadcast: Optional[Callable[[torch.Tensor], None]]):
    """Vectors per job and the decisions ``(k, tail_k, smallest kept sigma, ||C_hat||^2)`` on the host, k
    the smallest rank in the layer's bounds whose discarded tail is at most ``tau^2 ||C_hat||^2``.

    The fast path's decisions within round-off of the threshold, and those where the rank cap binds on a
    Ritz subspace that may miss the dominant one, are redone by the exact path, so that both paths keep the
    same ranks wherever the float64 spectrum decides them clearly, and the same vectors where the cap
    binds. One host synchronisation (two when some decision is redone); ``broadcast`` replaces the
    decisions by the first process's, so every process also redoes the same ones.
    """
    if spectra not in SPECTRA:
        raise ValueError(f"spectra must be one of {', '.join(SPECTRA)}, got {spectra!r}")
    decide_all = exact_tolerance_decisions if spectra == "exact" else fast_tolerance_decisions
    vectors, rows = decide_all(layers, cores, jobs, tau)
    decided = torch.stack(rows)
    if broadcast is not None:
        broadcast(decided)
    host = decided.tolist()  # the one host synchronisation
    redo = [j for j, row in enumerate(host) if row[4]]
    if redo:
        exact_vectors, exact_rows = exact_tolerance_decisions(layers, cores, [jobs[j] for j in redo], tau)
        redone = torch.stack(exact_rows)
        if broadcast is not None:
            broadcast(redone)
        for j, vecs, row in zip(redo, exact_vectors, redone.tolist()):
            vectors[j], host[j] = vecs, row
    return vectors, [row[:4] for row in host]
