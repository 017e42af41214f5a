"""Backends of the losses: where the per-sample vectors are computed, and the one dispatch between them.

* :mod:`m3co_loss.backends.dense`: N x N similarity matrices (readable reference; fastest for
  small batches; the only one that can be differentiated twice).
* :mod:`m3co_loss.backends.tiled`: streams over tiles with online log-sum-exps in O(N D) memory
  and recomputes the tiles in the backward pass; :mod:`m3co_loss.backends.softclip` is its fused
  single-process MultiSClip kernel.
* :mod:`m3co_loss.backends.triton`: fused Triton kernels of the tiled algorithm, for CUDA.

:func:`choose_backend` resolves ``backend="auto"`` and checks an explicit choice with
:func:`available`; the functions below dispatch to the backend module, which computes the
vector of per-sample losses of this process's rows. Under ``torch.compile`` every backend is
traced into the caller's graph: the tiled and Triton kernels are ``torch.library`` custom
operators (namespace ``m3co_loss``) with their own backward operators and fake implementations.

Tuning: :func:`get_config`, :func:`set_config` and the context manager :func:`config` read and
set the tile sizes, the CPU worker threads, the ``"auto"`` threshold and the Triton block sizes
(:class:`BackendConfig`).
"""

from __future__ import annotations

import os
from typing import Callable, Optional, Sequence, Union, cast

import torch
from torch import Tensor

from .._validation import BACKENDS, check_choice
from . import dense, tiled, triton
from ._config import BackendConfig, config, get_config, set_config
from ._interface import Backend, PairWeights, Rows, Temperature, check_pair_weights

__all__ = [
    "BACKENDS",
    "BackendConfig",
    "get_config",
    "set_config",
    "config",
    "available",
    "choose_backend",
    "Rows",
    "Backend",
    "PairWeights",
    "Temperature",
    "m3co_vector",
    "clip_vector",
    "multisoftclip_vector",
    "multisoftclip_pairs",
]

def available(backend: str, device: Union[torch.device, str, None] = None) -> bool:
    """Whether ``backend`` can run on ``device`` (default: on this machine at all).

    ``"dense"``, ``"tiled"`` and ``"auto"`` run everywhere. ``"triton"`` needs the ``triton``
    package and a CUDA device, or Triton's CPU interpreter (``TRITON_INTERPRET=1``, which the
    tests use on CPU tensors).

    Raises:
        ValueError: ``backend`` is not one of ``"auto"``, ``"dense"``, ``"tiled"``, ``"triton"``.

    Examples:
        >>> from m3co_loss import backends
        >>> backends.available("tiled", "cpu")
        True
    """
    check_choice("backend", backend, BACKENDS)
    if backend != "triton":
        return True
    device = torch.device(device) if device is not None else None
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if device is not None and device.type != "cuda" and not interpret:
        return False
    if device is None and not (interpret or torch.cuda.is_available()):
        return False
    try:
        import triton  # type: ignore[import-untyped, import-not-found, unused-ignore]  # noqa: F401
    except ImportError:
        return False
    return True


def choose_backend(backend: str, n_rows: int, n_cols: int, device: torch.device) -> str:
    """Resolve ``"auto"`` to a concrete backend; check that an explicit one can run.

    ``"auto"``: ``"dense"`` below :attr:`BackendConfig.auto_tiled_min_n` columns (the N x N
    matrices are small and one large matrix product is fastest), ``"tiled"`` from there on, on
    every device. ``"triton"`` runs only when asked for: its kernels are experimental and,
    measured on a GPU, far from their matrix products' speed (docs page ``kernels``, "Triton").

    Args:
        backend: ``"auto"``, ``"dense"``, ``"tiled"`` or ``"triton"``.
        n_rows: rows of this process (the local batch); ignored (the choice depends on
            ``n_cols`` only), kept so that existing calls keep working.
        n_cols: columns of the similarity matrices (the batch gathered over the process group).
        device: device of the embeddings.

    Raises:
        ValueError: an unknown backend, or ``"triton"`` where it cannot run (see :func:`available`).
    """
    check_choice("backend", backend, BACKENDS)
    if backend == "auto":
        return "dense" if n_cols < get_config().auto_tiled_min_n else "tiled"
    if backend == "triton" and not available("triton", device):
        raise ValueError(
            "backend='triton' needs the triton package and CUDA tensors (or TRITON_INTERPRET=1); use 'tiled' or 'auto'"
        )
    return backend


def _implementation(backend: str, rows: Rows) -> Backend:
    """The backend chosen for ``rows`` (Triton computes in float32 only: other dtypes run tiled)."""
    chosen = choose_backend(backend, rows.local.shape[0], rows.full.shape[0], rows.local.device)
    if chosen == "dense":
        return dense
    if chosen == "triton" and rows.local.dtype == torch.float32:
        return triton.backend_for(rows.source_dtype)
    return tiled


