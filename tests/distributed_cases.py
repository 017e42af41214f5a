"""Loss cases run by the ranks that tests/distributed/test_distributed.py spawns, and on one process for reference.

A *scenario* is a list of row counts, one per rank: rank r holds rows
``offset_r .. offset_r + sizes[r]`` of one global batch (rank 0's rows first). Each case
encodes the rows with a small model (one linear encoder and one linear head per modality, in
float64), applies one loss and backpropagates its objective. On a process group the model is
wrapped in DistributedDataParallel and the loss gets ``gather_distributed=True``; on one
process the same case runs on the whole batch. The test compares the two.

Mixing partners are local (raw inputs live on one rank): each rank draws its own plan, and the
single-process reference uses the concatenation of the ranks' plans with every permutation
offset by its rank's first row.

Learned temperatures are parameters of the model (so that DDP averages their gradients like any
other): a log-scale that the functional cases turn into a 0-dim temperature tensor, and the
loss modules with ``learn_temperature=True`` as submodules. Their gradients are compared with
the others, which also shows that every rank takes the same step.
"""

from __future__ import annotations

import datetime
import functools
import math
import os
import traceback
from typing import Callable, NamedTuple, Optional

import torch
from torch import nn

import m3co_loss
from m3co_loss import backends
from m3co_loss import distributed as dist_utils
from m3co_loss import functional as F
from m3co_loss.mixup import MixupPlan, MixupSampler

MODALITIES, FEATURES, DIM, CLASSES = 3, 6, 5, 3
SEED = 20240917
# Tiles smaller than every batch below, so that the tiled backend streams over uneven tiles.
TILE_ROWS, TILE_COLS = 3, 4

SCENARIOS = {
    2: [(4, 4), (5, 2), (0, 5)],  # equal ranks; unequal ranks (a last batch); one rank holds the whole batch
    3: [(4, 1, 0)],  # a rank with a single row and a rank with no row at all
}


def use_small_tiles() -> None:
    backends.set_config(tile_rows=TILE_ROWS, tile_cols=TILE_COLS)


