"""Readers, datasets and batching for the image-text reproductions (UPMC Food-101, N24News).

The readers take the layouts of the public releases:

* UPMC Food-101: ``images/{train,test}/<class>/<file>.jpg`` and ``texts/{train,test}_titles.csv``
  whose rows are ``image file name, text, class name``. The 5000-sample validation split is
  held out from the training set with a fixed seed. (The authors' own layout, with texts in
  ``texts_txt/``, is read by :func:`training.imagetext.food101.load_food101_released`.)
* N24News: ``news/nytimes_{train,dev,test}.json`` (a JSON list of records with ``headline``,
  ``abstract``, ``caption``, ``article``, ``image_id`` and ``section``) and
  ``imgs/<image_id>.jpg``; the label is ``section``.

Pairs whose image file is missing or whose text is empty are dropped and counted (the counts
go to the log and to ``results.json``). Everything else that is wrong (an empty split, a CSV
row with the wrong number of fields, invalid JSON, a record without ``image_id`` or
``section``, an image that cannot be decoded) raises :class:`DataError` naming the file.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

__all__ = [
    "DataError",
    "ImageTextSample",
    "ImageTextSplits",
    "FOOD101_VALIDATION_SIZE",
    "N24NEWS_TEXT_FIELDS",
    "read_food101_split",
    "load_food101",
    "read_n24news_split",
    "load_n24news",
    "find_unreadable_images",
    "ImageTransform",
    "ImageTextDataset",
    "ImageTextCollator",
]

FOOD101_VALIDATION_SIZE = 5000
N24NEWS_TEXT_FIELDS = ("headline", "caption", "abstract")
N24NEWS_SPLITS = ("train", "dev", "test")


class DataError(ValueError):
    """A dataset file or folder is missing, empty or malformed; the message names the path."""


@dataclass(frozen=True)
class ImageTextSample:
    image: Path
    text: str
    label: int


@dataclass
class ImageTextSplits:
    """The three splits, the class names (label i is ``classes[i]``) and the dropped-pair counts."""

    train: List[ImageTextSample]
    validation: List[ImageTextSample]
    test: List[ImageTextSample]
    classes: Tuple[str, ...]
    dropped: Dict[str, Dict[str, int]] = field(default_factory=dict)

    def summary(self) -> str:
        sizes = f"train {len(self.train)}, validation {len(self.validation)}, test {len(self.test)}, {len(self.classes)} classes"
        parts = []
        for name, counts in self.dropped.items():
            if counts.get("missing_image") or counts.get("missing_text"):
                parts.append(f"{name}: {counts.get('missing_image', 0)} without image, {counts.get('missing_text', 0)} without text")
        dropped = "; dropped pairs: " + "; ".join(parts) if parts else "; no pair dropped"
        return sizes + dropped


def check_validation_size(validation_size) -> None:
    """Raise ValueError unless ``validation_size`` (training pairs held out for validation) is an int >= 1."""
    if isinstance(validation_size, bool) or not isinstance(validation_size, int) or validation_size < 1:
        raise ValueError(f"validation_size must be an int >= 1; got {validation_size!r}")


def folder_listing(folder: Path) -> frozenset:
    """File names in ``folder`` (empty if it does not exist): one listdir instead of one stat per sample."""
    try:
        return frozenset(os.listdir(folder))
    except FileNotFoundError:
        return frozenset()
    except NotADirectoryError as err:
        raise DataError(f"{folder} is not a folder") from err


def _require_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise DataError(f"{what} not found: {path}")


def _looks_like_header(row: Sequence[str]) -> bool:
    # A data row starts with an image file name, which always has an extension.
    return len(row) >= 1 and "." not in row[0]


def read_food101_split(root, split: str) -> Tuple[List[Tuple[Path, str, str]], Dict[str, int]]:
    """Rows ``(image path, text, class name)`` of one UPMC Food-101 split (``"train"`` or ``"test"``).

    Returns the rows whose image exists and whose text is not empty, and the counts of the
    dropped ones: ``{"missing_image": n, "missing_text": n}``.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}")
    root = Path(root)
    csv_path = root / "texts" / f"{split}_titles.csv"
    _require_file(csv_path, f"Food-101 {split} texts")
    image_root = root / "images" / split
    if not image_root.is_dir():
        raise DataError(f"Food-101 {split} images folder not found: {image_root}")
    listings: Dict[str, frozenset] = {}
    rows: List[Tuple[Path, str, str]] = []
    dropped = {"missing_image": 0, "missing_text": 0}
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:  # -sig: a byte-order mark is not data
            for line_no, row in enumerate(csv.reader(handle), start=1):
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue  # blank line
                if line_no == 1 and _looks_like_header(row):
                    continue
                if len(row) != 3:
                    raise DataError(
                        f"{csv_path}, line {line_no}: expected 3 fields (image file name, text, class name); got {len(row)}"
                    )
                file_name, text, class_name = (cell.strip() for cell in row)
                if not file_name or not class_name:
                    raise DataError(f"{csv_path}, line {line_no}: empty image file name or class name")
                if class_name not in listings:
                    listings[class_name] = folder_listing(image_root / class_name)
                if file_name not in listings[class_name]:
                    dropped["missing_image"] += 1
                elif not text:
                    dropped["missing_text"] += 1
                else:
                    rows.append((image_root / class_name / file_name, text, class_name))
    except UnicodeDecodeError as err:
        raise DataError(f"{csv_path} is not valid UTF-8 text: {err}") from err
    except csv.Error as err:
        raise DataError(f"{csv_path}: malformed CSV: {err}") from err
    if not rows:
        raise DataError(
            f"Food-101 {split} split is empty: no usable pair in {csv_path} "
            f"({dropped['missing_image']} rows without an image under {image_root}, {dropped['missing_text']} without text)"
        )
    return rows, dropped


