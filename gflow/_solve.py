"""`solve`: integrate a `GradientFlow`, record observables, locate transitions."""

import contextlib
import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optimistix as optx
from jaxtyping import Array, ArrayLike, Bool, PyTree, Scalar

from ._checkpoint import Carry, fingerprint, read_checkpoint, write_checkpoint
from ._errors import InputError
from ._flow import GradientFlow
from ._grids import log_grid
from ._progress import FlowTimeBar, SegmentMeter
from ._solvers import is_adaptive, make_solver, solver_name, vector_field_evaluations
from ._trajectory import Trajectory, _flat_names


class Transition(eqx.Module):
    """A stage transition, marked by a sign change of `condition` along the flow.

    **Arguments:**

    - `name`: the key of its time in `Trajectory.transitions`.
    - `condition`: `condition(model, data) -> scalar`; the transition is the first time after
        the previous transition (transitions are detected in order) at which it changes sign.
        Its time is located by root finding on the solver's dense output.
    - `direction`: `None` for either sign change, `True` for an upcrossing (negative to positive)
        only, `False` for a downcrossing only.
    """

    name: str
    condition: Callable[[Any, Any], Scalar]
    direction: bool | None = None

    def __check_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise InputError(f"a Transition needs a non-empty string name, got {self.name!r}")
        if not callable(self.condition):
            raise InputError(f"transition {self.name!r}: condition must be callable")
        if self.direction not in (None, True, False):
            raise InputError(
                f"transition {self.name!r}: direction must be None, True or False, "
                f"got {self.direction!r}"
            )


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


class _IntervalBisection(optx.AbstractRootFinder):
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


# A state whose squared norm passes this (or is NaN) has diverged: float64 squares overflow at
# ~1e154, and no gradient flow of interest lives out there.
_DIVERGED_SQUARED_NORM = 1e200

_DEFAULT_SAVE_POINTS = 200

# Smallest step, relative to t1 - t0, before a solve is declared singular.
_DTMIN = 1e-12


def _diverged_squared_norm(tree: PyTree) -> float:
    """`_DIVERGED_SQUARED_NORM`, or less where the state's dtype (float32) overflows first."""
    dtype = jnp.result_type(*jtu.tree_leaves(tree))
    return min(_DIVERGED_SQUARED_NORM, float(jnp.finfo(dtype).max) / 16)


def _squared_norm(tree: PyTree) -> Scalar:
    return sum(jnp.sum(jnp.square(leaf)) for leaf in jtu.tree_leaves(tree))


def _default_atol(params: PyTree, rtol: float) -> float:
    """`rtol` times the RMS size of the smallest non-zero trainable leaf at t0.

    This resolves every parameter group relative to its own initial scale: a 1e-6-scale
    initialization is not swamped by an absolute tolerance set for O(1) states.
    """
    sizes = [
        float(np.sqrt(np.mean(np.square(np.asarray(leaf)))))
        for leaf in jtu.tree_leaves(params)
        if np.size(leaf) > 0
    ]
    sizes = [s for s in sizes if s > 0]
    return rtol * (min(sizes) if sizes else 1.0)


@contextlib.contextmanager
def _errors_as_nan():
    """Trace with equinox's runtime errors turned into NaNs.

    Failure is reported through `Solution.result` (`throw=False`), so gflow never relies on
    equinox raising. Raising embeds a host callback in the program, which makes JAX's
    persistent compilation cache miss in every new process; NaN-ing keeps the program pure.
    """
    errors = getattr(eqx, "_errors", None)
    if errors is None or not hasattr(errors, "EQX_ON_ERROR"):
        yield
        return
    previous = errors.EQX_ON_ERROR
    errors.EQX_ON_ERROR = "nan"
    try:
        yield
    finally:
        errors.EQX_ON_ERROR = previous


# diffrax results a segment tells apart; any other is a failure ("failed", index 0).
_OUTCOMES = ("failed", "successful", "event_occurred", "max_steps_reached", "dt_min_reached")


