"""A run's options (:class:`TrainConfig`), what it trains on (:class:`Task`) and their fingerprint."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from m3co_loss.functional import CONVENTIONS

__all__ = ["METHODS", "PROTOCOLS", "PROTOCOL_LABELS", "SCHEDULERS", "TEST_GRIDS", "ConfigError", "TrainConfig", "Task", "run_fingerprint"]

METHODS: Dict[str, str] = {
    "m3col": "fusion + unimodal cross-entropies + M3CoLoss (M3Co, then MultiSClip)",
    "concat": "fusion head cross-entropy only",
    "unimodal-sup": "fusion + unimodal cross-entropies, no contrastive term",
    "mixup": "vanilla mixup: mixed inputs and mixed labels, no contrastive term",
    "m3col-no-unimodal": "fusion cross-entropy + M3CoLoss (no unimodal heads)",
    "only-m3co": "fusion + unimodal cross-entropies + M3Co for the whole run",
    "only-multisclip": "fusion + unimodal cross-entropies + MultiSClip for the whole run",
    "unis-mmc": "fusion + unimodal cross-entropies + 0.1 * UniS-MMC (the seed baseline)",
}
PROTOCOLS: Tuple[str, ...] = ("validation", "final", "best_on_test")
PROTOCOL_LABELS = {
    "validation": "validation (epoch chosen on held-out train)",
    "final": "final epoch",
    "best_on_test": "best on test (optimistic: selects on the test set)",
}
SCHEDULERS = ("step", "plateau", "none")
TEST_GRIDS = ("package", "released")


class ConfigError(ValueError):
    """An option a run cannot use (a pipeline's ``main`` reports it in one line, without a traceback)."""


@dataclass
class TrainConfig:
    """Training options of one run (validated by :meth:`validate`).

    ``m3co_fraction`` overrides the share of the epochs spent on M3Co (None: the convention's,
    1/3 or 0.33). ``extra`` holds a pipeline's own options (encoders, per-group learning rates,
    ...): they are recorded in ``results.json`` and change the fingerprint, so that a rerun with
    other options does not reuse finished seeds or checkpoints.

    ``batch_size=None`` trains full batch; ``accumulate`` micro-batches make one optimiser step;
    evaluation runs in batches of ``eval_batch_size`` (default: ``batch_size``, else the whole split).
    ``holdout`` (a fraction in (0, 1) or a count) is the stratified part of the training set held
    out for the validation protocol; 0 trains on the whole training set and reports only
    ``final`` and ``best_on_test`` (unless the task has its own validation split).
    ``eval_every`` scores the validation split every k epochs and ``test_every`` the test set
    every k epochs (the last epoch always; 0: only the last, and no ``best_on_test``). When the
    validation protocol chooses an epoch whose test score was not taken, that epoch's weights are
    kept and the test set is scored once with them at the end. ``test_grid`` places those test
    scores: ``"package"`` after epochs k-1, 2k-1, ... (0-based); ``"released"`` after epochs 0,
    k, 2k, ... (the released medical loop's ``epoch % k == 0``), where the last epoch is scored
    for the ``final`` protocol only, not offered to ``best_on_test``.
    ``ema_decay`` scores (and keeps, for every protocol) an exponential moving average of the
    weights, updated after each optimiser step (``torch.optim.swa_utils.AveragedModel``),
    instead of the weights themselves; training itself is unchanged.
    ``distributed`` trains as one rank of an initialised process group (:func:`init_distributed`):
    ``batch_size`` is then the global batch, split over the ranks.
    ``compile`` names a ``torch.compile`` backend for the training step (model forward and loss;
    evaluation stays eager); compiled code rounds differently, so it joins the fingerprint.
    """

    method: str = "m3col"
    convention: str = "paper"
    epochs: int = 500
    batch_size: Optional[int] = None
    accumulate: int = 1
    eval_batch_size: Optional[int] = None
    lr: float = 2e-3
    weight_decay: float = 1e-4
    scheduler: str = "step"
    step_size: int = 250
    gamma: float = 0.2
    plateau_factor: float = 0.2
    plateau_patience: int = 2
    beta: float = 0.1
    alpha: float = 0.15
    mix_prob: Optional[float] = None
    temperature: float = 0.1
    m3co_fraction: Optional[float] = None
    holdout: float = 0.2
    eval_every: int = 1
    test_every: int = 1
    test_grid: str = "package"
    grad_clip: Optional[float] = None
    ema_decay: Optional[float] = None
    bf16: bool = False
    compile: Optional[str] = None
    device: str = "cpu"
    threads: Optional[int] = None
    num_workers: int = 0
    checkpoint_every: int = 0
    resume: bool = False
    set_aside_corrupt: bool = False
    progress: bool = True
    value_checks: bool = False
    distributed: bool = False
    extra: Dict[str, Any] = field(default_factory=dict)

    # options that do not change the numbers a run produces (left out of its fingerprint)
    _NOT_IN_FINGERPRINT = ("num_workers", "checkpoint_every", "resume", "set_aside_corrupt", "progress", "value_checks", "threads")
    # options added later: left out of the fingerprint while unset, so that older records still match
    _FINGERPRINT_IF_SET = {"m3co_fraction": None, "extra": {}, "distributed": False, "ema_decay": None, "compile": None, "test_grid": "package"}

    def validate(self) -> "TrainConfig":
        def need(cond: bool, name: str, what: str) -> None:
            if not cond:
                raise ConfigError(f"{name} must be {what}; got {getattr(self, name)!r}")

        need(self.method in METHODS, "method", f"one of {sorted(METHODS)}")
        need(self.convention in CONVENTIONS, "convention", f"one of {CONVENTIONS}")
        need(self.scheduler in SCHEDULERS, "scheduler", f"one of {SCHEDULERS}")
        for name in ("epochs", "accumulate", "step_size", "eval_every"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "an int >= 1")
        for name in ("batch_size", "eval_batch_size"):
            v = getattr(self, name)
            need(v is None or (isinstance(v, int) and v >= 2), name, "None (full batch) or an int >= 2")
        for name in ("lr", "alpha", "temperature", "plateau_factor"):
            need(isinstance(getattr(self, name), (int, float)) and getattr(self, name) > 0, name, "> 0")
        for name in ("weight_decay", "beta"):
            need(getattr(self, name) >= 0, name, ">= 0")
        need(0 < self.gamma <= 1, "gamma", "in (0, 1]")
        need(self.mix_prob is None or 0 <= self.mix_prob <= 1, "mix_prob", "None or in [0, 1]")
        need(self.m3co_fraction is None or 0 <= self.m3co_fraction <= 1, "m3co_fraction", "None (the convention's) or in [0, 1]")
        need(isinstance(self.extra, dict), "extra", "a dict of task-specific options")
        need(self.plateau_patience >= 0, "plateau_patience", ">= 0")
        need(self.grad_clip is None or self.grad_clip > 0, "grad_clip", "None or > 0")
        need(self.ema_decay is None or 0 < self.ema_decay < 1, "ema_decay", "None or in (0, 1)")
        need(self.holdout >= 0 and (self.holdout < 1 or float(self.holdout).is_integer()), "holdout", "0, a fraction in (0, 1) or a count")
        need(isinstance(self.test_every, int) and self.test_every >= 0, "test_every", "an int >= 0 (0: the last epoch only)")
        need(self.test_grid in TEST_GRIDS, "test_grid", f"one of {TEST_GRIDS}")
        need(not (self.method == "mixup" and self.convention == "reference" and self.mix_prob is not None), "mix_prob",
             "None for mixup under the reference convention (the released mixup mixes every row)")
        need(self.num_workers >= 0, "num_workers", ">= 0")
        need(self.checkpoint_every >= 0, "checkpoint_every", ">= 0 (0: no checkpoints)")
        need(self.threads is None or self.threads >= 1, "threads", "None or >= 1")
        need(self.compile is None or (isinstance(self.compile, str) and bool(self.compile)), "compile", "None or a torch.compile backend name")
        if self.compile is not None:
            need(hasattr(nn.Module, "compile"), "compile", "None with this torch (nn.Module.compile needs torch >= 2.2)")
            need(self.compile in torch.compiler.list_backends(exclude_tags=()), "compile", "a torch.compile backend such as 'inductor' or 'aot_eager'")
        try:
            device = torch.device(self.device)
        except RuntimeError:
            device = None
        need(device is not None, "device", "a torch device such as 'cpu' or 'cuda:0'")
        need(device.type != "cuda" or torch.cuda.is_available(), "device", "available (this torch has no usable CUDA device)")
        if self.bf16 and device.type != "cuda":
            raise ConfigError(f"bf16 autocast (--bf16) is meant for CUDA devices; got device {self.device!r}")
        return self

    def validation_due(self, epoch: int) -> bool:
        """Whether the validation split is scored after ``epoch`` (0-based): every ``eval_every``-th and the last."""
        return epoch == self.epochs - 1 or (epoch + 1) % self.eval_every == 0

    def on_test_grid(self, epoch: int) -> bool:
        """Whether ``epoch`` (0-based) is one of the every-``test_every`` test scores that ``best_on_test`` selects among."""
        if self.test_every == 0:
            return False
        if self.test_grid == "released":
            return epoch % self.test_every == 0
        return (epoch + 1) % self.test_every == 0 or epoch == self.epochs - 1

    def test_due(self, epoch: int) -> bool:
        """Whether the test set is scored after ``epoch`` (0-based): on the test grid and after the last epoch."""
        return epoch == self.epochs - 1 or self.on_test_grid(epoch)

    def as_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        data = {
            k: v
            for k, v in self.as_dict().items()
            if k not in self._NOT_IN_FINGERPRINT and not (k in self._FINGERPRINT_IF_SET and v == self._FINGERPRINT_IF_SET[k])
        }
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Task:
    """What a pipeline trains on: data, model, metrics and the published numbers to compare with.

    ``build_model`` and ``metrics`` must be top-level functions (or ``functools.partial`` of
    them) so that seeds can run in worker processes. ``metrics(y_true, prob)`` takes integer
    labels and (N, C) class probabilities (numpy) and returns fractions in [0, 1]; it must
    contain ``"acc"``, the metric that selects epochs. ``published`` maps a row label
    (e.g. "M3CoL (paper)") to ``{metric: (mean, std or None)}`` as fractions.
    ``param_groups(model, config)`` returns optimiser parameter groups (default: all
    parameters with ``config.lr`` and ``config.weight_decay``).
    ``analyse(model, context)`` runs once per seed after training, on the weights of the epoch
    chosen by the validation protocol (the last epoch without a validation split), and returns
    ``{name: fraction}`` (e.g. accuracy with a modality replaced by noise); the numbers go to the
    seed's record and, as mean and std over seeds, to ``results["analyses"]`` (``results.md``
    shows them in percent, named by ``analysis_labels``). ``context`` is an
    :class:`training.trainer.AnalysisContext`. Like ``build_model`` it must be picklable.
    ``data_id`` names the data's content (e.g. a digest of the arrays): it joins the fingerprint
    that decides whether a finished seed or a checkpoint is reused, so that changed data is
    trained again, and is recorded in ``results.json``.
    ``trainer`` replaces :class:`Trainer` for this task's seeds (a class with Trainer's
    constructor and ``fit``; e.g. ``training.imagetext.released.ReleasedImageTextTrainer``).
    """

    name: str
    num_classes: int
    build_model: Callable[[], nn.Module]  # a training.model.MultimodalClassifier
    train: Dataset
    test: Dataset
    metrics: Callable[[np.ndarray, np.ndarray], Dict[str, float]]
    metric_labels: Dict[str, str]
    train_labels: Optional[Tensor] = None
    val: Optional[Dataset] = None
    param_groups: Optional[Callable[[nn.Module, TrainConfig], List[Dict[str, Any]]]] = None
    collate_fn: Optional[Callable] = None
    analyse: Optional[Callable[[nn.Module, Any], Dict[str, float]]] = None  # (model, AnalysisContext) -> figures
    analysis_labels: Dict[str, str] = field(default_factory=dict)
    published: Dict[str, Dict[str, Tuple[float, Optional[float]]]] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
    data_id: Optional[str] = None
    trainer: Optional[type] = None


def run_fingerprint(task: Task, config: TrainConfig) -> str:
    """The fingerprint of a seed's record and checkpoint: the configuration's, and the data's when known."""
    if task.data_id is None:
        return config.fingerprint()
    return hashlib.sha256(f"{config.fingerprint()}:{task.data_id}".encode()).hexdigest()[:16]

