"""The two reduced flows of Chen & Luo (NeurIPS 2025) for the `AttentionFFN` model.

Both are ordinary gradient flows, so `gflow.GradientFlow` integrates them like any model, and a
theorist can run the full model and a reduced flow from the same state and compare.

**Stage 1 (condensation), in rescaled time.** At leading order in the init scale `ε` the
softmax is uniform, `tanh` is the identity and `exp(−y f) ≈ 1 − y f`, so the loss is
`1 − (‖m‖/(n s)) v W_V W1 W2` with `m = Σ_i y_i Σ_j X_ij` and `v = m/‖m‖`. With `W̄ = W/ε` and
`t̄ = (ε ‖m‖/(n s)) t` (the energy is cubic, so its gradient carries `ε²`), the outer parameters
follow the gradient ascent of `E = v W̄_V W̄1 W̄2`: gradient flow of the loss `−E` over the state
`(W_V, W1, W2)` (`OuterParameters` with `stage1_loss`, the direction `v` as data). Its gradient
is exactly the paper's reduced flow: `dW_V/dt̄ = vᵀ (W1 W2)ᵀ`, so with `W_v = v W_V` and `‖v‖ = 1`,
`dW_v/dt̄ = (W1 W2)ᵀ`, `dW_V/dt̄ = vᵀ dW_v/dt̄`, `dW1/dt̄ = W_vᵀ W2ᵀ`, `dW2/dt̄ = (W_v W1)ᵀ`.
The part of `W_V` orthogonal to `v` does not move.

**Stage 2 (key-query rank collapse).** To first order in the attention logits, and with the
outer parameters frozen, `dW_Q/dt = F W_K`, `dW_K/dt = Fᵀ W_Q`: the gradient flow of the loss
`−tr(W_Qᵀ F W_K)` over `(W_Q, W_K)` (`KeyQueryParameters` with `stage2_loss`, `F` as data), in
real time. `stage2_matrix` computes `F`; see its docstring for the derivation and the check.
"""

import math
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Scalar

from .._errors import InputError
from .._flow import GradientFlow
from ._attention import AttentionFFN, _inputs_and_labels


def _as_float(value) -> Float[Array, "..."]:
    return jnp.asarray(value, dtype=float)


def _safe_scale(norm: Scalar) -> Scalar:
    # Dividing by a zero norm would give 0/0 = nan; a zero vector stays a zero vector instead.
    return jnp.where(norm > 0, norm, 1.0)


def _check_data(X, y) -> None:
    if X.ndim != 3 or y.shape != X.shape[:1]:
        raise InputError(f"X must have shape (n, s, d) and y shape (n,), got {X.shape} and "
                         f"{y.shape}")


# --------------------------------------------------------------------------------------------
# Target direction and time rescaling
# --------------------------------------------------------------------------------------------


def target_direction(
    X: Float[Array, "n s d"], y: Float[Array, " n"]
) -> tuple[Float[Array, " d"], Scalar]:
    """The stage-1 target direction `v = m/‖m‖`, `m = Σ_i y_i Σ_j X_ij`.

    **Arguments:**

    - `X`: samples, shape `(n, s, d)`, tokens as rows.
    - `y`: labels `±1`, shape `(n,)`.

    **Returns:**

    `(v, ‖m‖)`: the unit row vector `v` of shape `(d,)` and the norm `‖m‖`. When `m = 0` (no
    stage-1 signal) `v` is the zero vector, not nan.
    """
    X, y = _as_float(X), _as_float(y)
    _check_data(X, y)
    m = jnp.einsum("i,isd->d", y, X)
    norm = jnp.linalg.norm(m)
    return m / _safe_scale(norm), norm


def _time_scale(eps: float, X, y) -> Scalar:
    X, y = _as_float(X), _as_float(y)
    n, s, _ = X.shape
    _, norm = target_direction(X, y)
    return eps * norm / (n * s)


