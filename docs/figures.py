"""The docs' pictures, drawn from the stored result files.

    python docs/figures.py OUT_DIR [--force]

``docs/conf.py`` calls :func:`build_all` when Sphinx starts, so the pictures in the built pages
are always those of the result files in the tree: no picture is committed. A figure is redrawn
when its PNG is missing or older than one of its sources (or this file). The figures:

``kernels_time.png``, ``kernels_memory.png``
    ``benchmarks/results/kernels_cpu.json``: forward + backward time and extra peak memory
    against N, one panel per loss and D, one colour and marker per implementation.
``rosmap_accuracy.png``
    ``examples/results/rosmap_grid/`` and ``rosmap_released/``: each method's test accuracy,
    mean ± sample std over seeds, under every protocol stored, beside the published figures.
``rosmap_curves.png``
    ``examples/results/rosmap_curves/m3col/``: loss and accuracy per epoch of one run, the mean
    and the range over its seeds.

A result file that is missing or lacks a field raises :class:`ResultFileError` naming the file
and the field, before anything is drawn.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
KERNELS_JSON = ROOT / "benchmarks" / "results" / "kernels_cpu.json"
ROSMAP_GRIDS = (ROOT / "examples" / "results" / "rosmap_grid", ROOT / "examples" / "results" / "rosmap_released")
ROSMAP_CURVES = ROOT / "examples" / "results" / "rosmap_curves" / "m3col"

# Okabe-Ito colours (distinguishable with the common colour-vision deficiencies), plus a marker
# each, so that a panel still reads in grey
IMPL_STYLE = {
    "textbook": dict(color="#D55E00", marker="s", linestyle="-"),
    "dense": dict(color="#E69F00", marker="^", linestyle="-"),
    "tiled": dict(color="#0072B2", marker="o", linestyle="-"),
    "triton": dict(color="#CC79A7", marker="D", linestyle="-"),
    "floor": dict(color="#666666", marker="v", linestyle="--"),
}
PROTOCOL_STYLE = {  # optimistic protocols (chosen on the test set) get hollow markers
    "validation": dict(label="validation (epoch chosen on held-out data)", color="#0072B2", marker="o", fill=True),
    "final": dict(label="final epoch", color="#009E73", marker="s", fill=True),
    "best_on_test": dict(label="best-on-test* (optimistic)", color="#D55E00", marker="D", fill=False),
    "common_epoch": dict(label="common-epoch* (optimistic)", color="#CC79A7", marker="^", fill=False),
}


class ResultFileError(ValueError):
    """A result file is missing, unreadable, or lacks a field a figure needs (the message names both)."""


# ----------------------------------------------------------------------------- reading


def load_json(path: Path) -> Any:
    """The parsed JSON of ``path``; :class:`ResultFileError` naming it when missing or malformed."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ResultFileError(f"{path}: result file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ResultFileError(f"{path}: not a readable JSON file ({err})") from None


def _field(obj: Any, path: Path, *keys: Any) -> Any:
    """``obj[k0][k1]...``; a missing key or a wrong container names the file and the key path."""
    for depth, key in enumerate(keys):
        container = dict if isinstance(key, str) else list
        if not isinstance(obj, container) or (key not in obj if container is dict else not -len(obj) <= key < len(obj)):
            where = "/".join(map(str, keys[: depth + 1]))
            raise ResultFileError(f"{path}: missing field {where}")
        obj = obj[key]
    return obj


def _number(value: Any, path: Path, where: str, *, optional: bool = False) -> Optional[float]:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ResultFileError(f"{path}: {where} must be a finite number, got {value!r}")
    return float(value)


def _stat(obj: Any, path: Path, *keys: Any) -> Tuple[float, Optional[float]]:
    """A ``{"mean", "std"}`` record (std null for one seed) as ``(mean, std)``."""
    where = "/".join(map(str, keys))
    mean = _number(_field(obj, path, *keys, "mean"), path, f"{where}/mean")
    std = _number(_field(obj, path, *keys, "std"), path, f"{where}/std", optional=True)
    return mean, std


