"""`SolveSpec`: what a solve integrates, and how, as one validated object.

Every entry point (`gflow.solve`, `gflow.sweep`, `gflow.sensitivity`, `gflow.critical_points`,
certify, checkpoints' fingerprint and both command lines) runs a `SolveSpec`, built once by
`SolveSpec.from_options` from the keyword arguments `gflow.solve` takes: so two entry points
given the same options integrate the same problem, step for step. A `Trajectory` keeps the
spec it ran (`Trajectory.spec`), so a re-solve is the same solve.
"""

import dataclasses
import functools
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import ArrayLike, PyTree, Scalar

from . import _defaults, _engine as engine
from ._errors import InputError
from ._flow import GradientFlow
from ._grids import log_grid
from ._precision import FLOAT64, Precision
from ._root_find import BracketingSecant
from ._solvers import is_adaptive, make_solver, solver_name
from ._validate import check_functions, check_settings, check_steps, check_times

# The one default of each option (`gflow.solve`, `gflow.sweep`, `gflow.sensitivity` and the
# `[solve]` table of a config all take these).
DEFAULT_SOLVER = _defaults.SOLVER
DEFAULT_RTOL = _defaults.RTOL
DEFAULT_MAX_STEPS = _defaults.MAX_STEPS
DEFAULT_SAVE_POINTS = _defaults.SAVE_POINTS
DEFAULT_PCOEFF = _defaults.PCOEFF
DEFAULT_ICOEFF = _defaults.ICOEFF

_NO_PROGRESS = diffrax.NoProgressMeter()

# Smallest step, relative to t1 - t0, before a solve is declared singular.
DTMIN = 1e-12

# certify's reference: tolerances this many times smaller, rtol not below this.
_MIN_RTOL = 1e-14


class Transition(eqx.Module):
    """A stage transition, marked by a sign change of `condition` along the flow.

    **Arguments:**

    - `name`: the key of its time in `Trajectory.transitions`.
    - `condition`: `condition(model, data) -> scalar`; the transition is the first time after
        the previous transition (transitions are detected in order) at which it changes sign.
        Its time is located by root finding on the solver's dense output.
    - `direction`: `None` for either sign change, `True` for an upcrossing (negative to positive)
        only, `False` for a downcrossing only.
    - `terminal`: end the solve there (status `"completed"`, `Trajectory.t_final` the
        transition's time; later save times are not reached), e.g. `gflow.converged`.
    """

    name: str
    condition: Callable[[Any, Any], Scalar]
    direction: bool | None = None
    terminal: bool = False

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
        if not isinstance(self.terminal, bool):
            raise InputError(f"transition {self.name!r}: terminal must be True or False, "
                             f"got {self.terminal!r}")


def _host_array(x, dtype=float) -> np.ndarray:
    """A host array in JAX's default dtype for `dtype` (float64 with gflow; float32 under x32).

    Tolerances travel as arrays, not Python floats: floats are static to the engine's program,
    and a new init (hence a new default atol), a new t1 or certify's tighter tolerances would
    otherwise recompile it.
    """
    return np.asarray(x, dtype=jax.dtypes.canonicalize_dtype(dtype))


def default_atol(params: PyTree, rtol: float) -> float:
    """`rtol` times the RMS size of the smallest non-zero trainable leaf at t0.

    This resolves every parameter group relative to its own initial scale: a 1e-6-scale
    initialization is not swamped by an absolute tolerance set for O(1) states.
    """
    sizes = [
        # In float64 whatever the leaf's dtype: a float32 leaf is promoted before the solve,
        # and its tolerance must be the promoted leaf's.
        float(np.sqrt(np.mean(np.square(np.asarray(leaf, dtype=np.float64)))))
        for leaf in jtu.tree_leaves(params)
        if np.size(leaf) > 0
    ]
    sizes = [s for s in sizes if s > 0]
    return rtol * (min(sizes) if sizes else 1.0)


