"""The state of one seed's training run: what a checkpoint holds, how it is written and resumed.

:class:`RunState` gathers everything a resumed run needs (weights, optimiser, scheduler, the
objective's mixing generator, the best epochs so far, the history, the RNG states).
:func:`save_checkpoint` writes it atomically (rank 0); :func:`read_checkpoint` reads it back
(validated: a corrupt file is named, or set aside on request) and :func:`restore` puts it
back into a freshly built run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from training.config import ConfigError
from training.distributed import is_main_process
from training.io import CHECKPOINT_KEYS, CorruptFileError, atomic_torch_save, load_checkpoint, set_aside

__all__ = ["Evaluation", "BestEpoch", "RunState", "cpu_state", "read_checkpoint", "unresumed_checkpoint", "check_fingerprint", "restore", "save_checkpoint"]

HISTORY_KEYS = ("epoch", "lr", "train_loss", "val_loss", "val_acc", "test_loss", "test_acc")


@dataclass
class Evaluation:
    """One split scored: fused-head probabilities, labels, mean cross-entropy and accuracy."""

    prob: np.ndarray
    labels: np.ndarray
    loss: float
    acc: float


class BestEpoch:
    """Tracks the best epoch by (accuracy, then lower loss); the earliest epoch wins exact ties."""

    def __init__(self) -> None:
        self.key: Optional[Tuple[float, float]] = None
        self.epoch: Optional[int] = None
        self.payload: Any = None

    def offer(self, epoch: int, ev: Evaluation, payload: Callable[[], Any]) -> bool:
        key = (ev.acc, -ev.loss)
        if self.key is None or key > self.key:
            self.key, self.epoch, self.payload = key, epoch, payload()
            return True
        return False

    def state_dict(self) -> Dict[str, Any]:
        return {"key": self.key, "epoch": self.epoch, "payload": self.payload}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.key = tuple(state["key"]) if state["key"] is not None else None
        self.epoch, self.payload = state["epoch"], state["payload"]


def cpu_state(model: nn.Module) -> Dict[str, Tensor]:
    """A copy of the model's state on the CPU (weights kept aside while training goes on)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


