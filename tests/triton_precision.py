"""The Triton backend at each product precision (``backends.config(precision=...)``) against the
float64 dense reference, on unit-norm float32 rows at t = 0.1, in value and gradient.

Run by tests/test_triton.py: in a subprocess with TRITON_INTERPRET=1 (set before triton is
imported) for ``ieee`` and ``tf32`` (the interpreter computes both in float32, and its bfloat16
products are wrong, so ``bf16`` and ``fp16``, whose weighted sums use bfloat16, are not run
there), and in-process on CUDA for all four. Prints one JSON object:
{precision: {loss: largest error relative to the largest magnitude}}.
"""

from __future__ import annotations

import json
import os

import torch  # noqa: E402

from m3co_loss import backends  # noqa: E402
from m3co_loss import functional as F  # noqa: E402

TOLERANCES = {"ieee": 1e-5, "tf32": 5e-3, "fp16": 2e-2, "bf16": 3e-2}


def errors(fn, z, w):
    reference = [x.double().requires_grad_() for x in z]
    want = fn(*reference, backend="dense")
    want_grads = torch.autograd.grad((want * w.double()).sum(), reference)
    leaves = [x.clone().requires_grad_() for x in z]
    got = fn(*leaves, backend="triton")
    got_grads = torch.autograd.grad((got * w).sum(), leaves)
    pairs = zip([got.detach(), *got_grads], [want.detach(), *want_grads])
    return max(float((x.double() - y).abs().max()) / float(y.abs().max()) for x, y in pairs)


def measure(device: str = "cpu", precisions=("ieee", "tf32"), n: int = 40, d: int = 64) -> dict:
    g = torch.Generator().manual_seed(0)
    z = [torch.randn(n, d, generator=g).to(device) for _ in range(2)]
    perm = torch.randperm(n, generator=g).to(device)
    lam = torch.rand(n, generator=g).to(device)
    w = torch.rand(n, generator=g).to(device)
    cases = {
        "m3co_pair": lambda a, b, backend: F.m3co_pair(a, b, perm, lam.to(a.dtype), backend=backend, reduction="none"),
        "clip_loss": lambda a, b, backend: F.clip_loss(a, b, backend=backend, reduction="none"),
        "multisoftclip_pair": lambda a, b, backend: F.multisoftclip_pair(a, b, backend=backend, reduction="none"),
    }
    results = {}
    for precision in precisions:
        with backends.config(precision=precision):
            results[precision] = {name: errors(fn, z, w) for name, fn in cases.items()}
    return results


def main() -> None:
    os.environ["TRITON_INTERPRET"] = "1"
    with backends.config(triton_block_m=16, triton_block_n=16, triton_block_d=16):
        print(json.dumps(measure()))


if __name__ == "__main__":
    main()
