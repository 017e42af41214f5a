"""Temperatures as tensors: exact gradients in every backend, soft-target options, the supported range.

* float64 ``gradcheck`` of every loss with respect to the embeddings *and* a tensor temperature
  (and MultiSClip's ``target_temperature``), dense and tiled with small uneven tiles;
* the identity ``t dL/dt = -(1/2) sum_m <X_m, dL/dX_m>`` that the tiled and Triton backward
  passes use, checked on the dense formulas of each primitive;
* hypothesis: dense and tiled agree in value and every gradient for random temperatures;
* the range: from t = 1e3 down to the smallest normal number of each dtype, every loss and
  backend returns a finite value close to dense float64, or refuses the temperature by name.
"""

from __future__ import annotations

import math
import re
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.autograd import gradcheck

import m3co_loss
from m3co_loss import backends
from m3co_loss import functional as F
from m3co_loss.backends import _streaming, _tiling, softclip, tiled
from strategies import batches, tile_sizes, tiles

CONVENTIONS = ["paper", "reference"]


def leaf(value, dtype=torch.float64):
    return torch.tensor(value, dtype=dtype, requires_grad=True)


def losses(convention="paper", backend="dense", target=None, detach=False, perm=None, lam=None):
    """name -> f(a, b, t): every loss of the package on a pair of embeddings, at temperature t."""
    reference = convention == "reference"
    soft = dict(target_temperature=target, detach_targets=detach, convention=convention, backend=backend)
    out = {
        "clip_loss": lambda a, b, t: F.clip_loss(a, b, temperature=t, backend=backend, reduction="none"),
        "m3co_pair": lambda a, b, t: F.m3co_pair(a, b, perm, lam, temperature=t, convention=convention, backend=backend, reduction="none"),
        "m3co": lambda a, b, t: F.m3co([a, b], [b, a], [perm, perm.flip(0)], lam, temperature=t, convention=convention, partner="clean", backend=backend),
        "multisoftclip_pair": lambda a, b, t: F.multisoftclip_pair(a, b, temperature=t, reduction="none", **soft),
        "multisoftclip": lambda a, b, t: F.multisoftclip([a, b, a.flip(0)], temperature=t, reduction="none", **soft),
    }
    if not reference and backend == "dense":
        n = lam.shape[0]
        labels, logits = torch.arange(n) % 3, [torch.eye(n, 3, dtype=lam.dtype), torch.ones(n, 3, dtype=lam.dtype)]
        out["unis_mmc"] = lambda a, b, t: F.unis_mmc([a, b], logits, labels, temperature=t)
    return out


