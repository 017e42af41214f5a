"""The command line the pipelines share: validated option types, the common options, :func:`launch`.

Every numeric or path option of an example script uses one of the argparse types below, so
that an out-of-range value stops the script before any work with one line naming the option
and the allowed range (argparse's exit status 2), never a traceback from deep inside a run.
Each type carries ``accepts`` (a valid value) and ``rejects`` (values it refuses), which the
tests feed to every option.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Union

import torch

from m3co_loss.functional import CONVENTIONS
from training.config import METHODS, SCHEDULERS, ConfigError, Task, TrainConfig
from training.distributed import init_distributed, is_main_process, shutdown_distributed
from training.io import CorruptFileError, OutputFolderBusy
from training.report import results_markdown
from training.seeds import run

__all__ = [
    "int_at_least",
    "number_in",
    "positive_number",
    "probability",
    "dropout_rate",
    "holdout_size",
    "path_argument",
    "output_folder",
    "http_url",
    "PASSTHROUGH_EPILOG",
    "add_arguments",
    "config_from_args",
    "launch",
    "default_workers",
]


def _named(parse: Callable[[str], Any], name: str, *, accepts: str, rejects: Sequence[str]) -> Callable[[str], Any]:
    parse.__name__ = name  # argparse names the type in its message: "invalid <name> value: 'x'"
    parse.accepts, parse.rejects = accepts, tuple(rejects)
    return parse


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low``."""

    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise ValueError(text)
        return value

    return _named(parse, f"integer >= {low}", accepts=str(low), rejects=[str(low - 1), "1.5", "nan", ""])


def number_in(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number in the interval from ``low`` to ``high`` (``math.inf``: no bound)."""
    left, right = "(" if low_open else "[", ")" if high_open else "]"
    if math.isinf(high):
        name = f"number {'>' if low_open else '>='} {low:g}"
    else:
        name = f"number in {left}{low:g}, {high:g}{right}"

    def parse(text: str) -> float:
        value = float(text)
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if not (math.isfinite(value) and above and below):
            raise ValueError(text)
        return value

    rejects = ["nan", "inf", "x"] + ([f"{low:g}"] if low_open else [f"{low - 1:g}"])
    if not math.isinf(high):
        rejects.append(f"{high:g}" if high_open else f"{high + 1:g}")
    accepts = f"{(low + high) / 2:g}" if not math.isinf(high) else f"{low + 1:g}"
    return _named(parse, name, accepts=accepts, rejects=rejects)


def positive_number() -> Callable[[str], float]:
    """An argparse type: a finite number > 0."""
    return number_in(0.0, math.inf, low_open=True)


probability = number_in(0.0, 1.0)
probability.__doc__ = "An argparse type: a probability in [0, 1]."
dropout_rate = number_in(0.0, 1.0, high_open=True)
dropout_rate.__doc__ = "An argparse type: a dropout probability in [0, 1)."


def _holdout(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value >= 0 and (value < 1 or value.is_integer())):
        raise ValueError(text)
    return value


holdout_size = _named(_holdout, "hold-out (0, a fraction in (0, 1) or a whole count)", accepts="0.2", rejects=["-0.1", "1.5", "nan", "inf", ""])


def path_argument(what: str = "path") -> Callable[[str], Path]:
    """An argparse type: a path, not empty (``""`` would mean the current folder)."""

    def parse(text: str) -> Path:
        if not text.strip():
            raise argparse.ArgumentTypeError(f"must name a {what}; got an empty path")
        return Path(text)

    return _named(parse, what, accepts="somewhere", rejects=["", "  "])


output_folder = path_argument("folder")
output_folder.__doc__ = "An argparse type: a folder path, not empty (``\"\"`` would write into the current folder)."


def _http_url(text: str) -> str:
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an http(s) URL such as https://example.org/data/; got {text!r}") from None
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise argparse.ArgumentTypeError(f"must be an http(s) URL such as https://example.org/data/; got {text!r}")
    return text.strip()


http_url = _named(_http_url, "http(s) URL", accepts="https://example.org/data/", rejects=["example.org/data", "ftp://example.org/", "https://", ""])
http_url.__doc__ = "An argparse type: an http or https URL with a host."


PASSTHROUGH_EPILOG = "Every other option (--seeds, --epochs, --convention, --holdout, --workers, ...) is passed to each run of {script}; see its --help."


def add_arguments(parser, defaults: TrainConfig) -> None:
    """The options every pipeline shares, with the pipeline's defaults."""
    d = defaults
    parser.add_argument("--seeds", type=int_at_least(0), nargs="+", default=[0, 1, 2, 3, 4], help="seeds to train (default: 0 1 2 3 4)")
    parser.add_argument("--method", choices=sorted(METHODS), default=d.method, help="training objective (default: %(default)s)")
    parser.add_argument("--convention", choices=CONVENTIONS, default=d.convention, help="paper or released-code conventions (default: %(default)s)")
    parser.add_argument("--output-dir", type=output_folder, required=True, help="where results.json, results.md and curves.png go")
    parser.add_argument("--epochs", type=int_at_least(1), default=d.epochs, help="default: %(default)s")
    parser.add_argument("--batch-size", type=int_at_least(2), default=d.batch_size, help="default: %(default)s (None = full batch)")
    parser.add_argument("--accumulate", type=int_at_least(1), default=d.accumulate, help="micro-batches per optimiser step")
    parser.add_argument("--lr", type=positive_number(), default=d.lr, help="Adam learning rate (default: %(default)s)")
    parser.add_argument("--weight-decay", type=number_in(0.0, math.inf), default=d.weight_decay, help="default: %(default)s")
    parser.add_argument("--scheduler", choices=SCHEDULERS, default=d.scheduler, help="default: %(default)s")
    parser.add_argument("--step-size", type=int_at_least(1), default=None, help="StepLR step in epochs (default: the convention's)")
    parser.add_argument("--gamma", type=number_in(0.0, 1.0, low_open=True), default=d.gamma, help="StepLR factor (default: %(default)s)")
    parser.add_argument("--beta", type=number_in(0.0, math.inf), default=d.beta, help="weight of the contrastive term (default: %(default)s)")
    parser.add_argument("--alpha", type=positive_number(), default=d.alpha, help="Beta(alpha, alpha) of mixup (default: %(default)s)")
    parser.add_argument("--mix-prob", type=probability, default=d.mix_prob, help="share of rows mixed (default: the convention's)")
    parser.add_argument("--holdout", type=holdout_size, default=d.holdout, help="stratified share (or count) of train held out for the validation protocol; 0: none (default: %(default)s)")
    parser.add_argument("--eval-every", type=int_at_least(1), default=d.eval_every, help="epochs between validation scores (default: %(default)s)")
    parser.add_argument("--test-every", type=int_at_least(0), default=d.test_every, help="epochs between test scores, for best_on_test and the curves (default: %(default)s; 0: last epoch only)")
    parser.add_argument("--device", default=d.device, help="default: %(default)s")
    parser.add_argument("--ema-decay", type=number_in(0.0, 1.0, low_open=True, high_open=True), default=d.ema_decay, help="score an exponential moving average of the weights with this decay per step (default: none)")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CUDA)")
    parser.add_argument(
        "--compile",
        nargs="?",
        const="inductor",
        default=None,
        metavar="BACKEND",
        help="torch.compile the training step (model and loss) with this backend (default when given: inductor); "
        "the numbers match eager mode to rounding, not bit for bit",
    )
    parser.add_argument("--workers", type=int_at_least(1), default=None, help="seeds trained in parallel processes (default: min(seeds, cores))")
    parser.add_argument("--threads", type=int_at_least(1), default=None, help="torch threads per seed on the CPU (default: 1)")
    parser.add_argument("--checkpoint-every", type=int_at_least(0), default=d.checkpoint_every, help="epochs between checkpoints (0: none)")
    parser.add_argument("--resume", action="store_true", help="continue from the seeds' checkpoints")
    parser.add_argument(
        "--set-aside-corrupt",
        action="store_true",
        help="rename a corrupt checkpoint or seed record to NAME.corrupt-<time> (never deleted) and train that seed afresh, "
        "instead of stopping with an error naming it",
    )
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="run as one of the processes that torchrun starts (torchrun --nproc_per_node K ... --distributed): "
        "each global batch (--batch-size) is split over them, DDP averages gradients, only rank 0 writes",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def config_from_args(args, defaults: TrainConfig, *, step_sizes: Optional[Mapping[str, int]] = None) -> TrainConfig:
    """A :class:`TrainConfig` from parsed :func:`add_arguments` options."""
    step = args.step_size
    if step is None:
        step = (step_sizes or {}).get(args.convention, defaults.step_size)
    holdout = args.holdout
    holdout = int(holdout) if holdout >= 1 and float(holdout).is_integer() else holdout
    return dataclasses.replace(
        defaults,
        method=args.method,
        convention=args.convention,
        epochs=args.epochs,
        batch_size=args.batch_size,
        accumulate=args.accumulate,
        lr=args.lr,
        weight_decay=args.weight_decay,
        scheduler=args.scheduler,
        step_size=step,
        gamma=args.gamma,
        beta=args.beta,
        alpha=args.alpha,
        mix_prob=args.mix_prob,
        holdout=holdout,
        eval_every=args.eval_every,
        test_every=args.test_every,
        device=args.device,
        ema_decay=args.ema_decay,
        bf16=args.bf16,
        compile=args.compile,
        threads=args.threads,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        set_aside_corrupt=args.set_aside_corrupt,
        progress=not args.no_progress,
        distributed=args.distributed,
    ).validate()