def _observation(flow: GradientFlow, observers: dict) -> Callable:
    """The function `SaveAt` evaluates at each save time: `{name: observer(model, data)}`."""

    def observe(t, y, args):
        del t, args
        model = flow.combine(y)
        values = {name: obs(model, flow.data) for name, obs in observers.items()}
        # Floating outputs only: diffrax fills unreached save times with inf, and an integer
        # observable (a count, a rank) would not fit that buffer.
        return jtu.tree_map(lambda x: jnp.asarray(x, dtype=jnp.result_type(x, float)), values)

    return observe


def _segment(
    flow: GradientFlow,
    observers: dict,
    conditions: tuple,
    directions: ArrayLike,
    index: ArrayLike,
    y0: PyTree,
    t0: ArrayLike,
    t1: ArrayLike,
    ts: ArrayLike,
    dt0: ArrayLike | None,
    solver: diffrax.AbstractSolver,
    controller: diffrax.AbstractStepSizeController,
    root_finder: optx.AbstractRootFinder | None,
    max_steps: int,
    progress_meter: diffrax.AbstractProgressMeter,
    solver_state: PyTree,
    controller_state: PyTree,
    made_jump: ArrayLike,
):
    """One diffrax solve from `t0` until `t1` or until transition number `index` fires.

    All transitions share this one compiled program: `index` selects the condition with
    `lax.switch`, and `index == len(conditions)` selects a constant (never fires). Directions
    are data too (`+1` up, `-1` down, `0` either): the condition is multiplied by a sign so
    that the wanted crossing is always an upcrossing for diffrax.
    """

    def vector_field(t, y, args):
        del t, args
        return flow.velocity(y)

    observe = _observation(flow, observers)

    # Parameter names matter: diffrax calls these by keyword during root finding.
    def diverged(t, y, args, **kwargs):
        del t, args, kwargs
        return jnp.logical_not(_squared_norm(y) < _diverged_squared_norm(y))

    branches = [
        lambda m, c=c: jnp.asarray(c(m, flow.data), dtype=float) for c in conditions
    ] + [lambda m: jnp.asarray(1.0, dtype=float)]

    def condition(y):
        return jax.lax.switch(index, branches, flow.combine(y))

    # Either direction: the first change away from the sign at the segment's start.
    sign = jnp.where(directions[index] == 0, jnp.where(condition(y0) > 0, -1.0, 1.0), directions[index])

    def transition(t, y, args, **kwargs):
        del t, args, kwargs
        return sign * condition(y)

    if conditions:
        # Tree order decides which event wins when both trigger on one step: divergence first.
        event = diffrax.Event(
            [diverged, transition], root_finder=root_finder, direction=[None, True]
        )
    else:
        event = diffrax.Event(diverged)
    saveat = diffrax.SaveAt(
        subs=[diffrax.SubSaveAt(ts=ts, fn=observe), diffrax.SubSaveAt(t1=True)],
        solver_state=True,
        controller_state=True,
        made_jump=True,
    )
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(vector_field),
        solver,
        t0,
        t1,
        dt0,
        y0,
        saveat=saveat,
        stepsize_controller=controller,
        event=event,
        max_steps=max_steps,
        throw=False,
        progress_meter=progress_meter,
        solver_state=solver_state,
        controller_state=controller_state,
        made_jump=made_jump,
    )
    observables, (t_end, y_end) = sol.ys[0], (sol.ts[1][0], sol.ys[1])
    # The result as an index into _OUTCOMES, read on the host without equinox's (eager) `==`.
    outcome = sum(
        i * (sol.result == getattr(diffrax.RESULTS, name))
        for i, name in enumerate(_OUTCOMES) if i > 0
    )
    return dict(
        observables=observables,
        t_end=t_end,
        y_end=jtu.tree_map(lambda leaf: leaf[0], y_end),
        result=sol.result,
        outcome=outcome,
        event_mask=sol.event_mask,
        stats=sol.stats,
        solver_state=sol.solver_state,
        controller_state=sol.controller_state,
        made_jump=sol.made_jump,
    )


_COMPILED: dict = {}


