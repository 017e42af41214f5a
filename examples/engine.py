"""The training engine shared by the example pipelines (ROSMAP, BRCA, Food-101, N24News, the demo).

A pipeline plugs in by describing its data and model as a :class:`Task` and its training
options as a :class:`TrainConfig`, then calling :func:`run`::

    import engine  # examples/ is the script's directory, so sibling modules import directly

    task = engine.Task(
        name="ROSMAP",
        num_classes=2,
        build_model=build_model,          # top-level function -> MultimodalClassifier (picklable)
        train=engine.TensorMultimodalDataset([x1, x2, x3], y),   # or any Dataset of (inputs, label)
        test=engine.TensorMultimodalDataset(test_xs, test_y),
        train_labels=y,                   # for the stratified hold-out of the validation protocol
        metrics=rosmap_metrics,           # (y_true, prob) -> {"acc": ..., "f1": ..., "auc": ...} via sklearn
        metric_labels={"acc": "ACC", "f1": "F1", "auc": "AUC"},
        published={"M3CoL (paper)": {"acc": (0.887, 0.0094), ...}},
    )
    config = engine.TrainConfig(method="m3col", convention="paper", epochs=500, lr=2e-3, ...)
    results = engine.run(task, config, seeds=[0, 1, 2, 3, 4], output_dir="runs/rosmap")

:func:`run` trains one model per seed (optionally in parallel worker processes), writes
``results.json``, ``results.md`` and ``curves.png`` into ``output_dir`` (atomically), keeps each
finished seed in ``output_dir/seeds/seed<N>.json`` (a rerun skips finished seeds with the same
configuration) and, with ``checkpoint_every``, a resumable checkpoint per seed.
:func:`add_arguments` / :func:`config_from_args` give every pipeline the same command-line options.

The model (:class:`MultimodalClassifier`) is one encoder per modality, one classifier head per
modality and a fusion head on the concatenated embeddings (paper Eq. 14-15); inference uses the
fusion head only. A training step makes exactly one ``model(inputs, plan=..., mix=..., classify=...,
unimodal=...)`` call (DDP-friendly). Subclass it when a modality's input cannot be mixed as a
tensor (text: mix the token embeddings) by overriding :meth:`MultimodalClassifier.mix_input` or
:meth:`MultimodalClassifier.encode_mixed_modality`.

The objective (:class:`Objective`) is built from the package's public API the way a user would
build it: :class:`m3co_loss.M3CoLoss` with its schedule, :class:`m3co_loss.MultiSClipLoss`,
:class:`m3co_loss.UniSMMCLoss`, :class:`m3co_loss.MixupSampler` / :meth:`m3co_loss.MixupPlan.mix`
and cross-entropies. ``method`` picks one of :data:`METHODS`; ``convention`` picks the paper's
conventions (mix raw inputs, shared lam, every row mixed) or the released code's (mix the final
embeddings, lam per modality, half the rows mixed); see :class:`Objective`.

Every run is scored under three protocols (:data:`PROTOCOLS`): ``validation`` (a stratified part
of the training set is held out, the epoch is chosen on it, and the test set is scored with that
epoch's weights), ``final`` (the last epoch) and ``best_on_test`` (the best test score over the
epochs: optimistic, since it selects on the test set; this is how the released code's evaluation
loop, which scores the test set during training, can be read).

Distributed training (``TrainConfig.distributed``, ``--distributed`` under ``torchrun``): every
global batch (``batch_size``, or the whole training set) is split over the ranks
(:class:`EpochBatchSampler` with ``split_batches``), the contrastive losses gather it back
(``gather_distributed=True``), the cross-entropies are scaled so that their average over ranks
is the global-batch mean, and DistributedDataParallel averages the gradients: a run equals the
single-process run on the same global batches up to floating-point rounding and the mixing plans
(each rank draws its own). Evaluation rows are sharded and gathered back
(:meth:`Trainer.gather_rows`), training losses averaged (:meth:`Trainer.reduce_mean`), and only
rank 0 writes files (:func:`is_main_process`). See :func:`init_distributed`.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

import m3co_loss
from m3co_loss import M3CoLoss, MixupPlan, MixupSampler, MultiSClipLoss, UniSMMCLoss
from m3co_loss import distributed as dist_utils
from m3co_loss.functional import CONVENTIONS
from training.io import (  # noqa: F401  (re-exported: the pipelines and their tests use them from here)
    TEMPORARY_SUFFIX,
    CorruptFileError,
    OutputFolderBusy,
    RunLock,
    _atomic_write,
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    json_safe,
    load_checkpoint,
    load_seed_record,
    remove_stale_temporaries,
    seed_of_record_file,
    set_aside,
)

__all__ = [
    "METHODS",
    "PROTOCOLS",
    "TensorMultimodalDataset",
    "EpochBatchSampler",
    "MultimodalClassifier",
    "mlp",
    "Objective",
    "TrainConfig",
    "ConfigError",
    "Task",
    "Trainer",
    "train_seed",
    "run",
    "summarise",
    "results_markdown",
    "plot_curves",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_torch_save",
    "add_arguments",
    "config_from_args",
    "is_main_process",
    "init_distributed",
    "shutdown_distributed",
]

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
UNIS_MMC_WEIGHT = 0.1  # the UniS-MMC paper's weight of its contrastive term
RELEASED_MIXUP_ALPHA = 0.2  # Beta(0.2, 0.2) of the released mixup_data (train_image_text.py --alpha)
TEST_GRIDS = ("package", "released")


class ConfigError(ValueError):
    """An option a run cannot use (a pipeline's ``main`` reports it in one line, without a traceback)."""


# ----------------------------------------------------------------------------- files


def is_main_process() -> bool:
    """True on rank 0 (and in a single process): the only process that writes files."""
    return dist_utils.rank() == 0


def init_distributed(device: str = "cpu") -> Tuple[int, int]:
    """Join the process group that ``torchrun`` describes in the environment; returns (rank, world size).

    gloo for CPU devices, NCCL for CUDA devices (each rank then uses ``cuda:LOCAL_RANK``).
    """
    if dist_utils.is_initialized():
        return dist_utils.rank(), dist_utils.world_size()
    if not torch.distributed.is_available():
        raise RuntimeError("--distributed needs a torch build with torch.distributed")
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"--distributed runs under torchrun, which sets {', '.join(missing)} "
            "(e.g. torchrun --nproc_per_node 2 examples/rosmap.py --distributed ...)"
        )
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(rank_device(device))
        torch.distributed.init_process_group("nccl")
    else:
        torch.distributed.init_process_group("gloo")
    return dist_utils.rank(), dist_utils.world_size()


def shutdown_distributed() -> None:
    """Leave the process group, if one was joined."""
    if dist_utils.is_initialized():
        torch.distributed.destroy_process_group()


def rank_device(device: str) -> torch.device:
    """This rank's device: ``cuda`` without an index means ``cuda:LOCAL_RANK``."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return dev


def _gather_objects(obj: Any, world_size: int) -> List[Any]:
    """Every rank's ``obj`` (picklable), in rank order; every rank must call it."""
    if world_size == 1:
        return [obj]
    out: List[Any] = [None] * world_size
    torch.distributed.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------- data


