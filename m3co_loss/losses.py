"""``nn.Module`` wrappers over :mod:`m3co_loss.functional`.

Each module takes the keyword arguments of its function, validates them once in ``__init__``
and calls the function in ``forward``. :class:`M3CoLoss` adds what a training loop needs: the
mixup sampler, the weight beta and the M3Co -> MultiSClip schedule of the paper (Eq. 14-16).

:class:`CLIPLoss`, :class:`ContrastiveLoss`, :class:`MultiSClipLoss` and :class:`M3CoLoss` can learn their temperature
(``learn_temperature=True``), as CLIP does: a parameter holds the log-scale ``log(1/t)``,
initialised from ``temperature``, and the forward pass clamps it to
``[log(min_scale), log(max_scale)]`` (the value used, not the parameter: outside the range its
gradient is zero, as in open_clip). It is an ordinary parameter: it travels in state dicts, the
optimiser updates it, and under ``DistributedDataParallel`` it stays equal on every rank when
the loss module is a submodule of the wrapped model called inside its ``forward`` (DDP reduces
the gradients of the parameters used there), like any other parameter (docs page ``maths``).
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Dict, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from . import functional as F
from ._batch import _LocalChecks, _min_rows, _spread
from ._options import ContrastiveOptions, check_float_temperature, check_target_temperature
from ._validation import CONVENTIONS, check_choice, check_flag, check_int, check_probability, has_values, resolve_partner
from .mixup import MixupPlan, MixupSampler

__all__ = ["M3CoLoss", "MultiSClipLoss", "CLIPLoss", "ContrastiveLoss", "UniSMMCLoss"]

# The released code's MultiSClip temperature and M3Co share of training (docs page ``conventions``).
REFERENCE_MULTISCLIP_TEMPERATURE = 0.125
REFERENCE_M3CO_FRACTION = 0.33


def _check_total_steps(value: object) -> Optional[int]:
    return None if value is None else check_int("total_steps", value, minimum=1)


class CLIPLoss(ContrastiveOptions):
    """Symmetric InfoNCE (row plus column cross-entropy): :func:`m3co_loss.functional.clip_loss`.

    The value is the *sum* of the two directions' cross-entropies, twice open_clip's
    ``ClipLoss`` (their average), so that it equals M3Co at ``lam = 1``;
    ``ContrastiveLoss(convention="reference")`` gives the average.

    Args:
        temperature: t > 0 (the initial value when learned).
        learn_temperature: learn the temperature: a parameter ``logit_scale = log(1/t)``,
            initialised from ``temperature``, clamped to ``[log(min_scale), log(max_scale)]``
            in the forward pass (its gradient is zero outside). Default False: a fixed float.
        min_scale, max_scale: the range of ``1/t`` while learning (1 and 100, as CLIP: ``t`` in
            [0.01, 1]); ``temperature`` must lie within it.
        reduction, backend, gather_distributed: as in :func:`~m3co_loss.functional.clip_loss`.

    Raises:
        ValueError, TypeError: an option out of range or of the wrong type (named).

    Examples:
        >>> import torch
        >>> from m3co_loss import CLIPLoss
        >>> criterion = CLIPLoss(temperature=0.07, learn_temperature=True)
        >>> loss = criterion(torch.randn(8, 4), torch.randn(8, 4))
        >>> loss.backward()
        >>> criterion.logit_scale.grad is not None
        True
    """

    _has_convention = False

    def __init__(
        self,
        *,
        temperature: float = 0.1,
        learn_temperature: bool = False,
        min_scale: float = 1.0,
        max_scale: float = 100.0,
        reduction: str = "mean",
        backend: str = "auto",
        gather_distributed: bool = False,
    ) -> None:
        super().__init__(
            temperature=temperature, reduction=reduction, backend=backend, gather_distributed=gather_distributed,
            learn_temperature=learn_temperature, min_scale=min_scale, max_scale=max_scale,
        )

    def forward(self, z_a: Tensor, z_b: Tensor) -> Tensor:
        """The loss of one batch: row ``i`` of ``z_a`` and row ``i`` of ``z_b`` are the positive pair.

        Args:
            z_a, z_b: (N, D) embeddings of the two modalities (any scale: they are normalised).

        Returns:
            A scalar, or the (N,) per-sample losses with ``reduction="none"``.
        """
        return F.clip_loss(
            z_a, z_b, temperature=self.temperature, reduction=self.reduction, backend=self.backend, gather_distributed=self.gather_distributed
        )


class ContrastiveLoss(ContrastiveOptions):
    """Contrastive loss with structured targets: :func:`m3co_loss.functional.contrastive_loss`.

    The targets come with each batch: ``forward(z_a, z_b, partners=..., weights=...)`` (mixing
    partners, e.g. MixCo or M3Co), ``forward(z_a, z_b, labels=...)`` (every sample of the same
    class a positive) or ``forward(z_a, z_b)`` (CLIP's identity targets). See the docs page
    *Structured targets*.

    Args:
        temperature: softmax temperature t > 0 (the initial value when learned).
        learn_temperature: learn the temperature, as :class:`CLIPLoss` does: a parameter
            ``logit_scale = log(1/t)`` clamped to ``[log(min_scale), log(max_scale)]``.
        min_scale, max_scale: the range of ``1/t`` while learning (1 and 100: ``t`` in [0.01, 1]).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        convention: ``"paper"`` (sum of the two directions) or ``"reference"`` (their average).
        backend: ``"auto"``, ``"dense"``, ``"tiled"`` or ``"triton"``.
        gather_distributed: contrast against the rows of every rank (partners then hold global
            column indices).

    Raises:
        ValueError: an option out of range (named).
        TypeError: an option of the wrong type (named).

    Examples:
        >>> import torch
        >>> from m3co_loss import ContrastiveLoss
        >>> criterion = ContrastiveLoss(temperature=0.07)
        >>> z_a, z_b = torch.randn(6, 8), torch.randn(6, 8)
        >>> criterion(z_a, z_b, labels=torch.tensor([0, 0, 1, 1, 2, 2])).shape
        torch.Size([])
    """

    def __init__(
        self,
        *,
        temperature: float = 0.1,
        learn_temperature: bool = False,
        min_scale: float = 1.0,
        max_scale: float = 100.0,
        reduction: str = "mean",
        convention: str = "paper",
        backend: str = "auto",
        gather_distributed: bool = False,
    ) -> None:
        super().__init__(
            temperature=temperature, reduction=reduction, backend=backend, gather_distributed=gather_distributed, convention=convention,
            learn_temperature=learn_temperature, min_scale=min_scale, max_scale=max_scale,
        )

    def forward(
        self, z_a: Tensor, z_b: Tensor, *, partners: Optional[Tensor] = None, weights: Optional[Tensor] = None, labels: Optional[Tensor] = None
    ) -> Tensor:
        """The loss of one batch with its targets (at most one of the two forms).

        Args:
            z_a: (N, D) embeddings of the rows.
            z_b: (N, D) embeddings of the columns.
            partners: (N, K) integer column indices (global over ranks with ``gather_distributed``).
            weights: (N, K) non-negative weights of the partners, rows summing to 1; ``None``:
                1/K each. Only with ``partners``.
            labels: (N,) non-negative integer class labels.

        Raises:
            ValueError, TypeError: as :func:`m3co_loss.functional.contrastive_loss`, naming the argument.
        """
        return F.contrastive_loss(
            z_a,
            z_b,
            partners=partners,
            weights=weights,
            labels=labels,
            temperature=self.temperature,
            reduction=self.reduction,
            convention=self.convention,
            backend=self.backend,
            gather_distributed=self.gather_distributed,
        )


class MultiSClipLoss(ContrastiveOptions):
    """MultiSClip over M >= 2 modalities: :func:`m3co_loss.functional.multisoftclip`.

    Args:
        temperature: t > 0 of the similarities; None means 0.1 for ``convention="paper"`` and
            0.125 (the released code's value) for ``convention="reference"``.
        target_temperature: t' of the soft targets ``softmax(p p^T / t')``, a fixed float;
            None means ``temperature`` (and, when learned, the learned one).
        detach_targets: treat the soft targets as constants (no gradient through them); False,
            the paper's loss, lets them move (docs page ``maths``).
        learn_temperature: learn the temperature: a parameter ``logit_scale = log(1/t)``,
            initialised from ``temperature``, clamped to ``[log(min_scale), log(max_scale)]``
            in the forward pass (its gradient is zero outside). Default False: a fixed float.
        min_scale, max_scale: the range of ``1/t`` while learning (1 and 100, as CLIP: ``t`` in
            [0.01, 1]); ``temperature`` must lie within it.
        reduction, convention, backend, gather_distributed: as in :func:`~m3co_loss.functional.multisoftclip`.

    Raises:
        ValueError, TypeError: an option out of range or of the wrong type (named).
    """

    def __init__(
        self,
        *,
        temperature: Optional[float] = None,
        target_temperature: Optional[float] = None,
        detach_targets: bool = False,
        learn_temperature: bool = False,
        min_scale: float = 1.0,
        max_scale: float = 100.0,
        reduction: str = "mean",
        convention: str = "paper",
        backend: str = "auto",
        gather_distributed: bool = False,
    ) -> None:
        check_choice("convention", convention, CONVENTIONS)
        if temperature is None:
            temperature = 0.1 if convention == "paper" else REFERENCE_MULTISCLIP_TEMPERATURE
        super().__init__(
            temperature=temperature, reduction=reduction, backend=backend, gather_distributed=gather_distributed, convention=convention,
            learn_temperature=learn_temperature, min_scale=min_scale, max_scale=max_scale,
        )
        self.target_temperature = check_target_temperature("target_temperature", target_temperature)
        self.detach_targets = check_flag("detach_targets", detach_targets)

    def forward(self, z: Sequence[Tensor]) -> Tensor:
        """The loss of one batch of M >= 2 modalities, summed over the pairs a < b.

        Args:
            z: M embeddings (N, D) with the same N and D (any scale: they are normalised).

        Returns:
            A scalar, or the (N,) per-sample losses with ``reduction="none"``.
        """
        return F.multisoftclip(
            z,
            temperature=self.temperature,
            target_temperature=self.target_temperature,
            detach_targets=self.detach_targets,
            reduction=self.reduction,
            convention=self.convention,
            backend=self.backend,
            gather_distributed=self.gather_distributed,
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", target_temperature={self.target_temperature}, detach_targets={self.detach_targets}"


class UniSMMCLoss(nn.Module):
    """UniS-MMC baseline loss: :func:`m3co_loss.functional.unis_mmc` (weight it by 0.1 as in its paper).

    Args:
        temperature: t > 0 of the cosine similarities (0.07, as in UniS-MMC).
        gather_distributed: contrast against the rows of every rank.

    Raises:
        ValueError, TypeError: an option out of range or of the wrong type (named).
    """

    def __init__(self, *, temperature: float = 0.07, gather_distributed: bool = False) -> None:
        super().__init__()
        self.temperature = check_float_temperature("temperature", temperature)
        self.gather_distributed = check_flag("gather_distributed", gather_distributed)

    def forward(self, r: Sequence[Tensor], logits: Sequence[Tensor], y: Tensor) -> Tensor:
        """The mean loss of one batch over the modality pairs a < b.

        Args:
            r: M unimodal representations (N, D).
            logits: M unimodal classifier outputs (N, C); their predictions decide which pairs
                are positive.
            y: (N,) integer class labels in ``[0, C)``.

        Returns:
            A scalar.
        """
        return F.unis_mmc(r, logits, y, temperature=self.temperature, gather_distributed=self.gather_distributed)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, gather_distributed={self.gather_distributed}"


class M3CoLoss(ContrastiveOptions):
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
        mixed = None
        if plan is not None:
            mixed = [image_encoder(plan.mix(x_img, 0)), text_encoder(plan.mix(x_txt, 1))]
        loss = task_loss(z, y) + criterion(z, mixed=mixed, plan=plan)

    Args:
        temperature: M3Co temperature (paper 0.1).
        multisclip_temperature: MultiSClip temperature; None means 0.1 (paper) or 0.125
            (``convention="reference"``).
        multisclip_target_temperature: temperature of MultiSClip's soft targets, a fixed float;
            None means ``multisclip_temperature`` (learned with it when learned).
        detach_targets: treat MultiSClip's soft targets as constants (see
            :func:`~m3co_loss.functional.multisoftclip_pair`); False is the paper's loss.
        learn_temperature: learn both temperatures, each as its own parameter:
            :attr:`logit_scale` ``= log(1/temperature)`` for M3Co and
            :attr:`multisclip_logit_scale` for MultiSClip (the two phases are different losses
            with different default temperatures; each parameter gets gradient in its phase only,
            so wrap the module in ``DistributedDataParallel`` with ``find_unused_parameters=True``
            or as part of a model that does). Each is clamped in the forward pass to
            ``[log(min_scale), log(max_scale)]``.
        min_scale, max_scale: the range of ``1/t`` while learning (1 and 100, as CLIP); both
            temperatures must lie within it.
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
        generator: CPU ``torch.Generator`` for reproducible mixing. With ``gather_distributed``
            seed it differently on each rank (e.g. ``seed + rank``): ranks seeded alike draw the
            same mixing weights and partners.

    Raises:
        ValueError, TypeError: an option out of range or of the wrong type (named).

    Warns:
        UserWarning: ``total_steps`` and ``m3co_fraction`` leave no step of M3Co (e.g.
        ``total_steps=2``): the loss would be MultiSClip from the first call.
    """

    step_count: Tensor
    multisclip_logit_scale: Optional[nn.Parameter]

    def __init__(
        self,
        *,
        temperature: float = 0.1,
        multisclip_temperature: Optional[float] = None,
        multisclip_target_temperature: Optional[float] = None,
        detach_targets: bool = False,
        learn_temperature: bool = False,
        min_scale: float = 1.0,
        max_scale: float = 100.0,
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
        super().__init__(
            temperature=temperature, reduction=reduction, backend=backend, gather_distributed=gather_distributed, convention=convention,
            learn_temperature=learn_temperature, min_scale=min_scale, max_scale=max_scale,
        )
        reference = convention == "reference"
        self.partner = resolve_partner(partner, convention)
        if multisclip_temperature is None:
            multisclip_temperature = REFERENCE_MULTISCLIP_TEMPERATURE if reference else 0.1
        self._multisclip_temperature = check_float_temperature("multisclip_temperature", multisclip_temperature)
        self.multisclip_logit_scale = self._learnable("multisclip_temperature", self._multisclip_temperature)
        self.multisclip_target_temperature = check_target_temperature("multisclip_target_temperature", multisclip_target_temperature)
        self.detach_targets = check_flag("detach_targets", detach_targets)
        if isinstance(beta, bool) or not isinstance(beta, (int, float, numbers.Real)):  # numpy scalars too
            raise TypeError(f"beta must be a real number; got {type(beta).__name__}")
        if not 0 <= beta < math.inf:
            raise ValueError(f"beta must be a finite number >= 0; got {beta!r}")
        self.beta = float(beta)
        if m3co_fraction is not None and total_steps is None:
            raise ValueError("m3co_fraction needs total_steps (without it the loss is M3Co throughout)")
        if m3co_fraction is None:
            m3co_fraction = REFERENCE_M3CO_FRACTION if reference else 1.0 / 3.0
        self._total_steps = _check_total_steps(total_steps)
        self._m3co_fraction = check_probability("m3co_fraction", m3co_fraction)
        self._set_host_step_count(0)
        self._warn_if_no_m3co()
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
    def multisclip_temperature(self) -> Union[float, Tensor]:
        """The MultiSClip temperature the next forward pass uses (a 0-dim tensor when learned)."""
        return self._value(self.multisclip_logit_scale, self._multisclip_temperature)

    @property
    def total_steps(self) -> Optional[int]:
        """Length of training in the unit of :meth:`step` (None: M3Co throughout); settable."""
        return self._total_steps

    @total_steps.setter
    def total_steps(self, value: Optional[int]) -> None:
        self._total_steps = _check_total_steps(value)
        self._refresh_phase()
        self._warn_if_no_m3co()

    @property
    def m3co_fraction(self) -> float:
        """Share of :attr:`total_steps` spent on M3Co; settable."""
        return self._m3co_fraction

    @m3co_fraction.setter
    def m3co_fraction(self, value: float) -> None:
        self._m3co_fraction = check_probability("m3co_fraction", value)
        self._refresh_phase()
        self._warn_if_no_m3co()

    def _warn_if_no_m3co(self) -> None:
        # A schedule counted in the wrong unit (epochs given, iterations stepped, or a tiny
        # total) would silently skip the paper's first phase.
        if self.m3co_steps == 0 and self.m3co_fraction > 0:
            warnings.warn(
                f"total_steps={self.total_steps} with m3co_fraction={self.m3co_fraction:.4g} gives no M3Co step: "
                "the loss is MultiSClip from the first call (total_steps counts calls of step())",
                UserWarning,
                stacklevel=3,
            )

    @property
    def m3co_steps(self) -> Optional[int]:
        """How many steps the M3Co phase lasts; None when there is no schedule (M3Co throughout)."""
        if self.total_steps is None:
            return None
        return int(self.m3co_fraction * self.total_steps + 1e-9)

    def phase(self, step: Optional[int] = None) -> str:
        """``"m3co"`` or ``"multisclip"`` at ``step`` (default: the module's own step counter)."""
        if step is None:
            return self._current_phase
        step = check_int("step", step, minimum=0)
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

    def _load_from_state_dict(self, state_dict: Dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
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
        with _LocalChecks(self.gather_distributed):  # a TypeError or ValueError here raises on every rank
            spread = _spread(self.gather_distributed)
            # Over a process group the loss below checks the values of z (a check here would cost
            # a host sync per modality twice).
            z = F._check_modalities("z", z, min_rows=_min_rows(spread), values=not spread)
            phase = self.phase(step)
            if phase != "multisclip":
                if plan is None:
                    if mixed is not None:
                        raise ValueError("mixed was given without the plan that made it; pass plan=")
                elif not isinstance(plan, MixupPlan):
                    raise TypeError(f"plan must be a MixupPlan; got {type(plan).__name__}")
                elif plan.num_modalities != len(z):
                    raise ValueError(f"plan was drawn for {plan.num_modalities} modalities but z holds {len(z)}")
                elif plan.batch_size != z[0].shape[0]:
                    raise ValueError(f"plan was drawn for a batch of {plan.batch_size} but z holds N = {z[0].shape[0]} rows")
        options: Dict[str, Any] = dict(reduction=self.reduction, convention=self.convention, backend=self.backend, gather_distributed=self.gather_distributed)
        if phase == "multisclip":
            loss = F.multisoftclip(
                z,
                temperature=self.multisclip_temperature,
                target_temperature=self.multisclip_target_temperature,
                detach_targets=self.detach_targets,
                **options,
            )
        else:
            # drawn and applied outside the checks: a graph break in the sampler stays one break
            if plan is None:
                plan = self.sampler.sample(z[0].shape[0], len(z), device=z[0].device)
            plan = plan.to(z[0].device)  # a plan drawn on the CPU serves embeddings on any device
            if mixed is None:
                mixed = [plan.mix(x, m) for m, x in enumerate(z)]
            loss = F.m3co(mixed, z, plan.perms, plan.lam, temperature=self.temperature, partner=self.partner, **options)
        return self.beta * loss

    def extra_repr(self) -> str:
        return (
            super().extra_repr()
            + f", partner={self.partner!r}, multisclip_temperature={self._temperature_repr(self._multisclip_temperature)}, "
            f"multisclip_target_temperature={self.multisclip_target_temperature}, detach_targets={self.detach_targets}, beta={self.beta}, "
            f"total_steps={self.total_steps}, m3co_fraction={self.m3co_fraction:.4g}, sampler={self.sampler!r}"
        )
