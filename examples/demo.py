"""Demo: a two-modality classifier on generated data, trained with and without M3CoLoss.

Both modalities are noisy views of one latent class signal; the second is much noisier. The
script trains the same model twice with the shared training engine (same seed, same data): once
with the unimodal and fusion cross-entropies only (``unimodal-sup``), once with the M3CoL
contrastive term added (``m3col``: M3Co on mixed raw inputs for the first third of the epochs,
then MultiSClip), and prints both test accuracies. It needs no data or network and runs in well
under a minute on 2 CPU cores.

    python examples/demo.py [--epochs 60] [--seed 0]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch
from torch import nn

from training.cli import int_at_least
from training.config import Task, TrainConfig
from training.data import TensorMultimodalDataset
from training.model import MultimodalClassifier, mlp
from training.trainer import train_seed


def make_views(n: int, generator: torch.Generator, *, classes: int = 6, latent: int = 8):
    """Two noisy views of one latent class signal (the second much noisier) and the labels."""
    centers = torch.randn(classes, latent, generator=torch.Generator().manual_seed(1234)) * 1.2
    project = [torch.randn(latent, dim, generator=torch.Generator().manual_seed(seed)) for dim, seed in ((40, 1), (60, 2))]
    y = torch.randint(0, classes, (n,), generator=generator)
    signal = centers[y] + torch.randn(n, latent, generator=generator)
    x_clear = signal @ project[0] + 2.0 * torch.randn(n, 40, generator=generator)
    x_noisy = signal @ project[1] + 8.0 * torch.randn(n, 60, generator=generator)
    return [x_clear, x_noisy], y


def make_data(n: int, generator: torch.Generator) -> TensorMultimodalDataset:
    views, y = make_views(n, generator)
    return TensorMultimodalDataset(views, y)


def build_model(width: int = 64, classes: int = 6) -> MultimodalClassifier:
    return MultimodalClassifier(
        [mlp(d, width, width, init="default") for d in (40, 60)],
        [nn.Linear(width, classes) for _ in range(2)],
        mlp(2 * width, width, classes, init="default"),
        encode_mixed_jointly=True,
    )


def accuracy(y, prob):
    return {"acc": float((prob.argmax(1) == y).mean())}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int_at_least(1), default=60)
    parser.add_argument("--seed", type=int_at_least(0), default=0)
    parser.add_argument("--train-size", type=int_at_least(2), default=400)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    g = torch.Generator().manual_seed(args.seed)
    train, test = make_data(args.train_size, g), make_data(4000, g)
    task = Task(
        name="demo",
        num_classes=6,
        build_model=build_model,
        train=train,
        test=test,
        train_labels=train.labels,
        metrics=accuracy,
        metric_labels={"acc": "ACC"},
    )
    # minibatches of 64, Adam 1e-3, no hold-out: only the last epoch is scored (the `final` protocol)
    config = TrainConfig(
        epochs=args.epochs, batch_size=64, lr=1e-3, weight_decay=1e-4, scheduler="none", holdout=0, test_every=0, progress=False, threads=1
    )
    start = time.perf_counter()
    scores = {}
    for method in ("unimodal-sup", "m3col"):
        record = train_seed(task, dataclasses.replace(config, method=method), args.seed)
        scores[method] = record["protocols"]["final"]["acc"]
    print(f"test accuracy without M3CoLoss: {scores['unimodal-sup']:.3f}")
    print(f"test accuracy with    M3CoLoss: {scores['m3col']:.3f}")
    print(f"({args.train_size} training samples, {args.epochs} epochs, seed {args.seed}, {time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
