"""One ROSMAP training step of the pipeline under ``--convention reference`` against a transcription
of the released model's loss (tests/released_medical.py): the loss and every parameter gradient,
in float64, for a step of each phase, with the same weights and the same mixing draws."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

import training  # noqa: E402
from training import omics  # noqa: E402
import released_medical  # noqa: E402
from rosmap import ROSMAP  # noqa: E402
from test_medical import real_rosmap_dir, write_mogonet  # noqa: E402


def layers(mlp):
    """``(W1, b1, W2, b2)`` of an engine ``mlp`` (Linear, ReLU, Linear: no dropout in the released model)."""
    linear = [m for m in mlp if isinstance(m, torch.nn.Linear)]
    assert len(linear) == 2 and len(mlp) == 3
    return (linear[0].weight, linear[0].bias, linear[1].weight, linear[1].bias)


@pytest.fixture(scope="module")
def rosmap(tmp_path_factory):
    folder = real_rosmap_dir() or write_mogonet(tmp_path_factory.mktemp("rosmap"), features=(200, 200, 200), n_train=245, n_test=106)
    data = omics.load_mogonet(folder, num_classes=2, feature_counts=ROSMAP.feature_counts)
    args = omics.parse(ROSMAP, ["--convention", "reference", "--holdout", "0", "--recipe", "released", "--output-dir", "unused"])
    return omics.make_task(ROSMAP, data), omics.config_from_args(ROSMAP, args)


@pytest.mark.parametrize("phase", ["m3co", "multisclip"])
def test_a_reference_step_is_the_released_models_loss_and_gradient(rosmap, phase):
    task, config = rosmap
    torch.manual_seed(0)
    model = task.build_model().double()
    inputs, y = task.train.batch(None)
    inputs = [x.double() for x in inputs]
    objective = training.Objective.from_config(config, num_modalities=3, num_classes=2, seed=5)
    if phase == "multisclip":
        for _ in range(int(0.33 * config.epochs)):  # the released switch: epoch < int(0.33 * num_epoch)
            objective.epoch_end()
    assert objective.phase() == phase
    plans = []
    if phase == "m3co":
        sample = objective.m3col.sample

        def recorded(*args, **kwargs):
            plans.append(sample(*args, **kwargs))
            return plans[-1]

        objective.m3col.sample = recorded
    step = training.objective.TrainStep(model, objective)  # what the trainer calls once per batch
    loss, _ = step(inputs, y)
    loss.backward()

    draws = None
    if phase == "m3co":
        (plan,) = plans
        lam = plan.lam.double()
        draws = [(plan.perms[m], lam[m], lam[m] != 1) for m in range(3)]
        assert all(0 < int(d[2].sum()) < len(y) for d in draws)  # some rows mixed, some not, in every view
    copies = {name: p.detach().clone().requires_grad_(True) for name, p in model.named_parameters()}
    as_copy = {id(p): copies[name] for name, p in model.named_parameters()}

    def own(mlp):
        return tuple(as_copy[id(p)] for p in layers(mlp))

    expected = released_medical.training_loss(
        [own(e) for e in model.encoders], [own(h) for h in model.heads], own(model.fusion), inputs, y, phase=phase, draws=draws
    )
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    for name, p in model.named_parameters():
        reference = copies[name].grad
        scale = reference.abs().max().item()
        assert scale > 0, name
        assert (p.grad - reference).abs().max().item() <= 1e-10 * scale, name
