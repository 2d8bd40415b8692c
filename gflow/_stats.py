"""Statistics of scaling fits: ordinary least squares on a line and Student's t quantile.

numpy only: scipy is a test and benchmark dependency of gflow, not a runtime one, and these two
functions are all the fits need (the tests check both against `scipy.stats`).
"""

import math

import numpy as np

from ._errors import InputError


def t_quantile(p: float, dof: int) -> float:
    """Quantile of Student's t distribution (bisection on its CDF; numpy only)."""

    def betainc(a, b, x):
        # Regularized incomplete beta by Lentz's continued fraction (Numerical Recipes 6.4).
        if x <= 0.0 or x >= 1.0:
            return float(x >= 1.0)
        if x > (a + 1.0) / (a + b + 2.0):
            return 1.0 - betainc(b, a, 1.0 - x)
        log_front = (
            math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
            + a * math.log(x) + b * math.log1p(-x)
        )
        tiny = 1e-300
        c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
        d = 1.0 / (d if abs(d) > tiny else tiny)
        h = d
        for m in range(1, 500):
            for num in (
                m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
            ):
                d = 1.0 + num * d
                d = 1.0 / (d if abs(d) > tiny else tiny)
                c = 1.0 + num / c
                c = c if abs(c) > tiny else tiny
                h *= d * c
            if abs(d * c - 1.0) < 1e-15:
                break
        return math.exp(log_front) * h / a

    def cdf(t):
        tail = 0.5 * betainc(dof / 2.0, 0.5, dof / (dof + t * t))
        return 1.0 - tail if t > 0 else tail

    lo, hi = -1e3, 1e3
    while cdf(hi) < p:
        hi *= 10
    while cdf(lo) > p:
        lo *= 10
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if cdf(mid) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-13 * max(1.0, abs(mid)):
            break
    return 0.5 * (lo + hi)


def fit_line(u: np.ndarray, v: np.ndarray) -> tuple[float, float, float, tuple[float, float]]:
    """OLS `v = a + b u`: `(b, a, stderr(b), 95% interval of b)`."""
    n = u.size
    u_mean, v_mean = u.mean(), v.mean()
    suu = np.sum((u - u_mean) ** 2)
    if not suu > 0:
        raise InputError("a fit needs at least two distinct values of the swept parameter")
    b = float(np.sum((u - u_mean) * (v - v_mean)) / suu)
    a = float(v_mean - b * u_mean)
    if n < 3:
        return b, a, math.nan, (math.nan, math.nan)
    residual = v - (a + b * u)
    stderr = float(np.sqrt(np.sum(residual**2) / (n - 2) / suu))
    half = t_quantile(0.975, n - 2) * stderr
    return b, a, stderr, (b - half, b + half)
