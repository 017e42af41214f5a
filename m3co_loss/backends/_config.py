"""Tuning options of the backends: tile sizes, CPU worker threads, the ``"auto"`` threshold, Triton blocks.

The options form one immutable :class:`BackendConfig`. :func:`set_config` swaps it for a new
one under a lock, so a reader always sees a consistent set of values. Every kernel reads the
configuration once when it is called (its forward pass) and keeps that snapshot for its worker
threads and its backward pass: a change made while a loss is computed takes effect at the next
call and never mixes two tile sizes within one.

The configuration is process-wide, like ``torch.backends`` flags: :func:`config` sets options
for the duration of a ``with`` block in every thread of the process, not only the calling one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import numbers
import threading
from typing import Iterator, Optional

__all__ = ["BackendConfig", "PRECISIONS", "get_config", "set_config", "config"]


@dataclasses.dataclass(frozen=True)
class BackendConfig:
    """The values of the tuning options (read them with :func:`get_config`, change them with :func:`set_config`).

    Attributes:
        tile_rows: rows of the tiles of the tiled log-sum-exps and soft-target sums (512).
        tile_cols: columns of those tiles (2048). One float32 tile of 512 x 2048 is 4 MiB, sized
            with its operands to stay in the last-level cache.
        tile_square: side of the square blocks of the fused MultiSClip kernel (1024).
        parallel_workers: on CPU, spread the tiles over ``torch.get_num_threads()`` worker
            threads that run one torch thread each (True), or run them in the calling thread
            and let torch split every operation over its own threads (False).
        auto_tiled_min_n: ``backend="auto"`` computes dense N x N matrices below this many
            columns (the gathered batch size) and uses the tiled backend from it on
            (2048, the cross-over measured on CPU by ``benchmarks/bench_kernels.py``).
        triton_block_m: rows of the score tile of one Triton program step (64).
        triton_block_n: columns of that tile (64).
        triton_block_d: chunk of the embedding dimension loaded per step (64).
        triton_num_warps: warps per Triton program (4).
        triton_num_stages: software-pipelining stages of the Triton kernels' loops (3).
        precision: the precision of the Triton kernels' matrix products, always accumulated in
            float32 with float32 log-sum-exp and softmax state: ``"auto"`` (float16 and bfloat16
            inputs in their own precision; float32 ones on TF32 tensor cores when
            ``torch.backends.cuda.matmul.allow_tf32`` is True, IEEE float32 otherwise: the
            choice torch makes for its own float32 products), ``"ieee"``, ``"tf32"``, ``"bf16"``
            or ``"fp16"`` (the operands rounded to bfloat16 or float16 for the product; the
            softmax weights of the weighted sums to bfloat16 in both, for float32's exponent
            range). The tolerances of each are on the docs page ``kernels``. The tiled backend's
            products follow torch's own settings (on CUDA, ``allow_tf32``).

    The tile sizes change the order of floating-point sums and hence the last bits of the
    results, never more; sweep them with ``benchmarks/bench_kernels.py --tile-rows/--tile-cols/--tile-square``.
    """

    tile_rows: int = 512
    tile_cols: int = 2048
    tile_square: int = 1024
    parallel_workers: bool = True
    auto_tiled_min_n: int = 2048
    triton_block_m: int = 64
    triton_block_n: int = 64
    triton_block_d: int = 64
    triton_num_warps: int = 4
    triton_num_stages: int = 3
    precision: str = "auto"


PRECISIONS = ("auto", "ieee", "tf32", "bf16", "fp16")
_TRITON_BLOCKS = ("triton_block_m", "triton_block_n", "triton_block_d")
_FLAGS = ("parallel_workers",)
_CHOICES = {"precision": PRECISIONS}
_OPTIONS = tuple(field.name for field in dataclasses.fields(BackendConfig))

_lock = threading.Lock()
_current = BackendConfig()


def get_config() -> BackendConfig:
    """The current values of the tuning options (an immutable snapshot).

    Examples:
        >>> from m3co_loss import backends
        >>> backends.get_config().tile_rows
        512
    """
    return _current


def _check_option(name: str, value: object) -> object:
    if name in _CHOICES:
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a str; got {type(value).__name__}")
        if value not in _CHOICES[name]:
            raise ValueError(f"{name} must be one of {', '.join(map(repr, _CHOICES[name]))}; got {value!r}")
        return value
    if name in _FLAGS:
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool; got {type(value).__name__}")
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {type(value).__name__}")
    number = int(value)
    if name in _TRITON_BLOCKS:
        # tl.arange needs a power of two and tl.dot operands of at least 16 x 16
        if number < 16 or number & (number - 1):
            raise ValueError(f"{name} must be a power of two >= 16 (a Triton block size); got {number}")
    elif name == "triton_num_warps":
        if number < 1 or number > 32 or number & (number - 1):
            raise ValueError(f"{name} must be 1, 2, 4, 8, 16 or 32; got {number}")
    elif number < 1:
        raise ValueError(f"{name} must be a positive int; got {number}")
    return number


def _replace(options: dict[str, object]) -> BackendConfig:
    """Validate ``options`` (all of them, before anything changes) and install them; return the previous config."""
    global _current
    for name in options:
        if name not in _OPTIONS:
            raise TypeError(f"unknown backend option {name!r}; the options are {', '.join(_OPTIONS)}")
    checked = {name: _check_option(name, value) for name, value in options.items()}
    with _lock:
        previous = _current
        _current = dataclasses.replace(previous, **checked)  # type: ignore[arg-type]
    return previous


def _given(**options: object) -> dict[str, object]:
    """The options given a value (not None)."""
    return {name: value for name, value in options.items() if value is not None}


def set_config(
    *,
    tile_rows: Optional[int] = None,
    tile_cols: Optional[int] = None,
    tile_square: Optional[int] = None,
    parallel_workers: Optional[bool] = None,
    auto_tiled_min_n: Optional[int] = None,
    triton_block_m: Optional[int] = None,
    triton_block_n: Optional[int] = None,
    triton_block_d: Optional[int] = None,
    triton_num_warps: Optional[int] = None,
    triton_num_stages: Optional[int] = None,
    precision: Optional[str] = None,
) -> BackendConfig:
    """Change tuning options for the whole process; the options left at None keep their values.

    Args:
        tile_rows, tile_cols, tile_square, auto_tiled_min_n, triton_num_stages: positive ints
            (see :class:`BackendConfig`).
        parallel_workers: a bool.
        triton_block_m, triton_block_n, triton_block_d: powers of two >= 16.
        triton_num_warps: 1, 2, 4, 8, 16 or 32.
        precision: ``"auto"``, ``"ieee"``, ``"tf32"``, ``"bf16"`` or ``"fp16"``.

    Returns:
        The configuration before the call, which :func:`set_config` accepts back
        (``set_config(**dataclasses.asdict(previous))``).

    Raises:
        TypeError: an option of the wrong type (a bool for a size, a float, ...).
        ValueError: a size below 1, a Triton block that is not a power of two >= 16, a warp
            count that is not a power of two up to 32, or an unknown precision. Nothing is
            changed when any option is invalid.

    Examples:
        >>> from m3co_loss import backends
        >>> previous = backends.set_config(tile_rows=256, tile_cols=1024)
        >>> backends.get_config().tile_rows
        256
        >>> _ = backends.set_config(tile_rows=previous.tile_rows, tile_cols=previous.tile_cols)
    """
    return _replace(_given(**locals()))  # every argument is an option


@contextlib.contextmanager
def config(
    *,
    tile_rows: Optional[int] = None,
    tile_cols: Optional[int] = None,
    tile_square: Optional[int] = None,
    parallel_workers: Optional[bool] = None,
    auto_tiled_min_n: Optional[int] = None,
    triton_block_m: Optional[int] = None,
    triton_block_n: Optional[int] = None,
    triton_block_d: Optional[int] = None,
    triton_num_warps: Optional[int] = None,
    triton_num_stages: Optional[int] = None,
    precision: Optional[str] = None,
) -> Iterator[BackendConfig]:
    """Set tuning options inside a ``with`` block; on exit the options it set get their previous values back.

    Takes the arguments of :func:`set_config` and raises its errors on entry; yields the
    configuration in force inside the block.

    Examples:
        >>> import torch
        >>> from m3co_loss import backends, functional as F
        >>> z = [torch.randn(64, 8), torch.randn(64, 8)]
        >>> with backends.config(tile_rows=16, tile_cols=16, tile_square=16):
        ...     loss = F.multisoftclip(z, backend="tiled")
    """
    options = _given(**locals())  # every argument is an option
    previous = _replace(options)
    try:
        yield _current
    finally:
        _replace({name: getattr(previous, name) for name in options})
