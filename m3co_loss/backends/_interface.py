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

import math
import numbers
from typing import Callable, Dict, Mapping, NamedTuple, Optional, Protocol, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = ["Rows", "PairWeights", "Backend", "Temperature", "check_pair_weights"]

# A temperature: a float, or a 0-dim tensor of the embeddings' dtype and device (it may require grad).
Temperature = Union[float, Tensor]

# Unordered modality pair (a, b), a < b -> (weight of Ls(a; a, b), weight of Ls(b; a, b)).
PairWeights = Mapping[Tuple[int, int], Sequence[float]]


def check_pair_weights(weights: object, modalities: int) -> Dict[Tuple[int, int], Tuple[float, float]]:
    """The pairs of ``weights`` with a nonzero weight, as a dict of float pairs, checked: at least
    one pair, keys ``(a, b)`` with ``0 <= a < b < modalities``, values two finite non-negative
    numbers, not all zero. A pair whose two weights are 0 adds nothing, in every backend.

    Raises:
        TypeError: ``weights`` is not a mapping.
        ValueError: naming ``weights``: it is empty, all zero, or holds another key or value.
    """
    if not isinstance(weights, Mapping):
        raise TypeError(f"weights must be a mapping from modality pairs (a, b) to two weights; got {type(weights).__name__}")
    if not weights:
        raise ValueError("weights must hold at least one modality pair")
    checked: Dict[Tuple[int, int], Tuple[float, float]] = {}
    for key, value in weights.items():
        if not (isinstance(key, tuple) and len(key) == 2 and all(_is_index(i) for i in key) and 0 <= key[0] < key[1] < modalities):
            raise ValueError(f"weights: every key must be a pair (a, b) of modality indices, 0 <= a < b < {modalities}; got {key!r}")
        if hasattr(value, "tolist") and not isinstance(value, str):  # a tensor or an array of the two weights
            value = value.tolist()
        pair = tuple(value) if isinstance(value, Sequence) and not isinstance(value, str) else ()
        if len(pair) != 2 or not all(_is_weight(w) for w in pair):
            raise ValueError(f"weights[{key!r}] must be two finite non-negative numbers (the weights of the two directions); got {value!r}")
        if pair[0] or pair[1]:
            checked[(int(key[0]), int(key[1]))] = (float(pair[0]), float(pair[1]))
    if not checked:  # the loss would be a constant 0 with no graph to differentiate
        raise ValueError("weights must hold at least one nonzero weight")
    return checked


def _is_index(i: object) -> bool:
    return isinstance(i, numbers.Integral) and not isinstance(i, bool)


def _is_weight(w: object) -> bool:
    if not isinstance(w, numbers.Real) or isinstance(w, bool):
        return False
    try:
        value = float(w)
    except OverflowError:  # an int beyond float's range
        return False
    return math.isfinite(value) and value >= 0


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
    """The per-sample loss vectors a backend computes, and the log-sum-exps they share."""

    def row_col_lse(self, a: Rows, b: Rows, t: Temperature, *, distributed: bool = False) -> Tuple[Optional[Tensor], Tensor, Tensor]:
        """``(s, r, c)`` of ``S = a b^T / t``: ``r_i = lse_k S_ik`` of the local rows ``i``, ``c_k = lse_i S_ik`` of
        the local columns ``k``, and the (n, N) block ``S[local rows]`` when the backend forms it (dense), else None."""

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
