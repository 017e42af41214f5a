"""Parity of the tiled backend (m3co_loss.backends.tiled) with the dense reference, in value and gradient.

Tile sizes are drawn by hypothesis (smaller than, equal to, larger than N, not dividing N),
so the block loops, the diagonal blocks of the symmetric kernel and the ragged last tiles are
all exercised. Float64 must agree to 1e-10, float32 to 1e-5, relative to the values or, for
entries near zero, to the scale of the logits ``max(1, 1/t)``: gradients of a similarity
``p_a . p_b / t`` are of that size, and the normalisation's projection ``(I - p p^T)`` turns
their rounding error into an absolute one (with D = 1 the exact gradient is 0).
"""

from __future__ import annotations

import threading

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from m3co_loss import backends
from m3co_loss import functional as F
from m3co_loss.backends import Rows, softclip, tiled
from strategies import batches, tile_sizes, tiles

CONVENTIONS = ["paper", "reference"]
EPS = {torch.float64: 1e-10, torch.float32: 1e-5}


def tol(dtype, t=1.0, inputs=()) -> dict:
    # gradients with respect to z are the projected gradients with respect to p, divided by |z|
    smallest_norm = min([1.0] + [float(x.double().norm(dim=-1).min()) for x in inputs])
    return dict(rtol=EPS[dtype], atol=EPS[dtype] * max(1.0, 1.0 / t) / max(smallest_norm, 1e-3))

# 0.1 and 0.125: the static shift; 0.02 (float32) and 0.002: the exact-maximum path.
temperatures = st.sampled_from([0.02, 0.1, 0.125, 0.5, 0.002])




def value_and_grads(fn, inputs):
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    value = fn(*leaves)
    return value.detach(), torch.autograd.grad(value.sum(), leaves)


def assert_backends_agree(fn, inputs, dtype, sizes, t=1.0):
    dense = value_and_grads(lambda *x: fn(*x, backend="dense"), inputs)
    with tiles(*sizes):
        tiled = value_and_grads(lambda *x: fn(*x, backend="tiled"), inputs)
    torch.testing.assert_close(tiled[0], dense[0], **tol(dtype, t))
    for got, expected in zip(tiled[1], dense[1]):
        torch.testing.assert_close(got, expected, **tol(dtype, t, inputs))


# ----------------------------------------------------------------------------- public functions


@given(batch=batches(), t=temperatures, convention=st.sampled_from(CONVENTIONS), sizes=tile_sizes, weighted=st.booleans())
def test_m3co_pair_tiled_equals_dense(batch, t, convention, sizes, weighted):
    perm, lam, w = batch["perms"][0], batch["lam"], batch["weights"]

    def fn(a, b, backend):
        v = F.m3co_pair(a, b, perm, lam, temperature=t, convention=convention, backend=backend, reduction="none" if weighted else "mean")
        return (v * w).sum() if weighted else v

    assert_backends_agree(fn, batch["z"], batch["dtype"], sizes, t)


@given(batch=batches(), t=temperatures, convention=st.sampled_from(CONVENTIONS), sizes=tile_sizes, weighted=st.booleans())
def test_multisoftclip_pair_tiled_equals_dense(batch, t, convention, sizes, weighted):
    w = batch["weights"]

    def fn(a, b, backend):
        v = F.multisoftclip_pair(a, b, temperature=t, convention=convention, backend=backend, reduction="none" if weighted else "sum")
        return (v * w).sum() if weighted else v

    assert_backends_agree(fn, batch["z"], batch["dtype"], sizes, t)


@given(batch=batches(modalities=3, max_n=12), t=temperatures, convention=st.sampled_from(CONVENTIONS), sizes=tile_sizes, m=st.sampled_from([2, 3]), weighted=st.booleans())
def test_multisoftclip_tiled_equals_dense(batch, t, convention, sizes, m, weighted):
    # both directions of a pair share one fused call (targets from a and from b)
    w = batch["weights"]

    def fn(*z, backend):
        v = F.multisoftclip(list(z), temperature=t, convention=convention, backend=backend, reduction="none" if weighted else "mean")
        return (v * w).sum() if weighted else v

    assert_backends_agree(fn, batch["z"][:m], batch["dtype"], sizes, t)


