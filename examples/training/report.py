"""What a run reports: the summary over seeds, the Markdown table beside the published numbers, the curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import numpy as np

from training.config import PROTOCOL_LABELS, PROTOCOLS, Task, TrainConfig
from training.io import atomic_write, atomic_write_json, atomic_write_text

__all__ = ["mean_and_std", "best_common_epoch", "summarise", "format_percent", "holdout_share", "results_markdown", "plot_curves", "write_results"]


def mean_and_std(values: Sequence[float]) -> Dict[str, Optional[float]]:
    """``{"mean", "std"}`` over seeds: the sample std (ddof=1), None for a single value."""
    values = np.asarray(values, dtype=np.float64)
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else None}


def best_common_epoch(per_seed: Sequence[Mapping[str, Any]]) -> Optional[Dict[str, Any]]:
    """One epoch for every seed, the one with the best mean test accuracy: ``{"epoch", "acc"}``.

    Optimistic like ``best_on_test`` (the epoch is chosen on the test set), but it cannot pick a
    different lucky epoch for each seed; it bounds from above any rule that fixes one epoch count
    for all seeds (e.g. an epoch count chosen on held-out data, then trained on all the data).
    None when the seeds' histories do not share their scored epochs."""
    histories = [r.get("history") for r in per_seed]
    if not histories or any(h is None for h in histories) or any(h["epoch"] != histories[0]["epoch"] for h in histories):
        return None
    scored = [i for i in range(len(histories[0]["epoch"])) if all(h["test_acc"][i] is not None for h in histories)]
    if not scored:
        return None
    acc = np.array([[h["test_acc"][i] for i in scored] for h in histories], dtype=np.float64)
    best = int(np.argmax(acc.mean(axis=0)))  # the earliest among ties
    return {"epoch": int(histories[0]["epoch"][scored[best]]), "acc": mean_and_std(acc[:, best])}


def summarise(task: Task, config: TrainConfig, per_seed: Sequence[Mapping[str, Any]], *, seconds: float) -> Dict[str, Any]:
    """The results.json record: mean and sample std (ddof=1; null for one seed) per protocol and metric."""
    protocols: Dict[str, Dict[str, Dict[str, Optional[float]]]] = {}
    for name in PROTOCOLS:
        rows = [r["protocols"][name] for r in per_seed if name in r["protocols"]]
        if len(rows) != len(per_seed):
            continue
        protocols[name] = {}
        for metric in task.metric_labels:
            protocols[name][metric] = mean_and_std([row[metric] for row in rows])
        protocols[name]["epoch"] = mean_and_std([row["epoch"] for row in rows])
    val_scores = None
    if all(r.get("val_scores") for r in per_seed):
        keys = [k for k in per_seed[0]["val_scores"] if all(k in r["val_scores"] for r in per_seed)]
        val_scores = {}
        for k in keys:
            val_scores[k] = mean_and_std([r["val_scores"][k] for r in per_seed])
    analyses = None
    if per_seed and all(r.get("analyses") for r in per_seed):
        analyses = {}
        for k in per_seed[0]["analyses"]:
            if all(k in r["analyses"] for r in per_seed):
                analyses[k] = mean_and_std([r["analyses"][k] for r in per_seed])
    return {
        "dataset": task.name,
        "method": config.method,
        "convention": config.convention,
        "seeds": [int(r["seed"]) for r in per_seed],
        "protocols": protocols,
        "optimistic_protocols": ["best_on_test"],
        "best_common_epoch": best_common_epoch(per_seed),
        "val_scores": val_scores,
        **({"analyses": analyses} if analyses is not None else {}),
        "per_seed": [
            {k: r[k] for k in ("seed", "protocols", "val_scores", "analyses", "seconds", "train_size", "val_size", "test_size") if k in r}
            for r in per_seed
        ],
        "seconds": seconds,
        "config": config.as_dict(),
        "published": {label: {m: list(v) for m, v in row.items()} for label, row in task.published.items()},
        "notes": list(task.notes),
    }


def holdout_share(holdout: float) -> str:
    """A run's ``holdout`` in words: ``"20 %"`` for a fraction, ``"50 samples"`` for a count."""
    return f"{100 * holdout:g} %" if holdout < 1 else f"{holdout:.0f} samples"


def format_percent(stat: Optional[Mapping[str, Optional[float]]]) -> str:
    """A ``{"mean", "std"}`` fraction as ``"mean ± std"`` in percent (``"-"`` when missing)."""
    if stat is None:
        return "-"
    if stat["std"] is None:
        return f"{100 * stat['mean']:.1f}"
    # a std below 0.05 points would print as 0.0: give it two decimals
    return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.{2 if 0 < 100 * stat['std'] < 0.05 else 1}f}"


