"""`solve`: integrate a `GradientFlow`, record observables, locate transitions.

`solve` validates its inputs and builds a `gflow._engine.Plan`; the engine runs the whole solve
(every segment, every transition) as one compiled program; `solve` turns the result into a
`Trajectory`. Checkpoints are the engine's carry, written between calls of one segment each.
"""

import concurrent.futures
import contextlib
import dataclasses
import functools
import math
import os
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import threadpoolctl
from jaxtyping import ArrayLike, PyTree, Scalar

from . import _engine as engine
from ._checkpoint import Carry, fingerprint, read_checkpoint, write_checkpoint
from ._errors import InputError
from ._flow import GradientFlow
from ._grids import log_grid
from ._precision import FLOAT64, Precision
from ._progress import FlowTimeBar, SegmentMeter
from ._root_find import BracketingSecant
from ._solvers import is_adaptive, make_solver, solver_name
from ._trajectory import Trajectory, _flat_names
from ._validate import check_inputs, check_state_scale, check_times


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


_DEFAULT_SAVE_POINTS = 200

# Smallest step, relative to t1 - t0, before a solve is declared singular.
_DTMIN = 1e-12


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


def _promoted(flow: GradientFlow) -> GradientFlow:
    """`flow` with every trainable floating leaf in JAX's default float dtype.

    A float32 leaf under gflow's float64 default (a model built before `import gflow`, or with
    `jnp.float32`) would make diffrax's loop change the state's dtype; it is promoted, with a
    one-line warning naming it. Under `jax.enable_x64(False)` the default is float32.
    """
    target = jnp.dtype(jax.dtypes.canonicalize_dtype(jnp.float64))
    params, rest = eqx.partition(flow.model, flow.trainable)
    leaves = jtu.tree_flatten_with_path(params)[0]
    other = [
        (path, leaf) for path, leaf in leaves
        if jnp.issubdtype(jnp.result_type(leaf), jnp.floating) and jnp.result_type(leaf) != target
    ]
    if not other:
        return flow
    lower = [(p, x) for p, x in other if jnp.finfo(jnp.result_type(x)).bits < jnp.finfo(target).bits]
    if lower:
        path, leaf = lower[0]
        more = f" and {len(lower) - 1} more" if len(lower) > 1 else ""
        warnings.warn(
            f"gflow: the model's {jnp.result_type(leaf)} leaf {jtu.keystr(path) or 'model'}{more} "
            f"promoted to {target}, the dtype the solve runs in",
            stacklevel=3,
        )
    params = jtu.tree_map(
        lambda x: x.astype(target)
        if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x,
        params,
    )
    return eqx.tree_at(lambda f: f.model, flow, eqx.combine(params, rest))


def _controller_with_array_tolerances(controller):
    """`controller` with float `rtol`/`atol` (its own, or a wrapped controller's) as arrays:
    floats are static to the engine's program, arrays are data (one program for every
    tolerance, certify's reference included)."""
    if hasattr(controller, "rtol") and hasattr(controller, "atol"):
        return eqx.tree_at(
            lambda c: (c.rtol, c.atol), controller,
            (_host_array(controller.rtol), _host_array(controller.atol)),
        )
    inner = getattr(controller, "controller", None)
    if isinstance(inner, diffrax.AbstractStepSizeController):
        return eqx.tree_at(lambda c: c.controller, controller,
                           _controller_with_array_tolerances(inner))
    return controller


def _tolerances(controller) -> tuple[float, float] | None:
    """The `(rtol, atol)` a controller (or the controller it wraps) steps with, if any."""
    if hasattr(controller, "rtol") and hasattr(controller, "atol"):
        return float(controller.rtol), float(controller.atol)
    inner = getattr(controller, "controller", None)
    return None if inner is None else _tolerances(inner)


def _tightened(controller, factor: float):
    """The same controller with `rtol` and `atol` divided by `factor` (`rtol` not below
    1e-14): certify's reference keeps the user's controller type and settings."""
    if hasattr(controller, "rtol") and hasattr(controller, "atol"):
        rtol = max(float(controller.rtol) / factor, 1e-14)
        return eqx.tree_at(
            lambda c: (c.rtol, c.atol), controller,
            (_host_array(rtol), _host_array(float(controller.atol) / factor)),
        )
    inner = getattr(controller, "controller", None)
    if isinstance(inner, diffrax.AbstractStepSizeController):
        return eqx.tree_at(lambda c: c.controller, controller, _tightened(inner, factor))
    raise InputError(
        f"certify needs a step-size controller with rtol and atol, not {type(controller).__name__}"
    )


