"""Properties of the losses, and agreement with the literal equations (tests/literal.py)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import literal
import m3co_loss
from m3co_loss import functional as F
from m3co_loss.mixup import MixupPlan
from strategies import cases, mixing_cases, temperatures

CONVENTIONS = ["paper", "reference"]


def close(x, y, rtol=1e-7, atol=1e-10):
    torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


def grads(fn, tensors):
    tensors = [t.detach().clone().requires_grad_(True) for t in tensors]
    value = fn(*tensors)
    return value.detach(), torch.autograd.grad(value, tensors, allow_unused=True)


def assert_same_value_and_grad(fast, slow, tensors, rtol=1e-7):
    v1, g1 = grads(fast, tensors)
    v2, g2 = grads(slow, tensors)
    close(v1, v2, rtol=rtol)
    for a, b in zip(g1, g2):
        a = torch.zeros_like(tensors[0]) if a is None else a
        b = torch.zeros_like(tensors[0]) if b is None else b
        close(a, b, rtol=rtol, atol=1e-9)


# ----------------------------------------------------------------------------- literal agreement


@example(case=mixing_cases()[0], t=0.1, convention="paper")
@example(case=mixing_cases()[0], t=0.1, convention="reference")
@example(case=mixing_cases()[1], t=0.1, convention="paper")
@example(case=mixing_cases()[1], t=0.1, convention="reference")
@given(case=cases(), t=temperatures, convention=st.sampled_from(CONVENTIONS))
def test_m3co_pair_matches_literal(backend, case, t, convention):
    perm, lam = case.perms[0], case.lams[0]
    slow_pair = literal.m3co_pair_paper if convention == "paper" else literal.m3co_pair_released
    assert_same_value_and_grad(
        lambda a, b: F.m3co_pair(a, b, perm, lam, temperature=t, convention=convention, backend=backend),
        lambda a, b: slow_pair(a, b, perm, lam, t),
        [case.mixed[0], case.z[1]],
    )


@given(case=cases(), t=temperatures)
def test_clip_loss_matches_literal(backend, case, t):
    assert_same_value_and_grad(
        lambda a, b: F.clip_loss(a, b, temperature=t, backend=backend), lambda a, b: literal.clip(a, b, t), case.z
    )


@given(case=cases(), t=temperatures, convention=st.sampled_from(CONVENTIONS))
def test_multisoftclip_pair_matches_literal(backend, case, t, convention):
    slow_pair = literal.multisoftclip_pair_paper if convention == "paper" else literal.multisoftclip_pair_released
    assert_same_value_and_grad(
        lambda a, b: F.multisoftclip_pair(a, b, temperature=t, convention=convention, backend=backend),
        lambda a, b: slow_pair(a, b, t),
        case.z,
    )


@example(case=mixing_cases(3)[0], t=0.125, convention="paper", partner=None)
@example(case=mixing_cases(3)[0], t=0.125, convention="reference", partner=None)
@example(case=mixing_cases(3)[1], t=0.125, convention="paper", partner=None)
@example(case=mixing_cases(3)[1], t=0.125, convention="reference", partner=None)
@given(
    case=cases(modalities=2, max_modalities=4, max_n=6),
    t=temperatures,
    convention=st.sampled_from(CONVENTIONS),
    partner=st.sampled_from([None, "clean", "mixed"]),
)
def test_m3co_matches_literal(backend, case, t, convention, partner):
    m = len(case.z)
    assert_same_value_and_grad(
        lambda *x: F.m3co(list(x[:m]), list(x[m:]), case.perms, case.lams, temperature=t, convention=convention, partner=partner, backend=backend),
        lambda *x: literal.m3co(list(x[:m]), list(x[m:]), case.perms, case.lams, t, convention, partner),
        case.mixed + case.z,
    )


@given(case=cases(modalities=2, max_modalities=4, max_n=6), t=temperatures, convention=st.sampled_from(CONVENTIONS))
def test_multisoftclip_matches_literal(backend, case, t, convention):
    assert_same_value_and_grad(
        lambda *x: F.multisoftclip(list(x), temperature=t, convention=convention, backend=backend),
        lambda *x: literal.multisoftclip(list(x), t, convention),
        case.z,
    )


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("target, detach", [(0.3, False), (0.3, True), ("tensor", False), ("tensor", True), (None, True)])
def test_multisoftclip_target_options_match_literal(small_tiles, convention, target, detach):
    """``target_temperature`` and ``detach_targets`` over three modalities, the temperatures
    tensors: the value and every gradient (embeddings, t, t') equal the literal sum over pairs."""
    g = torch.Generator().manual_seed(21)
    z = [torch.randn(7, 4, generator=g, dtype=torch.float64) for _ in range(3)]

    def values_and_grads(loss):
        leaves = [x.clone().requires_grad_() for x in z]
        t, t_target = torch.tensor(0.15, dtype=torch.float64, requires_grad=True), torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
        value = loss(leaves, t, t_target if target == "tensor" else target)
        return [value.detach(), *torch.autograd.grad(value, leaves + [t, t_target], allow_unused=True, materialize_grads=True)]

    expected = values_and_grads(lambda x, t, tt: literal.multisoftclip(x, t, convention, target_t=tt, detach=detach))
    for backend in ("dense", "tiled"):
        got = values_and_grads(
            lambda x, t, tt: F.multisoftclip(x, temperature=t, target_temperature=tt, detach_targets=detach, convention=convention, backend=backend)
        )
        for name, x, y in zip(["value", "z0", "z1", "z2", "t", "t'"], got, expected):
            torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12, msg=lambda m, where=(backend, name): f"{where}: {m}")
    # the options change the loss: without them the value (t' != t) or the gradients (detached) differ
    plain = values_and_grads(lambda x, t, tt: F.multisoftclip(x, temperature=t, convention=convention))
    if target is not None:
        assert not torch.allclose(plain[0], expected[0])
    if detach:
        assert not torch.allclose(plain[1], expected[1])