# Equinox modules cost tens of microseconds to build; these are immutable, so a solve reuses
# the ones an earlier solve with the same settings built (bounded caches).
@functools.lru_cache(maxsize=64)
def _pid_controller(rtol: float, atol: float, dtmin: float, dtype, pcoeff: float,
                    icoeff: float) -> diffrax.PIDController:
    # `dtype` (JAX's default float) is part of the key: the arrays are built in it. A step
    # below dtmin means the flow is singular there (finite-time blow-up): float64 time cannot
    # approach a blow-up time closer than ~1e-16 relative, so the state itself never
    # overflows and only the step size tells.
    return diffrax.PIDController(
        rtol=_host_array(rtol), atol=_host_array(atol), dtmin=_host_array(dtmin),
        pcoeff=pcoeff, icoeff=icoeff,
    )


@functools.lru_cache(maxsize=64)
def _root_finder(rtol: float, atol: float, dtype) -> BracketingSecant:
    return BracketingSecant(rtol=_host_array(rtol), atol=_host_array(atol))


def _adaptive_core(controller) -> diffrax.AbstractAdaptiveStepSizeController | None:
    """The controller that holds the tolerances: `controller`, or the one a
    `ClipStepSizeController` wraps; `None` for a controller without tolerances."""
    if isinstance(controller, diffrax.ClipStepSizeController):
        return _adaptive_core(controller.controller)
    if isinstance(controller, diffrax.AbstractAdaptiveStepSizeController):
        return controller
    return None


def _with_tolerances(controller, rtol, atol):
    """`controller` with its (or its wrapped controller's) tolerances replaced."""
    if isinstance(controller, diffrax.ClipStepSizeController):
        return eqx.tree_at(lambda c: c.controller, controller,
                           _with_tolerances(controller.controller, rtol, atol))
    return eqx.tree_at(lambda c: (c.rtol, c.atol), controller,
                       (_host_array(rtol), _host_array(atol)))


def _frozen(x: np.ndarray) -> np.ndarray:
    """A read-only copy of `x`: what an immutable spec holds (a caller's array may change)."""
    x = np.array(x)
    x.flags.writeable = False
    return x


# Specs built by `SolveSpec.from_options`, by `_options_key`.
_SPECS = engine.LRU(64)
_PLAIN = frozenset({type(None), bool, int, float, str})


