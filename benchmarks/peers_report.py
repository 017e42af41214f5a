"""Tables and plot of ``bench_peers.py``, made from its JSON alone.

``report(path)`` writes ``<stem>.md`` (every figure, auto's ratios to the fastest peer and to the
GEMM floor, how each peer was loaded and aligned), ``<stem>.rst`` (the docs' table) and ``<stem>.png``; the docs test rebuilds the first
two from the stored JSON and compares.
"""

from __future__ import annotations

from pathlib import Path

from common import atomic_path, load_results, quartiles, write_text
from peers import IMPLS

SHORT_STATUS = {"skipped": "skipped", "failed": "failed", "unavailable": "n/a"}


def _q(q, digits: int = 2) -> str:
    return f"{q[1]:.{digits}f} [{q[0]:.{digits}f}, {q[2]:.{digits}f}]"


def _mib(rec: dict) -> str:
    return f"{rec['extra_peak_bytes'] / 2**20:.0f}" if "extra_peak_bytes" in rec else ""


def _ok(rec: dict | None) -> bool:
    return rec is not None and rec.get("status") == "ok"


def fastest_peer(entry: dict) -> str | None:
    """The comparable peer with the smallest median time in the paired rounds (None if none ran)."""
    ran = [(rec["median_s"], name) for name, rec in entry["impls"].items()
           if _ok(rec) and IMPLS[name].family == "peer" and IMPLS[name].comparable]
    return min(ran)[1] if ran else None


def same_path(entry: dict) -> str | None:
    """The backend that ``auto`` ran here, recognised by bit-identical value and gradients (an A/A pair)."""
    for name in ("dense", "tiled"):
        rec = entry["impls"].get(name, {})
        if _ok(rec) and rec.get("rel_diff") == 0 and rec.get("grad_rel_diff") == 0 and name in entry.get("ratios", {}):
            return name
    return None


def comparisons(data: dict) -> list:
    """One row per (N, D) where ``auto`` was run: its ratios to the fastest comparable peer and to the GEMM floor."""
    out = []
    for entry in data["results"]:
        n, impls = entry["n"], entry["impls"]
        if "auto" not in impls:
            continue
        row = dict(n=n, d=entry["d"], peer=None, note="", auto_ran=_ok(impls["auto"]))
        peer = fastest_peer(entry) if _ok(impls["auto"]) else None
        if peer is None:
            reasons = "; ".join(f"{name}: {rec.get('status')}" for name, rec in impls.items()
                                if IMPLS[name].family == "peer" and IMPLS[name].comparable and name != "auto")
            row["note"] = ("auto did not run: " + impls["auto"].get("reason", "")) if not _ok(impls["auto"]) else (
                f"no comparable peer ran ({reasons}); auto ran")
            out.append(row)
            continue
        ratios = entry["ratios"]
        row.update(peer=peer, time=quartiles(ratios[peer]), auto_s=impls["auto"]["median_s"], peer_s=impls[peer]["median_s"])
        twin = same_path(entry)
        if twin:
            row["noise"], row["twin"] = quartiles(ratios[twin]), twin
        if "extra_peak_bytes" in impls["auto"] and impls[peer].get("extra_peak_bytes"):
            row["memory"] = impls["auto"]["extra_peak_bytes"] / impls[peer]["extra_peak_bytes"]
            row["auto_mib"], row["peer_mib"] = (impls[x]["extra_peak_bytes"] / 2**20 for x in ("auto", peer))
        if "floor" in ratios:
            row["floor"] = quartiles(ratios["floor"])[1]  # auto / floor: median of the per-round ratios
            row["floor_peer"] = quartiles([a / r for a, r in zip(ratios[peer], ratios["floor"])])[1]
        row["note"] = _same_rounds(entry, row)
        out.append(row)
    return out


def _same_rounds(entry: dict, row: dict) -> str:
    """The other backends' time against the same peer, from the same rounds."""
    ratios = entry.get("ratios", {})
    other = [name for name in ("dense", "tiled") if name in ratios]
    per_round = lambda name: [a / b for a, b in zip(ratios[row["peer"]], ratios[name])]  # noqa: E731 - name / peer
    return ", ".join(f"{name} {quartiles(per_round(name))[1]:.2f}" for name in other)


