r"""The Triton backend: fused CUDA kernels of the O(N D)-memory log-sum-exps and soft-target sums.

The same two building blocks as the tiled torch backend (:mod:`m3co_loss.backends.tiled`), each a
fused Triton kernel that never writes an N x N tile to memory:

* :class:`LogSumExp`: ``r_i = lse_k S_ik`` by online softmax (running maximum, exact for
  every temperature), one program per block of rows; the column log-sum-exps ``c`` are the
  row log-sum-exps of ``S^T`` (a second launch with the operands swapped). Backward:
  ``dq = A k / t`` with ``A_ik = g^r_i e^{S_ik - r_i} + g^c_k e^{S_ik - c_k}``, one program per
  block of rows; ``dk`` is the same kernel on ``S^T``.
* :class:`SoftTargetSum`: ``y_i = sum_l softmax_l(q_i . k_l / t) (u_l + (gamma/t_v) vq_i . vk_l)``
  by online softmax (the running row maximum is kept for the backward pass). Backward: a row
  kernel (``dq``, ``dvq``) and a column kernel (``dk``, ``dvk``, ``du``) that recompute the tiles
  of ``P`` and ``dG_il = g_i P_il (X_il - y_i)``.

A temperature may be a 0-dim tensor (a learnable one): the kernels read ``1/t`` from a device
tensor (no host synchronisation), and its gradient comes from the operands' gradients,
``dL/dt = -<q, dL/dq> / t`` (docs page ``maths``).

Each program owns a block of rows of its outputs and accumulates ``w @ V`` into them chunk by
chunk of the embedding dimension, so any D works without holding a (block x D) accumulator in
registers. The products run in the precision of the option ``precision`` of
:class:`~m3co_loss.backends.BackendConfig` (default ``"auto"``: float16 and bfloat16 inputs in
their own precision, for which the loss vectors take the inputs' dtype from
:class:`~m3co_loss.backends.Rows`; float32 ones on TF32 tensor cores when
``torch.backends.cuda.matmul.allow_tf32`` is True, IEEE float32 otherwise), always accumulated
in float32 with float32 log-sum-exp and softmax state; with IEEE products the results agree with
the torch backends to float32 rounding.

The kernels take float32 tensors (the losses normalise half-precision embeddings to float32
rows; the kernels round them back for the products); the dispatch (:mod:`m3co_loss.backends`)
runs float64 on the tiled backend. Block sizes are read from :func:`m3co_loss.backends.get_config`
(``triton_block_m``, ``triton_block_n``, ``triton_block_d``) once per forward pass; the
backward pass uses the same values. The ``triton`` package is imported on the first kernel
launch, not with this module. The kernels are tested for exactness with Triton's CPU
interpreter (``TRITON_INTERPRET=1``); docs/kernels.rst says what is measured on GPUs.
"""

from __future__ import annotations

import dataclasses
import functools
from types import ModuleType
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from ._config import BackendConfig, get_config
from ._tiling import decode_config, encode_config, fake_config, first_order_only, join_temperature, split_temperature, temperature_grad
from ._interface import Temperature
from ._streaming import StreamingBackend

__all__ = [
    "LogSumExp",
    "SoftTargetSum",
    "logsumexp",
    "soft_target_sum",
    "backend_for",
]


@functools.lru_cache(maxsize=None)
def _jit() -> ModuleType:
    """The module of compiled kernels, imported on first use (importing triton takes a while)."""
    try:
        from . import _triton_jit
    except ImportError as error:
        raise ImportError("backend='triton' needs the triton package; install it or use backend='tiled'") from error
    return _triton_jit


def _check_float32(*tensors: Tensor) -> None:
    for x in tensors:
        if x.dtype != torch.float32:
            raise TypeError(f"the Triton kernels take float32 tensors; got {x.dtype} (backend='triton' runs other dtypes on the tiled kernels)")


