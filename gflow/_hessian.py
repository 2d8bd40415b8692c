"""Extreme eigenpairs of a Hessian from Hessian-vector products, by LOBPCG.

One routine for `gflow.critical_points` (the spectrum at a saddle) and the observer
`gflow.observers.hessian_extremes` (the sharpness along a trajectory): the `k` largest
eigenpairs of `sign · ∇²f(x)` by `jax.experimental.sparse.linalg.lobpcg_standard` on
forward-over-reverse HVPs (`jax.linearize` of `∇f`: the linearisation is traced once and
applied to the whole block). A block method rather than single-vector Lanczos: the Hessians of
these networks have repeated eigenvalues, which single-vector Lanczos finds once each.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


def top_eigenpairs(
    grad: Callable[[Array], Array], x: Float[Array, " n"], X: Float[Array, "n k"], sign,
    iterations: int,
) -> tuple[Float[Array, " k"], Float[Array, "n k"]]:
    """The `k = X.shape[1]` largest eigenpairs of `sign · ∇²f(x)`, as eigenvalues of `∇²f`.

    **Arguments:**

    - `grad`: `∇f`, a function of the flat vector `x`.
    - `x`: the point.
    - `X`: the start block (`5 k < n`, as LOBPCG needs).
    - `sign`: `1` for the top of the spectrum, `−1` for its bottom.
    - `iterations`: LOBPCG's iteration limit (it stops earlier once converged).

    **Returns:**

    `(eigenvalues, eigenvectors as columns)` of `∇²f(x)` (not multiplied by `sign`).
    """
    # Imported here: `jax.experimental.sparse` costs about 0.27 s to import (measured), paid
    # by every `import gflow` otherwise, and only these two instruments use it.
    from jax.experimental.sparse.linalg import lobpcg_standard

    _, hvp = jax.linearize(grad, x)
    block_hvp = jax.vmap(hvp, in_axes=1, out_axes=1)
    sign = jnp.asarray(sign, dtype=x.dtype)
    theta, U, _ = lobpcg_standard(lambda V: sign * block_hvp(V), X, m=iterations)
    # A Hessian that annihilates the start block (almost surely a zero Hessian: parameters the
    # loss does not see) makes LOBPCG's search directions vanish and its result NaN; its
    # eigenvalues there are 0 and any orthonormal block is an eigenbasis.
    null = jnp.all(block_hvp(X) == 0)
    theta = jnp.where(null, 0.0, sign * theta)
    U = jnp.where(null, jnp.linalg.qr(X)[0], U)
    return theta, U
