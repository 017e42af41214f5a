"""The shared training engine (examples/training/) on tiny generated tasks."""

from __future__ import annotations

import dataclasses
import pickle
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[2]

import training  # noqa: E402
from m3co_loss import M3CoLoss, MixupSampler, MultiSClipLoss, UniSMMCLoss  # noqa: E402
from m3co_loss.functional import CONVENTIONS  # noqa: E402


def accuracy_metrics(y, prob):
    from sklearn.metrics import accuracy_score, f1_score

    pred = prob.argmax(1)
    return {"acc": float(accuracy_score(y, pred)), "mf1": float(f1_score(y, pred, average="macro", zero_division=0))}


def tiny_model(dims=(6, 5), classes=3, width=8):
    return training.MultimodalClassifier(
        [training.mlp(d, width, width) for d in dims],
        [training.mlp(width, width, classes) for _ in dims],
        training.mlp(width * len(dims), width, classes),
        encode_mixed_jointly=True,
    )


def tiny_data(n, seed, dims=(6, 5), classes=3):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    centers = torch.randn(classes, 4, generator=torch.Generator().manual_seed(7))
    signal = centers[y] + 0.7 * torch.randn(n, 4, generator=g)
    xs = [signal @ torch.randn(4, d, generator=torch.Generator().manual_seed(d)) + 0.5 * torch.randn(n, d, generator=g) for d in dims]
    return training.TensorMultimodalDataset(xs, y)


def tiny_task(n_train=60, n_test=30):
    train = tiny_data(n_train, 0)
    return training.Task(
        name="tiny",
        num_classes=3,
        build_model=tiny_model,
        train=train,
        test=tiny_data(n_test, 1),
        train_labels=train.labels,
        metrics=accuracy_metrics,
        metric_labels={"acc": "ACC", "mf1": "macro F1"},
        published={"paper": {"acc": (0.9, 0.01)}},
    )


def config(**overrides):
    base = dict(epochs=6, lr=1e-2, step_size=3, holdout=0.25, progress=False, threads=1)
    base.update(overrides)
    return training.TrainConfig(**base)


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("method", sorted(training.METHODS))
def test_every_method_trains_and_reports_three_protocols(method, convention):
    record = training.train_seed(tiny_task(), config(method=method, convention=convention), seed=0)
    assert set(record["protocols"]) == set(training.PROTOCOLS)
    for name, row in record["protocols"].items():
        assert 0 <= row["acc"] <= 1 and 0 <= row["mf1"] <= 1
    assert record["protocols"]["final"]["epoch"] == 5
    assert all(np.isfinite(record["history"]["train_loss"]))
    # it learned: the held-out cross-entropy of the fusion head (the same quantity for every method) fell
    assert record["history"]["val_loss"][-1] < record["history"]["val_loss"][0]
    assert record["train_size"] == 45 and record["val_size"] == 15 and record["test_size"] == 30


def test_selection_follows_the_protocols():
    record = training.train_seed(tiny_task(), config(epochs=12, method="unimodal-sup"), seed=3)
    h = record["history"]
    val_key = [(a, -l) for a, l in zip(h["val_acc"], h["val_loss"])]
    test_key = [(a, -l) for a, l in zip(h["test_acc"], h["test_loss"])]
    chosen = record["protocols"]["validation"]["epoch"]
    assert chosen == h["epoch"][val_key.index(max(val_key))]  # earliest epoch among exact ties
    best = record["protocols"]["best_on_test"]
    assert best["epoch"] == h["epoch"][test_key.index(max(test_key))]
    assert best["acc"] == pytest.approx(max(h["test_acc"]))
    assert record["protocols"]["validation"]["acc"] == pytest.approx(h["test_acc"][h["epoch"].index(chosen)])
    assert record["protocols"]["final"]["acc"] == pytest.approx(h["test_acc"][-1])
    assert record["val_scores"]["acc"] == pytest.approx(max(h["val_acc"]))