def rescaled_time(t: ArrayLike, eps: float, X: Float[Array, "n s d"],
                  y: Float[Array, " n"]) -> Float[Array, "*shape"]:
    """The stage-1 rescaled time `t̄ = (ε ‖m‖/(n s)) t`, `m = Σ_i y_i Σ_j X_ij`.

    **Arguments:**

    - `t`: real (gradient-flow) time, any shape.
    - `eps`: the initialization scale `ε` used to rescale the weights, `W̄ = W/ε`.
    - `X`, `y`: the training set, shapes `(n, s, d)` and `(n,)`.

    **Returns:**

    `t̄`, the shape of `t`.
    """
    return _as_float(t) * _time_scale(eps, X, y)


def real_time(t_bar: ArrayLike, eps: float, X: Float[Array, "n s d"],
              y: Float[Array, " n"]) -> Float[Array, "*shape"]:
    """The inverse of `rescaled_time`: `t = (n s/(ε ‖m‖)) t̄` (infinite when `ε ‖m‖ = 0`).

    **Arguments:**

    - `t_bar`: rescaled time, any shape.
    - `eps`, `X`, `y`: as for `rescaled_time`.

    **Returns:**

    Real time `t`, the shape of `t_bar`.
    """
    return _as_float(t_bar) / _time_scale(eps, X, y)


# --------------------------------------------------------------------------------------------
# Stage 1: the energy flow of the outer parameters
# --------------------------------------------------------------------------------------------


class OuterParameters(eqx.Module):
    """The state of the stage-1 reduced flow: the outer parameters `W_V, W1, W2`.

    Integrate it with `gflow.GradientFlow(state, stage1_loss, v)`: gradient flow of `−E` with
    `E = v W_V W1 W2`; time is the rescaled `t̄` when the state holds `W̄ = W/ε`
    (`OuterParameters.from_model(model, scale=eps)`).

    **Arguments:**

    - `W_V`, `W1`: shape `(d, d)`; `W2`: shape `(d,)`.
    """

    W_V: Float[Array, "d d"]
    W1: Float[Array, "d d"]
    W2: Float[Array, " d"]

    def __init__(self, W_V, W1, W2):
        self.W_V = _as_float(W_V)
        self.W1 = _as_float(W1)
        self.W2 = _as_float(W2)

    def __check_init__(self):
        d = self.W2.shape[0] if self.W2.ndim == 1 else -1
        if d < 1 or self.W_V.shape != (d, d) or self.W1.shape != (d, d):
            raise InputError(f"OuterParameters: W_V, W1 must be (d, d) and W2 (d,), got "
                             f"{self.W_V.shape}, {self.W1.shape}, {self.W2.shape}")

    @classmethod
    def from_model(cls, model: AttentionFFN, scale: float = 1.0) -> "OuterParameters":
        """The outer parameters of `model` divided by `scale` (pass `scale=ε` for `W̄ = W/ε`)."""
        return cls(model.W_V / scale, model.W1 / scale, model.W2 / scale)

    def value_projection(self, v: Float[Array, " d"]) -> Float[Array, " d"]:
        """`W_v = v W_V`, the only part of `W_V` the stage-1 energy sees."""
        return v @ self.W_V

    def energy(self, v: Float[Array, " d"]) -> Scalar:
        """`E = v W_V W1 W2`."""
        return self.value_projection(v) @ self.W1 @ self.W2


def stage1_loss(model: OuterParameters, v: Float[Array, " d"]) -> Scalar:
    """The stage-1 reduced loss `−E = −v W_V W1 W2` (its gradient flow is the energy ascent).

    **Arguments:**

    - `model`: an `OuterParameters` state.
    - `v`: the unit target direction, shape `(d,)` (the flow's data; see `target_direction`).

    **Returns:**

    `−E`, a scalar.
    """
    return -model.energy(v)


def stage1_invariants(
    model: OuterParameters, v: Float[Array, " d"]
) -> tuple[Float[Array, " d"], Float[Array, " d"]]:
    """The two per-index conserved quantities of the stage-1 reduced flow.

    `c1[k] = W_v[k]² − Σ_k' W1[k, k']²` (value output `k` against row `k` of `W1`) and
    `c2[k] = W2[k]² − Σ_k' W1[k', k]²` (readout `k` against column `k` of `W1`), with
    `W_v = v W_V`. Both are constant along the exact reduced flow (balancedness of the three
    factors of `E`).

    **Arguments:**

    - `model`: an `OuterParameters` state.
    - `v`: the unit target direction, shape `(d,)`.

    **Returns:**

    `(c1, c2)`, each of shape `(d,)`.
    """
    W_v = model.value_projection(v)
    return W_v**2 - jnp.sum(model.W1**2, axis=1), model.W2**2 - jnp.sum(model.W1**2, axis=0)


