"""The per-sample loss vectors written over two O(N D)-memory primitives (:class:`StreamingBackend`).

The tiled backend (:mod:`m3co_loss.backends.tiled`) instantiates it with its torch kernels, the
Triton backend (:mod:`m3co_loss.backends.triton`) with its fused kernels; single-process
MultiSClip may run the fused kernel of :mod:`m3co_loss.backends.softclip` instead.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple, cast

import torch
from torch import Tensor

from ._interface import PairWeights, Rows, check_pair_weights
from ._tiling import Temperature, host_value, safe_span, static_shift_ok
from .softclip import SoftClipCoefficients, soft_clip

__all__ = ["StreamingBackend", "LogSumExpFn", "SoftTargetSumFn"]

LogSumExpFn = Callable[[Tensor, Tensor, Temperature, bool], Tuple[Tensor, Tensor]]
SoftTargetSumFn = Callable[..., Tensor]


def _identity(x: Tensor) -> Tensor:
    return x


def _detached(t: Temperature) -> Temperature:
    return t.detach() if isinstance(t, Tensor) else t


class StreamingBackend:
    """The per-sample loss vectors of a backend, written over its two O(N D)-memory primitives.

    Every temperature is a float or a 0-dim tensor (which may require grad); MultiSClip takes a
    separate ``target_t`` for its soft targets (None: ``t``) and ``detach_targets``, which makes
    the soft targets constants (no gradient through them, to the embeddings or a temperature).

    Args:
        logsumexp: ``(q, k, t, with_cols) -> (r, c)``, like :func:`logsumexp`.
        soft_target_sum: ``(q, k, u, vq, vk, t, gamma, t_v) -> y``, like :func:`soft_target_sum`.
        fused_softclip: whether single-process MultiSClip runs the fused
            :class:`~m3co_loss.backends.softclip.SoftClip` (when the temperatures allow its
            static shift) instead of the two primitives.
    """

    def __init__(self, logsumexp: LogSumExpFn, soft_target_sum: SoftTargetSumFn, *, fused_softclip: bool) -> None:
        self.logsumexp = logsumexp
        self.soft_target_sum = soft_target_sum
        self.fused_softclip = fused_softclip

    def __repr__(self) -> str:
        names = (f"{getattr(f, '__module__', '?')}.{getattr(f, '__name__', f)}" for f in (self.logsumexp, self.soft_target_sum))
        return f"StreamingBackend({', '.join(names)}, fused_softclip={self.fused_softclip})"

    def _fused(self, a: Tensor, t: Temperature, target_t: Temperature, distributed: bool) -> bool:
        """Whether the fused single-process MultiSClip kernel applies (both temperatures on the host and large enough)."""
        if not self.fused_softclip or distributed:
            return False
        return static_shift_ok(host_value(t), a.dtype) and static_shift_ok(host_value(target_t), a.dtype)

    def _traced_choice(self, t: Temperature, target_t: Temperature, distributed: bool) -> bool:
        """Whether :meth:`_fused` must be decided in the graph: traced by ``torch.compile`` with a CPU tensor temperature.

        Reading such a temperature would break the graph; ``torch.cond`` takes both paths into
        the graph and runs the one that eager mode takes.
        """
        if not self.fused_softclip or distributed or not torch.compiler.is_compiling():
            return False
        return any(isinstance(x, Tensor) and x.device.type == "cpu" for x in (t, target_t))

    @staticmethod
    def _static_shift_tensor(t: Temperature, dtype: torch.dtype) -> Tensor:
        """:func:`static_shift_ok` as a boolean tensor (in float64: the decision of the float ``host_value``)."""
        if not isinstance(t, Tensor):
            return torch.tensor(static_shift_ok(float(t), dtype))
        return (2.0 / t.detach().to(torch.float64)) <= safe_span(dtype)

    def row_col_lse(self, a: Rows, b: Rows, t: Temperature, *, distributed: bool = False) -> Tuple[None, Tensor, Tensor]:
        """``(None, r, c)``: ``r_i = lse_k S[i, k]`` for local rows i, ``c_i = lse_l S[l, i]`` for local columns i
        (no block of S: the primitive streams over it)."""
        # Decided by the process group, not by row counts: a rank that holds the whole batch must
        # still route its gradient through the gather, or the ranks holding no row wait for it.
        if not distributed:  # one process: one pass gives both
            r, c = self.logsumexp(a.local, b.local, t, True)
            return None, r, c
        r, _ = self.logsumexp(a.local, b.full, t, False)
        c, _ = self.logsumexp(b.local, a.full, t, False)
        return None, r, c

    def m3co_vector(
        self, a: Rows, b: Rows, perm: Tensor, lam: Tensor, t: Temperature, *, reference: bool = False, distributed: bool = False
    ) -> Tensor:
        """Per-sample M3Co L3(a -> b) of the local mixed rows; see :func:`m3co_loss.functional.m3co_pair`."""
        _, r, c = self.row_col_lse(a, b, t, distributed=distributed)
        # lam_i S_ii + (1 - lam_i) S_ij = a_i . (lam_i b_i + (1 - lam_i) b_j) / t: one gathered dot product
        target = (a.local * torch.lerp(b.local[perm], b.local, lam[:, None])).sum(1) / t
        v = r + torch.lerp(c[perm], c, lam) - 2 * target
        return 0.5 * v if reference else v

    def clip_vector(self, a: Rows, b: Rows, t: Temperature, *, distributed: bool = False) -> Tensor:
        """Per-sample symmetric InfoNCE of the local rows."""
        _, r, c = self.row_col_lse(a, b, t, distributed=distributed)
        return r + c - 2 * (a.local * b.local).sum(1) / t

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
        """Per-sample MultiSClip Ls(a; a, b) of the local rows (targets from a, at ``target_t``)."""
        target_t = t if target_t is None else target_t

        def fused() -> Tensor:
            coefficients = SoftClipCoefficients.for_directions(1.0, 0.0, reference)
            return soft_clip(a.local, b.local, t, coefficients, target_t=target_t, detach_targets=detach_targets)

        def streaming() -> Tensor:
            return self._streaming_vector(a, b, t, target_t, reference=reference, gather=gather, distributed=distributed, detach_targets=detach_targets)

        return self._fused_or(fused, streaming, a.local, t, target_t, distributed)

    def _fused_or(self, fused: Callable[[], Tensor], streaming: Callable[[], Tensor], a: Tensor, t: Temperature, target_t: Temperature, distributed: bool) -> Tensor:
        """``fused()`` where the fused kernel applies (:meth:`_fused`), else ``streaming()``."""
        if self._traced_choice(t, target_t, distributed):
            pred = self._static_shift_tensor(t, a.dtype) & self._static_shift_tensor(target_t, a.dtype)
            chosen: Tensor = torch.cond(pred, fused, streaming, ())
            return chosen
        return fused() if self._fused(a, t, target_t, distributed) else streaming()

    def _streaming_vector(
        self, a: Rows, b: Rows, t: Temperature, target_t: Temperature, *, reference: bool, gather: Callable[[Tensor], Tensor], distributed: bool, detach_targets: bool
    ) -> Tensor:
        """:meth:`multisoftclip_vector` over the two primitives."""
        _, r, c = self.row_col_lse(a, b, t, distributed=distributed)
        # the soft targets' operands: softmax_l(a_i . a_l / target_t)
        q, k, tq = (a.local.detach(), a.full.detach(), _detached(target_t)) if detach_targets else (a.local, a.full, target_t)
        if reference:
            # sum_l W_il (S_li + S_il) = sum_l W_il [b_i, a_i] . [a_l, b_l] / t
            y = self.soft_target_sum(q, k, torch.zeros_like(a.full[:, 0]), torch.cat([b.local, a.local], 1), torch.cat([a.full, b.full], 1), tq, 1.0, t)
            return 0.5 * (c + r - y)
        # sum_l W_il (r_l - 2 S_li), S_li = b_i . a_l / t
        y = self.soft_target_sum(q, k, gather(r), b.local, a.full, tq, -2.0, t)
        return c + y

    def multisoftclip_pair_vector(
        self,
        a: Tensor,
        b: Tensor,
        t: Temperature,
        weight_a: float,
        weight_b: float,
        *,
        reference: bool,
        target_t: Optional[Temperature] = None,
        detach_targets: bool = False,
    ) -> Tensor:
        """``weight_a Ls(a; a, b) + weight_b Ls(b; a, b)`` for one process, sharing S between the directions (zeros when both weights are 0)."""
        target_t = t if target_t is None else target_t
        if not (weight_a or weight_b):
            return a.new_zeros(a.shape[0])

        def fused() -> Tensor:
            coefficients = SoftClipCoefficients.for_directions(weight_a, weight_b, reference)
            return soft_clip(a, b, t, coefficients, target_t=target_t, detach_targets=detach_targets)

        def streaming() -> Tensor:
            total: Optional[Tensor] = None
            for weight, targets, other in ((weight_a, a, b), (weight_b, b, a)):
                if weight:
                    v = weight * self._streaming_vector(
                        Rows(targets, targets, 0), Rows(other, other, 0), t, target_t, reference=reference, gather=_identity, distributed=False, detach_targets=detach_targets
                    )
                    total = v if total is None else total + v
            return cast(Tensor, total)  # a weight is nonzero

        return self._fused_or(fused, streaming, a, t, target_t, False)

    def multisoftclip_pairs(
        self,
        p: Sequence[Tensor],
        weights: PairWeights,
        t: Temperature,
        *,
        reference: bool,
        target_t: Optional[Temperature] = None,
        detach_targets: bool = False,
    ) -> Tensor:
        """``sum over pairs (a, b) of weight_a Ls(a; a, b) + weight_b Ls(b; a, b)``, one fused call per pair.

        A pair whose two weights are 0 is skipped; not every weight may be 0 (``ValueError``).
        """
        total: Optional[Tensor] = None
        for (a, b), (weight_a, weight_b) in check_pair_weights(weights, len(p)).items():
            v = self.multisoftclip_pair_vector(p[a], p[b], t, weight_a, weight_b, reference=reference, target_t=target_t, detach_targets=detach_targets)
            total = v if total is None else total + v
        return cast(Tensor, total)  # check_pair_weights leaves a nonzero weight
