"""Deep linear networks: the exactly solvable reference flows (Saxe et al.; docs/science.md §5)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray, Scalar

from .._errors import InputError


class DeepLinear(eqx.Module):
    """A chain of weight matrices `W_D ⋯ W_2 W_1` acting on column vectors.

    `weights[k]` has shape `(dims[k+1], dims[k])`: `weights[0]` is the first layer applied.
    With whitened inputs the squared loss of the network depends on the data only through the
    input–output correlation `S` (see `deep_linear_loss`).

    **Arguments:**

    - `weights`: the matrices, first layer first.
    """

    weights: tuple[Float[Array, "out in"], ...]

    def __init__(self, weights):
        self.weights = tuple(jnp.asarray(w) for w in weights)

    def __check_init__(self):
        if len(self.weights) < 1:
            raise InputError("DeepLinear needs at least one weight matrix")
        for k, w in enumerate(self.weights):
            if w.ndim != 2:
                raise InputError(f"DeepLinear weight {k} must be a matrix, got shape {w.shape}")
        for k in range(1, len(self.weights)):
            if self.weights[k].shape[1] != self.weights[k - 1].shape[0]:
                raise InputError(
                    f"DeepLinear weights {k - 1} and {k} do not chain: shapes "
                    f"{self.weights[k - 1].shape} then {self.weights[k].shape}"
                )

    @property
    def depth(self) -> int:
        """The number of weight matrices `D`."""
        return len(self.weights)

    @property
    def dims(self) -> tuple[int, ...]:
        """Layer widths `(d_0, d_1, ..., d_D)`, input first."""
        return (self.weights[0].shape[1],) + tuple(w.shape[0] for w in self.weights)

    def product(self) -> Float[Array, "out in"]:
        """The end-to-end matrix `W_D ⋯ W_1`."""
        out = self.weights[0]
        for w in self.weights[1:]:
            out = w @ out
        return out

    def __call__(self, x: Float[Array, " in"]) -> Float[Array, " out"]:
        return self.product() @ x

    @classmethod
    def random(cls, dims, scale: float, key: PRNGKeyArray) -> "DeepLinear":
        """Every entry i.i.d. `N(0, scale²)`.

        **Arguments:**

        - `dims`: widths `(d_0, ..., d_D)`, input first.
        - `scale`: the standard deviation ε of each entry.
        - `key`: a JAX PRNG key.
        """
        dims = tuple(int(d) for d in dims)
        if len(dims) < 2 or min(dims) < 1:
            raise InputError(f"DeepLinear needs at least two positive widths, got {dims}")
        if not scale >= 0:
            raise InputError(f"init scale must be non-negative, got {scale}")
        keys = jax.random.split(key, len(dims) - 1)
        return cls(
            scale * jax.random.normal(k, (dout, din))
            for k, din, dout in zip(keys, dims[:-1], dims[1:])
        )

    @classmethod
    def balanced_aligned(
        cls, target: Float[ArrayLike, "out in"], depth: int, u0, hidden: int | None = None
    ) -> "DeepLinear":
        """The balanced initialization aligned with the SVD of `target` (Saxe et al.).

        With `target = U diag(s) Vᵀ`, mode α of the product starts at strength `u0[α]` and
        every factor carries `u0[α]^(1/depth)` of it: `W_1 = E diag(c) Vᵀ`, `W_k = E diag(c) Eᵀ`,
        `W_D = U diag(c) Eᵀ` with `c = u0^(1/D)` and `E` the first columns of the identity.
        On this manifold each mode evolves on its own: `du/dt = D u^(2−2/D) (s − u)`.

        **Arguments:**

        - `target`: the matrix `S` the product is fitted to.
        - `depth`: number of factors `D ≥ 2`.
        - `u0`: initial mode strengths: a positive scalar or one per non-zero singular value.
        - `hidden`: hidden width (default `min(target.shape)`), at least the number of modes.
        """
        target = np.asarray(target, dtype=np.float64)
        if target.ndim != 2:
            raise InputError(f"target must be a matrix, got shape {target.shape}")
        if int(depth) != depth or depth < 2:
            raise InputError(f"balanced_aligned needs depth >= 2, got {depth}")
        U, s, Vt = np.linalg.svd(target, full_matrices=False)
        # The modes are the non-zero singular values; the rest of the product stays zero.
        r = int(np.sum(s > 1e-12 * s.max())) if s.size and s.max() > 0 else 0
        if r == 0:
            raise InputError("balanced_aligned needs a non-zero target")
        U, s, Vt = U[:, :r], s[:r], Vt[:r]
        u0 = np.broadcast_to(np.asarray(u0, dtype=np.float64), (r,))
        if not np.all(u0 > 0):
            raise InputError("balanced_aligned needs positive initial mode strengths u0")
        hidden = r if hidden is None else int(hidden)
        if hidden < r:
            raise InputError(f"hidden width {hidden} is smaller than the {r} modes of the target")
        c = u0 ** (1.0 / depth)
        E = np.eye(hidden, r)
        weights = [E @ np.diag(c) @ Vt]
        weights += [E @ np.diag(c) @ E.T for _ in range(depth - 2)]
        weights += [U @ np.diag(c) @ E.T]
        return cls(weights)


def deep_linear_loss(model: DeepLinear, target: Float[Array, "out in"]) -> Scalar:
    """Squared loss with whitened inputs: `½‖S − W_D ⋯ W_1‖_F²`.

    For data `(x_i, y_i)` with `(1/n) Σ x_i x_iᵀ = I`, `(1/2n) Σ ‖y_i − W x_i‖²` equals this loss
    with `S = (1/n) Σ y_i x_iᵀ`, up to a constant.
    """
    return 0.5 * jnp.sum(jnp.square(target - model.product()))


def whitened_target(
    singular_values, shape: tuple[int, int], key: PRNGKeyArray
) -> Float[Array, "out in"]:
    """A target `S = U diag(s) Vᵀ` with random orthonormal `U`, `V` and given singular values.

    **Arguments:**

    - `singular_values`: the `s_α`, at most `min(shape)` of them (the rest are 0).
    - `shape`: `(out, in)`.
    - `key`: a JAX PRNG key.
    """
    s = np.asarray(singular_values, dtype=np.float64)
    out_dim, in_dim = (int(n) for n in shape)
    if s.ndim != 1 or s.size > min(out_dim, in_dim):
        raise InputError(
            f"{s.size} singular values do not fit a {out_dim}x{in_dim} target"
        )
    if not np.all(np.isfinite(s)) or np.any(s < 0):
        raise InputError("singular values must be finite and non-negative")
    ku, kv = jax.random.split(key)
    U, _ = jnp.linalg.qr(jax.random.normal(ku, (out_dim, s.size)))
    V, _ = jnp.linalg.qr(jax.random.normal(kv, (in_dim, s.size)))
    return (U * jnp.asarray(s)) @ V.T
