"""The backends' tuning API and dispatch, and the deprecated ``kernels`` / ``triton_kernels`` modules."""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys

import pytest
import torch

import m3co_loss
from m3co_loss import backends
from m3co_loss import functional as F
from m3co_loss.backends import Rows, softclip, tiled

DEFAULTS = backends.BackendConfig()


@pytest.fixture(autouse=True)
def restore_config():
    before = backends.get_config()
    yield
    backends.set_config(**dataclasses.asdict(before))


def batch(n=11, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(2)]


def values_and_grads(fn, z):
    leaves = [x.clone().requires_grad_(True) for x in z]
    value = fn(leaves)
    return [value.detach(), *torch.autograd.grad(value, leaves)]


# ----------------------------------------------------------------------------- tuning API


def test_defaults_and_immutability():
    config = backends.get_config()
    assert config == DEFAULTS
    assert (config.tile_rows, config.tile_cols, config.tile_square) == (512, 2048, 1024)
    assert config.parallel_workers is True and config.auto_tiled_min_n == 2048
    assert (config.triton_block_m, config.triton_block_n, config.triton_block_d) == (64, 64, 64)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.tile_rows = 3


def test_set_config_returns_the_previous_values_and_keeps_the_others():
    previous = backends.set_config(tile_rows=3, parallel_workers=False)
    assert previous == DEFAULTS
    now = backends.get_config()
    assert (now.tile_rows, now.parallel_workers) == (3, False)
    assert dataclasses.replace(now, tile_rows=512, parallel_workers=True) == DEFAULTS
    assert backends.set_config() == now  # no option: nothing changes
    backends.set_config(**dataclasses.asdict(previous))
    assert backends.get_config() == DEFAULTS


def test_config_context_restores_what_it_set_also_on_error():
    with backends.config(tile_cols=7) as inside:
        assert inside.tile_cols == 7 == backends.get_config().tile_cols
        with backends.config(tile_cols=9, auto_tiled_min_n=5):
            assert (backends.get_config().tile_cols, backends.get_config().auto_tiled_min_n) == (9, 5)
        assert backends.get_config() == inside
    assert backends.get_config() == DEFAULTS
    with pytest.raises(KeyError):
        with backends.config(tile_square=4):
            raise KeyError("boom")
    assert backends.get_config() == DEFAULTS


@pytest.mark.parametrize(
    "options, error, message",
    [
        (dict(tile_rows=0), ValueError, "tile_rows must be a positive int; got 0"),
        (dict(tile_cols=-4), ValueError, "tile_cols must be a positive int"),
        (dict(tile_square=2.0), TypeError, "tile_square must be an int; got float"),
        (dict(auto_tiled_min_n=True), TypeError, "auto_tiled_min_n must be an int; got bool"),
        (dict(parallel_workers=1), TypeError, "parallel_workers must be a bool; got int"),
        (dict(triton_block_m=24), ValueError, "triton_block_m must be a power of two >= 16"),
        (dict(triton_block_d=8), ValueError, "triton_block_d must be a power of two >= 16"),
        (dict(triton_num_warps=3), ValueError, "triton_num_warps must be 1, 2, 4, 8, 16 or 32"),
        (dict(triton_num_warps=64), ValueError, "triton_num_warps must be 1, 2, 4, 8, 16 or 32"),
        (dict(triton_num_stages=0), ValueError, "triton_num_stages must be a positive int"),
        (dict(triton_num_stages=2.0), TypeError, "triton_num_stages must be an int"),
        (dict(tile_rows=8, triton_block_n="64"), TypeError, "triton_block_n must be an int; got str"),
    ],
)
def test_invalid_options_are_refused_by_name_and_change_nothing(options, error, message):
    with pytest.raises(error, match=message):
        backends.set_config(**options)
    with pytest.raises(error, match=message):
        with backends.config(**options):
            pass
    assert backends.get_config() == DEFAULTS


def test_numpy_integers_are_accepted():
    np = pytest.importorskip("numpy")
    backends.set_config(tile_rows=np.int64(5))
    assert backends.get_config().tile_rows == 5 and type(backends.get_config().tile_rows) is int


def test_tile_options_reach_the_kernels(monkeypatch):
    sizes = []
    original = tiled.blocks

    def spy(n, size):
        sizes.append(size)
        return original(n, size)

    monkeypatch.setattr(tiled, "blocks", spy)
    z = batch()
    with backends.config(tile_rows=3, tile_cols=5):
        F.clip_loss(*z, backend="tiled")
    assert set(sizes) == {3, 5}