def move_to(obj: Any, device: torch.device) -> Any:
    """Move tensors inside (nested) lists, tuples and mappings to ``device``."""
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        if hasattr(obj, "to") and not isinstance(obj, dict):  # e.g. a tokenizer's BatchEncoding
            return obj.to(device)
        return {k: move_to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(move_to(v, device) for v in obj)
    return obj


class TensorMultimodalDataset(Dataset):
    """In-memory multimodal data: one (N, ...) tensor per modality and N integer labels.

    Besides the ``Dataset`` protocol it offers :meth:`batch`, which the engine uses to slice
    whole batches without per-sample collation (and without any copy for a full batch).
    """

    def __init__(self, inputs: Sequence[Tensor], labels: Tensor) -> None:
        if not isinstance(inputs, (list, tuple)) or len(inputs) == 0:
            raise TypeError("inputs must be a non-empty list of tensors, one per modality")
        if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.is_floating_point():
            raise TypeError("labels must be a 1-D integer tensor")
        for m, x in enumerate(inputs):
            if not isinstance(x, Tensor):
                raise TypeError(f"inputs[{m}] must be a torch.Tensor; got {type(x).__name__}")
            if x.shape[0] != labels.shape[0]:
                raise ValueError(f"inputs[{m}] has {x.shape[0]} rows but there are {labels.shape[0]} labels")
        self.inputs = list(inputs)
        self.labels = labels

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, i: int):
        return tuple(x[i] for x in self.inputs), self.labels[i]

    def batch(self, indices: Optional[Tensor]) -> Tuple[List[Tensor], Tensor]:
        """The batch at ``indices`` (None: the whole dataset, without copying)."""
        if indices is None:
            return self.inputs, self.labels
        return [x[indices] for x in self.inputs], self.labels[indices]

    def subset(self, indices: Union[Tensor, np.ndarray, Sequence[int]]) -> "TensorMultimodalDataset":
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return TensorMultimodalDataset([x[idx] for x in self.inputs], self.labels[idx])

    def to(self, device: Union[str, torch.device]) -> "TensorMultimodalDataset":
        return TensorMultimodalDataset([x.to(device) for x in self.inputs], self.labels.to(device))


class EpochBatchSampler(Sampler):
    """Yields the index batches of one epoch; reshuffles deterministically per (seed, epoch).

    Call :meth:`set_epoch` before each epoch (as with ``DistributedSampler``). With
    ``world_size > 1`` each rank takes every ``world_size``-th index of the epoch's order (the
    order is padded by wrapping around so that every rank gets the same number of batches);
    without ``shuffle`` and with ``pad=False`` the ranks' shards are disjoint and cover the data
    exactly once (for evaluation).

    ``split_batches=True`` (distributed training) instead cuts the epoch's order into global
    batches of ``batch_size`` (None: one batch of everything) and gives each rank a contiguous
    share of every global batch (shares differ by at most one row, and may be empty). Nothing is
    padded or repeated, every rank takes the same number of steps, and the ranks together see
    exactly the batches of one process: padding would put duplicate samples into the global
    batch, which changes a contrastive loss. ``nonempty_shares=True`` drops a last global batch
    with fewer rows than ranks instead (for datasets read through a ``DataLoader``, which cannot
    collate an empty batch).
    """

    def __init__(
        self,
        size: int,
        batch_size: Optional[int],
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        pad: bool = True,
        split_batches: bool = False,
        nonempty_shares: bool = False,
    ) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1; got {size}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None (full batch); got {batch_size}")
        self.size, self.shuffle, self.seed, self.drop_last = size, shuffle, seed, drop_last
        self.rank, self.world_size, self.pad = rank, world_size, pad
        self.split_batches = split_batches
        self.nonempty_shares = nonempty_shares and split_batches and world_size > 1
        self.epoch = 0
        if split_batches:
            per_rank = size  # batches are cut from the whole order, then split over ranks
        else:
            per_rank = math.ceil(size / world_size) if pad else len(range(rank, size, world_size))
        self.batch_size = batch_size or per_rank
        self.per_rank = per_rank

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> Tensor:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.size, generator=g)
        else:
            order = torch.arange(self.size)
        if self.world_size > 1 and not self.split_batches:
            if self.pad and self.size % self.world_size:
                order = torch.cat([order, order[: self.world_size - self.size % self.world_size]])
            order = order[self.rank :: self.world_size]
        return order

    def batches(self) -> Iterator[Tensor]:
        """This rank's index batches of the epoch."""
        for chunk in self.order().split(self.batch_size):
            if self.drop_last and len(chunk) < self.batch_size:
                return
            if self.nonempty_shares and len(chunk) < self.world_size:
                return
            yield chunk.tensor_split(self.world_size)[self.rank] if self.split_batches else chunk

    def __iter__(self) -> Iterator[List[int]]:
        for chunk in self.batches():
            yield chunk.tolist()

    def __len__(self) -> int:
        full, rest = divmod(self.per_rank, self.batch_size)
        if self.nonempty_shares and rest < self.world_size:
            rest = 0
        return full + (0 if self.drop_last or rest == 0 else 1)


class _Batches:
    """Iterates ``(inputs, labels)`` batches of a dataset in the sampler's order.

    In-memory datasets (with a ``batch`` method) are sliced directly; a full, unshuffled batch
    is the dataset's own tensors. Other datasets go through one ``DataLoader`` (worker
    processes persist across epochs).
    """

    def __init__(self, dataset: Dataset, sampler: EpochBatchSampler, *, collate_fn=None, num_workers: int = 0, pin_memory: bool = False):
        self.dataset, self.sampler = dataset, sampler
        self.loader = None
        if not hasattr(dataset, "batch"):
            self.loader = DataLoader(
                dataset,
                batch_sampler=sampler,
                collate_fn=collate_fn,
                num_workers=num_workers,
                pin_memory=pin_memory,
                persistent_workers=num_workers > 0,
            )

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        if self.loader is not None:
            yield from self.loader
            return
        s = self.sampler
        if not s.shuffle and s.world_size == 1 and s.batch_size >= s.size:
            yield self.dataset.batch(None)
            return
        for chunk in s.batches():
            yield self.dataset.batch(chunk.to(self.dataset.labels.device))


def check_holdout(labels: Union[Tensor, np.ndarray], holdout: Union[int, float]) -> None:
    """Raise :class:`ConfigError` unless a stratified hold-out of ``holdout`` can be drawn from
    ``labels``: every class needs two samples, and both parts at least one sample per class."""
    y = labels.cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    n = len(y)
    classes, counts = np.unique(y, return_counts=True)
    held = int(holdout) if holdout >= 1 else math.ceil(holdout * n)
    if counts.min(initial=n) < 2:
        rare = classes[counts < 2].tolist()
        raise ConfigError(f"holdout={holdout}: class(es) {rare} of the training labels have a single sample, so the hold-out cannot be stratified; use --holdout 0")
    if not len(classes) <= held <= n - len(classes):
        raise ConfigError(
            f"holdout={holdout} holds out {held} of the {n} training samples; with {len(classes)} classes both parts need "
            f"one sample per class, so hold out between {len(classes)} and {n - len(classes)} (a fraction or a count), or 0 for none"
        )