def pair(n=7, d=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    z = [torch.randn(n, d, generator=g, dtype=dtype) for _ in range(2)]
    perm = torch.randperm(n, generator=g)
    lam = torch.rand(n, generator=g, dtype=dtype)
    lam[:2] = torch.tensor([0.0, 1.0])
    return z, perm, lam


# ----------------------------------------------------------------------------- exact gradients


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["dense", "tiled"])
@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("t0", [0.1, 0.002])  # the static shift, and exact maxima with the general soft-target path
def test_gradcheck_with_a_tensor_temperature(backend, convention, t0, small_tiles):
    z, perm, lam = pair()
    a, b = (x.requires_grad_() for x in z)
    for name, fn in losses(convention, backend, perm=perm, lam=lam).items():
        if name == "unis_mmc":  # detaches a semi-positive pair's correct modality by design: the temperature only
            assert gradcheck(lambda t: fn(a.detach(), b.detach(), t), (leaf(t0),), eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)
            continue
        assert gradcheck(fn, (a, b, leaf(t0)), eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True), name
        # the temperature's column of the Jacobian in full (fast mode checks random projections)
        assert gradcheck(lambda t: fn(a.detach(), b.detach(), t), (leaf(t0),), eps=1e-6, atol=1e-6, rtol=1e-5), name


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["dense", "tiled"])
@pytest.mark.parametrize("convention", CONVENTIONS)
def test_gradcheck_with_a_separate_target_temperature(backend, convention, small_tiles):
    z, _, _ = pair(seed=1)
    a, b = (x.requires_grad_() for x in z)
    for target in (0.3, "tensor"):
        for t0 in (0.1, 0.002):

            def fn(a, b, t, t_target, target=target):
                soft = dict(target_temperature=t_target if target == "tensor" else target, convention=convention, backend=backend)
                return F.multisoftclip_pair(a, b, temperature=t, reduction="none", **soft) + F.multisoftclip([a, b], temperature=t, **soft)

            assert gradcheck(fn, (a, b, leaf(t0), leaf(0.25)), eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True), (target, t0)


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("t0, target", [(0.1, None), (0.1, 0.3), (0.002, 0.3), (0.002, None)])
def test_detached_targets_are_constants(convention, t0, target, small_tiles):
    """``detach_targets``: the gradient of the loss with W = softmax(p_a p_a^T / t') held fixed."""
    z, _, _ = pair(n=9, d=4, seed=2)
    w = torch.rand(9, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def reference(a, b, t):
        # the dense formula with the soft targets computed from constants
        pa, pb = F.normalize(a), F.normalize(b)
        tt = t if target is None else target
        soft = torch.softmax((pa.detach() / (tt.detach() if isinstance(tt, torch.Tensor) else tt)) @ pa.detach().T, 1)
        s = pa @ pb.T / t
        r, c = torch.logsumexp(s, 1), torch.logsumexp(s, 0)
        if convention == "reference":
            return 0.5 * (c + r - (soft * s.T).sum(1) - (soft * s).sum(1))
        return c + (soft * (r[None, :] - 2 * s.T)).sum(1)

    expected = values_and_grads(reference, z, t0, w)
    for backend in ("dense", "tiled"):
        got = values_and_grads(
            lambda a, b, t: F.multisoftclip_pair(
                a, b, temperature=t, target_temperature=target, detach_targets=True, convention=convention, reduction="none", backend=backend
            ),
            z,
            t0,
            w,
        )
        for x, y in zip(got, expected):
            torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)
    # the same values as the paper's loss, whose targets carry gradient, but other gradients
    live = values_and_grads(lambda a, b, t: F.multisoftclip_pair(a, b, temperature=t, target_temperature=target, convention=convention, reduction="none"), z, t0, w)
    torch.testing.assert_close(live[0], expected[0], rtol=1e-12, atol=1e-12)
    if (target or t0) > 0.01:  # below, the soft targets are one-hot and carry no gradient anyway
        assert not torch.allclose(live[1], expected[1])


def values_and_grads(fn, z, t0, weights=None):
    leaves = [x.clone().requires_grad_() for x in z]
    t = leaf(t0, z[0].dtype)
    v = fn(*leaves, t)
    objective = (v * weights).sum() if weights is not None else v.sum()
    return [v.detach(), *torch.autograd.grad(objective, leaves + [t], allow_unused=True, materialize_grads=True)]


# ----------------------------------------------------------------------------- the identity


def _scale_identity(objective, operands, t):
    """``t dL/dt`` and ``-(1/2) sum <X, dL/dX>`` for ``objective(*operands, t)`` (plain autograd)."""
    xs = [x.clone().requires_grad_() for x in operands]
    tt = leaf(t)
    grads = torch.autograd.grad(objective(*xs, tt), xs + [tt])
    return float(t * grads[-1]), float(-0.5 * sum((x * g).sum() for x, g in zip(xs, grads[:-1])).detach())


