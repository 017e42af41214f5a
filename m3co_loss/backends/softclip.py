r"""The fused single-process MultiSClip kernel of the tiled backend (:class:`SoftClip`).

With ``S = A B^T / t``,
``W^a = softmax_row(A A^T / t)``, ``W^b = softmax_row(B B^T / t)``, one call computes, for
coefficients fixed by the convention and the weights of the two directions::

    v_i = k_c c_i + k_r r_i + k_a (W^a r)_i + k_b (W^b c)_i
          - x_a sum_l W^a_il S_li - z_a sum_l W^a_il S_il - x_b sum_l W^b_il S_il - z_b sum_l W^b_il S_li

(paper, direction a: ``k_c = k_a = 1, x_a = 2``; ``Ls(b; a, b)`` is the same with the roles
of ``r, c`` and ``S, S^T`` swapped; reference convention: ``k_c = k_r = x = z = 1/2``). It
walks the upper triangle of square blocks ``(I, K), I <= K`` and computes four tiles per
block pair: ``S_IK``, ``U_IK = (S_KI)^T = B_I A_K^T / t`` and ``E^a = e^{G^a_IK - 1/t}``,
``E^b``. Because ``G = A A^T`` is symmetric, one tile of it serves both ``(I, K)`` and
``(K, I)``: row sums of ``E^a`` give the normalisers ``n_I``, its column sums ``n_K``, and the
weighted sums ``sum_l W_il S_li`` are row sums of ``E^a * U`` and column sums of ``E^a * S``.
``(W r)`` needs the final ``r``, so a second forward pass over the ``G`` tiles computes
``E^a [r | 1/n]``, which also gives the column sums of ``W`` (``omega_l = sum_i W_il``,
again by symmetry). For a uniform upstream gradient ``g`` (reduction mean or sum) the
backward pass needs ``sum_i g_i W_il = g_0 omega_l`` and so no extra pass. Its gradients are::

    dS_lk = (k_r g_l + k_a omega^g_l) e^{S_lk - r_l} + (k_c g_k + k_b omega'^g_k) e^{S_lk - c_k}
            - x_a g_k W^a_kl - z_a g_l W^a_lk - x_b g_l W^b_lk - z_b g_k W^b_kl,
    dG^a_il = g_i W^a_il (X^a_il - y^a_i),  X^a_il = k_a r_l - x_a S_li - z_a S_il,
    dA = dS B / t + (dG^a + dG^a^T) A / t,   dB = dS^T A / t + (dG^b + dG^b^T) B / t,

and ``(dG + dG^T)`` is again evaluated once per symmetric block pair. Per element of the N x N
grid this costs about 6.5 matrix products of depth D for one direction (floor: 5) and 9 for
both (floor: 7).

Tile sizes (``tile_square``) and the CPU worker threads are read from
:func:`m3co_loss.backends.get_config` once per forward pass; the backward pass uses the same values.
"""

from __future__ import annotations

from typing import Any, List, NamedTuple, Optional, Sequence, Tuple, cast

import torch
from torch import Tensor

from ._config import BackendConfig, get_config
from ._tiling import (
    Scratch,
    Temperature,
    block_pairs,
    decode_config,
    encode_config,
    fake_config,
    first_order_only,
    host_value,
    join_temperature,
    num_workers,
    run_tiles,
    safe_span,
    shifted_scores,
    span,
    split_temperature,
    static_shift_ok,
    temperature_grad,
)

__all__ = ["SoftClip", "SoftClipCoefficients", "soft_clip"]

_BlockPair = Tuple[slice, slice, bool]  # rows, columns, whether on the diagonal


