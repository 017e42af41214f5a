"""The training loss of each method, built from the package's public API."""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from m3co_loss import M3CoLoss, MixupPlan, MixupSampler, MultiSClipLoss, UniSMMCLoss
from m3co_loss import distributed as dist_utils
from m3co_loss.functional import CONVENTIONS
from training.config import METHODS, TrainConfig
from training.model import MultimodalClassifier

__all__ = ["UNIS_MMC_WEIGHT", "RELEASED_MIXUP_ALPHA", "Objective", "cross_entropy", "TrainStep"]

UNIS_MMC_WEIGHT = 0.1  # the UniS-MMC paper's weight of its contrastive term
RELEASED_MIXUP_ALPHA = 0.2  # Beta(0.2, 0.2) of the released mixup_data (train_image_text.py --alpha)


class Objective:
    """The training loss of one method, built from the package's public API.

    Conventions (``convention``), for the contrastive methods and for ``mixup``:

    * ``"paper"``: mix the raw inputs with a :class:`~m3co_loss.MixupPlan` and encode them
      (the paper's choice for images and omics), lam shared by the modalities, every row mixed,
      MultiSClip at t = 0.1, M3Co during the first third of the epochs.
    * ``"reference"``: mix the final embeddings (``criterion(z)``, the released code), lam per
      modality, rows mixed with probability 0.5, cyclic modality pairs, MultiSClip at t = 0.125,
      M3Co for the first ``int(0.33 * epochs)`` epochs.

    ``mixup`` (vanilla mixup) mixes every modality's input with the same partner and lam (so
    that the mixed label is well defined) and trains the unimodal and fusion heads on the mixed
    batch against ``lam * CE(y) + (1 - lam) * CE(y[perm])`` (a cross-entropy with the mixed
    one-hot label); it has no contrastive term. ``paper``: one lam per sample from
    Beta(alpha, alpha). ``reference``: the released ``mixup_data`` (``model/model.py``): one lam
    per batch from Beta(0.2, 0.2) (its ``--alpha``), every row mixed.

    Call the objective once per (micro-)batch and :meth:`epoch_end` once per epoch (the
    M3Co -> MultiSClip schedule counts epochs, as in the paper and the released code).

    ``distributed=True``: each rank passes its share of the global batch; the contrastive losses
    gather the global batch (``gather_distributed=True``) and the cross-entropies return
    ``W / N_global`` times their local sum, so that the average over ranks of the returned loss
    (and DDP's averaged gradient) is that of the global batch, however the batch is split.
    """

    def __init__(
        self,
        method: str,
        *,
        num_modalities: int,
        num_classes: int,
        epochs: int,
        convention: str = "paper",
        beta: float = 0.1,
        alpha: float = 0.15,
        mix_prob: Optional[float] = None,
        temperature: float = 0.1,
        m3co_fraction: Optional[float] = None,
        seed: int = 0,
        distributed: bool = False,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {sorted(METHODS)}; got {method!r}")
        if convention not in CONVENTIONS:
            raise ValueError(f"convention must be one of {CONVENTIONS}; got {convention!r}")
        self.method, self.convention = method, convention
        self.num_modalities, self.num_classes = num_modalities, num_classes
        self.generator = torch.Generator().manual_seed(seed)
        self.distributed = distributed
        self.uses_unimodal = method not in ("concat", "m3col-no-unimodal")
        self.m3col = None
        self.multisclip = None
        self.unis_mmc = None
        self.mixup_sampler = None
        if method in ("m3col", "m3col-no-unimodal", "only-m3co"):
            self.m3col = M3CoLoss(
                temperature=temperature,
                beta=beta,
                total_steps=None if method == "only-m3co" else epochs,
                m3co_fraction=None if method == "only-m3co" else m3co_fraction,
                alpha=alpha,
                mix_prob=mix_prob,
                convention=convention,
                generator=self.generator,
                gather_distributed=distributed,
            )
        elif method == "only-multisclip":
            self.multisclip = MultiSClipLoss(convention=convention, gather_distributed=distributed)
            self.beta = beta
        elif method == "unis-mmc":
            self.unis_mmc = UniSMMCLoss(gather_distributed=distributed)
        elif method == "mixup":
            if convention == "reference":  # one lam for the whole batch (the sampler draws it for a single row)
                self.mixup_sampler = MixupSampler(alpha=RELEASED_MIXUP_ALPHA, mix_prob=1.0, generator=self.generator)
            else:
                options = {} if mix_prob is None else {"mix_prob": mix_prob}
                self.mixup_sampler = MixupSampler(alpha=alpha, shared_lam=True, generator=self.generator, **options)

    @classmethod
    def from_config(cls, config: "TrainConfig", *, num_modalities: int, num_classes: int, seed: int = 0, distributed: bool = False) -> "Objective":
        """The objective of a run's configuration (method, convention, loss options, epochs)."""
        return cls(
            config.method,
            num_modalities=num_modalities,
            num_classes=num_classes,
            epochs=config.epochs,
            convention=config.convention,
            beta=config.beta,
            alpha=config.alpha,
            mix_prob=config.mix_prob,
            temperature=config.temperature,
            m3co_fraction=config.m3co_fraction,
            seed=seed,
            distributed=distributed,
        )

    def phase(self) -> str:
        """The contrastive term in use this epoch: "m3co", "multisclip" or "none"."""
        if self.m3col is not None:
            return self.m3col.phase()
        return "multisclip" if self.multisclip is not None else "none"

    def __call__(self, model: MultimodalClassifier, inputs: Sequence[Any], y: Tensor) -> Tuple[Tensor, Dict[str, Tensor]]:
        """The loss on one batch and its detached parts (for logging)."""
        if self.mixup_sampler is not None:
            return self._vanilla_mixup(model, inputs, y)
        n = y.shape[0]
        scale = self._row_scale(n, y.device)
        plan = None
        if self.m3col is not None and self.m3col.phase() == "m3co":
            plan = self.m3col.sample(n, self.num_modalities, device=y.device)
        if plan is not None and self.convention == "paper":
            out = model(inputs, plan=plan, mix="inputs", unimodal=self.uses_unimodal)
        else:
            out = model(inputs, unimodal=self.uses_unimodal)
        parts = {"fusion_ce": cross_entropy(out.fused, y, scale)}
        if out.unimodal is not None:
            parts["unimodal_ce"] = sum(cross_entropy(logits, y, scale) for logits in out.unimodal)
        if self.m3col is not None:
            # reference convention: z_mixed is None and the criterion mixes z itself with the plan
            parts[self.m3col.phase()] = self.m3col(out.z, mixed=out.z_mixed, plan=plan)
        elif self.multisclip is not None:
            parts["multisclip"] = self.beta * self.multisclip(out.z)
        elif self.unis_mmc is not None:
            parts["unis_mmc"] = UNIS_MMC_WEIGHT * self.unis_mmc(out.z, out.unimodal, y)
        loss = sum(parts.values())
        return loss, {k: v.detach() for k, v in parts.items()}

    def _vanilla_mixup(self, model: MultimodalClassifier, inputs: Sequence[Any], y: Tensor):
        n = y.shape[0]
        scale = self._row_scale(n, y.device)
        if self.convention == "reference":
            lam = self.mixup_sampler.sample(1, 1).lam.expand(1, n)
            one = MixupPlan((torch.randperm(n, generator=self.generator),), lam)
        else:
            one = self.mixup_sampler.sample(n, 1)
        # one partner and one lam per sample for every modality: the mixed label is then exact
        plan = MixupPlan(one.perms * self.num_modalities, one.lam.expand(self.num_modalities, n).contiguous()).to(y.device)
        out = model(inputs, plan=plan, mix="inputs", classify="mixed")
        target = plan.mix(F.one_hot(y, self.num_classes).float(), 0)
        parts = {
            "fusion_ce": cross_entropy(out.fused, target, scale),
            "unimodal_ce": sum(cross_entropy(logits, target, scale) for logits in out.unimodal),
        }
        return sum(parts.values()), {k: v.detach() for k, v in parts.items()}

    def _row_scale(self, n: int, device: torch.device) -> Optional[float]:
        """``W / N_global`` on a rank of a process group; None on one process."""
        world = dist_utils.world_size()
        if not self.distributed or world == 1:
            return None
        return world / sum(dist_utils.all_gather_sizes(n, device))

    def epoch_end(self) -> None:
        if self.m3col is not None:
            self.m3col.step()

    def state_dict(self) -> Dict[str, Any]:
        state: Dict[str, Any] = {"generator": self.generator.get_state()}
        if self.m3col is not None:
            state["m3col"] = self.m3col.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        if self.m3col is not None:
            self.m3col.load_state_dict(state["m3col"])


def cross_entropy(logits: Tensor, target: Tensor, scale: Optional[float]) -> Tensor:
    """Mean cross-entropy, or ``scale`` times the sum on a rank (its average over ranks is the global mean;
    a rank with no rows of the batch contributes 0, not NaN). Half-precision logits are upcast to float32; float64 stays."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if target.is_floating_point():
        target = target.to(logits.dtype)
    if scale is None:
        return F.cross_entropy(logits, target)
    return F.cross_entropy(logits, target, reduction="sum") * scale


class TrainStep(nn.Module):
    """The model and its objective as one module, so that DDP sees one forward per backward."""

    def __init__(self, model: MultimodalClassifier, objective: Objective) -> None:
        super().__init__()
        self.model = model
        self.objective = objective  # not a module: its losses hold no parameters

    def forward(self, inputs: Sequence[Any], y: Tensor) -> Tuple[Tensor, Dict[str, Tensor]]:
        return self.objective(self.model, inputs, y)