def stratified_holdout(labels: Union[Tensor, np.ndarray], holdout: Union[int, float], seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Indices (fit, held out) of a stratified split (``holdout``: a fraction or a count)."""
    from sklearn.model_selection import train_test_split

    check_holdout(labels, holdout)
    y = labels.cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    fit, held = train_test_split(np.arange(len(y)), test_size=holdout, stratify=y, random_state=seed)
    return np.sort(fit), np.sort(held)


# ----------------------------------------------------------------------------- model


def mlp(in_dim: int, hidden: int, out_dim: int, *, dropout: float = 0.0, init: str = "xavier_normal") -> nn.Sequential:
    """``Linear(in, hidden) - ReLU - [Dropout] - Linear(hidden, out)``.

    ``init="xavier_normal"`` draws the weights with ``xavier_normal_`` and zeroes the biases (the
    released medical code's initialisation); ``"default"`` keeps PyTorch's.
    """
    layers: List[nn.Module] = [nn.Linear(in_dim, hidden), nn.ReLU()]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(hidden, out_dim))
    net = nn.Sequential(*layers)
    if init == "xavier_normal":
        for layer in net:
            if isinstance(layer, nn.Linear):
                nn.init.xavier_normal_(layer.weight)
                nn.init.zeros_(layer.bias)
    elif init != "default":
        raise ValueError(f"init must be 'xavier_normal' or 'default'; got {init!r}")
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


# ----------------------------------------------------------------------------- objective


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
        parts = {"fusion_ce": _cross_entropy(out.fused, y, scale)}
        if out.unimodal is not None:
            parts["unimodal_ce"] = sum(_cross_entropy(logits, y, scale) for logits in out.unimodal)
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
            "fusion_ce": _cross_entropy(out.fused, target, scale),
            "unimodal_ce": sum(_cross_entropy(logits, target, scale) for logits in out.unimodal),
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


def _cross_entropy(logits: Tensor, target: Tensor, scale: Optional[float]) -> Tensor:
    """Mean cross-entropy, or ``scale`` times the sum on a rank (its average over ranks is the global mean;
    a rank with no rows of the batch contributes 0, not NaN). Half-precision logits are upcast to float32; float64 stays."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if target.is_floating_point():
        target = target.to(logits.dtype)
    if scale is None:
        return F.cross_entropy(logits, target)
    return F.cross_entropy(logits, target, reduction="sum") * scale


class _TrainStep(nn.Module):
    """The model and its objective as one module, so that DDP sees one forward per backward."""

    def __init__(self, model: MultimodalClassifier, objective: Objective) -> None:
        super().__init__()
        self.model = model
        self.objective = objective  # not a module: its losses hold no parameters

    def forward(self, inputs: Sequence[Any], y: Tensor) -> Tuple[Tensor, Dict[str, Tensor]]:
        return self.objective(self.model, inputs, y)


# ----------------------------------------------------------------------------- configuration


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
    :class:`AnalysisContext`. Like ``build_model`` it must be picklable.
    ``data_id`` names the data's content (e.g. a digest of the arrays): it joins the fingerprint
    that decides whether a finished seed or a checkpoint is reused, so that changed data is
    trained again, and is recorded in ``results.json``.
    ``trainer`` replaces :class:`Trainer` for this task's seeds (a class with Trainer's
    constructor and ``fit``; e.g. ``released_imagetext.ReleasedImageTextTrainer``).
    """

    name: str
    num_classes: int
    build_model: Callable[[], MultimodalClassifier]
    train: Dataset
    test: Dataset
    metrics: Callable[[np.ndarray, np.ndarray], Dict[str, float]]
    metric_labels: Dict[str, str]
    train_labels: Optional[Tensor] = None
    val: Optional[Dataset] = None
    param_groups: Optional[Callable[[nn.Module, TrainConfig], List[Dict[str, Any]]]] = None
    collate_fn: Optional[Callable] = None
    analyse: Optional[Callable[[nn.Module, "AnalysisContext"], Dict[str, float]]] = None
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


# ----------------------------------------------------------------------------- training


@dataclass
class AnalysisContext:
    """What :attr:`Task.analyse` gets besides the model (already in eval mode, on ``device``)."""

    device: torch.device
    seed: int
    epoch: int  # the epoch whose weights the model holds
    autocast: Callable[[], Any]  # a context manager factory: bfloat16 autocast when the run uses it
    config: "TrainConfig"


@dataclass
class Evaluation:
    prob: np.ndarray
    labels: np.ndarray
    loss: float
    acc: float


class _Best:
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


class Trainer:
    """Trains one seed of a :class:`Task` with a :class:`TrainConfig` (see :func:`train_seed`)."""

    def __init__(self, task: Task, config: TrainConfig, seed: int, *, checkpoint_path: Optional[Path] = None, progress_position: int = 0) -> None:
        self.task, self.config, self.seed = task, config.validate(), seed
        self.checkpoint_path = checkpoint_path
        self.progress_position = progress_position
        self.distributed = config.distributed
        if self.distributed and not dist_utils.is_initialized():
            raise ValueError("distributed training needs an initialised process group: run under torchrun and call init_distributed() first")
        self.rank, self.world_size = (dist_utils.rank(), dist_utils.world_size()) if self.distributed else (0, 1)
        self.device = rank_device(config.device) if self.distributed else torch.device(config.device)
        if config.bf16 and self.device.type != "cuda":
            raise ValueError("bf16 autocast is meant for CUDA devices; got device " + config.device)

    # -- distributed seam ------------------------------------------------------------------

    def gather_rows(self, x: Tensor) -> Tensor:
        """Concatenate evaluation rows over ranks (identity in a single process)."""
        if self.world_size == 1:
            return x
        return dist_utils.all_gather_with_grad(x.contiguous())

    def reduce_mean(self, x: Tensor) -> Tensor:
        """Average a scalar over ranks (identity in a single process)."""
        if self.world_size == 1:
            return x
        x = x.clone()
        torch.distributed.all_reduce(x)
        return x / self.world_size

    # -- pieces ----------------------------------------------------------------------------

    def _autocast(self):
        if self.config.bf16:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _split(self) -> Tuple[Dataset, Optional[Dataset]]:
        task, holdout = self.task, self.config.holdout
        if task.val is not None:
            return task.train, task.val
        if holdout == 0:
            return task.train, None
        if task.train_labels is None:
            raise ValueError(f"task {task.name!r} needs train_labels for a stratified hold-out (or holdout=0)")
        fit, held = stratified_holdout(task.train_labels, int(holdout) if holdout >= 1 else holdout, self.seed)
        subset = getattr(task.train, "subset", None)
        if subset is not None:
            return subset(fit), subset(held)
        return torch.utils.data.Subset(task.train, fit.tolist()), torch.utils.data.Subset(task.train, held.tolist())

    def _prepare_data(self, dataset: Dataset) -> Dataset:
        return dataset.to(self.device) if isinstance(dataset, TensorMultimodalDataset) else dataset

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """Adam over the task's parameter groups (fused on CPU and CUDA)."""
        c = self.config
        groups = self.task.param_groups(model, c) if self.task.param_groups else [{"params": [p for p in model.parameters() if p.requires_grad]}]
        fused = self.device.type in ("cpu", "cuda")
        return torch.optim.Adam(groups, lr=c.lr, weight_decay=c.weight_decay, fused=fused)

    def _scheduler(self, optimizer: torch.optim.Optimizer):
        c = self.config
        if c.scheduler == "step":
            return torch.optim.lr_scheduler.StepLR(optimizer, step_size=c.step_size, gamma=c.gamma)
        if c.scheduler == "plateau":
            return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=c.plateau_factor, patience=c.plateau_patience)
        return None

    @torch.inference_mode()
    def evaluate(self, model: MultimodalClassifier, batches: _Batches) -> Evaluation:
        """Fused-head probabilities, mean cross-entropy and accuracy on one split."""
        model.eval()
        probs, labels = [], []
        for inputs, y in batches:
            inputs, y = move_to(inputs, self.device), y.to(self.device)
            with self._autocast():
                logits = model(inputs, unimodal=False).fused
            probs.append(logits.float())
            labels.append(y)
        logits, y = self.gather_rows(torch.cat(probs)), self.gather_rows(torch.cat(labels))
        loss = F.cross_entropy(logits, y).item()
        prob = logits.softmax(dim=1)
        acc = (prob.argmax(dim=1) == y).double().mean().item()
        return Evaluation(prob.cpu().numpy(), y.cpu().numpy(), loss, acc)

    # -- the loop --------------------------------------------------------------------------

    def fit(self, *, stop_epoch: Optional[int] = None) -> Optional[Dict[str, Any]]:
        """Train, score the protocols and return the seed's record.

        ``stop_epoch`` (needs ``checkpoint_path``): train epochs up to ``stop_epoch - 1``, write a
        checkpoint there and return None; a later ``fit`` with ``resume=True`` continues the seed
        exactly where it stopped (:func:`run` hands seeds between workers this way).
        """
        if stop_epoch is not None:
            if self.checkpoint_path is None:
                raise ValueError("stop_epoch needs a checkpoint_path to write the stopped run to")
            if not 0 < stop_epoch <= self.config.epochs:
                raise ValueError(f"stop_epoch must be in [1, epochs={self.config.epochs}]; got {stop_epoch}")
        threads = torch.get_num_threads()
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        if self.device.type == "cpu":
            keep_freed_memory()
        try:
            return self._fit(self.config.epochs if stop_epoch is None else stop_epoch)
        finally:
            torch.set_num_threads(threads)

    def _load_checkpoint(self) -> Optional[Dict[str, Any]]:
        """The checkpoint to resume from; None when it was corrupt and has been set aside
        (``set_aside_corrupt``: the seed then starts afresh)."""
        try:
            return load_checkpoint(self.checkpoint_path, map_location=self.device)
        except FileNotFoundError:
            if not self.config.set_aside_corrupt:
                raise
            return None  # another rank set it aside between our look and our read
        except CorruptFileError:
            if not self.config.set_aside_corrupt:
                raise
            if is_main_process():  # the ranks read one file; one of them renames it
                print(f"set aside the corrupt checkpoint {self.checkpoint_path} as {set_aside(self.checkpoint_path).name}; seed {self.seed} starts afresh", flush=True)
            return None

    def _fit(self, stop_epoch: int) -> Optional[Dict[str, Any]]:
        c, task = self.config, self.task
        fingerprint = run_fingerprint(task, c)  # of this seed's checkpoint and record
        start_time = time.perf_counter()
        seconds_before = 0.0  # training time of the run before the checkpoint it resumed from
        resumed_at: Optional[int] = None
        torch.manual_seed(self.seed)
        train_set, val_set = self._split()
        train_set, test_set = self._prepare_data(train_set), self._prepare_data(task.test)
        val_set = self._prepare_data(val_set) if val_set is not None else None
        loader_options = dict(collate_fn=task.collate_fn, num_workers=c.num_workers, pin_memory=self.device.type == "cuda")
        sampler = EpochBatchSampler(
            len(train_set),
            c.batch_size,
            shuffle=c.batch_size is not None,
            seed=self.seed,
            rank=self.rank,
            world_size=self.world_size,
            split_batches=True,
            nonempty_shares=not hasattr(train_set, "batch"),  # a DataLoader cannot collate an empty share
        )
        train_batches = _Batches(train_set, sampler, **loader_options)

        def eval_batches(ds):
            s = EpochBatchSampler(len(ds), c.eval_batch_size or c.batch_size, shuffle=False, rank=self.rank, world_size=self.world_size, pad=False)
            return _Batches(ds, s, **loader_options)

        val_batches = eval_batches(val_set) if val_set is not None else None
        test_batches = eval_batches(test_set)

        model = task.build_model().to(self.device)
        num_modalities = model.num_modalities
        optimizer = self.build_optimizer(model)
        scheduler = self._scheduler(optimizer)
        averaged = None
        if c.ema_decay is not None:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(c.ema_decay), use_buffers=True)
        scored = averaged.module if averaged is not None else model  # the weights every protocol scores
        if c.scheduler == "plateau" and val_set is None:
            raise ValueError("scheduler='plateau' steps on validation accuracy and needs a validation split (holdout > 0)")
        objective = Objective.from_config(
            c,
            num_modalities=num_modalities,
            num_classes=task.num_classes,
            # each rank draws its own mixing plans; rank 0 draws those of a single process
            seed=self.seed + 1_000_003 * self.rank,
            distributed=self.distributed,
        )
        step: nn.Module = _TrainStep(model, objective)
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel

            step = DistributedDataParallel(
                step,
                device_ids=[self.device] if self.device.type == "cuda" else None,
                find_unused_parameters=not objective.uses_unimodal,  # the unimodal heads sit idle then
            )
        if c.compile is not None:
            # in place: the state dicts keep their keys, so checkpoints load with or without it
            step.compile(backend=c.compile)
        history: Dict[str, List[float]] = {k: [] for k in ("epoch", "lr", "train_loss", "val_loss", "val_acc", "test_loss", "test_acc")}
        best_val, best_test = _Best(), _Best()
        final_test: Optional[Evaluation] = None
        start_epoch = 0
        analysis_state: Optional[Dict[str, Tensor]] = None  # weights of the chosen epoch, for task.analyse
        state = self._load_checkpoint() if c.resume and self.checkpoint_path is not None and self.checkpoint_path.exists() else None
        if state is not None:
            if state["fingerprint"] != fingerprint:
                raise ConfigError(f"checkpoint {self.checkpoint_path} was written with another configuration or data; remove it or change --output-dir")
            model.load_state_dict(state["model"])
            if averaged is not None:
                averaged.load_state_dict(state["averaged"])
            optimizer.load_state_dict(state["optimizer"])
            if scheduler is not None:
                scheduler.load_state_dict(state["scheduler"])
            rank_state = {"objective": state["objective"], "torch_rng": state["torch_rng"]}
            if self.distributed:
                saved_world = len(state.get("rank_states", ()))
                if saved_world != self.world_size:
                    raise ConfigError(f"checkpoint {self.checkpoint_path} was written by {saved_world} processes; resume it with as many")
                rank_state = state["rank_states"][self.rank]
            objective.load_state_dict(rank_state["objective"])
            best_val.load_state_dict(state["best_val"])
            best_test.load_state_dict(state["best_test"])
            analysis_state = state.get("analysis_state")
            history, start_epoch = state["history"], state["epoch"] + 1
            seconds_before, resumed_at = state.get("seconds", 0.0), start_epoch
            torch.set_rng_state(rank_state["torch_rng"])
            if self.device.type == "cuda" and state.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(state["cuda_rng"], self.device)

        from tqdm.auto import tqdm

        show = c.progress and is_main_process()
        epochs_bar = tqdm(
            range(start_epoch, stop_epoch),
            initial=start_epoch,
            total=c.epochs,
            desc=f"{task.name} {c.method} seed {self.seed}",
            disable=not show,
            position=self.progress_position,
            leave=False,
            dynamic_ncols=True,
        )
        steps_per_epoch = len(train_batches)
        with m3co_loss.value_checks(c.value_checks):
            for epoch in epochs_bar:
                sampler.set_epoch(epoch)
                model.train()
                loss_sum = torch.zeros((), device=self.device)
                optimizer.zero_grad(set_to_none=True)
                batch_iter = train_batches
                if show and steps_per_epoch > 1:
                    batch_iter = tqdm(train_batches, total=steps_per_epoch, leave=False, desc=f"epoch {epoch}", position=self.progress_position + 1, dynamic_ncols=True)
                for i, (inputs, y) in enumerate(batch_iter):
                    inputs, y = move_to(inputs, self.device), y.to(self.device)
                    group_start = i - i % c.accumulate
                    group_size = min(c.accumulate, steps_per_epoch - group_start)
                    # DDP averages gradients at the last micro-batch of an accumulation group only
                    last_of_group = i - group_start == group_size - 1
                    sync = step.no_sync() if self.distributed and not last_of_group else contextlib.nullcontext()
                    with sync:
                        with self._autocast():
                            loss, _ = step(inputs, y)
                        (loss / group_size).backward()
                    loss_sum += loss.detach()
                    if last_of_group:
                        if c.grad_clip is not None:
                            nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                        if averaged is not None:
                            averaged.update_parameters(model)
                objective.epoch_end()
                train_loss = self.reduce_mean(loss_sum / steps_per_epoch).item()
                if not math.isfinite(train_loss):
                    raise FloatingPointError(f"{task.name} {c.method} seed {self.seed}: the training loss is {train_loss} at epoch {epoch}")
                last = epoch == c.epochs - 1
                val_due = val_batches is not None and c.validation_due(epoch)
                test_due = c.test_due(epoch)
                val_ev = self.evaluate(scored, val_batches) if val_due else None
                test_ev = self.evaluate(scored, test_batches) if test_due else None
                if val_ev is not None:
                    # the test probabilities of the chosen epoch's weights: at hand when the test set
                    # was scored this epoch; otherwise keep the weights and score the test set at the end
                    best_val.offer(
                        epoch,
                        val_ev,
                        lambda: {"val_prob": val_ev.prob, "val_labels": val_ev.labels, "test_prob": test_ev.prob}
                        if test_ev is not None
                        else {"val_prob": val_ev.prob, "val_labels": val_ev.labels, "state": _cpu_state(scored)},
                    )
                if test_ev is not None and c.on_test_grid(epoch):
                    best_test.offer(epoch, test_ev, lambda: {"test_prob": test_ev.prob})
                if last:
                    final_test = test_ev
                if val_ev is not None or test_ev is not None:
                    history["epoch"].append(epoch)
                    history["lr"].append(optimizer.param_groups[0]["lr"])
                    history["train_loss"].append(train_loss)
                    history["val_loss"].append(val_ev.loss if val_ev else None)
                    history["val_acc"].append(val_ev.acc if val_ev else None)
                    history["test_loss"].append(test_ev.loss if test_ev else None)
                    history["test_acc"].append(test_ev.acc if test_ev else None)
                    if show:
                        epochs_bar.set_postfix(loss=f"{train_loss:.3f}", val_acc=f"{val_ev.acc:.3f}" if val_ev else "-")
                if task.analyse is not None and val_ev is not None and best_val.epoch == epoch:
                    analysis_state = _cpu_state(scored)  # the analyses run on the chosen epoch's weights
                if scheduler is not None:
                    if c.scheduler == "plateau":
                        if val_ev is not None:
                            scheduler.step(val_ev.acc)
                    else:
                        scheduler.step()
                stopping = epoch == stop_epoch - 1 and not last
                checkpoint_now = self.checkpoint_path is not None and (
                    stopping or (c.checkpoint_every and ((epoch + 1) % c.checkpoint_every == 0 or last))
                )
                if checkpoint_now and self.distributed:
                    # every rank's mixing generator and RNG state, so that a resumed run continues each stream
                    rank_states = _gather_objects({"objective": objective.state_dict(), "torch_rng": torch.get_rng_state()}, self.world_size)
                if checkpoint_now and is_main_process():
                    atomic_torch_save(
                        self.checkpoint_path,
                        {
                            "fingerprint": fingerprint,
                            "epoch": epoch,
                            "model": model.state_dict(),
                            "averaged": averaged.state_dict() if averaged is not None else None,
                            "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict() if scheduler is not None else None,
                            "objective": objective.state_dict(),
                            "best_val": best_val.state_dict(),
                            "best_test": best_test.state_dict(),
                            "analysis_state": analysis_state,
                            "history": history,
                            "torch_rng": torch.get_rng_state(),
                            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
                            "seconds": seconds_before + time.perf_counter() - start_time,
                            **({"rank_states": rank_states} if self.distributed else {}),
                        },
                    )
        epochs_bar.close()
        if stop_epoch < c.epochs:
            return None
        if final_test is None:  # resumed from the checkpoint of the last epoch
            final_test = self.evaluate(scored, test_batches)

        labels = final_test.labels
        protocols: Dict[str, Dict[str, Any]] = {}
        val_scores = None
        if best_val.epoch is not None:
            payload = best_val.payload
            if "test_prob" in payload:
                prob = payload["test_prob"]
            else:  # score the test set once, with the chosen epoch's weights
                scored.load_state_dict(payload["state"])
                prob = self.evaluate(scored, test_batches).prob
            protocols["validation"] = dict(task.metrics(labels, prob), epoch=best_val.epoch)
            val_scores = dict(task.metrics(payload["val_labels"], payload["val_prob"]), loss=-best_val.key[1])
        protocols["final"] = dict(task.metrics(labels, final_test.prob), epoch=c.epochs - 1)
        if best_test.epoch is not None:
            protocols["best_on_test"] = dict(task.metrics(labels, best_test.payload["test_prob"]), epoch=best_test.epoch)
        analyses = None
        if task.analyse is not None:
            chosen = c.epochs - 1
            if best_val.epoch is not None and analysis_state is not None:
                scored.load_state_dict(analysis_state)
                chosen = best_val.epoch
            scored.eval()
            context = AnalysisContext(device=self.device, seed=self.seed, epoch=chosen, autocast=self._autocast, config=c)
            analyses = {k: float(v) for k, v in task.analyse(scored, context).items()}
            analyses["epoch"] = chosen
        return {
            "seed": self.seed,
            "protocols": protocols,
            "val_scores": val_scores,
            "analyses": analyses,
            "train_size": len(train_set),
            "val_size": len(val_set) if val_set is not None else 0,
            "test_size": len(test_set),
            "seconds": seconds_before + time.perf_counter() - start_time,
            "resumed_at_epoch": resumed_at,  # None: trained in one go
            "history": history,
            "fingerprint": fingerprint,
            "processes": self.world_size,
        }