class SoftClipCoefficients(NamedTuple):
    """Coefficients of the per-sample MultiSClip vector computed by :class:`SoftClip`.

    ``v_i = col c_i + row r_i + ka (W^a r)_i + kb (W^b c)_i - xa sum_l W^a_il S_li
    - za sum_l W^a_il S_il - xb sum_l W^b_il S_il - zb sum_l W^b_il S_li``.
    """

    col: float
    row: float
    ka: float
    kb: float
    xa: float
    za: float
    xb: float
    zb: float

    @classmethod
    def for_directions(cls, weight_a: float, weight_b: float, reference: bool) -> "SoftClipCoefficients":
        """``weight_a Ls(a; a, b) + weight_b Ls(b; a, b)`` in the paper's or the released convention."""
        if reference:
            half = 0.5 * (weight_a + weight_b)
            return cls(half, half, 0.0, 0.0, 0.5 * weight_a, 0.5 * weight_a, 0.5 * weight_b, 0.5 * weight_b)
        return cls(weight_a, weight_b, weight_a, weight_b, 2.0 * weight_a, 0.0, 2.0 * weight_b, 0.0)

    @property
    def uses_a(self) -> bool:
        return bool(self.ka or self.xa or self.za)

    @property
    def uses_b(self) -> bool:
        return bool(self.kb or self.xb or self.zb)


def _accumulate_products(acc: Tensor, rows: slice, cols: slice, diag: bool, e: Tensor, x: Tensor, y: Tensor, tmp: Tensor, ones: Tensor) -> None:
    """``acc[rows] += rowsum(e * x)`` and, off the diagonal, ``acc[cols] += colsum(e * y)``."""
    acc[rows].addmv_(torch.mul(e, x, out=tmp), ones[: e.shape[1]])
    if not diag:
        acc[cols].addmv_(torch.mul(e, y, out=tmp).T, ones[: e.shape[0]])


def _cross_scores(a: Tensor, b: Tensor, rows: slice, cols: slice, diag: bool, inv_t: float, s_out: Tensor, u_out: Tensor) -> Tuple[Tensor, Tensor]:
    """The tiles ``S_IK - 1/t`` and ``U_IK - 1/t = (S_KI)^T - 1/t`` of a block pair.

    On a diagonal block ``U = S^T``: a transposed copy costs a pass over the tile instead of a
    matrix product (at N = 4096 and the default 1024-square blocks, 4 of the 10 block pairs).
    """
    s = shifted_scores(a[rows], b[cols], inv_t, s_out)
    if diag:
        return s, u_out.copy_(s.T)
    return s, shifted_scores(b[rows], a[cols], inv_t, u_out)


def check_temperatures(t: Temperature, target_t: Temperature, dtype: torch.dtype) -> Tuple[float, float]:
    """The host values of ``t`` and ``target_t``, which the static shift of the fused kernel needs.

    Raises:
        ValueError: naming ``t`` or ``target_t``: a tensor off the CPU (its value would cost a
            device synchronisation), a temperature that is not positive, or one below the
            smallest for which the static shift is safe in ``dtype`` (it would give NaN).
    """
    values = []
    for name, x in (("t", t), ("target_t", target_t)):
        value = host_value(x)
        if value is None:
            device = cast(Tensor, x).device
            raise ValueError(f"{name}: the fused SoftClip kernel needs the value on the host: a float or a CPU tensor; got a tensor on {device}")
        if not value > 0:
            raise ValueError(f"{name} must be positive; got {value!r}")
        if not static_shift_ok(value, dtype):
            raise ValueError(
                f"{name} = {value:g} is below {2.0 / safe_span(dtype):g}, the smallest temperature of the fused SoftClip kernel in {dtype} "
                "(its static shift would overflow); backend='tiled' via m3co_loss.functional handles it with exact maxima"
            )
        values.append(value)
    return values[0], values[1]


def _one_tensor(t: Temperature, target_t: Temperature) -> bool:
    """Whether both temperatures are one tensor: its gradient is then the sum of both parts, taken in one piece."""
    return isinstance(t, Tensor) and target_t is t


