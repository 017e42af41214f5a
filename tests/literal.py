"""Slow, literal transcriptions of the paper's equations and of the authors' released
computation (docs: maths, Paper versus released code), for tests only.

Everything is written with explicit loops over samples and scalar float64 tensors, so that
it shares no code path with the package. Autograd flows through it, so gradients can be
compared as well.
"""

from __future__ import annotations

import torch


def normalize(z):
    rows = []
    for i in range(z.shape[0]):
        norm = torch.sqrt((z[i] * z[i]).sum())
        rows.append(z[i] / torch.clamp(norm, min=1e-12))
    return torch.stack(rows)


def similarity(p, q, t):
    return [[(p[i] * q[k]).sum() / t for k in range(q.shape[0])] for i in range(p.shape[0])]


def log_sum_exp(values):
    top = max(float(v.detach()) for v in values)
    return top + torch.log(sum(torch.exp(v - top) for v in values))


def lse_row(S, i):
    return log_sum_exp(S[i])


def lse_col(S, k):
    return log_sum_exp([S[i][k] for i in range(len(S))])


def m3co_pair_paper(mixed_a, clean_b, perm, lam, t):
    """L3(a->b) of paper Eq. 6."""
    S = similarity(normalize(mixed_a), normalize(clean_b), t)
    n = len(S)
    total = 0
    for i in range(n):
        j = int(perm[i])
        uni = lam[i] * (lse_row(S, i) - S[i][i]) + (1 - lam[i]) * (lse_row(S, i) - S[i][j])
        bi = lam[i] * (lse_col(S, i) - S[i][i]) + (1 - lam[i]) * (lse_col(S, j) - S[i][j])
        total = total + uni + bi
    return total / n


def m3co_pair_released(mixed_a, clean_b, perm, lam, t):
    """The released code's mixco_nce (bidirectional, averaged), with its fixed-point bug fixed:
    the target of row i puts lam_i on i and 1 - lam_i on perm[i], *added* when they coincide."""
    p, q = normalize(mixed_a), normalize(clean_b)
    n = p.shape[0]
    S = torch.stack([torch.stack(row) for row in similarity(p, q, t)])
    target = torch.zeros(n, n, dtype=S.dtype)
    for i in range(n):
        target[i, i] += lam[i]
        target[i, int(perm[i])] += 1 - lam[i]
    row = -(torch.log_softmax(S, 1) * target).sum(1).mean()
    col = -(torch.log_softmax(S.T, 1) * target.T).sum(1).mean()
    return (row + col) / 2


def clip(z_a, z_b, t):
    S = similarity(normalize(z_a), normalize(z_b), t)
    n = len(S)
    return sum((lse_row(S, i) - S[i][i]) + (lse_col(S, i) - S[i][i]) for i in range(n)) / n


def soft_targets(p, t):
    G = similarity(p, p, t)
    return [[torch.exp(G[i][l] - lse_row(G, i)) for l in range(len(G))] for i in range(len(G))]


def target_rows(z_a, t, target_t=None, detach=False):
    """The unit rows and the temperature that make the soft targets: t' (None: t), both held
    constant with ``detach`` (no gradient through the targets)."""
    tt = t if target_t is None else target_t
    if detach:
        return normalize(z_a.detach()), tt.detach() if isinstance(tt, torch.Tensor) else tt
    return normalize(z_a), tt


def multisoftclip_pair_paper(z_a, z_b, t, target_t=None, detach=False):
    """Ls(a; a, b) of paper Eq. 9; soft targets at ``target_t`` (None: t), constants with ``detach``."""
    p_a, p_b = normalize(z_a), normalize(z_b)
    S = similarity(p_a, p_b, t)
    W = soft_targets(*target_rows(z_a, t, target_t, detach))
    n = len(S)
    total = 0
    for i in range(n):
        for l in range(n):
            total = total + W[i][l] * ((lse_col(S, i) - S[l][i]) + (lse_row(S, l) - S[l][i]))
    return total / n


def multisoftclip_pair_released(z_a, z_b, t, target_t=None, detach=False):
    """The released code's soft_clip_loss(preds=z_b, targs=z_a); its clip_clip at ``target_t``
    (None: t, as released), a constant with ``detach``."""
    targs, preds = normalize(z_a), normalize(z_b)
    fixed, tt = target_rows(z_a, t, target_t, detach)
    clip_clip = fixed @ fixed.T / tt
    brain_clip = preds @ targs.T / t
    loss1 = -(brain_clip.log_softmax(-1) * clip_clip.softmax(-1)).sum(-1).mean()
    loss2 = -(brain_clip.T.log_softmax(-1) * clip_clip.softmax(-1)).sum(-1).mean()
    return (loss1 + loss2) / 2


