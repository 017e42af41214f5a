r"""Triton kernels (CUDA) of the O(N D)-memory log-sum-exps and soft-target sums.

The same two building blocks as the tiled torch backend (:mod:`m3co_loss.kernels`), each a
fused Triton kernel that never writes an N x N tile to memory:

* :class:`LogSumExp`: ``r_i = lse_k S_ik`` by online softmax (running maximum, exact for
  every temperature), one program per block of rows; the column log-sum-exps ``c`` are the
  row log-sum-exps of ``S^T`` (a second launch with the operands swapped). Backward:
  ``dq = A k / t`` with ``A_ik = g^r_i e^{S_ik - r_i} + g^c_k e^{S_ik - c_k}``, one program per
  block of rows; ``dk`` is the same kernel on ``S^T``.
* :class:`SoftTargetSum`: ``y_i = sum_l softmax_l(q_i . k_l / t) (u_l + (gamma/t) vq_i . vk_l)``
  with the exact row maximum ``|q_i|^2 / t``. Backward: a row kernel (``dq``, ``dvq``) and a
  column kernel (``dk``, ``dvk``, ``du``) that recompute the tiles of ``P`` and
  ``dG_il = g_i P_il (X_il - y_i)``.

Each program owns a block of rows of its outputs and accumulates ``w @ V`` into them chunk by
chunk of the embedding dimension, so any D works without holding a (block x D) accumulator in
registers. Products run in IEEE float32 (``input_precision="ieee"``, no TF32), so results agree
with the torch backends to float32 rounding. Float64 inputs use the tiled torch kernels.

Status: these kernels are tested for exactness with Triton's CPU interpreter
(``TRITON_INTERPRET=1``, tests/test_triton.py). They have **not** been compiled or timed on a
CUDA GPU in the session that wrote them (none was available); docs/kernels.rst says what is
measured and what is not.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .kernels import first_order_only

try:  # optional dependency: the module imports without it and the backend reports it missing
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None
    tl = None

__all__ = ["LogSumExp", "SoftTargetSum", "available", "BLOCK_M", "BLOCK_N", "BLOCK_D"]

# Tile of the score matrix per program step and chunk of the embedding dimension.
BLOCK_M = 64
BLOCK_N = 64
BLOCK_D = 64


def available() -> bool:
    """Whether the triton package is importable."""
    return triton is not None


def _require() -> None:
    if triton is None:
        raise ImportError("backend='triton' needs the triton package; install it or use backend='tiled'")


if triton is not None:

    @triton.jit
    def _scores(X, Y, rows, cols, row_ok, col_ok, D, stride_x, stride_y,
                BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
        """``X[rows] @ Y[cols]^T`` accumulated over chunks of D (float32, IEEE)."""
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for d0 in range(0, D, BD):
            ds = d0 + tl.arange(0, BD)
            d_ok = ds < D
            x = tl.load(X + rows[:, None] * stride_x + ds[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            y = tl.load(Y + cols[:, None] * stride_y + ds[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            acc += tl.dot(x, tl.trans(y), input_precision="ieee")
        return acc

    @triton.jit
    def _accumulate(OUT, w, V, rows, cols, row_ok, col_ok, D, stride_out, stride_v,
                    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
        """``OUT[rows] += w @ V[cols]``, chunk by chunk of D; the calling program owns OUT's rows."""
        for d0 in range(0, D, BD):
            ds = d0 + tl.arange(0, BD)
            d_ok = ds < D
            v = tl.load(V + cols[:, None] * stride_v + ds[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            ptr = OUT + rows[:, None] * stride_out + ds[None, :]
            mask = row_ok[:, None] & d_ok[None, :]
            acc = tl.load(ptr, mask=mask, other=0.0)
            tl.store(ptr, acc + tl.dot(w, v, input_precision="ieee"), mask=mask)

    @triton.jit
    def _row_lse_kernel(Q, K, OUT, n, N, D, inv_t, stride_q, stride_k,
                        BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        row_ok = rows < n
        m_i = tl.full((BM,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BM,), dtype=tl.float32)
        for start in range(0, N, BN):
            cols = start + tl.arange(0, BN)
            col_ok = cols < N
            s = _scores(Q, K, rows, cols, row_ok, col_ok, D, stride_q, stride_k, BM, BN, BD) * inv_t
            s = tl.where(col_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), 1)
            m_i = m_new
        tl.store(OUT + rows, m_i + tl.log(l_i), mask=row_ok)

    @triton.jit
    def _lse_grad_kernel(Q, K, R, C, GR, GC, DQ, n, N, D, inv_t, stride_q, stride_k, stride_dq,
                         HAS_R: tl.constexpr, HAS_C: tl.constexpr,
                         BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        row_ok = rows < n
        if HAS_R:
            r = tl.load(R + rows, mask=row_ok, other=0.0)
            gr = tl.load(GR + rows, mask=row_ok, other=0.0)
        for start in range(0, N, BN):
            cols = start + tl.arange(0, BN)
            col_ok = cols < N
            s = _scores(Q, K, rows, cols, row_ok, col_ok, D, stride_q, stride_k, BM, BN, BD) * inv_t
            a = tl.zeros((BM, BN), dtype=tl.float32)
            if HAS_R:
                a += gr[:, None] * tl.exp(s - r[:, None])
            if HAS_C:
                c = tl.load(C + cols, mask=col_ok, other=0.0)
                gc = tl.load(GC + cols, mask=col_ok, other=0.0)
                a += gc[None, :] * tl.exp(s - c[None, :])
            a = tl.where(row_ok[:, None] & col_ok[None, :], a * inv_t, 0.0)
            _accumulate(DQ, a, K, rows, cols, row_ok, col_ok, D, stride_dq, stride_k, BM, BN, BD)

    @triton.jit
    def _soft_fwd_kernel(Q, K, U, VQ, VK, SHIFT, Y, NORM, n, N, D, DV, inv_t, coef,
                         stride_q, stride_k, stride_vq, stride_vk,
                         BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        row_ok = rows < n
        shift = tl.load(SHIFT + rows, mask=row_ok, other=0.0)
        norm = tl.zeros((BM,), dtype=tl.float32)
        num = tl.zeros((BM,), dtype=tl.float32)
        for start in range(0, N, BN):
            cols = start + tl.arange(0, BN)
            col_ok = cols < N
            g = _scores(Q, K, rows, cols, row_ok, col_ok, D, stride_q, stride_k, BM, BN, BD) * inv_t
            e = tl.where(col_ok[None, :], tl.exp(g - shift[:, None]), 0.0)
            z = _scores(VQ, VK, rows, cols, row_ok, col_ok, DV, stride_vq, stride_vk, BM, BN, BD)
            u = tl.load(U + cols, mask=col_ok, other=0.0)
            norm += tl.sum(e, 1)
            num += tl.sum(e * (u[None, :] + coef * z), 1)
        tl.store(Y + rows, num / norm, mask=row_ok)
        tl.store(NORM + rows, norm, mask=row_ok)

    @triton.jit
    def _soft_bwd_rows_kernel(Q, K, U, VQ, VK, SHIFT, NORM, Y, G, DQ, DVQ, n, N, D, DV, inv_t, coef,
                              stride_q, stride_k, stride_vq, stride_vk, stride_dq, stride_dvq,
                              BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        row_ok = rows < n
        shift = tl.load(SHIFT + rows, mask=row_ok, other=0.0)
        scale = tl.load(G + rows, mask=row_ok, other=0.0) / tl.load(NORM + rows, mask=row_ok, other=1.0)
        y = tl.load(Y + rows, mask=row_ok, other=0.0)
        for start in range(0, N, BN):
            cols = start + tl.arange(0, BN)
            col_ok = cols < N
            ok = row_ok[:, None] & col_ok[None, :]
            g = _scores(Q, K, rows, cols, row_ok, col_ok, D, stride_q, stride_k, BM, BN, BD) * inv_t
            pg = tl.where(ok, tl.exp(g - shift[:, None]) * scale[:, None], 0.0)  # g_i P_il
            z = _scores(VQ, VK, rows, cols, row_ok, col_ok, DV, stride_vq, stride_vk, BM, BN, BD)
            u = tl.load(U + cols, mask=col_ok, other=0.0)
            dg = pg * (u[None, :] + coef * z - y[:, None])
            _accumulate(DQ, dg * inv_t, K, rows, cols, row_ok, col_ok, D, stride_dq, stride_k, BM, BN, BD)
            _accumulate(DVQ, pg * coef, VK, rows, cols, row_ok, col_ok, DV, stride_dvq, stride_vk, BM, BN, BD)

    @triton.jit
    def _soft_bwd_cols_kernel(Q, K, U, VQ, VK, SHIFT, NORM, Y, G, DK, DVK, DU, n, N, D, DV, inv_t, coef,
                              stride_q, stride_k, stride_vq, stride_vk, stride_dk, stride_dvk,
                              BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
        cols = tl.program_id(0) * BN + tl.arange(0, BN)  # this program's rows of k
        col_ok = cols < N
        u = tl.load(U + cols, mask=col_ok, other=0.0)
        du = tl.zeros((BN,), dtype=tl.float32)
        for start in range(0, n, BM):
            rows = start + tl.arange(0, BM)
            row_ok = rows < n
            ok = col_ok[:, None] & row_ok[None, :]
            shift = tl.load(SHIFT + rows, mask=row_ok, other=0.0)
            scale = tl.load(G + rows, mask=row_ok, other=0.0) / tl.load(NORM + rows, mask=row_ok, other=1.0)
            y = tl.load(Y + rows, mask=row_ok, other=0.0)
            g = _scores(K, Q, cols, rows, col_ok, row_ok, D, stride_k, stride_q, BN, BM, BD) * inv_t  # G^T
            pg = tl.where(ok, tl.exp(g - shift[None, :]) * scale[None, :], 0.0)  # (g_i P_il)^T
            z = _scores(VK, VQ, cols, rows, col_ok, row_ok, DV, stride_vk, stride_vq, BN, BM, BD)
            dg = pg * (u[:, None] + coef * z - y[None, :])
            _accumulate(DK, dg * inv_t, Q, cols, rows, col_ok, row_ok, D, stride_dk, stride_q, BN, BM, BD)
            _accumulate(DVK, pg * coef, VQ, cols, rows, col_ok, row_ok, DV, stride_dvk, stride_vq, BN, BM, BD)
            du += tl.sum(pg, 1)
        tl.store(DU + cols, du, mask=col_ok)


def _grid(size: int, block: int) -> tuple:
    return (triton.cdiv(size, block),)


def _row_lse(q: Tensor, k: Tensor, t: float) -> Tensor:
    out = q.new_empty(q.shape[0])
    _row_lse_kernel[_grid(q.shape[0], BLOCK_M)](
        q, k, out, q.shape[0], k.shape[0], q.shape[1], 1.0 / t, q.stride(0), k.stride(0), BM=BLOCK_M, BN=BLOCK_N, BD=BLOCK_D
    )
    return out


def _lse_grad(q: Tensor, k: Tensor, r: Tensor, c: Tensor, g_r, g_c, t: float) -> Tensor:
    """``dq = A k / t`` for ``S = q k^T / t``; ``g_r`` or ``g_c`` may be None."""
    dq = torch.zeros_like(q)
    dummy = q.new_zeros(1)
    _lse_grad_kernel[_grid(q.shape[0], BLOCK_M)](
        q, k, r, c if g_c is not None else dummy, g_r if g_r is not None else dummy, g_c if g_c is not None else dummy, dq,
        q.shape[0], k.shape[0], q.shape[1], 1.0 / t, q.stride(0), k.stride(0), dq.stride(0),
        HAS_R=g_r is not None, HAS_C=g_c is not None, BM=BLOCK_M, BN=BLOCK_N, BD=BLOCK_D,
    )
    return dq


class LogSumExp(torch.autograd.Function):
    """Triton version of :class:`m3co_loss.kernels.LogSumExp` (float32): ``(r, c)`` of ``q k^T / t``."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, t: float, with_cols: bool):
        """Row log-sum-exps, and the column ones as the rows of ``S^T``."""
        _require()
        q, k = q.contiguous(), k.contiguous()
        r = _row_lse(q, k, t)
        c = _row_lse(k, q, t) if with_cols else q.new_zeros(0)
        ctx.save_for_backward(q, k, r, c)
        ctx.t, ctx.with_cols = t, with_cols
        ctx.set_materialize_grads(False)
        return r, c

    @staticmethod
    @first_order_only
    def backward(ctx, g_r, g_c):
        """``dq = A k / t`` (rows of S) and ``dk = A^T q / t`` (rows of S^T)."""
        q, k, r, c = ctx.saved_tensors
        g_c = g_c.contiguous() if ctx.with_cols and g_c is not None else None
        g_r = g_r.contiguous() if g_r is not None else None
        if g_r is None and g_c is None:
            return None, None, None, None
        if g_c is None:
            c = r.new_zeros(k.shape[0])  # unused by the kernels (HAS_C / HAS_R are False)
        dq = _lse_grad(q, k, r, c, g_r, g_c, ctx.t)
        dk = _lse_grad(k, q, c, r, g_c, g_r, ctx.t)
        return dq, dk, None, None


class SoftTargetSum(torch.autograd.Function):
    """Triton version of :class:`m3co_loss.kernels.SoftTargetSum` (float32)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, u: Tensor, vq: Tensor, vk: Tensor, t: float, gamma: float):
        """One program per block of rows: online sums of ``E`` and ``E X`` (no N x N tile stored)."""
        _require()
        q, k, u, vq, vk = (x.contiguous() for x in (q, k, u, vq, vk))
        n, N = q.shape[0], k.shape[0]
        shift = (q * q).sum(1) / t
        y, norm = q.new_empty(n), q.new_empty(n)
        _soft_fwd_kernel[_grid(n, BLOCK_M)](
            q, k, u, vq, vk, shift, y, norm, n, N, q.shape[1], vq.shape[1], 1.0 / t, gamma / t,
            q.stride(0), k.stride(0), vq.stride(0), vk.stride(0), BM=BLOCK_M, BN=BLOCK_N, BD=BLOCK_D,
        )
        ctx.save_for_backward(q, k, u, vq, vk, shift, norm, y)
        ctx.t, ctx.gamma = t, gamma
        return y

    @staticmethod
    @first_order_only
    def backward(ctx, g: Tensor):
        """Row kernel for ``dq, dvq``; column kernel for ``dk, dvk, du``."""
        q, k, u, vq, vk, shift, norm, y = ctx.saved_tensors
        t, gamma = ctx.t, ctx.gamma
        g = g.contiguous()
        n, N, D, DV = q.shape[0], k.shape[0], q.shape[1], vq.shape[1]
        dq, dk, dvq, dvk, du = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(vq), torch.zeros_like(vk), torch.zeros_like(u)
        common = (u, vq, vk, shift, norm, y, g)
        _soft_bwd_rows_kernel[_grid(n, BLOCK_M)](
            q, k, *common, dq, dvq, n, N, D, DV, 1.0 / t, gamma / t,
            q.stride(0), k.stride(0), vq.stride(0), vk.stride(0), dq.stride(0), dvq.stride(0),
            BM=BLOCK_M, BN=BLOCK_N, BD=BLOCK_D,
        )
        _soft_bwd_cols_kernel[_grid(N, BLOCK_N)](
            q, k, *common, dk, dvk, du, n, N, D, DV, 1.0 / t, gamma / t,
            q.stride(0), k.stride(0), vq.stride(0), vk.stride(0), dk.stride(0), dvk.stride(0),
            BM=BLOCK_M, BN=BLOCK_N, BD=BLOCK_D,
        )
        return dq, dk, du, dvq, dvk, None, None
