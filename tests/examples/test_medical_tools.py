"""The ROSMAP tools' command lines: options checked up front and bad input stopped in one line
(rosmap.py, rosmap_tune.py, rosmap_bench.py, rosmap_released_loop.py, seed_stats.py)."""

from __future__ import annotations

import json
import re

import pytest

import training
from training import omics
from rosmap import ROSMAP
from test_medical import write_mogonet


def test_bf16_on_the_cpu_and_plateau_without_validation_stop_in_one_line_before_any_work(tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as caught:  # before the data is read
        omics.main(ROSMAP, ["--data-dir", str(tmp_path / "nothing"), "--output-dir", str(out), "--device", "cpu", "--bf16"])
    assert str(caught.value) == "ROSMAP: bf16 autocast (--bf16) is meant for CUDA devices; got device 'cpu'"
    folder = write_mogonet(tmp_path / "data", features=(200, 200, 200))
    with pytest.raises(SystemExit) as caught:  # before the output folder is made and locked
        omics.main(ROSMAP, ["--data-dir", str(folder), "--output-dir", str(out), "--scheduler", "plateau", "--holdout", "0", "--epochs", "2", "--workers", "1", "--no-progress"])
    assert str(caught.value) == f"ROSMAP: {training.trainer.PLATEAU_NEEDS_VALIDATION}"
    assert not out.exists()
    # the generated folder is smaller than the released split: read, with a warning
    assert f"warning: the released ROSMAP split has 245 training and 106 test rows; {folder} has 40 and 20" in capsys.readouterr().out


class _Ran(Exception):
    pass


def _first_run_options(monkeypatch):
    """omics.main replaced: the options of the first run a sweep starts, then stop the sweep."""
    runs = []

    def first_run(spec, argv):
        runs.append(omics.parse(spec, argv))
        raise _Ran

    monkeypatch.setattr(omics, "main", first_run)
    return runs


@pytest.mark.parametrize("given, expected", [([], "m3col"), (["--method=concat"], "concat"), (["--method", "concat"], "concat"), (["--meth=mixup"], "mixup")])
def test_tuning_sets_its_method_only_when_none_is_passed_on(tmp_path, monkeypatch, given, expected):
    import rosmap_tune

    runs = _first_run_options(monkeypatch)
    with pytest.raises(_Ran):
        rosmap_tune.main(["--output-dir", str(tmp_path / "tune"), "--settings", "released", *given])
    assert runs[0].method == expected


@pytest.mark.parametrize("given, expected", [([], [0, 1, 2, 3, 4]), (["--seeds=1"], [1]), (["--seeds", "2", "3"], [2, 3])])
def test_benchmark_sets_its_seeds_only_when_none_are_passed_on(tmp_path, monkeypatch, given, expected):
    import rosmap_bench

    runs = _first_run_options(monkeypatch)
    with pytest.raises(_Ran):
        rosmap_bench.main(["--output-dir", str(tmp_path / "bench"), *given])
    assert runs[0].seeds == expected


def test_tuning_refuses_no_held_out_split_before_the_first_setting(tmp_path, monkeypatch):
    import rosmap_tune

    runs = _first_run_options(monkeypatch)
    for holdout in (["--holdout", "0"], ["--holdout=0"]):
        with pytest.raises(SystemExit) as stop:
            rosmap_tune.main(["--output-dir", str(tmp_path / "tune"), "--settings", "released", "dropout-0.5", *holdout])
        assert str(stop.value) == "rosmap_tune: the settings are chosen on the held-out split: --holdout 0 leaves none"
    assert runs == [] and not (tmp_path / "tune").exists()


@pytest.mark.parametrize("mode", ["--floor", "--floor-only", "--allocator-rounds=1", "--compile-rounds=1"])
def test_benchmark_timings_stop_in_one_line_on_missing_data_or_a_batch_size(tmp_path, mode):
    import rosmap_bench

    out = tmp_path / "bench"
    with pytest.raises(SystemExit) as stop:
        rosmap_bench.main(["--output-dir", str(out), mode, "--data-dir", str(tmp_path / "nothing")])
    assert str(stop.value) == f"ROSMAP: {tmp_path / 'nothing'}: data folder not found"
    with pytest.raises(SystemExit) as stop:
        rosmap_bench.main(["--output-dir", str(out), mode, "--data-dir", str(tmp_path / "nothing"), "--batch-size", "32"])
    assert str(stop.value) == f"rosmap_bench: {rosmap_bench.FULL_BATCH_ONLY}"
    assert not out.exists()


def test_tables_name_the_run_s_hold_out_and_test_grid():
    import rosmap_grid
    import rosmap_tune

    def row(holdout, test_every, protocols):
        stat = {"mean": 0.5, "std": 0.1}
        return {
            "config": {"holdout": holdout, "test_every": test_every, "epochs": 5, "test_grid": "package", "extra": {}},
            "protocols": {p: {m: stat for m in ("acc", "f1", "auc")} for p in protocols},
            "val_scores": {"acc": stat, "loss": stat},
            "per_seed": [{"seconds": 1.0}],
        }

    tune = rosmap_tune.tune_markdown({"released": row(0.3, 10, ["validation", "final"])}, "released", title="#")
    assert "stratified 30 % of the training set" in tune and "20 %" not in tune
    assert "stratified 12 samples" in rosmap_tune.tune_markdown({"released": row(12, 10, ["validation", "final"])}, "released", title="#")
    grid = rosmap_grid.grid_markdown({"m3col": row(0.25, 0, ["validation", "final"])}, title="#")
    assert "stratified 25 % of the training set" in grid and "no `best-on-test*` (`--test-every 0`" in grid and "epochs -1" not in grid


def test_a_malformed_base_url_is_refused_in_one_line(tmp_path, capsys):
    for url in ("example.org/ROSMAP", "ftp://example.org/ROSMAP/", "https://"):
        with pytest.raises(SystemExit) as stop:
            omics.main(ROSMAP, ["--download", str(tmp_path / "dest"), "--base-url", url])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and "--base-url" in err and "http(s) URL" in err and "Traceback" not in err
        with pytest.raises(SystemExit, match=r"^ROSMAP: base_url must be an http\(s\) URL"):
            omics.download(ROSMAP, tmp_path / "dest", base_url=url)
    assert not (tmp_path / "dest").exists()


def test_released_loop_compose_and_compare_refuse_bad_input_in_one_line(tmp_path):
    import rosmap_released_loop as loop

    out = tmp_path / "out.json"

    def stops(argv, message):
        with pytest.raises(SystemExit) as stop:
            loop.main(argv)
        assert str(stop.value).startswith(message) and "\n" not in str(stop.value), str(stop.value)

    records = tmp_path / "records"
    records.mkdir()
    stops(["compose", str(records), str(out)], f"{records}: no inplace_seed<S>.json records of the released variant; nothing written")
    scores = [{"epoch": e, "acc": 0.8, "f1": 0.8, "auc": 0.9} for e in range(0, 500, 10)]
    for prefix in ("inplace", "clone"):
        for seed in (0, 1):
            (records / f"{prefix}_seed{seed}.json").write_text(json.dumps({"seed": seed, "scores": scores}))
    (records / "clone_seed1.json").write_text('{"seed": 1, "scores": [')  # cut short
    stops(["compose", str(records), str(out)], f"{records / 'clone_seed1.json'}: corrupt released-loop record (not valid JSON")
    (records / "clone_seed1.json").write_text(json.dumps({"seed": 1, "scores": scores}))
    stops(["compose", str(tmp_path / "nowhere"), str(out)], f"{tmp_path / 'nowhere'}: not a folder")
    assert not out.exists()
    loop.main(["compose", str(records), str(out)])
    assert [r["seed"] for r in json.loads(out.read_text())["variants"]["clone_before_mixing"]] == [0, 1]
    stops(["compare", str(out), str(tmp_path / "missing.json")], f"{tmp_path / 'missing.json'}: no such file")
    (tmp_path / "empty.json").write_text(json.dumps({"variants": {}}))
    stops(["compare", str(tmp_path / "empty.json"), str(tmp_path / "missing.json")], f"{tmp_path / 'empty.json'}: the released variant needs at least two seeds")


def test_seed_statistics_name_a_bad_file_in_one_line(tmp_path):
    import seed_stats

    good, bad = tmp_path / "a.json", tmp_path / "b.json"
    good.write_text("[0.8, 0.85, 0.9]")
    for text, message in (("[0.8,", "not valid JSON"), ('{"values": [0.8]}', "expected a list of at least two finite numbers"), ('["x", 1]', "expected a list")):
        bad.write_text(text)
        with pytest.raises(SystemExit) as stop:
            seed_stats.main([str(good), str(bad)])
        assert str(stop.value).startswith(f"seed_stats: {bad}: {message}")
    with pytest.raises(SystemExit, match=f"^seed_stats: {re.escape(str(tmp_path / 'none.json'))}: no such file$"):
        seed_stats.main([str(good), str(tmp_path / "none.json")])
