"""Locating a transition inside the step where its condition changed sign: a bracketing
secant method (Anderson–Björck's variant of regula falsi) in time.

optimistix offers bisection and Newton-type root finders but no bracketing superlinear one.
Bisection needs ~30 condition evaluations per transition at gflow's tolerances (the step's
width down to `1e-3 × rtol` of the time), and a transition's condition can cost more than the
gradient (an SVD); Newton would need the condition's derivative along the dense output and
can leave the step. Anderson–Björck keeps the bracket, converges superlinearly (order ≈ 1.7)
on a smooth condition, and falls back to bisection where the secant is no use.
"""

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


class _BracketState(eqx.Module):
    # `b` is the newest point, `a` the end of the bracket kept from before; `f_a` may have been
    # scaled down (Anderson–Björck), so it is a weight, not the condition's value at `a`.
    a: Scalar
    f_a: Scalar
    b: Scalar
    f_b: Scalar
    first: Bool[Array, ""]
    crossing: Bool[Array, ""]
    bisect: Bool[Array, ""]


def _next_point(a, f_a, b, f_b, bisect, margin):
    """The secant point of the bracket, or its midpoint when the secant is no use (not finite)
    or when `bisect` asks for it; at least `margin` from either end.

    The secant of two values of opposite sign lies in the bracket; only rounding puts it on an
    end, which happens when the value there is about zero: the root is at that end. The
    `margin` (half the tolerance, Dekker's and Brent's rule) then puts the next point just
    across the root, and the bracket closes, instead of bisection walking the other end in
    (about 20 more evaluations at gflow's tolerances, measured).
    """
    mid = a + 0.5 * (b - a)
    denominator = f_b - f_a
    safe = jnp.where(denominator == 0, 1.0, denominator)
    secant = b - f_b * (b - a) / safe
    lo, hi = jnp.minimum(a, b), jnp.maximum(a, b)
    usable = (denominator != 0) & jnp.isfinite(secant) & jnp.logical_not(bisect)
    point = jnp.where(usable, jnp.clip(secant, lo, hi), mid)
    return jnp.clip(point, lo + margin, hi - margin)


class BracketingSecant(optx.AbstractRootFinder):
    """Anderson–Björck regula falsi in time on the bracket `[lower, upper]` of the step in
    which the condition changed sign.

    It stops when the bracket is small in time alone (`optx.Bisection` also requires
    `|condition| < atol`, mixing the condition's units with time's, which a steep condition
    never meets) or the condition is exactly zero. It reads the bracket's orientation from the
    values instead of checking it with `eqx.error_if`: that check is reduced over a vmapped
    batch, so in a batched sweep one member without a crossing would stop every member. A
    member without a crossing stops at its step's end, where diffrax puts its event time
    anyway. It evaluates the condition once at `lower` (in `init`) and then once per step,
    starting at `upper` (the initial guess diffrax passes).

    A step that does not shrink the bracket below half its width (which regula falsi does
    when one end stays put) is followed by a bisection step, so the bracket at least halves
    every two evaluations: never slower than half of bisection's rate. No point is placed
    within half the tolerance of either end (Dekker's rule), so a secant converged on one end
    closes the bracket with one more evaluation.
    """

    rtol: Scalar
    atol: Scalar
    norm: Callable = jnp.abs

    def _tolerance(self, t) -> Scalar:
        # One formula for the margin (step) and the stop (terminate): a bracket closed by the
        # margin's half-tolerance step must count as closed.
        return self.atol + self.rtol * jnp.abs(t)

    def init(self, fn, y, args, options, f_struct, aux_struct, tags):
        del f_struct, aux_struct, tags
        dtype = jnp.result_type(y)
        lower = jnp.asarray(options["lower"], dtype)
        upper = jnp.asarray(options["upper"], dtype)
        f_lower, _ = _summed(fn)(lower, args)
        f_lower = jnp.asarray(f_lower, dtype)
        false = jnp.asarray(False)
        return _BracketState(lower, f_lower, upper, jnp.zeros_like(f_lower), jnp.asarray(True),
                             jnp.asarray(True), false)

    def step(self, fn, y, args, options, state, tags):
        del options, tags
        f_y, aux = _summed(fn)(y, args)
        f_y = jnp.asarray(f_y, state.f_a.dtype)
        a, f_a, b, f_b = state.a, state.f_a, state.b, state.f_b
        # First step: `y` is `upper`; the bracket is [lower, upper].
        first_crossing = jnp.sign(f_y) != jnp.sign(f_a)
        # Later steps: `y` is inside the bracket [a, b]; keep the end across which the sign
        # changes.
        across_b = jnp.sign(f_y) != jnp.sign(f_b)  # root in [y, b]: b becomes the kept end
        m = 1.0 - f_y / jnp.where(f_b == 0, 1.0, f_b)
        m = jnp.where(m > 0, m, 0.5)
        new_a = jnp.where(state.first, a, jnp.where(across_b, b, a))
        new_f_a = jnp.where(state.first, f_a, jnp.where(across_b, f_b, f_a * m))
        new_b, new_f_b = y, f_y
        crossing = jnp.where(state.first, first_crossing, state.crossing)
        width = jnp.abs(b - a)
        new_width = jnp.abs(new_b - new_a)
        bisect = jnp.logical_not(state.first) & jnp.logical_not(state.bisect) & (
            new_width > 0.5 * width
        )
        # Half the tolerance from either end while the bracket is wider than the tolerance;
        # the last proposal, from a closed bracket, is its secant point.
        tol = self._tolerance(new_b)
        margin = jnp.where(new_width >= tol, 0.5 * tol, 0.0)
        proposal = _next_point(new_a, new_f_a, new_b, new_f_b, bisect, margin)
        # Without a crossing the answer is the step's end (where the step already is).
        proposal = jnp.where(crossing, proposal, new_b)
        new_state = _BracketState(new_a, new_f_a, new_b, new_f_b, jnp.asarray(False), crossing,
                                  bisect)
        return proposal, new_state, aux

    def terminate(self, fn, y, args, options, state, tags):
        del fn, args, options, tags
        width = jnp.abs(state.b - state.a)
        small = width < self._tolerance(state.b)
        done = jnp.logical_not(state.first) & (
            small | (state.f_b == 0) | jnp.logical_not(state.crossing)
        )
        return done, optx.RESULTS.successful

    def postprocess(self, fn, y, aux, args, options, state, tags, result):
        del fn, args, options, tags, result
        # A condition exactly zero at the newest point: that point is the root.
        return jnp.where(state.f_b == 0, state.b, y), aux, {}
