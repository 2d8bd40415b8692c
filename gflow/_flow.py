"""`GradientFlow`: the vector field `dθ/dt = -P(θ)∇L(θ)` of an equinox module."""

import math
import numbers
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import PyTree, Scalar

from ._errors import InputError


class GradientFlow(eqx.Module):
    """The gradient flow of a loss over the trainable leaves of an equinox module.

    The state of the flow is the trainable part of `model` (a pytree with `None` in place of
    every frozen leaf); frozen leaves and `data` are carried along unchanged.

    **Arguments:**

    - `model`: an `eqx.Module` (or any pytree) holding the initial parameters.
    - `loss`: `loss(model, data) -> scalar`.
    - `data`: any pytree of arrays, passed to `loss` and to observers.
    - `trainable`: an equinox filter spec choosing the leaves that evolve: a callable
        `leaf -> bool` or a pytree of bools/callables over a prefix of `model`, as for
        `eqx.filter`. Default: every inexact (floating) array.
    - `preconditioner`: optional `preconditioner(model, grads) -> direction` (same structure as
        `grads`), giving `dθ/dt = -P(θ)∇L(θ)`. Default: plain gradient flow.
    - `gd_step`: `η ≥ 0`. When positive, the flow is gradient descent's modified equation
        (Barrett & Dherin, "Implicit gradient regularization"):
        `dθ/dt = −∇(L + (η/4)‖∇L‖²) = −(∇L + (η/2) ∇²L ∇L)`, which follows gradient descent
        at step `η` (iterate `k` at `t = kη`) to `O(η²)`, where the plain flow (`0`, the
        default) follows it to `O(η)`. The Hessian-vector product costs about one more
        gradient per evaluation. Not combined with a preconditioner (preconditioned descent
        has another modified equation). Observers and `loss_at` still see the plain loss `L`.
    """

    model: PyTree
    loss: Callable[[Any, Any], Scalar]
    data: PyTree
    trainable: Any = eqx.is_inexact_array
    preconditioner: Callable[[Any, Any], Any] | None = None
    gd_step: float = 0.0

    def __init__(self, model, loss, data, trainable=None, preconditioner=None, gd_step=0.0):
        self.model = model
        self.loss = loss
        self.data = data
        self.trainable = eqx.is_inexact_array if trainable is None else trainable
        self.preconditioner = preconditioner
        self.gd_step = gd_step

    def __check_init__(self):
        if not (isinstance(self.gd_step, numbers.Real) and not isinstance(self.gd_step, bool)
                and math.isfinite(self.gd_step) and self.gd_step >= 0):
            raise InputError(f"gd_step must be a finite number >= 0, got {self.gd_step!r}")
        if self.gd_step and self.preconditioner is not None:
            raise InputError("gd_step (GD's modified flow) does not combine with a preconditioner")
        if not callable(self.loss):
            raise InputError(f"loss must be callable as loss(model, data), got {self.loss!r}")
        if self.preconditioner is not None and not callable(self.preconditioner):
            raise InputError("preconditioner must be callable as preconditioner(model, grads)")
        try:
            params, _ = eqx.partition(self.model, self.trainable)
        except Exception as e:  # a malformed filter spec: say so in one line
            raise InputError(f"trainable does not fit the model: {e}".splitlines()[0]) from None
        leaves = jtu.tree_leaves(params)
        if not leaves:
            raise InputError("the model has no trainable leaves: nothing would evolve")
        for leaf in leaves:
            if not eqx.is_inexact_array(leaf):
                raise InputError(
                    f"trainable selects a leaf that is not a floating-point array: {leaf!r}"
                )

    @property
    def params(self) -> PyTree:
        """The initial state: the trainable leaves of `model` (`None` elsewhere)."""
        return eqx.filter(self.model, self.trainable)

    @property
    def frozen(self) -> PyTree:
        """The leaves of `model` that do not evolve (`None` in place of trainable ones)."""
        return eqx.filter(self.model, self.trainable, inverse=True)

    def combine(self, params: PyTree) -> PyTree:
        """The model with its trainable leaves replaced by `params`."""
        return eqx.combine(params, self.frozen)

    def loss_at(self, params: PyTree) -> Scalar:
        """The loss at trainable state `params`."""
        return self.loss(self.combine(params), self.data)

    def velocity(self, params: PyTree) -> PyTree:
        """`dθ/dt` at trainable state `params`: `-∇L`, `-P(θ)∇L` with a preconditioner, or
        `-(∇L + (η/2)∇²L∇L)` with `gd_step=η`."""
        if self.gd_step:
            # ∇(L + (η/4)‖∇L‖²) = ∇L + (η/2) H∇L, with H∇L by forward-over-reverse.
            grads, hvp_of = jax.linearize(jax.grad(self.loss_at), params)
            hvp = hvp_of(grads)
            return jtu.tree_map(lambda g, h: -(g + (0.5 * self.gd_step) * h), grads, hvp)
        grads = jax.grad(self.loss_at)(params)
        if self.preconditioner is not None:
            grads = self.preconditioner(self.combine(params), grads)
        return jtu.tree_map(jnp.negative, grads)