class SoftClip(torch.autograd.Function):
    r"""Fused single-process MultiSClip vector of both directions of a pair (see the module docstring).

    ``forward(a, b, t, target_t, coefficients, detach_targets) -> v`` with ``a``, ``b`` the
    L2-normalised (N, D) embeddings, ``S = A B^T / t``, soft targets ``softmax(A A^T / target_t)``
    and ``softmax(B B^T / target_t)``, and ``coefficients`` a :class:`SoftClipCoefficients`.
    Needs the static shift (``2/t`` and ``2/target_t`` within the exponent range of the dtype)
    and so the temperatures' values: floats or CPU tensors (else a ValueError). A tensor temperature's gradient
    comes from the operands' (docs page ``maths``); ``target_t`` may be ``t`` itself.
    ``detach_targets`` treats the soft targets as constants.
    """

    @staticmethod
    def forward(ctx: Any, a: Tensor, b: Tensor, t: Temperature, target_t: Temperature, coef: SoftClipCoefficients, detach_targets: bool) -> Tensor:
        """Pass 1: r, c, normalisers and weighted sums of S; pass 2 (paper): W r and the column sums of W."""
        a, b = a.detach().contiguous(), b.detach().contiguous()
        v, stats, config = softclip_forward(a, b, t, target_t, coef)
        ctx.save_for_backward(a, b, *stats)
        ctx.t, ctx.target_t, ctx.coef, ctx.config, ctx.detach_targets = host_value(t), host_value(target_t), coef, config, detach_targets
        ctx.shared = _one_tensor(t, target_t)
        return v

    @staticmethod
    @first_order_only
    def backward(ctx: Any, g: Optional[Tensor]) -> Tuple[Optional[Tensor], ...]:
        """Recompute S, S^T and the target tiles per block pair; see the module docstring."""
        if g is None:
            return None, None, None, None, None, None
        a, b, *stats = ctx.saved_tensors
        need_a, need_b, need_t, need_tt, _, _ = ctx.needs_input_grad
        da, db, dt, dtt = softclip_backward(
            a, b, SoftClipStats(*stats), ctx.config, ctx.t, ctx.target_t, ctx.coef, g.contiguous(),
            detach_targets=ctx.detach_targets, shared=ctx.shared, need_t=need_t, need_tt=need_tt,
        )
        return (da if need_a else None), (db if need_b else None), (dt if need_t else None), (dtt if need_tt else None), None, None


class SoftClipStats(NamedTuple):
    """The O(N) statistics of a :class:`SoftClip` forward pass that its backward pass reads."""

    r: Tensor
    c: Tensor
    n_a: Tensor
    n_b: Tensor
    y_a: Tensor
    y_b: Tensor
    omega_a: Tensor
    omega_b: Tensor


