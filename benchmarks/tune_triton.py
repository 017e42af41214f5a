"""The Triton backend's block sizes and launch options swept at one point on a CUDA device.

For each configuration (``triton_block_m``, ``triton_block_n``, ``triton_block_d``,
``triton_num_warps``, ``triton_num_stages``) one forward + backward pass of each loss is timed
with CUDA events (median of ``--repeats`` after a warm-up that compiles the kernels), its value
checked against the default configuration's (a configuration whose value differs by more than
``TOLERANCE`` is marked and ranks after the matching ones), beside the bare products of the floor
in the input dtype (``bench_kernels.py``'s ``floor``, timed once before the sweep). A configuration that fails to compile or launch (shared
memory, registers) is recorded with its error. Writes ``<out-dir>/tune_triton_<dtype>.json``,
``.md`` and ``.rst`` (fastest first) after every configuration.

Example (the figures on the Benchmarks page)::

    python benchmarks/tune_triton.py --n 32768 --d 768 --dtype bfloat16 --precision bf16
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path

from common import save_json, write_text

LOSSES = ("m3co_pair", "multisoftclip_pair")
# Largest relative difference of a configuration's loss value from the default configuration's
# (the same inputs; only the order of the sums changes): a configuration above it computes
# something else, is marked "value differs" and ranks after every matching one.
TOLERANCE = {"bfloat16": 1e-3, "float16": 1e-3, "float32": 1e-4}


def timed(step, repeats: int) -> list:
    import torch

    step()  # compile and warm up
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def _triton_version() -> str:
    import triton

    return triton.__version__


def tolerance(meta: dict) -> float:
    return meta.get("tolerance", TOLERANCE[meta["dtype"]])


def differs(row: dict, losses, tol: float) -> bool:
    """Whether a configuration's value of some loss is off the default configuration's by more than ``tol``."""
    return any(row[loss].get("relative_difference", 0.0) > tol for loss in losses if "median_s" in row[loss])


def report(data: dict) -> str:
    """The Markdown table of a result file, fastest configuration first among those whose values match the default's."""
    meta, floor, losses = data["meta"], data["floor_s"], data["meta"].get("losses") or list(data["floor_s"])
    tol = tolerance(meta)

    def order(row):  # the matching configurations by time, then those whose value differs, then those that failed
        failed = any("median_s" not in row[loss] for loss in losses)
        return failed, differs(row, losses, tol), sum(row[loss].get("median_s", float("inf")) for loss in losses)

    lines = [f"# Triton blocks at N = {meta['n']}, D = {meta['d']}, {meta['dtype']} (precision {meta['precision']}), {meta['gpu']}", "",
             "Forward + backward, median of {} CUDA-event timings, torch {}{}; floor: the bare products in {}, timed once before"
             " the sweep (not alternated with the configurations): {}. Value: relative difference of each loss from the default"
             " configuration's on the same inputs; above {:g} the configuration is marked \"value differs\" and listed after"
             " those that match, whatever its time.".format(
                 meta["repeats"], meta["torch"], f", Triton {meta['triton']}" if meta.get("triton") else "", meta["dtype"],
                 ", ".join(f"{loss} {1e3 * floor[loss]:.2f} ms" for loss in losses), tol), "",
             "| BM | BN | BD | warps | stages | " + " | ".join(f"{loss} ms | / floor | value vs default" for loss in losses) + " |",
             "| ---: | ---: | ---: | ---: | ---: | " + " | ".join("---: | ---: | ---:" for _ in losses) + " |"]
    for row in sorted(data["results"], key=order):
        cells = []
        for loss in losses:
            r = row[loss]
            if "median_s" not in r:
                cells += [r["error"][:60], "", ""]
                continue
            diff = r.get("relative_difference")
            value = "?" if diff is None else "0" if diff == 0 else f"{diff:.1e}"
            if diff is not None and diff > tol:
                value += " value differs"
            cells += [f"{1e3 * r['median_s']:.1f}", f"{r['over_floor']:.0f}", value]
        mark = " (default)" if row["default"] else ""
        lines.append(f"| {row['block_m']}{mark} | {row['block_n']} | {row['block_d']} | {row['num_warps']} | {row['num_stages']} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def report_rst(data: dict) -> str:
    """The same table as a reStructuredText list-table (docs/benchmarks.rst includes it)."""
    md = report(data).splitlines()
    caption = md[0].lstrip("# ")
    head, *rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in md[4:] if not set(line) <= set("|-: ")]
    lines = [f".. list-table:: {caption}", "   :header-rows: 1", ""]
    for row in [head, *rows]:
        lines.append(f"   * - {row[0]}")
        lines += [f"     - {cell}" for cell in row[1:]]
    return "\n".join(lines) + "\n\n" + md[2] + "\n"


