"""Omics datasets in the MOGONET layout (ROSMAP, BRCA): reader, scaling, model, metrics and CLI.

Layout (the MOGONET repository, github.com/txWang/MOGONET, one folder per dataset)::

    1_tr.csv 2_tr.csv 3_tr.csv    training samples of each view, one per row, no header, comma separated
    1_te.csv 2_te.csv 3_te.csv    test samples, same columns
    labels_tr.csv labels_te.csv   one label per line, written as a float (e.g. 1.000000000000000000e+00)
    1_featname.csv ...            optional: one feature name per line

:func:`load_mogonet` checks every file and names the one that is wrong (missing, empty, ragged,
wrong row or column count, not a number, NaN/Inf, label not an integer in range).
:func:`minmax_scale` scales each feature with the training set's min and max, as the reference
pipeline does. :func:`main` is the command line shared by ``rosmap.py`` and ``brca.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import os
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from training import recipes
from training import cli, datadir
from training.config import ConfigError, Task, TrainConfig
from training.data import TensorMultimodalDataset
from training.model import MultimodalClassifier, mlp

NUM_VIEWS = 3
SCALE_EPS = 1e-10  # added to the training max, as in the reference pipeline
MOGONET_COMMIT = "9ed714f5c6f3e5a30178202e5d09d763fce67398"


class MogonetFormatError(ValueError):
    """A MOGONET-layout file is missing or malformed; the message names the file."""


@dataclass(frozen=True)
class MogonetSpec:
    """What one MOGONET dataset is, and the released training settings for it."""

    name: str
    num_classes: int
    feature_counts: Tuple[int, ...]
    train_size: int  # rows of the released split (a data folder with others is read, with a warning)
    test_size: int
    emb_dim: int
    post_dim: int
    lr: float
    metrics: str  # "binary" (ACC, F1, AUC) or "multiclass" (ACC, weighted F1, macro F1)
    published: Mapping[str, Mapping[str, Tuple[float, Optional[float]]]]
    sha256: Optional[Mapping[str, str]] = None


@dataclass
class MogonetData:
    train: List[np.ndarray]
    train_labels: np.ndarray
    test: List[np.ndarray]
    test_labels: np.ndarray
    feature_names: List[Optional[List[str]]]


# ----------------------------------------------------------------------------- reader


def _read_lines(path: Path) -> List[str]:
    if not path.is_file():
        raise MogonetFormatError(f"{path}: file not found")
    text = path.read_text(encoding="utf-8-sig", errors="replace")  # -sig: a byte-order mark is not data
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise MogonetFormatError(f"{path}: the file is empty")
    for i, line in enumerate(lines):
        if not line.strip():
            raise MogonetFormatError(f"{path}: line {i + 1} is blank")
    return lines


def read_matrix(path: Path, *, rows: Optional[int] = None, cols: Optional[int] = None, what: str = "samples") -> np.ndarray:
    """A (rows, cols) float64 matrix from a header-less CSV, checked for shape and finiteness."""
    path = Path(path)
    lines = _read_lines(path)
    counts = [line.count(",") + 1 for line in lines]
    width = counts[0]
    for i, count in enumerate(counts):
        if count != width:
            raise MogonetFormatError(f"{path}: line {i + 1} has {count} columns but line 1 has {width}")
    if rows is not None and len(lines) != rows:
        raise MogonetFormatError(f"{path}: {len(lines)} rows, expected {rows} ({what})")
    if cols is not None and width != cols:
        raise MogonetFormatError(f"{path}: {width} columns, expected {cols}")
    try:
        values = np.array([line.split(",") for line in lines], dtype=np.float64)
    except ValueError:
        for r, line in enumerate(lines):
            for c, cell in enumerate(line.split(",")):
                try:
                    float(cell)
                except ValueError:
                    raise MogonetFormatError(f"{path}: line {r + 1}, column {c + 1}: {cell.strip()[:40]!r} is not a number") from None
        raise
    bad = ~np.isfinite(values)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise MogonetFormatError(f"{path}: line {r + 1}, column {c + 1} is {float(values[r, c])} (NaN or Inf)")
    return values


def read_labels(path: Path, *, num_classes: int, rows: Optional[int] = None) -> np.ndarray:
    """Integer labels in [0, num_classes), one per line (written as floats in the MOGONET files)."""
    path = Path(path)
    values = read_matrix(path, rows=rows, what="labels, one per sample")
    if values.shape[1] != 1:
        raise MogonetFormatError(f"{path}: {values.shape[1]} columns, expected one label per line")
    values = values[:, 0]
    labels = np.rint(values)
    off = np.abs(values - labels) > 1e-6
    if off.any():
        i = int(np.argmax(off))
        raise MogonetFormatError(f"{path}: line {i + 1} holds {float(values[i])!r}, not an integer class label")
    out = (labels < 0) | (labels >= num_classes)
    if out.any():
        i = int(np.argmax(out))
        raise MogonetFormatError(f"{path}: line {i + 1} holds label {int(labels[i])}, outside [0, {num_classes})")
    return labels.astype(np.int64)


def load_mogonet(data_dir: Path, *, num_classes: int, feature_counts: Optional[Sequence[int]] = None) -> MogonetData:
    """Read and check a MOGONET-layout folder (see the module docstring)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise MogonetFormatError(f"{data_dir}: data folder not found")
    required = [f"{v}_{p}.csv" for v in range(1, NUM_VIEWS + 1) for p in ("tr", "te")] + ["labels_tr.csv", "labels_te.csv"]
    missing = [name for name in required if not (data_dir / name).is_file()]
    if missing:
        raise MogonetFormatError(f"{data_dir}: missing {', '.join(missing)}")
    train_labels = read_labels(data_dir / "labels_tr.csv", num_classes=num_classes)
    test_labels = read_labels(data_dir / "labels_te.csv", num_classes=num_classes)
    for name, labels in (("labels_tr.csv", train_labels), ("labels_te.csv", test_labels)):
        absent = sorted(set(range(num_classes)) - set(labels.tolist()))
        if absent:  # a classifier cannot learn, nor AUC or macro F1 score, a class with no sample
            raise MogonetFormatError(f"{data_dir / name}: no sample of class {', '.join(map(str, absent))} (labels must cover 0..{num_classes - 1})")
    train, test, names = [], [], []
    for v in range(1, NUM_VIEWS + 1):
        cols = feature_counts[v - 1] if feature_counts is not None else None
        x_tr = read_matrix(data_dir / f"{v}_tr.csv", rows=len(train_labels), cols=cols, what="one per line of labels_tr.csv")
        x_te = read_matrix(data_dir / f"{v}_te.csv", rows=len(test_labels), cols=x_tr.shape[1], what="one per line of labels_te.csv")
        featname = data_dir / f"{v}_featname.csv"
        feature_names = None
        if featname.exists():
            feature_names = _read_lines(featname)
            if len(feature_names) != x_tr.shape[1]:
                raise MogonetFormatError(f"{featname}: {len(feature_names)} feature names but {v}_tr.csv has {x_tr.shape[1]} columns")
        train.append(x_tr)
        test.append(x_te)
        names.append(feature_names)
    return MogonetData(train, train_labels, test, test_labels, names)


