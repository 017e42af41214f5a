r"""O(N D)-memory backends: tiled log-sum-exps and soft-target sums with exact gradients.

Both M3CoL losses need a few reductions of N x N similarity matrices, never the matrices
themselves. This module computes them tile by tile, keeps O(N) statistics, and recomputes
each tile in the backward pass. Every identity used here is written out on the docs page
``kernels`` (docs/kernels.rst); the short form follows.

**Log-sum-exps** (M3Co, CLIP; :class:`LogSumExp`). For ``S = Q K^T / t``,
``r_i = log sum_k e^{S_ik}`` and ``c_k = log sum_i e^{S_ik}``; with upstream gradients
``g^r, g^c``::

    dQ = A K / t,   dK = A^T Q / t,   A_ik = g^r_i e^{S_ik - r_i} + g^c_k e^{S_ik - c_k}
                                          = e^{S_ik - 1/t} (alpha_i + beta_k),
    alpha_i = g^r_i e^{1/t - r_i},   beta_k = g^c_k e^{1/t - c_k}.

**Fused MultiSClip** (single process; :class:`SoftClip`). With ``S = A B^T / t``,
``W^a = softmax_row(A A^T / t)``, ``W^b = softmax_row(B B^T / t)``, one call computes, for
coefficients fixed by the convention and the weights of the two directions::

    v_i = k_c c_i + k_r r_i + k_a (W^a r)_i + k_b (W^b c)_i
          - x_a sum_l W^a_il S_li - z_a sum_l W^a_il S_il - x_b sum_l W^b_il S_il - z_b sum_l W^b_il S_li

(paper, direction a: ``k_c = k_a = 1, x_a = 2``; ``Ls(b; a, b)`` is the same with the roles
of ``r, c`` and ``S, S^T`` swapped; reference convention: ``k_c = k_r = x = z = 1/2``). It
walks the upper triangle of square blocks ``(I, K), I <= K`` and computes four tiles per
block pair: ``S_IK``, ``U_IK = (S_KI)^T = B_I A_K^T / t`` and ``E^a = e^{G^a_IK - 1/t}``,
``E^b``. Because ``G = A A^T`` is symmetric, one tile of it serves both ``(I, K)`` and
``(K, I)``: row sums of ``E^a`` give the normalisers ``n_I``, its column sums ``n_K``, and the
weighted sums ``sum_l W_il S_li`` are row sums of ``E^a * U`` and column sums of ``E^a * S``.
``(W r)`` needs the final ``r``, so a second forward pass over the ``G`` tiles computes
``E^a [r | 1/n]``, which also gives the column sums of ``W`` (``omega_l = sum_i W_il``,
again by symmetry). For a uniform upstream gradient ``g`` (reduction mean or sum) the
backward pass needs ``sum_i g_i W_il = g_0 omega_l`` and so no extra pass. Its gradients are::

    dS_lk = (k_r g_l + k_a omega^g_l) e^{S_lk - r_l} + (k_c g_k + k_b omega'^g_k) e^{S_lk - c_k}
            - x_a g_k W^a_kl - z_a g_l W^a_lk - x_b g_l W^b_lk - z_b g_k W^b_kl,
    dG^a_il = g_i W^a_il (X^a_il - y^a_i),  X^a_il = k_a r_l - x_a S_li - z_a S_il,
    dA = dS B / t + (dG^a + dG^a^T) A / t,   dB = dS^T A / t + (dG^b + dG^b^T) B / t,

and ``(dG + dG^T)`` is again evaluated once per symmetric block pair. Per element of the N x N
grid this costs about 6.5 matrix products of depth D for one direction (floor: 5) and 9 for
both (floor: 7).

**Soft-target sums** (general MultiSClip path, used with several processes;
:class:`SoftTargetSum`)::

    y_i = sum_l W_il (u_l + (gamma / t) vq_i . vk_l) = (O_i0^{-1}) (O_i1 + (gamma / t) vq_i . O_i,2:),
    O = E [1 | u | vk],  E = exp(Q K^T / t - m),

e.g. ``sum_l W_il S_li = (W A)_i . b_i / t``.

**Stabilisation.** Embeddings are unit vectors, so ``|S_ik| <= 1/t``. When ``2/t`` fits the
exponent range (t >= 0.025 in float32, t >= 1/300 in float64; the paper's t = 0.1 included)
the constant ``1/t`` replaces the running maximum of online softmax, and it is folded into
the matrix product by one extra column: ``[q / t | 1] . [k | -1/t] = S - 1/t``. Below that,
an extra pass finds exact row and column maxima and the general (unfused) path runs.

**CPU threads.** On CPU the tiles are split round robin over ``torch.get_num_threads()``
worker threads that run one torch thread each (and private accumulators, summed at the end),
rather than splitting every small operation over OpenMP threads. This removes one barrier per
operation, which matters when other processes share the cores. ``torch.set_num_threads`` is
set to 1 inside the workers and restored afterwards; set :data:`PARALLEL_WORKERS` to False to
use torch's own threading instead.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, NamedTuple, Optional

import torch
from torch import Tensor

__all__ = [
    "LogSumExp",
    "SoftTargetSum",
    "SoftClip",
    "choose_backend",
    "m3co_vector",
    "clip_vector",
    "multisoftclip_vector",
    "multisoftclip_pair_vector",
    "triton_available",
    "AUTO_TILED_MIN_N",
]

# "auto" uses the dense path below this many columns and the tiled one from it on: the
# cross-over measured by benchmarks/bench_kernels.py (docs/kernels.rst shows the figures).
AUTO_TILED_MIN_N = 2048
# Tiles of LogSumExp / SoftTargetSum (rows x columns) and the square blocks of SoftClip,
# sized so that one tile (4 MiB in float32) and its operands stay in the last-level cache
# (sweep them with benchmarks/bench_kernels.py --tile-rows/--tile-cols/--tile-square).
TILE_ROWS = 512
TILE_COLS = 2048
TILE_SQUARE = 1024

# Largest 2/t for which exp(S - 1/t) neither underflows a whole row nor overflows.
_SAFE_SPAN = {torch.float32: 80.0, torch.float64: 600.0}


def triton_available(device: Optional[torch.device] = None) -> bool:
    """Whether the Triton backend can run on ``device``.

    It needs the ``triton`` package and a CUDA device (or ``TRITON_INTERPRET=1``, Triton's CPU
    interpreter, which the tests use on CPU tensors).
    """
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if device is not None and device.type != "cuda" and not interpret:
        return False
    if device is None and not (interpret or torch.cuda.is_available()):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def choose_backend(backend: str, n_rows: int, n_cols: int, device: torch.device) -> str:
    """Resolve ``"auto"`` to a concrete backend; check that an explicit one can run.

    ``"auto"``: ``"dense"`` below :data:`AUTO_TILED_MIN_N` columns (the N x N matrices are
    small and one large matrix product is fastest), above it ``"triton"`` on CUDA devices with
    Triton installed and ``"tiled"`` otherwise.
    """
    if backend == "auto":
        if n_cols < AUTO_TILED_MIN_N:
            return "dense"
        if device.type == "cuda" and triton_available(device):
            return "triton"
        return "tiled"
    if backend == "triton" and not triton_available(device):
        raise ValueError(
            "backend='triton' needs the triton package and CUDA tensors (or TRITON_INTERPRET=1); use 'tiled' or 'auto'"
        )
    return backend


def _static_shift_ok(t: float, dtype: torch.dtype) -> bool:
    return 2.0 / t <= _SAFE_SPAN.get(dtype, 80.0)


def _blocks(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(start + size, n)


def _block_pairs(n: int, size: int) -> Iterator[tuple[slice, slice, bool]]:
    """Square blocks (I, K) with I <= K: the upper triangle of a symmetric block grid."""
    blocks = list(_blocks(n, size))
    for index, (i0, i1) in enumerate(blocks):
        for k0, k1 in blocks[index:]:
            yield slice(i0, i1), slice(k0, k1), i0 == k0


def _scaled(x: Tensor, t: float) -> Tensor:
    """``[x / t | 1]``: with :func:`_shifter`, one matrix product gives ``x y^T / t - 1/t``."""
    out = x.new_empty(x.shape[0], x.shape[1] + 1)
    torch.div(x, t, out=out[:, :-1])
    out[:, -1] = 1.0
    return out


def _shifter(x: Tensor, t: float) -> Tensor:
    """``[x | -1/t]``."""
    out = x.new_empty(x.shape[0], x.shape[1] + 1)
    out[:, :-1] = x
    out[:, -1] = -1.0 / t
    return out


class _Scratch:
    """Reusable tile buffers: ``torch.mm(..., out=)`` needs contiguous outputs of the right shape."""

    def __init__(self, like: Tensor, count: int, rows: int, cols: int) -> None:
        self._flat = [like.new_empty(rows * cols) for _ in range(count)]

    def __call__(self, index: int, rows: int, cols: int) -> Tensor:
        return self._flat[index][: rows * cols].view(rows, cols)


def _size(x: slice) -> int:
    return x.stop - x.start


# On CPU the tiles are spread over torch.get_num_threads() Python threads running one torch
# thread each, instead of every small operation being split over OpenMP threads: there is no
# barrier per operation (each costs a scheduler time slice when other processes share the
# cores), and each core works on its own tile in its own cache. The assignment of tiles to
# workers is static (round robin), so results do not depend on timing.
PARALLEL_WORKERS = True


def _num_workers(x: Tensor, tasks: int) -> int:
    if not PARALLEL_WORKERS or x.device.type != "cpu":
        return 1
    return max(1, min(torch.get_num_threads(), tasks))


def _run(tasks: list, work: Callable[[list, object], list], workers: int, setup: Callable[[], object]) -> list:
    """``work(tasks[j::workers], setup())`` for every worker j; the element-wise sums of their result lists.

    ``setup`` allocates a worker's buffers and accumulators; it runs in the calling thread, so
    that they come from its allocator arena and the memory held does not grow with the threads.
    """
    if workers <= 1:
        with torch.no_grad():
            return work(tasks, setup())
    previous = torch.get_num_threads()
    states = [setup() for _ in range(workers)]

    def run(j: int) -> list:
        torch.set_num_threads(1)
        with torch.no_grad():
            return work(tasks[j::workers], states[j])

    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="m3co-tiles") as pool:
            parts = list(pool.map(run, range(workers)))
    finally:
        torch.set_num_threads(previous)
    total = parts[0]
    for part in parts[1:]:
        for acc, x in zip(total, part):
            if acc is not None:
                acc += x
        del part[:]  # free each worker's accumulators as soon as they are added
    return total


def first_order_only(backward: Callable) -> Callable:
    """Mark the backward of a kernel whose gradient formulas are not themselves differentiable.

    Under ``create_graph=True`` autograd would record the returned gradients as constants of
    the saved inputs and so give a wrong second derivative without a word (``once_differentiable``
    only catches gradients that flow into the backward, not the dependence on what it saved).
    Autograd enables grad mode in a backward pass exactly when ``create_graph=True``.
    """

    @functools.wraps(backward)
    def checked(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "the tiled and Triton loss kernels compute first derivatives only; "
                "pass backend='dense' to differentiate the loss twice (create_graph=True)"
            )
        return backward(ctx, *grads)

    return checked


# ----------------------------------------------------------------------------- log-sum-exp


class LogSumExp(torch.autograd.Function):
    """Row (and optionally column) log-sum-exp of ``q @ k.T / t`` in O((n + N) D) memory.

    ``forward(q, k, t, with_cols) -> (r, c)``; ``c`` is an empty tensor when ``with_cols`` is
    False. ``q`` and ``k`` are expected to be L2-normalised (or zero) rows.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, t: float, with_cols: bool):
        """Stream over tiles; save only the inputs and the O(n + N) log-sum-exps."""
        q, k = q.contiguous(), k.contiguous()
        n, N = q.shape[0], k.shape[0]
        rows, cols = min(TILE_ROWS, n), min(TILE_COLS, N)
        if _static_shift_ok(t, q.dtype):
            ones = q.new_ones(max(rows, cols))
            q_aug, k_aug = _scaled(q, t), _shifter(k, t)
            tasks = [(i0, i1, k0, k1) for i0, i1 in _blocks(n, TILE_ROWS) for k0, k1 in _blocks(N, TILE_COLS)]

            def setup():
                return _Scratch(q, 1, rows, cols), q.new_zeros(n), q.new_zeros(N) if with_cols else None

            def work(my_tasks, state):
                scratch, row_sum, col_sum = state
                for i0, i1, k0, k1 in my_tasks:
                    e = torch.mm(q_aug[i0:i1], k_aug[k0:k1].T, out=scratch(0, i1 - i0, k1 - k0)).exp_()
                    row_sum[i0:i1].addmv_(e, ones[: k1 - k0])
                    if with_cols:
                        col_sum[k0:k1].addmv_(e.T, ones[: i1 - i0])
                return [row_sum, col_sum]

            row_sum, col_sum = _run(tasks, work, _num_workers(q, len(tasks)), setup)
            col_sum = col_sum if with_cols else q.new_zeros(0)
            row_shift = col_shift = 1.0 / t
        else:
            scratch = _Scratch(q, 1, rows, cols)
            row_sum = q.new_zeros(n)
            col_sum = q.new_zeros(N) if with_cols else q.new_zeros(0)
            qs = q / t
            row_shift, col_shift = _maxima(qs, k, with_cols)
            for i0, i1 in _blocks(n, TILE_ROWS):
                for k0, k1 in _blocks(N, TILE_COLS):
                    s = torch.mm(qs[i0:i1], k[k0:k1].T, out=scratch(0, i1 - i0, k1 - k0))
                    row_sum[i0:i1] += (s - row_shift[i0:i1, None]).exp_().sum(1)
                    if with_cols:
                        col_sum[k0:k1] += (s - col_shift[None, k0:k1]).exp_().sum(0)
        r = row_sum.log_().add_(row_shift)
        c = col_sum.log_().add_(col_shift) if with_cols else col_sum
        # the augmented operands are kept for the backward pass: rebuilding them costs two
        # O(N D) allocations whose page faults are a visible share of a step
        augmented = (q_aug, k_aug) if _static_shift_ok(t, q.dtype) else ()
        ctx.save_for_backward(q, k, r, c, *augmented)
        ctx.t, ctx.with_cols = t, with_cols
        ctx.set_materialize_grads(False)
        return r, c

    @staticmethod
    @first_order_only
    def backward(ctx, g_r: Optional[Tensor], g_c: Optional[Tensor]):
        """Recompute each tile and accumulate ``dq = A k / t`` and ``dk = A^T q / t``."""
        q, k, r, c, *augmented = ctx.saved_tensors
        t = ctx.t
        with_cols = ctx.with_cols and g_c is not None
        if g_r is None and not with_cols:
            return None, None, None, None
        n, N = q.shape[0], k.shape[0]
        rows, cols = min(TILE_ROWS, n), min(TILE_COLS, N)
        if _static_shift_ok(t, q.dtype):
            # A_ik / t = exp(S_ik - 1/t) (alpha_i + beta_k); 1/t - r_i <= 2/t keeps both factors
            # finite. The 1/t of dq = A k / t rides on alpha and beta.
            alpha = (g_r / t) * torch.exp(1.0 / t - r) if g_r is not None else None
            beta = (g_c / t) * torch.exp(1.0 / t - c) if with_cols else None
            q_aug, k_aug = augmented
            row_blocks = list(_blocks(n, TILE_ROWS))
            # A worker that owns whole blocks of rows writes its rows of a shared dq; with too
            # few row blocks the tiles are split instead and every worker keeps its own dq.
            by_rows = len(row_blocks) >= torch.get_num_threads()
            if by_rows:
                tasks = [[(i0, i1, k0, k1) for k0, k1 in _blocks(N, TILE_COLS)] for i0, i1 in row_blocks]
                shared_dq = torch.zeros_like(q)
            else:
                tasks = [[(i0, i1, k0, k1)] for i0, i1 in row_blocks for k0, k1 in _blocks(N, TILE_COLS)]

            def setup():
                return _Scratch(q, 2, rows, cols), shared_dq if by_rows else torch.zeros_like(q), torch.zeros_like(k)

            def work(my_tasks, state):
                scratch, dq, dk = state
                for i0, i1, k0, k1 in (tile for group in my_tasks for tile in group):
                    a = torch.mm(q_aug[i0:i1], k_aug[k0:k1].T, out=scratch(0, i1 - i0, k1 - k0)).exp_()
                    if alpha is not None and beta is not None:
                        a.mul_(torch.add(alpha[i0:i1, None], beta[None, k0:k1], out=scratch(1, i1 - i0, k1 - k0)))
                    elif alpha is not None:
                        a.mul_(alpha[i0:i1, None])
                    else:
                        a.mul_(beta[None, k0:k1])
                    dq[i0:i1].addmm_(a, k[k0:k1])
                    dk[k0:k1].addmm_(a.T, q[i0:i1])
                return [None if by_rows else dq, dk]

            dq, dk = _run(tasks, work, _num_workers(q, len(tasks)), setup)
            return (shared_dq if by_rows else dq), dk, None, None
        else:
            scratch = _Scratch(q, 2, rows, cols)
            dq = torch.zeros_like(q)
            dk = torch.zeros_like(k)
            qs = q / t
            for i0, i1 in _blocks(n, TILE_ROWS):
                for k0, k1 in _blocks(N, TILE_COLS):
                    s = torch.mm(qs[i0:i1], k[k0:k1].T, out=scratch(0, i1 - i0, k1 - k0))
                    a = torch.zeros_like(s)
                    if g_r is not None:
                        a += (s - r[i0:i1, None]).exp_().mul_(g_r[i0:i1, None])
                    if with_cols:
                        a += (s - c[None, k0:k1]).exp_().mul_(g_c[None, k0:k1])
                    dq[i0:i1].addmm_(a, k[k0:k1])
                    dk[k0:k1].addmm_(a.T, q[i0:i1])
        return dq.div_(t), dk.div_(t), None, None


