"""Float64 references written independently of tdlrt, for tests only: a literal two-pass TDLRT step
(``two_pass_step``) and the TT-SVD of a kernel (``tt_reference``).

Pass 1 runs the network with every low-rank layer as a plain dense conv/linear on its reconstructed
kernel W (a leaf), giving Z = dL/dW; each K-step gradient is then the autograd derivative of the explicit
parametrisation W(K_i) = fold_i(K_i Q_i^T) x_{j!=i} U_j. Bases are augmented from an SVD. Pass 2 runs
the network again with W(C_tilde) = C_tilde x_i U_hat_i, C_tilde a leaf, and takes the gradients of the
core and of every other parameter. BatchNorm running statistics are restored after pass 1, so they are
updated once. Plain SGD, then truncation by full SVDs of the core unfoldings.
"""
import types

import torch
import torch.nn.functional as F

from tdlrt_cli.lowrank import TuckerConv2d
from tdlrt_cli.lowrank.layers import LowRankLayer, replace_data


def _modeprod(t, m, mode):
    return torch.movedim(torch.tensordot(m, t, dims=([1], [mode])), 0, mode)


def _unfold(t, mode):
    return torch.movedim(t, mode, 0).reshape(t.shape[mode], -1)


def _dense_forward(layer, weight_fn):
    def forward(self, x):
        w = weight_fn()
        if isinstance(self, TuckerConv2d):
            return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation)
        return F.linear(x, w, self.bias)

    layer.forward = types.MethodType(forward, layer)


def _restore_forward(layer):
    del layer.forward


def _full(core, factors):
    w = core
    for i, u in enumerate(factors):
        if u is not None:
            w = _modeprod(w, u, i)
    return w


def two_pass_step(model, loss_fn, lr, tau):
    """One literal TDLRT step with plain SGD (no momentum, no weight decay) on ``model`` in place."""
    layers = [m for m in model.modules() if isinstance(m, LowRankLayer)]
    bn_state = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}

    # ---- pass 1: Z = dL/dW at the current point
    leaves = {}
    for layer in layers:
        w = _full(layer.core.detach(), layer.factors).clone().requires_grad_(True)
        leaves[layer] = w
        _dense_forward(layer, lambda w=w: w)
    model.zero_grad(set_to_none=True)
    loss_fn(model).backward()
    z = {layer: leaves[layer].grad.detach() for layer in layers}
    for layer in layers:
        _restore_forward(layer)
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if k in bn_state:
                v.copy_(bn_state[k])

    # ---- K-step and augmentation
    new_factors = {}
    for layer in layers:
        core, factors = layer.core.detach(), layer.factors
        aug = []
        for i, u in enumerate(factors):
            if u is None:
                aug.append(None)
                continue
            q, r = torch.linalg.qr(_unfold(core, i).T)
            k = (u @ r.T).clone().requires_grad_(True)          # K_i = U_i S_i with S_i = R^T
            shape = list(core.shape)
            shape[i] = u.shape[0]
            t = torch.movedim((k @ q.T).reshape([u.shape[0]] + [s for j, s in enumerate(core.shape) if j != i]), 0, i)
            w = _full(t, [None if j == i else f for j, f in enumerate(factors)])
            (grad_k,) = torch.autograd.grad(w, k, grad_outputs=z[layer])
            n, rank = u.shape
            extra = min(rank, n - rank)
            y = grad_k - u @ (u.T @ grad_k)
            left, _, _ = torch.linalg.svd(y, full_matrices=False)
            aug.append(torch.cat([u, left[:, :extra]], 1))
        new_factors[layer] = aug

    # ---- pass 2: Galerkin gradients at the same point, in the augmented bases
    cores = {}
    for layer in layers:
        old = layer.core.detach()
        shape = [old.shape[i] if u is None else u.shape[1] for i, u in enumerate(new_factors[layer])]
        c = torch.zeros(shape, dtype=old.dtype)
        c[tuple(slice(0, s) for s in old.shape)] = old
        c.requires_grad_(True)
        cores[layer] = c
        _dense_forward(layer, lambda c=c, f=new_factors[layer]: _full(c, f))
    model.zero_grad(set_to_none=True)
    loss_fn(model).backward()
    for layer in layers:
        _restore_forward(layer)
    core_ids = {id(layer.core) for layer in layers}
    with torch.no_grad():
        for p in model.parameters():
            if id(p) not in core_ids and p.grad is not None:
                p -= lr * p.grad
        for layer in layers:
            c_hat = cores[layer].detach() - lr * cores[layer].grad
            # ---- truncation by full SVDs
            norm = torch.linalg.norm(c_hat)
            maps = []
            for i, u in enumerate(new_factors[layer]):
                if u is None:
                    maps.append(None)
                    continue
                left, s, _ = torch.linalg.svd(_unfold(c_hat, i), full_matrices=False)
                lo, hi = layer.rank_bounds[i]
                keep = next(k for k in range(len(s) + 1) if torch.sqrt((s[k:] ** 2).sum()) <= tau * norm)
                keep = max(min(keep, hi, len(s)), min(lo, len(s)), 1)
                maps.append(left[:, :keep])
            core = c_hat
            for i, p in enumerate(maps):
                if p is not None:
                    core = _modeprod(core, p.T, i)
            replace_data(layer.core, core.clone())
            for i, (u, p) in enumerate(zip(new_factors[layer], maps)):
                if p is not None:
                    layer.set_factor(i, u @ p)
    model.zero_grad(set_to_none=True)


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
