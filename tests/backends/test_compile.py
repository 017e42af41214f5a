"""The losses under ``torch.compile``: same values and gradients as eager mode, one graph for every
backend with the value checks off (the tiled and Triton kernels are custom operators), bounded
recompilation, and no recompilation of a compiled training step at every ``M3CoLoss.step()``.

Most cases compile with the ``aot_eager`` backend (dynamo and AOT autograd, no code generation),
which exercises the tracing without a C++ compiler; one case runs inductor itself.
"""

from __future__ import annotations

import datetime
import importlib.util
import operator
import shutil

import pytest
import torch

import m3co_loss
from m3co_loss import M3CoLoss, MultiSClipLoss, backends
from m3co_loss import functional as F

pytestmark = pytest.mark.skipif(not hasattr(torch.compiler, "is_compiling"), reason="needs torch >= 2.3")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(params=[True, False], ids=["checks", "no-checks"])
def value_checks(request):
    previous = m3co_loss.set_value_checks(request.param)
    yield request.param
    m3co_loss.set_value_checks(previous)


def embeddings(n=9, d=4, m=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, generator=g, dtype=dtype).requires_grad_() for _ in range(m)]


def losses(backend):
    """name -> function of the embeddings, for every loss that runs through the kernels."""
    plan = M3CoLoss(generator=torch.Generator().manual_seed(1)).sample(9, 3)

    def mixed(z):
        return [plan.mix(x, m) for m, x in enumerate(z)]

    partners = torch.stack([torch.arange(9), plan.perms[0], plan.perms[1]], 1)
    weights = torch.softmax(torch.linspace(-1, 1, 27, dtype=torch.float64).reshape(9, 3), 1)
    labels = torch.tensor([4, 0, 4, 2, 0, 4, 9, 2, 2])

    return {
        "m3co": lambda z: F.m3co(mixed(z), z, plan.perms, plan.lam, backend=backend),
        "m3co-reference": lambda z: F.m3co(mixed(z), z, plan.perms, plan.lam, convention="reference", backend=backend),
        "m3co_pair": lambda z: F.m3co_pair(mixed(z)[0], z[1], plan.perms[0], plan.lam[0], backend=backend),
        "multisoftclip": lambda z: F.multisoftclip(z, backend=backend),
        "multisoftclip-reference": lambda z: F.multisoftclip(z, convention="reference", backend=backend),
        "multisoftclip_pair": lambda z: F.multisoftclip_pair(z[0], z[1], reduction="none", backend=backend).sum(),
        "clip_loss": lambda z: F.clip_loss(z[0], z[1], backend=backend),
        "contrastive_loss[partners]": lambda z: F.contrastive_loss(z[0], z[1], partners=partners, weights=weights, reduction="none", backend=backend).sum(),
        "contrastive_loss[labels]": lambda z: F.contrastive_loss(z[0], z[1], labels=labels, convention="reference", backend=backend),
        "contrastive_loss[identity]": lambda z: F.contrastive_loss(z[0], z[1], backend=backend),
    }


NAMES = list(losses("dense"))


@pytest.mark.parametrize("name", NAMES)
def test_compiled_losses_equal_eager(name, backend, value_checks):
    z = embeddings()
    fn = losses(backend)[name]
    expected = fn(z)
    expected_grads = torch.autograd.grad(expected, z, allow_unused=True, materialize_grads=True)
    got = torch.compile(fn, backend="aot_eager")(z)
    got_grads = torch.autograd.grad(got, z, allow_unused=True, materialize_grads=True)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def innermost_frame(node):
    files = [line for line in (node.meta.get("stack_trace") or "").splitlines() if line.strip().startswith("File ")]
    return files[-1] if files else ""