def test_temperature_gradient_identity_of_each_primitive():
    """The identity the kernels use, on the dense formulas of the primitives, operands repeated included."""
    g = torch.Generator().manual_seed(4)
    q, k = F.normalize(torch.randn(6, 3, generator=g, dtype=torch.float64)), F.normalize(torch.randn(9, 3, generator=g, dtype=torch.float64))
    vq, vk = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(9, 5, generator=g, dtype=torch.float64)
    u = torch.randn(9, generator=g, dtype=torch.float64)
    g_r, g_c = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(9, generator=g, dtype=torch.float64)

    def lse(q, k, t):  # log-sum-exps of S = Q K^T / t
        s = q @ k.T / t
        return (torch.logsumexp(s, 1) * g_r).sum() + (torch.logsumexp(s, 0) * g_c).sum()

    def soft_target_sum(q, k, vq, vk, t):  # softmax(Q K^T / t) with values u + (gamma/t) vq . vk
        return ((torch.softmax(q @ k.T / t, 1) * (u[None, :] - 2 * vq @ vk.T / t)).sum(1) * g_r).sum()

    def soft_clip(a, b, t):  # MultiSClip of one pair: A appears in S = A B^T / t and twice in G = A A^T / t
        v = backends.dense.multisoftclip_vector(backends.Rows(a, a, 0), backends.Rows(b, b, 0), t, reference=False, gather=lambda x: x)
        return (v * g_r).sum()

    for t in (0.1, 0.7):
        for objective, operands in ((lse, (q, k)), (soft_target_sum, (q, k, vq, vk)), (soft_clip, (q, k[:6]))):
            lhs, rhs = _scale_identity(objective, operands, t)
            assert lhs == pytest.approx(rhs, rel=1e-10, abs=1e-12), objective.__name__
        # for the log-sum-exps of S = Q K^T / t one operand suffices: t dL/dt = -<Q, dL/dQ>
        xs = [q.clone().requires_grad_(), k.clone().requires_grad_()]
        tt = leaf(t)
        dq, dk, dt = torch.autograd.grad(lse(*xs, tt), xs + [tt])
        assert float(t * dt) == pytest.approx(-float((xs[0] * dq).sum().detach()), rel=1e-10)
        assert float(t * dt) == pytest.approx(-float((xs[1] * dk).sum().detach()), rel=1e-10)


# ----------------------------------------------------------------------------- dense == tiled


log_temperatures = st.floats(math.log(0.003), math.log(20.0)).map(math.exp)


@given(batch=batches(max_n=13), t0=log_temperatures, target=st.sampled_from([None, 0.25, "tensor"]),
       detach=st.booleans(), convention=st.sampled_from(CONVENTIONS), sizes=tile_sizes)
def test_tiled_equals_dense_with_tensor_temperatures(batch, t0, target, detach, convention, sizes):
    z, dtype, w = batch["z"], batch["dtype"], batch["weights"]
    perm, lam = batch["perms"][0], batch["lam"]
    tol = dict(rtol=1e-10 if dtype == torch.float64 else 1e-5)
    scale = max(1.0, 1.0 / t0)

    def run(backend):
        leaves = [x.clone().requires_grad_() for x in z]
        t, t_target = leaf(t0, dtype), leaf(0.25, dtype)
        options = dict(convention=convention, backend=backend, reduction="none")
        soft = dict(target_temperature=t_target if target == "tensor" else target, detach_targets=detach, **options)
        v = torch.stack([
            F.m3co_pair(*leaves, perm, lam, temperature=t, **options),
            F.clip_loss(*leaves, temperature=t, backend=backend, reduction="none"),
            F.multisoftclip_pair(*leaves, temperature=t, **soft),
            F.multisoftclip(leaves, temperature=t, **soft),
        ])
        return [v.detach(), *torch.autograd.grad((v * w).sum(), leaves + [t, t_target], allow_unused=True, materialize_grads=True)]

    dense = run("dense")
    with tiles(*sizes):
        streamed = run("tiled")
    smallest = min(1.0, *(float(x.double().norm(dim=1).min()) for x in z))
    # absolute scales: values ~ 1/t, embedding gradients ~ 1/(t |z|), temperature gradients ~ 1/t^2
    for got, want, atol in zip(streamed, dense, [scale, scale / max(smallest, 1e-3), scale / max(smallest, 1e-3), scale**2, scale**2]):
        torch.testing.assert_close(got, want, atol=tol["rtol"] * atol * 10, **tol)


def test_cpu_tensor_temperature_gives_the_bits_of_a_float():
    """On the CPU the tiled kernels read a tensor's value and compute as with the float."""
    z, perm, lam = pair(n=23, d=6, seed=5, dtype=torch.float32)
    for t0 in (0.1, 0.01):
        t = torch.tensor(t0)  # float32, as the embeddings: float(t) is the float the tiled kernels compute with
        for name, fn in losses("paper", "tiled", perm=perm, lam=lam.float()).items():
            with tiles(4, 7, 5):
                assert torch.equal(fn(*z, t), fn(*z, float(t))), (name, t0)


