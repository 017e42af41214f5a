"""What the contrastive modules of :mod:`m3co_loss.losses` share: their options and (learnable) temperature."""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor, nn

from ._validation import BACKENDS, CONVENTIONS, REDUCTIONS, check_choice, check_flag, check_positive, check_temperature

__all__ = ["ContrastiveOptions", "check_float_temperature", "check_target_temperature"]


def check_float_temperature(name: str, value: object) -> float:
    """A module's temperature: a positive float (a learnable one is the module's own parameter)."""
    if isinstance(value, Tensor):
        raise TypeError(f"{name} must be a real number; for a learnable temperature pass learn_temperature=True")
    return float(check_temperature(name, value))


class ContrastiveOptions(nn.Module):
    """The options every contrastive module shares, and its (possibly learnable) temperature."""

    logit_scale: Optional[nn.Parameter]
    _has_convention = True  # whether the loss has a convention option (CLIP has one form only)

    def __init__(
        self,
        *,
        temperature: float,
        reduction: str,
        backend: str,
        gather_distributed: bool,
        convention: str = "paper",
        learn_temperature: bool = False,
        min_scale: float = 1.0,
        max_scale: float = 100.0,
    ) -> None:
        super().__init__()
        self._temperature = check_float_temperature("temperature", temperature)
        self.reduction = check_choice("reduction", reduction, REDUCTIONS)
        self.backend = check_choice("backend", backend, BACKENDS)
        self.gather_distributed = check_flag("gather_distributed", gather_distributed)
        self.convention = check_choice("convention", convention, CONVENTIONS)
        self.learn_temperature = check_flag("learn_temperature", learn_temperature)
        self.min_scale = check_positive("min_scale", min_scale)
        self.max_scale = check_positive("max_scale", max_scale)
        if self.min_scale >= self.max_scale:
            raise ValueError(f"min_scale must be below max_scale; got min_scale={self.min_scale}, max_scale={self.max_scale}")
        self.logit_scale = self._learnable("temperature", self._temperature)

    def _learnable(self, name: str, temperature: float) -> Optional[nn.Parameter]:
        """The log-scale parameter ``log(1/temperature)`` when the module learns its temperatures, else None."""
        if not self.learn_temperature:
            return None
        if not 1.0 / self.max_scale <= temperature <= 1.0 / self.min_scale:
            raise ValueError(
                f"{name}={temperature} lies outside the learnable range [1/max_scale, 1/min_scale] = "
                f"[{1.0 / self.max_scale:.4g}, {1.0 / self.min_scale:.4g}]; change it or min_scale/max_scale"
            )
        return nn.Parameter(torch.tensor(math.log(1.0 / temperature)))

    def _value(self, logit_scale: Optional[Tensor], fixed: float) -> Union[float, Tensor]:
        """The temperature of this forward pass: ``fixed``, or ``1 / clamp(exp(logit_scale), min_scale, max_scale)``."""
        if logit_scale is None:
            return fixed
        return torch.exp(-logit_scale.clamp(math.log(self.min_scale), math.log(self.max_scale)))

    @property
    def temperature(self) -> Union[float, Tensor]:
        """The temperature the next forward pass uses: the float given, or a 0-dim tensor computed from :attr:`logit_scale`."""
        return self._value(self.logit_scale, self._temperature)

    def _temperature_repr(self, value: float) -> str:
        if not self.learn_temperature:
            return f"{value}"
        return f"{value} (learned, 1/t in [{self.min_scale}, {self.max_scale}])"

    def extra_repr(self) -> str:
        convention = f", convention={self.convention!r}" if self._has_convention else ""
        return (
            f"temperature={self._temperature_repr(self._temperature)}, reduction={self.reduction!r}{convention}, "
            f"backend={self.backend!r}, gather_distributed={self.gather_distributed}"
        )


def check_target_temperature(name: str, value: object) -> Optional[float]:
    """A soft-target temperature: None (the loss's own temperature) or a positive float."""
    return None if value is None else check_float_temperature(name, value)
