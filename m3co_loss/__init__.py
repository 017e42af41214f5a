"""m3co-loss: the losses of M3CoL (Kumar, Singhal et al., TMLR 2024) for PyTorch.

* :mod:`m3co_loss.functional`: ``m3co_pair``, ``m3co``, ``multisoftclip_pair``, ``multisoftclip``,
  ``clip_loss``, ``contrastive_loss`` (structured targets: partners with weights, or labels),
  ``unis_mmc``.
* Modules: :class:`M3CoLoss` (with the M3Co -> MultiSClip schedule), :class:`MultiSClipLoss`,
  :class:`CLIPLoss`, :class:`ContrastiveLoss`, :class:`UniSMMCLoss`.
* Mixup: :class:`MixupSampler`, :class:`MixupPlan`.
* :mod:`m3co_loss.backends`: the dense, tiled and Triton backends and their tuning options.
"""

from . import backends, distributed, functional, kernels
from ._validation import set_value_checks, value_checks
from ._version import __version__
from .losses import CLIPLoss, ContrastiveLoss, M3CoLoss, MultiSClipLoss, UniSMMCLoss
from .mixup import MixupPlan, MixupSampler

__all__ = [
    "__version__",
    "functional",
    "backends",
    "kernels",
    "distributed",
    "M3CoLoss",
    "MultiSClipLoss",
    "CLIPLoss",
    "ContrastiveLoss",
    "UniSMMCLoss",
    "MixupSampler",
    "MixupPlan",
    "set_value_checks",
    "value_checks",
]