@dataclass
class RunState:
    """What one seed's run carries from epoch to epoch, and what its checkpoint holds."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    objective: Any  # an Objective: state_dict / load_state_dict of its generator and schedule
    scheduler: Any = None
    averaged: Optional[nn.Module] = None  # the EMA of the weights (``ema_decay``)
    best_val: BestEpoch = field(default_factory=BestEpoch)
    best_test: BestEpoch = field(default_factory=BestEpoch)
    history: Dict[str, List[Any]] = field(default_factory=lambda: {k: [] for k in HISTORY_KEYS})
    analysis_state: Optional[Dict[str, Tensor]] = None  # weights of the chosen epoch, for Task.analyse
    start_epoch: int = 0
    seconds_before: float = 0.0  # training time of the run before the checkpoint it resumed from
    resumed_at: Optional[int] = None

    @property
    def scored(self) -> nn.Module:
        """The weights every protocol scores: the moving average when there is one."""
        return self.averaged.module if self.averaged is not None else self.model


def read_checkpoint(
    path: Path, *, device: torch.device, seed: int, set_aside_corrupt: bool, required: Mapping[str, Any] = CHECKPOINT_KEYS
) -> Optional[Dict[str, Any]]:
    """The checkpoint at ``path`` to resume from; None when it was corrupt and has been set aside
    (``set_aside_corrupt``: the seed then starts afresh). ``required``: the entries (and their
    types) the checkpoint must hold, by default those of the engine's :func:`save_checkpoint`.

    Raises:
        CorruptFileError: the file is empty, truncated, garbled or lacks an entry, and
            ``set_aside_corrupt`` is off.
    """
    try:
        return load_checkpoint(path, map_location=device, required=required)
    except FileNotFoundError:
        if not set_aside_corrupt:
            raise
        return None  # another rank set it aside between our look and our read
    except CorruptFileError:
        if not set_aside_corrupt:
            raise
        if is_main_process():  # the ranks read one file; one of them renames it
            print(f"set aside the corrupt checkpoint {path} as {set_aside(path).name}; seed {seed} starts afresh", flush=True)
        return None


def unresumed_checkpoint(path: Path, fingerprint: str, seed: int) -> Optional[str]:
    """Why a run without ``resume`` must not start ``seed`` afresh at ``path``, or None.

    A checkpoint of this ``fingerprint`` holds a run that ``resume`` would continue; training the
    seed from epoch 0 would overwrite it. A checkpoint of another configuration, a corrupt one or
    none is no reason (a corrupt one cannot be resumed anyway).
    """
    if not path.exists():
        return None
    try:
        saved = load_checkpoint(path, map_location="cpu", required={"fingerprint": str, "epoch": int})
    except (CorruptFileError, FileNotFoundError):
        return None
    if saved["fingerprint"] != fingerprint:
        return None
    return f"checkpoint at epoch {saved['epoch']} for seed {seed} ({path}): pass --resume to continue, or remove it"


def check_fingerprint(saved: Mapping[str, Any], fingerprint: str, path: Path) -> None:
    """Raise :class:`ConfigError` unless the checkpoint was written by this configuration and data."""
    if saved["fingerprint"] != fingerprint:
        raise ConfigError(f"checkpoint {path} was written with another configuration or data; remove it or change --output-dir")


def restore(run: RunState, saved: Mapping[str, Any], *, path: Path, fingerprint: str, device: torch.device, rank: int = 0, world_size: int = 1, distributed: bool = False) -> None:
    """Put a checkpoint back into a freshly built run (weights, optimiser, RNG streams, progress)."""
    check_fingerprint(saved, fingerprint, path)
    run.model.load_state_dict(saved["model"])
    if run.averaged is not None:
        run.averaged.load_state_dict(saved["averaged"])
    run.optimizer.load_state_dict(saved["optimizer"])
    if run.scheduler is not None:
        run.scheduler.load_state_dict(saved["scheduler"])
    rank_state = {"objective": saved["objective"], "torch_rng": saved["torch_rng"]}
    if distributed:
        saved_world = len(saved.get("rank_states", ()))
        if saved_world != world_size:
            raise ConfigError(f"checkpoint {path} was written by {saved_world} processes; resume it with as many")
        rank_state = saved["rank_states"][rank]
    run.objective.load_state_dict(rank_state["objective"])
    run.best_val.load_state_dict(saved["best_val"])
    run.best_test.load_state_dict(saved["best_test"])
    run.analysis_state = saved.get("analysis_state")
    run.history, run.start_epoch = saved["history"], saved["epoch"] + 1
    run.seconds_before, run.resumed_at = saved.get("seconds", 0.0), run.start_epoch
    torch.set_rng_state(rank_state["torch_rng"])
    if device.type == "cuda" and saved.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(saved["cuda_rng"], device)


def save_checkpoint(path: Path, run: RunState, *, epoch: int, fingerprint: str, device: torch.device, start_time: float, rank_states: Optional[List[Any]] = None) -> None:
    """Write the run after ``epoch`` atomically (call on the main process only).

    ``rank_states`` (distributed training): every rank's mixing generator and RNG state, so that a
    resumed run continues each rank's stream.
    """
    atomic_torch_save(
        path,
        {
            "fingerprint": fingerprint,
            "epoch": epoch,
            "model": run.model.state_dict(),
            "averaged": run.averaged.state_dict() if run.averaged is not None else None,
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict() if run.scheduler is not None else None,
            "objective": run.objective.state_dict(),
            "best_val": run.best_val.state_dict(),
            "best_test": run.best_test.state_dict(),
            "analysis_state": run.analysis_state,
            "history": run.history,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "seconds": run.seconds_before + time.perf_counter() - start_time,
            **({"rank_states": rank_states} if rank_states is not None else {}),
        },
    )
