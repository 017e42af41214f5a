r"""The losses of M3CoL as pure functions.

Every loss L2-normalises its inputs along the last dimension, works on the similarity matrix
``S = p_a @ p_b.T / t`` in log-sum-exp form (row and column log-sum-exps plus gathered
entries, never ``log(softmax)`` and never a dense target matrix), and accumulates in float32
when the inputs are float16 or bfloat16. ``reduction="none"`` returns the length-N vector whose
mean is the ``"mean"`` value.

Notation (see the docs' maths page): ``r = lse_row(S)``, ``c = lse_col(S)``, ``j = perm[i]``.

* :func:`m3co_pair` (paper Eq. 6):
  ``v_i = (r_i - lam_i S_ii - (1-lam_i) S_ij) + (lam_i c_i + (1-lam_i) c_j - lam_i S_ii - (1-lam_i) S_ij)``
* :func:`multisoftclip_pair` (paper Eq. 9) with ``W = softmax_row(p_a p_a^T / t)``:
  ``v_i = c_i + sum_l W_il r_l - 2 sum_l W_il S_li``
* :func:`clip_loss`: ``v_i = r_i + c_i - 2 S_ii``
* :func:`contrastive_loss` (any targets ``T`` with a few positives per row: partners with
  weights, or class labels): ``v_i = r_i + sum_k T_ik c_k - 2 sum_k T_ik S_ik``; M3Co is its
  case ``T_i = lam_i e_i + (1-lam_i) e_j``, and :func:`m3co_pair` computes through it.

``convention="reference"`` computes what the authors' released code computes (docs page
``conventions``): each directed term is the *average* of its two directions, MultiSClip
weights both directions by the rows of ``W``, :func:`m3co` / :func:`multisoftclip` use cyclic
pairs (modality m against m+1 mod M, one direction each), and each M3Co term contrasts the
mixed modality with the *mixed* embeddings of its partner (``partner="mixed"``). Fixed points of
``perm`` are exact in both conventions (the released code's fixed-point bug is not reproduced).

Backends (:mod:`m3co_loss.backends`): ``"dense"`` builds the N x N similarity matrix (readable
reference); ``"tiled"`` streams over tiles with online log-sum-exp in O(N D) memory and
recomputes tiles in the backward pass; ``"triton"`` is the CUDA kernel of the tiled algorithm;
``"auto"`` picks by size (:func:`m3co_loss.backends.choose_backend`).

With ``gather_distributed=True`` and an initialised process group of W > 1 ranks, each rank
passes its local rows (local ``perm`` and ``lam``: mixing partners live on the same rank); the
normalised embeddings of every rank are gathered with gradients in one collective, and the
per-sample values of a rank's rows are exactly those of the single-process loss on the
concatenated batch (rank 0's rows first). ``"mean"`` returns ``W / N_global`` times the sum of
the local values, ``"sum"`` returns ``W`` times it and ``"none"`` the local values, so that the
average over ranks of ``"mean"``/``"sum"`` is the single-process loss and DDP's gradient
averaging yields the single-process gradient (docs: *Scaling out*).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import backends
from ._batch import (
    _Batch,
    _LocalChecks,
    _batch_layout,
    _check_common,
    _check_pair,
    _temperatures,
    _min_rows,
    _no_autocast,
    _prepare,
    _reduce,
    _spread,
    normalize,
)
from ._targets import contrastive_loss, partners_vector
from ._validation import (
    CONVENTIONS,
    REDUCTIONS,
    check_choice,
    check_embeddings,
    check_flag,
    check_labels,
    check_lam,
    check_logits,
    check_perm,
    check_same_device,
    check_sequence,
    check_temperature,
    has_values,
    min_temperature,
    resolve_partner,
    value_checks_enabled,
)
from .backends import Rows, Temperature

__all__ = [
    "m3co_pair",
    "m3co",
    "multisoftclip_pair",
    "multisoftclip",
    "clip_loss",
    "contrastive_loss",
    "unis_mmc",
    "normalize",
    "min_temperature",
    "CONVENTIONS",
]

LamArg = Union[Tensor, Sequence[Tensor]]


# ----------------------------------------------------------------------------- dispatch


def _m3co_vector(a: Rows, b: Rows, perm: Tensor, lam: Tensor, t: Temperature, reference: bool, layout: _Batch, backend: str) -> Tensor:
    # M3Co's targets: lam_i on i, 1 - lam_i on perm[i] (added when they coincide), local to the rank.
    partners = torch.stack([torch.arange(perm.shape[0], device=perm.device), perm], dim=1)
    weights = torch.stack([lam, 1 - lam], dim=1)
    return partners_vector(a, b, partners, weights, t, reference=reference, layout=layout, backend=backend, local=True, rows_sum_to_one=True)


def _clip_vector(a: Rows, b: Rows, t: Temperature, layout: _Batch, backend: str) -> Tensor:
    return backends.clip_vector(a, b, t, distributed=layout.distributed, backend=backend)


def _multisoftclip_vector(
    a: Rows, b: Rows, t: Temperature, reference: bool, layout: _Batch, backend: str, target_t: Temperature, detach_targets: bool
) -> Tensor:
    return backends.multisoftclip_vector(
        a, b, t, reference=reference, gather=layout.gather, distributed=layout.distributed, backend=backend, target_t=target_t, detach_targets=detach_targets
    )


# ----------------------------------------------------------------------------- argument checks


def _check_modalities(
    name: str, zs: object, *, n: Optional[int] = None, d: Optional[int] = None, min_rows: int = 2, values: bool = True
) -> List[Tensor]:
    zs = check_sequence(name, zs)
    first = check_embeddings(f"{name}[0]", zs[0], n=n, d=d, min_rows=min_rows, values=values)
    out = [first]
    for m, z in enumerate(zs[1:], start=1):
        out.append(check_embeddings(f"{name}[{m}]", z, n=first.shape[0], d=first.shape[1], min_rows=min_rows, values=values))
    check_same_device([f"{name}[{m}]" for m in range(len(out))], out)
    return out


def _multisclip_options(
    temperature: object, target_temperature: object, detach_targets: object, reduction: object, convention: object, gather_distributed: object
) -> Tuple[Union[float, Tensor], Optional[Union[float, Tensor]], bool, bool]:
    """The checked options of a MultiSClip call: ``(t, target_t or None, detach, spread)``."""
    t = _check_common(temperature, reduction, convention)
    target = None if target_temperature is None else check_temperature("target_temperature", target_temperature)
    detach = check_flag("detach_targets", detach_targets)
    return t, target, detach, _spread(gather_distributed)


def _per_modality_lam(lam: object, num: int, n: int, device: torch.device) -> List[Tensor]:
    """lam as one (N,) tensor shared by all modalities, an (M, N) tensor or a list of M tensors."""
    if isinstance(lam, Tensor) and lam.dim() == 2:
        if lam.shape[0] != num:
            raise ValueError(f"lam has shape {tuple(lam.shape)}; a 2-D lam needs one row per modality ({num}, {n})")
        return [check_lam(f"lam[{m}]", lam[m], n, device) for m in range(num)]
    if isinstance(lam, Tensor):
        return [check_lam("lam", lam, n, device)] * num
    if not isinstance(lam, (list, tuple)):
        raise TypeError(f"lam must be a torch.Tensor of shape ({n},) or ({num}, {n}), or a list of {num} tensors; got {type(lam).__name__}")
    lams = list(lam)
    if len(lams) != num:
        raise ValueError(f"lam holds {len(lams)} tensors but there are {num} modalities")
    return [check_lam(f"lam[{m}]", x, n, device) for m, x in enumerate(lams)]


def _directed_pairs(num: int, convention: str) -> List[Tuple[int, int, float]]:
    """(a, b, weight) for every directed term a -> b of the aggregate loss."""
    if convention == "reference":
        # Released code: modality m against m+1 (mod M), one direction each; for M = 2 this
        # visits both directions.
        return [(m, (m + 1) % num, 1.0) for m in range(num)]
    return [(a, b, 0.5) for a in range(num) for b in range(num) if a != b]


# ----------------------------------------------------------------------------- public API


def m3co_pair(
    mixed_a: Tensor,
    clean_b: Tensor,
    perm: Tensor,
    lam: Tensor,
    *,
    temperature: Union[float, Tensor] = 0.1,
    reduction: str = "mean",
    convention: str = "paper",
    backend: str = "auto",
    gather_distributed: bool = False,
) -> Tensor:
    r"""Mixup contrastive loss L3(a -> b) of one mixed modality against one clean one.

    Row ``i`` of ``mixed_a`` is ``lam[i] x_i + (1 - lam[i]) x_perm[i]`` (mixed inputs or mixed
    embeddings, encoded). Its targets in ``clean_b`` are sample ``i`` with weight ``lam[i]`` and
    sample ``perm[i]`` with weight ``1 - lam[i]``, in both the row (mixed -> clean) and the
    column (clean -> mixed) direction (paper Eq. 6)::

        v_i = lam_i (r_i - S_ii) + (1-lam_i) (r_i - S_ij) + lam_i (c_i - S_ii) + (1-lam_i) (c_j - S_ij)

    with ``S = p_a p_b^T / t``, ``r``/``c`` its row/column log-sum-exps and ``j = perm[i]``.
    With ``lam = 1`` this is :func:`clip_loss`. ``convention="reference"`` halves it (the
    released code averages the two directions).

    The released code mixes every modality before it contrasts them, so its term is this one
    with modality b's *mixed* embeddings as ``clean_b`` (targets still from a's ``perm`` and
    ``lam``): pass those for the released computation, as :func:`m3co` does with
    ``partner="mixed"``.

    Args:
        mixed_a: (N, D) embeddings of the mixed modality a.
        clean_b: (N, D) embeddings of modality b: clean (the paper), or mixed with b's own plan
            (the released code).
        perm: (N,) integer permutation of 0..N-1: the mixing partner of each row.
        lam: (N,) mixing weights in [0, 1].
        temperature: softmax temperature t > 0: a float, or a 0-dim floating tensor (e.g. a
            learnable temperature; its gradient is exact in every backend). It must be at least
            :func:`min_temperature` of the embeddings' dtype (2^-39 ~ 1.8e-12 for float32 and
            half precision, 2^-338 for float64); a tensor's value is checked only while value
            checks are on.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-sample vector).
        convention: ``"paper"`` or ``"reference"``.
        backend: ``"auto"``, ``"dense"``, ``"tiled"`` or ``"triton"``.
        gather_distributed: contrast against the batch of every rank (``perm`` and ``lam``
            stay local: mixing partners live on the same rank).
    """
    with _LocalChecks(gather_distributed):  # a TypeError or ValueError here raises on every rank
        t = _check_common(temperature, reduction, convention)
        spread = _spread(gather_distributed)
        mixed_a, clean_b = _check_pair("mixed_a", mixed_a, "clean_b", clean_b, min_rows=_min_rows(spread))
        n = mixed_a.shape[0]
        perm = check_perm("perm", perm, n, mixed_a.device)
        lam = check_lam("lam", lam, n, mixed_a.device)
        t, _ = _temperatures(t, [mixed_a, clean_b])
    layout = _batch_layout([mixed_a, clean_b], spread, "mixed_a")
    with _no_autocast(mixed_a.device):
        a, b = _prepare([mixed_a, clean_b], layout)
        v = _m3co_vector(a, b, perm, lam.to(a.local.dtype), t, convention == "reference", layout, backend)
        return _reduce(v, reduction, layout)


def m3co(
    mixed: Sequence[Tensor],
    clean: Optional[Sequence[Tensor]],
    perms: Sequence[Tensor],
    lam: LamArg,
    *,
    temperature: Union[float, Tensor] = 0.1,
    reduction: str = "mean",
    convention: str = "paper",
    partner: Optional[str] = None,
    backend: str = "auto",
    gather_distributed: bool = False,
) -> Tensor:
    r"""M3Co loss over M >= 2 modalities (paper Eq. 8 and 12).

    The directed term a -> b is :func:`m3co_pair` of ``mixed[a]`` against modality b's clean
    (``partner="clean"``) or mixed (``partner="mixed"``) embeddings, with ``perms[a]`` and
    modality a's ``lam``.

    ``paper``: ``sum_{a<b} 1/2 (L3(a->b) + L3(b->a))`` against clean partners.
    ``reference``: ``sum_m L3_ref(m -> m+1 mod M)`` against mixed partners, each term the
    average of its two directions: what the released code computes, as it mixes every modality
    before contrasting. For M = 2 the two conventions coincide when their partners do.

    Args:
        mixed: M tensors (N, D): each modality's mixed embeddings.
        clean: M tensors (N, D): each modality's clean embeddings; may be None when the
            partner is ``"mixed"`` (if given, it is still checked).
        perms: M permutations (N,), one per modality.
        lam: (N,) shared by all modalities (the paper), or (M, N) / M tensors (N,), one per
            modality (the released code).
        partner: ``"clean"`` or ``"mixed"``; None takes the convention's (paper: ``"clean"``,
            reference: ``"mixed"``).
        temperature, reduction, convention, backend, gather_distributed: as in :func:`m3co_pair`.

    Raises:
        ValueError: an option out of range (named), ``clean`` None with a clean partner, or
            inputs of inconsistent shapes (named).
        TypeError: inputs of the wrong kind or dtype (named).

    Example: the released computation, each modality mixed with its own draw::

        plan = m3co_loss.MixupSampler.for_convention("reference").sample(len(z[0]), len(z))
        mixed = [plan.mix(x, m) for m, x in enumerate(z)]
        loss = m3co(mixed, None, plan.perms, plan.lam, convention="reference")
    """
    with _LocalChecks(gather_distributed):  # a TypeError or ValueError here raises on every rank
        t = _check_common(temperature, reduction, convention)
        partner = resolve_partner(partner, convention)
        spread = _spread(gather_distributed)
        if clean is None:
            if partner == "clean":
                raise ValueError("clean is None, but partner='clean' contrasts each mixed modality with clean embeddings; pass clean or partner='mixed'")
            mixed = _check_modalities("mixed", mixed, min_rows=_min_rows(spread))
        else:
            clean = _check_modalities("clean", clean, min_rows=_min_rows(spread))
            mixed = _check_modalities("mixed", mixed, n=clean[0].shape[0], d=clean[0].shape[1], min_rows=_min_rows(spread))
            if len(mixed) != len(clean):
                raise ValueError(f"mixed holds {len(mixed)} modalities but clean holds {len(clean)}")
            check_same_device(("clean[0]", "mixed[0]"), (clean[0], mixed[0]))
        num, n, device = len(mixed), mixed[0].shape[0], mixed[0].device
        perms = check_sequence("perms", perms, min_len=0)  # a wrong count is named below
        if len(perms) != num:
            raise ValueError(f"perms holds {len(perms)} permutations but there are {num} modalities")
        perms = [check_perm(f"perms[{m}]", p, n, device) for m, p in enumerate(perms)]
        lams = _per_modality_lam(lam, num, n, device)
        # Only the embeddings that enter a term are normalised and gathered.
        used = list(mixed) + (list(clean) if partner == "clean" and clean is not None else [])
        t, _ = _temperatures(t, used)
    layout = _batch_layout(used, spread, "clean" if partner == "clean" else "mixed")
    reference = convention == "reference"
    with _no_autocast(device):
        rows = _prepare(used, layout)
        partners = rows[num:] if partner == "clean" else rows[:num]
        total: Optional[Tensor] = None
        for a, b, weight in _directed_pairs(num, convention):
            v = _m3co_vector(rows[a], partners[b], perms[a], lams[a].to(rows[a].local.dtype), t, reference, layout, backend)
            total = weight * v if total is None else total + weight * v
        assert total is not None, "two modalities make at least one term"
        return _reduce(total, reduction, layout)


def multisoftclip_pair(
    z_a: Tensor,
    z_b: Tensor,
    *,
    temperature: Union[float, Tensor] = 0.1,
    target_temperature: Union[float, Tensor, None] = None,
    detach_targets: bool = False,
    reduction: str = "mean",
    convention: str = "paper",
    backend: str = "auto",
    gather_distributed: bool = False,
) -> Tensor:
    r"""Soft-target CLIP loss Ls(a; a, b) with targets from modality a (paper Eq. 9).

    ``W = softmax_row(p_a p_a^T / t')`` holds the soft targets, ``S = p_a p_b^T / t``::

        v_i = sum_l W_il ((c_i - S_li) + (r_l - S_li)) = c_i + sum_l W_il r_l - 2 sum_l W_il S_li

    ``convention="reference"``: ``1/2 (c_i - sum_l W_il S_li + r_i - sum_l W_il S_il)``
    (the released code's ``soft_clip_loss(preds=z_b, targs=z_a)``, whose two directions both
    use the rows of W as target distributions).

    Args:
        z_a: (N, D) embeddings of modality a (they also make the soft targets).
        z_b: (N, D) embeddings of modality b.
        temperature: t of ``S``, as in :func:`m3co_pair` (a float or a 0-dim tensor).
        target_temperature: t' of the soft targets ``W``; None (the paper) means ``temperature``.
        detach_targets: treat ``W`` as constants: no gradient flows through the soft targets (to
            ``z_a`` or a temperature). False (the paper's loss) lets the model lower the loss by
            moving its own targets, which can make them collapse; True keeps them fixed within a
            step (docs page ``maths``).
        reduction, convention, backend, gather_distributed: as in :func:`m3co_pair`.

    Raises:
        ValueError: an option out of range, a temperature below :func:`min_temperature`, or
            inputs of inconsistent shapes (named).
        TypeError: inputs of the wrong kind or dtype (named).
    """
    with _LocalChecks(gather_distributed):  # a TypeError or ValueError here raises on every rank
        t, target, detach, spread = _multisclip_options(temperature, target_temperature, detach_targets, reduction, convention, gather_distributed)
        z_a, z_b = _check_pair("z_a", z_a, "z_b", z_b, min_rows=_min_rows(spread))
        t, target_t = _temperatures(t, [z_a, z_b], target)
    layout = _batch_layout([z_a, z_b], spread, "z_a")
    with _no_autocast(z_a.device):
        a, b = _prepare([z_a, z_b], layout)
        v = _multisoftclip_vector(a, b, t, convention == "reference", layout, backend, target_t=target_t, detach_targets=detach)
        return _reduce(v, reduction, layout)


def multisoftclip(
    z: Sequence[Tensor],
    *,
    temperature: Union[float, Tensor] = 0.1,
    target_temperature: Union[float, Tensor, None] = None,
    detach_targets: bool = False,
    reduction: str = "mean",
    convention: str = "paper",
    backend: str = "auto",
    gather_distributed: bool = False,
) -> Tensor:
    r"""MultiSClip loss over M >= 2 modalities (paper Eq. 11 and 13).

    ``paper``: ``sum_{a<b} 1/2 (Ls(a; a,b) + Ls(b; a,b))``.
    ``reference``: ``sum_m Ls_ref(m+1 mod M; m+1, m)``, the released code's
    ``soft_clip_loss(z[m], z[m+1])`` summed cyclically (targets from modality m+1).

    Args:
        z: M tensors (N, D), one per modality.
        temperature: as in :func:`multisoftclip_pair`; so are ``target_temperature``,
            ``detach_targets``, ``reduction``, ``convention``, ``backend`` and ``gather_distributed``.
    """
    with _LocalChecks(gather_distributed):  # a TypeError or ValueError here raises on every rank
        t, target, detach, spread = _multisclip_options(temperature, target_temperature, detach_targets, reduction, convention, gather_distributed)
        z = _check_modalities("z", z, min_rows=_min_rows(spread))
        t, target = _temperatures(t, z, target)
    layout = _batch_layout(z, spread, "z")
    reference = convention == "reference"
    with _no_autocast(z[0].device):
        rows = _prepare(z, layout)
        # The directed term "a against b" takes its soft targets from b in the released code
        # (soft_clip_loss(preds=a, targs=b)); in the paper both orders are summed. Group the
        # directed terms by unordered pair: both directions share S = p_a p_b^T / t, which the
        # fused kernel then computes once.
        weights: Dict[Tuple[int, int], List[float]] = {}
        for a, b, weight in _directed_pairs(len(z), convention):
            targets, other = (b, a) if reference else (a, b)
            key = (min(targets, other), max(targets, other))
            w = weights.setdefault(key, [0.0, 0.0])
            w[0 if targets == key[0] else 1] += weight
        total = backends.multisoftclip_pairs(
            rows, weights, t, reference=reference, gather=layout.gather, distributed=layout.distributed, backend=backend,
            target_t=target, detach_targets=detach,
        )
        return _reduce(total, reduction, layout)


def clip_loss(
    z_a: Tensor,
    z_b: Tensor,
    *,
    temperature: Union[float, Tensor] = 0.1,
    reduction: str = "mean",
    backend: str = "auto",
    gather_distributed: bool = False,
) -> Tensor:
    r"""Symmetric InfoNCE: row cross-entropy plus column cross-entropy, identity targets.

    ``v_i = (r_i - S_ii) + (c_i - S_ii)`` with ``S = p_a p_b^T / t`` (a sum of the two
    directions, not their average, so that it equals :func:`m3co_pair` at ``lam = 1``).
    ``temperature`` is a float or a 0-dim tensor, as in :func:`m3co_pair`.
    """
    with _LocalChecks(gather_distributed):  # a TypeError or ValueError here raises on every rank
        t = check_temperature("temperature", temperature)
        check_choice("reduction", reduction, REDUCTIONS)
        spread = _spread(gather_distributed)
        z_a, z_b = _check_pair("z_a", z_a, "z_b", z_b, min_rows=_min_rows(spread))
        t, _ = _temperatures(t, [z_a, z_b])
    layout = _batch_layout([z_a, z_b], spread, "z_a")
    with _no_autocast(z_a.device):
        a, b = _prepare([z_a, z_b], layout)
        return _reduce(_clip_vector(a, b, t, layout, backend), reduction, layout)


def unis_mmc(
    r: Sequence[Tensor],
    logits: Sequence[Tensor],
    y: Tensor,
    *,
    temperature: Union[float, Tensor] = 0.07,
    gather_distributed: bool = False,
) -> Tensor:
    r"""UniS-MMC loss (Zou et al. 2023, Eq. 1-5), summed over modality pairs a < b.

    For each pair the unimodal predictions ``argmax logits[m]`` decide, per sample, whether the
    pair is positive (both correct), semi-positive (exactly one correct) or negative::

        L(a, b) = -log( sum_{n in P or S} exp(cos_n / t) / sum_n exp(cos_n / t) )

    with ``cos_n = cos(r_a[n], r_b[n])``. In a semi-positive pair only the wrong modality's
    representation receives gradient (the correct one is detached). If no sample is positive
    or semi-positive, every sample counts as positive (as in the released code), which makes
    that pair's loss 0.

    Args:
        r: M tensors (N, D): each modality's representation.
        logits: M tensors (N, C): each unimodal head's logits.
        y: (N,) integer class labels in [0, C).
        temperature: t > 0 (0.07 in the paper): a float or a 0-dim tensor, as in :func:`m3co_pair`.
        gather_distributed: with an initialised process group, the sums over the batch run
            over the rows of every rank: each rank gathers the N per-sample cosines and pair
            types of every pair (not the representations) and returns the loss of the global
            batch, the same value on every rank, so that the average over ranks and DDP's
            averaged gradient are those of one process on the concatenated batch.
    """
    with _LocalChecks(gather_distributed):  # a TypeError or ValueError here raises on every rank
        t = check_temperature("temperature", temperature)
        spread = _spread(gather_distributed)
        r = _check_modalities("r", r, min_rows=_min_rows(spread))
        n = r[0].shape[0]
        logits, num_classes = check_logits("logits", logits, r)
        y = check_labels("y", y, n, r[0].device)
        if value_checks_enabled() and has_values(y) and not bool(((y >= 0) & (y < num_classes)).all()):
            raise ValueError(f"y must hold class indices in [0, {num_classes})")
        t, _ = _temperatures(t, r)
    layout = _batch_layout(r, spread, "r[0]")

    with _no_autocast(r[0].device):
        p = [normalize(x, layout.dtype) for x in r]
        correct = [lg.argmax(dim=1) == y for lg in logits]
        cosines, keeps = [], []
        for a in range(len(p)):
            for b in range(a + 1, len(p)):
                semi = correct[a] ^ correct[b]
                pa = torch.where((semi & correct[a]).unsqueeze(1), p[a].detach(), p[a])
                pb = torch.where((semi & correct[b]).unsqueeze(1), p[b].detach(), p[b])
                cosines.append((pa * pb).sum(1) / t)
                keeps.append(correct[a] | correct[b])
        cos = torch.stack(cosines, dim=1)  # (n, pairs)
        keep = torch.stack(keeps, dim=1)
        if layout.distributed:
            # The loss is a log-ratio of sums over the whole batch: gather the per-sample
            # cosines (with gradients) and pair types of every rank in one collective.
            full = layout.gather(torch.cat([cos, keep.to(cos.dtype)], dim=1))
            cos, keep = full[:, : cos.shape[1]], full[:, cos.shape[1] :] > 0.5
        keep = keep | ~keep.any(dim=0, keepdim=True)  # no P or S sample: every pair is positive
        loss = torch.logsumexp(cos, 0) - torch.logsumexp(cos.masked_fill(~keep, float("-inf")), 0)
        return loss.sum()