KERNEL_FILES = ("m3co_loss/backends/tiled.py", "m3co_loss/backends/softclip.py", "m3co_loss/backends/_tiling.py", "m3co_loss/backends/triton.py")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("backend_name", ["dense", "tiled"])
def test_losses_compile_to_one_graph_without_value_checks(name, backend_name, small_tiles):
    """One graph, no break (``fullgraph=True`` raises on any); the tiled kernels appear as calls of
    their custom operators, nothing inside them is traced, and the compiled loss equals eager."""
    z = embeddings()
    fn = losses(backend_name)[name]
    with m3co_loss.value_checks(False):
        explained = torch._dynamo.explain(fn)(z)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
        torch._dynamo.reset()
        expected = fn(z)
        got = torch.compile(fn, backend="aot_eager", fullgraph=True)(z)
    targets = [str(node.target) for graph in explained.graphs for node in graph.graph.nodes if node.op == "call_function"]
    kernel_ops = [t for t in targets if "m3co_loss." in t]
    assert bool(kernel_ops) == (backend_name == "tiled"), targets
    # the kernels' modules contribute the operator calls and the unpacking of their outputs, nothing else
    traced_in_kernels = [
        str(node.target)
        for graph in explained.graphs
        for node in graph.graph.nodes
        if node.op == "call_function" and any(path in innermost_frame(node) for path in KERNEL_FILES)
    ]
    assert all(t.startswith("m3co_loss.") or t == str(operator.getitem) for t in traced_in_kernels), traced_in_kernels
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    got_grads = torch.autograd.grad(got, z, allow_unused=True, materialize_grads=True)
    for g, e in zip(got_grads, torch.autograd.grad(expected, z, allow_unused=True, materialize_grads=True)):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_tiled_kernels_compile_once_for_every_batch_size_and_tile_size(small_tiles):
    """A second batch size recompiles once with a symbolic N (the fake implementations take symbolic
    shapes); more batch sizes, new temperature values and new tile sizes recompile nothing (the
    operators read the tile sizes when they run, as in eager mode)."""
    compiled_graphs = []

    def counting_backend(gm, example_inputs):
        compiled_graphs.append(gm)
        return gm.forward

    def fn(z, t):
        n = z[0].shape[0]
        pair = F.m3co_pair(z[0], z[1], torch.arange(n).flip(0), torch.full((n,), 0.3, dtype=z[0].dtype), temperature=t, backend="tiled")
        return F.multisoftclip(z, temperature=t, backend="tiled") + pair

    compiled = torch.compile(fn, backend=counting_backend, fullgraph=True)
    with m3co_loss.value_checks(False):
        for n in (9, 11, 13, 16):
            for t0 in (0.1, 0.5):
                z = embeddings(n=n, m=2, seed=n)
                t = torch.tensor(t0, dtype=torch.float64)
                torch.testing.assert_close(compiled(z, t), fn(z, t), rtol=1e-12, atol=1e-12)
        assert len(compiled_graphs) == 2
        with backends.config(tile_rows=4, tile_cols=7, tile_square=5):
            assert torch.equal(compiled(z, t), fn(z, t))  # the new tiles' bits
        assert len(compiled_graphs) == 2


def test_compiled_training_step_recompiles_only_at_the_phase_switch():
    """``M3CoLoss`` must not make a compiled step guard on its step counter: that recompiled the
    step at every ``step()`` until dynamo's recompile limit, and then ran it uncompiled."""
    previous = m3co_loss.set_value_checks(False)
    compiled_graphs = []

    def counting_backend(gm, example_inputs):
        compiled_graphs.append(gm)
        return gm.forward

    encoders = [torch.nn.Linear(6, 4), torch.nn.Linear(5, 4)]
    inputs = [torch.randn(8, 6), torch.randn(8, 5)]
    criterion = M3CoLoss(total_steps=12, generator=torch.Generator().manual_seed(0))

    @torch.compile(backend=counting_backend)
    def step_loss():
        return criterion([enc(x) for enc, x in zip(encoders, inputs)])

    try:
        phases, compiling_steps = [], []
        for step in range(12):
            phases.append(criterion.phase())
            before = len(compiled_graphs)
            step_loss().backward()
            if len(compiled_graphs) > before:
                compiling_steps.append(step)
            criterion.step()
    finally:
        m3co_loss.set_value_checks(previous)
    assert phases == ["m3co"] * 4 + ["multisclip"] * 8
    assert compiling_steps == [0, 4]