def test_scoring_test_once_with_kept_weights_matches_scoring_every_epoch():
    task = tiny_task()
    every = training.train_seed(task, config(epochs=8), seed=1)
    once = training.train_seed(task, config(epochs=8, test_every=0), seed=1)
    assert once["protocols"]["validation"] == every["protocols"]["validation"]
    assert once["protocols"]["final"] == every["protocols"]["final"]
    assert "best_on_test" not in once["protocols"]
    assert once["history"]["test_acc"][:-1] == [None] * 7
    sparse = training.train_seed(task, config(epochs=8, test_every=3), seed=1)
    assert [e for e, a in zip(sparse["history"]["epoch"], sparse["history"]["test_acc"]) if a is not None] == [2, 5, 7]
    assert sparse["protocols"]["validation"] == every["protocols"]["validation"]


def test_evaluation_schedule():
    c = training.TrainConfig(epochs=8, eval_every=3, test_every=5)
    assert [e for e in range(8) if c.validation_due(e)] == [2, 5, 7]
    assert [e for e in range(8) if c.test_due(e)] == [4, 7]
    assert [e for e in range(8) if training.TrainConfig(epochs=8, test_every=0).test_due(e)] == [7]


def test_a_seed_is_deterministic_and_seeds_differ():
    task = tiny_task()
    a = training.train_seed(task, config(), seed=0)
    b = training.train_seed(task, config(), seed=0)
    c = training.train_seed(task, config(), seed=1)
    assert a["history"]["train_loss"] == b["history"]["train_loss"]
    assert a["protocols"] == b["protocols"]
    assert a["history"]["train_loss"] != c["history"]["train_loss"]


def test_the_objective_is_the_public_api_wired_as_a_user_would():
    torch.manual_seed(0)
    model = tiny_model()
    data = tiny_data(10, 0)
    inputs, y = data.batch(None)
    objective = training.Objective("m3col", num_modalities=2, num_classes=3, epochs=6, seed=5)
    loss, parts = objective(model, inputs, y)
    # the same loss, written out by hand with the package's public API
    criterion = M3CoLoss(total_steps=6, generator=torch.Generator().manual_seed(5))
    plan = criterion.sample(10, 2)
    z = [enc(x) for enc, x in zip(model.encoders, inputs)]
    mixed = [enc(plan.mix(x, m)) for m, (enc, x) in enumerate(zip(model.encoders, inputs))]
    expected = (
        F.cross_entropy(model.fusion(torch.cat(z, 1)), y)
        + sum(F.cross_entropy(h(e), y) for h, e in zip(model.heads, z))
        + criterion(z, mixed=mixed, plan=plan)
    )
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert set(parts) == {"fusion_ce", "unimodal_ce", "m3co"}
    # two epochs later (m3co_steps = 2) the schedule has moved on to MultiSClip on the clean embeddings
    objective.epoch_end()
    objective.epoch_end()
    assert objective.phase() == "multisclip"
    loss, parts = objective(model, inputs, y)
    torch.testing.assert_close(parts["multisclip"], 0.1 * MultiSClipLoss()(z))


