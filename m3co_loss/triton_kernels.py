"""Deprecated: the Triton kernels moved to :mod:`m3co_loss.backends.triton`; this module forwards to them.

Every name warns with a ``DeprecationWarning`` that names its new path, and this module will be
removed in the next minor release: ``LogSumExp`` and ``SoftTargetSum`` ->
:mod:`m3co_loss.backends.triton`; ``available()`` -> :func:`m3co_loss.backends.available`
``("triton")``; reading or assigning ``BLOCK_M``, ``BLOCK_N``, ``BLOCK_D`` reads or sets the
options ``triton_block_m``, ``triton_block_n``, ``triton_block_d`` of
:func:`m3co_loss.backends.set_config`.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Tuple

from ._deprecation import forward_options, forwarding_getattr
from .backends import triton

_OPTIONS = {"BLOCK_M": "triton_block_m", "BLOCK_N": "triton_block_n", "BLOCK_D": "triton_block_d"}


def _available() -> bool:
    """Whether the triton package imports (on any device; the former meaning of this function)."""
    try:
        import triton as triton_package  # type: ignore[import-untyped, import-not-found, unused-ignore]  # noqa: F401
    except ImportError:
        return False
    return True


_MOVED: Dict[str, Tuple[str, Callable[[], Any]]] = {
    "LogSumExp": ("m3co_loss.backends.triton.LogSumExp", lambda: triton.LogSumExp),
    "SoftTargetSum": ("m3co_loss.backends.triton.SoftTargetSum", lambda: triton.SoftTargetSum),
    "available": ("m3co_loss.backends.available('triton', device)", lambda: _available),
}

__getattr__ = forwarding_getattr(__name__, _MOVED)
forward_options(__name__, _OPTIONS)
