"""Several seeds of one configuration: scheduling them over worker processes, the output folder.

:func:`run` trains one model per seed (optionally in parallel worker processes), writes
``results.json``, ``results.md`` and ``curves.png`` into the output folder (atomically), keeps
each finished seed in ``seeds/seed<N>.json`` (a rerun skips finished seeds with the same
configuration) and, with ``checkpoint_every``, a resumable checkpoint per seed.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from m3co_loss import distributed as dist_utils
from training.checkpoint import unresumed_checkpoint
from training.config import ConfigError, Task, TrainConfig, run_fingerprint
from training.data import check_holdout
from training.distributed import is_main_process
from training.io import CorruptFileError, RunLock, atomic_write_json, load_seed_record, remove_stale_temporaries, seed_of_record_file, set_aside
from training.report import summarise, write_results
from training.trainer import PLATEAU_NEEDS_VALIDATION, train_seed

__all__ = ["SeedPiece", "plan_seed_pieces", "run", "finished_seeds"]


# ----------------------------------------------------------------------------- several seeds


@dataclass(frozen=True)
class SeedPiece:
    """Epochs ``[start, stop)`` of the ``index``-th seed, planned on ``worker`` from time ``begin`` (in epochs)."""

    index: int
    start: int
    stop: int
    worker: int
    begin: int


def plan_seed_pieces(num_seeds: int, epochs: int, workers: int) -> List[SeedPiece]:
    """Share ``num_seeds`` runs of ``epochs`` epochs between ``workers`` so that all finish together.

    McNaughton's wrap-around rule: lay the seeds end to end on a line of ``num_seeds * epochs``
    epochs and cut it into ``workers`` equal lengths (rounded to whole epochs), one per worker.
    A seed cut in two runs its first epochs at the start of the next worker's share and its
    last epochs at the end of this worker's share; as no seed is longer than a share, the two
    pieces never overlap in time. Five seeds on two workers thus take 2.5 seed-times instead of
    the three of whole seeds. Pieces are returned in planned starting order.
    """
    if num_seeds < 1 or epochs < 1 or workers < 1:
        raise ValueError(f"num_seeds, epochs and workers must be >= 1; got {num_seeds}, {epochs}, {workers}")
    workers = min(workers, num_seeds)  # a share is then at least one seed long
    total = num_seeds * epochs
    cuts = [round(w * total / workers) for w in range(workers + 1)]
    pieces = []
    for index in range(num_seeds):
        lo, hi = index * epochs, (index + 1) * epochs
        for w in range(workers):
            a, b = max(lo, cuts[w]), min(hi, cuts[w + 1])
            if a >= b:
                continue
            if lo < cuts[w]:  # across the cut at this share's start: this part runs at time 0, so it trains the first epochs
                pieces.append(SeedPiece(index, 0, b - a, w, 0))
            elif hi > cuts[w + 1]:  # across the cut at this share's end: this part runs last, so it trains the last epochs
                pieces.append(SeedPiece(index, epochs - (b - a), epochs, w, a - cuts[w]))
            else:
                pieces.append(SeedPiece(index, 0, epochs, w, a - cuts[w]))
    return sorted(pieces, key=lambda p: (p.begin, p.worker))


def _worker_piece(task: Task, config: TrainConfig, seed: int, start: int, stop: int, checkpoint_path, seed_file) -> Optional[Dict[str, Any]]:
    if start > 0:  # the seed's head ran in a piece before this one and left its checkpoint
        config = dataclasses.replace(config, resume=True)
    record = train_seed(task, config, seed, checkpoint_path=checkpoint_path, stop_epoch=stop if stop < config.epochs else None)
    if record is not None:
        atomic_write_json(seed_file, record)
    return record


def run(
    task: Task,
    config: TrainConfig,
    seeds: Sequence[int],
    output_dir: Union[str, Path],
    *,
    workers: int = 1,
) -> Dict[str, Any]:
    """Train every seed, summarise the protocols and write the results (rank 0 only).

    ``workers > 1`` trains seeds in that many spawned processes. On the CPU each seed runs with
    ``config.threads`` threads (default 1, so that a seed's numbers do not depend on the number
    of workers; MKL's results change with the thread count). When the seeds do not divide
    evenly between the workers, some seeds are cut in two (:func:`plan_seed_pieces`): one worker
    trains the first epochs and writes a checkpoint, another resumes from it, which gives the
    numbers of the uninterrupted run. A seed whose record is already in ``output_dir/seeds``
    with the same configuration fingerprint is not trained again, and the results summarise
    every such record in the folder (those of earlier runs too), in seed order.

    Before any seed trains, :class:`ConfigError` stops a run that would lose a result: a seed
    whose record in ``output_dir/seeds`` has another fingerprint (a finished result is never
    overwritten), or, without ``config.resume``, a seed whose checkpoint has this fingerprint
    (it would restart from epoch 0 over it).

    The run holds the folder's :class:`RunLock` while it writes there: a second run into the
    same folder fails at once with :class:`OutputFolderBusy`. A corrupt seed record or
    checkpoint raises :class:`CorruptFileError`; with ``config.set_aside_corrupt`` it is renamed
    (:func:`set_aside`) and its seed trained afresh.
    """
    config.validate()
    if not seeds:
        raise ConfigError("seeds must name at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds must be distinct; got {list(seeds)}")
    if any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0 for s in seeds):
        raise ConfigError(f"seeds must be integers >= 0; got {list(seeds)}")
    if workers < 1:
        raise ConfigError(f"workers must be >= 1; got {workers}")
    if config.distributed and workers != 1:
        raise ConfigError(f"workers must be 1 with distributed training (the ranks train one seed at a time); got {workers}")
    if config.scheduler == "plateau" and not config.holdout and task.val is None and task.trainer is None:
        raise ConfigError(PLATEAU_NEEDS_VALIDATION)  # before the folder is locked and any seed trains
    if config.holdout and task.val is None and task.train_labels is not None:
        check_holdout(task.train_labels, config.holdout)  # before any training, not deep inside the first seed
    if isinstance(output_dir, str) and not output_dir.strip():
        raise ConfigError("output_dir must name a folder; got an empty path")
    output_dir = Path(output_dir)
    if not is_main_process():  # the other ranks of a distributed run train along and write nothing
        return _run_in_folder(task, config, seeds, output_dir, workers=workers)
    try:  # a path that cannot be a folder fails now, not after the training
        output_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ConfigError(f"output_dir {output_dir} is a file (or lies under one), not a folder") from None
    with RunLock(output_dir) as lock:
        for folder in (output_dir, output_dir / "seeds", output_dir / "checkpoints"):
            remove_stale_temporaries(folder, lock=lock)  # left by a run that was killed while writing
        return _run_in_folder(task, config, seeds, output_dir, workers=workers)


def finished_seeds(seed_dir: Path, fingerprint: str, *, on_corrupt: str = "raise") -> Tuple[Dict[int, Dict[str, Any]], List[str]]:
    """The records in ``seed_dir`` of seeds finished with this ``fingerprint``, by seed, and the
    names of the records of another configuration or data (kept, not summarised).

    A corrupt record raises :class:`CorruptFileError` (``on_corrupt="raise"``), is renamed by
    :func:`set_aside` (``"set_aside"``, only while holding the folder's lock) or passed over
    (``"skip"``); its seed then counts as not finished.
    """
    if on_corrupt not in ("raise", "set_aside", "skip"):
        raise ValueError(f"on_corrupt must be 'raise', 'set_aside' or 'skip'; got {on_corrupt!r}")
    records: Dict[int, Dict[str, Any]] = {}
    others: List[str] = []
    for path in sorted(seed_dir.glob("seed*.json")) if seed_dir.is_dir() else ():
        seed = seed_of_record_file(path)
        if seed is None:
            continue
        try:
            record = load_seed_record(path)
        except CorruptFileError:
            if on_corrupt == "raise":
                raise
            if on_corrupt == "skip":
                continue
            print(f"set aside the corrupt seed record {path} as {set_aside(path).name}; seed {seed} counts as not trained", flush=True)
            continue
        if record["fingerprint"] == fingerprint:
            records[seed] = record
        else:
            others.append(path.name)
    return records, others


def _conflict(seed_dir: Path, ckpt_dir: Path, seed: int, fingerprint: str, others: Sequence[str], config: TrainConfig) -> Optional[str]:
    """Why ``seed`` cannot be trained into this folder, or None: a finished record of another
    configuration would be overwritten, or a checkpoint of this one would be restarted from epoch 0."""
    record = seed_dir / f"seed{seed}.json"
    if record.name in others:
        theirs = load_seed_record(record)["fingerprint"]
        return (
            f"{record} is the finished record of seed {seed} with fingerprint {theirs}, another configuration or data than "
            f"this run's ({fingerprint}); it is never overwritten: choose another --output-dir, or move the file away to retrain seed {seed} here"
        )
    if not config.resume:
        return unresumed_checkpoint(ckpt_dir / f"seed{seed}.pt", fingerprint, seed)
    return None


def _run_in_folder(task: Task, config: TrainConfig, seeds: Sequence[int], output_dir: Path, *, workers: int) -> Dict[str, Any]:
    seed_dir = output_dir / "seeds"
    ckpt_dir = output_dir / "checkpoints"
    fingerprint = run_fingerprint(task, config)
    start = time.perf_counter()
    records: Dict[int, Dict[str, Any]] = {}  # the finished seeds of this configuration, in the folder or trained now
    others: List[str] = []
    problems: List[str] = []
    if is_main_process():  # rank 0's view decides for every rank (below); it holds the folder's lock
        records, others = finished_seeds(seed_dir, fingerprint, on_corrupt="set_aside" if config.set_aside_corrupt else "raise")
        problems = [p for p in (_conflict(seed_dir, ckpt_dir, s, fingerprint, others, config) for s in seeds if s not in records) if p]
    todo = [seed for seed in seeds if seed not in records]
    if config.distributed and dist_utils.world_size() > 1:
        # rank 0's view of the finished seeds decides for every rank (ranks must train the same seeds)
        shared = [todo, records, problems]
        torch.distributed.broadcast_object_list(shared, src=0)
        todo, records, problems = shared
    if problems:  # before any training: a finished result or a resumable run is never lost
        raise ConfigError(problems[0])
    workers = min(workers, max(1, len(todo)))
    if config.threads is None and torch.device(config.device).type == "cpu":
        # one thread per seed: a seed's numbers then do not depend on how many run in parallel
        config = dataclasses.replace(config, threads=1)
    def ckpt(seed: int) -> Optional[Path]:
        # --resume continues from a checkpoint that is there even when no new ones are asked for
        path = ckpt_dir / f"seed{seed}.pt"
        return path if config.checkpoint_every or (config.resume and path.exists()) else None

    if workers == 1:
        for seed in todo:
            record = train_seed(task, config, seed, checkpoint_path=ckpt(seed))
            if is_main_process():
                atomic_write_json(seed_dir / f"seed{seed}.json", record)
            records[seed] = record
    else:
        from tqdm.auto import tqdm

        quiet = dataclasses.replace(config, progress=False)
        pieces = plan_seed_pieces(len(todo), config.epochs, workers)
        # a seed that is cut in two hands over through a checkpoint, written even without checkpoint_every
        handoff = {todo[p.index] for p in pieces if p.stop < config.epochs}

        def path(seed: int) -> Optional[Path]:
            return ckpt_dir / f"seed{seed}.pt" if seed in handoff else ckpt(seed)

        context = multiprocessing.get_context("spawn")
        bar = tqdm(total=len(todo), desc=f"{task.name} {config.method}: seeds", disable=not config.progress, leave=False)
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:

            def submit(piece: SeedPiece):
                seed = todo[piece.index]
                seed_file = seed_dir / f"seed{seed}.json"
                return pool.submit(_worker_piece, task, quiet, seed, piece.start, piece.stop, path(seed), seed_file)

            # the pool starts pieces in the order they are submitted: the planned order, each seed's
            # second piece once its first has finished (it is planned last on its worker)
            running = {submit(p): p for p in pieces if p.start == 0}
            waiting = {p.index: p for p in pieces if p.start > 0}
            while running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    piece = running.pop(future)
                    record = future.result()
                    if record is None:  # a seed's first piece: its checkpoint is written
                        rest = waiting.pop(piece.index)
                        running[submit(rest)] = rest
                        continue
                    records[todo[piece.index]] = record
                    bar.update()
        bar.close()
        if config.checkpoint_every == 0:
            for seed in handoff:
                (ckpt_dir / f"seed{seed}.pt").unlink(missing_ok=True)
    per_seed = [records[s] for s in sorted(records)]  # every finished seed in the folder, not only this call's
    results = summarise(task, config, per_seed, seconds=time.perf_counter() - start)
    results["workers"] = workers  # the processes that trained this call's seeds
    results["data_id"] = task.data_id
    if others:
        results["ignored_seed_records"] = others  # of another configuration or data
    if is_main_process():
        write_results(task, results, per_seed, output_dir)
    return results
