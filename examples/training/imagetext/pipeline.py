"""The command line and task shared by ``food101.py`` and ``n24news.py``.

A run fine-tunes an image encoder (ViT-B/16, ImageNet-21k) and a text encoder (BERT-base or
RoBERTa-base) with one 3-layer MLP head per modality and a fusion head, on the shared engine
(the ``training`` package): the objective and its ablations (``--method``, ``--convention``), the three
evaluation protocols, results files, checkpoints and ``--resume`` all come from there. This
module adds the data (readers in ``data.py``), the encoders and the text mixing
(``models.py``), the released optimiser settings (Adam with per-group learning rates,
batches of 32 accumulated to 128), ReduceLROnPlateau stepped on validation accuracy (the
package's choice: the released loop steps it on training accuracy), the robustness analyses
(``robustness.py``) and ``--smoke``. ``--recipe released`` trains with the released
loop instead (``released.py``; its items are listed in ``training/recipes.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from training import recipes
from training.imagetext.data import DataError, ImageTextCollator, ImageTextDataset, ImageTextSplits, ImageTransform, find_unreadable_images
from training.imagetext.released import ReleasedImageTextTrainer, planned_validations
from training import cli, datadir
from training.config import ConfigError, Task, TrainConfig
from training.trainer import AnalysisContext

LR_GROUPS = ("image_encoder", "text_encoder", "image_head", "text_head", "fusion_head")
ANALYSIS_LABELS = {
    "acc_clean": "test ACC, clean",
    "acc_image_noise": "test ACC, image replaced by Gaussian noise",
    "acc_text_noise": "test ACC, text replaced by Gaussian noise",
    "confidence_clean": "mean max-softmax confidence, test pairs",
    "confidence_random": "mean max-softmax confidence, random inputs (both modalities noise)",
}


@dataclass(frozen=True)
class ImageTextSpec:
    """One dataset: where its data lives, how to read it, and the released settings."""

    name: str  # also the folder name under $M3CO_DATA_DIR
    num_classes: int
    source: str  # where to get the data (shown when none is found)
    markers: Tuple[str, ...]  # files of which one exists in the dataset's root folder (one per layout)
    epochs: int
    plateau_patience: int
    min_epoch: int  # the released loop validates once the epoch index exceeds it
    lr: Mapping[str, float]  # per LR_GROUPS
    load: Callable[[argparse.Namespace, Path], ImageTextSplits]
    add_options: Callable[[argparse.ArgumentParser], None]
    published: Callable[[argparse.Namespace, str], Dict[str, Dict[str, tuple]]]  # (args, encoder family) -> rows
    make_smoke_data: Callable[[Path], Path]
    smoke_defaults: Mapping[str, object] = dataclasses.field(default_factory=dict)
    describe: Callable[[argparse.Namespace], str] = lambda args: ""


# ----------------------------------------------------------------------------- model and optimiser


def build_model(image_encoder: str, image_backend: str, text_encoder: str, num_classes: int, hidden: int, dropout: float) -> nn.Module:
    """Top-level (picklable) model factory for the engine."""
    from training.imagetext.models import ImageEncoder, ImageTextClassifier, TextEncoder

    return ImageTextClassifier(
        ImageEncoder(image_encoder, backend=image_backend), TextEncoder(text_encoder), num_classes, hidden=hidden, dropout=dropout
    )


def _no_decay_ids(module: nn.Module) -> set:
    """Biases and LayerNorm parameters: the released code exempts them from weight decay (text encoder)."""
    ids = {id(p) for name, p in module.named_parameters() if name.endswith("bias")}
    for sub in module.modules():
        if isinstance(sub, nn.LayerNorm):
            ids.update(id(p) for p in sub.parameters())
    return ids


def param_groups(model: nn.Module, config: TrainConfig) -> List[Dict[str, object]]:
    """Adam parameter groups with the released per-group learning rates (``config.extra["lr"]``).

    Weight decay ``config.weight_decay`` everywhere except the text encoder's biases and
    LayerNorm weights, as in the released code.
    """
    lr, decay = config.extra["lr"], config.weight_decay
    text = model.text_encoder
    exempt = _no_decay_ids(text)
    groups = [
        {"params": [p for p in text.parameters() if id(p) not in exempt], "lr": lr["text_encoder"], "weight_decay": decay},
        {"params": [p for p in text.parameters() if id(p) in exempt], "lr": lr["text_encoder"], "weight_decay": 0.0},
        {"params": list(model.heads[1].parameters()), "lr": lr["text_head"], "weight_decay": decay},
        {"params": list(model.image_encoder.parameters()), "lr": lr["image_encoder"], "weight_decay": decay},
        {"params": list(model.heads[0].parameters()), "lr": lr["image_head"], "weight_decay": decay},
        {"params": list(model.fusion.parameters()), "lr": lr["fusion_head"], "weight_decay": decay},
    ]
    return [g for g in groups if g["params"]]


def accuracy(y, prob) -> Dict[str, float]:
    from sklearn.metrics import accuracy_score

    return {"acc": float(accuracy_score(y, prob.argmax(axis=1)))}


def robustness_analysis(
    model,
    context: AnalysisContext,
    *,
    train: ImageTextDataset,
    test: ImageTextDataset,
    collate: ImageTextCollator,
    corrupt: Sequence[str],
    confidence: bool,
    noise_samples: int,
    batch_size: int,
    num_workers: int,
) -> Dict[str, float]:
    """The engine's ``Task.analyse``: the paper's Table 5 and Figure 5 on the chosen epoch's weights."""
    from torch.utils.data import DataLoader, Subset

    from training.imagetext.robustness import noise_statistics, robustness_report

    # the training pairs for the noise statistics: a fixed random subset, without augmentation
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:noise_samples].tolist()
    loader = functools.partial(DataLoader, batch_size=batch_size, collate_fn=collate, num_workers=num_workers)
    stats = noise_statistics(model, loader(Subset(train, order)), device=context.device, max_samples=noise_samples)
    return robustness_report(
        model, loader(test), stats, device=context.device, corrupt=corrupt, confidence=confidence, seed=context.seed, autocast=context.autocast
    )


