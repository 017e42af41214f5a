"""Benchmark: wall-clock and CPU time of the ROSMAP pipeline (default: 5 seeds of ``m3col``).

    python examples/rosmap_bench.py --output-dir runs/rosmap_bench [--workers 5] [rosmap.py options]

Runs ``rosmap.py`` in this process (seeds in worker processes) and writes
``OUT/bench.json``: wall seconds, CPU seconds (this process and its workers), the 1-minute load
average before and after (the machine may be shared: compare runs taken at a similar load),
the core count, seconds per seed-epoch, and the wall time over the seeds' own seconds per
worker (how well the seeds were packed onto the workers). The target for the pipeline is 5 seeds of
``m3col`` in at most 180 s on 2 cores.

``--floor`` adds what the work costs at best on this machine, measured in the same run:
the floating-point operations of the whole run (counted with
``torch.utils.flop_counter.FlopCounterMode`` on one full-batch step of each phase of the
schedule and on one evaluation of each split, times how often each happens) and the best
float32 matrix-product rate of the machine (all cores, a 2048 x 2048 x 2048 product, and one
core on the model's own 196 x 1000 x 1000 shape). ``floor_seconds`` = operations / best rate is
a lower bound on the run's wall time; no execution strategy beats it without cutting work.

``--allocator-rounds K`` (no training) times one single-threaded full-batch step of each phase
with glibc's default allocator settings and with :func:`training.cputune.keep_freed_memory` (what the
trainer applies on the CPU), each in a fresh process, K rounds in alternating order, and writes
``OUT/allocator.json``: the step times, the minor page faults per step, and the per-round ratios
tuned / default with quartiles.

``--compile-rounds K`` (no training) times one single-threaded full-batch training step of each
phase eager and compiled (``torch.compile`` of the engine's training step, inductor, what
``rosmap.py --compile`` runs), K rounds alternating in one process, and writes
``OUT/compile.json``: the first compiled call's seconds per phase (tracing and code generation,
paid once per worker process; ``--cold-compile`` starts from an empty inductor cache), the step
times and the per-round ratios compiled / eager.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from unittest import mock

from training import omics
from training.cli import int_at_least, output_folder
from training.config import ConfigError, Task, TrainConfig
from training.cputune import ALLOCATOR_ENV, keep_freed_memory
from training.data import stratified_holdout
from training.io import atomic_write_json
from training.objective import Objective, TrainStep
from training.trainer import Trainer
from rosmap import ROSMAP


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def full_batch_setup(task: Task, config: TrainConfig):
    """Seed 0's full-batch training inputs and labels, validation and test inputs, model and objective."""
    import torch

    if config.batch_size is not None:
        raise ValueError("the floor and the step timings are for full-batch runs (batch_size None)")
    fit, held = stratified_holdout(task.train_labels, config.holdout, seed=0) if config.holdout else (None, None)
    train_inputs, train_y = task.train.batch(torch.from_numpy(fit) if fit is not None else None)
    val_inputs = task.train.batch(torch.from_numpy(held))[0] if held is not None else None
    test_inputs = task.test.batch(None)[0]
    torch.manual_seed(0)
    model = task.build_model()
    objective = Objective.from_config(config, num_modalities=model.num_modalities, num_classes=task.num_classes)
    return train_inputs, train_y, val_inputs, test_inputs, model, objective


