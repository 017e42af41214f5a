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
the constant ``1/t`` replaces the running maximum of online softmax: each tile is
``addmm(q, k^T, alpha=1/t) - 1/t`` (:func:`~m3co_loss.backends._tiling.shifted_scores`), with no
scaled copies of the operands. Below that, the kernels find exact maxima instead.

**CPU threads.** On CPU the tiles are split round robin over ``torch.get_num_threads()``
worker threads that run one torch thread each (and private accumulators, summed at the end),
rather than splitting every small operation over OpenMP threads: there is no barrier per
operation (each costs a scheduler time slice when other processes share the cores), and each
core works on its own tile in its own cache. The assignment of tiles to workers is static, so
results do not depend on timing. Each worker holds its own accumulators (full-size gradients
in the backward passes) and tile buffers, so the extra memory is about the number of workers
times one worker's. ``torch.set_num_threads`` is set to 1 inside the workers and the caller's
count restored afterwards; a thread that first uses torch meanwhile starts at one intra-op
thread, and concurrent calls take turns.
``set_config(parallel_workers=False)`` uses torch's own threading instead.

Single-process MultiSClip runs the fused kernel :class:`~m3co_loss.backends.softclip.SoftClip`
instead, when the temperature allows the static shift. The per-sample loss vectors are written over the two primitives by :class:`StreamingBackend`,
which the Triton backend instantiates with its own kernels.

Tile sizes (``tile_rows``, ``tile_cols``) and the CPU worker threads (``parallel_workers``) are
read from :func:`m3co_loss.backends.get_config` once per forward pass; the backward pass uses
the same values.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple, Union, cast

import torch
from torch import Tensor

from ._config import BackendConfig, get_config
from ._streaming import StreamingBackend
from ._tiling import (
    Scratch,
    decode_config,
    encode_config,
    fake_config,
    join_temperature,
    split_temperature,
    Temperature,
    blocks,
    first_order_only,
    host_value,
    max_is_diagonal,
    num_workers,
    operand,
    run_tiles,
    shifted_scores,
    static_shift_ok,
    temperature_grad,
)

__all__ = [
    "LogSumExp",
    "SoftTargetSum",
    "logsumexp",
    "soft_target_sum",
    "StreamingBackend",
    "row_col_lse",
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
        r, c, config = lse_forward(q, k, t, with_cols)
        ctx.save_for_backward(q, k, r, c)
        ctx.t, ctx.with_cols, ctx.config = operand(t), with_cols, config
        ctx.set_materialize_grads(False)
        return r, c

    @staticmethod
    @first_order_only
    def backward(ctx: Any, g_r: Optional[Tensor], g_c: Optional[Tensor]) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], None]:
        """Recompute each tile and accumulate ``dq = A k / t`` and ``dk = A^T q / t``; ``dt = -<q, dq> / t``."""
        q, k, r, c = ctx.saved_tensors
        dq, dk, dt = lse_backward(q, k, r, c, ctx.t, ctx.with_cols, g_r, g_c, ctx.config, ctx.needs_input_grad[2])
        return dq, dk, dt, None


def lse_forward(q: Tensor, k: Tensor, t: Temperature, with_cols: bool) -> Tuple[Tensor, Tensor, BackendConfig]:
    """The forward pass of :class:`LogSumExp` on contiguous ``q``, ``k``: ``(r, c, config)``."""
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
        inv_t = 1.0 / value
        tasks = [(i0, i1, k0, k1) for i0, i1 in blocks(n, tile_rows) for k0, k1 in blocks(N, tile_cols)]

        def setup() -> Tuple[Scratch, Tensor, Optional[Tensor]]:
            return Scratch(q, 1, rows, cols), q.new_zeros(n), q.new_zeros(N) if with_cols else None

        def work(my_tasks: Sequence[_Tile], state: Any) -> List[Optional[Tensor]]:
            scratch, row_sum, col_sum = state
            for i0, i1, k0, k1 in my_tasks:
                e = shifted_scores(q[i0:i1], k[k0:k1], inv_t, scratch(0, i1 - i0, k1 - k0)).exp_()
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
    return r, c, config