def m3co(mixed, clean, perms, lams, t, convention, partner=None):
    """Paper: all pairs, both directions; reference: cyclic. ``partner`` picks what mixed[a] is
    contrasted with (default: clean for the paper, mixed for the reference convention)."""
    M = len(mixed)
    if partner is None:
        partner = "clean" if convention == "paper" else "mixed"
    other = clean if partner == "clean" else mixed
    if convention == "paper":
        return sum(
            0.5 * (m3co_pair_paper(mixed[a], other[b], perms[a], lams[a], t) + m3co_pair_paper(mixed[b], other[a], perms[b], lams[b], t))
            for a in range(M)
            for b in range(a + 1, M)
        )
    return sum(m3co_pair_released(mixed[m], other[(m + 1) % M], perms[m], lams[m], t) for m in range(M))


def mix_rows(z, perm, lam):
    """Row i becomes lam_i z_i + (1 - lam_i) z_perm[i]; every row is made from unmixed rows."""
    return torch.stack([lam[i] * z[i] + (1 - lam[i]) * z[int(perm[i])] for i in range(z.shape[0])])


def m3co_released(z, perms, lams, t):
    """The released M3Co from the clean embeddings ``z``: every modality is first mixed with its
    own perm and lam; then term m contrasts mixed m with *mixed* m+1 (mod M), targets from m.
    Each term averages the row and the column cross-entropy of ``S = p_m p_{m+1}^T / t``. The
    target of row i puts lam_i on i and 1 - lam_i on perm[i], added when they coincide (the
    released code overwrites there instead: that bug is left out)."""
    M = len(z)
    mixed = [mix_rows(z[m], perms[m], lams[m]) for m in range(M)]
    total = 0
    for m in range(M):
        S = similarity(normalize(mixed[m]), normalize(mixed[(m + 1) % M]), t)
        n = len(S)
        T = [[0.0] * n for _ in range(n)]
        for i in range(n):
            T[i][i] = T[i][i] + lams[m][i]
            T[i][int(perms[m][i])] = T[i][int(perms[m][i])] + (1 - lams[m][i])
        rows = sum(T[i][k] * (lse_row(S, i) - S[i][k]) for i in range(n) for k in range(n)) / n
        cols = sum(T[i][k] * (lse_col(S, k) - S[i][k]) for k in range(n) for i in range(n)) / n
        total = total + (rows + cols) / 2
    return total


def targets_from_partners(n, partners, weights):
    """The dense target matrix T[i][k] = sum_j weights[i][j] [partners[i][j] = k], entry by entry."""
    T = [[0.0] * n for _ in range(len(partners))]
    for i in range(len(partners)):
        for j in range(len(partners[i])):
            k = int(partners[i][j])
            T[i][k] = T[i][k] + weights[i][j]
    return T


def targets_from_labels(labels):
    """T[i][k] = 1 / #{l : y_l = y_i} when y_k = y_i, else 0."""
    n = len(labels)
    T = [[0.0] * n for _ in range(n)]
    for i in range(n):
        same = [k for k in range(n) if int(labels[k]) == int(labels[i])]
        for k in same:
            T[i][k] = 1.0 / len(same)
    return T


def structured(z_a, z_b, T, t, convention="paper"):
    """Per-sample values v_i = sum_k T_ik [(lse_row(S)_i - S_ik) + (lse_col(S)_k - S_ik)], S = p_a p_b^T / t
    (``reference``: half of it), as a list of scalars."""
    S = similarity(normalize(z_a), normalize(z_b), t)
    n = len(S)
    values = []
    for i in range(n):
        v = 0
        for k in range(n):
            if isinstance(T[i][k], float) and T[i][k] == 0.0:
                continue
            v = v + T[i][k] * ((lse_row(S, i) - S[i][k]) + (lse_col(S, k) - S[i][k]))
        values.append(v / 2 if convention == "reference" else v)
    return values


def multisoftclip(z, t, convention, target_t=None, detach=False):
    M = len(z)
    soft = dict(target_t=target_t, detach=detach)
    if convention == "paper":
        return sum(
            0.5 * (multisoftclip_pair_paper(z[a], z[b], t, **soft) + multisoftclip_pair_paper(z[b], z[a], t, **soft))
            for a in range(M)
            for b in range(a + 1, M)
        )
    # released: soft_clip_loss(z[m], z[m+1]) = targets from z[m+1]
    return sum(multisoftclip_pair_released(z[(m + 1) % M], z[m], t, **soft) for m in range(M))


def unis_mmc(r, logits, y, t):
    """Seed paper Eq. 1-5, sample by sample."""
    M = len(r)
    p = [normalize(x) for x in r]
    total = 0
    for a in range(M):
        for b in range(a + 1, M):
            cos, keep = [], []
            for n in range(len(y)):
                ok_a = int(torch.argmax(logits[a][n])) == int(y[n])
                ok_b = int(torch.argmax(logits[b][n])) == int(y[n])
                u, v = p[a][n], p[b][n]
                if ok_a and not ok_b:
                    u = u.detach()
                if ok_b and not ok_a:
                    v = v.detach()
                cos.append((u * v).sum() / t)
                keep.append(ok_a or ok_b)
            if not any(keep):
                keep = [True] * len(keep)
            numerator = log_sum_exp([c for c, k in zip(cos, keep) if k])
            total = total + (log_sum_exp(cos) - numerator)
    return total
