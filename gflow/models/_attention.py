"""The attention + FFN model of Chen & Luo (NeurIPS 2025, arXiv 2510.06954).

Shape convention (the paper's): a sample is `X ∈ R^{s×d}`, `s` tokens as ROWS, model width `d`;
a batch is `(n, s, d)`.

    f(X) = act(softmax(X W_Q W_Kᵀ Xᵀ / √d) X W_V W1) W2,       read out at the last token,

with `W_Q, W_K, W_V, W1 ∈ R^{d×d}`, `W2 ∈ R^d`, softmax over keys (row-wise), no residual, no
LayerNorm, no output matrix. `act` is `tanh` (the paper) or the identity; the softmax is exact
(the paper) or expanded to first order around the uniform distribution,
`softmax(z) ≈ 1/s + (z − mean(z))/s` row-wise, the "linearized" attention of the paper's stage-2
analysis. Only the last row of the attention matrix enters the readout, so `__call__` computes
that row alone.
"""

import math
from collections.abc import Mapping
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray, Scalar

from .._errors import InputError

_ACTIVATIONS = ("tanh", "identity")
_ATTENTIONS = ("exact", "linearized")


def _as_float(value) -> Float[Array, "..."]:
    return jnp.asarray(value, dtype=float)


def _is_concrete(value) -> bool:
    # Values can only be checked outside tracing (a jit/vmap of a constructor sees tracers).
    return not isinstance(value, jax.core.Tracer)


class SequenceData(eqx.Module):
    """A binary-labelled set of token sequences.

    **Fields:**

    - `X`: the samples, shape `(n, s, d)`, tokens as rows, default float dtype.
    - `y`: the labels, shape `(n,)`, entries `±1`, default float dtype.

    The losses of this module also accept any mapping or object with these two fields (e.g. a
    plain `{"X": X, "y": y}` dict); this class only adds the shape (and, outside tracing, value)
    checks.
    """

    X: Float[Array, "n s d"]
    y: Float[Array, " n"]

    def __init__(self, X, y):
        self.X = _as_float(X)
        self.y = _as_float(y)

    def __check_init__(self):
        if self.X.ndim != 3 or min(self.X.shape) < 1:
            raise InputError(f"SequenceData: X must have shape (n, s, d), got {self.X.shape}")
        if self.y.shape != self.X.shape[:1]:
            raise InputError(
                f"SequenceData: y must have shape (n={self.X.shape[0]},), got {self.y.shape}"
            )
        if _is_concrete(self.y) and not np.all(np.abs(np.asarray(self.y)) == 1.0):
            raise InputError("SequenceData: labels y must all be +1 or -1")


def _inputs_and_labels(data) -> tuple[Float[Array, "n s d"], Float[Array, " n"]]:
    if isinstance(data, Mapping):
        X, y = data["X"], data["y"]
    else:
        X, y = data.X, data.y
    return jnp.asarray(X), jnp.asarray(y)


def _linearized_softmax(logits: Float[Array, "*rows s"]) -> Float[Array, "*rows s"]:
    # First-order expansion of softmax around uniform logits: the Jacobian of softmax at z = c·1
    # is (I − 11ᵀ/s)/s, so softmax(z) ≈ 1/s + (z − mean z)/s. Rows still sum to one.
    s = logits.shape[-1]
    centred = logits - jnp.mean(logits, axis=-1, keepdims=True)
    return (1.0 + centred) / s


