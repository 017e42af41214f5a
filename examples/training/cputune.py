"""CPU allocator tuning: keep freed buffers in the heap between training steps (glibc)."""

from __future__ import annotations

import ctypes
import os

__all__ = ["ALLOCATOR_ENV", "keep_freed_memory"]

ALLOCATOR_ENV = "M3CO_CPU_ALLOCATOR"
GLIBC_M_TRIM_THRESHOLD, GLIBC_M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Let this process reuse freed CPU buffers instead of returning them to the OS (glibc only).

    A training step frees and reallocates the same activation and gradient buffers every step
    (up to 12 MB each for the ROSMAP model). With glibc's defaults a buffer above the mmap
    threshold is mapped and unmapped each time and every first touch of its pages faults, which
    costs more than the arithmetic of a small step. Raising the mmap threshold to its maximum
    (32 MiB) and the trim threshold to 1 GiB keeps such buffers in the heap; the numbers a run
    produces do not change. ``rosmap_bench.py --allocator-rounds K`` measures the effect on one
    training step. Set ``M3CO_CPU_ALLOCATOR=default`` to keep glibc's defaults. Returns whether
    the settings were applied (False without glibc's ``mallopt`` or when switched off).
    """
    if os.environ.get(ALLOCATOR_ENV, "tuned") == "default":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(GLIBC_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(GLIBC_M_TRIM_THRESHOLD, 1 << 30))