def _compiled_segment(*args) -> tuple[Callable, list, float]:
    """The compiled segment program for these arguments, its array inputs, and the seconds
    spent compiling it (0 when cached).

    Programs are cached by everything that is not an array (functions, solver, settings) and by
    the shapes and dtypes of the arrays, so new data or a new init of the same structure reuses
    the program: compile time is reported separately from run time. The program takes the
    flat list of array inputs: calling it walks no pytree of modules (a millisecond a call).
    """
    # One flatten (not `eqx.partition`'s two tree maps): this runs once per segment.
    all_leaves, treedef = jtu.tree_flatten(args)
    is_array = [eqx.is_array(x) for x in all_leaves]
    leaves = [x for x, a in zip(all_leaves, is_array) if a]
    static = tuple(None if a else x for x, a in zip(all_leaves, is_array))
    key = (treedef, static, tuple((x.shape, x.dtype) for x in leaves))
    try:
        hash(key)
    except TypeError:  # an unhashable static leaf: compile without caching
        key = None
    if key is not None and key in _COMPILED:
        return _COMPILED[key], leaves, 0.0

    def program(leaves):
        arrays = iter(leaves)
        merged = [next(arrays) if a else x for x, a in zip(static, is_array)]
        out = _segment(*jtu.tree_unflatten(treedef, merged))
        return eqx.filter(out, eqx.is_array)  # e.g. diffrax's `max_steps` stat is a Python int

    start = time.perf_counter()
    with _errors_as_nan():
        compiled = jax.jit(program).lower(leaves).compile()
    seconds = time.perf_counter() - start
    if key is not None:
        _COMPILED[key] = compiled
    return compiled, leaves, seconds


_INITIAL_STATES: dict = {}


def _state_key(y0: PyTree) -> tuple:
    return (
        jtu.tree_structure(y0),
        tuple((np.shape(x), jnp.result_type(x)) for x in jtu.tree_leaves(y0)),
    )


_SOLVER_STATE_SHAPES: dict = {}


def _solver_state_shapes(flow, solver, y0, t0, t1) -> PyTree:
    """The structure of `solver`'s state for states like `y0` (traced once per solver and
    state shape: tracing costs milliseconds)."""
    key = (solver, _state_key(y0))
    if key not in _SOLVER_STATE_SHAPES:
        term = diffrax.ODETerm(lambda t, y, args: flow.velocity(y))
        _SOLVER_STATE_SHAPES[key] = jax.eval_shape(
            lambda y: solver.init(term, t0, t1, y, None), y0
        )
    return _SOLVER_STATE_SHAPES[key]


def _initial_states(flow, solver, controller, y0, t0, t1) -> tuple[PyTree, PyTree]:
    """Solver and controller states to start the first segment with.

    diffrax builds them itself when given `None`, but then the first segment's program differs
    from the later ones (which resume from returned states) and compiles twice. The solver's
    state only holds the first-same-as-last stage, which `made_jump=True` recomputes, so zeros
    of the right structure do. A PID controller's initial state is diffrax's constant
    `(1, 1, False)`; for other controllers gflow lets diffrax initialize.
    """
    key = (solver, isinstance(controller, diffrax.PIDController), _state_key(y0))
    if key not in _INITIAL_STATES:
        # Building zeros costs milliseconds: once per solver and state shape (JAX arrays are
        # immutable, so every solve can start from the same ones).
        shapes = _solver_state_shapes(flow, solver, y0, t0, t1)
        solver_state = jtu.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        if isinstance(controller, diffrax.PIDController):
            # As diffrax's own init: in the state's real dtype (float32 under x32).
            one = jnp.asarray(1.0, dtype=jnp.result_type(*jtu.tree_leaves(y0)))
            _INITIAL_STATES[key] = solver_state, (one, one, jnp.asarray(False))
        else:
            _INITIAL_STATES[key] = None, None
    return _INITIAL_STATES[key]


def _host_array(x, dtype=float) -> np.ndarray:
    """A host array in JAX's default dtype for `dtype` (float64 with gflow; float32 under x32).

    Host arrays go into the compiled program with the call's other inputs: cheaper than an
    eager `jnp.asarray` each, which dispatches a conversion per value (milliseconds per solve).
    """
    return np.asarray(x, dtype=jax.dtypes.canonicalize_dtype(dtype))


def _check_finite(tree: PyTree, what: str) -> None:
    for path, leaf in jtu.tree_flatten_with_path(tree)[0]:
        if eqx.is_inexact_array(leaf) or isinstance(leaf, np.ndarray):
            arr = np.asarray(leaf)
            if np.issubdtype(arr.dtype, np.inexact) and not np.all(np.isfinite(arr)):
                raise InputError(f"{what} has non-finite values at {jtu.keystr(path)}")


