"""The Triton backend: importable without Triton, exact under Triton's CPU interpreter.

The kernels are checked with ``TRITON_INTERPRET=1`` in a subprocess (the variable must be set
before triton is imported, and other test modules import it without). No CUDA timing or
compilation is tested here.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from check_scripts import run_check_script


needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def test_module_imports_and_reports_availability(monkeypatch):
    from m3co_loss import backends
    from m3co_loss.backends import triton  # importable without the triton package

    assert callable(triton.backend_for(torch.float32).m3co_vector)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backends.available("triton", "cpu") == (importlib.util.find_spec("triton") is not None)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not backends.available("triton", "cpu")


@needs_triton
@pytest.mark.slow
def test_triton_kernels_equal_dense_under_the_interpreter():
    errors = run_check_script("triton_parity.py", timeout=600)
    assert len(errors) == 20, errors
    for case, error in errors.items():
        # float64 leaves the float32 kernels for the tiled path: float64 accuracy, not float32's
        assert error < (1e-12 if case == "float64_runs_tiled" else 1e-5), (case, error)


@pytest.mark.cuda
@needs_triton
@pytest.mark.xfail(strict=False, reason="on an NVIDIA H200 (torch 2.11, Triton 3.6) multisoftclip gave 12.4157 on Triton and 12.4947 on "
                   "dense in float32 (default blocks, N = 300, D = 96), while the parity and precision checks passed; "
                   "neither value was compared with float64 there, so which one is off is not known yet")
@pytest.mark.parametrize("case", ["multisoftclip", "m3co_pair"])
def test_triton_on_cuda_matches_float64(case):  # runs only where a CUDA device is present
    """Default blocks on ragged sizes (N = 300, D = 96): float32 dense and Triton both within 1e-5
    of float64 dense on the same device (the message names the one that is not)."""
    from m3co_loss import functional as F

    g = torch.Generator().manual_seed(0)
    z = [torch.randn(300, 96, generator=g).cuda() for _ in range(2)]
    perm, lam = torch.arange(300, device="cuda").roll(1), torch.linspace(0, 1, 300, device="cuda")
    fn = {
        "multisoftclip": lambda a, b, backend: F.multisoftclip([a, b], backend=backend),
        "m3co_pair": lambda a, b, backend: F.m3co_pair(a, b, perm, lam, backend=backend),
    }[case]
    want = fn(*(x.double() for x in z), backend="dense")
    got = {backend: fn(*z, backend=backend).double() for backend in ("dense", "triton")}
    errors = {backend: float((v - want).abs() / want.abs()) for backend, v in got.items()}
    assert max(errors.values()) < 1e-5, (float(want), {b: float(v) for b, v in got.items()}, errors)


@needs_triton
def test_triton_precisions_under_the_interpreter():
    """``precision="ieee"`` and ``"tf32"`` (float32 in the interpreter) within their tolerances of
    the float64 reference; ``bf16``/``fp16`` run on CUDA only (the test below)."""
    from triton_precision import TOLERANCES

    results = run_check_script("triton_precision.py", timeout=600)
    assert set(results) == {"ieee", "tf32"}
    for precision, errors in results.items():
        assert len(errors) == 3 and max(errors.values()) <= TOLERANCES[precision], (precision, errors)


@pytest.mark.cuda
@needs_triton
def test_triton_precisions_on_cuda():  # runs only where a CUDA device is present
    """Every product precision within its stated tolerance (docs page ``kernels``) of the float64
    reference, at N = 1024, D = 256, t = 0.1, in value and gradient."""
    from triton_precision import TOLERANCES, measure

    results = measure("cuda", tuple(TOLERANCES), n=1024, d=256)
    for precision, errors in results.items():
        assert max(errors.values()) <= TOLERANCES[precision], (precision, errors)


def test_precision_option_is_validated():
    from m3co_loss import backends

    with pytest.raises(ValueError, match="precision must be one of"):
        backends.set_config(precision="tf16")
    with pytest.raises(TypeError, match="precision must be a str"):
        backends.set_config(precision=16)
    assert backends.get_config().precision == "auto"
    with backends.config(precision="bf16") as cfg:
        assert cfg.precision == "bf16"
    assert backends.get_config().precision == "auto"


def test_auto_precision_follows_the_inputs_and_torch():
    """``precision="auto"``: half-precision inputs multiply in their own precision, float32 ones in
    TF32 exactly when torch allows it for its own products; an explicit precision wins."""
    from m3co_loss import backends
    from m3co_loss.backends import triton

    config = backends.get_config()
    previous = torch.backends.cuda.matmul.allow_tf32
    try:
        for allow, float32 in ((False, "ieee"), (True, "tf32")):
            torch.backends.cuda.matmul.allow_tf32 = allow
            resolved = [triton._resolved(config, triton._hint(d)).precision for d in (torch.float32, torch.bfloat16, torch.float16, None)]
            assert resolved == [float32, "bf16", "fp16", float32]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    with backends.config(precision="ieee") as explicit:
        assert triton._resolved(explicit, triton._hint(torch.bfloat16)).precision == "ieee"


def test_losses_pass_the_inputs_dtype_to_the_backends(monkeypatch):
    from m3co_loss import backends
    from m3co_loss import functional as F

    seen = []
    original = backends.dense.clip_vector

    def spy(a, b, t, **kwargs):
        seen.append((a.source_dtype, a.local.dtype))
        return original(a, b, t, **kwargs)

    monkeypatch.setattr(backends.dense, "clip_vector", spy)
    z = torch.randn(6, 4, dtype=torch.bfloat16)
    F.clip_loss(z, z.clone(), backend="dense")
    assert seen == [(torch.bfloat16, torch.float32)]  # rows normalised to float32, the source dtype kept


@pytest.mark.cuda
@needs_triton
def test_half_inputs_multiply_in_their_precision_on_cuda():  # runs only where a CUDA device is present
    """bfloat16 inputs under ``precision="auto"`` give the ``bf16`` kernels' numbers, within the
    bf16 tolerance of the float64 reference."""
    from triton_precision import TOLERANCES

    from m3co_loss import backends
    from m3co_loss import functional as F

    g = torch.Generator().manual_seed(0)
    z = [torch.randn(1024, 256, generator=g).cuda() for _ in range(2)]
    half = [x.bfloat16() for x in z]
    auto = F.clip_loss(*half, backend="triton", reduction="none")
    with backends.config(precision="bf16"):
        explicit = F.clip_loss(*half, backend="triton", reduction="none")
    with backends.config(precision="ieee"):
        ieee = F.clip_loss(*half, backend="triton", reduction="none")
    assert torch.equal(auto, explicit) and not torch.equal(auto, ieee)
    want = F.clip_loss(*(x.double() for x in z), backend="dense", reduction="none")
    assert float((auto.double() - want).abs().max()) / float(want.abs().max()) <= TOLERANCES["bf16"]
