from __future__ import annotations

import pytest
import torch

from m3co_loss import MixupPlan, MixupSampler


def test_plan_shapes_and_permutations():
    plan = MixupSampler().sample(10, 3, generator=torch.Generator().manual_seed(0))
    assert plan.batch_size == 10 and plan.num_modalities == 3
    assert plan.lam.shape == (3, 10) and plan.lam.dtype == torch.float32
    for perm in plan.perms:
        assert sorted(perm.tolist()) == list(range(10))
    assert ((plan.lam >= 0) & (plan.lam <= 1)).all()


def test_generator_makes_plans_reproducible_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    p1 = MixupSampler(generator=torch.Generator().manual_seed(7)).sample(16, 2)
    assert torch.equal(torch.random.get_rng_state(), before)
    p2 = MixupSampler().sample(16, 2, generator=torch.Generator().manual_seed(7))
    assert torch.equal(p1.lam, p2.lam) and all(torch.equal(a, b) for a, b in zip(p1.perms, p2.perms))
    p3 = MixupSampler().sample(16, 2, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(p1.lam, p3.lam)


def test_shared_lam_is_shared_and_independent_lam_is_not():
    g = torch.Generator().manual_seed(1)
    shared = MixupSampler(shared_lam=True).sample(64, 3, generator=g)
    assert torch.equal(shared.lam[0], shared.lam[1]) and torch.equal(shared.lam[0], shared.lam[2])
    independent = MixupSampler(shared_lam=False).sample(64, 3, generator=g)
    assert not torch.equal(independent.lam[0], independent.lam[1])
    # each modality has its own permutation either way
    assert not torch.equal(shared.perms[0], shared.perms[1])


@pytest.mark.parametrize("mix_prob", [0.0, 0.5, 1.0])
def test_mix_prob_sets_the_share_of_mixed_rows(mix_prob):
    plan = MixupSampler(mix_prob=mix_prob, alpha=1.0).sample(20000, 1, generator=torch.Generator().manual_seed(2))
    mixed = (plan.lam[0] < 1).float().mean().item()
    assert abs(mixed - mix_prob) < 0.02


def test_lam_follows_beta_alpha_alpha():
    alpha = 0.15
    lam = MixupSampler(alpha=alpha).sample(200000, 1, generator=torch.Generator().manual_seed(3)).lam[0].double()
    # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1)); U-shaped for a < 1
    assert abs(lam.mean().item() - 0.5) < 0.01
    assert abs(lam.var().item() - 1 / (4 * (2 * alpha + 1))) < 0.01
    assert ((lam < 0.1) | (lam > 0.9)).float().mean() > 0.6
    assert torch.isfinite(lam).all()


def test_for_convention():
    paper = MixupSampler.for_convention("paper")
    ref = MixupSampler.for_convention("reference")
    assert (paper.mix_prob, paper.shared_lam) == (1.0, True)
    assert (ref.mix_prob, ref.shared_lam) == (0.5, False)
    assert MixupSampler.for_convention("reference", mix_prob=0.25).mix_prob == 0.25


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_mix_any_tensor_whose_first_dim_is_the_batch(dtype):
    g = torch.Generator().manual_seed(4)
    plan = MixupSampler().sample(4, 2, generator=g)
    images = torch.randn(4, 3, 5, 5, generator=g).to(dtype)
    mixed = plan.mix(images, 1)
    assert mixed.shape == images.shape and mixed.dtype == dtype
    lam, perm = plan.lam[1].to(dtype), plan.perms[1]
    for i in range(4):
        expected = lam[i] * images[i] + (1 - lam[i]) * images[perm[i]]
        torch.testing.assert_close(mixed[i], expected)


def test_mix_is_differentiable_and_checks_its_input():
    g = torch.Generator().manual_seed(5)
    plan = MixupSampler().sample(4, 2, generator=g)
    x = torch.randn(4, 3, generator=g).requires_grad_()
    plan.mix(x, 0).sum().backward()
    assert x.grad is not None
    with pytest.raises(ValueError, match="first dim"):
        plan.mix(torch.randn(5, 3), 0)
    with pytest.raises(TypeError, match="token ids"):
        plan.mix(torch.randint(0, 9, (4, 7)), 0)
    with pytest.raises(ValueError, match="modality"):
        plan.mix(x, 2)


def test_plan_to_returns_itself_when_already_there_and_moves_otherwise():
    plan = MixupSampler(shared_lam=False).sample(6, 3, generator=torch.Generator().manual_seed(5))
    assert plan.to("cpu") is plan and plan.to(torch.device("cpu")) is plan
    moved = plan.to("meta")
    assert moved is not plan and moved.lam.device.type == "meta" and all(p.device.type == "meta" for p in moved.perms)
    assert moved.lam.shape == plan.lam.shape and moved.lam.dtype == plan.lam.dtype
    assert [(p.shape, p.dtype) for p in moved.perms] == [(p.shape, p.dtype) for p in plan.perms]
    assert plan.lam.device.type == "cpu"  # the original stays where it was
    # a plan with only some tensors on the device is a new plan, the others moved
    partly = MixupPlan(plan.perms, moved.lam)
    assert partly.to("meta") is not partly and all(p.device.type == "meta" for p in partly.to("meta").perms)
    assert moved.to("meta") is moved


def test_calling_the_sampler_is_sampling():
    call = MixupSampler(shared_lam=False, mix_prob=0.5)(9, 3, generator=torch.Generator().manual_seed(6))
    sample = MixupSampler(shared_lam=False, mix_prob=0.5).sample(9, 3, generator=torch.Generator().manual_seed(6))
    assert torch.equal(call.lam, sample.lam) and all(torch.equal(a, b) for a, b in zip(call.perms, sample.perms))
    other = MixupSampler(shared_lam=False, mix_prob=0.5).sample(9, 3, generator=torch.Generator().manual_seed(7))
    assert not torch.equal(call.lam, other.lam)


def test_plan_rejects_inconsistent_shapes():
    with pytest.raises(ValueError, match="lam"):
        MixupPlan((torch.arange(4),), torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"perms\[0\]"):
        MixupPlan((torch.arange(3),), torch.ones(1, 4))


def test_sample_rejects_bad_sizes():
    with pytest.raises(ValueError, match="batch_size"):
        MixupSampler().sample(-1)
    with pytest.raises(TypeError, match="batch_size must be an int; got float"):
        MixupSampler().sample(2.0)
    with pytest.raises(TypeError, match="num_modalities must be an int; got bool"):
        MixupSampler().sample(4, True)
    with pytest.raises(ValueError, match="num_modalities"):
        MixupSampler().sample(4, 0)
    with pytest.raises(TypeError, match="generator"):
        MixupSampler().sample(4, generator="seed")


def test_sample_draws_plans_for_the_small_local_batches_of_a_process_group():
    # A rank may hold one row, or none, of a global batch; the loss checks the global size.
    for n in (0, 1):
        plan = MixupSampler().sample(n, 2, generator=torch.Generator().manual_seed(0))
        assert plan.lam.shape == (2, n) and all(p.tolist() == list(range(n)) for p in plan.perms)


@pytest.mark.cuda
def test_plan_on_cuda():
    plan = MixupSampler().sample(8, 2, device="cuda", generator=torch.Generator().manual_seed(0))
    assert plan.lam.is_cuda and plan.perms[0].is_cuda
    x = torch.randn(8, 3, device="cuda")
    assert plan.mix(x, 0).is_cuda


def test_plans_compare_by_identity():
    sampler = MixupSampler(generator=torch.Generator().manual_seed(0))
    plan = sampler.sample(6, 2)
    assert plan == plan and plan != sampler.sample(6, 2)
    assert len({plan, plan}) == 1  # hashable, so usable as a dict key
