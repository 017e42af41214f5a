r"""Contrastive losses with structured targets: a few positives per row, exact, in O(N D) memory.

With ``S = p_a p_b^T / t``, ``r = lse_row(S)``, ``c = lse_col(S)`` and a target matrix ``T``
whose rows sum to 1, the per-sample value is the row and the column cross-entropy::

    v_i = sum_k T_ik [(r_i - S_ik) + (c_k - S_ik)] = r_i + sum_k T_ik c_k - 2 sum_k T_ik S_ik.

``T`` is never formed outside the dense backend. The tiled and Triton backends take ``r`` and
``c`` from their log-sum-exp primitive and the two target sums from O(N D) identities:

* partners ``P`` (N, K) with weights ``w``: ``sum_k T_ik c_k = sum_j w_ij c[P_ij]`` (a gather) and
  ``sum_k T_ik S_ik = sum_j w_ij (p_a[i] . p_b[P_ij]) / t`` (row-wise dot products with the
  gathered columns, one partner at a time, in O(N D + N K) memory);
* labels ``y``: ``T_ik = 1[y_k = y_i] / n_{y_i}``, so both sums are per-class means, of ``c`` and
  of the rows of ``p_b``: ``sum_k T_ik S_ik = p_a[i] . mean_b[y_i] / t`` (one (N, D) buffer of
  class sums: the classes are found by sorting, which keeps every shape static).

Autograd differentiates these ops, so first derivatives are exact (also with respect to the
weights). The docs page ``targets`` writes the forms out.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple, Union, cast

import torch
from torch import Tensor

from . import backends
from ._batch import _Batch, _LocalChecks, _batch_layout, _check_common, _check_pair, _min_rows, _no_autocast, _prepare, _reduce, _spread, _temperatures
from ._validation import (
    WEIGHTS_NEGATIVE,
    WEIGHTS_NOT_FINITE,
    WEIGHTS_OK,
    check_labels,
    check_partners,
    check_target_weights,
    has_values,
    target_weights_problem,
    target_weights_tolerance,
    value_checks_enabled,
)
from .backends import Rows, Temperature

__all__ = ["contrastive_loss", "partners_vector", "labels_vector"]


# ----------------------------------------------------------------------------- per-sample vectors


def _lse(a: Rows, b: Rows, t: Temperature, layout: _Batch, backend: str) -> Tuple[Optional[Tensor], Tensor, Tensor]:
    """``(s, r, c)``: the dense backend's (n, N) block of S (None on the other backends), the row
    log-sum-exps of the local rows and the column log-sum-exps of the local columns."""
    return backends._implementation(backend, a).row_col_lse(a, b, t, distributed=layout.distributed)


def _weighted_sum(weights: Tensor, term: Callable[[int], Tensor]) -> Tensor:
    total = weights[:, 0] * term(0)
    for j in range(1, weights.shape[1]):
        total = total + weights[:, j] * term(j)
    return total


class _PartnerDots(torch.autograd.Function):
    """``dots[i, j] = rows[i] . columns[partners[i, j]]``, (n, K), in O(n D + n K) memory.

    Autograd through a gather saves one gathered (n, D) copy per partner; this forward and
    backward gather one partner at a time and save nothing but their inputs, so K partners cost
    O(n K) beyond the (n, D) buffers, with or without gradients for the weights.
    """

    @staticmethod
    def forward(ctx: Any, rows: Tensor, columns: Tensor, partners: Tensor) -> Tensor:
        ctx.save_for_backward(rows, columns, partners)
        dots = rows.new_empty(partners.shape)
        for j in range(partners.shape[1]):
            dots[:, j] = (rows * columns[partners[:, j]]).sum(1)
        return dots

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], Optional[Tensor], None]:
        rows, columns, partners = ctx.saved_tensors
        grad_rows = grad_columns = None
        if ctx.needs_input_grad[0]:
            grad_rows = torch.zeros_like(rows)
            for j in range(partners.shape[1]):
                grad_rows.addcmul_(columns[partners[:, j]], grad[:, j : j + 1])
        if ctx.needs_input_grad[1]:
            grad_columns = torch.zeros_like(columns)
            for j in range(partners.shape[1]):
                grad_columns.index_add_(0, partners[:, j], rows * grad[:, j : j + 1])  # in a fixed order (see labels_vector)
        return grad_rows, grad_columns, None


def partners_vector(
    a: Rows,
    b: Rows,
    partners: Tensor,
    weights: Tensor,
    t: Temperature,
    *,
    reference: bool,
    layout: _Batch,
    backend: str,
    local: bool = False,
    rows_sum_to_one: bool = False,
) -> Tensor:
    """Per-sample values of the local rows of ``a`` with ``T_i = sum_j weights_ij e_{partners_ij}``.

    ``partners`` index the global batch (columns of ``b.full``); with ``local`` they index this
    rank's rows instead (mixing partners that never leave their rank, as in M3Co), which needs no
    collective. ``weights`` has the dtype of the embeddings. ``r_i`` enters weighted by the row
    sum ``sum_j w_ij`` (the value and the weights' gradient of ``sum_k T_ik [(r_i - S_ik) + ...]``
    for any weights); ``rows_sum_to_one`` says that the rows sum to 1 by construction (M3Co's
    ``lam``, ``1 - lam``), which drops that product.
    """
    s, r, c = _lse(a, b, t, layout, backend)
    if local:
        columns, c_cols, s_cols = b.local, c, partners + a.offset
    else:
        columns, c_cols, s_cols = b.full, layout.gather(c), partners
    if not rows_sum_to_one:
        r = r * weights.sum(1)
    if s is not None:
        rows = torch.arange(s.shape[0], device=s.device)
        target = _weighted_sum(weights, lambda j: s[rows, s_cols[:, j]])
        col_term = _weighted_sum(weights, lambda j: c_cols.index_select(0, partners[:, j]))
        v = (r - target) + (col_term - target)
    else:
        dots = cast(Tensor, _PartnerDots.apply(a.local, columns, partners))  # type: ignore[no-untyped-call]
        target = _weighted_sum(weights, lambda j: dots[:, j]) / t
        v = r + _weighted_sum(weights, lambda j: c_cols.index_select(0, partners[:, j])) - 2 * target
    return 0.5 * v if reference else v


def _class_index(labels: Tensor) -> Tensor:
    """Each label's class as an index in ``[0, N)``: the rank of its value among the distinct labels.

    Sorting instead of ``torch.unique`` keeps every shape static: no host synchronisation on an
    accelerator and no graph break under ``torch.compile``; per-class buffers get N rows (at
    most N classes), of which the first ``classes`` are used.
    """
    ordered, order = torch.sort(labels)
    starts = torch.ones_like(ordered, dtype=torch.long)
    starts[1:] = (ordered[1:] != ordered[:-1]).long()
    return torch.empty_like(order).scatter_(0, order, starts.cumsum(0) - 1)


def labels_vector(a: Rows, b: Rows, labels: Tensor, t: Temperature, *, reference: bool, layout: _Batch, backend: str) -> Tensor:
    """Per-sample values of the local rows of ``a`` with ``T_ik = 1[y_k = y_i] / n_{y_i}`` over the global batch.

    ``labels`` are this rank's (n,) labels; the labels of every rank are gathered.
    """
    s, r, c = _lse(a, b, t, layout, backend)
    n = a.local.shape[0]
    every = layout.gather(labels)
    c_cols = layout.gather(c)
    if s is not None:
        same = (labels[:, None] == every[None, :]).to(s.dtype)
        targets = same / same.sum(1, keepdim=True)
        target = (targets * s).sum(1)
        v = (r - target) + (targets @ c_cols - target)
    else:
        group = _class_index(every)
        count = c.new_zeros(every.shape[0]).index_add_(0, group, torch.ones_like(c_cols)).clamp_min_(1)
        mean_c = c.new_zeros(every.shape[0]).index_add(0, group, c_cols) / count
        mean_b = b.full.new_zeros(b.full.shape).index_add(0, group, b.full) / count[:, None]
        own = group[layout.offset : layout.offset + n]
        # index_select, not indexing: its backward (index_add) sums the many rows of a class in a fixed
        # order, where indexing's (index_put with accumulate) adds them in parallel, in varying order
        v = r + mean_c.index_select(0, own) - 2 * (a.local * mean_b.index_select(0, own)).sum(1) / t
    return 0.5 * v if reference else v


# ----------------------------------------------------------------------------- checks


def _local_value_stats(partners: Optional[Tensor], weights: Optional[Tensor], labels: Optional[Tensor]) -> Tuple[Tuple[int, ...], str]:
    """``(integers every rank needs, detail of this rank's weights problem)`` for the value checks."""
    if not value_checks_enabled():
        return (), ""
    if partners is not None:
        code, detail = target_weights_problem(weights) if weights is not None else (WEIGHTS_OK, "")
        if partners.numel() and has_values(partners):
            low, high = torch.aminmax(partners)
            return (code, int(low), int(high)), detail
        return (code, 0, -1), detail
    if labels is not None:
        return ((int(labels.min()) if labels.numel() and has_values(labels) else 0),), ""
    return (), ""


def _raise_value_errors(layout: _Batch, partners: Optional[Tensor], weights: Optional[Tensor], detail: str) -> None:
    """Raise, on every rank alike, the first value problem of any rank (the table came with the layout)."""
    for rank, stats in enumerate(layout.extra):
        if not stats:
            return
        where = f" on rank {rank}" if layout.distributed else ""
        mine = detail if rank == layout.rank else ""
        if partners is None:  # labels
            if stats[0] < 0:
                raise ValueError(f"labels{where} must be non-negative class indices; got {stats[0]}")
            continue
        code, low, high = stats
        if low < 0 or high >= layout.total:
            scope = f" (global indices: N = {layout.total} rows over all ranks)" if layout.distributed else ""
            bad = low if low < 0 else high
            raise ValueError(f"partners{where} must hold column indices in [0, {layout.total}){scope}; got {bad}")
        if code == WEIGHTS_NOT_FINITE:
            raise ValueError(f"weights{where} contains NaN or Inf")
        if code == WEIGHTS_NEGATIVE:
            raise ValueError(f"weights{where} must be non-negative{mine}")
        if code != WEIGHTS_OK:
            k = partners.shape[1] if weights is None else weights.shape[1]
            dtype = weights.dtype if weights is not None else torch.float32
            tolerance = target_weights_tolerance(dtype, k)
            raise ValueError(f"weights{where}: every row must sum to 1 (within {tolerance:.2g} for K = {k} in {dtype}){mine}")


# ----------------------------------------------------------------------------- public API


def contrastive_loss(
    z_a: Tensor,
    z_b: Tensor,
    *,
    partners: Optional[Tensor] = None,
    weights: Optional[Tensor] = None,
    labels: Optional[Tensor] = None,
    temperature: Union[float, Tensor] = 0.1,
    reduction: str = "mean",
    convention: str = "paper",
    backend: str = "auto",
    gather_distributed: bool = False,
) -> Tensor:
    r"""Symmetric contrastive loss of ``z_a`` against ``z_b`` with structured targets ``T``.

    With ``S = p_a p_b^T / t`` (rows L2-normalised), ``r``/``c`` its row/column log-sum-exps and
    a target matrix ``T`` whose rows sum to 1, the per-sample value is the row cross-entropy
    plus the column cross-entropy::

        v_i = sum_k T_ik [(r_i - S_ik) + (c_k - S_ik)] = r_i + sum_k T_ik c_k - 2 sum_k T_ik S_ik

    (``convention="reference"``: half of it, the average of the two directions). ``T`` is

    * the identity when no target is given: :func:`clip_loss`, bit for bit;
    * ``partners`` with ``weights``: ``T_ik = sum_j weights[i, j] [partners[i, j] = k]``, so a
      partner listed twice adds its weights (MixCo/i-Mix: M3Co is ``partners = [i, perm[i]]``,
      ``weights = [lam, 1 - lam]``); ``weights=None`` weighs the K partners of a row 1/K each;
    * ``labels``: ``T_ik = 1[y_k = y_i] / #{k : y_k = y_i}``, every column of the row's class a
      positive (supervised contrastive; duplicates in a batch), the row's own column included.

    No N x N matrix is formed outside ``backend="dense"``: the tiled and Triton backends keep
    O(N D) memory (plus O(N K) for the partners); the docs page *Structured targets* gives the
    identities.

    With ``gather_distributed=True`` the columns are the global batch (rank 0's rows first):
    each rank passes the ``partners`` of its own rows as *global* column indices (row i of rank r
    is global row ``offset_r + i``, ``offset_r`` the rows of the ranks before it) and the
    ``labels`` of its own rows (the labels of every rank are gathered). ``"mean"`` and ``"sum"``
    are scaled as for every loss of the package, so that DDP's averaged gradient is the
    single-process one.

    Args:
        z_a: (N, D) embeddings of the rows (queries).
        z_b: (N, D) embeddings of the columns (keys).
        partners: (N, K) integer column indices in ``[0, N)`` (global over ranks).
        weights: (N, K) non-negative floating weights of the partners, each row summing to 1
            (within ``4 K eps``, ``eps`` the machine epsilon of their dtype but at least
            float32's). Only with ``partners``.
        labels: (N,) non-negative integer class labels. Not with ``partners``.
        temperature: softmax temperature t > 0: a float, or a 0-dim floating tensor (e.g. a
            learnable temperature; its gradient is exact in every backend), at least
            :func:`~m3co_loss.functional.min_temperature` of the embeddings' dtype, as in
            :func:`~m3co_loss.functional.m3co_pair`.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-sample vector).
        convention: ``"paper"`` (sum of the two directions) or ``"reference"`` (their average).
        backend: ``"auto"``, ``"dense"``, ``"tiled"`` or ``"triton"``.
        gather_distributed: contrast against the rows of every rank of the process group.

    Raises:
        ValueError: both ``partners`` and ``labels``; ``weights`` without ``partners``; a shape
            that does not match the batch; a temperature below ``min_temperature``; and, with value checks on
            (:func:`m3co_loss.set_value_checks`), partners out of range, negative, NaN or
            unnormalised weights, negative labels (named, with the rank when distributed).
        TypeError: an argument of the wrong kind or dtype (named).

    Examples:
        >>> import torch
        >>> from m3co_loss.functional import contrastive_loss
        >>> z_a, z_b = torch.randn(8, 16), torch.randn(8, 16)
        >>> y = torch.tensor([0, 1, 0, 2, 1, 0, 3, 2])
        >>> contrastive_loss(z_a, z_b, labels=y).shape
        torch.Size([])
        >>> perm, lam = torch.randperm(8), torch.rand(8)
        >>> partners = torch.stack([torch.arange(8), perm], 1)
        >>> contrastive_loss(z_a, z_b, partners=partners, weights=torch.stack([lam, 1 - lam], 1)).shape
        torch.Size([])
    """
    with _LocalChecks(gather_distributed):  # a TypeError or ValueError here raises on every rank
        t = _check_common(temperature, reduction, convention)
        spread = _spread(gather_distributed)
        z_a, z_b = _check_pair("z_a", z_a, "z_b", z_b, min_rows=_min_rows(spread))
        n, device = z_a.shape[0], z_a.device
        if partners is not None and labels is not None:
            raise ValueError("pass either partners (with weights) or labels, not both: they are two forms of the targets")
        if weights is not None and partners is None:
            raise ValueError("weights needs partners: weights[i, j] is the weight of column partners[i, j]")
        if partners is not None:
            partners = check_partners("partners", partners, n, device)
            if weights is not None:
                weights = check_target_weights("weights", weights, tuple(partners.shape), device)
        if labels is not None:
            labels = check_labels("labels", labels, n, device)
        stats, detail = _local_value_stats(partners, weights, labels)
        t, _ = _temperatures(t, [z_a, z_b])
    layout = _batch_layout([z_a, z_b], spread, "z_a", stats)
    _raise_value_errors(layout, partners, weights, detail)
    reference = convention == "reference"
    with _no_autocast(device):
        a, b = _prepare([z_a, z_b], layout)
        if partners is not None:
            dtype = a.local.dtype
            w = weights.to(dtype) if weights is not None else a.local.new_full(partners.shape, 1.0 / partners.shape[1])
            v = partners_vector(a, b, partners, w, t, reference=reference, layout=layout, backend=backend)
        elif labels is not None:
            v = labels_vector(a, b, labels, t, reference=reference, layout=layout, backend=backend)
        else:
            v = backends.clip_vector(a, b, t, distributed=layout.distributed, backend=backend)
            v = 0.5 * v if reference else v
        return _reduce(v, reduction, layout)