def test_reference_convention_mixes_embeddings_and_unis_mmc_uses_the_unimodal_heads():
    torch.manual_seed(0)
    model = tiny_model()
    inputs, y = tiny_data(10, 0).batch(None)
    z = model.encode(inputs)
    objective = training.Objective("m3col", num_modalities=2, num_classes=3, epochs=6, convention="reference", seed=2)
    _, parts = objective(model, inputs, y)
    criterion = M3CoLoss(total_steps=6, convention="reference", generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(parts["m3co"], criterion(z))  # the criterion mixes z itself
    objective = training.Objective("unis-mmc", num_modalities=2, num_classes=3, epochs=6)
    _, parts = objective(model, inputs, y)
    logits = [h(e) for h, e in zip(model.heads, z)]
    torch.testing.assert_close(parts["unis_mmc"], 0.1 * UniSMMCLoss()(z, logits, y))
    _, parts = training.Objective("concat", num_modalities=2, num_classes=3, epochs=6)(model, inputs, y)
    assert set(parts) == {"fusion_ce"}


def test_vanilla_mixup_mixes_every_modality_and_the_labels_with_one_partner():
    torch.manual_seed(0)
    model = tiny_model()
    inputs, y = tiny_data(12, 0).batch(None)
    objective = training.Objective("mixup", num_modalities=2, num_classes=3, epochs=6, seed=4)
    loss, parts = objective(model, inputs, y)
    plan = MixupSampler(generator=torch.Generator().manual_seed(4)).sample(12, 1)
    perm, lam = plan.perms[0], plan.lam[0].unsqueeze(1)
    z = [enc(lam * x + (1 - lam) * x[perm]) for enc, x in zip(model.encoders, inputs)]
    target = lam * F.one_hot(y, 3).float() + (1 - lam) * F.one_hot(y[perm], 3).float()
    expected = F.cross_entropy(model.fusion(torch.cat(z, 1)), target) + sum(F.cross_entropy(h(e), target) for h, e in zip(model.heads, z))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert set(parts) == {"fusion_ce", "unimodal_ce"}


def test_forward_modes_and_their_errors():
    torch.manual_seed(0)
    model = tiny_model()
    inputs, y = tiny_data(6, 0).batch(None)
    plan = MixupSampler().sample(6, 2)
    out = model(inputs, plan=plan, mix="inputs")
    torch.testing.assert_close(out.z_mixed[1], model.encoders[1](plan.mix(inputs[1], 1)))
    torch.testing.assert_close(out.fused, model.predict(inputs))
    only_mixed = model(inputs, plan=plan, mix="inputs", classify="mixed", unimodal=False)
    assert only_mixed.z is None and only_mixed.unimodal is None
    torch.testing.assert_close(only_mixed.fused, model.fusion(torch.cat(out.z_mixed, 1)))
    out = model(inputs, plan=plan, mix="embeddings")
    torch.testing.assert_close(out.z_mixed[0], plan.mix(out.z[0], 0))
    with pytest.raises(ValueError, match="needs plan"):
        model(inputs, mix="inputs")
    with pytest.raises(ValueError, match="classify"):
        model(inputs, classify="mixed")
    with pytest.raises(ValueError, match="inputs must be a list of 2"):
        model(inputs[:1])
    with pytest.raises(TypeError, match="mix_input"):
        model([{"input_ids": inputs[0]}, inputs[1]], plan=plan, mix="inputs", classify="mixed")


def test_gradient_accumulation_equals_the_full_batch_step(monkeypatch):
    task = tiny_task(n_train=40)
    grads = []
    make_optimizer = training.Trainer.build_optimizer

    def recording_optimizer(self, model):
        optimizer = make_optimizer(self, model)
        optimizer.register_step_pre_hook(lambda *_: grads.append(torch.cat([p.grad.flatten() for p in model.parameters()])))
        return optimizer

    monkeypatch.setattr(training.Trainer, "build_optimizer", recording_optimizer)
    training.train_seed(task, config(method="unimodal-sup", epochs=1, holdout=0), seed=0)
    training.train_seed(task, config(method="unimodal-sup", epochs=1, holdout=0, batch_size=20, accumulate=2), seed=0)
    assert len(grads) == 2  # one optimiser step each
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


class PlainDataset(torch.utils.data.Dataset):
    """A map-style dataset without the in-memory fast path: batches go through a DataLoader."""

    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i]


def test_a_plain_dataset_through_a_dataloader_gives_the_in_memory_numbers():
    task = tiny_task()
    plain = dataclasses.replace(task, train=PlainDataset(task.train), test=PlainDataset(task.test))
    cfg = config(batch_size=16, accumulate=2, epochs=4)
    fast, loaded = training.train_seed(task, cfg, seed=2), training.train_seed(plain, cfg, seed=2)
    assert loaded["history"]["train_loss"] == pytest.approx(fast["history"]["train_loss"], rel=1e-6)
    assert loaded["protocols"]["validation"]["epoch"] == fast["protocols"]["validation"]["epoch"]
    assert loaded["protocols"]["final"] == pytest.approx(fast["protocols"]["final"])


