"""M3CoL on ROSMAP (Alzheimer's disease vs normal control; mRNA, DNA methylation, miRNA).

    python examples/rosmap.py --data-dir DIR --seeds 0 1 2 3 4 --method m3col --output-dir OUT

writes OUT/results.json, OUT/results.md (beside the paper's numbers) and OUT/curves.png; every
run is scored under the validation, final-epoch and (optimistic) best-on-test protocols.
``--download DIR`` fetches the CSVs from the MOGONET repository and verifies their SHA-256.
Released settings: 500 full-batch epochs, Adam lr 2e-3, weight decay 1e-4, embeddings and head
width 1000, StepLR gamma 0.2 (step 250 in the paper, 500 in the released code).
"""

from __future__ import annotations

from training.omics import MogonetSpec, build_parser as omics_parser, main

ROSMAP = MogonetSpec(
    name="ROSMAP",
    num_classes=2,
    feature_counts=(200, 200, 200),
    train_size=245,
    test_size=106,
    emb_dim=1000,
    post_dim=1000,
    lr=2e-3,
    metrics="binary",
    published={
        "M3CoL (paper, 5 runs)": {"acc": (0.887, 0.0094), "f1": (0.885, 0.0094), "auc": (0.926, 0.0059)},
        "Dynamics (previous best)": {"acc": (0.857, None), "f1": (0.863, None), "auc": (0.911, None)},
    },
    # SHA-256 of the files as distributed in the MOGONET repository (folder ROSMAP)
    sha256={
        "1_featname.csv": "1df5c536e47eb0d532abbb8bea6a9361bba01a913e03cd03b8ef06fb7849a660",
        "1_te.csv": "d9d9daf05915556fd13008fb6ad7d88e0c5a8a57e5a985548640d4cd1563712b",
        "1_tr.csv": "37bfcc58da320bf6c37b22617ed821dcfa96ca4abd334adf4d42c8e3375d972b",
        "2_featname.csv": "7431418fb193e02a1c1431f9446ccc227c8818a4d40c1cb72a2b640a0d8d38b7",
        "2_te.csv": "546e9d7f640e54c4c1d6540ed2c1a3adb10497635e7d6b8d4099b4930271ac76",
        "2_tr.csv": "b1d1d20f8793e5f11248218f19493d9a7be366ee5bbbaff585058401976f8a21",
        "3_featname.csv": "2b0b3451af16597ae34342a6abc99e397482fef30a61821a8e8fe7cb69276bae",
        "3_te.csv": "c0d9efd6c35e8c5768b759238c95c64674d7e1e7f76ed07fca6f168d67e676f4",
        "3_tr.csv": "fd8708bc0c41f774209f9e6a49a74c5a9acd510dd62eadc299a18d49ccd9e862",
        "labels_te.csv": "20d728c6f51f79ff5fa7719b960daf22074a0e6e1f3028869042b02ca4e3f68d",
        "labels_tr.csv": "5859aa107dbf406937938ebefbec122d01fea5d41a9bd0292199f4406749e45d",
    },
)

def build_parser():
    """This script's options (validated), without running it."""
    return omics_parser(ROSMAP)


if __name__ == "__main__":
    main(ROSMAP)
