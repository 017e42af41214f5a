"""Do two sets of per-seed figures differ? An exact permutation test and a bootstrap interval.

With five seeds a side, the exact permutation test enumerates every split of the ten figures
into two groups of five (252 of them) and reports the share whose difference of means is at
least as large in magnitude as the observed one: no normality assumed, nothing drawn at
random. The bootstrap interval resamples each group with replacement and gives the central
``level`` share of the differences of means (percentile interval, fixed seed). Against a
published mean ± std (no per-run figures), :func:`welch_p_value` takes summary statistics.

From the command line: ``python examples/seed_stats.py A.json B.json`` (two lists of per-seed
figures, or ``{"values": [...]}``).
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Dict, Sequence, Tuple

import numpy as np

__all__ = ["permutation_p_value", "bootstrap_interval", "welch_p_value", "compare", "describe"]


def _check(name: str, values: Sequence[float]) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or len(array) < 2 or not np.isfinite(array).all():
        raise ValueError(f"{name} must be at least two finite numbers; got {values!r}")
    return array


def permutation_p_value(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided exact permutation p-value of the difference of means (every relabelling enumerated)."""
    a, b = _check("a", a), _check("b", b)
    pooled = np.concatenate([a, b])
    observed = abs(a.mean() - b.mean())
    total, count = pooled.sum(), 0
    splits = list(itertools.combinations(range(len(pooled)), len(a)))
    for chosen in splits:
        first = pooled[list(chosen)].sum()
        diff = abs(first / len(a) - (total - first) / len(b))
        count += diff >= observed - 1e-12  # ties count as at least as extreme
    return float(count / len(splits))


def bootstrap_interval(a: Sequence[float], b: Sequence[float], *, level: float = 0.95, draws: int = 20000, seed: int = 0) -> Tuple[float, float]:
    """Percentile bootstrap interval of ``mean(a) - mean(b)``, each group resampled on its own."""
    a, b = _check("a", a), _check("b", b)
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1); got {level}")
    rng = np.random.default_rng(seed)
    diffs = rng.choice(a, (draws, len(a))).mean(axis=1) - rng.choice(b, (draws, len(b))).mean(axis=1)
    low, high = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def welch_p_value(mean_a: float, std_a: float, n_a: int, mean_b: float, std_b: float, n_b: int) -> float:
    """Two-sided Welch t-test p-value from summary statistics (for a published mean ± std over n runs,
    whose per-run figures are not known)."""
    from scipy import stats

    return float(stats.ttest_ind_from_stats(mean_a, std_a, n_a, mean_b, std_b, n_b, equal_var=False).pvalue)


def compare(a: Sequence[float], b: Sequence[float]) -> Dict[str, object]:
    """Means, sample stds, the difference, its permutation p-value and its 95 % bootstrap interval."""
    a, b = _check("a", a), _check("b", b)
    return {
        "mean_a": float(a.mean()),
        "std_a": float(a.std(ddof=1)),
        "mean_b": float(b.mean()),
        "std_b": float(b.std(ddof=1)),
        "difference": float(a.mean() - b.mean()),
        "permutation_p": permutation_p_value(a, b),
        "bootstrap_95": bootstrap_interval(a, b),
    }


def describe(a: Sequence[float], b: Sequence[float], *, scale: float = 100.0) -> str:
    """One sentence of :func:`compare`, figures multiplied by ``scale`` (fractions to percent)."""
    r = compare(a, b)
    low, high = (scale * v for v in r["bootstrap_95"])
    return (
        f"difference of means {scale * r['difference']:+.1f} points (95 % bootstrap interval {low:+.1f} to {high:+.1f}), "
        f"exact permutation p = {r['permutation_p']:.2f}"
    )


def read_values(path: Path) -> list:
    """Per-seed figures from a JSON file: a list, or ``{"values": [...]}``, of at least two finite numbers.

    Raises:
        ValueError: the file is missing, not JSON or holds no such list; the message names it.
    """
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: cannot read it ({type(err).__name__}: {err})") from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    values = data.get("values") if isinstance(data, dict) else data
    ok = isinstance(values, list) and len(values) >= 2
    ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
    if not ok:
        raise ValueError(f"{path}: expected a list of at least two finite numbers, or {{\"values\": [...]}}")
    return values