def lse_backward(
    q: Tensor,
    k: Tensor,
    r: Tensor,
    c: Tensor,
    t_given: Temperature,
    with_cols: bool,
    g_r: Optional[Tensor],
    g_c: Optional[Tensor],
    config: BackendConfig,
    need_t: bool,
) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """The backward pass of :class:`LogSumExp`: ``(dq, dk, dt)`` (``dt`` None unless ``need_t``; all None without gradients)."""
    t = operand(t_given)
    with_cols = with_cols and g_c is not None
    if g_r is None and not with_cols:
        return None, None, None
    n, N = q.shape[0], k.shape[0]
    tile_rows, tile_cols = config.tile_rows, config.tile_cols
    rows, cols = min(tile_rows, n), min(tile_cols, N)
    value = host_value(t_given)
    if static_shift_ok(value, q.dtype):
        # A_ik / t = exp(S_ik - 1/t) (alpha_i + beta_k); 1/t - r_i <= 2/t keeps both factors
        # finite. The 1/t of dq = A k / t rides on alpha and beta.
        alpha = (g_r / t) * torch.exp(1.0 / t - r) if g_r is not None else None
        beta = (cast(Tensor, g_c) / t) * torch.exp(1.0 / t - c) if with_cols else None
        inv_t = 1.0 / cast(float, value)
        row_blocks = list(blocks(n, tile_rows))
        # Worker count of either split: by rows it has as many tasks as row blocks, which is
        # at least this count whenever that split is taken.
        workers = num_workers(q, len(row_blocks) * len(list(blocks(N, tile_cols))), config.parallel_workers)
        # A worker that owns whole blocks of rows writes its rows of a shared dq; with fewer row
        # blocks than workers the tiles are split instead and every worker keeps its own dq.
        by_rows = len(row_blocks) >= workers
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
                a = shifted_scores(q[i0:i1], k[k0:k1], inv_t, scratch(0, i1 - i0, k1 - k0)).exp_()
                if alpha is not None and beta is not None:
                    a.mul_(torch.add(alpha[i0:i1, None], beta[None, k0:k1], out=scratch(1, i1 - i0, k1 - k0)))
                elif alpha is not None:
                    a.mul_(alpha[i0:i1, None])
                else:  # alpha and beta are not both None
                    a.mul_(cast(Tensor, beta)[None, k0:k1])
                dq[i0:i1].addmm_(a, k[k0:k1])
                dk[k0:k1].addmm_(a.T, q[i0:i1])
            return [None if by_rows else dq, dk]

        dq, dk = run_tiles(tasks, work, workers, setup)
        dq = shared_dq if by_rows else dq
    else:
        scratch = Scratch(q, 2, rows, cols)
        dq = torch.zeros_like(q)
        dk = torch.zeros_like(k)
        qs = q / t
        for i0, i1 in blocks(n, tile_rows):
            for k0, k1 in blocks(N, tile_cols):
                s = torch.mm(qs[i0:i1], k[k0:k1].T, out=scratch(0, i1 - i0, k1 - k0))
                a = scratch(1, i1 - i0, k1 - k0).zero_()
                if g_r is not None:
                    a += (s - r[i0:i1, None]).exp_().mul_(g_r[i0:i1, None])
                if with_cols:
                    a += (s - c[None, k0:k1]).exp_().mul_(cast(Tensor, g_c)[None, k0:k1])
                dq[i0:i1].addmm_(a, k[k0:k1])
                dk[k0:k1].addmm_(a.T, q[i0:i1])
        dq, dk = dq.div_(t), dk.div_(t)
    dt = temperature_grad(t, [(q, dq)]) if need_t else None
    return dq, dk, dt


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
        y, shift, norm, mean_vk, config = soft_target_sum_forward(q, k, u, vq, vk, t, gamma, t_v)
        ctx.save_for_backward(q, k, u, vq, vk, shift, norm, mean_vk, y)
        ctx.t, ctx.t_v, ctx.gamma, ctx.config = operand(t), operand(t_v), gamma, config
        return y

    @staticmethod
    @first_order_only
    def backward(ctx: Any, g: Tensor) -> Tuple[Optional[Tensor], ...]:
        """Recompute each tile of ``P = softmax_row(q k^T / t)`` and accumulate the gradients.

        With ``X_il = u_l + (gamma / t_v) vq_i . vk_l``::

            dG_il = g_i P_il (X_il - y_i),   dq = dG k / t,   dk = dG^T q / t,
            du_l = sum_i g_i P_il,   dvk_l = (gamma / t_v) sum_i g_i P_il vq_i,   dvq_i = (gamma / t_v) g_i (P vk)_i.
        """
        need_q, need_k, _, _, _, need_t, _, need_t_v = ctx.needs_input_grad
        # the softmax's operands and temperature need the tiles of dG; detached soft targets do not
        need_logits = need_q or need_k or need_t
        q, k, u, vq, vk, shift, norm, mean_vk, y = ctx.saved_tensors
        dq, dk, du, dvq, dvk, dt, dt_v = soft_target_sum_backward(
            q, k, u, vq, vk, shift, norm, mean_vk, y, ctx.t, ctx.gamma, ctx.t_v, g, ctx.config, need_logits=need_logits, need_t=need_t, need_t_v=need_t_v
        )
        return dq, dk, du, dvq, dvk, dt, None, dt_v


