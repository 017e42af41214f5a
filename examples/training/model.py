"""The multimodal classifier: one encoder and head per modality and a fusion head (paper Eq. 14-15)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from m3co_loss import MixupPlan

__all__ = ["xavier_normal_init", "mlp", "MultimodalOutput", "MultimodalClassifier"]


def xavier_normal_init(module: nn.Module) -> None:
    """Xavier-normal weights and zero biases for a ``Linear`` layer (the released code's
    initialisation); use it as ``net.apply(xavier_normal_init)``, which visits layers in order."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_normal_(module.weight)
        nn.init.zeros_(module.bias)


def mlp(in_dim: int, hidden: int, out_dim: int, *, dropout: float = 0.0, init: str = "xavier_normal") -> nn.Sequential:
    """``Linear(in, hidden) - ReLU - [Dropout] - Linear(hidden, out)``.

    ``init="xavier_normal"`` draws the weights with ``xavier_normal_`` and zeroes the biases (the
    released medical code's initialisation); ``"default"`` keeps PyTorch's.
    """
    layers: List[nn.Module] = [nn.Linear(in_dim, hidden), nn.ReLU()]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(hidden, out_dim))
    if init not in ("xavier_normal", "default"):
        raise ValueError(f"init must be 'xavier_normal' or 'default'; got {init!r}")
    net = nn.Sequential(*layers)
    if init == "xavier_normal":
        net.apply(xavier_normal_init)
    return net


@dataclass
class MultimodalOutput:
    """What one forward pass returns (see :meth:`MultimodalClassifier.forward`)."""

    z: Optional[List[Tensor]]  # clean embeddings (None when only the mixed batch was encoded)
    z_mixed: Optional[List[Tensor]]  # embeddings of the mixed batch (None without a plan)
    unimodal: Optional[List[Tensor]]  # per-modality logits (None with unimodal=False)
    fused: Tensor  # fusion-head logits


