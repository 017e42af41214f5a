"""Structured targets: time of ``contrastive_loss`` against ``m3co_pair``, and memory against dense and peers.

Two measurements, each in fresh Python processes (the machinery of ``bench_kernels.py``):

* ``--paired`` (times): one process per (N, D) builds the inputs once and runs the
  implementations in rotation, one forward + backward pass each per round, the order reversed
  every other round, so that every ratio is taken between passes seconds apart on the same
  inputs. Written to ``<out-dir>/<tag>_paired.{json,md,rst}`` with the per-round ratios (median and
  quartiles) and the load average.
* ``--memory``: one process per (implementation, N): a warm-up at a small N, the inputs, a memory
  baseline, then ``repeats`` passes; the extra peak memory (CPU: ``ru_maxrss`` above the baseline)
  and the median time. Written to ``<out-dir>/<tag>_memory.{json,md,rst}``. pytorch-metric-learning's
  ``NTXentLoss`` (labels, ``ref_emb``), if installed, is measured at small N and its memory
  extrapolated to the larger N by the power law fitted to its two largest sizes.

Implementations (tiled backend unless said otherwise; t = 0.1; ``partners`` and ``m3co_pair``
draw the same mixing plan, lam ~ Beta(0.15, 0.15)):

* ``partners``: ``contrastive_loss(z_a, z_b, partners=[i, perm[i]], weights=[lam, 1 - lam])``.
* ``m3co_pair``: ``m3co_pair(z_a, z_b, perm, lam)`` (which computes through the partners path).
* ``m3co_pair_previous``: what ``m3co_pair`` computed before it used the partners path: the same
  checks, then ``m3co_loss.backends.m3co_vector`` (its fused two-partner form).
* ``partners8``: K = 8 partners (``i`` and seven permutations) with learnable weights (a softmax
  of logits that require grad): the memory does not grow with K.
* ``labels``: ``contrastive_loss(z_a, z_b, labels=y)``, y uniform over ``--classes`` classes.
* ``labels_dense``: the same with ``backend="dense"`` (the N x N target matrix).
* ``clip``: ``clip_loss`` (identity targets), the bare log-sum-exp cost.
* ``pml``: pytorch-metric-learning ``NTXentLoss(a, y, ref_emb=b, ref_labels=y) + NTXentLoss(b, y,
  ref_emb=a, ref_labels=y)`` (a different loss: one row per positive pair against all of the
  anchor's negatives; memory only).

Examples::

    python benchmarks/bench_targets.py --paired --n 8192 --d 512 --rounds 7
    python benchmarks/bench_targets.py --memory --n 4096 8192 --d 512
    python benchmarks/bench_targets.py --report
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_kernels as bk  # noqa: E402  (the machine's description, the repository root)
import common  # noqa: E402  (memory, quartiles, atomic writes)

IMPLS = ("partners", "m3co_pair", "m3co_pair_previous", "partners8", "labels", "labels_dense", "clip", "pml")
PAIRED_DEFAULT = ("partners", "m3co_pair", "m3co_pair_previous", "labels", "clip")
MEMORY_DEFAULT = ("partners", "m3co_pair", "m3co_pair_previous", "partners8", "labels", "labels_dense", "clip", "pml")
TEMPERATURE = 0.1
PML_SIZES = (64, 96, 128)  # pytorch-metric-learning's memory grows as N^4 with labels: measured small, extrapolated


# ----------------------------------------------------------------------------- worker


def _inputs(n: int, d: int, classes: int, device):
    import torch

    g = torch.Generator().manual_seed(0)
    z = [torch.randn(n, d, generator=g).to(device) for _ in range(2)]
    perm = torch.randperm(n, generator=g).to(device)
    lam = torch.distributions.Beta(0.15, 0.15).sample((n,)).to(device)
    labels = torch.randint(0, classes, (n,), generator=g).to(device)
    return dict(z=z, perm=perm, lam=lam, labels=labels)


def _m3co_pair_previous(mixed_a, clean_b, perm, lam, *, temperature):
    """``m3co_pair`` as it was before it computed through the partners path (same checks)."""
    from m3co_loss import backends
    from m3co_loss._batch import _batch_layout, _check_common, _check_pair, _no_autocast, _prepare, _reduce
    from m3co_loss._validation import check_lam, check_perm

    t = _check_common(temperature, "mean", "paper")
    mixed_a, clean_b = _check_pair("mixed_a", mixed_a, "clean_b", clean_b)
    n = mixed_a.shape[0]
    perm = check_perm("perm", perm, n, mixed_a.device)
    lam = check_lam("lam", lam, n, mixed_a.device)
    layout = _batch_layout([mixed_a, clean_b], False, "mixed_a")
    with _no_autocast(mixed_a.device):
        a, b = _prepare([mixed_a, clean_b], layout)
        v = backends.m3co_vector(a, b, perm, lam.to(a.local.dtype), t, backend="tiled")
        return _reduce(v, "mean", layout)


def _loss(impl: str, inp):
    """``f(z_a, z_b) -> scalar`` of one implementation."""
    import torch

    from m3co_loss import functional as F

    t, perm, lam, labels = TEMPERATURE, inp["perm"], inp["lam"], inp["labels"]
    n = perm.shape[0]
    if impl == "partners":
        partners = torch.stack([torch.arange(n, device=perm.device), perm], 1)
        weights = torch.stack([lam, 1 - lam], 1)
        return lambda a, b: F.contrastive_loss(a, b, partners=partners, weights=weights, temperature=t, backend="tiled")
    if impl == "partners8":
        g = torch.Generator().manual_seed(1)
        partners = torch.stack([torch.arange(n)] + [torch.randperm(n, generator=g) for _ in range(7)], 1).to(perm.device)
        logits = torch.randn(n, 8, generator=g).to(perm.device).requires_grad_(True)
        return lambda a, b: F.contrastive_loss(a, b, partners=partners, weights=logits.softmax(1), temperature=t, backend="tiled")
    if impl == "m3co_pair":
        return lambda a, b: F.m3co_pair(a, b, perm, lam, temperature=t, backend="tiled")
    if impl == "m3co_pair_previous":
        return lambda a, b: _m3co_pair_previous(a, b, perm, lam, temperature=t)
    if impl in ("labels", "labels_dense"):
        backend = "dense" if impl == "labels_dense" else "tiled"
        return lambda a, b: F.contrastive_loss(a, b, labels=labels, temperature=t, backend=backend)
    if impl == "clip":
        return lambda a, b: F.clip_loss(a, b, temperature=t, backend="tiled")
    if impl == "pml":
        from pytorch_metric_learning.losses import NTXentLoss

        loss = NTXentLoss(temperature=t)
        ref = labels.clone()  # a distinct tensor: pml drops the diagonal pairs when given the same object
        return lambda a, b: loss(a, labels, ref_emb=b, ref_labels=ref) + loss(b, labels, ref_emb=a, ref_labels=ref)
    raise KeyError(impl)


def _step(impl: str, inp):
    import torch

    f = _loss(impl, inp)

    def step():
        leaves = [x.detach().clone().requires_grad_(True) for x in inp["z"]]
        f(*leaves).backward()
        if leaves[0].device.type == "cuda":
            torch.cuda.synchronize()

    return step


def worker(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    impls, n, d = args.impl, args.n[0], args.d[0]
    if args.mode == "paired":
        inp = _inputs(n, d, args.classes, device)
        steps = {impl: _step(impl, inp) for impl in impls}
        for impl in impls:  # warm-up at full size: every buffer and code path touched once
            steps[impl]()
        times = {impl: [] for impl in impls}
        for round_ in range(args.repeats):
            for impl in impls if round_ % 2 == 0 else impls[::-1]:
                start = time.perf_counter()
                steps[impl]()
                times[impl].append(time.perf_counter() - start)
        return dict(paired_times_s=times)
    (impl,) = impls
    # thread pools and library buffers are not the loss's memory; pml's warm-up stays below its
    # smallest measured N, whose peak it would otherwise already hold
    _step(impl, _inputs(16 if impl == "pml" else 64, d, args.classes, device))()
    inp = _inputs(n, d, args.classes, device)
    step = _step(impl, inp)
    base = common.memory_baseline(device)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return dict(times_s=times, median_s=statistics.median(times), extra_peak_bytes=common.extra_peak_bytes(device, base))


# ----------------------------------------------------------------------------- driver


def _run(args, mode: str, impls, n: int, d: int, repeats: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--mode", mode, "--impl", *impls, "--n", str(n), "--d", str(d),
           "--repeats", str(repeats), "--threads", str(args.threads), "--device", args.device, "--classes", str(args.classes)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(bk.ROOT), os.environ.get("PYTHONPATH", "")]))
    load_before = os.getloadavg()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return dict(status="timeout", reason=f"over {args.timeout} s", load_before=load_before, load_after=os.getloadavg())
    out = dict(load_before=load_before, load_after=os.getloadavg(), uptime=common.uptime())
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return dict(out, status="error", reason=" | ".join(tail) or f"exit code {proc.returncode}")
    return dict(out, status="ok", **json.loads(lines[-1]))


def _meta(args) -> dict:
    meta = bk.machine_meta(threads=args.threads, device=args.device, dtype="float32", repeats=args.repeats)
    meta.update(temperature=TEMPERATURE, classes=args.classes)
    return meta


def drive_paired(args) -> None:
    path = Path(args.out_dir) / f"{args.tag}_paired.json"
    data = common.load_results(path)
    data["meta"] = dict(_meta(args), mode="paired", rounds=args.rounds)
    done = {f"{r['n']}|{r['d']}": r for r in data["results"]}
    impls = [i for i in args.impl if i != "pml" and i != "labels_dense"]
    for n in args.n:
        for d in args.d:
            print(f"paired {'/'.join(impls)} N={n} D={d} ...", end=" ", flush=True)
            result = _run(args, "paired", impls, n, d, args.rounds)
            entry = dict(n=n, d=d, impls=impls, status=result["status"], load_before=result["load_before"],
                         load_after=result["load_after"], uptime=result.get("uptime", ""))
            if result["status"] != "ok":
                entry["reason"] = result["reason"]
                print(result["reason"], flush=True)
            else:
                times = result["paired_times_s"]
                entry["times_s"] = times
                entry["median_s"] = {i: statistics.median(times[i]) for i in impls}
                base = impls[0]
                entry["ratios"] = {other: [x / y for x, y in zip(times[base], times[other])] for other in impls[1:]}
                entry["ratio_quartiles"] = {other: common.quartiles(r) for other, r in entry["ratios"].items()}
                print("  ".join(f"{base}/{o} {q[1]:.3f}" for o, q in entry["ratio_quartiles"].items()), flush=True)
            done[f"{n}|{d}"] = entry
            data["results"] = list(done.values())
            common.save_json(path, data)
    report(args.out_dir, args.tag)


def _pml_estimate(args, d: int, targets) -> dict:
    """pytorch-metric-learning at small N, and a rough guess of its memory at ``targets``: a power law through the two largest."""
    measured = {}
    for n in PML_SIZES:
        result = _run(args, "memory", ["pml"], n, d, 1)
        if result["status"] != "ok":
            return dict(status=result["status"], reason=result["reason"], measured=measured)
        measured[n] = result["extra_peak_bytes"]
        print(f"pml N={n}: +{measured[n] / 2**20:.0f} MiB", flush=True)
    (n1, m1), (n2, m2) = sorted(measured.items())[-2:]
    exponent = math.log(m2 / m1) / math.log(n2 / n1)
    return dict(status="ok", measured={str(k): v for k, v in measured.items()}, exponent=exponent,
                estimate_bytes={str(n): m2 * (n / n2) ** exponent for n in targets})


def drive_memory(args) -> None:
    path = Path(args.out_dir) / f"{args.tag}_memory.json"
    data = common.load_results(path)
    data["meta"] = dict(_meta(args), mode="memory")
    done = {f"{r['impl']}|{r['n']}|{r['d']}": r for r in data["results"] if "impl" in r}
    for d in args.d:
        for n in args.n:
            for impl in args.impl:
                if impl == "pml":
                    continue
                print(f"memory {impl} N={n} D={d} ...", end=" ", flush=True)
                result = _run(args, "memory", [impl], n, d, args.repeats)
                entry = dict(impl=impl, n=n, d=d, **{k: v for k, v in result.items() if k != "times_s"}, times_s=result.get("times_s"))
                print(f"+{result['extra_peak_bytes'] / 2**20:.0f} MiB, {result['median_s']:.2f} s" if result["status"] == "ok" else result["reason"],
                      flush=True)
                done[f"{impl}|{n}|{d}"] = entry
                data["results"] = list(done.values())
                common.save_json(path, data)
        if "pml" in args.impl:
            data.setdefault("pml", {})[str(d)] = _pml_estimate(args, d, args.n)
            common.save_json(path, data)
    report(args.out_dir, args.tag)


# ----------------------------------------------------------------------------- report


def _mib(x) -> str:
    return f"{x / 2**20:,.0f}"


def _bytes(x: float) -> str:
    """``x`` bytes in the largest binary unit that keeps a number >= 1 (the extrapolations span petabytes)."""
    for unit in ("GiB", "TiB", "PiB", "EiB"):
        x /= 2**30 if unit == "GiB" else 2**10
        if x < 2**10 or unit == "EiB":
            return f"{x:,.0f} {unit}"


def _md(head, rows, right_from: int) -> list:
    align = ["---"] * right_from + ["---:"] * (len(head) - right_from)
    return ["| " + " | ".join(row) + " |" for row in [head, align] + rows]


def _rst(head, rows) -> list:
    out = [".. list-table::", "   :header-rows: 1", ""]
    for row in [head] + rows:
        out.append("   * - " + (row[0] or " "))
        out += [f"     - {cell or ' '}" for cell in row[1:]]
    return out


def _paired_tables(data: dict):
    """``(heading, head, rows)`` per measured (N, D); failed ones as a heading with no rows."""
    for r in data["results"]:
        if r["status"] != "ok":
            yield f"N = {r['n']}, D = {r['d']}: {r['status']} ({r.get('reason', '')})", None, []
            continue
        base = r["impls"][0]
        heading = (f"N = {r['n']}, D = {r['d']}, {len(r['times_s'][base])} rounds, 1-minute load average "
                   f"{r['load_before'][0]:.1f} before, {r['load_after'][0]:.1f} after")
        head = ["implementation", "median s", f"{base} / implementation"]
        rows = []
        for impl in r["impls"]:
            q = r["ratio_quartiles"].get(impl)
            rows.append([impl, f"{r['median_s'][impl]:.3f}", f"{q[1]:.3f} [{q[0]:.3f}, {q[2]:.3f}]" if q else ""])
        yield heading, head, rows


def _memory_rows(data: dict):
    head = ["implementation", "N", "D", "extra MiB", "/ (N D floats)", "load"]
    rows = []
    for r in sorted(data["results"], key=lambda r: (r["d"], IMPLS.index(r["impl"]), r["n"])):
        if r["status"] != "ok":
            rows.append([r["impl"], str(r["n"]), str(r["d"]), f"{r['status']}: {r.get('reason', '')}", "", ""])
            continue
        unit = r["n"] * r["d"] * 4
        rows.append([r["impl"], str(r["n"]), str(r["d"]), _mib(r["extra_peak_bytes"]), f"{r['extra_peak_bytes'] / unit:.1f}",
                     f"{r['load_before'][0]:.1f}"])
    notes = []
    for d, est in data.get("pml", {}).items():
        if est["status"] != "ok":
            notes.append(f"pytorch-metric-learning NTXentLoss (D = {d}): {est['status']} ({est.get('reason', '')}).")
            continue
        sizes = ", ".join(f"N = {n}: {_mib(b)} MiB" for n, b in est["measured"].items())
        guess = ", ".join(f"N = {n}: {_bytes(b)}" for n, b in est["estimate_bytes"].items())
        notes.append(f"pytorch-metric-learning NTXentLoss with labels and ``ref_emb`` (D = {d}): measured {sizes}. A rough "
                     f"extrapolation, a power law through the two largest of these small figures (exponent {est['exponent']:.2f}), "
                     f"not a measurement: {guess}; it says only that these sizes are far out of reach.")
    if not data.get("pml"):
        notes.append("pytorch-metric-learning was not measured (not installed, or not asked for with ``--impl pml``).")
    return head, rows, notes


def report(out_dir, tag: str) -> None:
    """``<tag>_paired.{md,rst}`` and ``<tag>_memory.{md,rst}`` from the stored JSON (the docs include the ``.rst``)."""
    out_dir = Path(out_dir)
    paired, memory = out_dir / f"{tag}_paired.json", out_dir / f"{tag}_memory.json"
    if paired.exists():
        data = common.load_results(paired)
        meta = data["meta"]
        intro = (f"Paired timings on {meta['processor']} ({meta['cpu_count']} cores), {meta['threads']} torch threads, torch "
                 f"{meta['torch']}, {meta['device']}, float32, t = {meta['temperature']}, labels over {meta['classes']} classes: "
                 "one process runs the implementations in rotation on the same inputs (one forward + backward pass each per "
                 "round, the order reversed every other round). Ratios are per round: median [first quartile, third quartile]; "
                 "times: median seconds per pass. Other jobs shared the machine.")
        md, rst = ["# Structured targets: paired timings", "", intro.replace("``", "`")], [intro]
        for heading, head, rows in _paired_tables(data):
            md += ["", f"## {heading}", ""] + (_md(head, rows, 1) if head else [])
            rst += ["", f"{heading}:", ""] + (_rst(head, rows) if head else [])
        common.write_text(paired.with_suffix(".md"), "\n".join(md) + "\n")
        common.write_text(paired.with_suffix(".rst"), "\n".join(rst) + "\n")
    if memory.exists():
        data = common.load_results(memory)
        meta = data["meta"]
        intro = (f"Extra peak memory on {meta['processor']} ({meta['cpu_count']} cores), {meta['threads']} torch threads, torch "
                 f"{meta['torch']}, {meta['device']}, float32, labels over {meta['classes']} classes: one fresh process per row "
                 "(a warm-up at a small N, the inputs, a baseline, then forward + backward passes); the peak resident memory "
                 "above the baseline in MiB, that figure in units of one (N, D) float32 tensor (O(N D) memory keeps it "
                 "constant as N grows), and the 1-minute load average at the start. The processes ran one after another "
                 "under a varying load, so their times are not compared here: the paired table has the times.")
        head, rows, notes = _memory_rows(data)
        md = ["# Structured targets: extra peak memory", "", intro.replace("``", "`"), ""] + _md(head, rows, 1)
        md += [x for note in notes for x in ("", note.replace("``", "`"))]
        rst = [intro, ""] + _rst(head, rows) + [x for note in notes for x in ("", note)]
        common.write_text(memory.with_suffix(".md"), "\n".join(md) + "\n")
        common.write_text(memory.with_suffix(".rst"), "\n".join(rst) + "\n")


# ----------------------------------------------------------------------------- CLI


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--paired", action="store_true", help="times: the implementations in rotation in one process per (N, D)")
    p.add_argument("--memory", action="store_true", help="extra peak memory: one fresh process per implementation and N")
    p.add_argument("--report", action="store_true", help="only rebuild the tables")
    p.add_argument("--n", type=int, nargs="+", default=None)
    p.add_argument("--d", type=int, nargs="+", default=[512])
    p.add_argument("--impl", nargs="+", default=None, help=f"from {', '.join(IMPLS)}; the first is the numerator of the paired ratios")
    p.add_argument("--classes", type=int, default=10, help="classes of the labels")
    p.add_argument("--rounds", type=int, default=7, help="paired rounds")
    p.add_argument("--repeats", type=int, default=2, help="passes per memory process")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per process")
    p.add_argument("--out-dir", default=str(HERE / "results"))
    p.add_argument("--tag", default=None, help="results file stem (default: targets_<device>)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="paired", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.tag = args.tag or f"targets_{args.device}"
    if args.worker:
        return args
    unknown = [i for i in (args.impl or []) if i not in IMPLS]
    if unknown:
        p.error(f"--impl: unknown {', '.join(unknown)}; choose from {', '.join(IMPLS)}")
    if min(args.rounds, args.repeats, args.threads, args.classes) < 1:
        p.error("--rounds, --repeats, --threads and --classes must be >= 1")
    return args


def main(argv=None) -> None:
    args = _parse(argv)
    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return
    if args.report or not (args.paired or args.memory):
        report(args.out_dir, args.tag)
        return
    impls, sizes = args.impl, args.n
    if args.paired:
        args.impl, args.n = impls or list(PAIRED_DEFAULT), sizes or [8192]
        drive_paired(args)
    if args.memory:
        args.impl, args.n = impls or list(MEMORY_DEFAULT), sizes or [4096, 8192]
        drive_memory(args)


if __name__ == "__main__":
    main()