def kernel_points(path: Path) -> List[Dict[str, Any]]:
    """The measured figures of a ``bench_kernels.py`` results file: loss, impl, n, d, seconds, mib.

    ``seconds`` is the median of the recorded passes (as the benchmark's tables), ``mib`` the
    extra peak memory in MiB (None when not positive); figures that were skipped are left out.
    """
    data = load_json(path)
    points = []
    for i, r in enumerate(_field(data, path, "results")):
        status = _field(data, path, "results", i, "status")
        if status != "ok":
            continue
        point = {k: _field(data, path, "results", i, k) for k in ("loss", "impl", "n", "d")}
        for k in ("n", "d"):
            if isinstance(point[k], bool) or not isinstance(point[k], int) or point[k] < 1:
                raise ResultFileError(f"{path}: results/{i}/{k} must be a positive integer, got {point[k]!r}")
        if point["impl"] not in IMPL_STYLE:
            raise ResultFileError(f"{path}: results/{i}/impl is {point['impl']!r}, not one of {', '.join(IMPL_STYLE)}")
        times = r.get("times_s") if isinstance(r, dict) else None
        if times:
            values = [_number(t, path, f"results/{i}/times_s") for t in times]
            point["seconds"] = statistics.median(values)
        else:
            point["seconds"] = _number(_field(data, path, "results", i, "median_s"), path, f"results/{i}/median_s")
        extra = _number(r.get("extra_peak_bytes"), path, f"results/{i}/extra_peak_bytes", optional=True)
        point["mib"] = extra / 2**20 if extra is not None and extra > 0 else None
        points.append(point)
    if not points:
        raise ResultFileError(f"{path}: no measured figure (status 'ok') to draw")
    return points


