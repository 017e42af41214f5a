"""One seed's training run: :class:`Trainer` (the epoch loop and the protocols) and :func:`train_seed`.

Every run is scored under three protocols (:data:`~training.config.PROTOCOLS`): ``validation``
(a stratified part of the training set is held out, the epoch is chosen on it, and the test set
is scored with that epoch's weights), ``final`` (the last epoch) and ``best_on_test`` (the best
test score over the epochs: optimistic, since it selects on the test set).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import Dataset

import m3co_loss
from m3co_loss import distributed as dist_utils
from training.checkpoint import Evaluation, RunState, check_fingerprint, cpu_state, read_checkpoint, restore, save_checkpoint, unresumed_checkpoint
from training.config import ConfigError, Task, TrainConfig, run_fingerprint
from training.cputune import keep_freed_memory
from training.data import Batches, EpochBatchSampler, TensorMultimodalDataset, move_to, stratified_holdout
from training.distributed import gather_objects, is_main_process, rank_device
from training.io import CHECKPOINT_KEYS
from training.model import MultimodalClassifier
from training.objective import Objective, TrainStep

__all__ = ["AnalysisContext", "Trainer", "train_seed", "PLATEAU_NEEDS_VALIDATION"]

PLATEAU_NEEDS_VALIDATION = "--scheduler plateau steps on validation accuracy and needs a validation split: --holdout > 0"


@dataclass
class AnalysisContext:
    """What :attr:`Task.analyse` gets besides the model (already in eval mode, on ``device``)."""

    device: torch.device
    seed: int
    epoch: int  # the epoch whose weights the model holds
    autocast: Callable[[], Any]  # a context manager factory: bfloat16 autocast when the run uses it
    config: TrainConfig


@dataclass
class SplitBatches:
    """A seed's data: the training batches (and their sampler), the validation and test batches."""

    sampler: EpochBatchSampler
    train: Batches
    val: Optional[Batches]
    test: Batches
    sizes: Tuple[int, int, int]  # rows of the train, validation and test splits


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
            raise ConfigError(f"bf16 autocast (--bf16) is meant for CUDA devices; got device {config.device!r}")

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

    def autocast(self):
        """bfloat16 autocast when the run asks for it, else a no-op context."""
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

    def prepare_data(self, dataset: Dataset) -> Dataset:
        """An in-memory dataset moved to the run's device once; other datasets as they are."""
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
    def evaluate(self, model: MultimodalClassifier, batches: Batches) -> Evaluation:
        """Fused-head probabilities, mean cross-entropy and accuracy on one split."""
        model.eval()
        probs, labels = [], []
        for inputs, y in batches:
            inputs, y = move_to(inputs, self.device), y.to(self.device)
            with self.autocast():
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
        exactly where it stopped (:func:`~training.seeds.run` hands seeds between workers this way).
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
            return self.train_epochs(self.config.epochs if stop_epoch is None else stop_epoch)
        finally:
            torch.set_num_threads(threads)

    def batches(self) -> SplitBatches:
        """The seed's splits (the hold-out drawn with the seed) as batches on the run's device."""
        c, task = self.config, self.task
        train_set, val_set = self._split()
        train_set, test_set = self.prepare_data(train_set), self.prepare_data(task.test)
        val_set = self.prepare_data(val_set) if val_set is not None else None
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

        def eval_batches(ds):
            s = EpochBatchSampler(len(ds), c.eval_batch_size or c.batch_size, shuffle=False, rank=self.rank, world_size=self.world_size, pad=False)
            return Batches(ds, s, **loader_options)

        return SplitBatches(
            sampler=sampler,
            train=Batches(train_set, sampler, **loader_options),
            val=eval_batches(val_set) if val_set is not None else None,
            test=eval_batches(test_set),
            sizes=(len(train_set), len(val_set) if val_set is not None else 0, len(test_set)),
        )

    def build_run(self, has_validation: bool) -> Tuple[RunState, nn.Module]:
        """A fresh run (model, optimiser, scheduler, objective, EMA) and the training step to call."""
        c, task = self.config, self.task
        model = self.task.build_model().to(self.device)
        optimizer = self.build_optimizer(model)
        scheduler = self._scheduler(optimizer)
        averaged = None
        if c.ema_decay is not None:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(c.ema_decay), use_buffers=True)
        if c.scheduler == "plateau" and not has_validation:
            raise ConfigError(PLATEAU_NEEDS_VALIDATION)
        objective = Objective.from_config(
            c,
            num_modalities=model.num_modalities,
            num_classes=task.num_classes,
            # each rank draws its own mixing plans; rank 0 draws those of a single process
            seed=self.seed + 1_000_003 * self.rank,
            distributed=self.distributed,
        )
        step: nn.Module = TrainStep(model, objective)
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
        return RunState(model=model, optimizer=optimizer, objective=objective, scheduler=scheduler, averaged=averaged), step

    def saved_run(self, fingerprint: str, *, required: Mapping[str, Any] = CHECKPOINT_KEYS) -> Optional[Dict[str, Any]]:
        """The seed's checkpoint to resume from, or None (no ``resume``, no checkpoint, or a corrupt
        one set aside with ``set_aside_corrupt``). ``required``: the entries it must hold.

        Without ``resume``, a checkpoint of this configuration raises :class:`ConfigError`: the
        run would start afresh and overwrite it. With it, a checkpoint of another configuration
        raises :class:`ConfigError` and a corrupt one :class:`CorruptFileError`.
        """
        path = self.checkpoint_path
        if path is None:
            return None
        if not self.config.resume:
            refused = unresumed_checkpoint(path, fingerprint, self.seed)
            if refused:
                raise ConfigError(refused)
            return None
        if not path.exists():
            return None
        saved = read_checkpoint(path, device=self.device, seed=self.seed, set_aside_corrupt=self.config.set_aside_corrupt, required=required)
        if saved is not None:
            check_fingerprint(saved, fingerprint, path)
        return saved

    def resume(self, run: RunState, fingerprint: str) -> None:
        """Continue ``run`` from the seed's checkpoint when ``resume`` is set and one is there (:meth:`saved_run`)."""
        saved = self.saved_run(fingerprint)
        if saved is not None:
            restore(run, saved, path=self.checkpoint_path, fingerprint=fingerprint, device=self.device, rank=self.rank, world_size=self.world_size, distributed=self.distributed)

    def checkpoint(self, run: RunState, epoch: int, *, fingerprint: str, start_time: float) -> None:
        """Write the run after ``epoch`` (every rank calls it; rank 0 writes)."""
        rank_states = None
        if self.distributed:
            # every rank's mixing generator and RNG state, so that a resumed run continues each stream
            rank_states = gather_objects({"objective": run.objective.state_dict(), "torch_rng": torch.get_rng_state()}, self.world_size)
        if is_main_process():
            save_checkpoint(self.checkpoint_path, run, epoch=epoch, fingerprint=fingerprint, device=self.device, start_time=start_time, rank_states=rank_states)

    def checkpoint_due(self, epoch: int, stop_epoch: int) -> bool:
        """Whether a checkpoint is written after ``epoch``: every ``checkpoint_every``, the last, and where the run stops."""
        c = self.config
        last = epoch == c.epochs - 1
        stopping = epoch == stop_epoch - 1 and not last
        return self.checkpoint_path is not None and bool(stopping or (c.checkpoint_every and ((epoch + 1) % c.checkpoint_every == 0 or last)))

    def train_epoch(self, run: RunState, step: nn.Module, data: SplitBatches, epoch: int, progress_bar) -> float:
        """One epoch of optimiser steps (``accumulate`` micro-batches each); returns the mean training loss."""
        c = self.config
        data.sampler.set_epoch(epoch)
        run.model.train()
        loss_sum = torch.zeros((), device=self.device)
        run.optimizer.zero_grad(set_to_none=True)
        steps_per_epoch = len(data.train)
        batch_iter = data.train
        if progress_bar is not None and steps_per_epoch > 1:
            batch_iter = progress_bar(data.train, total=steps_per_epoch, leave=False, desc=f"epoch {epoch}", position=self.progress_position + 1, dynamic_ncols=True)
        for i, (inputs, y) in enumerate(batch_iter):
            inputs, y = move_to(inputs, self.device), y.to(self.device)
            group_start = i - i % c.accumulate
            group_size = min(c.accumulate, steps_per_epoch - group_start)
            # DDP averages gradients at the last micro-batch of an accumulation group only
            last_of_group = i - group_start == group_size - 1
            sync = step.no_sync() if self.distributed and not last_of_group else contextlib.nullcontext()
            with sync:
                with self.autocast():
                    loss, _ = step(inputs, y)
                (loss / group_size).backward()
            loss_sum += loss.detach()
            if last_of_group:
                if c.grad_clip is not None:
                    nn.utils.clip_grad_norm_(run.model.parameters(), c.grad_clip)
                run.optimizer.step()
                run.optimizer.zero_grad(set_to_none=True)
                if run.averaged is not None:
                    run.averaged.update_parameters(run.model)
        run.objective.epoch_end()
        train_loss = self.reduce_mean(loss_sum / steps_per_epoch).item()
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"{self.task.name} {c.method} seed {self.seed}: the training loss is {train_loss} at epoch {epoch}")
        return train_loss

    def score_epoch(self, run: RunState, data: SplitBatches, epoch: int, train_loss: float) -> Tuple[Optional[Evaluation], Optional[Evaluation]]:
        """Score the splits due after ``epoch``, offer them to the protocols and log the history."""
        c, scored = self.config, run.scored
        val_ev = self.evaluate(scored, data.val) if data.val is not None and c.validation_due(epoch) else None
        test_ev = self.evaluate(scored, data.test) if c.test_due(epoch) else None
        if val_ev is not None:
            # the test probabilities of the chosen epoch's weights: at hand when the test set
            # was scored this epoch; otherwise keep the weights and score the test set at the end
            run.best_val.offer(
                epoch,
                val_ev,
                lambda: {"val_prob": val_ev.prob, "val_labels": val_ev.labels, "test_prob": test_ev.prob}
                if test_ev is not None
                else {"val_prob": val_ev.prob, "val_labels": val_ev.labels, "state": cpu_state(scored)},
            )
        if test_ev is not None and c.on_test_grid(epoch):
            run.best_test.offer(epoch, test_ev, lambda: {"test_prob": test_ev.prob})
        if val_ev is not None or test_ev is not None:
            for key, value in (
                ("epoch", epoch),
                ("lr", run.optimizer.param_groups[0]["lr"]),
                ("train_loss", train_loss),
                ("val_loss", val_ev.loss if val_ev else None),
                ("val_acc", val_ev.acc if val_ev else None),
                ("test_loss", test_ev.loss if test_ev else None),
                ("test_acc", test_ev.acc if test_ev else None),
            ):
                run.history[key].append(value)
        if self.task.analyse is not None and val_ev is not None and run.best_val.epoch == epoch:
            run.analysis_state = cpu_state(scored)  # the analyses run on the chosen epoch's weights
        if run.scheduler is not None:
            if c.scheduler == "plateau":
                if val_ev is not None:
                    run.scheduler.step(val_ev.acc)
            else:
                run.scheduler.step()
        return val_ev, test_ev

    def train_epochs(self, stop_epoch: int) -> Optional[Dict[str, Any]]:
        """Train epochs up to ``stop_epoch - 1`` (resuming when asked); the record after the last epoch, else None.

        A subclass with another loop (``Task.trainer``) overrides this method.
        """
        c, task = self.config, self.task
        fingerprint = run_fingerprint(task, c)  # of this seed's checkpoint and record
        start_time = time.perf_counter()
        torch.manual_seed(self.seed)
        data = self.batches()
        run, step = self.build_run(data.val is not None)
        self.resume(run, fingerprint)

        from tqdm.auto import tqdm

        show = c.progress and is_main_process()
        epochs_bar = tqdm(
            range(run.start_epoch, stop_epoch),
            initial=run.start_epoch,
            total=c.epochs,
            desc=f"{task.name} {c.method} seed {self.seed}",
            disable=not show,
            position=self.progress_position,
            leave=False,
            dynamic_ncols=True,
        )
        final_test: Optional[Evaluation] = None
        with m3co_loss.value_checks(c.value_checks):
            for epoch in epochs_bar:
                train_loss = self.train_epoch(run, step, data, epoch, tqdm if show else None)
                val_ev, test_ev = self.score_epoch(run, data, epoch, train_loss)
                if epoch == c.epochs - 1:
                    final_test = test_ev
                if show and (val_ev is not None or test_ev is not None):
                    epochs_bar.set_postfix(loss=f"{train_loss:.3f}", val_acc=f"{val_ev.acc:.3f}" if val_ev else "-")
                if self.checkpoint_due(epoch, stop_epoch):
                    self.checkpoint(run, epoch, fingerprint=fingerprint, start_time=start_time)
        epochs_bar.close()
        if stop_epoch < c.epochs:
            return None
        if final_test is None:  # resumed from the checkpoint of the last epoch
            final_test = self.evaluate(run.scored, data.test)
        return self.record(run, data, final_test, fingerprint=fingerprint, seconds=run.seconds_before + time.perf_counter() - start_time)

    def record(self, run: RunState, data: SplitBatches, final_test: Evaluation, *, fingerprint: str, seconds: float) -> Dict[str, Any]:
        """The seed's record: the protocols' scores, the analyses, the history."""
        c, task, scored = self.config, self.task, run.scored
        labels = final_test.labels
        protocols: Dict[str, Dict[str, Any]] = {}
        val_scores = None
        best_val, best_test = run.best_val, run.best_test
        if best_val.epoch is not None:
            payload = best_val.payload
            if "test_prob" in payload:
                prob = payload["test_prob"]
            else:  # score the test set once, with the chosen epoch's weights
                scored.load_state_dict(payload["state"])
                prob = self.evaluate(scored, data.test).prob
            protocols["validation"] = dict(task.metrics(labels, prob), epoch=best_val.epoch)
            val_scores = dict(task.metrics(payload["val_labels"], payload["val_prob"]), loss=-best_val.key[1])
        protocols["final"] = dict(task.metrics(labels, final_test.prob), epoch=c.epochs - 1)
        if best_test.epoch is not None:
            protocols["best_on_test"] = dict(task.metrics(labels, best_test.payload["test_prob"]), epoch=best_test.epoch)
        analyses = None
        if task.analyse is not None:
            chosen = c.epochs - 1
            if best_val.epoch is not None and run.analysis_state is not None:
                scored.load_state_dict(run.analysis_state)
                chosen = best_val.epoch
            scored.eval()
            context = AnalysisContext(device=self.device, seed=self.seed, epoch=chosen, autocast=self.autocast, config=c)
            analyses = {k: float(v) for k, v in task.analyse(scored, context).items()}
            analyses["epoch"] = chosen
        train_size, val_size, test_size = data.sizes
        return {
            "seed": self.seed,
            "protocols": protocols,
            "val_scores": val_scores,
            "analyses": analyses,
            "train_size": train_size,
            "val_size": val_size,
            "test_size": test_size,
            "seconds": seconds,
            "resumed_at_epoch": run.resumed_at,  # None: trained in one go
            "history": run.history,
            "fingerprint": fingerprint,
            "processes": self.world_size,
        }


def train_seed(
    task: Task,
    config: TrainConfig,
    seed: int,
    *,
    checkpoint_path: Optional[Union[str, Path]] = None,
    progress_position: int = 0,
    stop_epoch: Optional[int] = None,
) -> Optional[Dict[str, Any]]:
    """Train and score one seed with the task's trainer; returns its per-seed record (protocols,
    history, seconds), or None when ``stop_epoch`` stops it early (see :meth:`Trainer.fit`)."""
    path = Path(checkpoint_path) if checkpoint_path is not None else None
    return (task.trainer or Trainer)(task, config, seed, checkpoint_path=path, progress_position=progress_position).fit(stop_epoch=stop_epoch)
