r"""O(N D)-memory backends: tiled log-sum-exp and soft-target sums with exact gradients.

Both M3CoL losses need only a few reductions of N x N similarity matrices, never the
matrices themselves:

* the row and column log-sum-exps of ``S = Q K^T / t``
  (``r_i = log sum_k exp S_ik``, ``c_k = log sum_i exp S_ik``), plus O(N) gathered entries
  such as ``S_ii = q_i . k_i / t``, which are row-wise dot products;
* for MultiSClip, sums weighted by the soft targets ``W = softmax_row(Q K^T / t)``.
  With ``X_il = u_l + (gamma / t) vq_i . vk_l`` they are attention-like products::

      y_i = sum_l W_il X_il = (sum_l E_il u_l + (gamma / t) vq_i . (sum_l E_il vk_l)) / sum_l E_il
          = (O_i,1 + (gamma / t) vq_i . O_i,2:) / O_i,0,      O = E [1 | u | vk],  E = exp(Q K^T / t - m)

  e.g. ``sum_i sum_l W_il S_li = sum_i (W p_a)_i . p_b,i / t`` (paper Eq. 9, u = r, gamma = -2).

:class:`LogSumExp` and :class:`SoftTargetSum` compute these tile by tile (``tile_rows`` x
``tile_cols`` blocks), keeping O(N) statistics; their backward passes recompute each tile and
give exact gradients:

* log-sum-exp: ``dq_i = (1/t) sum_k A_ik k_k``, ``dk_k = (1/t) sum_i A_ik q_i`` with
  ``A_ik = g^r_i exp(S_ik - r_i) + g^c_k exp(S_ik - c_k)``;
* soft-target sum: with ``P = W`` and upstream gradient ``g``,
  ``du_l = sum_i g_i P_il``, ``dvk_l = (gamma/t) sum_i g_i P_il vq_i``,
  ``dvq_i = (gamma/t) g_i (W vk)_i`` and, through the softmax,
  ``dG_il = g_i P_il (X_il - y_i)`` feeding ``dq = dG K / t``, ``dk = dG^T Q / t``.

Stabilisation: embeddings are unit vectors, so every ``|S_ik| <= 1/t``. When ``2/t`` is
within the exponent range of the dtype (t >= 0.025 in float32, the paper's t = 0.1 included),
the constant shift ``1/t`` replaces the running maximum of online softmax; below that an extra
pass finds the exact row and column maxima. For the soft targets the row maximum is known
exactly: ``q_i`` is one of the rows of ``K`` (``G_ii = |q_i|^2 / t``).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

__all__ = [
    "LogSumExp",
    "SoftTargetSum",
    "choose_backend",
    "m3co_vector",
    "clip_vector",
    "multisoftclip_vector",
    "triton_available",
    "AUTO_TILED_MIN_N",
]

# "auto" uses the dense path up to this many columns and the tiled one above it
# (benchmarks/bench_kernels.py measures the cross-over; docs/kernels.rst reports it).
AUTO_TILED_MIN_N = 4096
TILE_ROWS = 512
TILE_COLS = 2048

# Largest 2/t for which exp(S - 1/t) neither underflows a whole row nor overflows.
_SAFE_SPAN = {torch.float32: 80.0, torch.float64: 600.0}


def triton_available(device: Optional[torch.device] = None) -> bool:
    """Whether the Triton backend can run (Triton importable and a CUDA device present)."""
    if not torch.cuda.is_available() or (device is not None and device.type != "cuda"):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def choose_backend(backend: str, n_rows: int, n_cols: int, device: torch.device) -> str:
    """Resolve ``"auto"`` to a concrete backend; check that an explicit one can run."""
    if backend == "auto":
        if n_cols < AUTO_TILED_MIN_N:
            return "dense"
        return "tiled"
    if backend == "triton" and not triton_available(device):
        raise ValueError("backend='triton' needs the triton package and CUDA tensors; use 'tiled' or 'auto'")
    return backend


def _static_shift_ok(t: float, dtype: torch.dtype) -> bool:
    return 2.0 / t <= _SAFE_SPAN.get(dtype, 80.0)


def _blocks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(start + size, n)


# ----------------------------------------------------------------------------- log-sum-exp


class LogSumExp(torch.autograd.Function):
    """Row (and optionally column) log-sum-exp of ``q @ k.T / t`` in O((n + N) D) memory.

    ``forward(q, k, t, with_cols) -> (r, c)``; ``c`` is an empty tensor when ``with_cols`` is
    False. ``q`` and ``k`` are expected to be L2-normalised (or zero) rows.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, t: float, with_cols: bool):
        """Stream over tiles; save only the inputs and the O(n + N) log-sum-exps."""
        q, k = q.contiguous(), k.contiguous()
        qs = q / t
        n, N = q.shape[0], k.shape[0]
        static = _static_shift_ok(t, q.dtype)
        if static:
            row_shift = q.new_full((n,), 1.0 / t)
            col_shift = q.new_full((N,), 1.0 / t)
        else:
            row_shift, col_shift = _maxima(qs, k, with_cols)
        row_sum = q.new_zeros(n)
        col_sum = q.new_zeros(N) if with_cols else q.new_zeros(0)
        for i0, i1 in _blocks(n, TILE_ROWS):
            qi = qs[i0:i1]
            for k0, k1 in _blocks(N, TILE_COLS):
                s = qi @ k[k0:k1].T
                if static:
                    e = s.sub_(1.0 / t).exp_()
                    row_sum[i0:i1] += e.sum(1)
                    if with_cols:
                        col_sum[k0:k1] += e.sum(0)
                else:
                    row_sum[i0:i1] += (s - row_shift[i0:i1, None]).exp_().sum(1)
                    if with_cols:
                        col_sum[k0:k1] += (s - col_shift[None, k0:k1]).exp_().sum(0)
        r = row_sum.log_().add_(row_shift)
        c = col_sum.log_().add_(col_shift) if with_cols else col_sum
        ctx.save_for_backward(q, k, r, c)
        ctx.t, ctx.with_cols = t, with_cols
        ctx.set_materialize_grads(False)
        return r, c

    @staticmethod
    def backward(ctx, g_r: Optional[Tensor], g_c: Optional[Tensor]):
        """Recompute each tile and accumulate ``dq = A k / t`` and ``dk = A^T q / t``."""
        q, k, r, c = ctx.saved_tensors
        t = ctx.t
        with_cols = ctx.with_cols and g_c is not None
        if g_r is None and not with_cols:
            return None, None, None, None
        n, N = q.shape[0], k.shape[0]
        qs = q / t
        dq = torch.zeros_like(q)
        dk = torch.zeros_like(k)
        static = _static_shift_ok(t, q.dtype)
        if static:
            # A_ik = exp(S_ik - 1/t) (alpha_i + beta_k), alpha_i = g_i exp(1/t - r_i) etc.;
            # 1/t - r_i <= 2/t keeps both factors finite.
            alpha = g_r * torch.exp(1.0 / t - r) if g_r is not None else q.new_zeros(n)
            beta = g_c * torch.exp(1.0 / t - c) if with_cols else None
        for i0, i1 in _blocks(n, TILE_ROWS):
            qi = qs[i0:i1]
            dqi = dq[i0:i1]
            for k0, k1 in _blocks(N, TILE_COLS):
                kk = k[k0:k1]
                s = qi @ kk.T
                if static:
                    e = s.sub_(1.0 / t).exp_()
                    if beta is not None:
                        a = e.mul_(alpha[i0:i1, None] + beta[None, k0:k1])
                    else:
                        a = e.mul_(alpha[i0:i1, None])
                else:
                    a = s.new_zeros(s.shape)
                    if g_r is not None:
                        a += (s - r[i0:i1, None]).exp_().mul_(g_r[i0:i1, None])
                    if with_cols:
                        a += (s - c[None, k0:k1]).exp_().mul_(g_c[None, k0:k1])
                dqi.addmm_(a, kk)
                dk[k0:k1].addmm_(a.T, qi)
        dq.div_(t)
        return dq, dk, None, None


