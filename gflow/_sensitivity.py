"""`sensitivity`: derivatives of transition times with respect to a scalar of the problem.

How it works
------------
For a problem `make_flow(p)` and a transition located at `t*(p)` by `c(θ(t*), p) = 0`, the
implicit-function theorem gives

    dt*/dp = −(∂c/∂θ · ∂θ(t*)/∂p + ∂c/∂p) / (∇c · θ̇(t*)).

1. `gflow.solve` locates every `t*` (root finding on the dense output, as always).
2. The tangent of the problem's arrays (initial state, frozen leaves, data) with respect to
   `p`: `jax.jvp` through `make_flow` when it traces (a builder written in `jax.numpy`), and
   otherwise central differences of the arrays that two calls of `make_flow` build (builders
   that check their arguments in Python, or use numpy, do not trace). No solve is differenced:
   only the construction, which is cheap and smooth (for an init scale it is linear, and the
   difference exact to roundoff). `Sensitivity.construction` says which was used.
3. Forward mode through the solve: `jax.jvp` of `diffrax.diffeqsolve` (`adjoint=
   diffrax.ForwardMode()`, the same solver, `rtol`, `atol` and step limit as the solve) from
   `t0` to the located times, saving `θ(t*)` and `∂θ(t*)/∂p` at each, pushed through the
   conditions in the same `jvp`: that gives the numerator at fixed time.
4. The denominator `∇c · θ̇` is one more `jvp` of the condition along the velocity at `θ(t*)`.

A transition's condition may close over arrays built from `p` (a threshold relative to the
init, say): pass `transitions` as a function `p -> transitions`, and the closures' share of
`∂c/∂p` is taken by central differences of the conditions built at `p ± h`, evaluated at the
same `θ(t*)`.

The cost is one solve plus one forward-mode solve (a Jacobian-vector product per stage: about
two to three gradients), against two solves for a central difference (see
docs/results.md).
"""

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import PyTree

from ._errors import InputError
from ._flow import GradientFlow
from ._solve import solve
from ._spec import SolveSpec, Transition
from ._trajectory import Trajectory, _finite_or_none

# Relative step of the central differences of the construction: ∛(float64 eps), the step that
# balances truncation (h²) against roundoff (eps/h).
_CONSTRUCTION_STEP = 6e-6


class Sensitivity(eqx.Module):
    """Transition times and their derivatives with respect to a scalar `p`.

    **Fields:**

    - `p`: the point of differentiation.
    - `times`: `{name: t*}` (`nan` for a transition not reached).
    - `derivatives`: `{name: dt*/dp}` (`nan` where not reached or not transversal).
    - `exponents`: `{name: d ln t*/d ln p = (p/t*) dt*/dp}`, the local scaling exponent.
    - `construction`: `"jvp"` or `"central-difference"`: how the problem's arrays were
        differentiated with respect to `p` (module docstring).
    - `trajectory`: the solve that located the times.
    - `seconds`: `{"solve": ..., "tangent": ...}` wall seconds (compile included).
    - `tangent_steps`: the steps of the forward-mode solve (to the last located time), the
        solve's own steps to there: the same solver and controller, restarted at each
        transition.
    """

    p: float
    times: dict[str, float]
    derivatives: dict[str, float]
    exponents: dict[str, float]
    construction: str
    trajectory: Trajectory
    seconds: dict[str, float]
    tangent_steps: int = 0

    def summary(self) -> dict[str, Any]:
        """A JSON-ready record (no NaN or inf: those become `None`)."""
        clean = lambda d: {k: _finite_or_none(v) for k, v in d.items()}
        return dict(p=_finite_or_none(self.p), times=clean(self.times),
                    derivatives=clean(self.derivatives), exponents=clean(self.exponents),
                    construction=self.construction, seconds=dict(self.seconds))


def _checked_flow(make_flow, p) -> GradientFlow:
    flow = make_flow(p)
    if not isinstance(flow, GradientFlow):
        raise InputError(f"make_flow must return a gflow.GradientFlow, got {type(flow).__name__}")
    return flow


def _checked_transitions(transitions, p) -> tuple[Transition, ...]:
    found = tuple(transitions(p) if callable(transitions) else transitions)
    for tr in found:
        if not isinstance(tr, Transition):
            raise InputError(f"transitions must be gflow.Transition objects, got {tr!r}")
    return found


