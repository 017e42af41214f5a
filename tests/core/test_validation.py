"""Every bad input raises ValueError or TypeError naming the argument; none returns a number."""

from __future__ import annotations

import pytest
import torch

import m3co_loss
from m3co_loss import functional as F

N, D = 6, 4


def good():
    g = torch.Generator().manual_seed(0)
    return dict(
        a=torch.randn(N, D, generator=g),
        b=torch.randn(N, D, generator=g),
        perm=torch.randperm(N, generator=g),
        lam=torch.rand(N, generator=g),
    )


def pair_calls(a, b, perm, lam, **kw):
    """Every public function, built from one pair of inputs."""
    return {
        "m3co_pair": lambda: F.m3co_pair(a, b, perm, lam, **kw),
        "m3co": lambda: F.m3co([a, b], [b, a], [perm, perm], lam, **kw),
        "multisoftclip_pair": lambda: F.multisoftclip_pair(a, b, **kw),
        "multisoftclip": lambda: F.multisoftclip([a, b], **kw),
        "clip_loss": lambda: F.clip_loss(a, b, **{k: v for k, v in kw.items() if k != "convention"}),
    }


# What each call of pair_calls names its inputs a and b in an error. m3co passes each of them
# twice and checks clean before mixed, so a shape mismatch may name either list's entry.
ARGUMENT_NAMES = {
    "m3co_pair": {"a": "mixed_a", "b": "clean_b"},
    "m3co": {"a": r"(mixed|clean)\[[01]\]", "b": r"(mixed|clean)\[[01]\]"},
    "multisoftclip_pair": {"a": "z_a", "b": "z_b"},
    "multisoftclip": {"a": r"z\[0\]", "b": r"z\[1\]"},
    "clip_loss": {"a": "z_a", "b": "z_b"},
}


def expect(error, match, fn):
    with pytest.raises(error, match=match):
        fn()


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(b=torch.randn(N + 1, D)), ValueError, r"rows but the batch has N|has \d+ rows"),
        (dict(b=torch.randn(N, D + 1)), ValueError, "dimension"),
        (dict(a=torch.randn(1, D), b=torch.randn(1, D)), ValueError, "N >= 2"),
        (dict(a=torch.randn(N)), ValueError, r"shape \(N, D\)"),
        (dict(a=torch.randn(2, N, D)), ValueError, r"shape \(N, D\)"),
        (dict(a=torch.randint(0, 3, (N, D))), TypeError, "floating dtype"),
        (dict(a=[[1.0] * D] * N), TypeError, "torch.Tensor"),
        (dict(a=torch.full((N, D), float("nan"))), ValueError, "NaN or Inf"),
        (dict(b=torch.full((N, D), float("inf"))), ValueError, "NaN or Inf"),
        (dict(a=torch.randn(0, D), b=torch.randn(0, D)), ValueError, "N >= 2"),
    ],
)
def test_bad_embeddings(change, error, match):
    args = {**good(), **change}
    key = "a" if "a" in change else "b"
    for name, call in pair_calls(**args).items():
        with pytest.raises(error, match=rf"^{ARGUMENT_NAMES[name][key]} .*({match})"):
            call()


@pytest.mark.parametrize("t", [0.0, -0.1, float("nan"), float("inf")])
def test_bad_temperature(t):
    for call in pair_calls(**good(), temperature=t).values():
        expect(ValueError, "temperature", call)
    expect(TypeError, "temperature", lambda: F.clip_loss(good()["a"], good()["b"], temperature="0.1"))


@pytest.mark.parametrize("kw, match", [(dict(reduction="avg"), "reduction"), (dict(convention="code"), "convention"), (dict(backend="cuda"), "backend")])
def test_bad_options(kw, match):
    for name, call in pair_calls(**good(), **kw).items():
        if name == "clip_loss" and "convention" in kw:
            continue
        expect(ValueError, match, call)


@pytest.mark.parametrize(
    "perm, error, match",
    [
        (torch.tensor([0, 1, 2, 3, 4, 4]), ValueError, "permutation"),
        (torch.tensor([0, 1, 2, 3, 4, 6]), ValueError, "permutation"),
        (torch.tensor([-1, 1, 2, 3, 4, 0]), ValueError, "permutation"),
        (torch.arange(N + 1), ValueError, "shape"),
        (torch.arange(N).float(), TypeError, "integer"),
        (list(range(N)), TypeError, "torch.Tensor"),
    ],
)
def test_bad_perm(perm, error, match):
    d = good()
    expect(error, rf"^perm .*{match}", lambda: F.m3co_pair(d["a"], d["b"], perm, d["lam"]))
    expect(error, rf"^perms\[1\] .*{match}", lambda: F.m3co([d["a"], d["b"]], [d["b"], d["a"]], [d["perm"], perm], d["lam"]))