def minmax_scale(train: np.ndarray, *others: np.ndarray) -> Tuple[np.ndarray, ...]:
    """``(x - min) / (max - min + 1e-10)`` with min and max of ``train``, applied to every array."""
    low = train.min(axis=0, keepdims=True)
    span = (train - low).max(axis=0, keepdims=True) + SCALE_EPS
    return tuple((x - low) / span for x in (train,) + others)


# ----------------------------------------------------------------------------- model and metrics


def build_omics_model(feature_counts: Sequence[int], num_classes: int, emb_dim: int, post_dim: int, dropout: float = 0.0) -> MultimodalClassifier:
    """The released medical model: per view ``Linear-ReLU-Linear`` encoders (no final ReLU), 2-layer
    MLP heads per view and a 2-layer MLP fusion head on the concatenated embeddings; xavier-normal
    weights and zero biases. The released code defines a Dropout(0.5) in the heads but never
    applies it, hence ``dropout=0`` by default."""
    encoders = [mlp(d, emb_dim, emb_dim) for d in feature_counts]
    heads = [mlp(emb_dim, post_dim, num_classes, dropout=dropout) for _ in feature_counts]
    fusion = mlp(emb_dim * len(feature_counts), post_dim, num_classes, dropout=dropout)
    return MultimodalClassifier(encoders, heads, fusion, encode_mixed_jointly=True)