def softclip_forward(a: Tensor, b: Tensor, t: Temperature, target_t: Temperature, coef: SoftClipCoefficients) -> Tuple[Tensor, SoftClipStats, BackendConfig]:
    """The forward pass of :class:`SoftClip` on detached contiguous ``a``, ``b``: ``(v, statistics, config)``."""
    ts, tt = check_temperatures(t, target_t, a.dtype)
    n = a.shape[0]
    config = get_config()
    size = min(config.tile_square, n)
    use_a, use_b = coef.uses_a, coef.uses_b
    ones = a.new_ones(size)
    inv_t, inv_tt = 1.0 / ts, 1.0 / tt
    tasks = list(block_pairs(n, size))
    workers = num_workers(a, len(tasks), config.parallel_workers)

    def setup_one() -> Tuple[Scratch, Tensor]:
        return Scratch(a, 5, size, size), a.new_zeros(8, n)

    def pass_one(my_tasks: Sequence[_BlockPair], state: Tuple[Scratch, Tensor]) -> List[Tensor]:
        scratch, sums = state
        # sum_k e^{S_ik - 1/t}, sum_i e^{S_ik - 1/t}, softmax normalisers of the targets, and
        # sum_l E_il (S_li - 1/t), sum_l E_il (S_il - 1/t) for each target matrix
        rho, kappa, n_a, n_b, t_a_u, t_a_s, t_b_s, t_b_u = sums
        for rows, cols, diag in my_tasks:
            h, w = span(rows), span(cols)
            s, u = _cross_scores(a, b, rows, cols, diag, inv_t, scratch(0, h, w), scratch(1, h, w))
            tmp = scratch(4, h, w)
            if use_a:
                p = shifted_scores(a[rows], a[cols], inv_tt, scratch(2, h, w)).exp_()
                n_a[rows].addmv_(p, ones[:w])
                if not diag:
                    n_a[cols].addmv_(p.T, ones[:h])
                if coef.xa:
                    _accumulate_products(t_a_u, rows, cols, diag, p, u, s, tmp, ones)
                if coef.za:
                    _accumulate_products(t_a_s, rows, cols, diag, p, s, u, tmp, ones)
            if use_b:
                q = shifted_scores(b[rows], b[cols], inv_tt, scratch(3, h, w)).exp_()
                n_b[rows].addmv_(q, ones[:w])
                if not diag:
                    n_b[cols].addmv_(q.T, ones[:h])
                if coef.xb:
                    _accumulate_products(t_b_s, rows, cols, diag, q, s, u, tmp, ones)
                if coef.zb:
                    _accumulate_products(t_b_u, rows, cols, diag, q, u, s, tmp, ones)
            e = s.exp_()
            rho[rows].addmv_(e, ones[:w])
            kappa[cols].addmv_(e.T, ones[:h])
            if not diag:
                e = u.exp_()
                kappa[rows].addmv_(e, ones[:w])
                rho[cols].addmv_(e.T, ones[:h])
        return [sums]

    rho, kappa, n_a, n_b, t_a_u, t_a_s, t_b_s, t_b_u = run_tiles(tasks, pass_one, workers, setup_one)[0]
    r = rho.log_().add_(1.0 / ts)
    c = kappa.log_().add_(1.0 / ts)
    # Pass 2: W r needs the final r; the same products give the column sums of W.
    omega_a = omega_b = a.new_zeros(0)
    y_a, y_b = a.new_zeros(n), a.new_zeros(n)
    if coef.ka or coef.kb:
        targets: List[Tuple[Tensor, Tensor]] = []
        if coef.ka:
            targets.append((torch.stack([r, n_a.reciprocal()], 1), a))
        if coef.kb:
            targets.append((torch.stack([c, n_b.reciprocal()], 1), b))

        def setup_two() -> Tuple[Tensor, List[Tensor]]:
            return a.new_empty(size * size), [a.new_zeros(n, 2) for _ in targets]

        def pass_two(my_tasks: Sequence[_BlockPair], state: Tuple[Tensor, List[Tensor]]) -> List[Tensor]:
            buf, out = state
            for rows, cols, diag in my_tasks:
                h, w = span(rows), span(cols)
                for acc, (values, x) in zip(out, targets):
                    p = shifted_scores(x[rows], x[cols], inv_tt, buf[: h * w].view(h, w)).exp_()
                    acc[rows].addmm_(p, values[cols])
                    if not diag:
                        acc[cols].addmm_(p.T, values[rows])
            return out

        sums = iter(run_tiles(tasks, pass_two, workers, setup_two))
        if coef.ka:
            pr_a = next(sums)
            y_a += coef.ka * pr_a[:, 0] / n_a
            omega_a = pr_a[:, 1]
        if coef.kb:
            pr_b = next(sums)
            y_b += coef.kb * pr_b[:, 0] / n_b
            omega_b = pr_b[:, 1]
    # sum_l W_il S_.. = (sum_l E_il (S_.. - 1/t)) / n_i + 1/t
    for acc, norm, weight, y in (
        (t_a_u, n_a, coef.xa, y_a),
        (t_a_s, n_a, coef.za, y_a),
        (t_b_s, n_b, coef.xb, y_b),
        (t_b_u, n_b, coef.zb, y_b),
    ):
        if weight:
            y -= weight * (acc / norm + 1.0 / ts)
    v: Tensor = coef.col * c + coef.row * r + y_a + y_b
    return v, SoftClipStats(r, c, n_a, n_b, y_a, y_b, omega_a, omega_b), config


