"""M3CoL on UPMC Food-101 (101 classes; a food photo and the title of its recipe page).

    python examples/food101.py --data-dir DIR --seeds 0 1 2 --method m3col --output-dir OUT
    python examples/food101.py --data-dir DIR --recipe released --output-dir OUT   # the authors' released loop and layout
    python examples/food101.py --smoke --output-dir OUT      # generated data, tiny encoders, 2 epochs on the CPU

``--layout upmc`` (the default): DIR holds ``images/{train,test}/<class>/<file>.jpg`` and
``texts/{train,test}_titles.csv`` (rows: image file name, text, class name); 5000 training pairs
are held out for validation (``--validation-size``, drawn with ``--split-seed``).
``--layout released`` (the default with ``--recipe released``): the authors' layout, ``train.csv``
/ ``test.csv`` with texts in ``texts_txt/<class>/<id>.txt`` (``training/imagetext/food101.py``).
Settings: ViT-B/16 and BERT-base, 50 epochs, batches of 32 accumulated to 128, Adam (encoders
5e-5, heads 1e-4, weight decay 1e-4), ReduceLROnPlateau (factor 0.2, patience 2) stepped on
validation accuracy (the released loop steps it on training accuracy: ``--recipe released``).
Writes OUT/results.json, OUT/results.md (beside the paper's numbers) and OUT/curves.png.
"""

from __future__ import annotations

from training.cli import int_at_least
from training.imagetext.data import FOOD101_VALIDATION_SIZE, load_food101
from training.imagetext.food101 import load_food101_released
from training.imagetext.pipeline import ImageTextSpec, build_parser as imagetext_parser, main
from training.imagetext.smoke import make_food101


def add_options(parser) -> None:
    parser.add_argument("--validation-size", type=int_at_least(1), default=FOOD101_VALIDATION_SIZE, help="training pairs held out for validation (default: %(default)s)")
    parser.add_argument("--split-seed", type=int_at_least(0), default=0, help="seed of the validation hold-out, the same for every training seed (default: %(default)s)")
    parser.add_argument(
        "--layout",
        choices=("upmc", "released"),
        default=None,
        help="upmc: texts/{train,test}_titles.csv; released: the authors' train.csv/test.csv with texts_txt/<class>/<id>.txt, "
        "reduced to lower-case letters, the hold-out drawn as torch's random_split draws it (default: released with --recipe released, else upmc)",
    )


def layout(args) -> str:
    return args.layout or ("released" if args.recipe == "released" else "upmc")


def load(args, root):
    reader = load_food101_released if layout(args) == "released" else load_food101
    return reader(root, validation_size=args.validation_size, split_seed=args.split_seed)


def published(args, family: str):
    return {
        "M3CoL (paper, 3 runs)": {"acc": (0.943, 0.0004)},
        "UniS-MMC (previous best)": {"acc": (0.947, None)},
        "UniConcat (paper's baseline)": {"acc": (0.937, None)},
    }


FOOD101 = ImageTextSpec(
    name="food101",
    num_classes=101,
    source="the UPMC Food-101 release (https://visiir.isir.upmc.fr/explore; the M3CoL authors' split of it is linked from github.com/RaghavSinghal10/M3CoL)",
    markers=("texts/train_titles.csv", "train.csv"),
    epochs=50,
    plateau_patience=2,
    min_epoch=2,
    lr={"image_encoder": 5e-5, "text_encoder": 5e-5, "image_head": 1e-4, "text_head": 1e-4, "fusion_head": 1e-4},
    load=load,
    add_options=add_options,
    published=published,
    make_smoke_data=make_food101,
    smoke_defaults={"validation_size": 8},
    describe=lambda args: f"layout {layout(args)}; validation: {args.validation_size} training pairs held out (split seed {args.split_seed}); ",
)

def build_parser():
    """This script's options (validated), without running it."""
    return imagetext_parser(FOOD101)


if __name__ == "__main__":
    main(FOOD101)