def binary_metrics(y: np.ndarray, prob: np.ndarray) -> Dict[str, float]:
    """ACC, F1 of class 1 and ROC AUC of the probability of class 1 (scikit-learn)."""
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

    pred = prob.argmax(axis=1)
    return {
        "acc": float(accuracy_score(y, pred)),
        "f1": float(f1_score(y, pred, zero_division=0)),
        "auc": float(roc_auc_score(y, prob[:, 1])),
    }


def multiclass_metrics(y: np.ndarray, prob: np.ndarray) -> Dict[str, float]:
    """ACC, weighted F1 and macro F1 (scikit-learn)."""
    from sklearn.metrics import accuracy_score, f1_score

    pred = prob.argmax(axis=1)
    return {
        "acc": float(accuracy_score(y, pred)),
        "wf1": float(f1_score(y, pred, average="weighted", zero_division=0)),
        "mf1": float(f1_score(y, pred, average="macro", zero_division=0)),
    }


METRICS = {
    "binary": (binary_metrics, {"acc": "ACC", "f1": "F1", "auc": "AUC"}),
    "multiclass": (multiclass_metrics, {"acc": "ACC", "wf1": "weighted F1", "mf1": "macro F1"}),
}


def make_task(spec: MogonetSpec, data: MogonetData, *, dropout: float = 0.0) -> Task:
    """An engine task from checked data: features scaled with the training set's min and max."""
    scaled = [minmax_scale(tr, te) for tr, te in zip(data.train, data.test)]
    as_tensor = lambda x: torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))  # noqa: E731
    train = TensorMultimodalDataset([as_tensor(tr) for tr, _ in scaled], torch.from_numpy(data.train_labels))
    test = TensorMultimodalDataset([as_tensor(te) for _, te in scaled], torch.from_numpy(data.test_labels))
    metrics, labels = METRICS[spec.metrics]
    counts = tuple(x.shape[1] for x in data.train)
    digest = hashlib.sha256()
    for array in (*data.train, data.train_labels, *data.test, data.test_labels):
        digest.update(np.ascontiguousarray(array).tobytes())
    return Task(
        name=spec.name,
        num_classes=spec.num_classes,
        build_model=functools.partial(build_omics_model, counts, spec.num_classes, spec.emb_dim, spec.post_dim, dropout),
        train=train,
        test=test,
        train_labels=train.labels,
        metrics=metrics,
        metric_labels=labels,
        published={k: dict(v) for k, v in spec.published.items()},
        notes=[
            "Features are min-max scaled with the whole training set (held-out rows included: feature ranges, no labels).",
            "Adam, full batch unless --batch-size is given; with a hold-out, the validation protocol trains on the training set minus the stratified hold-out.",
        ],
        data_id=f"sha256:{digest.hexdigest()[:16]}",
    )


# ----------------------------------------------------------------------------- data location and download