def _construction_tangent(make_flow, p: float, flow: GradientFlow) -> tuple[PyTree, str]:
    """`d(floating arrays of make_flow(p))/dp`, by `jax.jvp` if `make_flow` traces, else
    central differences."""
    dynamic, _ = eqx.partition(flow, eqx.is_inexact_array)

    def arrays(q):
        return eqx.filter(_checked_flow(make_flow, q), eqx.is_inexact_array)

    try:
        _, tangent = jax.jvp(arrays, (jnp.asarray(p, dtype=float),), (jnp.ones((), float),))
        if jtu.tree_structure(tangent) == jtu.tree_structure(dynamic):
            return tangent, "jvp"
    except Exception:
        # A builder that does not trace (checks in Python, numpy, a config parser refusing a
        # tracer): difference it. A genuine error shows again when it is called at p ± h.
        pass
    h = _CONSTRUCTION_STEP * (abs(p) if p != 0 else 1.0)
    plus, minus = arrays(p + h), arrays(p - h)
    if not (jtu.tree_structure(plus) == jtu.tree_structure(minus)
            == jtu.tree_structure(dynamic)):
        raise InputError("make_flow(p) builds arrays of another structure at a nearby p")
    for a, b in zip(jtu.tree_leaves(plus), jtu.tree_leaves(dynamic)):
        if np.shape(a) != np.shape(b):
            raise InputError("make_flow(p) builds arrays of another shape at a nearby p")
    tangent = jtu.tree_map(lambda a, b: (a - b) / (2 * h), plus, minus)
    return tangent, "central-difference"


def sensitivity(
    make_flow: Callable[[float], GradientFlow],
    p: float,
    t1: float,
    *,
    transitions: Sequence[Transition] | Callable[[float], Sequence[Transition]],
    **solve_options,
) -> Sensitivity:
    """Transition times of `make_flow(p)` and their derivatives with respect to `p`.

    See the module docstring for the method (forward mode through the solve and the
    implicit-function theorem at each transition).

    **Arguments:**

    - `make_flow`: `make_flow(p) -> GradientFlow`; `p` a scalar of the init or the data.
    - `p`: where to differentiate.
    - `t1`: end time of the solve.
    - `transitions`: the `Transition`s, or a function `p -> transitions` when their conditions
        depend on `p` through what they close over.
    - `**solve_options`: the options of `gflow.solve` (`t0`, `solver`, `rtol`, `atol`,
        `max_steps`, `ts`, `observers`, `dt0`, `stepsize_controller`, `pcoeff`, ...), made into
        one `gflow.SolveSpec`: the forward-mode solve runs its solver and step-size controller,
        restarting at each located transition as the solve does, so it takes the same steps.

    **Returns:**

    A `Sensitivity`.
    """
    if not callable(make_flow):
        raise InputError("make_flow must be callable as make_flow(p) -> GradientFlow")
    if isinstance(p, bool) or not isinstance(p, (int, float, np.floating, np.integer)) \
            or not math.isfinite(p):
        raise InputError(f"p must be a finite number, got {p!r}")
    p = float(p)
    flow = _checked_flow(make_flow, p)
    found = _checked_transitions(transitions, p)
    if not found:
        raise InputError("sensitivity needs at least one transition")
    for key in ("transitions", "certify", "checkpoint", "resume", "checkpoint_steps"):
        if key in solve_options:
            raise InputError(f"sensitivity does not take the solve option {key!r}")
    solve_options = dict(solve_options)
    solve_options.setdefault("ts", [t1])  # only the times are needed, not a curve
    spec = SolveSpec.from_options(flow, t1, transitions=found, **solve_options)
    t0 = spec.t0

    start = time.perf_counter()
    traj = solve(flow, spec)
    solve_seconds = time.perf_counter() - start

    times = {tr.name: float(traj.transitions[tr.name]) for tr in found}
    reached = [tr for tr in found if math.isfinite(times[tr.name]) and times[tr.name] > t0]
    derivatives = {name: math.nan for name in times}
    start = time.perf_counter()
    construction = "none"
    tangent_steps = 0
    if reached:
        tangent, construction = _construction_tangent(make_flow, p, flow)
        parts, tangent_steps = _implicit(flow, tangent, reached, times, spec)
        closure = _closure_terms(transitions, p, flow, parts) if callable(transitions) else {}
        for name, (numerator, rate, _) in parts.items():
            numerator += closure.get(name, 0.0)
            # A transition the flow only touches (∇c·θ̇ = 0) has no derivative.
            derivatives[name] = -numerator / rate if rate != 0 else math.nan
    tangent_seconds = time.perf_counter() - start
    exponents = {
        name: (p / times[name]) * d if math.isfinite(d) and times[name] != 0 else math.nan
        for name, d in derivatives.items()
    }
    return Sensitivity(
        p=p, times=times, derivatives=derivatives, exponents=exponents,
        construction=construction, trajectory=traj,
        seconds=dict(solve=solve_seconds, tangent=tangent_seconds),
        tangent_steps=tangent_steps,
    )