def m3co_vector(
    a: Rows, b: Rows, perm: Tensor, lam: Tensor, t: Temperature, *, reference: bool = False, distributed: bool = False, backend: str = "auto"
) -> Tensor:
    """Per-sample M3Co L3(a -> b) of the local mixed rows ``a`` against the clean rows ``b``.

    See :func:`m3co_loss.functional.m3co_pair` for the loss. ``a`` and ``b`` hold L2-normalised
    rows; ``t`` is a float or a 0-dim tensor of their dtype and device (it may require grad);
    ``distributed`` says that ``full`` was gathered over a process group of several ranks
    (``perm`` and ``lam`` are local). ``reference`` halves the vector (the released code's average
    of the two directions).
    """
    impl = _implementation(backend, a)
    return impl.m3co_vector(a, b, perm, lam, t, reference=reference, distributed=distributed)


def clip_vector(a: Rows, b: Rows, t: Temperature, *, distributed: bool = False, backend: str = "auto") -> Tensor:
    """Per-sample symmetric InfoNCE of the local rows (see :func:`m3co_loss.functional.clip_loss`)."""
    impl = _implementation(backend, a)
    return impl.clip_vector(a, b, t, distributed=distributed)


def multisoftclip_vector(
    a: Rows,
    b: Rows,
    t: Temperature,
    *,
    reference: bool,
    gather: Callable[[Tensor], Tensor],
    distributed: bool = False,
    backend: str = "auto",
    target_t: Optional[Temperature] = None,
    detach_targets: bool = False,
) -> Tensor:
    """Per-sample MultiSClip Ls(a; a, b) of the local rows, soft targets ``softmax(a a^T / target_t)`` from ``a``.

    See :func:`m3co_loss.functional.multisoftclip_pair`. ``gather`` concatenates a per-row vector
    over the process group in rank order (the identity on one process). ``target_t`` None means
    ``t``; ``detach_targets`` makes the soft targets constants.
    """
    impl = _implementation(backend, a)
    return impl.multisoftclip_vector(
        a, b, t, reference=reference, gather=gather, distributed=distributed, target_t=target_t, detach_targets=detach_targets
    )


def multisoftclip_pairs(
    rows: Sequence[Rows],
    weights: PairWeights,
    t: Temperature,
    *,
    reference: bool,
    gather: Optional[Callable[[Tensor], Tensor]] = None,
    distributed: bool = False,
    backend: str = "auto",
    target_t: Optional[Temperature] = None,
    detach_targets: bool = False,
) -> Tensor:
    """``sum over pairs (a, b) in weights of weight_a Ls(a; a, b) + weight_b Ls(b; a, b)``.

    ``weights`` maps an unordered modality pair ``(a, b)``, ``a < b``, to the weights of its two
    directions (soft targets from a, from b). On one process both directions of a pair share
    ``S = p_a p_b^T / t`` (and the dense backend shares each modality's soft targets between
    pairs); with ``distributed`` every direction is one :func:`multisoftclip_vector`, which needs
    ``gather``. ``target_t`` and ``detach_targets`` are those of :func:`multisoftclip_vector`.
    A pair whose two weights are 0 adds nothing, in every backend; not every weight may be 0.

    Raises:
        TypeError: ``weights`` is not a mapping.
        ValueError: ``weights`` is empty or all zero, has a key other than ``(a, b)`` with
            ``0 <= a < b < len(rows)``, or a value other than two finite non-negative numbers;
            or ``distributed`` without ``gather``.
    """
    weights = check_pair_weights(weights, len(rows))
    impl = _implementation(backend, rows[0])
    if not distributed:
        return impl.multisoftclip_pairs([r.local for r in rows], weights, t, reference=reference, target_t=target_t, detach_targets=detach_targets)
    if gather is None:
        raise ValueError("gather is needed with distributed=True: it concatenates per-row vectors over the process group")
    vector = impl.multisoftclip_vector
    total: Optional[Tensor] = None
    for (a, b), (weight_a, weight_b) in weights.items():
        pair: Optional[Tensor] = None
        for weight, targets, other in ((weight_a, rows[a], rows[b]), (weight_b, rows[b], rows[a])):
            if weight:
                v = weight * vector(
                    targets, other, t, reference=reference, gather=gather, distributed=True, target_t=target_t, detach_targets=detach_targets
                )
                pair = v if pair is None else pair + v
        pair_sum = cast(Tensor, pair)  # a weight of the pair is nonzero
        total = pair_sum if total is None else total + pair_sum
    return cast(Tensor, total)  # check_pair_weights refuses weights that are all zero
