"""What every loss call shares: normalisation, the process-group layout, the reduction.

:mod:`m3co_loss.functional` and :mod:`m3co_loss._targets` build each call from these steps:
check the arguments (:func:`_check_common`, :func:`_check_pair`), bring the temperatures to
the embeddings' dtype and device (:func:`_temperatures`), find the layout of the batch over the
process group (:func:`_batch_layout`), normalise and gather the embeddings (:func:`_prepare`),
compute the per-sample vector, and reduce it (:func:`_reduce`); see
:mod:`m3co_loss.functional`'s module docstring for the distributed scaling.

Over a process group a TypeError or ValueError of a call's checks (types, shapes, NaN or Inf,
permutations, ``lam``, labels, temperatures), all of which run before :func:`_batch_layout`, is
shared by :class:`_LocalChecks` as its block exits: this rank takes its part in the layout
exchange and then raises it, so that the other ranks raise too.
"""

from __future__ import annotations

import contextlib
from types import TracebackType
from typing import Any, ContextManager, List, NamedTuple, NoReturn, Optional, Sequence, Tuple, Type

import torch
from torch import Tensor

from . import distributed as dist_utils
from .backends import Rows, Temperature
from ._validation import (
    CONVENTIONS,
    REDUCTIONS,
    check_choice,
    check_embeddings,
    check_same_device,
    check_temperature,
    has_values,
    resolve_temperature,
    value_checks_enabled,
)

__all__ = ["normalize"]


