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
    if kind == "random":
        return torch.randperm(n, generator=g)
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


@st.composite
def cases(draw, *, modalities=2, min_n=2, max_n=8, max_d=6, dtype=torch.float64, max_modalities=None):
    m = draw(st.integers(modalities, max_modalities)) if max_modalities else modalities
    n = draw(st.integers(min_n, max_n))
    d = draw(st.integers(1, max_d))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    perm_kind = draw(st.sampled_from(["identity", "random", "fixed_points"]))
    lam_kind = draw(st.sampled_from(["zeros", "ones", "uniform", "edges"]))
    shared = draw(st.booleans())
    z = [torch.randn(n, d, generator=g, dtype=dtype) for _ in range(m)]
    perms = [permutation(n, perm_kind, g) for _ in range(m)]
    lam0 = mixing_weights(n, lam_kind, g, dtype)
    lams = [lam0 if shared else mixing_weights(n, lam_kind, g, dtype) for _ in range(m)]
    mixed = [lams[k][:, None] * z[k] + (1 - lams[k][:, None]) * z[k][perms[k]] for k in range(m)]
    # mixing embeddings is one choice; a separately encoded mixed batch is another
    if draw(st.booleans()):
        mixed = [x + 0.3 * torch.randn(n, d, generator=g, dtype=dtype) for x in mixed]
    return Case(z, mixed, perms, lams)


temperatures = st.sampled_from([0.05, 0.1, 0.125, 0.5, 1.0])
