"""Deprecated: the kernels moved to :mod:`m3co_loss.backends`; this module forwards to them.

Every name warns with a ``DeprecationWarning`` that names its new path, and this module will be
removed in the next minor release:

* ``LogSumExp``, ``SoftTargetSum`` -> :mod:`m3co_loss.backends.tiled`;
  ``SoftClip``, ``SoftClipCoefficients`` -> :mod:`m3co_loss.backends.softclip`.
* ``choose_backend`` -> :func:`m3co_loss.backends.choose_backend`;
  ``triton_available(device)`` -> :func:`m3co_loss.backends.available` ``("triton", device)``.
* ``m3co_vector``, ``clip_vector``, ``multisoftclip_vector``, ``multisoftclip_pair_vector``
  (tensors ``a_loc, a_full, b_loc, b_full``) -> the functions of :mod:`m3co_loss.backends`,
  which take :class:`~m3co_loss.backends.Rows`.
* ``TILE_ROWS``, ``TILE_COLS``, ``TILE_SQUARE``, ``PARALLEL_WORKERS``, ``AUTO_TILED_MIN_N``:
  reading or assigning them reads or sets the options of :func:`m3co_loss.backends.set_config`.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from . import backends
from ._deprecation import forward_options, forwarding_getattr
from .backends import Rows, softclip, tiled
from .backends._tiling import first_order_only

_OPTIONS = {
    "TILE_ROWS": "tile_rows",
    "TILE_COLS": "tile_cols",
    "TILE_SQUARE": "tile_square",
    "PARALLEL_WORKERS": "parallel_workers",
    "AUTO_TILED_MIN_N": "auto_tiled_min_n",
}


def _streaming(backend: str) -> str:
    if backend not in ("tiled", "triton"):
        raise ValueError(f"kernels handle backend 'tiled' or 'triton'; got {backend!r}")
    return backend


def _triton_available(device: Optional[torch.device] = None) -> bool:
    return backends.available("triton", device)


def _m3co_vector(
    a_loc: Tensor, a_full: Tensor, b_loc: Tensor, b_full: Tensor, perm: Tensor, lam: Tensor, t: float, *, distributed: bool = False, backend: str = "tiled"
) -> Tensor:
    a, b = Rows(a_loc, a_full, 0), Rows(b_loc, b_full, 0)
    return backends.m3co_vector(a, b, perm, lam, t, distributed=distributed, backend=_streaming(backend))


def _clip_vector(a_loc: Tensor, a_full: Tensor, b_loc: Tensor, b_full: Tensor, t: float, *, distributed: bool = False, backend: str = "tiled") -> Tensor:
    return backends.clip_vector(Rows(a_loc, a_full, 0), Rows(b_loc, b_full, 0), t, distributed=distributed, backend=_streaming(backend))


def _multisoftclip_vector(
    a_loc: Tensor,
    a_full: Tensor,
    b_loc: Tensor,
    b_full: Tensor,
    t: float,
    *,
    reference: bool,
    gather: Callable[[Tensor], Tensor],
    distributed: bool = False,
    backend: str = "tiled",
) -> Tensor:
    a, b = Rows(a_loc, a_full, 0), Rows(b_loc, b_full, 0)
    return backends.multisoftclip_vector(a, b, t, reference=reference, gather=gather, distributed=distributed, backend=_streaming(backend))


def _multisoftclip_pair_vector(a: Tensor, b: Tensor, t: float, weight_a: float, weight_b: float, *, reference: bool, backend: str = "tiled") -> Tensor:
    rows = [Rows(a, a, 0), Rows(b, b, 0)]
    return backends.multisoftclip_pairs(rows, {(0, 1): (weight_a, weight_b)}, t, reference=reference, backend=_streaming(backend))


_MOVED: Dict[str, Tuple[str, Callable[[], Any]]] = {
    "LogSumExp": ("m3co_loss.backends.tiled.LogSumExp", lambda: tiled.LogSumExp),
    "SoftTargetSum": ("m3co_loss.backends.tiled.SoftTargetSum", lambda: tiled.SoftTargetSum),
    "SoftClip": ("m3co_loss.backends.softclip.SoftClip", lambda: softclip.SoftClip),
    "SoftClipCoefficients": ("m3co_loss.backends.softclip.SoftClipCoefficients", lambda: softclip.SoftClipCoefficients),
    "choose_backend": ("m3co_loss.backends.choose_backend", lambda: backends.choose_backend),
    "triton_available": ("m3co_loss.backends.available('triton', device)", lambda: _triton_available),
    "m3co_vector": ("m3co_loss.backends.m3co_vector (it takes backends.Rows)", lambda: _m3co_vector),
    "clip_vector": ("m3co_loss.backends.clip_vector (it takes backends.Rows)", lambda: _clip_vector),
    "multisoftclip_vector": ("m3co_loss.backends.multisoftclip_vector (it takes backends.Rows)", lambda: _multisoftclip_vector),
    "multisoftclip_pair_vector": ("m3co_loss.backends.multisoftclip_pairs", lambda: _multisoftclip_pair_vector),
    "first_order_only": ("the backward passes of m3co_loss.backends", lambda: first_order_only),
}

__getattr__ = forwarding_getattr(__name__, _MOVED)
forward_options(__name__, _OPTIONS)
