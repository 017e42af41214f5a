"""M3CoL on N24News (24 New York Times sections; a news photo and its headline, caption or abstract).

    python examples/n24news.py --data-dir DIR --text-field headline --text-encoder roberta-base --seeds 0 1 2 --output-dir OUT
    python examples/n24news.py --smoke --output-dir OUT      # generated data, tiny encoders, 2 epochs on the CPU

DIR holds ``news/nytimes_{train,dev,test}.json`` and ``imgs/<image_id>.jpg``; the label is the
record's ``section``, and ``dev`` is the validation split. Settings: ViT-B/16 and BERT-base or
RoBERTa-base, 25 epochs, batches of 32 accumulated to 128, Adam (text encoder 2e-5, image
encoder 5e-5, text head 5e-5, image and fusion heads 1e-4, weight decay 1e-4),
ReduceLROnPlateau (factor 0.2, patience 1) stepped on validation accuracy (the released loop
steps it on training accuracy: ``--recipe released`` trains with the released loop). Writes
OUT/results.json, OUT/results.md (beside the paper's numbers for the encoder and text field) and
OUT/curves.png.
"""

from __future__ import annotations

from training.imagetext.data import N24NEWS_TEXT_FIELDS, load_n24news
from training.imagetext.pipeline import ImageTextSpec, build_parser as imagetext_parser, main
from training.imagetext.smoke import make_n24news

# The paper's Table 1 (ACC, percent / 100): M3CoL and the previous best, UniS-MMC.
PUBLISHED = {
    "bert": {"headline": (0.808, 0.803), "caption": (0.780, 0.775), "abstract": (0.838, 0.832)},
    "roberta": {"headline": (0.809, 0.803), "caption": (0.792, 0.781), "abstract": (0.847, 0.842)},
}


def add_options(parser) -> None:
    parser.add_argument("--text-field", choices=N24NEWS_TEXT_FIELDS, default="headline", help="which text of a record is the text modality (default: %(default)s)")


def published(args, family: str):
    if family not in PUBLISHED:
        return {}
    m3col, unis_mmc = PUBLISHED[family][args.text_field]
    label = "BERT" if family == "bert" else "RoBERTa"
    return {
        f"M3CoL (paper, {label}, {args.text_field})": {"acc": (m3col, None)},
        f"UniS-MMC (previous best, {label}, {args.text_field})": {"acc": (unis_mmc, None)},
    }


N24NEWS = ImageTextSpec(
    name="N24News",
    num_classes=24,
    source="the N24News repository (https://github.com/billywzh717/N24News, which links the full dataset)",
    markers=("news/nytimes_train.json",),
    epochs=25,
    plateau_patience=1,
    min_epoch=1,
    lr={"image_encoder": 5e-5, "text_encoder": 2e-5, "image_head": 1e-4, "text_head": 5e-5, "fusion_head": 1e-4},
    load=lambda args, root: load_n24news(root, text_field=args.text_field),
    add_options=add_options,
    published=published,
    make_smoke_data=make_n24news,
    describe=lambda args: f"text field: {args.text_field}; ",
)

def build_parser():
    """This script's options (validated), without running it."""
    return imagetext_parser(N24NEWS)


if __name__ == "__main__":
    main(N24NEWS)
