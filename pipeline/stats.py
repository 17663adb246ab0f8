"""The statistics behind every number the report prints: a mean over seeds with its 95% confidence
interval, and whether a difference from a baseline is resolved or within noise.

Seed-to-seed spread is the noise that matters here (initialisation and data order), so the unit is
one training run. Two configurations trained with the same seeds are compared *paired* by seed (a
paired t-test: the same seed gives both the same data order, which removes that share of the
spread); otherwise by Welch's t-test. A difference is *resolved* when the test's p < ``ALPHA``
(equivalently, the 95% interval of the difference excludes 0); each comparison is one test, with no
correction for the several a table makes, and the report says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy import stats

ALPHA = 0.05


@dataclass(frozen=True)
class Estimate:
    """The mean of ``n`` runs and the half-width of its 95% t-interval (nan for a single run)."""

    mean: float
    half_width: float
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.2f}" + ("" if self.n < 2 else f" ± {self.half_width:.2f}") + f" (n={self.n})"


def estimate(values: list[float]) -> Estimate:
    n = len(values)
    if n == 0:
        raise ValueError("no values to estimate from")
    mean = sum(values) / n
    if n == 1:
        return Estimate(mean, math.nan, 1)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return Estimate(mean, stats.t.ppf(1 - ALPHA / 2, n - 1) * sd / math.sqrt(n), n)


@dataclass(frozen=True)
class Comparison:
    """``a`` minus ``b``: the mean difference, its 95% interval half-width, the test and its p-value."""

    difference: float
    half_width: float
    p: float
    test: str
    n: str

    @property
    def resolved(self) -> bool:
        return self.p < ALPHA

    def verdict(self) -> str:
        if math.isnan(self.p):
            return f"not tested ({self.test})"
        word = "resolved" if self.resolved else "within noise"
        return f"{self.difference:+.2f} ± {self.half_width:.2f}, {word} ({self.test}, p = {self.p:.3g}, {self.n})"


def compare(a: dict[int, float], b: dict[int, float]) -> Comparison:
    """Compare two configurations' runs, each given as seed -> value: paired over the seeds both
    have when there are at least two, else Welch's t-test when each has at least two runs."""
    shared = sorted(a.keys() & b.keys())
    if len(shared) >= 2:
        diffs = [a[s] - b[s] for s in shared]
        d = estimate(diffs)
        sd = math.sqrt(sum((x - d.mean) ** 2 for x in diffs) / (d.n - 1))
        if sd == 0:  # identical differences on every seed: no spread to test against
            p = 0.0 if d.mean != 0 else 1.0
        else:
            p = float(stats.ttest_rel([a[s] for s in shared], [b[s] for s in shared]).pvalue)
        return Comparison(d.mean, d.half_width, p, "paired t-test over seeds", f"n = {d.n} pairs")
    xa, xb = list(a.values()), list(b.values())
    mean = sum(xa) / len(xa) - sum(xb) / len(xb)
    if min(len(xa), len(xb)) < 2:
        return Comparison(mean, math.nan, math.nan, "a single run has no spread", f"n = {len(xa)} vs {len(xb)}")
    result = stats.ttest_ind(xa, xb, equal_var=False)
    half = float(result.confidence_interval(1 - ALPHA).high) - mean
    return Comparison(mean, half, float(result.pvalue), "Welch's t-test", f"n = {len(xa)} vs {len(xb)}")