@given(case=cases(modalities=2, max_modalities=3), t=st.sampled_from([0.07, 0.2, 1.0]), data=st.data())
def test_unis_mmc_matches_literal(case, t, data):
    n = case.n
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 1000)))
    classes = data.draw(st.integers(2, 4))
    y = torch.randint(0, classes, (n,), generator=g)
    logits = [torch.randn(n, classes, generator=g, dtype=torch.float64) for _ in case.z]
    assert_same_value_and_grad(
        lambda *r: F.unis_mmc(list(r), logits, y, temperature=t), lambda *r: literal.unis_mmc(list(r), logits, y, t), case.z
    )


# ----------------------------------------------------------------------------- the released computation


def released_plan(num: int, n: int = 7, seed: int = 11) -> MixupPlan:
    """Per-modality permutations with fixed points and mixing weights with unmixed rows (lam = 1),
    exact 0 and a fixed point left unmixed: every case of the released target matrix."""
    g = torch.Generator().manual_seed(seed)
    perms, lams = [], []
    for m in range(num):
        fixed = {m % n, (m + 3) % n}
        moving = torch.tensor([i for i in range(n) if i not in fixed])
        perm = torch.arange(n)
        perm[moving] = moving[torch.randperm(len(moving), generator=g)]
        if torch.equal(perm, torch.arange(n)):
            perm[moving] = moving.roll(1)
        lam = torch.rand(n, generator=g, dtype=torch.float64)
        lam[(m + 3) % n] = 1.0  # an unmixed fixed point (the released code drops this row)
        lam[(m + 1) % n] = 1.0  # an unmixed row (its partner gets no weight)
        lam[(m + 2) % n] = 0.0  # a row that is all partner
        perms.append(perm)
        lams.append(lam)
    return MixupPlan(tuple(perms), torch.stack(lams))


