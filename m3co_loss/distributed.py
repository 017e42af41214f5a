"""Helpers for ``torch.distributed`` that are safe to call when it is absent or not initialised.

The losses gather embeddings over the whole process group so that every rank contrasts its
own rows against the global batch. Without an initialised group every helper behaves as a
single process: :func:`rank` is 0, :func:`world_size` is 1, :func:`all_gather_sizes` returns
``[n]`` and :func:`all_gather_with_grad` returns its input.

Collectives used, all supported by NCCL and by gloo (CPU): ``all_gather`` of a list of equally
sized tensors in the forward pass and ``all_reduce`` in the backward pass of
:func:`all_gather_with_grad`. The backward could use a reduce-scatter instead (half the traffic),
but gloo lacks it in older torch releases, and the tensor involved (``world x rows x features``)
is tiny next to the parameter gradients that DDP all-reduces in the same step; one code path
that runs everywhere is worth more than that saving.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["is_initialized", "rank", "world_size", "communication_device", "all_gather_sizes", "all_gather_ints", "all_gather_with_grad"]


def is_initialized() -> bool:
    """True when torch.distributed is built and a default process group exists."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank(group: Optional[ProcessGroup] = None) -> int:
    """This process's rank in ``group`` (0 when torch.distributed is not initialised)."""
    return torch.distributed.get_rank(group) if is_initialized() else 0


def world_size(group: Optional[ProcessGroup] = None) -> int:
    """Number of processes in ``group`` (1 when torch.distributed is not initialised)."""
    return torch.distributed.get_world_size(group) if is_initialized() else 1


def communication_device(group: Optional[ProcessGroup] = None) -> torch.device:
    """The device the collectives of ``group`` communicate from: the current CUDA device for NCCL, else the CPU.

    For a collective whose tensors a rank makes itself (e.g. :func:`all_gather_ints` on a rank
    that has no valid input tensor to take a device from). The CPU when torch.distributed is not
    initialised. With NCCL each rank must have made its own GPU current
    (``torch.cuda.set_device(local_rank)``, as DDP training scripts do), or this is GPU 0.
    """
    if is_initialized() and torch.distributed.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_ints(values: Sequence[int], device: torch.device, group: Optional[ProcessGroup] = None) -> list[list[int]]:
    """Every rank's list of ``len(values)`` integers, in rank order (one small collective).

    ``device`` must be one the backend can communicate from (a CUDA device for NCCL).
    """
    if not is_initialized():
        return [list(values)]
    local = torch.tensor(list(values), dtype=torch.long, device=device)
    parts = [torch.empty_like(local) for _ in range(world_size(group))]
    torch.distributed.all_gather(parts, local, group=group)
    gathered: list[list[int]] = torch.stack(parts).tolist()
    return gathered


def all_gather_sizes(n: int, device: torch.device, group: Optional[ProcessGroup] = None) -> list[int]:
    """Every rank's local row count, in rank order."""
    return [row[0] for row in all_gather_ints([n], device, group)]


class _AllGatherRows(torch.autograd.Function):
    """Concatenate every rank's rows; backward sums every rank's gradient for this rank's rows."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, sizes: Tuple[int, ...], group: Optional[ProcessGroup]) -> Tensor:
        world, largest, n = len(sizes), max(sizes), x.shape[0]
        me = rank(group)
        if sizes[me] != n:
            raise ValueError(f"sizes[{me}] = {sizes[me]} but this rank holds {n} rows")
        ctx.sizes, ctx.group, ctx.rank = sizes, group, me
        # all_gather needs equally sized tensors: pad to the largest rank, cut the padding away.
        padded = x.contiguous() if n == largest else torch.cat([x, x.new_zeros((largest - n,) + tuple(x.shape[1:]))])
        parts = [torch.empty_like(padded) for _ in range(world)]
        torch.distributed.all_gather(parts, padded, group=group)
        return torch.cat([part[:size] for part, size in zip(parts, sizes)])

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> Tuple[Tensor, None, None]:
        sizes, largest = ctx.sizes, max(ctx.sizes)
        # Every rank's loss depends on every rank's rows: the gradient of this rank's rows is
        # the sum over ranks of the gradient each rank's loss sends them.
        padded = grad.new_zeros((len(sizes), largest) + tuple(grad.shape[1:]))
        for r, block in enumerate(torch.split(grad, list(sizes))):
            padded[r, : sizes[r]] = block
        torch.distributed.all_reduce(padded, group=ctx.group)
        return padded[ctx.rank, : sizes[ctx.rank]], None, None


def all_gather_with_grad(x: Tensor, group: Optional[ProcessGroup] = None, sizes: Optional[Sequence[int]] = None) -> Tensor:
    """Concatenate ``x`` from every rank along dim 0, keeping the autograd graph.

    The backward pass sums, over ranks, the gradient that each rank's loss sends to this
    rank's rows. Hence, when each rank's loss is backpropagated and DDP averages parameter
    gradients, the result is the gradient of the *average over ranks* of the per-rank losses.
    Ranks may hold different numbers of rows (zero included): pass ``sizes`` (from
    :func:`all_gather_sizes`) or they are gathered here. Every rank of ``group`` must call this
    function, in the same order relative to its other collectives, with tensors of the same
    trailing shape and dtype.
    """
    if not is_initialized():
        return x
    if sizes is None:
        sizes = all_gather_sizes(x.shape[0], x.device, group)
    # torch declares Function.apply without annotations
    gathered: Tensor = _AllGatherRows.apply(x, tuple(int(s) for s in sizes), group)  # type: ignore[no-untyped-call]
    return gathered
