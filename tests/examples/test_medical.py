"""The MOGONET reader and the ROSMAP / BRCA pipelines (examples/omics.py, rosmap.py, brca.py)."""

from __future__ import annotations

import dataclasses
import functools
import http.server
import json
import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]

import training  # noqa: E402
from training import omics  # noqa: E402
from brca import BRCA  # noqa: E402
from rosmap import ROSMAP  # noqa: E402


def real_rosmap_dir():
    for path in [Path("/work/shared/data/ROSMAP")] + training.datadir.default_data_dirs("ROSMAP"):
        if (path / "labels_tr.csv").is_file():
            return path
    return None


def write_mogonet(folder: Path, *, features=(7, 6, 5), n_train=40, n_test=20, classes=2, seed=0, fmt="%.5g") -> Path:
    """Generated data in the MOGONET layout; the views carry a weak class signal."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for part, n in (("tr", n_train), ("te", n_test)):
        y = np.arange(n) % classes
        rng.shuffle(y)
        np.savetxt(folder / f"labels_{part}.csv", y.astype(float), fmt="%.18e")
        for v, d in enumerate(features, start=1):
            x = rng.normal(size=(n, d)) + 1.5 * (y[:, None] == (np.arange(d) % classes))
            np.savetxt(folder / f"{v}_{part}.csv", x, delimiter=",", fmt=fmt)
    for v, d in enumerate(features, start=1):
        (folder / f"{v}_featname.csv").write_text("".join(f"feature{i}\n" for i in range(d)))
    return folder


def load(folder, **kw):
    return omics.load_mogonet(folder, num_classes=kw.pop("num_classes", 2), **kw)


# ----------------------------------------------------------------------------- reader


def test_reader_reads_the_layout(tmp_path):
    data = load(write_mogonet(tmp_path), feature_counts=(7, 6, 5))
    assert [x.shape for x in data.train] == [(40, 7), (40, 6), (40, 5)]
    assert [x.shape for x in data.test] == [(20, 7), (20, 6), (20, 5)]
    assert data.train_labels.dtype == np.int64 and set(data.train_labels) == {0, 1}
    assert data.feature_names[2] == [f"feature{i}" for i in range(5)]


def _corrupt(folder: Path, name: str, edit):
    path = folder / name
    lines = path.read_text().splitlines()
    path.write_text("\n".join(edit(lines)) + "\n")


@pytest.mark.parametrize(
    "name, edit, message",
    [
        ("2_tr.csv", None, r"2_tr\.csv: file not found|missing 2_tr\.csv"),
        ("3_te.csv", lambda lines: [], r"3_te\.csv: the file is empty"),
        ("1_tr.csv", lambda lines: lines[:-1], r"1_tr\.csv: 39 rows, expected 40"),
        ("labels_te.csv", lambda lines: lines + ["0.0"], r"1_te\.csv: 20 rows, expected 21"),
        ("2_te.csv", lambda lines: [line + ",0.5" for line in lines], r"2_te\.csv: 7 columns, expected 6"),
        ("1_tr.csv", lambda lines: lines[:3] + [lines[3] + ",1"] + lines[4:], r"1_tr\.csv: line 4 has 8 columns but line 1 has 7"),
        ("3_tr.csv", lambda lines: lines[:5] + [",".join(["nan"] * 5)] + lines[6:], r"3_tr\.csv: line 6, column 1 is nan"),
        ("1_te.csv", lambda lines: lines[:2] + [",".join(["inf"] * 7)] + lines[3:], r"1_te\.csv: line 3, column 1 is inf"),
        ("2_tr.csv", lambda lines: lines[:1] + [",".join(["abc"] * 6)] + lines[2:], r"2_tr\.csv: line 2, column 1: 'abc' is not a number"),
        ("1_te.csv", lambda lines: lines[:4] + [lines[4].rsplit(",", 1)[0] + ","] + lines[5:], r"1_te\.csv: line 5, column 7: '' is not a number"),
        ("labels_te.csv", lambda lines: ["0.0"] * len(lines), r"labels_te\.csv: no sample of class 1"),
        ("labels_tr.csv", lambda lines: lines[:7] + ["2.0"] + lines[8:], r"labels_tr\.csv: line 8 holds label 2, outside \[0, 2\)"),
        ("labels_tr.csv", lambda lines: lines[:2] + ["-1.0"] + lines[3:], r"labels_tr\.csv: line 3 holds label -1"),
        ("labels_te.csv", lambda lines: lines[:4] + ["0.5"] + lines[5:], r"labels_te\.csv: line 5 holds 0\.5, not an integer"),
        ("labels_tr.csv", lambda lines: [line + ",1" for line in lines], r"labels_tr\.csv: 2 columns, expected one label per line"),
        ("1_featname.csv", lambda lines: lines[:-1], r"1_featname\.csv: 6 feature names but 1_tr\.csv has 7 columns"),
    ],
)
def test_reader_names_the_malformed_file(tmp_path, name, edit, message):
    folder = write_mogonet(tmp_path)
    if edit is None:
        (folder / name).unlink()
    else:
        _corrupt(folder, name, edit)
    with pytest.raises(omics.MogonetFormatError, match=message):
        load(folder)


def test_reader_ignores_a_byte_order_mark(tmp_path):
    folder = write_mogonet(tmp_path)
    plain = load(folder)
    for name in ("1_tr.csv", "labels_tr.csv"):
        (folder / name).write_text((folder / name).read_text(), encoding="utf-8-sig")
    marked = load(folder)
    np.testing.assert_array_equal(marked.train[0], plain.train[0])
    np.testing.assert_array_equal(marked.train_labels, plain.train_labels)


def test_reader_checks_the_expected_feature_counts(tmp_path):
    with pytest.raises(omics.MogonetFormatError, match=r"1_tr\.csv: 7 columns, expected 200"):
        load(write_mogonet(tmp_path), feature_counts=(200, 200, 200))


def test_minmax_scaling_uses_the_training_set():
    train = np.array([[1.0, 5.0], [3.0, 5.0], [2.0, 5.0]])
    test = np.array([[4.0, 6.0]])
    tr, te = omics.minmax_scale(train, test)
    np.testing.assert_allclose(tr[:, 0], [0.0, 1.0, 0.5], atol=1e-9)
    np.testing.assert_allclose(tr[:, 1], 0.0)  # a constant feature stays finite (eps on the max)
    np.testing.assert_allclose(te, [[1.5, 1e10]], rtol=1e-6)


def test_the_released_model_shapes():
    model = omics.build_omics_model((200, 200, 200), 2, 1000, 1000)
    encoder = model.encoders[0]
    assert [type(m).__name__ for m in encoder] == ["Linear", "ReLU", "Linear"]  # no final ReLU
    assert tuple(encoder[0].weight.shape) == (1000, 200) and not encoder[0].bias.detach().any()
    assert tuple(model.fusion[0].weight.shape) == (1000, 3000) and tuple(model.heads[1][-1].weight.shape) == (2, 1000)


# ----------------------------------------------------------------------------- pipelines


def small(spec, width=32):
    return dataclasses.replace(spec, emb_dim=width, post_dim=width)


def rosmap_task(width=32):
    folder = real_rosmap_dir()
    if folder is None:  # no real data: generated data of ROSMAP's shape
        import tempfile

        folder = write_mogonet(Path(tempfile.mkdtemp()), features=(200, 200, 200), n_train=245, n_test=106)
    data = omics.load_mogonet(folder, num_classes=2, feature_counts=(200, 200, 200))
    return omics.make_task(small(ROSMAP, width), data), data


def test_rosmap_short_run_learns_and_is_deterministic():
    task, data = rosmap_task()
    cfg = dataclasses.replace(omics.default_config(ROSMAP), epochs=40, step_size=20, progress=False, threads=1)
    first = training.train_seed(task, cfg, seed=0)
    again = training.train_seed(task, cfg, seed=0)
    assert first["protocols"] == again["protocols"] and first["history"] == again["history"]
    majority = max(np.mean(data.test_labels), 1 - np.mean(data.test_labels))
    # above chance: the majority-class rate and a coin's AUC
    assert first["protocols"]["final"]["acc"] > majority + 0.05
    assert first["protocols"]["final"]["auc"] > 0.65
    assert first["train_size"] == 196 and first["val_size"] == 49 and first["test_size"] == 106


def test_rosmap_command_line_writes_the_results(tmp_path, capsys):
    folder = real_rosmap_dir() or write_mogonet(tmp_path / "data", features=(200, 200, 200), n_train=245, n_test=106)
    out = tmp_path / "out"
    omics.main(ROSMAP, ["--data-dir", str(folder), "--seeds", "0", "1", "--epochs", "3", "--output-dir", str(out), "--workers", "1", "--no-progress"])
    results = json.loads((out / "results.json").read_text())
    assert results["dataset"] == "ROSMAP" and results["method"] == "m3col" and results["seeds"] == [0, 1]
    assert set(results["protocols"]) == set(training.PROTOCOLS)
    for row in results["protocols"].values():
        for metric in ("acc", "f1", "auc"):
            assert 0 <= row[metric]["mean"] <= 1 and row[metric]["std"] >= 0
    assert [r["seed"] for r in results["per_seed"]] == [0, 1] and results["seconds"] > 0
    assert results["config"]["step_size"] == 250 and results["config"]["lr"] == 2e-3
    md = (out / "results.md").read_text()
    assert "88.7 ± 0.9" in md and "Dynamics" in md and "optimistic" in md
    assert (out / "curves.png").stat().st_size > 1000
    assert "results.json" in capsys.readouterr().out


def test_missing_data_says_where_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("M3CO_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(training.datadir, "REPO_ROOT", tmp_path / "a" / "b")
    with pytest.raises(SystemExit, match=r"(?s)No ROSMAP data found.*github.com/txWang/MOGONET.*--download"):
        omics.main(ROSMAP, ["--output-dir", str(tmp_path / "out")])


def test_brca_shaped_generated_data_runs(tmp_path):
    folder = write_mogonet(tmp_path / "BRCA", features=(1000, 1000, 503), n_train=612, n_test=263, classes=5, fmt="%.3g")
    out = tmp_path / "out"
    results = omics.main(
        BRCA,
        ["--data-dir", str(folder), "--seeds", "0", "--epochs", "4", "--output-dir", str(out), "--workers", "1", "--no-progress", "--method", "unis-mmc"],
    )
    assert set(results["protocols"]["final"]) == {"acc", "wf1", "mf1", "epoch"}
    assert results["per_seed"][0]["train_size"] == 489 and results["per_seed"][0]["test_size"] == 263
    assert results["protocols"]["final"]["acc"]["mean"] > 0.3  # 5 balanced classes: chance is 0.2
    assert "88.4 ± 0.6" in (out / "results.md").read_text()


# ----------------------------------------------------------------------------- download


@pytest.fixture
def http_folder():
    servers = []

    def serve(folder: Path) -> str:
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
        handler.log_message = lambda *args: None
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


def test_download_verifies_checksums(tmp_path, http_folder):
    source = real_rosmap_dir()
    if source is None:
        pytest.skip("the real ROSMAP files are needed to match the embedded checksums")
    url = http_folder(source)
    dest = tmp_path / "ROSMAP"
    omics.main(ROSMAP, ["--download", str(dest), "--base-url", url])
    assert sorted(p.name for p in dest.iterdir()) == sorted(ROSMAP.sha256)
    assert all(omics.sha256_of(dest / name) == digest for name, digest in ROSMAP.sha256.items())
    load(dest, feature_counts=(200, 200, 200))
    # a tampered file on the server is refused and not written
    tampered = tmp_path / "served"
    shutil.copytree(source, tampered)
    with open(tampered / "labels_te.csv", "a") as handle:
        handle.write("1.0\n")
    fresh = tmp_path / "fresh"
    with pytest.raises(SystemExit, match=r"labels_te\.csv: SHA-256 .* does not match"):
        omics.download(ROSMAP, fresh, base_url=http_folder(tampered))
    assert not (fresh / "labels_te.csv").exists() and not list(fresh.glob(".*.part"))
    with pytest.raises(SystemExit, match="could not download"):
        omics.download(ROSMAP, tmp_path / "empty", base_url=http_folder(tmp_path / "nothing-here"))


# ----------------------------------------------------------------------------- tuning and the time floor


@pytest.mark.slow
def test_tuning_chooses_on_the_held_out_split_only(tmp_path):
    import rosmap_tune

    folder = write_mogonet(tmp_path / "data", features=(200, 200, 200), n_train=245, n_test=106)
    out = tmp_path / "tune"
    record = rosmap_tune.main(
        ["--output-dir", str(out), "--settings", "released", "dropout-0.5", "ema-0.95", "--data-dir", str(folder),
         "--seeds", "0", "1", "--epochs", "3", "--workers", "1", "--no-progress"]
    )
    results = record["results"]
    assert set(results) == {"released", "dropout-0.5", "ema-0.95"}
    assert results["ema-0.95"]["config"]["ema_decay"] == 0.95 and results["released"]["config"]["ema_decay"] is None
    # the choice is the best held-out accuracy (then loss), whatever the test scores say
    def key(name):
        val = results[name]["val_scores"]
        return (val["acc"]["mean"], -val["loss"]["mean"])
    assert record["chosen"] == max(results, key=key)
    swapped = {name: dict(r, protocols={"validation": {m: {"mean": 1.0 - v["mean"], "std": v["std"]} for m, v in r["protocols"]["validation"].items()}})
               for name, r in results.items()}
    assert rosmap_tune.choose(swapped) == record["chosen"]
    table = (out / "tune.md").read_text()
    assert f"`{record['chosen']}` (chosen)" in table and "--dropout 0.5" in table
    assert json.loads((out / "tune.json").read_text())["chosen"] == record["chosen"]


@pytest.mark.parametrize("holdout", ["0.2", "0"])
def test_grid_combines_the_methods_in_one_table(tmp_path, holdout):
    import rosmap_grid

    folder = write_mogonet(tmp_path / "data", features=(200, 200, 200), n_train=245, n_test=106)
    out = tmp_path / "grid"
    rosmap_grid.main(
        ["--output-dir", str(out), "--methods", "m3col", "concat", "--data-dir", str(folder), "--holdout", holdout,
         "--seeds", "0", "1", "--epochs", "3", "--workers", "1", "--no-progress"]
    )
    grid = json.loads((out / "grid.json").read_text())
    assert set(grid) == {"m3col", "concat"}
    assert ("validation" in grid["m3col"]["protocols"]) == (holdout != "0")
    table = (out / "grid.md").read_text()
    assert "| `m3col` |" in table and "| `concat` |" in table
    common = grid["m3col"]["best_common_epoch"]
    assert f"{training.report.format_percent(common['acc'])} ({common['epoch']})" in table and "common-epoch* ACC (epoch)" in table
    per_method = (out / "m3col" / "results.md").read_text()
    if holdout == "0":
        assert "no validation protocol" in table and "no honest figure" in per_method
        assert "val. ACC" not in table and "val. split ACC" not in table
    else:
        assert "stratified 20 % of the training set" in table and "`validation` is the honest figure" in per_method
        assert "| val. ACC |" in table and "val. split ACC" in table


@pytest.mark.slow
def test_time_floor_counts_the_schedule(tmp_path):
    import rosmap_bench

    folder = write_mogonet(tmp_path / "data", features=(200, 200, 200), n_train=245, n_test=106)
    record = rosmap_bench.main(["--output-dir", str(tmp_path / "bench"), "--floor-only", "--data-dir", str(folder), "--epochs", "9", "--seeds", "0", "1"])
    floor = record["floor"]
    assert floor["epochs_per_phase"] == {"m3co": 3, "multisclip": 6}
    steps = floor["step_flops"]
    # M3Co also encodes the mixed inputs: more work per step than MultiSClip
    assert steps["m3co"] > steps["multisclip"] > 0
    evals = floor["evaluations"]
    assert evals == {"validation": 9, "test": 1}  # test every 10 epochs, and the last
    per_seed = 3 * steps["m3co"] + 6 * steps["multisclip"] + 9 * floor["eval_flops"]["validation"] + floor["eval_flops"]["test"]
    assert floor["flops_per_seed"] == per_seed and floor["flops_total"] == 2 * per_seed
    assert floor["floor_seconds"] == pytest.approx(floor["flops_total"] / (floor["best_gflops"] * 1e9))
    assert json.loads((tmp_path / "bench" / "floor.json").read_text())["floor"]["flops_total"] == floor["flops_total"]


@pytest.mark.slow
def test_benchmark_times_the_seeds_and_how_well_they_fill_the_workers(tmp_path):
    import rosmap_bench

    folder = write_mogonet(tmp_path / "data", features=(200, 200, 200), n_train=245, n_test=106)
    argv = ["--output-dir", str(tmp_path / "bench"), "--data-dir", str(folder), "--epochs", "4", "--seeds", "0", "1", "2", "--workers", "2"]
    record = rosmap_bench.main(argv)
    assert record["workers"] == 2 and len(record["per_seed_seconds"]) == 3 and record["epochs"] == 4
    # three seeds on two workers: one seed is cut in two and resumed by the other worker
    seeds = [json.loads((tmp_path / "bench" / "run" / "seeds" / f"seed{s}.json").read_text()) for s in (0, 1, 2)]
    assert [r["resumed_at_epoch"] for r in seeds] == [None, 2, None]
    ideal = sum(record["per_seed_seconds"]) / 2
    assert record["wall_over_seed_seconds_per_worker"] == pytest.approx(record["wall_seconds"] / ideal)
    assert json.loads((tmp_path / "bench" / "bench.json").read_text())["workers"] == 2


def test_head_dropout_is_recorded_in_the_configuration():
    args = omics.parse(ROSMAP, ["--output-dir", "x", "--dropout", "0.5"])
    config = omics.config_from_args(ROSMAP, args)
    released = omics.config_from_args(ROSMAP, omics.parse(ROSMAP, ["--output-dir", "x"]))
    assert config.extra == {"dropout": 0.5} and released.extra == {}
    assert config.fingerprint() != released.fingerprint()


@pytest.mark.slow
def test_allocator_comparison_times_both_settings(tmp_path, monkeypatch):
    import training
    import rosmap_bench

    monkeypatch.setenv(training.cputune.ALLOCATOR_ENV, "default")
    assert training.cputune.keep_freed_memory() is False  # switched off: nothing applied
    monkeypatch.delenv(training.cputune.ALLOCATOR_ENV)
    if not training.cputune.keep_freed_memory():
        pytest.skip("needs glibc's mallopt")
    folder = write_mogonet(tmp_path / "data", features=(200, 200, 200), n_train=245, n_test=106)
    record = rosmap_bench.main(["--output-dir", str(tmp_path / "bench"), "--allocator-rounds", "1", "--steps", "1", "--data-dir", str(folder), "--epochs", "3"])
    assert set(record["step_seconds"]) == {"default", "tuned"}
    assert set(record["tuned_over_default"]) == {"m3co", "multisclip"}
    for mode in ("default", "tuned"):
        (run,) = record["step_seconds"][mode]
        assert set(run) == {"m3co", "multisclip"} and all(v > 0 for v in run.values())
    assert json.loads((tmp_path / "bench" / "allocator.json").read_text())["rounds"] == 1


@pytest.mark.slow
def test_compile_comparison_times_both_phases(tmp_path, monkeypatch):
    import os

    import rosmap_bench

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)

    folder = write_mogonet(tmp_path / "data", features=(200, 200, 200), n_train=245, n_test=106)
    argv = ["--output-dir", str(tmp_path / "bench"), "--compile-rounds", "2", "--compile-backend", "aot_eager", "--cold-compile", "--data-dir", str(folder), "--epochs", "3"]
    record = rosmap_bench.main(argv)
    assert set(record["phases"]) == {"m3co", "multisclip"}
    for phase in record["phases"].values():
        times = phase["step_seconds"]
        assert len(times["eager"]) == len(times["compiled"]) == 2 and phase["first_compiled_call_seconds"] > 0
        assert phase["compiled_over_eager"] == pytest.approx([c / e for c, e in zip(times["compiled"], times["eager"])])
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ  # the empty cache was this run's only
    stored = json.loads((tmp_path / "bench" / "compile.json").read_text())
    assert stored["backend"] == "aot_eager" and stored["inductor_cache"] == "empty at the start"


@pytest.mark.slow
def test_the_allocator_setting_does_not_change_the_numbers(tmp_path):
    import os
    import subprocess

    import training

    folder = write_mogonet(tmp_path / "data", features=(200, 200, 200), n_train=245, n_test=106)
    script = ROOT / "examples" / "rosmap.py"
    histories = {}
    for mode in ("default", "tuned"):
        out = tmp_path / mode
        subprocess.run(
            [sys.executable, str(script), "--data-dir", str(folder), "--seeds", "0", "--epochs", "4", "--workers", "1", "--no-progress", "--output-dir", str(out)],
            env=dict(os.environ, **{training.cputune.ALLOCATOR_ENV: mode}), check=True, capture_output=True,
        )
        record = json.loads((out / "seeds" / "seed0.json").read_text())
        histories[mode] = (record["history"]["train_loss"], record["protocols"])
    assert histories["default"] == histories["tuned"]


# ----------------------------------------------------------------------------- the released recipe


def _scored_epochs(record):
    return [e for e, acc in zip(record["history"]["epoch"], record["history"]["test_acc"]) if acc is not None]


def test_released_recipe_scores_the_test_set_where_the_released_loop_does(tmp_path):
    folder = write_mogonet(tmp_path / "data")
    spec = dataclasses.replace(small(ROSMAP, 16), feature_counts=(7, 6, 5))
    runs = {}
    for recipe in ("package", "released"):
        out = tmp_path / recipe
        omics.main(spec, ["--data-dir", str(folder), "--seeds", "0", "--epochs", "23", "--holdout", "0", "--recipe", recipe,
                              "--output-dir", str(out), "--workers", "1", "--no-progress", "--convention", "paper"])
        runs[recipe] = json.loads((out / "seeds" / "seed0.json").read_text()), json.loads((out / "results.json").read_text())
    package, released = runs["package"][0], runs["released"][0]
    assert _scored_epochs(package) == [9, 19, 22]
    assert _scored_epochs(released) == [0, 10, 20, 22]  # epoch % 10 == 0, and the last for `final`
    assert released["protocols"]["best_on_test"]["epoch"] in (0, 10, 20)
    assert released["protocols"]["final"]["epoch"] == 22
    accs = dict(zip(released["history"]["epoch"], released["history"]["test_acc"]))
    assert released["protocols"]["best_on_test"]["acc"] == max(accs[e] for e in (0, 10, 20))
    config = runs["released"][1]["config"]
    assert config["test_grid"] == "released" and config["extra"] == {"recipe": "released"}
    assert config["step_size"] == 500  # the released StepLR, even with the paper's loss conventions
    assert runs["package"][1]["config"]["step_size"] == 250


@pytest.mark.parametrize(
    "options, message",
    [
        (["--batch-size", "16"], "--recipe released: --batch-size does not apply"),
        (["--scheduler", "none"], "--recipe released: --scheduler none does not apply"),
        (["--test-every", "5"], "--recipe released: --test-every 5 does not apply"),
        (["--method", "mixup", "--convention", "reference", "--mix-prob", "0.5"], "mix_prob must be None for mixup under the reference convention"),
    ],
)
def test_released_recipe_refuses_what_it_cannot_honour_before_reading_data(tmp_path, options, message):
    with pytest.raises(SystemExit) as caught:
        omics.main(ROSMAP, ["--data-dir", str(tmp_path / "nothing"), "--recipe", "released", "--output-dir", str(tmp_path / "out")] + options)
    text = str(caught.value)
    assert message in text and "\n" not in text


def test_reference_mixup_is_the_released_mixup_data():
    """Under ``reference`` the mixup baseline draws one lam per batch from Beta(0.2, 0.2) and one
    partner per row, mixes every row of every modality's input, and each head's loss is
    ``lam * CE(y) + (1 - lam) * CE(y[perm])`` (model/model.py mixup_data / mixup_criterion)."""
    import torch

    torch.manual_seed(0)
    n, dims = 12, (5, 4, 3)
    model = omics.build_omics_model(dims, 2, 8, 8)
    inputs = [torch.randn(n, d) for d in dims]
    y = torch.arange(n) % 2
    seen = []
    forward = model.forward

    def spy(inputs, **kw):
        seen.append(kw)
        return forward(inputs, **kw)

    model.forward = spy
    objective = training.Objective("mixup", num_modalities=3, num_classes=2, epochs=10, convention="reference", seed=3)
    assert (objective.mixup_sampler.alpha, objective.mixup_sampler.mix_prob) == (training.objective.RELEASED_MIXUP_ALPHA, 1.0) == (0.2, 1.0)
    lams = []
    for _ in range(3):
        loss, _ = objective(model, inputs, y)
        plan = seen[-1]["plan"]
        assert seen[-1]["mix"] == "inputs" and seen[-1]["classify"] == "mixed"
        lam, perm = float(plan.lam[0, 0]), plan.perms[0]
        assert torch.all(plan.lam == lam) and all(torch.equal(p, perm) for p in plan.perms)
        mixed = [lam * x + (1 - lam) * x[perm] for x in inputs]
        z = [enc(x) for enc, x in zip(model.encoders, mixed)]
        logits = [head(e) for head, e in zip(model.heads, z)] + [model.fusion(torch.cat(z, 1))]
        ce = torch.nn.functional.cross_entropy
        expected = sum(lam * ce(out, y) + (1 - lam) * ce(out, y[perm]) for out in logits)
        torch.testing.assert_close(loss, expected)
        lams.append(lam)
    assert len(set(lams)) == 3  # a fresh lam per batch


def test_seed_statistics():
    from training import stats as seed_stats

    low, high = [0.80, 0.81, 0.82, 0.83, 0.84], [0.90, 0.91, 0.92, 0.93, 0.94]
    assert seed_stats.permutation_p_value(low, high) == pytest.approx(2 / 252)  # only the split itself, both ways
    assert seed_stats.permutation_p_value(low, low) == 1.0
    lo, hi = seed_stats.bootstrap_interval(low, high)
    assert lo <= -0.1 + 1e-12 and hi >= -0.1 - 1e-12 and hi < 0  # a shift of exactly 0.1 in every resample's reach
    assert "-10.0 points" in seed_stats.describe(low, high) and "p = 0.01" in seed_stats.describe(low, high)
    with pytest.raises(ValueError, match="at least two finite numbers"):
        seed_stats.compare([0.5], high)
    # Welch from summaries: the same p as from the values themselves
    from scipy import stats

    a, b = np.array(low), np.array(high) - 0.095
    assert seed_stats.welch_p_value(a.mean(), a.std(ddof=1), 5, b.mean(), b.std(ddof=1), 5) == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue)