def _resolve_ts(ts, t0: float, t1: float) -> np.ndarray:
    if ts is None:
        return log_grid(t0, t1, _DEFAULT_SAVE_POINTS)
    ts = np.asarray(ts, dtype=np.float64)
    if ts.ndim != 1 or ts.size == 0:
        raise InputError(f"ts must be a non-empty 1-d array of save times, got shape {ts.shape}")
    if not np.all(np.isfinite(ts)):
        raise InputError("ts has non-finite save times")
    if np.any(np.diff(ts) < 0):
        raise InputError("ts must be non-decreasing")
    if ts[0] < t0 or ts[-1] > t1:
        raise InputError(f"ts must lie within [t0, t1] = [{t0}, {t1}]")
    return ts


class _Setup(NamedTuple):
    solver: diffrax.AbstractSolver
    controller: diffrax.AbstractStepSizeController
    atol: float
    observers: dict
    transitions: tuple
    names: list
    y0: PyTree
    root_finder: "_IntervalBisection"
    directions: jax.Array
    solver_state: PyTree
    controller_state: PyTree


def _prepare(
    flow: GradientFlow, *, t0: float, t1: float, solver, rtol, atol, observers, transitions,
    max_steps, dt0, controller,
) -> _Setup:
    """Validate a solve's inputs and build what its segments take; shared with `gflow.sweep`.

    Every check here raises a one-line `InputError` before anything is compiled.
    """
    if not (math.isfinite(t0) and math.isfinite(t1)):
        raise InputError(f"t0 and t1 must be finite, got t0={t0}, t1={t1}")
    if not t1 > t0:
        raise InputError(f"t1 must be greater than t0, got t0={t0}, t1={t1}")
    if not (isinstance(rtol, (int, float)) and rtol > 0 and math.isfinite(rtol)):
        raise InputError(f"rtol must be a positive number, got {rtol!r}")
    if atol is not None and not (
        isinstance(atol, (int, float)) and atol > 0 and math.isfinite(atol)
    ):
        raise InputError(f"atol must be a positive number or None, got {atol!r}")
    if int(max_steps) != max_steps or max_steps < 1:
        raise InputError(f"max_steps must be a positive integer, got {max_steps!r}")
    solver = make_solver(solver, rtol)
    observers = {"loss": flow.loss} | dict(observers or {})
    for name, obs in observers.items():
        if not isinstance(name, str) or not callable(obs):
            raise InputError(f"observer {name!r} must be a callable observer(model, data)")
    transitions = tuple(transitions)
    for tr in transitions:
        if not isinstance(tr, Transition):
            raise InputError(f"transitions must be gflow.Transition objects, got {tr!r}")
    names = [tr.name for tr in transitions]
    if len(set(names)) != len(names):
        raise InputError(f"transition names must be unique, got {names}")
    y0 = flow.params
    host_y0 = jax.device_get(y0)  # one transfer for the finite check and the default atol
    _check_finite(host_y0, "the initial state")
    _check_finite(flow.data, "the data")

    if atol is None:
        atol = _default_atol(host_y0, rtol)
    # Tolerances travel as arrays, not Python floats: floats are static to equinox's jit, and a
    # new init (hence a new default atol) or a new t1 would otherwise recompile the program.
    as_array = _host_array
    if controller is None:
        if is_adaptive(solver):
            # A step below dtmin means the flow is singular there (finite-time blow-up): float64
            # time cannot approach a blow-up time closer than ~1e-16 relative, so the state
            # itself never overflows and only the step size tells.
            controller = diffrax.PIDController(
                rtol=as_array(rtol), atol=as_array(atol), dtmin=as_array(_DTMIN * (t1 - t0))
            )
        elif dt0 is None:
            raise InputError(
                f"solver {solver_name(solver)!r} has no error estimate: pass dt0 for a fixed step"
            )
        else:
            controller = diffrax.ConstantStepSize()
    # Root finding on the dense output: well below the solver's own error, so the located time
    # carries the solver's accuracy and not the root finder's.
    # Never below a few units of roundoff of the state's dtype (float32 under `--x32`), or the
    # bisection could not end.
    dtype = jnp.result_type(*jtu.tree_leaves(y0)) if jtu.tree_leaves(y0) else float
    root_rtol = max(1e-3 * rtol, 8 * float(jnp.finfo(dtype).eps))
    root_finder = _IntervalBisection(
        rtol=as_array(root_rtol), atol=as_array(root_rtol * max(abs(t1), abs(t0), 1.0))
    )
    directions = _host_array(
        [{True: 1.0, False: -1.0, None: 0.0}[tr.direction] for tr in transitions] + [0.0]
    )
    # Start every segment, the first included, with solver and controller states of one
    # structure, so that all segments run one compiled program.
    solver_state, controller_state = _initial_states(flow, solver, controller, y0, t0, t1)
    return _Setup(
        solver, controller, float(atol), observers, transitions, names, y0, root_finder,
        directions, solver_state, controller_state,
    )


