"""Run by tests/test_compile.py in a subprocess with TRITON_INTERPRET=1 (set before triton is imported).

Every loss on the Triton backend (Triton's CPU interpreter, float32) compiled with
``fullgraph=True`` and ``aot_eager``, value checks off, against eager mode; a temperature tensor
that requires grad included. Prints one JSON object: {case: [graph breaks, largest difference of
the loss and the gradients from eager mode]}.
"""

from __future__ import annotations

import json
import os

# M3CO_TEST_DEVICE=cuda runs the same checks compiled on a GPU (tests/backends/test_cuda.py)
DEVICE = os.environ.get("M3CO_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

import m3co_loss  # noqa: E402
from m3co_loss import M3CoLoss, backends  # noqa: E402
from m3co_loss import functional as F  # noqa: E402

backends.set_config(triton_block_m=16, triton_block_n=16, triton_block_d=16, precision="ieee")


def main() -> None:
    g = torch.Generator().manual_seed(0)
    n, d = 19, 18
    z = [torch.randn(n, d, generator=g).to(DEVICE).requires_grad_() for _ in range(3)]
    t = torch.tensor(0.07, device=DEVICE, requires_grad=True)
    plan = M3CoLoss(generator=torch.Generator().manual_seed(1)).sample(n, 3, device=DEVICE)

    def mixed(z):
        return [plan.mix(x, m) for m, x in enumerate(z)]

    cases = {
        "m3co": lambda z, t: F.m3co(mixed(z), z, plan.perms, plan.lam, backend="triton"),
        "m3co_pair[tensor t]": lambda z, t: F.m3co_pair(mixed(z)[0], z[1], plan.perms[0], plan.lam[0], temperature=t, backend="triton"),
        "multisoftclip": lambda z, t: F.multisoftclip(z, backend="triton"),
        "multisoftclip-reference[tensor t]": lambda z, t: F.multisoftclip(z, convention="reference", temperature=t, backend="triton"),
        "multisoftclip_pair[target t]": lambda z, t: F.multisoftclip_pair(z[0], z[1], temperature=t, target_temperature=2 * t, backend="triton"),
        "clip_loss[tensor t]": lambda z, t: F.clip_loss(z[0], z[1], temperature=t, backend="triton"),
    }
    results = {}
    with m3co_loss.value_checks(False):
        for name, fn in cases.items():
            torch._dynamo.reset()
            explained = torch._dynamo.explain(fn)(z, t)
            torch._dynamo.reset()
            leaves = [*z, t]
            expected = fn(z, t)
            expected_grads = torch.autograd.grad(expected, leaves, allow_unused=True, materialize_grads=True)
            got = torch.compile(fn, backend="aot_eager", fullgraph=True)(z, t)
            got_grads = torch.autograd.grad(got, leaves, allow_unused=True, materialize_grads=True)
            difference = max([float((got - expected).detach().abs())] + [float((x - y).abs().max()) for x, y in zip(got_grads, expected_grads)])
            results[name] = [explained.graph_break_count, difference]
    print(json.dumps(results))


if __name__ == "__main__":
    main()