def test_resume_from_a_checkpoint_gives_the_uninterrupted_run(tmp_path, monkeypatch):
    task = tiny_task()
    cfg = config(epochs=9, checkpoint_every=1, resume=True)  # M3Co in epochs 0-2: the mixup generator matters
    uninterrupted = training.train_seed(task, cfg, seed=0)
    path = tmp_path / "seed0.pt"
    calls = {"n": 0}
    original = training.Objective.epoch_end

    def crash_in_epoch_2(self):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        original(self)

    monkeypatch.setattr(training.Objective, "epoch_end", crash_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        training.train_seed(task, cfg, seed=0, checkpoint_path=path)
    monkeypatch.setattr(training.Objective, "epoch_end", original)
    assert torch.load(path, weights_only=False)["epoch"] == 1
    resumed = training.train_seed(task, cfg, seed=0, checkpoint_path=path)
    assert resumed["history"] == uninterrupted["history"]
    assert resumed["protocols"] == uninterrupted["protocols"]
    with pytest.raises(ValueError, match="another configuration"):
        training.train_seed(task, dataclasses.replace(cfg, lr=0.5), seed=0, checkpoint_path=path)


def test_atomic_writes_keep_the_previous_file_when_writing_fails(tmp_path):
    target = tmp_path / "results.json"
    training.atomic_write_json(target, {"acc": 0.5})
    with pytest.raises(TypeError):
        training.atomic_write_json(target, {"acc": 0.7, "bad": object()})  # fails mid-stream
    assert json.loads(target.read_text()) == {"acc": 0.5}
    ckpt = tmp_path / "ckpt.pt"
    training.atomic_torch_save(ckpt, {"w": torch.ones(3)})
    with pytest.raises((pickle.PicklingError, AttributeError), match="lambda"):
        training.atomic_torch_save(ckpt, {"w": torch.zeros(3), "f": lambda: 0})  # a lambda cannot be pickled
    assert torch.equal(torch.load(ckpt)["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "results.json"]  # no temporary files left


def test_atomic_json_writes_undefined_numbers_as_null_and_files_follow_the_umask(tmp_path):
    target = tmp_path / "results.json"
    training.atomic_write_json(target, {"auc": float("nan"), "rows": [1.0, float("inf")], "n": 3})
    assert json.loads(target.read_text()) == {"auc": None, "rows": [1.0, None], "n": 3}
    mask = os.umask(0o022)
    try:
        training.atomic_write_text(tmp_path / "results.md", "x")
    finally:
        os.umask(mask)
    assert (tmp_path / "results.md").stat().st_mode & 0o777 == 0o644  # mkstemp alone would give 0o600


def test_run_refuses_unusable_options_before_any_training(tmp_path, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("trained before the options were checked")

    monkeypatch.setattr(training.seeds, "train_seed", no_training)
    task = tiny_task()  # 60 training samples, 3 classes
    cases = [
        (dict(cfg=config(holdout=58)), "between 3 and 57"),
        (dict(cfg=config(holdout=0.99)), "holdout=0.99"),
        (dict(seeds=[-1]), "seeds must be integers >= 0"),
        (dict(output_dir=tmp_path / "afile"), "is a file"),
    ]
    (tmp_path / "afile").write_text("")
    for case, message in cases:
        with pytest.raises(training.ConfigError, match=message):
            training.run(task, case.get("cfg", config()), case.get("seeds", [0]), case.get("output_dir", tmp_path / "out"))
    one_member = dataclasses.replace(task, train_labels=torch.cat([torch.zeros(59, dtype=torch.long), torch.ones(1, dtype=torch.long)]))
    with pytest.raises(training.ConfigError, match=r"class\(es\) \[1\].*single sample"):
        training.run(one_member, config(), [0], tmp_path / "out")


def test_changed_data_is_not_trained_over_the_finished_seed_and_is_recorded(tmp_path, monkeypatch):
    task = dataclasses.replace(tiny_task(), data_id="sha256:aaaa")
    first = training.run(task, config(epochs=2), [0], tmp_path / "a")
    assert first["data_id"] == "sha256:aaaa"
    trained = []
    original = training.train_seed
    monkeypatch.setattr(training.seeds, "train_seed", lambda *a, **k: trained.append(1) or original(*a, **k))
    training.run(task, config(epochs=2), [0], tmp_path / "a")
    assert trained == []  # same data: the finished seed is reused
    changed = dataclasses.replace(task, data_id="sha256:bbbb")
    with pytest.raises(training.ConfigError, match="seed0.json is the finished record of seed 0"):  # never overwritten
        training.run(changed, config(epochs=2), [0], tmp_path / "a")
    assert trained == []
    again = training.run(changed, config(epochs=2), [0], tmp_path / "b")
    assert trained == [1] and again["data_id"] == "sha256:bbbb"


def test_resume_uses_an_existing_checkpoint_without_checkpoint_every(tmp_path):
    task, cfg = tiny_task(), config(epochs=6)
    uninterrupted = training.train_seed(task, cfg, seed=0)
    path = tmp_path / "checkpoints" / "seed0.pt"
    path.parent.mkdir(parents=True)
    assert training.Trainer(task, dataclasses.replace(cfg, checkpoint_every=1), 0, checkpoint_path=path).fit(stop_epoch=3) is None
    stale = tmp_path / "seeds" / ".seed0.json.k3j9x2a_.tmp"  # what a run killed while writing leaves (mkstemp: 8 characters)
    stale.parent.mkdir()
    stale.write_text("{")
    training.run(task, dataclasses.replace(cfg, resume=True), [0], tmp_path)
    record = json.loads((tmp_path / "seeds" / "seed0.json").read_text())
    assert record["resumed_at_epoch"] == 3
    assert record["history"] == uninterrupted["history"] and record["protocols"] == uninterrupted["protocols"]
    assert not stale.exists()


def test_best_common_epoch_is_one_epoch_for_every_seed():
    def record(acc):
        return {"history": {"epoch": [0, 10, 20, 30], "test_acc": acc}}

    # each seed has a different lucky epoch; the common one is the best on average
    per_seed = [record([0.5, 0.9, 0.6, None]), record([0.5, 0.6, 0.8, None]), record([0.6, 0.7, 0.7, None])]
    best = training.report.best_common_epoch(per_seed)
    assert best["epoch"] == 10 and best["acc"]["mean"] == pytest.approx((0.9 + 0.6 + 0.7) / 3)
    assert best["acc"]["std"] == pytest.approx(np.std([0.9, 0.6, 0.7], ddof=1))
    assert best["acc"]["mean"] < np.mean([0.9, 0.8, 0.7])  # below the per-seed best-on-test reading
    tied = [record([0.7, 0.7, 0.7, 0.7])] * 2
    assert training.report.best_common_epoch(tied)["epoch"] == 0  # the earliest of equal epochs
    assert training.report.best_common_epoch([per_seed[0], {"history": {"epoch": [0, 5, 20, 30], "test_acc": [0.5] * 4}}]) is None
    assert training.report.best_common_epoch([record([None] * 4)]) is None and training.report.best_common_epoch([{}]) is None


def test_an_undefined_metric_is_reported_as_null_not_lost(tmp_path):
    def metrics_with_an_undefined_one(y, prob):
        return {**accuracy_metrics(y, prob), "mf1": float("nan")}

    task = dataclasses.replace(tiny_task(), metrics=metrics_with_an_undefined_one)
    training.run(task, config(epochs=2), [0, 1], tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["protocols"]["final"]["mf1"] == {"mean": None, "std": None}
    assert 0 <= saved["protocols"]["final"]["acc"]["mean"] <= 1


def test_run_writes_results_and_skips_finished_seeds(tmp_path, monkeypatch):
    task = tiny_task()
    results = training.run(task, config(), [0, 1], tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert {"dataset", "method", "seeds", "protocols", "per_seed", "seconds"} <= set(saved)
    assert saved["seeds"] == [0, 1] and saved["optimistic_protocols"] == ["best_on_test"]
    histories = [json.loads((tmp_path / "seeds" / f"seed{s}.json").read_text())["history"] for s in (0, 1)]
    assert saved["best_common_epoch"] == training.report.best_common_epoch([{"history": h} for h in histories])
    common = saved["best_common_epoch"]
    index = histories[0]["epoch"].index(common["epoch"])
    assert common["acc"]["mean"] == pytest.approx(np.mean([h["test_acc"][index] for h in histories]))
    assert common["acc"]["mean"] <= saved["protocols"]["best_on_test"]["acc"]["mean"] + 1e-12
    for name in training.PROTOCOLS:
        for metric in ("acc", "mf1"):
            stat = saved["protocols"][name][metric]
            assert 0 <= stat["mean"] <= 1 and stat["std"] >= 0
    md = (tmp_path / "results.md").read_text()
    assert "optimistic" in md and "| paper | 90.0 ± 1.0 |" in md
    assert f"Best common epoch (optimistic): one epoch for every seed, chosen on the mean test accuracy: epoch {common['epoch']}" in md
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    def no_training(*args, **kwargs):
        raise AssertionError("a finished seed was trained again")

    monkeypatch.setattr(training.seeds, "train_seed", no_training)
    again = training.run(task, config(), [0, 1], tmp_path)
    assert again["protocols"] == results["protocols"]


@pytest.mark.slow
def test_parallel_workers_give_the_same_numbers(tmp_path):
    # three seeds on two workers: seed 1 is cut in two and handed over through a checkpoint
    task, cfg = tiny_task(), config(epochs=8)
    assert [(p.index, p.start, p.stop) for p in training.seeds.plan_seed_pieces(3, 8, 2) if p.stop - p.start < 8] == [(1, 0, 4), (1, 4, 8)]
    serial = training.run(task, cfg, [0, 1, 2], tmp_path / "serial")
    parallel = training.run(task, cfg, [0, 1, 2], tmp_path / "parallel", workers=2)
    assert parallel["protocols"] == serial["protocols"] and (parallel["workers"], serial["workers"]) == (2, 1)
    assert sorted(os.listdir(tmp_path / "parallel" / "seeds")) == ["seed0.json", "seed1.json", "seed2.json"]
    for seed in (0, 1, 2):
        a, b = (json.loads((tmp_path / run / "seeds" / f"seed{seed}.json").read_text()) for run in ("parallel", "serial"))
        assert (a["protocols"], a["history"]) == (b["protocols"], b["history"])
        assert (a["resumed_at_epoch"], b["resumed_at_epoch"]) == (4 if seed == 1 else None, None)
    assert not list((tmp_path / "parallel" / "checkpoints").iterdir())  # the hand-over checkpoint is not kept


def test_a_stopped_seed_resumes_to_the_uninterrupted_run(tmp_path):
    task, cfg = tiny_task(), config(epochs=8)
    uninterrupted = training.train_seed(task, cfg, seed=3)
    path = tmp_path / "seed3.pt"
    assert training.Trainer(task, cfg, 3, checkpoint_path=path).fit(stop_epoch=2) is None  # inside the M3Co phase
    assert torch.load(path, weights_only=False)["epoch"] == 1
    resumed = training.Trainer(task, dataclasses.replace(cfg, resume=True), 3, checkpoint_path=path).fit()
    assert (resumed["protocols"], resumed["history"]) == (uninterrupted["protocols"], uninterrupted["history"])
    assert resumed["resumed_at_epoch"] == 2 and resumed["seconds"] > torch.load(path, weights_only=False)["seconds"] > 0
    with pytest.raises(ValueError, match="checkpoint_path"):
        training.Trainer(task, cfg, 3).fit(stop_epoch=2)
    with pytest.raises(ValueError, match="stop_epoch"):
        training.Trainer(task, cfg, 3, checkpoint_path=path).fit(stop_epoch=9)


def test_weight_averaging_is_scored_and_survives_a_resume(tmp_path):
    task = tiny_task()
    plain = training.train_seed(task, config(), seed=1)
    # a decay near 0 keeps the average at the last weights: the same scores as without averaging
    nearly_plain = training.train_seed(task, config(ema_decay=1e-9), seed=1)
    assert nearly_plain["history"]["val_loss"] == pytest.approx(plain["history"]["val_loss"], rel=1e-5)
    assert nearly_plain["history"]["train_loss"] == plain["history"]["train_loss"]  # training is unchanged
    cfg = config(ema_decay=0.9, epochs=8)
    averaged = training.train_seed(task, cfg, seed=1)
    assert averaged["history"]["val_loss"] != pytest.approx(training.train_seed(task, config(epochs=8), seed=1)["history"]["val_loss"], rel=1e-3)
    path = tmp_path / "seed1.pt"
    assert training.Trainer(task, cfg, 1, checkpoint_path=path).fit(stop_epoch=5) is None
    resumed = training.Trainer(task, dataclasses.replace(cfg, resume=True), 1, checkpoint_path=path).fit()
    assert (resumed["protocols"], resumed["history"]) == (averaged["protocols"], averaged["history"])
    with pytest.raises(ValueError, match="ema_decay"):
        config(ema_decay=1.0).validate()


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 12), st.integers(1, 40), st.integers(1, 6))
def test_seed_pieces_share_the_work_evenly_and_never_overlap_a_seed(num_seeds, epochs, workers):
    pieces = training.seeds.plan_seed_pieces(num_seeds, epochs, workers)
    used = min(workers, num_seeds)
    loads = [sum(p.stop - p.start for p in pieces if p.worker == w) for w in range(used)]
    assert sum(loads) == num_seeds * epochs and max(loads) - min(loads) <= 1
    for w in range(used):
        mine = sorted((p.begin, p.begin + p.stop - p.start) for p in pieces if p.worker == w)
        assert mine[0][0] == 0 and all(end == nxt for (_, end), (nxt, _) in zip(mine, mine[1:]))  # back to back
    for index in range(num_seeds):
        mine = sorted((p for p in pieces if p.index == index), key=lambda p: p.start)
        assert mine[0].start == 0 and mine[-1].stop == epochs and len(mine) <= 2
        if len(mine) == 2:
            head, tail = mine
            assert head.stop == tail.start and head.worker != tail.worker
            assert head.begin + head.stop <= tail.begin  # the head has finished when the tail is due
    assert sum(p.stop - p.start < epochs for p in pieces) <= 2 * (used - 1)
    assert [p.begin for p in pieces] == sorted(p.begin for p in pieces)


def test_bad_options_are_named():
    for field_name, value in (("method", "m3co"), ("epochs", 0), ("convention", "released"), ("holdout", 1.5), ("batch_size", 1), ("gamma", 2.0)):
        with pytest.raises(ValueError, match=field_name):
            training.TrainConfig(**{field_name: value}).validate()
    with pytest.raises(training.ConfigError, match="plateau"):
        training.train_seed(tiny_task(), config(scheduler="plateau", holdout=0), seed=0)
    with pytest.raises(training.ConfigError, match="plateau"):
        training.run(tiny_task(), config(scheduler="plateau", holdout=0), [0], "unused")
    with pytest.raises(training.ConfigError, match="bf16"):
        config(bf16=True, device="cpu").validate()
    with pytest.raises(ValueError, match="seeds"):
        training.run(tiny_task(), config(), [0, 0], "unused")


def test_epoch_batch_sampler_shuffles_per_epoch_and_shards_over_ranks():
    sampler = training.EpochBatchSampler(10, 4, seed=1)
    first = [i for batch in sampler for i in batch]
    assert sorted(first) == list(range(10)) and len(sampler) == 3
    sampler.set_epoch(1)
    assert [i for batch in sampler for i in batch] != first
    sampler.set_epoch(0)
    assert [i for batch in sampler for i in batch] == first
    shards = [training.EpochBatchSampler(10, None, shuffle=False, rank=r, world_size=3, pad=False) for r in range(3)]
    rows = [i for s in shards for batch in s for i in batch]
    assert sorted(rows) == list(range(10))
    padded = [training.EpochBatchSampler(10, 2, rank=r, world_size=3, seed=4) for r in range(3)]
    assert {len(s) for s in padded} == {2} and len({i for s in padded for b in s for i in b}) == 10


@pytest.mark.skipif(not hasattr(torch.compiler, "is_compiling"), reason="needs torch >= 2.3")
def test_compiled_training_step_trains_like_eager_and_resumes(tmp_path):
    """``compile="aot_eager"`` (dynamo and AOT autograd, no code generation) traces the whole step;
    the run matches eager mode to rounding, keeps eager-mode state-dict keys (a checkpoint resumes
    with or without compiling), and joins the fingerprint."""
    task = tiny_task()
    eager = training.train_seed(task, config(epochs=6), seed=2)
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = training.train_seed(task, config(epochs=6, compile="aot_eager"), seed=2)
    assert counters["stats"]["unique_graphs"] >= 2  # the M3Co and the MultiSClip phase were traced
    assert compiled["history"]["train_loss"] == pytest.approx(eager["history"]["train_loss"], rel=1e-4)
    assert compiled["history"]["val_loss"] == pytest.approx(eager["history"]["val_loss"], rel=1e-4)
    cfg = config(epochs=6, compile="aot_eager")
    path = tmp_path / "seed2.pt"
    assert training.Trainer(task, cfg, 2, checkpoint_path=path).fit(stop_epoch=3) is None
    assert not any("_orig_mod" in key for key in torch.load(path, weights_only=False)["model"])
    resumed = training.Trainer(task, dataclasses.replace(cfg, resume=True), 2, checkpoint_path=path).fit()
    assert resumed["history"]["train_loss"] == pytest.approx(compiled["history"]["train_loss"], rel=1e-6)
    assert cfg.fingerprint() != config(epochs=6).fingerprint()
    assert config(epochs=6, compile=None).fingerprint() == config(epochs=6).fingerprint()
    with pytest.raises(training.ConfigError, match="compile"):
        config(compile="no-such-backend").validate()
