"""``--recipe``: the package's training loop, or the authors' released one, item by item.

``--recipe package`` (the default) trains as the package's engine does everywhere: shuffled
mini-batches, averaged micro-batch gradients, the three evaluation protocols.
``--recipe released`` follows the training loops of the authors' released code
(github.com/RaghavSinghal10/M3CoL): every item below names the released file and line it
follows. The loss conventions are a separate switch (``--convention reference``); the recipe
is the loop around the loss. Options that a recipe cannot honour are refused in one line
before any data is read (:func:`check_medical`, :func:`check_imagetext`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple
from training.config import ConfigError


RECIPES = ("package", "released")


@dataclass(frozen=True)
class RecipeItem:
    """One thing the released recipe does, and the released file and lines it follows."""

    what: str
    source: str

    def line(self) -> str:
        return f"{self.what} ({self.source})"


MEDICAL_RELEASED: Tuple[RecipeItem, ...] = (
    RecipeItem(
        "the test set is scored after epochs 0, 10, ..., 490 (epoch % 10 == 0), the scores best_on_test selects among; "
        "the last epoch is scored for the final protocol only",
        "train_medical.py:167, 195-199",
    ),
    RecipeItem("full-batch Adam, one step per epoch, 500 epochs", "train_medical.py:131-145, 186-188, 195"),
    RecipeItem("StepLR step 500, gamma 0.2, i.e. no decay within 500 epochs", "train_medical.py:36-40, 189-191"),
)

IMAGETEXT_RELEASED: Tuple[RecipeItem, ...] = (
    RecipeItem(
        "the validation split is scored every --valid-step (50) optimiser steps once the epoch index exceeds --min-epoch "
        "(Food-101 2, N24News 1)",
        "train_image_text.py:329-332; src/config.py:42-43, 71-72",
    ),
    RecipeItem(
        "after each validation the best checkpoint so far (validation accuracy >= best + 1e-6) is reloaded, training "
        "goes on from it, and the test set is scored on it; the last such score is the validation protocol's figure",
        "train_image_text.py:269-274, 337-338",
    ),
    RecipeItem(
        "ReduceLROnPlateau (max, factor 0.2, patience 2 for Food-101, 1 for N24News) stepped once per epoch on the "
        "epoch's training accuracy of the fusion head",
        "train_image_text.py:135-138, 348-354; src/config.py:50-51, 79-80",
    ),
    RecipeItem(
        "model.train() is called once, before the first epoch: from the first validation on the model trains in eval "
        "mode (the encoders' dropout off)",
        "train_image_text.py:241, 284",
    ),
    RecipeItem(
        "no shuffling (shuffle=args.shuffle, a key the configuration lacks, reads False); the last incomplete training "
        "batch is dropped",
        "data/dataloader.py:258-265; src/functions.py:42-44",
    ),
    RecipeItem("--epochs + 1 epochs, M3Co while the epoch index is below int(0.33 * --epochs)", "train_image_text.py:290, 312"),
    RecipeItem(
        "the gradients of the 4 micro-batches of 32 are summed, not averaged (a step every 4 micro-batches, counted "
        "across epoch ends)",
        "train_image_text.py:289, 320-328; src/config.py:36-37",
    ),
    RecipeItem("float32 (no autocast anywhere in the released image-text code)", "train_image_text.py, model/model.py"),
    RecipeItem("image encoder google/vit-base-patch16-224 (the released folder vit_base_224)", "model/ImageEncoder.py:13, 29-33"),
    RecipeItem(
        "Food-101 in the released layout: train.csv / test.csv (id, text, annotation, label), texts read from "
        "texts_txt/<class>/<id>.txt and reduced to lower-case letters; the 5000 validation pairs are the last 5000 of "
        "torch.randperm(N) under seed 0 (random_split)",
        "data/dataloader.py:73-78, 161-180, 243-246",
    ),
    RecipeItem(
        "seed 0: the script seeds with args.seed, a key the configuration lacks, which reads False, i.e. 0",
        "train_image_text.py:113-116; src/functions.py:42-44",
    ),
    RecipeItem("validation and test in batches of 32, the last incomplete batch dropped", "data/dataloader.py:277-292"),
    RecipeItem("images flipped horizontally at random in every split", "data/dataloader.py:46-52, 208"),
)

# What the released recipe does not copy, and why.
IMAGETEXT_NOT_COPIED: Tuple[RecipeItem, ...] = (
    RecipeItem(
        "texts are padded to the batch's longest text, not to 512 tokens: padding is masked out, so the first-token "
        "embedding is the same up to rounding",
        "data/dataloader.py:198-205",
    ),
    RecipeItem(
        "Food-101 trains on the pairs left after the validation hold-out: the released loader holds them out into "
        "in_set but then reads train_set, a name it never binds for Food-101 (a NameError)",
        "data/dataloader.py:243-246, 253",
    ),
)


def recipe_help(items: Sequence[RecipeItem], not_copied: Sequence[RecipeItem] = ()) -> str:
    """``--help`` text of ``--recipe`` for one family of pipelines (``not_copied``: what it leaves out, and why)."""
    listed = "; ".join(f"({i + 1}) {item.line()}" for i, item in enumerate(items))
    skipped = "; ".join(item.line() for item in not_copied)
    return (
        "training loop: 'package' (default) or 'released', the authors' released loop, which here means: "
        + listed.replace("%", "%%")
        + (". Not copied: " + skipped.replace("%", "%%") if skipped else "")
        + ". Files and lines are those of github.com/RaghavSinghal10/M3CoL."
    )


def add_recipe_argument(parser, items: Sequence[RecipeItem], not_copied: Sequence[RecipeItem] = ()) -> None:
    parser.add_argument("--recipe", choices=RECIPES, default="package", help=recipe_help(items, not_copied))


def _refuse(recipe: str, option: str, why: str) -> None:
    raise ConfigError(f"--recipe {recipe}: {option} {why}")


def check_medical(args) -> None:
    """Refuse, in one line, options that the medical released recipe cannot honour."""
    if args.recipe != "released":
        return
    if args.batch_size is not None:
        _refuse("released", "--batch-size", "does not apply: the released medical loop trains full batch")
    if args.accumulate != 1:
        _refuse("released", "--accumulate", "does not apply: the released medical loop takes one full-batch step per epoch")
    if args.scheduler != "step":
        _refuse("released", f"--scheduler {args.scheduler}", "does not apply: the released medical loop uses StepLR")
    if args.test_every != 10:
        _refuse("released", f"--test-every {args.test_every}", "does not apply: the released medical loop scores the test set every 10 epochs")
    if args.ema_decay is not None:
        _refuse("released", "--ema-decay", "does not apply: the released loop scores the trained weights")


def check_imagetext(args) -> None:
    """Refuse, in one line, options that do not go with ``args.recipe`` on the image-text pipelines."""
    released = args.recipe == "released"
    if not released:
        for option in ("valid_step", "min_epoch"):
            if getattr(args, option) is not None:
                _refuse("package", f"--{option.replace('_', '-')}", "belongs to --recipe released (the package scores the validation split after every epoch)")
        return
    if args.bf16:
        _refuse("released", "--bf16", "does not apply: the released image-text loop trains in float32")
    if args.scheduler != "plateau":
        _refuse("released", f"--scheduler {args.scheduler}", "does not apply: the released loop uses ReduceLROnPlateau on the training accuracy")
    if args.distributed:
        _refuse("released", "--distributed", "does not apply: the released loop trains in one process")
    if args.ema_decay is not None:
        _refuse("released", "--ema-decay", "does not apply: the released loop scores the trained weights")
    for option in ("eval_every", "test_every"):
        if getattr(args, option) != 1:
            _refuse("released", f"--{option.replace('_', '-')}", "does not apply: the released loop validates every --valid-step optimiser steps and scores the test set after each validation")
    for option in ("valid_step", "min_epoch"):
        value = getattr(args, option)
        if value is not None and value < (1 if option == "valid_step" else 0):
            _refuse("released", f"--{option.replace('_', '-')} {value}", "must be >= 1" if option == "valid_step" else "must be >= 0")
