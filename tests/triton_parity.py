"""Run by tests/backends/test_triton.py in a subprocess with TRITON_INTERPRET=1 (set before triton is imported).

Compares backend="triton" (Triton's CPU interpreter) with the dense reference on small float32
batches, in value and gradient (a tensor temperature's included), with blocks of 16 so that every kernel loops over several
ragged blocks. Prints one JSON object: {case: largest relative error}.
"""

from __future__ import annotations

import json
import os

# M3CO_TEST_DEVICE=cuda runs the same checks compiled on a GPU (tests/backends/test_cuda.py)
DEVICE = os.environ.get("M3CO_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from m3co_loss import backends  # noqa: E402
from m3co_loss import functional as F  # noqa: E402
from m3co_loss.backends import Rows, tiled  # noqa: E402

backends.set_config(triton_block_m=16, triton_block_n=16, triton_block_d=16, precision="ieee")


def relative_errors(fn, inputs, weights):
    out = []
    for backend in ("dense", "triton"):
        leaves = [x.clone().requires_grad_(True) for x in inputs]
        v = fn(*leaves, backend=backend)
        out.append([v.detach(), *torch.autograd.grad((v * weights).sum(), leaves)])
    return max(float((x - y).abs().max()) / max(1.0, float(y.abs().max())) for x, y in zip(*out))


def main() -> None:
    g = torch.Generator().manual_seed(0)
    n, d = 19, 18
    z = [torch.randn(n, d, generator=g) for _ in range(2)]
    perm = torch.arange(n)
    perm[3:] = 3 + torch.randperm(n - 3, generator=g)  # fixed points at 0, 1, 2
    lam = torch.rand(n, generator=g)
    lam[:2] = torch.tensor([0.0, 1.0])
    w = torch.rand(n, generator=g)
    z, perm, lam, w = [x.to(DEVICE) for x in z], perm.to(DEVICE), lam.to(DEVICE), w.to(DEVICE)
    errors = {}
    for t in (0.1, 0.02):
        cases = {
            "m3co_pair": lambda a, b, backend: F.m3co_pair(a, b, perm, lam, temperature=t, backend=backend, reduction="none"),
            "clip_loss": lambda a, b, backend: F.clip_loss(a, b, temperature=t, backend=backend, reduction="none"),
            "multisoftclip_pair": lambda a, b, backend: F.multisoftclip_pair(a, b, temperature=t, backend=backend, reduction="none"),
            "multisoftclip_reference": lambda a, b, backend: F.multisoftclip(
                [a, b], temperature=t, backend=backend, reduction="none", convention="reference"),
            "multisoftclip": lambda a, b, backend: F.multisoftclip([a, b], temperature=t, backend=backend, reduction="none"),
        }
        for name, fn in cases.items():
            errors[f"{name} t={t}"] = relative_errors(fn, z, w)
    # a temperature tensor that requires grad (its gradient compared too), and a separate target temperature
    for t0 in (0.1, 0.02):
        t = torch.tensor(t0, device=DEVICE)
        tensor_cases = {
            "m3co_pair": lambda a, b, t, backend: F.m3co_pair(a, b, perm, lam, temperature=t, backend=backend, reduction="none"),
            "clip_loss": lambda a, b, t, backend: F.clip_loss(a, b, temperature=t, backend=backend, reduction="none"),
            "multisoftclip_pair[target t]": lambda a, b, t, backend: F.multisoftclip_pair(
                a, b, temperature=t, target_temperature=1.5 * t, backend=backend, reduction="none"),
            "multisoftclip_reference[detached]": lambda a, b, t, backend: F.multisoftclip(
                [a, b], temperature=t, detach_targets=True, backend=backend, reduction="none", convention="reference"),
        }
        for name, fn in tensor_cases.items():
            errors[f"{name} tensor t={t0}"] = relative_errors(fn, [*z, t], w)
    # local rows != gathered rows (the shape of a distributed call): rows 5..11 of the batch
    a_full, b_full = (F.normalize(x) for x in z)
    lo, hi = 5, 12
    r_full = tiled.LogSumExp.apply(a_full, b_full, 0.1, False)[0]
    for backend in ("tiled", "triton"):
        v = backends.multisoftclip_vector(Rows(a_full[lo:hi], a_full, lo), Rows(b_full[lo:hi], b_full, lo), 0.1, reference=False, distributed=True,
                                          gather=lambda r: torch.cat([r_full[:lo], r, r_full[hi:]]), backend=backend)
        errors.setdefault("distributed_shape", []).append(v)
    by_tiled, by_triton = errors.pop("distributed_shape")
    errors["distributed_shape multisoftclip_vector"] = float((by_tiled - by_triton).abs().max())
    errors["float64_runs_tiled"] = float(
        (F.clip_loss(z[0].double(), z[1].double(), backend="triton") - F.clip_loss(z[0].double(), z[1].double(), backend="dense")).abs())
    print(json.dumps(errors))


if __name__ == "__main__":
    main()
