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
