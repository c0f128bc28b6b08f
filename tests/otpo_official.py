"""An independent re-implementation of the OTPO authors' ``get_ot_weight`` for the tests.

Written from the published description of the official code, not from ``compass_kernels``: NumPy
and POT, one pair at a time. Per pair, the hidden states are multiplied by their masks (prompt and
padding rows become zero vectors), the cost is ``cdist + 1e-6`` over the whole padded L x L
matrix, divided by its maximum when that exceeds 1, and the plan is POT's
``sinkhorn_unbalanced`` with unit masses on the valid tokens. The official code pins POT 0.9.4,
whose default regulariser was the entropy (later versions default to KL), with the stabilised
Sinkhorn; both are passed explicitly here. Token weights are the plan's marginals scaled so that
each side sums to ``min(n_chosen, n_rejected)``.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch


def official_otpo_weights(h_chosen, h_rejected, mask_chosen, mask_rejected, eps: float, tau: float,
                          stop: float = 1e-12, max_iter: int = 100_000):
    """``(w_chosen [B, L], w_rejected [B, L])`` float64 tensors, as the official loop computes them."""
    import ot

    hc = h_chosen.double().numpy()
    hr = h_rejected.double().numpy()
    mc = mask_chosen.bool().numpy()
    mr = mask_rejected.bool().numpy()
    B, L, _ = hc.shape
    w_c, w_r = np.zeros((B, L)), np.zeros((B, L))
    for i in range(B):
        if not mc[i].any() or not mr[i].any():
            continue
        p = hc[i] * mc[i][:, None]                  # masked rows are zero vectors (NaN-free here)
        q = hr[i] * mr[i][:, None]
        M = np.sqrt(((p[:, None, :] - q[None, :, :]) ** 2).sum(-1)) + 1e-6   # [L, L], padding included
        if M.max() > 1:
            M = M / M.max()
        a, b = mc[i].astype(np.float64), mr[i].astype(np.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            P = ot.unbalanced.sinkhorn_unbalanced(a, b, M, eps, tau, method="sinkhorn_stabilized",
                                                  reg_type="entropy", numItermax=max_iter, stopThr=stop)
        n = min(a.sum(), b.sum())
        w_c[i] = P.sum(1) * n / P.sum()
        w_r[i] = P.sum(0) * n / P.sum()
    return torch.from_numpy(w_c), torch.from_numpy(w_r)


def anisotropic_states(B: int, L: int, D: int, seed: int = 0, common: float = 6.0):
    """Chosen / rejected states with a dominant shared direction (as trained LLMs' final states
    have): ``common`` x a unit-norm-per-dimension mean vector plus unit noise, a few rejected tokens
    moved away. Their norms (~common sqrt(D)) exceed the token distances (~sqrt(2 D))."""
    g = torch.Generator().manual_seed(seed)
    mu = common * torch.randn(D, generator=g)
    h_c = mu + torch.randn(B, L, D, generator=g)
    h_r = h_c + 0.3 * torch.randn(B, L, D, generator=g)
    h_r[:, 2:5] = mu + 2.0 * torch.randn(B, 3, D, generator=g)
    return h_c, h_r


def prompt_masks(B: int, L: int, starts, lengths_c, lengths_r):
    """Response masks after a prompt of ``starts[i]`` positions, as the alignment batches have."""
    ar = torch.arange(L)
    mc = torch.stack([(ar >= s) & (ar < s + n) for s, n in zip(starts, lengths_c)])
    mr = torch.stack([(ar >= s) & (ar < s + n) for s, n in zip(starts, lengths_r)])
    return mc, mr
