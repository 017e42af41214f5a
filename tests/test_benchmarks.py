"""The benchmark scripts run end to end on tiny sizes and write their tables (no timing asserted)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench_kernels.py"


def _bench(*args: str, out: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(BENCH), "--n", "64", "--d", "8", "--repeats", "2", "--threads", "1", "--out-dir", str(out), "--tag", "t", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


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