_HINTS = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def _hint(source_dtype: Optional[torch.dtype]) -> str:
    """The precision that ``precision="auto"`` takes for embeddings given in ``source_dtype``: their own if half, else "auto"."""
    return _HINTS.get(source_dtype, "auto") if source_dtype is not None else "auto"


def _resolved(config: BackendConfig, hint: str = "auto") -> BackendConfig:
    """``config`` with ``precision="auto"`` resolved: the half precision of ``hint``, else TF32 when torch
    allows it for its own float32 products, else IEEE."""
    if config.precision != "auto":
        return config
    if hint == "auto":
        hint = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return dataclasses.replace(config, precision=hint)


def _launch(config: BackendConfig) -> Dict[str, Any]:
    """The compile-time block sizes, product precision and launch options of a kernel."""
    return dict(BM=config.triton_block_m, BN=config.triton_block_n, BD=config.triton_block_d, PREC=config.precision,
                num_warps=config.triton_num_warps, num_stages=config.triton_num_stages)


def _grid(size: int, block: int) -> Tuple[int]:
    return ((size + block - 1) // block,)


def _on_device(value: Temperature, like: Tensor) -> Tensor:
    """A one-element float32 tensor on ``like``'s device holding ``value`` (a float, or a 0-dim tensor read there)."""
    if isinstance(value, Tensor):
        return value.detach().to(torch.float32).reshape(1)
    return like.new_full((1,), value, dtype=torch.float32)


def _ratio(x: float, t: Temperature) -> Temperature:
    """``x / t`` (a float for a float ``t``: the kernels' scalars then keep the bits of a float argument)."""
    return x / t.detach() if isinstance(t, Tensor) else x / t


def _row_lse(q: Tensor, k: Tensor, inv_t: Tensor, config: BackendConfig) -> Tensor:
    out = q.new_empty(q.shape[0])
    _jit().row_lse_kernel[_grid(q.shape[0], config.triton_block_m)](
        q, k, out, inv_t, q.shape[0], k.shape[0], q.shape[1], q.stride(0), k.stride(0), **_launch(config)
    )
    return out


def _lse_grad(q: Tensor, k: Tensor, r: Tensor, c: Tensor, g_r: Optional[Tensor], g_c: Optional[Tensor], inv_t: Tensor, config: BackendConfig) -> Tensor:
    """``dq = A k / t`` for ``S = q k^T / t``; ``g_r`` or ``g_c`` may be None."""
    dq = torch.zeros_like(q)
    dummy = q.new_zeros(1)
    _jit().lse_grad_kernel[_grid(q.shape[0], config.triton_block_m)](
        q, k, r, c if g_c is not None else dummy, g_r if g_r is not None else dummy, g_c if g_c is not None else dummy, dq, inv_t,
        q.shape[0], k.shape[0], q.shape[1], q.stride(0), k.stride(0), dq.stride(0),
        HAS_R=g_r is not None, HAS_C=g_c is not None, **_launch(config),
    )
    return dq


class LogSumExp(torch.autograd.Function):
    """Triton version of :class:`m3co_loss.backends.tiled.LogSumExp` (float32): ``(r, c)`` of ``q k^T / t``."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, t: Temperature, with_cols: bool) -> Tuple[Tensor, Tensor]:
        """Row log-sum-exps, and the column ones as the rows of ``S^T``."""
        q, k = q.contiguous(), k.contiguous()
        r, c, config = lse_forward(q, k, t, with_cols)
        ctx.save_for_backward(q, k, r, c)
        ctx.t, ctx.with_cols, ctx.config = t.detach() if isinstance(t, Tensor) else t, with_cols, config
        ctx.set_materialize_grads(False)
        return r, c

    @staticmethod
    @first_order_only
    def backward(ctx: Any, g_r: Optional[Tensor], g_c: Optional[Tensor]) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], None]:
        """``dq = A k / t`` (rows of S) and ``dk = A^T q / t`` (rows of S^T); ``dt = -<q, dq> / t``."""
        q, k, r, c = ctx.saved_tensors
        dq, dk, dt = lse_backward(q, k, r, c, ctx.t, ctx.with_cols, g_r, g_c, ctx.config, ctx.needs_input_grad[2])
        return dq, dk, dt, None


def lse_forward(q: Tensor, k: Tensor, t: Temperature, with_cols: bool, hint: str = "auto") -> Tuple[Tensor, Tensor, BackendConfig]:
    """The forward pass of :class:`LogSumExp` on contiguous ``q``, ``k``: ``(r, c, config)`` (``hint``: see :func:`_resolved`)."""
    _check_float32(q, k)
    config = _resolved(get_config(), hint)  # the backward pass keeps this precision
    inv_t = _on_device(_ratio(1.0, t), q)
    r = _row_lse(q, k, inv_t, config)
    c = _row_lse(k, q, inv_t, config) if with_cols else q.new_zeros(0)
    return r, c, config


def lse_backward(
    q: Tensor, k: Tensor, r: Tensor, c: Tensor, t: Temperature, with_cols: bool, g_r: Optional[Tensor], g_c: Optional[Tensor], config: BackendConfig, need_t: bool
) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """The backward pass of :class:`LogSumExp`: ``(dq, dk, dt)`` (all None without gradients; ``dt`` None unless ``need_t``)."""
    g_c = g_c.contiguous() if with_cols and g_c is not None else None
    g_r = g_r.contiguous() if g_r is not None else None
    if g_r is None and g_c is None:
        return None, None, None
    if g_c is None:
        c = r.new_zeros(k.shape[0])  # unused by the kernels (HAS_C / HAS_R are False)
    inv_t = _on_device(_ratio(1.0, t), q)
    dq = _lse_grad(q, k, r, c, g_r, g_c, inv_t, config)
    dk = _lse_grad(k, q, c, r, g_c, g_r, inv_t, config)
    dt = temperature_grad(t, [(q, dq)]) if need_t else None
    return dq, dk, dt


class SoftTargetSum(torch.autograd.Function):
    """Triton version of :class:`m3co_loss.backends.tiled.SoftTargetSum` (float32)."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, u: Tensor, vq: Tensor, vk: Tensor, t: Temperature, gamma: float, t_v: Temperature) -> Tensor:
        """One program per block of rows: online sums of ``E`` and ``E X`` (no N x N tile stored)."""
        q, k, u, vq, vk = (x.contiguous() for x in (q, k, u, vq, vk))
        y, shift, norm, config = soft_target_sum_forward(q, k, u, vq, vk, t, gamma, t_v)
        ctx.save_for_backward(q, k, u, vq, vk, shift, norm, y)
        ctx.t = t.detach() if isinstance(t, Tensor) else t
        ctx.t_v = t_v.detach() if isinstance(t_v, Tensor) else t_v
        ctx.gamma, ctx.config = gamma, config
        return y

    @staticmethod
    @first_order_only
    def backward(ctx: Any, g: Tensor) -> Tuple[Optional[Tensor], ...]:
        """Row kernel for ``dq, dvq``; column kernel for ``dk, dvk, du``; the temperatures' from ``dq`` and ``dvq``."""
        need_q, need_k, _, _, _, need_t, _, need_t_v = ctx.needs_input_grad
        need_logits = need_q or need_k or need_t  # detached soft targets need no dG
        q, k, u, vq, vk, shift, norm, y = ctx.saved_tensors
        dq, dk, du, dvq, dvk, dt, dt_v = soft_target_sum_backward(
            q, k, u, vq, vk, shift, norm, y, ctx.t, ctx.gamma, ctx.t_v, g, ctx.config, need_logits=need_logits, need_t=need_t, need_t_v=need_t_v
        )
        return (dq if need_logits else None), (dk if need_logits else None), du, dvq, dvk, dt, None, dt_v


def soft_target_sum_forward(
    q: Tensor, k: Tensor, u: Tensor, vq: Tensor, vk: Tensor, t: Temperature, gamma: float, t_v: Temperature, hint: str = "auto"
) -> Tuple[Tensor, Tensor, Tensor, BackendConfig]:
    """The forward pass of :class:`SoftTargetSum` on contiguous operands: ``(y, shift, norm, config)``."""
    _check_float32(q, k, u, vq, vk)
    config = _resolved(get_config(), hint)  # the backward pass keeps this precision
    n, N = q.shape[0], k.shape[0]
    inv_t = _on_device(_ratio(1.0, t), q)
    coef = _on_device(_ratio(gamma, t_v), q)
    shift, y, norm = q.new_empty(n), q.new_empty(n), q.new_empty(n)
    _jit().soft_fwd_kernel[_grid(n, config.triton_block_m)](
        q, k, u, vq, vk, shift, y, norm, inv_t, coef, n, N, q.shape[1], vq.shape[1],
        q.stride(0), k.stride(0), vq.stride(0), vk.stride(0), **_launch(config),
    )
    return y, shift, norm, config


def soft_target_sum_backward(
    q: Tensor, k: Tensor, u: Tensor, vq: Tensor, vk: Tensor, shift: Tensor, norm: Tensor, y: Tensor,
    t: Temperature, gamma: float, t_v: Temperature, g: Tensor, config: BackendConfig, *, need_logits: bool, need_t: bool, need_t_v: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """The backward pass of :class:`SoftTargetSum`: ``(dq, dk, du, dvq, dvk, dt, dt_v)`` (``dq``, ``dk`` zeros unless ``need_logits``)."""
    inv_t = _on_device(_ratio(1.0, t), q)
    coef = _on_device(_ratio(gamma, t_v), q)
    g = g.contiguous()
    n, N, D, DV = q.shape[0], k.shape[0], q.shape[1], vq.shape[1]
    dq, dk, dvq, dvk, du = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(vq), torch.zeros_like(vk), torch.zeros_like(u)
    common = (u, vq, vk, shift, norm, y, g)
    jit = _jit()
    jit.soft_bwd_rows_kernel[_grid(n, config.triton_block_m)](
        q, k, *common, dq, dvq, inv_t, coef, n, N, D, DV,
        q.stride(0), k.stride(0), vq.stride(0), vk.stride(0), dq.stride(0), dvq.stride(0),
        HAS_DQ=need_logits, **_launch(config),
    )
    jit.soft_bwd_cols_kernel[_grid(N, config.triton_block_n)](
        q, k, *common, dk, dvk, du, inv_t, coef, n, N, D, DV,
        q.stride(0), k.stride(0), vq.stride(0), vk.stride(0), dk.stride(0), dvk.stride(0),
        HAS_DK=need_logits, **_launch(config),
    )
    dt = temperature_grad(t, [(q, dq)]) if need_t else None
    dt_v = temperature_grad(t_v, [(vq, dvq)]) if need_t_v else None
    return dq, dk, du, dvq, dvk, dt, dt_v


# ----------------------------------------------------------------------------- operators
# The kernels as custom operators (see the operators of :mod:`m3co_loss.backends.tiled`).


@torch.library.custom_op("m3co_loss::triton_logsumexp", mutates_args=())
def _lse_op(q: Tensor, k: Tensor, t: Optional[Tensor], t_value: float, with_cols: bool, hint: str) -> Tuple[Tensor, Tensor, Tensor]:
    r, c, config = lse_forward(q.contiguous(), k.contiguous(), join_temperature(t, t_value), with_cols, hint)
    return r, c, encode_config(config)


@_lse_op.register_fake
def _(q: Tensor, k: Tensor, t: Optional[Tensor], t_value: float, with_cols: bool, hint: str) -> Tuple[Tensor, Tensor, Tensor]:
    return q.new_empty(q.shape[0]), q.new_empty(k.shape[0] if with_cols else 0), fake_config()


@torch.library.custom_op("m3co_loss::triton_logsumexp_backward", mutates_args=())
def _lse_backward_op(
    q: Tensor, k: Tensor, r: Tensor, c: Tensor, config: Tensor, g_r: Optional[Tensor], g_c: Optional[Tensor], t: Optional[Tensor], t_value: float, with_cols: bool, need_t: bool
) -> Tuple[Tensor, Tensor, Tensor]:
    q, k = q.contiguous(), k.contiguous()
    dq, dk, dt = lse_backward(q, k, r, c, join_temperature(t, t_value), with_cols, g_r, g_c, decode_config(config), need_t)
    return (torch.zeros_like(q) if dq is None else dq), (torch.zeros_like(k) if dk is None else dk), (q.new_zeros(()) if dt is None else dt)


@_lse_backward_op.register_fake
def _(q: Tensor, k: Tensor, *rest: Any) -> Tuple[Tensor, Tensor, Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape), q.new_empty(())


def _lse_setup(ctx: Any, inputs: Tuple[Any, ...], output: Tuple[Tensor, ...]) -> None:
    q, k, t, t_value, with_cols, hint = inputs
    r, c, config = output
    ctx.save_for_backward(q, k, r, c, config, t)
    ctx.t_value, ctx.with_cols = t_value, with_cols
    ctx.mark_non_differentiable(config)
    ctx.set_materialize_grads(False)


@first_order_only
def _lse_autograd(ctx: Any, g_r: Optional[Tensor], g_c: Optional[Tensor], *unused: Any) -> Tuple[Optional[Tensor], ...]:
    if g_r is None and g_c is None:
        return None, None, None, None, None, None
    q, k, r, c, config, t = ctx.saved_tensors
    need_t = ctx.needs_input_grad[2]
    dq, dk, dt = _lse_backward_op(q, k, r, c, config, g_r, g_c, t, ctx.t_value, ctx.with_cols, need_t)
    return dq, dk, (dt if need_t else None), None, None, None


_lse_op.register_autograd(_lse_autograd, setup_context=_lse_setup)


@torch.library.custom_op("m3co_loss::triton_soft_target_sum", mutates_args=())
def _soft_op(
    q: Tensor, k: Tensor, u: Tensor, vq: Tensor, vk: Tensor, t: Optional[Tensor], t_value: float, gamma: float, t_v: Optional[Tensor], t_v_value: float, hint: str
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    q, k, u, vq, vk = (x.contiguous() for x in (q, k, u, vq, vk))
    y, shift, norm, config = soft_target_sum_forward(q, k, u, vq, vk, join_temperature(t, t_value), gamma, join_temperature(t_v, t_v_value), hint)
    return y, shift, norm, encode_config(config)


@_soft_op.register_fake
def _(q: Tensor, *rest: Any) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    n = q.shape[0]
    return q.new_empty(n), q.new_empty(n), q.new_empty(n), fake_config()


@torch.library.custom_op("m3co_loss::triton_soft_target_sum_backward", mutates_args=())
def _soft_backward_op(
    q: Tensor, k: Tensor, u: Tensor, vq: Tensor, vk: Tensor, shift: Tensor, norm: Tensor, y: Tensor, config: Tensor, g: Tensor,
    t: Optional[Tensor], t_value: float, gamma: float, t_v: Optional[Tensor], t_v_value: float, need_logits: bool, need_t: bool, need_t_v: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    q, k, u, vq, vk = (x.contiguous() for x in (q, k, u, vq, vk))
    dq, dk, du, dvq, dvk, dt, dt_v = soft_target_sum_backward(
        q, k, u, vq, vk, shift, norm, y, join_temperature(t, t_value), gamma, join_temperature(t_v, t_v_value), g, decode_config(config),
        need_logits=need_logits, need_t=need_t, need_t_v=need_t_v,
    )
    return dq, dk, du, dvq, dvk, q.new_zeros(()) if dt is None else dt, q.new_zeros(()) if dt_v is None else dt_v


@_soft_backward_op.register_fake
def _(q: Tensor, k: Tensor, u: Tensor, vq: Tensor, vk: Tensor, *rest: Any) -> Tuple[Tensor, ...]:
    return q.new_empty(q.shape), k.new_empty(k.shape), u.new_empty(u.shape), vq.new_empty(vq.shape), vk.new_empty(vk.shape), q.new_empty(()), q.new_empty(())


def _soft_setup(ctx: Any, inputs: Tuple[Any, ...], output: Tuple[Tensor, ...]) -> None:
    q, k, u, vq, vk, t, t_value, gamma, t_v, t_v_value, hint = inputs
    y, shift, norm, config = output
    ctx.save_for_backward(q, k, u, vq, vk, shift, norm, y, config, t, t_v)
    ctx.t_value, ctx.gamma, ctx.t_v_value = t_value, gamma, t_v_value
    ctx.mark_non_differentiable(shift, norm, config)


@first_order_only
def _soft_autograd(ctx: Any, g: Tensor, *unused: Any) -> Tuple[Optional[Tensor], ...]:
    q, k, u, vq, vk, shift, norm, y, config, t, t_v = ctx.saved_tensors
    need_q, need_k, _, _, _, need_t, _, _, need_t_v, _, _ = ctx.needs_input_grad
    need_logits = need_q or need_k or need_t  # detached soft targets need no dG
    dq, dk, du, dvq, dvk, dt, dt_v = _soft_backward_op(
        q, k, u, vq, vk, shift, norm, y, config, g, t, ctx.t_value, ctx.gamma, t_v, ctx.t_v_value, need_logits, need_t, need_t_v
    )
    return (dq if need_logits else None), (dk if need_logits else None), du, dvq, dvk, (dt if need_t else None), None, None, (dt_v if need_t_v else None), None, None


_soft_op.register_autograd(_soft_autograd, setup_context=_soft_setup)


def logsumexp(q: Tensor, k: Tensor, t: Temperature, with_cols: bool, *, hint: str = "auto") -> Tuple[Tensor, Tensor]:
    """``(r, c)``: row and (if ``with_cols``, else empty) column log-sum-exps of ``q k^T / t`` (the custom operator ``m3co_loss::triton_logsumexp``).

    ``hint``: the precision ``precision="auto"`` takes (``"bf16"``, ``"fp16"``: the embeddings came in it).
    """
    r, c, _ = _lse_op(q, k, *split_temperature(t), with_cols, hint)
    return r, c


def soft_target_sum(
    q: Tensor, k: Tensor, u: Tensor, vq: Tensor, vk: Tensor, t: Temperature, gamma: float, t_v: Optional[Temperature] = None, *, hint: str = "auto"
) -> Tensor:
    """``y_i = sum_l softmax_l(q_i . k_l / t) (u_l + (gamma / t_v) vq_i . vk_l)`` (``t_v`` None: ``t``; the operator ``m3co_loss::triton_soft_target_sum``)."""
    y: Tensor = _soft_op(q, k, u, vq, vk, *split_temperature(t), float(gamma), *split_temperature(t if t_v is None else t_v), hint)[0]
    return y


# one instance per precision hint: ``precision="auto"`` multiplies half-precision inputs in their own precision
_BACKENDS = {
    hint: StreamingBackend(functools.partial(logsumexp, hint=hint), functools.partial(soft_target_sum, hint=hint), fused_softclip=False)
    for hint in ("auto", "bf16", "fp16")
}


def backend_for(source_dtype: Optional[torch.dtype]) -> StreamingBackend:
    """The Triton backend for embeddings given in ``source_dtype`` (see :attr:`~m3co_loss.backends.Rows.source_dtype`).

    Under ``precision="auto"`` half-precision inputs multiply in their own precision, so each
    precision hint has its own :class:`~m3co_loss.backends.tiled.StreamingBackend` over the same kernels.
    """
    return _BACKENDS[_hint(source_dtype)]