def _noise(row: dict) -> str:
    return f"{_q(row['noise'])} (auto / {row['twin']})" if "noise" in row else ""


def _floor(row: dict) -> tuple:
    return (f"{row['floor']:.2f}", f"{row['floor_peer']:.2f}") if "floor" in row else ("", "")


def _status(row: dict) -> str:
    return "no peer ran" if row.get("auto_ran") else "not measured"


def markdown(data: dict) -> str:
    meta, results = data["meta"], data["results"]
    loads = [x for r in results for x in (r["load_before"][0], r["load_after"][0])]
    runs = meta.get("runs", [])
    where = meta.get("gpu") or f"{meta.get('processor', '?')}, {meta.get('cpu_count', '?')} cores"
    lines = [
        f"# CLIP loss against the peer libraries ({meta['device']}, {meta['threads']} threads, torch {meta['torch']}, {meta['dtype']})",
        "",
        f"Machine: {where}. Forward + backward of the symmetric CLIP loss, t = {meta['temperature']}, on the same inputs for "
        "every implementation. Times: median seconds of the paired rounds (one process per (N, D) runs the implementations in "
        "rotation, one pass each per round, the order reversed every other round). `auto / this`: per-round ratios of auto's "
        "time to this implementation's, median [first quartile, third quartile]. Memory: extra peak MiB of one pass in a fresh "
        "process. Values are on this package's scale (mean over the batch of the sum of the two directions); `rel diff` and "
        f"`grad diff` are relative to ours (tolerances {meta['value_tolerance']:g} and {meta['grad_tolerance']:g}).",
        f"Other jobs shared the machine: 1-minute load average {min(loads, default=0):.1f} to {max(loads, default=0):.1f} "
        f"around the (N, D) runs ({len(runs)} run(s); first started {runs[0]['started'] if runs else '?'}, load at its start "
        f"{runs[0]['load_start'][0] if runs else 0:.1f}), so read the ratios, not the absolute times.",
        "",
        "## auto against the fastest peer",
        "",
        "Per (N, D): auto against the fastest comparable peer, time as the median [quartiles] of the per-round ratios, memory "
        "as the ratio of the extra peaks. `auto / floor`: auto's time over the GEMM floor's (the bare matrix products of the "
        "loss), `floor / peer`: the floor's over the peer's, medians of the same rounds. `same rounds`: the dense and tiled "
        "backends' time over the peer's, medians of the same rounds.",
        "",
        "`A/A noise`: auto against the backend that ran the same code in the same rounds (bit-identical value and "
        "gradients): a ratio that would be 1.00 on a quiet machine, its spread the noise of these measurements.",
        "",
        "| N | D | fastest peer | auto s | peer s | auto / peer time | A/A noise | auto MiB | peer MiB | auto / peer memory "
        "| auto / floor | floor / peer | same rounds |",
        "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in comparisons(data):
        if row["peer"] is None:
            lines.append(f"| {row['n']} | {row['d']} | {_status(row)} | | | | | | | | | | {row['note']} |")
            continue
        memory = f"{row['memory']:.3f}" if "memory" in row else ""
        floor, floor_peer = _floor(row)
        lines.append(
            f"| {row['n']} | {row['d']} | {IMPLS[row['peer']].label} | {row['auto_s']:.3f} | {row['peer_s']:.3f} | {_q(row['time'], 3)} "
            f"| {_noise(row)} | {row.get('auto_mib', 0):.0f} | {row.get('peer_mib', 0):.0f} | {memory} | {floor} | {floor_peer} "
            f"| {row['note']} |")
    lines += [
        "",
        "## Figures",
        "",
        "| N | D | implementation | status | rounds | median s | auto / this | extra MiB | value | rel diff | grad diff | check |",
        "| ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    not_run = []
    for entry in results:
        quartiles = entry.get("ratio_quartiles", {})
        for name, rec in entry["impls"].items():
            if not _ok(rec):
                not_run.append(f"- N={entry['n']} D={entry['d']} {name}: {rec.get('status')} ({rec.get('reason', '')})")
            fmt = lambda key, spec: format(rec[key], spec) if rec.get(key) is not None else ""  # noqa: E731
            lines.append(
                f"| {entry['n']} | {entry['d']} | {IMPLS[name].label} | {rec.get('status')} | {len(rec.get('times_s', [])) or ''} "
                f"| {fmt('median_s', '.3f')} | {_q(quartiles[name]) if name in quartiles else ''} | {_mib(rec)} "
                f"| {fmt('value', '.6f')} | {fmt('rel_diff', '.1e')} | {fmt('grad_rel_diff', '.1e')} | {rec.get('check', '')} |")
    if not_run:
        lines += ["", "## Not measured", ""] + not_run
    lines += ["", "## Implementations", ""]
    notes = {name: rec["note"] for entry in results for name, rec in entry["impls"].items() if rec.get("note")}
    for name, impl in IMPLS.items():
        if not any(name in entry["impls"] for entry in results):
            continue
        version = meta.get("versions", {}).get(name)
        head = f"{impl.label}" + (f" ({impl.distribution} {version or 'not installed'})" if impl.distribution else "")
        lines.append(f"- **{head}**: {meta['alignment'][name]} Loaded: {notes.get(name, 'not loaded')}.")
    return "\n".join(lines) + "\n"


def _cell(name: str, rec: dict | None) -> str:
    if rec is None:
        return ""
    if not _ok(rec):
        return SHORT_STATUS.get(rec.get("status"), rec.get("status", ""))
    # the floor's buffers are preallocated outside its pass: its memory is not a figure
    mib = f", {_mib(rec)} MiB" if "extra_peak_bytes" in rec and IMPLS[name].family != "reference" else ""
    return f"{rec['median_s']:.3g} s{mib}"


def rst(data: dict, png_name: str) -> str:
    """The docs' table: one row per (N, D), one column per implementation, then auto / fastest peer."""
    meta, results = data["meta"], data["results"]
    names = [name for name in IMPLS if any(name in r["impls"] for r in results)]
    head = ["N", "D"] + [IMPLS[name].label for name in names] + ["auto / fastest peer: time, memory"]
    rows = []
    for r in results:
        peer = fastest_peer(r) if _ok(r["impls"].get("auto")) else None
        ratio = ""
        if peer is not None and peer in r.get("ratio_quartiles", {}):
            memory = ""
            if r["impls"]["auto"].get("extra_peak_bytes") is not None and r["impls"][peer].get("extra_peak_bytes"):
                memory = f", {r['impls']['auto']['extra_peak_bytes'] / r['impls'][peer]['extra_peak_bytes']:.2f}"
            ratio = f"{_q(r['ratio_quartiles'][peer])}{memory} ({IMPLS[peer].label.split()[0]})"
        rows.append([str(r["n"]), str(r["d"])] + [_cell(name, r["impls"].get(name)) for name in names] + [ratio])
    loads = [x for r in results for x in (r["load_before"][0], r["load_after"][0])]
    where = meta.get("gpu") or f"{meta.get('processor', '?')} ({meta.get('cpu_count', '?')} cores)"
    out = [
        f"Measured on {where}, {meta['threads']} torch threads, torch {meta['torch']}, {meta['dtype']}, t = {meta['temperature']}; "
        f"other jobs shared the machine (1-minute load average {min(loads, default=0):.1f} to {max(loads, default=0):.1f}). "
        "Cells: median seconds of forward + backward in the paired rounds, and extra peak MiB in a fresh process; "
        "``skipped``: over the memory or time budget, ``failed``: ran out of memory or raised, ``n/a``: not installed or "
        "CUDA only (reasons in ``benchmarks/results/" + png_name.replace(".png", ".md") + "``). Last column: auto / fastest "
        "comparable peer, per-round time ratio median [quartiles], then the memory ratio. SigLIP and lightly's NT-Xent are "
        "different losses, timed only.",
        "",
        ".. list-table::",
        "   :header-rows: 1",
        "",
    ]
    _list_table(out, [head] + rows)
    out += [
        "",
        "auto against the fastest comparable peer and the GEMM floor (the bare matrix products of the loss), medians of the "
        "per-round ratios; same rounds: the dense and tiled backends' time over the peer's. A/A noise: auto against the "
        "backend that ran the same code (bit-identical value and gradients) in the same rounds, 1.00 on a quiet machine.",
        "",
        ".. list-table::",
        "   :header-rows: 1",
        "",
    ]
    comparison_rows = [["N", "D", "fastest peer", "auto / peer time", "A/A noise", "auto / peer memory", "auto / floor",
                        "floor / peer", "same rounds"]]
    for row in comparisons(data):
        peer = IMPLS[row["peer"]].label if row["peer"] else _status(row)
        memory = f"{row['memory']:.3f}" if "memory" in row else ""
        comparison_rows.append([str(row["n"]), str(row["d"]), peer, _q(row["time"], 3) if row["peer"] else "", _noise(row), memory,
                                *_floor(row), row["note"]])
    _list_table(out, comparison_rows)
    out += ["", f".. image:: ../benchmarks/results/{png_name}", "   :width: 100%", ""]
    return "\n".join(out)


def _list_table(out: list, rows: list) -> None:
    for row in rows:
        out.append("   * - " + (row[0] or " "))
        out += [f"     - {cell or ' '}" for cell in row[1:]]


def plot(data: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    results = data["results"]
    dims = sorted({r["d"] for r in results})
    names = [name for name in IMPLS if any(_ok(r["impls"].get(name)) for r in results)]
    fig, axes = plt.subplots(2, len(dims), figsize=(6.5 * len(dims), 8.5), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for col, d in enumerate(dims):
        for i, name in enumerate(names):
            pts = sorted((r["n"], r["impls"][name]) for r in results if r["d"] == d and _ok(r["impls"].get(name)))
            if not pts:
                continue
            impl = IMPLS[name]
            style = dict(color=cmap(i % 10), marker="o", markersize=4, label=impl.label + ("" if impl.comparable or impl.family == "reference" else " (other loss)"),
                         linestyle="-" if impl.family == "ours" else (":" if impl.family == "reference" else "--"),
                         linewidth=2.2 if name == "auto" else 1.3)
            axes[0][col].plot([p[0] for p in pts], [p[1]["median_s"] for p in pts], **style)
            mem = [(p[0], p[1]["extra_peak_bytes"]) for p in pts if "extra_peak_bytes" in p[1] and impl.family != "reference"]
            if mem:
                axes[1][col].plot([m[0] for m in mem], [max(m[1], 2**20) / 2**20 for m in mem], **style)
        ns = sorted({r["n"] for r in results})
        for row, ylabel in enumerate(("forward + backward time (s)", "extra peak memory (MiB)")):
            ax = axes[row][col]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(ns, [str(n) for n in ns], rotation=30 if len(ns) > 4 else 0)
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}"))
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel("batch size N")
            ax.set_ylabel(ylabel)
            ax.set_title(f"D = {d}")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    meta = data["meta"]
    fig.suptitle(f"CLIP loss, {meta['device']} ({meta['threads']} threads), {meta['dtype']}: missing points were skipped or failed "
                 "(see the .md)", fontsize=10)
    fig.tight_layout()
    try:
        with atomic_path(png) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)


def report(path: Path) -> None:
    """Write ``<stem>.md``, ``<stem>.rst`` and ``<stem>.png`` from the JSON at ``path``."""
    path = Path(path)
    data = load_results(path)
    write_text(path.with_suffix(".md"), markdown(data))
    write_text(path.with_suffix(".rst"), rst(data, path.with_suffix(".png").name))
    try:
        plot(data, path.with_suffix(".png"))
    except ImportError:  # matplotlib is in the examples extra; the tables do not need it
        pass