def _controller_alias(stepsize_controller, controller):
    """`stepsize_controller`, or `controller`, its alias (kept for older calls)."""
    if controller is None:
        return stepsize_controller
    if stepsize_controller is not None:
        raise InputError("give stepsize_controller or its alias controller, not both")
    return controller


# Equinox modules cost tens of microseconds to build; these are immutable, so a solve reuses
# the ones an earlier solve with the same settings built (bounded caches).
_NO_PROGRESS = diffrax.NoProgressMeter()


@functools.lru_cache(maxsize=64)
def _pid_controller(
    rtol: float, atol: float, dtmin: float, dtype, pcoeff: float = 0.0, icoeff: float = 1.0
) -> diffrax.PIDController:
    # `dtype` (JAX's default float) is part of the key: the arrays are built in it.
    # A step below dtmin means the flow is singular there (finite-time blow-up): float64 time
    # cannot approach a blow-up time closer than ~1e-16 relative, so the state itself never
    # overflows and only the step size tells.
    return diffrax.PIDController(
        rtol=_host_array(rtol), atol=_host_array(atol), dtmin=_host_array(dtmin),
        pcoeff=pcoeff, icoeff=icoeff,
    )


def pid_controller(
    flow: GradientFlow, rtol: float, atol: float | None = None, *, t1: float, t0: float = 0.0,
    pcoeff: float = 0.0, icoeff: float = 1.0,
) -> diffrax.PIDController:
    """The step-size controller `gflow.solve` uses by default, with diffrax's PID
    coefficients to choose: pass it as `stepsize_controller=` for PI control.

    **Arguments:**

    - `flow`: the `GradientFlow` (its initial state sets the default `atol`).
    - `rtol`, `atol`: tolerances; `atol` defaults as in `gflow.solve` (`rtol` times the RMS
        size of the smallest non-zero trainable leaf).
    - `t1`, `t0`: the solve's interval: the smallest step allowed is 1e-12 of it (a flow that
        needs less is singular there, and the solve says so).
    - `pcoeff`, `icoeff`: diffrax's `PIDController` coefficients (0 and 1: integral control,
        the default). PI control, e.g. 0.3 and 0.4, damps the step size's oscillation where
        stability, not accuracy, limits the steps.

    **Returns:**

    A `diffrax.PIDController`.
    """
    if atol is None:
        atol = _default_atol(engine.to_host(flow.params), rtol)
    return _pid_controller(float(rtol), float(atol), _DTMIN * (float(t1) - float(t0)),
                           jax.dtypes.canonicalize_dtype(jnp.float64), float(pcoeff),
                           float(icoeff))


@functools.lru_cache(maxsize=64)
def _root_finder(rtol: float, atol: float, dtype) -> BracketingSecant:
    return BracketingSecant(rtol=_host_array(rtol), atol=_host_array(atol))


class _Setup(NamedTuple):
    flow: GradientFlow  # with its trainable leaves in the solve's dtype
    plan: engine.Plan
    observers: dict
    transitions: tuple
    names: list
    rtol: float  # the controller's
    atol: float
    y0: PyTree
    ts: np.ndarray
    precision: Precision = FLOAT64