def _option_key(value, depth: int = 0):
    """A hashable key of one option's value, equal only for values that give the same spec;
    raises `TypeError` where there is none."""
    if type(value) in _PLAIN:  # the common cases first: `isinstance` on an ABC is slow
        return (type(value), value)
    if type(value) is np.ndarray and depth == 0 and value.dtype.kind in "biuf":
        return ("array", value.dtype.str, value.shape, value.tobytes())
    if value is None or isinstance(value, (bool, numbers.Number, str)):
        return (type(value), value)
    numbers_only = isinstance(value, (np.ndarray, jax.Array)) or (
        isinstance(value, (list, tuple)) and all(isinstance(v, numbers.Number) for v in value))
    if numbers_only and depth == 0:
        x = np.asarray(value)
        if x.dtype.kind not in "biuf":
            raise TypeError
        return ("array", x.dtype.str, x.shape, x.tobytes())
    if isinstance(value, Mapping):
        return ("dict", tuple((k, _option_key(v, 1)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return ("seq", tuple(_option_key(v, 1) for v in value))
    if isinstance(value, Transition) or callable(value) or isinstance(
            value, (diffrax.AbstractSolver, diffrax.AbstractStepSizeController, Precision)):
        hash(value)  # a function, or a module of hashable fields (arrays are not)
        return (type(value), value)
    raise TypeError


def options_key(t1, options: dict):
    """A hashable key of `t1` and the keyword `options` of `SolveSpec.from_options`, equal
    only for options that give the same spec on the same flow (`None` where there is none):
    every option's value (arrays by their bytes) and JAX's default float dtype (the spec's
    arrays are built in it)."""
    try:
        key = (_option_key(t1),) + tuple((k, _option_key(v)) for k, v in options.items())
        key += (jax.dtypes.canonicalize_dtype(jnp.float64),)
        hash(key)
    except (TypeError, ValueError, OverflowError):
        return None
    return key


def _options_key(flow: GradientFlow, t1, options: dict):
    """The key under which `from_options` keeps the spec of these options (`None`: not kept):
    `options_key`, and, where the default `atol` is used, its value on `flow`."""
    key = options_key(t1, options)
    if key is not None and options["atol"] is None and options["stepsize_controller"] is None \
            and options["controller"] is None and isinstance(options["rtol"], numbers.Real):
        try:
            key += (default_atol(engine.to_host(flow.params), float(options["rtol"])),)
        except (TypeError, ValueError, OverflowError):
            return None
    return key


def _times(ts, what: str, noun: str) -> np.ndarray:
    """`ts` as a 1-d float64 array, or an `InputError` naming `what` they are (`noun`)."""
    try:
        given = np.asarray(ts)
        if np.iscomplexobj(given):
            raise TypeError
        ts = np.asarray(given, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a 1-d array of real {noun}, got {ts!r:.60}") from None
    if ts.ndim != 1:
        raise InputError(f"{what} must be a 1-d array of {noun}, got shape {ts.shape}")
    return ts


def _save_times(ts, t0: float, t1: float) -> np.ndarray:
    if ts is None:
        return log_grid(t0, t1, DEFAULT_SAVE_POINTS)
    ts = _times(ts, "ts", "save times")
    if ts.size == 0:
        raise InputError(f"ts must be a non-empty 1-d array of save times, got shape {ts.shape}")
    return ts


def _check_observer_dict(observers, field: str, one: str) -> None:
    """`observers` (the spec's `field`) is a dict of name: observer(model, data)."""
    if not isinstance(observers, Mapping):
        raise InputError(f"{field} must be a dict of name: observer(model, data), got "
                         f"{type(observers).__name__}")
    for name, obs in observers.items():
        if not isinstance(name, str) or not callable(obs):
            raise InputError(f"{one} {name!r} must be callable as observer(model, data)")


def _check_snapshots(spec: "SolveSpec") -> None:
    """The snapshot observers and their chosen times, as `SolveSpec` holds them."""
    _check_observer_dict(spec.snapshots, "snapshots", "snapshot")
    clash = sorted(set(spec.snapshots) & ({"loss"} | set(spec.observers)))
    if clash:
        raise InputError(f"snapshot {clash[0]!r} is also an observer's name: an observable "
                         "is either observed at every save time or snapshot, not both")
    ts = spec.snapshot_ts
    if not (isinstance(ts, np.ndarray) and ts.ndim == 1 and ts.dtype == np.float64):
        raise InputError("snapshot_ts must be a 1-d float64 array of times")
    if ts.size and not spec.snapshots:
        raise InputError("snapshot_ts given without snapshots to take there")
    if not np.all(np.isfinite(ts)):
        raise InputError("snapshot_ts has non-finite times")
    if np.any(np.diff(ts) <= 0):
        raise InputError("snapshot_ts must be increasing")
    if ts.size and (ts[0] < spec.t0 or ts[-1] > spec.t1):
        outside = ts[(ts < spec.t0) | (ts > spec.t1)][0]
        raise InputError(f"snapshot_ts: {outside:g} lies outside [t0, t1] = "
                         f"[{spec.t0:g}, {spec.t1:g}]")


class SolveSpec(eqx.Module):
    """A solve's specification, in diffrax's vocabulary: what `gflow.solve` integrates, with
    which solver and step-size controller, where it saves and what it records.

    Build it with `SolveSpec.from_options(flow, t1, **options)` (the keyword arguments of
    `gflow.solve`, with their defaults: `"auto"` is resolved there, the default `atol` is
    scaled to `flow`'s initial state), then pass it to `gflow.solve(flow, spec)`,
    `gflow.sweep(..., spec=spec)` or `gflow.sensitivity(..., spec=spec)`. Change a field with
    `dataclasses.replace(spec, ts=...)` (checked again).

    **Fields:**

    - `solver`: a diffrax solver.
    - `stepsize_controller`: a diffrax step-size controller; gflow's default is
        `PIDController(rtol, atol, dtmin=1e-12 (t1 - t0))`.
    - `t0`, `t1`: the interval.
    - `ts`: the save times (float64, non-decreasing, within `[t0, t1]`).
    - `dt0`: the first step, or `None` to let the controller choose.
    - `max_steps`: step limit (accepted plus rejected) between two transitions.
    - `observers`: `{name: observer(model, data)}` recorded at the save times (the loss is
        added as `"loss"` by the solve unless the name is taken).
    - `snapshots`: `{name: observer(model, data)}` of costly observables (full spectra,
        cosine matrices, singular vectors) evaluated only where they are read: at `t0`, at
        each located transition, at the chosen `snapshot_ts` and at `t1`, never at the
        other save times (`Trajectory.snapshots`). Names differ from the observers'.
    - `snapshot_ts`: the chosen times of the snapshots (float64, increasing, within
        `[t0, t1]`; `t0` and `t1` are always taken besides).
    - `transitions`: the `Transition`s, located in order.
    - `checkpoint_steps`: cut the solve every this many steps (a checkpoint, a progress
        update or a Ctrl-C check between cuts; the cuts do not change the steps), or `None`.
    - `precision`: a `gflow.Precision`: in which types the velocity is computed (`"float64"`,
        `"mixed"` or `"float32"`; `from_options` refuses an `rtol` below the policy's floor).
    """

    solver: diffrax.AbstractSolver
    stepsize_controller: diffrax.AbstractStepSizeController
    t0: float
    t1: float
    ts: np.ndarray
    dt0: float | None = None
    max_steps: int = DEFAULT_MAX_STEPS
    observers: dict = dataclasses.field(default_factory=dict)
    transitions: tuple = ()
    checkpoint_steps: int | None = None
    precision: Precision = FLOAT64
    snapshots: dict = dataclasses.field(default_factory=dict)
    snapshot_ts: np.ndarray = dataclasses.field(
        default_factory=lambda: np.zeros(0, dtype=np.float64))

    def __check_init__(self):
        if not isinstance(self.solver, diffrax.AbstractSolver):
            raise InputError(f"solver must be a diffrax solver, got {self.solver!r}")
        if not isinstance(self.stepsize_controller, diffrax.AbstractStepSizeController):
            raise InputError(
                f"stepsize_controller must be a diffrax step-size controller, got "
                f"{self.stepsize_controller!r}"
            )
        check_times(self.t0, self.t1)
        check_steps(t0=self.t0, t1=self.t1, max_steps=self.max_steps, dt0=self.dt0)
        ts = self.ts
        if not (isinstance(ts, np.ndarray) and ts.ndim == 1 and ts.size
                and ts.dtype == np.float64):
            raise InputError("ts must be a non-empty 1-d float64 array of save times")
        if not np.all(np.isfinite(ts)):
            raise InputError("ts has non-finite save times")
        if np.any(np.diff(ts) < 0):
            raise InputError("ts must be non-decreasing")
        if ts[0] < self.t0 or ts[-1] > self.t1:
            raise InputError(f"ts must lie within [t0, t1] = [{self.t0}, {self.t1}]")
        _check_observer_dict(self.observers, "observers", "observer")
        _check_snapshots(self)
        if not isinstance(self.transitions, tuple):
            raise InputError("transitions must be a tuple of gflow.Transition objects")
        for tr in self.transitions:
            if not isinstance(tr, Transition):
                raise InputError(f"transitions must be gflow.Transition objects, got {tr!r}")
        names = [tr.name for tr in self.transitions]
        if len(set(names)) != len(names):
            raise InputError(f"transition names must be unique, got {names}")
        steps = self.checkpoint_steps
        if steps is not None and (isinstance(steps, bool) or not isinstance(
                steps, numbers.Integral) or steps < 1):
            raise InputError(f"checkpoint_steps must be a positive integer, got {steps!r}")
        if isinstance(self.stepsize_controller, diffrax.ConstantStepSize):
            if self.dt0 is None:
                raise InputError("a constant step size needs dt0")
        elif not is_adaptive(self.solver):
            raise InputError(
                f"solver {solver_name(self.solver)!r} has no error estimate: pass dt0 for a "
                "fixed step"
            )

    @classmethod
    def from_options(
        cls,
        flow: GradientFlow,
        t1: float,
        *,
        t0: float = 0.0,
        solver: str | diffrax.AbstractSolver = DEFAULT_SOLVER,
        rtol: float = DEFAULT_RTOL,
        atol: float | None = None,
        ts: ArrayLike | None = None,
        observers: Mapping[str, Callable] | None = None,
        transitions: Sequence[Transition] = (),
        max_steps: int = DEFAULT_MAX_STEPS,
        dt0: float | None = None,
        stepsize_controller: diffrax.AbstractStepSizeController | None = None,
        pcoeff: float = DEFAULT_PCOEFF,
        icoeff: float = DEFAULT_ICOEFF,
        checkpoint_steps: int | None = None,
        controller: diffrax.AbstractStepSizeController | None = None,
        precision: "str | Precision" = "float64",
        snapshots: Mapping[str, Callable] | None = None,
        snapshot_ts: ArrayLike | None = None,
    ) -> "SolveSpec":
        """The spec of `gflow.solve(flow, t1, **options)`, every option checked here, once,
        before anything is compiled.

        **Arguments:** as `gflow.solve`: `solver` a name (`"auto"`: `gflow.auto_solver(rtol)`)
        or a diffrax solver; the default `stepsize_controller` is a `PIDController(rtol, atol,
        dtmin, pcoeff, icoeff)` whose `atol` defaults to `rtol` times the RMS size of
        `flow`'s smallest non-zero trainable leaf. A given `stepsize_controller` (`controller`
        is its alias) brings its own tolerances: `rtol`, `atol`, `pcoeff`, `icoeff` then only
        choose `"auto"`'s solver. `precision`: a policy's name or a `gflow.Precision`; an
        `rtol` below its floor (`Precision.rtol_floor(flow)`) is refused. `snapshots` and
        `snapshot_ts` (any order; repeats merged): see the fields.

        **Returns:**

        A `SolveSpec`.
        """
        if not isinstance(flow, GradientFlow):
            raise InputError(f"solve expects a gflow.GradientFlow, got {type(flow).__name__}")
        options = dict(
            t0=t0, solver=solver, rtol=rtol, atol=atol, ts=ts, observers=observers,
            transitions=transitions, max_steps=max_steps, dt0=dt0,
            stepsize_controller=stepsize_controller, pcoeff=pcoeff, icoeff=icoeff,
            checkpoint_steps=checkpoint_steps, controller=controller, precision=precision,
            snapshots=snapshots, snapshot_ts=snapshot_ts,
        )
        # Options equal to an earlier call's give an equal spec: it is reused (a spec is
        # immutable, its arrays read-only), and only what depends on the flow is checked again.
        key = _options_key(flow, t1, options)
        spec = _SPECS.get(key)
        if spec is None:
            spec = _SPECS.put(key, cls._checked(flow, t1, **options))
        check_functions(flow, observers=spec.observers | spec.snapshots,
                        transitions=spec.transitions)
        if math.isfinite(spec.rtol):
            # Through the class: equinox wraps a method looked up on an instance in a new
            # module (~35 µs).
            Precision.check_rtol(spec.precision, flow, spec.rtol)
        return spec

    @classmethod
    def _checked(cls, flow, t1, *, t0, solver, rtol, atol, ts, observers, transitions,
                 max_steps, dt0, stepsize_controller, pcoeff, icoeff, checkpoint_steps,
                 controller, precision, snapshots, snapshot_ts) -> "SolveSpec":
        """`from_options`' spec, every option checked, but not against the flow's functions."""
        if controller is not None:
            if stepsize_controller is not None:
                raise InputError("give stepsize_controller or its alias controller, not both")
            stepsize_controller = controller
        check_settings(t0=t0, t1=t1, rtol=rtol, atol=atol, max_steps=max_steps, dt0=dt0)
        t0, t1, rtol = float(t0), float(t1), float(rtol)
        for label, value, low_open in (("pcoeff", pcoeff, False), ("icoeff", icoeff, True)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) \
                    or not math.isfinite(value) or not (value > 0 if low_open else value >= 0) \
                    or value > 1:
                raise InputError(f"{label} must be a number in {'(0' if low_open else '[0'}, 1],"
                                 f" got {value!r}")
        if isinstance(transitions, Transition):
            transitions = (transitions,)
        try:
            transitions = tuple(transitions)
        except TypeError:
            raise InputError("transitions must be a list of gflow.Transition objects") from None
        observers = dict(observers or {}) if isinstance(observers, Mapping | None) else observers
        snapshots = dict(snapshots or {}) if isinstance(snapshots, Mapping | None) else snapshots
        snapshot_ts = (np.zeros(0) if snapshot_ts is None
                       else np.unique(_times(snapshot_ts, "snapshot_ts", "times")))
        solver = make_solver(solver, rtol)
        if stepsize_controller is None:
            if is_adaptive(solver):
                if atol is None:
                    atol = default_atol(engine.to_host(flow.params), rtol)
                stepsize_controller = _pid_controller(
                    rtol, float(atol), DTMIN * (t1 - t0),
                    jax.dtypes.canonicalize_dtype(jnp.float64), float(pcoeff), float(icoeff))
            elif dt0 is None:
                raise InputError(
                    f"solver {solver_name(solver)!r} has no error estimate: pass dt0 for a "
                    "fixed step"
                )
            else:
                stepsize_controller = diffrax.ConstantStepSize()
        elif _adaptive_core(stepsize_controller) is not None:
            core = _adaptive_core(stepsize_controller)
            # Floats are static to the program: as arrays, one program serves every tolerance.
            stepsize_controller = _with_tolerances(
                stepsize_controller, float(core.rtol), float(core.atol))
        spec = cls(
            solver=solver,
            stepsize_controller=stepsize_controller,
            t0=t0,
            t1=t1,
            ts=_frozen(_save_times(ts, t0, t1)),
            dt0=None if dt0 is None else float(dt0),
            max_steps=int(max_steps),
            observers=observers,
            transitions=transitions,
            checkpoint_steps=None if checkpoint_steps is None else checkpoint_steps,
            precision=Precision.of(precision),
            snapshots=snapshots,
            snapshot_ts=_frozen(snapshot_ts),
        )
        return spec

    @property
    def rtol(self) -> float:
        """The controller's relative tolerance (`nan` for a constant step)."""
        core = _adaptive_core(self.stepsize_controller)
        return math.nan if core is None else float(core.rtol)

    @property
    def atol(self) -> float:
        """The controller's absolute tolerance (`nan` for a constant step)."""
        core = _adaptive_core(self.stepsize_controller)
        return math.nan if core is None else float(core.atol)

    def tightened(self, factor: float) -> "SolveSpec":
        """The same solve with the controller's `rtol` and `atol` divided by `factor` (`rtol`
        not below 1e-14): certify's reference, with the same solver and controller type and
        settings (the same compiled program)."""
        if _adaptive_core(self.stepsize_controller) is None:
            raise InputError(
                f"certify needs an adaptive solver and a step-size controller with rtol and "
                f"atol, not {solver_name(self.solver)!r} with "
                f"{type(self.stepsize_controller).__name__}"
            )
        controller = _with_tolerances(self.stepsize_controller,
                                      max(self.rtol / factor, _MIN_RTOL), self.atol / factor)
        return dataclasses.replace(self, stepsize_controller=controller)

    def with_loss(self, flow: GradientFlow) -> dict:
        """The observers a solve of `flow` records: the loss as `"loss"`, then the spec's."""
        return {"loss": flow.loss} | dict(self.observers)

    def all_snapshot_ts(self) -> np.ndarray:
        """Where the snapshots are taken besides the transitions: `t0`, the chosen
        `snapshot_ts` and `t1` (none without snapshots)."""
        if not self.snapshots:
            return np.zeros(0, dtype=np.float64)
        return np.union1d(np.asarray([self.t0, self.t1]), self.snapshot_ts)

    def plan(self, flow: GradientFlow, observers: dict | None = None,
             segment_steps: int | None = None,
             meter: diffrax.AbstractProgressMeter | None = None,
             snapshots: dict | None = None) -> engine.Plan:
        """The engine's `Plan` for `flow` (its trainable leaves in the solve's dtype), recording
        `observers` (default: `with_loss(flow)`) and `snapshots` (default: the spec's), cut
        every `segment_steps` steps (default: `checkpoint_steps`), with diffrax's progress
        `meter` in each segment (default none)."""
        dtype = jnp.result_type(*jtu.tree_leaves(flow.params))
        # Root finding on the dense output: well below the solver's own error, so the located
        # time carries the solver's accuracy and not the root finder's. Never below a few units
        # of roundoff of the state's dtype (float32 under `--x32`), or it could not end.
        rtol = self.rtol if math.isfinite(self.rtol) else DEFAULT_RTOL
        root_rtol = max(1e-3 * rtol, 8 * float(jnp.finfo(dtype).eps))
        target = jax.dtypes.canonicalize_dtype(jnp.float64)
        root_finder = _root_finder(root_rtol, root_rtol * max(abs(self.t1), abs(self.t0), 1.0),
                                   target)
        steps = segment_steps or self.checkpoint_steps or self.max_steps
        return engine.Plan(
            flow=flow,
            observers=self.with_loss(flow) if observers is None else observers,
            conditions=tuple(tr.condition for tr in self.transitions),
            directions=_host_array(
                [{True: 1.0, False: -1.0, None: 0.0}[tr.direction] for tr in self.transitions]
                + [0.0]
            ),
            terminal=np.asarray([tr.terminal for tr in self.transitions] + [False], dtype=bool),
            ts=_host_array(self.ts),
            t1=_host_array(self.t1),
            dt0=None if self.dt0 is None else _host_array(self.dt0),
            solver=self.solver,
            controller=self.stepsize_controller,
            root_finder=root_finder,
            meter=_NO_PROGRESS if meter is None else meter,
            max_steps=self.max_steps,
            segment_steps=int(min(steps, self.max_steps)),
            precision=self.precision,
            snapshots=dict(self.snapshots if snapshots is None else snapshots),
            snapshot_ts=_host_array(self.all_snapshot_ts() if (
                self.snapshots if snapshots is None else snapshots) else []),
        )

    def settings(self) -> dict[str, Any]:
        """What determines the solve's steps besides the flow and the save times, as plain
        data (functions by their qualified names): the checkpoints' fingerprint."""

        def describe(leaf):
            if callable(leaf) and not isinstance(leaf, eqx.Module):
                return f"{getattr(leaf, '__module__', '')}.{getattr(leaf, '__qualname__', '')}"
            if isinstance(leaf, (np.ndarray, jax.Array)):
                return np.asarray(leaf).tolist()
            return leaf

        def data(tree):
            return jtu.tree_map(describe, jtu.tree_leaves(tree))

        return dict(
            t0=self.t0, t1=self.t1, dt0=self.dt0, max_steps=self.max_steps,
            solver=[type(self.solver).__name__, data(self.solver)],
            controller=[type(self.stepsize_controller).__name__,
                        data(self.stepsize_controller)],
            transitions=[tr.name for tr in self.transitions],
            directions=[tr.direction for tr in self.transitions],
            terminal=[tr.terminal for tr in self.transitions],
            observers=sorted(self.observers),
            snapshots=sorted(self.snapshots),
            snapshot_ts=self.snapshot_ts.tolist(),
            precision=[self.precision.policy, self.precision.matmul],
        )
