"""Uncertainty for per-field scores: bootstrap confidence intervals and paired run-vs-run tests.

Every field's headline is a (group-)mean of per-clip scores: a plain mean for accuracy, F1,
chrF and judge scores, and the mean of per-class means for balanced accuracy (the class being
the reference answer). Resampling clips and recomputing that statistic gives the intervals;
randomly swapping two runs' answers clip by clip gives the paired permutation p-value.
NaN marks a clip without a score (an unscored judge answer) and is left out, never counted as 0.
The few lines of vectorised numpy below stand in for `scipy.stats.bootstrap`, which cannot
resample the class labels together with the scores for balanced accuracy.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import numpy as np

CHUNK_ELEMENTS = 4_000_000  # resample this many scores at a time to bound memory


def statistic(scores: np.ndarray, groups: np.ndarray | None = None) -> np.ndarray:
    """Mean over the last axis ignoring NaN; with `groups`, the mean of the per-group means."""
    scores = np.asarray(scores, dtype=float)
    valid = ~np.isnan(scores)
    filled = np.where(valid, scores, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        if groups is None:
            return filled.sum(-1) / valid.sum(-1)
        means = [
            (filled * (groups == g)).sum(-1) / (valid & (groups == g)).sum(-1) for g in np.unique(groups)
        ]
        with warnings.catch_warnings():  # a resample may lack a class: that class is left out
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(np.stack(means), axis=0)


@dataclass
class Estimate:
    value: float | None
    ci_low: float | None
    ci_high: float | None
    n: int

    def to_dict(self) -> dict:
        return asdict(self)


def _finite(x: float) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def _chunks(n: int, samples: int):
    """Row counts that split `samples` resamples of `n` clips into bounded blocks."""
    rows = max(1, CHUNK_ELEMENTS // max(n, 1))
    for start in range(0, samples, rows):
        yield min(rows, samples - start)


def _resampled(rng: np.random.Generator, n: int, samples: int):
    """Bootstrap index matrices, block by block."""
    for rows in _chunks(n, samples):
        yield rng.integers(0, n, size=(rows, n))


def bootstrap(scores: np.ndarray, groups: np.ndarray | None = None, samples: int = 1000,
              seed: int = 0, level: float = 0.95) -> Estimate:
    """The statistic of the scores with a percentile bootstrap interval (same seed, same interval)."""
    scores = np.asarray(scores, dtype=float)
    keep = ~np.isnan(scores)
    scores, groups = scores[keep], None if groups is None else np.asarray(groups)[keep]
    n = len(scores)
    if n == 0:
        return Estimate(None, None, None, 0)
    value = float(statistic(scores, groups))
    rng = np.random.default_rng(seed)
    boot = np.concatenate([
        statistic(scores[idx], None if groups is None else groups[idx]) for idx in _resampled(rng, n, samples)
    ])
    tail = (1 - level) / 2 * 100
    low, high = np.nanpercentile(boot, [tail, 100 - tail])
    return Estimate(_finite(value), _finite(low), _finite(high), n)


def paired(a: np.ndarray, b: np.ndarray, groups: np.ndarray | None = None, samples: int = 1000,
           seed: int = 0, level: float = 0.95) -> dict:
    """Run a minus run b on the clips both have scores for.

    Returns the difference of the statistic, its paired bootstrap interval, a two-sided paired
    permutation p-value (answers swapped between the runs per clip at random), and per-clip
    win/tie/loss counts of a against b.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    keep = ~(np.isnan(a) | np.isnan(b))
    a, b = a[keep], b[keep]
    groups = None if groups is None else np.asarray(groups)[keep]
    n = len(a)
    counts = {"wins": int((a > b).sum()), "ties": int((a == b).sum()), "losses": int((a < b).sum()), "n": n}
    if n == 0:
        return {"diff": None, "ci_low": None, "ci_high": None, "p_value": None, **counts}
    observed = float(statistic(a, groups) - statistic(b, groups))
    rng = np.random.default_rng(seed)
    boot, null = [], []
    for idx in _resampled(rng, n, samples):
        g = None if groups is None else groups[idx]
        boot.append(statistic(a[idx], g) - statistic(b[idx], g))
    for rows in _chunks(n, samples):
        swap = rng.random((rows, n)) < 0.5
        null.append(statistic(np.where(swap, b, a), groups) - statistic(np.where(swap, a, b), groups))
    boot, null = np.concatenate(boot), np.concatenate(null)
    tail = (1 - level) / 2 * 100
    low, high = np.nanpercentile(boot, [tail, 100 - tail])
    extreme = np.sum(np.abs(null) >= abs(observed) - 1e-12)
    p_value = (1 + extreme) / (1 + len(null))
    return {"diff": _finite(observed), "ci_low": _finite(low), "ci_high": _finite(high),
            "p_value": float(p_value), **counts}