def status_message(status: str, t_final: float, max_steps: int) -> str:
    """The one-line explanation of a non-`"completed"` status (empty when completed)."""
    if status == "completed":
        return ""
    if status == "max_steps":
        return f"reached max_steps={max_steps} before t1"
    if status == "nonfinite":
        return f"the state diverged near t={t_final:.16g} (finite-time blow-up?)"
    if status == "dt_min":
        return (
            f"the step size collapsed near t={t_final:.16g}: the flow is singular there "
            "(finite-time blow-up or a non-smooth loss)"
        )
    return "the solver failed"


def solve(
    flow: GradientFlow,
    t1: float,
    *,
    t0: float = 0.0,
    solver: str | diffrax.AbstractSolver = "auto",
    rtol: float = 1e-8,
    atol: float | None = None,
    ts: ArrayLike | None = None,
    observers: Mapping[str, Callable] | None = None,
    transitions: Sequence[Transition] = (),
    max_steps: int = 100_000,
    progress: bool | str = False,
    dt0: float | None = None,
    controller: diffrax.AbstractStepSizeController | None = None,
    certify: bool = False,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_steps: int | None = None,
    resume: bool = False,
) -> Trajectory:
    """Integrate the gradient flow from `t0` to `t1`.

    **Arguments:**

    - `flow`: the `GradientFlow` to integrate.
    - `t1`: end time (`t1 > t0`).
    - `t0`: start time.
    - `solver`: `"auto"` (Tsit5 or DOP853 by `rtol`, see `gflow.auto_solver`), a solver name
        (`"tsit5"`, `"dop853"`, `"dopri5"`, `"dopri8"`, `"bosh3"`, `"heun"`, `"euler"`,
        `"kvaerno5"`, ...) or any diffrax solver.
    - `rtol`: relative tolerance of the PID step-size controller.
    - `atol`: absolute tolerance; default `rtol` times the RMS size of the smallest non-zero
        trainable leaf at `t0`, so a small initialization is resolved relative to its own size.
    - `ts`: save times within `[t0, t1]`; default a 200-point `log_grid(t0, t1)`.
    - `observers`: `{name: observer(model, data)}` evaluated inside the compiled solve at each
        save time. The loss is always recorded as `"loss"` unless that name is taken.
    - `transitions`: `Transition`s, located in order by root finding.
    - `max_steps`: step limit (accepted plus rejected) of each segment between transitions.
    - `progress`: show one progress bar over flow time for the whole solve (`True`, or a
        label to show on it).
    - `dt0`: initial step; required for `"euler"`, otherwise chosen automatically.
    - `controller`: a diffrax step-size controller replacing the default
        `PIDController(rtol, atol)`.
    - `certify`: solve again with the same solver at 100× smaller `rtol` and `atol` (the
        default controller), and record, as `Trajectory.errors`, twice the difference between
        the two runs: an error estimate for every transition time and every observable.
    - `checkpoint`: a file to which the solve's state is written (atomically) at every segment
        boundary: after each transition, every `checkpoint_steps` steps, and at the end. With
        `certify`, the reference solve writes next to it (`<stem>-reference<suffix>`).
    - `checkpoint_steps`: cut the solve into segments of at most this many steps, so that a
        long run without transitions is checkpointed too. The cuts are part of the solve (they
        restart the step-size controller's initial-step heuristic), so compare runs with the
        same value. `max_steps` is then checked at the cuts.
    - `resume`: continue from `checkpoint` if that file exists (it must come from this same
        problem: init, data, save times and settings are checked). The result equals, bit for
        bit, that of a run never interrupted; a checkpoint written at the end returns at once.

    **Returns:**

    A `Trajectory`. Failure is data: a run that exceeds `max_steps` or diverges returns what it
    computed up to that point, with `status` naming what happened.
    """
    if not isinstance(flow, GradientFlow):
        raise InputError(f"solve expects a gflow.GradientFlow, got {type(flow).__name__}")
    t0, t1 = float(t0), float(t1)
    setup = _prepare(
        flow, t0=t0, t1=t1, solver=solver, rtol=rtol, atol=atol, observers=observers,
        transitions=transitions, max_steps=max_steps, dt0=dt0, controller=controller,
    )
    solver, controller, atol = setup.solver, setup.controller, setup.atol
    observers, transitions, names = setup.observers, setup.transitions, setup.names
    if certify and not is_adaptive(solver):
        raise InputError(f"certify needs an adaptive solver, not {solver_name(solver)!r}")
    ts = _resolve_ts(ts, t0, t1)
    if checkpoint_steps is not None and not (
        int(checkpoint_steps) == checkpoint_steps and checkpoint_steps >= 1
    ):
        raise InputError(f"checkpoint_steps must be a positive integer, got {checkpoint_steps!r}")
    if resume and checkpoint is None:
        raise InputError("resume needs the checkpoint file to resume from")
    checkpoint = None if checkpoint is None else Path(checkpoint)
    y0, root_finder, directions = setup.y0, setup.root_finder, setup.directions
    conditions = tuple(tr.condition for tr in transitions)

    digests = None if checkpoint is None else _fingerprint(
        flow, setup, ts, t0, t1, rtol, max_steps, checkpoint_steps
    )
    carry = None
    if resume and checkpoint is not None and checkpoint.is_file():
        carry = read_checkpoint(
            checkpoint, digests, _checkpoint_like(flow, setup, observers, ts, t0, t1, dt0)
        )
    if carry is None:
        carry = Carry(
            t=t0, index=0, y=y0, solver_state=setup.solver_state,
            controller_state=setup.controller_state,
            made_jump=True,  # the first step evaluates the vector field afresh
            observables=None, found={name: math.nan for name in names},
            stats=dict(num_steps=0, num_accepted_steps=0, num_rejected_steps=0, segments=0,
                       compile_seconds=0.0, run_seconds=0.0),
            steps=0, status=None,
        )
    run = functools.partial(
        _run_segment, flow=flow, observers=observers, conditions=conditions,
        directions=directions, ts=ts, t1=t1, dt0=dt0, solver=solver, controller=controller,
        root_finder=root_finder, max_steps=int(max_steps),
        segment_steps=int(min(checkpoint_steps or max_steps, max_steps)), names=names,
    )
    bar = FlowTimeBar(t0, t1, desc=progress if isinstance(progress, str) else None)
    with bar if progress else contextlib.nullcontext():
        while carry.status is None:
            if progress:
                bar.segment(carry.t, names[carry.index] if carry.index < len(names) else "")
            carry = run(carry, meter=SegmentMeter() if progress else diffrax.NoProgressMeter())
            if checkpoint is not None:
                write_checkpoint(checkpoint, carry, digests)
        if progress:
            bar.segment(carry.t)

    stats = carry.stats | dict(
        vector_field_evaluations=vector_field_evaluations(
            solver, carry.stats["num_steps"], carry.stats["segments"], dt0 is not None
        ),
        dtype=str(jnp.result_type(*jtu.tree_leaves(y0))),
    )
    reached, status = carry.t, carry.status
    message = status_message(status, reached, max_steps)
    saved = (ts <= reached) if math.isfinite(reached) else np.zeros_like(ts, dtype=bool)
    keep = (lambda x: x) if saved.all() else (lambda x: x[saved])
    traj = Trajectory(
        ts=keep(ts),
        observables=jtu.tree_map(keep, carry.observables),
        transitions=dict(carry.found),
        final=flow.combine(carry.y),
        t0=t0,
        t1=t1,
        t_final=reached,
        status=status,
        message=message,
        stats=stats,
        solver=solver_name(solver),
        rtol=float(rtol),
        atol=float(atol),
    )
    if not certify:
        return traj
    # The reference: the same solver (the same compiled program) at 100x smaller tolerances.
    # Not Dopri8: its dense output is measured here at 50-150x its rtol between step ends,
    # which would pollute the observables at the save times.
    reference = solve(
        flow, t1, t0=t0, solver=solver, rtol=max(rtol / _CERTIFY_FACTOR, 1e-14),
        atol=atol / _CERTIFY_FACTOR, ts=ts, observers=observers, transitions=transitions,
        max_steps=max_steps, progress="certify: reference" if progress else False, dt0=dt0,
        checkpoint_steps=checkpoint_steps,
        checkpoint=None if checkpoint is None
        else checkpoint.with_name(f"{checkpoint.stem}-reference{checkpoint.suffix}"),
        resume=resume,
    )
    errors = error_estimates(traj, reference) | {"reference_stats": reference.stats}
    return dataclasses.replace(traj, errors=errors)