def soft_target_sum_forward(
    q: Tensor, k: Tensor, u: Tensor, vq: Tensor, vk: Tensor, t: Temperature, gamma: float, t_v: Temperature
) -> Tuple[Tensor, Tensor, Tensor, Tensor, BackendConfig]:
    """The forward pass of :class:`SoftTargetSum` on contiguous operands: ``(y, shift, norm, mean_vk, config)``."""
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
    return y, shift, norm, mean_vk, config


def soft_target_sum_backward(
    q: Tensor,
    k: Tensor,
    u: Tensor,
    vq: Tensor,
    vk: Tensor,
    shift: Tensor,
    norm: Tensor,
    mean_vk: Tensor,
    y: Tensor,
    t_given: Temperature,
    gamma: float,
    t_v: Temperature,
    g: Tensor,
    config: BackendConfig,
    *,
    need_logits: bool,
    need_t: bool,
    need_t_v: bool,
) -> Tuple[Optional[Tensor], Optional[Tensor], Tensor, Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """The backward pass of :class:`SoftTargetSum`: ``(dq, dk, du, dvq, dvk, dt, dt_v)``.

    ``dq`` and ``dk`` are None unless ``need_logits`` (the soft targets' operands or temperature
    need a gradient); ``dt``, ``dt_v`` are None unless asked for.
    """
    t, coef = operand(t_given), gamma / operand(t_v)
    n, N = q.shape[0], k.shape[0]
    tile_rows, tile_cols = config.tile_rows, config.tile_cols
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
    dt = temperature_grad(t, [(q, cast(Tensor, dq))]) if need_t else None
    dt_v = temperature_grad(t_v, [(vq, dvq)]) if need_t_v else None
    return dq, dk, du_dvk[:, 0], dvq, du_dvk[:, 1:], dt, dt_v


# ----------------------------------------------------------------------------- operators
#
# The kernels as ``torch.library`` custom operators, so that ``torch.compile`` keeps a loss in
# one graph: dynamo sees one opaque call per kernel (its fake implementation gives the output
# shapes), and AOT autograd one call of the backward operator. A forward operator returns what
# its backward needs (its statistics and the tuning options it ran with) as extra outputs.


def _new_like(x: Tensor, *shape: int) -> Tensor:
    return x.new_empty(shape)


@torch.library.custom_op("m3co_loss::tiled_logsumexp", mutates_args=())
def _lse_op(q: Tensor, k: Tensor, t: Optional[Tensor], t_value: float, with_cols: bool) -> Tuple[Tensor, Tensor, Tensor]:
    q, k = q.contiguous(), k.contiguous()
    r, c, config = lse_forward(q, k, join_temperature(t, t_value), with_cols)
    return r, c, encode_config(config)


@_lse_op.register_fake
def _(q: Tensor, k: Tensor, t: Optional[Tensor], t_value: float, with_cols: bool) -> Tuple[Tensor, Tensor, Tensor]:
    return _new_like(q, q.shape[0]), _new_like(q, k.shape[0] if with_cols else 0), fake_config()


@torch.library.custom_op("m3co_loss::tiled_logsumexp_backward", mutates_args=())
def _lse_backward_op(
    q: Tensor, k: Tensor, r: Tensor, c: Tensor, config: Tensor,
    g_r: Optional[Tensor], g_c: Optional[Tensor], t: Optional[Tensor], t_value: float, with_cols: bool, need_t: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    q, k = q.contiguous(), k.contiguous()
    dq, dk, dt = lse_backward(q, k, r, c, join_temperature(t, t_value), with_cols, g_r, g_c, decode_config(config), need_t)
    # zeros stand for "no gradient" (None), which an operator cannot return
    return (torch.zeros_like(q) if dq is None else dq), (torch.zeros_like(k) if dk is None else dk), (q.new_zeros(()) if dt is None else dt)


@_lse_backward_op.register_fake
def _(q: Tensor, k: Tensor, r: Tensor, c: Tensor, config: Tensor, g_r: Optional[Tensor], g_c: Optional[Tensor], t: Optional[Tensor], t_value: float, with_cols: bool, need_t: bool) -> Tuple[Tensor, Tensor, Tensor]:
    return _new_like(q, *q.shape), _new_like(k, *k.shape), _new_like(q)


def _lse_setup(ctx: Any, inputs: Tuple[Any, ...], output: Tuple[Tensor, ...]) -> None:
    q, k, t, t_value, with_cols = inputs
    r, c, config = output
    ctx.save_for_backward(q, k, r, c, config, t)
    ctx.t_value, ctx.with_cols = t_value, with_cols
    ctx.mark_non_differentiable(config)
    ctx.set_materialize_grads(False)


@first_order_only
def _lse_autograd(ctx: Any, g_r: Optional[Tensor], g_c: Optional[Tensor], *unused: Any) -> Tuple[Optional[Tensor], ...]:
    if g_r is None and g_c is None:
        return None, None, None, None, None
    q, k, r, c, config, t = ctx.saved_tensors
    need_t = ctx.needs_input_grad[2]
    dq, dk, dt = _lse_backward_op(q, k, r, c, config, g_r, g_c, t, ctx.t_value, ctx.with_cols, need_t)
    return dq, dk, (dt if need_t else None), None, None


_lse_op.register_autograd(_lse_autograd, setup_context=_lse_setup)


@torch.library.custom_op("m3co_loss::tiled_soft_target_sum", mutates_args=())
def _soft_op(
    q: Tensor, k: Tensor, u: Tensor, vq: Tensor, vk: Tensor, t: Optional[Tensor], t_value: float, gamma: float, t_v: Optional[Tensor], t_v_value: float
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    q, k, vq, vk, u = (x.contiguous() for x in (q, k, vq, vk, u))
    y, shift, norm, mean_vk, config = soft_target_sum_forward(q, k, u, vq, vk, join_temperature(t, t_value), gamma, join_temperature(t_v, t_v_value))
    return y, shift, norm.clone(), mean_vk, encode_config(config)


@_soft_op.register_fake
def _(q: Tensor, k: Tensor, u: Tensor, vq: Tensor, vk: Tensor, t: Optional[Tensor], t_value: float, gamma: float, t_v: Optional[Tensor], t_v_value: float) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    n = q.shape[0]
    return _new_like(q, n), _new_like(q, n), _new_like(q, n), _new_like(q, n, vk.shape[1]), fake_config()


@torch.library.custom_op("m3co_loss::tiled_soft_target_sum_backward", mutates_args=())
def _soft_backward_op(
    q: Tensor, k: Tensor, u: Tensor, vq: Tensor, vk: Tensor, shift: Tensor, norm: Tensor, mean_vk: Tensor, y: Tensor, config: Tensor, g: Tensor,
    t: Optional[Tensor], t_value: float, gamma: float, t_v: Optional[Tensor], t_v_value: float, need_logits: bool, need_t: bool, need_t_v: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    q, k, vq, vk, u = (x.contiguous() for x in (q, k, vq, vk, u))
    dq, dk, du, dvq, dvk, dt, dt_v = soft_target_sum_backward(
        q, k, u, vq, vk, shift, norm, mean_vk, y, join_temperature(t, t_value), gamma, join_temperature(t_v, t_v_value), g, decode_config(config),
        need_logits=need_logits, need_t=need_t, need_t_v=need_t_v,
    )
    zero = q.new_zeros(())
    return (
        torch.zeros_like(q) if dq is None else dq, torch.zeros_like(k) if dk is None else dk, du.clone(), dvq, dvk.clone(),
        zero if dt is None else dt, zero.clone() if dt_v is None else dt_v,
    )


@_soft_backward_op.register_fake
def _(q: Tensor, k: Tensor, u: Tensor, vq: Tensor, vk: Tensor, *rest: Any) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _new_like(q, *q.shape), _new_like(k, *k.shape), _new_like(q, k.shape[0]), _new_like(q, *vq.shape), _new_like(q, *vk.shape), _new_like(q), _new_like(q)


def _soft_setup(ctx: Any, inputs: Tuple[Any, ...], output: Tuple[Tensor, ...]) -> None:
    q, k, u, vq, vk, t, t_value, gamma, t_v, t_v_value = inputs
    y, shift, norm, mean_vk, config = output
    ctx.save_for_backward(q, k, u, vq, vk, shift, norm, mean_vk, y, config, t, t_v)
    ctx.t_value, ctx.gamma, ctx.t_v_value = t_value, gamma, t_v_value
    ctx.mark_non_differentiable(shift, norm, mean_vk, config)


@first_order_only
def _soft_autograd(ctx: Any, g: Tensor, *unused: Any) -> Tuple[Optional[Tensor], ...]:
    q, k, u, vq, vk, shift, norm, mean_vk, y, config, t, t_v = ctx.saved_tensors
    need_q, need_k, _, _, _, need_t, _, _, need_t_v, _ = ctx.needs_input_grad
    # the softmax's operands and temperature need the tiles of dG; detached soft targets do not
    need_logits = need_q or need_k or need_t
    dq, dk, du, dvq, dvk, dt, dt_v = _soft_backward_op(
        q, k, u, vq, vk, shift, norm, mean_vk, y, config, g, t, ctx.t_value, ctx.gamma, t_v, ctx.t_v_value, need_logits, need_t, need_t_v
    )
    return (dq if need_logits else None), (dk if need_logits else None), du, dvq, dvk, (dt if need_t else None), None, None, (dt_v if need_t_v else None), None


_soft_op.register_autograd(_soft_autograd, setup_context=_soft_setup)


# ----------------------------------------------------------------------------- primitives


def logsumexp(q: Tensor, k: Tensor, t: Temperature, with_cols: bool) -> Tuple[Tensor, Tensor]:
    """``(r, c)``: row and (if ``with_cols``, else empty) column log-sum-exps of ``q k^T / t``.

    ``t`` is a float or a 0-dim tensor of ``q``'s dtype and device, which may require grad.
    Under ``torch.compile`` the custom operator ``m3co_loss::tiled_logsumexp``, which the graph
    keeps; in eager mode :class:`LogSumExp`, the same computation (the first eager call of a
    custom operator with an autograd formula imports ``torch._dynamo``: about 150 MiB of memory
    that an eager training loop need not hold).
    """
    if not torch.compiler.is_compiling():
        return LogSumExp.apply(q, k, t, with_cols)  # type: ignore[no-any-return, no-untyped-call]
    r, c, *_ = _lse_op(q, k, *split_temperature(t), with_cols)
    return r, c


def soft_target_sum(
    q: Tensor, k: Tensor, u: Tensor, vq: Tensor, vk: Tensor, t: Temperature, gamma: float, t_v: Optional[Temperature] = None
) -> Tensor:
    """``y_i = sum_l softmax_l(q_i . k_l / t) (u_l + (gamma / t_v) vq_i . vk_l)`` (``t_v`` None: ``t``).

    Under ``torch.compile`` the custom operator ``m3co_loss::tiled_soft_target_sum``; in eager
    mode :class:`SoftTargetSum`, the same computation (see :func:`logsumexp`).
    """
    if not torch.compiler.is_compiling():
        return SoftTargetSum.apply(q, k, u, vq, vk, t, gamma, t if t_v is None else t_v)  # type: ignore[no-any-return, no-untyped-call]
    y: Tensor = _soft_op(q, k, u, vq, vk, *split_temperature(t), float(gamma), *split_temperature(t if t_v is None else t_v))[0]
    return y


_BACKEND = StreamingBackend(logsumexp, soft_target_sum, fused_softclip=True)


# The backend interface (:class:`~m3co_loss.backends.Backend`) as module attributes: the methods
# of the one streaming backend built on this module's operators.
row_col_lse = _BACKEND.row_col_lse
m3co_vector = _BACKEND.m3co_vector
clip_vector = _BACKEND.clip_vector
multisoftclip_vector = _BACKEND.multisoftclip_vector
multisoftclip_pair_vector = _BACKEND.multisoftclip_pair_vector
multisoftclip_pairs = _BACKEND.multisoftclip_pairs
