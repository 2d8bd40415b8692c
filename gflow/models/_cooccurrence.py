"""The one-layer softmax-attention Transformer of Yang, Kailkhura, Wang & Liang (NeurIPS 2024).

Shape convention (the paper's): a sample is `X = [x_1, ..., x_L] ∈ R^{d×L}`, one token per
COLUMN, so a batch is `(n, d, L)`. This is the transpose of the usual `(L, d)` row-token layout;
it is kept so that every formula here reads exactly as in the paper.

    F(X) = Σ_{l=1}^{L} Σ_{j=1}^{m1} a_j w_jᵀ W_V X softmax(Xᵀ W_Kᵀ W_Q x_l / √m)

with `W_Q, W_K, W_V ∈ R^{m×d}`, `W ∈ R^{m1×m}` (rows `w_j`) and `a ∈ {±1}^{m1}` fixed. The output
sums over all query positions `l`; there is no residual, normalisation or positional encoding.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Float, PRNGKeyArray, PyTree, Scalar

from .._errors import InputError


def _as_float(value) -> Float[Array, "..."]:
    return jnp.asarray(value, dtype=float)


class CooccurrenceTransformer(eqx.Module):
    """One softmax-attention layer followed by a linear MLP with a fixed ±1 second layer.

    Only `W_Q`, `W_K`, `W_V` and `W` are trained; `a` is fixed. Pass
    `trainable=model.trainable_spec()` to `gflow.GradientFlow` so that `a` does not evolve.

    **Arguments:**

    - `W_Q`, `W_K`, `W_V`: query, key and value matrices, shape `(m, d)`.
    - `W`: the first MLP layer, shape `(m1, m)`; row `j` is the paper's `w_j`.
    - `a`: the fixed output signs, shape `(m1,)`, entries `±1`.

    Shape convention: a sample `X` is `(d, L)` with one token per column (the paper's layout),
    a batch is `(n, d, L)`. Use `CooccurrenceTransformer.init(d, m, m1, key)` for the paper's
    random initialization.
    """

    W_Q: Float[Array, "m d"]
    W_K: Float[Array, "m d"]
    W_V: Float[Array, "m d"]
    W: Float[Array, "m1 m"]
    a: Float[Array, " m1"]

    def __init__(self, W_Q, W_K, W_V, W, a):
        self.W_Q = _as_float(W_Q)
        self.W_K = _as_float(W_K)
        self.W_V = _as_float(W_V)
        self.W = _as_float(W)
        self.a = _as_float(a)

    def __check_init__(self):
        for name in ("W_Q", "W_K", "W_V", "W"):
            if getattr(self, name).ndim != 2:
                raise InputError(
                    f"CooccurrenceTransformer: {name} must be a matrix, "
                    f"got shape {getattr(self, name).shape}"
                )
        m, d = self.W_Q.shape
        for name in ("W_K", "W_V"):
            if getattr(self, name).shape != (m, d):
                raise InputError(
                    f"CooccurrenceTransformer: {name} must have the shape of W_Q {(m, d)}, "
                    f"got {getattr(self, name).shape}"
                )
        if self.W.shape[1] != m:
            raise InputError(
                f"CooccurrenceTransformer: W must have shape (m1, m={m}), got {self.W.shape}"
            )
        if self.a.shape != (self.W.shape[0],):
            raise InputError(
                f"CooccurrenceTransformer: a must have shape (m1={self.W.shape[0]},), "
                f"got {self.a.shape}"
            )

    @classmethod
    def init(
        cls,
        d: int,
        m: int,
        m1: int,
        key: PRNGKeyArray,
        *,
        sigma0: float | None = None,
        sigma1: float | None = None,
    ) -> "CooccurrenceTransformer":
        """The paper's random initialization.

        `W_Q, W_K, W_V ~ N(0, σ0²)` and `W ~ N(0, σ1²)` entrywise; `a_j` uniform on `{±1}`.
        The defaults are LeCun normal, `1/√fan_in` (gain 1), on the fan-in of each matrix:
        `σ0 = 1/√d` (W_Q, W_K, W_V act on `R^d`) and `σ1 = 1/√m` (W acts on `R^m`). He
        (Kaiming) normal has the gain √2 on top: `σ0 = √(2/d)`, `σ1 = √(2/m)`, the
        `cooccurrence` preset's default. At either scale `G(μ)` starts at `O(√(m1/d))`, so
        every sample starts with a random O(1) output and loss, and whether the type-2/3
        losses rise before falling depends on the seed (measured by the preset).

        The theory's picture, in which all outputs start near 0 and the type-2/3 losses first
        rise above `log 2`, needs a small output scale such as `σ1 = 1e-3/√m`. Only `Wᵀa`
        enters `F`, and the flow moves `W` only along `a`, so `σ1` matters solely through the
        initial `Wᵀa ~ N(0, m1 σ1²)`.

        **Arguments:**

        - `d`: vocabulary size (= embedding dimension, embeddings are one-hot).
        - `m`: attention width; `m1`: number of MLP neurons.
        - `key`: a JAX PRNG key.
        - `sigma0`, `sigma1`: the standard deviations; `None` means the LeCun default.

        **Returns:**

        A `CooccurrenceTransformer` in the default float dtype (float64 with gflow).
        """
        for name, value in (("d", d), ("m", m), ("m1", m1)):
            if int(value) != value or value < 1:
                raise InputError(f"CooccurrenceTransformer.init: {name} must be a positive "
                                 f"integer, got {value!r}")
        sigma0 = 1.0 / math.sqrt(d) if sigma0 is None else float(sigma0)
        sigma1 = 1.0 / math.sqrt(m) if sigma1 is None else float(sigma1)
        if not (sigma0 >= 0 and sigma1 >= 0 and math.isfinite(sigma0) and math.isfinite(sigma1)):
            raise InputError(f"CooccurrenceTransformer.init: sigma0, sigma1 must be finite and "
                             f">= 0, got {sigma0}, {sigma1}")
        kq, kk, kv, kw, ka = jax.random.split(key, 5)
        return cls(
            W_Q=sigma0 * jax.random.normal(kq, (m, d), float),
            W_K=sigma0 * jax.random.normal(kk, (m, d), float),
            W_V=sigma0 * jax.random.normal(kv, (m, d), float),
            W=sigma1 * jax.random.normal(kw, (m1, m), float),
            a=jax.random.rademacher(ka, (m1,), float),
        )

    @property
    def d(self) -> int:
        """The vocabulary size `d`."""
        return self.W_Q.shape[1]

    @property
    def m(self) -> int:
        """The attention width `m`."""
        return self.W_Q.shape[0]

    @property
    def m1(self) -> int:
        """The number of MLP neurons `m1`."""
        return self.W.shape[0]

    def trainable_spec(self) -> PyTree[bool]:
        """The filter spec that trains `W_Q, W_K, W_V, W` and freezes `a`.

        **Returns:**

        A `CooccurrenceTransformer`-shaped pytree of bools, for the `trainable` argument of
        `gflow.GradientFlow` (or `eqx.partition`).
        """
        spec = jtu.tree_map(lambda _: True, self)
        return eqx.tree_at(lambda model: model.a, spec, False)

    def readout(self) -> Float[Array, " m"]:
        """The MLP collapsed to one vector: `Σ_j a_j w_j = Wᵀ a` (the MLP is linear)."""
        return self.W.T @ self.a

    def __call__(self, X: Float[Array, "d L"]) -> Scalar:
        """`F(X)` for one sample `X` of shape `(d, L)`, tokens in columns."""
        # attention[k, l] = softmax_k(x_kᵀ W_Kᵀ W_Q x_l / √m): column l is the attention of
        # query position l over key positions k, exactly the paper's softmax argument.
        logits = (self.W_K @ X).T @ (self.W_Q @ X) / math.sqrt(self.m)
        attention = jax.nn.softmax(logits, axis=0)
        # Σ_l Σ_j a_j w_jᵀ W_V X s_l = (Wᵀa)ᵀ W_V X (Σ_l s_l): the MLP is linear, so the sum
        # over queries can be taken before the value map.
        return self.readout() @ (self.W_V @ (X @ attention.sum(axis=1)))

    def batched(self, X: Float[Array, "n d L"]) -> Float[Array, " n"]:
        """`F(X_i)` for a batch of shape `(n, d, L)`."""
        if X.ndim != 3 or X.shape[1] != self.d:
            raise InputError(
                f"CooccurrenceTransformer: X must have shape (n, d={self.d}, L), got {X.shape}"
            )
        return jax.vmap(self)(X)

    def G(self, mu: Float[Array, " d"]) -> Scalar:
        """The paper's `G(μ) = Σ_j a_j w_jᵀ W_V μ`: the output a token `μ` contributes when it
        receives all the attention. Also callable as `CooccurrenceTransformer.G(model, μ)`."""
        return self.readout() @ (self.W_V @ mu)

    def score(self, mu_i: Float[Array, " d"], mu_j: Float[Array, " d"]) -> Scalar:
        """The attention score `μ_iᵀ W_Kᵀ W_Q μ_j` of key `μ_i` for query `μ_j` (before the
        `1/√m`). Also callable as `CooccurrenceTransformer.score(model, μ_i, μ_j)`."""
        return (self.W_K @ mu_i) @ (self.W_Q @ mu_j)


def _logistic(z: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    # log(1 + e^{-z}) without overflow for z very negative or underflow to 0 for z large.
    return jax.nn.softplus(-z)


def per_sample_loss(model: CooccurrenceTransformer, data) -> Float[Array, " n"]:
    """The logistic loss `log(1 + exp(-y_i F(X_i)))` of every sample.

    **Arguments:**

    - `model`: a `CooccurrenceTransformer`.
    - `data`: anything with fields `X` of shape `(n, d, L)` and `y` of shape `(n,)`, e.g. the
        output of `gflow.tasks.cooccurrence`.

    **Returns:**

    An array of shape `(n,)`.
    """
    return _logistic(data.y * model.batched(data.X))


def logistic_loss(model: CooccurrenceTransformer, data) -> Scalar:
    """The paper's training loss `L = (1/n) Σ_i log(1 + exp(-y_i F(X_i)))`.

    **Arguments:**

    - `model`: a `CooccurrenceTransformer`.
    - `data`: anything with fields `X` `(n, d, L)` and `y` `(n,)`.

    **Returns:**

    A scalar.
    """
    return jnp.mean(per_sample_loss(model, data))


def margins(model: CooccurrenceTransformer, data) -> Float[Array, " n"]:
    """The signed outputs `y_i F(X_i)`; all positive means every sample is classified right."""
    return data.y * model.batched(data.X)

