"""Machinery shared by the tiled kernels: block iteration, the static shift, scratch buffers, CPU workers.

The module docstring of :mod:`m3co_loss.backends.tiled` explains the static shift and the
worker threads.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, Iterator, List, Sequence, Tuple, TypeVar, cast

import torch
from torch import Tensor

__all__ = ["static_shift_ok", "blocks", "block_pairs", "scaled", "shifter", "Scratch", "span", "num_workers", "run_tiles", "first_order_only"]

# Largest 2/t for which exp(S - 1/t) neither underflows a whole row nor overflows.
_SAFE_SPAN: Dict[torch.dtype, float] = {torch.float32: 80.0, torch.float64: 600.0}

Task = TypeVar("Task")
State = TypeVar("State")
Backward = TypeVar("Backward", bound=Callable[..., Any])


def static_shift_ok(t: float, dtype: torch.dtype) -> bool:
    """Whether ``exp(S - 1/t)`` is safe in ``dtype``: the kernels may shift by the constant ``1/t``."""
    return 2.0 / t <= _SAFE_SPAN.get(dtype, 80.0)


def blocks(n: int, size: int) -> Iterator[Tuple[int, int]]:
    """``(start, stop)`` of consecutive blocks of ``size`` rows covering ``0..n`` (the last one may be shorter)."""
    for start in range(0, n, size):
        yield start, min(start + size, n)


def block_pairs(n: int, size: int) -> Iterator[Tuple[slice, slice, bool]]:
    """Square blocks (I, K) with I <= K: the upper triangle of a symmetric block grid."""
    grid = list(blocks(n, size))
    for index, (i0, i1) in enumerate(grid):
        for k0, k1 in grid[index:]:
            yield slice(i0, i1), slice(k0, k1), i0 == k0


def scaled(x: Tensor, t: float) -> Tensor:
    """``[x / t | 1]``: with :func:`shifter`, one matrix product gives ``x y^T / t - 1/t``."""
    out = x.new_empty(x.shape[0], x.shape[1] + 1)
    torch.div(x, t, out=out[:, :-1])
    out[:, -1] = 1.0
    return out


def shifter(x: Tensor, t: float) -> Tensor:
    """``[x | -1/t]``."""
    out = x.new_empty(x.shape[0], x.shape[1] + 1)
    out[:, :-1] = x
    out[:, -1] = -1.0 / t
    return out


class Scratch:
    """Reusable tile buffers: ``torch.mm(..., out=)`` needs contiguous outputs of the right shape."""

    def __init__(self, like: Tensor, count: int, rows: int, cols: int) -> None:
        self._flat = [like.new_empty(rows * cols) for _ in range(count)]

    def __call__(self, index: int, rows: int, cols: int) -> Tensor:
        return self._flat[index][: rows * cols].view(rows, cols)


def span(x: slice) -> int:
    """Number of rows of a block."""
    return cast(int, x.stop - x.start)


def num_workers(x: Tensor, tasks: int, parallel: bool) -> int:
    """Worker threads for ``tasks`` tiles of ``x``: one per torch thread on CPU when ``parallel``, else 1."""
    if not parallel or x.device.type != "cpu":
        return 1
    return max(1, min(torch.get_num_threads(), tasks))


def run_tiles(tasks: Sequence[Task], work: Callable[[Sequence[Task], State], List[Any]], workers: int, setup: Callable[[], State]) -> List[Any]:
    """``work(tasks[j::workers], setup())`` for every worker j; the element-wise sums of their result lists.

    ``setup`` allocates a worker's buffers and accumulators; it runs in the calling thread, so
    that they come from its allocator arena and the memory held does not grow with the threads.
    """
    if workers <= 1:
        with torch.no_grad():
            return work(tasks, setup())
    previous = torch.get_num_threads()
    states = [setup() for _ in range(workers)]

    def run(j: int) -> List[Any]:
        torch.set_num_threads(1)
        with torch.no_grad():
            return work(tasks[j::workers], states[j])

    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="m3co-tiles") as pool:
            parts = list(pool.map(run, range(workers)))
    finally:
        torch.set_num_threads(previous)
    total = parts[0]
    for part in parts[1:]:
        for acc, x in zip(total, part):
            if acc is not None:
                acc += x
        del part[:]  # free each worker's accumulators as soon as they are added
    return total


def first_order_only(backward: Backward) -> Backward:
    """Mark the backward of a kernel whose gradient formulas are not themselves differentiable.

    Under ``create_graph=True`` autograd would record the returned gradients as constants of
    the saved inputs and so give a wrong second derivative without a word (``once_differentiable``
    only catches gradients that flow into the backward, not the dependence on what it saved).
    Autograd enables grad mode in a backward pass exactly when ``create_graph=True``.
    """

    @functools.wraps(backward)
    def checked(ctx: Any, *grads: Any) -> Any:
        if torch.is_grad_enabled():
            raise RuntimeError(
                "the tiled and Triton loss kernels compute first derivatives only; "
                "pass backend='dense' to differentiate the loss twice (create_graph=True)"
            )
        return backward(ctx, *grads)

    return cast(Backward, checked)
