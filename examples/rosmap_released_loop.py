"""The authors' own ROSMAP loop, measured: its per-seed figures and how they compare with the package's.

The released ``train_medical.py`` cannot run as published (two crashes, below), prints no score
and sets no seed. ``examples/results/rosmap_released_loop.json`` holds what it gives once made
to run, for seeds 0-4 on a CPU in float32: the test ACC, F1 and AUC it computes after epochs
0, 10, ..., 490. The released code itself is not part of this repository; to measure it again,
take ``train_medical.py``, ``model/model_med.py``, ``model/utils.py``, ``src/config.py`` and
``src/functions.py`` of github.com/RaghavSinghal10/M3CoL (commit 818abdb) and change only:

* ``args.data_path`` (never defined) to ``args.data_dir`` (``train_medical.py:170, 174``), and
  ``StepLR(..., gamma=args)`` to ``gamma=args.gamma`` (``train_medical.py:190``): the two crashes;
* for a CPU: ``.cuda()`` to ``.to(args.device)`` (``train_medical.py:180-181``) and drop the
  unused ``torchvision`` / ``PIL`` / ``pandas`` / ``urllib`` imports of ``model/utils.py``;
* to measure: seed torch and NumPy with ``--seed`` at the start of ``main``, one torch thread,
  and write the ``test_acc``, ``test_f1`` and ``test_auc`` it computes to a JSON file
  ``{"seed": S, "clone_before_mixing": false, "scores": [{"epoch", "acc", "f1", "auc"}, ...]}``.

Run ``python train_medical.py --dataset rosmap --data_dir DATA --device cpu --multi_mixup --seed S``
for S in 0-4. The variant ``clone_before_mixing`` calls ``mixco_text`` on a copy of each
embedding, so that the partner passed to ``mixco_nce`` is the clean embedding: what this package
computed under ``reference`` before it contrasted mixed with mixed.

    python examples/rosmap_released_loop.py compose RECORDS_DIR OUT.json   # one JSON per seed and variant -> the stored file
    python examples/rosmap_released_loop.py compare OUT.json GRID/m3col.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Mapping

from training import stats as seed_stats
from training.cli import path_argument
from training.io import atomic_write_json
from training.report import format_percent, mean_and_std

VARIANTS = ("released", "clone_before_mixing")
HOW = (
    "The released train_medical.py with model/model_med.py, model/utils.py, src/config.py, src/functions.py "
    "(github.com/RaghavSinghal10/M3CoL, commit 818abdb), run with --dataset rosmap --device cpu --multi_mixup --seed S, "
    "float32, torch {torch}, one thread. Changed: args.data_path -> args.data_dir and StepLR gamma=args -> gamma=args.gamma "
    "(the two crashes); .cuda() -> .to(args.device) and the unused torchvision/PIL/pandas/urllib imports of model/utils.py "
    "dropped and src/config.py's image-text entries left out (to run on a CPU); torch and NumPy seeded with S at the start of main (the released loop sets no seed); the "
    "test ACC/F1/AUC it computes at epoch % 10 == 0 written out (it prints none). clone_before_mixing: mixco_text applied "
    "to a copy of each embedding, so that mixco_nce's partner is the clean embedding."
)


def best_and_last(scores: List[Mapping[str, float]]) -> Dict[str, Dict[str, float]]:
    """The best test score by ACC (the earliest among ties) and the last one scored."""
    best = max(scores, key=lambda r: (r["acc"], -r["epoch"]))
    return {"best": dict(best), "last": dict(scores[-1])}


def compose(records_dir: Path) -> Dict[str, Any]:
    """The stored record from per-seed files ``<variant>_seed<S>.json`` (``inplace`` for the released variant)."""
    import torch

    variants: Dict[str, List[Dict[str, Any]]] = {}
    for variant, prefix in (("released", "inplace"), ("clone_before_mixing", "clone")):
        runs = []
        for path in sorted(Path(records_dir).glob(f"{prefix}_seed*.json"), key=lambda p: int(p.stem.split("seed")[1])):
            run = json.loads(path.read_text())
            if len(run["scores"]) != 50:
                raise SystemExit(f"{path}: {len(run['scores'])} scores, expected 50 (epochs 0, 10, ..., 490)")
            runs.append({"seed": run["seed"], **best_and_last(run["scores"]), "scores": run["scores"]})
        variants[variant] = runs
    return {"how": HOW.format(torch=torch.__version__), "dataset": "ROSMAP", "variants": variants}


def summary(record: Mapping[str, Any], variant: str) -> Dict[str, Any]:
    """Best-on-test and last-scored ACC over seeds: mean and sample std, and the per-seed values."""
    runs = record["variants"][variant]
    best = [r["best"]["acc"] for r in runs]
    return {
        "seeds": [r["seed"] for r in runs],
        "best_acc": mean_and_std(best),
        "best_per_seed": best,
        "last_acc": mean_and_std([r["last"]["acc"] for r in runs]),
    }


def common_epoch(record: Mapping[str, Any], variant: str) -> Dict[str, Any]:
    """The one scored epoch with the best mean test ACC over seeds (the earliest among ties), as ``training.report.best_common_epoch``."""
    runs = record["variants"][variant]
    accs = [[r["acc"] for r in run["scores"]] for run in runs]
    means = [sum(column) / len(column) for column in zip(*accs)]
    best = max(range(len(means)), key=lambda i: (means[i], -i))
    return {"epoch": runs[0]["scores"][best]["epoch"], "acc": mean_and_std([row[best] for row in accs])}


def describe(record: Mapping[str, Any], variant: str) -> str:
    """``best-on-test ACC m ± s (seeds a, b, ...; last scored epoch l on average; one epoch for all seeds: ...)``, in percent."""
    s = summary(record, variant)
    seeds = ", ".join(f"{100 * v:.1f}" for v in s["best_per_seed"])
    common = common_epoch(record, variant)
    return (
        f"best-on-test ACC {format_percent(s['best_acc'])} (seeds {seeds}; last scored epoch {100 * s['last_acc']['mean']:.1f} "
        f"on average; one epoch for all seeds: {format_percent(common['acc'])} at epoch {common['epoch']})"
    )


def package_best(results: Mapping[str, Any]) -> List[float]:
    return [seed["protocols"]["best_on_test"]["acc"] for seed in results["per_seed"]]


def comparison(record: Mapping[str, Any], package_results: Mapping[str, Any], variant: str = "released") -> str:
    """How the package's best-on-test ACC over seeds compares with the released loop's."""
    return seed_stats.describe(package_best(package_results), summary(record, variant)["best_per_seed"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("compose", help="build the stored JSON from the per-seed records")
    make.add_argument("records_dir", type=path_argument("folder"))
    make.add_argument("out", type=path_argument("file"))
    cmp = sub.add_parser("compare", help="print the released loop's figures and the comparison with a package run")
    cmp.add_argument("record", type=path_argument("file"))
    cmp.add_argument("package_results", type=path_argument("file"))
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "compose":
        atomic_write_json(args.out, compose(args.records_dir))
        print(f"wrote {args.out}")
        return
    record = json.loads(args.record.read_text())
    results = json.loads(args.package_results.read_text())
    for variant in VARIANTS:
        print(f"{variant}: {describe(record, variant)}")
    print(f"package minus released loop: {comparison(record, results)}")


if __name__ == "__main__":
    main()
