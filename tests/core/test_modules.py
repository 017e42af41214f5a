from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch

import m3co_loss
from m3co_loss import CLIPLoss, M3CoLoss, MultiSClipLoss, UniSMMCLoss
from m3co_loss import functional as F
from readme import drop_in_snippet

ROOT = Path(__file__).resolve().parents[2]


def embeddings(n=8, d=5, m=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, generator=g) for _ in range(m)]


def test_modules_equal_their_functions():
    z = embeddings(m=3)
    assert torch.equal(CLIPLoss(temperature=0.2)(z[0], z[1]), F.clip_loss(z[0], z[1], temperature=0.2))
    assert torch.equal(MultiSClipLoss()(z), F.multisoftclip(z, temperature=0.1))
    assert torch.equal(
        MultiSClipLoss(convention="reference")(z), F.multisoftclip(z, temperature=0.125, convention="reference")
    )
    assert torch.equal(MultiSClipLoss(reduction="none")(z), F.multisoftclip(z, reduction="none"))
    logits = [torch.randn(8, 3), torch.randn(8, 3), torch.randn(8, 3)]
    y = torch.randint(0, 3, (8,))
    assert torch.equal(UniSMMCLoss()(z, logits, y), F.unis_mmc(z, logits, y))


def test_m3co_loss_with_a_plan_equals_the_function():
    z = embeddings(m=3)
    criterion = M3CoLoss(beta=0.5)
    plan = criterion.sample(8, 3)
    mixed = [plan.mix(x, m) for m, x in enumerate(z)]
    expected = 0.5 * F.m3co(mixed, z, plan.perms, plan.lam, temperature=0.1)
    torch.testing.assert_close(criterion(z, mixed=mixed, plan=plan), expected)
    # without `mixed`, the module mixes the embeddings with the plan
    torch.testing.assert_close(criterion(z, plan=plan), expected)


@pytest.mark.parametrize("partner", [None, "mixed", "clean"])
def test_reference_m3co_loss_passes_its_partner_to_the_function(partner):
    z = embeddings(m=3)
    criterion = M3CoLoss(convention="reference", beta=0.5, partner=partner)
    assert criterion.partner == (partner or "mixed")
    plan = criterion.sample(8, 3)
    mixed = [plan.mix(x, m) for m, x in enumerate(z)]
    clean = None if criterion.partner == "mixed" else z
    expected = 0.5 * F.m3co(mixed, clean, plan.perms, plan.lam, convention="reference", partner=criterion.partner)
    assert torch.equal(criterion(z, plan=plan), expected)
    assert torch.equal(criterion(z, mixed=mixed, plan=plan), expected)


def test_schedule_switches_from_m3co_to_multisclip():
    z = embeddings()
    criterion = M3CoLoss(total_steps=9, beta=1.0)
    assert criterion.m3co_steps == 3
    phases = []
    for _ in range(9):
        phases.append(criterion.phase())
        criterion.step()
    assert phases == ["m3co"] * 3 + ["multisclip"] * 6
    assert criterion.sample(8) is None
    torch.testing.assert_close(criterion(z), F.multisoftclip(z, temperature=0.1))
    assert criterion.phase(step=2) == "m3co"
    # the step counter travels with the state dict
    restored = M3CoLoss(total_steps=9)
    restored.load_state_dict(criterion.state_dict())
    assert restored.phase() == "multisclip" and int(restored.step_count) == 9


def test_a_schedule_with_no_m3co_step_warns():
    with pytest.warns(UserWarning, match="total_steps=2 .* no M3Co step"):
        criterion = M3CoLoss(total_steps=2)
    assert criterion.phase() == "multisclip"
    criterion = M3CoLoss(total_steps=30)
    with pytest.warns(UserWarning, match="no M3Co step"):
        criterion.m3co_fraction = 0.01
    with pytest.warns(UserWarning, match="no M3Co step"):
        criterion.total_steps = 50
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        M3CoLoss(total_steps=3)
        M3CoLoss(total_steps=3, m3co_fraction=0.0)  # MultiSClip only, asked for explicitly
        M3CoLoss()


def test_clip_repr_names_only_its_options():
    assert "convention" not in repr(CLIPLoss()) and "convention='paper'" in repr(MultiSClipLoss())


def test_schedule_phase_does_not_read_the_device_counter():
    # phase() must not wait on the device: on the meta device the buffer holds no value at all
    criterion = M3CoLoss(total_steps=3).to("meta")
    assert criterion.phase() == "m3co"
    criterion.step()
    assert criterion.phase() == "multisclip"
    assert criterion.step_count.device.type == "meta"


def test_schedule_counter_follows_a_loaded_state_dict_both_ways():
    early = M3CoLoss(total_steps=6)
    late = M3CoLoss(total_steps=6)
    for _ in range(4):
        late.step()
    early_state = early.state_dict()
    late.load_state_dict(early_state)  # going back to step 0, as a resume from an early checkpoint does
    assert late.phase() == "m3co" and int(late.step_count) == 0
    late.step(), late.step()
    assert late.phase() == "multisclip" and int(late.step_count) == 2


