"""This package's CLIP loss against the peer libraries': time, extra memory and value, side by side.

Implementations (``benchmarks/peers.py`` says how each is loaded and put on our scale):
``auto``, ``dense``, ``tiled`` (:func:`m3co_loss.functional.clip_loss` with that ``backend``);
open_clip's ``ClipLoss`` and ``SigLipLoss``, info-nce-pytorch's ``InfoNCE``,
pytorch-metric-learning's ``NTXentLoss``, lightly's ``NTXentLoss``, Inf-CL's ``cal_inf_loss``
(CUDA only); and ``floor``, the bare matrix products of the loss (bench_kernels' floor).
SigLIP and lightly's NT-Xent are different losses: they are timed, their values not compared.
Install the peers with ``bash benchmarks/install_peers.sh`` (pinned, ``--no-deps``).

For each (N, D):

1. an implementation whose N x N (or N x N^2) buffers would exceed ``--max-memory-gib``, or
   whose pass, scaled from its time at a smaller N, would take ``--min-rounds`` passes over
   ``--budget-seconds``, is skipped, with the reason recorded;
2. each other implementation runs once in a fresh process (a tiny warm-up, a memory baseline
   after the inputs exist, one forward + backward pass): its extra peak memory (CPU:
   ``ru_maxrss``; CUDA: ``torch.cuda.max_memory_allocated``, both via bench_kernels) and pass
   time; one that fails (import error, out of memory, killed) is recorded with the reason;
3. one fresh process runs the survivors on the same inputs: a first pass each checks the value
   and the gradients against ours (relative 1e-4 in float32), then ``rounds`` rounds run them in
   rotation, one pass each, the order reversed every other round (as ``bench_kernels --paired``),
   so that each per-round ratio ``auto / other`` is taken between passes seconds apart on a
   machine whose speed drifts.

Results go to ``<out-dir>/<tag>.json`` (rewritten atomically after every (N, D); a rerun resumes),
and ``<tag>.md``, ``<tag>.rst`` (the docs' table) and ``<tag>.png`` are made from it, with
``auto``'s time and extra memory against the fastest comparable peer and its time against the
GEMM floor.

Examples::

    python benchmarks/bench_peers.py                               # N 1024..65536, D 512 and 768
    python benchmarks/bench_peers.py --n 8192 --d 512 --rounds 9 --tag peers_target
    python benchmarks/bench_peers.py --device cuda --max-memory-gib 100
    python benchmarks/bench_peers.py --report                      # rebuild the tables and plot
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

import peers
import peers_report
from common import cpu_name, extra_peak_bytes, load_results, memory_baseline, memory_total, quartiles, save_json, uptime
from peers import IMPLS, TEMPERATURE

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GRID_N = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
GRID_D = (512, 768)
DTYPES = ("float32", "bfloat16")
# Largest relative difference from ours that still counts as the same value (and gradient).
VALUE_TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}
GRAD_TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2}


# ----------------------------------------------------------------------------- worker


def inputs(n: int, d: int, device, dtype: str):
    """Two (n, d) leaves, correlated pairs (cosine about 0.6) so that positives stand out."""
    import torch

    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, d, generator=g)
    b = torch.randn(n, d, generator=g).mul_(0.8).add_(a, alpha=0.6)  # in place: no temporary in the baseline
    return [x.to(device, getattr(torch, dtype)).requires_grad_() for x in (a, b)]


def make_step(name: str, a, b, device):
    """``(step, note)``: one forward + backward pass of ``name`` on the leaves ``a, b``, returning the value."""
    import torch

    cuda = torch.device(device).type == "cuda"
    if name == "floor":
        run = peers.floor_step(a, b)

        def floor():
            with torch.no_grad():
                run()
            return None

        return floor, "bench_kernels' floor products"
    fn, note = peers.load(name, device)

    def step():
        a.grad = b.grad = None
        value = fn(a, b)
        value.backward()
        if cuda:
            torch.cuda.synchronize()
        return value.detach()

    return step, note


def _reason(error: BaseException) -> str:
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= 300 else text[:297] + "..."


def memory_worker(args) -> dict:
    """One implementation: a tiny warm-up, the baseline, one timed pass at full size."""
    import torch

    name, device = args.impl[0], torch.device(args.device)
    make_step(name, *inputs(64, args.d[0], device, args.dtype), device)[0]()  # thread pools, kernels, buffers
    a, b = inputs(args.n[0], args.d[0], device, args.dtype)
    step, note = make_step(name, a, b, device)
    base = memory_baseline(device)
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    return dict(status="ok", pass_s=seconds, extra_peak_bytes=extra_peak_bytes(device, base), note=note)


def paired_worker(args) -> dict:
    """The implementations on the same inputs: a checked first pass each, then ``rounds`` in rotation."""
    import torch

    device = torch.device(args.device)
    a, b = inputs(args.n[0], args.d[0], device, args.dtype)
    steps, notes, failures = {}, {}, {}
    for name in args.impl:
        try:
            steps[name], notes[name] = make_step(name, a, b, device)
        except Exception as error:  # noqa: BLE001 - reported per implementation
            failures[name] = _reason(error)
    reference = next((name for name in steps if IMPLS[name].family == "ours"), None)
    values, grad_diff, ref_grads = {}, {}, None
    for name in sorted(steps, key=lambda x: x != reference):  # the reference first
        try:
            value = steps[name]()
        except Exception as error:  # noqa: BLE001
            failures[name] = _reason(error)
            continue
        if value is None:
            continue
        values[name] = float(value)
        grads = [x.grad.detach().clone() for x in (a, b)]
        if name == reference:
            ref_grads = grads
        elif IMPLS[name].comparable and ref_grads is not None:
            grad_diff[name] = max(float((g - r).abs().max() / r.abs().max()) for g, r in zip(grads, ref_grads))
        del grads
    names = [name for name in steps if name not in failures]
    times = {name: [] for name in names}
    for round_ in range(args.rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            if name in failures:
                continue
            start = time.perf_counter()
            try:
                steps[name]()
            except Exception as error:  # noqa: BLE001
                failures[name] = _reason(error)
                continue
            times[name].append(time.perf_counter() - start)
    times = {name: t for name, t in times.items() if name not in failures}
    return dict(status="ok", times_s=times, values=values, grad_rel_diff=grad_diff, failures=failures,
                notes=notes, reference=reference)


def worker(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    try:
        return (paired_worker if args.worker == "paired" else memory_worker)(args)
    except peers.Unavailable as error:
        return dict(status="unavailable", reason=str(error))
    except Exception as error:  # noqa: BLE001 - out of memory and the like are results
        return dict(status="failed", reason=_reason(error))


# ----------------------------------------------------------------------------- driver


def _run(args, mode: str, impls: list, n: int, d: int, *, timeout: float, rounds: int = 0) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", mode, "--impl", *impls, "--n", str(n),
           "--d", str(d), "--threads", str(args.threads), "--device", args.device, "--dtype", args.dtype,
           "--rounds", str(max(rounds, 1)), "--min-rounds", "1"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE), os.environ.get("PYTHONPATH", "")]))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return dict(status="failed", reason=f"over the process timeout of {timeout:.0f} s")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if lines:
        return json.loads(lines[-1])
    if proc.returncode < 0:
        return dict(status="failed", reason=f"killed by signal {-proc.returncode}" + (" (out of memory?)" if proc.returncode == -9 else ""))
    tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
    return dict(status="failed", reason=tail or f"exit code {proc.returncode}")


def estimate_bytes(name: str, n: int) -> float | None:
    impl = IMPLS[name]
    return None if impl.bytes_per_entry is None else impl.bytes_per_entry * float(n) ** impl.exponent


def estimate_seconds(history: list, name: str, n: int, d: int) -> tuple | None:
    """(seconds per pass, n0, d0): ``name``'s pass at the largest smaller N (or this N, another D), scaled by N^e D."""
    past = [h for h in history if h[0] == name and (h[1] < n or (h[1] == n and h[2] != d))]
    if not past:
        return None
    _, n0, d0, s0 = max(past, key=lambda h: (h[1], h[2] == d, h[2]))
    return s0 * (n / n0) ** IMPLS[name].exponent * d / d0, n0, d0


