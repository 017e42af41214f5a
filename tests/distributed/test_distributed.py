"""Losses with ``gather_distributed=True`` on gloo process groups equal one process on the global batch.

Process groups of 2 and 3 CPU processes are spawned once (concurrently) for the whole module;
each rank runs every case of tests/distributed_cases.py in float64 with DistributedDataParallel
and saves its loss values and averaged parameter gradients. The tests below compare them with
the same cases run here, on one process, on the concatenated batch, to 1e-9.
"""

from __future__ import annotations

import dataclasses
import datetime
import time

import pytest
import torch
import torch.multiprocessing as mp

import distributed_cases as cases
from m3co_loss import backends
from m3co_loss import distributed as dist_utils
from m3co_loss import functional as F

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="needs torch.distributed with gloo"
)

TOLERANCE = dict(rtol=1e-9, atol=1e-9)


@pytest.fixture(autouse=True)
def restore_backend_config():
    """The one-process references set small tiles in this process: later test modules get the defaults back."""
    previous = backends.get_config()
    yield
    backends.set_config(**dataclasses.asdict(previous))
WORLDS = sorted(cases.SCENARIOS)


@pytest.fixture(scope="module")
def ranks_output(tmp_path_factory):
    """{world size: [what each rank saved]} after one run of every world size."""
    running = {}
    for world in WORLDS:
        folder = tmp_path_factory.mktemp(f"world{world}")
        context = mp.start_processes(
            cases.rank_main, args=(world, str(folder / "store"), str(folder)), nprocs=world, join=False, start_method="spawn"
        )
        running[world] = (folder, context)
    saved = {}
    for world, (folder, context) in running.items():
        while not context.join(timeout=300):
            pass
        saved[world] = [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(world)]
    return saved


PARAMS = [
    pytest.param(world, sizes, case, backend, reduction, id=f"{'+'.join(map(str, sizes))}-{cases.variant_id(case, backend, reduction)}")
    for world in WORLDS
    for sizes in cases.SCENARIOS[world]
    for case, backend, reduction in cases.variants()
]


def assert_close(actual, expected, what):
    torch.testing.assert_close(actual, expected, **TOLERANCE, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("world, sizes, case, backend, reduction", PARAMS)
def test_loss_and_ddp_gradients_equal_one_process(ranks_output, world, sizes, case, backend, reduction):
    key = (tuple(sizes), cases.variant_id(case, backend, reduction))
    per_rank = [saved["variants"][key] for saved in ranks_output[world]]
    for r, result in enumerate(per_rank):
        assert not isinstance(result, str), f"rank {r} failed:\n{result}"
    # The reference always uses the dense backend: the tiled one must agree with it as well.
    expected_value, expected_grads = cases.reference(case, reduction, tuple(sizes))
    values = [value for value, _ in per_rank]
    if reduction == "none":
        assert [v.shape[0] for v in values] == list(sizes)
        assert_close(torch.cat(values), expected_value, "per-sample values of the ranks, concatenated")
    else:
        # The average over ranks is the loss on the global batch (what DDP's gradient averaging sees).
        assert_close(torch.stack(values).mean(), expected_value, "average of the ranks' losses")
        if reduction == "-":  # UniS-MMC returns the global batch's loss on every rank
            for r, value in enumerate(values):
                assert_close(value, expected_value, f"rank {r}'s loss")
    if case.learned is not None:  # the temperature is learned: its gradient is part of the comparison
        scale = "multisclip_logit_scale" if "MultiSClip phase" in case.name else "logit_scale"
        name = "logit_scale" if case.learned == "functional" else f"criteria.{case.learned}.{scale}"
        assert float(expected_grads[name].abs()) > 1e-6, name
    for r, (_, grads) in enumerate(per_rank):
        for name, grad in expected_grads.items():
            assert_close(grads[name], grad, f"rank {r}, gradient of {name}")


@pytest.mark.parametrize("world", WORLDS)
def test_inconsistent_inputs_raise_the_same_clear_error_on_every_rank(ranks_output, world):
    for r, saved in enumerate(ranks_output[world]):
        errors = saved["errors"]
        assert errors["one row in all"].startswith("ValueError: z_a must hold at least 2 samples over all ranks"), (r, errors)
        assert errors["D differs"].startswith("ValueError: z has D = 5 on rank"), (r, errors)
        assert errors["dtype differs"].startswith("TypeError: z_a is promoted to torch.float32 on rank"), (r, errors)
        last = world - 1
        assert errors["partners out of range"] == (
            f"ValueError: partners on rank {last} must hold column indices in [0, {3 * world}) "
            f"(global indices: N = {3 * world} rows over all ranks); got {3 * world}"), (r, errors)
        assert errors["weights off"].startswith("ValueError: weights on rank 0: every row must sum to 1"), (r, errors)
        assert errors["weights off"].endswith("; row 0 sums to 1.2") == (r == 0), (r, errors)  # the details: on the rank that has them
        assert errors["negative label"] == f"ValueError: labels on rank {last} must be non-negative class indices; got -1", (r, errors)


VALUE_WORLD, VALUE_TIMEOUT_S, VALUE_DEADLINE_S = 2, 20, 240


@pytest.fixture(scope="module")
def value_problem_outcomes(tmp_path_factory):
    """What each of 2 ranks raised in the cases of ``distributed_cases._value_problem_cases`` ("values")
    and ``distributed_cases._argument_error_cases`` ("arguments").

    A rank left waiting in a collective fails there after the process group's timeout; if the
    ranks are still running at the deadline, they are terminated and the test fails.
    """
    folder = tmp_path_factory.mktemp("value_problems")
    context = mp.start_processes(
        cases.value_problems_main, args=(VALUE_WORLD, str(folder / "store"), str(folder), VALUE_TIMEOUT_S),
        nprocs=VALUE_WORLD, join=False, start_method="spawn",
    )
    deadline = time.monotonic() + VALUE_DEADLINE_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.terminate()
            pytest.fail(f"the ranks were still running after {VALUE_DEADLINE_S} s")
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(VALUE_WORLD)]


