"""The report's statistics against cases worked out by hand."""

import math

import pytest
from scipy import stats

from pipeline.stats import compare, estimate


def test_mean_and_95_interval_of_four_runs():
    e = estimate([1.0, 2.0, 3.0, 4.0])
    # sd = sqrt(5/3) = 1.29099; t(0.975, 3) = 3.18245; half-width = 3.18245 * 1.29099 / 2
    assert (e.mean, e.n) == (2.5, 4)
    assert e.half_width == pytest.approx(2.05426, abs=1e-5)
    assert str(e) == "2.50 ± 2.05 (n=4)"


def test_a_single_run_has_no_interval():
    e = estimate([97.0])
    assert e.n == 1 and math.isnan(e.half_width) and str(e) == "97.00 (n=1)"
    verdict = compare({0: 97.0}, {0: 95.0})
    assert not verdict.resolved and verdict.verdict().startswith("not tested")


def test_paired_over_seeds_within_noise():
    # differences 1, 2, 0.5: mean 7/6, sd sqrt(7/12), se sqrt(7/36); t = (7/6) / sqrt(7/36) = sqrt(7) = 2.6458
    # with 2 degrees of freedom the two-sided p is 1 - t / sqrt(t^2 + 2) = 1 - sqrt(7) / 3 = 0.11808
    c = compare({0: 10.0, 1: 12.0, 2: 11.0, 9: 50.0}, {0: 9.0, 1: 10.0, 2: 10.5})  # seed 9 has no partner
    assert c.test == "paired t-test over seeds" and c.n == "n = 3 pairs"
    assert c.difference == pytest.approx(7 / 6)
    assert c.p == pytest.approx(1 - math.sqrt(7) / 3, rel=1e-6)
    assert c.half_width == pytest.approx(4.302653 * math.sqrt(7 / 36), rel=1e-6)  # t(0.975, 2) = 4.302653
    assert not c.resolved and "within noise" in c.verdict()


def test_paired_over_seeds_resolved():
    # differences 2, 2.2, 1.8, 2.0: mean 2, sd sqrt(0.08/3), t = 2 / (sd / 2) = 24.49; p far below 0.05
    c = compare({0: 98.0, 1: 98.2, 2: 97.8, 3: 98.0}, {0: 96.0, 1: 96.0, 2: 96.0, 3: 96.0})
    t = 2 / (math.sqrt(0.08 / 3) / 2)
    assert c.p == pytest.approx(2 * stats.t.sf(t, 3), rel=1e-6) and c.p < 1e-3
    assert c.resolved and c.verdict().startswith("+2.00 ± ") and "resolved (paired t-test over seeds" in c.verdict()


def test_welch_when_the_seeds_differ():
    a, b = {0: 1.0, 1: 2.0, 2: 3.0}, {5: 4.0, 6: 6.0, 7: 8.0, 8: 10.0}
    c = compare(a, b)
    # means 2 and 7; variances 1 and 20/3; se^2 = 1/3 + 20/12 = 2; t = -5 / sqrt(2)
    # Welch-Satterthwaite: df = 2^2 / ((1/3)^2 / 2 + (5/3)^2 / 3) = 4 / (1/18 + 25/27) = 4.0755
    t, df = -5 / math.sqrt(2), 4 / (1 / 18 + 25 / 27)
    assert c.test == "Welch's t-test" and c.difference == pytest.approx(-5.0)
    assert c.p == pytest.approx(2 * stats.t.sf(abs(t), df), rel=1e-6)
    assert c.half_width == pytest.approx(stats.t.ppf(0.975, df) * math.sqrt(2), rel=1e-6)
    assert c.resolved == (c.p < 0.05)