def time_steps(task: Task, config: TrainConfig, steps: int) -> dict:
    """Median seconds of one single-threaded training step (forward, backward, the trainer's optimiser step) in each
    phase, in this process, after :func:`training.cputune.keep_freed_memory` (which ``M3CO_CPU_ALLOCATOR`` governs)."""
    import torch

    applied = keep_freed_memory()
    torch.set_num_threads(1)
    train_inputs, train_y, _, _, model, objective = full_batch_setup(task, config)
    optimizer = Trainer(task, config, seed=0).build_optimizer(model)
    step = TrainStep(model, objective)
    seconds, faults = {}, {}
    for _ in range(config.epochs):
        phase = objective.phase()
        if phase not in seconds:
            times = []
            for i in range(steps + 2):  # two warm-up steps
                if i == 2:
                    faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                times.append(timed_step(step, train_inputs, train_y, optimizer))
            faults[phase] = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before) / steps
            times = sorted(times[2:])
            seconds[phase] = times[len(times) // 2]
        objective.epoch_end()
    return {"allocator_tuned": applied, "step_seconds": seconds, "page_faults_per_step": faults}


def timed_step(step, inputs, y, optimizer) -> float:
    """Seconds of one training step: forward and loss (``step``), backward, optimiser step."""
    start = time.perf_counter()
    loss, _ = step(inputs, y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def compile_rounds(task: Task, config: TrainConfig, rounds: int, backend: str = "inductor") -> dict:
    """Eager and compiled single-threaded training steps of each phase, alternating (see the module docstring)."""
    import numpy as np
    import torch

    keep_freed_memory()
    torch.set_num_threads(1)
    train_inputs, train_y, _, _, model, objective = full_batch_setup(task, config)
    optimizer = Trainer(task, config, seed=0).build_optimizer(model)
    eager = TrainStep(model, objective)
    compiled = TrainStep(model, objective)
    compiled.compile(backend=backend)

    def run(step) -> float:
        return timed_step(step, train_inputs, train_y, optimizer)

    record: dict = {"backend": backend, "rounds": rounds, "phases": {}}
    for phase in ("m3co", "multisclip"):
        while objective.phase() != phase:
            objective.epoch_end()
        first_call = run(compiled)
        run(eager)  # warm-up
        times: dict = {"eager": [], "compiled": []}
        for r in range(rounds):
            for name in ("eager", "compiled") if r % 2 == 0 else ("compiled", "eager"):
                times[name].append(run(eager if name == "eager" else compiled))
        ratios = [c / e for c, e in zip(times["compiled"], times["eager"])]
        record["phases"][phase] = {"first_compiled_call_seconds": first_call, "step_seconds": times, "compiled_over_eager": ratios, "ratio_quartiles": [float(x) for x in np.quantile(ratios, [0.25, 0.5, 0.75])]}
    return record


def allocator_rounds(argv: list, rounds: int, steps: int) -> dict:
    """Step times with glibc's default allocator settings and with :func:`training.cputune.keep_freed_memory`,
    each in a fresh process, alternating (order reversed every other round), ``rounds`` times."""
    import subprocess

    import numpy as np

    runs: dict = {"default": [], "tuned": []}
    for r in range(rounds):
        for mode in ("default", "tuned") if r % 2 == 0 else ("tuned", "default"):
            env = dict(os.environ, **{ALLOCATOR_ENV: mode})
            command = [sys.executable, __file__, "--output-dir", os.devnull, "--time-steps", str(steps), *argv]
            child = subprocess.run(command, env=env, capture_output=True, text=True)
            if child.returncode != 0:
                raise SystemExit(f"{' '.join(command)} failed:\n{child.stderr}")
            runs[mode].append(json.loads(child.stdout.strip().splitlines()[-1]))
    if not all(run["allocator_tuned"] for run in runs["tuned"]):
        raise SystemExit("the allocator settings could not be applied here (no glibc mallopt)")
    phases = list(runs["default"][0]["step_seconds"])
    ratios = {p: [t["step_seconds"][p] / d["step_seconds"][p] for t, d in zip(runs["tuned"], runs["default"])] for p in phases}
    return {
        "rounds": rounds,
        "steps": steps,
        "step_seconds": {mode: [run["step_seconds"] for run in r] for mode, r in runs.items()},
        "page_faults_per_step": {mode: [run["page_faults_per_step"] for run in r] for mode, r in runs.items()},
        "tuned_over_default": {p: {"per_round": v, "quartiles": [float(x) for x in np.quantile(v, [0.25, 0.5, 0.75])]} for p, v in ratios.items()},
    }


FULL_BATCH_ONLY = "--floor, --floor-only, --allocator-rounds and --compile-rounds time full-batch runs: drop --batch-size"


def load_task(rosmap_argv: list, output_dir: str):
    """The ROSMAP task and full-batch run configuration that ``rosmap.py rosmap_argv --output-dir output_dir``
    would train; a bad option or data file stops with one line (SystemExit), before any timing."""
    options = omics.parse(ROSMAP, list(rosmap_argv) + ["--output-dir", output_dir])
    try:
        config = omics.config_from_args(ROSMAP, options)
    except ConfigError as err:
        raise SystemExit(f"{ROSMAP.name}: {err}") from None
    if config.batch_size is not None:
        raise SystemExit(f"rosmap_bench: {FULL_BATCH_ONLY}")
    try:
        data = omics.load_mogonet(omics.find_data_dir(ROSMAP, options.data_dir), num_classes=ROSMAP.num_classes, feature_counts=ROSMAP.feature_counts)
    except omics.MogonetFormatError as err:
        raise SystemExit(f"{ROSMAP.name}: {err}") from None
    return options, omics.make_task(ROSMAP, data, dropout=options.dropout), config


def run_flops(task: Task, config: TrainConfig, num_seeds: int) -> dict:
    """Floating-point operations of ``num_seeds`` full-batch runs of ``config`` (see the module docstring)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    train_inputs, train_y, val_inputs, test_inputs, model, objective = full_batch_setup(task, config)

    def count(fn) -> int:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()

    def train_step():
        loss, _ = objective(model, train_inputs, train_y)
        loss.backward()

    per_phase: dict = {}
    step_flops: dict = {}
    for _ in range(config.epochs):
        phase = objective.phase()
        per_phase[phase] = per_phase.get(phase, 0) + 1
        if phase not in step_flops:
            step_flops[phase] = count(train_step)
            model.zero_grad(set_to_none=True)
        objective.epoch_end()
    with torch.no_grad():
        val_flops = count(lambda: model(val_inputs, unimodal=False)) if val_inputs is not None else 0
        test_flops = count(lambda: model(test_inputs, unimodal=False))
    val_evals = sum(map(config.validation_due, range(config.epochs))) if val_inputs is not None else 0
    test_evals = sum(map(config.test_due, range(config.epochs)))
    per_seed = sum(step_flops[p] * k for p, k in per_phase.items()) + val_evals * val_flops + test_evals * test_flops
    return {
        "step_flops": step_flops,
        "epochs_per_phase": per_phase,
        "eval_flops": {"validation": val_flops, "test": test_flops},
        "evaluations": {"validation": val_evals, "test": test_evals},
        "flops_per_seed": per_seed,
        "flops_total": per_seed * num_seeds,
    }


def gemm_rates(repeats: int = 7) -> dict:
    """Best float32 matrix-product rates (GFLOP/s, median of ``repeats``): all cores and one core."""
    import torch

    def rate(m: int, k: int, n: int, threads: int) -> float:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            a, b = torch.randn(m, k), torch.randn(k, n)
            out = torch.empty(m, n)
            torch.mm(a, b, out=out)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                torch.mm(a, b, out=out)
                times.append(time.perf_counter() - start)
            return 2 * m * k * n / sorted(times)[len(times) // 2] / 1e9
        finally:
            torch.set_num_threads(previous)

    cores = os.cpu_count() or 1
    return {
        "all_cores_2048_cube": rate(2048, 2048, 2048, cores),
        "one_core_2048_cube": rate(2048, 2048, 2048, 1),
        "one_core_196x1000x1000": rate(196, 1000, 1000, 1),
        "cores": cores,
    }


def floor_record(task, config, num_seeds: int) -> dict:
    flops = run_flops(task, config, num_seeds)
    rates = gemm_rates()
    best = max(rates["all_cores_2048_cube"], rates["cores"] * rates["one_core_2048_cube"], rates["cores"] * rates["one_core_196x1000x1000"])
    return dict(flops, gemm_gflops=rates, best_gflops=best, floor_seconds=flops["flops_total"] / (best * 1e9))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=output_folder, required=True)
    parser.add_argument("--floor", action="store_true", help="also count the run's operations and measure the machine's best GEMM rate")
    parser.add_argument("--floor-only", action="store_true", help="only the floor (no training)")
    parser.add_argument(
        "--allocator-rounds", type=int_at_least(0), default=0, metavar="K",
        help="only compare one training step with glibc's default allocator settings and with keep_freed_memory, K alternating rounds of fresh processes (OUT/allocator.json)",
    )
    parser.add_argument("--steps", type=int_at_least(1), default=10, help="steps timed per phase with --allocator-rounds (default: %(default)s)")
    parser.add_argument("--compile-rounds", type=int_at_least(0), default=0, metavar="K", help="only compare eager and compiled training steps, K alternating rounds per phase (OUT/compile.json)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of --compile-rounds (default: %(default)s)")
    parser.add_argument("--cold-compile", action="store_true", help="with --compile-rounds: compile into an empty inductor cache (what a first run pays)")
    parser.add_argument("--time-steps", type=int_at_least(0), default=0, help=argparse.SUPPRESS)  # the child process of --allocator-rounds
    return parser


def main(argv=None) -> dict:
    args, passthrough = build_parser().parse_known_args(argv)
    omics.check_passed_on(ROSMAP, passthrough)
    if args.compile_rounds:
        _, task, config = load_task(passthrough, os.devnull)
        with tempfile.TemporaryDirectory() as cache, mock.patch.dict(os.environ, {"TORCHINDUCTOR_CACHE_DIR": cache} if args.cold_compile else {}):
            record = compile_rounds(task, config, args.compile_rounds, args.compile_backend)
        record["inductor_cache"] = "empty at the start" if args.cold_compile else "as found (warm when an earlier run compiled the same graphs)"
        record["command"] = " ".join([sys.argv[0]] + list(argv if argv is not None else sys.argv[1:]))
        atomic_write_json(args.output_dir / "compile.json", record)
        print(json.dumps({phase: {k: v for k, v in r.items() if k in ("first_compiled_call_seconds", "ratio_quartiles")} for phase, r in record["phases"].items()}, indent=1))
        return record
    if args.time_steps or args.allocator_rounds:
        _, task, config = load_task(passthrough, os.devnull)
        if args.time_steps:
            record = time_steps(task, config, args.time_steps)
            print(json.dumps(record), flush=True)
            return record
        record = allocator_rounds(list(passthrough), args.allocator_rounds, args.steps)
        record["command"] = " ".join([sys.argv[0]] + list(argv if argv is not None else sys.argv[1:]))
        atomic_write_json(args.output_dir / "allocator.json", record)
        print(json.dumps(record["tuned_over_default"], indent=1))
        return record
    run_dir = args.output_dir / "run"
    passthrough = list(passthrough)
    if not hasattr(omics.given_options(ROSMAP, passthrough), "seeds"):
        passthrough += ["--seeds", "0", "1", "2", "3", "4"]
    floor = None
    if args.floor or args.floor_only:
        options, task, config = load_task(passthrough, str(run_dir))
        floor = floor_record(task, config, len(options.seeds))
        print(f"floor: {floor['flops_total'] / 1e12:.2f} TFLOP at best {floor['best_gflops']:.0f} GFLOP/s = {floor['floor_seconds']:.0f} s", flush=True)
        if args.floor_only:
            record = {"command": " ".join([sys.argv[0]] + list(argv if argv is not None else sys.argv[1:])), "floor": floor, "target_wall_seconds": 180}
            atomic_write_json(args.output_dir / "floor.json", record)
            return record
    if (run_dir / "seeds").exists():
        raise SystemExit(f"{run_dir / 'seeds'} holds finished seeds, which would not be timed again; use a fresh --output-dir")
    load_before = os.getloadavg()[0]
    cpu_start, wall_start = cpu_seconds(), time.perf_counter()
    results = omics.main(ROSMAP, passthrough + ["--output-dir", str(run_dir), "--no-progress"])
    wall, cpu = time.perf_counter() - wall_start, cpu_seconds() - cpu_start
    config = results["config"]
    seed_epochs = len(results["seeds"]) * config["epochs"]
    seed_seconds, workers = [r["seconds"] for r in results["per_seed"]], results["workers"]
    record = {
        "command": " ".join([sys.argv[0]] + list(argv if argv is not None else sys.argv[1:])),
        "method": results["method"],
        "convention": results["convention"],
        "seeds": results["seeds"],
        "epochs": config["epochs"],
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "per_seed_seconds": seed_seconds,
        "workers": workers,
        # 1.0: the workers were busy with seeds all the time; the machine's drift does not move it
        "wall_over_seed_seconds_per_worker": wall / (sum(seed_seconds) / workers),
        "seconds_per_seed_epoch_cpu": cpu / seed_epochs,
        "cores": os.cpu_count(),
        "allocator": os.environ.get(ALLOCATOR_ENV, "tuned"),
        "load_1min_before": load_before,
        "load_1min_after": os.getloadavg()[0],
        "target_wall_seconds": 180,
        "validation_acc": results["protocols"]["validation"]["acc"] if "validation" in results["protocols"] else None,
        "floor": floor,
    }
    atomic_write_json(args.output_dir / "bench.json", record)
    print(json.dumps(record, indent=1))
    return record


if __name__ == "__main__":
    main()
