"""The CLIP-loss implementations that ``bench_peers.py`` compares, each on this package's scale.

Every implementation is a function ``f(z_a, z_b) -> scalar`` of raw (unnormalised) embeddings,
temperature :data:`TEMPERATURE`, whose value equals :func:`m3co_loss.functional.clip_loss` with
``reduction="mean"``: the mean over the batch of the *sum* of the two directions,
``v_i = (r_i - S_ii) + (c_i - S_ii)``. Each peer's alignment to that scale is written in its
``alignment`` text and applied in its function, so that a mismatch is the peer's (or ours), never
a convention. Two peers compute a different loss (``comparable=False``): they are timed, and their
values are not compared.

A peer whose package import fails for a reason unrelated to its loss (open_clip and lightly
import torchvision at package level) has its loss module loaded from the installed files instead;
``load`` returns a note saying so.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

TEMPERATURE = 0.1
# SigLIP's initial bias (log-odds of a pair being positive among N), as its paper initialises it.
SIGLIP_BIAS = -10.0


@dataclass(frozen=True)
class Impl:
    """One implementation of the benchmark.

    ``family``: ``ours``, ``peer`` or ``reference`` (the bare matrix products, no loss value).
    ``exponent`` and ``bytes_per_entry``: the extra memory of one forward + backward pass is
    about ``bytes_per_entry * N**exponent`` (float32, CPU, rounded up from fresh-process
    measurements: N = 8192 for the N x N ones, N = 256 and 512 for pytorch-metric-learning's
    N x N^2 mask); ``None`` where it is O(N D) by design (never skipped ahead for memory).
    """

    name: str
    label: str
    family: str
    comparable: bool
    exponent: int
    bytes_per_entry: float | None
    cuda_only: bool
    distribution: str | None
    alignment: str


IMPLS = {
    impl.name: impl
    for impl in (
        Impl("auto", "m3co-loss auto", "ours", True, 2, None, False, None,
             "clip_loss(backend='auto'): the dense path below 2048 columns, the tiled one above (on CPU and CUDA)."),
        Impl("dense", "m3co-loss dense", "ours", True, 2, 24, False, None, "clip_loss(backend='dense')."),
        Impl("tiled", "m3co-loss tiled", "ours", True, 2, None, False, None, "clip_loss(backend='tiled')."),
        Impl("open_clip", "open_clip ClipLoss", "peer", True, 2, 24, False, "open-clip-torch",
             "ClipLoss returns the average of its two directions; ours sums them: its value x 2. It takes unit "
             "vectors (its models normalise) and logit_scale = 1/t: F.normalize is applied inside the timed step."),
        Impl("info_nce", "info-nce-pytorch InfoNCE", "peer", True, 2, 24, False, "info-nce-pytorch",
             "InfoNCE(query, positive_key) is one direction (the other keys are the negatives), mean over the "
             "batch; it normalises its inputs: InfoNCE(a, b) + InfoNCE(b, a)."),
        Impl("pml", "pytorch-metric-learning NTXentLoss", "peer", True, 3, 28, False, "pytorch-metric-learning",
             "NTXentLoss(a, labels, ref_emb=b, ref_labels=labels) with labels = arange(N): each row of a has one "
             "positive (its partner in b) and N - 1 negatives, mean over the N positive pairs, i.e. one direction; "
             "cosine similarity (it normalises). The two directions summed. Its negative mask is N x N(N-1)."),
        Impl("inf_cl", "Inf-CL cal_inf_loss", "peer", True, 2, None, True, "inf-cl",
             "cal_inf_loss(q, k) is one direction, mean over the batch, with q already scaled: "
             "cal_inf_loss(a/t, b) + cal_inf_loss(b/t, a) on unit vectors. Triton kernels: CUDA only; D must be a "
             "multiple of its head_dim (256)."),
        Impl("siglip", "open_clip SigLipLoss", "peer", False, 2, 28, False, "open-clip-torch",
             "Not comparable: SigLIP's loss is N^2 independent sigmoid terms (no softmax), a different quantity. "
             f"Timed with logit_scale = 1/t, logit_bias = {SIGLIP_BIAS:g} on unit vectors."),
        Impl("lightly", "lightly NTXentLoss", "peer", False, 2, 72, False, "lightly",
             "Not comparable: SimCLR's NT-Xent, where each of the 2N embeddings also has the 2N - 2 others of its "
             "own view as negatives (2N x 2N logits), mean over 2N anchors; a different loss. Timed as is."),
        Impl("floor", "GEMM floor", "reference", False, 2, None, False, None,
             "The three matrix products of the loss (S = A B^T, dS B, dS^T A) in strips of 1024 rows into "
             "preallocated buffers (bench_kernels' floor): the time no exact implementation can beat on this "
             "machine; no value."),
    )
}


class Unavailable(Exception):
    """The implementation cannot run here; the message says why."""


def version(distribution: str | None) -> str | None:
    if distribution is None:
        return None
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)  # finds without executing the package's __init__
    if spec is None or not spec.submodule_search_locations:
        raise Unavailable(f"{package} is not installed (see benchmarks/install_peers.sh)")
    return Path(list(spec.submodule_search_locations)[0])


@functools.lru_cache(maxsize=None)
def _open_clip_loss():
    """(open_clip's loss module, note): the package, or its ``loss.py`` alone when the package fails to import."""
    try:
        import open_clip.loss as module

        return module, "import open_clip"
    except ImportError as error:
        folder = _package_dir("open_clip")
        spec = importlib.util.spec_from_file_location("_open_clip_loss", folder / "loss.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # loss.py imports torch only
        return module, f"open_clip/loss.py loaded from the installed files (import open_clip failed: {error})"


@functools.lru_cache(maxsize=None)  # its stand-in packages are made once per process
def _lightly_ntxent():
    """(lightly's NTXentLoss, note), its package import bypassed when that fails.

    lightly's package ``__init__`` files and ``lightly.models.utils`` import torchvision. Without
    it, ``ntx_ent_loss.py``, ``models/modules/memory_bank.py`` and ``utils/dist.py`` are loaded from
    the installed files under empty parent packages, with ``lightly.models.utils`` left empty:
    the memory bank calls it only to gather across processes, which a single process without a
    memory bank never does (a call would fail loudly, not silently change the loss).
    """
    try:
        from lightly.loss import NTXentLoss

        return NTXentLoss, "import lightly"
    except ImportError as error:
        root = _package_dir("lightly")
        for name in [m for m in sys.modules if m == "lightly" or m.startswith("lightly.")]:
            del sys.modules[name]
        for package in ("lightly", "lightly.loss", "lightly.models", "lightly.models.modules", "lightly.utils"):
            stub = types.ModuleType(package)
            stub.__path__ = [str(root.joinpath(*package.split(".")[1:]))]
            sys.modules[package] = stub
        sys.modules["lightly.models.utils"] = sys.modules["lightly.models"].utils = types.ModuleType("lightly.models.utils")
        module = importlib.import_module("lightly.loss.ntx_ent_loss")
        return module.NTXentLoss, (
            "lightly/loss/ntx_ent_loss.py and its imports loaded from the installed files, lightly.models.utils left "
            f"empty (import lightly failed: {error})"
        )


def load(name: str, device) -> tuple[Callable, str]:
    """``(f, note)``: the implementation's function of ``(z_a, z_b)`` on our scale, and how it was loaded.

    Raises:
        Unavailable: the package is missing or fails to import, or the implementation needs CUDA.
    """
    import torch
    import torch.nn.functional as F

    t = TEMPERATURE
    impl = IMPLS[name]
    if impl.cuda_only and torch.device(device).type != "cuda":
        raise Unavailable("runs on CUDA only")
    try:
        if impl.family == "ours":
            from m3co_loss.functional import clip_loss

            return (lambda a, b: clip_loss(a, b, temperature=t, backend=name)), "m3co_loss.functional.clip_loss"
        if name == "open_clip":
            module, note = _open_clip_loss()
            loss = module.ClipLoss()
            return (lambda a, b: 2 * loss(F.normalize(a, dim=1), F.normalize(b, dim=1), 1 / t)), note
        if name == "siglip":
            module, note = _open_clip_loss()
            loss = module.SigLipLoss()
            return (lambda a, b: loss(F.normalize(a, dim=1), F.normalize(b, dim=1), 1 / t, SIGLIP_BIAS)), note
        if name == "info_nce":
            from info_nce import InfoNCE

            loss = InfoNCE(temperature=t)
            return (lambda a, b: loss(a, b) + loss(b, a)), "import info_nce"
        if name == "pml":
            from pytorch_metric_learning.losses import NTXentLoss

            loss = NTXentLoss(temperature=t)

            def pml(a, b):
                labels = torch.arange(a.shape[0], device=a.device)
                # a distinct tensor: given the labels object itself as ref_labels, it drops the
                # diagonal pairs (a row with itself), which are the positives here
                ref = labels.clone()
                return loss(a, labels, ref_emb=b, ref_labels=ref) + loss(b, labels, ref_emb=a, ref_labels=ref)

            return pml, "import pytorch_metric_learning.losses"
        if name == "lightly":
            cls, note = _lightly_ntxent()
            loss = cls(temperature=t)
            return (lambda a, b: loss(a, b)), note
        if name == "inf_cl":
            from inf_cl import cal_inf_loss

            def inf_cl(a, b):
                if a.shape[1] % 256:
                    raise Unavailable(f"D = {a.shape[1]} is not a multiple of Inf-CL's head_dim 256")
                pa, pb = F.normalize(a, dim=1), F.normalize(b, dim=1)
                return cal_inf_loss(pa / t, pb) + cal_inf_loss(pb / t, pa)

            return inf_cl, "import inf_cl"
    except Unavailable:
        raise
    except Exception as error:  # a broken install is a result to report, whatever it raises
        raise Unavailable(f"{type(error).__name__}: {error}") from error
    raise KeyError(name)


def floor_step(a, b, *, strip: int = 1024) -> Callable[[], None]:
    """The GEMM floor of the CLIP loss: bench_kernels' floor of ``m3co_pair`` (the same three products)."""
    from bench_kernels import floor_products

    return floor_products("m3co_pair", {"z": [a.detach(), b.detach()]}, strip)