def test_tiled_without_a_host_value_takes_the_exact_maxima(monkeypatch):
    """A tensor on an accelerator is not read (no host synchronisation): the kernels shift by exact
    maxima and skip the fused kernel. Simulated on the CPU by hiding every tensor's value."""
    hidden = lambda t: None if isinstance(t, torch.Tensor) else float(t)  # noqa: E731
    for module in (_tiling, _streaming, tiled, softclip):
        monkeypatch.setattr(module, "host_value", hidden)
    fused = []
    monkeypatch.setattr(_streaming, "soft_clip", lambda *args, **kwargs: fused.append(1))
    z, perm, lam = pair(n=11, d=4, seed=6)
    w = torch.rand(11, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    for t0 in (0.1, 0.002):
        for name, fn in losses("paper", "tiled", perm=perm, lam=lam, target=0.3).items():
            with tiles(3, 4, 5):
                got = values_and_grads(fn, z, t0, w if name != "m3co" else None)
            want = values_and_grads(losses("paper", "dense", perm=perm, lam=lam, target=0.3)[name], z, t0, w if name != "m3co" else None)
            for x, y in zip(got, want):
                torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)
    assert not fused


# ----------------------------------------------------------------------------- the supported range


@st.composite
def range_cases(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]))
    compute = torch.promote_types(dtype, torch.float32)
    # log-uniform from 1e3 down to the smallest normal number of the compute dtype
    low, high = math.log(torch.finfo(compute).tiny), math.log(1e3)
    t0 = math.exp(draw(st.floats(low, high)))
    return dtype, t0, draw(st.sampled_from(["dense", "tiled"])), draw(st.booleans()), draw(st.integers(0, 1000))


@given(case=range_cases())
def test_every_temperature_is_supported_or_refused(case):
    dtype, t0, backend, as_tensor, seed = case
    compute = torch.promote_types(dtype, torch.float32)
    g = torch.Generator().manual_seed(seed)
    base = [torch.randn(9, 5, generator=g, dtype=torch.float64) for _ in range(2)]
    z = [x.to(dtype) for x in base]
    perm, lam = torch.randperm(9, generator=g), torch.rand(9, generator=g, dtype=torch.float64)
    t = torch.tensor(t0, dtype=compute, requires_grad=True) if as_tensor else t0
    supported = t0 >= F.min_temperature(dtype)
    for name, fn in losses("paper", backend, perm=perm, lam=lam.to(compute)).items():
        if not supported:
            with pytest.raises(ValueError, match="^temperature = .* is below the smallest supported temperature"):
                fn(*z, t)
            continue
        with tiles(4, 5, 4):
            leaves = [x.clone().requires_grad_() for x in z]
            v = fn(*leaves, t).sum()
            grads = torch.autograd.grad(v, leaves + ([t] if as_tensor else []), allow_unused=True, materialize_grads=True)
            v = v.detach()
        # the reference: dense float64 on the same (rounded) inputs
        expected = losses("paper", "dense", perm=perm, lam=lam)[name](*(x.double() for x in z), t0).sum()
        assert math.isfinite(float(v)), (name, t0)
        # float16 inputs get float16 gradients (largest 65504), of order 1/t: documented, not refused
        if dtype != torch.float16 or t0 >= 1e-3:
            assert all(bool(torch.isfinite(x).all()) for x in grads), (name, t0)
        # rounding of similarities of size 1/t: a few units of the compute dtype per unit of 1/t
        tol = 50 * torch.finfo(compute).eps * max(1.0, 1.0 / t0) * (1 + abs(float(expected)) * t0)
        assert abs(float(v) - float(expected)) <= tol, (name, t0, float(v), float(expected))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["dense", "tiled"])
def test_half_precision_inputs_are_finite_at_scale_100(dtype, backend, small_tiles):
    z, perm, lam = pair(n=17, d=8, seed=7)
    z = [x.to(dtype) for x in z]
    for name, fn in losses("paper", backend, perm=perm, lam=lam.float(), target=0.05).items():
        for t in (0.01, leaf(0.01, torch.float32)):
            leaves = [x.clone().requires_grad_() for x in z]
            v = fn(*leaves, t).sum()
            assert v.dtype == torch.float32 and math.isfinite(float(v)), name
            grads = torch.autograd.grad(v, leaves + ([t] if isinstance(t, torch.Tensor) else []))
            assert all(bool(torch.isfinite(g).all()) for g in grads), name