def softclip_backward(
    a: Tensor,
    b: Tensor,
    stats: SoftClipStats,
    config: BackendConfig,
    t: float,
    tt: float,
    coef: SoftClipCoefficients,
    g: Tensor,
    *,
    detach_targets: bool,
    shared: bool,
    need_t: bool,
    need_tt: bool,
) -> Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """The backward pass of :class:`SoftClip`: ``(da, db, dt, dtarget_t)`` (``t``, ``tt``: the temperatures' values).

    ``shared``: the two temperatures are one tensor (its gradient is returned as ``dt``).
    """
    r, c, n_a, n_b, y_a, y_b, omega_a, omega_b = stats
    inv_t, inv_tt = 1.0 / t, 1.0 / tt
    n = a.shape[0]
    size = min(config.tile_square, n)
    use_a, use_b = coef.uses_a, coef.uses_b
    # (dG + dG^T) A / target_t: the soft targets' share of the gradient, absent when they are constants
    hold_a, hold_b = use_a and not detach_targets, use_b and not detach_targets
    # The temperatures' gradients need <A, dS B / t> apart from the targets' share when they
    # are two (docs page ``kernels``); dS B then goes to an accumulator of its own.
    split = (need_t or need_tt) and not shared and (hold_a or hold_b)
    tasks = list(block_pairs(n, size))
    workers = num_workers(a, len(tasks), config.parallel_workers)
    g = g.contiguous()
    # One host read (a device sync on a GPU) buys a pass over the target tiles: a uniform upstream
    # gradient (reduction "mean" or "sum") needs only the column sums of W from the forward pass.
    uniform = bool((g == g[0]).all())
    gamma_a, gamma_b = g / n_a, g / n_b  # g_i / n_i: W_il g_i = E_il gamma_i
    g_row, g_col = coef.row * g, coef.col * g  # upstream gradients of r and c
    if coef.ka:  # sum_i g_i W^a_il
        g_row = g_row + coef.ka * (g[0] * omega_a if uniform else _weighted_column_sums(a, inv_tt, gamma_a, size, tasks, workers))
    if coef.kb:
        g_col = g_col + coef.kb * (g[0] * omega_b if uniform else _weighted_column_sums(b, inv_tt, gamma_b, size, tasks, workers))
    # Every tile below is a derivative with respect to S or G, and dA = dS B / t + H A / target_t:
    # the 1/t rides on the O(N) factors alpha, beta, gamma and the left rank-4 factors.
    alpha = (g_row / t) * torch.exp(1.0 / t - r)
    beta = (g_col / t) * torch.exp(1.0 / t - c)
    ones = torch.ones_like(g)
    fa = _target_factors(coef.ka, coef.xa, coef.za, gamma_a, r, y_a, t, tt, ones) if use_a else None
    fb = _target_factors(coef.kb, coef.xb, coef.zb, gamma_b, c, y_b, t, tt, ones) if use_b else None

    def setup() -> Tuple[Scratch, Tensor, Tensor, Tensor]:
        da = torch.zeros_like(a)
        return Scratch(a, 7, size, size), da, torch.zeros_like(b), torch.zeros_like(a) if split else da

    def work(my_tasks: Sequence[_BlockPair], state: Tuple[Scratch, Tensor, Tensor, Tensor]) -> List[Optional[Tensor]]:
        scratch, da, db, da_s = state  # da_s: dS B / t (da itself unless split)
        for rows, cols, diag in my_tasks:
            h, w = span(rows), span(cols)
            at_rows, at_cols = (rows, None), (None, cols)  # a vector of O(N) factors along the tile's rows or columns
            s, u = _cross_scores(a, b, rows, cols, diag, inv_t, scratch(0, h, w), scratch(1, h, w))
            # (E tile of a target matrix, factor of its terms along k, along i) for dS_ik
            terms: List[Tuple[Tensor, Optional[Tensor], Optional[Tensor]]] = []
            ha = hb = None
            if fa is not None:
                p = shifted_scores(a[rows], a[cols], inv_tt, scratch(2, h, w)).exp_()
                terms.append((p, fa.x_s, fa.z_s))
                ha = _target_grad(fa, at_rows, at_cols, u, s, p, scratch(4, h, w)) if hold_a else None
            if fb is not None:
                q = shifted_scores(b[rows], b[cols], inv_tt, scratch(3, h, w)).exp_()
                terms.append((q, fb.z_s, fb.x_s))
                hb = _target_grad(fb, at_rows, at_cols, s, u, q, scratch(5, h, w)) if hold_b else None
            ds = _score_grad(s.exp_(), alpha, beta, at_rows, at_cols, terms, scratch(6, h, w))  # block (I, K)
            da_s[rows].addmm_(ds, b[cols])
            db[cols].addmm_(ds.T, a[rows])
            if ha is not None:
                da[rows].addmm_(ha, a[cols])
            if hb is not None:
                db[rows].addmm_(hb, b[cols])
            if diag:
                continue
            du = _score_grad(u.exp_(), alpha, beta, at_cols, at_rows, terms, scratch(6, h, w))  # block (K, I), held transposed like U
            da_s[cols].addmm_(du.T, b[rows])
            db[rows].addmm_(du, a[cols])
            if ha is not None:
                da[cols].addmm_(ha.T, a[rows])
            if hb is not None:
                db[cols].addmm_(hb.T, b[rows])
        return [da, db, da_s if split else None]

    da, db, da_s = run_tiles(tasks, work, workers, setup)
    dt = dtt = None
    if split:
        # t dL/dt = -<A, dS B / t>; target_t dL/dtarget_t = -(<A, dA> + <B, dB>) / 2 + <A, dS B / t>
        s_part = torch.dot(a.reshape(-1), da_s.reshape(-1))
        da += da_s
        if need_t:
            dt = -s_part / t
        if need_tt:
            dtt = temperature_grad(tt, [(a, da), (b, db)]) / 2 + s_part / tt
    elif need_t:
        # one temperature, or constant targets: t dL/dt = -(<A, dA> + <B, dB>) / 2
        dt = temperature_grad(t, [(a, da), (b, db)]) / 2
    return da, db, dt, dtt


