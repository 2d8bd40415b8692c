"""Matrix factorization flows: symmetric `W = U Uᵀ` and asymmetric `X = L Rᵀ` (docs/science.md §5)."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray, Scalar

from .._errors import InputError


class SymmetricFactorization(eqx.Module):
    """`W = U Uᵀ` with `U` of shape `(n, r)`.

    **Arguments:**

    - `U`: the factor.
    """

    U: Float[Array, "n r"]

    def __check_init__(self):
        if jnp.ndim(self.U) != 2:
            raise InputError(f"SymmetricFactorization: U must be a matrix, got shape {jnp.shape(self.U)}")

    def product(self) -> Float[Array, "n n"]:
        """The matrix `U Uᵀ`."""
        return self.U @ self.U.T

    @classmethod
    def random(cls, n: int, r: int, scale: float, key: PRNGKeyArray) -> "SymmetricFactorization":
        """Entries i.i.d. `N(0, scale²)`."""
        return cls(scale * jax.random.normal(key, (n, r)))


class LowRankFactorization(eqx.Module):
    """`X = L Rᵀ` with `L` of shape `(m, r)` and `R` of shape `(n, r)`.

    **Arguments:**

    - `L`, `R`: the factors.
    """

    L: Float[Array, "m r"]
    R: Float[Array, "n r"]

    def __check_init__(self):
        if jnp.ndim(self.L) != 2 or jnp.ndim(self.R) != 2 or self.L.shape[1] != self.R.shape[1]:
            raise InputError(
                f"LowRankFactorization: L and R must be matrices with equal columns, got "
                f"shapes {jnp.shape(self.L)} and {jnp.shape(self.R)}"
            )

    def product(self) -> Float[Array, "m n"]:
        """The matrix `L Rᵀ`."""
        return self.L @ self.R.T

    @classmethod
    def random(cls, m: int, n: int, r: int, scale: float, key: PRNGKeyArray) -> "LowRankFactorization":
        """Entries i.i.d. `N(0, scale²)`."""
        kl, kr = jax.random.split(key)
        return cls(scale * jax.random.normal(kl, (m, r)), scale * jax.random.normal(kr, (n, r)))


def factorization_loss(model: SymmetricFactorization | LowRankFactorization, target) -> Scalar:
    """`½‖target − product‖_F²` for either factorization."""
    return 0.5 * jnp.sum(jnp.square(target - model.product()))


def scaled_preconditioner(model: LowRankFactorization, grads: LowRankFactorization):
    """ScaledGD's preconditioner: `(∇_L f (RᵀR)⁻¹, ∇_R f (LᵀL)⁻¹)`.

    Pass it as `GradientFlow(..., preconditioner=scaled_preconditioner)` for
    `dL/dt = −∇_L f (RᵀR)⁻¹`, `dR/dt = −∇_R f (LᵀL)⁻¹` (Tong, Ma & Chi), whose convergence
    rate does not depend on the condition number of the target. Needs full-column-rank factors
    (it is singular at `L = 0` or `R = 0`).
    """
    # Solve instead of inverting: (RᵀR) Zᵀ = ∇_Lᵀ gives Z = ∇_L (RᵀR)⁻¹ (RᵀR is symmetric).
    grad_L = jnp.linalg.solve(model.R.T @ model.R, grads.L.T).T
    grad_R = jnp.linalg.solve(model.L.T @ model.L, grads.R.T).T
    return eqx.tree_at(lambda g: (g.L, g.R), grads, (grad_L, grad_R))
