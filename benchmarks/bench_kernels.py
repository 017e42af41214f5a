"""Time and memory of the M3CoL losses: textbook dense form, each backend, and the bare-GEMM floor.

Every figure (one loss, one implementation, one N, one D) is measured in a fresh Python process:
it builds the inputs, runs a tiny warm-up of the same implementation (so that thread pools and
library buffers are not counted as the loss's memory), takes a memory baseline, then times
``repeats`` forward+backward passes and reports their median and the extra peak memory
(CPU: ``ru_maxrss`` minus the baseline; CUDA: ``torch.cuda.max_memory_allocated`` minus the
memory held after the inputs). Results are written after every figure (atomically) to
``<out-dir>/<tag>.json``, from which ``<tag>.md`` and ``<tag>.rst`` (tables) and ``<tag>.png``
(plot) are made;
a rerun resumes, skipping the figures already recorded. ``meta`` holds the last run's settings;
each figure names the run that measured it (``run``, a key of ``runs``, which keeps every run's
torch version, threads and options), and the times of one table row, from separate processes,
are not divided: the time ratios are ``--paired``'s.

Implementations:

* ``textbook``: normalise, full S, row and column ``log_softmax`` times a dense target matrix
  (for MultiSClip the soft targets ``W = softmax(p_a p_a^T / t)`` too), autograd backward.
* ``dense``, ``tiled``, ``triton``: :mod:`m3co_loss.functional` with that ``backend``.
* ``floor``: only the matrix products the loss needs, into preallocated buffers, in strips of
  rows (same flop count, no N x N allocation). M3Co: ``S = A B^T``, ``dS B``, ``dS^T A``.
  MultiSClip: ``S``, ``G = A A^T``, ``dS B``, ``dS^T A``, ``(dG + dG^T) A``. Aggregates over two
  modalities: twice the M3Co products; ``S, G_a, G_b`` and four products for MultiSClip.

``--paired`` (times only): one fresh process per (loss, N, D) builds the inputs once and runs
the implementations in rotation, one pass each per round (the order reversed every other round),
so that every ratio ``tiled / other`` is taken between passes seconds apart. On a shared machine
whose speed drifts by tens of percent over minutes (measured here: one core's float32 GEMM rate
moves between about 75 and 120 GFLOP/s) this is the side-by-side figure; it is written to
``<out-dir>/<tag>_paired.{json,md}`` with the median and quartiles of the per-round ratios.

Losses: ``m3co_pair`` (:func:`~m3co_loss.functional.m3co_pair`), ``multisoftclip_pair``,
and the two-modality aggregates ``m3co`` and ``multisoftclip``.

Examples::

    python benchmarks/bench_kernels.py --target                  # N=8192, D=512, both pair losses
    python benchmarks/bench_kernels.py --grid                    # the full grid (hours on 2 cores)
    python benchmarks/bench_kernels.py --n 1024 4096 --d 256 --loss m3co_pair --impl dense tiled
    python benchmarks/bench_kernels.py --target --paired --impl textbook tiled floor --repeats 15
    python benchmarks/bench_kernels.py --device cuda --dtype bfloat16 --impl dense tiled triton floor
    python benchmarks/bench_kernels.py --report                  # rebuild the table and plot only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import cpu_name, extra_peak_bytes, load_results, memory_baseline, memory_total, quartiles, save_json, uptime
from kernels_report import IMPLS, LOSSES, report, report_paired

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GRID_N = (1024, 4096, 8192, 16384, 32768, 65536)
GRID_D = (256, 768)
DTYPES = ("float32", "bfloat16")
TARGET = (8192, 512)
TEMPERATURE = 0.1
# Bytes per N^2 element that the textbook and dense forms hold at their peak (measured at
# N = 8192 on CPU, float32, rounded up); used to skip sizes that cannot fit.
DENSE_BYTES_PER_ENTRY = {"m3co_pair": 24, "multisoftclip_pair": 28, "m3co": 44, "multisoftclip": 40}


# ----------------------------------------------------------------------------- worker


def _inputs(loss: str, n: int, d: int, device, dtype: str = "float32"):
    import torch

    g = torch.Generator().manual_seed(0)
    z = [torch.randn(n, d, generator=g) for _ in range(2)]
    perms = [torch.randperm(n, generator=g) for _ in range(2)]
    lam = torch.distributions.Beta(0.15, 0.15).sample((n,))
    mixed = [lam[:, None] * x + (1 - lam[:, None]) * x[p] for x, p in zip(z, perms)]
    move = lambda xs: [x.to(device, getattr(torch, dtype) if x.is_floating_point() else x.dtype) for x in xs]  # noqa: E731
    return dict(z=move(z), mixed=move(mixed), perms=move(perms), lam=lam.to(device))


def _textbook(loss: str, inp, leaves):
    import torch
    import torch.nn.functional as F

    t = TEMPERATURE

    def m3co_term(mixed_a, clean_b, perm, lam):
        n = mixed_a.shape[0]
        pa, pb = F.normalize(mixed_a, dim=1), F.normalize(clean_b, dim=1)
        s = pa @ pb.T / t
        target = torch.zeros(n, n, device=s.device)
        idx = torch.arange(n, device=s.device)
        target.index_put_((idx, idx), lam, accumulate=True)
        target.index_put_((idx, perm), 1 - lam, accumulate=True)
        return (-(target * F.log_softmax(s, 1)).sum(1) - (target * F.log_softmax(s, 0)).sum(1)).mean()

    def soft_terms(z_a, z_b, both):
        n = z_a.shape[0]
        pa, pb = F.normalize(z_a, dim=1), F.normalize(z_b, dim=1)
        s = pa @ pb.T / t
        logp = F.log_softmax(s, 1) + F.log_softmax(s, 0)
        w_a = torch.softmax(pa @ pa.T / t, 1)
        value = -(w_a * logp.T).sum() / n  # Ls(a; a, b)
        if both:
            w_b = torch.softmax(pb @ pb.T / t, 1)
            value = 0.5 * (value - (w_b * logp).sum() / n)
        return value

    perms, lam = inp["perms"], inp["lam"]
    if loss == "m3co_pair":
        return m3co_term(leaves[0], leaves[1], perms[0], lam)
    if loss == "m3co":
        mixed, clean = leaves[:2], leaves[2:]
        return 0.5 * (m3co_term(mixed[0], clean[1], perms[0], lam) + m3co_term(mixed[1], clean[0], perms[1], lam))
    return soft_terms(leaves[0], leaves[1], both=loss == "multisoftclip")


def _library(loss: str, inp, leaves, backend: str):
    from m3co_loss import functional as MF

    perms, lam, kw = inp["perms"], inp["lam"], dict(temperature=TEMPERATURE, backend=backend)
    if loss == "m3co_pair":
        return MF.m3co_pair(leaves[0], leaves[1], perms[0], lam, **kw)
    if loss == "m3co":
        return MF.m3co(leaves[:2], leaves[2:], perms, lam, **kw)
    if loss == "multisoftclip_pair":
        return MF.multisoftclip_pair(leaves[0], leaves[1], **kw)
    return MF.multisoftclip(leaves, **kw)


def _leaves(loss: str, inp):
    xs = inp["mixed"] + inp["z"] if loss == "m3co" else (
        [inp["mixed"][0], inp["z"][1]] if loss == "m3co_pair" else inp["z"])
    return [x.detach().clone().requires_grad_(True) for x in xs]


def floor_products(loss: str, inp, strip: int):
    """The loss's matrix products, strip by strip, into preallocated buffers."""
    import torch

    a, b = inp["z"]
    n, d = a.shape
    rows = min(n, strip)
    s = a.new_empty(rows, n)
    g = a.new_empty(rows, n)
    da, db = torch.empty_like(a), torch.empty_like(b)

    def m3co_products(x, y):
        for i in range(0, n, rows):
            j = min(i + rows, n)
            si = torch.mm(x[i:j], y.T, out=s[: j - i])
            torch.mm(si, y, out=da[i:j])
            db.addmm_(si.T, x[i:j])

    def soft_products(both):
        for i in range(0, n, rows):
            j = min(i + rows, n)
            si = torch.mm(a[i:j], b.T, out=s[: j - i])
            torch.mm(si, b, out=da[i:j])
            db.addmm_(si.T, a[i:j])
            for x, out in ((a, da), (b, db)) if both else ((a, da),):
                gi = torch.mm(x[i:j], x.T, out=g[: j - i])
                out[i:j].addmm_(gi, x)

    def run():
        if loss == "m3co_pair":
            m3co_products(a, b)
        elif loss == "m3co":
            m3co_products(a, b)
            m3co_products(b, a)
        else:
            soft_products(both=loss == "multisoftclip")
        if a.device.type == "cuda":
            torch.cuda.synchronize()

    return run