def test_min_temperature():
    assert F.min_temperature(torch.float32) == 2.0**-39 == F.min_temperature(torch.float16) == F.min_temperature(torch.bfloat16)
    assert F.min_temperature(torch.float64) == 2.0**-338
    # what the range is for: 1/t^3 stays a factor 2^10 below the first power of two above the largest float
    for dtype in (torch.float32, torch.float64):
        assert 3 * -math.log2(F.min_temperature(dtype)) + 10 <= math.frexp(torch.finfo(dtype).max)[1]
    a, b = pair()[0]
    with pytest.raises(ValueError, match="pass float64 embeddings"):
        F.clip_loss(a.float(), b.float(), temperature=1e-13)
    assert math.isfinite(float(F.clip_loss(a, b, temperature=1e-13)))


# ----------------------------------------------------------------------------- checks


@pytest.mark.parametrize(
    "t, error, match",
    [
        (torch.tensor([0.1]), ValueError, r"^temperature must be a real number or a 0-dim tensor; got a tensor of shape \(1,\)"),
        (torch.tensor(1), TypeError, "^temperature must be a floating tensor"),
        (torch.tensor(-0.1), ValueError, "^temperature must be a finite number > 0; got a tensor holding -0.1"),
        (torch.tensor(0.0), ValueError, "^temperature must be a finite number > 0"),
        (torch.tensor(float("nan")), ValueError, "^temperature must be a finite number > 0; got a tensor holding nan"),
        (torch.tensor(float("inf")), ValueError, "^temperature must be a finite number > 0"),
        (torch.tensor(1e-200, dtype=torch.float64), ValueError, "^temperature = 1e-200 is below the smallest supported temperature"),
        (torch.tensor(0.1, device="meta"), ValueError, "^temperature is on meta but the embeddings are on cpu"),
    ],
)
def test_bad_tensor_temperatures_are_refused_by_name(t, error, match):
    a, b = pair()[0]
    with pytest.raises(error, match=match):
        F.clip_loss(a, b, temperature=t)
    with pytest.raises(error, match=match.replace("temperature", "target_temperature", 1)):
        F.multisoftclip_pair(a, b, target_temperature=t)


def test_value_checks_off_skip_the_value_of_a_tensor_temperature():
    a, b = pair()[0]
    with m3co_loss.value_checks(False):
        F.clip_loss(a, b, temperature=torch.tensor(-0.1))  # not read: no host synchronisation
        with pytest.raises(ValueError, match="0-dim"):  # the free checks stay on
            F.clip_loss(a, b, temperature=torch.ones(2))
    with pytest.raises(TypeError, match="^detach_targets must be a bool"):
        F.multisoftclip([a, b], detach_targets=1)


def test_temperature_tensor_of_another_dtype_is_cast_and_receives_its_gradient():
    a, b = pair(dtype=torch.float32)[0]
    t = leaf(0.1, torch.float64)
    F.multisoftclip([a, b], temperature=t, backend="tiled").backward()
    assert t.grad is not None and t.grad.dtype == torch.float64
    expected = torch.autograd.grad(F.multisoftclip([a, b], temperature=(t32 := leaf(0.1, torch.float32)), backend="dense"), t32)[0]
    torch.testing.assert_close(t.grad.float(), expected, rtol=1e-4, atol=1e-5)


