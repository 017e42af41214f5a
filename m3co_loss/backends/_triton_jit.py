"""The Triton kernels of the Triton backend (imported on first use: this module imports triton).

Each kernel is a ``triton.jit`` function launched by :mod:`m3co_loss.backends.triton`, whose
docstring describes the algorithms. Their parameters are raw pointers, sizes and strides, and
``tl.constexpr`` block sizes, as Triton expects (Triton reads the annotations, so they carry no
Python type annotations). The scale ``1/t`` (``INV_T``) and the value coefficient ``gamma/t``
(``COEF``) are read from one-element device tensors, so that a temperature held in a tensor
(a learnable one) reaches the kernels without a host synchronisation.

The products run as ``PREC`` says, always accumulated in float32 (``tl.dot``'s accumulator;
every softmax and log-sum-exp state is float32 too): ``"ieee"`` (float32 FMA), ``"tf32"``
(TF32 tensor cores), ``"bf16"`` or ``"fp16"`` (the operands rounded to that type for tensor
cores; the softmax weights of the weighted sums ``w @ V`` are rounded to bfloat16 in both, which
has float32's exponent range, as weights scaled by ``1/t`` may exceed float16's).

Exponents of quantities that cannot be positive in exact arithmetic (``S - lse``, ``G - max``)
are clamped at 0: when 1/t is huge their rounding error can be positive and large, and the
clamp keeps the factors within [0, 1].
"""

import triton
import triton.language as tl

__all__ = ["row_lse_kernel", "lse_grad_kernel", "soft_fwd_kernel", "soft_bwd_rows_kernel", "soft_bwd_cols_kernel"]


@triton.jit
def _dot(x, y, PREC: tl.constexpr, WEIGHTS: tl.constexpr):
    """``x @ y`` accumulated in float32, the operands rounded as ``PREC`` says (see the module docstring)."""
    if PREC == "bf16" or (PREC == "fp16" and WEIGHTS):
        out = tl.dot(x.to(tl.bfloat16), y.to(tl.bfloat16), out_dtype=tl.float32)
    elif PREC == "fp16":
        out = tl.dot(x.to(tl.float16), y.to(tl.float16), out_dtype=tl.float32)
    else:
        out = tl.dot(x, y, input_precision=PREC)
    return out


