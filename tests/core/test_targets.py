"""contrastive_loss with structured targets: the literal equation, every backend, M3Co and CLIP as cases, bad input."""

from __future__ import annotations

import importlib.util
import re
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import literal
from check_scripts import run_check_script
import m3co_loss
from m3co_loss import backends
from m3co_loss import functional as F
from strategies import make_target_case, target_cases, temperatures

HERE = Path(__file__).resolve().parents[1]  # tests/
CONVENTIONS = ["paper", "reference"]
REDUCTIONS = ["mean", "sum", "none"]


def literal_targets(case):
    """The dense T of a case, entry by entry (tests/literal.py)."""
    n = case.n
    if case.form == "labels":
        return literal.targets_from_labels(case.labels)
    if case.form in ("partners", "uniform"):
        k = case.partners.shape[1]
        weights = case.weights if case.weights is not None else [[1.0 / k] * k for _ in range(n)]
        return literal.targets_from_partners(n, case.partners, weights)
    return [[1.0 if i == k else 0.0 for k in range(n)] for i in range(n)]


def reduce(values, reduction):
    v = torch.stack(values)
    return v if reduction == "none" else (v.mean() if reduction == "mean" else v.sum())


def value_and_grads(fn, tensors, upstream=None):
    leaves = [x.detach().clone().requires_grad_(True) for x in tensors]
    value = fn(*leaves)
    total = value if value.dim() == 0 else (value * (upstream if upstream is not None else 1.0)).sum()
    return value.detach(), torch.autograd.grad(total, leaves)


