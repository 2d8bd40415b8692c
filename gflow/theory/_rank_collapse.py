"""Closed forms and predictions of Chen & Luo (NeurIPS 2025) for the `AttentionFFN` model.

- Stage 1: the reduced energy flow (`gflow.models._reduced`) obeys `dE/dt̄ ≥ 3 |E|^{4/3}`.
  Proof: `dE/dt̄ = ‖W1W2‖² + ‖W_v‖²‖W2‖² + ‖W_vW1‖²` ≥ `3 (‖W1W2‖‖W_v‖‖W2‖‖W_vW1‖)^{2/3}`
  (AM–GM), and `|E| ≤ ‖W_v‖‖W1W2‖`, `|E| ≤ ‖W_vW1‖‖W2‖`. No balancedness is needed and it holds
  for either sign of `E`. Hence `∛E` (real cube root) satisfies `d(1/∛E)/dt̄ ≤ −1`, i.e.
  `E(t̄) ≥ (E(0)^{-1/3} − t̄)^{-3}` (for `E(0) > 0` until `t̄ = E(0)^{-1/3}`, for `E(0) < 0` for
  all `t̄`), and for `E(0) > 0` the flow blows up at `T̄* ≤ E(0)^{-1/3}`.
- Stage 2: `dW_Q/dt = F W_K`, `dW_K/dt = Fᵀ W_Q` is linear; with the full SVD `F = U Σ Vᵀ` each
  singular pair evolves by `cosh`/`sinh` of `σ t`, and the leading pair dominates:
  `W_Q/‖W_Q‖ → u1 r/‖r‖`, `W_K/‖W_K‖ → v1 r/‖r‖` with `r = u1ᵀ W_Q(0) + v1ᵀ W_K(0)`.
"""

import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Scalar

from .._errors import InputError
from ..models._attention import AttentionFFN
from ..models._reduced import OuterParameters, target_direction


def _as_float(value) -> Float[Array, "..."]:
    return jnp.asarray(value, dtype=float)


def _check_key_query(F, W_Q0, W_K0) -> None:
    if F.ndim != 2 or W_Q0.ndim != 2 or W_K0.ndim != 2:
        raise InputError(f"F, W_Q0, W_K0 must be matrices, got shapes {F.shape}, {W_Q0.shape}, "
                         f"{W_K0.shape}")
    p, q = F.shape
    if W_Q0.shape[0] != p or W_K0.shape[0] != q or W_Q0.shape[1] != W_K0.shape[1]:
        raise InputError(f"F {F.shape} needs W_Q0 of shape ({p}, k) and W_K0 of shape ({q}, k), "
                         f"got {W_Q0.shape} and {W_K0.shape}")


# --------------------------------------------------------------------------------------------
# Stage 2: the linear key-query flow
# --------------------------------------------------------------------------------------------


