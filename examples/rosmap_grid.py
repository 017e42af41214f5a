"""The ablation grid on ROSMAP: every method, 5 seeds, one combined table of the three protocols.

    python examples/rosmap_grid.py --output-dir runs/rosmap_grid [--methods m3col concat ...] [rosmap.py options]

Each method runs through ``rosmap.py``'s pipeline into ``OUT/<method>/`` (finished seeds are kept,
so an interrupted grid resumes where it stopped); ``OUT/grid.md`` and ``OUT/grid.json`` hold the
combined table. Options other than ``--methods`` and ``--output-dir`` (``--seeds``,
``--convention``, ``--epochs``, ``--data-dir``, ...) are passed to every run.
"""

from __future__ import annotations

import argparse
from typing import Mapping, Optional, Sequence

from rosmap import ROSMAP
from training import omics
from training.config import METHODS, PROTOCOLS
from training.io import atomic_write_json, atomic_write_text
from training.report import format_percent, holdout_share

METRICS = ("acc", "f1", "auc")


def scored_epochs(rows: Mapping[str, Mapping]) -> str:
    """Which epochs ``best_on_test`` chose among, in words, from the runs' configuration."""
    config = next(iter(rows.values()))["config"]
    every, last = config["test_every"], config["epochs"] - 1
    if config.get("test_grid", "package") == "released":
        return f"after epochs 0, {every}, ..., {last - last % every} (0-based), as the released loop scores them"
    return f"after epochs {every - 1}, {2 * every - 1}, ..., {last} (0-based): the released loop scores one epoch earlier, at 0, {every}, ..."


def grid_markdown(rows: Mapping[str, Mapping], *, title: str) -> str:
    # a grid trained without a held-out split (--holdout 0) has no validation columns
    protocols = [p for p in PROTOCOLS if any(p in r["protocols"] for r in rows.values())]
    held_out = "validation" in protocols
    names = {"validation": "val.", "final": "final", "best_on_test": "best-on-test*"}
    common = any(r.get("best_common_epoch") for r in rows.values())
    head = ["method"] + [f"{names[p]} {m.upper()}" for p in protocols for m in METRICS]
    head += (["common-epoch* ACC (epoch)"] if common else []) + (["val. split ACC"] if held_out else []) + ["s / seed"]
    lines = [title, "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for method, results in rows.items():
        cells = [f"`{method}`"]
        for protocol in protocols:
            row = results["protocols"].get(protocol, {})
            cells += [format_percent(row.get(m)) for m in METRICS]
        if common:
            best = results.get("best_common_epoch")
            cells.append(f"{format_percent(best['acc'])} ({best['epoch']})" if best else "-")
        if held_out:
            cells.append(format_percent((results.get("val_scores") or {}).get("acc")))
        per_seed = [r["seconds"] for r in results["per_seed"]]
        cells.append(f"{sum(per_seed) / len(per_seed):.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    published = "; ".join(
        f"{label}: " + " / ".join(f"{100 * v[0]:.1f}" + (f" ± {100 * v[1]:.1f}" if v[1] is not None else "") for v in (row[m] for m in METRICS))
        for label, row in ROSMAP.published.items()
    )
    if held_out:
        share = holdout_share(next(iter(rows.values()))["config"]["holdout"])
        validation = f"`val.`: the epoch is chosen on a stratified {share} of the training set held out (the honest figure);"
        held_out_note = " `val. split ACC` is the held-out accuracy at the chosen epoch."
    else:
        validation = "Trained on the whole training set (`--holdout 0`): no validation protocol, so no honest figure;"
        held_out_note = ""
    lines += [
        "",
        f"Test-set ACC / F1 / AUC in percent, mean ± sample std over seeds. {validation} `final`: the last epoch;"
        + (
            f" `best-on-test*`: the best test score over the epochs scored ({scored_epochs(rows)}) - optimistic,"
            " it selects on the test set."
            if "best_on_test" in protocols
            else " no `best-on-test*` (`--test-every 0`: the test set is scored after the last epoch only)."
        )
        + held_out_note
        + (
            " `common-epoch*`: the test ACC at the one epoch (the same for every seed) with the best mean test ACC -"
            " optimistic too, but it cannot pick each seed's luckiest epoch; it bounds any rule that fixes one epoch count."
            if common
            else ""
        ),
        "",
        f"Published (ACC / F1 / AUC): {published}. The paper does not state how its epoch was chosen.",
    ]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = omics.sweep_parser(ROSMAP, __doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=list(METHODS))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    args, passthrough = build_parser().parse_known_args(argv)
    omics.check_passed_on(ROSMAP, list(passthrough) + ["--method", args.methods[0]])
    rows = {}
    for method in args.methods:
        out = args.output_dir / method
        print(f"== {method} -> {out}", flush=True)
        rows[method] = omics.main(ROSMAP, list(passthrough) + ["--method", method, "--output-dir", str(out)])
    first = next(iter(rows.values()))
    recipe = ", recipe released" if first["config"]["extra"].get("recipe") == "released" else ""
    title = f"# ROSMAP ablation grid (convention {first['convention']}{recipe}, seeds {first['seeds']})"
    table = grid_markdown(rows, title=title)
    atomic_write_json(args.output_dir / "grid.json", {m: {k: r.get(k) for k in ("protocols", "best_common_epoch", "val_scores", "seeds", "convention", "config", "seconds")} for m, r in rows.items()})
    atomic_write_text(args.output_dir / "grid.md", table)
    print(table)


if __name__ == "__main__":
    main()
