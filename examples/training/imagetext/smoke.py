"""Generated data and tiny local encoders for the ``--smoke`` runs and the tests.

Nothing here touches the network: the datasets are written in the released layouts with PIL,
the encoders are random tiny BERT / ViT configurations saved with ``save_pretrained``, and the
tokenizer is a WordPiece vocabulary written to disk. The pipelines then load all of it through
their normal code path (readers, ``from_pretrained``, engine).

Images carry their class in a colour and a stripe orientation, texts in a class word among
filler words, so that a model can learn something in a few steps. Each split gets one pair
without an image and one without text, so that the readers' dropping is exercised.
"""

from __future__ import annotations

import csv
import inspect
import json
from pathlib import Path
from typing import Dict, Sequence, Tuple

import numpy as np
from PIL import Image

__all__ = ["FOOD_CLASSES", "NEWS_SECTIONS", "make_food101", "make_n24news", "make_tiny_encoders", "smoke_vocabulary"]

FOOD_CLASSES = ("apple_pie", "sushi", "tacos", "waffles")
NEWS_SECTIONS = ("Food", "Science", "Sports", "Travel")
FILLER = ("fresh", "recipe", "easy", "best", "homemade", "quick", "classic", "the", "with", "and", "today", "news", "story")
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _class_words(name: str) -> Tuple[str, ...]:
    return tuple(name.lower().replace("_", " ").split())


def smoke_vocabulary() -> Tuple[str, ...]:
    words = {w for name in FOOD_CLASSES + NEWS_SECTIONS for w in _class_words(name)} | set(FILLER)
    return SPECIAL_TOKENS + tuple(sorted(words)) + tuple("abcdefghijklmnopqrstuvwxyz")