# ----------------------------------------------------------------------------- command line


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


IMAGE_ENCODERS = {"package": "google/vit-base-patch16-224-in21k", "released": "google/vit-base-patch16-224"}
SEEDS = {"package": [0, 1, 2], "released": [0]}
EVAL_BATCH_SIZES = {"package": 128, "released": 32}
RELEASED_VALID_STEP = 50  # optimiser steps between validations (src/config.py:43, 72)


def default_config(spec: ImageTextSpec) -> TrainConfig:
    """The released optimiser settings: Adam, weight decay 1e-4, batches of 32 accumulated to 128,
    ReduceLROnPlateau (factor 0.2, the dataset's patience), the dataset's epochs."""
    return TrainConfig(
        epochs=spec.epochs,
        batch_size=32,
        accumulate=4,  # 32 x 4 = the released 128
        lr=spec.lr["fusion_head"],
        weight_decay=1e-4,
        scheduler="plateau",
        plateau_factor=0.2,
        plateau_patience=spec.plateau_patience,
        holdout=0,  # the dataset has its own validation split
        device=default_device(),
        checkpoint_every=1,
    )


def build_parser(spec: ImageTextSpec) -> argparse.ArgumentParser:
    d = default_config(spec)
    parser = argparse.ArgumentParser(
        prog=f"{spec.name.lower()}.py",
        description=f"M3CoL and its ablations on {spec.name}: ViT + BERT/RoBERTa fine-tuned on the shared engine.",
    )
    parser.add_argument("--data-dir", type=cli.path_argument("folder"), default=None, help=f"the dataset's root folder (default: $M3CO_DATA_DIR/{spec.name}, then ../shared/data/{spec.name})")
    spec.add_options(parser)
    parser.add_argument("--image-encoder", default=None, help=f"model id or local folder (from_pretrained), or a timm name (default: {IMAGE_ENCODERS['package']}; {IMAGE_ENCODERS['released']} with --recipe released)")
    parser.add_argument("--image-backend", choices=("transformers", "timm"), default="transformers", help="library of the image encoder (default: %(default)s)")
    parser.add_argument("--text-encoder", default="bert-base-uncased", help="model id or local folder: BERT or RoBERTa (default: %(default)s)")
    parser.add_argument("--max-tokens", type=cli.int_at_least(2), default=512, help="tokens per text after truncation (default: %(default)s)")
    parser.add_argument("--head-width", type=cli.int_at_least(1), default=256, help="hidden width of the 3-layer MLP heads (default: %(default)s)")
    parser.add_argument("--dropout", type=cli.dropout_rate, default=0.0, help="dropout in the heads (released: 0)")
    for group in LR_GROUPS:
        parser.add_argument(f"--lr-{group.replace('_', '-')}", type=cli.positive_number(), default=spec.lr[group], help=f"learning rate of the {group.replace('_', ' ')} (default: %(default)s)")
    parser.add_argument("--num-workers", type=cli.int_at_least(0), default=min(8, os.cpu_count() or 1), help="DataLoader worker processes (default: %(default)s)")
    parser.add_argument("--eval-batch-size", type=cli.int_at_least(2), default=None, help="batch size of the evaluation passes (default: 128; 32 with --recipe released)")
    parser.add_argument("--no-bf16", action="store_true", help="no bfloat16 autocast on CUDA (it is on by default there)")
    parser.add_argument("--m3co-fraction", type=cli.probability, default=None, help="share of the epochs spent on M3Co (default: the convention's, 1/3 or 0.33)")
    parser.add_argument("--eval-corrupt", nargs="+", choices=("image", "text"), default=[], help="also score the test set with this modality replaced by Gaussian noise (paper Table 5)")
    parser.add_argument("--eval-confidence", action="store_true", help="also report the mean max-softmax confidence on random inputs (paper Figure 5)")
    parser.add_argument("--noise-samples", type=cli.int_at_least(1), default=2048, help="training pairs used to estimate the noise's mean and variance (default: %(default)s)")
    parser.add_argument("--verify-images", action="store_true", help="decode every image before training and stop with the list of unreadable files (otherwise one is found when its batch is loaded)")
    parser.add_argument("--smoke", action="store_true", help="generate a tiny dataset and tiny random encoders in a temporary folder and run 2 epochs on the CPU")
    recipes.add_recipe_argument(parser, recipes.IMAGETEXT_RELEASED, recipes.IMAGETEXT_NOT_COPIED)
    parser.add_argument("--valid-step", type=cli.int_at_least(1), default=None, help=f"--recipe released: optimiser steps between validations (default: {RELEASED_VALID_STEP})")
    parser.add_argument("--min-epoch", type=cli.int_at_least(-1), default=None, help=f"--recipe released: validate once the epoch index exceeds this (default: {spec.min_epoch})")
    cli.add_arguments(parser, d)
    parser.set_defaults(seeds=None, scheduler="plateau", checkpoint_every=1)
    return parser