def _maxima(qs: Tensor, k: Tensor, with_cols: bool) -> tuple[Tensor, Tensor]:
    """Exact row and column maxima of ``qs @ k.T`` (used when 1/t is too large for a static shift)."""
    n, N = qs.shape[0], k.shape[0]
    row_max = qs.new_full((n,), float("-inf"))
    col_max = qs.new_full((N,), float("-inf")) if with_cols else qs.new_zeros(0)
    for i0, i1 in _blocks(n, TILE_ROWS):
        for k0, k1 in _blocks(N, TILE_COLS):
            s = qs[i0:i1] @ k[k0:k1].T
            torch.maximum(row_max[i0:i1], s.amax(1), out=row_max[i0:i1])
            if with_cols:
                torch.maximum(col_max[k0:k1], s.amax(0), out=col_max[k0:k1])
    return row_max, col_max


# ----------------------------------------------------------------------------- soft-target sum


class SoftTargetSum(torch.autograd.Function):
    r"""``y_i = sum_l softmax_l(q_i . k_l / t) (u_l + (gamma / t) vq_i . vk_l)`` in O(N D) memory.

    ``forward(q, k, u, vq, vk, t, gamma)``: every row of ``q`` (n, D) must also be a row of
    ``k`` (the targets of a sample include itself), which makes ``|q_i|^2 / t`` the exact
    row maximum used as the softmax shift. This is the general path (several processes, or
    temperatures too small for :class:`SoftClip`'s static shift).
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, u: Tensor, vq: Tensor, vk: Tensor, t: float, gamma: float):
        """Accumulate ``O = E [1 | u | vk]`` tile by tile and return ``y``."""
        q, k, vq, vk, u = (x.contiguous() for x in (q, k, vq, vk, u))
        qs = q / t
        n, N = q.shape[0], k.shape[0]
        shift = (q * q).sum(1) / t
        values = torch.cat([torch.ones_like(u)[:, None], u[:, None], vk], dim=1)  # [1 | u | vk]
        out = q.new_zeros(n, values.shape[1])
        for i0, i1 in _blocks(n, TILE_ROWS):
            qi = qs[i0:i1]
            for k0, k1 in _blocks(N, TILE_COLS):
                e = (qi @ k[k0:k1].T).sub_(shift[i0:i1, None]).exp_()
                out[i0:i1].addmm_(e, values[k0:k1])
        norm = out[:, 0]
        mean_vk = out[:, 2:] / norm[:, None]  # (W vk)_i
        y = out[:, 1] / norm + (gamma / t) * (vq * mean_vk).sum(1)
        ctx.save_for_backward(q, k, u, vq, vk, shift, norm, mean_vk, y)
        ctx.t, ctx.gamma = t, gamma
        return y

    @staticmethod
    @first_order_only
    def backward(ctx, g: Tensor):
        """Recompute each tile of ``P``; see the module docstring for the gradient formulas."""
        q, k, u, vq, vk, shift, norm, mean_vk, y = ctx.saved_tensors
        t, gamma = ctx.t, ctx.gamma
        n, N = q.shape[0], k.shape[0]
        qs = q / t
        scale = g / norm  # P_il g_i = E_il g_i / norm_i
        left = torch.cat([(gamma / t) * vq, torch.ones_like(y)[:, None], -y[:, None]], dim=1)
        right = torch.cat([vk, u[:, None], torch.ones_like(u)[:, None]], dim=1)  # left . right = X_il - y_i
        vq_aug = torch.cat([torch.ones_like(y)[:, None], (gamma / t) * vq], dim=1)
        dq = torch.zeros_like(q)
        dk = torch.zeros_like(k)
        du_dvk = q.new_zeros(N, vq_aug.shape[1])
        for i0, i1 in _blocks(n, TILE_ROWS):
            qi = qs[i0:i1]
            for k0, k1 in _blocks(N, TILE_COLS):
                kk = k[k0:k1]
                pg = (qi @ kk.T).sub_(shift[i0:i1, None]).exp_().mul_(scale[i0:i1, None])
                du_dvk[k0:k1].addmm_(pg.T, vq_aug[i0:i1])
                dg = (left[i0:i1] @ right[k0:k1].T).mul_(pg)
                dq[i0:i1].addmm_(dg, kk)
                dk[k0:k1].addmm_(dg.T, qi)
        dq.div_(t)
        dvq = ((gamma / t) * g)[:, None] * mean_vk
        return dq, dk, du_dvk[:, 0], dvq, du_dvk[:, 1:], None, None


# ----------------------------------------------------------------------------- fused MultiSClip


class SoftClipCoefficients(NamedTuple):
    """Coefficients of the per-sample MultiSClip vector computed by :class:`SoftClip`.

    ``v_i = col c_i + row r_i + ka (W^a r)_i + kb (W^b c)_i - xa sum_l W^a_il S_li
    - za sum_l W^a_il S_il - xb sum_l W^b_il S_il - zb sum_l W^b_il S_li``.
    """

    col: float
    row: float
    ka: float
    kb: float
    xa: float
    za: float
    xb: float
    zb: float

    @classmethod
    def for_directions(cls, weight_a: float, weight_b: float, reference: bool) -> "SoftClipCoefficients":
        """``weight_a Ls(a; a, b) + weight_b Ls(b; a, b)`` in the paper's or the released convention."""
        if reference:
            half = 0.5 * (weight_a + weight_b)
            return cls(half, half, 0.0, 0.0, 0.5 * weight_a, 0.5 * weight_a, 0.5 * weight_b, 0.5 * weight_b)
        return cls(weight_a, weight_b, weight_a, weight_b, 2.0 * weight_a, 0.0, 2.0 * weight_b, 0.0)

    @property
    def uses_a(self) -> bool:
        return bool(self.ka or self.xa or self.za)

    @property
    def uses_b(self) -> bool:
        return bool(self.kb or self.xb or self.zb)


