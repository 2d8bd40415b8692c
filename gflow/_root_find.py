"""Bisection in time for locating a transition inside the step where its condition changed sign."""

from collections.abc import Callable

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
import optimistix as optx
from jaxtyping import Array, Bool, Scalar


def _summed(fn):
    """`fn` with its tree of outputs summed to a scalar.

    diffrax root-finds all event conditions at once and zeroes every condition but the one
    that fired, so the sum has exactly the fired condition's root.
    """

    def summed(y, args):
        out, aux = fn(y, args)
        return sum(jtu.tree_leaves(out)), aux

    return summed


class _BisectionState(eqx.Module):
    lower: Scalar
    upper: Scalar
    flip: Bool[Array, ""]
    error: Scalar


class IntervalBisection(optx.AbstractRootFinder):
    """Bisection in time on the bracket of the step in which the condition changed sign.

    Unlike `optx.Bisection` it stops when the bracket is small in time alone (`optx.Bisection`
    also requires `|condition| < atol`, mixing the condition's units with time's, which a steep
    condition never meets), and it reads the bracket's orientation directly instead of checking
    it with `eqx.error_if`: that check is reduced over a vmapped batch, so in a batched sweep one
    member without a crossing would flip every member's bisection. A member without a crossing
    converges to its step's end, where diffrax puts its event time anyway. Needing no derivative
    of the condition keeps the compiled program smaller than Newton's.
    """

    rtol: Scalar
    atol: Scalar
    norm: Callable = jnp.abs

    def init(self, fn, y, args, options, f_struct, aux_struct, tags):
        del f_struct, aux_struct, tags
        fn = _summed(fn)
        dtype = jnp.result_type(y)
        lower = jnp.asarray(options["lower"], dtype)
        upper = jnp.asarray(options["upper"], dtype)
        lower_value, _ = fn(lower, args)
        upper_value, _ = fn(upper, args)
        flip = lower_value > upper_value
        return _BisectionState(lower, upper, flip, jnp.asarray(jnp.inf, dtype))

    def step(self, fn, y, args, options, state, tags):
        del options, tags
        error, aux = _summed(fn)(y, args)
        negative = state.flip ^ (error < 0)
        lower = jnp.where(negative, y, state.lower)
        upper = jnp.where(negative, state.upper, y)
        return lower + 0.5 * (upper - lower), _BisectionState(lower, upper, state.flip, error), aux

    def terminate(self, fn, y, args, options, state, tags):
        del fn, args, options, tags
        width = jnp.abs(state.upper - state.lower)
        return width < self.atol + self.rtol * jnp.abs(y), optx.RESULTS.successful

    def postprocess(self, fn, y, aux, args, options, state, tags, result):
        del fn, args, options, state, tags, result
        return y, aux, {}