def key_query_solution(
    F: Float[Array, "p q"],
    W_Q0: Float[Array, "p k"],
    W_K0: Float[Array, "q k"],
    t: ArrayLike,
) -> tuple[Float[Array, "p k"], Float[Array, "q k"]]:
    """The exact solution of `dW_Q/dt = F W_K`, `dW_K/dt = Fᵀ W_Q` at time `t`.

    With the full SVD `F = U Σ Vᵀ`:
    `W_Q(t) = U cosh(Σt) Uᵀ W_Q(0) + U sinh(Σt) Vᵀ W_K(0)`,
    `W_K(t) = V sinh(Σt)ᵀ Uᵀ W_Q(0) + V cosh(Σt) Vᵀ W_K(0)`.
    For a non-square `F`, `sinh(Σt)` is the rectangular `p×q` diagonal and `cosh(Σt)` is padded
    with ones: the left/right null-space components do not move.

    **Arguments:**

    - `F`: shape `(p, q)` (`(d, d)` for `AttentionFFN`).
    - `W_Q0`, `W_K0`: the state at `t = 0`, shapes `(p, k)`, `(q, k)`.
    - `t`: a scalar time.

    **Returns:**

    `(W_Q(t), W_K(t))`.
    """
    F, W_Q0, W_K0 = _as_float(F), _as_float(W_Q0), _as_float(W_K0)
    _check_key_query(F, W_Q0, W_K0)
    t = _as_float(t)
    if t.ndim != 0:
        raise InputError(f"key_query_solution: t must be a scalar, got shape {t.shape}")
    p, q = F.shape
    U, sigma, Vh = jnp.linalg.svd(F, full_matrices=True)
    r = sigma.shape[0]
    cosh_p = jnp.ones(p).at[:r].set(jnp.cosh(sigma * t))
    cosh_q = jnp.ones(q).at[:r].set(jnp.cosh(sigma * t))
    sinh = jnp.zeros((p, q)).at[jnp.arange(r), jnp.arange(r)].set(jnp.sinh(sigma * t))
    Q_coords = U.T @ W_Q0  # components of W_Q(0) along the left singular vectors
    K_coords = Vh @ W_K0  # components of W_K(0) along the right singular vectors
    W_Q = U @ (cosh_p[:, None] * Q_coords + sinh @ K_coords)
    W_K = Vh.T @ (sinh.T @ Q_coords + cosh_q[:, None] * K_coords)
    return W_Q, W_K


def key_query_limit_directions(
    F: Float[Array, "p q"], W_Q0: Float[Array, "p k"], W_K0: Float[Array, "q k"]
) -> tuple[Float[Array, "p k"], Float[Array, "q k"]]:
    """The predicted late-time directions `W_Q/‖W_Q‖_F → u1 r/‖r‖`, `W_K/‖W_K‖_F → v1 r/‖r‖`.

    `u1, v1` are the leading singular vectors of `F`, `r = u1ᵀ W_Q(0) + v1ᵀ W_K(0)` (a row).
    Both are rank one, so `W_Q W_Kᵀ ∝ u1 v1ᵀ`; the prediction needs `σ1(F)` simple (compare
    `σ1` and `σ2` with `key_query_rates`). The joint sign ambiguity of `(u1, v1)` cancels.

    **Arguments:**

    - `F`: shape `(p, q)`.
    - `W_Q0`, `W_K0`: the state at the onset of stage 2, shapes `(p, k)`, `(q, k)`.

    **Returns:**

    `(D_Q, D_K)`, unit-Frobenius matrices of the shapes of `W_Q0`, `W_K0` (zero if `r = 0`).
    """
    F, W_Q0, W_K0 = _as_float(F), _as_float(W_Q0), _as_float(W_K0)
    _check_key_query(F, W_Q0, W_K0)
    U, _, Vh = jnp.linalg.svd(F, full_matrices=False)
    u1, v1 = U[:, 0], Vh[0]
    r = u1 @ W_Q0 + v1 @ W_K0
    norm = jnp.linalg.norm(r)
    r = r / jnp.where(norm > 0, norm, 1.0)
    return jnp.outer(u1, r), jnp.outer(v1, r)


def key_query_rates(F: Float[Array, "p q"]) -> tuple[Scalar, Scalar]:
    """The growth and collapse rates of the stage-2 flow.

    **Arguments:**

    - `F`: shape `(p, q)`.

    **Returns:**

    `(σ1, σ1 − σ2)`: `‖W_Q‖, ‖W_K‖` grow like `e^{σ1 t}`; the second singular value of the
    normalized `W_Q` decays like `e^{−(σ1−σ2) t}` (`σ2 = 0` when `F` has rank one).
    """
    sigma = jnp.linalg.svd(_as_float(F), compute_uv=False)
    second = sigma[1] if sigma.shape[0] > 1 else jnp.zeros(())
    return sigma[0], sigma[0] - second


