"""Small, dependency-free statistics for the comparison report."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Summary:
    """Mean and spread of one quantity over seeds.

    ``spread`` is the sample standard deviation (0 for a single seed); ``low``/``high`` the
    smallest and largest value, so a reader sees the whole range with two seeds.
    """

    mean: float
    spread: float
    low: float
    high: float
    count: int

    def format(self, digits: int = 4) -> str:
        if self.count == 0:
            return "n/a"
        if self.count == 1:
            return f"{self.mean:.{digits}g}"
        return f"{self.mean:.{digits}g} ± {self.spread:.2g}"


def summarize(values: Sequence[float]) -> Summary:
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not finite:
        return Summary(math.nan, math.nan, math.nan, math.nan, 0)
    mean = sum(finite) / len(finite)
    spread = (
        math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1)) if len(finite) > 1 else 0.0
    )
    return Summary(mean, spread, min(finite), max(finite), len(finite))


def _ranks(values: Sequence[float]) -> list[float]:
    """Average ranks (1-based), ties share the mean of their ranks."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            ranks[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (Pearson correlation of average ranks); NaN if undefined."""
    if len(x) != len(y):
        raise ValueError(f"spearman needs equal lengths, got {len(x)} and {len(y)}")
    if len(x) < 2:
        return math.nan
    rx, ry = _ranks(list(x)), _ranks(list(y))
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    if vx == 0 or vy == 0:
        return math.nan
    return cov / math.sqrt(vx * vy)


def _incomplete_beta_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz method)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 300):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return result


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """``I_x(a, b)`` for ``a, b > 0`` and ``0 ≤ x ≤ 1``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _incomplete_beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _incomplete_beta_fraction(b, a, 1.0 - x) / b


def student_t_cdf(t: float, df: float) -> float:
    """``P(T ≤ t)`` for Student's t with ``df > 0`` degrees of freedom (real ``df``: Welch)."""
    if df <= 0:
        raise ValueError(f"df={df!r} is invalid; allowed: a positive number")
    tail = 0.5 * regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def student_t_quantile(probability: float, df: float) -> float:
    """The ``probability`` quantile of Student's t (bisection on :func:`student_t_cdf`)."""
    if not 0.0 < probability < 1.0:
        raise ValueError(f"probability={probability!r} is invalid; allowed: a number strictly between 0 and 1")
    low, high = -1.0, 1.0
    while student_t_cdf(low, df) > probability:
        low *= 2.0
    while student_t_cdf(high, df) < probability:
        high *= 2.0
    for _ in range(200):
        middle = (low + high) / 2.0
        if student_t_cdf(middle, df) < probability:
            low = middle
        else:
            high = middle
        if high - low < 1e-12 * max(1.0, abs(middle)):
            break
    return (low + high) / 2.0


@dataclass(frozen=True)
class Estimate:
    """A difference between two arms with its standard error and degrees of freedom: paired (the mean
    of per-seed values, ``df = k − 1``) or unpaired (Welch, Welch–Satterthwaite ``df``)."""

    value: float
    standard_error: float
    df: float
    paired: bool
    seeds: int

    def interval(self, level: float = 0.95) -> tuple[float, float]:
        """Two-sided ``level`` t-interval; ``(nan, nan)`` without a spread."""
        if not (self.df > 0 and math.isfinite(self.standard_error)):
            return math.nan, math.nan
        half = student_t_quantile(0.5 + level / 2.0, self.df) * self.standard_error
        return self.value - half, self.value + half


def paired_estimate(values: Sequence[float]) -> Estimate:
    """Mean of per-seed paired values; standard error ``s/√k`` on ``k − 1`` degrees of freedom."""
    summary = summarize(values)
    error = summary.spread / math.sqrt(summary.count) if summary.count > 1 else math.nan
    return Estimate(summary.mean, error, summary.count - 1, True, summary.count)


def welch_estimate(first: Sequence[float], second: Sequence[float], gradient: tuple[float, float] = (1.0, -1.0),
                   value: float | None = None) -> Estimate:
    """Unpaired (Welch) estimate of ``f(mean first, mean second)`` by the delta method: ``gradient`` is
    ``(∂f/∂a, ∂f/∂b)`` at the means (``(1, −1)``: the plain difference of means, the default)."""
    a, b = summarize(first), summarize(second)
    if a.count < 2 or b.count < 2:
        return Estimate(value if value is not None else a.mean - b.mean, math.nan, 0, False, min(a.count, b.count))
    parts = (gradient[0] ** 2 * a.spread ** 2 / a.count, gradient[1] ** 2 * b.spread ** 2 / b.count)
    variance = sum(parts)
    denominator = parts[0] ** 2 / (a.count - 1) + parts[1] ** 2 / (b.count - 1)
    df = variance ** 2 / denominator if denominator > 0 else float(a.count + b.count - 2)
    estimate = value if value is not None else gradient[0] * a.mean + gradient[1] * b.mean
    return Estimate(estimate, math.sqrt(variance), df, False, min(a.count, b.count))