def test_compiled_step_follows_a_changed_schedule():
    """Setting ``total_steps`` or ``m3co_fraction`` after construction moves the phase, also for a
    compiled step, whose guard is on the phase."""
    z = embeddings(m=2)
    criterion = M3CoLoss(total_steps=3)
    compiled = torch.compile(lambda z: criterion(z), backend="aot_eager")
    criterion.step()
    assert criterion.phase() == "multisclip"
    torch.testing.assert_close(compiled(z), 0.1 * F.multisoftclip(z), rtol=1e-12, atol=1e-12)
    criterion.total_steps = 30
    assert criterion.phase() == "m3co" and criterion.m3co_steps == 10
    plan = criterion.sample(9, 2)
    assert plan is not None
    criterion.m3co_fraction = 0.0
    assert criterion.phase() == "multisclip" and criterion.sample(9, 2) is None
    torch.testing.assert_close(compiled(z), 0.1 * F.multisoftclip(z), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="total_steps"):
        criterion.total_steps = 0
    with pytest.raises(ValueError, match="m3co_fraction"):
        criterion.m3co_fraction = 1.5
    assert criterion.total_steps == 30 and criterion.m3co_fraction == 0.0


@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None, reason="inductor needs a C compiler on CPU")
@pytest.mark.slow
def test_inductor_compiles_the_schedule_and_matches_eager():
    """The default backend (inductor, generated C++ on CPU), float32, both phases of ``M3CoLoss``
    and ``MultiSClipLoss``; inductor fuses and reorders sums, so the match is to float32 rounding."""
    previous = m3co_loss.set_value_checks(False)
    try:
        z = embeddings(n=16, d=8, m=2, dtype=torch.float32)
        criterion = M3CoLoss(total_steps=3, generator=torch.Generator().manual_seed(0))
        plan = criterion.sample(16, 2)
        compiled = torch.compile(lambda z, plan: criterion(z, plan=plan))
        torch.testing.assert_close(compiled(z, plan), criterion(z, plan=plan), rtol=1e-5, atol=1e-6)
        criterion.step()
        torch.testing.assert_close(compiled(z, None), criterion(z), rtol=1e-5, atol=1e-6)
        got = torch.compile(MultiSClipLoss(convention="reference"))(z)
        torch.testing.assert_close(got, MultiSClipLoss(convention="reference")(z), rtol=1e-5, atol=1e-6)
    finally:
        m3co_loss.set_value_checks(previous)


def test_value_checks_still_name_the_argument_under_compile():
    z = embeddings(m=2)
    with torch.no_grad():
        z[1][3, 0] = float("nan")
    with pytest.raises(ValueError, match=r"z\[1\] contains NaN or Inf"):
        torch.compile(lambda z: F.multisoftclip(z), backend="aot_eager")(z)
    with pytest.raises(ValueError, match="perm"):
        torch.compile(lambda a, b: F.m3co_pair(a, b, torch.zeros(9, dtype=torch.long), torch.ones(9, dtype=torch.float64)), backend="aot_eager")(*embeddings(m=2))