class _TargetFactors(NamedTuple):
    """The O(N) factors of the terms of one target modality in the backward pass of :class:`SoftClip`.

    ``(dG + dG^T)_il = E_il [R_il - (..) (S_li - 1/t) - (..) (S_il - 1/t)]`` with ``R`` of rank 4,
    ``R_il = k gamma_i u_l + k u_i gamma_l - gamma_i y~_i - gamma_l y~_l``, ``y~ = y + (x + z) / t``:
    ``left @ right^T`` is ``R / target_t``. ``x_s``, ``z_s``: ``x gamma / t`` and ``z gamma / t``
    (the factors of the dS terms); ``x_h``, ``z_h``: the same over ``target_t`` (of the G terms).
    A factor whose coefficient is 0 is None.
    """

    left: Tensor
    right: Tensor
    x_s: Optional[Tensor]
    z_s: Optional[Tensor]
    x_h: Optional[Tensor]
    z_h: Optional[Tensor]


def _target_factors(k: float, x: float, z: float, gamma: Tensor, lse: Tensor, y: Tensor, t: float, tt: float, ones: Tensor) -> _TargetFactors:
    """:class:`_TargetFactors` of a target modality with coefficients ``k, x, z``, ``gamma = g / n`` and its log-sum-exps ``lse``."""
    x_s = (x / t) * gamma if x else None
    z_s = (z / t) * gamma if z else None
    x_h = x_s if tt == t or x_s is None else (x / tt) * gamma
    z_h = z_s if tt == t or z_s is None else (z / tt) * gamma
    y_shifted = y + (x + z) / t
    left = torch.stack([k * gamma, k * lse, -gamma * y_shifted, ones], 1).div_(tt)
    right = torch.stack([lse, gamma, ones, -gamma * y_shifted], 1)
    return _TargetFactors(left, right, x_s, z_s, x_h, z_h)


_Along = Tuple[Optional[slice], Optional[slice]]  # (rows, None) or (None, cols): a vector placed along a tile's rows or columns


