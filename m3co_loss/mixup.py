"""Mixup sampling for M3Co (paper Eq. 2-3).

A :class:`MixupSampler` draws a :class:`MixupPlan`: one mixing weight ``lam[i] ~ Beta(alpha, alpha)``
per sample (shared by all modalities in the paper, drawn per modality in the released code),
one random permutation per modality, and the rows that are mixed at all (``mix_prob``; the
others get ``lam = 1``). The plan mixes any tensor whose first dimension is the batch (raw
images, omics vectors, token embeddings, final embeddings, one-hot labels) and carries ``perms``
and ``lam`` to :func:`m3co_loss.functional.m3co`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ._validation import CONVENTIONS, check_choice, check_int, check_positive, check_probability

__all__ = ["MixupPlan", "MixupSampler"]


@dataclass(frozen=True, eq=False)  # compared by identity: tensors have no single truth value
class MixupPlan:
    """Permutations and mixing weights for one batch.

    Attributes:
        perms: one permutation of 0..N-1 per modality (the mixing partners ``perm[m][i]``).
        lam: (M, N) mixing weights; all rows are equal when lam is shared across modalities.
    """

    perms: Tuple[Tensor, ...]
    lam: Tensor

    def __post_init__(self) -> None:
        if self.lam.dim() != 2 or self.lam.shape[0] != len(self.perms):
            raise ValueError(f"lam must have shape (M, N) with M = len(perms) = {len(self.perms)}; got {tuple(self.lam.shape)}")
        for m, perm in enumerate(self.perms):
            if perm.shape != (self.lam.shape[1],):
                raise ValueError(f"perms[{m}] has shape {tuple(perm.shape)}; expected ({self.lam.shape[1]},)")

    @property
    def batch_size(self) -> int:
        """N, the number of rows the plan mixes."""
        return self.lam.shape[1]

    @property
    def num_modalities(self) -> int:
        """M, the number of modalities the plan was drawn for."""
        return len(self.perms)

    def mix(self, x: Tensor, modality: int = 0) -> Tensor:
        """``lam[i] * x[i] + (1 - lam[i]) * x[perm[modality][i]]`` for a tensor whose first dim is N.

        Differentiable in ``x``; computed in ``x``'s dtype and on its device.
        """
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor; got {type(x).__name__}")
        if not 0 <= check_int("modality", modality) < self.num_modalities:
            raise ValueError(f"modality must be an int in [0, {self.num_modalities}); got {modality!r}")
        if not x.is_floating_point():
            raise TypeError(
                f"x must be a floating tensor to be mixed; got {x.dtype} (mix token embeddings, not token ids)"
            )
        if x.dim() == 0 or x.shape[0] != self.batch_size:
            raise ValueError(f"x must have the batch ({self.batch_size}) as its first dim; got shape {tuple(x.shape)}")
        lam = self.lam[modality].to(device=x.device, dtype=x.dtype).reshape((-1,) + (1,) * (x.dim() - 1))
        perm = self.perms[modality].to(x.device)
        return lam * x + (1 - lam) * x[perm]

    def to(self, device: Union[str, torch.device]) -> "MixupPlan":
        """The same plan with its tensors on ``device`` (itself when they are there already)."""
        # Tensor.to returns the tensor itself when no copy is needed ("cuda" and "cuda:0" alike).
        perms, lam = tuple(p.to(device) for p in self.perms), self.lam.to(device)
        if lam is self.lam and all(moved is p for moved, p in zip(perms, self.perms)):
            return self
        return MixupPlan(perms, lam)


class MixupSampler:
    """Draws :class:`MixupPlan` objects.

    Args:
        alpha: Beta(alpha, alpha) concentration (paper: 0.15).
        mix_prob: probability that a row is mixed; unmixed rows get ``lam = 1``
            (paper: 1.0, released code: 0.5).
        shared_lam: one lam (and one set of mixed rows) for all modalities (paper) or
            independent draws per modality (released code).
        generator: CPU ``torch.Generator`` for reproducible plans (default: torch's global RNG).

    Example::

        sampler = MixupSampler()
        plan = sampler.sample(batch_size=32, num_modalities=2, device="cuda")
        images_mixed = plan.mix(images, 0)
    """

    def __init__(
        self,
        *,
        alpha: float = 0.15,
        mix_prob: float = 1.0,
        shared_lam: bool = True,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        self.alpha = check_positive("alpha", alpha)
        self.mix_prob = check_probability("mix_prob", mix_prob)
        if not isinstance(shared_lam, bool):
            raise TypeError(f"shared_lam must be a bool; got {type(shared_lam).__name__}")
        self.shared_lam = shared_lam
        self.generator = _check_generator("generator", generator)

    @classmethod
    def for_convention(cls, convention: str = "paper", **overrides: Any) -> "MixupSampler":
        """The paper's sampler (mix every row, shared lam) or the released code's (mix_prob 0.5, lam per modality)."""
        check_choice("convention", convention, CONVENTIONS)
        defaults: dict[str, Any] = {"mix_prob": 1.0, "shared_lam": True} if convention == "paper" else {"mix_prob": 0.5, "shared_lam": False}
        defaults.update(overrides)
        return cls(**defaults)

    def __repr__(self) -> str:
        return f"MixupSampler(alpha={self.alpha}, mix_prob={self.mix_prob}, shared_lam={self.shared_lam})"

    def sample(
        self,
        batch_size: int,
        num_modalities: int = 2,
        *,
        device: Union[str, torch.device, None] = None,
        generator: Optional[torch.Generator] = None,
    ) -> MixupPlan:
        """Draw a plan for ``batch_size`` samples of ``num_modalities`` modalities.

        Sampling runs on the CPU (so that one CPU generator reproduces a run on any device);
        the plan is then moved to ``device``.
        """
        # One or no row is a valid local batch on a rank of a process group (the loss checks
        # the global batch), so only negative sizes are rejected here.
        batch_size = check_int("batch_size", batch_size, minimum=0)
        num_modalities = check_int("num_modalities", num_modalities, minimum=1)
        gen = _check_generator("generator", generator) or self.generator
        rows = 1 if self.shared_lam else num_modalities
        lam = _beta(self.alpha, (rows, batch_size), gen)
        mixed = torch.rand((rows, batch_size), generator=gen, dtype=torch.float64) < self.mix_prob
        lam = torch.where(mixed, lam, torch.ones_like(lam)).to(torch.float32).expand(num_modalities, batch_size)
        perms = tuple(torch.randperm(batch_size, generator=gen) for _ in range(num_modalities))
        plan = MixupPlan(perms, lam.contiguous())
        return plan.to(device) if device is not None else plan

    __call__ = sample


def _check_generator(name: str, generator: Optional[torch.Generator]) -> Optional[torch.Generator]:
    if generator is None:
        return None
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"{name} must be a torch.Generator; got {type(generator).__name__}")
    if generator.device.type != "cpu":
        raise ValueError(f"{name} must be a CPU generator (plans are drawn on the CPU); got one on {generator.device}")
    return generator


def _beta(alpha: float, shape: Sequence[int], generator: Optional[torch.Generator]) -> Tensor:
    """Beta(alpha, alpha) samples in float64, drawn from ``generator`` when one is given.

    torch.distributions cannot take a generator, so a seed is drawn from it and the CPU
    default generator is used inside ``fork_rng``, which restores its state afterwards. Another
    thread drawing from the default generator during those few microseconds would draw from
    the seeded state (the default generator is process-wide).
    """
    dist = torch.distributions.Beta(torch.tensor(alpha, dtype=torch.float64), torch.tensor(alpha, dtype=torch.float64))
    if generator is None:
        sample = dist.sample(tuple(shape))
    else:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            sample = dist.sample(tuple(shape))
    return sample.clamp_(0.0, 1.0)