class Model(nn.Module):
    """One linear encoder and one linear classification head per modality."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(SEED)
        self.encoders = nn.ModuleList(nn.Linear(FEATURES, DIM, dtype=torch.float64) for _ in range(MODALITIES))
        self.heads = nn.ModuleList(nn.Linear(DIM, CLASSES, dtype=torch.float64) for _ in range(MODALITIES))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
        # learned temperatures, added after the random draws: log(1/t) of the functional cases,
        # and loss modules that learn theirs (options set per case by run_variant)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.2), dtype=torch.float64))
        self.criteria = nn.ModuleDict(
            {
                "CLIPLoss": m3co_loss.CLIPLoss(temperature=0.2, learn_temperature=True),
                "MultiSClipLoss": m3co_loss.MultiSClipLoss(temperature=0.2, target_temperature=0.3, learn_temperature=True),
                "M3CoLoss": m3co_loss.M3CoLoss(temperature=0.2, multisclip_temperature=0.25, total_steps=3, learn_temperature=True),
                "ContrastiveLoss": m3co_loss.ContrastiveLoss(temperature=0.2, learn_temperature=True),
            }
        )
        self.criteria.to(torch.float64)

    @property
    def temperature(self) -> torch.Tensor:
        return torch.exp(-self.logit_scale)

    def forward(self, x, mixed=None, heads: bool = False, loss: Optional[Callable] = None):
        """The embeddings (and logits), or ``loss(self, z, z_mixed, logits)`` computed inside the
        forward pass: DDP requires a parameter used for the loss (a learned temperature) to be
        used there."""
        z = [enc(v) for enc, v in zip(self.encoders, x)]
        z_mixed = [enc(v) for enc, v in zip(self.encoders, mixed)] if mixed is not None else None
        logits = [head(v) for head, v in zip(self.heads, z)] if heads else None
        return (z, z_mixed, logits) if loss is None else loss(self, z, z_mixed, logits)


class Batch(NamedTuple):
    x: list  # MODALITIES tensors (n, FEATURES)
    y: torch.Tensor  # (n,) labels
    weights: torch.Tensor  # (n,) weights of the per-sample values for reduction="none"


def global_batch(total: int) -> Batch:
    g = torch.Generator().manual_seed(SEED + total)
    x = [torch.randn(total, FEATURES, generator=g, dtype=torch.float64) for _ in range(MODALITIES)]
    y = torch.randint(0, CLASSES, (total,), generator=g)
    return Batch(x, y, torch.rand(total, generator=g, dtype=torch.float64))


def rows(batch: Batch, start: int, stop: int) -> Batch:
    return Batch([v[start:stop] for v in batch.x], batch.y[start:stop], batch.weights[start:stop])


def local_plan(sizes, rank: int, convention: str) -> MixupPlan:
    sampler = MixupSampler.for_convention(convention)
    return sampler.sample(sizes[rank], MODALITIES, generator=torch.Generator().manual_seed(SEED + 7919 * rank))


def global_plan(sizes, convention: str) -> MixupPlan:
    """The ranks' plans concatenated, each permutation offset by its rank's first row."""
    plans = [local_plan(sizes, r, convention) for r in range(len(sizes))]
    offsets = [sum(sizes[:r]) for r in range(len(sizes))]
    perms = tuple(torch.cat([p.perms[m] + o for p, o in zip(plans, offsets)]) for m in range(MODALITIES))
    return MixupPlan(perms, torch.cat([p.lam for p in plans], dim=1))


class Case(NamedTuple):
    name: str
    reductions: tuple  # reductions that apply ("-" for losses without one)
    backends: tuple
    heads: bool  # whether the loss needs the classification heads
    loss: Callable  # (z, z_mixed, logits, y, plan, options) -> loss
    learned: Optional[str] = None  # "functional": options get temperature=model.temperature; else a criterion's name


def _m3co_pair(conv):
    return lambda z, zm, lg, y, plan, o: F.m3co_pair(zm[0], z[1], plan.perms[0], plan.lam[0], convention=conv, **o)


def _m3co(conv):
    # The reference convention contrasts mixed with mixed embeddings: it needs no clean ones.
    return lambda z, zm, lg, y, plan, o: F.m3co(zm, z if conv == "paper" else None, plan.perms, plan.lam, convention=conv, **o)


def _msc_pair(conv):
    return lambda z, zm, lg, y, plan, o: F.multisoftclip_pair(z[0], z[1], convention=conv, **o)


def _msc(conv):
    return lambda z, zm, lg, y, plan, o: F.multisoftclip(z, convention=conv, **o)


def _m3co_module(conv):
    return lambda z, zm, lg, y, plan, o: m3co_loss.M3CoLoss(convention=conv, **o)(z, mixed=zm, plan=plan)


def _m3co_module_embeddings(z, zm, lg, y, plan, o):
    return m3co_loss.M3CoLoss(beta=0.5, **o)(z, plan=plan)  # the released code's choice: mix the embeddings


def _m3co_module_multisclip_phase(z, zm, lg, y, plan, o):
    return m3co_loss.M3CoLoss(total_steps=3, **o)(z, step=2)


def global_partners(n: int, gather: bool, device=None):
    """(partners, weights) of this rank's n rows as *global* column indices, a function of the global row.

    Global row g contrasts with g, (3g + 1) mod N and (g + 2) mod N (a repeat when two coincide),
    weighted (1 + g mod 3, 1, g mod 2) / total: partners cross ranks, as contrastive_loss allows.
    """
    if gather and dist_utils.world_size() > 1:
        sizes = dist_utils.all_gather_sizes(n, torch.device("cpu"))
        offset, total = sum(sizes[: dist_utils.rank()]), sum(sizes)
    else:
        offset, total = 0, n
    g = torch.arange(offset, offset + n)
    partners = torch.stack([g, (3 * g + 1) % total, (g + 2) % total], 1)
    weights = torch.stack([1.0 + g % 3, torch.ones(n, dtype=torch.long), g % 2], 1).to(torch.float64)
    return partners, weights / weights.sum(1, keepdim=True)


def _partner_kwargs(n: int, gather: bool) -> dict:
    partners, weights = global_partners(n, gather)
    return dict(partners=partners, weights=weights)


def _targets(form, convention="paper", module=False):
    def loss(z, zm, lg, y, plan, o):
        kw = dict(labels=y) if form == "labels" else _partner_kwargs(z[0].shape[0], o["gather_distributed"])
        if module:
            return m3co_loss.ContrastiveLoss(convention=convention, **o)(zm[0], z[1], **kw)
        return F.contrastive_loss(zm[0], z[1], convention=convention, **kw, **o)

    return loss


def _unis(z, zm, lg, y, plan, o):
    return F.unis_mmc(z, lg, y, gather_distributed=o["gather_distributed"])


def _unis_module(z, zm, lg, y, plan, o):
    return m3co_loss.UniSMMCLoss(temperature=0.5, gather_distributed=o["gather_distributed"])(z, lg, y)


def _learned_module(name: str, call: Callable) -> Callable:
    """A case on the model's criterion ``name`` (options["criterion"]), configured with the case's options."""

    def case(z, zm, lg, y, plan, o):
        criterion = o.pop("criterion")
        criterion.reduction, criterion.backend, criterion.gather_distributed = o["reduction"], o["backend"], o["gather_distributed"]
        return call(criterion, z, zm, plan)

    return case


ALL = ("mean", "sum", "none")
BACKENDS = ("dense", "tiled")
# The reductions are shared by every loss: all three are checked on one loss of each kind.
CASES = [
    Case("m3co_pair[paper]", ("mean", "none"), BACKENDS, False, _m3co_pair("paper")),
    Case("m3co_pair[reference]", ("mean",), BACKENDS, False, _m3co_pair("reference")),
    Case("m3co[paper]", ALL, BACKENDS, False, _m3co("paper")),
    Case("m3co[reference]", ("mean",), BACKENDS, False, _m3co("reference")),
    Case("multisoftclip_pair[paper]", ("mean",), BACKENDS, False, _msc_pair("paper")),
    Case("multisoftclip_pair[reference]", ("mean",), BACKENDS, False, _msc_pair("reference")),
    Case("multisoftclip[paper]", ALL, BACKENDS, False, _msc("paper")),
    Case("multisoftclip[reference]", ("mean", "none"), BACKENDS, False, _msc("reference")),
    Case("clip_loss", ALL, BACKENDS, False, lambda z, zm, lg, y, plan, o: F.clip_loss(z[0], z[1], **o)),
    # t = 0.002 < 2/600: the tiled kernels find exact maxima instead of shifting by 1/t.
    Case("clip_loss[t=0.002]", ("mean",), BACKENDS, False, lambda z, zm, lg, y, plan, o: F.clip_loss(z[0], z[1], temperature=0.002, **o)),
    Case("M3CoLoss[paper]", ("mean",), BACKENDS, False, _m3co_module("paper")),
    Case("M3CoLoss[reference]", ("mean",), BACKENDS, False, _m3co_module("reference")),
    Case("M3CoLoss[mixed embeddings]", ("mean",), BACKENDS, False, _m3co_module_embeddings),
    Case("M3CoLoss[MultiSClip phase]", ("mean",), BACKENDS, False, _m3co_module_multisclip_phase),
    Case("MultiSClipLoss", ("sum",), BACKENDS, False, lambda z, zm, lg, y, plan, o: m3co_loss.MultiSClipLoss(**o)(z)),
    Case("CLIPLoss", ("none",), BACKENDS, False, lambda z, zm, lg, y, plan, o: m3co_loss.CLIPLoss(**o)(z[0], z[1])),
    Case("contrastive_loss[partners]", ALL, BACKENDS, False, _targets("partners")),
    Case("contrastive_loss[labels]", ("mean", "none"), BACKENDS, False, _targets("labels")),
    Case("ContrastiveLoss[partners, reference]", ("mean",), BACKENDS, False, _targets("partners", "reference", module=True)),
    Case("ContrastiveLoss[labels]", ("sum",), BACKENDS, False, _targets("labels", module=True)),
    # learned temperatures: a 0-dim tensor that requires grad, and the modules' log-scales
    Case("clip_loss[learned t]", ("mean",), BACKENDS, False, lambda z, zm, lg, y, plan, o: F.clip_loss(z[0], z[1], **o), "functional"),
    Case("m3co[learned t]", ("none",), BACKENDS, False, _m3co("paper"), "functional"),
    Case("multisoftclip[learned t]", ("mean",), BACKENDS, False, _msc("paper"), "functional"),
    Case(
        "multisoftclip_pair[learned t, tensor target t]",
        ("sum",),
        BACKENDS,
        False,
        lambda z, zm, lg, y, plan, o: F.multisoftclip_pair(z[0], z[1], target_temperature=o["temperature"] * 1.5, **o),
        "functional",
    ),
    Case("CLIPLoss[learned t]", ("mean",), BACKENDS, False, _learned_module("CLIPLoss", lambda m, z, zm, plan: m(z[0], z[1])), "CLIPLoss"),
    Case("MultiSClipLoss[learned t]", ("mean",), BACKENDS, False, _learned_module("MultiSClipLoss", lambda m, z, zm, plan: m(z)), "MultiSClipLoss"),
    Case("M3CoLoss[learned t]", ("mean",), BACKENDS, False, _learned_module("M3CoLoss", lambda m, z, zm, plan: m(z, mixed=zm, plan=plan)), "M3CoLoss"),
    Case(
        "M3CoLoss[learned t, MultiSClip phase]",
        ("mean",),
        BACKENDS,
        False,
        _learned_module("M3CoLoss", lambda m, z, zm, plan: m(z, step=2)),
        "M3CoLoss",
    ),
    Case("contrastive_loss[labels, learned t]", ("mean",), BACKENDS, False, _targets("labels"), "functional"),
    Case(
        "ContrastiveLoss[partners, learned t]",
        ("mean",),
        BACKENDS,
        False,
        _learned_module("ContrastiveLoss", lambda m, z, zm, plan: m(zm[0], z[1], **_partner_kwargs(z[0].shape[0], m.gather_distributed))),
        "ContrastiveLoss",
    ),
    Case("unis_mmc", ("-",), ("-",), True, _unis),
    Case("UniSMMCLoss", ("-",), ("-",), True, _unis_module),
]


def variants():
    """(case, backend, reduction) for every combination the tests check."""
    for case in CASES:
        for backend in case.backends:
            for reduction in case.reductions:
                yield case, backend, reduction


def variant_id(case: Case, backend: str, reduction: str) -> str:
    return f"{case.name}-{backend}-{reduction}"


def run_variant(model: nn.Module, case: Case, backend: str, reduction: str, batch: Batch, plan: MixupPlan, *, gather: bool, world: int):
    """Forward, loss and backward of one case; returns (loss value, {parameter name: gradient})."""
    options = {"gather_distributed": gather}
    if reduction != "-":
        options.update(reduction=reduction, backend=backend)
    mixed = [plan.mix(v, m) for m, v in enumerate(batch.x)]

    def loss(module: Model, z, z_mixed, logits):
        if case.learned == "functional":
            options["temperature"] = module.temperature
        elif case.learned is not None:
            options["criterion"] = module.criteria[case.learned]
        return case.loss(z, z_mixed, logits, batch.y, plan, options)

    out = model(batch.x, mixed, heads=case.heads, loss=loss)
    module = getattr(model, "module", model)
    # reduction="none": weight the per-sample values; world * local sum averages over ranks to
    # the single-process weighted sum, as a mean or sum reduction does.
    objective = world * (batch.weights * out).sum() if reduction == "none" else out
    model.zero_grad(set_to_none=True)
    objective.backward()
    grads = {name: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for name, p in module.named_parameters()}
    return out.detach().clone(), grads


def single_process(case: Case, backend: str, reduction: str, sizes, *, gather: bool = False):
    """The case on one process on the concatenated batch."""
    use_small_tiles()
    batch = global_batch(sum(sizes))
    plan = global_plan(sizes, "reference" if "reference" in case.name else "paper")
    return run_variant(Model(), case, backend, reduction, batch, plan, gather=gather, world=1)


@functools.lru_cache(maxsize=None)
def reference(case: Case, reduction: str, sizes: tuple):
    """What the ranks must reproduce: one process, dense backend, no gathering (cached: read only)."""
    return single_process(case, "dense" if reduction != "-" else "-", reduction, sizes)


# ----------------------------------------------------------------------------- spawned ranks


def _expect_error(fn) -> str:
    try:
        fn()
    except (ValueError, TypeError) as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


def _error_cases(rank: int, world: int) -> dict:
    """Inputs that every rank must reject with the same clear error (and no rank left hanging)."""
    d = torch.float64
    out = {}
    n = 1 if rank == 0 else 0
    out["one row in all"] = _expect_error(lambda: F.clip_loss(torch.randn(n, 4, dtype=d), torch.randn(n, 4, dtype=d), gather_distributed=True))
    dim = 5 if rank == world - 1 else 4
    out["D differs"] = _expect_error(lambda: F.multisoftclip([torch.randn(3, dim, dtype=d)] * 2, gather_distributed=True))
    dtype = torch.float32 if rank == world - 1 else d
    out["dtype differs"] = _expect_error(lambda: F.clip_loss(torch.randn(3, 4, dtype=dtype), torch.randn(3, 4, dtype=dtype), gather_distributed=True))
    # value problems of one rank's targets: every rank raises (none is left waiting in the gather)
    x = torch.randn(3, 4, dtype=d)
    last = rank == world - 1
    out["partners out of range"] = _expect_error(
        lambda: F.contrastive_loss(x, x, partners=torch.full((3, 1), 3 * world if last else 0), gather_distributed=True))
    weights = torch.tensor([[0.5, 0.7]] * 3 if rank == 0 else [[0.5, 0.5]] * 3, dtype=d)
    out["weights off"] = _expect_error(
        lambda: F.contrastive_loss(x, x, partners=torch.zeros(3, 2, dtype=torch.long), weights=weights, gather_distributed=True))
    out["negative label"] = _expect_error(lambda: F.contrastive_loss(x, x, labels=torch.tensor([0, -1 if last else 1, 2]), gather_distributed=True))
    return out


def _value_problem_cases(rank: int, world: int) -> dict:
    """{case: (message of the bad rank, or None for no error; what this rank raised, or "no error")}.

    The last rank passes one bad value per case (both ranks in "both ranks bad"); every rank must
    raise a ValueError, the bad one its own message and the others the bad rank's, prefixed with
    ``rank r:``, and then stay in step for the next call.
    """
    d = torch.float64
    bad = rank == world - 1
    g = torch.Generator().manual_seed(SEED + rank)
    x, y = (torch.randn(3, 4, generator=g, dtype=d) for _ in range(2))
    nan = x.clone()
    nan[1, 2] = float("nan") if bad else nan[1, 2]
    perm, lam = torch.tensor([2, 0, 1]), torch.tensor([0.2, 0.5, 1.0], dtype=d)
    bad_perm = torch.tensor([2, 2, 1]) if bad else perm
    bad_lam = torch.tensor([0.2, 1.5, 1.0], dtype=d) if bad else lam
    logits = [torch.randn(3, 2, generator=g, dtype=d) for _ in range(2)]
    labels = torch.tensor([0, 1, 1])
    gather = dict(gather_distributed=True)
    calls = {
        "clip_loss z_a": ("z_a contains NaN or Inf", lambda: F.clip_loss(nan, y, **gather)),
        "contrastive_loss z_b": ("z_b contains NaN or Inf", lambda: F.contrastive_loss(x, nan, labels=labels, **gather)),
        "m3co_pair perm": ("perm must be a permutation of 0..2", lambda: F.m3co_pair(x, y, bad_perm, lam, **gather)),
        "m3co_pair lam": ("lam must lie in [0, 1] (NaN is not allowed)", lambda: F.m3co_pair(x, y, perm, bad_lam, **gather)),
        "m3co mixed": ("mixed[1] contains NaN or Inf", lambda: F.m3co([x, nan], [y, x], [perm, perm], lam, **gather)),
        "m3co perms": ("perms[1] must be a permutation of 0..2", lambda: F.m3co([x, y], [y, x], [perm, bad_perm], lam, **gather)),
        "m3co lam": ("lam[0] must lie in [0, 1] (NaN is not allowed)", lambda: F.m3co([x, y], None, [perm, perm], [bad_lam, lam], partner="mixed", **gather)),
        "multisoftclip z": ("z[1] contains NaN or Inf", lambda: F.multisoftclip([x, nan], **gather)),
        "multisoftclip_pair temperature": (
            "temperature must be a finite number > 0; got a tensor holding nan",
            lambda: F.multisoftclip_pair(x, y, temperature=torch.tensor(float("nan") if bad else 0.1, dtype=d), **gather),
        ),
        "unis_mmc r": ("r[0] contains NaN or Inf", lambda: F.unis_mmc([nan, y], logits, labels, **gather)),
        "unis_mmc logits": ("logits[1] contains NaN or Inf", lambda: F.unis_mmc([x, y], [logits[0], nan[:, 1:3]], labels, **gather)),
        "unis_mmc y": ("y must hold class indices in [0, 2)", lambda: F.unis_mmc([x, y], logits, torch.tensor([0, 2 if bad else 1, 1]), **gather)),
        "M3CoLoss z": ("clean[0] contains NaN or Inf", lambda: m3co_loss.M3CoLoss(gather_distributed=True)([nan, y])),
        "both ranks bad": (None, lambda: F.m3co_pair(nan if bad else x, y, perm, lam if bad else torch.tensor([0.2, -0.5, 1.0], dtype=d), **gather)),
    }
    out = {name: (message, _expect_error(call)) for name, (message, call) in calls.items()}
    with m3co_loss.value_checks(False):  # nothing is checked: a NaN loss on every rank
        value = F.clip_loss(nan, y, **gather)
        out["value checks off"] = (None, f"loss {float(value)}")
    # the ranks are still in step: a sound call gathers both ranks' rows
    out["sound call after"] = (None, "no error" if F.clip_loss(x, y, reduction="none", **gather).shape == (3,) else "wrong shape")
    return out


def _argument_error_cases(rank: int, world: int) -> dict:
    """{case: (what this rank raises alone, without gather_distributed; what it raised over the group)}.

    The last rank passes one argument of the wrong kind or shape per case (each rank its own in
    "both ranks bad"; rank 0 a NaN in "value problem and bad argument"). Every rank must raise:
    the bad one the error it raises alone, the others ``ValueError: rank r: <TypeName>: <message>``;
    then the ranks must still be in step.
    """
    d = torch.float64
    bad = rank == world - 1
    g = torch.Generator().manual_seed(SEED + rank)
    x, y = (torch.randn(3, 4, generator=g, dtype=d) for _ in range(2))
    wide = torch.randn(3, 5, generator=g, dtype=d)
    perm, lam = torch.tensor([2, 0, 1]), torch.tensor([0.2, 0.5, 1.0], dtype=d)
    labels = torch.tensor([0, 1, 1])
    logits = [torch.randn(3, 2, generator=g, dtype=d) for _ in range(2)]
    nan = x.clone()
    nan[0, 0] = float("nan")
    calls: dict[str, Callable[[bool], object]] = {
        "clip_loss z_b of another D": lambda gather: F.clip_loss(x, wide if bad else y, gather_distributed=gather),
        "multisoftclip 1-D z": lambda gather: F.multisoftclip([x, y[0] if bad else y], gather_distributed=gather),
        "m3co_pair list": lambda gather: F.m3co_pair(x.tolist() if bad else x, y, perm, lam, gather_distributed=gather),
        "m3co_pair perm length": lambda gather: F.m3co_pair(x, y, perm[:2] if bad else perm, lam, gather_distributed=gather),
        "m3co perms count": lambda gather: F.m3co([x, y], [y, x], [perm] if bad else [perm, perm], lam, gather_distributed=gather),
        "multisoftclip_pair reduction": lambda gather: F.multisoftclip_pair(x, y, reduction="avg" if bad else "mean", gather_distributed=gather),
        "contrastive_loss labels shape": lambda gather: F.contrastive_loss(
            x, y, labels=labels[:, None] if bad else labels, gather_distributed=gather),
        "unis_mmc logits shape": lambda gather: F.unis_mmc([x, y], [logits[0], logits[1][:2] if bad else logits[1]], labels, gather_distributed=gather),
        "M3CoLoss z": lambda gather: m3co_loss.M3CoLoss(gather_distributed=gather)([x, "y" if bad else y]),
        "M3CoLoss plan": lambda gather: m3co_loss.M3CoLoss(gather_distributed=gather)([x, y], plan="plan" if bad else None),
        "M3CoLoss multisclip phase": lambda gather: m3co_loss.M3CoLoss(total_steps=3, gather_distributed=gather)([x, wide if bad else y], step=2),
        "both ranks bad": lambda gather: F.clip_loss(x, y[:2] if bad else y[0], gather_distributed=gather),
        "value problem and bad argument": lambda gather: F.clip_loss(nan if rank == 0 else x, wide if bad else y, gather_distributed=gather),
    }
    out = {name: (_expect_error(lambda: call(False)), _expect_error(lambda: call(True))) for name, call in calls.items()}
    # the ranks are still in step: a sound call gathers both ranks' rows
    out["sound call after"] = (None, "no error" if F.clip_loss(x, y, reduction="none", gather_distributed=True).shape == (3,) else "wrong shape")
    return out


def value_problems_main(rank: int, world: int, store_path: str, out_dir: str, timeout_s: float) -> None:
    """Entry point of one spawned rank: the cases of :func:`_value_problem_cases` and :func:`_argument_error_cases`.

    The process group's timeout ends a rank left waiting in a collective with an error (a hang
    would otherwise outlive the test).
    """
    import torch.distributed as dist

    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    results: dict = {}
    try:
        results["values"] = _value_problem_cases(rank, world)
        results["arguments"] = _argument_error_cases(rank, world)
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


COMPILED_SIZES = {2: (5, 2), 3: (4, 1, 0)}


def _compiled_cases(rank: int, world: int) -> dict:
    """Each loss under ``torch.compile`` (aot_eager, value checks off) on uneven ranks.

    Returns {(loss, backend): (where the graph breaks, as "file:function" sorted, largest
    difference from eager in loss and gradients)}.
    """
    sizes = COMPILED_SIZES[world]
    start = sum(sizes[:rank])
    g = torch.Generator().manual_seed(SEED + 1)
    full = [torch.randn(sum(sizes), DIM, generator=g, dtype=torch.float64) for _ in range(2)]
    local = [z[start:start + sizes[rank]] for z in full]
    perm = torch.arange(sizes[rank]).roll(1)
    lam = torch.linspace(0.2, 0.9, sizes[rank], dtype=torch.float64)
    losses: dict[str, Callable[..., torch.Tensor]] = {
        "clip_loss": lambda a, b, backend: F.clip_loss(a, b, gather_distributed=True, backend=backend),
        "m3co_pair": lambda a, b, backend: F.m3co_pair(a, b, perm, lam, gather_distributed=True, backend=backend),
        "multisoftclip": lambda a, b, backend: F.multisoftclip([a, b], gather_distributed=True, backend=backend),
    }

    def value_and_grads(fn: Callable[..., torch.Tensor]) -> tuple:
        a, b = (z.detach().requires_grad_() for z in local)
        value = fn(a, b)
        return (value.detach(), *torch.autograd.grad(value, (a, b)))

    out = {}
    m3co_loss.set_value_checks(False)
    try:
        for name, loss in losses.items():
            for backend in ("dense", "tiled"):
                fn = functools.partial(loss, backend=backend)
                explained = torch._dynamo.explain(fn)(*local)
                breaks = sorted({f"{os.path.basename(r.user_stack[-1].filename)}:{r.user_stack[-1].name}" for r in explained.break_reasons})
                torch._dynamo.reset()
                eager, traced = value_and_grads(fn), value_and_grads(torch.compile(fn, backend="aot_eager"))
                torch._dynamo.reset()
                out[(name, backend)] = (breaks, max(float((x - y).abs().max()) if x.numel() else 0.0 for x, y in zip(traced, eager)))
    finally:
        m3co_loss.set_value_checks(True)
    return out


def rank_main(rank: int, world: int, store_path: str, out_dir: str) -> None:
    """Entry point of one spawned rank: every scenario, case, backend and reduction."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    use_small_tiles()
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    results = {"errors": {}, "variants": {}}
    try:
        for sizes in SCENARIOS[world]:
            start = sum(sizes[:rank])
            batch = rows(global_batch(sum(sizes)), start, start + sizes[rank])
            plans = {conv: local_plan(sizes, rank, conv) for conv in ("paper", "reference")}
            model = DistributedDataParallel(Model(), find_unused_parameters=True)
            for case, backend, reduction in variants():
                plan = plans["reference" if "reference" in case.name else "paper"]
                key = (tuple(sizes), variant_id(case, backend, reduction))
                try:
                    results["variants"][key] = run_variant(model, case, backend, reduction, batch, plan, gather=True, world=world)
                except Exception:  # report, then stop: the other ranks' collectives no longer match
                    results["variants"][key] = traceback.format_exc()
                    raise
        results["errors"] = _error_cases(rank, world)
        results["compiled"] = _compiled_cases(rank, world)
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()
