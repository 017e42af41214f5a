"""The authors' own ROSMAP loop, measured: its per-seed figures and how they compare with the package's.

The released ``train_medical.py`` cannot run as published (two crashes, below), prints no score
and sets no seed. The stored file, ``examples/results/rosmap_released_loop/released_loop.json``,
holds what it gives once made to run, for seeds 0-4 on a CPU in float32: the test ACC, F1 and
AUC it computes after epochs 0, 10, ..., 490. The released code itself is not part of this repository; to measure it again,
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

    python examples/rosmap_released_loop.py compose RECORDS_DIR OUT.json   # inplace_seed<S>.json, clone_seed<S>.json -> the stored file
    python examples/rosmap_released_loop.py compare OUT.json GRID/m3col/results.json   # a package run's results.json
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping

from training import stats as seed_stats
from training.cli import path_argument
from training.io import RESULTS_KEYS, CorruptFileError, atomic_write_json, load_json_object
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


RECORD_KEYS = {"seed": int, "scores": list}
SCORE_KEYS = {"epoch": int, "acc": (int, float), "f1": (int, float), "auc": (int, float)}
SCORES_PER_RUN = 50  # epochs 0, 10, ..., 490


def _read(path: Path, what: str, required: Mapping[str, Any]) -> Dict[str, Any]:
    """A JSON object with the ``required`` keys, or SystemExit with one line naming the file."""
    try:
        return load_json_object(path, what=what, required=required, advice="fix or rewrite it")
    except FileNotFoundError:
        raise SystemExit(f"{path}: no such file") from None
    except IsADirectoryError:
        raise SystemExit(f"{path}: a folder, not a {what}") from None
    except CorruptFileError as err:
        raise SystemExit(str(err)) from None


def compose(records_dir: Path) -> Dict[str, Any]:
    """The stored record from per-seed files ``<variant>_seed<S>.json`` (``inplace`` for the released variant).

    Raises:
        SystemExit: the folder is missing, a variant has no record, or a record is malformed
            (the message names the file).
    """
    import torch

    records_dir = Path(records_dir)
    if not records_dir.is_dir():
        raise SystemExit(f"{records_dir}: not a folder of per-seed records")
    variants: Dict[str, List[Dict[str, Any]]] = {}
    for variant, prefix in (("released", "inplace"), ("clone_before_mixing", "clone")):
        named = {}
        for path in records_dir.glob(f"{prefix}_seed*.json"):
            match = re.fullmatch(rf"{prefix}_seed(\d+)\.json", path.name)
            if match is not None:
                named[int(match[1])] = path
        if not named:
            raise SystemExit(f"{records_dir}: no {prefix}_seed<S>.json records of the {variant} variant; nothing written")
        runs = []
        for seed in sorted(named):
            path = named[seed]
            run = _read(path, "released-loop record", RECORD_KEYS)
            if len(run["scores"]) != SCORES_PER_RUN:
                raise SystemExit(f"{path}: {len(run['scores'])} scores, expected {SCORES_PER_RUN} (epochs 0, 10, ..., 490)")
            wrong = next((score for score in run["scores"] if not isinstance(score, dict) or any(not isinstance(score.get(k), t) for k, t in SCORE_KEYS.items())), None)
            if wrong is not None:
                raise SystemExit(f"{path}: a score is {wrong!r}, not an object with {', '.join(SCORE_KEYS)}")
            runs.append({"seed": run["seed"], **best_and_last(run["scores"]), "scores": run["scores"]})
        variants[variant] = runs
    return {"how": HOW.format(torch=torch.__version__), "dataset": "ROSMAP", "variants": variants}


def read_record(path: Path) -> Dict[str, Any]:
    """The stored record (:func:`compose`), checked: every variant with at least two seeds."""
    record = _read(path, "released-loop file", {"variants": dict})
    for variant in VARIANTS:
        runs = record["variants"].get(variant)
        if not isinstance(runs, list) or len(runs) < 2 or not all(isinstance(r, dict) and {"seed", "best", "last", "scores"} <= set(r) for r in runs):
            raise SystemExit(f"{path}: the {variant} variant needs at least two seeds of {{seed, best, last, scores}}; compose it again")
    return record


def read_package_results(path: Path) -> Dict[str, Any]:
    """A package run's ``results.json``, checked: at least two seeds scored under best_on_test."""
    results = _read(path, "results file", RESULTS_KEYS)
    best = [seed.get("protocols", {}).get("best_on_test", {}).get("acc") if isinstance(seed, dict) else None for seed in results["per_seed"]]
    if len(best) < 2 or any(not isinstance(v, (int, float)) for v in best):
        raise SystemExit(f"{path}: needs at least two seeds with a best_on_test ACC (a run with --test-every > 0)")
    return results


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
    record, results = read_record(args.record), read_package_results(args.package_results)
    for variant in VARIANTS:
        print(f"{variant}: {describe(record, variant)}")
    print(f"package minus released loop: {comparison(record, results)}")


if __name__ == "__main__":
    main()