def _to_samples(rows, classes: Dict[str, int], source: Path) -> List[ImageTextSample]:
    samples = []
    for image, text, class_name in rows:
        if class_name not in classes:
            raise DataError(f"{source}: class {class_name!r} does not occur in the training split")
        samples.append(ImageTextSample(image, text, classes[class_name]))
    return samples


def load_food101(root, *, validation_size: int = FOOD101_VALIDATION_SIZE, split_seed: int = 0) -> ImageTextSplits:
    """UPMC Food-101 with ``validation_size`` training pairs held out for validation.

    The held-out pairs are a uniformly random subset drawn with ``split_seed`` (fixed across
    training seeds, so every run selects its epoch on the same pairs). Classes are the sorted
    class names of the training split.
    """
    check_validation_size(validation_size)
    root = Path(root)
    train_rows, train_dropped = read_food101_split(root, "train")
    test_rows, test_dropped = read_food101_split(root, "test")
    if validation_size >= len(train_rows):
        raise ValueError(
            f"validation_size ({validation_size}) must be smaller than the {len(train_rows)} usable training pairs in {root}"
        )
    classes = {name: i for i, name in enumerate(sorted({row[2] for row in train_rows}))}
    train = _to_samples(train_rows, classes, root / "texts" / "train_titles.csv")
    order = np.random.default_rng(split_seed).permutation(len(train))
    held_out = set(order[:validation_size].tolist())
    return ImageTextSplits(
        train=[s for i, s in enumerate(train) if i not in held_out],
        validation=[train[i] for i in sorted(held_out)],
        test=_to_samples(test_rows, classes, root / "texts" / "test_titles.csv"),
        classes=tuple(classes),
        dropped={"train": train_dropped, "test": test_dropped},
    )


def read_n24news_split(root, split: str, *, text_field: str = "headline") -> Tuple[List[Tuple[Path, str, str]], Dict[str, int]]:
    """Rows ``(image path, text, section)`` of one N24News split (``"train"``, ``"dev"``, ``"test"``)."""
    if split not in N24NEWS_SPLITS:
        raise ValueError(f"split must be one of {N24NEWS_SPLITS}; got {split!r}")
    if text_field not in N24NEWS_TEXT_FIELDS:
        raise ValueError(f"text_field must be one of {N24NEWS_TEXT_FIELDS}; got {text_field!r}")
    root = Path(root)
    json_path = root / "news" / f"nytimes_{split}.json"
    _require_file(json_path, f"N24News {split} records")
    image_root = root / "imgs"
    if not image_root.is_dir():
        raise DataError(f"N24News images folder not found: {image_root}")
    try:
        with open(json_path, encoding="utf-8-sig") as handle:
            records = json.load(handle)
    except UnicodeDecodeError as err:
        raise DataError(f"{json_path} is not valid UTF-8 text: {err}") from err
    except json.JSONDecodeError as err:
        raise DataError(f"{json_path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from err
    if not isinstance(records, list):
        raise DataError(f"{json_path}: expected a JSON list of records; got a {type(records).__name__}")
    images = folder_listing(image_root)
    rows: List[Tuple[Path, str, str]] = []
    dropped = {"missing_image": 0, "missing_text": 0}
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(f"{json_path}, record {index}: expected an object; got a {type(record).__name__}")
        image_id, section = record.get("image_id"), record.get("section")
        if not isinstance(image_id, str) or not image_id.strip():
            raise DataError(f"{json_path}, record {index}: missing or non-string 'image_id'")
        if not isinstance(section, str) or not section.strip():
            raise DataError(f"{json_path}, record {index}: missing or non-string 'section'")
        text = record.get(text_field)
        if text is not None and not isinstance(text, str):
            raise DataError(f"{json_path}, record {index}: {text_field!r} is a {type(text).__name__}, not a string")
        file_name = f"{image_id.strip()}.jpg"
        if file_name not in images:
            dropped["missing_image"] += 1
        elif not text or not text.strip():
            dropped["missing_text"] += 1
        else:
            rows.append((image_root / file_name, text.strip(), section.strip()))
    if not rows:
        raise DataError(
            f"N24News {split} split is empty: no usable pair in {json_path} ({len(records)} records, "
            f"{dropped['missing_image']} without an image under {image_root}, {dropped['missing_text']} without a {text_field})"
        )
    return rows, dropped


def load_n24news(root, *, text_field: str = "headline") -> ImageTextSplits:
    """N24News with its released train / dev (validation) / test splits; classes are the sorted sections."""
    root = Path(root)
    read = {split: read_n24news_split(root, split, text_field=text_field) for split in N24NEWS_SPLITS}
    classes = {name: i for i, name in enumerate(sorted({row[2] for row in read["train"][0]}))}
    source = {split: root / "news" / f"nytimes_{split}.json" for split in N24NEWS_SPLITS}
    return ImageTextSplits(
        train=_to_samples(read["train"][0], classes, source["train"]),
        validation=_to_samples(read["dev"][0], classes, source["dev"]),
        test=_to_samples(read["test"][0], classes, source["test"]),
        classes=tuple(classes),
        dropped={"train": read["train"][1], "validation": read["dev"][1], "test": read["test"][1]},
    )


# ----------------------------------------------------------------------------- images


_RESAMPLE = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS}


