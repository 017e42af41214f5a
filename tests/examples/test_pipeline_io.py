"""The pipelines' output folder: the run lock (with real processes), corrupt files, setting them
aside, and results that gather every finished seed (examples/training/io.py, examples/training/seeds.py)."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

import training  # noqa: E402
import pipeline_run  # noqa: E402
from training import io  # noqa: E402

DRIVER = Path(pipeline_run.__file__)
FAST = ["--no-progress", "--workers", "1"]


def config(**overrides):
    return dataclasses.replace(pipeline_run.DEFAULTS, progress=False, **overrides)


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(DRIVER), *FAST, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"the run ended ({process.returncode}) before {path.name} appeared: {process.stderr.read()}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"{path.name} did not appear within {timeout} s")
        time.sleep(0.05)


# ----------------------------------------------------------------------------- real processes


@pytest.mark.slow
def test_a_second_run_is_refused_while_the_first_holds_the_folder_and_a_killed_run_frees_it(tmp_path):
    out, gate = tmp_path / "out", tmp_path / "gate"
    task = pipeline_run.tiny_task()
    first = start("--output-dir", str(out), "--seeds", "0", "--epochs", "4", "--checkpoint-every", "1", "--pause-at-epoch", "1", "--gate", str(gate))
    try:
        wait_for(gate.with_name("gate.paused"), first)
        holder = json.loads((out / io.LOCK_NAME).read_text())
        assert holder["pid"] == first.pid and "pipeline_run.py" in holder["command"]
        # a temporary the first run might be writing now: the refused run must not touch it
        in_flight = out / "checkpoints" / ".seed0.pt.abcd1234.tmp"
        in_flight.write_bytes(b"half a checkpoint")
        # the second run, into the same folder with another seed, from this process
        with pytest.raises(SystemExit) as refused:
            training.launch(task, config(epochs=4), [1], out, workers=1)
        message = str(refused.value)
        assert message.startswith(f"tiny: {out} is in use by another run (pid {first.pid} on ") and "pipeline_run.py" in message
        assert "\n" not in message and message.endswith("wait for it to end or write to another folder")
        assert in_flight.exists() and not (out / "seeds" / "seed1.json").exists()
        assert first.poll() is None  # the first run was not disturbed
        assert torch.load(out / "checkpoints" / "seed0.pt", weights_only=False)["epoch"] == 1
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    assert first.returncode == -signal.SIGKILL
    assert (out / io.LOCK_NAME).exists()  # left by the killed run, but not locked: the kernel dropped the lock
    with io.RunLock(out):
        pass
    training.run(task, config(epochs=4, checkpoint_every=1, resume=True), [0], out)
    assert not in_flight.exists()  # stale once the killed run was gone: removed by the lock's holder
    record = io.load_seed_record(out / "seeds" / "seed0.json")
    assert record["resumed_at_epoch"] == 2
    uninterrupted = training.train_seed(task, config(epochs=4), seed=0)
    assert record["history"] == uninterrupted["history"] and record["protocols"] == uninterrupted["protocols"]
    assert io.load_results(out / "results.json")["seeds"] == [0]


def test_the_pipeline_command_is_refused_in_one_line_while_a_run_holds_the_folder(tmp_path):
    rosmap = ROOT / "examples" / "rosmap.py"
    out = tmp_path / "out"
    with io.RunLock(out):  # held by this process, as a running pipeline would hold it
        refused = subprocess.run(
            [sys.executable, str(rosmap), "--data-dir", str(_rosmap_or_generated(tmp_path)), "--seeds", "0", "--epochs", "1", "--output-dir", str(out), *FAST],
            capture_output=True, text=True, timeout=120,
        )
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines()[-1].startswith(f"ROSMAP: {out} is in use by another run (pid {os.getpid()} on ")
    assert not (out / "seeds").exists()


def _rosmap_or_generated(tmp_path: Path) -> Path:
    real = ROOT.parent / "shared" / "data" / "ROSMAP"
    if (real / "labels_tr.csv").is_file():
        return real
    from test_medical import write_mogonet

    return write_mogonet(tmp_path / "data", features=(200, 200, 200), n_train=245, n_test=106)


# ----------------------------------------------------------------------------- the lock in one process


def test_the_lock_names_its_holder_and_is_released_on_an_exception(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with io.RunLock(tmp_path) as lock:
            assert lock.held
            with pytest.raises(io.OutputFolderBusy, match=rf"^{re.escape(str(tmp_path))} is in use by another run \(pid {os.getpid()} on .*\); wait for it"):
                io.RunLock(tmp_path).acquire()
            raise KeyboardInterrupt
    assert not lock.held and not (tmp_path / io.LOCK_NAME).exists()  # a run that ends leaves no lock file
    # a holder that has not written its record yet
    fd = os.open(tmp_path / io.LOCK_NAME, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(io.OutputFolderBusy, match="a process that has not yet written who it is") as caught:
            io.RunLock(tmp_path).acquire()
    finally:
        os.close(fd)
    again = pickle.loads(pickle.dumps(caught.value))  # errors cross from worker processes
    assert str(again) == str(caught.value)
    with io.RunLock(tmp_path):
        pass


def test_a_run_that_opens_the_lock_file_as_the_holder_removes_it_locks_the_new_one(tmp_path, monkeypatch):
    holder = io.RunLock(tmp_path).acquire()
    real_open = os.open

    def open_then_the_holder_ends(*args, **kwargs):
        fd = real_open(*args, **kwargs)
        if holder.held:
            holder.release()  # unlinks the file this run has just opened
        return fd

    monkeypatch.setattr(os, "open", open_then_the_holder_ends)
    with io.RunLock(tmp_path) as second:
        monkeypatch.setattr(os, "open", real_open)
        assert second.held and (tmp_path / io.LOCK_NAME).exists()
        with pytest.raises(io.OutputFolderBusy):  # the lock is on the file a third run opens
            io.RunLock(tmp_path).acquire()


def test_temporaries_are_removed_only_by_the_holder_and_only_the_writers_own(tmp_path):
    ours = [tmp_path / ".results.json.k3j9x2a_.tmp", tmp_path / ".seed0.pt.abcdefgh.tmp"]
    others = [tmp_path / "notes.tmp", tmp_path / ".notes.tmp", tmp_path / ".results.json.short.tmp", tmp_path / ".x.ABCDEFGH.tmp", tmp_path / "results.json"]
    for p in ours + others:
        p.write_text("x")
    lock = io.RunLock(tmp_path)
    with pytest.raises(RuntimeError, match="needs the run lock"):
        io.remove_stale_temporaries(tmp_path, lock=lock)
    with io.RunLock(tmp_path / "elsewhere") as elsewhere, pytest.raises(RuntimeError, match="not inside the locked output folder"):
        io.remove_stale_temporaries(tmp_path, lock=elsewhere)
    assert all(p.exists() for p in ours)
    with lock:
        assert sorted(io.remove_stale_temporaries(tmp_path, lock=lock)) == sorted(ours)
    assert not any(p.exists() for p in ours) and all(p.exists() for p in others)
    written = io.atomic_write_json(tmp_path / "r.json", {"a": 1})
    assert written.read_text() and not any(io.is_temporary(p) for p in tmp_path.iterdir())


# ----------------------------------------------------------------------------- corrupt files


def _checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "checkpoints" / "seed0.pt"
    trainer = training.Trainer(pipeline_run.tiny_task(), config(epochs=4, checkpoint_every=1), 0, checkpoint_path=path)
    assert trainer.fit(stop_epoch=2) is None
    return path


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "garbage": bytes(range(256)) * 4, "text": b"not a file of this kind\n"}[how])


DAMAGE = ["empty", "truncated", "garbage", "text"]


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_checkpoint_is_named_in_one_line(tmp_path, how):
    path = _checkpoint(tmp_path)
    _damage(path, how)
    with pytest.raises(io.CorruptFileError) as caught:
        io.load_checkpoint(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: corrupt checkpoint (") and "--set-aside-corrupt" in message and "\n" not in message
    assert pickle.loads(pickle.dumps(caught.value)).path == path


@pytest.mark.parametrize(
    "state, reason",
    [([1, 2], "holds a list, not a mapping"), ({"fingerprint": "x"}, "lacks epoch, model"), ("epoch-as-text", "holds a str")],
)
def test_a_checkpoint_of_the_wrong_structure_is_named(tmp_path, state, reason):
    path = tmp_path / "seed0.pt"
    torch.save(state, path)
    with pytest.raises(io.CorruptFileError, match=f"corrupt checkpoint \\({reason}"):
        io.load_checkpoint(path)
    full = torch.load(_checkpoint(tmp_path), weights_only=False)
    torch.save({**full, "epoch": "1"}, path)
    with pytest.raises(io.CorruptFileError, match=r"epoch is str, not int"):
        io.load_checkpoint(path)
    torch.save({**full, "epoch": True}, path)
    with pytest.raises(io.CorruptFileError, match=r"epoch is bool, not int"):
        io.load_checkpoint(path)


def _record(tmp_path: Path) -> Path:
    training.run(pipeline_run.tiny_task(), config(epochs=2), [0], tmp_path)
    return tmp_path / "seeds" / "seed0.json"


@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_records_results_and_configurations_are_named_in_one_line(tmp_path, how):
    record = _record(tmp_path)
    results = tmp_path / "results.json"
    configuration = tmp_path / "config.json"
    configuration.write_text(json.dumps(json.loads(results.read_text())["config"]))
    for path, load, what in ((record, io.load_seed_record, "seed record"), (results, io.load_results, "results file"), (configuration, io.load_config, "configuration")):
        assert isinstance(load(path), dict)  # intact
        _damage(path, how)
        with pytest.raises(io.CorruptFileError) as caught:
            load(path)
        message = str(caught.value)
        assert message.startswith(f"{path}: corrupt {what} (") and "\n" not in message


@pytest.mark.parametrize(
    "edit, reason",
    [
        (lambda r: [r], "holds a list, not a mapping"),
        (lambda r: {k: v for k, v in r.items() if k != "history"}, "lacks history"),
        (lambda r: {**r, "fingerprint": 3}, "fingerprint is int, not str"),
        (lambda r: {**r, "history": {"loss": []}}, "its history lists no epochs"),
        (lambda r: {**r, "seed": 4}, "it holds seed 4"),
    ],
)
def test_a_seed_record_of_the_wrong_structure_is_named(tmp_path, edit, reason):
    path = _record(tmp_path)
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(io.CorruptFileError, match=f"corrupt seed record \\({reason}"):
        io.load_seed_record(path)
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"dataset": "tiny"}))
    with pytest.raises(io.CorruptFileError, match=r"corrupt results file \(lacks method, seeds.*\); delete it: the next run"):
        io.load_results(results)


def test_set_aside_renames_and_never_overwrites(tmp_path):
    path = tmp_path / "seed0.pt"
    names = []
    for content in (b"first", b"second"):
        path.write_bytes(content)
        names.append(io.set_aside(path))
    assert not path.exists() and names[0] != names[1]
    assert [p.read_bytes() for p in names] == [b"first", b"second"]
    assert all(p.name.startswith("seed0.pt.corrupt-") for p in names)


# ----------------------------------------------------------------------------- the pipeline and corrupt files


@pytest.mark.parametrize("how", ["empty", "truncated"])
def test_resume_stops_on_a_corrupt_checkpoint_or_sets_it_aside_and_starts_afresh(tmp_path, how):
    path = _checkpoint(tmp_path)
    _damage(path, how)
    task = pipeline_run.tiny_task()
    cfg = config(epochs=4, checkpoint_every=1, resume=True)
    with pytest.raises(io.CorruptFileError, match=f"^{re.escape(str(path))}: corrupt checkpoint"):
        training.run(task, cfg, [0], tmp_path)
    assert path.exists() and not (tmp_path / "seeds" / "seed0.json").exists()
    with pytest.raises(SystemExit, match=f"^tiny: {re.escape(str(path))}: corrupt checkpoint .*--set-aside-corrupt"):
        training.launch(task, cfg, [0], tmp_path, workers=1)
    damaged = path.read_bytes()
    training.run(task, dataclasses.replace(cfg, set_aside_corrupt=True), [0], tmp_path)
    aside = [p for p in path.parent.iterdir() if p.name.startswith("seed0.pt.corrupt-")]
    assert len(aside) == 1 and aside[0].read_bytes() == damaged
    record = io.load_seed_record(tmp_path / "seeds" / "seed0.json")
    assert record["resumed_at_epoch"] is None  # afresh
    assert record["history"] == training.train_seed(task, config(epochs=4), seed=0)["history"]


def test_a_corrupt_seed_record_stops_the_run_before_training_or_is_set_aside(tmp_path, monkeypatch):
    task = pipeline_run.tiny_task()
    training.run(task, config(epochs=2), [0, 1], tmp_path)
    record = tmp_path / "seeds" / "seed1.json"
    intact = json.loads(record.read_text())
    record.write_text(record.read_text()[:40])  # a record cut short
    original = training.train_seed

    def no_training(*args, **kwargs):
        raise AssertionError("trained before the folder's records were checked")

    monkeypatch.setattr(training.seeds, "train_seed", no_training)
    for seeds in ([1], [2]):  # the corrupt record's own seed, or another one: the summary would need it
        with pytest.raises(io.CorruptFileError, match=f"^{re.escape(str(record))}: corrupt seed record \\(not valid JSON"):
            training.run(task, config(epochs=2), seeds, tmp_path)
    trained = []
    monkeypatch.setattr(training.seeds, "train_seed", lambda task, cfg, seed, **kw: trained.append(seed) or original(task, cfg, seed, **kw))
    results = training.run(task, config(epochs=2, set_aside_corrupt=True), [1], tmp_path)
    assert trained == [1] and results["seeds"] == [0, 1]
    assert json.loads(record.read_text())["history"] == intact["history"]
    assert len(list((tmp_path / "seeds").glob("seed1.json.corrupt-*"))) == 1


# ----------------------------------------------------------------------------- results of every finished seed


def test_sequential_runs_adding_seeds_summarise_them_all(tmp_path):
    task = pipeline_run.tiny_task()
    training.run(task, config(epochs=3), [1], tmp_path / "acc")
    training.run(task, config(epochs=3), [0], tmp_path / "acc")
    together = training.run(task, config(epochs=3), [0, 1], tmp_path / "once")
    saved = io.load_results(tmp_path / "acc" / "results.json")
    assert saved["seeds"] == [0, 1] and [r["seed"] for r in saved["per_seed"]] == [0, 1]
    assert saved["protocols"] == json.loads(json.dumps(together["protocols"]))
    # a record of another configuration is kept, but not summarised
    other = training.run(task, config(epochs=3, lr=5e-3), [2], tmp_path / "acc")
    assert other["seeds"] == [2] and other["ignored_seed_records"] == ["seed0.json", "seed1.json"]
    assert sorted(p.name for p in (tmp_path / "acc" / "seeds").iterdir()) == ["seed0.json", "seed1.json", "seed2.json"]
    assert not (tmp_path / "acc" / io.LOCK_NAME).exists()


def test_an_empty_output_folder_is_refused(tmp_path, monkeypatch):
    import argparse

    parser = argparse.ArgumentParser()
    training.add_arguments(parser, pipeline_run.DEFAULTS)
    with pytest.raises(SystemExit):
        parser.parse_args(["--output-dir", ""])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(training.ConfigError, match="empty path"):
        training.run(pipeline_run.tiny_task(), config(epochs=1), [0], " ")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- finished results and checkpoints are never overwritten


def test_a_finished_record_of_another_configuration_is_refused_not_overwritten(tmp_path, monkeypatch):
    task = pipeline_run.tiny_task()
    training.run(task, config(epochs=2), [0], tmp_path)
    record = tmp_path / "seeds" / "seed0.json"
    before = record.read_bytes()
    theirs = json.loads(before)["fingerprint"]
    monkeypatch.setattr(training.seeds, "train_seed", lambda *a, **k: pytest.fail("trained over a finished record"))
    for seeds in ([0], [1, 0]):  # checked before any seed trains
        with pytest.raises(training.ConfigError) as caught:
            training.run(task, config(epochs=3), seeds, tmp_path)
        message = str(caught.value)
        assert str(record) in message and theirs in message and "--output-dir" in message and "\n" not in message
    assert record.read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "seeds").iterdir()) == ["seed0.json"]
    assert not (tmp_path / io.LOCK_NAME).exists()


def test_a_checkpoint_of_this_configuration_needs_resume(tmp_path, monkeypatch):
    task = pipeline_run.tiny_task()
    cfg = config(epochs=4, checkpoint_every=1)
    path = tmp_path / "checkpoints" / "seed0.pt"
    assert training.Trainer(task, cfg, 0, checkpoint_path=path).fit(stop_epoch=2) is None  # a run killed after epoch 1
    before = path.read_bytes()
    original = training.seeds.train_seed
    monkeypatch.setattr(training.seeds, "train_seed", lambda *a, **k: pytest.fail("restarted a resumable seed"))
    with pytest.raises(training.ConfigError, match=re.escape(f"checkpoint at epoch 1 for seed 0 ({path}): pass --resume to continue, or remove it")):
        training.run(task, cfg, [1, 0], tmp_path)
    with pytest.raises(training.ConfigError, match="pass --resume"):  # train_seed on its own too
        original(task, cfg, 0, checkpoint_path=path)
    assert path.read_bytes() == before and not (tmp_path / "seeds").exists()
    monkeypatch.setattr(training.seeds, "train_seed", original)
    training.run(task, dataclasses.replace(cfg, resume=True), [0], tmp_path)
    assert io.load_seed_record(tmp_path / "seeds" / "seed0.json")["resumed_at_epoch"] == 2
    # a checkpoint of another configuration is not this run's to resume: it is overwritten as before
    other = tmp_path / "other"
    assert training.Trainer(task, dataclasses.replace(cfg, lr=0.5), 0, checkpoint_path=other / "checkpoints" / "seed0.pt").fit(stop_epoch=2) is None
    training.run(task, cfg, [0], other)
    assert io.load_seed_record(other / "seeds" / "seed0.json")["resumed_at_epoch"] is None


def test_run_has_no_write_switch():
    import inspect

    assert "write" not in inspect.signature(training.run).parameters