def _history(results: list) -> list:
    out = []
    for r in results:
        for name, rec in r["impls"].items():
            seconds = rec.get("median_s") or rec.get("memory_pass_s")
            if seconds:
                out.append((name, r["n"], r["d"], seconds))
    return out


def measure(args, n: int, d: int, history: list, unavailable: dict) -> dict:
    entry = dict(device=args.device, dtype=args.dtype, n=n, d=d, load_before=list(os.getloadavg()), impls={})
    budget_bytes = args.max_memory_gib * 2**30
    todo = []
    for name in args.impl:
        impl, rec = IMPLS[name], entry["impls"].setdefault(name, {})
        need, est = estimate_bytes(name, n), estimate_seconds(history, name, n, d)
        if impl.cuda_only and args.device != "cuda":
            rec.update(status="unavailable", reason="runs on CUDA only")
        elif name in unavailable:  # an import that failed at a smaller N fails again: no process for it
            rec.update(status="unavailable", reason=unavailable[name])
        elif need is not None and need > budget_bytes:
            rec.update(status="skipped", reason=f"would need about {need / 2**30:.1f} GiB ({impl.bytes_per_entry:g} bytes x "
                       f"N^{impl.exponent}) over the memory budget of {args.max_memory_gib:g} GiB")
        elif est is not None and est[0] * args.min_rounds > args.budget_seconds:
            rec.update(status="skipped", reason=f"about {est[0]:.0f} s per pass (scaled from N = {est[1]}, D = {est[2]}): "
                       f"{args.min_rounds} rounds exceed the time budget of {args.budget_seconds:g} s")
        else:
            todo.append(name)
            rec["estimate_s"] = est[0] if est else None
        if "status" in rec:
            print(f"  N={n:6d} D={d:4d} {name:10s} {rec['status']}: {rec['reason']}", flush=True)
    for name in todo:
        print(f"  N={n:6d} D={d:4d} {name:10s} memory ...", end=" ", flush=True)
        est = entry["impls"][name].pop("estimate_s")
        result = _run(args, "memory", [name], n, d, timeout=args.timeout if est is None else 3 * est + 300)
        rec = entry["impls"][name]
        if result["status"] != "ok":
            rec.update(status=result["status"], reason=result["reason"])
            if result["status"] == "unavailable":
                unavailable[name] = result["reason"]
            print(rec["status"], rec["reason"], flush=True)
            continue
        rec.update(extra_peak_bytes=result["extra_peak_bytes"], memory_pass_s=result["pass_s"], note=result["note"])
        print(f"{result['pass_s']:.3f} s, +{result['extra_peak_bytes'] / 2**20:.0f} MiB", flush=True)
    runnable = [name for name in todo if "status" not in entry["impls"][name]]
    if runnable:
        slowest = max(entry["impls"][name]["memory_pass_s"] for name in runnable)
        rounds = max(args.min_rounds, min(args.rounds, int(args.budget_seconds // max(slowest, 1e-9))))
        entry["rounds"] = rounds
        total = sum(entry["impls"][name]["memory_pass_s"] for name in runnable)
        print(f"  N={n:6d} D={d:4d} paired, {rounds} rounds of {len(runnable)} ...", end=" ", flush=True)
        result = _run(args, "paired", runnable, n, d, rounds=rounds, timeout=3 * (rounds + 1) * total + 300)
        _record_paired(args, entry, runnable, result)
    entry.update(load_after=list(os.getloadavg()), uptime=uptime())
    return entry


def _record_paired(args, entry: dict, runnable: list, result: dict) -> None:
    impls = entry["impls"]
    if result["status"] != "ok":
        for name in runnable:
            impls[name].update(status="failed", reason=f"paired process: {result['reason']}")
        print(result["reason"], flush=True)
        return
    for name, reason in result["failures"].items():
        impls[name].update(status="failed", reason=reason)
    reference, values = result["reference"], result["values"]
    entry["reference"] = reference
    for name, times in result["times_s"].items():
        rec = impls[name]
        rec.update(status="ok", times_s=times, median_s=statistics.median(times), note=result["notes"].get(name, rec.get("note")))
        if name in values:
            rec["value"] = values[name]
        if IMPLS[name].family == "reference":
            rec["check"] = "no value"
        elif not IMPLS[name].comparable:
            rec["check"] = "not comparable"
        elif name != reference and reference in values and name in values:
            rec["rel_diff"] = abs(values[name] - values[reference]) / abs(values[reference])
            rec["grad_rel_diff"] = result["grad_rel_diff"].get(name)
            same = rec["rel_diff"] <= VALUE_TOLERANCE[args.dtype] and (rec["grad_rel_diff"] or 0) <= GRAD_TOLERANCE[args.dtype]
            rec["check"] = "ok" if same else "MISMATCH"
        elif name == reference:
            rec["check"] = "reference"
    base = "auto" if "auto" in result["times_s"] else reference
    if base in result["times_s"]:
        entry["base"] = base
        entry["ratios"] = {name: [x / y for x, y in zip(result["times_s"][base], times)]
                           for name, times in result["times_s"].items() if name != base}
        entry["ratio_quartiles"] = {name: quartiles(r) for name, r in entry["ratios"].items()}
    print("  ".join(f"{base}/{name} {q[1]:.2f}" for name, q in entry.get("ratio_quartiles", {}).items()), flush=True)


def _meta(args) -> dict:
    import torch

    meta = dict(machine=platform.platform(), processor=cpu_name(), cpu_count=os.cpu_count(), torch=torch.__version__,
                threads=args.threads, device=args.device, dtype=args.dtype, temperature=TEMPERATURE,
                rounds=args.rounds, min_rounds=args.min_rounds, budget_seconds=args.budget_seconds,
                max_memory_gib=args.max_memory_gib, memory_total_bytes=memory_total(),
                value_tolerance=VALUE_TOLERANCE[args.dtype], grad_tolerance=GRAD_TOLERANCE[args.dtype],
                versions={name: peers.version(impl.distribution) for name, impl in IMPLS.items() if impl.distribution},
                alignment={name: IMPLS[name].alignment for name in IMPLS})
    if args.device == "cuda" and torch.cuda.is_available():
        meta["gpu"] = torch.cuda.get_device_name()
    return meta


def drive(args) -> Path:
    path = Path(args.out_dir) / f"{args.tag}.json"
    data = load_results(path)
    old_meta = data.get("meta", {})
    data["meta"] = dict(_meta(args), runs=old_meta.get("runs", []))
    data["meta"]["runs"].append(dict(started=time.strftime("%Y-%m-%d %H:%M:%S"), load_start=list(os.getloadavg()),
                                     argv=sys.argv[1:]))
    done = {_key(r): r for r in data["results"]}
    unavailable = {}
    for n in args.n:
        for d in args.d:
            key = _key(dict(device=args.device, dtype=args.dtype, n=n, d=d))
            if key in done and not args.redo:
                continue
            done[key] = measure(args, n, d, _history(list(done.values())), unavailable)
            data["results"] = sorted(done.values(), key=lambda r: (r["device"], r["dtype"], r["n"], r["d"]))
            data["meta"]["runs"][-1].update(finished=time.strftime("%Y-%m-%d %H:%M:%S"), load_end=list(os.getloadavg()))
            save_json(path, data)
    if data["results"]:
        save_json(path, data)
        peers_report.report(path)
    return path


def _key(r: dict) -> str:
    return f"{r['device']}|{r['dtype']}|{r['n']}|{r['d']}"


# ----------------------------------------------------------------------------- CLI


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=list(GRID_N), help="batch sizes")
    p.add_argument("--d", type=int, nargs="+", default=list(GRID_D), help="embedding dims")
    p.add_argument("--impl", nargs="+", default=list(IMPLS), help=f"from {', '.join(IMPLS)}")
    p.add_argument("--rounds", type=int, default=7, help="paired rounds per (N, D), fewer where the budget asks")
    p.add_argument("--min-rounds", type=int, default=3, help="an implementation that cannot run this many is skipped")
    p.add_argument("--budget-seconds", type=float, default=200.0,
                   help="seconds one implementation may take for its rounds at one (N, D) (estimated from smaller N)")
    p.add_argument("--max-memory-gib", type=float, default=None,
                   help="skip implementations whose N x N buffers would need more (default: 8 on CPU, 80%% of the GPU's)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds for a process without an estimate")
    p.add_argument("--out-dir", default=str(HERE / "results"))
    p.add_argument("--tag", default=None, help="results file stem (default: peers_<device>[_<dtype>])")
    p.add_argument("--redo", action="store_true", help="measure again the (N, D) already recorded")
    p.add_argument("--report", action="store_true", help="only rebuild the tables and the plot")
    p.add_argument("--worker", choices=("memory", "paired"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = [i for i in args.impl if i not in IMPLS]
    if unknown:
        p.error(f"--impl: unknown {', '.join(unknown)}; choose from {', '.join(IMPLS)}")
    if min(args.n) < 2 or min(args.d) < 1:
        p.error("every --n must be >= 2 and every --d >= 1")
    if args.rounds < 1 or args.min_rounds < 1 or args.min_rounds > args.rounds:
        p.error("--rounds and --min-rounds must be >= 1, --min-rounds <= --rounds")
    if args.threads < 1 or args.budget_seconds <= 0 or (args.max_memory_gib is not None and args.max_memory_gib <= 0):
        p.error("--threads, --budget-seconds and --max-memory-gib must be positive")
    args.tag = args.tag or f"peers_{args.device}" + ("" if args.dtype == "float32" else f"_{args.dtype}")
    if args.max_memory_gib is None and not args.worker:
        args.max_memory_gib = _default_memory_gib(args.device)
    return args


def _default_memory_gib(device: str) -> float:
    if device == "cuda":
        import torch

        if torch.cuda.is_available():
            return round(0.8 * torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return 8.0


def main(argv=None) -> None:
    args = _parse(argv)
    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return
    if args.report:
        peers_report.report(Path(args.out_dir) / f"{args.tag}.json")
        return
    drive(args)


if __name__ == "__main__":
    main()