def test_reference_convention_defaults():
    criterion = M3CoLoss(convention="reference", total_steps=500)
    assert criterion.multisclip_temperature == 0.125
    assert criterion.m3co_steps == 165  # int(0.33 * 500), as in the released training loop
    assert (criterion.sampler.mix_prob, criterion.sampler.shared_lam) == (0.5, False)
    paper = M3CoLoss(total_steps=500)
    assert paper.m3co_steps == 166 and paper.multisclip_temperature == 0.1


@pytest.mark.filterwarnings("ignore:total_steps=3 with m3co_fraction=0.33 gives no M3Co step")
@pytest.mark.parametrize("convention, options, temperature", [("reference", {}, 0.125), ("paper", {"multisclip_temperature": 0.3}, 0.3)])
def test_multisclip_phase_uses_the_multisclip_temperature(convention, options, temperature):
    z = embeddings(m=3)
    criterion = M3CoLoss(convention=convention, total_steps=3, beta=0.5, temperature=0.07, **options)
    expected = 0.5 * F.multisoftclip(z, temperature=temperature, convention=convention)
    torch.testing.assert_close(criterion(z, step=2), expected)
    assert not torch.allclose(expected, 0.5 * F.multisoftclip(z, temperature=0.07, convention=convention))


def test_sampler_options_reach_the_sampler_and_sample_follows_the_step():
    criterion = M3CoLoss(convention="reference", mix_prob=0.9, shared_lam=True, total_steps=6)
    assert (criterion.sampler.mix_prob, criterion.sampler.shared_lam) == (0.9, True)
    assert criterion.m3co_steps == 1  # int(0.33 * 6)
    assert criterion.sample(4, step=0) is not None and criterion.sample(4, step=1) is None
    with pytest.raises(ValueError, match="multisclip_temperature"):
        M3CoLoss(multisclip_temperature=0.0)


def test_m3co_loss_is_reproducible_with_a_generator():
    z = embeddings()
    a = M3CoLoss(generator=torch.Generator().manual_seed(5))(z)
    b = M3CoLoss(generator=torch.Generator().manual_seed(5))(z)
    assert torch.equal(a, b)
    assert not torch.equal(a, M3CoLoss(generator=torch.Generator().manual_seed(6))(z))


def test_m3co_loss_rejects_inconsistent_arguments():
    z = embeddings()
    criterion = M3CoLoss()
    with pytest.raises(ValueError, match="without the plan"):
        criterion(z, mixed=z)
    with pytest.raises(ValueError, match="3 modalities"):
        criterion(z, plan=criterion.sample(8, 3))
    with pytest.raises(TypeError, match="MixupPlan"):
        criterion(z, plan=(torch.arange(8), torch.ones(8)))
    with pytest.raises(ValueError, match="step"):
        criterion.phase(step=-1)


def test_modules_backpropagate():
    z = [x.requires_grad_(True) for x in embeddings()]
    loss = M3CoLoss()(z) + MultiSClipLoss()(z) + CLIPLoss()(z[0], z[1])
    loss.backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in z)


def test_repr_lists_the_options():
    text = repr(M3CoLoss(convention="reference"))
    assert "convention='reference'" in text and "partner='mixed'" in text and "beta=0.1" in text and "mix_prob=0.5" in text
    assert "partner='clean'" in repr(M3CoLoss()) and "partner='clean'" in repr(M3CoLoss(convention="reference", partner="clean"))


def test_public_names():
    for name in ("m3co_pair", "m3co", "multisoftclip_pair", "multisoftclip", "clip_loss", "unis_mmc"):
        assert callable(getattr(m3co_loss.functional, name))
    for name in ("M3CoLoss", "MultiSClipLoss", "MixupSampler", "CLIPLoss", "UniSMMCLoss", "__version__"):
        assert hasattr(m3co_loss, name)
    assert re.fullmatch(r"\d+\.\d+\.\d+", m3co_loss.__version__)


def test_readme_snippet_runs():
    namespace: dict = {}
    exec(compile(drop_in_snippet(), "README.md", "exec"), namespace)
    assert namespace["criterion"].phase() == "multisclip"
    assert torch.isfinite(namespace["loss"])


def test_documented_checkpoint_recipe_resumes_the_same_plans():
    generator = torch.Generator().manual_seed(5)
    criterion = M3CoLoss(total_steps=9, generator=generator)
    for _ in range(2):
        criterion.sample(8, 2)
        criterion.step()
    checkpoint = {"criterion": criterion.state_dict(), "mixing": generator.get_state()}
    expected = [criterion.sample(8, 2) for _ in range(2)]
    fresh_generator = torch.Generator().manual_seed(123)
    resumed = M3CoLoss(total_steps=9, generator=fresh_generator)
    resumed.load_state_dict(checkpoint["criterion"])
    fresh_generator.set_state(checkpoint["mixing"])
    assert resumed.phase() == "m3co" and int(resumed.step_count) == 2
    for plan, want in zip([resumed.sample(8, 2) for _ in range(2)], expected):
        assert torch.equal(plan.lam, want.lam) and all(torch.equal(p, q) for p, q in zip(plan.perms, want.perms))
    resumed.step()
    assert resumed.phase() == "multisclip"  # 3 of 9 steps on M3Co
