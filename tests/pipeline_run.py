"""A tiny pipeline on generated data with the engine's command line, for tests/examples/test_pipeline_io.py.

    python tests/pipeline_run.py --output-dir OUT --seeds 0 --epochs 4 [engine options]
        [--pause-at-epoch E --gate FILE]

``--pause-at-epoch E`` stops the run once the checkpoint of epoch E is on disk: it writes
``FILE.paused`` and waits (holding the output folder) until ``FILE`` exists, so that a test can
start a second run or kill this one at a known point.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import training  # noqa: E402

DIMS, CLASSES, WIDTH = (6, 5), 3, 8


def build_model() -> training.MultimodalClassifier:
    return training.MultimodalClassifier(
        [training.mlp(d, WIDTH, WIDTH) for d in DIMS],
        [training.mlp(WIDTH, WIDTH, CLASSES) for _ in DIMS],
        training.mlp(WIDTH * len(DIMS), WIDTH, CLASSES),
        encode_mixed_jointly=True,
    )


def generated(n: int, seed: int) -> training.TensorMultimodalDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % CLASSES
    centers = torch.randn(CLASSES, 4, generator=torch.Generator().manual_seed(7))
    signal = centers[y] + 0.7 * torch.randn(n, 4, generator=g)
    xs = [signal @ torch.randn(4, d, generator=torch.Generator().manual_seed(d)) + 0.5 * torch.randn(n, d, generator=g) for d in DIMS]
    return training.TensorMultimodalDataset(xs, y)


def accuracy(y, prob) -> dict:
    return {"acc": float(np.mean(np.asarray(prob).argmax(1) == np.asarray(y)))}


def tiny_task() -> training.Task:
    train = generated(60, 0)
    return training.Task(
        name="tiny",
        num_classes=CLASSES,
        build_model=build_model,
        train=train,
        test=generated(30, 1),
        train_labels=train.labels,
        metrics=accuracy,
        metric_labels={"acc": "ACC"},
    )


DEFAULTS = training.TrainConfig(epochs=4, lr=1e-2, step_size=3, holdout=0.25, threads=1)


def pause_after_checkpoint(epoch: int, gate: Path) -> None:
    save = training.atomic_torch_save

    def save_then_wait(path, state):
        out = save(path, state)
        if isinstance(state, dict) and state.get("epoch") == epoch:
            gate.with_name(gate.name + ".paused").write_text(str(path))
            while not gate.exists():
                time.sleep(0.02)
        return out

    training.checkpoint.atomic_torch_save = save_then_wait  # the trainer writes through training.checkpoint


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pause-at-epoch", type=int, default=None)
    parser.add_argument("--gate", type=Path, default=None)
    training.add_arguments(parser, DEFAULTS)
    args = parser.parse_args(argv)
    if args.pause_at_epoch is not None:
        pause_after_checkpoint(args.pause_at_epoch, args.gate)
    config = training.config_from_args(args, DEFAULTS)
    return training.launch(tiny_task(), config, args.seeds, args.output_dir, workers=args.workers or 1)


if __name__ == "__main__":
    main()
