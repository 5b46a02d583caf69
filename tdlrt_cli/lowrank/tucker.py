"""Tucker algebra on plain tensors.

A Tucker tensor is ``W = C x_1 U_1 x_2 U_2 ... x_d U_d``: a core ``C`` and one factor per mode, each
``U_i`` of shape ``(n_i, r_i)`` with orthonormal columns, or ``None`` for a mode kept at full size
(``U_i = I``, not stored). Modes are numbered from 0 in code (out, in, kh, kw for a conv kernel).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

Factors = Sequence[Optional[torch.Tensor]]


def unfold(t: torch.Tensor, mode: int) -> torch.Tensor:
    """Mat_i(t): the mode-``mode`` fibres of ``t`` as columns, shape ``(n_mode, prod of the others)``."""
    return t.movedim(mode, 0).reshape(t.shape[mode], -1)


def fold(m: torch.Tensor, mode: int, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`unfold` for a tensor of ``shape`` (``shape[mode]`` may differ from m's rows)."""
    rest = [s for i, s in enumerate(shape) if i != mode]
    return m.reshape([m.shape[0]] + rest).movedim(0, mode)


def mode_product(t: torch.Tensor, m: Optional[torch.Tensor], mode: int) -> torch.Tensor:
    """``t x_mode m`` for ``m`` of shape ``(new, t.shape[mode])``; ``m=None`` is the identity."""
    if m is None:
        return t
    return torch.tensordot(m, t, dims=([1], [mode])).movedim(0, mode)


def multi_mode_product(t: torch.Tensor, mats: Sequence[Optional[torch.Tensor]], transpose: bool = False,
                       skip: Optional[int] = None) -> torch.Tensor:
    """``t x_i mats[i]`` over all modes (``mats[i].T`` when ``transpose``), leaving out mode ``skip``."""
    for i, m in enumerate(mats):
        if i != skip and m is not None:
            t = mode_product(t, m.transpose(0, 1) if transpose else m, i)
    return t


def reconstruct(core: torch.Tensor, factors: Factors) -> torch.Tensor:
    """The full tensor ``C x_1 U_1 ... x_d U_d``."""
    return multi_mode_product(core, factors)


def random_orthonormal(n: int, r: int, generator: Optional[torch.Generator] = None,
                       dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """An ``n x r`` matrix with orthonormal columns drawn from the Haar measure."""
    a = torch.randn(n, r, generator=generator, dtype=torch.float64)
    q, rr = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(rr)).where(torch.diagonal(rr) != 0, torch.ones(()))
    return q.to(dtype=dtype, device=device).contiguous()  # row-major, as a factor loaded from a checkpoint


def orthonormalize(u: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``u = q r`` with ``q`` orthonormal and ``r`` upper triangular with a non-negative diagonal.

    The sign convention makes ``r`` close to the identity when ``u`` is already nearly orthonormal,
    so re-orthonormalising never flips basis vectors (which would scramble optimizer state).
    """
    q, r = torch.linalg.qr(u)
    s = torch.sign(torch.diagonal(r))
    s = torch.where(s == 0, torch.ones_like(s), s)
    return q * s, r * s[:, None]


def hosvd(w: torch.Tensor, ranks: Sequence[Optional[int]]) -> Tuple[torch.Tensor, List[Optional[torch.Tensor]]]:
    """Truncated higher-order SVD: ``U_i`` = leading ``ranks[i]`` left singular vectors of Mat_i(w).

    ``ranks[i] = None`` keeps mode ``i`` at full size without a factor. Computed in float64.
    """
    w64 = w.detach().to(torch.float64)
    factors: List[Optional[torch.Tensor]] = []
    for i, r in enumerate(ranks):
        if r is None:
            factors.append(None)
            continue
        u, _, _ = torch.linalg.svd(unfold(w64, i), full_matrices=False)
        if u.shape[1] < r:  # rank above the unfolding's column count: complete the basis
            extra = random_orthonormal(u.shape[0], u.shape[0], dtype=torch.float64)
            u, _ = orthonormalize(torch.cat([u, extra], 1))
        factors.append(u[:, :r])
    core = multi_mode_product(w64, factors, transpose=True)
    return core.to(w.dtype).contiguous(), [None if f is None else f.to(w.dtype).contiguous() for f in factors]