@given(batch=batches(modalities=3, max_n=12), t=temperatures, convention=st.sampled_from(CONVENTIONS), sizes=tile_sizes)
def test_m3co_and_clip_tiled_equal_dense(batch, t, convention, sizes):
    perms, lam = batch["perms"], batch["lam"]
    assert_backends_agree(
        lambda *z, backend: F.m3co(list(z[:3]), list(z[3:]), perms, lam, temperature=t, convention=convention, partner="clean", backend=backend),
        batch["z"] + [x.flip(0) for x in batch["z"]],
        batch["dtype"],
        sizes,
        t,
    )
    assert_backends_agree(
        lambda *z, backend: F.m3co(list(z), None, perms, lam, temperature=t, convention=convention, partner="mixed", backend=backend),
        batch["z"],
        batch["dtype"],
        sizes,
        t,
    )
    assert_backends_agree(lambda a, b, backend: F.clip_loss(a, b, temperature=t, backend=backend), batch["z"][:2], batch["dtype"], sizes, t)


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("convention", CONVENTIONS)
def test_smallest_batches(n, convention):
    g = torch.Generator().manual_seed(n)
    z = [torch.randn(n, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    perm, lam = torch.arange(n).flip(0), torch.tensor([0.0, 1.0, 0.5][:n], dtype=torch.float64)
    for sizes in ((1, 1, 1), (2, 3, 2), (512, 2048, 1024)):
        assert_backends_agree(lambda a, b, backend: F.m3co_pair(a, b, perm, lam, convention=convention, backend=backend), z, torch.float64, sizes)
        assert_backends_agree(lambda a, b, backend: F.multisoftclip(
            [a, b], convention=convention, backend=backend), z, torch.float64, sizes)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("convention", CONVENTIONS)
def test_half_inputs_accumulate_in_float32(dtype, convention):
    g = torch.Generator().manual_seed(5)
    n, d = 40, 16
    z = [torch.randn(n, d, generator=g).to(dtype) for _ in range(2)]
    perm, lam = torch.randperm(n, generator=g), torch.rand(n, generator=g)
    for fn in (
        lambda a, b, backend: F.m3co_pair(a, b, perm, lam, convention=convention, backend=backend),
        lambda a, b, backend: F.multisoftclip([a, b], convention=convention, backend=backend),
        lambda a, b, backend: F.multisoftclip_pair(a, b, convention=convention, backend=backend),
    ):
        with tiles(7, 9, 6):
            value, grads = value_and_grads(lambda a, b: fn(a, b, "tiled"), z)
        # the same rounded inputs in float32, dense: only the accumulation could differ
        expected, expected_grads = value_and_grads(lambda a, b: fn(a, b, "dense"), [x.float() for x in z])
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-5)
        for got, want in zip(grads, expected_grads):
            assert got.dtype == dtype  # autograd returns gradients in the input dtype
            torch.testing.assert_close(got.float(), want.to(dtype).float(), rtol=1e-2, atol=1e-4)


# ----------------------------------------------------------------------------- kernels' own entry points


def _lse_dense(q, k, t):
    s = q @ k.T / t
    return torch.logsumexp(s, 1), torch.logsumexp(s, 0)


@given(batch=batches(), t=temperatures, sizes=tile_sizes, with_cols=st.booleans(), rows=st.integers(1, 24))
def test_logsumexp_equals_torch(batch, t, sizes, with_cols, rows):
    dtype = batch["dtype"]
    q, k = (F.normalize(x) for x in batch["z"])
    q = q[: min(rows, q.shape[0])]  # n != N
    g = torch.Generator().manual_seed(1)
    g_r = torch.randn(q.shape[0], generator=g, dtype=torch.float64).to(dtype)
    g_c = torch.randn(k.shape[0], generator=g, dtype=torch.float64).to(dtype)

    def objective(fn, q, k):
        r, c = fn(q, k)
        return (r * g_r).sum() + ((c * g_c).sum() if with_cols else 0)

    with tiles(*sizes):
        got = value_and_grads(lambda a, b: objective(lambda x, y: tiled.LogSumExp.apply(x, y, t, with_cols), a, b), [q, k])
    want = value_and_grads(lambda a, b: objective(lambda x, y: _lse_dense(x, y, t), a, b), [q, k])
    torch.testing.assert_close(got[0], want[0], **tol(dtype, t))
    for x, y in zip(got[1], want[1]):
        torch.testing.assert_close(x, y, **tol(dtype, t))


def _split(n: int, ranks: int, g: torch.Generator) -> list:
    """Uneven contiguous row ranges, one per simulated rank (some may be a single row)."""
    cuts = sorted(torch.randperm(n - 1, generator=g)[: ranks - 1].add(1).tolist())
    bounds = [0] + cuts + [n]
    return [(bounds[i], bounds[i + 1]) for i in range(ranks)]


@given(batch=batches(min_n=3), t=temperatures, sizes=tile_sizes, convention=st.sampled_from(CONVENTIONS), ranks=st.integers(2, 3), seed=st.integers(0, 1000))
def test_distributed_entry_points_equal_single_process(batch, t, sizes, convention, ranks, seed):
    """backends.*_vector with local rows != gathered rows, summed over simulated ranks, is the dense loss."""
    check_simulated_ranks(batch, t, sizes, convention, ranks, seed, "tiled")


@given(batch=batches(min_n=3), t=temperatures, convention=st.sampled_from(CONVENTIONS), ranks=st.integers(2, 3), seed=st.integers(0, 1000))
@pytest.mark.slow
def test_dense_distributed_entry_points_equal_single_process(batch, t, convention, ranks, seed):
    """The dense vectors index the gathered columns by the local rows' offset."""
    # float64 only: dense float32 on slices of the batch rounds its products differently from
    # dense on the whole batch, by more than float32's tolerance at 1/t = 500
    assume(batch["dtype"] == torch.float64)
    check_simulated_ranks(batch, t, (512, 2048, 1024), convention, ranks, seed, "dense")


def check_simulated_ranks(batch, t, sizes, convention, ranks, seed, backend):
    dtype = batch["dtype"]
    n = batch["z"][0].shape[0]
    lam = batch["lam"]
    bounds = _split(n, ranks, torch.Generator().manual_seed(seed))
    reference = convention == "reference"

    def per_rank(a, b, which):
        a_full, b_full = F.normalize(a), F.normalize(b)
        out = []
        rs = [tiled.LogSumExp.apply(a_full[lo:hi], b_full, t, False)[0] for lo, hi in bounds]
        for rank, (lo, hi) in enumerate(bounds):
            a_rows, b_rows = Rows(a_full[lo:hi], a_full, lo), Rows(b_full[lo:hi], b_full, lo)
            if which == "m3co":
                # mixing partners live on the same rank: a local permutation of the local rows
                local_perm = torch.arange(hi - lo).roll(1) if hi - lo > 1 else torch.zeros(1, dtype=torch.long)
                v = backends.m3co_vector(a_rows, b_rows, local_perm, lam[lo:hi], t, distributed=True, backend=backend)
            elif which == "clip":
                v = backends.clip_vector(a_rows, b_rows, t, distributed=True, backend=backend)
            else:
                gather = lambda r, rank=rank: torch.cat(rs[:rank] + [r] + rs[rank + 1:])  # noqa: E731
                v = backends.multisoftclip_vector(a_rows, b_rows, t, reference=reference, gather=gather, distributed=True, backend=backend)
            out.append(v)
        return torch.cat(out)

    def single(a, b, which):
        if which == "m3co":
            local_perm = torch.cat([torch.arange(hi - lo).roll(1) + lo if hi - lo > 1 else torch.tensor([lo]) for lo, hi in bounds])
            return F.m3co_pair(a, b, local_perm, lam, temperature=t, reduction="none", backend="dense")
        if which == "clip":
            return F.clip_loss(a, b, temperature=t, reduction="none", backend="dense")
        return F.multisoftclip_pair(a, b, temperature=t, convention=convention, reduction="none", backend="dense")

    w = batch["weights"]
    for which in ("m3co", "clip", "multisoftclip"):
        with tiles(*sizes):
            got = value_and_grads(lambda a, b: per_rank(a, b, which) * w, batch["z"])
        want = value_and_grads(lambda a, b: single(a, b, which) * w, batch["z"])
        torch.testing.assert_close(got[0], want[0], **tol(dtype, t))
        for x, y in zip(got[1], want[1]):
            torch.testing.assert_close(x, y, **tol(dtype, t, batch["z"]))


@pytest.mark.parametrize("reference", [False, True])
@pytest.mark.parametrize("weights", [(1.0, 0.0), (0.0, 1.0), (0.5, 0.5), (0.3, 1.7)])
def test_soft_clip_coefficients_match_the_two_directions(reference, weights):
    g = torch.Generator().manual_seed(3)
    a, b = (F.normalize(torch.randn(13, 6, generator=g, dtype=torch.float64)) for _ in range(2))
    convention = "reference" if reference else "paper"
    w_a, w_b = weights
    expected = w_a * F.multisoftclip_pair(a, b, convention=convention, reduction="none", backend="dense") + w_b * F.multisoftclip_pair(
        b, a, convention=convention, reduction="none", backend="dense"
    )
    with tiles(4, 4, 4):
        got = tiled.multisoftclip_pair_vector(a, b, 0.1, w_a, w_b, reference=reference)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_soft_clip_refuses_temperatures_it_cannot_shift_by_name():
    g = torch.Generator().manual_seed(4)
    a, b = (F.normalize(torch.randn(6, 3, generator=g)) for _ in range(2))
    coefficients = softclip.SoftClipCoefficients.for_directions(1.0, 1.0, False)
    with pytest.raises(ValueError, match=r"^t = 0.005 is below 0.025, .*float32.*backend='tiled'"):
        softclip.soft_clip(a, b, 0.005, coefficients)
    with pytest.raises(ValueError, match=r"^target_t = 0.01 is below 0.025"):
        softclip.soft_clip(a, b, 0.1, coefficients, target_t=torch.tensor(0.01))
    with pytest.raises(ValueError, match=r"^target_t must be positive"):
        softclip.soft_clip(a, b, 0.1, coefficients, target_t=-0.5)
    off_host = torch.tensor(0.1, device="meta")
    with pytest.raises(ValueError, match=r"^t: .*needs the value on the host: a float or a CPU tensor; got a tensor on meta"):
        softclip.soft_clip(a, b, off_host, coefficients)
    with pytest.raises(ValueError, match=r"^target_t: .*needs the value on the host"):
        softclip.SoftClip.apply(a, b, 0.1, off_host, coefficients, False)
    # float64 allows smaller temperatures: 1/300
    assert torch.isfinite(softclip.soft_clip(a.double(), b.double(), 0.005, coefficients)).all()
    with pytest.raises(ValueError, match=r"^t = 0.003 is below 0.00333333, .*float64"):
        softclip.soft_clip(a.double(), b.double(), 0.003, coefficients)


# ----------------------------------------------------------------------------- dispatch


def test_auto_picks_dense_for_small_and_tiled_for_large_batches_on_cpu():
    cpu = torch.device("cpu")
    small, large = backends.get_config().auto_tiled_min_n - 1, backends.get_config().auto_tiled_min_n
    assert backends.choose_backend("auto", small, small, cpu) == "dense"
    assert backends.choose_backend("auto", large, large, cpu) == "tiled"
    # several processes: the gathered batch decides
    assert backends.choose_backend("auto", small, large, cpu) == "tiled"
    for explicit in ("dense", "tiled"):
        assert backends.choose_backend(explicit, 4, 4, cpu) == explicit
    with backends.config(auto_tiled_min_n=10):
        assert backends.choose_backend("auto", 9, 9, cpu) == "dense"
        assert backends.choose_backend("auto", 10, 10, cpu) == "tiled"
    with pytest.raises(ValueError, match="backend must be one of"):
        backends.choose_backend("fast", 4, 4, cpu)


def test_auto_picks_tiled_not_triton_on_cuda(monkeypatch):
    """Triton is chosen only when asked for, also where it could run (measured slower on a GPU)."""
    monkeypatch.setattr(backends, "available", lambda backend, device=None: True)
    cuda = torch.device("cuda")
    large = backends.get_config().auto_tiled_min_n
    assert backends.choose_backend("auto", large, large, cuda) == "tiled"
    assert backends.choose_backend("auto", large - 1, large - 1, cuda) == "dense"
    assert backends.choose_backend("triton", large, large, cuda) == "triton"


def test_triton_on_cpu_is_refused_with_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend='triton'"):
        F.clip_loss(torch.randn(4, 3), torch.randn(4, 3), backend="triton")
    assert not backends.available("triton", torch.device("cpu"))
    assert backends.available("tiled", "cpu") and backends.available("dense") and backends.available("auto")


def test_modules_pass_the_backend_through():
    from m3co_loss import MultiSClipLoss

    g = torch.Generator().manual_seed(2)
    z = [torch.randn(9, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    with tiles(2, 3, 4):
        got = MultiSClipLoss(backend="tiled")(z)
    torch.testing.assert_close(got, MultiSClipLoss(backend="dense")(z), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("workers", [True, False])
def test_tiled_results_are_deterministic_and_independent_of_threading(workers):
    g = torch.Generator().manual_seed(11)
    z = [torch.randn(37, 8, generator=g) for _ in range(2)]
    perm, lam = torch.randperm(37, generator=g), torch.rand(37, generator=g)

    def run():
        with backends.config(tile_rows=5, tile_cols=7, tile_square=6, parallel_workers=workers):
            return value_and_grads(lambda a, b: F.multisoftclip([a, b], backend="tiled") + F.m3co_pair(a, b, perm, lam, backend="tiled"), z)

    previous = torch.get_num_threads()
    first, second = run(), run()
    # a worker's set_num_threads(1) reaches threads started later (not the caller's own count),
    # so the restore is seen from a fresh thread
    seen = []
    fresh = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    fresh.start(), fresh.join()
    assert seen == [previous] and torch.get_num_threads() == previous
    for x, y in zip([first[0], *first[1]], [second[0], *second[1]]):
        assert torch.equal(x, y)  # the same tiles go to the same workers, summed in the same order
    dense = value_and_grads(lambda a, b: F.multisoftclip([a, b], backend="dense") + F.m3co_pair(a, b, perm, lam, backend="dense"), z)
    for x, y in zip([first[0], *first[1]], [dense[0], *dense[1]]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_concurrent_tiled_calls_keep_the_thread_count_and_their_values():
    """Two Python threads computing tiled losses at once: neither may save the other's
    ``set_num_threads(1)`` as the count to restore, nor see it as the count of workers to use."""
    g = torch.Generator().manual_seed(5)
    z = [torch.randn(160, 16, generator=g) for _ in range(2)]

    def loss_and_grads():
        return value_and_grads(lambda a, b: F.clip_loss(a, b, backend="tiled", reduction="none"), z)

    previous = torch.get_num_threads()
    torch.set_num_threads(4)  # several workers even on a machine with fewer cores
    try:
        with backends.config(tile_rows=8, tile_cols=8, parallel_workers=True):
            expected = loss_and_grads()
            start = threading.Barrier(2)
            results, errors = [], []

            def run():
                try:
                    start.wait()
                    results.extend(loss_and_grads() for _ in range(10))
                except BaseException as error:  # reported by the main thread
                    errors.append(error)

            threads = [threading.Thread(target=run) for _ in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        assert not errors
        seen = []
        fresh = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        fresh.start(), fresh.join()
        assert torch.get_num_threads() == 4 and seen == [4]
        assert len(results) == 20
        for value, grads in results:
            assert torch.equal(value, expected[0])  # the same workers, hence the same sums
            assert all(torch.equal(x, y) for x, y in zip(grads, expected[1]))
    finally:
        torch.set_num_threads(previous)


def test_a_call_that_starts_while_another_runs_its_workers_restores_the_count_of_the_process():
    """The second call starts while the first one's workers hold the process at one thread: it
    must wait, not save that 1 as the count to restore (a thread takes torch's count when it
    first uses torch, here inside the second call)."""
    from m3co_loss.backends import _tiling

    previous = torch.get_num_threads()
    torch.set_num_threads(3)
    running = threading.Event()

    def slow(tasks, state):
        running.set()
        threading.Event().wait(0.3)  # the second call starts meanwhile
        return [torch.ones(1)]

    def finishing_last(tasks, state):
        threading.Event().wait(0.5)  # without the lock: restores after the first call restored
        return [torch.ones(1)]

    def second():
        running.wait(5)
        _tiling.run_tiles([0, 1], finishing_last, 2, lambda: None)

    try:
        other = threading.Thread(target=second)
        other.start()
        total = _tiling.run_tiles([0, 1], slow, 2, lambda: None)
        other.join()
        seen = []
        fresh = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        fresh.start(), fresh.join()
        assert seen == [3] and torch.get_num_threads() == 3
        assert torch.equal(total[0], torch.full((1,), 2.0))
    finally:
        torch.set_num_threads(previous)


def test_logsumexp_backward_shares_dq_when_every_worker_gets_a_row_block(monkeypatch):
    """Three row blocks, one column block and four torch threads: three workers, one row block
    each, writing one shared dq (no private dq per worker)."""
    calls = []

    def recording(tasks, work, workers, setup):
        total = run_tiles(tasks, work, workers, setup)
        calls.append((len(tasks), workers, total[0] is None))
        return total

    run_tiles = tiled.run_tiles
    monkeypatch.setattr(tiled, "run_tiles", recording)
    g = torch.Generator().manual_seed(3)
    q, k = (torch.nn.functional.normalize(torch.randn(24, 5, generator=g, dtype=torch.float64), dim=1) for _ in range(2))
    previous = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        with backends.config(tile_rows=8, tile_cols=32, parallel_workers=True):
            got = value_and_grads(lambda a, b: sum(x.sum() for x in tiled.logsumexp(a, b, 0.1, True)), [q, k])
    finally:
        torch.set_num_threads(previous)
    assert calls[-1] == (3, 3, True)  # the backward pass: by rows, dq shared
    expected = value_and_grads(lambda a, b: _lse_dense(a, b, 0.1)[0].sum() + _lse_dense(a, b, 0.1)[1].sum(), [q, k])
    for x, y in zip([got[0], *got[1]], [expected[0], *expected[1]]):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_static_shift_decisions_agree_on_floats_and_tensors(dtype):
    from m3co_loss.backends._streaming import StreamingBackend
    from m3co_loss.backends._tiling import safe_span, static_shift_ok

    assert safe_span(dtype) == {torch.float64: 600.0}.get(dtype, 80.0)
    for t in (0.1, 0.025, 0.0249, 0.004, 1 / 300, 0.0033):
        expected = static_shift_ok(t, dtype)
        assert expected == (2.0 / t <= safe_span(dtype))
        assert bool(StreamingBackend._static_shift_tensor(torch.tensor(t, dtype=torch.float64), dtype)) == expected
        assert bool(StreamingBackend._static_shift_tensor(t, dtype)) == expected


def test_a_tiled_call_inside_a_worker_runs_there_instead_of_waiting_for_its_caller():
    from m3co_loss.backends import _tiling

    x = torch.zeros(4, 2)
    inner_workers = []

    def outer(tasks, state):
        workers = _tiling.num_workers(x, 8, True)
        inner_workers.append(workers)
        return _tiling.run_tiles(list(range(8)), lambda ts, s: [torch.tensor(float(len(ts)))], workers, lambda: None)

    done = []
    caller = threading.Thread(target=lambda: done.append(_tiling.run_tiles([0, 1], outer, 2, lambda: None)), daemon=True)
    caller.start()
    caller.join(timeout=30)
    assert not caller.is_alive(), "a nested tiled call waited for the lock its caller holds"
    assert inner_workers == [1, 1] and float(done[0][0]) == 16.0
