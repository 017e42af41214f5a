"""Argument checks shared by the functional API and the modules.

Every check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong
shape or value) whose message starts with the argument's name, so that a user sees which
input is wrong instead of a broadcast or an error deep inside torch.

Shape, dtype and device checks are free. Value checks (NaN/Inf, permutation validity, lam
range) read tensor data and so synchronise with an accelerator once per call; they can be
switched off with :func:`set_value_checks` once a pipeline is known to be sound, e.g. for
``torch.compile`` or CUDA graphs.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from typing import Any, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

_VALUE_CHECKS = True

REDUCTIONS = ("mean", "sum", "none")
CONVENTIONS = ("paper", "reference")
BACKENDS = ("auto", "dense", "tiled", "triton")
PARTNERS = ("clean", "mixed")


def set_value_checks(enabled: bool) -> bool:
    """Turn the data-dependent input checks on or off; returns the previous setting."""
    global _VALUE_CHECKS
    previous, _VALUE_CHECKS = _VALUE_CHECKS, bool(enabled)
    return previous


def value_checks_enabled() -> bool:
    """Whether data-dependent checks (NaN/Inf, permutations, lam range) run."""
    return _VALUE_CHECKS


@contextlib.contextmanager
def value_checks(enabled: bool) -> Iterator[None]:
    """Context manager form of :func:`set_value_checks`."""
    previous = set_value_checks(enabled)
    try:
        yield
    finally:
        set_value_checks(previous)


def check_int(name: str, value: object, *, minimum: Optional[int] = None) -> int:
    """An int (not a bool) of at least ``minimum``: TypeError for another type, ValueError below it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value}")
    return int(value)


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def resolve_partner(partner: object, convention: str) -> str:
    """The embeddings an M3Co term contrasts a mixed modality with: ``partner`` itself, checked,
    or the convention's default when None (paper: ``"clean"``, reference: ``"mixed"``)."""
    if partner is None:
        return "mixed" if convention == "reference" else "clean"
    return check_choice("partner", partner, PARTNERS)


def check_probability(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number in [0, 1]; got {type(value).__name__}")
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1]; got {value}")
    return value


