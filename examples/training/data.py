"""Datasets and batches: in-memory multimodal tensors, the per-epoch batch sampler, the hold-out."""

from __future__ import annotations

import math
from typing import Any, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from training.config import ConfigError

__all__ = ["move_to", "TensorMultimodalDataset", "EpochBatchSampler", "Batches", "check_holdout", "stratified_holdout"]


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


class Batches:
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