@triton.jit
def _scores(X, Y, rows, cols, row_ok, col_ok, D, stride_x, stride_y,
            BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr):
    """``X[rows] @ Y[cols]^T`` accumulated over chunks of D in float32."""
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for d0 in range(0, D, BD):
        ds = d0 + tl.arange(0, BD)
        d_ok = ds < D
        x = tl.load(X + rows[:, None] * stride_x + ds[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        y = tl.load(Y + cols[:, None] * stride_y + ds[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc += _dot(x, tl.trans(y), PREC, False)
    return acc


@triton.jit
def _accumulate(OUT, w, V, rows, cols, row_ok, col_ok, D, stride_out, stride_v,
                BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr):
    """``OUT[rows] += w @ V[cols]``, chunk by chunk of D; the calling program owns OUT's rows."""
    for d0 in range(0, D, BD):
        ds = d0 + tl.arange(0, BD)
        d_ok = ds < D
        v = tl.load(V + cols[:, None] * stride_v + ds[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        ptr = OUT + rows[:, None] * stride_out + ds[None, :]
        mask = row_ok[:, None] & d_ok[None, :]
        acc = tl.load(ptr, mask=mask, other=0.0)
        tl.store(ptr, acc + _dot(w, v, PREC, True), mask=mask)


@triton.jit
def row_lse_kernel(Q, K, OUT, INV_T, n, N, D, stride_q, stride_k,
                   BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    row_ok = rows < n
    inv_t = tl.load(INV_T)
    m_i = tl.full((BM,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BM,), dtype=tl.float32)
    for start in range(0, N, BN):
        cols = start + tl.arange(0, BN)
        col_ok = cols < N
        s = _scores(Q, K, rows, cols, row_ok, col_ok, D, stride_q, stride_k, BM, BN, BD, PREC) * inv_t
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), 1)
        m_i = m_new
    tl.store(OUT + rows, m_i + tl.log(l_i), mask=row_ok)


@triton.jit
def lse_grad_kernel(Q, K, R, C, GR, GC, DQ, INV_T, n, N, D, stride_q, stride_k, stride_dq,
                    HAS_R: tl.constexpr, HAS_C: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    row_ok = rows < n
    inv_t = tl.load(INV_T)
    if HAS_R:
        r = tl.load(R + rows, mask=row_ok, other=0.0)
        gr = tl.load(GR + rows, mask=row_ok, other=0.0)
    for start in range(0, N, BN):
        cols = start + tl.arange(0, BN)
        col_ok = cols < N
        s = _scores(Q, K, rows, cols, row_ok, col_ok, D, stride_q, stride_k, BM, BN, BD, PREC) * inv_t
        a = tl.zeros((BM, BN), dtype=tl.float32)
        if HAS_R:
            a += gr[:, None] * tl.exp(tl.minimum(s - r[:, None], 0.0))
        if HAS_C:
            c = tl.load(C + cols, mask=col_ok, other=0.0)
            gc = tl.load(GC + cols, mask=col_ok, other=0.0)
            a += gc[None, :] * tl.exp(tl.minimum(s - c[None, :], 0.0))
        a = tl.where(row_ok[:, None] & col_ok[None, :], a * inv_t, 0.0)
        _accumulate(DQ, a, K, rows, cols, row_ok, col_ok, D, stride_dq, stride_k, BM, BN, BD, PREC)


@triton.jit
def soft_fwd_kernel(Q, K, U, VQ, VK, SHIFT, Y, NORM, INV_T, COEF, n, N, D, DV,
                    stride_q, stride_k, stride_vq, stride_vk,
                    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr):
    """Online softmax over the columns: the running row maximum of G is the shift, stored in SHIFT."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    row_ok = rows < n
    inv_t = tl.load(INV_T)
    coef = tl.load(COEF)
    m_i = tl.full((BM,), float("-inf"), dtype=tl.float32)
    norm = tl.zeros((BM,), dtype=tl.float32)
    num = tl.zeros((BM,), dtype=tl.float32)
    for start in range(0, N, BN):
        cols = start + tl.arange(0, BN)
        col_ok = cols < N
        g = _scores(Q, K, rows, cols, row_ok, col_ok, D, stride_q, stride_k, BM, BN, BD, PREC) * inv_t
        g = tl.where(col_ok[None, :], g, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(g, 1))
        rescale = tl.exp(m_i - m_new)
        e = tl.exp(g - m_new[:, None])
        z = _scores(VQ, VK, rows, cols, row_ok, col_ok, DV, stride_vq, stride_vk, BM, BN, BD, PREC)
        u = tl.load(U + cols, mask=col_ok, other=0.0)
        norm = norm * rescale + tl.sum(e, 1)
        num = num * rescale + tl.sum(e * (u[None, :] + coef * z), 1)
        m_i = m_new
    tl.store(Y + rows, num / norm, mask=row_ok)
    tl.store(NORM + rows, norm, mask=row_ok)
    tl.store(SHIFT + rows, m_i, mask=row_ok)


@triton.jit
def soft_bwd_rows_kernel(Q, K, U, VQ, VK, SHIFT, NORM, Y, G, DQ, DVQ, INV_T, COEF, n, N, D, DV,
                         stride_q, stride_k, stride_vq, stride_vk, stride_dq, stride_dvq,
                         HAS_DQ: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    row_ok = rows < n
    inv_t = tl.load(INV_T)
    coef = tl.load(COEF)
    shift = tl.load(SHIFT + rows, mask=row_ok, other=0.0)
    scale = tl.load(G + rows, mask=row_ok, other=0.0) / tl.load(NORM + rows, mask=row_ok, other=1.0)
    y = tl.load(Y + rows, mask=row_ok, other=0.0)
    for start in range(0, N, BN):
        cols = start + tl.arange(0, BN)
        col_ok = cols < N
        ok = row_ok[:, None] & col_ok[None, :]
        g = _scores(Q, K, rows, cols, row_ok, col_ok, D, stride_q, stride_k, BM, BN, BD, PREC) * inv_t
        pg = tl.where(ok, tl.exp(tl.minimum(g - shift[:, None], 0.0)) * scale[:, None], 0.0)  # g_i P_il
        z = _scores(VQ, VK, rows, cols, row_ok, col_ok, DV, stride_vq, stride_vk, BM, BN, BD, PREC)
        if HAS_DQ:
            u = tl.load(U + cols, mask=col_ok, other=0.0)
            dg = pg * (u[None, :] + coef * z - y[:, None])
            _accumulate(DQ, dg * inv_t, K, rows, cols, row_ok, col_ok, D, stride_dq, stride_k, BM, BN, BD, PREC)
        _accumulate(DVQ, pg * coef, VK, rows, cols, row_ok, col_ok, DV, stride_dvq, stride_vk, BM, BN, BD, PREC)


@triton.jit
def soft_bwd_cols_kernel(Q, K, U, VQ, VK, SHIFT, NORM, Y, G, DK, DVK, DU, INV_T, COEF, n, N, D, DV,
                         stride_q, stride_k, stride_vq, stride_vk, stride_dk, stride_dvk,
                         HAS_DK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr):
    cols = tl.program_id(0) * BN + tl.arange(0, BN)  # this program's rows of k
    col_ok = cols < N
    inv_t = tl.load(INV_T)
    coef = tl.load(COEF)
    u = tl.load(U + cols, mask=col_ok, other=0.0)
    du = tl.zeros((BN,), dtype=tl.float32)
    for start in range(0, n, BM):
        rows = start + tl.arange(0, BM)
        row_ok = rows < n
        ok = col_ok[:, None] & row_ok[None, :]
        shift = tl.load(SHIFT + rows, mask=row_ok, other=0.0)
        scale = tl.load(G + rows, mask=row_ok, other=0.0) / tl.load(NORM + rows, mask=row_ok, other=1.0)
        y = tl.load(Y + rows, mask=row_ok, other=0.0)
        g = _scores(K, Q, cols, rows, col_ok, row_ok, D, stride_k, stride_q, BN, BM, BD, PREC) * inv_t  # G^T
        pg = tl.where(ok, tl.exp(tl.minimum(g - shift[None, :], 0.0)) * scale[None, :], 0.0)  # (g_i P_il)^T
        z = _scores(VK, VQ, cols, rows, col_ok, row_ok, DV, stride_vk, stride_vq, BN, BM, BD, PREC)
        if HAS_DK:
            dg = pg * (u[:, None] + coef * z - y[None, :])
            _accumulate(DK, dg * inv_t, Q, cols, rows, col_ok, row_ok, D, stride_dk, stride_q, BN, BM, BD, PREC)
        _accumulate(DVK, pg * coef, VQ, cols, rows, col_ok, row_ok, DV, stride_dvk, stride_vq, BN, BM, BD, PREC)
        du += tl.sum(pg, 1)
    tl.store(DU + cols, du, mask=col_ok)