@pytest.mark.parametrize("num", [2, 3, 4])
def test_reference_m3co_is_the_released_computation(backend, num):
    """Module and function, value and gradient, against a loop transcription of the released
    computation: every modality mixed first, then mixed m against *mixed* m+1."""
    t = 0.1
    g = torch.Generator().manual_seed(num)
    z = [torch.randn(7, 4, generator=g, dtype=torch.float64) for _ in range(num)]
    plan = released_plan(num)
    assert all(bool((p == torch.arange(7)).any()) and not torch.equal(p, torch.arange(7)) for p in plan.perms)
    expected, expected_grads = grads(lambda *x: literal.m3co_released(list(x), plan.perms, plan.lam, t), z)
    module = m3co_loss.M3CoLoss(convention="reference", temperature=t, beta=1.0, backend=backend)
    kw = dict(temperature=t, convention="reference", backend=backend)
    calls = {
        "M3CoLoss": lambda *x: module(list(x), plan=plan),
        "m3co": lambda *x: F.m3co([plan.mix(v, m) for m, v in enumerate(x)], None, plan.perms, plan.lam, **kw),
    }
    for name, fn in calls.items():
        value, gradients = grads(fn, z)
        close(value, expected, rtol=1e-12, atol=1e-12)
        for m, (got, want) in enumerate(zip(gradients, expected_grads)):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=lambda msg, name=name, m=m: f"{name}, gradient of z[{m}]: {msg}")


def test_reference_m3co_loss_draws_what_the_released_code_draws(backend):
    """The module's own draw (half the rows mixed, lam per modality) goes through the same computation."""
    z = [torch.randn(9, 3, generator=torch.Generator().manual_seed(m), dtype=torch.float64) for m in range(3)]
    criterion = m3co_loss.M3CoLoss(convention="reference", beta=1.0, backend=backend, generator=torch.Generator().manual_seed(4))
    plan = m3co_loss.MixupSampler.for_convention("reference", generator=torch.Generator().manual_seed(4)).sample(9, 3)
    assert not torch.equal(plan.lam[0], plan.lam[1]) and bool((plan.lam == 1).any())
    close(criterion(z), literal.m3co_released(z, plan.perms, plan.lam.double(), 0.1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", mixing_cases(3), ids=["mixed-embeddings", "encoded-mixed-inputs"])
def test_default_partners_of_the_conventions(backend, case):
    """reference: mixed partners, for which clean is not needed; paper: clean partners. (The
    values of each partner under each convention are checked against tests/literal.py above.)"""
    ref = dict(convention="reference", backend=backend)
    released = F.m3co(case.mixed, case.z, case.perms, case.lams, **ref)
    assert torch.equal(F.m3co(case.mixed, None, case.perms, case.lams, **ref), released)
    assert torch.equal(F.m3co(case.mixed, case.z, case.perms, case.lams, partner="mixed", **ref), released)
    assert not torch.allclose(F.m3co(case.mixed, case.z, case.perms, case.lams, partner="clean", **ref), released)
    paper = dict(convention="paper", backend=backend)
    assert torch.equal(F.m3co(case.mixed, case.z, case.perms, case.lams, **paper), F.m3co(case.mixed, case.z, case.perms, case.lams, partner="clean", **paper))


# ----------------------------------------------------------------------------- identities


@given(case=cases(), t=temperatures)
def test_lam_one_makes_m3co_pair_clip(backend, case, t):
    ones = torch.ones(case.n, dtype=torch.float64)
    close(
        F.m3co_pair(case.z[0], case.z[1], case.perms[0], ones, temperature=t, backend=backend),
        F.clip_loss(case.z[0], case.z[1], temperature=t, backend=backend),
    )
    # the released convention averages the two directions
    close(
        F.m3co_pair(case.z[0], case.z[1], case.perms[0], ones, temperature=t, convention="reference", backend=backend),
        0.5 * F.clip_loss(case.z[0], case.z[1], temperature=t, backend=backend),
    )


def _relabel(case, sigma):
    inv = torch.argsort(sigma)
    perms = [inv[p[sigma]] for p in case.perms]
    return [x[sigma] for x in case.z], [x[sigma] for x in case.mixed], perms, [lam[sigma] for lam in case.lams]


@given(case=cases(max_modalities=3), t=temperatures, convention=st.sampled_from(CONVENTIONS), seed=st.integers(0, 10**6))
def test_relabelling_the_batch_changes_nothing(backend, case, t, convention, seed):
    sigma = torch.randperm(case.n, generator=torch.Generator().manual_seed(seed))
    z, mixed, perms, lams = _relabel(case, sigma)
    kw = dict(temperature=t, reduction="none", convention=convention, backend=backend)
    close(F.m3co(mixed, z, perms, lams, **kw), F.m3co(case.mixed, case.z, case.perms, case.lams, **kw)[sigma])
    close(F.multisoftclip(z, **kw), F.multisoftclip(case.z, **kw)[sigma])
    kw.pop("convention")
    close(F.clip_loss(z[0], z[1], **kw), F.clip_loss(case.z[0], case.z[1], **kw)[sigma])


@given(case=cases(), t=temperatures, convention=st.sampled_from(CONVENTIONS), seed=st.integers(0, 10**6))
def test_invariant_to_positive_rescaling_and_rotation(backend, case, t, convention, seed):
    g = torch.Generator().manual_seed(seed)
    d = case.z[0].shape[1]
    rotation, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))

    def transform(x):
        return (x @ rotation) * (0.1 + 10 * torch.rand(x.shape[0], 1, generator=g, dtype=torch.float64))

    kw = dict(temperature=t, convention=convention, backend=backend)
    close(
        F.m3co([transform(x) for x in case.mixed], [transform(x) for x in case.z], case.perms, case.lams, **kw),
        F.m3co(case.mixed, case.z, case.perms, case.lams, **kw),
    )
    close(F.multisoftclip([transform(x) for x in case.z], **kw), F.multisoftclip(case.z, **kw))
    kw.pop("convention")
    close(F.clip_loss(transform(case.z[0]), transform(case.z[1]), **kw), F.clip_loss(case.z[0], case.z[1], **kw))


