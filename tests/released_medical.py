"""The released medical model's training loss, transcribed from its description, for tests only.

What the authors' ``MMC_Med`` computes in one training step (``model/model_med.py``,
``train_medical.py``), written out here from scratch with plain tensor algebra, sharing no code
with the package:

* three encoders ``x -> W2 relu(W1 x + b1) + b2`` and, on their outputs, one classifier of the
  same two-layer form per view and one on the three embeddings side by side; the classifiers'
  dropout is defined but never applied, so there is none here;
* the per-sample cross-entropy of each unimodal classifier and of the fusion classifier,
  summed per sample and averaged over the batch;
* plus ``lambda_mixup`` times the sum of three cyclic contrastive terms (view m against view
  m + 1 mod 3). In the M3Co phase each view's embeddings are mixed in place (row i, if
  selected, becomes ``lam_i z_i + (1 - lam_i) z_perm(i)``) before any term is formed, so each
  term contrasts two *mixed* views; its target puts ``lam_i`` on column i and ``1 - lam_i`` on
  column ``perm(i)``, and the term averages the row-wise and the column-wise cross-entropy at
  temperature 0.1. In the MultiSClip phase each term is the soft-target loss at temperature
  0.125 whose targets are the softmax of the second view's self-similarities (not detached).

The released target matrix writes ``1 - lam_i`` over ``lam_i`` when ``perm(i) = i``; that bug
is not transcribed: at a fixed point the two weights add up to 1, as the package computes.
"""

from __future__ import annotations

from typing import Sequence

import torch


def two_layer(x, w1, b1, w2, b2):
    hidden = torch.clamp(x @ w1.T + b1, min=0.0)
    return hidden @ w2.T + b2


def unit_rows(z):
    return z / torch.sqrt((z * z).sum(dim=1, keepdim=True))


def log_softmax_rows(s):
    top = s.max(dim=1, keepdim=True).values.detach()
    return s - top - torch.log(torch.exp(s - top).sum(dim=1, keepdim=True))


def per_sample_cross_entropy(logits, y):
    return -log_softmax_rows(logits)[torch.arange(len(y)), y]


def mixed_rows(z, perm, lam, selected):
    """Row i becomes ``lam_i z_i + (1 - lam_i) z_perm(i)`` where selected, else stays ``z_i``."""
    rows = []
    for i in range(z.shape[0]):
        rows.append(lam[i] * z[i] + (1 - lam[i]) * z[int(perm[i])] if selected[i] else z[i])
    return torch.stack(rows)


def mixup_target(perm, lam, selected):
    n = len(perm)
    target = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        weight = float(lam[i]) if selected[i] else 1.0
        target[i, i] += weight
        target[i, int(perm[i])] += 1.0 - weight
    return target


def mixed_contrast(a, b, target, temperature=0.1):
    """``(row CE + column CE) / 2`` of the scaled cosine similarities of a against b."""
    s = unit_rows(a) @ unit_rows(b).T / temperature
    by_row = -(log_softmax_rows(s) * target).sum(dim=1).mean()
    by_column = -(log_softmax_rows(s.T) * target.T).sum(dim=1).mean()
    return (by_row + by_column) / 2


def soft_target_contrast(a, b, temperature=0.125):
    pa, pb = unit_rows(a), unit_rows(b)
    s = pa @ pb.T / temperature
    targets = torch.softmax(pb @ pb.T / temperature, dim=1)
    first = -(log_softmax_rows(s) * targets).sum(dim=1).mean()
    second = -(log_softmax_rows(s.T) * targets).sum(dim=1).mean()
    return (first + second) / 2


def training_loss(encoders: Sequence, heads: Sequence, fusion, inputs: Sequence, y, *, phase: str, draws=None, lambda_mixup: float = 0.1):
    """The loss of one full-batch step.

    Args:
        encoders, heads: per view, ``(W1, b1, W2, b2)``; fusion likewise.
        phase: ``"m3co"`` (then ``draws`` holds per view ``(perm, lam, selected)``) or ``"multisclip"``.
    """
    z = [two_layer(x, *enc) for x, enc in zip(inputs, encoders)]
    logits = [two_layer(e, *head) for e, head in zip(z, heads)] + [two_layer(torch.cat(z, dim=1), *fusion)]
    task = sum(per_sample_cross_entropy(out, y) for out in logits).mean()
    views = len(z)
    if phase == "m3co":
        mixed = [mixed_rows(e, *draw) for e, draw in zip(z, draws)]
        terms = [mixed_contrast(mixed[m], mixed[(m + 1) % views], mixup_target(*draws[m])) for m in range(views)]
    elif phase == "multisclip":
        terms = [soft_target_contrast(z[m], z[(m + 1) % views]) for m in range(views)]
    else:
        raise ValueError(f"phase must be 'm3co' or 'multisclip'; got {phase!r}")
    return task + lambda_mixup * sum(terms)
