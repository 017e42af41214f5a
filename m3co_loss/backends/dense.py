"""The dense backend: the readable reference, one N x N similarity matrix per term.

Each function forms ``S = p_a p_b^T / t`` of this process's rows against the gathered batch
(``t`` a float, or a 0-dim tensor that autograd differentiates) and takes its row and column
log-sum-exps with :func:`torch.logsumexp`. Memory is O(N^2); below
:attr:`~m3co_loss.backends.BackendConfig.auto_tiled_min_n` columns it is also the fastest
backend, and the only one that can be differentiated twice. Every op is traced by
``torch.compile``.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple, cast

import torch
from torch import Tensor

from ._interface import PairWeights, Rows, Temperature, check_pair_weights

__all__ = ["row_col_lse", "m3co_vector", "clip_vector", "multisoftclip_vector", "multisoftclip_pairs"]


def row_col_lse(a: Rows, b: Rows, t: Temperature, *, distributed: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """``(s, r, c)``: the local rows' block ``s`` of ``S = a b^T / t`` against every column, its row
    log-sum-exps, and the column log-sum-exps of the local columns."""
    s = (a.local / t) @ b.full.T
    r = torch.logsumexp(s, dim=1)
    if distributed:
        c = torch.logsumexp((b.local / t) @ a.full.T, dim=1)  # local columns against every row
    else:
        c = torch.logsumexp(s, dim=0)
    return s, r, c


def m3co_vector(a: Rows, b: Rows, perm: Tensor, lam: Tensor, t: Temperature, *, reference: bool = False, distributed: bool = False) -> Tensor:
    """Per-sample M3Co L3(a -> b) of the local mixed rows (paper Eq. 6; halved when ``reference``)."""
    n = a.local.shape[0]
    rows = torch.arange(n, device=a.local.device)
    s, r, c = row_col_lse(a, b, t, distributed=distributed)  # local mixed rows against every clean column
    s_ii = s[rows, a.offset + rows]
    s_ij = s[rows, a.offset + perm]
    target = lam * s_ii + (1 - lam) * s_ij
    v = (r - target) + (lam * c + (1 - lam) * c[perm] - target)
    return 0.5 * v if reference else v


def clip_vector(a: Rows, b: Rows, t: Temperature, *, distributed: bool = False) -> Tensor:
    """Per-sample symmetric InfoNCE of the local rows."""
    n = a.local.shape[0]
    rows = torch.arange(n, device=a.local.device)
    s, r, c = row_col_lse(a, b, t, distributed=distributed)
    return r + c - 2 * s[rows, a.offset + rows]


def _soft_targets(x: Tensor, full: Tensor, target_t: Temperature, detach: bool) -> Tensor:
    """``softmax_row(x full^T / target_t)``; constants when ``detach``."""
    w = torch.softmax((x / target_t) @ full.T, dim=1)
    return w.detach() if detach else w


def multisoftclip_vector(
    a: Rows,
    b: Rows,
    t: Temperature,
    *,
    reference: bool,
    gather: Callable[[Tensor], Tensor],
    distributed: bool = False,
    target_t: Optional[Temperature] = None,
    detach_targets: bool = False,
) -> Tensor:
    """Per-sample MultiSClip Ls(a; a, b) of the local rows (targets from a at ``target_t``, paper Eq. 9)."""
    s_rows = (a.local / t) @ b.full.T  # s_rows[i, l] = S[i, l]
    s_cols = (b.local / t) @ a.full.T if distributed else s_rows.T  # s_cols[i, l] = S[l, i]
    r = torch.logsumexp(s_rows, dim=1)
    c = torch.logsumexp(s_cols, dim=1)
    w = _soft_targets(a.local, a.full, t if target_t is None else target_t, detach_targets)  # soft targets W[i, l]
    if reference:
        # Both directions weight query i by the target distribution W[i, :].
        return 0.5 * (c + r - (w * s_cols).sum(1) - (w * s_rows).sum(1))
    r_full = gather(r)
    return c + (w * (r_full.unsqueeze(0) - 2 * s_cols)).sum(1)


def multisoftclip_pairs(
    p: Sequence[Tensor],
    weights: PairWeights,
    t: Temperature,
    *,
    reference: bool,
    target_t: Optional[Temperature] = None,
    detach_targets: bool = False,
) -> Tensor:
    """``sum over pairs (a, b) of weight_a Ls(a; a, b) + weight_b Ls(b; a, b)``, on one process.

    Relies on two identities: the two directions of a pair share ``S = p_a p_b^T / t`` (the
    direction with targets from b uses ``S^T``, whose row and column log-sum-exps are those of
    ``S`` swapped), and every term with targets from modality m shares
    ``W_m = softmax(p_m p_m^T / target_t)``. So M(M-1)/2 cross and at most M target matrices are formed,
    instead of two matrices per directed term (for M = 3, 6 instead of 12). A pair whose two
    weights are 0 is skipped; not every weight may be 0 (``ValueError``).
    """
    targets: Dict[int, Tensor] = {}
    target_t = t if target_t is None else target_t

    def soft_targets(m: int) -> Tensor:
        if m not in targets:
            targets[m] = _soft_targets(p[m], p[m], target_t, detach_targets)
        return targets[m]

    total: Optional[Tensor] = None
    for (a, b), (weight_a, weight_b) in check_pair_weights(weights, len(p)).items():
        s = (p[a] / t) @ p[b].T
        lse_rows, lse_cols = torch.logsumexp(s, dim=1), torch.logsumexp(s, dim=0)
        # (weight, targets, S of the direction, its row and column log-sum-exps)
        for weight, m, s_rows, r, c in ((weight_a, a, s, lse_rows, lse_cols), (weight_b, b, s.T, lse_cols, lse_rows)):
            if not weight:
                continue
            w, s_cols = soft_targets(m), s_rows.T
            if reference:
                v = 0.5 * (c + r - (w * s_cols).sum(1) - (w * s_rows).sum(1))
            else:
                v = c + (w * (r.unsqueeze(0) - 2 * s_cols)).sum(1)
            v = weight * v
            total = v if total is None else total + v
    return cast(Tensor, total)  # check_pair_weights leaves a nonzero weight