class AttentionFFN(eqx.Module):
    """One softmax-attention layer followed by a one-hidden-layer FFN, last-token readout.

    `f(X) = act(softmax(X W_Q W_Kᵀ Xᵀ/√d) X W_V W1) W2` for `X` of shape `(s, d)`;
    `model(X)` is the last token's output (a scalar).

    **Arguments:**

    - `W_Q`, `W_K`: query and key matrices, shape `(d, d)` (the "attention" parameters).
    - `W_V`, `W1`: value matrix and FFN hidden layer, shape `(d, d)`.
    - `W2`: FFN output vector, shape `(d,)` (`W_V, W1, W2` are the "outer" parameters).
    - `activation`: `"tanh"` (the paper) or `"identity"`. Static.
    - `attention`: `"exact"` softmax (the paper) or `"linearized"` (first order around uniform).
        Static.

    Use `AttentionFFN.init(d, eps, key)` for the paper's small initialization.
    """

    W_Q: Float[Array, "d d"]
    W_K: Float[Array, "d d"]
    W_V: Float[Array, "d d"]
    W1: Float[Array, "d d"]
    W2: Float[Array, " d"]
    activation: Literal["tanh", "identity"] = eqx.field(static=True)
    attention: Literal["exact", "linearized"] = eqx.field(static=True)

    def __init__(self, W_Q, W_K, W_V, W1, W2, *, activation="tanh", attention="exact"):
        self.W_Q = _as_float(W_Q)
        self.W_K = _as_float(W_K)
        self.W_V = _as_float(W_V)
        self.W1 = _as_float(W1)
        self.W2 = _as_float(W2)
        self.activation = activation
        self.attention = attention

    def __check_init__(self):
        if self.activation not in _ACTIVATIONS:
            raise InputError(
                f"AttentionFFN: activation must be one of {_ACTIVATIONS}, got {self.activation!r}"
            )
        if self.attention not in _ATTENTIONS:
            raise InputError(
                f"AttentionFFN: attention must be one of {_ATTENTIONS}, got {self.attention!r}"
            )
        if self.W_Q.ndim != 2 or self.W_Q.shape[0] != self.W_Q.shape[1] or self.W_Q.shape[0] < 1:
            raise InputError(f"AttentionFFN: W_Q must be a square (d, d) matrix, "
                             f"got shape {self.W_Q.shape}")
        d = self.W_Q.shape[0]
        for name in ("W_K", "W_V", "W1"):
            if getattr(self, name).shape != (d, d):
                raise InputError(f"AttentionFFN: {name} must have shape (d, d) = {(d, d)}, "
                                 f"got {getattr(self, name).shape}")
        if self.W2.shape != (d,):
            raise InputError(f"AttentionFFN: W2 must have shape (d,) = {(d,)}, "
                             f"got {self.W2.shape}")

    @classmethod
    def init(
        cls,
        d: int,
        eps: float,
        key: PRNGKeyArray,
        *,
        activation: Literal["tanh", "identity"] = "tanh",
        attention: Literal["exact", "linearized"] = "exact",
    ) -> "AttentionFFN":
        """The paper's small initialization: every entry i.i.d. `N(0, eps²)`.

        **Arguments:**

        - `d`: model width.
        - `eps`: the standard deviation `ε` (`ε ≪ 1` for the two-stage dynamics; `0` is allowed
            and gives the all-zero saddle).
        - `key`: a JAX PRNG key, split into one key per matrix in the order
            `W_Q, W_K, W_V, W1, W2`.
        - `activation`, `attention`: the model variant, as for the constructor.

        **Returns:**

        An `AttentionFFN` in the default float dtype (float64 with gflow).
        """
        if int(d) != d or d < 1:
            raise InputError(f"AttentionFFN.init: d must be a positive integer, got {d!r}")
        eps = float(eps)
        if not (math.isfinite(eps) and eps >= 0):
            raise InputError(f"AttentionFFN.init: eps must be finite and >= 0, got {eps}")
        d = int(d)
        kq, kk, kv, k1, k2 = jax.random.split(key, 5)
        return cls(
            W_Q=eps * jax.random.normal(kq, (d, d), float),
            W_K=eps * jax.random.normal(kk, (d, d), float),
            W_V=eps * jax.random.normal(kv, (d, d), float),
            W1=eps * jax.random.normal(k1, (d, d), float),
            W2=eps * jax.random.normal(k2, (d,), float),
            activation=activation,
            attention=attention,
        )

    @property
    def d(self) -> int:
        """The model width `d`."""
        return self.W_Q.shape[0]

    def _check_sample(self, X) -> None:
        if X.ndim != 2 or X.shape[1] != self.d or X.shape[0] < 1:
            raise InputError(f"AttentionFFN: a sample X must have shape (s, d={self.d}), "
                             f"got {X.shape}")

    def _act(self, h: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
        return jnp.tanh(h) if self.activation == "tanh" else h

    def attention_weights(self, X: Float[Array, "s d"]) -> Float[Array, "s s"]:
        """The attention matrix `softmax(X W_Q W_Kᵀ Xᵀ/√d)` (exact or linearized), row-wise
        over keys: row `j` is query token `j`'s distribution over the `s` key tokens."""
        self._check_sample(X)
        logits = (X @ self.W_Q) @ (X @ self.W_K).T / math.sqrt(self.d)
        if self.attention == "linearized":
            return _linearized_softmax(logits)
        return jax.nn.softmax(logits, axis=-1)

    def token_outputs(self, X: Float[Array, "s d"]) -> Float[Array, " s"]:
        """`f(X)` at every token, shape `(s,)` (the readout uses only the last entry)."""
        return self._act(self.attention_weights(X) @ X @ self.W_V @ self.W1) @ self.W2

    def __call__(self, X: Float[Array, "s d"]) -> Scalar:
        """`f(X)_s`, the last token's output, for one sample `X` of shape `(s, d)`."""
        self._check_sample(X)
        # Only the last query row of the attention matrix reaches the readout.
        logits = (X[-1] @ self.W_Q) @ (X @ self.W_K).T / math.sqrt(self.d)
        if self.attention == "linearized":
            weights = _linearized_softmax(logits)
        else:
            weights = jax.nn.softmax(logits)
        return self._act(weights @ X @ self.W_V @ self.W1) @ self.W2

    def batched(self, X: Float[Array, "n s d"]) -> Float[Array, " n"]:
        """`f(X_i)_s` for a batch of shape `(n, s, d)`."""
        if X.ndim != 3 or X.shape[2] != self.d:
            raise InputError(f"AttentionFFN: X must have shape (n, s, d={self.d}), got {X.shape}")
        return jax.vmap(self)(X)


def exponential_loss(model: AttentionFFN, data) -> Scalar:
    """`L = (1/n) Σ_i exp(−y_i f(X_i))`, the paper's loss.

    **Arguments:**

    - `model`: an `AttentionFFN`.
    - `data`: a `SequenceData`, or any mapping/object with `X` of shape `(n, s, d)` and `y` of
        shape `(n,)` with entries `±1`.

    **Returns:**

    The loss, a scalar.
    """
    X, y = _inputs_and_labels(data)
    return jnp.mean(jnp.exp(-y * model.batched(X)))


def logistic_loss(model: AttentionFFN, data) -> Scalar:
    """`L = (1/n) Σ_i log(1 + exp(−y_i f(X_i)))`, computed as a softplus (no overflow).

    **Arguments:**

    - `model`: an `AttentionFFN`.
    - `data`: as for `exponential_loss`.

    **Returns:**

    The loss, a scalar.
    """
    X, y = _inputs_and_labels(data)
    return jnp.mean(jax.nn.softplus(-y * model.batched(X)))