@given(case=cases(max_modalities=3), t=temperatures, convention=st.sampled_from(CONVENTIONS))
def test_reductions_agree(backend, case, t, convention):
    for fn in (
        lambda r: F.m3co(case.mixed, case.z, case.perms, case.lams, temperature=t, reduction=r, convention=convention, backend=backend),
        lambda r: F.multisoftclip(case.z, temperature=t, reduction=r, convention=convention, backend=backend),
        lambda r: F.m3co_pair(case.mixed[0], case.z[1], case.perms[0], case.lams[0], temperature=t, reduction=r, convention=convention, backend=backend),
        lambda r: F.multisoftclip_pair(case.z[0], case.z[1], temperature=t, reduction=r, convention=convention, backend=backend),
        lambda r: F.clip_loss(case.z[0], case.z[1], temperature=t, reduction=r, backend=backend),
    ):
        vector = fn("none")
        assert vector.shape == (case.n,)
        close(vector.mean(), fn("mean"))
        close(vector.sum(), fn("sum"))


@given(case=cases(modalities=3, max_modalities=4, max_n=6), t=temperatures)
def test_aggregates_are_sums_over_pairs(backend, case, t):
    m = len(case.z)
    kw = dict(temperature=t, reduction="none", backend=backend)
    expected = sum(
        0.5 * (F.m3co_pair(case.mixed[a], case.z[b], case.perms[a], case.lams[a], **kw) + F.m3co_pair(case.mixed[b], case.z[a], case.perms[b], case.lams[b], **kw))
        for a in range(m)
        for b in range(a + 1, m)
    )
    close(F.m3co(case.mixed, case.z, case.perms, case.lams, **kw), expected)
    expected = sum(
        0.5 * (F.multisoftclip_pair(case.z[a], case.z[b], **kw) + F.multisoftclip_pair(case.z[b], case.z[a], **kw))
        for a in range(m)
        for b in range(a + 1, m)
    )
    close(F.multisoftclip(case.z, **kw), expected)
    # released convention: cyclic, one direction each, against the next modality's mixed embeddings
    ref = dict(kw, convention="reference")
    close(
        F.m3co(case.mixed, case.z, case.perms, case.lams, **ref),
        sum(F.m3co_pair(case.mixed[k], case.mixed[(k + 1) % m], case.perms[k], case.lams[k], **ref) for k in range(m)),
    )
    close(
        F.m3co(case.mixed, case.z, case.perms, case.lams, partner="clean", **ref),
        sum(F.m3co_pair(case.mixed[k], case.z[(k + 1) % m], case.perms[k], case.lams[k], **ref) for k in range(m)),
    )
    close(F.multisoftclip(case.z, **ref), sum(F.multisoftclip_pair(case.z[(k + 1) % m], case.z[k], **ref) for k in range(m)))


