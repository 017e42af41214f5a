"""UPMC Food-101 in the authors' released layout (``food101.py --layout released``).

The layout the released loader reads (``data/dataloader.py``, lines 161-180 and 243-246 of
github.com/RaghavSinghal10/M3CoL)::

    food101/
      train.csv  test.csv                    header id,text,annotation,label (one pair per row)
      images/train/<annotation>/<id>         images/test/<annotation>/<id>
      texts_txt/<annotation>/<stem of id>.txt

``annotation`` is the class name and ``label`` its index. The text of a pair is its
``texts_txt`` file reduced to lower-case words of letters (:func:`letters_only`); the CSV's own
``text`` column is not read, as the released loader does not read it either. The validation
pairs are the last ``validation_size`` of ``torch.randperm(N)`` drawn with ``split_seed``: what
``torch.utils.data.random_split`` holds out under the released script's seed 0, training pairs
in that permuted order (the released loop does not shuffle).

Every pair must be complete: a missing image or text file, an empty text, a malformed CSV row
or a class whose label disagrees between rows raises :class:`DataError` naming the file (and
line). Dropping a pair instead would shift every index of the hold-out.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Dict, List, Tuple

import torch

from training.imagetext.data import FOOD101_VALIDATION_SIZE, DataError, ImageTextSample, ImageTextSplits, check_validation_size, folder_listing

__all__ = ["letters_only", "read_food101_released_split", "load_food101_released"]

COLUMNS = ("id", "text", "annotation", "label")
_NOT_A_LETTER = re.compile(r"[^A-Za-z]")
# A lone letter between blanks goes (matches taken left to right without overlap, so of
# "a b c d" only "b" and "d" go): the released loader's rule, dataloader.py:77.
_LONE_LETTER = re.compile(r"\s+[A-Za-z]\s+")


def letters_only(text: str) -> str:
    """The words the released loader keeps of a text file, lower-cased, joined by single spaces.

    Every character other than an ASCII letter is a blank; a lone letter between blanks is
    dropped (see ``_LONE_LETTER``). The released ``format_txt_file`` gives the same words with
    runs of blanks left in, which a tokenizer does not see.
    """
    return " ".join(_LONE_LETTER.sub(" ", _NOT_A_LETTER.sub(" ", text)).lower().split())


def _text_of(path: Path) -> str:
    try:
        raw = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"text file not found: {path}") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not valid UTF-8 text: {err}") from None
    except IsADirectoryError:
        raise DataError(f"{path} is a folder, not a text file") from None
    text = letters_only(raw)
    if not text:
        raise DataError(f"{path}: no word of letters in the text (empty after reducing it to letters)")
    return text


def read_food101_released_split(root, split: str) -> Tuple[List[Tuple[Path, str, str, int]], Path]:
    """Rows ``(image path, text, class name, label)`` of ``train.csv`` or ``test.csv``, and the CSV's path."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}")
    root = Path(root)
    csv_path = root / f"{split}.csv"
    if not csv_path.is_file():
        raise DataError(f"Food-101 {split} pairs not found: {csv_path}")
    image_root, text_root = root / "images" / split, root / "texts_txt"
    listings: Dict[str, frozenset] = {}
    rows: List[Tuple[Path, str, str, int]] = []
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                raise DataError(f"{csv_path} is empty")
            if tuple(cell.strip() for cell in header) != COLUMNS:
                raise DataError(f"{csv_path}, line 1: expected the header {','.join(COLUMNS)}; got {','.join(header)[:80]!r}")
            for line_no, row in enumerate(reader, start=2):
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                if len(row) != len(COLUMNS):
                    raise DataError(f"{csv_path}, line {line_no}: expected {len(COLUMNS)} fields ({','.join(COLUMNS)}); got {len(row)}")
                image_id, _, class_name, label = (cell.strip() for cell in row)
                if not image_id or not class_name:
                    raise DataError(f"{csv_path}, line {line_no}: empty id or annotation")
                if not label.isdigit():
                    raise DataError(f"{csv_path}, line {line_no}: label {label!r} is not a class index (an integer >= 0)")
                if class_name not in listings:
                    listings[class_name] = folder_listing(image_root / class_name)
                if image_id not in listings[class_name]:
                    raise DataError(f"{csv_path}, line {line_no}: image file not found: {image_root / class_name / image_id}")
                text = _text_of(text_root / class_name / Path(image_id).with_suffix(".txt").name)
                rows.append((image_root / class_name / image_id, text, class_name, int(label)))
    except UnicodeDecodeError as err:
        raise DataError(f"{csv_path} is not valid UTF-8 text: {err}") from None
    except csv.Error as err:
        raise DataError(f"{csv_path}: malformed CSV: {err}") from None
    if not rows:
        raise DataError(f"Food-101 {split} split is empty: {csv_path} holds no pair")
    return rows, csv_path


def _class_names(rows, csv_path: Path, names: Dict[int, str]) -> Dict[int, str]:
    for _, _, class_name, label in rows:
        if names.setdefault(label, class_name) != class_name:
            raise DataError(f"{csv_path}: label {label} names two classes, {names[label]!r} and {class_name!r}")
    return names


def load_food101_released(root, *, validation_size: int = FOOD101_VALIDATION_SIZE, split_seed: int = 0) -> ImageTextSplits:
    """The released Food-101 splits: train minus the hold-out, the hold-out, and test (see the module docstring)."""
    check_validation_size(validation_size)
    root = Path(root)
    train_rows, train_csv = read_food101_released_split(root, "train")
    test_rows, test_csv = read_food101_released_split(root, "test")
    if validation_size >= len(train_rows):
        raise ValueError(f"validation_size ({validation_size}) must be smaller than the {len(train_rows)} training pairs in {train_csv}")
    names = _class_names(train_rows, train_csv, {})
    missing = sorted(set(range(max(names) + 1)) - set(names))
    if missing:
        raise DataError(f"{train_csv}: no pair of class index {', '.join(map(str, missing[:5]))} (labels must run from 0 without gaps)")
    for _, _, class_name, label in test_rows:
        if names.get(label) != class_name:
            raise DataError(f"{test_csv}: label {label} ({class_name!r}) is not a class of {train_csv}")
    order = torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(split_seed)).tolist()
    cut = len(train_rows) - validation_size
    train = [ImageTextSample(*train_rows[i][:2], train_rows[i][3]) for i in order]
    return ImageTextSplits(
        train=train[:cut],
        validation=train[cut:],
        test=[ImageTextSample(image, text, label) for image, text, _, label in test_rows],
        classes=tuple(names[i] for i in range(len(names))),
        dropped={"train": {"missing_image": 0, "missing_text": 0}, "test": {"missing_image": 0, "missing_text": 0}},
    )