def test_backends_dispatch_the_temperatures():
    a, b = (backends.Rows(x, x, 0) for x in (F.normalize(z) for z in pair()[0]))
    t = leaf(0.2)
    v = backends.multisoftclip_pairs([a, b], {(0, 1): (1.0, 1.0)}, t, reference=False, backend="tiled", target_t=0.3, detach_targets=True)
    w = backends.multisoftclip_pairs([a, b], {(0, 1): (1.0, 1.0)}, t, reference=False, backend="dense", target_t=0.3, detach_targets=True)
    torch.testing.assert_close(v, w, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- the quickstart


def quickstart_block() -> str:
    """The code block after the ``.. learnable-temperature`` comment of docs/quickstart.rst."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "quickstart.rst").read_text()
    match = re.search(r"\.\. learnable-temperature[^\n]*\n\n\.\. code-block:: python\n\n((?:    [^\n]*\n|\n)+)", text)
    assert match, "docs/quickstart.rst lost its learnable-temperature block"
    return textwrap.dedent(match.group(1))


def test_quickstart_learns_the_temperature_as_documented(capsys):
    torch.manual_seed(0)
    namespace: dict = {}
    exec(compile(quickstart_block(), "quickstart.rst", "exec"), namespace)
    criterion = namespace["criterion"]
    t = criterion.temperature.item()
    assert capsys.readouterr().out == f"temperature {t:.4f}\n"
    assert abs(t - 0.07) > 1e-3 and 0.01 <= t <= 1.0  # learned, within the clamp
    assert set(criterion.state_dict()) == {"logit_scale"}


# ----------------------------------------------------------------------------- modules that learn it


def test_modules_learn_a_log_scale_initialised_from_temperature():
    z, perm, lam = pair(n=10, d=4, seed=8)
    for module, call in (
        (m3co_loss.CLIPLoss(temperature=0.07, learn_temperature=True), lambda m, t: m(*z) if t is None else F.clip_loss(*z, temperature=t)),
        (
            m3co_loss.MultiSClipLoss(temperature=0.2, target_temperature=0.3, learn_temperature=True),
            lambda m, t: m(z) if t is None else F.multisoftclip(z, temperature=t, target_temperature=0.3),
        ),
    ):
        module.double()
        t0 = 1.0 / math.exp(module.logit_scale.item())
        assert set(module.state_dict()) == {"logit_scale"}
        # the loss of the module is the function's at the same temperature, and
        # d/d logit_scale = dL/dt * dt/d logit_scale = -t dL/dt
        t = leaf(t0)
        expected = call(module, t)
        (dt,) = torch.autograd.grad(expected, t)
        got = call(module, None)
        (ds,) = torch.autograd.grad(got, module.logit_scale)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ds, -t0 * dt, rtol=1e-10, atol=1e-12)
    assert m3co_loss.CLIPLoss(temperature=0.07, learn_temperature=True).temperature.item() == pytest.approx(0.07, rel=1e-6)


def test_learned_temperature_is_clamped_to_its_range():
    criterion = m3co_loss.CLIPLoss(temperature=0.5, learn_temperature=True, min_scale=2.0, max_scale=50.0).double()
    a, b = pair()[0]
    for logit_scale, expected in ((math.log(1000.0), 1 / 50.0), (math.log(1.1), 1 / 2.0), (math.log(10.0), 0.1)):
        with torch.no_grad():
            criterion.logit_scale.fill_(logit_scale)
        assert criterion.temperature.item() == pytest.approx(expected, rel=1e-12)
        (grad,) = torch.autograd.grad(criterion(a, b), criterion.logit_scale)
        torch.testing.assert_close(criterion(a, b), F.clip_loss(a, b, temperature=expected), rtol=1e-12, atol=1e-12)
        assert (float(grad) == 0) == (expected != 0.1)  # no gradient outside the range


def test_learned_temperatures_travel_in_state_dicts():
    source = m3co_loss.M3CoLoss(temperature=0.05, multisclip_temperature=0.2, learn_temperature=True, total_steps=3)
    assert set(source.state_dict()) == {"logit_scale", "multisclip_logit_scale", "step_count"}
    with torch.no_grad():
        source.logit_scale.add_(0.5)
        source.multisclip_logit_scale.sub_(0.25)
    target = m3co_loss.M3CoLoss(learn_temperature=True, total_steps=3)
    target.load_state_dict(source.state_dict())
    assert target.temperature.item() == pytest.approx(0.05 / math.exp(0.5), rel=1e-6)
    assert target.multisclip_temperature.item() == pytest.approx(0.2 * math.exp(0.25), rel=1e-6)
    # a module with fixed temperatures has no parameter: old checkpoints still load
    assert list(m3co_loss.M3CoLoss().parameters()) == [] and set(m3co_loss.M3CoLoss().state_dict()) == {"step_count"}
    assert "learned" in repr(target) and "learned" not in repr(m3co_loss.M3CoLoss())


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("target, detach", [(0.3, True), (0.3, False), (None, True), (None, False)])
@pytest.mark.parametrize("module", ["MultiSClipLoss", "M3CoLoss"])
def test_multisclip_modules_pass_their_soft_target_options(module, convention, target, detach):
    """MultiSClipLoss, and M3CoLoss in its MultiSClip phase, learning the temperature: the value and
    the gradients (embeddings and log-scale) are the function's at the same tensor temperature with
    the same soft-target options. Without a target temperature the soft targets use the learned
    one, so its gradient includes the targets' share unless they are detached."""
    g = torch.Generator().manual_seed(12)
    z = [torch.randn(8, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    if module == "MultiSClipLoss":
        criterion = m3co_loss.MultiSClipLoss(
            temperature=0.2, target_temperature=target, detach_targets=detach, learn_temperature=True, convention=convention
        )
        scale, beta, call = "logit_scale", 1.0, lambda x: criterion(x)
    else:
        criterion = m3co_loss.M3CoLoss(
            temperature=0.05, multisclip_temperature=0.2, multisclip_target_temperature=target, detach_targets=detach,
            learn_temperature=True, convention=convention, total_steps=4, beta=0.5,
        )
        scale, beta, call = "multisclip_logit_scale", 0.5, lambda x: criterion(x, step=3)
        assert criterion.phase(3) == "multisclip"
    criterion.double()
    s = getattr(criterion, scale)
    t0 = 1.0 / math.exp(s.item())

    def function(t, tt, detach=detach):
        leaves = [x.clone().requires_grad_() for x in z]
        value = beta * F.multisoftclip(leaves, temperature=t, target_temperature=tt, detach_targets=detach, convention=convention)
        return [value.detach(), *torch.autograd.grad(value, leaves + [t])]

    t = leaf(t0)
    expected = function(t, target)
    expected[-1] = -t0 * expected[-1]  # d/d log-scale = dL/dt * dt/d log-scale = -t dL/dt
    leaves = [x.clone().requires_grad_() for x in z]
    value = call(leaves)
    got = [value.detach(), *torch.autograd.grad(value, leaves + [s])]
    for name, x, y in zip(["value", "z0", "z1", "z2", scale], got, expected):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")
    # the options are those of the module: other options give another value or other gradients
    if target is not None:
        assert not torch.allclose(got[0], function(leaf(t0), None)[0])
    assert not torch.allclose(got[1], function(leaf(t0), target, not detach)[1])
    if target is None:
        # the learned temperature's gradient with the soft targets' temperature held at the float t0
        held = function(leaf(t0), t0)
        torch.testing.assert_close(held[0], got[0], rtol=1e-12, atol=1e-12)
        if detach:  # detached targets carry no gradient to the temperature either
            torch.testing.assert_close(got[-1], -t0 * held[-1], rtol=1e-10, atol=1e-12)
        else:
            assert not torch.allclose(got[-1], -t0 * held[-1])


def test_m3co_module_learns_each_temperature_in_its_phase():
    z = [x.float() for x in pair(n=8, d=4, seed=9)[0]]
    criterion = m3co_loss.M3CoLoss(learn_temperature=True, total_steps=3, generator=torch.Generator().manual_seed(0))
    for step, learned, idle in ((0, "logit_scale", "multisclip_logit_scale"), (2, "multisclip_logit_scale", "logit_scale")):
        criterion.zero_grad(set_to_none=True)
        criterion(z, step=step).backward()
        assert getattr(criterion, learned).grad is not None and float(getattr(criterion, learned).grad) != 0
        assert getattr(criterion, idle).grad is None


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(temperature=0.005, learn_temperature=True), ValueError, r"^temperature=0.005 lies outside the learnable range \[1/max_scale, 1/min_scale\]"),
        (dict(learn_temperature=1), TypeError, "^learn_temperature must be a bool"),
        (dict(min_scale=10.0, max_scale=5.0), ValueError, "^min_scale must be below max_scale"),
        (dict(max_scale=0.0), ValueError, "^max_scale"),
        (dict(temperature=torch.tensor(0.1)), TypeError, "^temperature must be a real number; for a learnable temperature pass learn_temperature=True"),
    ],
)
def test_module_options_of_a_learned_temperature_are_checked(kwargs, error, match):
    with pytest.raises(error, match=match):
        m3co_loss.CLIPLoss(**kwargs)
    with pytest.raises(error, match=match.replace("^temperature", "^(multisclip_)?temperature")):
        m3co_loss.M3CoLoss(**{("multisclip_temperature" if k == "temperature" else k): v for k, v in kwargs.items()})