ALLOCATOR_ENV = "M3CO_CPU_ALLOCATOR"
_GLIBC_M_TRIM_THRESHOLD, _GLIBC_M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Let this process reuse freed CPU buffers instead of returning them to the OS (glibc only).

    A training step frees and reallocates the same activation and gradient buffers every step
    (up to 12 MB each for the ROSMAP model). With glibc's defaults a buffer above the mmap
    threshold is mapped and unmapped each time and every first touch of its pages faults, which
    costs more than the arithmetic of a small step. Raising the mmap threshold to its maximum
    (32 MiB) and the trim threshold to 1 GiB keeps such buffers in the heap; the numbers a run
    produces do not change. ``rosmap_bench.py --allocator-rounds K`` measures the effect on one
    training step. Set ``M3CO_CPU_ALLOCATOR=default`` to keep glibc's defaults. Returns whether
    the settings were applied (False without glibc's ``mallopt`` or when switched off).
    """
    if os.environ.get(ALLOCATOR_ENV, "tuned") == "default":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_GLIBC_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_GLIBC_M_TRIM_THRESHOLD, 1 << 30))


def _cpu_state(model: nn.Module) -> Dict[str, Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def train_seed(task: Task, config: TrainConfig, seed: int, *, checkpoint_path: Optional[Union[str, Path]] = None, progress_position: int = 0) -> Dict[str, Any]:
    """Train and score one seed; returns its per-seed record (protocols, history, seconds)."""
    path = Path(checkpoint_path) if checkpoint_path is not None else None
    return (task.trainer or Trainer)(task, config, seed, checkpoint_path=path, progress_position=progress_position).fit()


# ----------------------------------------------------------------------------- several seeds


@dataclass(frozen=True)
class SeedPiece:
    """Epochs ``[start, stop)`` of the ``index``-th seed, planned on ``worker`` from time ``begin`` (in epochs)."""

    index: int
    start: int
    stop: int
    worker: int
    begin: int


def plan_seed_pieces(num_seeds: int, epochs: int, workers: int) -> List[SeedPiece]:
    """Share ``num_seeds`` runs of ``epochs`` epochs between ``workers`` so that all finish together.

    McNaughton's wrap-around rule: lay the seeds end to end on a line of ``num_seeds * epochs``
    epochs and cut it into ``workers`` equal lengths (rounded to whole epochs), one per worker.
    A seed cut in two runs its first epochs at the start of the next worker's share and its
    last epochs at the end of this worker's share; as no seed is longer than a share, the two
    pieces never overlap in time. Five seeds on two workers thus take 2.5 seed-times instead of
    the three of whole seeds. Pieces are returned in planned starting order.
    """
    if num_seeds < 1 or epochs < 1 or workers < 1:
        raise ValueError(f"num_seeds, epochs and workers must be >= 1; got {num_seeds}, {epochs}, {workers}")
    workers = min(workers, num_seeds)  # a share is then at least one seed long
    total = num_seeds * epochs
    cuts = [round(w * total / workers) for w in range(workers + 1)]
    pieces = []
    for index in range(num_seeds):
        lo, hi = index * epochs, (index + 1) * epochs
        for w in range(workers):
            a, b = max(lo, cuts[w]), min(hi, cuts[w + 1])
            if a >= b:
                continue
            if lo < cuts[w]:  # across the cut at this share's start: this part runs at time 0, so it trains the first epochs
                pieces.append(SeedPiece(index, 0, b - a, w, 0))
            elif hi > cuts[w + 1]:  # across the cut at this share's end: this part runs last, so it trains the last epochs
                pieces.append(SeedPiece(index, epochs - (b - a), epochs, w, a - cuts[w]))
            else:
                pieces.append(SeedPiece(index, 0, epochs, w, a - cuts[w]))
    return sorted(pieces, key=lambda p: (p.begin, p.worker))


def _worker_piece(task: Task, config: TrainConfig, seed: int, start: int, stop: int, checkpoint_path, seed_file) -> Optional[Dict[str, Any]]:
    if start > 0:  # the seed's head ran in a piece before this one and left its checkpoint
        config = dataclasses.replace(config, resume=True)
    trainer = (task.trainer or Trainer)(task, config, seed, checkpoint_path=Path(checkpoint_path) if checkpoint_path is not None else None)
    record = trainer.fit(stop_epoch=stop if stop < config.epochs else None)
    if record is not None:
        atomic_write_json(seed_file, record)
    return record


def run(
    task: Task,
    config: TrainConfig,
    seeds: Sequence[int],
    output_dir: Union[str, Path],
    *,
    workers: int = 1,
    write: bool = True,
) -> Dict[str, Any]:
    """Train every seed, summarise the protocols and write the results (rank 0 only).

    ``workers > 1`` trains seeds in that many spawned processes. On the CPU each seed runs with
    ``config.threads`` threads (default 1, so that a seed's numbers do not depend on the number
    of workers; MKL's results change with the thread count). When the seeds do not divide
    evenly between the workers, some seeds are cut in two (:func:`plan_seed_pieces`): one worker
    trains the first epochs and writes a checkpoint, another resumes from it, which gives the
    numbers of the uninterrupted run. A seed whose record is already in ``output_dir/seeds``
    with the same configuration fingerprint is not trained again, and the results summarise
    every such record in the folder (those of earlier runs too), in seed order.

    The run holds the folder's :class:`RunLock` while it writes there: a second run into the
    same folder fails at once with :class:`OutputFolderBusy`. A corrupt seed record or
    checkpoint raises :class:`CorruptFileError`; with ``config.set_aside_corrupt`` it is renamed
    (:func:`set_aside`) and its seed trained afresh.
    """
    config.validate()
    if not seeds:
        raise ConfigError("seeds must name at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds must be distinct; got {list(seeds)}")
    if any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0 for s in seeds):
        raise ConfigError(f"seeds must be integers >= 0; got {list(seeds)}")
    if workers < 1:
        raise ConfigError(f"workers must be >= 1; got {workers}")
    if config.distributed and workers != 1:
        raise ConfigError(f"workers must be 1 with distributed training (the ranks train one seed at a time); got {workers}")
    if config.holdout and task.val is None and task.train_labels is not None:
        check_holdout(task.train_labels, config.holdout)  # before any training, not deep inside the first seed
    if isinstance(output_dir, str) and not output_dir.strip():
        raise ConfigError("output_dir must name a folder; got an empty path")
    output_dir = Path(output_dir)
    if not (write and is_main_process()):
        return _run_in_folder(task, config, seeds, output_dir, workers=workers, write=write)
    try:  # a path that cannot be a folder fails now, not after the training
        output_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ConfigError(f"output_dir {output_dir} is a file (or lies under one), not a folder") from None
    with RunLock(output_dir) as lock:
        for folder in (output_dir, output_dir / "seeds", output_dir / "checkpoints"):
            remove_stale_temporaries(folder, lock=lock)  # left by a run that was killed while writing
        return _run_in_folder(task, config, seeds, output_dir, workers=workers, write=write)


def finished_seeds(seed_dir: Path, fingerprint: str, *, on_corrupt: str = "raise") -> Tuple[Dict[int, Dict[str, Any]], List[str]]:
    """The records in ``seed_dir`` of seeds finished with this ``fingerprint``, by seed, and the
    names of the records of another configuration or data (kept, not summarised).

    A corrupt record raises :class:`CorruptFileError` (``on_corrupt="raise"``), is renamed by
    :func:`set_aside` (``"set_aside"``, only while holding the folder's lock) or passed over
    (``"skip"``); its seed then counts as not finished.
    """
    if on_corrupt not in ("raise", "set_aside", "skip"):
        raise ValueError(f"on_corrupt must be 'raise', 'set_aside' or 'skip'; got {on_corrupt!r}")
    records: Dict[int, Dict[str, Any]] = {}
    others: List[str] = []
    for path in sorted(seed_dir.glob("seed*.json")) if seed_dir.is_dir() else ():
        seed = seed_of_record_file(path)
        if seed is None:
            continue
        try:
            record = load_seed_record(path)
        except CorruptFileError:
            if on_corrupt == "raise":
                raise
            if on_corrupt == "skip":
                continue
            print(f"set aside the corrupt seed record {path} as {set_aside(path).name}; seed {seed} counts as not trained", flush=True)
            continue
        if record["fingerprint"] == fingerprint:
            records[seed] = record
        else:
            others.append(path.name)
    return records, others


def _run_in_folder(task: Task, config: TrainConfig, seeds: Sequence[int], output_dir: Path, *, workers: int, write: bool) -> Dict[str, Any]:
    seed_dir = output_dir / "seeds"
    ckpt_dir = output_dir / "checkpoints"
    fingerprint = run_fingerprint(task, config)
    start = time.perf_counter()
    records: Dict[int, Dict[str, Any]] = {}  # the finished seeds of this configuration, in the folder or trained now
    others: List[str] = []
    if is_main_process():  # rank 0's view decides for every rank (below)
        # only the lock's holder renames a corrupt record; a run that writes nothing passes it over
        on_corrupt = ("set_aside" if write else "skip") if config.set_aside_corrupt else "raise"
        records, others = finished_seeds(seed_dir, fingerprint, on_corrupt=on_corrupt)
    todo = [seed for seed in seeds if seed not in records]
    if config.distributed and dist_utils.world_size() > 1:
        # rank 0's view of the finished seeds decides for every rank (ranks must train the same seeds)
        shared = [todo, records]
        torch.distributed.broadcast_object_list(shared, src=0)
        todo, records = shared
    workers = min(workers, max(1, len(todo)))
    if config.threads is None and torch.device(config.device).type == "cpu":
        # one thread per seed: a seed's numbers then do not depend on how many run in parallel
        config = dataclasses.replace(config, threads=1)
    def ckpt(seed: int) -> Optional[Path]:
        # --resume continues from a checkpoint that is there even when no new ones are asked for
        path = ckpt_dir / f"seed{seed}.pt"
        return path if config.checkpoint_every or (config.resume and path.exists()) else None

    if workers == 1:
        for seed in todo:
            record = train_seed(task, config, seed, checkpoint_path=ckpt(seed))
            if write and is_main_process():
                atomic_write_json(seed_dir / f"seed{seed}.json", record)
            records[seed] = record
    else:
        from tqdm.auto import tqdm

        quiet = dataclasses.replace(config, progress=False)
        pieces = plan_seed_pieces(len(todo), config.epochs, workers)
        # a seed that is cut in two hands over through a checkpoint, written even without checkpoint_every
        handoff = {todo[p.index] for p in pieces if p.stop < config.epochs}

        def path(seed: int) -> Optional[Path]:
            return ckpt_dir / f"seed{seed}.pt" if seed in handoff else ckpt(seed)

        context = multiprocessing.get_context("spawn")
        bar = tqdm(total=len(todo), desc=f"{task.name} {config.method}: seeds", disable=not config.progress, leave=False)
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:

            def submit(piece: SeedPiece):
                seed = todo[piece.index]
                seed_file = seed_dir / f"seed{seed}.json"
                return pool.submit(_worker_piece, task, quiet, seed, piece.start, piece.stop, path(seed), seed_file)

            # the pool starts pieces in the order they are submitted: the planned order, each seed's
            # second piece once its first has finished (it is planned last on its worker)
            running = {submit(p): p for p in pieces if p.start == 0}
            waiting = {p.index: p for p in pieces if p.start > 0}
            while running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    piece = running.pop(future)
                    record = future.result()
                    if record is None:  # a seed's first piece: its checkpoint is written
                        rest = waiting.pop(piece.index)
                        running[submit(rest)] = rest
                        continue
                    records[todo[piece.index]] = record
                    bar.update()
        bar.close()
        if config.checkpoint_every == 0:
            for seed in handoff:
                (ckpt_dir / f"seed{seed}.pt").unlink(missing_ok=True)
    per_seed = [records[s] for s in sorted(records)]  # every finished seed in the folder, not only this call's
    results = summarise(task, config, per_seed, seconds=time.perf_counter() - start)
    results["workers"] = workers  # the processes that trained this call's seeds
    results["data_id"] = task.data_id
    if others:
        results["ignored_seed_records"] = others  # of another configuration or data
    if write and is_main_process():
        write_results(task, results, per_seed, output_dir)
    return results


def mean_and_std(values: Sequence[float]) -> Dict[str, Optional[float]]:
    """``{"mean", "std"}`` over seeds: the sample std (ddof=1), None for a single value."""
    values = np.asarray(values, dtype=np.float64)
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else None}


def best_common_epoch(per_seed: Sequence[Mapping[str, Any]]) -> Optional[Dict[str, Any]]:
    """One epoch for every seed, the one with the best mean test accuracy: ``{"epoch", "acc"}``.

    Optimistic like ``best_on_test`` (the epoch is chosen on the test set), but it cannot pick a
    different lucky epoch for each seed; it bounds from above any rule that fixes one epoch count
    for all seeds (e.g. an epoch count chosen on held-out data, then trained on all the data).
    None when the seeds' histories do not share their scored epochs."""
    histories = [r.get("history") for r in per_seed]
    if not histories or any(h is None for h in histories) or any(h["epoch"] != histories[0]["epoch"] for h in histories):
        return None
    scored = [i for i in range(len(histories[0]["epoch"])) if all(h["test_acc"][i] is not None for h in histories)]
    if not scored:
        return None
    acc = np.array([[h["test_acc"][i] for i in scored] for h in histories], dtype=np.float64)
    best = int(np.argmax(acc.mean(axis=0)))  # the earliest among ties
    return {"epoch": int(histories[0]["epoch"][scored[best]]), "acc": mean_and_std(acc[:, best])}


def summarise(task: Task, config: TrainConfig, per_seed: Sequence[Mapping[str, Any]], *, seconds: float) -> Dict[str, Any]:
    """The results.json record: mean and sample std (ddof=1; null for one seed) per protocol and metric."""
    protocols: Dict[str, Dict[str, Dict[str, Optional[float]]]] = {}
    for name in PROTOCOLS:
        rows = [r["protocols"][name] for r in per_seed if name in r["protocols"]]
        if len(rows) != len(per_seed):
            continue
        protocols[name] = {}
        for metric in task.metric_labels:
            protocols[name][metric] = mean_and_std([row[metric] for row in rows])
        protocols[name]["epoch"] = mean_and_std([row["epoch"] for row in rows])
    val_scores = None
    if all(r.get("val_scores") for r in per_seed):
        keys = [k for k in per_seed[0]["val_scores"] if all(k in r["val_scores"] for r in per_seed)]
        val_scores = {}
        for k in keys:
            val_scores[k] = mean_and_std([r["val_scores"][k] for r in per_seed])
    analyses = None
    if per_seed and all(r.get("analyses") for r in per_seed):
        analyses = {}
        for k in per_seed[0]["analyses"]:
            if all(k in r["analyses"] for r in per_seed):
                analyses[k] = mean_and_std([r["analyses"][k] for r in per_seed])
    return {
        "dataset": task.name,
        "method": config.method,
        "convention": config.convention,
        "seeds": [int(r["seed"]) for r in per_seed],
        "protocols": protocols,
        "optimistic_protocols": ["best_on_test"],
        "best_common_epoch": best_common_epoch(per_seed),
        "val_scores": val_scores,
        **({"analyses": analyses} if analyses is not None else {}),
        "per_seed": [
            {k: r[k] for k in ("seed", "protocols", "val_scores", "analyses", "seconds", "train_size", "val_size", "test_size") if k in r}
            for r in per_seed
        ],
        "seconds": seconds,
        "config": config.as_dict(),
        "published": {label: {m: list(v) for m, v in row.items()} for label, row in task.published.items()},
        "notes": list(task.notes),
    }


def format_percent(stat: Optional[Mapping[str, Optional[float]]]) -> str:
    """A ``{"mean", "std"}`` fraction as ``"mean ± std"`` in percent (``"-"`` when missing)."""
    if stat is None:
        return "-"
    if stat["std"] is None:
        return f"{100 * stat['mean']:.1f}"
    # a std below 0.05 points would print as 0.0: give it two decimals
    return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.{2 if 0 < 100 * stat['std'] < 0.05 else 1}f}"


def results_markdown(task: Task, results: Mapping[str, Any]) -> str:
    """A Markdown table of the protocols beside the published numbers (percent)."""
    metrics = list(task.metric_labels)
    head = "| protocol | " + " | ".join(task.metric_labels[m] for m in metrics) + " | epoch |"
    lines = [
        f"# {task.name}: {results['method']} (convention {results['convention']})",
        "",
        f"Seeds {results['seeds']}; mean ± sample std (ddof=1) over seeds, in percent; "
        f"{results['seconds']:.0f} s in all.",
        "",
        head,
        "|" + " --- |" * (len(metrics) + 2),
    ]
    for name in PROTOCOLS:
        if name not in results["protocols"]:
            continue
        row = results["protocols"][name]
        epoch = row["epoch"]
        lines.append(f"| {PROTOCOL_LABELS[name]} | " + " | ".join(format_percent(row.get(m)) for m in metrics) + f" | {epoch['mean']:.0f} |")
    for label, row in task.published.items():
        cells = []
        for m in metrics:
            if m not in row:
                cells.append("-")
            else:
                mean, std = row[m]
                cells.append(format_percent({"mean": mean, "std": std}))
        lines.append(f"| {label} | " + " | ".join(cells) + " | - |")
    if results.get("val_scores"):
        scores = []
        for k, v in results["val_scores"].items():
            scores.append(f"CE {v['mean']:.3f}" if k == "loss" else f"{task.metric_labels.get(k, k)} {format_percent(v)}")
        lines += ["", "Held-out validation scores at the chosen epochs: " + ", ".join(scores) + "."]
    honest = (
        " `validation` is the honest figure."
        if "validation" in results["protocols"]
        else " this run held no validation split out (`--holdout 0`), so it has no honest figure."
    )
    lines += ["", "`best on test` picks the epoch by its test score, so it is an optimistic upper bound, not an estimate;" + honest]
    common = results.get("best_common_epoch")
    if common:
        lines += [
            "",
            f"Best common epoch (optimistic): one epoch for every seed, chosen on the mean test accuracy: epoch {common['epoch']},"
            f" ACC {format_percent(common['acc'])}. It bounds any rule that fixes one epoch count for all seeds.",
        ]
    if results.get("analyses"):
        lines += ["", "Analyses on the weights of the epoch chosen by the validation protocol (percent):", "", "| analysis | value |", "| --- | --- |"]
        for key, stat in results["analyses"].items():
            if key != "epoch":
                lines.append(f"| {task.analysis_labels.get(key, key)} | {format_percent(stat)} |")
    if task.notes:
        lines += [""] + [f"- {note}" for note in task.notes]
    return "\n".join(lines) + "\n"


def plot_curves(per_seed: Sequence[Mapping[str, Any]], path: Union[str, Path], *, title: str = "") -> Path:
    """Training loss and validation/test loss and accuracy per epoch, averaged over seeds (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    epochs = np.array(per_seed[0]["history"]["epoch"])  # 0-based, as the chosen epochs in results.json

    def mean_curve(key):
        # the epochs at which every seed has a value (the test set may be scored less often)
        rows = np.array([[np.nan if v is None else v for v in r["history"][key]] for r in per_seed], dtype=np.float64)
        keep = ~np.isnan(rows).any(axis=0)
        return epochs[keep], rows[:, keep].mean(axis=0)

    for key, label, style in (("train_loss", "train (objective)", "-"), ("val_loss", "validation CE", "-"), ("test_loss", "test CE", ":")):
        x, curve = mean_curve(key)
        if len(x):
            ax_loss.plot(x, curve, style, label=label)
    for key, label, style in (("val_acc", "validation", "-"), ("test_acc", "test", ":")):
        x, curve = mean_curve(key)
        if len(x):
            ax_acc.plot(x, curve, style, label=label)
    ax_loss.set(xlabel="epoch (from 0)", ylabel="loss", yscale="log", title="loss")
    ax_acc.set(xlabel="epoch (from 0)", ylabel="accuracy", title="accuracy (fusion head)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title + f" (mean of {len(per_seed)} seed{'s' if len(per_seed) > 1 else ''})")
    fig.tight_layout()
    path = Path(path)
    _atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=110), binary=True)
    plt.close(fig)
    return path


def write_results(task: Task, results: Mapping[str, Any], per_seed: Sequence[Mapping[str, Any]], output_dir: Union[str, Path]) -> None:
    output_dir = Path(output_dir)
    atomic_write_json(output_dir / "results.json", results)
    atomic_write_text(output_dir / "results.md", results_markdown(task, results))
    plot_curves(per_seed, output_dir / "curves.png", title=f"{task.name} {results['method']} ({results['convention']})")


# ----------------------------------------------------------------------------- command line


def _int_at_least(low: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise ValueError(text)
        return value

    parse.__name__ = f"integer >= {low}"  # argparse names the type in its message
    return parse


def dropout_rate(text: str) -> float:
    """An argparse type: a dropout probability in [0, 1)."""
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1); got {text}")
    return value


def output_folder(text: str) -> Path:
    """An argparse type: a folder path, not empty (``""`` would write into the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must name a folder; got an empty path")
    return Path(text)


PASSTHROUGH_EPILOG = "Every other option (--seeds, --epochs, --convention, --holdout, --workers, ...) is passed to each run of {script}; see its --help."


def add_arguments(parser, defaults: TrainConfig) -> None:
    """The options every pipeline shares, with the pipeline's defaults."""
    d = defaults
    parser.add_argument("--seeds", type=_int_at_least(0), nargs="+", default=[0, 1, 2, 3, 4], help="seeds to train (default: 0 1 2 3 4)")
    parser.add_argument("--method", choices=sorted(METHODS), default=d.method, help="training objective (default: %(default)s)")
    parser.add_argument("--convention", choices=CONVENTIONS, default=d.convention, help="paper or released-code conventions (default: %(default)s)")
    parser.add_argument("--output-dir", type=output_folder, required=True, help="where results.json, results.md and curves.png go")
    parser.add_argument("--epochs", type=int, default=d.epochs, help="default: %(default)s")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="default: %(default)s (None = full batch)")
    parser.add_argument("--accumulate", type=int, default=d.accumulate, help="micro-batches per optimiser step")
    parser.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate (default: %(default)s)")
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay, help="default: %(default)s")
    parser.add_argument("--scheduler", choices=SCHEDULERS, default=d.scheduler, help="default: %(default)s")
    parser.add_argument("--step-size", type=int, default=None, help="StepLR step in epochs (default: the convention's)")
    parser.add_argument("--gamma", type=float, default=d.gamma, help="StepLR factor (default: %(default)s)")
    parser.add_argument("--beta", type=float, default=d.beta, help="weight of the contrastive term (default: %(default)s)")
    parser.add_argument("--alpha", type=float, default=d.alpha, help="Beta(alpha, alpha) of mixup (default: %(default)s)")
    parser.add_argument("--mix-prob", type=float, default=d.mix_prob, help="share of rows mixed (default: the convention's)")
    parser.add_argument("--holdout", type=float, default=d.holdout, help="stratified share (or count) of train held out for the validation protocol; 0: none (default: %(default)s)")
    parser.add_argument("--eval-every", type=int, default=d.eval_every, help="epochs between validation scores (default: %(default)s)")
    parser.add_argument("--test-every", type=int, default=d.test_every, help="epochs between test scores, for best_on_test and the curves (default: %(default)s; 0: last epoch only)")
    parser.add_argument("--device", default=d.device, help="default: %(default)s")
    parser.add_argument("--ema-decay", type=float, default=d.ema_decay, help="score an exponential moving average of the weights with this decay per step (default: none)")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CUDA)")
    parser.add_argument(
        "--compile",
        nargs="?",
        const="inductor",
        default=None,
        metavar="BACKEND",
        help="torch.compile the training step (model and loss) with this backend (default when given: inductor); "
        "the numbers match eager mode to rounding, not bit for bit",
    )
    parser.add_argument("--workers", type=_int_at_least(1), default=None, help="seeds trained in parallel processes (default: min(seeds, cores))")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per seed on the CPU (default: 1)")
    parser.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="epochs between checkpoints (0: none)")
    parser.add_argument("--resume", action="store_true", help="continue from the seeds' checkpoints")
    parser.add_argument(
        "--set-aside-corrupt",
        action="store_true",
        help="rename a corrupt checkpoint or seed record to NAME.corrupt-<time> (never deleted) and train that seed afresh, "
        "instead of stopping with an error naming it",
    )
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="run as one of the processes that torchrun starts (torchrun --nproc_per_node K ... --distributed): "
        "each global batch (--batch-size) is split over them, DDP averages gradients, only rank 0 writes",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def config_from_args(args, defaults: TrainConfig, *, step_sizes: Optional[Mapping[str, int]] = None) -> TrainConfig:
    """A :class:`TrainConfig` from parsed :func:`add_arguments` options."""
    step = args.step_size
    if step is None:
        step = (step_sizes or {}).get(args.convention, defaults.step_size)
    holdout = args.holdout
    holdout = int(holdout) if holdout >= 1 and float(holdout).is_integer() else holdout
    return dataclasses.replace(
        defaults,
        method=args.method,
        convention=args.convention,
        epochs=args.epochs,
        batch_size=args.batch_size,
        accumulate=args.accumulate,
        lr=args.lr,
        weight_decay=args.weight_decay,
        scheduler=args.scheduler,
        step_size=step,
        gamma=args.gamma,
        beta=args.beta,
        alpha=args.alpha,
        mix_prob=args.mix_prob,
        holdout=holdout,
        eval_every=args.eval_every,
        test_every=args.test_every,
        device=args.device,
        ema_decay=args.ema_decay,
        bf16=args.bf16,
        compile=args.compile,
        threads=args.threads,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        set_aside_corrupt=args.set_aside_corrupt,
        progress=not args.no_progress,
        distributed=args.distributed,
    ).validate()