def worker(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from m3co_loss import backends

    backends.set_config(tile_rows=args.tile_rows or None, tile_cols=args.tile_cols or None, tile_square=args.tile_square or None, precision=args.precision)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = args.dtype
    loss, impl, n, d = args.loss[0], args.impl[0], args.n[0], args.d[0]

    def make_step(inp, impl=impl):
        if impl == "floor":
            return floor_products(loss, inp, args.strip)

        def step():
            leaves = _leaves(loss, inp)
            value = _textbook(loss, inp, leaves) if impl == "textbook" else _library(loss, inp, leaves, impl)
            value.backward()
            if cuda:
                torch.cuda.synchronize()

        return step

    if args.paired:
        return _paired_worker(args, make_step, _inputs(loss, n, d, device, dtype))
    with torch.no_grad() if impl == "floor" else _null():
        make_step(_inputs(loss, 64, d, device, dtype))()  # warm-up: thread pools, kernels, library buffers
    inp = _inputs(loss, n, d, device, dtype)
    step = make_step(inp)
    base = memory_baseline(device)
    times = []
    with torch.no_grad() if impl == "floor" else _null():
        for _ in range(args.repeats):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    return dict(times_s=times, median_s=statistics.median(times), extra_peak_bytes=extra_peak_bytes(device, base))


def _paired_worker(args, make_step, inp) -> dict:
    """Every implementation of ``args.impl`` on the same inputs, one timed pass each per round."""
    import torch

    impls = list(args.impl)
    steps = {impl: make_step(inp, impl) for impl in impls}
    grad = {impl: torch.no_grad() if impl == "floor" else _null() for impl in impls}
    for impl in impls:  # warm-up at full size: every buffer and code path touched once
        with grad[impl]:
            steps[impl]()
    times = {impl: [] for impl in impls}
    for round_ in range(args.repeats):
        for impl in impls if round_ % 2 == 0 else impls[::-1]:
            with grad[impl]:
                start = time.perf_counter()
                steps[impl]()
                times[impl].append(time.perf_counter() - start)
    return dict(paired_times_s=times)


def drive_paired(args) -> None:
    """One process per (loss, N, D) running the implementations in rotation; per-round ratios."""
    path = Path(args.out_dir) / f"{args.tag}_paired.json"
    data = load_results(path)
    run, settings = start_run(data, dict(machine_meta(threads=args.threads, device=args.device, dtype=args.dtype, repeats=args.repeats,
                                                      precision=args.precision), mode="paired"))
    done = {f"{r['device']}|{r['loss']}|{r['n']}|{r['d']}": r for r in data["results"]}
    for loss in args.loss:
        for n in args.n:
            for d in args.d:
                impls = [i for i in args.impl if _skip_reason(args, loss, i, n) is None]
                if "tiled" not in impls or len(impls) < 2:
                    continue
                print(f"{loss:18s} paired {'/'.join(impls)} N={n:6d} D={d:4d} ...", end=" ", flush=True)
                result = _run_one(args, loss, ",".join(impls), n, d)
                entry = dict(device=args.device, loss=loss, n=n, d=d, impls=impls, run=run, status=result["status"],
                             load_before=result["load_before"], load_after=result["load_after"], uptime=uptime())
                if result["status"] != "ok":
                    entry["reason"] = result["reason"]
                    print(result["reason"], flush=True)
                else:
                    times = result["paired_times_s"]
                    entry["times_s"] = times
                    entry["median_s"] = {i: quartiles(times[i])[1] for i in impls}
                    entry["ratios"] = {
                        other: [x / y for x, y in zip(times["tiled"], times[other])] for other in impls if other != "tiled"
                    }
                    entry["ratio_quartiles"] = {other: quartiles(r) for other, r in entry["ratios"].items()}
                    print("  ".join(f"tiled/{o} {q[1]:.2f} [{q[0]:.2f}, {q[2]:.2f}]" for o, q in entry["ratio_quartiles"].items()),
                          flush=True)
                done[f"{args.device}|{loss}|{n}|{d}"] = entry
                record_run(data, run, settings)
                data["results"] = list(done.values())
                save_json(path, data)
    report_paired(path)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ----------------------------------------------------------------------------- driver


def _key(r) -> str:
    return f"{r['device']}|{r['loss']}|{r['impl']}|{r['n']}|{r['d']}"


def start_run(data: dict, meta: dict) -> tuple:
    """``data["meta"]`` becomes this run's; returns ``(run id, its settings)`` for the figures it records.

    ``meta`` is overwritten by every run, so each figure names its run (``run``), and
    ``data["runs"]`` keeps the settings of every run that recorded one (see :func:`record_run`).
    """
    data["meta"] = meta
    run = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return run, {k: meta[k] for k in ("torch", "threads", "device", "dtype", "precision", "repeats") if k in meta}


def record_run(data: dict, run: str, settings: dict) -> None:
    data.setdefault("runs", {})[run] = settings


def machine_meta(*, threads: int, device: str, dtype: str, repeats: int, precision: str = "auto") -> dict:
    """What a results file records about the run: the machine, torch and the measuring options."""
    import torch

    meta = dict(
        machine=platform.platform(),
        processor=cpu_name(),
        cpu_count=os.cpu_count(),
        torch=torch.__version__,
        threads=threads,
        device=device,
        dtype=dtype,
        precision=precision,
        repeats=repeats,
        temperature=TEMPERATURE,
        memory_total_bytes=memory_total(),
    )
    if device == "cuda" and torch.cuda.is_available():
        meta["gpu"] = torch.cuda.get_device_name()
    return meta


def _skip_reason(args, loss: str, impl: str, n: int) -> str | None:
    if impl == "triton":
        from m3co_loss.backends import available

        if not available("triton", args.device) or args.device != "cuda":
            return "triton needs a CUDA device"
    if impl in ("textbook", "dense"):
        need = DENSE_BYTES_PER_ENTRY[loss] * n * n
        if need > args.mem_budget_gb * 2**30:
            return f"needs about {need / 2**30:.0f} GiB (budget {args.mem_budget_gb:g} GiB)"
    return None


def _run_one(args, loss, impl, n, d) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--loss", loss, "--impl", impl,
           "--n", str(n), "--d", str(d), "--repeats", str(args.repeats), "--threads", str(args.threads),
           "--device", args.device, "--dtype", args.dtype, "--precision", args.precision, "--strip", str(args.strip)] + (["--paired"] if args.paired else [])
    for flag, value in (("--tile-rows", args.tile_rows), ("--tile-cols", args.tile_cols), ("--tile-square", args.tile_square)):
        if value:
            cmd += [flag, str(value)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    load_before = os.getloadavg()
    start = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return dict(status="timeout", reason=f"over {args.timeout} s", load_before=load_before, load_after=os.getloadavg())
    out = dict(load_before=load_before, load_after=os.getloadavg(), wall_s=round(time.time() - start, 1))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return dict(out, status="error", reason=" | ".join(tail) or f"exit code {proc.returncode}")
    return dict(out, status="ok", **json.loads(lines[-1]))


def drive(args) -> None:
    """Measure every (loss, N, D) configuration; implementations alternate within each round."""
    path = Path(args.out_dir) / f"{args.tag}.json"
    data = load_results(path)
    run, settings = start_run(data, machine_meta(threads=args.threads, device=args.device, dtype=args.dtype, repeats=args.repeats,
                                                 precision=args.precision))
    done = {_key(r): r for r in data["results"]}
    configs = [(loss, n, d) for n in args.n for d in args.d for loss in args.loss]
    for loss, n, d in configs:
        entries = {}
        for impl in args.impl:
            entry = dict(device=args.device, loss=loss, impl=impl, n=n, d=d, run=run)
            old = done.get(_key(entry))
            if old is not None and not args.redo and old["status"] in ("ok", "skipped"):
                continue
            reason = _skip_reason(args, loss, impl, n)
            if reason:
                done[_key(entry)] = dict(entry, status="skipped", reason=reason)
            else:
                entries[impl] = dict(entry, status="ok", times_s=[], extra_peak_bytes=0, loads=[], rounds=args.rounds)
        # Rounds interleave the implementations, so that a burst of load from other jobs falls on
        # all of them rather than on one figure.
        for _ in range(args.rounds):
            for impl, entry in entries.items():
                if entry["status"] != "ok":
                    continue
                print(f"{loss:18s} {impl:8s} N={n:6d} D={d:4d} ...", end=" ", flush=True)
                result = _run_one(args, loss, impl, n, d)
                entry["loads"].append(result["load_before"][0])
                entry.setdefault("load_before", result["load_before"])
                entry["load_after"] = result["load_after"]
                entry["uptime"] = uptime()
                if result["status"] != "ok":
                    entry.update(status=result["status"], reason=result["reason"])
                    print(result["reason"], flush=True)
                    continue
                entry["times_s"] += result["times_s"]
                entry["extra_peak_bytes"] = max(entry["extra_peak_bytes"], result["extra_peak_bytes"])
                entry["median_s"] = statistics.median(entry["times_s"])
                print(f"{min(result['times_s']):.3f}..{max(result['times_s']):.3f} s, +{result['extra_peak_bytes'] / 2**20:.0f} MiB"
                      f"  (load {result['load_before'][0]:.1f})", flush=True)
        for entry in entries.values():
            done[_key(entry)] = entry
        if any(r.get("run") == run for r in done.values()):
            record_run(data, run, settings)
        data["results"] = list(done.values())
        save_json(path, data)
    report(path)


# ----------------------------------------------------------------------------- CLI


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=None, help="batch sizes")
    p.add_argument("--d", type=int, nargs="+", default=None, help="embedding dims")
    p.add_argument("--loss", nargs="+", choices=LOSSES, default=None)
    p.add_argument("--impl", nargs="+", default=list(IMPLS), help=f"implementations, from {', '.join(IMPLS)}")
    p.add_argument("--target", action="store_true", help=f"N={TARGET[0]}, D={TARGET[1]}, all four losses")
    p.add_argument("--grid", action="store_true", help=f"N in {GRID_N}, D in {GRID_D}, both pair losses")
    p.add_argument("--repeats", type=int, default=3, help="timed forward+backward passes per process")
    p.add_argument("--rounds", type=int, default=1,
                   help="fresh processes per figure, alternating with the other implementations; the median is over all passes")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="dtype of the embeddings (the package accumulates bfloat16 in float32); default tag gets a suffix")
    p.add_argument("--precision", default="auto", choices=("auto", "ieee", "tf32", "bf16", "fp16"),
                   help="precision of the Triton kernels' products (m3co_loss.backends.set_config(precision=...))")
    p.add_argument("--strip", type=int, default=1024, help="rows per strip of the floor's products")
    p.add_argument("--tile-rows", type=int, default=0, help="tile_rows of m3co_loss.backends.set_config (tile sweeps; use with --tag)")
    p.add_argument("--tile-cols", type=int, default=0, help="tile_cols of m3co_loss.backends.set_config")
    p.add_argument("--tile-square", type=int, default=0, help="tile_square of m3co_loss.backends.set_config")
    p.add_argument("--mem-budget-gb", type=float, default=16.0, help="skip textbook/dense figures that need more")
    p.add_argument("--timeout", type=float, default=7200.0, help="seconds per figure")
    p.add_argument("--out-dir", default=str(HERE / "results"))
    p.add_argument("--tag", default=None, help="results file stem (default: kernels_<device>)")
    p.add_argument("--redo", action="store_true", help="measure again figures already recorded")
    p.add_argument("--paired", action="store_true",
                   help="times only: the implementations in rotation within one process per configuration; per-round ratios")
    p.add_argument("--report", action="store_true", help="only rebuild the table and the plot")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    if args.threads < 1:
        p.error("--threads must be >= 1")
    args.tag = args.tag or f"kernels_{args.device}" + ("" if args.dtype == "float32" else f"_{args.dtype}")
    if args.worker:
        args.impl = args.impl[0].split(",")
        return args
    unknown = [i for i in args.impl if i not in IMPLS]
    if unknown:
        p.error(f"--impl: unknown {', '.join(unknown)}; choose from {', '.join(IMPLS)}")
    if args.target:
        args.n, args.d = args.n or [TARGET[0]], args.d or [TARGET[1]]
        args.loss = args.loss or list(LOSSES)
    if args.grid:
        args.n, args.d = args.n or list(GRID_N), args.d or list(GRID_D)
    args.n = args.n or list(GRID_N)
    args.d = args.d or list(GRID_D)
    args.loss = args.loss or ["m3co_pair", "multisoftclip_pair"]
    return args


def main(argv=None) -> None:
    args = _parse(argv)
    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return
    if args.report:
        report(Path(args.out_dir) / f"{args.tag}.json")
        paired = Path(args.out_dir) / f"{args.tag}_paired.json"
        if paired.exists():
            report_paired(paired)
        return
    if args.paired:
        drive_paired(args)
        return
    drive(args)


if __name__ == "__main__":
    main()
