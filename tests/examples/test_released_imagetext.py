"""The released image-text loop (examples/training/imagetext/released.py) on a tiny in-memory task: when it
validates, what it reloads, its mode, its summed gradients, its scheduler and its resume."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[2]

import training  # noqa: E402
from training.imagetext import released as released_imagetext  # noqa: E402
from training.imagetext.released import ReleasedImageTextTrainer  # noqa: E402
from test_engine import accuracy_metrics, tiny_data, tiny_model  # noqa: E402


def task(n_train=44):
    train = tiny_data(n_train, 0)
    return training.Task(
        name="tiny",
        num_classes=3,
        build_model=tiny_model,
        train=train,
        val=tiny_data(18, 2),
        test=tiny_data(22, 1),
        metrics=accuracy_metrics,
        metric_labels={"acc": "ACC", "mf1": "macro F1"},
        trainer=ReleasedImageTextTrainer,
    )


def released_config(*, num_epoch=3, valid_step=2, min_epoch=0, **overrides):
    # 44 pairs in micro-batches of 4: 11 per epoch, so an optimiser step (2 micro-batches) straddles each epoch end
    base = dict(
        method="concat", epochs=num_epoch + 1, batch_size=4, accumulate=2, eval_batch_size=4, lr=1e-2, scheduler="plateau",
        plateau_patience=0, holdout=0, progress=False, threads=1,
        extra={"released": {"num_epoch": num_epoch, "valid_step": valid_step, "min_epoch": min_epoch}},
    )
    base.update(overrides)
    return training.TrainConfig(**base)


def test_validations_come_where_planned_and_the_best_weights_are_reloaded(monkeypatch):
    seen = []
    validate = ReleasedImageTextTrainer._validate

    def spy(self, model, optimizer, state, epoch, *args):
        before = copy.deepcopy(state.best_weights)
        validate(self, model, optimizer, state, epoch, *args)
        weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        assert all(torch.equal(weights[k], state.best_weights[k]) for k in weights)  # trains on from the best weights
        seen.append((epoch, state.total_step, before is None or any(not torch.equal(before[k], state.best_weights[k]) for k in before)))

    monkeypatch.setattr(ReleasedImageTextTrainer, "_validate", spy)
    record = training.train_seed(task(), released_config(), seed=0)
    planned = released_imagetext.planned_validations(44, batch_size=4, accumulate=2, epochs=4, valid_step=2, min_epoch=0)
    assert [(e, s) for e, s, _ in seen] == planned == list(zip(record["history"]["epoch"], record["history"]["step"]))
    assert planned[0] == (1, 12) and all(e >= 1 for e, _ in planned)  # none in epoch 0 (epoch > min_epoch)
    assert record["validations"] == len(planned)
    # the validation protocol is the test score taken at the last validation
    assert record["protocols"]["validation"]["acc"] == record["history"]["test_acc"][-1]
    assert record["protocols"]["best_on_test"]["acc"] == max(record["history"]["test_acc"])
    assert record["val_scores"]["acc"] == max(record["history"]["val_acc"])
    assert set(record["protocols"]) == {"validation", "final", "best_on_test"}


def test_the_model_trains_in_eval_mode_after_the_first_validation(monkeypatch):
    modes = []
    forward = training.objective.TrainStep.forward

    def spy(self, inputs, y):
        modes.append(self.model.training)
        return forward(self, inputs, y)

    monkeypatch.setattr(training.objective.TrainStep, "forward", spy)
    record = training.train_seed(task(), released_config(), seed=0)
    first = 12  # micro-batches before the first validation (planned (1, 12))
    assert modes[:first] == [True] * first and modes[first:] == [False] * (len(modes) - first)
    assert len(modes) == 4 * 11 and record["validations"] > 0


def test_an_optimiser_step_applies_the_sum_of_its_micro_batch_gradients(monkeypatch):
    captured = {}
    build = ReleasedImageTextTrainer.build_optimizer

    def spy(self, model):
        optimizer = build(self, model)

        def first_step(opt, args, kwargs):
            if "grads" not in captured:
                captured["grads"] = [None if p.grad is None else p.grad.clone() for p in model.parameters()]

        optimizer.register_step_pre_hook(first_step)
        return optimizer

    monkeypatch.setattr(ReleasedImageTextTrainer, "build_optimizer", spy)
    data = task()
    training.train_seed(data, released_config(), seed=0)
    torch.manual_seed(0)
    model = tiny_model()  # the same initial weights: the trainer seeds torch with the run's seed first
    inputs, y = data.train.batch(None)
    loss = sum(F.cross_entropy(model.predict([x[rows] for x in inputs]), y[rows]) for rows in (slice(0, 4), slice(4, 8)))
    expected = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)  # concat: the unimodal heads idle
    assert [g is None for g in captured["grads"]] == [g is None for g in expected] != [True] * len(expected)
    for got, want in zip(captured["grads"], expected):
        if want is not None:
            torch.testing.assert_close(got, want)


def test_the_scheduler_steps_once_per_epoch_on_the_training_accuracy(monkeypatch):
    metrics = []
    step = torch.optim.lr_scheduler.ReduceLROnPlateau.step
    monkeypatch.setattr(torch.optim.lr_scheduler.ReduceLROnPlateau, "step", lambda self, metric: (metrics.append(metric), step(self, metric))[1])
    accuracies = []
    forward = training.objective.TrainStep.forward

    def spy(self, inputs, y):
        out = forward(self, inputs, y)
        with torch.no_grad():
            accuracies.append((self.model.predict(inputs).argmax(1) == y).sum().item())
        return out

    monkeypatch.setattr(training.objective.TrainStep, "forward", spy)
    training.train_seed(task(), released_config(), seed=0)
    assert len(metrics) == 4
    per_epoch = [sum(accuracies[11 * e : 11 * (e + 1)]) / 44 for e in range(4)]
    assert metrics == pytest.approx(per_epoch)


def test_a_resumed_run_equals_the_uninterrupted_one(tmp_path):
    cfg = released_config(method="m3col", convention="reference", checkpoint_every=1)
    whole = training.train_seed(task(), cfg, seed=1)
    path = tmp_path / "seed1.pt"
    assert ReleasedImageTextTrainer(task(), cfg, 1, checkpoint_path=path).fit(stop_epoch=3) is None
    saved = torch.load(path, weights_only=False)
    assert saved["pending_grads"] and saved["loop"]["total_step"] == 33  # a step straddles the epoch end
    assert saved["loop"]["in_eval_mode"] and saved["loop"]["best_weights"] is not None
    resumed = ReleasedImageTextTrainer(task(), dataclasses.replace(cfg, resume=True), 1, checkpoint_path=path).fit()
    assert resumed["protocols"] == whole["protocols"] and resumed["history"] == whole["history"]
    assert resumed["resumed_at_epoch"] == 3


def test_no_validation_or_no_full_batch_is_refused():
    assert released_imagetext.planned_validations(44, batch_size=4, accumulate=2, epochs=4, valid_step=50, min_epoch=0) == []
    with pytest.raises(training.ConfigError, match="fewer pairs than one batch of 32"):
        training.train_seed(task(), released_config(eval_batch_size=32), seed=0)
    with pytest.raises(training.ConfigError, match="extra\\['released'\\]"):
        training.train_seed(task(), dataclasses.replace(released_config(), extra={}), seed=0)