def test_a_bad_value_on_one_rank_raises_on_every_rank(value_problem_outcomes):
    bad = VALUE_WORLD - 1
    outcomes = [saved["values"] for saved in value_problem_outcomes]
    names = set(outcomes[0])
    assert len(names) == 16 and all(set(outcome) == names for outcome in outcomes)
    for r, outcome in enumerate(outcomes):
        for name, (message, raised) in outcome.items():
            if message is not None:
                expected = f"ValueError: {message}" if r == bad else f"ValueError: rank {bad}: ValueError: {message}"
                assert raised == expected, (r, name, raised)
        # two bad ranks: each raises its own problem
        own = "lam must lie in [0, 1] (NaN is not allowed)" if r == 0 else "mixed_a contains NaN or Inf"
        assert outcome["both ranks bad"][1] == f"ValueError: {own}", (r, outcome["both ranks bad"])
        # value checks off: no rank raises, the NaN reaches every rank's loss
        assert outcome["value checks off"][1] == "loss nan", (r, outcome["value checks off"])
        assert outcome["sound call after"][1] == "no error", (r, outcome["sound call after"])


def test_a_bad_argument_on_one_rank_raises_on_every_rank(value_problem_outcomes):
    """An argument of the wrong kind or shape on one rank: that rank raises its own error (what it
    raises alone), the others a ValueError naming the rank and the error; no rank waits."""
    bad = VALUE_WORLD - 1
    outcomes = [saved["arguments"] for saved in value_problem_outcomes]
    names = set(outcomes[0])
    assert len(names) == 14 and all(set(outcome) == names for outcome in outcomes)
    own_errors = {"both ranks bad", "value problem and bad argument"}  # every rank raises its own
    for name in names - own_errors - {"sound call after"}:
        alone, raised = outcomes[bad][name]
        assert alone.startswith(("TypeError: ", "ValueError: ")) and raised == alone, (name, alone, raised)
        for r in range(VALUE_WORLD):
            if r != bad:
                assert outcomes[r][name] == ("no error", f"ValueError: rank {bad}: {alone}"), (r, name, outcomes[r][name])
    for name in own_errors:
        for r, (alone, raised) in enumerate(o[name] for o in outcomes):
            assert alone.startswith(("TypeError: ", "ValueError: ")) and raised == alone, (r, name, alone, raised)
    assert outcomes[0]["value problem and bad argument"][1] == "ValueError: z_a contains NaN or Inf"
    # a few of the errors, spelled out
    assert outcomes[bad]["m3co_pair list"][1].startswith("TypeError: mixed_a must be a torch.Tensor")
    assert outcomes[0]["clip_loss z_b of another D"][1].startswith(f"ValueError: rank {bad}: ValueError: z_b ")
    assert outcomes[0]["M3CoLoss plan"][1] == f"ValueError: rank {bad}: TypeError: plan must be a MixupPlan; got str"
    for r, outcome in enumerate(outcomes):
        assert outcome["sound call after"][1] == "no error", (r, outcome["sound call after"])