def check_positive(name: str, value: object) -> float:
    """A finite real number > 0 (a temperature, a Beta concentration), as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a positive real number; got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"{name} must be a finite number > 0; got {value}")
    return value


def check_temperature(name: str, value: object) -> Union[float, Tensor]:
    """A temperature: a finite real number > 0 (returned as a float) or a 0-dim floating tensor.

    A tensor (e.g. a learnable temperature) is checked here for its kind only (0-dim, floating,
    not complex): free checks. Its value is checked by :func:`check_temperature_value` once the
    embeddings' dtype is known, and only while value checks are on (reading it synchronises
    with an accelerator).
    """
    if isinstance(value, Tensor):
        if value.dim() != 0:
            raise ValueError(f"{name} must be a real number or a 0-dim tensor; got a tensor of shape {tuple(value.shape)}")
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor (e.g. float32); got {value.dtype}")
        return value
    return check_positive(name, value)


def min_temperature(dtype: torch.dtype) -> float:
    """The smallest temperature the losses support for embeddings of ``dtype`` (2^-39 for float32, 2^-338 for float64).

    The losses compute in the promotion of ``dtype`` and float32 (float16 and bfloat16 inputs
    get float32's range). A loss is of order 1/t, its gradients of order 1/t^2 (the
    temperature's always, the embeddings' through MultiSClip's soft targets), and the
    temperature's gradient ``-(1/t) <X, dL/dX>`` multiplies them by another 1/t before they
    cancel. The range keeps 1/t^3 a factor 2^10 below the largest finite number of the compute
    dtype, so that every one of these quantities, and its rounding error, is finite.
    """
    compute = torch.promote_types(dtype, torch.float32)
    exponent = math.frexp(torch.finfo(compute).max)[1]  # 128 for float32, 1024 for float64
    return 2.0 ** -((exponent - 10) // 3)


def check_temperature_value(name: str, value: Union[float, Tensor], dtype: torch.dtype) -> None:
    """Refuse a temperature below :func:`min_temperature` for embeddings of ``dtype`` (or a tensor's NaN, Inf, <= 0).

    A float is always checked (on the host, for free); a tensor only while value checks are on.
   
    """
    low = min_temperature(dtype)
    if isinstance(value, Tensor):
        if not _VALUE_CHECKS or not has_values(value):
            return
        if bool((value >= low) & torch.isfinite(value)):  # NaN fails both comparisons
            return
        number = float(value.detach())
        if not math.isfinite(number) or number <= 0:
            raise ValueError(f"{name} must be a finite number > 0; got a tensor holding {number}")
            return
    else:
        number = value
        if number >= low:
            return
    compute = torch.promote_types(dtype, torch.float32)
    raise ValueError(
        f"{name} = {number:.3g} is below the smallest supported temperature for {compute} computation, "
        f"{low:.3g} (2^{round(math.log2(low))}): 1/t^3 would overflow in the gradients"
        + ("; pass float64 embeddings for smaller temperatures" if compute != torch.float64 else "")
    )


def check_embeddings(
    name: str, z: object, *, n: int | None = None, d: int | None = None, min_rows: int = 2, values: bool = True
) -> Tensor:
    """A floating (N, D) tensor with N >= ``min_rows``, optionally of a given N and D.

    ``min_rows`` is 2 for a contrastive loss on one process; a rank of a process group may hold
    fewer rows (the batch is checked as a whole once the row counts are gathered). ``values=False``
    leaves the values (NaN or Inf) to a later check.
    """
    if not isinstance(z, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (N, D); got {type(z).__name__}")
    if z.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor; got layout {z.layout} (call .to_dense())")
    if not z.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype (float16, bfloat16, float32, float64); got {z.dtype}")
    if z.dim() != 2:
        raise ValueError(f"{name} must have shape (N, D); got shape {tuple(z.shape)}")
    if z.shape[0] < min_rows:
        raise ValueError(f"{name} must hold at least {min_rows} samples (N >= {min_rows}) for a contrastive loss; got N = {z.shape[0]}")
    if z.shape[1] < 1:
        raise ValueError(f"{name} must have at least one feature (D >= 1); got shape {tuple(z.shape)}")
    if n is not None and z.shape[0] != n:
        raise ValueError(f"{name} has {z.shape[0]} rows but the batch has N = {n}")
    if d is not None and z.shape[1] != d:
        raise ValueError(f"{name} has dimension {z.shape[1]} but the other embeddings have D = {d}")
    if values and _VALUE_CHECKS and not all_finite(z):
        raise ValueError(f"{name} contains NaN or Inf")
    return z


def has_values(x: Tensor) -> bool:
    """False for a meta tensor (shape-only tracing), which holds no values to check."""
    return x.device.type != "meta"


def all_finite(x: Tensor) -> bool:
    """Whether every entry of ``x`` is finite.

    A NaN or an infinity anywhere makes the sum NaN or infinite, so a finite sum proves the
    tensor finite in one reduction (``isfinite(x).all()`` writes and reads an N x D mask). A
    non-finite sum may also be an overflow of finite entries; only then is every entry tested.
    A meta tensor (shape-only tracing) has no values and passes.
    """
    if not has_values(x):
        return True
    if bool(torch.isfinite(x.sum(dtype=torch.float64 if x.dtype == torch.float64 else torch.float32))):
        return True
    return bool(torch.isfinite(x).all())


def check_same_device(names: Sequence[str], tensors: Sequence[Tensor]) -> None:
    device = tensors[0].device
    for name, tensor in zip(names, tensors):
        if tensor.device != device:
            raise ValueError(f"{name} is on {tensor.device} but {names[0]} is on {device}; move them to one device")


def check_perm(name: str, perm: object, n: int, device: torch.device) -> Tensor:
    """An integer tensor of shape (N,) holding a permutation of 0..N-1."""
    if not isinstance(perm, Tensor):
        raise TypeError(f"{name} must be an integer torch.Tensor of shape ({n},); got {type(perm).__name__}")
    if perm.is_floating_point() or perm.is_complex() or perm.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype; got {perm.dtype}")
    if perm.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) to match the batch; got {tuple(perm.shape)}")
    if perm.device != device:
        raise ValueError(f"{name} is on {perm.device} but the embeddings are on {device}")
    perm = perm.long()
    if _VALUE_CHECKS and has_values(perm):
        in_range = bool(((perm >= 0) & (perm < n)).all())
        if not in_range or not bool((torch.bincount(perm, minlength=n) == 1).all()):
            raise ValueError(f"{name} must be a permutation of 0..{n - 1}")
    return perm


def check_lam(name: str, lam: object, n: int, device: torch.device) -> Tensor:
    """A floating tensor of shape (N,) with values in [0, 1]."""
    if not isinstance(lam, Tensor):
        raise TypeError(f"{name} must be a floating torch.Tensor of shape ({n},); got {type(lam).__name__}")
    if not lam.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype; got {lam.dtype}")
    if lam.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), one mixing weight per sample; got {tuple(lam.shape)}")
    if lam.device != device:
        raise ValueError(f"{name} is on {lam.device} but the embeddings are on {device}")
    if _VALUE_CHECKS and has_values(lam) and not bool(((lam >= 0) & (lam <= 1)).all()):
        raise ValueError(f"{name} must lie in [0, 1] (NaN is not allowed)")
    return lam


def _check_index_tensor(name: str, x: object, shape: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be an integer torch.Tensor of shape {shape}; got {type(x).__name__}")
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype; got {x.dtype}")
    return x


def check_partners(name: str, partners: object, n: int, device: torch.device) -> Tensor:
    """An integer tensor of shape (N, K), K >= 1: column indices (their range is checked by the caller)."""
    partners = _check_index_tensor(name, partners, f"({n}, K)")
    if partners.dim() != 2 or partners.shape[0] != n or partners.shape[1] < 1:
        hint = "; for one partner per row pass partners[:, None]" if partners.shape == (n,) else ""
        raise ValueError(f"{name} must have shape ({n}, K) with K >= 1, one row of column indices per sample; got {tuple(partners.shape)}{hint}")
    if partners.device != device:
        raise ValueError(f"{name} is on {partners.device} but the embeddings are on {device}")
    return partners.long()


def check_target_weights(name: str, weights: object, shape: Tuple[int, ...], device: torch.device) -> Tensor:
    """A floating tensor of ``shape`` (that of the partners); its values are checked by :func:`target_weights_problem`."""
    if not isinstance(weights, Tensor):
        raise TypeError(f"{name} must be a floating torch.Tensor of shape {shape}; got {type(weights).__name__}")
    if not weights.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype; got {weights.dtype}")
    if tuple(weights.shape) != tuple(shape):
        raise ValueError(f"{name} must have the shape of partners, {tuple(shape)}, one weight per partner; got {tuple(weights.shape)}")
    if weights.device != device:
        raise ValueError(f"{name} is on {weights.device} but the embeddings are on {device}")
    return weights


def target_weights_tolerance(dtype: torch.dtype, k: int) -> float:
    """How far a row of K target weights may sum from 1: ``4 K eps``.

    ``eps`` is the machine epsilon of ``dtype``, but at least float32's (1.19e-7): weights made in
    float32 and cast to float64 pass. So 4.8e-7 K for float32 and float64, 3.9e-3 K for float16,
    3.1e-2 K for bfloat16.
    """
    eps = max(torch.finfo(dtype).eps, torch.finfo(torch.float32).eps)
    return 4.0 * k * eps


# Codes of target_weights_problem, shared over a process group as integers.
WEIGHTS_OK, WEIGHTS_NOT_FINITE, WEIGHTS_NEGATIVE, WEIGHTS_NOT_NORMALISED = 0, 1, 2, 3


def target_weights_problem(weights: Tensor) -> tuple[int, str]:
    """``(code, detail)``: the first problem of the rows of ``weights`` (N, K), ``(WEIGHTS_OK, "")`` if none.

    Reads the data: call it only with value checks on.
    """
    if not has_values(weights) or weights.numel() == 0:
        return WEIGHTS_OK, ""
    weights = weights.detach()
    if not all_finite(weights):
        return WEIGHTS_NOT_FINITE, ""
    if bool((weights < 0).any()):
        row = int((weights < 0).any(1).nonzero()[0])
        return WEIGHTS_NEGATIVE, f"; row {row} holds {weights[row].tolist()}"
    deviation = (weights.double().sum(1) - 1).abs()
    worst = int(deviation.argmax())
    if float(deviation[worst]) > target_weights_tolerance(weights.dtype, weights.shape[1]):
        return WEIGHTS_NOT_NORMALISED, f"; row {worst} sums to {float(weights[worst].double().sum()):.9g}"
    return WEIGHTS_OK, ""


def check_labels(name: str, labels: object, n: int, device: torch.device) -> Tensor:
    """An integer tensor of shape (N,) (non-negative: checked by the caller, which may share it over ranks)."""
    labels = _check_index_tensor(name, labels, f"({n},)")
    if labels.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), one class label per sample; got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"{name} is on {labels.device} but the embeddings are on {device}")
    return labels.long()


def check_logits(name: str, logits: object, r: Sequence[Tensor]) -> Tuple[List[Tensor], int]:
    """One floating (N, C) tensor per modality of ``r``, with the same C, on ``r``'s device: ``(logits, C)``."""
    tensors = check_sequence(name, logits)
    if len(tensors) != len(r):
        raise ValueError(f"{name} holds {len(tensors)} tensors but r holds {len(r)} modalities")
    n, num_classes = r[0].shape[0], 0
    for m, lg in enumerate(tensors):
        if not isinstance(lg, Tensor) or not lg.is_floating_point():
            raise TypeError(f"{name}[{m}] must be a floating torch.Tensor of shape (N, C)")
        if lg.dim() != 2 or lg.shape[0] != n:
            raise ValueError(f"{name}[{m}] must have shape ({n}, C); got {tuple(lg.shape)}")
        num_classes = num_classes or lg.shape[1]
        if lg.shape[1] != num_classes:
            raise ValueError(f"{name}[{m}] has {lg.shape[1]} classes but {name}[0] has {num_classes}")
        if value_checks_enabled() and not all_finite(lg):
            raise ValueError(f"{name}[{m}] contains NaN or Inf")
    check_same_device(["r[0]"] + [f"{name}[{m}]" for m in range(len(tensors))], [r[0]] + tensors)
    return tensors, num_classes


def check_sequence(name: str, value: object, *, min_len: int = 2) -> List[Any]:
    if isinstance(value, Tensor) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a list or tuple of tensors, one per modality; got {type(value).__name__}")
    if len(value) < min_len:
        raise ValueError(f"{name} must hold at least {min_len} modalities; got {len(value)}")
    return list(value)


def check_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool; got {type(value).__name__}")
    return value


def resolve_temperature(
    name: str, value: Union[float, Tensor], dtype: torch.dtype, device: torch.device
) -> Union[float, Tensor]:
    """A temperature (from :func:`check_temperature`) as the kernels take it, range checked for ``dtype``.

    A float stays a float. A tensor is moved from the CPU to ``device`` if need be (any other
    device is refused) and cast to ``dtype`` (the embeddings' compute dtype); autograd carries
    its gradient back through both.
    """
    if isinstance(value, Tensor):
        if value.device != device:
            if value.device.type != "cpu":
                raise ValueError(f"{name} is on {value.device} but the embeddings are on {device}; move it to one device")
            value = value.to(device)
        value = value.to(dtype)
    check_temperature_value(name, value, dtype)
    return value
