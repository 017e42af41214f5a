"""Benchmark: wall-clock and CPU time of the ROSMAP pipeline (default: 5 seeds of ``m3col``).

    python examples/rosmap_bench.py --output-dir runs/rosmap_bench [--workers 5] [rosmap.py options]

Runs ``rosmap.py`` in this process (seeds in worker processes) and writes
``OUT/bench.json``: wall seconds, CPU seconds (this process and its workers), the 1-minute load
average before and after (the machine may be shared: compare runs taken at a similar load),
the core count, and seconds per seed-epoch. The target for the pipeline is 5 seeds of
``m3col`` in at most 180 s on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import engine
import mogonet
from rosmap import ROSMAP


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, required=True)
    args, passthrough = parser.parse_known_args(argv)
    run_dir = args.output_dir / "run"
    if (run_dir / "seeds").exists():
        raise SystemExit(f"{run_dir / 'seeds'} holds finished seeds, which would not be timed again; use a fresh --output-dir")
    passthrough = list(passthrough)
    if "--seeds" not in passthrough:
        passthrough += ["--seeds", "0", "1", "2", "3", "4"]
    load_before = os.getloadavg()[0]
    cpu_start, wall_start = cpu_seconds(), time.perf_counter()
    results = mogonet.main(ROSMAP, passthrough + ["--output-dir", str(run_dir), "--no-progress"])
    wall, cpu = time.perf_counter() - wall_start, cpu_seconds() - cpu_start
    config = results["config"]
    seed_epochs = len(results["seeds"]) * config["epochs"]
    record = {
        "command": " ".join([sys.argv[0]] + list(argv if argv is not None else sys.argv[1:])),
        "method": results["method"],
        "convention": results["convention"],
        "seeds": results["seeds"],
        "epochs": config["epochs"],
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "per_seed_seconds": [r["seconds"] for r in results["per_seed"]],
        "seconds_per_seed_epoch_cpu": cpu / seed_epochs,
        "cores": os.cpu_count(),
        "load_1min_before": load_before,
        "load_1min_after": os.getloadavg()[0],
        "target_wall_seconds": 180,
        "validation_acc": results["protocols"]["validation"]["acc"] if "validation" in results["protocols"] else None,
    }
    engine.atomic_write_json(args.output_dir / "bench.json", record)
    print(json.dumps(record, indent=1))
    return record


if __name__ == "__main__":
    main()
