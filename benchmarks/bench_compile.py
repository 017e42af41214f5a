"""The losses eager and under ``torch.compile`` (inductor), side by side in one process.

For each loss and N, one process builds the inputs once and runs three implementations in
rotation, one forward+backward pass each per round (the order reversed every other round), so
that every ratio is taken between passes seconds apart on a machine whose speed drifts:

* ``eager-checks``: the loss on ``--backend`` (dense by default) as a user gets it (value checks on);
* ``eager``: the same with value checks off;
* ``compiled``: ``torch.compile`` of the same call (default backend, inductor), value checks off,
  so that the loss is one graph (with checks on, each check is a graph break); on the tiled
  backend the kernels are custom operators inside that graph.

It records the first compiled call's seconds (tracing and code generation), the per-round
ratios ``compiled / eager`` and ``compiled / eager-checks`` with their quartiles, and the largest
difference of the compiled loss and gradients from eager (inductor fuses and reorders sums).
Results go to ``<out-dir>/<tag>.json`` (rewritten atomically after every figure) and
``<tag>.md``.

Example::

    python benchmarks/bench_compile.py --n 256 1024 2048 --d 256 --rounds 9
    python benchmarks/bench_compile.py --backend tiled --loss clip_loss m3co_pair multisoftclip_pair --n 4096 --tag compile_cpu_tiled
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

import m3co_loss
from common import quartiles, save_json, write_text
from m3co_loss import MixupSampler
from m3co_loss import functional as F

HERE = Path(__file__).resolve().parent
LOSSES = ("m3co_pair", "m3co", "multisoftclip_pair", "multisoftclip", "clip_loss")
IMPLS = ("eager-checks", "eager", "compiled")


def loss_function(loss: str, n: int, generator: torch.Generator, backend: str = "dense"):
    """(number of modalities, function of the embeddings) for ``loss`` on ``backend``; M3Co's
    mixing plan is drawn once, outside the timed passes."""
    modalities = 3 if loss in ("m3co", "multisoftclip") else 2
    plan = MixupSampler(generator=generator).sample(n, modalities)

    def mixed(z):
        return [plan.mix(x, m) for m, x in enumerate(z)]

    functions = {
        "m3co_pair": lambda z: F.m3co_pair(mixed(z)[0], z[1], plan.perms[0], plan.lam[0], backend=backend),
        "m3co": lambda z: F.m3co(mixed(z), z, plan.perms, plan.lam, backend=backend),
        "multisoftclip_pair": lambda z: F.multisoftclip_pair(z[0], z[1], backend=backend),
        "multisoftclip": lambda z: F.multisoftclip(z, backend=backend),
        "clip_loss": lambda z: F.clip_loss(z[0], z[1], backend=backend),
    }
    return modalities, functions[loss]


def measure(loss: str, n: int, d: int, rounds: int, backend: str = "dense") -> dict:
    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(0)
    modalities, fn = loss_function(loss, n, generator, backend)
    z = [torch.randn(n, d, generator=generator).requires_grad_() for _ in range(modalities)]
    compiled = torch.compile(fn, dynamic=False)

    def run(impl: str):
        with m3co_loss.value_checks(impl == "eager-checks"):
            value = (compiled if impl == "compiled" else fn)(z)
            grads = torch.autograd.grad(value, z)
        return value.detach(), grads

    start = time.perf_counter()
    got = run("compiled")
    compile_seconds = time.perf_counter() - start
    expected = run("eager")
    difference = max(
        [float((got[0] - expected[0]).abs())] + [float((g - e).abs().max()) for g, e in zip(got[1], expected[1])]
    )
    for impl in IMPLS:  # warm-up: every code path and buffer touched once at full size
        run(impl)
    times = {impl: [] for impl in IMPLS}
    for r in range(rounds):
        for impl in IMPLS if r % 2 == 0 else IMPLS[::-1]:
            start = time.perf_counter()
            run(impl)
            times[impl].append(time.perf_counter() - start)
    ratios = {
        other: [c / o for c, o in zip(times["compiled"], times[other])] for other in ("eager", "eager-checks")
    }
    return dict(
        loss=loss,
        n=n,
        d=d,
        compile_seconds=compile_seconds,
        max_abs_difference=difference,
        times_s=times,
        median_s={impl: statistics.median(t) for impl, t in times.items()},
        ratios=ratios,
        ratio_quartiles={other: quartiles(r) for other, r in ratios.items()},
    )


def report(data: dict) -> str:
    meta = data["meta"]
    backend = meta.get("backend", "dense")
    lines = [
        f"{'Dense' if backend == 'dense' else 'Tiled-backend'} losses, forward + backward, float32, {meta['threads']} CPU thread(s), torch {meta['torch']}; "
        f"{meta['rounds']} rounds, the three implementations alternating in each. Times: medians (ms). "
        "Ratios: median [quartiles] of the per-round ratios. `compile s`: the first compiled call (tracing and code generation). "
        "`max diff`: the largest difference of the compiled loss and gradients from eager.",
        "",
        "| loss | N | D | eager-checks ms | eager ms | compiled ms | compiled/eager | compiled/eager-checks | compile s | max diff |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in data["results"]:
        med = r["median_s"]
        q = {k: "{1:.2f} [{0:.2f}, {2:.2f}]".format(*v) for k, v in r["ratio_quartiles"].items()}
        lines.append(
            f"| {r['loss']} | {r['n']} | {r['d']} | {1e3 * med['eager-checks']:.1f} | {1e3 * med['eager']:.1f} | "
            f"{1e3 * med['compiled']:.1f} | {q['eager']} | {q['eager-checks']} | {r['compile_seconds']:.1f} | {r['max_abs_difference']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loss", nargs="+", default=list(LOSSES), choices=LOSSES)
    p.add_argument("--n", nargs="+", type=int, default=[256, 1024, 2048])
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--backend", default="dense", choices=("dense", "tiled"))
    p.add_argument("--out-dir", type=Path, default=HERE / "results")
    p.add_argument("--tag", default="compile_cpu")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.d < 1 or min(args.n) < 2 or args.threads < 1:
        p.error("--rounds, --d and --threads must be >= 1 and every --n >= 2")
    torch.set_num_threads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    meta = dict(torch=torch.__version__, threads=args.threads, rounds=args.rounds, machine=platform.processor() or platform.machine(), backend=args.backend)
    data = dict(meta=meta, results=[])
    for loss in args.loss:
        for n in args.n:
            print(f"{loss:18s} N={n:5d} D={args.d} ...", end=" ", flush=True)
            entry = measure(loss, n, args.d, args.rounds, args.backend)
            print("compiled/eager {1:.2f} [{0:.2f}, {2:.2f}]".format(*entry["ratio_quartiles"]["eager"]), flush=True)
            data["results"].append(entry)
            save_json(args.out_dir / f"{args.tag}.json", data)
            write_text(args.out_dir / f"{args.tag}.md", report(data))
    return data


if __name__ == "__main__":
    main()