@eqx.filter_jit
def _tangent_solve(dynamic, tangent, static, conditions, times, t0, solver, controller,
                   max_steps, dt0):
    """Conditions at the located `times` and their derivatives along `tangent`, by `jax.jvp`
    through `diffeqsolve` (forward mode), and the steps taken. One `diffeqsolve` from each
    located time to the next, as the solve restarts at each transition: the same steps.
    Module-level and `filter_jit`ted, so a problem whose functions are the same objects
    reuses the compiled program."""

    solver = _forward_mode(solver)

    def conditions_at_times(dynamic):
        f = eqx.combine(dynamic, static)
        term = diffrax.ODETerm(lambda t, y, args: f.velocity(y))
        y, start, states, failed, steps = f.params, t0, [], jnp.asarray(0.0), 0
        for k in range(len(conditions)):
            sol = diffrax.diffeqsolve(
                term, solver, start, times[k], dt0, y, saveat=diffrax.SaveAt(t1=True),
                stepsize_controller=controller, adjoint=diffrax.ForwardMode(),
                max_steps=max_steps, throw=False,
            )
            y = jtu.tree_map(lambda leaf: leaf[-1], sol.ys)
            states.append(y)
            failed = jnp.maximum(
                failed, jnp.asarray(sol.result != diffrax.RESULTS.successful, dtype=float))
            steps = steps + sol.stats["num_steps"]
            start = times[k]
        values = jnp.stack([jnp.asarray(c(f.combine(y), f.data), dtype=float)
                            for c, y in zip(conditions, states)])
        return values, states, failed, jnp.asarray(steps, dtype=float)

    (_, states, failed, steps), (numerators, _, _, _) = jax.jvp(
        conditions_at_times, (dynamic,), (tangent,))
    return numerators, states, failed, steps


def _forward_mode(solver):
    """`solver` with every Runge–Kutta solver inside it (e.g. the Tsit5 of `StiffSwitching`)
    looping over its stages in `"lax"` kind, as `diffrax.ForwardMode` makes a top-level one
    do: their default checkpointed loop has a custom VJP, which `jax.jvp` cannot go through.
    The values (hence the steps) are the same."""

    def default_loop(x):
        return isinstance(x, diffrax.AbstractRungeKutta) and x.scan_kind is None

    return jtu.tree_map(
        lambda x: eqx.tree_at(lambda s: s.scan_kind, x, "lax", is_leaf=lambda v: v is None)
        if default_loop(x) else x,
        solver, is_leaf=default_loop)


@eqx.filter_jit
def _transversality(flow, conditions, states):
    """`∇c · θ̇` at each located time, at fixed problem arrays."""
    return jnp.stack([
        jax.jvp(lambda z, c=c: jnp.asarray(c(flow.combine(z), flow.data), dtype=float),
                (y,), (flow.velocity(y),))[1]
        for c, y in zip(conditions, states)
    ])


def _implicit(flow, tangent, reached, times, spec) -> tuple[dict[str, tuple], int]:
    """`{name: (N, D, θ(t*))}` at each reached transition: the numerator
    `N = ∂c/∂θ·∂θ(t*)/∂p + ∂c/∂P·∂P/∂p` at fixed time (forward mode through the solve of
    `spec`) and the denominator `D = ∇c·θ̇`."""
    order = sorted(range(len(reached)), key=lambda k: times[reached[k].name])
    located = jnp.asarray([times[reached[k].name] for k in order], dtype=float)
    dynamic, static = eqx.partition(flow, eqx.is_inexact_array)
    conditions = tuple(reached[k].condition for k in order)
    numerators, states, failed, steps = _tangent_solve(
        dynamic, tangent, static, conditions, located, spec.t0, spec.solver,
        spec.stepsize_controller, spec.max_steps, spec.dt0)
    if float(failed):
        raise InputError("the forward-mode solve to the transition times failed")
    rates = np.asarray(_transversality(flow, conditions, states))
    numerators = np.asarray(numerators)
    return {reached[k].name: (float(numerators[j]), float(rates[j]), states[j])
            for j, k in enumerate(order)}, int(steps)


def _closure_terms(transitions, p, flow, parts) -> dict[str, float]:
    """`∂c/∂p` through the conditions' closures, by central differences of the conditions
    built at `p ± h`, at the same states and problem arrays."""
    h = _CONSTRUCTION_STEP * (abs(p) if p != 0 else 1.0)
    plus = {tr.name: tr for tr in _checked_transitions(transitions, p + h)}
    minus = {tr.name: tr for tr in _checked_transitions(transitions, p - h)}
    out = {}
    for name, (_, _, y) in parts.items():
        if name not in plus or name not in minus:
            raise InputError(f"transitions(p) at a nearby p has no transition {name!r}")
        model = flow.combine(y)
        out[name] = (float(plus[name].condition(model, flow.data))
                     - float(minus[name].condition(model, flow.data))) / (2 * h)
    return out