def _accumulate_products(acc: Tensor, rows: slice, cols: slice, diag: bool, e: Tensor, x: Tensor, y: Tensor, tmp: Tensor, ones: Tensor) -> None:
    """``acc[rows] += rowsum(e * x)`` and, off the diagonal, ``acc[cols] += colsum(e * y)``."""
    acc[rows].addmv_(torch.mul(e, x, out=tmp), ones[: e.shape[1]])
    if not diag:
        acc[cols].addmv_(torch.mul(e, y, out=tmp).T, ones[: e.shape[0]])


class SoftClip(torch.autograd.Function):
    r"""Fused single-process MultiSClip vector of both directions of a pair (see the module docstring).

    ``forward(a, b, t, coefficients) -> v`` with ``a``, ``b`` the L2-normalised (N, D)
    embeddings and ``coefficients`` a :class:`SoftClipCoefficients`. Needs the static shift
    (``2/t`` within the exponent range of the dtype).
    """

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, t: float, coef: SoftClipCoefficients):
        """Pass 1: r, c, normalisers and weighted sums of S; pass 2 (paper): W r and the column sums of W."""
        a, b = a.detach().contiguous(), b.detach().contiguous()
        n = a.shape[0]
        size = min(TILE_SQUARE, n)
        use_a, use_b = coef.uses_a, coef.uses_b
        ones = a.new_ones(size)
        a_s, a_h, b_s, b_h = _scaled(a, t), _shifter(a, t), _scaled(b, t), _shifter(b, t)
        tasks = list(_block_pairs(n, size))
        workers = _num_workers(a, len(tasks))

        def setup_one():
            return _Scratch(a, 5, size, size), a.new_zeros(8, n)

        def pass_one(my_tasks, state):
            scratch, sums = state
            # sum_k e^{S_ik - 1/t}, sum_i e^{S_ik - 1/t}, softmax normalisers of the targets, and
            # sum_l E_il (S_li - 1/t), sum_l E_il (S_il - 1/t) for each target matrix
            rho, kappa, n_a, n_b, t_a_u, t_a_s, t_b_s, t_b_u = sums
            for rows, cols, diag in my_tasks:
                h, w = _size(rows), _size(cols)
                s = torch.mm(a_s[rows], b_h[cols].T, out=scratch(0, h, w))  # S_ik - 1/t
                u = torch.mm(b_s[rows], a_h[cols].T, out=scratch(1, h, w))  # S_ki - 1/t
                tmp = scratch(4, h, w)
                if use_a:
                    p = torch.mm(a_s[rows], a_h[cols].T, out=scratch(2, h, w)).exp_()
                    n_a[rows].addmv_(p, ones[:w])
                    if not diag:
                        n_a[cols].addmv_(p.T, ones[:h])
                    if coef.xa:
                        _accumulate_products(t_a_u, rows, cols, diag, p, u, s, tmp, ones)
                    if coef.za:
                        _accumulate_products(t_a_s, rows, cols, diag, p, s, u, tmp, ones)
                if use_b:
                    q = torch.mm(b_s[rows], b_h[cols].T, out=scratch(3, h, w)).exp_()
                    n_b[rows].addmv_(q, ones[:w])
                    if not diag:
                        n_b[cols].addmv_(q.T, ones[:h])
                    if coef.xb:
                        _accumulate_products(t_b_s, rows, cols, diag, q, s, u, tmp, ones)
                    if coef.zb:
                        _accumulate_products(t_b_u, rows, cols, diag, q, u, s, tmp, ones)
                e = s.exp_()
                rho[rows].addmv_(e, ones[:w])
                kappa[cols].addmv_(e.T, ones[:h])
                if not diag:
                    e = u.exp_()
                    kappa[rows].addmv_(e, ones[:w])
                    rho[cols].addmv_(e.T, ones[:h])
            return [sums]

        rho, kappa, n_a, n_b, t_a_u, t_a_s, t_b_s, t_b_u = _run(tasks, pass_one, workers, setup_one)[0]
        r = rho.log_().add_(1.0 / t)
        c = kappa.log_().add_(1.0 / t)
        # Pass 2: W r needs the final r; the same products give the column sums of W.
        omega_a = omega_b = a.new_zeros(0)
        y_a, y_b = a.new_zeros(n), a.new_zeros(n)
        if coef.ka or coef.kb:
            targets = []
            if coef.ka:
                targets.append((torch.stack([r, n_a.reciprocal()], 1), a_s, a_h))
            if coef.kb:
                targets.append((torch.stack([c, n_b.reciprocal()], 1), b_s, b_h))

            def setup_two():
                return a.new_empty(size * size), [a.new_zeros(n, 2) for _ in targets]

            def pass_two(my_tasks, state):
                buf, out = state
                for rows, cols, diag in my_tasks:
                    h, w = _size(rows), _size(cols)
                    for acc, (values, x_s, x_h) in zip(out, targets):
                        p = torch.mm(x_s[rows], x_h[cols].T, out=buf[: h * w].view(h, w)).exp_()
                        acc[rows].addmm_(p, values[cols])
                        if not diag:
                            acc[cols].addmm_(p.T, values[rows])
                return out

            sums = iter(_run(tasks, pass_two, workers, setup_two))
            if coef.ka:
                pr_a = next(sums)
                y_a += coef.ka * pr_a[:, 0] / n_a
                omega_a = pr_a[:, 1]
            if coef.kb:
                pr_b = next(sums)
                y_b += coef.kb * pr_b[:, 0] / n_b
                omega_b = pr_b[:, 1]
        # sum_l W_il S_.. = (sum_l E_il (S_.. - 1/t)) / n_i + 1/t
        for acc, norm, weight, y in (
            (t_a_u, n_a, coef.xa, y_a),
            (t_a_s, n_a, coef.za, y_a),
            (t_b_s, n_b, coef.xb, y_b),
            (t_b_u, n_b, coef.zb, y_b),
        ):
            if weight:
                y -= weight * (acc / norm + 1.0 / t)
        v = coef.col * c + coef.row * r + y_a + y_b
        ctx.save_for_backward(a, b, r, c, n_a, n_b, y_a, y_b, omega_a, omega_b, a_s, a_h, b_s, b_h)
        ctx.t, ctx.coef = t, coef
        return v

    @staticmethod
    @first_order_only
    def backward(ctx, g: Optional[Tensor]):
        """Recompute S, S^T and the target tiles per block pair; see the module docstring."""
        if g is None:
            return None, None, None, None
        a, b, r, c, n_a, n_b, y_a, y_b, omega_a, omega_b, a_s, a_h, b_s, b_h = ctx.saved_tensors
        t, coef = ctx.t, ctx.coef
        n = a.shape[0]
        size = min(TILE_SQUARE, n)
        use_a, use_b = coef.uses_a, coef.uses_b
        tasks = list(_block_pairs(n, size))
        workers = _num_workers(a, len(tasks))
        g = g.contiguous()
        uniform = bool((g == g[0]).all())
        gamma_a, gamma_b = g / n_a, g / n_b  # g_i / n_i: W_il g_i = E_il gamma_i
        g_row, g_col = coef.row * g, coef.col * g  # upstream gradients of r and c
        if coef.ka:  # sum_i g_i W^a_il
            g_row = g_row + coef.ka * (g[0] * omega_a if uniform else _weighted_column_sums(a_s, a_h, gamma_a, size, tasks, workers))
        if coef.kb:
            g_col = g_col + coef.kb * (g[0] * omega_b if uniform else _weighted_column_sums(b_s, b_h, gamma_b, size, tasks, workers))
        # Every tile below is a derivative with respect to S or G, and dA = (dS B + H A) / t: the
        # 1/t rides on the O(N) factors alpha, beta, gamma and the left rank-4 factors.
        alpha = (g_row / t) * torch.exp(1.0 / t - r)
        beta = (g_col / t) * torch.exp(1.0 / t - c)
        ones = torch.ones_like(g)
        # (dG + dG^T)_il = E_il [R_il - (..) (S_li - 1/t) - (..) (S_il - 1/t)], R of rank 4:
        # R_il = k gamma_i u_l + k u_i gamma_l - gamma_i y~_i - gamma_l y~_l, y~ = y + (x + z) / t.
        if use_a:
            ya = y_a + (coef.xa + coef.za) / t
            left_a = torch.stack([coef.ka * gamma_a, coef.ka * r, -gamma_a * ya, ones], 1).div_(t)
            right_a = torch.stack([r, gamma_a, ones, -gamma_a * ya], 1)
            xga, zga = (coef.xa / t) * gamma_a, (coef.za / t) * gamma_a
        if use_b:
            yb = y_b + (coef.xb + coef.zb) / t
            left_b = torch.stack([coef.kb * gamma_b, coef.kb * c, -gamma_b * yb, ones], 1).div_(t)
            right_b = torch.stack([c, gamma_b, ones, -gamma_b * yb], 1)
            xgb, zgb = (coef.xb / t) * gamma_b, (coef.zb / t) * gamma_b

        def setup():
            return _Scratch(a, 7, size, size), torch.zeros_like(a), torch.zeros_like(b)

        def work(my_tasks, state):
            scratch, da, db = state
            for rows, cols, diag in my_tasks:
                h, w = _size(rows), _size(cols)
                s = torch.mm(a_s[rows], b_h[cols].T, out=scratch(0, h, w))  # S_ik - 1/t
                u = torch.mm(b_s[rows], a_h[cols].T, out=scratch(1, h, w))  # S_ki - 1/t
                if use_a:
                    p = torch.mm(a_s[rows], a_h[cols].T, out=scratch(2, h, w)).exp_()
                    ha = torch.mm(left_a[rows], right_a[cols].T, out=scratch(4, h, w))
                    if coef.xa:
                        ha.addcmul_(u, xga[rows, None], value=-1).addcmul_(s, xga[None, cols], value=-1)
                    if coef.za:
                        ha.addcmul_(u, zga[None, cols], value=-1).addcmul_(s, zga[rows, None], value=-1)
                    ha.mul_(p)
                if use_b:
                    q = torch.mm(b_s[rows], b_h[cols].T, out=scratch(3, h, w)).exp_()
                    hb = torch.mm(left_b[rows], right_b[cols].T, out=scratch(5, h, w))
                    if coef.xb:
                        hb.addcmul_(s, xgb[rows, None], value=-1).addcmul_(u, xgb[None, cols], value=-1)
                    if coef.zb:
                        hb.addcmul_(s, zgb[None, cols], value=-1).addcmul_(u, zgb[rows, None], value=-1)
                    hb.mul_(q)
                # dS on block (I, K)
                ds = s.exp_().mul_(torch.add(alpha[rows, None], beta[None, cols], out=scratch(6, h, w)))
                if use_a:
                    if coef.xa:
                        ds.addcmul_(p, xga[None, cols], value=-1)
                    if coef.za:
                        ds.addcmul_(p, zga[rows, None], value=-1)
                if use_b:
                    if coef.zb:
                        ds.addcmul_(q, zgb[None, cols], value=-1)
                    if coef.xb:
                        ds.addcmul_(q, xgb[rows, None], value=-1)
                da[rows].addmm_(ds, b[cols])
                db[cols].addmm_(ds.T, a[rows])
                if use_a:
                    da[rows].addmm_(ha, a[cols])
                if use_b:
                    db[rows].addmm_(hb, b[cols])
                if diag:
                    continue
                # dS on block (K, I), held transposed like U
                du = u.exp_().mul_(torch.add(beta[rows, None], alpha[None, cols], out=scratch(6, h, w)))
                if use_a:
                    if coef.xa:
                        du.addcmul_(p, xga[rows, None], value=-1)
                    if coef.za:
                        du.addcmul_(p, zga[None, cols], value=-1)
                if use_b:
                    if coef.zb:
                        du.addcmul_(q, zgb[rows, None], value=-1)
                    if coef.xb:
                        du.addcmul_(q, xgb[None, cols], value=-1)
                da[cols].addmm_(du.T, b[rows])
                db[rows].addmm_(du, a[cols])
                if use_a:
                    da[cols].addmm_(ha.T, a[rows])
                if use_b:
                    db[cols].addmm_(hb.T, b[rows])
            return [da, db]

        da, db = _run(tasks, work, workers, setup)
        return da, db, None, None


