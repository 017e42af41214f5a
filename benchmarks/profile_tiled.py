"""Where the tiled backend's time goes at one point, beside the bare matrix products it needs.

One process, ``torch.profiler`` over one forward + backward pass of ``m3co_pair`` (tiled), then
rounds that alternate that pass with the products of the floor (``S = A B^T``, ``dS B``,
``dS^T A`` in strips of 1024 rows, as ``bench_kernels.py`` times them). The tiled algorithm
recomputes ``S`` in its backward pass, so four products against the floor's three: its bound is
4/3 of the floor. Writes ``<out-dir>/<tag>.json`` and ``<tag>.md``: the per-round ratios and the
operators that took the most time.

Example (the figures in the docs)::

    python benchmarks/profile_tiled.py --n 8192 --d 512 --threads 2 --rounds 7
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from common import cpu_name, quartiles, save_json, write_text
from m3co_loss import functional as F

HERE = Path(__file__).resolve().parent


def measure(n: int, d: int, rounds: int, strip: int = 1024) -> dict:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, d, generator=gen, requires_grad=True)
    b = torch.randn(n, d, generator=gen, requires_grad=True)
    perm, lam = torch.randperm(n, generator=gen), torch.rand(n, generator=gen)

    def tiled() -> None:
        F.m3co_pair(a, b, perm, lam, backend="tiled").backward()

    pa, pb = torch.nn.functional.normalize(a.detach()), torch.nn.functional.normalize(b.detach())
    s, da, db = torch.empty(strip, n), torch.empty(strip, d), torch.zeros(n, d)

    def floor() -> None:
        for i in range(0, n, strip):
            rows = pa[i : i + strip]
            torch.mm(rows, pb.T, out=s[: len(rows)])
            torch.mm(s[: len(rows)], pb, out=da[: len(rows)])
            db.addmm_(s[: len(rows)].T, rows)

    tiled(), floor()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        tiled()
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ops)
    top = [dict(name=e.key, self_s=e.self_cpu_time_total / 1e6, calls=e.count) for e in ops[:12]]
    times: dict = {"tiled": [], "floor": []}
    for r in range(rounds):
        for name, fn in ((("tiled", tiled), ("floor", floor)) if r % 2 == 0 else (("floor", floor), ("tiled", tiled))):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    ratios = [t / f for t, f in zip(times["tiled"], times["floor"])]
    return dict(n=n, d=d, rounds=rounds, times_s=times, ratios=ratios, ratio_quartiles=quartiles(ratios),
                profile_total_s=total / 1e6, top_ops=top)


def report(data: dict) -> str:
    r = data["result"]
    q = r["ratio_quartiles"]
    lines = [
        f"`m3co_pair`, tiled backend, forward + backward, float32, N = {r['n']}, D = {r['d']}, {data['meta']['threads']} thread(s), "
        f"{data['meta']['processor']}, torch {data['meta']['torch']}; load {data['meta']['load_after'][0]:.1f} after the rounds.",
        "",
        f"tiled / floor over {r['rounds']} alternating rounds: {q[1]:.2f} [{q[0]:.2f}, {q[2]:.2f}] (median [quartiles]); "
        f"medians {statistics.median(r['times_s']['tiled']):.3f} s tiled, {statistics.median(r['times_s']['floor']):.3f} s floor; "
        "the algorithm's bound is 4/3 of the floor (S is recomputed in the backward pass).",
        "",
        f"Operators of one profiled pass ({r['profile_total_s']:.3f} s of self time):",
        "",
        "| operator | self s | share | calls |",
        "| --- | ---: | ---: | ---: |",
    ]
    for op in r["top_ops"]:
        lines.append(f"| `{op['name']}` | {op['self_s']:.3f} | {op['self_s'] / r['profile_total_s']:.1%} | {op['calls']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out-dir", type=Path, default=HERE / "results")
    p.add_argument("--tag", default="profile_tiled_cpu")
    args = p.parse_args(argv)
    if min(args.n, args.d, args.threads, args.rounds) < 1:
        p.error("--n, --d, --threads and --rounds must be at least 1")
    torch.set_num_threads(args.threads)
    import os

    result = measure(args.n, args.d, args.rounds)
    meta = dict(threads=args.threads, processor=cpu_name(), torch=torch.__version__, load_after=os.getloadavg())
    data = dict(meta=meta, result=result)
    save_json(args.out_dir / f"{args.tag}.json", data)
    write_text(args.out_dir / f"{args.tag}.md", report(data))
    print(report(data))


if __name__ == "__main__":
    main()
