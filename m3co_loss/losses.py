"""``nn.Module`` wrappers over :mod:`m3co_loss.functional`.

Each module takes the keyword arguments of its function, validates them once in ``__init__``
and calls the function in ``forward``. :class:`M3CoLoss` adds what a training loop needs: the
mixup sampler, the weight beta and the M3Co -> MultiSClip schedule of the paper (Eq. 14-16).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from . import functional as F
from ._validation import (
    BACKENDS,
    CONVENTIONS,
    REDUCTIONS,
    check_choice,
    check_probability,
    check_temperature,
    has_values,
    resolve_partner,
)
from .mixup import MixupPlan, MixupSampler

__all__ = ["M3CoLoss", "MultiSClipLoss", "CLIPLoss", "UniSMMCLoss"]

# The released code's MultiSClip temperature and M3Co share of training (docs page ``conventions``).
REFERENCE_MULTISCLIP_TEMPERATURE = 0.125
REFERENCE_M3CO_FRACTION = 0.33


def _check_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool; got {type(value).__name__}")
    return value


def _check_total_steps(value: object) -> Optional[int]:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"total_steps must be a positive int or None; got {value!r}")
    return value


class _ContrastiveOptions(nn.Module):
    def __init__(self, temperature, reduction, backend, gather_distributed, convention="paper") -> None:
        super().__init__()
        self.temperature = check_temperature("temperature", temperature)
        self.reduction = check_choice("reduction", reduction, REDUCTIONS)
        self.backend = check_choice("backend", backend, BACKENDS)
        self.gather_distributed = _check_flag("gather_distributed", gather_distributed)
        self.convention = check_choice("convention", convention, CONVENTIONS)

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, reduction={self.reduction!r}, convention={self.convention!r}, "
            f"backend={self.backend!r}, gather_distributed={self.gather_distributed}"
        )


class CLIPLoss(_ContrastiveOptions):
    """Symmetric InfoNCE (row plus column cross-entropy): :func:`m3co_loss.functional.clip_loss`."""

    def __init__(self, *, temperature: float = 0.1, reduction: str = "mean", backend: str = "auto", gather_distributed: bool = False) -> None:
        super().__init__(temperature, reduction, backend, gather_distributed)

    def forward(self, z_a: Tensor, z_b: Tensor) -> Tensor:
        return F.clip_loss(
            z_a, z_b, temperature=self.temperature, reduction=self.reduction, backend=self.backend, gather_distributed=self.gather_distributed
        )


class MultiSClipLoss(_ContrastiveOptions):
    """MultiSClip over M >= 2 modalities: :func:`m3co_loss.functional.multisoftclip`.

    ``temperature=None`` means 0.1 for ``convention="paper"`` and 0.125 (the released code's
    value) for ``convention="reference"``.
    """

    def __init__(
        self,
        *,
        temperature: Optional[float] = None,
        reduction: str = "mean",
        convention: str = "paper",
        backend: str = "auto",
        gather_distributed: bool = False,
    ) -> None:
        check_choice("convention", convention, CONVENTIONS)
        if temperature is None:
            temperature = 0.1 if convention == "paper" else REFERENCE_MULTISCLIP_TEMPERATURE
        super().__init__(temperature, reduction, backend, gather_distributed, convention)

    def forward(self, z: Sequence[Tensor]) -> Tensor:
        return F.multisoftclip(
            z,
            temperature=self.temperature,
            reduction=self.reduction,
            convention=self.convention,
            backend=self.backend,
            gather_distributed=self.gather_distributed,
        )


class UniSMMCLoss(nn.Module):
    """UniS-MMC baseline loss: :func:`m3co_loss.functional.unis_mmc` (weight it by 0.1 as in its paper)."""

    def __init__(self, *, temperature: float = 0.07, gather_distributed: bool = False) -> None:
        super().__init__()
        self.temperature = check_temperature("temperature", temperature)
        self.gather_distributed = _check_flag("gather_distributed", gather_distributed)

    def forward(self, r: Sequence[Tensor], logits: Sequence[Tensor], y: Tensor) -> Tensor:
        return F.unis_mmc(r, logits, y, temperature=self.temperature, gather_distributed=self.gather_distributed)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, gather_distributed={self.gather_distributed}"


class M3CoLoss(_ContrastiveOptions):
    r"""The M3CoL contrastive term: ``beta * (M3Co early in training, MultiSClip afterwards)``.

    During the first ``m3co_fraction`` of ``total_steps`` the loss is M3Co (paper Eq. 12):
    mixed versus clean embeddings in the paper's convention, mixed versus mixed in the released
    code's (``partner``); afterwards it is MultiSClip on the clean embeddings (Eq. 13). Add the
    unimodal and fusion cross-entropies of Eq. 14-15 yourself. Without ``total_steps`` the loss
    is M3Co throughout.

    Drop-in use, mixing the final embeddings (what the released code does)::

        criterion = M3CoLoss(total_steps=num_epochs)
        for epoch in range(num_epochs):
            for x_img, x_txt, y in loader:
                z = [image_encoder(x_img), text_encoder(x_txt)]
                loss = task_loss(z, y) + criterion(z)
                ...
            criterion.step()

    Mixing raw inputs (the paper's choice for images and omics): draw the plan first, encode
    the mixed inputs, and pass both::

        plan = criterion.sample(len(y), num_modalities=2, device=y.device)   # None after M3Co
        if plan is not None:
            mixed = [image_encoder(plan.mix(x_img, 0)), text_encoder(plan.mix(x_txt, 1))]
        loss = task_loss(z, y) + criterion(z, mixed=mixed, plan=plan)

    Args:
        temperature: M3Co temperature (paper 0.1).
        multisclip_temperature: MultiSClip temperature; None means 0.1 (paper) or 0.125
            (``convention="reference"``).
        beta: weight of the contrastive term (paper 0.1).
        total_steps: length of training in the unit of :meth:`step` (epochs or iterations).
        m3co_fraction: share of ``total_steps`` spent on M3Co; None means 1/3 (paper) or
            0.33 (reference).
        alpha: Beta(alpha, alpha) concentration of the mixing weights (0.15).
        mix_prob, shared_lam: sampler options; None takes the convention's values
            (paper: 1.0 and True; reference: 0.5 and False).
        convention: ``"paper"`` or ``"reference"`` (docs page ``conventions``).
        partner: what each mixed modality is contrasted with: the other modality's ``"clean"``
            or ``"mixed"`` embeddings; None takes the convention's (paper: ``"clean"``,
            reference: ``"mixed"``, as the released code mixes every modality first).
        reduction, backend, gather_distributed: as in :mod:`m3co_loss.functional`.
        generator: CPU ``torch.Generator`` for reproducible mixing.
    """

    step_count: Tensor

    def __init__(
        self,
        *,
        temperature: float = 0.1,
        multisclip_temperature: Optional[float] = None,
        beta: float = 0.1,
        total_steps: Optional[int] = None,
        m3co_fraction: Optional[float] = None,
        alpha: float = 0.15,
        mix_prob: Optional[float] = None,
        shared_lam: Optional[bool] = None,
        convention: str = "paper",
        partner: Optional[str] = None,
        reduction: str = "mean",
        backend: str = "auto",
        gather_distributed: bool = False,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        super().__init__(temperature, reduction, backend, gather_distributed, convention)
        reference = convention == "reference"
        self.partner = resolve_partner(partner, convention)
        if multisclip_temperature is None:
            multisclip_temperature = REFERENCE_MULTISCLIP_TEMPERATURE if reference else 0.1
        self.multisclip_temperature = check_temperature("multisclip_temperature", multisclip_temperature)
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta < math.inf:
            raise ValueError(f"beta must be a finite number >= 0; got {beta!r}")
        self.beta = float(beta)
        if m3co_fraction is not None and total_steps is None:
            raise ValueError("m3co_fraction needs total_steps (without it the loss is M3Co throughout)")
        if m3co_fraction is None:
            m3co_fraction = REFERENCE_M3CO_FRACTION if reference else 1.0 / 3.0
        self._total_steps = _check_total_steps(total_steps)
        self._m3co_fraction = check_probability("m3co_fraction", m3co_fraction)
        self._set_host_step_count(0)
        sampler_options = {}
        if mix_prob is not None:
            sampler_options["mix_prob"] = mix_prob
        if shared_lam is not None:
            sampler_options["shared_lam"] = shared_lam
        self.sampler = MixupSampler.for_convention(convention, alpha=alpha, generator=generator, **sampler_options)
        # The buffer carries the counter in state dicts; the phase is read from a host copy, so
        # that phase() and forward() never wait on a GPU to learn which loss to compute. The
        # phase itself is cached too: torch.compile guards on what forward() reads, and a guard
        # on the counter would recompile a compiled training step at every step().
        self.register_buffer("step_count", torch.zeros((), dtype=torch.long))

    @property
    def total_steps(self) -> Optional[int]:
        """Length of training in the unit of :meth:`step` (None: M3Co throughout); settable."""
        return self._total_steps

    @total_steps.setter
    def total_steps(self, value: Optional[int]) -> None:
        self._total_steps = _check_total_steps(value)
        self._refresh_phase()

    @property
    def m3co_fraction(self) -> float:
        """Share of :attr:`total_steps` spent on M3Co; settable."""
        return self._m3co_fraction

    @m3co_fraction.setter
    def m3co_fraction(self, value: float) -> None:
        self._m3co_fraction = check_probability("m3co_fraction", value)
        self._refresh_phase()

    @property
    def m3co_steps(self) -> Optional[int]:
        """Number of steps spent on M3Co (None: M3Co throughout)."""
        if self.total_steps is None:
            return None
        return int(self.m3co_fraction * self.total_steps + 1e-9)

    def phase(self, step: Optional[int] = None) -> str:
        """``"m3co"`` or ``"multisclip"`` at ``step`` (default: the module's own step counter)."""
        if step is None:
            return self._current_phase
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0; got {step!r}")
        limit = self.m3co_steps
        return "m3co" if limit is None or step < limit else "multisclip"

    def step(self) -> None:
        """Advance the schedule by one step (call once per epoch or iteration, as ``total_steps`` counts)."""
        self.step_count += 1
        self._set_host_step_count(self._host_step_count + 1)

    def _set_host_step_count(self, count: int) -> None:
        self._host_step_count = count
        self._refresh_phase()

    def _refresh_phase(self) -> None:
        self._current_phase = self.phase(self._host_step_count)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if has_values(self.step_count):
            self._set_host_step_count(int(self.step_count))  # one read per load, not per step

    def sample(
        self, batch_size: int, num_modalities: int = 2, *, device: Union[str, torch.device, None] = None, step: Optional[int] = None
    ) -> Optional[MixupPlan]:
        """A mixup plan for this batch, or None when the schedule is in its MultiSClip phase."""
        if self.phase(step) != "m3co":
            return None
        return self.sampler.sample(batch_size, num_modalities, device=device)

    def forward(
        self,
        z: Sequence[Tensor],
        *,
        mixed: Optional[Sequence[Tensor]] = None,
        plan: Optional[MixupPlan] = None,
        step: Optional[int] = None,
    ) -> Tensor:
        """``beta`` times the loss of the current phase.

        Args:
            z: M clean embeddings (N, D).
            mixed: M embeddings of mixed inputs, made with ``plan``. If None, the clean
                embeddings themselves are mixed with ``plan`` (the released code's choice).
            plan: the :class:`MixupPlan` used for ``mixed``; drawn here when None.
            step: schedule position; default the counter advanced by :meth:`step`.
        """
        z = F._check_modalities("z", z, min_rows=F._min_rows(F._spread(self.gather_distributed)))
        phase = self.phase(step)
        options = dict(reduction=self.reduction, convention=self.convention, backend=self.backend, gather_distributed=self.gather_distributed)
        if phase == "multisclip":
            loss = F.multisoftclip(z, temperature=self.multisclip_temperature, **options)
        else:
            if plan is None:
                if mixed is not None:
                    raise ValueError("mixed was given without the plan that made it; pass plan=")
                plan = self.sampler.sample(z[0].shape[0], len(z), device=z[0].device)
            elif not isinstance(plan, MixupPlan):
                raise TypeError(f"plan must be a MixupPlan; got {type(plan).__name__}")
            if plan.num_modalities != len(z):
                raise ValueError(f"plan was drawn for {plan.num_modalities} modalities but z holds {len(z)}")
            if plan.batch_size != z[0].shape[0]:
                raise ValueError(f"plan was drawn for a batch of {plan.batch_size} but z holds N = {z[0].shape[0]} rows")
            if mixed is None:
                mixed = [plan.mix(x, m) for m, x in enumerate(z)]
            loss = F.m3co(mixed, z, plan.perms, plan.lam, temperature=self.temperature, partner=self.partner, **options)
        return self.beta * loss

    def extra_repr(self) -> str:
        return (
            super().extra_repr()
            + f", partner={self.partner!r}, multisclip_temperature={self.multisclip_temperature}, beta={self.beta}, "
            f"total_steps={self.total_steps}, m3co_fraction={self.m3co_fraction:.4g}, sampler={self.sampler!r}"
        )
