"""The numbers of an ablation report: mean, standard deviation and t-interval over seeds, paired differences.

Seeds are the replicates: an arm's values over seeds are a sample, summarised by its mean, its standard deviation
(``ddof=1``) and Student's t-interval for the mean. An arm is compared with the baseline seed by seed (the two
runs of a seed share their data order, initial weights and, where the arms differ only in later stages, their
first stage): the differences are one sample, and their t-interval says whether a difference is detectable.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

NO_DIFFERENCE = "no detectable difference"
TOO_FEW = "too few seeds for an interval"
NO_SPREAD = "no spread over seeds: no interval (add seeds)"


@dataclass(frozen=True)
class Summary:
    """A sample of values over seeds: its size, mean, standard deviation (``ddof=1``) and t-interval for the
    mean; ``std`` and the interval are None below two values."""

    n: int
    mean: float
    std: float | None
    low: float | None
    high: float | None

    @property
    def half_width(self) -> float | None:
        return None if self.low is None or self.high is None else (self.high - self.low) / 2


def summarise(values: Sequence[float], confidence: float = 0.95) -> Summary | None:
    """Mean, standard deviation and the two-sided ``confidence`` t-interval of ``values`` (None when empty)."""
    from scipy import stats

    n = len(values)
    if n == 0:
        return None
    mean = math.fsum(values) / n
    if n < 2:
        return Summary(n, mean, None, None, None)
    std = math.sqrt(math.fsum((value - mean) ** 2 for value in values) / (n - 1))
    half = float(stats.t.ppf((1 + confidence) / 2, df=n - 1)) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half)


def paired_difference(
    arm: Mapping[int, float], baseline: Mapping[int, float], confidence: float = 0.95
) -> Summary | None:
    """The arm minus the baseline over the seeds both have (by seed: a paired comparison)."""
    seeds = sorted(set(arm) & set(baseline))
    return summarise([arm[seed] - baseline[seed] for seed in seeds], confidence)


def verdict(difference: Summary | None, direction: str) -> str:
    """The words for a paired difference: an interval that holds zero is no detectable difference; otherwise
    higher or lower than the baseline, and whether that is better for a metric of this ``direction``. Without an
    interval (one seed) or without spread (every seed the same difference) there is no verdict."""
    if difference is None or difference.low is None or difference.high is None:
        return TOO_FEW
    if math.isclose(difference.low, difference.high, rel_tol=1e-9, abs_tol=1e-12):
        # Every seed gave the same difference (accuracies move in steps of one item, so two seeds often do): the
        # t-interval has no width (up to rounding), which says nothing of the uncertainty, not that there is none.
        return NO_SPREAD
    if difference.low <= 0 <= difference.high:
        return NO_DIFFERENCE
    higher = difference.mean > 0
    better = higher == (direction == "max")
    return f"{'higher' if higher else 'lower'} than the baseline ({'better' if better else 'worse'})"