def assert_agree(got, expected, rtol=1e-7, atol=1e-9):
    torch.testing.assert_close(got[0], expected[0], rtol=rtol, atol=atol)
    for g, e in zip(got[1], expected[1]):
        torch.testing.assert_close(g, e, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------- the equation


@example(case=make_target_case(7, 3, "partners", 3, seed=1), t=0.1, convention="paper", reduction="none")
@example(case=make_target_case(8, 4, "labels", 1, seed=2), t=0.05, convention="reference", reduction="mean")
@given(case=target_cases(), t=temperatures, convention=st.sampled_from(CONVENTIONS), reduction=st.sampled_from(REDUCTIONS))
def test_matches_the_literal_equation(backend, case, t, convention, reduction):
    T = literal_targets(case)
    upstream = torch.linspace(0.5, 1.5, case.n, dtype=torch.float64)
    assert_agree(
        value_and_grads(
            lambda a, b: F.contrastive_loss(a, b, **case.kwargs(), temperature=t, convention=convention, reduction=reduction, backend=backend),
            [case.z_a, case.z_b], upstream),
        value_and_grads(lambda a, b: reduce(literal.structured(a, b, T, t, convention), reduction), [case.z_a, case.z_b], upstream),
    )


def test_weight_gradients_match_the_literal_equation(backend):
    """d v_i / d w_ij = r_i + c_k - 2 S_ik (k = P_ij): the derivative of the defining sum, for any weights."""
    case = make_target_case(7, 3, "partners", 3, seed=3)
    upstream = torch.linspace(0.5, 1.5, case.n, dtype=torch.float64)

    def ours(a, b, w):
        return F.contrastive_loss(a, b, partners=case.partners, weights=w, reduction="none", backend=backend)

    def slow(a, b, w):
        return torch.stack(literal.structured(a, b, literal.targets_from_partners(case.n, case.partners, w), 0.1))

    assert_agree(value_and_grads(ours, [case.z_a, case.z_b, case.weights], upstream),
                 value_and_grads(slow, [case.z_a, case.z_b, case.weights], upstream))


@pytest.mark.parametrize("form", ["partners", "uniform", "labels", "identity"])
@pytest.mark.parametrize("t", [0.1, 0.01])  # 0.01: the tiled kernels find exact maxima instead of shifting by 1/t
def test_gradcheck(backend, form, t):
    case = make_target_case(6, 3, form, 3, seed=4)
    inputs = [x.clone().requires_grad_(True) for x in (case.z_a, case.z_b)]
    kw = dict(temperature=t, backend=backend, reduction="none")
    assert torch.autograd.gradcheck(lambda a, b: F.contrastive_loss(a, b, **case.kwargs(), **kw), inputs)
    # the temperature as a 0-dim tensor: its gradient too (the log-sum-exps' from t dF/dt = -<Q, dF/dQ>)
    temperature = torch.tensor(t, dtype=torch.float64, requires_grad=True)
    kw_t = dict(backend=backend, reduction="none")
    assert torch.autograd.gradcheck(lambda a, b, t: F.contrastive_loss(a, b, **case.kwargs(), temperature=t, **kw_t), inputs + [temperature])
    if form == "partners":
        # the weights too: gradcheck moves their rows off a sum of 1, which the value checks would refuse
        w = case.weights.clone().requires_grad_(True)
        with m3co_loss.value_checks(False):
            assert torch.autograd.gradcheck(lambda a, b, w: F.contrastive_loss(a, b, partners=case.partners, weights=w, **kw), inputs + [w])


def test_dense_second_derivatives_are_exact():
    for form in ("partners", "labels"):
        case = make_target_case(5, 3, form, 2, seed=5)
        inputs = [x.clone().requires_grad_(True) for x in (case.z_a, case.z_b)]
        assert torch.autograd.gradgradcheck(lambda a, b: F.contrastive_loss(a, b, **case.kwargs(), backend="dense"), inputs)


# ----------------------------------------------------------------------------- special cases


def test_identity_targets_are_clip_loss_bit_for_bit(backend):
    case = make_target_case(11, 4, "identity", 1, seed=6)
    for reduction in REDUCTIONS:
        ours = value_and_grads(lambda a, b: F.contrastive_loss(a, b, reduction=reduction, backend=backend), [case.z_a, case.z_b])
        clip = value_and_grads(lambda a, b: F.clip_loss(a, b, reduction=reduction, backend=backend), [case.z_a, case.z_b])
        assert torch.equal(ours[0], clip[0]) and all(torch.equal(x, y) for x, y in zip(ours[1], clip[1]))
    half = F.contrastive_loss(case.z_a, case.z_b, convention="reference", backend=backend)
    torch.testing.assert_close(half, 0.5 * F.clip_loss(case.z_a, case.z_b, backend=backend), rtol=1e-15, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_two_partners_are_m3co_pair(backend, dtype):
    """M3Co is the case partners [i, perm[i]], weights [lam, 1 - lam]; m3co_pair computes through it."""
    g = torch.Generator().manual_seed(7)
    n = 13
    z = [torch.randn(n, 5, generator=g, dtype=dtype) for _ in range(2)]
    perm = torch.cat([torch.arange(3), 3 + torch.randperm(n - 3, generator=g)])  # fixed points at 0, 1, 2
    lam = torch.rand(n, generator=g, dtype=dtype)
    lam[3:5] = torch.tensor([0.0, 1.0])
    partners = torch.stack([torch.arange(n), perm], 1)
    weights = torch.stack([lam, 1 - lam], 1)
    upstream = torch.rand(n, generator=g, dtype=dtype)
    for convention in CONVENTIONS:
        kw = dict(convention=convention, backend=backend, reduction="none")
        ours = value_and_grads(lambda a, b: F.contrastive_loss(a, b, partners=partners, weights=weights, **kw), z, upstream)
        m3co = value_and_grads(lambda a, b: F.m3co_pair(a, b, perm, lam, **kw), z, upstream)
        assert torch.equal(ours[0], m3co[0]) and all(torch.equal(x, y) for x, y in zip(ours[1], m3co[1]))


def test_m3co_pair_dense_is_bit_for_bit_the_former_computation():
    """The dense M3Co kernel of the backends, which m3co_pair called before, gives the same bits."""
    from m3co_loss._batch import _batch_layout, _prepare

    g = torch.Generator().manual_seed(8)
    n = 17
    z = [torch.randn(n, 6, generator=g) for _ in range(2)]
    perm = torch.cat([torch.arange(4), 4 + torch.randperm(n - 4, generator=g)])
    lam = torch.rand(n, generator=g)
    upstream = torch.rand(n, generator=g)

    def former(x, y):
        a, b = _prepare([x, y], _batch_layout([x, y], False, "x"))
        return backends.m3co_vector(a, b, perm, lam, 0.07, backend="dense")

    ours = value_and_grads(lambda a, b: F.m3co_pair(a, b, perm, lam, temperature=0.07, backend="dense", reduction="none"), z, upstream)
    before = value_and_grads(former, z, upstream)
    assert torch.equal(ours[0], before[0]) and all(torch.equal(x, y) for x, y in zip(ours[1], before[1]))


def test_equivalent_forms_agree(backend):
    case = make_target_case(10, 4, "identity", 1, seed=9)
    a, b, n = case.z_a, case.z_b, case.n
    kw = dict(backend=backend, reduction="none")
    clip = F.clip_loss(a, b, **kw)
    rows = torch.arange(n)
    # a partner listed twice adds its weights
    torch.testing.assert_close(F.contrastive_loss(a, b, partners=torch.stack([rows, rows], 1), weights=torch.tensor([[0.25, 0.75]] * n, dtype=a.dtype), **kw), clip)
    # distinct labels: every row its own class
    torch.testing.assert_close(F.contrastive_loss(a, b, labels=rows.flip(0) * 5, **kw), clip)
    # weights=None: uniform over the K partners
    partners = torch.randint(0, n, (n, 3), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(F.contrastive_loss(a, b, partners=partners, **kw),
                               F.contrastive_loss(a, b, partners=partners, weights=torch.full((n, 3), 1 / 3, dtype=a.dtype), **kw))
    # labels as partners: every member of the class, weighted 1 / class size
    y = torch.tensor([0, 1, 0, 2, 1, 0, 3, 2, 2, 2])
    members = [torch.nonzero(y == y[i]).flatten() for i in range(n)]
    k = max(len(m) for m in members)
    padded = torch.stack([torch.cat([m, m[:1].repeat(k - len(m))]) for m in members])
    weights = torch.stack([torch.cat([torch.full((len(m),), 1.0 / len(m)), torch.zeros(k - len(m))]) for m in members]).to(a.dtype)
    torch.testing.assert_close(F.contrastive_loss(a, b, labels=y, **kw), F.contrastive_loss(a, b, partners=padded, weights=weights, **kw))


# ----------------------------------------------------------------------------- backends


tile_sizes = st.tuples(st.integers(1, 9), st.integers(1, 9)) | st.just((512, 2048))


@given(case=target_cases(max_n=23, max_d=7), t=st.sampled_from([0.002, 0.02, 0.1, 0.5]), sizes=tile_sizes,
       convention=st.sampled_from(CONVENTIONS), dtype=st.sampled_from([torch.float64, torch.float32]))
def test_tiled_equals_dense(case, t, sizes, convention, dtype):
    """Random targets, temperatures (static shift and exact maxima), uneven tiles that need not divide N."""
    inputs = [case.z_a.to(dtype), case.z_b.to(dtype)]
    upstream = torch.rand(case.n, generator=torch.Generator().manual_seed(case.n), dtype=dtype)

    def run(backend):
        return value_and_grads(
            lambda a, b: F.contrastive_loss(a, b, **case.kwargs(), temperature=t, convention=convention, reduction="none", backend=backend),
            inputs, upstream)

    dense = run("dense")
    with backends.config(tile_rows=sizes[0], tile_cols=sizes[1]):
        tiled = run("tiled")
    eps = 1e-10 if dtype == torch.float64 else 2e-5
    smallest = max(1e-3, float(min(x.norm(dim=1).min() for x in inputs)))
    assert_agree(tiled, dense, rtol=eps, atol=eps * max(1.0, 1.0 / t) / smallest)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_at_scale_100_are_finite(backend, dtype):
    n, d, t = 24, 32, 0.01
    for form in ("partners", "labels", "identity"):
        case = make_target_case(n, d, form, 2, seed=11)
        a, b = ((100 * x).to(dtype).requires_grad_(True) for x in (case.z_a, case.z_b))
        kw = {k: (v.to(dtype) if k == "weights" and v is not None else v) for k, v in case.kwargs().items()}
        value = F.contrastive_loss(a, b, **kw, temperature=t, backend=backend)
        ga, gb = torch.autograd.grad(value, (a, b))
        assert value.dtype == torch.float32 and torch.isfinite(value), form
        assert torch.isfinite(ga).all() and torch.isfinite(gb).all(), form
        # float32 on the same rounded inputs: only the accumulation may differ
        reference = F.contrastive_loss(a.detach().float(), b.detach().float(), **kw, temperature=t, backend="dense")
        torch.testing.assert_close(value, reference, rtol=1e-4, atol=1e-3)


def test_rank_rows_against_the_global_batch_on_one_process(small_tiles):
    """The vectors of a rank's rows (sizes (4, 7)) equal the single-process ones: partners and labels
    index the global columns. The gather is simulated (tests/distributed/test_distributed.py runs process groups)."""
    from m3co_loss._batch import _Batch, _prepare
    from m3co_loss._targets import _lse, labels_vector, partners_vector

    case = make_target_case(11, 4, "partners", 3, seed=12)
    y = torch.randint(0, 3, (11,), generator=torch.Generator().manual_seed(0))
    whole = _Batch((11,), 0, torch.float64, ((),))
    full = _prepare([case.z_a, case.z_b], whole)
    for backend in ("dense", "tiled"):
        expected_p = partners_vector(*full, case.partners, case.weights, 0.1, reference=False, layout=whole, backend=backend)
        expected_l = labels_vector(*full, y, 0.1, reference=False, layout=whole, backend=backend)
        _, _, c_all = _lse(*full, 0.1, whole, backend)
        for rank, (lo, hi) in enumerate(((0, 4), (4, 11))):

            class Rank(_Batch):
                def gather(self, x, lo=lo, hi=hi):  # what the other ranks would send
                    other = c_all if x.is_floating_point() else y
                    return torch.cat([other[:lo], x, other[hi:]])

            layout = Rank((4, 7), rank, torch.float64, ((), ()))
            a, b = (backends.Rows(r.local[lo:hi], r.full, lo) for r in full)
            got_p = partners_vector(a, b, case.partners[lo:hi], case.weights[lo:hi], 0.1, reference=False, layout=layout, backend=backend)
            got_l = labels_vector(a, b, y[lo:hi], 0.1, reference=False, layout=layout, backend=backend)
            torch.testing.assert_close(got_p, expected_p[lo:hi], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(got_l, expected_l[lo:hi], rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- bad input


def _good(n=6, d=3):
    g = torch.Generator().manual_seed(13)
    return torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(partners=torch.zeros(6, 2, dtype=torch.long), labels=torch.zeros(6, dtype=torch.long)), ValueError, "either partners .* or labels, not both"),
        (dict(weights=torch.full((6, 2), 0.5)), ValueError, "weights needs partners"),
        (dict(partners=[[0, 1]] * 6), TypeError, r"partners must be an integer torch.Tensor of shape \(6, K\)"),
        (dict(partners=torch.zeros(6, 2)), TypeError, "partners must have an integer dtype; got torch.float32"),
        (dict(partners=torch.zeros(6, 2, dtype=torch.bool)), TypeError, "partners must have an integer dtype"),
        (dict(partners=torch.zeros(6, dtype=torch.long)), ValueError, r"partners must have shape \(6, K\).*pass partners\[:, None\]"),
        (dict(partners=torch.zeros(5, 2, dtype=torch.long)), ValueError, r"partners must have shape \(6, K\)"),
        (dict(partners=torch.zeros(6, 0, dtype=torch.long)), ValueError, "K >= 1"),
        (dict(partners=torch.full((6, 2), 6)), ValueError, r"partners must hold column indices in \[0, 6\); got 6"),
        (dict(partners=torch.full((6, 2), -1)), ValueError, r"partners must hold column indices in \[0, 6\); got -1"),
        (dict(partners=torch.zeros(6, 2, dtype=torch.long), weights=torch.full((6, 2), 1, dtype=torch.long)), TypeError, "weights must have a floating dtype"),
        (dict(partners=torch.zeros(6, 2, dtype=torch.long), weights=torch.full((6, 3), 1 / 3)), ValueError, r"weights must have the shape of partners, \(6, 2\)"),
        (dict(partners=torch.zeros(6, 2, dtype=torch.long), weights="0.5"), TypeError, "weights must be a floating torch.Tensor"),
        (dict(partners=torch.zeros(6, 2, dtype=torch.long), weights=torch.tensor([[1.5, -0.5]] * 6)), ValueError, r"weights must be non-negative; row 0 holds \[1.5, -0.5\]"),
        (dict(partners=torch.zeros(6, 2, dtype=torch.long), weights=torch.tensor([[0.5, float("nan")]] * 6)), ValueError, "weights contains NaN or Inf"),
        (dict(partners=torch.zeros(6, 2, dtype=torch.long), weights=torch.tensor([[0.5, 0.5]] * 5 + [[0.5, 0.6]])),
         ValueError, r"weights: every row must sum to 1 \(within 9.5e-07 for K = 2 in torch.float32\); row 5 sums to 1.10"),
        (dict(labels=torch.zeros(5, dtype=torch.long)), ValueError, r"labels must have shape \(6,\), one class label per sample; got \(5,\)"),
        (dict(labels=torch.zeros(6, 1, dtype=torch.long)), ValueError, r"labels must have shape \(6,\)"),
        (dict(labels=torch.zeros(6)), TypeError, "labels must have an integer dtype; got torch.float32"),
        (dict(labels=[0] * 6), TypeError, r"labels must be an integer torch.Tensor of shape \(6,\)"),
        (dict(labels=torch.tensor([0, 1, -2, 1, 0, 0])), ValueError, "labels must be non-negative class indices; got -2"),
        (dict(temperature=0.0), ValueError, "temperature must be a finite number > 0"),
        (dict(convention="both"), ValueError, "convention must be one of"),
        (dict(reduction="max"), ValueError, "reduction must be one of"),
    ],
)
def test_bad_input_is_named(kwargs, error, message):
    a, b = _good()
    with pytest.raises(error, match=message):
        F.contrastive_loss(a, b, **kwargs)


def test_weight_tolerance_follows_the_dtype():
    a, b = _good()
    partners = torch.zeros(6, 2, dtype=torch.long)
    off = 3e-3  # within float16's 4 K eps = 7.8e-3, far outside float32's 9.5e-7
    F.contrastive_loss(a, b, partners=partners, weights=torch.tensor([[0.5, 0.5 + off]] * 6, dtype=torch.float16))
    with pytest.raises(ValueError, match="within 9.5e-07"):
        F.contrastive_loss(a, b, partners=partners, weights=torch.tensor([[0.5, 0.5 + off]] * 6, dtype=torch.float32))
    # float32 weights cast to float64 pass (the tolerance is at least float32's)
    lam = torch.rand(6, generator=torch.Generator().manual_seed(0))
    F.contrastive_loss(a.double(), b.double(), partners=partners, weights=torch.stack([lam, 1 - lam], 1).double())


def test_value_checks_off_skip_the_data_dependent_checks():
    a, b = _good()
    partners = torch.zeros(6, 2, dtype=torch.long)
    unnormalised = torch.full((6, 2), 1.0)
    with m3co_loss.value_checks(False):
        doubled = F.contrastive_loss(a, b, partners=partners, weights=unnormalised, reduction="none")
        F.contrastive_loss(a, b, labels=torch.tensor([0, 1, -2, 1, 0, 0]))
    # T is used as given: weights summing to 2 double the value
    torch.testing.assert_close(doubled, 2 * F.contrastive_loss(a, b, partners=partners, weights=unnormalised / 2, reduction="none"))
    # shapes and dtypes are still checked
    with m3co_loss.value_checks(False), pytest.raises(TypeError, match="partners must have an integer dtype"):
        F.contrastive_loss(a, b, partners=torch.zeros(6, 2))


# ----------------------------------------------------------------------------- module


def test_module_validates_its_options_and_forwards():
    a, b = _good()
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    criterion = m3co_loss.ContrastiveLoss(temperature=0.2, reduction="sum", convention="reference", backend="tiled")
    assert "ContrastiveLoss" in m3co_loss.__all__ and "contrastive_loss" in F.__all__
    torch.testing.assert_close(criterion(a, b, labels=y), F.contrastive_loss(a, b, labels=y, temperature=0.2, reduction="sum", convention="reference"))
    assert torch.equal(criterion(a, b), F.contrastive_loss(a, b, temperature=0.2, reduction="sum", convention="reference", backend="tiled"))
    assert "temperature=0.2" in repr(criterion)
    for options, error in ((dict(temperature=-1.0), ValueError), (dict(reduction="avg"), ValueError), (dict(backend="cuda"), ValueError),
                           (dict(gather_distributed=1), TypeError), (dict(convention="released"), ValueError), (dict(temperature="0.1"), TypeError)):
        with pytest.raises(error, match=next(iter(options))):
            m3co_loss.ContrastiveLoss(**options)


def test_a_tensor_temperature_gives_the_float_value_and_the_equation_gradient(backend):
    case = make_target_case(7, 4, "labels", 2, seed=9)
    t = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    value = F.contrastive_loss(case.z_a, case.z_b, labels=case.labels, temperature=t, backend=backend, reduction="none")
    assert torch.equal(value.detach(), F.contrastive_loss(case.z_a, case.z_b, labels=case.labels, temperature=0.3, backend=backend, reduction="none"))
    # the literal equation differentiated by autograd, with T formed densely
    (grad,) = torch.autograd.grad(value.sum(), t)
    t_ref = t.detach().clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(torch.stack(literal.structured(case.z_a, case.z_b, literal_targets(case), t_ref, "paper")).sum(), t_ref)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)


def test_module_learns_its_temperature():
    a, b = _good()
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    criterion = m3co_loss.ContrastiveLoss(temperature=0.2, learn_temperature=True, max_scale=50.0, backend="tiled")
    assert set(criterion.state_dict()) == {"logit_scale"} and "learned" in repr(criterion)
    loss = criterion(a, b, labels=y)
    (grad,) = torch.autograd.grad(loss, criterion.logit_scale)
    t = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    (t_grad,) = torch.autograd.grad(F.contrastive_loss(a, b, labels=y, temperature=t, backend="tiled"), t)
    torch.testing.assert_close(grad, -0.2 * t_grad.float())  # dt/ds = -t for s = log(1/t)
    with pytest.raises(ValueError, match="learnable range"):
        m3co_loss.ContrastiveLoss(temperature=0.001, learn_temperature=True)
    with pytest.raises(TypeError, match="learn_temperature=True"):
        m3co_loss.ContrastiveLoss(temperature=torch.tensor(0.1))


def test_docs_temperature_recipe_runs_and_learns(capsys):
    text = (HERE.parent / "docs" / "targets.rst").read_text()
    match = re.search(r"\.\. learnable-temperature-targets[^\n]*\n\n\.\. code-block:: python\n\n((?:    [^\n]*\n|\n)+)", text)
    assert match, "docs/targets.rst lost its learnable-temperature block"
    torch.manual_seed(0)
    namespace: dict = {}
    exec(compile(textwrap.dedent(match.group(1)), "targets.rst", "exec"), namespace)
    t = namespace["criterion"].temperature.item()
    assert capsys.readouterr().out == f"temperature {t:.4f}\n"
    assert abs(t - 0.1) > 1e-3 and 0.01 <= t <= 1.0


# ----------------------------------------------------------------------------- Triton


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_interpreter_equals_dense_and_tiled():
    report = run_check_script("targets_triton.py")
    assert report["examples"] >= 8 and report["max_error"] < 2e-5, report