SMOKE_DEFAULTS = dict(
    seeds=[0],
    epochs=2,
    batch_size=8,
    accumulate=2,
    num_workers=0,
    device="cpu",
    workers=1,
    m3co_fraction=0.5,  # 1 of the 2 epochs on M3Co, so that both phases run
    eval_corrupt=["image", "text"],
    eval_confidence=True,
    noise_samples=32,
    max_tokens=32,
    head_width=64,
    # tiny random encoders learn in 2 epochs at a larger rate than pretrained ones are tuned at
    **{f"lr_{group}": 1e-3 for group in LR_GROUPS},
)


def parse(spec: ImageTextSpec, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_parser(spec)
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--lr" or a.startswith("--lr=") for a in argv):
        parser.error("--lr is not used here: set --lr-image-encoder, --lr-text-encoder, --lr-image-head, --lr-text-head, --lr-fusion-head")
    if "--smoke" in argv:
        # smoke values replace the defaults; options given on the command line still win
        parser.set_defaults(**SMOKE_DEFAULTS, **spec.smoke_defaults)
    args = parser.parse_args(argv)
    resolve_recipe_defaults(spec, args)
    return args


def resolve_recipe_defaults(spec: ImageTextSpec, args) -> None:
    """Fill the options whose default depends on ``--recipe`` (and ``--smoke``) in ``args``."""
    released = args.recipe == "released"
    if args.image_encoder is None:
        args.image_encoder = IMAGE_ENCODERS[args.recipe]
    if args.seeds is None:
        args.seeds = list(SEEDS[args.recipe])
    if args.eval_batch_size is None:
        # the smoke splits hold a few pairs: batches of 4, as the released loop drops incomplete ones
        args.eval_batch_size = 4 if (args.smoke and released) else 32 if (args.smoke or released) else EVAL_BATCH_SIZES["package"]
    if released:
        args.valid_step = args.valid_step if args.valid_step is not None else (2 if args.smoke else RELEASED_VALID_STEP)
        args.min_epoch = args.min_epoch if args.min_epoch is not None else (0 if args.smoke else spec.min_epoch)


def find_data_dir(spec: ImageTextSpec, data_dir: Optional[Path]) -> Path:
    """``--data-dir`` (which must be a folder), else the first default folder holding one of the layouts' marker files."""
    if data_dir is not None and not Path(data_dir).is_dir():
        raise SystemExit(f"--data-dir {data_dir} is not a folder")
    return datadir.find_data_dir(
        spec.name,
        data_dir,
        holds_data=lambda path: any((path / marker).exists() for marker in spec.markers),
        how_to_get=f"Get it from {spec.source}, then pass --data-dir DIR or set M3CO_DATA_DIR to a folder holding {spec.name}/. "
        f"See docs/reproduction.rst. To try the pipeline without the data: --smoke.",
    )


def encoder_family(text_encoder: str) -> str:
    """``"bert"``, ``"roberta"`` or another ``model_type``, read from the encoder's config."""
    import transformers

    try:
        return transformers.AutoConfig.from_pretrained(text_encoder).model_type
    except (OSError, ValueError) as err:
        raise SystemExit(f"cannot read the configuration of --text-encoder {text_encoder!r}: {err}") from None


def image_transform(args) -> ImageTransform:
    """The image encoder's preprocessing, read without loading its weights."""
    import transformers

    from training.imagetext.models import ImageEncoder, vit_preprocessing

    if args.image_backend == "timm":
        try:
            return ImageEncoder(args.image_encoder, backend="timm", pretrained=False).transform()
        except (ImportError, OSError) as err:
            raise SystemExit(str(err)) from None
    try:
        config = transformers.AutoConfig.from_pretrained(args.image_encoder)
    except (OSError, ValueError) as err:
        raise SystemExit(f"cannot read the configuration of --image-encoder {args.image_encoder!r}: {err}") from None
    size, mean, std, resample = vit_preprocessing(args.image_encoder, config)
    return ImageTransform(size, mean, std, resample=resample)


RELEASED_NOTE = (
    "The released training loop (--recipe released): validation every --valid-step optimiser steps once past --min-epoch, "
    "training goes on from the best checkpoint reloaded after each validation, ReduceLROnPlateau on the training accuracy; "
    "`validation` is the test score at the last validation, `best on test` the best test score over the validations."
)


def make_task(spec: ImageTextSpec, args, splits: ImageTextSplits) -> Task:
    from training.imagetext.models import load_tokenizer

    transform = image_transform(args)
    family = encoder_family(args.text_encoder)
    tokenizer = load_tokenizer(args.text_encoder)
    collate = ImageTextCollator(tokenizer, max_tokens=args.max_tokens)
    released = args.recipe == "released"
    train = ImageTextDataset(splits.train, transform.with_flip(True))  # the released augmentation
    # the released loader flips every split's images at random (data/dataloader.py:208)
    validation = ImageTextDataset(splits.validation, transform.with_flip(released))
    test = ImageTextDataset(splits.test, transform)
    analyse = None
    if args.eval_corrupt or args.eval_confidence:
        analyse = functools.partial(
            robustness_analysis,
            train=ImageTextDataset(splits.train, transform),
            test=test,
            collate=collate,
            corrupt=tuple(args.eval_corrupt),
            confidence=args.eval_confidence,
            noise_samples=args.noise_samples,
            batch_size=args.eval_batch_size,
            num_workers=args.num_workers,
        )
    dropped = "; ".join(
        f"{split}: {c['missing_image']} without image, {c['missing_text']} without text" for split, c in splits.dropped.items()
    )
    return Task(
        name=spec.name,
        num_classes=len(splits.classes),
        build_model=functools.partial(build_model, args.image_encoder, args.image_backend, args.text_encoder, len(splits.classes), args.head_width, args.dropout),
        train=train,
        val=validation,
        test=ImageTextDataset(splits.test, transform.with_flip(True)) if released else test,
        metrics=accuracy,
        metric_labels={"acc": "ACC"},
        param_groups=param_groups,
        collate_fn=collate,
        analyse=analyse,
        analysis_labels=dict(ANALYSIS_LABELS),
        published=spec.published(args, family),
        notes=[
            f"{spec.describe(args)}image encoder {args.image_encoder} ({args.image_backend}), text encoder {args.text_encoder} ({family}), "
            f"first-token embeddings, texts truncated at {args.max_tokens} tokens.",
            f"Pairs: train {len(splits.train)}, validation {len(splits.validation)}, test {len(splits.test)}; dropped pairs: {dropped}.",
            RELEASED_NOTE if released else "Model selection (validation protocol) and ReduceLROnPlateau use the validation split only.",
        ],
        data_id=splits_digest(splits),
        trainer=ReleasedImageTextTrainer if released else None,
    )


def splits_digest(splits: ImageTextSplits) -> str:
    """A digest of the pairs (image file name, text, label) of every split and of the class names:
    a changed split is trained again instead of reusing finished seeds (the pixels are not read)."""
    digest = hashlib.sha256(json.dumps(list(splits.classes)).encode())
    for name, samples in (("train", splits.train), ("validation", splits.validation), ("test", splits.test)):
        digest.update(json.dumps([name, [[Path(s.image).name, s.text, int(s.label)] for s in samples]]).encode())
    return f"sha256:{digest.hexdigest()[:16]}"


def train_config(spec: ImageTextSpec, args, splits: ImageTextSplits) -> TrainConfig:
    """The run's configuration. ``--recipe released``: ``--epochs + 1`` epochs, M3Co while the
    epoch index is below ``int(0.33 * --epochs)``, float32, and the loop's options in
    ``extra["released"]``; raises :class:`ConfigError` when the loop would never validate."""
    config = cli.config_from_args(args, default_config(spec))
    lr = {group: getattr(args, f"lr_{group}") for group in LR_GROUPS}
    image_encoder, text_encoder = args.image_encoder, args.text_encoder
    if args.smoke:  # temporary folders: record their names only, so that reruns keep the fingerprint
        image_encoder, text_encoder = f"smoke:{Path(image_encoder).name}", f"smoke:{Path(text_encoder).name}"
    extra = {
        "dataset_options": spec.describe(args),
        "image_encoder": image_encoder,
        "image_backend": args.image_backend,
        "text_encoder": text_encoder,
        "max_tokens": args.max_tokens,
        "head_width": args.head_width,
        "dropout": args.dropout,
        "lr": lr,
        "eval_corrupt": list(args.eval_corrupt),
        "eval_confidence": args.eval_confidence,
        "noise_samples": args.noise_samples,
        "smoke": args.smoke,
        "pairs": {"train": len(splits.train), "validation": len(splits.validation), "test": len(splits.test)},
        "dropped_pairs": splits.dropped,
    }
    bf16 = torch.device(config.device).type == "cuda" and not args.no_bf16
    m3co_fraction = args.m3co_fraction
    if args.recipe == "released":
        epochs, bf16 = args.epochs + 1, False  # range(num_epoch + 1), float32 (train_image_text.py:290)
        if m3co_fraction is None:  # M3Co while epoch < int(0.33 * num_epoch) (train_image_text.py:312)
            m3co_fraction = int(0.33 * args.epochs) / epochs
        extra.update(recipe="released", released={"num_epoch": args.epochs, "valid_step": args.valid_step, "min_epoch": args.min_epoch})
        planned = planned_validations(len(splits.train), batch_size=config.batch_size, accumulate=config.accumulate, epochs=epochs,
                                      valid_step=args.valid_step, min_epoch=args.min_epoch)
        if not planned:
            raise ConfigError(
                f"--recipe released: with {len(splits.train)} training pairs, --valid-step {args.valid_step} and --min-epoch {args.min_epoch}, "
                "the loop would never validate; lower --valid-step or --min-epoch"
            )
        config = dataclasses.replace(config, epochs=epochs)
    return dataclasses.replace(
        config,
        bf16=config.bf16 or bf16,
        eval_batch_size=args.eval_batch_size,
        num_workers=args.num_workers,
        m3co_fraction=m3co_fraction,
        extra=extra,
    ).validate()


def check_images(splits: ImageTextSplits, *, threads: int = 1) -> None:
    """Raise :class:`DataError` listing the files when any image of the three splits cannot be decoded."""
    start = time.perf_counter()
    samples = [*splits.train, *splits.validation, *splits.test]
    bad = find_unreadable_images(samples, threads=threads, progress=True)
    if bad:
        shown = "\n".join(f"  {reason}" for _, reason in bad[:10])
        more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise DataError(f"{len(bad)} of the images cannot be decoded; fix or remove them (a removed image drops its pair):\n{shown}{more}")
    print(f"verified {len({s.image for s in samples})} images in {time.perf_counter() - start:.1f} s", flush=True)


def data_error_line(err: DataError) -> str:
    """The message of a :class:`DataError`, also when a DataLoader worker re-raised it.

    The re-raised error's message is the worker's traceback ("Caught DataError in DataLoader
    worker process 0. Original Traceback ..."); its last line holds the original message.
    """
    text = str(err).strip()
    if "\n" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1].strip()
    name, _, message = last.partition(": ")
    return message if name.endswith("DataError") and message else last


