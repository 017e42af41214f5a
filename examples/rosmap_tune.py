"""Validation-only tuning of M3CoL on ROSMAP: a few settings around the released ones, chosen on the held-out split.

    python examples/rosmap_tune.py --output-dir runs/rosmap_tune [--settings released dropout-0.5 ...] [rosmap.py options]

Each setting trains every seed through ``rosmap.py``'s pipeline into ``OUT/<setting>/`` (finished
seeds are kept, so an interrupted sweep resumes). The setting chosen is the one with the highest
mean accuracy on the held-out part of the training set (``--holdout``, 20 % by default) at each
seed's chosen epoch (ties: the lower held-out loss); the test set plays no part in the choice. ``OUT/tune.md`` and
``OUT/tune.json`` list every setting with its held-out scores and, for reference, its test scores
under the validation protocol, and name the chosen one.
"""

from __future__ import annotations

import argparse
from typing import Dict, List, Mapping, Optional, Sequence

from rosmap import ROSMAP
from training import omics
from training.io import atomic_write_json, atomic_write_text
from training.report import format_percent, holdout_share

# Released settings: lr 2e-3, weight decay 1e-4, no dropout, beta 0.1, t 0.1, no weight averaging.
SETTINGS: Dict[str, List[str]] = {
    "released": [],
    "dropout-0.5": ["--dropout", "0.5"],
    "weight-decay-1e-3": ["--weight-decay", "1e-3"],
    "weight-decay-1e-2": ["--weight-decay", "1e-2"],
    "lr-5e-4": ["--lr", "5e-4"],
    "beta-0.5": ["--beta", "0.5"],
    "convention-reference": ["--convention", "reference"],
    "ema-0.95": ["--ema-decay", "0.95"],
    "ema-0.99": ["--ema-decay", "0.99"],
}


def choose(rows: Mapping[str, Mapping]) -> str:
    """The setting with the best mean held-out accuracy, then the lowest mean held-out loss."""

    def key(name: str):
        val = rows[name]["val_scores"]
        return (val["acc"]["mean"], -val["loss"]["mean"])

    return max(rows, key=key)


def tune_markdown(rows: Mapping[str, Mapping], chosen: str, *, title: str) -> str:
    pct = format_percent
    head = ["setting", "options", "held-out ACC", "held-out loss", "test ACC (val.)", "test F1 (val.)", "test AUC (val.)"]
    lines = [title, "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, results in rows.items():
        val, test = results["val_scores"], results["protocols"]["validation"]
        loss = val["loss"]
        mark = " (chosen)" if name == chosen else ""
        lines.append(
            f"| `{name}`{mark} | {' '.join(SETTINGS[name]) or 'released'} | {pct(val['acc'])} "
            f"| {loss['mean']:.3f} | {pct(test['acc'])} | {pct(test['f1'])} | {pct(test['auc'])} |"
        )
    share = holdout_share(next(iter(rows.values()))["config"]["holdout"])
    lines += [
        "",
        f"Percent, mean ± sample std over seeds. Held-out: the stratified {share} of the training set at each seed's chosen"
        " epoch (the choice of setting uses these columns only). Test columns: the validation protocol (the test set"
        " scored once, at the epoch chosen on the held-out split), shown for reference.",
    ]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = omics.sweep_parser(ROSMAP, __doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=list(SETTINGS))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    args, passthrough = build_parser().parse_known_args(argv)
    passthrough = list(passthrough)
    if not hasattr(omics.given_options(ROSMAP, passthrough), "method"):
        passthrough += ["--method", "m3col"]
    for name in args.settings:
        setting = omics.parse(ROSMAP, passthrough + SETTINGS[name] + ["--output-dir", "unused"])  # argparse's exit 2 names a bad option
        if setting.holdout == 0:
            raise SystemExit("rosmap_tune: the settings are chosen on the held-out split: --holdout 0 leaves none")
    rows = {}
    for name in args.settings:
        out = args.output_dir / name
        print(f"== {name} {' '.join(SETTINGS[name])} -> {out}", flush=True)
        results = omics.main(ROSMAP, list(passthrough) + SETTINGS[name] + ["--output-dir", str(out)])
        rows[name] = results
    chosen = choose(rows)
    first = next(iter(rows.values()))
    title = f"# ROSMAP validation-only tuning ({first['method']}, convention {first['convention']} unless a setting changes it, seeds {first['seeds']})"
    table = tune_markdown(rows, chosen, title=title)
    record = {
        "chosen": chosen,
        "settings": {name: SETTINGS[name] for name in rows},
        "results": {name: {k: r[k] for k in ("protocols", "val_scores", "seeds", "convention", "config", "seconds")} for name, r in rows.items()},
    }
    atomic_write_json(args.output_dir / "tune.json", record)
    atomic_write_text(args.output_dir / "tune.md", table)
    print(table)
    return record


if __name__ == "__main__":
    main()