def launch(task: "Task", config: TrainConfig, seeds: Sequence[int], output_dir: Union[str, Path], *, workers: Optional[int] = None) -> Optional[Dict[str, Any]]:
    """What a pipeline's ``main`` runs: :func:`run` with the process group of ``--distributed``.

    With ``config.distributed`` it joins the torchrun process group, trains the seeds one at a
    time on all ranks and leaves the group; otherwise ``workers`` seeds train in parallel
    processes (default :func:`default_workers`). Prints the results table on the main process
    and returns the results there, None on the other ranks.
    """
    if config.distributed:
        if workers not in (None, 1):
            raise SystemExit("--workers trains seeds in parallel processes and cannot combine with --distributed (the ranks train one seed at a time)")
        init_distributed(config.device)
        workers = 1
    else:
        workers = workers or default_workers(len(seeds), config.device)
    try:
        results = run(task, config, seeds, output_dir, workers=workers)
        main_process = is_main_process()  # asked before leaving the process group
    except (ConfigError, CorruptFileError, OutputFolderBusy) as err:
        raise SystemExit(f"{task.name}: {err}") from None
    finally:
        shutdown_distributed()
    if not main_process:
        return None
    print(results_markdown(task, results))
    print(f"wrote {Path(output_dir) / 'results.json'}, results.md and curves.png ({results['seconds']:.1f} s)", flush=True)
    return results


def default_workers(num_seeds: int, device: str) -> int:
    """Seeds in parallel: one process per core on the CPU, one process on an accelerator."""
    if torch.device(device).type != "cpu":
        return 1
    return max(1, min(num_seeds, os.cpu_count() or 1))