def rosmap_grid(folder: Path) -> Dict[str, Any]:
    """The per-method results of a ``rosmap_grid.py`` run: method order, accuracies, published rows.

    Methods are those of ``grid.json`` (in its order) when present, else every ``<method>.json``.
    Returns ``{"methods": [...], "acc": {method: {protocol: (mean, std)}}, "published":
    {label: (mean, std)}, "title": str}``; ``common_epoch`` is the test accuracy at the best
    common epoch, where recorded.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ResultFileError(f"{folder}: result folder not found")
    grid = folder / "grid.json"
    if grid.exists():
        listing = load_json(grid)
        if not isinstance(listing, dict) or not listing:
            raise ResultFileError(f"{grid}: expected an object with one entry per method")
        methods = list(listing)
    else:
        methods = sorted(p.stem for p in folder.glob("*.json"))
    if not methods:
        raise ResultFileError(f"{folder}: no result file (<method>.json)")
    acc: Dict[str, Dict[str, Tuple[float, Optional[float]]]] = {}
    published: Dict[str, Tuple[float, Optional[float]]] = {}
    conventions, holdouts = set(), set()
    for method in methods:
        path = folder / f"{method}.json"
        results = load_json(path)
        protocols = _field(results, path, "protocols")
        if not isinstance(protocols, dict) or not protocols:
            raise ResultFileError(f"{path}: protocols must be a non-empty object")
        row = {name: _stat(results, path, "protocols", name, "acc") for name in protocols}
        unknown = set(row) - set(PROTOCOL_STYLE)
        if unknown:
            raise ResultFileError(f"{path}: unknown protocol {', '.join(sorted(unknown))}")
        if results.get("best_common_epoch"):
            row["common_epoch"] = _stat(results, path, "best_common_epoch", "acc")
        acc[method] = row
        for label, metrics in (results.get("published") or {}).items():
            pair = _field(metrics, path, "acc") if isinstance(metrics, dict) else None
            if not isinstance(pair, list) or len(pair) != 2:
                raise ResultFileError(f"{path}: published/{label}/acc must be [mean, std]")
            published[label] = (_number(pair[0], path, f"published/{label}/acc"), _number(pair[1], path, f"published/{label}/acc", optional=True))
        conventions.add(_field(results, path, "convention"))
        holdouts.add(_field(results, path, "config", "holdout"))
    holdout = holdouts.pop() if len(holdouts) == 1 else None
    split = "no hold-out" if holdout == 0 else (f"{100 * holdout:.0f} % of the training set held out" if holdout is not None and holdout < 1 else "mixed hold-outs")
    title = f"convention '{conventions.pop()}', {split}" if len(conventions) == 1 else f"mixed conventions, {split}"
    return {"methods": methods, "acc": acc, "published": published, "title": title}


HISTORY_KEYS = ("epoch", "lr", "train_loss", "val_loss", "val_acc", "test_loss", "test_acc")


def rosmap_histories(folder: Path) -> Dict[str, Any]:
    """The per-epoch histories of one stored run: ``results.json`` and its ``seeds/seed<N>.json``.

    Returns ``{"label", "published", "seeds": [{key: list}]}``; every seed must share its epochs.
    """
    folder = Path(folder)
    path = folder / "results.json"
    results = load_json(path)
    seeds = _field(results, path, "seeds")
    if not isinstance(seeds, list) or not seeds:
        raise ResultFileError(f"{path}: seeds must be a non-empty list")
    histories = []
    for seed in seeds:
        seed_path = folder / "seeds" / f"seed{seed}.json"
        history = _field(load_json(seed_path), seed_path, "history")
        columns = {k: _field(history, seed_path, k) for k in HISTORY_KEYS}
        lengths = {len(v) if isinstance(v, list) else -1 for v in columns.values()}
        if len(lengths) != 1 or lengths == {-1} or lengths == {0}:
            raise ResultFileError(f"{seed_path}: history/{', '.join(HISTORY_KEYS)} must be lists of one common, non-zero length")
        for k, values in columns.items():
            columns[k] = [_number(v, seed_path, f"history/{k}/{j}", optional=k not in ("epoch", "lr", "train_loss")) for j, v in enumerate(values)]
        if histories and columns["epoch"] != histories[0]["epoch"]:
            raise ResultFileError(f"{seed_path}: history/epoch differs from seed {seeds[0]}'s")
        histories.append(columns)
    published = _field(results, path, "published")
    reference = None
    if isinstance(published, dict) and published:
        label, metrics = next(iter(published.items()))
        reference = (label, _number(_field(metrics, path, "acc", 0), path, f"published/{label}/acc"))
    method, convention = _field(results, path, "method"), _field(results, path, "convention")
    label = f"{method}, convention '{convention}', seeds {', '.join(map(str, seeds))}"
    protocols = _field(results, path, "protocols")
    if isinstance(protocols, dict) and "validation" in protocols:
        mean, std = _stat(results, path, "protocols", "validation", "acc")
        label += f"; validation-protocol test accuracy {100 * mean:.1f}" + (f" ± {100 * std:.1f}" if std is not None else "")
    return {"label": label, "published": reference, "seeds": histories}


# ----------------------------------------------------------------------------- drawing


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display; also keeps a GUI backend's start-up out of the docs build
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.titlesize": 10, "legend.fontsize": 9, "savefig.facecolor": "white"})
    return plt


def kernel_panels(points: Sequence[Dict[str, Any]], *, min_sizes: int = 2) -> List[Tuple[str, int]]:
    """The (loss, D) pairs measured at ``min_sizes`` or more N (by default a single N, which draws
    no line, is left to the tables)."""
    ns: Dict[Tuple[str, int], set] = {}
    for p in points:
        ns.setdefault((p["loss"], p["d"]), set()).add(p["n"])
    return sorted((key for key, n in ns.items() if len(n) >= min_sizes), key=lambda key: (key[0].replace("_pair", ""), key[0], key[1]))


def _kernel_axes(ax, points, loss: str, d: int, metric: str) -> List[str]:
    drawn = []
    for impl, style in IMPL_STYLE.items():
        if metric == "mib" and impl == "floor":
            continue  # the floor writes into preallocated buffers: its memory is not a loss's
        xy = sorted((p["n"], p[metric]) for p in points if (p["loss"], p["d"], p["impl"]) == (loss, d, impl) and p[metric] is not None)
        if xy:
            ax.plot([x for x, _ in xy], [y for _, y in xy], label=impl, markersize=5, linewidth=1.5, **style)
            drawn.append(impl)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_title(f"{loss}, D = {d}")
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", alpha=0.12)
    return drawn


def kernel_figure(points: Sequence[Dict[str, Any]], *, metric: str, title: str = ""):
    """Rows: losses; columns: D; ``metric`` is ``"seconds"`` or ``"mib"``. Returns the figure."""
    if metric not in ("seconds", "mib"):
        raise ValueError(f"metric must be 'seconds' or 'mib', got {metric!r}")
    panels = kernel_panels(points)
    if not panels:
        raise ResultFileError("no (loss, D) measured at two or more N: nothing to draw")
    plt = _pyplot()
    losses = list(dict.fromkeys(loss for loss, _ in panels))
    dims = sorted({d for _, d in panels})
    fig, axes = plt.subplots(len(losses), len(dims), figsize=(4.2 * len(dims), 3.3 * len(losses) + 0.5), sharex=True, sharey=True,
                             squeeze=False, layout="constrained")
    drawn = set()
    for r, loss in enumerate(losses):
        for c, d in enumerate(dims):
            ax = axes[r][c]
            if (loss, d) not in panels:
                ax.set_visible(False)
                continue
            drawn.update(_kernel_axes(ax, points, loss, d, metric))
            if r == len(losses) - 1:
                ax.set_xlabel("batch size N")
            if c == 0:
                ax.set_ylabel("forward + backward (s)" if metric == "seconds" else "extra peak memory (MiB)")
    _shared_legend(fig, [i for i in IMPL_STYLE if i in drawn], title)
    return fig


def kernel_overview_figure(points: Sequence[Dict[str, Any]], *, title: str = "", min_sizes: int = 1):
    """One row per (loss, D), time and memory side by side (``bench_kernels.py``'s own picture,
    which also shows a (loss, D) measured at a single N)."""
    panels = kernel_panels(points, min_sizes=min_sizes)
    if not panels:
        raise ResultFileError(f"no (loss, D) measured at {min_sizes} or more N: nothing to draw")
    plt = _pyplot()
    fig, axes = plt.subplots(len(panels), 2, figsize=(9, 3.0 * len(panels) + 0.5), sharex=True, squeeze=False, layout="constrained")
    drawn = set()
    for r, (loss, d) in enumerate(panels):
        for c, (metric, label) in enumerate((("seconds", "forward + backward (s)"), ("mib", "extra peak memory (MiB)"))):
            drawn.update(_kernel_axes(axes[r][c], points, loss, d, metric))
            axes[r][c].set_ylabel(label)
    for ax in axes[-1]:
        ax.set_xlabel("batch size N")
    _shared_legend(fig, [i for i in IMPL_STYLE if i in drawn], title)
    return fig


def _shared_legend(fig, impls: Sequence[str], title: str) -> None:
    handles = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            handles.setdefault(line.get_label(), line)
    # the title heads the legend: a suptitle beside an "outside" legend overlaps it
    fig.legend([handles[i] for i in impls], impls, loc="outside upper center", ncol=len(impls), frameon=False, title=title or None)


def rosmap_accuracy_figure(grids: Sequence[Dict[str, Any]]):
    """One panel per grid: each method's test accuracy under each protocol, published rows as lines."""
    plt = _pyplot()
    rows = max(len(g["methods"]) for g in grids)
    fig, axes = plt.subplots(len(grids), 1, figsize=(8.5, 0.4 * rows * len(grids) + 1.8), sharex=True, squeeze=False, layout="constrained")
    seen_protocols = [p for p in PROTOCOL_STYLE if any(p in row for g in grids for row in g["acc"].values())]
    offsets = {p: 0.16 * (i - (len(seen_protocols) - 1) / 2) for i, p in enumerate(seen_protocols)}
    reference_handles = {}
    for ax, grid in zip((a[0] for a in axes), grids):
        for k, (label, (mean, std)) in enumerate(grid["published"].items()):
            color = "#444444" if k == 0 else "#999999"
            text = f"{label}: {100 * mean:.1f}" + (f" ± {100 * std:.1f}" if std is not None else "")
            if std is not None:
                ax.axvspan(100 * (mean - std), 100 * (mean + std), color=color, alpha=0.15, linewidth=0)
            reference_handles[text] = ax.axvline(100 * mean, color=color, linestyle="-" if k == 0 else ":", linewidth=1.4)
        for y, method in enumerate(grid["methods"]):
            for protocol, (mean, std) in grid["acc"][method].items():
                style = PROTOCOL_STYLE[protocol]
                ax.errorbar(100 * mean, y + offsets[protocol], xerr=None if std is None else 100 * std, fmt=style["marker"],
                            color=style["color"], markerfacecolor=style["color"] if style["fill"] else "white",
                            markersize=6, capsize=2.5, elinewidth=1.2, label=style["label"])
        ax.set_yticks(range(len(grid["methods"])))
        ax.set_yticklabels(grid["methods"])
        ax.set_ylim(len(grid["methods"]) - 0.5, -0.5)
        ax.set_title(grid["title"])
        ax.grid(True, axis="x", alpha=0.35)
    axes[-1][0].set_xlabel("test accuracy (%), mean ± sample std over seeds")
    protocol_handles = {}
    for ax in (a[0] for a in axes):
        for container in ax.containers:
            protocol_handles.setdefault(container.get_label(), container)
    labels = [PROTOCOL_STYLE[p]["label"] for p in seen_protocols]
    fig.legend([protocol_handles[lab] for lab in labels] + list(reference_handles.values()), labels + list(reference_handles),
               loc="outside upper center", ncol=2, frameon=False)
    return fig