def _weighted_column_sums(x_s: Tensor, x_h: Tensor, gamma: Tensor, size: int, tasks: list, workers: int) -> Tensor:
    """``sum_i gamma_i E_il`` for the symmetric ``E = exp(X X^T / t - 1/t)``: one pass over half the blocks."""

    def setup():
        return torch.zeros_like(gamma), x_s.new_empty(size * size)

    def work(my_tasks, state):
        out, buf = state
        for rows, cols, diag in my_tasks:
            p = torch.mm(x_s[rows], x_h[cols].T, out=buf[: _size(rows) * _size(cols)].view(_size(rows), _size(cols))).exp_()
            out[rows].addmv_(p, gamma[cols])
            if not diag:
                out[cols].addmv_(p.T, gamma[rows])
        return [out]

    return _run(tasks, work, workers, setup)[0]


# ----------------------------------------------------------------------------- loss vectors


def _functions(backend: str, dtype: torch.dtype):
    """The (LogSumExp, SoftTargetSum) autograd functions of a backend (Triton: float32 only)."""
    if backend == "triton" and dtype == torch.float32:
        from . import triton_kernels

        return triton_kernels.LogSumExp, triton_kernels.SoftTargetSum
    if backend not in ("tiled", "triton"):
        raise ValueError(f"kernels handle backend 'tiled' or 'triton'; got {backend!r}")
    return LogSumExp, SoftTargetSum