def stage1_flow(model: AttentionFFN, data, eps: float) -> GradientFlow:
    """The stage-1 reduced flow started from the outer parameters of `model`, in rescaled time.

    **Arguments:**

    - `model`: an `AttentionFFN` (typically at its small initialization).
    - `data`: a `SequenceData` (or mapping/object with `X`, `y`).
    - `eps`: the scale `ε`; the state is `W̄ = W/ε`.

    **Returns:**

    A `GradientFlow` over `OuterParameters` with loss `stage1_loss` and data `v`; its time is
    `t̄` (convert with `rescaled_time` / `real_time`).
    """
    X, y = _inputs_and_labels(data)
    v, _ = target_direction(X, y)
    return GradientFlow(OuterParameters.from_model(model, scale=eps), stage1_loss, v)


# --------------------------------------------------------------------------------------------
# Stage 2: the linear key-query flow
# --------------------------------------------------------------------------------------------


class KeyQueryParameters(eqx.Module):
    """The state of the stage-2 reduced flow: the attention parameters `W_Q, W_K`.

    Integrate it with `gflow.GradientFlow(state, stage2_loss, F)`, `F = stage2_matrix(...)`.

    **Arguments:**

    - `W_Q`, `W_K`: shape `(d, d)`.
    """

    W_Q: Float[Array, "d d"]
    W_K: Float[Array, "d d"]

    def __init__(self, W_Q, W_K):
        self.W_Q = _as_float(W_Q)
        self.W_K = _as_float(W_K)

    def __check_init__(self):
        if self.W_Q.ndim != 2 or self.W_K.ndim != 2 or self.W_Q.shape[1] != self.W_K.shape[1]:
            raise InputError(f"KeyQueryParameters: W_Q and W_K must be matrices with the same "
                             f"number of columns, got {self.W_Q.shape} and {self.W_K.shape}")

    @classmethod
    def from_model(cls, model: AttentionFFN) -> "KeyQueryParameters":
        """The attention parameters of `model`."""
        return cls(model.W_Q, model.W_K)


def stage2_loss(model: KeyQueryParameters, F: Float[Array, "d d"]) -> Scalar:
    """The stage-2 reduced loss `−tr(W_Qᵀ F W_K)`.

    Its gradient flow is `dW_Q/dt = F W_K`, `dW_K/dt = Fᵀ W_Q`.

    **Arguments:**

    - `model`: a `KeyQueryParameters` state.
    - `F`: the stage-2 matrix, shape `(d, d)` (the flow's data; see `stage2_matrix`).

    **Returns:**

    A scalar.
    """
    return -jnp.sum(model.W_Q * (F @ model.W_K))


