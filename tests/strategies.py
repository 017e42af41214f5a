"""Hypothesis strategies shared by the tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st


@dataclass
class Case:
    z: list  # clean embeddings, one (N, D) tensor per modality
    mixed: list  # mixed embeddings
    perms: list
    lams: list

    @property
    def n(self) -> int:
        return self.z[0].shape[0]


def permutation(n: int, kind: str, g: torch.Generator) -> torch.Tensor:
    if kind == "identity":
        return torch.arange(n)
    if kind == "random":  # never the identity (which makes M3Co plain CLIP)
        perm = torch.randperm(n, generator=g)
        return perm.roll(1) if n > 1 and torch.equal(perm, torch.arange(n)) else perm
    # some fixed points, the rest shuffled (which may fix a few more)
    fixed = torch.rand(n, generator=g) < 0.5
    perm = torch.arange(n)
    others = perm[~fixed]
    perm[~fixed] = others[torch.randperm(len(others), generator=g)]
    return perm


def mixing_weights(n: int, kind: str, g: torch.Generator, dtype) -> torch.Tensor:
    if kind == "zeros":
        return torch.zeros(n, dtype=dtype)
    if kind == "ones":
        return torch.ones(n, dtype=dtype)
    lam = torch.rand(n, generator=g, dtype=dtype)
    if kind == "edges":  # a mixture of exact 0, exact 1 and interior values
        pick = torch.randint(0, 3, (n,), generator=g)
        lam = torch.where(pick == 0, torch.zeros_like(lam), torch.where(pick == 1, torch.ones_like(lam), lam))
    return lam


def make_case(n: int, d: int, m: int, *, perm_kind: str, lam_kind: str, shared: bool, encoded: bool, seed: int, dtype=torch.float64) -> Case:
    g = torch.Generator().manual_seed(seed)
    z = [torch.randn(n, d, generator=g, dtype=dtype) for _ in range(m)]
    perms = [permutation(n, perm_kind, g) for _ in range(m)]
    lam0 = mixing_weights(n, lam_kind, g, dtype)
    lams = [lam0 if shared else mixing_weights(n, lam_kind, g, dtype) for _ in range(m)]
    mixed = [lams[k][:, None] * z[k] + (1 - lams[k][:, None]) * z[k][perms[k]] for k in range(m)]
    # mixing embeddings is one choice; a separately encoded mixed batch is another
    if encoded:
        mixed = [x + 0.3 * torch.randn(n, d, generator=g, dtype=dtype) for x in mixed]
    return Case(z, mixed, perms, lams)


# Cases where every term of M3Co matters: shuffled partners (some fixed points) and interior
# mixing weights, with exact 0 and 1 among them; used as explicit examples beside the drawn ones.
def mixing_cases(m: int = 2):
    return [
        make_case(8, 5, m, perm_kind="random", lam_kind="uniform", shared=False, encoded=False, seed=1),
        make_case(7, 3, m, perm_kind="fixed_points", lam_kind="edges", shared=True, encoded=True, seed=2),
    ]


@st.composite
def cases(draw, *, modalities=2, min_n=2, max_n=8, max_d=6, dtype=torch.float64, max_modalities=None):
    m = draw(st.integers(modalities, max_modalities)) if max_modalities else modalities
    # the first option is what hypothesis tries first and shrinks towards: the general case
    return make_case(
        draw(st.integers(min_n, max_n)),
        draw(st.integers(1, max_d)),
        m,
        perm_kind=draw(st.sampled_from(["random", "fixed_points", "identity"])),
        lam_kind=draw(st.sampled_from(["uniform", "edges", "zeros", "ones"])),
        shared=draw(st.booleans()),
        encoded=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
        dtype=dtype,
    )


temperatures = st.sampled_from([0.05, 0.1, 0.125, 0.5, 1.0])


@dataclass
class TargetCase:
    """Two embeddings and one form of structured targets (``partners``/``weights``, ``labels`` or neither)."""

    z_a: torch.Tensor
    z_b: torch.Tensor
    form: str  # "partners", "uniform" (partners, weights=None), "labels" or "identity"
    partners: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    labels: torch.Tensor | None = None

    @property
    def n(self) -> int:
        return self.z_a.shape[0]

    def kwargs(self) -> dict:
        """The target arguments of ``contrastive_loss``."""
        if self.form == "labels":
            return dict(labels=self.labels)
        if self.form in ("partners", "uniform"):
            return dict(partners=self.partners, weights=self.weights)
        return {}


def make_target_case(n: int, d: int, form: str, k: int, seed: int, dtype=torch.float64) -> TargetCase:
    """Random targets: K partners per row drawn with repeats (and the row itself often among them),
    weights normalised from random draws with some exact zeros; labels from up to N // 2 + 1 classes
    with one class that has a single member."""
    g = torch.Generator().manual_seed(seed)
    z_a, z_b = (torch.randn(n, d, generator=g, dtype=dtype) for _ in range(2))
    case = TargetCase(z_a, z_b, form)
    if form in ("partners", "uniform"):
        partners = torch.randint(0, n, (n, k), generator=g)
        own = torch.rand(n, generator=g) < 0.5
        partners[own, 0] = torch.arange(n)[own]  # many rows contrast with their own column too
        if k > 1:  # a repeated partner: its weights add up
            partners[0, 1] = partners[0, 0]
        case.partners = partners
        if form == "partners":
            w = torch.rand(n, k, generator=g, dtype=dtype)
            w[torch.rand(n, k, generator=g) < 0.2] = 0.0
            w[:, 0] += 0.1  # every row keeps a positive weight
            case.weights = w / w.sum(1, keepdim=True)
    elif form == "labels":
        classes = int(torch.randint(1, n // 2 + 2, (1,), generator=g))
        labels = torch.randint(0, classes, (n,), generator=g) * 3  # labels need not be 0..C-1
        labels[-1] = 3 * classes + 7  # a class with one member
        case.labels = labels[torch.randperm(n, generator=g)]
    return case


@st.composite
def target_cases(draw, *, forms=("partners", "labels", "uniform", "identity"), min_n=2, max_n=9, max_d=5, dtype=torch.float64):
    return make_target_case(
        draw(st.integers(min_n, max_n)),
        draw(st.integers(1, max_d)),
        draw(st.sampled_from(list(forms))),
        draw(st.integers(1, 4)),
        draw(st.integers(0, 2**31 - 1)),
        dtype=dtype,
    )


def tiles(rows: int, cols: int, square: int):
    """The tiled backend's tile sizes for a ``with`` block."""
    from m3co_loss import backends

    return backends.config(tile_rows=rows, tile_cols=cols, tile_square=square)


