"""The tables (Markdown and reStructuredText) and the plot of ``bench_kernels.py``'s result files."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from common import load_results, save_json, write_text

ROOT = Path(__file__).resolve().parents[1]

LOSSES = ("m3co_pair", "multisoftclip_pair", "m3co", "multisoftclip")
IMPLS = ("textbook", "dense", "tiled", "triton", "floor")


def report_paired(path: Path) -> None:
    data = load_results(path)
    meta = data.get("meta", {})
    lines = [
        f"# Paired kernel timings ({meta.get('device', 'cpu')}{_dtype_note(meta)})",
        "",
        f"{_settings(data)}.",
        "One process per row runs the implementations in rotation on the same inputs (one forward + backward pass each per"
        " round, the order reversed every other round). Ratios are per round, `tiled time / other time`: median"
        " [first quartile, third quartile]. Times: median seconds per pass.",
        "",
        "| loss | N | D | rounds | textbook s | tiled s | floor s | tiled/textbook | tiled/floor | load |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    fmt_q = lambda q: f"{q[1]:.2f} [{q[0]:.2f}, {q[2]:.2f}]" if q else ""  # noqa: E731
    for r in sorted(data["results"], key=lambda r: (r["device"], LOSSES.index(r["loss"]), r["d"], r["n"])):
        if r["status"] != "ok":
            lines.append(f"| {r['loss']} | {r['n']} | {r['d']} | {r['status']}: {r.get('reason', '')} | | | | | | |")
            continue
        med, q = r["median_s"], r["ratio_quartiles"]
        cell = lambda i: f"{med[i]:.3f}" if i in med else ""  # noqa: E731
        lines.append(
            f"| {r['loss']} | {r['n']} | {r['d']} | {len(r['times_s']['tiled'])} | {cell('textbook')} | {cell('tiled')} | {cell('floor')} "
            f"| {fmt_q(q.get('textbook'))} | {fmt_q(q.get('floor'))} | {r['load_before'][0]:.1f} |"
        )
    write_text(path.with_suffix(".md"), "\n".join(lines) + "\n")
    write_text(path.with_suffix(".rst"), _paired_rst(data, fmt_q))


def _paired_rst(data: dict, fmt_q) -> str:
    """The paired table as reStructuredText for the docs."""
    meta = data.get("meta", {})
    head = ["loss", "N", "D", "rounds", "tiled / textbook", "tiled / floor", "tiled s", "floor s"]
    rows = []
    for r in sorted(data["results"], key=lambda r: (r["device"], LOSSES.index(r["loss"]), r["d"], r["n"])):
        if r["status"] != "ok":
            continue
        q, med = r["ratio_quartiles"], r["median_s"]
        rows.append([r["loss"], str(r["n"]), str(r["d"]), str(len(r["times_s"]["tiled"])), fmt_q(q.get("textbook")),
                     fmt_q(q.get("floor")), f"{med['tiled']:.3f}", f"{med['floor']:.3f}" if "floor" in med else ""])
    out = [
        f"Paired timings on {meta.get('processor', '?')} ({meta.get('cpu_count', '?')} cores), {_settings(data)}: one process per row, the implementations in rotation on the same inputs;"
        " per-round ratios, median [first quartile, third quartile].",
        "",
        ".. list-table::",
        "   :header-rows: 1",
        "",
    ]
    for row in [head] + rows:
        out.append("   * - " + row[0])
        out += [f"     - {cell or ' '}" for cell in row[1:]]
    return "\n".join(out) + "\n"


def _fmt_time(r) -> str:
    if r is None:
        return ""
    if r["status"] == "ok":
        return f"{r['median_s']:.3f}"
    return "skip" if r["status"] == "skipped" else r["status"]


def _fmt_mem(r) -> str:
    if r is None or r["status"] != "ok":
        return ""
    return f"{r['extra_peak_bytes'] / 2**20:.0f}"


def _settings(data: dict) -> str:
    """The torch threads and version the figures were measured with, as far as the file records them.

    Figures written since the runs are recorded name theirs (``run``, a key of ``data["runs"]``);
    ``meta`` holds the last run's settings only, which older figures may not share.
    """
    runs = data.get("runs", {})
    ok = [r for r in data["results"] if r["status"] == "ok"]
    known = {(runs[r["run"]].get("threads", "?"), runs[r["run"]].get("torch", "?")) for r in ok if r.get("run") in runs}
    if ok and len(known) == 1 and all(r.get("run") in runs for r in ok):
        threads, torch = known.pop()
        return f"{threads} torch threads, torch {torch}"
    meta = data.get("meta", {})
    return (f"{meta.get('threads', '?')} torch threads, torch {meta.get('torch', '?')} in the last run (figures recorded in"
            " earlier runs may have had other settings)")


def _mem_ratio(x, y) -> str:
    if x is None or y is None or x["status"] != "ok" or y["status"] != "ok" or y["extra_peak_bytes"] <= 0:
        return ""
    return f"{x['extra_peak_bytes'] / y['extra_peak_bytes']:.2f}"


def report(path: Path) -> None:
    data = load_results(path)
    results = data["results"]
    stale = False
    for r in results:  # medians are a function of the recorded passes (older files took the upper middle one)
        if r.get("times_s") and r.get("median_s") != statistics.median(r["times_s"]):
            r["median_s"], stale = statistics.median(r["times_s"]), True
    if stale:
        save_json(path, data)
    index = {(r["device"], r["loss"], r["impl"], r["n"], r["d"]): r for r in results}
    configs = sorted({(r["device"], r["loss"], r["n"], r["d"]) for r in results}, key=lambda c: (c[0], LOSSES.index(c[1]), c[3], c[2]))
    meta = data.get("meta", {})
    lines = [
        f"# Kernel benchmarks ({meta.get('device', 'cpu')}{_dtype_note(meta)})",
        "",
        f"{_settings(data)}.",
        "Forward + backward wall time (seconds; median over `passes` timed passes: 3 per fresh process, in one or more"
        " processes that alternate with the other implementations) and extra peak memory (MiB, the largest over those"
        " processes). `floor` is the bare matrix products the loss needs.",
        "The times of one row come from separate processes, possibly hours apart, so they are not divided here: time"
        " ratios are in the paired table (`--paired`, the implementations in rotation within one process). Memory ratio:"
        " tiled memory / textbook memory. `load` is the mean 1-minute load average before the tiled processes (the"
        f" machine has {meta.get('cpu_count', '?')} cores).",
        "",
        "| loss | N | D | textbook s | dense s | tiled s | triton s | floor s | textbook MiB | dense MiB | tiled MiB | mem tiled/textbook | passes | load |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for device, loss, n, d in configs:
        get = lambda impl: index.get((device, loss, impl, n, d))  # noqa: E731
        tb, de, ti, tr, fl = (get(i) for i in IMPLS)
        load = f"{sum(ti['loads']) / len(ti['loads']):.1f}" if ti is not None and ti.get("loads") else ""
        lines.append(
            f"| {loss} | {n} | {d} | {_fmt_time(tb)} | {_fmt_time(de)} | {_fmt_time(ti)} | {_fmt_time(tr)} | {_fmt_time(fl)} "
            f"| {_fmt_mem(tb)} | {_fmt_mem(de)} | {_fmt_mem(ti)} | {_mem_ratio(ti, tb)} "
            f"| {len(ti.get('times_s', [])) if ti else ''} | {load} |"
        )
    skipped = [r for r in results if r["status"] != "ok"]
    if skipped:
        lines += ["", "Not measured:", ""]
        lines += [f"- {r['loss']} {r['impl']} N={r['n']} D={r['d']}: {r['status']} ({r.get('reason', '')})" for r in skipped]
    write_text(path.with_suffix(".md"), "\n".join(lines) + "\n")
    write_text(path.with_suffix(".rst"), _rst(path, data, index, configs))
    _plot(path, results)


def _dtype_note(meta: dict) -> str:
    dtype = meta.get("dtype", "float32")
    return "" if dtype == "float32" else f", {dtype}"


def _rst(path: Path, data: dict, index: dict, configs: list) -> str:
    """The table as reStructuredText for the docs (docs/benchmarks.rst includes it)."""
    meta = data.get("meta", {})
    loads = [x for r in data["results"] for x in r.get("loads", [])]
    head = ["loss", "N", "D", "textbook s", "dense s", "tiled s", "floor s", "textbook MiB", "tiled MiB", "memory tiled / textbook"]
    rows = []
    for device, loss, n, d in configs:
        get = lambda impl: index.get((device, loss, impl, n, d))  # noqa: E731
        tb, de, ti, fl = get("textbook"), get("dense"), get("tiled"), get("floor")
        rows.append([loss, str(n), str(d), _fmt_time(tb), _fmt_time(de), _fmt_time(ti), _fmt_time(fl), _fmt_mem(tb), _fmt_mem(ti), _mem_ratio(ti, tb)])
    out = [
        f"Measured on {meta.get('processor', '?')} ({meta.get('cpu_count', '?')} cores), {_settings(data)}, "
        f"{meta.get('dtype', 'float32')}, t = {meta.get('temperature', 0.1)}; other jobs shared the machine "
        f"(1-minute load average {min(loads, default=0):.1f} to {max(loads, default=0):.1f} at the start of the runs). "
        "Times in seconds (forward + backward, median over 3 passes per fresh process, in one or more processes "
        "alternating with the other implementations), memory in MiB above the baseline; empty cells were not measured, "
        f"``skip`` cells did not fit (see ``{path.with_suffix('.md').name}``). The times of a row come from separate "
        "processes, possibly hours apart, over which this machine's speed drifts: they are not divided here, and the "
        "time ratios quoted on this page come from the paired table below.",
        "",
        ".. list-table::",
        "   :header-rows: 1",
        "",
    ]
    for row in [head] + rows:
        out.append("   * - " + (row[0] or " "))
        out += [f"     - {cell or ' '}" for cell in row[1:]]
    return "\n".join(out) + "\n"


def _plot(path: Path, results) -> None:
    """``<tag>.png``: time and memory against N per (loss, D), drawn by the docs' figure code."""
    if not any(r["status"] == "ok" for r in results):
        return
    sys.path.insert(0, str(ROOT / "docs"))
    import figures  # docs/figures.py: the docs draw the same panels from the stored JSON

    points = figures.kernel_points(path)
    data = load_results(path)
    title = f"{data.get('meta', {}).get('processor', '?')}, {_settings(data)}"
    figures.save_png(figures.kernel_overview_figure(points, title=title), path.with_suffix(".png"), dpi=100)