def find_data_dir(spec: MogonetSpec, data_dir: Optional[Path]) -> Path:
    """``--data-dir``, else the first default folder (:func:`training.datadir.default_data_dirs`) holding the dataset."""
    how = (
        f"download it with `python examples/{spec.name.lower()}.py --download DIR` (checksums verified) and pass --data-dir DIR"
        if spec.sha256
        else "fetch its CSV files into a folder and pass --data-dir DIR"
    )
    return datadir.find_data_dir(
        spec.name,
        data_dir,
        holds_data=lambda path: (path / "labels_tr.csv").is_file(),
        how_to_get=f"{spec.name} is distributed with MOGONET: https://github.com/txWang/MOGONET/tree/main/{spec.name} (MIT licence); "
        f"{how}, or set M3CO_DATA_DIR to a folder holding {spec.name}/.",
    )


def default_base_url(spec: MogonetSpec) -> str:
    return f"https://raw.githubusercontent.com/txWang/MOGONET/{MOGONET_COMMIT}/{spec.name}/"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(spec: MogonetSpec, dest: Path, *, base_url: Optional[str] = None, timeout: float = 60.0) -> List[Path]:
    """Fetch the dataset's CSV files into ``dest`` and verify their SHA-256.

    Files already present with the right checksum are kept; a file is written under a
    temporary name and renamed only once its checksum matches.
    """
    if not spec.sha256:
        raise SystemExit(f"no checksums are known for {spec.name}; fetch it from https://github.com/txWang/MOGONET by hand")
    if base_url is not None:
        try:
            base_url = cli.http_url(base_url)
        except argparse.ArgumentTypeError as err:
            raise SystemExit(f"{spec.name}: base_url {err}") from None
    base = (base_url or default_base_url(spec)).rstrip("/") + "/"
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for name, expected in spec.sha256.items():
        target = dest / name
        if target.is_file() and sha256_of(target) == expected:
            written.append(target)
            continue
        url = base + name
        tmp = dest / f".{name}.part"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
                while block := response.read(1 << 20):
                    out.write(block)
        except (OSError, ValueError) as err:  # ValueError: a URL urllib cannot open
            tmp.unlink(missing_ok=True)
            raise SystemExit(f"could not download {url}: {err}") from None
        got = sha256_of(tmp)
        if got != expected:
            tmp.unlink(missing_ok=True)
            raise SystemExit(f"{url}: SHA-256 {got} does not match the expected {expected}; nothing written for {name}")
        os.replace(tmp, target)
        written.append(target)
    return written


# ----------------------------------------------------------------------------- command line


def default_config(spec: MogonetSpec) -> TrainConfig:
    """The released settings: 500 full-batch epochs, Adam, weight decay 1e-4, StepLR gamma 0.2.

    The validation split is scored every epoch and the test set every 10 epochs: after epochs
    9, 19, ..., 499 (0-based), the scores ``best_on_test`` selects among. The released loop
    scores after epochs 0, 10, ..., 490 instead (``epoch % 10 == 0``); ``--recipe released``
    does that."""
    return TrainConfig(
        epochs=500, lr=spec.lr, weight_decay=1e-4, scheduler="step", step_size=250, gamma=0.2, holdout=0.2, eval_every=1, test_every=10
    )


# StepLR step: 250 epochs in the paper, 500 in the released code (no decay within 500 epochs).
STEP_SIZES = {"paper": 250, "reference": 500}
RELEASED_STEP_SIZE = 500  # train_medical.py:36-38, whatever the loss convention


def build_parser(spec: MogonetSpec) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{spec.name.lower()}.py",
        description=f"M3CoL and its ablations on {spec.name} (MOGONET layout); results under three evaluation protocols.",
    )
    parser.add_argument("--data-dir", type=cli.path_argument("folder"), default=None, help=f"folder with the {spec.name} CSVs (default: $M3CO_DATA_DIR/{spec.name}, then ../shared/data/{spec.name})")
    parser.add_argument("--download", type=cli.path_argument("folder"), metavar="DIR", default=None, help="download the CSVs into DIR, verify their SHA-256, and exit")
    parser.add_argument("--base-url", type=cli.http_url, default=None, help="where --download fetches from (default: the MOGONET repository's raw files)")
    parser.add_argument("--dropout", type=cli.dropout_rate, default=0.0, help="head dropout in [0, 1) (the released code never applies its 0.5)")
    recipes.add_recipe_argument(parser, recipes.MEDICAL_RELEASED)
    cli.add_arguments(parser, default_config(spec))
    return parser