def test_a_kernel_keeps_the_options_of_its_forward_pass_for_its_backward_pass():
    """Forward inside ``config``, backward outside: the tiles of the forward pass, bit for bit."""
    z = batch(n=13)
    perm = torch.arange(13).roll(1)
    lam = torch.linspace(0, 1, 13, dtype=torch.float64)

    def loss(x):
        return F.multisoftclip(x, backend="tiled") + F.m3co_pair(x[0], x[1], perm, lam, backend="tiled", temperature=0.002)

    with backends.config(tile_rows=3, tile_cols=4, tile_square=5):
        inside = values_and_grads(loss, z)
        leaves = [x.clone().requires_grad_(True) for x in z]
        value = loss(leaves)
    split = [value.detach(), *torch.autograd.grad(value, leaves)]  # backward under the default tiles
    for x, y in zip(inside, split):
        assert torch.equal(x, y)


def test_auto_threshold_is_an_option():
    z = batch(n=6)
    with backends.config(auto_tiled_min_n=6):
        assert backends.choose_backend("auto", 6, 6, torch.device("cpu")) == "tiled"
        auto = F.clip_loss(*z, backend="auto", reduction="none")
    assert torch.equal(auto, F.clip_loss(*z, backend="tiled", reduction="none"))
    assert torch.equal(F.clip_loss(*z, backend="auto", reduction="none"), F.clip_loss(*z, backend="dense", reduction="none"))


# ----------------------------------------------------------------------------- dispatch


def test_available_checks_its_backend_argument():
    with pytest.raises(ValueError, match="backend must be one of"):
        backends.available("cuda")
    assert backends.available("dense", torch.device("cpu"))


def test_distributed_multisoftclip_pairs_needs_gather():
    a, b = (Rows(x, x, 0) for x in (F.normalize(x) for x in batch()))
    with pytest.raises(ValueError, match="gather is needed with distributed=True"):
        backends.multisoftclip_pairs([a, b], {(0, 1): (1.0, 1.0)}, 0.1, reference=False, distributed=True, backend="tiled")


@pytest.mark.parametrize("t", [0.1, 0.01])  # float32: the fused kernel, then the streaming path with exact maxima
def test_a_pair_with_two_zero_weights_adds_nothing_in_every_backend(t):
    g = torch.Generator().manual_seed(8)
    rows = [Rows(x, x, 0) for x in (F.normalize(torch.randn(10, 4, generator=g)) for _ in range(3))]
    with_zero = {(0, 1): (0.5, 0.5), (0, 2): (0.0, 0.0), (1, 2): (1.0, 0.0)}
    without = {(0, 1): (0.5, 0.5), (1, 2): (1.0, 0.0)}
    expected = backends.multisoftclip_pairs(rows, without, t, reference=False, backend="dense")
    with backends.config(tile_rows=4, tile_cols=4, tile_square=4):
        for backend in ("dense", "tiled"):
            got = backends.multisoftclip_pairs(rows, with_zero, t, reference=False, backend=backend)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 / t)
            got = backends.multisoftclip_pairs(rows, with_zero, t, reference=False, backend=backend, distributed=True, gather=lambda x: x)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 / t)
        assert torch.equal(tiled.multisoftclip_pair_vector(rows[0].local, rows[1].local, t, 0.0, 0.0, reference=False), torch.zeros(10))


@pytest.mark.parametrize(
    "weights, error, message",
    [
        ([((0, 1), (1.0, 1.0))], TypeError, "weights must be a mapping"),
        ({}, ValueError, "weights must hold at least one modality pair"),
        ({(0, 1): (0.0, 0.0)}, ValueError, "weights must hold at least one nonzero weight"),
        ({(1, 0): (1.0, 1.0)}, ValueError, r"weights: every key must be a pair \(a, b\) .* 0 <= a < b < 2; got \(1, 0\)"),
        ({(0, 2): (1.0, 1.0)}, ValueError, "weights: every key"),
        ({(0, 0): (1.0, 1.0)}, ValueError, "weights: every key"),
        ({0: (1.0, 1.0)}, ValueError, "weights: every key"),
        ({(0.0, 1): (1.0, 1.0)}, ValueError, "weights: every key"),
        ({(0, 1): (1.0,)}, ValueError, r"weights\[\(0, 1\)\] must be two finite non-negative numbers"),
        ({(0, 1): 1.0}, ValueError, r"weights\[\(0, 1\)\] must be two"),
        ({(0, 1): (-0.5, 1.0)}, ValueError, r"weights\[\(0, 1\)\] must be two"),
        ({(0, 1): (float("nan"), 1.0)}, ValueError, r"weights\[\(0, 1\)\] must be two"),
        ({(0, 1): (1.0, float("inf"))}, ValueError, r"weights\[\(0, 1\)\] must be two"),
        ({(0, 1): (True, 1.0)}, ValueError, r"weights\[\(0, 1\)\] must be two"),
        ({(0, 1): "ab"}, ValueError, r"weights\[\(0, 1\)\] must be two"),
    ],
)
@pytest.mark.parametrize("backend", ["dense", "tiled"])
@pytest.mark.parametrize("distributed", [False, True])
def test_multisoftclip_pairs_refuses_bad_weights_by_name(weights, error, message, backend, distributed):
    rows = [Rows(x, x, 0) for x in (F.normalize(x) for x in batch())]
    with pytest.raises(error, match=message):
        backends.multisoftclip_pairs(rows, weights, 0.1, reference=False, backend=backend, distributed=distributed, gather=lambda x: x)