@pytest.mark.parametrize(
    "lam, error, match",
    [
        (torch.full((N,), 1.5), ValueError, r"\[0, 1\]"),
        (torch.full((N,), -0.1), ValueError, r"\[0, 1\]"),
        (torch.full((N,), float("nan")), ValueError, r"\[0, 1\]"),
        (torch.rand(N + 1), ValueError, "shape"),
        (torch.ones(N, dtype=torch.long), TypeError, "floating"),
        (0.5, TypeError, "torch.Tensor"),
        (torch.rand(3, N), ValueError, "one row per modality"),
    ],
)
def test_bad_lam(lam, error, match):
    d = good()
    if not (isinstance(lam, torch.Tensor) and lam.dim() == 2):
        expect(error, rf"^lam .*{match}", lambda: F.m3co_pair(d["a"], d["b"], d["perm"], lam))
    expect(error, rf"^lam .*{match}", lambda: F.m3co([d["a"], d["b"]], [d["b"], d["a"]], [d["perm"]] * 2, lam))
    if not isinstance(lam, torch.Tensor) or lam.dim() == 1:  # one bad entry of a per-modality list is named
        expect(error, rf"^lam\[1\] .*{match}", lambda: F.m3co([d["a"], d["b"]], [d["b"], d["a"]], [d["perm"]] * 2, [d["lam"], lam]))


def test_bad_modality_lists():
    d = good()
    expect(ValueError, "at least 2 modalities", lambda: F.multisoftclip([d["a"]]))
    expect(TypeError, "list or tuple", lambda: F.multisoftclip(d["a"]))
    expect(ValueError, "mixed holds 3", lambda: F.m3co([d["a"]] * 3, [d["a"], d["b"]], [d["perm"]] * 2, d["lam"]))
    expect(ValueError, "perms holds 1", lambda: F.m3co([d["a"]] * 2, [d["a"], d["b"]], [d["perm"]], d["lam"]))
    expect(ValueError, "lam holds 3", lambda: F.m3co([d["a"]] * 2, [d["a"], d["b"]], [d["perm"]] * 2, [d["lam"]] * 3))
    expect(ValueError, r"z\[1\] has dimension", lambda: F.multisoftclip([d["a"], torch.randn(N, D + 2)]))


def test_unis_mmc_bad_inputs():
    d = good()
    logits = [torch.randn(N, 3), torch.randn(N, 3)]
    y = torch.randint(0, 3, (N,))
    expect(ValueError, "logits must hold at least 2", lambda: F.unis_mmc([d["a"], d["b"]], logits[:1], y))
    expect(ValueError, r"logits\[1\] must have shape", lambda: F.unis_mmc([d["a"], d["b"]], [logits[0], torch.randn(N + 1, 3)], y))
    expect(ValueError, r"logits\[1\] has 4 classes", lambda: F.unis_mmc([d["a"], d["b"]], [logits[0], torch.randn(N, 4)], y))
    expect(TypeError, "y must have an integer dtype", lambda: F.unis_mmc([d["a"], d["b"]], logits, y.float()))
    expect(ValueError, "y must have shape", lambda: F.unis_mmc([d["a"], d["b"]], logits, y[:-1]))
    expect(ValueError, "class indices", lambda: F.unis_mmc([d["a"], d["b"]], logits, y + 3))
    expect(ValueError, "temperature", lambda: F.unis_mmc([d["a"], d["b"]], logits, y, temperature=0))
    for bad in (float("nan"), float("inf")):
        expect(ValueError, r"logits\[1\] contains NaN or Inf", lambda: F.unis_mmc([d["a"], d["b"]], [logits[0], logits[1] * bad], y))