def rosmap_curves_figure(run: Dict[str, Any]):
    """Loss and accuracy per epoch: mean over seeds, shaded from the lowest to the highest seed
    (a range stays positive on the loss's log axis, where mean - std need not); learning-rate
    steps marked."""
    import numpy as np
    from matplotlib.lines import Line2D

    plt = _pyplot()
    seeds = run["seeds"]
    epochs = np.array(seeds[0]["epoch"])

    def band(key):
        values = np.array([[np.nan if v is None else v for v in s[key]] for s in seeds], dtype=np.float64)
        keep = ~np.isnan(values).any(axis=0)  # the epochs at which every seed was scored
        rows = values[:, keep]
        return epochs[keep], rows.mean(axis=0), rows.min(axis=0), rows.max(axis=0)

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    curves = (
        (ax_loss, "train_loss", "training objective", "#666666", None),
        (ax_loss, "val_loss", "validation cross-entropy", "#0072B2", None),
        (ax_loss, "test_loss", "test cross-entropy", "#D55E00", "."),
        (ax_acc, "val_acc", "validation", "#0072B2", None),
        (ax_acc, "test_acc", "test", "#D55E00", "."),
    )
    for ax, key, label, color, marker in curves:
        x, mean, low, high = band(key)
        if not len(x):
            continue
        scale = 100 if key.endswith("acc") else 1
        ax.plot(x, scale * mean, color=color, marker=marker, markersize=4, linewidth=1.3, label=label)
        ax.fill_between(x, scale * low, scale * high, color=color, alpha=0.15, linewidth=0)
    if run["published"] is not None:
        label, mean = run["published"]
        ax_acc.axhline(100 * mean, color="#444444", linewidth=1.2, label=f"{label}: {100 * mean:.1f}")
    lr = seeds[0]["lr"]
    steps = [i for i in range(1, len(lr)) if lr[i] != lr[i - 1]]
    for i in steps:
        for ax in (ax_loss, ax_acc):
            ax.axvline(epochs[i], color="#999999", linestyle=":", linewidth=1.2)
    ax_loss.set(xlabel="epoch (from 0)", ylabel="loss", yscale="log", title="loss")
    ax_acc.set(xlabel="epoch (from 0)", ylabel="accuracy (%)", title="accuracy (fusion head)")
    for ax, corner in ((ax_loss, "upper right"), (ax_acc, "lower right")):  # after the early epochs both corners are empty
        handles, labels = ax.get_legend_handles_labels()
        if steps:
            factors = ", ".join(f"× {lr[i] / lr[i - 1]:.2g} at {epochs[i]:g}" for i in steps)
            handles.append(Line2D([], [], color="#999999", linestyle=":", linewidth=1.2))
            labels.append(f"learning rate {factors}")
        ax.grid(True, alpha=0.3)
        ax.legend(handles, labels, loc=corner)
    fig.suptitle(f"ROSMAP {run['label']}\n(lines: mean over seeds; shaded: lowest to highest seed)")
    return fig