def _run(spec: ImageTextSpec, args) -> Optional[dict]:
    data_dir = find_data_dir(spec, args.data_dir)
    try:
        splits = spec.load(args, data_dir)
        if args.verify_images:
            check_images(splits, threads=max(1, args.num_workers))
    except ValueError as err:  # DataError (a malformed file) or a split option the data cannot meet
        raise SystemExit(f"{spec.name}: {err}") from None
    print(f"{spec.name} at {data_dir}: {splits.summary()}", flush=True)
    if not args.smoke and len(splits.classes) != spec.num_classes:
        print(f"warning: {spec.name} has {spec.num_classes} classes, but {len(splits.classes)} were read from {data_dir}", flush=True)
    from training.imagetext.models import EncoderLoadError

    try:
        config = train_config(spec, args, splits)
        task = make_task(spec, args, splits)
        # the encoders' weights are loaded where each seed builds its model
        return cli.launch(task, config, args.seeds, args.output_dir, workers=args.workers)
    except (ConfigError, EncoderLoadError) as err:
        raise SystemExit(f"{spec.name}: {err}") from None
    except DataError as err:  # an image that cannot be decoded, found when its batch is loaded
        raise SystemExit(f"{spec.name}: {data_error_line(err)}; --verify-images checks every image before training") from None


def main(spec: ImageTextSpec, argv: Optional[Sequence[str]] = None) -> Optional[dict]:
    args = parse(spec, argv)
    try:
        recipes.check_imagetext(args)  # before any data or encoder is read
    except ConfigError as err:
        raise SystemExit(f"{spec.name}: {err}") from None
    # the collate function tokenises in DataLoader workers: keep the tokenizer single-threaded there
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not args.smoke:
        return _run(spec, args)
    # Smoke: the released layout and tiny encoders in a temporary folder; no network at any point.
    os.environ["HF_HUB_OFFLINE"] = "1"
    from training.imagetext.smoke import make_tiny_encoders

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"{spec.name.lower()}-smoke-") as tmp:
        tmp = Path(tmp)
        image_dir, text_dir = make_tiny_encoders(tmp / "encoders")
        args.data_dir = spec.make_smoke_data(tmp / spec.name)
        args.image_encoder, args.text_encoder, args.image_backend = str(image_dir), str(text_dir), "transformers"
        results = _run(spec, args)
    print(f"smoke run: {time.perf_counter() - start:.1f} s")
    return results
