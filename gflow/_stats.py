"""Scaling fits' statistics: ordinary least squares on a line with a 95% interval of its slope."""

import math
import warnings

import numpy as np
import scipy.stats

from ._errors import InputError


def fit_line(u: np.ndarray, v: np.ndarray) -> tuple[float, float, float, tuple[float, float]]:
    """OLS `v = a + b u` (`scipy.stats.linregress`): `(b, a, stderr(b), 95% interval of b)`.

    Two points determine the line but leave no residual to estimate its error: the stderr and
    the interval are then NaN, with a `UserWarning` saying so.
    """
    u, v = np.asarray(u, dtype=np.float64), np.asarray(v, dtype=np.float64)
    if not np.ptp(u) > 0:
        raise InputError("a fit needs at least two distinct values of the swept parameter")
    if u.size < 3:
        warnings.warn(
            f"a line through {u.size} points has no residual: its slope's stderr and 95% "
            "interval are NaN (sweep three or more values for an interval)",
            UserWarning, stacklevel=3,
        )
        b = float((v[-1] - v[0]) / (u[-1] - u[0]))
        return b, float(v[0] - b * u[0]), math.nan, (math.nan, math.nan)
    fit = scipy.stats.linregress(u, v)
    half = float(scipy.stats.t.ppf(0.975, u.size - 2)) * float(fit.stderr)
    b = float(fit.slope)
    return b, float(fit.intercept), float(fit.stderr), (b - half, b + half)
