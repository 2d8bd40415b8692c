"""Closed forms of linear-network gradient flows (Saxe et al.; docs/science.md §5)."""

import numpy as np
from jaxtyping import ArrayLike, Float

from .._errors import InputError


def _positive(name: str, value) -> np.ndarray:
    value = np.asarray(value, dtype=np.float64)
    if not np.all(value > 0):
        raise InputError(f"{name} must be positive")
    return value


def saxe_mode(t: Float[ArrayLike, "..."], s: float, u0: float) -> Float[np.ndarray, "..."]:
    """Mode strength of a two-layer linear network from a balanced aligned init.

    Solves `du/dt = 2u(s − u)`, `u(0) = u0`: `u(t) = s e^{2st} / (e^{2st} − 1 + s/u0)`.

    **Arguments:**

    - `t`: times (any shape).
    - `s`: the mode's singular value of the target.
    - `u0`: the initial mode strength, `0 < u0`.

    **Returns:**

    `u(t)`, same shape as `t`.
    """
    s, u0 = _positive("s", s), _positive("u0", u0)
    t = np.asarray(t, dtype=np.float64)
    # Divide through by e^{2st} so that large times do not overflow.
    decay = np.exp(-2.0 * s * t)
    return s / (1.0 - decay + (s / u0) * decay)


def saxe_half_rise_time(s: float, u0: float) -> float:
    """Time at which `saxe_mode` reaches `s/2`: `ln(s/u0 − 1) / (2s)` (for `u0 < s/2`)."""
    s, u0 = float(_positive("s", s)), float(_positive("u0", u0))
    if not u0 < s / 2:
        raise InputError(f"the mode starts at u0={u0} >= s/2={s / 2}: it has no half-rise")
    return float(np.log(s / u0 - 1.0) / (2.0 * s))


def deep_mode_rate(u: Float[ArrayLike, "..."], s: float, depth: int) -> Float[np.ndarray, "..."]:
    """Right-hand side of a depth-`D` balanced aligned mode: `du/dt = D u^{2−2/D} (s − u)`."""
    if int(depth) != depth or depth < 1:
        raise InputError(f"depth must be a positive integer, got {depth}")
    u = np.asarray(u, dtype=np.float64)
    return depth * np.abs(u) ** (2.0 - 2.0 / depth) * (s - u)


def two_layer_learning_times(
    W1: Float[ArrayLike, "hidden in"],
    W2: Float[ArrayLike, "out hidden"],
    target: Float[ArrayLike, "out in"],
) -> tuple[Float[np.ndarray, " r"], Float[np.ndarray, " r"], Float[np.ndarray, " r"]]:
    """Predicted half-rise times of the modes of `½‖S − W2 W1‖²` from a small initialization.

    While the weights are small the flow is linear: with `x = W1 v_α` and `z = W2ᵀ u_α`,
    `dx/dt = s_α z`, `dz/dt = s_α x`, so `x + z` grows like `e^{s_α t}` and `x − z` decays. The
    mode strength `u_α = zᵀx` then follows Saxe's sigmoid from the effective start
    `u0_α = ¼‖x(0) + z(0)‖²` (exactly `u0` on the balanced aligned manifold). The neglected
    terms are of relative order `u0_α/s_α` and the coupling between modes.

    **Arguments:**

    - `W1`, `W2`: the initial weights.
    - `target`: `S`.

    **Returns:**

    `(times, s, u0)`: predicted half-rise times, singular values and effective initial
    strengths, one per non-zero singular value of `S`, largest first.
    """
    # Singular values below the target's own rounding (float32 under --x32) are not modes.
    resolution = max(1e-12, 10 * float(np.finfo(np.result_type(np.asarray(target), np.float32)).eps))
    W1, W2, S = (np.asarray(a, dtype=np.float64) for a in (W1, W2, target))
    U, s, Vt = np.linalg.svd(S, full_matrices=False)
    keep = s > resolution * s.max()
    U, s, V = U[:, keep], s[keep], Vt[keep].T
    u0 = 0.25 * np.sum(np.square(W1 @ V + W2.T @ U), axis=0)
    times = np.log(s / u0 - 1.0) / (2.0 * s)
    return times, s, u0