def _row_col_lse(lse, a_loc: Tensor, a_full: Tensor, b_loc: Tensor, b_full: Tensor, t: float, distributed: bool) -> tuple[Tensor, Tensor]:
    """r_i = lse_k S[i, k] for local rows i, c_i = lse_l S[l, i] for local columns i."""
    # Decided by the process group, not by row counts: a rank that holds the whole batch must
    # still route its gradient through the gather, or the ranks holding no row wait for it.
    if not distributed:  # one process: one pass gives both
        return lse.apply(a_loc, b_loc, t, True)
    r, _ = lse.apply(a_loc, b_full, t, False)
    c, _ = lse.apply(b_loc, a_full, t, False)
    return r, c


def m3co_vector(a_loc, a_full, b_loc, b_full, perm: Tensor, lam: Tensor, t: float, *, distributed: bool = False, backend: str = "tiled") -> Tensor:
    """Per-sample M3Co vector (paper form) of the local rows; see :func:`m3co_loss.functional.m3co_pair`.

    ``a_full``/``b_full`` are the batches gathered over the process group (``distributed``), else
    ``a_loc``/``b_loc`` themselves."""
    lse, _ = _functions(backend, a_loc.dtype)
    r, c = _row_col_lse(lse, a_loc, a_full, b_loc, b_full, t, distributed)
    # lam_i S_ii + (1 - lam_i) S_ij = a_i . (lam_i b_i + (1 - lam_i) b_j) / t: one gathered dot product
    target = (a_loc * torch.lerp(b_loc[perm], b_loc, lam[:, None])).sum(1) / t
    return r + torch.lerp(c[perm], c, lam) - 2 * target


