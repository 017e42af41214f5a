"""The measured tables in the docs, and the figures README.md quotes, are the stored result files, regenerated.

Each table is rebuilt from its JSON with the function that first wrote it, and its summary
figures from the per-seed (or per-round) records they summarise. A figure edited by hand, or a
result file rerun without pasting its table, fails here.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

RESULTS = ROOT / "examples" / "results"
BENCH_RESULTS = ROOT / "benchmarks" / "results"
README = (ROOT / "README.md").read_text()
MEDICAL = (ROOT / "docs" / "medical.rst").read_text()
QUICKSTART = (ROOT / "docs" / "quickstart.rst").read_text()
BENCHMARKS = (ROOT / "docs" / "benchmarks.rst").read_text()


def md_rows(text: str) -> list:
    """The cells of every Markdown table row, the separator rows left out."""
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and not set(line) <= set("|-: "):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def rst_list_tables(text: str) -> list:
    """Every ``list-table`` of an rst page as rows of cells (``code`` written as Markdown's `code`)."""
    tables = []
    for match in re.finditer(r"^\.\. list-table::\n((?:[ \t]*\n|   .*\n)+)", text, flags=re.M):
        rows = []
        for line in match.group(1).splitlines():
            if line.startswith("   * -"):
                rows.append([line[len("   * -") :].strip()])
            elif line.startswith("     -"):
                rows[-1].append(line[len("     -") :].strip())
        tables.append([[cell.replace("``", "`") for cell in row] for row in rows])
    return tables


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def assert_summaries_follow_the_seeds(results: dict) -> None:
    import training

    for protocol, metrics in results["protocols"].items():
        for metric, stat in metrics.items():
            values = [seed["protocols"][protocol][metric] for seed in results["per_seed"]]
            assert stat == pytest.approx(training.report.mean_and_std(values), rel=1e-12), (results["method"], protocol, metric)


@pytest.mark.parametrize("folder, tag", [("rosmap_grid", "rosmap-table"), ("rosmap_released", "rosmap-released-table")])
def test_rosmap_grid_tables_are_the_stored_seeds(folder, tag):
    import rosmap_grid

    stored = (RESULTS / folder / "grid.md").read_text()
    methods = list(load(RESULTS / folder / "grid.json"))
    rows = {method: load(RESULTS / folder / f"{method}.json") for method in methods}
    for results in rows.values():
        assert_summaries_follow_the_seeds(results)
    assert rosmap_grid.grid_markdown(rows, title=stored.splitlines()[0]) == stored
    assert md_rows(stored) in rst_list_tables(MEDICAL), f"docs/medical.rst lacks the table of {folder}/grid.md"


def test_rosmap_tuning_table_is_the_stored_seeds():
    import rosmap_tune

    folder = RESULTS / "rosmap_tune"
    record = load(folder / "tune.json")
    rows = {name: load(folder / name / "results.json") for name in record["settings"]}
    for results in rows.values():
        assert_summaries_follow_the_seeds(results)
    assert rosmap_tune.choose(rows) == record["chosen"]
    stored = (folder / "tune.md").read_text()
    assert rosmap_tune.tune_markdown(rows, record["chosen"], title=stored.splitlines()[0]) == stored
    assert md_rows(stored) in rst_list_tables(MEDICAL)


@pytest.mark.parametrize("tag, stem, paired", [("kernels-table", "kernels_cpu", False), ("kernels-paired-table", "kernels_cpu_paired", True)])
def test_kernel_tables_are_the_stored_measurements(tmp_path, tag, stem, paired):
    pytest.importorskip("matplotlib")
    import bench_kernels

    copy = tmp_path / f"{stem}.json"
    shutil.copy(BENCH_RESULTS / f"{stem}.json", copy)
    (bench_kernels.report_paired if paired else bench_kernels.report)(copy)
    for suffix in ("md", "rst"):
        assert (tmp_path / f"{stem}.{suffix}").read_text() == (BENCH_RESULTS / f"{stem}.{suffix}").read_text()
    assert f".. include:: ../benchmarks/results/{stem}.rst" in BENCHMARKS


def test_target_tables_are_the_stored_measurements(tmp_path):
    import bench_targets

    for kind in ("paired", "memory"):
        shutil.copy(BENCH_RESULTS / f"targets_cpu_{kind}.json", tmp_path / f"targets_cpu_{kind}.json")
    bench_targets.report(tmp_path, "targets_cpu")
    targets = (ROOT / "docs" / "targets.rst").read_text()
    for kind in ("paired", "memory"):
        for suffix in ("md", "rst"):
            assert (tmp_path / f"targets_cpu_{kind}.{suffix}").read_text() == (BENCH_RESULTS / f"targets_cpu_{kind}.{suffix}").read_text()
        assert f".. include:: ../benchmarks/results/targets_cpu_{kind}.rst" in targets
    memory = (BENCH_RESULTS / "targets_cpu_memory.rst").read_text()
    # times from fresh processes run apart are not set side by side; the guess at large N says what it is
    head = rst_list_tables(memory)[0][0]
    assert head[:3] == ["implementation", "N", "D"] and not any(cell.endswith(" s") or "median" in cell for cell in head), head
    assert "A rough extrapolation" in memory and "rough extrapolation" in " ".join(targets.split())


def test_compile_figures_are_the_stored_rounds():
    import bench_compile
    from common import quartiles

    for stem in ("compile_cpu", "compile_cpu_tiled"):
        data = load(BENCH_RESULTS / f"{stem}.json")
        assert bench_compile.report(data) == (BENCH_RESULTS / f"{stem}.md").read_text()
        medians = []
        for entry in data["results"]:
            times = entry["times_s"]
            ratios = [c / e for c, e in zip(times["compiled"], times["eager"])]
            assert entry["ratios"]["eager"] == pytest.approx(ratios, rel=1e-12)
            medians.append(quartiles(ratios)[1])
        quoted = f"{min(medians):.2f}-{max(medians):.2f}"
        assert quoted in " ".join(BENCHMARKS.split()) and quoted in " ".join(QUICKSTART.split()), (stem, quoted)


def test_quoted_best_rosmap_time_is_the_fastest_stored_run():
    runs = [load(path) for path in sorted((RESULTS / "rosmap_bench").glob("bench*.json"))]
    runs = [r for r in runs if r["method"] == "m3col" and len(r["seeds"]) == 5 and r["epochs"] == 500]
    best = f"the best time measured is {min(r['wall_seconds'] for r in runs):.0f} s"
    assert best in " ".join(BENCHMARKS.split()) and best in " ".join(MEDICAL.split()), best


def test_quoted_rosmap_compile_figures_are_the_stored_rounds():
    medians, compile_seconds = [], []
    for name in ("compile_warm", "compile_cold"):
        record = load(RESULTS / "rosmap_bench" / f"{name}.json")
        for phase in record["phases"].values():
            times = phase["step_seconds"]
            assert phase["compiled_over_eager"] == pytest.approx([c / e for c, e in zip(times["compiled"], times["eager"])], rel=1e-12)
            medians.append(phase["ratio_quartiles"][1])
        compile_seconds.append(sum(p["first_compiled_call_seconds"] for p in record["phases"].values()))
    assert f"took {min(medians):.2f}-{max(medians):.2f} of the eager time" in " ".join(BENCHMARKS.split())
    warm, cold = compile_seconds
    assert f"{warm:.0f} s per process with the cache warm and {cold:.0f} s cold" in " ".join(BENCHMARKS.split())
    side = {impl: load(RESULTS / "rosmap_bench" / f"compile_side_by_side_{impl}.json")["seconds"] for impl in ("compiled", "eager")}
    assert f"{side['compiled']:.0f} s compiled and {side['eager']:.0f} s eager" in " ".join(BENCHMARKS.split())


def test_released_loop_figures_are_the_stored_seeds():
    import rosmap_released_loop as loop

    record = load(RESULTS / "rosmap_released_loop" / "released_loop.json")
    medical = " ".join(MEDICAL.split())
    for variant in loop.VARIANTS:
        runs = record["variants"][variant]
        assert [run["seed"] for run in runs] == [0, 1, 2, 3, 4]
        for run in runs:
            assert [s["epoch"] for s in run["scores"]] == list(range(0, 500, 10))
            assert {k: run[k] for k in ("best", "last")} == loop.best_and_last(run["scores"])
        quoted = loop.describe(record, variant)
        assert quoted in medical, quoted
    sentence = loop.comparison(record, load(RESULTS / "rosmap_released" / "m3col.json"))
    assert sentence in medical, sentence


@pytest.mark.parametrize("stem", ["peers_cpu", "peers_cpu_target"])
def test_peers_tables_are_the_stored_measurements(tmp_path, stem):
    import statistics

    import peers_report

    copy = tmp_path / f"{stem}.json"
    shutil.copy(BENCH_RESULTS / f"{stem}.json", copy)
    peers_report.report(copy)
    for suffix in ("md", "rst"):
        assert (tmp_path / f"{stem}.{suffix}").read_text() == (BENCH_RESULTS / f"{stem}.{suffix}").read_text()
    data = load(copy)
    for entry in data["results"]:
        impls = entry["impls"]
        for rec in impls.values():
            if rec.get("times_s"):
                assert rec["median_s"] == pytest.approx(statistics.median(rec["times_s"]), rel=1e-12)
        for name, ratios in entry.get("ratios", {}).items():
            per_round = [x / y for x, y in zip(impls[entry["base"]]["times_s"], impls[name]["times_s"])]
            assert ratios == pytest.approx(per_round, rel=1e-12), (entry["n"], entry["d"], name)
    assert f".. include:: ../benchmarks/results/{stem}.rst" in BENCHMARKS


def percent(stat) -> str:
    mean, std = stat["mean"], stat["std"]
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def test_readme_figures_are_the_stored_results():
    """The reproduction status and the speed sentence of README.md, from the files they summarise."""
    import statistics

    readme = " ".join(README.split())
    grid = load(RESULTS / "rosmap_grid" / "m3col.json")["protocols"]["validation"]["acc"]
    released = load(RESULTS / "rosmap_released" / "m3col.json")["protocols"]["best_on_test"]["acc"]
    loop = [run["best"]["acc"] for run in load(RESULTS / "rosmap_released_loop" / "released_loop.json")["variants"]["released"]]
    loop_stat = {"mean": statistics.mean(loop), "std": statistics.stdev(loop)}
    for stat in (grid, released, loop_stat):
        assert f"{percent(stat)} %" in readme, percent(stat)
    target = load(BENCH_RESULTS / "peers_cpu_target.json")["results"][0]
    assert (target["n"], target["d"]) == (8192, 512)
    time = statistics.median(target["ratios"]["open_clip"])
    memory = target["impls"]["auto"]["extra_peak_bytes"] / target["impls"]["open_clip"]["extra_peak_bytes"]
    assert f"took {time:.2f} of open_clip's `ClipLoss` time and {memory:.2f} of its extra memory" in readme


def test_quoted_temperature_figures_are_the_stored_rounds():
    import bench_temperature

    page = " ".join(BENCHMARKS.split())
    entries = []
    for tag, losses in (("temperature_cpu", ["clip_loss", "m3co_pair", "multisoftclip_pair"]), ("temperature_targets_cpu", ["contrastive_loss[labels]", "m3co_pair"]),
                         ("temperature_final_cpu", ["clip_loss", "m3co_pair", "multisoftclip_pair", "contrastive_loss[labels]"])):
        data = load(BENCH_RESULTS / f"{tag}.json")
        assert bench_temperature.report(data) == (BENCH_RESULTS / f"{tag}.md").read_text()
        assert [entry["loss"] for entry in data["results"]] == losses
        assert data["meta"]["threads"] == 2 and all(entry["max_abs_difference"] == 0.0 for entry in data["results"])
        entries += data["results"]
    for entry in entries:
        times = entry["times_s"]
        ratios = [t / f for t, f in zip(times["tensor"], times["float"])]
        assert entry["ratios"] == pytest.approx(ratios, rel=1e-12)
        low, median, high = bench_temperature.quartiles(ratios)
        assert (entry["n"], entry["d"], entry["backend"]) == (8192, 512, "tiled")
        quoted = f"``{entry['loss']}`` {median:.3f} [{low:.3f}, {high:.3f}]"
        assert quoted in page, quoted


def test_quoted_tiled_profile_is_the_stored_run():
    import profile_tiled

    data = load(BENCH_RESULTS / "profile_tiled_cpu.json")
    assert profile_tiled.report(data) == (BENCH_RESULTS / "profile_tiled_cpu.md").read_text()
    r = data["result"]
    ratios = [t / f for t, f in zip(r["times_s"]["tiled"], r["times_s"]["floor"])]
    assert r["ratios"] == pytest.approx(ratios, rel=1e-12)
    low, median, high = profile_tiled.quartiles(ratios)
    assert f"tiled / floor {median:.2f} [{low:.2f}, {high:.2f}]" in " ".join(BENCHMARKS.split())


def test_triton_tuning_table_is_the_stored_run():
    import tune_triton

    data = load(BENCH_RESULTS / "tune_triton_h200_bfloat16.json")
    assert tune_triton.report(data) == (BENCH_RESULTS / "tune_triton_h200_bfloat16.md").read_text()
    assert tune_triton.report_rst(data) == (BENCH_RESULTS / "tune_triton_h200_bfloat16.rst").read_text()
    assert ".. include:: ../benchmarks/results/tune_triton_h200_bfloat16.rst" in BENCHMARKS
    rows = [row["m3co_pair"] for row in data["results"] if "median_s" in row["m3co_pair"]]
    assert all(r["over_floor"] == pytest.approx(r["median_s"] / data["floor_s"]["m3co_pair"], rel=1e-12) for r in rows)
    # the quoted range is over configurations that compute the default's value
    assert all(r["relative_difference"] == 0.0 for r in rows)
    medians = sorted(r["median_s"] for r in rows)
    default = next(row["m3co_pair"]["median_s"] for row in data["results"] if row["default"])
    floor = data["floor_s"]["m3co_pair"]
    best, worst, floor_ms = f"{medians[0]:.2f}", f"{medians[-1]:.2f}", f"{1e3 * floor:.1f}"
    kernels = " ".join((ROOT / "docs" / "kernels.rst").read_text().split())
    benchmarks = " ".join(BENCHMARKS.split())
    quoted = f"took {best}-{worst} s over the block sizes tried, {round(medians[0] / floor)}-{round(medians[-1] / floor)} times the bare bfloat16 products ({floor_ms} ms, timed once before the sweep)"
    assert quoted in kernels, quoted
    quoted = (f"Every configuration gave the value of the default blocks (relative difference 0). The best took {best} s for a forward and backward pass, "
              f"{round(medians[0] / floor)} times the bare bfloat16 products ({floor_ms} ms, timed once before the sweep); the default blocks {default:.2f} s.")
    assert quoted in benchmarks, quoted
    assert f"Triton kernels took {round(medians[0] / floor)} times the bfloat16 floor" in benchmarks


def test_quoted_peer_figures_are_the_stored_rounds():
    import statistics

    text = " ".join(BENCHMARKS.split())
    rows = {(row["n"], row["d"]): row for row in load(BENCH_RESULTS / "peers_cpu.json")["results"]}

    def ratios(n, d):
        row = rows[(n, d)]
        time = statistics.median(row["ratios"]["open_clip"])
        memory = row["impls"]["auto"]["extra_peak_bytes"] / row["impls"]["open_clip"]["extra_peak_bytes"]
        return time, memory

    small = sorted(f"{ratios(1024, d)[0]:.2f}" for d in (512, 768))
    assert f"At :math:`N = 1024` ``auto`` took {small[0]}-{small[1]} of open_clip's time" in text
    for (n, d), words in (((8192, 512), "{:.2f} of its time and {:.2f} of its extra memory"), ((16384, 512), "{:.2f} and {:.2f} (both"),
                          ((8192, 768), "{:.2f} and {:.2f} (189 MiB")):
        time, memory = ratios(n, d)
        assert words.format(time, memory) in text, (n, d, time, memory)