def _compiled_rank(rank: int, world: int, store_path: str, out_dir: str) -> None:
    """One spawned rank: eager and compiled losses that gather over the group, on uneven shards."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        z = embeddings(n=3 + 2 * rank, seed=rank)
        plan = M3CoLoss(generator=torch.Generator().manual_seed(rank)).sample(z[0].shape[0], 3)
        functions = {
            "multisoftclip": lambda z, backend: F.multisoftclip(z, gather_distributed=True, backend=backend),
            "m3co": lambda z, backend: F.m3co([plan.mix(x, m) for m, x in enumerate(z)], z, plan.perms, plan.lam, gather_distributed=True, backend=backend),
        }
        differences = {}
        for checks, backend in ((True, "dense"), (False, "tiled")):  # the value checks gather row counts too
            with m3co_loss.value_checks(checks):
                for name, fn in functions.items():
                    torch._dynamo.reset()
                    eager = fn(z, backend)
                    eager_grads = torch.autograd.grad(eager, z)
                    compiled = torch.compile(fn, backend="aot_eager")(z, backend)
                    compiled_grads = torch.autograd.grad(compiled, z)
                    differences[(checks, name, backend)] = max(
                        [float((compiled - eager).abs())] + [float((c - e).abs().max()) for c, e in zip(compiled_grads, eager_grads)]
                    )
        torch.save(differences, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="needs torch.distributed with gloo")
@pytest.mark.slow
def test_gathering_losses_compile_on_a_process_group(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_compiled_rank, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, start_method="spawn")
    for rank in range(2):
        differences = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert len(differences) == 4
        assert max(differences.values()) <= 1e-12, differences


def test_unis_mmc_compiles_to_one_graph_and_equals_eager():
    g = torch.Generator().manual_seed(4)
    r = [torch.randn(8, 4, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3)]
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    wrong = -5 * torch.nn.functional.one_hot(y, 3).double()  # every head wrong: no positive pair, the fallback branch
    cases = {"mixed": [torch.randn(8, 3, generator=g, dtype=torch.float64) for _ in range(3)], "all-wrong": [wrong] * 3}
    previous = m3co_loss.set_value_checks(False)
    try:
        for name, logits in cases.items():
            torch._dynamo.reset()
            expected = F.unis_mmc(r, logits, y)
            expected_grads = torch.autograd.grad(expected, r)
            explained = torch._dynamo.explain(F.unis_mmc)(r, logits, y)
            assert (explained.graph_count, explained.graph_break_count) == (1, 0), (name, explained.break_reasons)
            got = torch.compile(F.unis_mmc, backend="aot_eager", fullgraph=True)(r, logits, y)
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
            for a, b in zip(torch.autograd.grad(got, r), expected_grads):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    finally:
        m3co_loss.set_value_checks(previous)


LEARNED = {
    "CLIPLoss": lambda backend: m3co_loss.CLIPLoss(temperature=0.07, learn_temperature=True, backend=backend),
    "MultiSClipLoss": lambda backend: MultiSClipLoss(target_temperature=0.2, learn_temperature=True, backend=backend),
    "M3CoLoss": lambda backend: M3CoLoss(total_steps=3, learn_temperature=True, backend=backend, generator=torch.Generator().manual_seed(2)),
}


@pytest.mark.parametrize("name", list(LEARNED))
@pytest.mark.parametrize("backend", ["dense", "tiled"])
def test_learned_temperatures_compile_and_equal_eager(name, backend, small_tiles):
    """A module that learns its temperature compiles to one graph with the value checks off
    (``fullgraph=True``; on the tiled backend ``torch.cond`` chooses MultiSClip's fused kernel from
    the temperature's value in the graph); values and every gradient, the log-scale's included,
    equal eager mode's."""
    criterion = LEARNED[name](backend).double()
    z = embeddings(m=2)
    with m3co_loss.value_checks(False):
        plan = criterion.sample(9, 2) if name == "M3CoLoss" else None

        def fn(z):
            return criterion(z, plan=plan) if name == "M3CoLoss" else criterion(*z) if name == "CLIPLoss" else criterion(z)

        expected = fn(z)
        leaves = list(z) + list(criterion.parameters())
        expected_grads = torch.autograd.grad(expected, leaves, allow_unused=True, materialize_grads=True)
        explained = torch._dynamo.explain(fn)(z)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
        torch._dynamo.reset()
        got = torch.compile(fn, backend="aot_eager", fullgraph=True)(z)
        got_grads = torch.autograd.grad(got, leaves, allow_unused=True, materialize_grads=True)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert float(expected_grads[len(z)].abs()) > 0  # the temperature is learned
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernels_compile_to_one_graph_under_the_interpreter():
    """The Triton backend's custom operators under ``fullgraph=True`` (Triton's CPU interpreter, in a
    subprocess: the variable must be set before triton is imported); float32, same operations as
    eager mode, so the match is to the last bit in practice and asserted to float32 rounding."""
    from check_scripts import run_check_script

    results = run_check_script("triton_compile.py", timeout=600)
    assert len(results) == 6, results
    for case, (breaks, difference) in results.items():
        assert breaks == 0 and difference <= 1e-6, (case, breaks, difference)