@given(case=cases(), t=temperatures, partner=st.sampled_from(["clean", "mixed"]))
def test_two_modalities_conventions_agree_for_m3co_with_the_same_partner(backend, case, t, partner):
    kw = dict(temperature=t, backend=backend, partner=partner)
    close(
        F.m3co(case.mixed, case.z, case.perms, case.lams, convention="paper", **kw),
        F.m3co(case.mixed, case.z, case.perms, case.lams, convention="reference", **kw),
    )


@given(case=cases(max_modalities=3), t=temperatures, convention=st.sampled_from(CONVENTIONS))
def test_every_term_is_non_negative(backend, case, t, convention):
    kw = dict(temperature=t, reduction="none", backend=backend)
    tol = -1e-12
    assert (F.m3co_pair(case.mixed[0], case.z[1], case.perms[0], case.lams[0], convention=convention, **kw) >= tol).all()
    assert (F.multisoftclip_pair(case.z[0], case.z[1], convention=convention, **kw) >= tol).all()
    assert (F.clip_loss(case.z[0], case.z[1], **kw) >= tol).all()
    assert (F.m3co(case.mixed, case.z, case.perms, case.lams, convention=convention, **kw) >= tol).all()
    assert (F.multisoftclip(case.z, convention=convention, **kw) >= tol).all()


def test_multisoftclip_tends_to_clip_for_orthogonal_embeddings(backend):
    g = torch.Generator().manual_seed(0)
    n, d = 6, 16
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    z_a = basis[:n] + 1e-3 * torch.randn(n, d, generator=g, dtype=torch.float64)
    z_b = z_a + torch.randn(n, d, generator=g, dtype=torch.float64)
    gaps = []
    for t in (0.5, 0.2, 0.1, 0.05, 0.02):
        soft = F.multisoftclip_pair(z_a, z_b, temperature=t, backend=backend)
        hard = F.clip_loss(z_a, z_b, temperature=t, backend=backend)
        gaps.append(float(abs(soft - hard) / hard))
    # W = softmax(p_a p_a^T / t) tends to the identity, off-diagonal weight ~ (n - 1) e^{-1/t}
    assert all(later < earlier for earlier, later in zip(gaps, gaps[1:])), gaps
    assert gaps[-1] < 1e-12 and gaps[0] > 1e-3, gaps


# ----------------------------------------------------------------------------- precision