def results_markdown(task: Task, results: Mapping[str, Any]) -> str:
    """A Markdown table of the protocols beside the published numbers (percent)."""
    metrics = list(task.metric_labels)
    head = "| protocol | " + " | ".join(task.metric_labels[m] for m in metrics) + " | epoch |"
    lines = [
        f"# {task.name}: {results['method']} (convention {results['convention']})",
        "",
        f"Seeds {results['seeds']}; mean ± sample std (ddof=1) over seeds, in percent; "
        f"{results['seconds']:.0f} s in all.",
        "",
        head,
        "|" + " --- |" * (len(metrics) + 2),
    ]
    for name in PROTOCOLS:
        if name not in results["protocols"]:
            continue
        row = results["protocols"][name]
        epoch = row["epoch"]
        lines.append(f"| {PROTOCOL_LABELS[name]} | " + " | ".join(format_percent(row.get(m)) for m in metrics) + f" | {epoch['mean']:.0f} |")
    for label, row in task.published.items():
        cells = []
        for m in metrics:
            if m not in row:
                cells.append("-")
            else:
                mean, std = row[m]
                cells.append(format_percent({"mean": mean, "std": std}))
        lines.append(f"| {label} | " + " | ".join(cells) + " | - |")
    if results.get("val_scores"):
        scores = []
        for k, v in results["val_scores"].items():
            scores.append(f"CE {v['mean']:.3f}" if k == "loss" else f"{task.metric_labels.get(k, k)} {format_percent(v)}")
        lines += ["", "Held-out validation scores at the chosen epochs: " + ", ".join(scores) + "."]
    honest = (
        " `validation` is the honest figure."
        if "validation" in results["protocols"]
        else " this run held no validation split out (`--holdout 0`), so it has no honest figure."
    )
    lines += ["", "`best on test` picks the epoch by its test score, so it is an optimistic upper bound, not an estimate;" + honest]
    common = results.get("best_common_epoch")
    if common:
        lines += [
            "",
            f"Best common epoch (optimistic): one epoch for every seed, chosen on the mean test accuracy: epoch {common['epoch']},"
            f" ACC {format_percent(common['acc'])}. It bounds any rule that fixes one epoch count for all seeds.",
        ]
    if results.get("analyses"):
        lines += ["", "Analyses on the weights of the epoch chosen by the validation protocol (percent):", "", "| analysis | value |", "| --- | --- |"]
        for key, stat in results["analyses"].items():
            if key != "epoch":
                lines.append(f"| {task.analysis_labels.get(key, key)} | {format_percent(stat)} |")
    if task.notes:
        lines += [""] + [f"- {note}" for note in task.notes]
    return "\n".join(lines) + "\n"


def plot_curves(per_seed: Sequence[Mapping[str, Any]], path: Union[str, Path], *, title: str = "") -> Path:
    """Training loss and validation/test loss and accuracy per epoch, averaged over seeds (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    epochs = np.array(per_seed[0]["history"]["epoch"])  # 0-based, as the chosen epochs in results.json

    def mean_curve(key):
        # the epochs at which every seed has a value (the test set may be scored less often)
        rows = np.array([[np.nan if v is None else v for v in r["history"][key]] for r in per_seed], dtype=np.float64)
        keep = ~np.isnan(rows).any(axis=0)
        return epochs[keep], rows[:, keep].mean(axis=0)

    for key, label, style in (("train_loss", "train (objective)", "-"), ("val_loss", "validation CE", "-"), ("test_loss", "test CE", ":")):
        x, curve = mean_curve(key)
        if len(x):
            ax_loss.plot(x, curve, style, label=label)
    for key, label, style in (("val_acc", "validation", "-"), ("test_acc", "test", ":")):
        x, curve = mean_curve(key)
        if len(x):
            ax_acc.plot(x, curve, style, label=label)
    ax_loss.set(xlabel="epoch (from 0)", ylabel="loss", yscale="log", title="loss")
    ax_acc.set(xlabel="epoch (from 0)", ylabel="accuracy", title="accuracy (fusion head)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title + f" (mean of {len(per_seed)} seed{'s' if len(per_seed) > 1 else ''})")
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=110), binary=True)
    plt.close(fig)
    return path


def write_results(task: Task, results: Mapping[str, Any], per_seed: Sequence[Mapping[str, Any]], output_dir: Union[str, Path]) -> None:
    """``results.json``, ``results.md`` and ``curves.png`` into ``output_dir``, each written atomically."""
    output_dir = Path(output_dir)
    atomic_write_json(output_dir / "results.json", results)
    atomic_write_text(output_dir / "results.md", results_markdown(task, results))
    plot_curves(per_seed, output_dir / "curves.png", title=f"{task.name} {results['method']} ({results['convention']})")

