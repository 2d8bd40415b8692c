"""The Phase-2 loss law of Yang et al. (NeurIPS 2024): `L̂(t) ≈ 1 / (c (t − T1) + 1/L̂(T1))`.

In Phase 2 the attention and the MLP grow together and, by the paper's "automatic balancing of
gradients", every sample's loss falls at a comparable rate; the consequence is that `1/L̂` grows
linearly in time. `fit_inverse_loss` measures the slope `c` and how straight the line is.
"""

import equinox as eqx
import numpy as np
from jaxtyping import Float

from .._errors import InputError


class InverseLossFit(eqx.Module):
    """A least-squares line `1/L̂(t) ≈ slope · (t − t_start) + intercept` over a time window.

    **Fields:**

    - `slope`: the paper's rate `c`; `slope_stderr` its standard error (ordinary least squares,
        residual variance on `num_points − 2` degrees of freedom).
    - `intercept`: the fitted `1/L̂(t_start)` (the law's `1/L̂(T1)` when `t_start = T1`).
    - `r2`: coefficient of determination of the fit.
    - `relative_residual`: `‖residual‖₂ / ‖1/L̂‖₂` over the window.
    - `t_start`: the origin of the line; `t_end`, `num_points`: last save time and number of
        save times in the window.
    """

    slope: float
    slope_stderr: float
    intercept: float
    r2: float
    relative_residual: float
    t_start: float
    t_end: float
    num_points: int


def fit_inverse_loss(
    ts: Float[np.ndarray, " T"],
    losses: Float[np.ndarray, " T"],
    t_start: float,
    t_end: float | None = None,
) -> InverseLossFit:
    """Fit `1/L̂(t) = c (t − t_start) + b` on the save times in `[t_start, t_end]`.

    **Arguments:**

    - `ts`: save times, shape `(T,)`, increasing (e.g. `traj.ts`).
    - `losses`: the total loss at those times, shape `(T,)`, positive.
    - `t_start`: start of the window, typically the end of Phase 1 `T1`.
    - `t_end`: end of the window; default the last save time.

    **Returns:**

    An `InverseLossFit` with the slope `c`, its standard error, the intercept, `R²` and the
    relative residual of the fit.
    """
    ts = np.asarray(ts, dtype=np.float64)
    losses = np.asarray(losses, dtype=np.float64)
    if ts.ndim != 1 or losses.shape != ts.shape:
        raise InputError(
            f"fit_inverse_loss: ts and losses must be 1-d of equal length, got shapes "
            f"{ts.shape}, {losses.shape}"
        )
    t_end = float(ts[-1]) if t_end is None else float(t_end)
    t_start = float(t_start)
    if not (np.isfinite(t_start) and np.isfinite(t_end) and t_end > t_start):
        raise InputError(
            f"fit_inverse_loss: need finite t_start < t_end, got t_start={t_start}, t_end={t_end}"
        )
    window = (ts >= t_start) & (ts <= t_end)
    t, loss = ts[window], losses[window]
    if t.size < 3:
        raise InputError(
            f"fit_inverse_loss: the window [{t_start}, {t_end}] holds {t.size} save times; "
            "a line with an error estimate needs at least 3"
        )
    if not (np.all(np.isfinite(loss)) and np.all(loss > 0)):
        raise InputError("fit_inverse_loss: losses in the window must be finite and positive")

    inverse = 1.0 / loss
    design = np.stack([t - t_start, np.ones_like(t)], axis=1)
    (slope, intercept), *_ = np.linalg.lstsq(design, inverse, rcond=None)
    residual = inverse - design @ np.array([slope, intercept])
    ssr = float(residual @ residual)
    centred = inverse - inverse.mean()
    sst = float(centred @ centred)
    # A constant 1/L̂ (sst = 0) is fitted exactly by the line: R² = 1, not 0/0.
    r2 = 1.0 - ssr / sst if sst > 0 else 1.0
    spread = t - t.mean()
    slope_stderr = float(np.sqrt(ssr / (t.size - 2) / float(spread @ spread)))
    return InverseLossFit(
        slope=float(slope),
        slope_stderr=slope_stderr,
        intercept=float(intercept),
        r2=float(r2),
        relative_residual=float(np.sqrt(ssr) / np.linalg.norm(inverse)),
        t_start=t_start,
        t_end=float(t[-1]),
        num_points=int(t.size),
    )