class ImageTransform:
    """RGB image -> normalised (3, H, W) float tensor: resize to ``size``, scale to [0, 1], normalise.

    The same steps as the ViT image processor (``do_resize``, ``do_rescale``, ``do_normalize``),
    written out so that a random horizontal flip (the released code's training augmentation)
    can come first and so that the timm backend can use its own size and statistics.
    """

    def __init__(
        self,
        size: Tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        *,
        resample: str = "bilinear",
        horizontal_flip: bool = False,
    ) -> None:
        if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
            raise ValueError(f"size must be (height, width) of positive ints; got {size!r}")
        if len(mean) != 3 or len(std) != 3 or not all(s > 0 for s in std):
            raise ValueError(f"mean and std must hold 3 values (std > 0); got {mean!r}, {std!r}")
        if resample not in _RESAMPLE:
            raise ValueError(f"resample must be one of {sorted(_RESAMPLE)}; got {resample!r}")
        self.size = (int(size[0]), int(size[1]))
        self.mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
        self.resample = resample
        self.horizontal_flip = horizontal_flip

    def with_flip(self, horizontal_flip: bool) -> "ImageTransform":
        return ImageTransform(self.size, self.mean.ravel().tolist(), self.std.ravel().tolist(), resample=self.resample, horizontal_flip=horizontal_flip)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if self.horizontal_flip and torch.rand(()) < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        height, width = self.size
        image = image.resize((width, height), _RESAMPLE[self.resample])
        array = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0
        return torch.from_numpy((array - self.mean) / self.std)

    def __repr__(self) -> str:
        return (
            f"ImageTransform(size={self.size}, mean={self.mean.ravel().tolist()}, std={self.std.ravel().tolist()}, "
            f"resample={self.resample!r}, horizontal_flip={self.horizontal_flip})"
        )


def load_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError as err:
        raise DataError(f"image file disappeared after the split was read: {path}") from err
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DataError(f"cannot read image {path}: {err}") from err


def find_unreadable_images(samples: Sequence[ImageTextSample], *, threads: int = 1, progress: bool = False) -> List[Tuple[Path, str]]:
    """``(path, reason)`` for every image of ``samples`` that :func:`load_image` cannot decode.

    Each file is decoded in full, as training will decode it (``Image.verify`` alone passes a
    truncated JPEG). Decoding releases the GIL, so ``threads`` > 1 scans files in parallel."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    def failure(path: Path):
        try:
            load_image(path)
        except DataError as err:
            return path, str(err)
        return None

    paths = sorted({Path(s.image) for s in samples})
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        found = tqdm(pool.map(failure, paths), total=len(paths), desc="verifying images", disable=not progress, leave=False)
        return [f for f in found if f is not None]


class ImageTextDataset(torch.utils.data.Dataset):
    """``(pixels (3, H, W), text, label)`` for each :class:`ImageTextSample`."""

    def __init__(self, samples: Sequence[ImageTextSample], transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        sample = self.samples[index]
        return self.transform(load_image(sample.image)), sample.text, sample.label


class ImageTextCollator:
    """Stacks images and tokenises the batch's texts (padded to the longest, truncated at ``max_tokens``).

    Padding to the batch's longest text instead of always to 512 tokens gives the same
    first-token embeddings (padding is masked out) at a fraction of the cost.
    """

    def __init__(self, tokenizer, *, max_tokens: int = 512) -> None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 2:
            raise ValueError(f"max_tokens must be an int >= 2; got {max_tokens!r}")
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens

    def __call__(self, items) -> Tuple[List[object], torch.Tensor]:
        """``([pixels (N, 3, H, W), tokens {input_ids, attention_mask[, token_type_ids]}], labels)``."""
        pixels, texts, labels = zip(*items)
        encoded = self.tokenizer(list(texts), padding="longest", truncation=True, max_length=self.max_tokens, return_tensors="pt")
        tokens = {key: encoded[key] for key in ("input_ids", "attention_mask", "token_type_ids") if key in encoded}
        return [torch.stack(pixels), tokens], torch.tensor(labels, dtype=torch.long)