def clip_vector(a_loc, a_full, b_loc, b_full, t: float, *, distributed: bool = False, backend: str = "tiled") -> Tensor:
    """Per-sample symmetric InfoNCE vector of the local rows."""
    lse, _ = _functions(backend, a_loc.dtype)
    r, c = _row_col_lse(lse, a_loc, a_full, b_loc, b_full, t, distributed)
    return r + c - 2 * (a_loc * b_loc).sum(1) / t


def _fused(backend: str, a_loc: Tensor, t: float, distributed: bool) -> bool:
    """Whether the fused single-process MultiSClip kernel applies (Triton runs float64 as tiled)."""
    tiled = backend == "tiled" or (backend == "triton" and a_loc.dtype != torch.float32)
    return tiled and not distributed and _static_shift_ok(t, a_loc.dtype)


def multisoftclip_vector(
    a_loc,
    a_full,
    b_loc,
    b_full,
    t: float,
    *,
    reference: bool,
    gather: Callable[[Tensor], Tensor],
    distributed: bool = False,
    backend: str = "tiled",
) -> Tensor:
    """Per-sample MultiSClip vector Ls(a; a, b) of the local rows (targets from a)."""
    if _fused(backend, a_loc, t, distributed):
        return SoftClip.apply(a_loc, b_loc, t, SoftClipCoefficients.for_directions(1.0, 0.0, reference))
    lse, soft_target_sum = _functions(backend, a_loc.dtype)
    r, c = _row_col_lse(lse, a_loc, a_full, b_loc, b_full, t, distributed)
    if reference:
        # sum_l W_il (S_li + S_il) = sum_l W_il [b_i, a_i] . [a_l, b_l] / t
        y = soft_target_sum.apply(
            a_loc, a_full, torch.zeros_like(a_full[:, 0]), torch.cat([b_loc, a_loc], 1), torch.cat([a_full, b_full], 1), t, 1.0
        )
        return 0.5 * (c + r - y)
    # sum_l W_il (r_l - 2 S_li), S_li = b_i . a_l / t
    y = soft_target_sum.apply(a_loc, a_full, gather(r), b_loc, a_full, t, -2.0)
    return c + y


def multisoftclip_pair_vector(a: Tensor, b: Tensor, t: float, weight_a: float, weight_b: float, *, reference: bool, backend: str = "tiled") -> Tensor:
    """``weight_a Ls(a; a, b) + weight_b Ls(b; a, b)`` for one process, sharing S between the directions."""
    if _fused(backend, a, t, False):
        return SoftClip.apply(a, b, t, SoftClipCoefficients.for_directions(weight_a, weight_b, reference))
    total = None
    for weight, targets, other in ((weight_a, a, b), (weight_b, b, a)):
        if weight:
            v = weight * multisoftclip_vector(targets, targets, other, other, t, reference=reference, gather=lambda x: x, backend=backend)
            total = v if total is None else total + v
    return total