def _run_segment(
    carry: Carry, *, flow, observers, conditions, directions, ts, t1, dt0, solver, controller,
    root_finder, max_steps, segment_steps, names, meter,
) -> Carry:
    """Run one segment from `carry`: until `t1`, the next transition, a failure or
    `segment_steps` steps, whichever comes first; returns where the solve then stands."""
    args = (
        flow,
        observers,
        conditions,
        directions,
        _host_array(carry.index, int),
        carry.y,
        _host_array(carry.t),
        _host_array(t1),
        _host_array(np.clip(ts, carry.t, t1)),
        None if dt0 is None else _host_array(dt0),
        solver,
        controller,
        root_finder,
        segment_steps,
        meter,
        carry.solver_state,
        carry.controller_state,
        _host_array(carry.made_jump, bool),
    )
    compiled, leaves, compile_seconds = _compiled_segment(*args)
    start = time.perf_counter()
    out = compiled(leaves)
    # What the host reads, in one transfer; the state and solver states stay on the device.
    host = jax.device_get({k: out[k] for k in ("t_end", "outcome", "event_mask", "stats",
                                               "made_jump", "observables")})
    stats = dict(carry.stats)
    stats["run_seconds"] += time.perf_counter() - start
    stats["compile_seconds"] += compile_seconds
    stats["segments"] += 1
    steps = int(host["stats"]["num_steps"])
    for k in ("num_steps", "num_accepted_steps", "num_rejected_steps"):
        stats[k] += int(host["stats"][k])

    t_end = float(host["t_end"])
    # Float buffers, so that save times never reached can hold nan.
    seg_obs = jtu.tree_map(lambda x: np.asarray(x, dtype=np.result_type(x.dtype, float)),
                           host["observables"])
    # Entries saved by this segment: save times it actually covered.
    covered = (ts >= carry.t) & (ts <= t_end)  # all False when t_end is nan
    observables = carry.observables
    if observables is None and covered.all():
        observables = seg_obs  # one segment covered every save time: no copy
    else:
        if observables is None:
            observables = jtu.tree_map(lambda x: np.full_like(x, np.nan), seg_obs)
        observables = jtu.tree_map(
            lambda old, new: np.where(covered.reshape((-1,) + (1,) * (new.ndim - 1)), new, old),
            observables,
            seg_obs,
        )
    after = carry._replace(
        t=t_end, y=out["y_end"], solver_state=out["solver_state"],
        controller_state=out["controller_state"], made_jump=bool(host["made_jump"]),
        observables=observables, stats=stats, steps=carry.steps + steps,
    )

    outcome = _OUTCOMES[int(host["outcome"])]
    if outcome == "event_occurred":
        diverged = host["event_mask"][0] if conditions else host["event_mask"]
        if bool(diverged):
            return after._replace(status="nonfinite")
        found = dict(carry.found)
        found[names[carry.index]] = t_end
        return after._replace(
            index=carry.index + 1,
            found=found,
            steps=0,
            # The event cut the step: the first-same-as-last stage is stale.
            made_jump=True,
            status="completed" if t_end >= t1 else None,
        )
    if outcome == "successful":
        status = "completed"
    elif outcome == "max_steps_reached":
        # A checkpoint cut (segment_steps < max_steps) goes on from the last step's end.
        status = "max_steps" if after.steps >= max_steps else None
    elif outcome == "dt_min_reached":
        status = "dt_min"
    else:
        status = "failed"
    if status not in (None, "completed"):
        # A failure after the state left float range (e.g. steps collapsing on NaNs) is that.
        if not float(_squared_norm(after.y)) < _diverged_squared_norm(after.y):
            status = "nonfinite"
    return after._replace(status=status)