@given(case=cases(min_n=3, max_n=8, max_d=6, max_modalities=3), t=temperatures, convention=st.sampled_from(CONVENTIONS))
def test_float32_agrees_with_float64(backend, case, t, convention):
    def both(fn):
        return fn(lambda x: x.float()), fn(lambda x: x)

    for lo, hi in (
        both(lambda c: F.m3co([c(x) for x in case.mixed], [c(x) for x in case.z], case.perms, [c(l) for l in case.lams], temperature=t, convention=convention, backend=backend)),
        both(lambda c: F.multisoftclip([c(x) for x in case.z], temperature=t, convention=convention, backend=backend)),
        both(lambda c: F.clip_loss(c(case.z[0]), c(case.z[1]), temperature=t, backend=backend)),
    ):
        assert lo.dtype == torch.float32
        torch.testing.assert_close(lo.double(), hi, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("convention", CONVENTIONS)
def test_half_precision_inputs_accumulate_in_float32(backend, dtype, convention):
    g = torch.Generator().manual_seed(1)
    n, d, t = 24, 32, 0.01
    z = [torch.randn(n, d, generator=g) for _ in range(3)]
    perms = [torch.randperm(n, generator=g) for _ in range(3)]
    lam = torch.rand(n, generator=g)
    mixed = [lam[:, None] * x + (1 - lam[:, None]) * x[p] for x, p in zip(z, perms)]
    low = [x.to(dtype) for x in z]
    low_mixed = [x.to(dtype) for x in mixed]
    # compare against float32 on the same rounded inputs: only accumulation may differ
    pairs = [
        (F.m3co(low_mixed, low, perms, lam, temperature=t, convention=convention, backend=backend),
         F.m3co([x.float() for x in low_mixed], [x.float() for x in low], perms, lam, temperature=t, convention=convention, backend="dense")),
        (F.multisoftclip(low, temperature=t, convention=convention, backend=backend),
         F.multisoftclip([x.float() for x in low], temperature=t, convention=convention, backend="dense")),
        (F.clip_loss(low[0], low[1], temperature=t, backend=backend), F.clip_loss(low[0].float(), low[1].float(), temperature=t, backend="dense")),
    ]
    for value, reference in pairs:
        assert value.dtype == torch.float32
        assert torch.isfinite(value)
        torch.testing.assert_close(value, reference, rtol=1e-4, atol=1e-3)


def test_autocast_does_not_lower_the_precision():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)
    expected = F.clip_loss(a, b, temperature=0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = F.clip_loss(a, b, temperature=0.05)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, expected)


def test_zero_vectors_give_finite_values_and_gradients(backend):
    g = torch.Generator().manual_seed(7)
    z_a = torch.randn(5, 4, generator=g, dtype=torch.float64)
    z_b = torch.randn(5, 4, generator=g, dtype=torch.float64)
    z_a[1] = 0
    z_b[3] = 0
    z_a.requires_grad_(True)
    z_b.requires_grad_(True)
    perm = torch.tensor([1, 0, 2, 4, 3])
    lam = torch.tensor([0.3, 1.0, 0.0, 0.5, 0.9], dtype=torch.float64)
    for fn in (
        lambda: F.m3co_pair(z_a, z_b, perm, lam, backend=backend),
        lambda: F.multisoftclip_pair(z_a, z_b, backend=backend),
        lambda: F.multisoftclip_pair(z_b, z_a, temperature=0.005, backend=backend),
        lambda: F.clip_loss(z_a, z_b, temperature=0.01, backend=backend),
    ):
        value = fn()
        ga, gb = torch.autograd.grad(value, (z_a, z_b))
        assert torch.isfinite(value) and torch.isfinite(ga).all() and torch.isfinite(gb).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("checks", [True, False])  # off, every row is divided by its peak (or 1)
def test_normalize_keeps_zero_rows_zero(dtype, checks):
    """As documented: zero rows stay exactly zero, with finite gradients; the other rows and all
    gradients are torch's ``F.normalize(eps=1e-12)`` in float64."""
    g = torch.Generator().manual_seed(8)
    z = torch.randn(6, 4, generator=g, dtype=torch.float64)
    z[1] = 0
    z[4] = 0
    z[3] *= 1e30  # a row that takes the rescaling path with value checks on as well
    w = torch.randn(6, 4, generator=g, dtype=torch.float64)
    x = z.to(dtype).requires_grad_()
    with m3co_loss.value_checks(checks):
        p = F.normalize(x)
    (grad,) = torch.autograd.grad((p * w.to(p.dtype)).sum(), x)
    assert torch.equal(p[[1, 4]], torch.zeros(2, 4, dtype=p.dtype))
    assert torch.isfinite(grad).all()
    ref = z.to(dtype).double().requires_grad_()
    expected = torch.nn.functional.normalize(ref, dim=-1, eps=1e-12)
    (expected_grad,) = torch.autograd.grad((expected * w).sum(), ref)
    rtol = 1e-12 if dtype == torch.float64 else 1e-6
    close(p.double(), expected.detach(), rtol=rtol, atol=rtol)
    close(grad.double(), expected_grad, rtol=rtol, atol=0.0)