def test_importing_the_package_does_not_import_triton():
    code = "import sys, m3co_loss, m3co_loss.backends.triton, m3co_loss.triton_kernels; assert 'triton' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_eager_kernels_do_not_import_the_compiler():
    """Eager calls of the tiled kernels (the fused MultiSClip kernel included) go through autograd
    functions: the first eager call of a custom operator would import ``torch._dynamo`` (about
    150 MiB of resident memory)."""
    code = """
import sys, torch
from m3co_loss import backends, functional as F
z = [torch.randn(40, 8, requires_grad=True) for _ in range(2)]
t = torch.tensor(0.1, requires_grad=True)
with backends.config(tile_rows=16, tile_cols=16, tile_square=16):
    for temperature in (0.1, t):
        F.multisoftclip(z, temperature=temperature, backend="tiled").backward()
        F.multisoftclip(z, temperature=temperature, convention="reference", backend="tiled").backward()
        F.clip_loss(*z, temperature=temperature, backend="tiled").backward()
        F.m3co_pair(z[0], z[1], torch.randperm(40), torch.rand(40), temperature=temperature, backend="tiled").backward()
assert "torch._dynamo" not in sys.modules
"""
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_backend_module_provides_the_interface():
    for module in (backends.dense, backends.tiled, backends.triton.backend_for(torch.float32)):
        for name in ("row_col_lse", "m3co_vector", "clip_vector", "multisoftclip_vector", "multisoftclip_pairs"):
            assert callable(getattr(module, name)), (module, name)
    assert "backends" in m3co_loss.__all__ and "kernels" in m3co_loss.__all__


def test_triton_primitives_refuse_other_dtypes():
    x = torch.randn(3, 2, dtype=torch.float64)
    with pytest.raises(TypeError, match="float32"):
        backends.triton.logsumexp(x, x, 0.1, True)


# ----------------------------------------------------------------------------- deprecated modules


@pytest.mark.parametrize(
    "old, new, path",
    [
        ("LogSumExp", tiled.LogSumExp, "m3co_loss.backends.tiled.LogSumExp"),
        ("SoftTargetSum", tiled.SoftTargetSum, "m3co_loss.backends.tiled.SoftTargetSum"),
        ("SoftClip", softclip.SoftClip, "m3co_loss.backends.softclip.SoftClip"),
        ("SoftClipCoefficients", softclip.SoftClipCoefficients, "m3co_loss.backends.softclip.SoftClipCoefficients"),
        ("choose_backend", backends.choose_backend, "m3co_loss.backends.choose_backend"),
    ],
)
def test_kernels_names_warn_and_return_the_new_objects(old, new, path):
    from m3co_loss import kernels

    with pytest.warns(DeprecationWarning, match=f"m3co_loss.kernels.{old} is deprecated .* use {path}"):
        assert getattr(kernels, old) is new