def _prepare(
    flow: GradientFlow, *, t0: float, t1: float, solver, rtol, atol, observers, transitions,
    max_steps, dt0, stepsize_controller, ts, segment_steps=None, meter=None,
    precision: str | Precision = FLOAT64,
) -> _Setup:
    """Validate a solve's inputs and build the engine's `Plan`; shared with `gflow.sweep`.

    Every check here raises a one-line `InputError` before anything is compiled.
    """
    # Under "float32" the solve holds float32 copies of everything it is given (the float64
    # init cast, not another draw); the floor is measured on what was given.
    precision, given_flow = Precision.of(precision), flow
    flow, observers, transitions = precision.cast((flow, observers, transitions))
    check_inputs(flow, t0=t0, t1=t1, rtol=rtol, atol=atol, max_steps=max_steps, dt0=dt0,
                 observers=observers, transitions=transitions)
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
    if stepsize_controller is not None and not isinstance(
        stepsize_controller, diffrax.AbstractStepSizeController
    ):
        raise InputError(
            f"stepsize_controller must be a diffrax step-size controller, got {stepsize_controller!r}"
        )
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
    ts = _resolve_ts(ts, t0, t1)
    y0 = flow.params
    target = jax.dtypes.canonicalize_dtype(jnp.float64)
    if any(jnp.result_type(x) != target for x in jtu.tree_leaves(y0)):
        flow = _promoted(flow)
        y0 = flow.params
    host_y0 = engine.to_host(y0)  # one transfer for the checks and the default atol
    _check_finite(host_y0, "the initial state")
    check_state_scale(host_y0)
    _check_finite(flow.data, "the data")

    if atol is None:
        atol = _default_atol(host_y0, rtol)
    # Tolerances travel as arrays, not Python floats: floats are static to the program, and a
    # new init (hence a new default atol), a new t1 or certify's tighter tolerances would
    # otherwise recompile it.
    controller = stepsize_controller
    if controller is None:
        if is_adaptive(solver):
            controller = _pid_controller(float(rtol), float(atol), _DTMIN * (t1 - t0), target)
        elif dt0 is None:
            raise InputError(
                f"solver {solver_name(solver)!r} has no error estimate: pass dt0 for a fixed step"
            )
        else:
            controller = diffrax.ConstantStepSize()
    else:
        controller = _controller_with_array_tolerances(controller)
    used = _tolerances(controller)
    rtol, atol = used if used is not None else (float(rtol), float(atol))
    precision.check_rtol(given_flow, rtol)
    if isinstance(controller, diffrax.ConstantStepSize) and dt0 is None:
        raise InputError("a constant step size needs dt0")
    # Root finding on the dense output: well below the solver's own error, so the located time
    # carries the solver's accuracy and not the root finder's. Never below a few units of
    # roundoff of the state's dtype (float32 under `--x32`), or the root finder could not end.
    dtype = jnp.result_type(*jtu.tree_leaves(y0))
    root_rtol = max(1e-3 * rtol, 8 * float(jnp.finfo(dtype).eps))
    root_finder = _root_finder(root_rtol, root_rtol * max(abs(t1), abs(t0), 1.0), target)
    directions = _host_array(
        [{True: 1.0, False: -1.0, None: 0.0}[tr.direction] for tr in transitions] + [0.0]
    )
    plan = engine.Plan(
        flow=flow,
        observers=observers,
        conditions=tuple(tr.condition for tr in transitions),
        directions=directions,
        ts=_host_array(ts),
        t1=_host_array(t1),
        dt0=None if dt0 is None else _host_array(dt0),
        solver=solver,
        controller=controller,
        root_finder=root_finder,
        meter=_NO_PROGRESS if meter is None else meter,
        max_steps=int(max_steps),
        segment_steps=int(min(segment_steps or max_steps, max_steps)),
        precision=precision,
    )
    return _Setup(flow, plan, observers, transitions, names, float(rtol), float(atol), y0, ts,
                  precision)


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
    stepsize_controller: diffrax.AbstractStepSizeController | None = None,
    progress_meter: diffrax.AbstractProgressMeter | None = None,
    certify: bool = False,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_steps: int | None = None,
    resume: bool = False,
    controller: diffrax.AbstractStepSizeController | None = None,
    precision: str | Precision = "float64",
) -> Trajectory:
    """Integrate the gradient flow from `t0` to `t1`.

    **Arguments:**

    - `flow`: the `GradientFlow` to integrate (any equinox module: only its trainable arrays
        evolve; functions, strings, integers and frozen arrays ride along). Trainable floating
        leaves of another precision than JAX's default (float32 under gflow's float64) are
        promoted, with a one-line warning.
    - `t1`: end time (`t1 > t0`).
    - `t0`: start time.
    - `solver`: `"auto"` (Tsit5 or DOP853 by `rtol`, see `gflow.auto_solver`), a solver name
        (`"tsit5"`, `"dop853"`, `"dopri5"`, `"dopri8"`, `"bosh3"`, `"heun"`, `"euler"`,
        `"kvaerno5"`, ...) or any diffrax solver.
    - `rtol`: relative tolerance of the default `PIDController`.
    - `atol`: its absolute tolerance; default `rtol` times the RMS size of the smallest
        non-zero trainable leaf at `t0`, so a small initialization is resolved relative to its
        own size.
    - `ts`: save times within `[t0, t1]`; default a 200-point `log_grid(t0, t1)`.
    - `observers`: `{name: observer(model, data)}` evaluated inside the compiled solve at each
        save time. The loss is always recorded as `"loss"` unless that name is taken.
    - `transitions`: `Transition`s, located in order by root finding.
    - `max_steps`: step limit (accepted plus rejected) of each segment between transitions.
    - `progress`: show one progress bar over flow time for the whole solve (`True`, or a
        label to show on it).
    - `dt0`: initial step; required for `"euler"`, otherwise chosen automatically.
    - `stepsize_controller`: a diffrax step-size controller replacing the default
        `PIDController(rtol, atol, dtmin)`; the `rtol`/`atol` recorded in the `Trajectory` are
        then its own. (`controller` is an alias.)
    - `progress_meter`: a diffrax progress meter for each segment, instead of `progress`'s
        one bar over the whole solve.
    - `certify`: solve again with the same solver and controller at 100× smaller `rtol` and
        `atol` (the same compiled program), and record, as `Trajectory.errors`, twice the
        difference between the two runs: an error estimate for every transition time and
        every observable. The two solves run at once, on two threads; while they do, each
        one's BLAS/LAPACK calls (the observers' SVDs) use half the cores, through
        `threadpoolctl`, which limits those pools process-wide for that time.
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
    - `precision`: `"float64"`, `"mixed"` (float64 time and state, float32 loss and gradient),
        `"float32"` or a `gflow.Precision` (which also sets the matmul precision). Every
        policy starts from the same init (the given one, cast). An `rtol` below the policy's
        floor (`Precision.rtol_floor`: ten times the float32 gradient's measured relative
        error at the initial state) is refused. `certify`'s reference always runs in float64,
        so its error estimates cover rounding as well as truncation. Recorded in
        `Trajectory.stats` (`precision`, `matmul_precision`, `backend`).

    **Returns:**

    A `Trajectory`. Failure is data: a run that exceeds `max_steps` or diverges returns what it
    computed up to that point, with `status` naming what happened.
    """
    if not isinstance(flow, GradientFlow):
        raise InputError(f"solve expects a gflow.GradientFlow, got {type(flow).__name__}")
    check_times(t0, t1)
    stepsize_controller = _controller_alias(stepsize_controller, controller)
    if progress and progress_meter is not None:
        raise InputError("give progress or progress_meter, not both")
    if progress_meter is not None and not isinstance(
        progress_meter, diffrax.AbstractProgressMeter
    ):
        raise InputError(f"progress_meter must be a diffrax progress meter, got {progress_meter!r}")
    t0, t1 = float(t0), float(t1)
    if checkpoint_steps is not None and not (
        int(checkpoint_steps) == checkpoint_steps and checkpoint_steps >= 1
    ):
        raise InputError(f"checkpoint_steps must be a positive integer, got {checkpoint_steps!r}")
    if resume and checkpoint is None:
        raise InputError("resume needs the checkpoint file to resume from")
    meter = SegmentMeter() if progress else progress_meter
    precision = Precision.of(precision)
    if not isinstance(transitions, (list, tuple)):  # read twice with certify
        try:
            transitions = tuple(transitions)
        except TypeError:
            raise InputError(f"transitions must be a sequence of gflow.Transition, got "
                             f"{transitions!r}") from None
    with precision.scope():
        setup = _prepare(
            flow, t0=t0, t1=t1, solver=solver, rtol=rtol, atol=atol, observers=observers,
            transitions=transitions, max_steps=max_steps, dt0=dt0,
            stepsize_controller=stepsize_controller, ts=ts, segment_steps=checkpoint_steps,
            meter=meter, precision=precision,
        )
    if certify and not is_adaptive(setup.plan.solver):
        raise InputError(f"certify needs an adaptive solver, not {solver_name(setup.plan.solver)!r}")
    checkpoint = None if checkpoint is None else Path(checkpoint)
    if checkpoint is not None and checkpoint.is_dir():
        # Refused before anything is computed: a run would otherwise fail at its first write.
        raise InputError(f"checkpoint {checkpoint} is a directory: give a file path")
    run = functools.partial(_integrate, t0=t0, t1=t1, max_steps=max_steps, dt0=dt0,
                            checkpoint_steps=checkpoint_steps, resume=resume)
    if not certify:
        with precision.scope():
            return run(setup, checkpoint=checkpoint, progress=progress)
    # The reference: the same solver and controller (the same compiled program, in float64)
    # at 100x smaller tolerances, always in float64, so that its difference from the run
    # covers the run's rounding too. Not Dopri8: its dense output is measured here at
    # 50-150x its rtol between step ends, which would pollute the observables at the save
    # times.
    with jax.enable_x64(True):
        reference_setup = _prepare(
            flow, t0=t0, t1=t1, solver=setup.plan.solver,
            rtol=max(setup.rtol / _CERTIFY_FACTOR, 1e-14), atol=setup.atol / _CERTIFY_FACTOR,
            observers=observers if precision.policy == "float32" else setup.observers,
            transitions=transitions if precision.policy == "float32" else setup.transitions,
            max_steps=max_steps, dt0=dt0,
            stepsize_controller=(None if stepsize_controller is None
                                 else _tightened(setup.plan.controller, _CERTIFY_FACTOR)),
            ts=setup.ts, segment_steps=checkpoint_steps,
            meter=SegmentMeter(bar=np.asarray(1, dtype=np.int32)) if progress else progress_meter,
        )
    reference_checkpoint = None if checkpoint is None else checkpoint.with_name(
        f"{checkpoint.stem}-reference{checkpoint.suffix}")
    # Compiled once, here, before either solve starts: both find it in the cache (unless the
    # run's precision is not float64's).
    with precision.scope():
        compile_seconds = _compile(setup, t0)
    # The two solves are independent: the reference runs on a second thread (XLA releases the
    # GIL), so on a machine with two or more cores it costs little wall time on top of the run.
    # If the run fails the reference stops at its next segment boundary, unwaited for.
    stop = threading.Event()
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="gflow-certify")
    try:
        with _cores_shared_by(2):
            pending = pool.submit(
                _in_float64(run), reference_setup, checkpoint=reference_checkpoint,
                progress="certify: reference" if progress else False, stop=stop,
                bar_position=1,
            )
            with precision.scope():
                traj = run(setup, checkpoint=checkpoint, progress=progress,
                           compile_seconds=compile_seconds)
            reference = pending.result()
    except BaseException:
        stop.set()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    errors = error_estimates(traj, reference) | {"reference_stats": reference.stats}
    return dataclasses.replace(traj, errors=errors)


