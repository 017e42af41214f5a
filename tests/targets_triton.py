"""Run by tests/core/test_targets.py in a subprocess with TRITON_INTERPRET=1 (set before triton is imported).

A hypothesis property: for random structured targets (partners with random K and repeats,
uniform partners, labels with a one-member class, identity), temperatures and batch sizes that
are no multiple of the 16-wide blocks, ``backend="triton"`` (Triton's CPU interpreter) agrees
with the dense and the tiled backends in value and gradient, in float32; the temperature is a
float or a 0-dim tensor that requires grad (its gradient compared too). Prints one JSON object:
the number of examples and the largest relative error.
"""

from __future__ import annotations

import json
import os

# M3CO_TEST_DEVICE=cuda runs the same checks compiled on a GPU (tests/backends/test_cuda.py)
DEVICE = os.environ.get("M3CO_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from m3co_loss import backends  # noqa: E402
from m3co_loss import functional as F  # noqa: E402
from strategies import target_cases  # noqa: E402

backends.set_config(triton_block_m=16, triton_block_n=16, triton_block_d=16, tile_rows=5, tile_cols=7, precision="ieee")
REPORT = {"examples": 0, "max_error": 0.0}


def value_and_grads(case, t, tensor_t, convention, backend):
    leaves = [x.float().to(DEVICE).requires_grad_(True) for x in (case.z_a, case.z_b)]
    if tensor_t:
        leaves.append(torch.tensor(t, device=DEVICE, requires_grad=True))
    kw = {k: (v.float() if k == "weights" else v) for k, v in case.kwargs().items() if v is not None}
    kw = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    temperature = leaves[2] if tensor_t else t
    v = F.contrastive_loss(*leaves[:2], **kw, temperature=temperature, convention=convention, reduction="none", backend=backend)
    upstream = torch.linspace(0.5, 1.5, v.shape[0], device=DEVICE)
    return [x.cpu() for x in (v.detach(), *torch.autograd.grad((v * upstream).sum(), leaves))]


@settings(max_examples=int(os.environ.get("M3CO_TRITON_EXAMPLES", "25")), deadline=None, derandomize=True, database=None)
@given(case=target_cases(min_n=17, max_n=37, max_d=20, dtype=torch.float32), t=st.sampled_from([0.02, 0.1, 0.5]),
       tensor_t=st.booleans(), convention=st.sampled_from(["paper", "reference"]))
def check(case, t, tensor_t, convention):
    dense, tiled, triton = (value_and_grads(case, t, tensor_t, convention, b) for b in ("dense", "tiled", "triton"))
    # Gradients of p_a . p_b / t are of size 1/t before the normalisation's projection, which
    # turns their rounding into an absolute error of that size over the row norm (tests/backends/test_kernels.py).
    smallest = max(1e-3, float(min(x.norm(dim=1).min() for x in (case.z_a, case.z_b))))
    error = 0.0
    for expected in (dense, tiled):
        for index, (x, y) in enumerate(zip(triton, expected)):
            scale = max(1.0, float(y.abs().max()), 0.0 if index in (0, 3) else 1.0 / t / smallest)  # 3: the temperature's
            error = max(error, float((x - y).abs().max()) / scale)
    REPORT["examples"] += 1
    REPORT["max_error"] = max(REPORT["max_error"], error)
    assert error < 2e-5, (case.form, tuple(case.z_a.shape), t, convention, error)


if __name__ == "__main__":
    check()
    print(json.dumps(REPORT))