def normalize(z: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """``z / ||z||`` along the last dim, in ``dtype`` (default: float32 at least); zero rows stay zero.

    A row whose largest magnitude lies outside [2^-40, 2^40] is first divided by it, so that its
    squared norm neither overflows (entries above ~1e19 in float32) nor underflows (tiny rows):
    every finite row gets the value of exact arithmetic. The divisor is detached, which keeps the
    gradient exact: ``normalize(c z) = normalize(z)`` for c > 0. With value checks on (they read
    the data anyway) the division runs only when some row needs it, so ordinary batches take
    ``F.normalize`` alone, bit for bit and without an extra N x D buffer; with value checks off it
    runs always (a division by 1 for ordinary rows), which keeps the call free of host syncs.
    """
    z = z.to(_compute_dtype([z]) if dtype is None else dtype)
    if z.shape[0] and has_values(z):
        low, high = torch.aminmax(z.detach(), dim=-1, keepdim=True)
        peak = torch.maximum(high, -low)
        extreme = (peak > _NORM_SAFE_MAX) | ((peak < _NORM_SAFE_MIN) & (peak > 0))
        if not value_checks_enabled() or bool(extreme.any()):
            z = z / torch.where(extreme, peak, torch.ones_like(peak))
    unit: Tensor = _UnitRows.apply(z)  # type: ignore[no-untyped-call]
    return unit


_EPS = 1e-12  # F.normalize's: a row below this norm is divided by it (zero rows stay zero)
_DOT_ROWS = 1024  # rows per chunk of the backward's row-wise dot products


class _UnitRows(torch.autograd.Function):
    """``F.normalize(z, dim=-1, eps=1e-12)`` (the same bits) with a backward pass that allocates only its result.

    ``dz = (g - p <g, p>) / max(||z||, eps)`` row by row (the term in ``<g, p>`` vanishes where
    the norm is clamped to eps). Autograd's formula for ``F.normalize`` allocates N x D
    temporaries beside its result, which set the peak memory of a tiled backward pass at large
    N x D (docs page ``benchmarks``). Under
    ``create_graph=True`` or ``torch.compile`` the backward is the same formula in plain
    differentiable ops (so the dense backend's second derivatives stay exact).
    """

    @staticmethod
    def forward(ctx: Any, z: Tensor) -> Tensor:
        norm: Tensor = z.norm(2, -1, keepdim=True)
        p = z / norm.clamp_min(_EPS).expand_as(z)
        ctx.save_for_backward(z, p, norm)
        return p

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        z, p, norm = ctx.saved_tensors
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            # from z, not the saved norm: second derivatives need the graph through the norm
            length = z.norm(2, -1, keepdim=True)
            denom = length.clamp_min(_EPS)
            unit = z / denom
            dz: Tensor = (g - unit * ((g * unit).sum(-1, keepdim=True) * (length >= _EPS))) / denom
            return dz
        dot = norm.new_empty(norm.shape)
        for start in range(0, g.shape[0], _DOT_ROWS):
            rows = slice(start, start + _DOT_ROWS)
            torch.sum(g[rows] * p[rows], -1, keepdim=True, out=dot[rows])
        dot.mul_(norm >= _EPS)
        return torch.addcmul(g, p, dot, value=-1).div_(norm.clamp_min(_EPS))


# Row peaks within which the squared norm of a float32 row of up to 2^40 entries is a normal number.
_NORM_SAFE_MIN, _NORM_SAFE_MAX = 2.0**-40, 2.0**40


def _compute_dtype(zs: Sequence[Tensor]) -> torch.dtype:
    """The one dtype the embeddings of a call are normalised to: their promotion, float32 at least."""
    dtype = torch.float32
    for z in zs:
        dtype = torch.promote_types(dtype, z.dtype)
    return dtype


class _Batch(NamedTuple):
    """What every modality of one call shares: process-group layout and reduction scale."""

    sizes: Tuple[int, ...]  # rows per rank
    rank: int
    dtype: torch.dtype  # of the normalised embeddings (every input of the call is promoted to it)
    extra: Tuple[Tuple[int, ...], ...] = ()  # per rank, the integers the call asked _batch_layout to share

    @property
    def distributed(self) -> bool:
        return len(self.sizes) > 1

    @property
    def total(self) -> int:
        return sum(self.sizes)

    @property
    def offset(self) -> int:
        return sum(self.sizes[: self.rank])

    def gather(self, x: Tensor) -> Tensor:
        return dist_utils.all_gather_with_grad(x, sizes=self.sizes) if self.distributed else x


# Floating dtypes of the gathered (normalised) embeddings, coded for the layout check.
_GATHER_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# The dtype code of a rank whose argument checks raised (:class:`_LocalChecks`).
_LOCAL_ERROR = -2
# The integers ``extra`` of every call travel padded to this many, so that the layout table has
# one length on every rank, whatever the call: a rank that failed before knowing its own sends it too.
_EXTRA_INTS = 3


def _spread(gather_distributed: object) -> bool:
    """Whether this call spans a process group of more than one rank (no communication)."""
    if not isinstance(gather_distributed, bool):
        raise TypeError(f"gather_distributed must be a bool; got {type(gather_distributed).__name__}")
    return gather_distributed and dist_utils.world_size() > 1


def _min_rows(spread: bool) -> int:
    # One rank may hold fewer than two rows (even none) of a larger global batch.
    return 0 if spread else 2


class _LocalChecks:
    """Shares the TypeError or ValueError of a call's argument checks with the other ranks of a process group.

    Use ``with _LocalChecks(gather_distributed):`` around every check of a call that runs before
    :func:`_batch_layout`. Over a process group of more than one rank (``gather_distributed``
    True, as :func:`_spread` reads it) such an error makes this rank take its part in the
    collectives that the other ranks make in :func:`_batch_layout` (the layout table, with the
    dtype code ``_LOCAL_ERROR`` and the length of ``"<TypeName>: <message>"``, then the
    messages) as the ``with`` block exits, and then propagate: this rank raises its own
    exception, the others ``ValueError("rank r: <TypeName>: <message>")``, and no rank is left
    waiting. Otherwise the error propagates unchanged, and a call without an error makes no
    collective here.
    """

    def __init__(self, gather_distributed: object) -> None:
        self.gather_distributed = gather_distributed

    def __enter__(self) -> "_LocalChecks":
        return self

    def __exit__(self, kind: Optional[Type[BaseException]], error: Optional[BaseException], traceback: Optional[TracebackType]) -> None:
        if isinstance(error, (TypeError, ValueError)) and self.gather_distributed is True and dist_utils.world_size() > 1:
            self._share_and_raise(error)

    @staticmethod
    def _share_and_raise(error: Exception) -> NoReturn:
        # The device cannot come from the arguments: they may be what is wrong.
        device = dist_utils.communication_device()
        text = f"{type(error).__name__}: {error}".encode()
        table = dist_utils.all_gather_ints([0, 0, _LOCAL_ERROR, len(text)] + [0] * _EXTRA_INTS, device)
        _share_messages([row[3] for row in table], text, device)
        raise error


def _batch_layout(zs: Sequence[Tensor], spread: bool, name: str, extra: Sequence[int] = ()) -> _Batch:
    """Every rank's row count, after checking that all ranks agree on D and dtype.

    ``zs`` are the embeddings of the call (all of one shape). Every rank receives the same
    table, so every rank raises the same error (no rank is left waiting in a collective).
    ``extra`` are integers of this rank that every rank needs (e.g. the outcome of its value
    checks): they travel in the same collective and come back, per rank, in ``extra``.
    A rank whose checks raised (:class:`_LocalChecks`) sends the code ``_LOCAL_ERROR`` and the
    length of its message: every rank then raises before it compares D and dtypes, the others
    ``"rank r: <TypeName>: <message>"`` (see :func:`_raise_shared_error`).
    """
    z = zs[0]
    if not spread:
        return _Batch((z.shape[0],), 0, _compute_dtype(zs), (tuple(extra),))
    dtype = _compute_dtype(zs)
    code = _GATHER_DTYPES.index(dtype) if dtype in _GATHER_DTYPES else -1
    assert len(extra) <= _EXTRA_INTS, "a call sends more extra ints than _EXTRA_INTS holds"
    padding = [0] * (_EXTRA_INTS - len(extra))
    table = dist_utils.all_gather_ints([z.shape[0], z.shape[1], code, 0, *extra, *padding], z.device)
    _raise_shared_error(table, z.device)
    sizes = tuple(row[0] for row in table)
    for r, (_, d, c, *_) in enumerate(table):
        if d != table[0][1]:
            raise ValueError(f"{name} has D = {d} on rank {r} but D = {table[0][1]} on rank 0; every rank must pass the same D")
        if c != table[0][2]:
            raise TypeError(f"{name} is promoted to {_dtype_name(c)} on rank {r} but to {_dtype_name(table[0][2])} on rank 0; pass one dtype on every rank")
    if sum(sizes) < 2:
        raise ValueError(f"{name} must hold at least 2 samples over all ranks for a contrastive loss; the ranks hold {list(sizes)}")
    return _Batch(sizes, dist_utils.rank(), dtype, tuple(tuple(row[4 : 4 + len(extra)]) for row in table))


def _raise_shared_error(table: Sequence[Sequence[int]], device: torch.device) -> None:
    """On a rank whose checks passed: raise when another rank's did not (``row[2] == _LOCAL_ERROR`` in the
    layout ``table``, ``row[3]`` the length of its message), naming the first such rank.

    Only then do the ranks exchange their messages, in a second small collective (the failing
    ranks take part in :meth:`_LocalChecks._share_and_raise`): a call without an error costs no
    more than the layout exchange.
    """
    lengths = [row[3] if row[2] == _LOCAL_ERROR else 0 for row in table]
    if not any(lengths):
        return
    texts = _share_messages(lengths, b"", device)
    bad = next(r for r, length in enumerate(lengths) if length)
    raise ValueError(f"rank {bad}: {bytes(texts[bad][: lengths[bad]]).decode(errors='replace')}")


def _share_messages(lengths: Sequence[int], message: bytes, device: torch.device) -> List[List[int]]:
    """Every rank's message as bytes (``lengths``: of each, from the layout table), padded to the longest."""
    return dist_utils.all_gather_ints(list(message.ljust(max(lengths), b"\0")), device)


def _dtype_name(code: int) -> str:
    return str(_GATHER_DTYPES[code]) if 0 <= code < len(_GATHER_DTYPES) else "an unsupported dtype"


def _prepare(zs: Sequence[Tensor], layout: _Batch) -> List[Rows]:
    """Normalised rows of each tensor, gathered over the process group in one collective."""
    ps = [normalize(z, layout.dtype) for z in zs]
    if not layout.distributed:
        return [Rows(p, p, 0, z.dtype) for p, z in zip(ps, zs)]
    widths = [p.shape[1] for p in ps]
    full = layout.gather(torch.cat(ps, dim=1) if len(ps) > 1 else ps[0])
    return [Rows(p, f, layout.offset, z.dtype) for p, f, z in zip(ps, torch.split(full, widths, dim=1), zs)]


def _no_autocast(device: torch.device) -> ContextManager[object]:
    # The losses choose their own precision: matmuls under an outer autocast region would
    # otherwise run in bfloat16/float16 and lose the float32 accumulation promised above.
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # a device type without autocast support
        return contextlib.nullcontext()


def _reduce(v: Tensor, reduction: str, layout: _Batch) -> Tensor:
    if reduction == "none":
        return v
    # Each rank returns world_size / N_global times its local sum, so that the average over
    # ranks (what DDP's gradient averaging computes) is the global mean, even when ranks hold
    # different numbers of rows.
    world = len(layout.sizes)
    if reduction == "sum":
        return v.sum() * world if world > 1 else v.sum()
    return v.sum() * (world / layout.total) if world > 1 else v.mean()


def _check_common(temperature: object, reduction: object, convention: object) -> Temperature:
    t = check_temperature("temperature", temperature)
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("convention", convention, CONVENTIONS)
    return t


def _temperatures(
    temperature: Temperature,
    zs: Sequence[Tensor],
    target_temperature: Optional[Temperature] = None,
) -> Tuple[Temperature, Temperature]:
    """``(t, target_t)`` ready for the kernels (see :func:`~m3co_loss._validation.resolve_temperature`); ``target_t`` None: ``t``.

    ``zs``: the embeddings of the call, which give the dtype (:func:`_compute_dtype`) and the device.
    """
    dtype, device = _compute_dtype(zs), zs[0].device
    t = resolve_temperature("temperature", temperature, dtype, device)
    if target_temperature is None:
        return t, t
    return t, resolve_temperature("target_temperature", target_temperature, dtype, device)


def _check_pair(
    name_a: str, z_a: object, name_b: str, z_b: object, *, min_rows: int = 2
) -> Tuple[Tensor, Tensor]:
    z_a = check_embeddings(name_a, z_a, min_rows=min_rows)
    z_b = check_embeddings(name_b, z_b, n=z_a.shape[0], d=z_a.shape[1], min_rows=min_rows)
    check_same_device((name_a, name_b), (z_a, z_b))
    return z_a, z_b