def _maxima(qs: Tensor, k: Tensor, with_cols: bool) -> tuple[Tensor, Tensor]:
    """Exact row and column maxima of ``qs @ k.T`` (used when 1/t is too large for a static shift)."""
    n, N = qs.shape[0], k.shape[0]
    row_max = qs.new_full((n,), float("-inf"))
    col_max = qs.new_full((N,), float("-inf")) if with_cols else qs.new_zeros(0)
    for i0, i1 in _blocks(n, TILE_ROWS):
        for k0, k1 in _blocks(N, TILE_COLS):
            s = qs[i0:i1] @ k[k0:k1].T
            torch.maximum(row_max[i0:i1], s.amax(1), out=row_max[i0:i1])
            if with_cols:
                torch.maximum(col_max[k0:k1], s.amax(0), out=col_max[k0:k1])
    return row_max, col_max


# ----------------------------------------------------------------------------- soft-target sum


class SoftTargetSum(torch.autograd.Function):
    r"""``y_i = sum_l softmax_l(q_i . k_l / t) (u_l + (gamma / t) vq_i . vk_l)`` in O(N D) memory.

    ``forward(q, k, u, vq, vk, t, gamma)``: every row of ``q`` (n, D) must also be a row of
    ``k`` (the targets of a sample include itself), which makes ``|q_i|^2 / t`` the exact
    row maximum used as the softmax shift.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, u: Tensor, vq: Tensor, vk: Tensor, t: float, gamma: float):
        """Accumulate ``O = E [1 | u | vk]`` tile by tile and return ``y``."""
        q, k, vq, vk, u = (x.contiguous() for x in (q, k, vq, vk, u))
        qs = q / t
        n, N = q.shape[0], k.shape[0]
        shift = (q * q).sum(1) / t
        values = torch.cat([torch.ones_like(u)[:, None], u[:, None], vk], dim=1)  # [1 | u | vk]
        out = q.new_zeros(n, values.shape[1])
        for i0, i1 in _blocks(n, TILE_ROWS):
            qi = qs[i0:i1]
            for k0, k1 in _blocks(N, TILE_COLS):
                e = (qi @ k[k0:k1].T).sub_(shift[i0:i1, None]).exp_()
                out[i0:i1].addmm_(e, values[k0:k1])
        norm = out[:, 0]
        mean_vk = out[:, 2:] / norm[:, None]  # (W vk)_i
        y = out[:, 1] / norm + (gamma / t) * (vq * mean_vk).sum(1)
        ctx.save_for_backward(q, k, u, vq, vk, shift, norm, mean_vk, y)
        ctx.t, ctx.gamma = t, gamma
        return y

    @staticmethod
    def backward(ctx, g: Tensor):
        """Recompute each tile of ``P``; see the module docstring for the gradient formulas."""
        q, k, u, vq, vk, shift, norm, mean_vk, y = ctx.saved_tensors
        t, gamma = ctx.t, ctx.gamma
        n, N = q.shape[0], k.shape[0]
        qs = q / t
        scale = g / norm  # P_il g_i = E_il g_i / norm_i
        left = torch.cat([(gamma / t) * vq, torch.ones_like(y)[:, None], -y[:, None]], dim=1)
        right = torch.cat([vk, u[:, None], torch.ones_like(u)[:, None]], dim=1)  # left . right = X_il - y_i
        vq_aug = torch.cat([torch.ones_like(y)[:, None], (gamma / t) * vq], dim=1)
        dq = torch.zeros_like(q)
        dk = torch.zeros_like(k)
        du_dvk = q.new_zeros(N, vq_aug.shape[1])
        for i0, i1 in _blocks(n, TILE_ROWS):
            qi = qs[i0:i1]
            for k0, k1 in _blocks(N, TILE_COLS):
                kk = k[k0:k1]
                pg = (qi @ kk.T).sub_(shift[i0:i1, None]).exp_().mul_(scale[i0:i1, None])
                du_dvk[k0:k1].addmm_(pg.T, vq_aug[i0:i1])
                dg = (left[i0:i1] @ right[k0:k1].T).mul_(pg)
                dq[i0:i1].addmm_(dg, kk)
                dk[k0:k1].addmm_(dg.T, qi)
        dq.div_(t)
        dvq = ((gamma / t) * g)[:, None] * mean_vk
        return dq, dk, du_dvk[:, 0], dvq, du_dvk[:, 1:], None, None


# ----------------------------------------------------------------------------- loss vectors


def _check_backend(backend: str) -> None:
    if backend == "triton":
        from . import triton_kernels  # noqa: F401  (raises a clear error where unavailable)
    elif backend != "tiled":
        raise ValueError(f"kernels handle backend 'tiled' or 'triton'; got {backend!r}")


def _row_col_lse(a_loc: Tensor, a_full: Tensor, b_loc: Tensor, b_full: Tensor, t: float) -> tuple[Tensor, Tensor]:
    """r_i = lse_k S[i, k] for local rows i, c_i = lse_l S[l, i] for local columns i."""
    if a_full.shape[0] == a_loc.shape[0]:  # one process: one pass gives both
        return LogSumExp.apply(a_loc, b_loc, t, True)
    r, _ = LogSumExp.apply(a_loc, b_full, t, False)
    c, _ = LogSumExp.apply(b_loc, a_full, t, False)
    return r, c


def m3co_vector(a_loc, a_full, b_loc, b_full, offset: int, perm: Tensor, lam: Tensor, t: float, *, backend: str = "tiled") -> Tensor:
    """Per-sample M3Co vector (paper form) of the local rows; see :func:`m3co_loss.functional.m3co_pair`."""
    _check_backend(backend)
    r, c = _row_col_lse(a_loc, a_full, b_loc, b_full, t)
    s_ii = (a_loc * b_loc).sum(1) / t
    s_ij = (a_loc * b_loc[perm]).sum(1) / t
    target = lam * s_ii + (1 - lam) * s_ij
    return (r - target) + (lam * c + (1 - lam) * c[perm] - target)


def clip_vector(a_loc, a_full, b_loc, b_full, offset: int, t: float, *, backend: str = "tiled") -> Tensor:
    """Per-sample symmetric InfoNCE vector of the local rows."""
    _check_backend(backend)
    r, c = _row_col_lse(a_loc, a_full, b_loc, b_full, t)
    return r + c - 2 * (a_loc * b_loc).sum(1) / t


def multisoftclip_vector(
    a_loc,
    a_full,
    b_loc,
    b_full,
    offset: int,
    t: float,
    *,
    reference: bool,
    gather: Callable[[Tensor], Tensor],
    backend: str = "tiled",
) -> Tensor:
    """Per-sample MultiSClip vector Ls(a; a, b) of the local rows (targets from a)."""
    _check_backend(backend)
    r, c = _row_col_lse(a_loc, a_full, b_loc, b_full, t)
    if reference:
        # sum_l W_il (S_li + S_il) = sum_l W_il [b_i, a_i] . [a_l, b_l] / t
        y = SoftTargetSum.apply(
            a_loc, a_full, torch.zeros_like(a_full[:, 0]), torch.cat([b_loc, a_loc], 1), torch.cat([a_full, b_full], 1), t, 1.0
        )
        return 0.5 * (c + r - y)
    # sum_l W_il (r_l - 2 S_li), S_li = b_i . a_l / t
    y = SoftTargetSum.apply(a_loc, a_full, gather(r), b_loc, a_full, t, -2.0)
    return c + y
