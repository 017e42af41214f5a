"""M3CoL on BRCA (breast-cancer PAM50 subtypes, 5 classes; mRNA, DNA methylation, miRNA).

    python examples/brca.py --data-dir DIR --seeds 0 1 2 3 4 --method m3col --output-dir OUT

Same pipeline and outputs as ``rosmap.py``. Released settings: 500 full-batch epochs, Adam
lr 5e-3, weight decay 1e-4, embeddings and head width 768. BRCA is not shipped with this
project: fetch the MOGONET repository's BRCA folder (github.com/txWang/MOGONET) and pass
``--data-dir``.
"""

from __future__ import annotations

from training.omics import MogonetSpec, build_parser as omics_parser, main

BRCA = MogonetSpec(
    name="BRCA",
    num_classes=5,
    feature_counts=(1000, 1000, 503),
    train_size=612,
    test_size=263,
    emb_dim=768,
    post_dim=768,
    lr=5e-3,
    metrics="multiclass",
    published={
        "M3CoL (paper, 5 runs)": {"acc": (0.884, 0.0057), "wf1": (0.890, 0.0042), "mf1": (0.862, 0.0054)},
        "Dynamics (previous best)": {"acc": (0.877, None), "wf1": (0.880, None), "mf1": (0.845, None)},
    },
)

def build_parser():
    """This script's options (validated), without running it."""
    return omics_parser(BRCA)


if __name__ == "__main__":
    main(BRCA)