def write_reports(json_path: Path, data: dict) -> None:
    write_text(json_path.with_suffix(".md"), report(data))
    write_text(json_path.with_suffix(".rst"), report_rst(data))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=32768)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--precision", default="auto", choices=("auto", "ieee", "tf32", "bf16", "fp16"))
    p.add_argument("--loss", nargs="+", default=list(LOSSES), choices=LOSSES)
    p.add_argument("--block-m", type=int, nargs="+", default=[64, 128])
    p.add_argument("--block-n", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--block-d", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    p.add_argument("--stages", type=int, nargs="+", default=[3])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--report", type=Path, metavar="JSON", help="only write (and print) the tables of a result file written before")
    args = p.parse_args(argv)
    if args.report:
        data = json.loads(args.report.read_text())
        write_reports(args.report, data)
        print(report(data), end="")
        return 0

    import torch

    from bench_kernels import floor_products
    from m3co_loss import backends
    from m3co_loss import functional as F

    if not torch.cuda.is_available():
        raise SystemExit("tune_triton.py needs a CUDA device")
    dtype = getattr(torch, args.dtype)
    g = torch.Generator(device="cuda").manual_seed(0)
    a, b = (torch.randn(args.n, args.d, device="cuda", generator=g, dtype=dtype) for _ in range(2))
    perm = torch.randperm(args.n, device="cuda", generator=g)
    lam = torch.rand(args.n, device="cuda", generator=g)

    def step(loss):
        def run():
            x, y = a.detach().requires_grad_(), b.detach().requires_grad_()
            value = (F.m3co_pair(x, y, perm, lam, backend="triton") if loss == "m3co_pair"
                     else F.multisoftclip_pair(x, y, backend="triton"))
            value.backward()
            return float(value.detach())
        return run

    floor = {loss: statistics.median(timed(floor_products(loss, dict(z=[a, b]), 8192), args.repeats)) for loss in args.loss}
    default = backends.get_config()
    with backends.config(precision=args.precision):
        reference = {loss: step(loss)() for loss in args.loss}
    rows = []
    for bm, bn, bd, warps, stages in itertools.product(args.block_m, args.block_n, args.block_d, args.warps, args.stages):
        row = dict(block_m=bm, block_n=bn, block_d=bd, num_warps=warps, num_stages=stages,
                   default=(bm, bn, bd, warps, stages) == (default.triton_block_m, default.triton_block_n, default.triton_block_d,
                                                           default.triton_num_warps, default.triton_num_stages))
        with backends.config(triton_block_m=bm, triton_block_n=bn, triton_block_d=bd, triton_num_warps=warps,
                             triton_num_stages=stages, precision=args.precision):
            for loss in args.loss:
                try:
                    value = step(loss)()
                    times = timed(step(loss), args.repeats)
                except Exception as error:  # noqa: BLE001 - a configuration the compiler refuses is a result
                    row[loss] = dict(error=f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}")
                    continue
                median = statistics.median(times)
                row[loss] = dict(median_s=median, times_s=times, over_floor=median / floor[loss],
                                 relative_difference=abs(value - reference[loss]) / max(abs(reference[loss]), 1e-30))
        rows.append(row)
        print(row, flush=True)
        data = dict(meta=dict(n=args.n, d=args.d, dtype=args.dtype, precision=args.precision, gpu=torch.cuda.get_device_name(),
                              torch=torch.__version__, triton=_triton_version(), repeats=args.repeats, losses=list(args.loss),
                              tolerance=TOLERANCE[args.dtype]),
                    floor_s=floor, results=rows)
        stem = args.out_dir / f"tune_triton_{args.dtype}"
        save_json(stem.with_suffix(".json"), data)  # after every configuration: a run cut short keeps what it measured
        write_reports(stem.with_suffix(".json"), data)
    print(report(data))

    return 0


if __name__ == "__main__":
    raise SystemExit(main())