# --------------------------------------------------------------------------------------------
# Stage 1: the blow-up of the energy flow and the escape time
# --------------------------------------------------------------------------------------------


def stage1_blowup_bound(E0: ArrayLike) -> Scalar:
    """The bound `T̄* ≤ E(0)^{-1/3}` on the blow-up time of the stage-1 reduced flow (rescaled).

    **Arguments:**

    - `E0`: the energy `v W̄_V W̄1 W̄2` of the rescaled initial state.

    **Returns:**

    `E0^{-1/3}`, or `inf` when `E0 ≤ 0` (the bound only applies to a positive energy; a
    negative one first rises towards 0, see `stage1_energy_lower_bound`).
    """
    E0 = _as_float(E0)
    safe = jnp.where(E0 > 0, E0, 1.0)
    return jnp.where(E0 > 0, safe ** (-1.0 / 3.0), jnp.inf)


def stage1_energy_lower_bound(E0: ArrayLike, t_bar: ArrayLike) -> Float[Array, "*shape"]:
    """The lower bound `E(t̄) ≥ (E(0)^{-1/3} − t̄)^{-3}` of the stage-1 reduced flow.

    Real cube roots throughout, so the bound also holds for `E(0) < 0` (where it is negative and
    tends to 0); for `E(0) > 0` it is `+inf` from the blow-up bound `t̄ ≥ E(0)^{-1/3}` on, and
    for `E(0) = 0` it is 0 (`E` never decreases).

    **Arguments:**

    - `E0`: the initial energy (rescaled variables).
    - `t_bar`: rescaled time(s) `t̄ ≥ 0`, any shape.

    **Returns:**

    The bound, the shape of `t_bar`.
    """
    E0, t_bar = _as_float(E0), _as_float(t_bar)
    safe = jnp.where(E0 != 0, E0, 1.0)
    inverse_root = jnp.sign(safe) * jnp.abs(safe) ** (-1.0 / 3.0)  # 1/∛E0, real cube root
    gap = inverse_root - t_bar
    bound = jnp.where(gap > 0, 1.0 / jnp.where(gap > 0, gap, 1.0) ** 3, jnp.inf)
    negative = -1.0 / (t_bar - inverse_root) ** 3  # E0 < 0: gap < 0 for every t̄ ≥ 0
    bound = jnp.where(E0 > 0, bound, negative)
    return jnp.where(E0 == 0, jnp.zeros_like(t_bar), bound)


def predicted_escape_time(model: AttentionFFN, X: Float[Array, "n s d"],
                          y: Float[Array, " n"]) -> Scalar:
    """The stage-1 bound on the escape time of the full model from its small-init plateau, in
    real time.

    The blow-up bound `T̄* ≤ E(W̄(0))^{-1/3}` mapped back with `t = (n s/(ε‖m‖)) t̄` and
    `E(W̄) = E(W)/ε³`: `t* ≤ n s / (‖m‖ E(W(0))^{1/3})` with `E(W) = v W_V W1 W2` of the raw
    weights. `ε` cancels, and since `E(W(0)) ∝ ε³` the time scales like `1/ε`. The full model
    leaves the plateau a little before the reduced flow blows up (the reduced flow stops being
    valid once the weights are `O(1)`), so this is an upper estimate of the measured escape.

    **Arguments:**

    - `model`: an `AttentionFFN` at its initialization.
    - `X`, `y`: the training set.

    **Returns:**

    The bound in real time; `inf` when `E(W(0)) ≤ 0` or `m = 0`.
    """
    X, y = _as_float(X), _as_float(y)
    n, s, _ = X.shape
    v, norm = target_direction(X, y)
    energy = OuterParameters.from_model(model).energy(v)
    denominator = norm * jnp.where(energy > 0, energy, 1.0) ** (1.0 / 3.0)
    valid = (energy > 0) & (norm > 0)
    return jnp.where(valid, n * s / jnp.where(valid, denominator, 1.0), jnp.inf)
