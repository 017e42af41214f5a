r"""The tiled backend: O(N D)-memory log-sum-exps and soft-target sums with exact gradients.

Both M3CoL losses need a few reductions of N x N similarity matrices, never the matrices
themselves. This module computes them tile by tile, keeps O(N) statistics, and recomputes
each tile in the backward pass. Every identity used here is written out on the docs page
``kernels`` (docs/kernels.rst); the short form follows.

**Log-sum-exps** (M3Co, CLIP; :class:`LogSumExp`). For ``S = Q K^T / t``,
``r_i = log sum_k e^{S_ik}`` and ``c_k = log sum_i e^{S_ik}``; with upstream gradients
``g^r, g^c``::

    dQ = A K / t,   dK = A^T Q / t,   A_ik = g^r_i e^{S_ik - r_i} + g^c_k e^{S_ik - c_k}
                                          = e^{S_ik - 1/t} (alpha_i + beta_k),
    alpha_i = g^r_i e^{1/t - r_i},   beta_k = g^c_k e^{1/t - c_k}.

**Soft-target sums** (general MultiSClip path, used with several processes;
:class:`SoftTargetSum`)::

    y_i = sum_l W_il (u_l + (gamma / t) vq_i . vk_l) = (O_i0^{-1}) (O_i1 + (gamma / t) vq_i . O_i,2:),
    O = E [1 | u | vk],  E = exp(Q K^T / t - m),

e.g. ``sum_l W_il S_li = (W A)_i . b_i / t``.

**Stabilisation.** Embeddings are unit vectors, so ``|S_ik| <= 1/t``. When ``2/t`` fits the
exponent range (t >= 0.025 in float32, t >= 1/300 in float64; the paper's t = 0.1 included)
the constant ``1/t`` replaces the running maximum of online softmax, and it is folded into
the matrix product by one extra column: ``[q / t | 1] . [k | -1/t] = S - 1/t``. Below that, the kernels find exact maxima instead.

**CPU threads.** On CPU the tiles are split round robin over ``torch.get_num_threads()``
worker threads that run one torch thread each (and private accumulators, summed at the end),
rather than splitting every small operation over OpenMP threads: there is no barrier per
operation (each costs a scheduler time slice when other processes share the cores), and each
core works on its own tile in its own cache. The assignment of tiles to workers is static, so
results do not depend on timing. ``torch.set_num_threads`` is set to 1 inside the workers and
restored afterwards; ``set_config(parallel_workers=False)`` uses torch's own threading instead.

Single-process MultiSClip runs the fused kernel :class:`~m3co_loss.backends.softclip.SoftClip`
instead, when the temperature allows the static shift. The per-sample loss vectors are written over the two primitives by :class:`StreamingBackend`,
which the Triton backend instantiates with its own kernels.

Tile sizes (``tile_rows``, ``tile_cols``) and the CPU worker threads (``parallel_workers``) are
read from :func:`m3co_loss.backends.get_config` once per forward pass; the backward pass uses
the same values.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Tuple, Union, cast

import torch
from torch import Tensor

from ._config import get_config
from ._interface import PairWeights, Rows
from ._tiling import (
    Scratch,
    Temperature,
    blocks,
    first_order_only,
    host_value,
    max_is_diagonal,
    num_workers,
    operand,
    run_tiles,
    scaled,
    shifter,
    static_shift_ok,
    temperature_grad,
)
from .softclip import SoftClipCoefficients, soft_clip

__all__ = [
    "LogSumExp",
    "SoftTargetSum",
    "logsumexp",
    "soft_target_sum",
    "StreamingBackend",
    "m3co_vector",
    "clip_vector",
    "multisoftclip_vector",
    "multisoftclip_pair_vector",
    "multisoftclip_pairs",
]


# ----------------------------------------------------------------------------- log-sum-exp

_Tile = Tuple[int, int, int, int]  # rows i0:i1 against columns k0:k1


class LogSumExp(torch.autograd.Function):
    """Row (and optionally column) log-sum-exp of ``q @ k.T / t`` in O((n + N) D) memory.

    ``forward(q, k, t, with_cols) -> (r, c)``; ``c`` is an empty tensor when ``with_cols`` is
    False. ``q`` and ``k`` are expected to be L2-normalised (or zero) rows. ``t`` is a float or
    a 0-dim tensor; a tensor's gradient is ``dL/dt = -<q, dL/dq> / t``.
    """

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, t: Temperature, with_cols: bool) -> Tuple[Tensor, Tensor]:
        """Stream over tiles; save only the inputs and the O(n + N) log-sum-exps."""
        q, k = q.contiguous(), k.contiguous()
        n, N = q.shape[0], k.shape[0]
        config = get_config()
        tile_rows, tile_cols = config.tile_rows, config.tile_cols
        rows, cols = min(tile_rows, n), min(tile_cols, N)
        ts, value = operand(t), host_value(t)
        static = static_shift_ok(value, q.dtype)
        row_shift: Union[float, Tensor]
        col_shift: Union[float, Tensor]
        if static:
            assert value is not None  # the static shift needs the value
            ones = q.new_ones(max(rows, cols))
            q_aug, k_aug = scaled(q, value), shifter(k, value)
            tasks = [(i0, i1, k0, k1) for i0, i1 in blocks(n, tile_rows) for k0, k1 in blocks(N, tile_cols)]

            def setup() -> Tuple[Scratch, Tensor, Optional[Tensor]]:
                return Scratch(q, 1, rows, cols), q.new_zeros(n), q.new_zeros(N) if with_cols else None

            def work(my_tasks: Sequence[_Tile], state: Any) -> List[Optional[Tensor]]:
                scratch, row_sum, col_sum = state
                for i0, i1, k0, k1 in my_tasks:
                    e = torch.mm(q_aug[i0:i1], k_aug[k0:k1].T, out=scratch(0, i1 - i0, k1 - k0)).exp_()
                    row_sum[i0:i1].addmv_(e, ones[: k1 - k0])
                    if with_cols:
                        col_sum[k0:k1].addmv_(e.T, ones[: i1 - i0])
                return [row_sum, col_sum]

            row_sum, col_sum = run_tiles(tasks, work, num_workers(q, len(tasks), config.parallel_workers), setup)
            col_sum = col_sum if with_cols else q.new_zeros(0)
            row_shift = col_shift = 1.0 / ts
        else:
            scratch = Scratch(q, 1, rows, cols)
            row_sum = q.new_zeros(n)
            col_sum = q.new_zeros(N) if with_cols else q.new_zeros(0)
            qs = q / ts
            row_shift, col_shift = _maxima(qs, k, with_cols, tile_rows, tile_cols)
            for i0, i1 in blocks(n, tile_rows):
                for k0, k1 in blocks(N, tile_cols):
                    s = torch.mm(qs[i0:i1], k[k0:k1].T, out=scratch(0, i1 - i0, k1 - k0))
                    row_sum[i0:i1] += (s - row_shift[i0:i1, None]).exp_().sum(1)
                    if with_cols:
                        col_sum[k0:k1] += (s - col_shift[None, k0:k1]).exp_().sum(0)
        r = row_sum.log_().add_(row_shift)
        c = col_sum.log_().add_(col_shift) if with_cols else col_sum
        # the augmented operands are kept for the backward pass: rebuilding them costs two
        # O(N D) allocations whose page faults are a visible share of a step
        augmented = (q_aug, k_aug) if static else ()
        ctx.save_for_backward(q, k, r, c, *augmented)
        ctx.t, ctx.static, ctx.with_cols, ctx.config = ts, static, with_cols, config
        ctx.set_materialize_grads(False)
        return r, c

    @staticmethod
    @first_order_only
    def backward(ctx: Any, g_r: Optional[Tensor], g_c: Optional[Tensor]) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], None]:
        """Recompute each tile and accumulate ``dq = A k / t`` and ``dk = A^T q / t``; ``dt = -<q, dq> / t``."""
        q, k, r, c, *augmented = ctx.saved_tensors
        t = ctx.t
        with_cols = ctx.with_cols and g_c is not None
        if g_r is None and not with_cols:
            return None, None, None, None
        n, N = q.shape[0], k.shape[0]
        config = ctx.config
        tile_rows, tile_cols = config.tile_rows, config.tile_cols
        rows, cols = min(tile_rows, n), min(tile_cols, N)
        if ctx.static:
            # A_ik / t = exp(S_ik - 1/t) (alpha_i + beta_k); 1/t - r_i <= 2/t keeps both factors
            # finite. The 1/t of dq = A k / t rides on alpha and beta.
            alpha = (g_r / t) * torch.exp(1.0 / t - r) if g_r is not None else None
            beta = (g_c / t) * torch.exp(1.0 / t - c) if with_cols else None
            q_aug, k_aug = augmented
            row_blocks = list(blocks(n, tile_rows))
            # A worker that owns whole blocks of rows writes its rows of a shared dq; with too
            # few row blocks the tiles are split instead and every worker keeps its own dq.
            by_rows = len(row_blocks) >= torch.get_num_threads()
            if by_rows:
                tasks = [[(i0, i1, k0, k1) for k0, k1 in blocks(N, tile_cols)] for i0, i1 in row_blocks]
                shared_dq = torch.zeros_like(q)
            else:
                tasks = [[(i0, i1, k0, k1)] for i0, i1 in row_blocks for k0, k1 in blocks(N, tile_cols)]

            def setup() -> Tuple[Scratch, Tensor, Tensor]:
                return Scratch(q, 2, rows, cols), shared_dq if by_rows else torch.zeros_like(q), torch.zeros_like(k)

            def work(my_tasks: Sequence[List[_Tile]], state: Tuple[Scratch, Tensor, Tensor]) -> List[Optional[Tensor]]:
                scratch, dq, dk = state
                for i0, i1, k0, k1 in (tile for group in my_tasks for tile in group):
                    a = torch.mm(q_aug[i0:i1], k_aug[k0:k1].T, out=scratch(0, i1 - i0, k1 - k0)).exp_()
                    if alpha is not None and beta is not None:
                        a.mul_(torch.add(alpha[i0:i1, None], beta[None, k0:k1], out=scratch(1, i1 - i0, k1 - k0)))
                    elif alpha is not None:
                        a.mul_(alpha[i0:i1, None])
                    else:  # alpha and beta are not both None
                        a.mul_(cast(Tensor, beta)[None, k0:k1])
                    dq[i0:i1].addmm_(a, k[k0:k1])
                    dk[k0:k1].addmm_(a.T, q[i0:i1])
                return [None if by_rows else dq, dk]

            dq, dk = run_tiles(tasks, work, num_workers(q, len(tasks), config.parallel_workers), setup)
            dq = shared_dq if by_rows else dq
        else:
            scratch = Scratch(q, 2, rows, cols)
            dq = torch.zeros_like(q)
            dk = torch.zeros_like(k)
            qs = q / t
            for i0, i1 in blocks(n, tile_rows):
                for k0, k1 in blocks(N, tile_cols):
                    s = torch.mm(qs[i0:i1], k[k0:k1].T, out=scratch(0, i1 - i0, k1 - k0))
                    a = torch.zeros_like(s)
                    if g_r is not None:
                        a += (s - r[i0:i1, None]).exp_().mul_(g_r[i0:i1, None])
                    if with_cols:
                        a += (s - c[None, k0:k1]).exp_().mul_(cast(Tensor, g_c)[None, k0:k1])
                    dq[i0:i1].addmm_(a, k[k0:k1])
                    dk[k0:k1].addmm_(a.T, q[i0:i1])
            dq, dk = dq.div_(t), dk.div_(t)
        dt = temperature_grad(t, [(q, dq)]) if ctx.needs_input_grad[2] else None
        return dq, dk, dt, None


def _maxima(qs: Tensor, k: Tensor, with_cols: bool, tile_rows: int, tile_cols: int) -> Tuple[Tensor, Tensor]:
    """Exact row and column maxima of ``qs @ k.T`` (used when 1/t is too large for a static shift)."""
    n, N = qs.shape[0], k.shape[0]
    row_max = qs.new_full((n,), float("-inf"))
    col_max = qs.new_full((N,), float("-inf")) if with_cols else qs.new_zeros(0)
    for i0, i1 in blocks(n, tile_rows):
        for k0, k1 in blocks(N, tile_cols):
            s = qs[i0:i1] @ k[k0:k1].T
            torch.maximum(row_max[i0:i1], s.amax(1), out=row_max[i0:i1])
            if with_cols:
                torch.maximum(col_max[k0:k1], s.amax(0), out=col_max[k0:k1])
    return row_max, col_max


# ----------------------------------------------------------------------------- soft-target sum


class SoftTargetSum(torch.autograd.Function):
    r"""``y_i = sum_l softmax_l(q_i . k_l / t) (u_l + (gamma / t_v) vq_i . vk_l)`` in O(N D) memory.

    ``forward(q, k, u, vq, vk, t, gamma, t_v)``: every row of ``q`` (n, D) must also be a row of
    ``k`` (the targets of a sample include itself), which makes ``|q_i|^2 / t`` the exact row
    maximum used as the softmax shift (for temperatures too small for its rounding error, the
    computed row maxima). ``t`` (the soft targets') and ``t_v`` (the values') are floats or
    0-dim tensors, possibly the same one; their gradients are ``dL/dt = -<q, dL/dq> / t`` and
    ``dL/dt_v = -<vq, dL/dvq> / t_v``. This is the general path (several processes, or
    temperatures too small for the static shift of :class:`~m3co_loss.backends.softclip.SoftClip`).
    """

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, u: Tensor, vq: Tensor, vk: Tensor, t: Temperature, gamma: float, t_v: Temperature) -> Tensor:
        """Accumulate ``O = E [1 | u | vk]`` tile by tile and return ``y``."""
        q, k, vq, vk, u = (x.contiguous() for x in (q, k, vq, vk, u))
        ts, coef = operand(t), gamma / operand(t_v)
        qs = q / ts
        n, N = q.shape[0], k.shape[0]
        config = get_config()
        tile_rows, tile_cols = config.tile_rows, config.tile_cols
        if max_is_diagonal(host_value(t), q):
            shift = (q * q).sum(1) / ts
        else:
            shift = _maxima(qs, k, False, tile_rows, tile_cols)[0]
        values = torch.cat([torch.ones_like(u)[:, None], u[:, None], vk], dim=1)  # [1 | u | vk]
        out = q.new_zeros(n, values.shape[1])
        for i0, i1 in blocks(n, tile_rows):
            qi = qs[i0:i1]
            for k0, k1 in blocks(N, tile_cols):
                e = (qi @ k[k0:k1].T).sub_(shift[i0:i1, None]).exp_()
                out[i0:i1].addmm_(e, values[k0:k1])
        norm = out[:, 0]
        mean_vk = out[:, 2:] / norm[:, None]  # (W vk)_i
        y = out[:, 1] / norm + coef * (vq * mean_vk).sum(1)
        ctx.save_for_backward(q, k, u, vq, vk, shift, norm, mean_vk, y)
        ctx.t, ctx.t_v, ctx.coef, ctx.config = ts, operand(t_v), coef, config
        return y

    @staticmethod
    @first_order_only
    def backward(ctx: Any, g: Tensor) -> Tuple[Optional[Tensor], ...]:
        """Recompute each tile of ``P``; see the module docstring for the gradient formulas."""
        q, k, u, vq, vk, shift, norm, mean_vk, y = ctx.saved_tensors
        t, coef = ctx.t, ctx.coef
        n, N = q.shape[0], k.shape[0]
        tile_rows, tile_cols = ctx.config.tile_rows, ctx.config.tile_cols
        need_q, need_k, _, _, _, need_t, _, need_t_v = ctx.needs_input_grad
        # the softmax's operands and temperature need the tiles of dG; detached soft targets do not
        need_logits = need_q or need_k or need_t
        qs = q / t
        scale = g / norm  # P_il g_i = E_il g_i / norm_i
        left = torch.cat([coef * vq, torch.ones_like(y)[:, None], -y[:, None]], dim=1)
        right = torch.cat([vk, u[:, None], torch.ones_like(u)[:, None]], dim=1)  # left . right = X_il - y_i
        vq_aug = torch.cat([torch.ones_like(y)[:, None], coef * vq], dim=1)
        dq = torch.zeros_like(q) if need_logits else None
        dk = torch.zeros_like(k) if need_logits else None
        du_dvk = q.new_zeros(N, vq_aug.shape[1])
        for i0, i1 in blocks(n, tile_rows):
            qi = qs[i0:i1]
            for k0, k1 in blocks(N, tile_cols):
                kk = k[k0:k1]
                pg = (qi @ kk.T).sub_(shift[i0:i1, None]).exp_().mul_(scale[i0:i1, None])
                du_dvk[k0:k1].addmm_(pg.T, vq_aug[i0:i1])
                if dq is not None and dk is not None:
                    dg = (left[i0:i1] @ right[k0:k1].T).mul_(pg)
                    dq[i0:i1].addmm_(dg, kk)
                    dk[k0:k1].addmm_(dg.T, qi)
        if dq is not None:
            dq.div_(t)
        dvq = (coef * g)[:, None] * mean_vk
        dt = temperature_grad(ctx.t, [(q, cast(Tensor, dq))]) if need_t else None
        dt_v = temperature_grad(ctx.t_v, [(vq, dvq)]) if need_t_v else None
        return dq, dk, du_dvk[:, 0], dvq, du_dvk[:, 1:], dt, None, dt_v


# ----------------------------------------------------------------------------- primitives

LogSumExpFn = Callable[[Tensor, Tensor, Temperature, bool], Tuple[Tensor, Tensor]]
SoftTargetSumFn = Callable[..., Tensor]


def logsumexp(q: Tensor, k: Tensor, t: Temperature, with_cols: bool) -> Tuple[Tensor, Tensor]:
    """``(r, c)``: row and (if ``with_cols``, else empty) column log-sum-exps of ``q k^T / t`` (:class:`LogSumExp`).

    ``t`` is a float or a 0-dim tensor of ``q``'s dtype and device, which may require grad.
    """
    r, c = LogSumExp.apply(q, k, t, with_cols)  # type: ignore[no-untyped-call]
    return r, c


def soft_target_sum(
    q: Tensor, k: Tensor, u: Tensor, vq: Tensor, vk: Tensor, t: Temperature, gamma: float, t_v: Optional[Temperature] = None
) -> Tensor:
    """``y_i = sum_l softmax_l(q_i . k_l / t) (u_l + (gamma / t_v) vq_i . vk_l)`` (:class:`SoftTargetSum`; ``t_v`` None: ``t``)."""
    y: Tensor = SoftTargetSum.apply(q, k, u, vq, vk, t, gamma, t if t_v is None else t_v)  # type: ignore[no-untyped-call]
    return y


# ----------------------------------------------------------------------------- loss vectors


def _identity(x: Tensor) -> Tensor:
    return x


def _detached(t: Temperature) -> Temperature:
    return t.detach() if isinstance(t, Tensor) else t


class StreamingBackend:
    """The per-sample loss vectors of a backend, written over its two O(N D)-memory primitives.

    Every temperature is a float or a 0-dim tensor (which may require grad); MultiSClip takes a
    separate ``target_t`` for its soft targets (None: ``t``) and ``detach_targets``, which makes
    the soft targets constants (no gradient through them, to the embeddings or a temperature).

    Args:
        logsumexp: ``(q, k, t, with_cols) -> (r, c)``, like :func:`logsumexp`.
        soft_target_sum: ``(q, k, u, vq, vk, t, gamma, t_v) -> y``, like :func:`soft_target_sum`.
        fused_softclip: whether single-process MultiSClip runs the fused
            :class:`~m3co_loss.backends.softclip.SoftClip` (when the temperatures allow its
            static shift) instead of the two primitives.
    """

    def __init__(self, logsumexp: LogSumExpFn, soft_target_sum: SoftTargetSumFn, *, fused_softclip: bool) -> None:
        self.logsumexp = logsumexp
        self.soft_target_sum = soft_target_sum
        self.fused_softclip = fused_softclip

    def __repr__(self) -> str:
        names = (f"{getattr(f, '__module__', '?')}.{getattr(f, '__name__', f)}" for f in (self.logsumexp, self.soft_target_sum))
        return f"StreamingBackend({', '.join(names)}, fused_softclip={self.fused_softclip})"

    def _fused(self, a: Tensor, t: Temperature, target_t: Temperature, distributed: bool) -> bool:
        """Whether the fused single-process MultiSClip kernel applies (both temperatures on the host and large enough)."""
        if not self.fused_softclip or distributed:
            return False
        return static_shift_ok(host_value(t), a.dtype) and static_shift_ok(host_value(target_t), a.dtype)

    def _row_col_lse(self, a: Rows, b: Rows, t: Temperature, distributed: bool) -> Tuple[Tensor, Tensor]:
        """r_i = lse_k S[i, k] for local rows i, c_i = lse_l S[l, i] for local columns i."""
        # Decided by the process group, not by row counts: a rank that holds the whole batch must
        # still route its gradient through the gather, or the ranks holding no row wait for it.
        if not distributed:  # one process: one pass gives both
            return self.logsumexp(a.local, b.local, t, True)
        r, _ = self.logsumexp(a.local, b.full, t, False)
        c, _ = self.logsumexp(b.local, a.full, t, False)
        return r, c

    def m3co_vector(
        self, a: Rows, b: Rows, perm: Tensor, lam: Tensor, t: Temperature, *, reference: bool = False, distributed: bool = False
    ) -> Tensor:
        """Per-sample M3Co L3(a -> b) of the local mixed rows; see :func:`m3co_loss.functional.m3co_pair`."""
        r, c = self._row_col_lse(a, b, t, distributed)
        # lam_i S_ii + (1 - lam_i) S_ij = a_i . (lam_i b_i + (1 - lam_i) b_j) / t: one gathered dot product
        target = (a.local * torch.lerp(b.local[perm], b.local, lam[:, None])).sum(1) / t
        v = r + torch.lerp(c[perm], c, lam) - 2 * target
        return 0.5 * v if reference else v

    def clip_vector(self, a: Rows, b: Rows, t: Temperature, *, distributed: bool = False) -> Tensor:
        """Per-sample symmetric InfoNCE of the local rows."""
        r, c = self._row_col_lse(a, b, t, distributed)
        return r + c - 2 * (a.local * b.local).sum(1) / t

    def multisoftclip_vector(
        self,
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
        """Per-sample MultiSClip Ls(a; a, b) of the local rows (targets from a, at ``target_t``)."""
        target_t = t if target_t is None else target_t
        if self._fused(a.local, t, target_t, distributed):
            coefficients = SoftClipCoefficients.for_directions(1.0, 0.0, reference)
            return soft_clip(a.local, b.local, t, coefficients, target_t=target_t, detach_targets=detach_targets)
        r, c = self._row_col_lse(a, b, t, distributed)
        # the soft targets' operands: softmax_l(a_i . a_l / target_t)
        q, k, tq = (a.local.detach(), a.full.detach(), _detached(target_t)) if detach_targets else (a.local, a.full, target_t)
        if reference:
            # sum_l W_il (S_li + S_il) = sum_l W_il [b_i, a_i] . [a_l, b_l] / t
            y = self.soft_target_sum(q, k, torch.zeros_like(a.full[:, 0]), torch.cat([b.local, a.local], 1), torch.cat([a.full, b.full], 1), tq, 1.0, t)
            return 0.5 * (c + r - y)
        # sum_l W_il (r_l - 2 S_li), S_li = b_i . a_l / t
        y = self.soft_target_sum(q, k, gather(r), b.local, a.full, tq, -2.0, t)
        return c + y

    def multisoftclip_pair_vector(
        self,
        a: Tensor,
        b: Tensor,
        t: Temperature,
        weight_a: float,
        weight_b: float,
        *,
        reference: bool,
        target_t: Optional[Temperature] = None,
        detach_targets: bool = False,
    ) -> Tensor:
        """``weight_a Ls(a; a, b) + weight_b Ls(b; a, b)`` for one process, sharing S between the directions."""
        target_t = t if target_t is None else target_t
        if self._fused(a, t, target_t, False):
            coefficients = SoftClipCoefficients.for_directions(weight_a, weight_b, reference)
            return soft_clip(a, b, t, coefficients, target_t=target_t, detach_targets=detach_targets)
        total: Optional[Tensor] = None
        for weight, targets, other in ((weight_a, a, b), (weight_b, b, a)):
            if weight:
                v = weight * self.multisoftclip_vector(
                    Rows(targets, targets, 0), Rows(other, other, 0), t, reference=reference, gather=_identity, target_t=target_t, detach_targets=detach_targets
                )
                total = v if total is None else total + v
        assert total is not None, "both weights are zero"
        return total

    def multisoftclip_pairs(
        self,
        p: Sequence[Tensor],
        weights: PairWeights,
        t: Temperature,
        *,
        reference: bool,
        target_t: Optional[Temperature] = None,
        detach_targets: bool = False,
    ) -> Tensor:
        """``sum over pairs (a, b) of weight_a Ls(a; a, b) + weight_b Ls(b; a, b)``, one fused call per pair."""
        total: Optional[Tensor] = None
        for (a, b), (weight_a, weight_b) in weights.items():
            v = self.multisoftclip_pair_vector(p[a], p[b], t, weight_a, weight_b, reference=reference, target_t=target_t, detach_targets=detach_targets)
            total = v if total is None else total + v
        assert total is not None, "weights hold no pair"
        return total


_BACKEND = StreamingBackend(logsumexp, soft_target_sum, fused_softclip=True)


# The backend interface as plain functions (``torch.compiler.disable`` wraps functions, not bound methods).


def m3co_vector(a: Rows, b: Rows, perm: Tensor, lam: Tensor, t: Temperature, *, reference: bool = False, distributed: bool = False) -> Tensor:
    """Per-sample M3Co L3(a -> b) of the local mixed rows (tiled kernels; see :meth:`StreamingBackend.m3co_vector`)."""
    return _BACKEND.m3co_vector(a, b, perm, lam, t, reference=reference, distributed=distributed)


def clip_vector(a: Rows, b: Rows, t: Temperature, *, distributed: bool = False) -> Tensor:
    """Per-sample symmetric InfoNCE of the local rows (tiled kernels)."""
    return _BACKEND.clip_vector(a, b, t, distributed=distributed)


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
    """Per-sample MultiSClip Ls(a; a, b) of the local rows, targets from a (tiled kernels)."""
    return _BACKEND.multisoftclip_vector(
        a, b, t, reference=reference, gather=gather, distributed=distributed, target_t=target_t, detach_targets=detach_targets
    )


def multisoftclip_pair_vector(
    a: Tensor,
    b: Tensor,
    t: Temperature,
    weight_a: float,
    weight_b: float,
    *,
    reference: bool,
    target_t: Optional[Temperature] = None,
    detach_targets: bool = False,
) -> Tensor:
    """``weight_a Ls(a; a, b) + weight_b Ls(b; a, b)`` on one process (tiled kernels)."""
    return _BACKEND.multisoftclip_pair_vector(a, b, t, weight_a, weight_b, reference=reference, target_t=target_t, detach_targets=detach_targets)


def multisoftclip_pairs(
    p: Sequence[Tensor], weights: PairWeights, t: Temperature, *, reference: bool, target_t: Optional[Temperature] = None, detach_targets: bool = False
) -> Tensor:
    """``sum over pairs (a, b) of weight_a Ls(a; a, b) + weight_b Ls(b; a, b)`` on one process (tiled kernels)."""
    return _BACKEND.multisoftclip_pairs(p, weights, t, reference=reference, target_t=target_t, detach_targets=detach_targets)
