"""What every backend module provides to :mod:`m3co_loss.functional`: the per-sample loss vectors.

A backend provides the four functions of :class:`Backend`: the modules
:mod:`~m3co_loss.backends.dense` and :mod:`~m3co_loss.backends.tiled`, and for the Triton kernels
the :class:`~m3co_loss.backends.tiled.StreamingBackend` that
:func:`m3co_loss.backends.triton.backend_for` returns for the inputs' dtype.
Each takes L2-normalised embeddings and the temperature ``t`` (a float, or a 0-dim tensor of the
embeddings' dtype and device that may require grad) and returns the vector ``v`` of
per-sample losses of this process's rows (its mean is the ``"mean"`` loss on one process).
"""

from __future__ import annotations

from typing import Callable, Mapping, NamedTuple, Optional, Protocol, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = ["Rows", "PairWeights", "Backend", "Temperature"]

# A temperature: a float, or a 0-dim tensor of the embeddings' dtype and device (it may require grad).
Temperature = Union[float, Tensor]

# Unordered modality pair (a, b), a < b -> (weight of Ls(a; a, b), weight of Ls(b; a, b)).
PairWeights = Mapping[Tuple[int, int], Sequence[float]]


class Rows(NamedTuple):
    """One modality's normalised embeddings: this process's rows and the batch gathered over the process group.

    Attributes:
        local: (n, D) rows of this process.
        full: (N, D) rows of every process, in rank order (``local`` itself on one process).
        offset: index of ``local[0]`` in ``full`` (0 on one process).
        source_dtype: dtype of the embeddings as the caller passed them, before they were
            normalised to float32 at least (None: unknown). With ``precision="auto"`` the
            Triton kernels multiply float16 and bfloat16 inputs in their own precision.
    """

    local: Tensor
    full: Tensor
    offset: int  # index of local[0] inside full
    source_dtype: Optional[torch.dtype] = None


class Backend(Protocol):
    """The per-sample loss vectors a backend computes."""

    def m3co_vector(self, a: Rows, b: Rows, perm: Tensor, lam: Tensor, t: Temperature, *, reference: bool = False, distributed: bool = False) -> Tensor:
        """M3Co L3(a -> b) of the local mixed rows ``a`` against the clean ``b`` (``reference`` halves it)."""

    def clip_vector(self, a: Rows, b: Rows, t: Temperature, *, distributed: bool = False) -> Tensor:
        """Symmetric InfoNCE of the local rows."""

    def multisoftclip_vector(
        self,
        a: Rows,
        b: Rows,
        t: Temperature,
        *,
        reference: bool,
        gather: Callable[[Tensor], Tensor],
        distributed: bool = False,
        target_t: Optional[Temperature] = None,
        detach_targets: bool = False,
    ) -> Tensor:
        """MultiSClip Ls(a; a, b), targets ``softmax(a a^T / target_t)`` from ``a`` (None: ``t``; constants when
        ``detach_targets``); ``gather`` concatenates a per-row vector over the process group."""

    def multisoftclip_pairs(
        self, p: Sequence[Tensor], weights: PairWeights, t: Temperature, *, reference: bool, target_t: Optional[Temperature] = None, detach_targets: bool = False
    ) -> Tensor:
        """``sum over (a, b) in weights of w_a Ls(a; a, b) + w_b Ls(b; a, b)`` on one process (both directions share S)."""