# ----------------------------------------------------------------------------- files


def save_png(fig, path: Path, *, dpi: int = 130) -> Path:
    """Save and close ``fig`` as a PNG, atomically (a build killed mid-write leaves no half file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=dpi)
        os.replace(tmp, path)
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


def _kernel_title(path: Path) -> str:
    meta = load_json(path).get("meta") or {}
    return f"{meta.get('processor', '?')}, {meta.get('threads', '?')} threads, torch {meta.get('torch', '?')}, {meta.get('dtype', 'float32')}"


def figures(root: Path = ROOT) -> Dict[str, Tuple[List[Path], Callable[[], Any]]]:
    """Every figure: PNG name -> (the files it is drawn from, a function that draws it)."""
    kernels = root / KERNELS_JSON.relative_to(ROOT)
    grids = [root / g.relative_to(ROOT) for g in ROSMAP_GRIDS]
    curves = root / ROSMAP_CURVES.relative_to(ROOT)

    def grid_files(folder: Path) -> List[Path]:
        return sorted(folder.glob("*.json")) or [folder]

    return {
        "kernels_time.png": ([kernels], lambda: kernel_figure(kernel_points(kernels), metric="seconds", title=_kernel_title(kernels))),
        "kernels_memory.png": ([kernels], lambda: kernel_figure(kernel_points(kernels), metric="mib", title=_kernel_title(kernels))),
        "rosmap_accuracy.png": ([f for g in grids for f in grid_files(g)], lambda: rosmap_accuracy_figure([rosmap_grid(g) for g in grids])),
        "rosmap_curves.png": ([curves / "results.json", *sorted((curves / "seeds").glob("seed*.json"))], lambda: rosmap_curves_figure(rosmap_histories(curves))),
    }


def build_all(out_dir: Path, *, root: Path = ROOT, force: bool = False) -> List[Path]:
    """Draw every figure into ``out_dir`` whose PNG is missing or older than its sources.

    Returns the PNGs drawn. Raises :class:`ResultFileError` naming each result file at fault
    (after drawing the figures whose files are sound).
    """
    out_dir = Path(out_dir)
    drawn, errors = [], []
    for name, (sources, draw) in figures(root).items():
        target = out_dir / name
        newest = max([Path(__file__).stat().st_mtime] + [s.stat().st_mtime for s in sources if s.exists()])
        if force or not target.exists() or target.stat().st_mtime < newest:
            try:  # one bad file costs its own figure only; every fault is reported together
                drawn.append(save_png(draw(), target))
            except ResultFileError as err:
                target.unlink(missing_ok=True)  # never leave a picture of older results in place
                errors.append(f"{name}: {err}")
    if errors:
        raise ResultFileError("; ".join(errors))
    return drawn


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="folder for the PNG files")
    parser.add_argument("--force", action="store_true", help="redraw every figure, even when up to date")
    args = parser.parse_args(argv)
    try:
        drawn = build_all(args.out_dir, force=args.force)
    except ResultFileError as err:
        sys.exit(f"error: {err}")
    print(f"drew {len(drawn)} figure(s) into {args.out_dir}")


if __name__ == "__main__":
    main()