def _target_grad(f: _TargetFactors, at_rows: _Along, at_cols: _Along, x: Tensor, z: Tensor, e: Tensor, out: Tensor) -> Tensor:
    """``(dG + dG^T) / target_t`` of one target modality on a tile (``e``: its E tile), into ``out``;
    ``x``, ``z``: the tiles of ``S - 1/t`` (one of them transposed) weighted by ``x_h`` and ``z_h``."""
    out = torch.mm(f.left[at_rows[0]], f.right[at_cols[1]].T, out=out)
    if f.x_h is not None:
        out.addcmul_(x, f.x_h[at_rows], value=-1).addcmul_(z, f.x_h[at_cols], value=-1)
    if f.z_h is not None:
        out.addcmul_(x, f.z_h[at_cols], value=-1).addcmul_(z, f.z_h[at_rows], value=-1)
    return out.mul_(e)


def _score_grad(
    e: Tensor, alpha: Tensor, beta: Tensor, at_i: _Along, at_k: _Along, terms: Sequence[Tuple[Tensor, Optional[Tensor], Optional[Tensor]]], buf: Tensor
) -> Tensor:
    """``dS_ik`` on the tile whose entries are ``e = exp(S_ik - 1/t)`` (overwritten), ``i`` and ``k`` placed by
    ``at_i`` and ``at_k``; ``terms``: each target's E tile (symmetric) with its factors along ``k`` and ``i``."""
    out = e.mul_(torch.add(alpha[at_i], beta[at_k], out=buf))
    for tile, along_k, along_i in terms:
        if along_k is not None:
            out.addcmul_(tile, along_k[at_k], value=-1)
        if along_i is not None:
            out.addcmul_(tile, along_i[at_i], value=-1)
    return out


def _weighted_column_sums(x: Tensor, inv_t: float, gamma: Tensor, size: int, tasks: Sequence[_BlockPair], workers: int) -> Tensor:
    """``sum_i gamma_i E_il`` for the symmetric ``E = exp(X X^T / t - 1/t)``: one pass over half the blocks."""

    def setup() -> Tuple[Tensor, Tensor]:
        return torch.zeros_like(gamma), x.new_empty(size * size)

    def work(my_tasks: Sequence[_BlockPair], state: Tuple[Tensor, Tensor]) -> List[Tensor]:
        out, buf = state
        for rows, cols, diag in my_tasks:
            p = shifted_scores(x[rows], x[cols], inv_t, buf[: span(rows) * span(cols)].view(span(rows), span(cols))).exp_()
            out[rows].addmv_(p, gamma[cols])
            if not diag:
                out[cols].addmv_(p.T, gamma[rows])
        return [out]

    out: Tensor = run_tiles(tasks, work, workers, setup)[0]
    return out


# The kernel as a custom operator (see the operators of :mod:`m3co_loss.backends.tiled`).