def launch(task: "Task", config: TrainConfig, seeds: Sequence[int], output_dir: Union[str, Path], *, workers: Optional[int] = None) -> Optional[Dict[str, Any]]:
    """What a pipeline's ``main`` runs: :func:`run` with the process group of ``--distributed``.

    With ``config.distributed`` it joins the torchrun process group, trains the seeds one at a
    time on all ranks and leaves the group; otherwise ``workers`` seeds train in parallel
    processes (default :func:`default_workers`). Prints the results table on the main process
    and returns the results there, None on the other ranks.
    """
    if config.distributed:
        if workers not in (None, 1):
            raise SystemExit("--workers trains seeds in parallel processes and cannot combine with --distributed (the ranks train one seed at a time)")
        init_distributed(config.device)
        workers = 1
    else:
        workers = workers or default_workers(len(seeds), config.device)
    try:
        results = run(task, config, seeds, output_dir, workers=workers)
        main_process = is_main_process()  # asked before leaving the process group
    except (ConfigError, CorruptFileError, OutputFolderBusy) as err:
        raise SystemExit(f"{task.name}: {err}") from None
    finally:
        shutdown_distributed()
    if not main_process:
        return None
    print(results_markdown(task, results))
    print(f"wrote {Path(output_dir) / 'results.json'}, results.md and curves.png ({results['seconds']:.1f} s)", flush=True)
    return results


def default_workers(num_seeds: int, device: str) -> int:
    """Seeds in parallel: one process per core on the CPU, one process on an accelerator."""
    if torch.device(device).type != "cpu":
        return 1
    return max(1, min(num_seeds, os.cpu_count() or 1))