def stage2_matrix(
    model: AttentionFFN,
    X: Float[Array, "n s d"],
    y: Float[Array, " n"],
    *,
    loss: Literal["exponential", "logistic"] = "exponential",
) -> Float[Array, "d d"]:
    """The matrix `F` of the stage-2 key-query flow at the outer parameters of `model`.

    `F = (1/(n s √d)) Σ_i y_i L1_i x_{i,s}ᵀ w_iᵀ S_i`, where `x_{i,s}` is the last token,
    `S_i = Σ_j (X_ij − X̄_i)ᵀ (X_ij − X̄_i)` the centred token scatter of sample `i`
    (`X̄_i = (1/s) Σ_j X_ij`), `w_i = W_V W1 (act'(h_i) ⊙ W2)` with `h_i = X̄_i W_V W1`, and
    `L1_i = −ℓ'(y_i f⁰_i)` the loss weight at uniform attention, `f⁰_i = act(h_i) W2`
    (`exp(−y f⁰)` for the exponential loss, `sigmoid(−y f⁰)` for the logistic loss).

    For `activation="identity"` and the exponential loss this is docs/science.md §1's formula:
    `w_iᵀ S_i = W2ᵀ W1ᵀ W_Vᵀ Σ_j X_ijᵀ (X_ij − X̄_i)`, since `Σ_j X_ijᵀ (X_ij − X̄_i) = S_i`.

    Derivation: with the logits `z_i = x_{i,s} W_Q W_Kᵀ X_iᵀ/√d`, the linearized last-row
    attention is `1/s + (z_i − z̄_i)/s`, so to first order `f_i = f⁰_i + (1/s) Σ_j z_ij c_ij`
    with `c_ij = (X_ij − X̄_i) w_i`. Then `∂f_i/∂W_Q = (1/(s√d)) Σ_j c_ij x_{i,s}ᵀ X_ij W_K`, and
    `−∂L/∂W_Q = (1/n) Σ_i y_i L1_i ∂f_i/∂W_Q = F W_K`; likewise `−∂L/∂W_K = Fᵀ W_Q`. Both hold up
    to a relative error of the order of the logits (`∝ ‖W_Q‖‖W_K‖`), for the exact and for the
    linearized softmax, either activation and either loss (checked numerically in
    tests/test_rank_collapse_theory.py: the residual falls like the square of the scale of
    `W_Q, W_K`).

    **Arguments:**

    - `model`: an `AttentionFFN` (only `W_V, W1, W2` and the activation are used).
    - `X`, `y`: the training set, shapes `(n, s, d)` and `(n,)`.
    - `loss`: `"exponential"` or `"logistic"`, the loss the flow descends.

    **Returns:**

    `F`, shape `(d, d)`.
    """
    if loss not in ("exponential", "logistic"):
        raise InputError(f"stage2_matrix: loss must be 'exponential' or 'logistic', got {loss!r}")
    X, y = _as_float(X), _as_float(y)
    _check_data(X, y)
    n, s, d = X.shape
    if d != model.d:
        raise InputError(f"stage2_matrix: X has width {d}, the model {model.d}")
    mean_token = jnp.mean(X, axis=1)  # (n, d)
    hidden = mean_token @ model.W_V @ model.W1  # (n, d)
    if model.activation == "tanh":
        f0 = jnp.tanh(hidden) @ model.W2
        slope = 1.0 - jnp.tanh(hidden) ** 2
    else:
        f0 = hidden @ model.W2
        slope = jnp.ones_like(hidden)
    w = (slope * model.W2) @ (model.W_V @ model.W1).T  # (n, d): row i is w_iᵀ
    margin = y * f0
    weight = jnp.exp(-margin) if loss == "exponential" else jax.nn.sigmoid(-margin)
    centred = X - mean_token[:, None, :]
    # w_iᵀ S_i = Σ_j ((X_ij − X̄_i) w_i) (X_ij − X̄_i): a (n, d) array without forming S_i.
    projections = jnp.einsum("isd,id->is", centred, w)
    wS = jnp.einsum("is,isd->id", projections, centred)
    coefficient = y * weight / (n * s * math.sqrt(d))
    return jnp.einsum("i,ia,ib->ab", coefficient, X[:, -1, :], wS)


def stage2_flow(model: AttentionFFN, data, *,
                loss: Literal["exponential", "logistic"] = "exponential") -> GradientFlow:
    """The stage-2 linear key-query flow from `model`'s `W_Q, W_K`, with `F` frozen at
    `model`'s outer parameters.

    **Arguments:**

    - `model`: an `AttentionFFN` (typically at the onset of stage 2).
    - `data`: a `SequenceData` (or mapping/object with `X`, `y`).
    - `loss`: the loss of the full flow, for the weights `L1_i`.

    **Returns:**

    A `GradientFlow` over `KeyQueryParameters` with loss `stage2_loss` and data `F`, in real
    time.
    """
    X, y = _inputs_and_labels(data)
    F = stage2_matrix(model, X, y, loss=loss)
    return GradientFlow(KeyQueryParameters.from_model(model), stage2_loss, F)