def _fingerprint(flow, setup, ts, t0, t1, rtol, max_steps, checkpoint_steps) -> dict[str, str]:
    """Digests of what determines a solve's result, to refuse resuming another problem."""
    settings = dict(
        t0=t0, t1=t1, rtol=float(rtol), atol=setup.atol, max_steps=int(max_steps),
        checkpoint_steps=checkpoint_steps, solver=solver_name(setup.solver),
        controller=type(setup.controller).__name__, transitions=setup.names,
        directions=np.asarray(setup.directions), observers=sorted(setup.observers),
    )
    return fingerprint(
        initial_state=setup.y0, data=flow.data, save_times=ts, settings=list(settings.items())
    )


def _checkpoint_like(flow, setup, observers, ts, t0, t1, dt0) -> dict[str, PyTree]:
    """The structures a checkpoint of this solve holds, from abstract traces (no compiling)."""
    solver_state, controller_state = setup.solver_state, setup.controller_state
    if solver_state is None:
        solver_state = _solver_state_shapes(flow, setup.solver, setup.y0, t0, t1)
    if controller_state is None:
        term = diffrax.ODETerm(lambda t, y, args: flow.velocity(y))
        _, controller_state = jax.eval_shape(
            lambda y: setup.controller.init(
                term, t0, t1, y, dt0, None, setup.solver.error_order(term), setup.solver.func
            ),
            setup.y0,
        )
    observed = jax.eval_shape(lambda y: _observation(flow, observers)(t0, y, None), setup.y0)
    return dict(
        y=setup.y0,
        solver_state=solver_state,
        controller_state=controller_state,
        observables=jtu.tree_map(lambda s: jax.ShapeDtypeStruct((len(ts),) + s.shape, s.dtype),
                                 observed),
    )


