"""Save-time grids."""

import numpy as np
from jaxtyping import Float

from ._errors import InputError


def _check_interval(t0: float, t1: float, n: int, least: int) -> None:
    if not (np.isfinite(t0) and np.isfinite(t1)):
        raise InputError(f"grid endpoints must be finite, got t0={t0}, t1={t1}")
    if not t1 > t0:
        raise InputError(f"t1 must be greater than t0, got t0={t0}, t1={t1}")
    if int(n) != n or n < least:
        raise InputError(f"a grid needs an integer number of points >= {least}, got {n}")


def linear_grid(t0: float, t1: float, n: int) -> Float[np.ndarray, " n"]:
    """`n` equally spaced save times from `t0` to `t1`, both included.

    **Arguments:**

    - `t0`, `t1`: the interval, `t1 > t0`.
    - `n`: number of points, at least 2.

    **Returns:**

    A float64 numpy array of shape `(n,)`.
    """
    _check_interval(t0, t1, n, 2)
    return np.linspace(t0, t1, int(n), dtype=np.float64)


def log_grid(
    t0: float, t1: float, n: int, *, first: float | None = None
) -> Float[np.ndarray, " n"]:
    """`n` log-spaced save times from `t0` to `t1`, both included.

    Multi-scale dynamics (plateaus whose length grows like `log(1/ε)` or `1/ε`) is read on a log
    time axis; this grid gives every decade the same number of points.

    The rule:

    - `t0 > 0` (and no `first`): geometric from `t0` to `t1`,
        `t_i = t0 (t1/t0)^{i/(n-1)}`, as `numpy.geomspace`.
    - `t0 <= 0` (a log axis cannot hold `t0`), or `first` given: `t0` followed by `n - 1`
        times whose offsets from `t0` are geometric from `first` to `t1 - t0`; `first`
        defaults to `1e-4 * (t1 - t0)`, so the grid then spans four decades of `t - t0`.

    **Arguments:**

    - `t0`, `t1`: the interval, `t1 > t0`.
    - `n`: number of points, at least 3.
    - `first`: offset of the first point after `t0`, in `(0, t1 - t0)`; see the rule above.

    **Returns:**

    A float64 numpy array of shape `(n,)`, strictly increasing, starting at exactly `t0` and
    ending at exactly `t1`.
    """
    _check_interval(t0, t1, n, 3)
    if t0 > 0 and first is None:
        grid = np.geomspace(t0, t1, int(n))
        grid[0], grid[-1] = t0, t1  # exact endpoints despite rounding in geomspace
        return grid
    span = t1 - t0
    first = 1e-4 * span if first is None else float(first)
    if not 0 < first < span:
        raise InputError(f"log_grid: `first` must lie in (0, t1 - t0), got {first}")
    offsets = np.geomspace(first, span, int(n) - 1)
    grid = np.concatenate([[t0], t0 + offsets])
    grid[-1] = t1  # exact endpoint despite rounding in geomspace
    return grid