def test_less_common_bad_inputs_are_named():
    d = good()
    a, b, perm, lam = d["a"], d["b"], d["perm"], d["lam"]
    logits, y = [torch.randn(N, 3), torch.randn(N, 3)], torch.randint(0, 3, (N,))
    expect(ValueError, r"^z_a must have at least one feature \(D >= 1\)", lambda: F.clip_loss(torch.randn(N, 0), torch.randn(N, 0)))
    expect(TypeError, r"^logits\[1\] must be a floating", lambda: F.unis_mmc([a, b], [logits[0], torch.ones(N, 3, dtype=torch.long)], y))
    expect(TypeError, r"^y must be an integer torch.Tensor .*got list", lambda: F.unis_mmc([a, b], logits, [0] * N))
    expect(ValueError, r"^logits\[1\] is on meta but r\[0\] is on cpu", lambda: F.unis_mmc([a, b], [logits[0], logits[1].to("meta")], y))
    expect(ValueError, r"^y is on meta but the embeddings are on cpu", lambda: F.unis_mmc([a, b], logits, y.to("meta")))
    expect(ValueError, r"^perms holds 0 permutations but there are 2 modalities", lambda: F.m3co([a, b], [b, a], [], lam))
    expect(ValueError, r"^mixed\[0\] is on meta but clean\[0\] is on cpu", lambda: F.m3co([a.to("meta"), b.to("meta")], [b, a], [perm] * 2, lam))
    expect(TypeError, r"^lam\[1\] must be a floating torch.Tensor .*got str", lambda: F.m3co([a, b], [b, a], [perm] * 2, [lam, "0.5"]))
    plan = m3co_loss.MixupSampler().sample(N, 2)
    expect(TypeError, r"^x must be a torch.Tensor; got list", lambda: plan.mix([1.0] * N, 0))
    expect(ValueError, r"^x must have the batch \(6\) as its first dim; got shape \(\)", lambda: plan.mix(torch.tensor(1.0), 0))


def test_m3co_partner_and_a_missing_clean_are_named():
    d = good()
    a, b, perm, lam = d["a"], d["b"], d["perm"], d["lam"]
    for bad in ("released", "Mixed", 1):
        expect(ValueError, r"^partner must be one of 'clean', 'mixed'; got", lambda: F.m3co([a, b], [b, a], [perm] * 2, lam, partner=bad))
    expect(ValueError, r"^clean is None, but partner='clean'", lambda: F.m3co([a, b], None, [perm] * 2, lam))  # the paper's default
    expect(ValueError, r"^clean is None, but partner='clean'", lambda: F.m3co([a, b], None, [perm] * 2, lam, convention="reference", partner="clean"))
    # clean is not needed for mixed partners, but is still checked when given
    assert torch.isfinite(F.m3co([a, b], None, [perm] * 2, lam, partner="mixed"))
    expect(ValueError, r"^mixed\[0\] has", lambda: F.m3co([a, b], [torch.randn(N + 1, D)] * 2, [perm] * 2, lam, convention="reference"))
    expect(ValueError, r"^clean\[1\] contains NaN", lambda: F.m3co([a, b], [b, torch.full((N, D), float("nan"))], [perm] * 2, lam, convention="reference"))
    expect(ValueError, r"^mixed\[1\] has", lambda: F.m3co([a, torch.randn(N, D + 1)], None, [perm] * 2, lam, convention="reference"))


def test_sparse_embeddings_are_refused():
    d = good()
    for name, call in pair_calls(d["a"].to_sparse(), d["b"], d["perm"], d["lam"]).items():
        expect(TypeError, "dense \\(strided\\) tensor", call)


def test_meta_tensors_pass_the_value_checks():
    # shape-only tracing: no values to check, and a device mismatch still names the arguments
    d = good()
    a, b = d["a"].to("meta"), d["b"].to("meta")
    for name, call in pair_calls(a, b, d["perm"].to("meta"), d["lam"].to("meta")).items():
        value = call()
        assert value.device.type == "meta" and value.shape == (), name
    expect(ValueError, "move them to one device", lambda: F.clip_loss(d["a"], b))


def test_m3coloss_rejects_a_plan_of_another_batch():
    d = good()
    plan = m3co_loss.MixupSampler().sample(N - 1, 2)
    expect(ValueError, f"plan was drawn for a batch of {N - 1}", lambda: m3co_loss.M3CoLoss()([d["a"], d["b"]], plan=plan))


def test_value_checks_can_be_switched_off():
    d = good()
    bad = torch.full((N, D), float("nan"))
    with m3co_loss.value_checks(False):
        assert torch.isnan(F.clip_loss(bad, d["b"]))
    expect(ValueError, "NaN", lambda: F.clip_loss(bad, d["b"]))


