"""`converged`: a terminal transition that ends a solve where the gradient has vanished."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from ._errors import InputError
from ._flow import GradientFlow
from ._spec import Transition


def converged(flow: GradientFlow, tol: float, name: str = "converged") -> Transition:
    """A terminal `Transition`: the solve ends the first time `‖∇L‖ < tol` (or at `t1`).

    Pass it in `transitions=` (last: transitions are detected in order), e.g.
    `gflow.solve(flow, 1e4, transitions=[*stages, gflow.converged(flow, 1e-8)])`. Its time,
    `Trajectory.transitions[name]`, is located on the dense output like any transition's, and
    `Trajectory.t_final` is that time; save times after it are not reached. With
    `solver="auto"` the stiff approach to the minimum costs what the implicit method makes it.

    The condition is `log(‖∇L‖ / tol)` (the Euclidean norm over the trainable leaves; the log
    keeps the root finder well scaled over the orders of magnitude the gradient falls
    through). It costs one gradient per step (diffrax evaluates an event's condition at every
    step), which the solver's counters do not include.

    **Arguments:**

    - `flow`: the flow being solved (its loss and trainable leaves define `∇L`).
    - `tol`: the gradient norm below which the flow counts as converged (> 0).
    - `name`: the transition's key in `Trajectory.transitions`.

    **Returns:**

    A `gflow.Transition` with `direction=False` and `terminal=True`.
    """
    if not (isinstance(tol, (int, float)) and not isinstance(tol, bool) and tol > 0
            and math.isfinite(tol)):
        raise InputError(f"converged: tol must be a positive number, got {tol!r}")
    loss, trainable = flow.loss, flow.trainable
    log_tol = math.log(tol)

    def condition(model, data):
        params, rest = eqx.partition(model, trainable)
        grads = jax.grad(lambda p: loss(eqx.combine(p, rest), data))(params)
        squared = sum(jnp.sum(jnp.square(g)) for g in jtu.tree_leaves(grads))
        return 0.5 * jnp.log(squared) - log_tol

    return Transition(name, condition, direction=False, terminal=True)