@pytest.mark.parametrize("scale", [1e-40, 1e20, 1e30])  # a subnormal batch; norms that overflow float32
def test_extreme_but_finite_scales_keep_the_value(backend, scale):
    g = torch.Generator().manual_seed(4)
    a, b, c = (torch.randn(7, 5, generator=g) for _ in range(3))
    perm, lam = torch.randperm(7, generator=g), torch.rand(7, generator=g)
    calls = {
        "m3co_pair": lambda x: F.m3co_pair(x, b, perm, lam, backend=backend),
        "m3co": lambda x: F.m3co([x, b, c], [b, c, a], [perm] * 3, lam, backend=backend),
        "multisoftclip": lambda x: F.multisoftclip([x, b, c], backend=backend),
        "clip_loss": lambda x: F.clip_loss(x, b, backend=backend),
    }
    for name, fn in calls.items():
        for checks in (True, False):  # with value checks off the rescaling runs without reading the data
            with m3co_loss.value_checks(checks):
                torch.testing.assert_close(fn(a * scale), fn(a), rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    if scale > 1:  # the gradient scales by 1 / scale (below 1 it overflows float32 itself)
        x = (a * scale).requires_grad_(True)
        y = a.clone().requires_grad_(True)
        (gx,), (gy,) = torch.autograd.grad(F.clip_loss(x, b, backend=backend), x), torch.autograd.grad(F.clip_loss(y, b, backend=backend), y)
        torch.testing.assert_close(gx * scale, gy, rtol=1e-4, atol=1e-6)


def test_inputs_of_different_dtypes_are_promoted_together(backend):
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(6, 4, generator=g)
    perm, lam = torch.randperm(6, generator=g), torch.rand(6, generator=g)
    for low in (torch.float32, torch.float16, torch.bfloat16):
        x, y = a.clone().requires_grad_(True), b.to(low).requires_grad_(True)
        value = F.m3co_pair(x, y, perm, lam, backend=backend)
        assert value.dtype == torch.float64
        torch.testing.assert_close(value, F.m3co_pair(a, y.detach().double(), perm, lam, backend=backend))
        gx, gy = torch.autograd.grad(value, (x, y))
        assert gx.dtype == torch.float64 and gy.dtype == low
        assert F.multisoftclip([x, y], backend=backend).dtype == torch.float64
        assert F.clip_loss(y, x, backend=backend).dtype == torch.float64


def test_second_derivatives_dense_exact_and_kernels_refuse(backend):
    a, b, c, perm, lam = _gradcheck_inputs()
    calls = {
        "m3co_pair": (lambda x, y: F.m3co_pair(x, y, perm, lam, backend=backend), (a, b)),
        "multisoftclip": (lambda x, y: F.multisoftclip([x, y], backend=backend), (a, b)),
        "clip_loss": (lambda x, y: F.clip_loss(x, y, backend=backend), (a, b)),
    }
    for name, (fn, inputs) in calls.items():
        if backend == "dense":
            assert torch.autograd.gradgradcheck(fn, inputs), name
        else:
            # a silently wrong Hessian is worse than none: the tiled backward is first-order only
            with pytest.raises(RuntimeError, match="first derivatives only"):
                torch.autograd.grad(fn(*inputs), inputs[0], create_graph=True)


# ----------------------------------------------------------------------------- gradcheck


def _gradcheck_inputs(n=5, d=3, seed=3):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    c = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    perm = torch.tensor([2, 1, 0, 4, 3])  # a fixed point at 1
    lam = torch.tensor([0.2, 0.7, 1.0, 0.0, 0.5], dtype=torch.float64)
    return a, b, c, perm, lam


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("t", [0.1, 0.01])
def test_gradcheck_every_loss(backend, convention, t):
    a, b, c, perm, lam = _gradcheck_inputs()
    kw = dict(temperature=t, backend=backend)
    checks = {
        "m3co_pair": (lambda x, y: F.m3co_pair(x, y, perm, lam, convention=convention, **kw), (a, b)),
        "m3co": (lambda x, y, w: F.m3co([x, y, w], [y, w, x], [perm] * 3, lam, convention=convention, **kw), (a, b, c)),
        "multisoftclip_pair": (lambda x, y: F.multisoftclip_pair(x, y, convention=convention, reduction="none", **kw), (a, b)),
        "multisoftclip": (lambda x, y, w: F.multisoftclip([x, y, w], convention=convention, **kw), (a, b, c)),
        "clip_loss": (lambda x, y: F.clip_loss(x, y, reduction="none", **kw), (a, b)),
    }
    for name, (fn, inputs) in checks.items():
        assert torch.autograd.gradcheck(fn, inputs), name


def test_gradcheck_unis_mmc():
    # The stop-gradient on semi-positive pairs is not a derivative of the value, so the
    # finite-difference check runs on a batch without semi-positive pairs (the detach itself
    # is tested below).
    a, b, c, _, _ = _gradcheck_inputs()
    y = torch.tensor([0, 1, 2, 0, 1])
    same = torch.eye(3, dtype=torch.float64)[[0, 1, 0, 1, 1]]  # right on 0, 1, 4 for every modality
    assert torch.autograd.gradcheck(lambda x, y_, w: F.unis_mmc([x, y_, w], [same, same, same], y), (a, b, c))


def test_unis_mmc_semi_positive_pair_sends_gradient_only_to_the_wrong_modality():
    g = torch.Generator().manual_seed(4)
    r_a = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    r_b = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 0, 1])
    eye = torch.eye(2, dtype=torch.float64)
    logits_a = eye[[0, 1, 1, 0]]  # a correct on 0, 1
    logits_b = eye[[0, 0, 0, 0]]  # b correct on 0, 2
    # sample 0: positive, 1: semi (a right), 2: semi (b right), 3: negative
    loss = F.unis_mmc([r_a, r_b], [logits_a, logits_b], y)
    ga, gb = torch.autograd.grad(loss, (r_a, r_b))
    assert torch.count_nonzero(ga[1]) == 0 and torch.count_nonzero(gb[1]) > 0
    assert torch.count_nonzero(gb[2]) == 0 and torch.count_nonzero(ga[2]) > 0
    for sample in (0, 3):
        assert torch.count_nonzero(ga[sample]) > 0 and torch.count_nonzero(gb[sample]) > 0


def test_unis_mmc_without_positive_pairs_is_zero():
    g = torch.Generator().manual_seed(9)
    r = [torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)]
    y = torch.zeros(4, dtype=torch.long)
    wrong = torch.tensor([[0.0, 1.0]]).expand(4, 2)
    assert F.unis_mmc(r, [wrong, wrong], y).item() == 0.0


@pytest.mark.parametrize("convention", ["paper", "reference"])
@pytest.mark.parametrize("num", [2, 3, 4])
def test_dense_multisoftclip_forms_each_matrix_once(convention, num):
    """One S per modality pair and one target matrix per modality (see _multisoftclip_dense)."""
    from torch.utils.flop_counter import FlopCounterMode

    n, d = 12, 5
    g = torch.Generator().manual_seed(num)
    z = [torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(num)]
    with FlopCounterMode(display=False) as counter:
        F.multisoftclip(z, convention=convention, backend="dense")
    pairs = len({tuple(sorted(p[:2])) for p in F._directed_pairs(num, convention)})
    targets = len({p[1] if convention == "reference" else p[0] for p in F._directed_pairs(num, convention)})
    assert counter.get_total_flops() == (pairs + targets) * 2 * n * n * d