@pytest.mark.parametrize(
    "cls, kw, match",
    [
        (m3co_loss.M3CoLoss, dict(temperature=0), "temperature"),
        (m3co_loss.M3CoLoss, dict(beta=-1), "beta"),
        (m3co_loss.M3CoLoss, dict(total_steps=0), "total_steps"),
        (m3co_loss.M3CoLoss, dict(total_steps=10, m3co_fraction=1.5), "m3co_fraction"),
        (m3co_loss.M3CoLoss, dict(m3co_fraction=0.5), "m3co_fraction needs total_steps"),
        (m3co_loss.M3CoLoss, dict(beta=float("inf")), "beta"),
        (m3co_loss.M3CoLoss, dict(alpha=0), "alpha"),
        (m3co_loss.M3CoLoss, dict(mix_prob=2.0), "mix_prob"),
        (m3co_loss.M3CoLoss, dict(convention="released"), "convention"),
        (m3co_loss.M3CoLoss, dict(reduction="avg"), "reduction"),
        (m3co_loss.M3CoLoss, dict(backend="gpu"), "backend"),
        (m3co_loss.M3CoLoss, dict(partner="released"), "^partner must be one of 'clean', 'mixed'"),
        (m3co_loss.M3CoLoss, dict(convention="reference", partner=1), "^partner must be one of"),
        (m3co_loss.MultiSClipLoss, dict(temperature=-1.0), "temperature"),
        (m3co_loss.CLIPLoss, dict(temperature=0.0), "temperature"),
        (m3co_loss.UniSMMCLoss, dict(temperature=0.0), "temperature"),
        (m3co_loss.MixupSampler, dict(alpha=-0.1), "alpha"),
        (m3co_loss.MixupSampler, dict(mix_prob=-0.1), "mix_prob"),
    ],
)
def test_modules_validate_in_init(cls, kw, match):
    with pytest.raises(ValueError, match=match):
        cls(**kw)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: m3co_loss.M3CoLoss(total_steps="30"), "^total_steps must be an int; got str"),
        (lambda: m3co_loss.M3CoLoss(total_steps=3.0), "^total_steps must be an int; got float"),
        (lambda: m3co_loss.M3CoLoss(beta="0.1"), "^beta must be a real number; got str"),
        (lambda: m3co_loss.M3CoLoss(total_steps=3).phase(step=1.0), "^step must be an int; got float"),
        (lambda: m3co_loss.MixupSampler().sample(4, 2).mix(torch.randn(4, 2), True), "^modality must be an int; got bool"),
    ],
)
def test_wrong_types_raise_type_errors_by_name(make, match):
    with pytest.raises(TypeError, match=match):
        make()


def test_numbers_of_other_real_types_are_accepted():
    np = pytest.importorskip("numpy")
    assert m3co_loss.M3CoLoss(beta=np.float32(0.5)).beta == 0.5
    assert m3co_loss.M3CoLoss(total_steps=np.int64(30)).total_steps == 30
    plan = m3co_loss.MixupSampler().sample(4, 2)
    for modality in (-1, 2):
        with pytest.raises(ValueError, match=r"^modality must be an int in \[0, 2\); got"):
            plan.mix(torch.randn(4, 2), modality)


def test_modules_reject_wrong_types_in_init():
    with pytest.raises(TypeError, match="gather_distributed"):
        m3co_loss.CLIPLoss(gather_distributed="yes")
    with pytest.raises(TypeError, match="generator"):
        m3co_loss.MixupSampler(generator=0)
    with pytest.raises(TypeError, match="shared_lam"):
        m3co_loss.MixupSampler(shared_lam=1)


@pytest.mark.cuda
def test_tensors_on_different_devices():
    d = good()
    expect(ValueError, "move them to one device", lambda: F.clip_loss(d["a"], d["b"].cuda()))
    expect(ValueError, "perm is on", lambda: F.m3co_pair(d["a"].cuda(), d["b"].cuda(), d["perm"], d["lam"].cuda()))


def test_tensors_on_different_devices_meta():
    # the meta device stands in for a second device on machines without a GPU
    d = good()
    with m3co_loss.value_checks(False):  # meta tensors hold no values to check
        expect(ValueError, "move them to one device", lambda: F.clip_loss(d["a"], torch.randn(N, D, device="meta")))
        expect(ValueError, "lam is on", lambda: F.m3co_pair(d["a"], d["b"], d["perm"], torch.rand(N, device="meta")))
        expect(ValueError, "perm is on", lambda: F.m3co_pair(d["a"], d["b"], torch.arange(N, device="meta"), d["lam"]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_all_finite_agrees_with_isfinite(dtype):
    from m3co_loss._validation import all_finite

    big = torch.finfo(dtype).max
    cases = [
        torch.zeros(3, 2, dtype=dtype),
        torch.full((4, 3), big, dtype=dtype),  # finite entries whose sum overflows: the exact test decides
        torch.tensor([[big, -big], [big, big]], dtype=dtype),
        torch.tensor([[1.0, float("nan")], [0.0, 0.0]], dtype=dtype),
        torch.tensor([[float("inf"), 0.0]], dtype=dtype),
        torch.tensor([[float("inf"), float("-inf")]], dtype=dtype),  # the sum is NaN, not inf
        torch.empty(0, 4, dtype=dtype),
    ]
    for x in cases:
        assert all_finite(x) == bool(torch.isfinite(x).all()), x
