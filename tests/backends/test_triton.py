"""The Triton backend: importable without Triton, exact under Triton's CPU interpreter.

The kernels are checked with ``TRITON_INTERPRET=1`` in a subprocess (the variable must be set
before triton is imported, and other test modules import it without). No CUDA timing or
compilation is tested here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parents[1]  # tests/, where triton_parity.py lives

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def test_module_imports_and_reports_availability(monkeypatch):
    from m3co_loss import backends
    from m3co_loss.backends import triton  # importable without the triton package

    assert callable(triton.m3co_vector)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backends.available("triton", "cpu") == (importlib.util.find_spec("triton") is not None)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not backends.available("triton", "cpu")


@needs_triton
@pytest.mark.slow
def test_triton_kernels_equal_dense_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]))
    proc = subprocess.run([sys.executable, str(HERE / "triton_parity.py")], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(errors) == 18, errors
    for case, error in errors.items():
        # float64 leaves the float32 kernels for the tiled path: float64 accuracy, not float32's
        assert error < (1e-12 if case == "float64_runs_tiled" else 1e-5), (case, error)


@pytest.mark.cuda
@needs_triton
def test_triton_on_cuda_matches_dense():  # runs only where a CUDA device is present
    from m3co_loss import functional as F

    g = torch.Generator().manual_seed(0)
    z = [torch.randn(300, 96, generator=g).cuda() for _ in range(2)]
    for fn in (
        lambda a, b, backend: F.multisoftclip([a, b], backend=backend),
        lambda a, b, backend: F.m3co_pair(a, b, torch.arange(300, device="cuda").roll(1), torch.rand(300, device="cuda"), backend=backend),
    ):
        torch.testing.assert_close(fn(*z, backend="triton"), fn(*z, backend="dense"), rtol=1e-5, atol=1e-5)
