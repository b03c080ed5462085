"""Uncertainty for per-field scores: bootstrap confidence intervals and paired run-vs-run tests.

Every field's headline is a (group-)mean of per-clip scores: a plain mean for accuracy, F1,
chrF and judge scores, and the mean of per-class means for balanced accuracy (the class being
the reference answer). `scipy.stats.bootstrap(paired=True)` resamples clips, keeping each
clip's scores and class together, for the intervals (percentile method);
`scipy.stats.permutation_test(permutation_type="samples")` swaps two runs' answers clip by
clip for the paired p-value. NaN marks a clip without a score (an unscored judge answer) and
is left out, never counted as 0.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as scipy_stats

CHUNK_ELEMENTS = 4_000_000  # resample this many scores at a time to bound memory


def statistic(scores: np.ndarray, groups: np.ndarray | None = None, axis: int = -1) -> np.ndarray:
    """Mean along `axis` ignoring NaN; with `groups`, the mean of the per-group means."""
    scores = np.moveaxis(np.asarray(scores, dtype=float), axis, -1)
    valid = ~np.isnan(scores)
    filled = np.where(valid, scores, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        if groups is None:
            return filled.sum(-1) / valid.sum(-1)
        groups = np.moveaxis(np.asarray(groups), axis, -1)
        means = [
            (filled * (groups == group)).sum(-1) / (valid & (groups == group)).sum(-1) for group in np.unique(groups)
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


def _finite(x: float | None) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def _resampling(n: int, samples: int, seed: int) -> dict:
    """Arguments shared by scipy's resampling functions: vectorised, seeded, memory-bounded batches."""
    return {"n_resamples": samples, "batch": max(1, CHUNK_ELEMENTS // max(n, 1)), "vectorized": True,
            "rng": np.random.default_rng(seed)}


def bootstrap(scores: np.ndarray, groups: np.ndarray | None = None, samples: int = 1000,
              seed: int = 0, level: float = 0.95) -> Estimate:
    """The statistic of the scores with a percentile bootstrap interval (same seed, same interval).

    One clip gives a value but no interval (there is nothing to resample).
    """
    scores = np.asarray(scores, dtype=float)
    keep = ~np.isnan(scores)
    scores, groups = scores[keep], None if groups is None else np.asarray(groups)[keep]
    n = len(scores)
    if n == 0:
        return Estimate(None, None, None, 0)
    value = float(statistic(scores, groups))
    if n < 2:
        return Estimate(_finite(value), None, None, n)
    data = (scores,) if groups is None else (scores, groups)  # the class labels travel with their scores
    result = scipy_stats.bootstrap(data, statistic, paired=True, method="percentile", confidence_level=level,
                                   **_resampling(n, samples, seed))
    interval = result.confidence_interval
    return Estimate(_finite(value), _finite(interval.low), _finite(interval.high), n)


def paired(a: np.ndarray, b: np.ndarray, groups: np.ndarray | None = None, samples: int = 1000,
           seed: int = 0, level: float = 0.95) -> dict:
    """Run a minus run b on the clips both have scores for.

    Returns the difference of the statistic, its paired bootstrap interval, a two-sided paired
    permutation p-value (answers swapped between the runs per clip at random; exact when
    2**clips <= samples), and per-clip win/tie/loss counts of a against b.
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
    if n < 2:
        return {"diff": _finite(observed), "ci_low": None, "ci_high": None, "p_value": None, **counts}

    if groups is None:
        data = (a, b)

        def difference(run_a, run_b, axis=-1):
            return statistic(run_a, axis=axis) - statistic(run_b, axis=axis)
    else:  # a clip's class is resampled with its two scores
        data = (a, b, groups)

        def difference(run_a, run_b, resampled_groups, axis=-1):
            return statistic(run_a, resampled_groups, axis) - statistic(run_b, resampled_groups, axis)

    interval = scipy_stats.bootstrap(data, difference, paired=True, method="percentile", confidence_level=level,
                                     **_resampling(n, samples, seed)).confidence_interval

    def swapped_difference(run_a, run_b, axis=-1):
        # a swap keeps every clip in its place, so the clips' classes stay as they are
        return statistic(run_a, groups, axis) - statistic(run_b, groups, axis)

    test = scipy_stats.permutation_test((a, b), swapped_difference, permutation_type="samples",
                                        alternative="two-sided", **_resampling(n, samples, seed))
    return {"diff": _finite(observed), "ci_low": _finite(interval.low), "ci_high": _finite(interval.high),
            "p_value": float(test.pvalue), **counts}
