"""The backends on a CUDA device: the Triton kernels compiled for the GPU (the same checks that
run under Triton's CPU interpreter elsewhere), the tiled torch backend, both under
``torch.compile``, and their memory, which must stay O(N·D) on the device too.

Every test here is marked ``cuda``: it skips without a device (``benchmarks/gpu_check.sh`` runs
them on a GPU machine).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from check_scripts import run_check_script
from m3co_loss import M3CoLoss, backends
from m3co_loss import functional as F


pytestmark = pytest.mark.cuda
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def run_on_cuda(script: str, **extra_env: str):
    """One of the interpreter check scripts, compiled for the GPU instead: its JSON report."""
    return run_check_script(script, device="cuda", **extra_env)


@needs_triton
def test_triton_kernels_equal_dense_on_cuda():
    errors = run_on_cuda("triton_parity.py")
    assert len(errors) == 20, errors
    for case, error in errors.items():
        assert error < (1e-12 if case == "float64_runs_tiled" else 1e-5), (case, error)


@needs_triton
def test_triton_kernels_compile_to_one_graph_on_cuda():
    results = run_on_cuda("triton_compile.py")
    assert len(results) == 6, results
    for case, (breaks, difference) in results.items():
        assert breaks == 0 and difference <= 1e-5, (case, breaks, difference)


@needs_triton
def test_triton_structured_targets_equal_dense_and_tiled_on_cuda():
    report = run_on_cuda("targets_triton.py", M3CO_TRITON_EXAMPLES="25")
    assert report["examples"] >= 8 and report["max_error"] < 2e-5, report


def cuda_losses(n: int):
    plan = M3CoLoss(generator=torch.Generator().manual_seed(1)).sample(n, 2, device="cuda")
    labels = torch.arange(n, device="cuda") % 5
    losses = {
        "m3co": lambda z, backend: F.m3co([plan.mix(x, m) for m, x in enumerate(z)], z, plan.perms, plan.lam, backend=backend),
        "multisoftclip": lambda z, backend: F.multisoftclip(z, backend=backend),
        "multisoftclip-reference": lambda z, backend: F.multisoftclip(z, convention="reference", backend=backend),
        "clip_loss": lambda z, backend: F.clip_loss(z[0], z[1], backend=backend),
        "contrastive_loss[labels]": lambda z, backend: F.contrastive_loss(z[0], z[1], labels=labels, backend=backend),
    }
    assert list(losses) == LOSSES
    return losses


LOSSES = ["m3co", "multisoftclip", "multisoftclip-reference", "clip_loss", "contrastive_loss[labels]"]


@pytest.mark.parametrize("name", LOSSES)
def test_tiled_backend_equals_dense_on_cuda(name):
    """float64 on the device, tiles smaller than the batch and uneven."""
    n = 300
    fn = cuda_losses(n)[name]
    g = torch.Generator().manual_seed(0)
    z = [torch.randn(n, 24, generator=g, dtype=torch.float64).cuda() for _ in range(2)]
    results = []
    with backends.config(tile_rows=64, tile_cols=96, tile_square=80):
        for backend in ("dense", "tiled"):
            leaves = [x.clone().requires_grad_() for x in z]
            value = fn(leaves, backend)
            results.append([value.detach(), *torch.autograd.grad(value, leaves)])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["tiled", pytest.param("triton", marks=needs_triton)])
def test_losses_compile_to_one_graph_on_cuda(backend):
    import m3co_loss

    n = 256
    g = torch.Generator().manual_seed(0)
    z = [torch.randn(n, 32, generator=g).cuda().requires_grad_() for _ in range(2)]
    with m3co_loss.value_checks(False), backends.config(precision="ieee"):
        for name, fn in cuda_losses(n).items():
            torch._dynamo.reset()
            assert torch._dynamo.explain(fn)(z, backend).graph_break_count == 0, name
            torch._dynamo.reset()
            want = fn(z, backend)
            got = torch.compile(fn, backend="aot_eager", fullgraph=True)(z, backend)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["tiled", pytest.param("triton", marks=needs_triton)])
def test_extra_memory_is_linear_in_the_batch_on_cuda(backend):
    """At N = 16384 one N x N float32 matrix is 1 GiB; a pass of m3co_pair and of clip_loss,
    backward included, needs a few N x D buffers and the tiles."""
    n, d = 16384, 256
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, d, generator=g).cuda().requires_grad_() for _ in range(2))
    perm = torch.randperm(n, generator=g).cuda()
    lam = torch.rand(n, generator=g).cuda()
    for fn in (lambda: F.m3co_pair(a, b, perm, lam, backend=backend), lambda: F.clip_loss(a, b, backend=backend)):
        fn().backward()  # warm-up: kernels compiled, allocator pools filled
        a.grad = b.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn().backward()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
        assert extra <= 16 * n * d * 4 + 64 * 2**20 < n * n * 4, (backend, extra / 2**20)
        a.grad = b.grad = None


def test_a_plan_drawn_on_the_cpu_serves_embeddings_on_cuda():
    z = [torch.randn(16, 8, device="cuda") for _ in range(2)]
    criterion = M3CoLoss(total_steps=3, generator=torch.Generator().manual_seed(0))
    plan = criterion.sample(16, 2)  # no device: drawn on the CPU
    assert plan.lam.device.type == "cpu"
    # by hand: the plan's tensors moved to the device, the clean embeddings mixed with them, and the
    # paper's M3Co against clean partners at the module's temperature, weighted by beta
    perms, lam = [p.to("cuda") for p in plan.perms], plan.lam.to("cuda")
    mixed = [lam[m, :, None] * x + (1 - lam[m, :, None]) * x[perms[m]] for m, x in enumerate(z)]
    expected = 0.1 * F.m3co(mixed, z, perms, lam, temperature=0.1, convention="paper", partner="clean")
    torch.testing.assert_close(criterion(z, plan=plan), expected)