@pytest.mark.parametrize("world", WORLDS)
def test_compiled_losses_break_the_graph_only_to_gather_row_counts(ranks_output, world):
    """Under ``torch.compile`` a gathered loss breaks the graph only where it gathers the ranks'
    row counts (they fix the gathered shapes); the values and gradients equal eager mode."""
    for r, saved in enumerate(ranks_output[world]):
        compiled = saved["compiled"]
        assert len(compiled) == 6, (r, compiled)
        for (name, backend), (breaks, difference) in compiled.items():
            assert breaks == ["distributed.py:all_gather_ints"], (r, name, backend, breaks)
            assert difference < 1e-12, (r, name, backend, difference)


# ----------------------------------------------------------------------------- no process group


SINGLE_SIZES = (5, 3)


@pytest.mark.parametrize("case, backend, reduction", [pytest.param(*v, id=cases.variant_id(*v)) for v in cases.variants()])
def test_gather_without_a_process_group_is_one_process(case, backend, reduction):
    assert not dist_utils.is_initialized()
    assert F._spread(True) is False  # the losses take the one-process path: the equality below is by design
    value, grads = cases.single_process(case, backend, reduction, SINGLE_SIZES, gather=True)
    expected_value, expected_grads = cases.single_process(case, backend, reduction, SINGLE_SIZES, gather=False)
    assert torch.equal(value, expected_value)
    assert all(torch.equal(grads[name], g) for name, g in expected_grads.items())


def test_helpers_without_a_process_group():
    x = torch.randn(3, 2, requires_grad=True)
    assert dist_utils.rank() == 0 and dist_utils.world_size() == 1
    assert dist_utils.all_gather_sizes(3, x.device) == [3]
    assert dist_utils.communication_device() == torch.device("cpu")
    assert dist_utils.all_gather_with_grad(x) is x
    # One process still needs two samples for a contrastive loss.
    with pytest.raises(ValueError, match="N >= 2"):
        F.clip_loss(torch.randn(1, 4), torch.randn(1, 4), gather_distributed=True)


@pytest.mark.slow
def test_group_of_one_process_is_one_process(tmp_path):
    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=datetime.timedelta(seconds=60))
    try:
        assert dist_utils.world_size() == 1 and dist_utils.all_gather_sizes(4, torch.device("cpu")) == [4]
        assert F._spread(True) is False
        with pytest.raises(ValueError, match=r"^sizes\[0\] = 5 but this rank holds 4 rows"):
            dist_utils.all_gather_with_grad(torch.randn(4, 2), sizes=[5])
        for case, backend, reduction in cases.variants():
            value, grads = cases.single_process(case, backend, reduction, SINGLE_SIZES, gather=True)
            expected_value, expected_grads = cases.single_process(case, backend, reduction, SINGLE_SIZES, gather=False)
            assert torch.equal(value, expected_value), cases.variant_id(case, backend, reduction)
            assert all(torch.equal(grads[name], g) for name, g in expected_grads.items())
    finally:
        torch.distributed.destroy_process_group()


def test_unis_mmc_gather_distributed_must_be_a_bool():
    import m3co_loss

    r = [torch.randn(4, 3), torch.randn(4, 3)]
    logits = [torch.randn(4, 2), torch.randn(4, 2)]
    with pytest.raises(TypeError, match="gather_distributed"):
        F.unis_mmc(r, logits, torch.tensor([0, 1, 0, 1]), gather_distributed=1)
    with pytest.raises(TypeError, match="gather_distributed"):
        m3co_loss.UniSMMCLoss(gather_distributed="yes")
