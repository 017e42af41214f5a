"""Helpers for ``torch.distributed`` that are safe to call when it is absent or not initialised.

The losses gather embeddings over the whole process group so that every rank contrasts its
own rows against the global batch. Without an initialised group every helper behaves as a
single process: :func:`rank` is 0, :func:`world_size` is 1 and :func:`all_gather_with_grad`
returns its input.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["is_initialized", "rank", "world_size", "all_gather_with_grad", "all_gather_sizes"]


def is_initialized() -> bool:
    """True when torch.distributed is built and a default process group exists."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank(group: Optional[object] = None) -> int:
    """This process's rank in ``group`` (0 when torch.distributed is not initialised)."""
    return torch.distributed.get_rank(group) if is_initialized() else 0


def world_size(group: Optional[object] = None) -> int:
    """Number of processes in ``group`` (1 when torch.distributed is not initialised)."""
    return torch.distributed.get_world_size(group) if is_initialized() else 1


def all_gather_sizes(n: int, device: torch.device, group: Optional[object] = None) -> list[int]:
    """Every rank's local row count, in rank order."""
    if not is_initialized():
        return [n]
    local = torch.tensor([n], dtype=torch.long, device=device)
    sizes = [torch.empty_like(local) for _ in range(world_size(group))]
    torch.distributed.all_gather(sizes, local, group=group)
    return [int(s.item()) for s in sizes]


def all_gather_with_grad(
    x: Tensor, group: Optional[object] = None, sizes: Optional[Sequence[int]] = None
) -> Tensor:
    """Concatenate ``x`` from every rank along dim 0, keeping the autograd graph.

    The backward pass sums, over ranks, the gradient that each rank's loss sends to this
    rank's rows (``torch.distributed.nn.functional.all_gather``), so that DDP's gradient
    averaging yields the gradient of the loss on the concatenated batch.
    Ranks may hold different numbers of rows: pass ``sizes`` (from :func:`all_gather_sizes`)
    or it is gathered here; rows are padded to the largest rank for the collective and the
    padding is cut away again.
    """
    if not is_initialized():
        return x
    from torch.distributed.nn.functional import all_gather

    if sizes is None:
        sizes = all_gather_sizes(x.shape[0], x.device, group)
    largest = max(sizes)
    padded = x
    if x.shape[0] < largest:
        padded = torch.cat([x, x.new_zeros((largest - x.shape[0],) + tuple(x.shape[1:]))])
    parts = all_gather(padded, group=group)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])