def _in_float64(fn: Callable) -> Callable:
    """`fn` called with JAX's x64 on (in whatever thread calls it)."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.enable_x64(True):
            return fn(*args, **kwargs)

    return wrapped


def _cores_shared_by(solves: int) -> contextlib.AbstractContextManager:
    """While `solves` solves run at once, each caller's BLAS/LAPACK calls use its share of the
    cores (restored on exit).

    XLA's own thread pool is one per process and shared; the LAPACK behind `jnp.linalg` on
    CPU (observers' and conditions' SVDs, through SciPy's OpenBLAS) starts a pool per call
    with every core. Two solves calling it at once then run twice the threads the machine
    has: on the 2-core machine of benchmarks/RESULTS.md the default preset's observers took
    2.3x as long as alone, and certify's two solves 1.9x.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return threadpoolctl.threadpool_limits(limits=max(1, cores // solves), user_api="blas")


def _program(parts: tuple, carry_arrays: dict) -> tuple[Callable, dict[str, float]]:
    """The compiled engine program of a plan split by `engine.split` (cached), and the seconds
    spent tracing and compiling it (`trace_seconds`, `compile_seconds`; zero when cached)."""
    arrays, rebuild, key = parts
    program, trace, compile_ = engine.compiled(
        ("solve", key), lambda: engine.solve_program(rebuild), arrays, carry_arrays,
        np.asarray(1, dtype=np.int32),  # segments per call: data, so any value compiles alike
    )
    return program, dict(trace_seconds=trace, compile_seconds=compile_)


def _compile(setup: "_Setup", t0: float) -> dict[str, float]:
    """Compile (or find cached) the engine program of `setup`'s plan; the seconds it took."""
    parts = engine.split(setup.plan)
    template = engine.carry_template(setup.plan, parts[2])
    return _program(parts, engine.start(template, setup.y0, t0))[1]


class _Stopped(Exception):
    """The run a concurrent reference solve served has failed: the reference is abandoned."""


def _integrate(
    setup: "_Setup", *, t0: float, t1: float, max_steps: int, dt0, checkpoint_steps,
    resume: bool, checkpoint: Path | None, progress: bool | str,
    stop: threading.Event | None = None, bar_position: int = 0,
    compile_seconds: dict[str, float] | None = None,
) -> Trajectory:
    """Run the engine on `setup` from `t0` (or from `checkpoint` with `resume`) to its end and
    build the `Trajectory`: the one loop behind `solve` and its certify reference."""
    plan, names, ts = setup.plan, setup.names, setup.ts
    parts = engine.split(plan)
    arrays, _, key = parts
    template = engine.carry_template(plan, key)
    digests = None if checkpoint is None else _fingerprint(setup, ts, t0, t1, checkpoint_steps)
    carry = None
    if resume and checkpoint is not None and checkpoint.is_file():
        carry = read_checkpoint(checkpoint, digests, engine.start(template, setup.y0, t0))
    if carry is None:
        carry = Carry(engine.start(template, setup.y0, t0),
                      dict(trace_seconds=0.0, compile_seconds=0.0, run_seconds=0.0))
    # Compiled before this call (certify compiles once for both solves): counted here.
    carry = Carry(carry.arrays, {k: carry.seconds.get(k, 0.0) + (compile_seconds or {}).get(k, 0.0)
                                 for k in ("trace_seconds", "compile_seconds", "run_seconds")})
    # One segment per call when checkpointing or stoppable (the carry is written, or the stop
    # checked, between calls), else the whole solve in one call: the same program either way.
    one_at_a_time = checkpoint is not None or stop is not None
    chunk = np.asarray(1 if one_at_a_time else engine.ALL_SEGMENTS, dtype=np.int32)
    bar = FlowTimeBar(t0, t1, desc=progress if isinstance(progress, str) else None, names=names,
                      position=bar_position)
    program = None
    with bar if progress else contextlib.nullcontext():
        if progress:
            bar.segment(carry.t, names[0] if names else "")
        while int(carry.arrays["status"]) == engine.RUNNING:
            if stop is not None and stop.is_set():
                raise _Stopped
            seconds = dict(carry.seconds)
            if program is None:
                program, spent = _program(parts, carry.arrays)
                seconds = {k: v + spent.get(k, 0.0) for k, v in seconds.items()}
            begin = time.perf_counter()
            out = program(arrays, carry.arrays, chunk)
            # What the host reads, in one transfer; the state stays where it is (the next
            # call's input, the final model), and only a checkpoint copies it.
            out = engine.to_host({k: v for k, v in out.items() if k != "y"}) | {"y": out["y"]}
            seconds["run_seconds"] += time.perf_counter() - begin
            carry = Carry(out, seconds)
            if checkpoint is not None:
                write_checkpoint(checkpoint, carry, digests)
        if progress:
            bar.segment(carry.t)

    return engine.trajectory(
        carry.arrays, flow=setup.flow, ts=ts, names=names, t0=t0, t1=t1, solver=plan.solver,
        rtol=setup.rtol, atol=setup.atol, max_steps=int(max_steps),
        dt0_given=dt0 is not None, stats=carry.seconds | setup.precision.describe(),
    )


def _fingerprint(setup: _Setup, ts, t0, t1, checkpoint_steps) -> dict[str, str]:
    """Digests of what determines a solve's result, to refuse resuming another problem."""
    plan = setup.plan
    settings = dict(
        t0=t0, t1=t1, rtol=setup.rtol, atol=setup.atol, max_steps=plan.max_steps,
        checkpoint_steps=checkpoint_steps, solver=solver_name(plan.solver),
        # auto's DOP853 scales its error estimate; the name alone does not tell them apart.
        error_scale=getattr(plan.solver, "error_scale", None),
        gd_step=setup.flow.gd_step,
        precision=[setup.precision.policy, setup.precision.matmul],
        controller=type(plan.controller).__name__, transitions=setup.names,
        controller_coefficients=[getattr(plan.controller, name, None)
                                 for name in ("pcoeff", "icoeff", "dcoeff")],
        directions=np.asarray(plan.directions), observers=sorted(setup.observers),
    )
    return fingerprint(
        initial_state=setup.y0, data=setup.flow.data, save_times=ts,
        settings=list(settings.items()),
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