# `certify` re-solves with tolerances this many times smaller; the estimate is the difference
# times the safety factor, which covers a reference error of up to half the run's.
_CERTIFY_FACTOR = 100.0
_CERTIFY_SAFETY = 2.0


def error_estimates(traj: Trajectory, reference: Trajectory) -> dict[str, Any]:
    """Error estimates of `traj` from a more accurate solve `reference` of the same flow.

    **Returns:**

    `{"reference_rtol", "transitions": {name: 2|t − t_ref|}, "observables": {name: twice the
    largest |difference| over the shared save times}, "overlapping": [names]}` (the factor 2
    covers a reference error of up to half the run's); a transition is
    listed in `overlapping` when its error estimate exceeds the gap to a neighbouring
    transition, so their order is not certain. Unreached transitions have no estimate (`nan`).
    """
    n = min(len(traj.ts), len(reference.ts))
    trans = {
        name: _CERTIFY_SAFETY * abs(t - reference.transitions.get(name, math.nan))
        for name, t in traj.transitions.items()
    }
    flat, flat_ref = _flat_names(traj.observables), _flat_names(reference.observables)
    obs = {}
    for name, values in flat.items():
        diff = np.abs(np.asarray(values[:n], dtype=float) - np.asarray(flat_ref[name][:n]))
        obs[name] = _CERTIFY_SAFETY * float(np.max(diff)) if diff.size else math.nan
    times = sorted((t, name) for name, t in traj.transitions.items() if math.isfinite(t))
    overlapping = set()
    for (ta, a), (tb, b) in zip(times[:-1], times[1:]):
        if max(trans[a], trans[b]) > tb - ta:
            overlapping |= {a, b}
    return dict(
        reference_rtol=reference.rtol,
        transitions=trans,
        observables=obs,
        overlapping=sorted(overlapping),
    )