def parse(spec: MogonetSpec, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_parser(spec)
    # --output-dir is required for training only
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--download" or a.startswith("--download=") for a in argv) and not any(a.startswith("--output-dir") for a in argv):
        argv += ["--output-dir", os.devnull]
    return parser.parse_args(argv)


def check_passed_on(spec: MogonetSpec, argv: Sequence[str]) -> None:
    """Check the options a sweep passes on to each run before the first run starts (argparse's exit 2 names a bad one)."""
    parse(spec, list(argv) + ["--output-dir", "unused"])


def given_options(spec: MogonetSpec, argv: Sequence[str]) -> argparse.Namespace:
    """The options that ``argv`` gives explicitly, parsed by the pipeline's parser (``--seeds=1``,
    ``--seeds 1`` and an abbreviation alike); an option not given is absent from the namespace,
    so that a sweep can set its own default only then (``--output-dir`` is left out).
    argparse's exit 2 names a bad option."""
    parser = build_parser(spec)
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    given = parser.parse_args(list(argv) + ["--output-dir", "unused"])
    del given.output_dir
    return given


def sweep_parser(spec: MogonetSpec, description: str) -> argparse.ArgumentParser:
    """The parser of a script that runs this pipeline several times into ``--output-dir``/NAME, passing other options on."""
    parser = argparse.ArgumentParser(description=description, epilog=cli.PASSTHROUGH_EPILOG.format(script=f"examples/{spec.name.lower()}.py"))
    parser.add_argument("--output-dir", type=cli.output_folder, required=True)
    return parser


def config_from_args(spec: MogonetSpec, args: argparse.Namespace) -> TrainConfig:
    """The run's configuration; a head dropout other than the released 0 and ``--recipe released``
    are recorded in ``extra`` (so that they are in results.json and in the fingerprint that
    decides which seeds are reused). Raises :class:`ConfigError` for an option the
    recipe cannot honour."""
    recipes.check_medical(args)
    released = args.recipe == "released"
    step_sizes = {c: RELEASED_STEP_SIZE for c in STEP_SIZES} if released else STEP_SIZES
    config = cli.config_from_args(args, default_config(spec), step_sizes=step_sizes)
    extra = dict(config.extra)
    if args.dropout:
        extra["dropout"] = args.dropout
    if released:
        extra["recipe"] = "released"
        config = dataclasses.replace(config, test_grid="released")
    return dataclasses.replace(config, extra=extra).validate()


def main(spec: MogonetSpec, argv: Optional[Sequence[str]] = None) -> Optional[dict]:
    args = parse(spec, argv)
    if args.download is not None:
        files = download(spec, args.download, base_url=args.base_url)
        print(f"{len(files)} {spec.name} files in {args.download}, SHA-256 verified. Train with --data-dir {args.download}")
        return None
    try:
        config = config_from_args(spec, args)  # options first: a bad one fails before the data is read
    except ConfigError as err:
        raise SystemExit(f"{spec.name}: {err}") from None
    data_dir = find_data_dir(spec, args.data_dir)
    try:
        data = load_mogonet(data_dir, num_classes=spec.num_classes, feature_counts=spec.feature_counts)
    except MogonetFormatError as err:
        raise SystemExit(f"{spec.name}: {err}") from None
    rows = (len(data.train_labels), len(data.test_labels))
    if rows != (spec.train_size, spec.test_size):
        print(f"warning: the released {spec.name} split has {spec.train_size} training and {spec.test_size} test rows; "
              f"{data_dir} has {rows[0]} and {rows[1]}", flush=True)
    task = make_task(spec, data, dropout=args.dropout)
    return cli.launch(task, config, args.seeds, args.output_dir, workers=args.workers)
