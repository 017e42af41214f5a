"""What a learnable temperature costs: a 0-dim tensor that requires grad against a float, side by side.

For each loss, one process builds the inputs once and runs two implementations of the same call
in rotation (the order reversed every other round), one forward+backward pass each per round:

* ``float``: ``temperature=t`` a Python float (the embeddings' gradients only);
* ``tensor``: ``temperature`` a 0-dim float32 tensor with ``requires_grad=True``, as a learnable
  temperature passes it; the pass also computes its gradient (in the tiled backend, from the
  identity ``t dL/dt = -<X, dL/dX>``: one dot product per operand, no extra pass over the tiles).

Both hold the same number (the float is the tensor's value), so the two losses must be equal bit
for bit on the CPU; the largest difference of values and embedding gradients is recorded. It
records the per-round ratios ``tensor / float`` with their quartiles. Results go to
``<out-dir>/<tag>.json`` (rewritten atomically after every figure) and ``<tag>.md``.

Example (the figures in the docs)::

    python benchmarks/bench_temperature.py --n 8192 --d 512 --threads 2 --rounds 7
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from common import quartiles, save_json, write_text
from m3co_loss import MixupSampler
from m3co_loss import functional as F

HERE = Path(__file__).resolve().parent
LOSSES = ("clip_loss", "m3co_pair", "multisoftclip_pair", "contrastive_loss[labels]")
IMPLS = ("float", "tensor")


def loss_function(loss: str, n: int, backend: str, generator: torch.Generator):
    """The loss as a function of ``(z_a, z_b, temperature)``; M3Co's plan and the labels (10 classes) are drawn once,
    outside the timed passes (``m3co_pair`` runs the partners path of ``contrastive_loss``)."""
    plan = MixupSampler(generator=generator).sample(n, 2)
    labels = torch.randint(0, 10, (n,), generator=generator)
    functions = {
        "clip_loss": lambda a, b, t: F.clip_loss(a, b, temperature=t, backend=backend),
        "m3co_pair": lambda a, b, t: F.m3co_pair(plan.mix(a, 0), b, plan.perms[0], plan.lam[0], temperature=t, backend=backend),
        "multisoftclip_pair": lambda a, b, t: F.multisoftclip_pair(a, b, temperature=t, backend=backend),
        "contrastive_loss[labels]": lambda a, b, t: F.contrastive_loss(a, b, labels=labels, temperature=t, backend=backend),
    }
    return functions[loss]


def measure(loss: str, n: int, d: int, temperature: float, backend: str, rounds: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    fn = loss_function(loss, n, backend, generator)
    z = [torch.randn(n, d, generator=generator).requires_grad_() for _ in range(2)]
    learned = torch.tensor(temperature, requires_grad=True)  # float32, as the embeddings
    fixed = float(learned.detach())  # the same number: the two calls compute the same loss

    def run(impl: str):
        if impl == "float":
            value = fn(*z, fixed)
            return value.detach(), torch.autograd.grad(value, z)
        value = fn(*z, learned)
        *grads, t_grad = torch.autograd.grad(value, [*z, learned])
        return value.detach(), grads, t_grad

    got, expected = run("tensor"), run("float")
    difference = max([float((got[0] - expected[0]).abs())] + [float((g - e).abs().max()) for g, e in zip(got[1], expected[1])])
    times = {impl: [] for impl in IMPLS}
    for r in range(rounds):
        for impl in IMPLS if r % 2 == 0 else IMPLS[::-1]:
            start = time.perf_counter()
            run(impl)
            times[impl].append(time.perf_counter() - start)
    ratios = [t / f for t, f in zip(times["tensor"], times["float"])]
    return dict(
        load=_load_average(),
        loss=loss,
        n=n,
        d=d,
        backend=backend,
        temperature=fixed,
        temperature_grad=float(got[2]),
        max_abs_difference=difference,
        times_s=times,
        median_s={impl: statistics.median(t) for impl, t in times.items()},
        ratios=ratios,
        ratio_quartiles=quartiles(ratios),
    )


def _load_average() -> float | None:
    """The 1-minute load average of the machine (None where the OS does not report it)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def report(data: dict) -> str:
    meta = data["meta"]
    lines = [
        f"Forward + backward, float32, {meta['threads']} CPU thread(s), torch {meta['torch']}; {meta['rounds']} rounds after one "
        "warm-up pass each, the two implementations alternating in each round. `float`: `temperature` a Python float; "
        "`tensor`: a 0-dim tensor with `requires_grad=True` (its gradient computed too). Times: medians (s). "
        "`tensor/float`: median [quartiles] of the per-round ratios. `max diff`: the largest difference of the loss and "
        "the embeddings' gradients between the two. `load`: the machine's 1-minute load average after the rounds "
        f"(it has {meta.get('cpus', '?')} logical CPUs).",
        "",
        "| loss | backend | N | D | t | float s | tensor s | tensor/float | max diff | load |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for r in data["results"]:
        med = r["median_s"]
        q = "{1:.3f} [{0:.3f}, {2:.3f}]".format(*r["ratio_quartiles"])
        lines.append(
            f"| {r['loss']} | {r['backend']} | {r['n']} | {r['d']} | {r['temperature']:.3g} | {med['float']:.3f} | {med['tensor']:.3f} | "
            f"{q} | {r['max_abs_difference']:.1e} | {'-' if r.get('load') is None else format(r['load'], '.1f')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loss", nargs="+", default=list(LOSSES), choices=LOSSES)
    p.add_argument("--n", nargs="+", type=int, default=[8192])
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--backend", default="tiled", choices=("dense", "tiled"))
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out-dir", type=Path, default=HERE / "results")
    p.add_argument("--tag", default="temperature_cpu")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.d < 1 or min(args.n) < 2 or args.threads < 1:
        p.error("--rounds, --d and --threads must be >= 1 and every --n >= 2")
    if not 0.01 <= args.temperature <= 1.0:
        p.error(f"--temperature must lie in [0.01, 1] (a learnable temperature's default range); got {args.temperature}")
    torch.set_num_threads(args.threads)
    meta = dict(
        torch=torch.__version__, threads=args.threads, rounds=args.rounds, cpus=os.cpu_count(), machine=platform.processor() or platform.machine()
    )
    data = dict(meta=meta, results=[])
    for loss in args.loss:
        for n in args.n:
            print(f"{loss:24s} N={n:5d} D={args.d} ...", end=" ", flush=True)
            entry = measure(loss, n, args.d, args.temperature, args.backend, args.rounds)
            print("tensor/float {1:.3f} [{0:.3f}, {2:.3f}]".format(*entry["ratio_quartiles"]), flush=True)
            data["results"].append(entry)
            save_json(args.out_dir / f"{args.tag}.json", data)
            write_text(args.out_dir / f"{args.tag}.md", report(data))
    return data


if __name__ == "__main__":
    main()
