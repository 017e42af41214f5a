"""The benchmark scripts run end to end on tiny sizes and write their tables (no timing asserted)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks" / "bench_kernels.py"


def _bench(*args: str, out: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(BENCH), "--n", "64", "--d", "8", "--repeats", "2", "--threads", "1", "--out-dir", str(out), "--tag", "t", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
def test_fresh_process_figures_and_report(tmp_path):
    proc = _bench("--loss", "m3co_pair", "--impl", "textbook", "tiled", "floor", out=tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "t.json").read_text())
    by_impl = {r["impl"]: r for r in data["results"]}
    assert set(by_impl) == {"textbook", "tiled", "floor"}
    for r in by_impl.values():
        assert r["status"] == "ok" and len(r["times_s"]) == 2 and r["median_s"] > 0
    table = (tmp_path / "t.md").read_text()
    assert "| m3co_pair | 64 | 8 |" in table
    assert (tmp_path / "t.png").stat().st_size > 0


@pytest.mark.slow
def test_paired_mode_records_per_round_ratios(tmp_path):
    proc = _bench("--loss", "multisoftclip_pair", "--impl", "tiled", "floor", "--paired", out=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (entry,) = json.loads((tmp_path / "t_paired.json").read_text())["results"]
    assert entry["status"] == "ok" and entry["impls"] == ["tiled", "floor"]
    times = entry["times_s"]
    assert len(times["tiled"]) == len(times["floor"]) == 2
    assert entry["ratios"]["floor"] == pytest.approx([x / y for x, y in zip(times["tiled"], times["floor"])])
    low, mid, high = entry["ratio_quartiles"]["floor"]
    assert low <= mid <= high
    assert "| multisoftclip_pair | 64 | 8 | 2 |" in (tmp_path / "t_paired.md").read_text()


def test_unknown_implementation_is_refused(tmp_path):
    proc = _bench("--impl", "fast", out=tmp_path)
    assert proc.returncode != 0 and "--impl: unknown fast" in proc.stderr


@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None, reason="inductor needs a C compiler on CPU")
@pytest.mark.slow
def test_compile_benchmark_writes_its_table(tmp_path):
    bench = ROOT / "benchmarks" / "bench_compile.py"
    cmd = [sys.executable, str(bench), "--loss", "clip_loss", "--n", "16", "--d", "4", "--rounds", "2", "--threads", "1", "--out-dir", str(tmp_path), "--tag", "t"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr
    (entry,) = json.loads((tmp_path / "t.json").read_text())["results"]
    assert all(len(entry["times_s"][impl]) == 2 for impl in ("eager-checks", "eager", "compiled"))
    assert entry["ratios"]["eager"] == pytest.approx([c / e for c, e in zip(entry["times_s"]["compiled"], entry["times_s"]["eager"])])
    assert entry["max_abs_difference"] < 1e-4 and entry["compile_seconds"] > 0
    assert "| clip_loss | 16 | 4 |" in (tmp_path / "t.md").read_text()


def test_targets_benchmark_writes_paired_and_memory_tables(tmp_path):
    bench = ROOT / "benchmarks" / "bench_targets.py"
    cmd = [sys.executable, str(bench), "--paired", "--memory", "--impl", "partners", "m3co_pair", "labels", "--n", "48", "--d", "8",
           "--rounds", "2", "--repeats", "1", "--threads", "1", "--classes", "3", "--out-dir", str(tmp_path), "--tag", "t"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr
    (entry,) = json.loads((tmp_path / "t_paired.json").read_text())["results"]
    times = entry["times_s"]
    assert entry["status"] == "ok" and all(len(times[impl]) == 2 for impl in ("partners", "m3co_pair", "labels"))
    assert entry["ratios"]["labels"] == pytest.approx([x / y for x, y in zip(times["partners"], times["labels"])])
    memory = json.loads((tmp_path / "t_memory.json").read_text())["results"]
    assert {r["impl"] for r in memory} == {"partners", "m3co_pair", "labels"} and all(r["status"] == "ok" for r in memory)
    assert "| labels | 48 | 8 |" in (tmp_path / "t_memory.md").read_text()
    rst = (tmp_path / "t_paired.rst").read_text() + (tmp_path / "t_memory.rst").read_text()
    assert rst.count(".. list-table::") == 2 and "pytorch-metric-learning was not measured" in rst


def test_temperature_benchmark_writes_its_table(tmp_path):
    bench = ROOT / "benchmarks" / "bench_temperature.py"
    cmd = [sys.executable, str(bench), "--loss", "clip_loss", "multisoftclip_pair", "--n", "40", "--d", "8", "--rounds", "2", "--threads", "1"]
    proc = subprocess.run([*cmd, "--out-dir", str(tmp_path), "--tag", "t"], capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr
    entries = json.loads((tmp_path / "t.json").read_text())["results"]
    assert [e["loss"] for e in entries] == ["clip_loss", "multisoftclip_pair"]
    for entry in entries:
        assert all(len(entry["times_s"][impl]) == 2 for impl in ("float", "tensor"))
        assert entry["ratios"] == pytest.approx([t / f for t, f in zip(entry["times_s"]["tensor"], entry["times_s"]["float"])])
        assert entry["max_abs_difference"] == 0.0  # the same number as a float and as a tensor: the same bits on the CPU
        assert entry["temperature_grad"] != 0.0
    assert "| clip_loss | tiled | 40 | 8 |" in (tmp_path / "t.md").read_text()
    proc = subprocess.run([*cmd, "--temperature", "0.001"], capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode != 0 and "--temperature must lie in [0.01, 1]" in proc.stderr


PEERS = ROOT / "benchmarks" / "bench_peers.py"


@pytest.mark.slow
def test_peers_benchmark_checks_values_and_reports_failing_peers(tmp_path):
    # an info_nce that fails to import stands in for a broken install: it must be reported, not dropped
    broken = tmp_path / "broken"
    (broken / "info_nce").mkdir(parents=True)
    (broken / "info_nce" / "__init__.py").write_text("raise ImportError('info_nce broken on purpose')\n")
    impls = ["auto", "dense", "tiled", "open_clip", "info_nce", "pml", "floor"]
    # 2 MiB: the N x N buffers (24 bytes x 48^2) fit, pytorch-metric-learning's N x N^2 mask (28 bytes x 48^3) does not
    cmd = [sys.executable, str(PEERS), "--n", "48", "--d", "8", "--rounds", "2", "--min-rounds", "1", "--threads", "1",
           "--max-memory-gib", str(2 / 1024), "--impl", *impls, "--out-dir", str(tmp_path), "--tag", "t"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(broken), str(ROOT)]))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "t.json").read_text())
    (entry,) = data["results"]
    recs = entry["impls"]
    assert list(recs) == impls and entry["rounds"] == 2
    assert recs["auto"]["check"] == "reference" and recs["floor"]["check"] == "no value"
    for name in ("dense", "tiled", "open_clip"):
        rec = recs[name]
        if name == "open_clip" and rec["status"] != "ok":  # open-clip-torch not installed: said so
            assert rec["status"] == "unavailable" and "not installed" in rec["reason"]
            continue
        assert rec["status"] == "ok" and rec["check"] == "ok", rec
        assert rec["rel_diff"] <= 1e-4 and rec["value"] == pytest.approx(recs["auto"]["value"], rel=1e-4)
        assert len(rec["times_s"]) == 2
        ratios = [x / y for x, y in zip(recs["auto"]["times_s"], rec["times_s"])]
        assert entry["ratios"][name] == pytest.approx(ratios)
    assert recs["info_nce"]["status"] == "unavailable" and "info_nce broken on purpose" in recs["info_nce"]["reason"]
    assert recs["pml"]["status"] == "skipped" and "memory budget" in recs["pml"]["reason"]
    table = (tmp_path / "t.md").read_text()
    assert "info_nce broken on purpose" in table and "N=48 D=8 pml: skipped" in table
    assert "| 48 | 8 | m3co-loss dense | ok | 2 |" in table
    assert ".. list-table::" in (tmp_path / "t.rst").read_text()


def _peers_data(times_auto, times_peer, mem_auto, mem_peer, n):
    import statistics

    def rec(times, mem, **kw):
        return dict(status="ok", times_s=times, median_s=statistics.median(times), extra_peak_bytes=mem, **kw)

    entry = dict(device="cpu", dtype="float32", n=n, d=8, load_before=[1.0], load_after=[1.0],
                 impls=dict(auto=rec(times_auto, mem_auto), open_clip=rec(times_peer, mem_peer),
                            pml=dict(status="skipped", reason="over budget")),
                 ratios=dict(open_clip=[a / p for a, p in zip(times_auto, times_peer)]))
    return dict(meta={}, results=[entry])


@pytest.mark.parametrize("n, times_auto, mem_auto", [
    (8192, [1.0, 1.0, 1.0], 10),
    (8192, [1.0, 1.2, 1.2], 30),
    (1024, [1.9, 2.0, 2.1], 90),
    (4096, [9.0, 9.0, 9.0], 90),
])
def test_peer_comparisons_follow_the_recorded_rounds(n, times_auto, mem_auto):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import peers_report

    data = _peers_data(times_auto, [2.0, 2.0, 2.0], mem_auto, 100, n)
    (row,) = peers_report.comparisons(data)
    assert row["peer"] == "open_clip" and row["n"] == n
    assert row["time"][1] == pytest.approx(sorted(a / 2.0 for a in times_auto)[1])
    assert row["memory"] == pytest.approx(mem_auto / 100)
    assert "floor" not in row and row["note"] == ""
    data["results"][0]["ratios"]["floor"] = [1.5, 1.5, 1.5]
    data["results"][0]["ratios"]["tiled"] = [1.0, 1.0, 1.0]
    (row,) = peers_report.comparisons(data)
    assert row["floor"] == pytest.approx(1.5)
    assert row["floor_peer"] == pytest.approx(sorted(a / 2.0 for a in times_auto)[1] / 1.5)
    assert row["note"] == f"tiled {row['time'][1]:.2f}"


def test_install_peers_pins_are_the_extra():
    tomllib = pytest.importorskip("tomllib")
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["peers"]
    assert pins and all("==" in pin for pin in pins)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "install_peers.sh"), "--print"], capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, PYTHON=sys.executable))
    assert proc.returncode == 0, proc.stderr
    no_deps, deps = proc.stdout.splitlines()
    assert no_deps.split()[-len(pins):] == pins and "--no-deps" in no_deps
    assert "--no-deps" not in deps and "torch==" in deps


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_gpu_check_dry_run_runs_every_step_on_cpu(tmp_path):
    out = tmp_path / "gpu"
    out.mkdir()
    (out / "summary.md").write_text("a previous run's summary\n")  # replaced, not appended to
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", str(out)], capture_output=True,
                          text=True, timeout=900, env=dict(os.environ, PYTHON=sys.executable))
    summary = (out / "summary.md").read_text()
    assert proc.returncode == 0, summary
    # moved into place whole at the end: its last line says so, and no partial file is left
    assert summary.startswith("# GPU check") and summary.rstrip().splitlines()[-1] == "Complete."
    assert not (out / "summary.md.partial").exists()
    for step in ("setup", "tests", "kernels", "peers"):
        assert f"| {step} | ok |" in summary
    assert "--no-deps" in (out / "setup.log").read_text()
    for stem in ("kernels_cpu", "kernels_cpu_bfloat16", "kernels_cpu_bfloat16_tiles", "peers_cpu"):
        assert json.loads((out / f"{stem}.json").read_text())["results"], stem
    assert json.loads((out / "kernels_cpu_bfloat16.json").read_text())["meta"]["dtype"] == "bfloat16"
    assert "## CLIP loss against the peer libraries" in summary


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("args, message", [
    (["--wheels", "."], "--wheels goes with --python"),
    (["--python", "no-such-python-here"], "--python: no-such-python-here not found"),
    (["--python"], "--python needs a value"),
    (["--fast"], "unknown option --fast"),
])
def test_gpu_check_refuses_bad_options_before_any_work(tmp_path, args, message):
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path / "out"), *args], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "out" / "summary.md").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a CUDA device")
def test_triton_tuning_needs_cuda_and_reports_stored_runs(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tune_triton.py"), "--out-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "tune_triton.py needs a CUDA device" in result.stderr
    stored = tmp_path / "run.json"
    shutil.copy(ROOT / "benchmarks" / "results" / "tune_triton_h200_bfloat16.json", stored)
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tune_triton.py"), "--report", str(stored)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == (tmp_path / "run.md").read_text() and (tmp_path / "run.rst").read_text().startswith(".. list-table::")


def test_tiled_profile_writes_its_table(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "profile_tiled.py"), "--n", "96", "--d", "8", "--rounds", "2",
                             "--threads", "1", "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "profile_tiled_cpu.json").read_text())
    assert len(data["result"]["ratios"]) == 2 and data["result"]["top_ops"]
    assert "tiled / floor over 2 alternating rounds" in (tmp_path / "profile_tiled_cpu.md").read_text()


def test_result_files_are_replaced_whole_or_not_at_all(tmp_path):
    import stat

    import common

    target = tmp_path / "table.md"
    common.write_text(target, "first\n")
    assert target.read_text() == "first\n" and stat.S_IMODE(target.stat().st_mode) == 0o644
    with pytest.raises(UnicodeEncodeError):  # a lone surrogate fails half-way through the write
        common.write_text(target, "second " + "\udcff")
    with pytest.raises(RuntimeError):
        with common.atomic_path(target) as tmp:
            tmp.write_text("third\n")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "first\n" and [p.name for p in tmp_path.iterdir()] == ["table.md"]
    common.save_json(tmp_path / "new" / "data.json", {"x": 1})
    assert stat.S_IMODE((tmp_path / "new" / "data.json").stat().st_mode) == 0o644
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["data.json"]


def test_kernel_tables_name_the_settings_of_the_runs_they_hold():
    import kernels_report

    def fig(impl, run=None, **kw):
        entry = dict(device="cpu", loss="m3co_pair", impl=impl, n=64, d=8, status="ok", times_s=[1.0], median_s=1.0, extra_peak_bytes=2**20)
        return dict(entry, run=run, **kw) if run else dict(entry, **kw)

    meta = dict(threads=4, torch="9.9")
    runs = {"a": dict(threads=2, torch="2.13.0"), "b": dict(threads=4, torch="9.9")}
    # every figure from runs with one setting: that setting, not meta's
    assert kernels_report._settings(dict(meta=meta, runs=runs, results=[fig("tiled", "a"), fig("floor", "a")])) == "2 torch threads, torch 2.13.0"
    # mixed settings, or figures older than the run records: meta is the last run's, and said so
    for results in ([fig("tiled", "a"), fig("floor", "b")], [fig("tiled", "b"), fig("floor")]):
        text = kernels_report._settings(dict(meta=meta, runs=runs, results=results))
        assert text.startswith("4 torch threads, torch 9.9 in the last run") and "other settings" in text


def test_fresh_process_kernel_table_divides_no_times(tmp_path):
    import kernels_report

    entry = dict(device="cpu", loss="m3co_pair", n=64, d=8, status="ok", extra_peak_bytes=2**20, loads=[1.0])
    results = [dict(entry, impl=impl, times_s=[t], median_s=t) for impl, t in (("textbook", 2.0), ("tiled", 1.0), ("floor", 0.5))]
    path = tmp_path / "k.json"
    path.write_text(json.dumps(dict(meta={}, results=results)))
    pytest.importorskip("matplotlib")
    kernels_report.report(path)
    md, rst = (tmp_path / "k.md").read_text(), (tmp_path / "k.rst").read_text()
    assert "| m3co_pair | 64 | 8 | 2.000 |  | 1.000 |  | 0.500 | 1 |  | 1 | 1.00 | 1 | 1.0 |" in md
    assert "tiled/floor" not in md and "tiled / floor" not in rst and "2.00" not in md.split("| 0.500 |")[1]
    assert "paired" in md and "paired" in rst


def test_triton_tuning_marks_a_configuration_whose_value_differs():
    import tune_triton

    def row(bm, median, diff, default=False):
        return dict(block_m=bm, block_n=32, block_d=32, num_warps=4, num_stages=3, default=default,
                    m3co_pair=dict(median_s=median, over_floor=median / 0.01, relative_difference=diff))

    data = dict(meta=dict(n=64, d=8, dtype="bfloat16", precision="bf16", gpu="GPU", torch="2", repeats=5, losses=["m3co_pair"]),
                floor_s=dict(m3co_pair=0.01),
                results=[row(16, 0.5, 0.0, default=True), row(32, 0.1, 5e-3), row(64, 0.4, 2e-4),
                         dict(row(128, 0.0, 0.0), m3co_pair=dict(error="OutOfResources: shared memory"))])
    lines = [line for line in tune_triton.report(data).splitlines() if line.startswith("| ") and line[2].isdigit()]
    # fastest first among the matching configurations; the one that differs (and the failed one) after them
    assert [line.split(" | ")[0] for line in lines] == ["| 64", "| 16 (default)", "| 32", "| 128"]
    assert lines[0].endswith("| 400.0 | 40 | 2.0e-04 |") and lines[2].endswith("| 100.0 | 10 | 5.0e-03 value differs |")
    assert "above 0.001" in tune_triton.report(data) and "timed once before the sweep" in tune_triton.report_rst(data)
