"""The released image-text training loop (``food101.py`` / ``n24news.py --recipe released``).

:class:`ReleasedImageTextTrainer` replaces the engine's :class:`Trainer` for a task
(``Task.trainer``) and trains one seed the way ``train_image_text.py`` of the authors' code
does (the items and their lines are listed in ``recipes.IMAGETEXT_RELEASED``):

* micro-batches in file order (no shuffling), the last incomplete one dropped; the loss of each
  micro-batch is back-propagated as it is, so an optimiser step every ``accumulate`` of them
  applies the *sum* of their gradients; the count runs on across epoch ends;
* every ``valid_step`` optimiser steps, once the epoch index exceeds ``min_epoch``, the
  validation split is scored; weights whose accuracy reaches the best so far plus 1e-6 become
  the best weights; the best weights are then loaded into the model, which trains on from them,
  and the test set is scored with them;
* ``model.train()`` happens once, before the first epoch: the first validation leaves the model
  in eval mode for the rest of the run, as the released loop does;
* ReduceLROnPlateau steps once per epoch on the epoch's training accuracy (fusion head).

Protocols of the record: ``validation``, the test score taken at the last validation (the
released loop's last ``accuracy_test``: the best weights by validation accuracy);
``best_on_test``, the best of the test scores taken at the validations (optimistic);
``final``, the test score of the weights the loop ends with.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

import m3co_loss
from training.checkpoint import cpu_state
from training.config import ConfigError, TrainConfig, run_fingerprint
from training.data import Batches, EpochBatchSampler, move_to
from training.io import atomic_torch_save
from training.objective import Objective, TrainStep
from training.trainer import AnalysisContext, Trainer

INITIAL_BEST = 1e-5  # the released loop's starting best_valid (train_image_text.py:285)
MIN_GAIN = 1e-6  # a validation accuracy counts as better from best + 1e-6 on (train_image_text.py:269)
# what this loop's checkpoint holds (checked when it is read back: a damaged file is named)
RELEASED_CHECKPOINT_KEYS = {"fingerprint": str, "epoch": int, "model": dict, "optimizer": dict, "scheduler": dict, "objective": dict, "loop": dict, "pending_grads": dict, "torch_rng": torch.Tensor}


def released_options(config: TrainConfig) -> Tuple[int, int, int]:
    """``(num_epoch, valid_step, min_epoch)`` of a released-recipe configuration (``config.extra["released"]``)."""
    options = config.extra.get("released")
    if not options:
        raise ConfigError("the released image-text loop needs config.extra['released'] = {num_epoch, valid_step, min_epoch}")
    return int(options["num_epoch"]), int(options["valid_step"]), int(options["min_epoch"])


def planned_validations(num_train: int, *, batch_size: int, accumulate: int, epochs: int, valid_step: int, min_epoch: int) -> List[Tuple[int, int]]:
    """``(epoch, micro-batch count)`` of each validation the loop will make, for ``num_train`` training pairs."""
    per_epoch = num_train // batch_size
    period = valid_step * accumulate
    if per_epoch == 0:
        return []
    counts = range(period, epochs * per_epoch + 1, period)
    return [((t - 1) // per_epoch, t) for t in counts if (t - 1) // per_epoch > min_epoch]


@dataclass
class _LoopState:
    """What the loop carries between epochs (and in a checkpoint)."""

    total_step: int = 0
    best_valid: float = INITIAL_BEST
    best_weights: Optional[Dict[str, Tensor]] = None
    in_eval_mode: bool = False  # since the first validation
    chosen: Optional[Dict[str, Any]] = None  # the best weights' validation: epoch, step, val_prob, val_labels, val_loss
    last_test: Optional[Dict[str, Any]] = None  # the test score of the last validation: epoch, step, test_prob
    best_test: Optional[Dict[str, Any]] = None  # the best test score over the validations
    history: Dict[str, list] = field(default_factory=lambda: {k: [] for k in ("epoch", "step", "lr", "train_loss", "val_loss", "val_acc", "test_loss", "test_acc")})


class ReleasedImageTextTrainer(Trainer):
    """Trains one seed with the released image-text loop (see the module docstring)."""

    def train_epochs(self, stop_epoch: int) -> Optional[Dict[str, Any]]:
        c, task = self.config, self.task
        num_epoch, valid_step, min_epoch = released_options(c)
        if self.distributed:
            raise ConfigError("the released image-text loop trains in one process; drop --distributed")
        if task.val is None:
            raise ConfigError(f"task {task.name!r} needs its validation split for the released loop")
        fingerprint = run_fingerprint(task, c)
        start_time, seconds_before, resumed_at = time.perf_counter(), 0.0, None
        torch.manual_seed(self.seed)
        options = dict(collate_fn=task.collate_fn, num_workers=c.num_workers, pin_memory=self.device.type == "cuda")

        def in_order(dataset, size):  # no shuffling, the last incomplete batch dropped (data/dataloader.py:258-292)
            sampler = EpochBatchSampler(len(dataset), size, shuffle=False, drop_last=True, pad=False)
            return Batches(self.prepare_data(dataset), sampler, **options)

        train_batches = in_order(task.train, c.batch_size)
        eval_size = c.eval_batch_size or c.batch_size
        val_batches, test_batches = in_order(task.val, eval_size), in_order(task.test, eval_size)
        for name, batches, size in (("training", train_batches, c.batch_size), ("validation", val_batches, eval_size), ("test", test_batches, eval_size)):
            if len(batches) == 0:
                raise ConfigError(f"the {name} split has fewer pairs than one batch of {size}, and the released loop drops incomplete batches")

        model = task.build_model().to(self.device)
        optimizer = self.build_optimizer(model)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=c.plateau_factor, patience=c.plateau_patience)
        objective = Objective.from_config(c, num_modalities=model.num_modalities, num_classes=task.num_classes, seed=self.seed)
        step: nn.Module = TrainStep(model, objective)
        if c.compile is not None:
            step.compile(backend=c.compile)
        fused: List[Tensor] = []  # the fusion head's logits of the current micro-batch, for the training accuracy
        model.fusion.register_forward_hook(lambda module, args, out: fused.append(out.detach()))

        state, start_epoch = _LoopState(), 0
        saved = self.saved_run(fingerprint, required=RELEASED_CHECKPOINT_KEYS)
        if saved is not None:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            objective.load_state_dict(saved["objective"])
            state = _LoopState(**saved["loop"])
            for name, p in model.named_parameters():
                if name in saved["pending_grads"]:
                    p.grad = saved["pending_grads"][name].to(self.device)
            torch.set_rng_state(saved["torch_rng"])
            if self.device.type == "cuda" and saved.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(saved["cuda_rng"], self.device)
            start_epoch, seconds_before = saved["epoch"] + 1, saved["seconds"]
            resumed_at = start_epoch
        model.train(not state.in_eval_mode)  # the released loop calls model.train() once, before the first epoch

        from tqdm.auto import tqdm

        bar = tqdm(range(start_epoch, stop_epoch), initial=start_epoch, total=c.epochs, desc=f"{task.name} {c.method} seed {self.seed} (released loop)",
                   disable=not c.progress, position=self.progress_position, leave=False, dynamic_ncols=True)
        with m3co_loss.value_checks(c.value_checks):
            for epoch in bar:
                correct, seen, loss_sum, batches_done = 0, 0, 0.0, 0
                for inputs, y in train_batches:
                    inputs, y = move_to(inputs, self.device), y.to(self.device)
                    fused.clear()
                    with self.autocast():
                        loss, _ = step(inputs, y)
                    loss.backward()  # not divided by the micro-batches of a step: their gradients add up
                    correct += int((fused[-1].argmax(dim=1) == y).sum())
                    seen += len(y)
                    loss_sum += float(loss.detach())
                    batches_done += 1
                    state.total_step += 1
                    if state.total_step % c.accumulate == 0:
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                    if state.total_step % (valid_step * c.accumulate) == 0 and epoch > min_epoch:
                        self._validate(model, optimizer, state, epoch, loss_sum / batches_done, val_batches, test_batches)
                train_loss = loss_sum / batches_done
                if not math.isfinite(train_loss):
                    raise FloatingPointError(f"{task.name} {c.method} seed {self.seed}: the training loss is {train_loss} at epoch {epoch}")
                scheduler.step(correct / seen)  # the epoch's training accuracy (train_image_text.py:348-354)
                objective.epoch_end()
                bar.set_postfix(loss=f"{train_loss:.3f}", best_val=f"{state.best_valid:.3f}")
                if self.checkpoint_due(epoch, stop_epoch):
                    self._checkpoint(fingerprint, epoch, model, optimizer, scheduler, objective, state, seconds_before + time.perf_counter() - start_time)
        bar.close()
        if stop_epoch < c.epochs:
            return None
        return self._record(model, state, test_batches, fingerprint, seconds_before + time.perf_counter() - start_time, resumed_at)

    def _validate(self, model, optimizer, state: _LoopState, epoch: int, train_loss: float, val_batches, test_batches) -> None:
        """One validation of the released loop: score, keep the best, reload it, score the test set with it."""
        val = self.evaluate(model, val_batches)  # leaves the model in eval mode, as the released valid() does
        state.in_eval_mode = True
        if val.acc >= state.best_valid + MIN_GAIN:
            state.best_valid = val.acc
            state.best_weights = cpu_state(model)
            state.chosen = {"epoch": epoch, "step": state.total_step, "val_prob": val.prob, "val_labels": val.labels, "val_loss": val.loss}
        if state.best_weights is not None:
            model.load_state_dict(state.best_weights)
        test = self.evaluate(model, test_batches)
        state.last_test = {"epoch": epoch, "step": state.total_step, "test_prob": test.prob}
        if state.best_test is None or test.acc > state.best_test["acc"]:
            state.best_test = {"epoch": epoch, "step": state.total_step, "acc": test.acc, "test_prob": test.prob}
        for key, value in (("epoch", epoch), ("step", state.total_step), ("lr", optimizer.param_groups[0]["lr"]), ("train_loss", train_loss),
                           ("val_loss", val.loss), ("val_acc", val.acc), ("test_loss", test.loss), ("test_acc", test.acc)):
            state.history[key].append(value)

    def _checkpoint(self, fingerprint, epoch, model, optimizer, scheduler, objective, state: _LoopState, seconds: float) -> None:
        pending = {name: p.grad.detach().cpu() for name, p in model.named_parameters() if p.grad is not None}
        atomic_torch_save(
            self.checkpoint_path,
            {
                "fingerprint": fingerprint,
                "epoch": epoch,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "objective": objective.state_dict(),
                "loop": dict(vars(state)),
                "pending_grads": pending,  # micro-batches since the last optimiser step (the count runs across epochs)
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
                "seconds": seconds,
            },
        )

    def _record(self, model, state: _LoopState, test_batches, fingerprint: str, seconds: float, resumed_at: Optional[int]) -> Dict[str, Any]:
        c, task = self.config, self.task
        final = self.evaluate(model, test_batches)
        labels = final.labels
        protocols: Dict[str, Dict[str, Any]] = {"final": dict(task.metrics(labels, final.prob), epoch=c.epochs - 1)}
        val_scores = analyses = None
        if state.chosen is not None:
            protocols["validation"] = dict(task.metrics(labels, state.last_test["test_prob"]), epoch=state.chosen["epoch"], step=state.chosen["step"])
            protocols["best_on_test"] = dict(task.metrics(labels, state.best_test["test_prob"]), epoch=state.best_test["epoch"], step=state.best_test["step"])
            val_scores = dict(task.metrics(state.chosen["val_labels"], state.chosen["val_prob"]), loss=state.chosen["val_loss"])
        if task.analyse is not None:
            chosen = c.epochs - 1
            if state.best_weights is not None:
                model.load_state_dict(state.best_weights)
                chosen = state.chosen["epoch"]
            model.eval()
            context = AnalysisContext(device=self.device, seed=self.seed, epoch=chosen, autocast=self.autocast, config=c)
            analyses = {k: float(v) for k, v in task.analyse(model, context).items()}
            analyses["epoch"] = chosen
        return {
            "seed": self.seed,
            "protocols": protocols,
            "val_scores": val_scores,
            "analyses": analyses,
            "train_size": len(task.train),
            "val_size": len(task.val),
            "test_size": len(task.test),
            "seconds": seconds,
            "resumed_at_epoch": resumed_at,
            "history": state.history,
            "validations": len(state.history["epoch"]),
            "fingerprint": fingerprint,
            "processes": 1,
        }