@torch.library.custom_op("m3co_loss::softclip", mutates_args=())
def _softclip_op(
    a: Tensor, b: Tensor, t: Optional[Tensor], t_value: float, target_t: Optional[Tensor], target_t_value: float, coef: List[float], detach_targets: bool, shared: bool
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    a, b = a.detach().contiguous(), b.detach().contiguous()
    v, stats, config = softclip_forward(a, b, join_temperature(t, t_value), join_temperature(target_t, target_t_value), SoftClipCoefficients(*coef))
    # the statistics are views of shared accumulators; an operator's outputs must not overlap
    r, c, n_a, n_b, y_a, y_b, omega_a, omega_b = (x.clone() for x in stats)
    return v, r, c, n_a, n_b, y_a, y_b, omega_a, omega_b, encode_config(config)


@_softclip_op.register_fake
def _(a: Tensor, b: Tensor, t: Optional[Tensor], t_value: float, target_t: Optional[Tensor], target_t_value: float, coef: List[float], detach_targets: bool, shared: bool) -> Tuple[Tensor, ...]:
    n = a.shape[0]
    weights = SoftClipCoefficients(*coef)
    vectors = tuple(a.new_empty(n) for _ in range(7))
    return (*vectors, a.new_empty(n if weights.ka else 0), a.new_empty(n if weights.kb else 0), fake_config())


@torch.library.custom_op("m3co_loss::softclip_backward", mutates_args=())
def _softclip_backward_op(
    a: Tensor, b: Tensor, stats: List[Tensor], config: Tensor, g: Tensor, t: Optional[Tensor], t_value: float, target_t: Optional[Tensor], target_t_value: float,
    coef: List[float], detach_targets: bool, shared: bool, need_t: bool, need_tt: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    a, b = a.detach().contiguous(), b.detach().contiguous()
    ts, tt = host_value(join_temperature(t, t_value)), host_value(join_temperature(target_t, target_t_value))
    assert ts is not None and tt is not None, "SoftClip needs the temperatures' values (floats or CPU tensors)"
    da, db, dt, dtt = softclip_backward(
        a, b, SoftClipStats(*stats), decode_config(config), ts, tt, SoftClipCoefficients(*coef), g.contiguous(),
        detach_targets=detach_targets, shared=shared, need_t=need_t, need_tt=need_tt,
    )
    return da, db, a.new_zeros(()) if dt is None else dt, a.new_zeros(()) if dtt is None else dtt


@_softclip_backward_op.register_fake
def _(a: Tensor, b: Tensor, *rest: Any) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return a.new_empty(a.shape), b.new_empty(b.shape), a.new_empty(()), a.new_empty(())


def _softclip_setup(ctx: Any, inputs: Tuple[Any, ...], output: Tuple[Tensor, ...]) -> None:
    a, b, t, t_value, target_t, target_t_value, coef, detach_targets, shared = inputs
    ctx.save_for_backward(a, b, t, target_t, *output[1:])
    ctx.t_value, ctx.target_t_value, ctx.coef, ctx.detach_targets, ctx.shared = t_value, target_t_value, coef, detach_targets, shared
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)


@first_order_only
def _softclip_autograd(ctx: Any, g: Optional[Tensor], *unused: Any) -> Tuple[Optional[Tensor], ...]:
    if g is None:
        return (None,) * 9
    a, b, t, target_t, *stats, config = ctx.saved_tensors
    need_a, need_b, need_t, _, need_tt, *_ = ctx.needs_input_grad
    da, db, dt, dtt = _softclip_backward_op(
        a, b, stats, config, g, t, ctx.t_value, target_t, ctx.target_t_value, ctx.coef, ctx.detach_targets, ctx.shared, need_t, need_tt
    )
    return (da if need_a else None), (db if need_b else None), (dt if need_t else None), None, (dtt if need_tt else None), None, None, None, None


_softclip_op.register_autograd(_softclip_autograd, setup_context=_softclip_setup)


def soft_clip(
    a: Tensor,
    b: Tensor,
    t: Temperature,
    coefficients: SoftClipCoefficients,
    *,
    target_t: Optional[Temperature] = None,
    detach_targets: bool = False,
) -> Tensor:
    """The fused per-sample MultiSClip vector of both directions of a pair (``target_t`` None: ``t``).

    In eager mode :class:`SoftClip`; under ``torch.compile`` the custom operator
    ``m3co_loss::softclip``, the same computation, which the compiler keeps in its graph (the first
    eager call of a custom operator with an autograd formula imports ``torch._dynamo``: about
    150 MiB of memory that an eager training loop need not hold).

    Raises:
        ValueError: naming ``t`` or ``target_t``: a tensor off the CPU, or a temperature below
            the smallest of the static shift in the embeddings' dtype (0.025 in float32, 1/300 in
            float64); ``m3co_loss.functional`` with ``backend='tiled'`` computes those.
    """
    target_t = t if target_t is None else target_t
    if not torch.compiler.is_compiling():  # the forward pass checks the temperatures (check_temperatures)
        return SoftClip.apply(a, b, t, target_t, coefficients, detach_targets)  # type: ignore[no-any-return, no-untyped-call]
    shared = _one_tensor(t, target_t)
    v: Tensor = _softclip_op(a, b, *split_temperature(t), *split_temperature(target_t), [float(x) for x in coefficients], detach_targets, shared)[0]
    return v