def test_kernels_functions_with_the_former_signatures(monkeypatch):
    from m3co_loss import kernels

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    a, b = (F.normalize(x) for x in batch(n=9))
    lo, hi = 3, 7
    perm, lam = torch.arange(hi - lo).roll(1), torch.linspace(0, 1, hi - lo, dtype=torch.float64)
    a_rows, b_rows = Rows(a[lo:hi], a, lo), Rows(b[lo:hi], b, lo)
    with pytest.warns(DeprecationWarning, match="use m3co_loss.backends.m3co_vector"):
        old = kernels.m3co_vector(a[lo:hi], a, b[lo:hi], b, perm, lam, 0.1, distributed=True)
    assert torch.equal(old, backends.m3co_vector(a_rows, b_rows, perm, lam, 0.1, distributed=True, backend="tiled"))
    with pytest.warns(DeprecationWarning):
        old = kernels.clip_vector(a, a, b, b, 0.1)
    assert torch.equal(old, backends.clip_vector(Rows(a, a, 0), Rows(b, b, 0), 0.1, backend="tiled"))
    with pytest.warns(DeprecationWarning):
        old = kernels.multisoftclip_vector(a, a, b, b, 0.1, reference=True, gather=lambda x: x)
    assert torch.equal(old, tiled.multisoftclip_vector(Rows(a, a, 0), Rows(b, b, 0), 0.1, reference=True, gather=lambda x: x))
    with pytest.warns(DeprecationWarning, match="use m3co_loss.backends.multisoftclip_pairs"):
        old = kernels.multisoftclip_pair_vector(a, b, 0.1, 0.3, 1.7, reference=False)
    assert torch.equal(old, tiled.multisoftclip_pair_vector(a, b, 0.1, 0.3, 1.7, reference=False))
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="kernels handle backend 'tiled' or 'triton'"):
        kernels.clip_vector(a, a, b, b, 0.1, backend="dense")
    with pytest.warns(DeprecationWarning, match=r"use m3co_loss.backends.available\('triton', device\)"):
        assert kernels.triton_available(torch.device("meta")) is False


def test_kernels_tuning_globals_read_and_set_the_options(monkeypatch):
    from m3co_loss import kernels

    with pytest.warns(DeprecationWarning, match=r"use m3co_loss.backends.get_config\(\).tile_rows"):
        assert kernels.TILE_ROWS == 512
    with pytest.warns(DeprecationWarning, match=r"use m3co_loss.backends.set_config\(tile_square=...\)"):
        kernels.TILE_SQUARE = 6
    assert backends.get_config().tile_square == 6
    with pytest.warns(DeprecationWarning):
        monkeypatch.setattr(kernels, "PARALLEL_WORKERS", False)
    assert backends.get_config().parallel_workers is False
    with pytest.warns(DeprecationWarning):
        monkeypatch.undo()
    assert backends.get_config().parallel_workers is True
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="auto_tiled_min_n must be a positive int"):
        kernels.AUTO_TILED_MIN_N = 0
    with pytest.raises(AttributeError, match="has no attribute 'TILES'"):
        kernels.TILES  # noqa: B018


def test_triton_kernels_forward_to_the_triton_backend():
    from m3co_loss import triton_kernels

    with pytest.warns(DeprecationWarning, match="use m3co_loss.backends.triton.LogSumExp"):
        assert triton_kernels.LogSumExp is backends.triton.LogSumExp
    with pytest.warns(DeprecationWarning, match="use m3co_loss.backends.triton.SoftTargetSum"):
        assert triton_kernels.SoftTargetSum is backends.triton.SoftTargetSum
    with pytest.warns(DeprecationWarning, match=r"backends.available\('triton', device\)"):
        assert isinstance(triton_kernels.available(), bool)
    with pytest.warns(DeprecationWarning, match=r"set_config\(triton_block_m=...\)"):
        triton_kernels.BLOCK_M = 16
    assert backends.get_config().triton_block_m == 16
    with pytest.warns(DeprecationWarning):
        assert triton_kernels.BLOCK_M == 16


def test_set_config_and_config_take_every_option_and_only_those():
    options = [field.name for field in dataclasses.fields(backends.BackendConfig)]
    for fn in (backends.set_config, backends.config):
        assert list(inspect.signature(fn).parameters) == options, fn.__name__
    with backends.config(**dataclasses.asdict(backends.get_config())) as current:
        assert current == backends.get_config()


def test_pair_weights_may_be_tensors_or_arrays():
    np = pytest.importorskip("numpy")
    g = torch.Generator().manual_seed(3)
    rows = [Rows(x, x, 0) for x in (F.normalize(torch.randn(6, 4, generator=g)) for _ in range(2))]
    expected = backends.multisoftclip_pairs(rows, {(0, 1): (1.0, 0.5)}, 0.1, reference=False)
    for value in (torch.tensor([1.0, 0.5]), np.array([1.0, 0.5])):
        assert torch.equal(backends.multisoftclip_pairs(rows, {(0, 1): value}, 0.1, reference=False), expected)
    with pytest.raises(ValueError, match=r"weights\[\(0, 1\)\] must be two finite"):
        backends.multisoftclip_pairs(rows, {(0, 1): (10**400, 1.0)}, 0.1, reference=False)