class MultimodalClassifier(nn.Module):
    """One encoder and one classifier head per modality, and a fusion head on ``cat(z)``.

    Args:
        encoders: M modules; ``encoders[m](inputs[m])`` is the (N, D_m) embedding ``z[m]``.
        heads: M modules mapping ``z[m]`` to class logits (used in training only).
        fusion: maps ``cat(z, dim=1)`` to class logits (training and inference).
        encode_mixed_jointly: encode the clean and the mixed batch of a modality in one call
            (``cat`` along the batch), which is faster for small inputs and exact when the
            encoders treat rows independently (no batch norm).
    """

    def __init__(self, encoders: Sequence[nn.Module], heads: Sequence[nn.Module], fusion: nn.Module, *, encode_mixed_jointly: bool = False) -> None:
        super().__init__()
        if len(encoders) < 2 or len(encoders) != len(heads):
            raise ValueError(f"need M >= 2 encoders and as many heads; got {len(encoders)} and {len(heads)}")
        self.encoders = nn.ModuleList(encoders)
        self.heads = nn.ModuleList(heads)
        self.fusion = fusion
        self.encode_mixed_jointly = encode_mixed_jointly

    @property
    def num_modalities(self) -> int:
        return len(self.encoders)

    def encode(self, inputs: Sequence[Any]) -> List[Tensor]:
        self._check_inputs(inputs)
        return [enc(x) for enc, x in zip(self.encoders, inputs)]

    def mix_input(self, m: int, x: Any, plan: MixupPlan) -> Any:
        """Modality ``m``'s raw input mixed with ``plan`` (override for inputs that are not tensors)."""
        if not isinstance(x, Tensor):
            raise TypeError(
                f"inputs[{m}] is a {type(x).__name__}, which cannot be mixed as a tensor: override "
                "MultimodalClassifier.mix_input or encode_mixed_modality (e.g. mix token embeddings)"
            )
        return plan.mix(x, m)

    def encode_mixed_modality(self, m: int, x: Any, plan: MixupPlan) -> Tensor:
        """Embedding of modality ``m``'s mixed input (the paper's mixing of raw inputs)."""
        return self.encoders[m](self.mix_input(m, x, plan))

    def encode_with_mixed(self, inputs: Sequence[Any], plan: MixupPlan) -> Tuple[List[Tensor], List[Tensor]]:
        """Embeddings of the clean and of the mixed inputs: ``(z, z_mixed)``."""
        self._check_inputs(inputs)
        z, mixed = [], []
        for m, x in enumerate(inputs):
            if self.encode_mixed_jointly and isinstance(x, Tensor):
                both = self.encoders[m](torch.cat([x, self.mix_input(m, x, plan)]))
                z.append(both[: x.shape[0]])
                mixed.append(both[x.shape[0] :])
            else:
                z.append(self.encoders[m](x))
                mixed.append(self.encode_mixed_modality(m, x, plan))
        return z, mixed

    def classify(self, z: Sequence[Tensor], *, unimodal: bool = True) -> Tuple[Optional[List[Tensor]], Tensor]:
        """(unimodal logits or None, fused logits) for embeddings ``z``."""
        heads = [head(e) for head, e in zip(self.heads, z)] if unimodal else None
        return heads, self.fusion(torch.cat(list(z), dim=1))

    def forward(
        self,
        inputs: Sequence[Any],
        *,
        plan: Optional[MixupPlan] = None,
        mix: str = "none",
        classify: str = "clean",
        unimodal: bool = True,
    ) -> MultimodalOutput:
        """Everything a training step needs, in one call (so that a ``DistributedDataParallel``
        wrapper sees a single forward per backward).

        Args:
            inputs: M per-modality inputs.
            plan: the mixup plan, needed when ``mix`` is not ``"none"``.
            mix: ``"none"``; ``"inputs"``: also encode the plan-mixed raw inputs (the paper);
                ``"embeddings"``: also mix the clean embeddings with the plan (the released code).
            classify: run the heads on the ``"clean"`` or on the ``"mixed"`` embeddings (vanilla
                mixup); with ``mix="inputs"`` and ``classify="mixed"`` the clean batch is not encoded.
            unimodal: also run the per-modality heads.
        """
        if mix not in ("none", "inputs", "embeddings"):
            raise ValueError(f"mix must be 'none', 'inputs' or 'embeddings'; got {mix!r}")
        if classify not in ("clean", "mixed"):
            raise ValueError(f"classify must be 'clean' or 'mixed'; got {classify!r}")
        if mix != "none" and not isinstance(plan, MixupPlan):
            raise ValueError(f"mix={mix!r} needs plan= (a MixupPlan)")
        if classify == "mixed" and mix == "none":
            raise ValueError("classify='mixed' needs mix='inputs' or 'embeddings'")
        z = z_mixed = None
        if mix == "inputs" and classify == "mixed":
            self._check_inputs(inputs)
            z_mixed = [self.encode_mixed_modality(m, x, plan) for m, x in enumerate(inputs)]
        elif mix == "inputs":
            z, z_mixed = self.encode_with_mixed(inputs, plan)
        else:
            z = self.encode(inputs)
            if mix == "embeddings":
                z_mixed = [plan.mix(e, m) for m, e in enumerate(z)]
        heads, fused = self.classify(z if classify == "clean" else z_mixed, unimodal=unimodal)
        return MultimodalOutput(z, z_mixed, heads, fused)

    def predict(self, inputs: Sequence[Any]) -> Tensor:
        """Fused logits only (inference uses the fusion head)."""
        return self.fusion(torch.cat(self.encode(inputs), dim=1))

    def _check_inputs(self, inputs: Sequence[Any]) -> None:
        if not isinstance(inputs, (list, tuple)) or len(inputs) != self.num_modalities:
            raise ValueError(f"inputs must be a list of {self.num_modalities} per-modality inputs")