def _image(label: int, num_classes: int, rng: np.random.Generator, size: Tuple[int, int] = (40, 48)) -> Image.Image:
    height, width = size
    hue = np.array([np.cos(2 * np.pi * label / num_classes), np.sin(2 * np.pi * label / num_classes), (label % 2) * 2 - 1.0])
    colour = 128 + 80 * hue
    yy, xx = np.mgrid[0:height, 0:width]
    stripes = np.sin((xx if label % 2 else yy) * (0.5 + 0.25 * label))[..., None] * 40
    pixels = colour[None, None, :] + stripes + rng.normal(0, 25, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _text(name: str, rng: np.random.Generator) -> str:
    words = list(rng.choice(FILLER, size=int(rng.integers(3, 7))))
    position = int(rng.integers(0, len(words) + 1))
    return " ".join(words[:position] + list(_class_words(name)) + words[position:])


def make_food101(root, *, per_class: Dict[str, int] = None, classes: Sequence[str] = FOOD_CLASSES, seed: int = 0) -> Path:
    """Food-101 under ``root`` in both layouts: UPMC's (``texts/<split>_titles.csv``, with one pair
    without image and one without text per split) and the authors' released one (``<split>.csv``
    and ``texts_txt/<class>/<id>.txt``, complete pairs only, texts with capitals, digits and
    punctuation); ``per_class`` = pairs per class and split (default train 16, test 6)."""
    per_class = per_class or {"train": 16, "test": 6}
    root = Path(root)
    rng = np.random.default_rng(seed)
    (root / "texts").mkdir(parents=True, exist_ok=True)
    for split, count in per_class.items():
        rows, released = [], [["id", "text", "annotation", "label"]]
        for label, name in enumerate(classes):
            folder = root / "images" / split / name
            folder.mkdir(parents=True, exist_ok=True)
            (root / "texts_txt" / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                file_name = f"{name}_{i}.jpg"
                _image(label, len(classes), rng).save(folder / file_name, quality=90)
                rows.append([file_name, _text(name, rng), name])
                released.append([file_name, rows[-1][1], name, label])
                (root / "texts_txt" / name / f"{name}_{i}.txt").write_text(f"{rows[-1][1].title()} - Recipe #{i}: 100% yum!\n", encoding="utf-8")
        with open(root / f"{split}.csv", "w", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerows(released)
        rows.append([f"{classes[0]}_no_image.jpg", _text(classes[0], rng), classes[0]])  # image file missing
        _image(0, len(classes), rng).save(root / "images" / split / classes[0] / f"{classes[0]}_no_text.jpg")
        rows.append([f"{classes[0]}_no_text.jpg", "", classes[0]])  # empty text
        with open(root / "texts" / f"{split}_titles.csv", "w", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerows(rows)
    return root


def make_n24news(root, *, per_class: Dict[str, int] = None, sections: Sequence[str] = NEWS_SECTIONS, seed: int = 0) -> Path:
    """N24News layout under ``root``; ``per_class`` = pairs per section and split (default train 16, dev 4, test 6)."""
    per_class = per_class or {"train": 16, "dev": 4, "test": 6}
    root = Path(root)
    rng = np.random.default_rng(seed)
    (root / "news").mkdir(parents=True, exist_ok=True)
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    for split, count in per_class.items():
        records = []
        for label, section in enumerate(sections):
            for i in range(count):
                image_id = f"{split}_{label}_{i}"
                _image(label, len(sections), rng).save(root / "imgs" / f"{image_id}.jpg", quality=90)
                records.append(
                    {
                        "headline": _text(section, rng),
                        "caption": _text(section, rng),
                        "abstract": _text(section, rng),
                        "article": _text(section, rng),
                        "image_id": image_id,
                        "section": section,
                    }
                )
        records.append({"headline": _text(sections[0], rng), "caption": "x", "abstract": "x", "article": "x", "image_id": f"{split}_missing", "section": sections[0]})
        _image(0, len(sections), rng).save(root / "imgs" / f"{split}_no_text.jpg")
        records.append({"headline": "", "caption": None, "abstract": "", "article": "", "image_id": f"{split}_no_text", "section": sections[0]})
        with open(root / "news" / f"nytimes_{split}.json", "w", encoding="utf-8") as handle:
            json.dump(records, handle)
    return root


def make_tiny_encoders(root, *, hidden: int = 32, layers: int = 2, image_size: int = 32, patch: int = 8, seed: int = 0) -> Tuple[Path, Path]:
    """Save a random tiny ViT (with its image processor) and a tiny BERT (with a WordPiece tokenizer).

    Returns ``(image_encoder_dir, text_encoder_dir)``, loadable with ``from_pretrained``.
    """
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    root = Path(root)
    image_dir, text_dir = root / "tiny-vit", root / "tiny-bert"
    text_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    vit = transformers.ViTConfig(
        image_size=image_size,
        patch_size=patch,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
    )
    transformers.ViTModel(vit, add_pooling_layer=False).save_pretrained(image_dir)
    processor_class = getattr(transformers, "ViTImageProcessorPil", None) or transformers.ViTImageProcessor
    processor_class(size={"height": image_size, "width": image_size}).save_pretrained(image_dir)

    vocab_file = text_dir / "vocab.txt"
    vocab_file.write_text("\n".join(smoke_vocabulary()) + "\n", encoding="utf-8")
    # transformers 5 takes the vocabulary as `vocab`, 4.x as `vocab_file`
    vocab_argument = "vocab" if "vocab" in inspect.signature(transformers.BertTokenizerFast.__init__).parameters else "vocab_file"
    tokenizer = transformers.BertTokenizerFast(**{vocab_argument: str(vocab_file)}, do_lower_case=True, model_max_length=512)
    tokenizer.save_pretrained(text_dir)
    bert = transformers.BertConfig(
        vocab_size=len(smoke_vocabulary()),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=512,
    )
    transformers.BertModel(bert, add_pooling_layer=False).save_pretrained(text_dir)
    return image_dir, text_dir
