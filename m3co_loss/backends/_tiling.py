"""Machinery shared by the tiled kernels: block iteration, the static shift, scratch buffers, CPU workers.

The module docstring of :mod:`m3co_loss.backends.tiled` explains the static shift and the
worker threads.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, TypeVar, cast

import torch
from torch import Tensor

from ._config import PRECISIONS, BackendConfig
from ._interface import Temperature

__all__ = [
    "Temperature",
    "split_temperature",
    "join_temperature",
    "encode_config",
    "decode_config",
    "fake_config",
    "host_value",
    "operand",
    "temperature_grad",
    "max_is_diagonal",
    "safe_span",
    "static_shift_ok",
    "blocks",
    "block_pairs",
    "shifted_scores",
    "Scratch",
    "span",
    "num_workers",
    "run_tiles",
    "first_order_only",
]

# Largest 2/t for which exp(S - 1/t) neither underflows a whole row nor overflows.
_SAFE_SPAN: Dict[torch.dtype, float] = {torch.float32: 80.0, torch.float64: 600.0}

# torch.set_num_threads sets the calling thread's intra-op thread count and the count that a
# thread takes when it first uses torch (so it reaches beyond the worker that calls it). The
# workers of one call set 1 and the call restores its count afterwards; two calls at once, from
# different Python threads, could record each other's 1, and this lock makes the save / run /
# restore one step.
_THREADS_LOCK = threading.Lock()
# Set in the worker threads: a tiled call made from inside a worker runs in that worker, without
# workers of its own (and without waiting for the lock its caller holds).
_IN_WORKER = threading.local()

Task = TypeVar("Task")
State = TypeVar("State")
Backward = TypeVar("Backward", bound=Callable[..., Any])


def split_temperature(t: Temperature) -> Tuple[Optional[Tensor], float]:
    """A temperature as the arguments of a custom operator: ``(tensor, 0.0)`` or ``(None, float)``.

    A schema has no "float or tensor" type; a float stays a float (not a tensor), so that the
    kernels keep the bits of a float argument and a compiled graph holds it as a constant.
    """
    return (t, 0.0) if isinstance(t, Tensor) else (None, float(t))


def join_temperature(tensor: Optional[Tensor], value: float) -> Temperature:
    """The inverse of :func:`split_temperature`."""
    return value if tensor is None else tensor


_CONFIG_FIELDS = dataclasses.fields(BackendConfig)


def encode_config(config: BackendConfig) -> Tensor:
    """The options of ``config`` as a CPU tensor of ints: an output of a forward operator that its backward reads.

    A kernel's backward pass must use the tile sizes of its forward pass, and under
    ``torch.compile`` only tensors travel from one operator to the other.
    """
    values = dataclasses.replace(config, precision=PRECISIONS.index(config.precision))  # type: ignore[arg-type]
    return torch.tensor([int(getattr(values, field.name)) for field in _CONFIG_FIELDS], dtype=torch.int64)


def decode_config(encoded: Tensor) -> BackendConfig:
    """The inverse of :func:`encode_config`."""
    options: Dict[str, Any] = {field.name: int(value) for field, value in zip(_CONFIG_FIELDS, encoded.tolist())}
    options["parallel_workers"] = bool(options["parallel_workers"])
    options["precision"] = PRECISIONS[options["precision"]]
    return BackendConfig(**options)


def fake_config() -> Tensor:
    """What :func:`encode_config` returns, for a fake (meta) implementation."""
    return torch.empty(len(_CONFIG_FIELDS), dtype=torch.int64, device="cpu")


def host_value(t: Temperature) -> Optional[float]:
    """The value of ``t`` on the host when reading it costs no device synchronisation, else None.

    A float, or a tensor on the CPU, is read; a tensor on an accelerator is not: the kernels
    then take the paths that need no value (exact maxima instead of the static shift).
    """
    if isinstance(t, Tensor):
        return float(t.detach()) if t.device.type == "cpu" else None
    return float(t)


def operand(t: Temperature) -> Temperature:
    """What the kernels compute with: the host value when it is free to read, else the detached tensor."""
    value = host_value(t)
    return value if value is not None else cast(Tensor, t).detach()


def temperature_grad(t: Temperature, pairs: Sequence[Tuple[Tensor, Tensor]]) -> Tensor:
    """``dL/dt = -(1/t) sum <x, dL/dx>`` over ``pairs`` (operand, its gradient) of the bilinear forms ``x . y / t``.

    Scaling ``1/t`` by ``c`` equals scaling one operand of every bilinear form by ``c``, hence
    ``t dL/dt = -sum <x, dL/dx>`` over one operand per form (docs page ``maths``). ``torch.dot``
    of the flattened matrices needs no N x D temporary.
    """
    total = sum(torch.dot(x.reshape(-1), dx.reshape(-1)) for x, dx in pairs)
    return -cast(Tensor, total) / operand(t)


def max_is_diagonal(t: Optional[float], q: Tensor) -> bool:
    """Whether ``|q_i|^2 / t`` is a safe row maximum of ``q k^T / t`` (q's rows among k's) in ``q``'s dtype.

    In exact arithmetic it is the maximum (Cauchy-Schwarz); a computed entry differs from it by
    at most ``2 (D + 2) u / t`` (u the unit roundoff). While that is at most 1, every shifted
    exponent is at most ``e`` and the diagonal one at least ``1/e``; for smaller ``t`` (or no
    host value) the kernels shift by exact row maxima instead.
    """
    if t is None:
        return False
    return 2.0 * (q.shape[1] + 2) * (torch.finfo(q.dtype).eps / 2) / t <= 1.0


def safe_span(dtype: torch.dtype) -> float:
    """The largest ``2/t`` for which the static shift is safe in ``dtype`` (float32's for other dtypes)."""
    return _SAFE_SPAN.get(dtype, _SAFE_SPAN[torch.float32])


def static_shift_ok(t: Optional[float], dtype: torch.dtype) -> bool:
    """Whether ``exp(S - 1/t)`` is safe in ``dtype``: the kernels may shift by the constant ``1/t`` (None: value unknown, no)."""
    return t is not None and 2.0 / t <= safe_span(dtype)


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


def shifted_scores(x: Tensor, y: Tensor, inv_t: float, out: Tensor) -> Tensor:
    """``x y^T / t - 1/t`` written into ``out``: one matrix product scaled by ``inv_t = 1/t``, then the shift.

    The shift is one pass over a tile that is still in cache (under 0.5 % of the product's time
    for a 512 x 2048 tile at D = 512 and 768), and the operands are used as they are: no scaled
    copies of them are made.
    """
    return torch.addmm(out, x, y.T, beta=0, alpha=inv_t, out=out).sub_(inv_t)


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
    if not parallel or x.device.type != "cpu" or tasks <= 1 or getattr(_IN_WORKER, "active", False):
        return 1
    # Read under the lock of run_tiles: a thread that first uses torch while another call runs
    # its workers starts at one thread, and the worker count (hence the order of the sums)
    # should not depend on such timing.
    with _THREADS_LOCK:
        threads = torch.get_num_threads()
    return max(1, min(threads, tasks))


def run_tiles(tasks: Sequence[Task], work: Callable[[Sequence[Task], State], List[Any]], workers: int, setup: Callable[[], State]) -> List[Any]:
    """``work(tasks[j::workers], setup())`` for every worker j; the element-wise sums of their result lists.

    ``setup`` allocates a worker's buffers and accumulators; it runs in the calling thread, so
    that they come from its allocator arena. Every worker holds its own set, so the memory held
    is about ``workers`` times one worker's (in the tiled kernels: its tile buffers and, in the
    backward passes, full-size gradient accumulators); the sets are summed into the first.

    With several workers, each sets ``torch.set_num_threads(1)``, which also becomes the count
    of any thread that first uses torch while they run; the calling thread's count is restored
    afterwards, and other calls of this function wait for this one.
    """
    if workers <= 1:
        with torch.no_grad():
            return work(tasks, setup())
    states = [setup() for _ in range(workers)]

    def run(j: int) -> List[Any]:
        torch.set_num_threads(1)
        _IN_WORKER.active = True
        with torch.no_grad():
            return work(tasks[j::workers], states[j])

    with _THREADS_LOCK:
        previous = torch.get_num_threads()
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