# smaller than, equal to, larger than N and not dividing it; and the defaults
tile_sizes = st.tuples(st.integers(1, 12), st.integers(1, 12), st.integers(1, 12)) | st.just((512, 2048, 1024))


@st.composite
def batches(draw, *, modalities=2, min_n=2, max_n=24, max_d=7):
    """Embeddings (float32 or float64), permutations, mixing weights and a non-uniform upstream gradient."""
    n = draw(st.integers(min_n, max_n))
    d = draw(st.integers(1, max_d))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    z = [torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(modalities)]
    if draw(st.booleans()):  # near-duplicate rows: soft targets far from the identity
        z = [x[torch.randint(0, max(1, n // 2), (n,), generator=g)] + 0.05 * torch.randn(n, d, generator=g, dtype=torch.float64) for x in z]
    perms = [permutation(n, draw(st.sampled_from(["identity", "random", "fixed_points"])), g) for _ in range(modalities)]
    lam = mixing_weights(n, draw(st.sampled_from(["zeros", "ones", "uniform", "edges"])), g, torch.float64)
    weights = torch.rand(n, generator=g, dtype=torch.float64)  # a non-uniform upstream gradient
    return dict(z=[x.to(dtype) for x in z], perms=perms, lam=lam.to(dtype), weights=weights.to(dtype), dtype=dtype)
