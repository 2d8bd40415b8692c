"""`solve`: integrate a `GradientFlow`, record observables, locate transitions.

`solve` makes its options one `gflow.SolveSpec` (or takes one), and the spec the engine's
`Plan`; the engine runs the whole solve (every segment, every transition) as one compiled
program, called once, or chunk by chunk when a progress bar, a checkpoint file or Ctrl-C needs
the host between chunks (the cuts do not change the steps); `gflow._results` turns the final
carry into a `Trajectory`. Checkpoints are the engine's carry.
"""

import concurrent.futures
import contextlib
import dataclasses
import math
import os
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import ArrayLike, PyTree

from . import _engine as engine
from ._checkpoint import (CheckpointWriter, Snapshot, fingerprint, read_checkpoint,
                          write_checkpoint)
from ._errors import InputError
from ._flow import GradientFlow
from ._precision import FLOAT64, Precision
from ._progress import FlowTimeBar
from ._results import Recorded, trajectory
from ._spec import (
    DEFAULT_ICOEFF, DEFAULT_MAX_STEPS, DEFAULT_PCOEFF, DEFAULT_RTOL, DEFAULT_SOLVER, DTMIN,
    SolveSpec, Transition, _pid_controller, default_atol, options_key,
)
from ._solvers import evaluations_per_step
from ._status import Status
from ._names import flat_names
from ._trajectory import Trajectory
from ._validate import check_state_scale

__all__ = ["Transition", "SolveSpec", "solve", "pid_controller", "error_estimates"]


def _check_finite(tree: PyTree, what: str) -> None:
    def bad(leaf) -> bool:
        if eqx.is_inexact_array(leaf) or isinstance(leaf, np.ndarray):
            arr = np.asarray(leaf)
            return np.issubdtype(arr.dtype, np.inexact) and not np.all(np.isfinite(arr))
        return False

    if any(bad(leaf) for leaf in jtu.tree_leaves(tree)):  # paths only for the message
        path = next(path for path, leaf in jtu.tree_flatten_with_path(tree)[0] if bad(leaf))
        raise InputError(f"{what} has non-finite values at {jtu.keystr(path)}")


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
            stacklevel=4,
        )
    params = jtu.tree_map(
        lambda x: x.astype(target)
        if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x,
        params,
    )
    return eqx.tree_at(lambda f: f.model, flow, eqx.combine(params, rest))


# Flows `checked_flow` passed as they are, by `id`, with a weak reference to tell that the id
# is still theirs (the cache keeps no model alive). Only flows whose arrays are all JAX arrays,
# which cannot change: a NumPy array can.
_CHECKED = engine.LRU(64)


def checked_flow(flow: GradientFlow) -> GradientFlow:
    """`flow` ready to solve: its trainable leaves in the solve's dtype (promoted with a
    warning), its initial state and data finite and of a scale float64 resolves."""
    # The dtype the solve runs in (JAX's x64 setting, per thread) decides the promotion.
    key = (id(flow), jax.dtypes.canonicalize_dtype(jnp.float64))
    ref = _CHECKED.get(key)
    if ref is not None and ref() is flow:
        return flow
    checked = _checked_flow(flow)
    if checked is flow and _immutable(flow):
        _CHECKED.put(key, weakref.ref(flow))
    return checked


def _immutable(flow: GradientFlow) -> bool:
    """Whether `flow`'s arrays cannot change: all JAX arrays (a NumPy array can)."""
    return not any(isinstance(x, np.ndarray) for x in jtu.tree_leaves(flow))


def _checked_flow(flow: GradientFlow) -> GradientFlow:
    target = jax.dtypes.canonicalize_dtype(jnp.float64)
    params = flow.params
    # Trainable leaves are floating arrays (`GradientFlow` checks): their `dtype` is theirs.
    if any(x.dtype != target for x in jtu.tree_leaves(params)):
        flow = _promoted(flow)
        params = flow.params
    host_y0 = engine.to_host(params)
    _check_finite(host_y0, "the initial state")
    check_state_scale(host_y0)
    _check_finite(flow.data, "the data")
    return flow


def pid_controller(
    flow: GradientFlow, rtol: float, atol: float | None = None, *, t1: float, t0: float = 0.0,
    pcoeff: float = DEFAULT_PCOEFF, icoeff: float = DEFAULT_ICOEFF,
) -> diffrax.PIDController:
    """The step-size controller `gflow.solve` uses by default, with diffrax's PID
    coefficients to choose: pass it as `stepsize_controller=` for PI control (or give
    `pcoeff=`, `icoeff=` to `gflow.solve`, which builds this).

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
        atol = default_atol(engine.to_host(flow.params), rtol)
    return _pid_controller(float(rtol), float(atol), DTMIN * (float(t1) - float(t0)),
                           jax.dtypes.canonicalize_dtype(jnp.float64), float(pcoeff),
                           float(icoeff))


def solve(
    flow: GradientFlow,
    t1: "float | SolveSpec",
    *,
    t0: float = 0.0,
    solver: str | diffrax.AbstractSolver = DEFAULT_SOLVER,
    rtol: float = DEFAULT_RTOL,
    atol: float | None = None,
    ts: ArrayLike | None = None,
    observers: Mapping[str, Callable] | None = None,
    transitions: Sequence[Transition] = (),
    max_steps: int = DEFAULT_MAX_STEPS,
    progress: bool | str = False,
    dt0: float | None = None,
    stepsize_controller: diffrax.AbstractStepSizeController | None = None,
    progress_meter: diffrax.AbstractProgressMeter | None = None,
    certify: bool = False,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_steps: int | None = None,
    resume: bool = False,
    controller: diffrax.AbstractStepSizeController | None = None,
    pcoeff: float = DEFAULT_PCOEFF,
    icoeff: float = DEFAULT_ICOEFF,
    precision: "str | Precision" = "float64",
    snapshots: Mapping[str, Callable] | None = None,
    snapshot_ts: ArrayLike | None = None,
) -> Trajectory:
    """Integrate the gradient flow from `t0` to `t1`.

    **Arguments:**

    - `flow`: the `GradientFlow` to integrate (any equinox module: only its trainable arrays
        evolve; functions, strings, integers and frozen arrays ride along). Trainable floating
        leaves of another precision than JAX's default (float32 under gflow's float64) are
        promoted, with a one-line warning.
    - `t1`: end time (`t1 > t0`); or a `gflow.SolveSpec`, which then gives every option of the
        solve (`t0` to `checkpoint_steps`, `pcoeff`, `icoeff`), and only the options of how it
        is run (`progress`, `progress_meter`, `certify`, `checkpoint`, `resume`) are given.
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
    - `snapshots`: `{name: observer(model, data)}` of costly observables (full spectra,
        cosine matrices, singular vectors: each many gradients' worth at a paper's size),
        evaluated inside the compiled solve only where they are read: at `t0`, at each
        located transition (on its located state, with the observers), at the chosen
        `snapshot_ts` and at `t1`; never at the other save times. In
        `Trajectory.snapshots`. Their names differ from the observers'.
    - `snapshot_ts`: the snapshots' chosen times within `[t0, t1]` (a handful).
    - `transitions`: `Transition`s, located in order by root finding.
    - `max_steps`: step limit (accepted plus rejected) of each segment between transitions.
    - `progress`: show one progress bar over flow time for the whole solve (`True`, or a
        label to show on it), drawn from the host between chunks of steps (the compiled
        program holds no callback: the steps are those of a solve without it).
    - `dt0`: initial step; required for `"euler"`, otherwise chosen automatically.
    - `stepsize_controller`: a diffrax step-size controller replacing the default
        `PIDController(rtol, atol, dtmin)`; the `rtol`/`atol` recorded in the `Trajectory` are
        then its own. (`controller` is an alias.)
    - `pcoeff`, `icoeff`: the default `PIDController`'s coefficients (0 and 1: integral
        control; e.g. 0.3 and 0.4 for PI control).
    - `progress_meter`: a diffrax progress meter for each segment, instead of `progress`'s
        one bar over the whole solve.
    - `certify`: solve again with the same solver and controller at 100× smaller `rtol` and
        `atol` (the same compiled program), and record, as `Trajectory.errors`, twice the
        difference between the two runs: an error estimate for every transition time and
        every observable. The two solves run at once, on two threads. (Every solve runs its
        BLAS/LAPACK calls, the observers' SVDs, on one thread each, through `threadpoolctl`,
        which limits that pool process-wide for the time of the solve.)
    - `checkpoint`: a file to which the solve's state is written (atomically): after the first
        chunk of steps, after each transition, every `checkpoint_steps` steps (or, without
        it, every 10 seconds of solving), and at the end. Each is copied on the device and
        written by a thread of its own while the solve goes on (the solve waits only when
        the next is due before the previous is written); the file is always the last
        complete checkpoint, and the one of the end is written before `solve` returns. With
        `certify`, the reference solve writes next to it (`<stem>-reference<suffix>`).
    - `checkpoint_steps`: cut the solve into segments of at most this many steps, so that a
        long run without transitions is checkpointed too. A cut does not change the solve
        (the solver's and controller's states cross it): the steps are those of a run never
        cut. `max_steps` is then checked at the cuts.
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
    options = dict(
        t0=t0, solver=solver, rtol=rtol, atol=atol, ts=ts, observers=observers,
        transitions=transitions, max_steps=max_steps, dt0=dt0,
        stepsize_controller=stepsize_controller, pcoeff=pcoeff, icoeff=icoeff,
        checkpoint_steps=checkpoint_steps, controller=controller, precision=precision,
        snapshots=snapshots, snapshot_ts=snapshot_ts,
    )
    if isinstance(t1, SolveSpec):
        given = [name for name, value, default in (
            ("t0", t0, 0.0), ("solver", solver, DEFAULT_SOLVER), ("rtol", rtol, DEFAULT_RTOL),
            ("atol", atol, None), ("ts", ts, None), ("observers", observers, None),
            ("transitions", transitions, ()), ("max_steps", max_steps, DEFAULT_MAX_STEPS),
            ("dt0", dt0, None), ("stepsize_controller", stepsize_controller, None),
            ("checkpoint_steps", checkpoint_steps, None), ("controller", controller, None),
            ("pcoeff", pcoeff, DEFAULT_PCOEFF), ("icoeff", icoeff, DEFAULT_ICOEFF),
            ("precision", precision, "float64"), ("snapshots", snapshots, None),
            ("snapshot_ts", snapshot_ts, None),
        ) if value is not default and not (isinstance(value, (int, float, str, tuple))
                                           and value == default)]
        if given:
            raise InputError(f"solve(flow, spec) takes its options from the spec; got "
                             f"{', '.join(given)} too")
        if not isinstance(flow, GradientFlow):
            raise InputError(f"solve expects a gflow.GradientFlow, got {type(flow).__name__}")
    # A plain solve (no progress, checkpoint or certify) of a flow and options solved so
    # before runs what that solve prepared: every check passed then, and holds again.
    plain = not (progress or progress_meter is not None or certify or checkpoint is not None
                 or resume)
    ready_key = _ready_key(flow, t1, options) if plain else None
    ready = _READY.get(ready_key)
    if ready is not None and ready.flow() is flow:
        with engine.one_lapack_thread() if ready.lapack else contextlib.nullcontext():
            return _integrate(flow, ready.spec, resume=False, checkpoint=None, progress=False,
                              ready=ready)
    if isinstance(t1, SolveSpec):
        spec = t1
    else:
        spec = SolveSpec.from_options(flow, t1, **options)
    if progress and progress_meter is not None:
        raise InputError("give progress or progress_meter, not both")
    if progress_meter is not None and not isinstance(
        progress_meter, diffrax.AbstractProgressMeter
    ):
        raise InputError(f"progress_meter must be a diffrax progress meter, got {progress_meter!r}")
    if resume and checkpoint is None:
        raise InputError("resume needs the checkpoint file to resume from")
    # certify's reference always runs in float64: its difference from the run then covers the
    # run's rounding as well as its truncation.
    reference = (dataclasses.replace(spec.tightened(_CERTIFY_FACTOR), precision=FLOAT64)
                 if certify else None)
    checkpoint = None if checkpoint is None else Path(checkpoint)
    if checkpoint is not None and checkpoint.is_dir():
        # Refused before anything is computed: a run would otherwise fail at its first write.
        raise InputError(f"checkpoint {checkpoint} is a directory: give a file path")
    given_flow, flow = flow, checked_flow(flow)
    if not (flow is given_flow and _immutable(flow)
            and Precision.cast(spec.precision, flow) is flow):
        ready_key = None  # a flow that may change, or is another object in the solve
    if checkpoint is not None:
        parent = next((p for p in checkpoint.parents if os.path.lexists(p)), None)
        if parent is not None and not parent.is_dir():
            raise InputError(f"checkpoint {checkpoint}: {parent} is a file, not a directory")
    with engine.one_lapack_thread():
        if not certify:
            return _integrate(flow, spec, resume=resume, checkpoint=checkpoint,
                              progress=progress, meter=progress_meter, ready_key=ready_key)
        return _certified(flow, spec, reference, resume=resume, checkpoint=checkpoint,
                          progress=progress, progress_meter=progress_meter)


def _certified(flow: GradientFlow, spec: SolveSpec, reference: SolveSpec, *, resume: bool,
               checkpoint: Path | None, progress: bool | str, progress_meter) -> Trajectory:
    """`spec` solved, with `reference` (its tightened spec) alongside on a second thread, and
    the error estimates from the two."""
    # The reference: the same solver and controller (the same compiled program) at 100x
    # smaller tolerances. Not Dopri8: its dense output is measured here at 50-150x its rtol
    # between step ends, which would pollute the observables at the save times.
    reference_checkpoint = None if checkpoint is None else checkpoint.with_name(
        f"{checkpoint.stem}-reference{checkpoint.suffix}")
    # Compiled once, here, before either solve starts: both find it in the cache.
    compile_seconds = _compile(flow, spec, progress_meter, interactive=bool(progress)
                               or checkpoint is not None)
    # The two solves are independent: the reference runs on a second thread (XLA releases the
    # GIL), so on a machine with two or more cores it costs little wall time on top of the run.
    # If the run fails the reference stops at its next chunk, unwaited for.
    stop = threading.Event()
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="gflow-certify")
    try:
        pending = pool.submit(
            _in_this_precision(_integrate), flow, reference, resume=resume,
            checkpoint=reference_checkpoint,
            progress="certify: reference" if progress else False, stop=stop,
            bar_position=1, meter=progress_meter,
            interactive=bool(progress) or checkpoint is not None,
        )
        traj = _integrate(flow, spec, resume=resume, checkpoint=checkpoint,
                          progress=progress, compile_seconds=compile_seconds,
                          meter=progress_meter)
        reference = pending.result()
    except BaseException:
        stop.set()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    errors = error_estimates(traj, reference) | {"reference_stats": reference.stats}
    return dataclasses.replace(traj, errors=errors)


def _in_this_precision(fn: Callable) -> Callable:
    """`fn`, to run on another thread in this thread's float precision: JAX's `enable_x64`
    setting is per thread, and a reference solve built in float64 under a float32 run
    (`--x32`) would be another program."""
    x64 = bool(jax.config.jax_enable_x64)

    def run(*args, **kwargs):
        with jax.enable_x64(x64):
            return fn(*args, **kwargs)

    return run


def _program(parts: tuple, carry: engine.Carry,
             interactive: bool) -> tuple[Callable, dict[str, float]]:
    """The compiled engine program of a plan split by `engine.split` (cached), and the seconds
    spent tracing and compiling it (`trace_seconds`, `compile_seconds`; zero when cached).
    Not `interactive`: called once per solve, it returns the final carry as its result reads
    it (`engine.Carry.result`)."""
    arrays, rebuild, key = parts
    # An interactive program, called again and again on its own output, donates its carry:
    # a call's output takes its buffers (the save and snapshot buffers are updated in place,
    # not copied into new ones at every call), and the carry passed in is deleted. A solve of
    # one call gains nothing from it (the template it starts from is kept for the next).
    program, trace, compile_ = engine.compiled(
        ("solve", key, not interactive),
        lambda: engine.solve_program(rebuild, to_the_end=not interactive), arrays, carry,
        np.asarray(1, dtype=np.int32),  # segments per call: data, so any value compiles alike
        donate_argnums=(1,) if interactive else (),
    )
    return program, dict(trace_seconds=trace, compile_seconds=compile_)


# An interactive solve (a progress bar, a checkpoint file, or a certify reference that may be
# told to stop) is cut into chunks of steps (`chunk_steps`), and runs as many of these chunks
# per call of its program as take about `_CALL_SECONDS`: between calls the host draws
# progress, writes the checkpoint and honours Ctrl-C. The cuts do not change the steps (see
# `gflow._engine`). Each cut restarts diffrax's loop, which costs a small flow a few of its
# steps: a cheap flow's chunks are longer, up to `_CHUNK_MAX_STEPS` steps of about
# `_CHUNK_FLOPS` in all by XLA's count, while a dear flow's first call (one chunk) stays short.
_CHUNK_STEPS = 32
_CHUNK_MAX_STEPS = 1024
_CHUNK_FLOPS = 1e9
_VELOCITY_FLOPS = engine.LRU(64)
_CALL_SECONDS = 0.25
# How much longer a call may be than the one before (the first runs one chunk): each call
# costs a round trip to the host, so a fast solve should reach calls of `_CALL_SECONDS` in
# few calls, while a first chunk that ran unusually fast cannot make a call run for long.
_CALL_GROWTH = 8
_PROGRAM_CALLS = [0]  # by every solve of this process (`program_calls`)


def program_calls() -> int:
    """How many times the solves of this process have called their compiled programs: one
    per plain solve, one per batch of chunks of an interactive one (between which the host
    draws a bar, writes a checkpoint and honours Ctrl-C)."""
    return _PROGRAM_CALLS[0]


# An interactive solve's checkpoint is written at most this often (and at every transition, at
# the end, and when interrupted), unless `checkpoint_steps` asks for every cut.
_CHECKPOINT_SECONDS = 10.0


def chunk_steps(flow: GradientFlow, spec: SolveSpec) -> int:
    """Steps between the cuts of an interactive solve of `spec` on `flow` (a power of two):
    at least `_CHUNK_STEPS`, and as many more as make about `_CHUNK_FLOPS` floating-point
    operations (one velocity's count by XLA times the solver's evaluations a step, 6 where
    it does not say), at most `_CHUNK_MAX_STEPS`."""
    _, _, flow_key = engine.split(flow)
    key = None if flow_key is None else (flow_key, spec.precision)
    flops = None if key is None else _VELOCITY_FLOPS.get(key)
    if flops is None:
        flops = engine.velocity_flops(flow, spec.precision) or math.inf
        if key is not None:
            _VELOCITY_FLOPS.put(key, flops)
    per_step = (evaluations_per_step(spec.solver) or (6, 0))[0] * flops
    steps = 2 ** max(0, math.floor(math.log2(max(_CHUNK_FLOPS / per_step, 1.0))))
    return int(min(max(steps, _CHUNK_STEPS), _CHUNK_MAX_STEPS))


class _Prepared(NamedTuple):
    """What `_prepare` keeps of a spec's plan on flows of one structure."""

    spec: SolveSpec  # held, so that the `id` in its key stays this spec's
    rest: list  # the plan's arrays after the flow's own, on the device
    rebuild: Callable
    key: Hashable | None
    template: engine.Carry  # as device arrays: a call passes them without copying
    recorded: Recorded


_PREPARED = engine.LRU(64)


def _prepare(flow: GradientFlow, spec: SolveSpec, meter,
             interactive: bool) -> tuple[tuple, engine.Carry, Recorded]:
    """The engine plan of `spec` on `flow`, split as `engine.split` splits it (its arrays, a
    function rebuilding it, its key), the carry the solve starts from, and what its
    `Trajectory` records of the spec.

    Kept per spec (by identity) and per structure of the flow (`engine.split`'s key: its
    functions, static fields, and the shapes and dtypes of its arrays): a new flow of that
    structure brings its own arrays, and the rest of the plan, which depends on the flow only
    through that structure, is reused. Building it costs about 0.5 ms, a twentieth of a small
    solve.
    """
    flow_arrays, _, flow_key = engine.split(flow)
    key = (id(spec), flow_key, spec.checkpoint_steps, interactive, meter,
           bool(jax.config.jax_enable_x64))
    try:
        hash(key)
    except TypeError:  # a meter with unhashable fields
        key = None
    entry = _PREPARED.get(None if flow_key is None else key)
    if entry is None or entry.spec is not spec:
        segment_steps = spec.checkpoint_steps or (chunk_steps(flow, spec) if interactive
                                                  else None)
        plan = spec.plan(flow, segment_steps=segment_steps, meter=meter)
        arrays, rebuild, plan_key = engine.split(plan)
        # The plan's first field is the flow: its arrays lead the plan's.
        assert all(a is b for a, b in zip(arrays, flow_arrays))
        # On the device, but for the state's placeholder (`y`'s leaves, after `t`'s: see
        # `engine.start`), which `start` replaces: engine.CACHE's host copy serves there,
        # without a second copy of the model.
        template = engine.carry_template(plan, plan_key)
        leaves, treedef = jtu.tree_flatten(template)
        n_y = len(jtu.tree_leaves(template.y))
        template = jtu.tree_unflatten(treedef, [
            x if 1 <= k <= n_y else jnp.asarray(x) for k, x in enumerate(leaves)])
        # A leaf after the flow's that is one of the flow's arrays (an observer holding the
        # initial model) shares the flow's input (`engine.split`): for another flow the
        # rebuild would hand it that flow's array, so such a plan is not kept.
        flow_ids = {id(x) for x in flow_arrays}
        aliased = any(id(x) in flow_ids
                      for x in jtu.tree_leaves(plan)[len(jtu.tree_leaves(flow)):])
        # The plan's own arrays (save times, tolerances) on the device too: a call passes
        # device buffers as they are, where a host array is copied in at every call (a
        # transfer each on an accelerator).
        rest = [jnp.asarray(x) for x in arrays[len(flow_arrays):]]
        entry = _PREPARED.put(None if flow_key is None or aliased else key, _Prepared(
            spec, rest, rebuild, plan_key, template,
            Recorded.of(spec, template.y)))
    parts = (flow_arrays + entry.rest, entry.rebuild, entry.key)
    return parts, engine.start(entry.template, flow.params, spec.t0), entry.recorded


def _compile(flow: GradientFlow, spec: SolveSpec, meter, interactive: bool) -> dict[str, float]:
    """Compile (or find cached) the engine program of `spec`; the seconds it took."""
    return _program(*_prepare(flow, spec, meter, interactive)[:2], interactive)[1]


class _Ready(NamedTuple):
    """A plain solve (no progress bar, checkpoint or certify) of one spec on one flow, ready
    to run: `solve` given that flow and the same options (or spec) again runs it at once,
    without checking, planning or looking up its program again. Kept while the flow lives
    (`_READY`, by the flow's `id`)."""

    flow: weakref.ref  # the flow is not kept alive by the cache
    spec: SolveSpec  # as given (held, so that a spec's `id` in the key stays its)
    parts: tuple  # `_prepare`'s
    carry: engine.Carry  # the initial carry
    program: Callable
    recorded: Recorded
    model: Callable  # the model at a state: `flow.combine`, without equinox's filtering
    lapack: bool  # whether the program calls LAPACK (`engine.one_lapack_thread` then)


def _model_at(flow: GradientFlow) -> Callable:
    """`flow.combine` for one flow, to call again and again: the model's leaves with the
    trainable ones replaced (equinox's `filter` and `combine` take about 100 µs a call)."""
    frozen = object()
    leaves, treedef = jtu.tree_flatten(flow.model)
    trainable = [x is not frozen for x in jtu.tree_leaves(
        eqx.filter(flow.model, flow.trainable, replace=frozen))]

    def model(y: PyTree) -> PyTree:
        state = iter(jtu.tree_leaves(y))
        return jtu.tree_unflatten(treedef, [next(state) if keep else x
                                            for x, keep in zip(leaves, trainable)])

    return model


# Ready solves by `_ready_key`; a flow's are dropped when it is (`_forget_flow`).
_READY = engine.LRU(64)
_FINALIZERS: dict[int, weakref.finalize] = {}


def _ready_key(flow, t1, options: dict) -> Hashable | None:
    """The key of `solve(flow, t1, **options)` in `_READY` (`None`: not kept): the flow by
    `id` (`_Ready.flow` tells whether the id is still its), the spec by `id` or the options by
    value (`gflow._spec.options_key`), and JAX's x64 setting (per thread)."""
    spec_key = ("spec", id(t1)) if isinstance(t1, SolveSpec) else options_key(t1, options)
    return None if spec_key is None else (id(flow), spec_key,
                                          bool(jax.config.jax_enable_x64))


def _keep_ready(key: Hashable, ready: _Ready) -> None:
    flow = ready.flow()
    if flow is None:
        return
    _READY.put(key, ready)
    if key[0] not in _FINALIZERS:
        _FINALIZERS[key[0]] = weakref.finalize(flow, _forget_flow, key[0])


def ready_flow_ids() -> set[int]:
    """The `id`s of the flows whose plain solves are kept ready (`_READY`)."""
    return {key[0] for key in list(_READY.entries)}


def _forget_flow(flow_id: int) -> None:
    """Drop the ready solves of a flow that no longer exists (they hold its arrays)."""
    _FINALIZERS.pop(flow_id, None)
    for key in list(_READY.entries):
        if key[0] == flow_id:
            _READY.entries.pop(key, None)


class _Stopped(Exception):
    """The run a concurrent reference solve served has failed: the reference is abandoned."""


def _snapshot(carry: engine.Carry, seconds: dict) -> Snapshot:
    nonfinite = int(carry.status) == Status.NONFINITE
    return Snapshot(carry, dict(seconds), float(carry.t),
                    True if nonfinite else carry.nan_allowed())


def _integrate(flow: GradientFlow, spec: SolveSpec, **options) -> Trajectory:
    """`_integrate_as_given` under `spec.precision`: in its JAX scope (x64 off for
    `"float32"`, the running thread's JAX configuration otherwise), on the flow and spec as that
    policy holds them (float32 copies of the given float64 arrays under `"float32"`); the
    `Trajectory` keeps the spec as given and records the precision in its stats."""
    # Through the class: equinox wraps a method looked up on an instance in a new module
    # (~35 µs each).
    precision = spec.precision
    with Precision.scope(precision):
        return _integrate_as_given(Precision.cast(precision, flow),
                                   Precision.cast(precision, spec), given=spec, **options)


def _integrate_as_given(
    flow: GradientFlow, spec: SolveSpec, *, resume: bool, checkpoint: Path | None,
    progress: bool | str, meter=None, stop: threading.Event | None = None,
    bar_position: int = 0, compile_seconds: dict[str, float] | None = None,
    interactive: bool | None = None, given: SolveSpec | None = None,
    ready: _Ready | None = None, ready_key: Hashable | None = None,
) -> Trajectory:
    """Run the engine on `spec` from `t0` (or from `checkpoint` with `resume`) to its end and
    build the `Trajectory`: the one loop behind `solve` and its certify reference. `given`:
    the spec the `Trajectory` keeps (`spec` is its copy in the solve's precision); `ready`:
    the solve as an earlier call prepared it; `ready_key`: keep this one so, under that key."""
    if interactive is None:
        interactive = bool(progress) or checkpoint is not None or stop is not None
    if ready is None:
        parts, carry, recorded = _prepare(flow, spec, meter, interactive)
        program = None
    else:
        parts, carry, recorded, program = ready.parts, ready.carry, ready.recorded, ready.program
    arrays = parts[0]
    names = recorded.names
    digests = None if checkpoint is None else _fingerprint(flow, spec)
    seconds = dict(trace_seconds=0.0, compile_seconds=0.0, run_seconds=0.0)
    template = carry  # as prepared: what a ready solve starts from next time
    if resume and checkpoint is not None and checkpoint.is_file():
        saved = read_checkpoint(checkpoint, digests, carry)
        carry = saved.arrays
        seconds = {k: saved.seconds.get(k, 0.0) for k in seconds}
    elif interactive:
        # An interactive program takes its carry's buffers: the prepared template (kept for
        # the next solve) and the flow's own parameters (the initial state) are passed as
        # copies.
        carry = engine.copied(carry)
    # Compiled before this call (certify compiles once for both solves): counted here.
    for k, v in (compile_seconds or {}).items():
        seconds[k] += v
    # With `checkpoint_steps` every cut is written (one segment per call); otherwise the whole
    # solve is one call, or, interactive, calls of about `_CALL_SECONDS` each.
    every_cut = checkpoint is not None and spec.checkpoint_steps is not None
    per_call = 1 if interactive else engine.ALL_SEGMENTS
    bar = FlowTimeBar(spec.t0, spec.t1, desc=progress if isinstance(progress, str) else None,
                      names=names, position=bar_position) if progress else None
    written = -math.inf  # the first call's carry is written at once: Ctrl-C resumes from it
    # Checkpoints are written on a thread of their own while the solve goes on; `write_checkpoint`
    # is looked up here, at each solve (tests wrap it).
    writer = None if checkpoint is None else CheckpointWriter(checkpoint, digests,
                                                              write_checkpoint)
    status = int(carry.status)
    with bar if progress else contextlib.nullcontext():
        while status == Status.RUNNING:
            if progress:
                index = int(carry.index)
                bar.segment(float(carry.t), names[index] if index < len(names) else "")
            if stop is not None and stop.is_set():
                raise _Stopped
            if program is None:
                program, spent = _program(parts, carry, interactive)
                seconds = {k: v + spent.get(k, 0.0) for k, v in seconds.items()}
                if ready_key is not None:
                    _keep_ready(ready_key, _Ready(
                        weakref.ref(flow), given or spec, parts, template, program, recorded,
                        _model_at(flow), engine.calls_lapack(program)))
            begin = time.perf_counter()
            # An interactive program donates its carry: what is read of it is read first.
            index = None if writer is None else int(carry.index)
            segments = int(carry.segments) if interactive and not every_cut else None
            out = program(arrays, carry, np.asarray(per_call, dtype=np.int32))
            status = int(out.status)  # waits for the call
            elapsed = time.perf_counter() - begin
            seconds["run_seconds"] += elapsed
            _PROGRAM_CALLS[0] += 1
            if interactive and not every_cut:
                ran = max(int(out.segments) - segments, 1)
                per_call = int(min(max(_CALL_SECONDS * ran / max(elapsed, 1e-6), 1),
                                   _CALL_GROWTH * per_call))
            carry = out
            if writer is not None and (
                    every_cut or status != Status.RUNNING or int(carry.index) != index
                    or time.monotonic() - written > _CHECKPOINT_SECONDS):
                # A copy on the device (the next call donates `carry`), fetched and written by
                # the writer's thread while the next call runs.
                writer.submit(_snapshot(carry, seconds)._replace(arrays=engine.copied(carry)))
                written = time.monotonic()
        if progress:
            bar.segment(float(carry.t))
    if writer is not None:
        # The last checkpoint is complete before the solve returns. (An exception leaves
        # without waiting: Ctrl-C is answered at once, and the file holds the last complete
        # checkpoint; the write in flight finishes on its own thread unless the process ends.)
        writer.wait()
    if interactive and spec.checkpoint_steps is None:
        # The chunks a bar or a checkpoint file asked for are not the solve's segments (they do
        # not change its steps): report the segments a solve without them has.
        seconds = dict(seconds, segments=int(carry.starts))
    given = given or spec
    return trajectory(carry, flow=flow, spec=spec, recorded=recorded, spec_as_given=given,
                      stats=seconds | Precision.describe(given.precision),
                      final=None if ready is None else ready.model)


def _fingerprint(flow: GradientFlow, spec: SolveSpec) -> dict[str, str]:
    """Digests of what determines a solve's result, to refuse resuming another problem."""
    return fingerprint(
        initial_state=flow.params, data=flow.data, save_times=spec.ts,
        settings=list((spec.settings() | dict(gd_step=flow.gd_step)).items()),
    )


# `certify` re-solves with tolerances this many times smaller; the estimate is the difference
# times the safety factor, which covers a reference error of up to half the run's.
_CERTIFY_FACTOR = 100.0
_CERTIFY_SAFETY = 2.0


def error_estimates(traj: Trajectory, reference: Trajectory) -> dict[str, Any]:
    """Error estimates of `traj` from a more accurate solve `reference` of the same flow.

    **Returns:**

    `{"reference_rtol", "transitions": {name: 2|t − t_ref|}, "observables": {name: twice the
    largest |difference| over the shared save times}, "snapshots": {name: the same over the
    snapshots both took (t0, the chosen times, the transitions both located, at their own
    located states, and t1)}, "overlapping": [names]}` (the factor 2 covers a reference error
    of up to half the run's); a transition is
    listed in `overlapping` when its error estimate exceeds the gap to a neighbouring
    transition, so their order is not certain. Unreached transitions have no estimate (`nan`).
    """
    n = min(len(traj.ts), len(reference.ts))
    trans = {
        name: _CERTIFY_SAFETY * abs(t - reference.transitions.get(name, math.nan))
        for name, t in traj.transitions.items()
    }
    flat, flat_ref = flat_names(traj.observables), flat_names(reference.observables)
    obs = {}
    for name, values in flat.items():
        diff = np.abs(np.asarray(values[:n], dtype=float) - np.asarray(flat_ref[name][:n]))
        obs[name] = _CERTIFY_SAFETY * float(np.max(diff)) if diff.size else math.nan
    snaps = {}

    def places(run):  # a chosen time is known by its time, the others by their label
        return [label or float(t) for label, t in zip(run.snapshot_labels, run.snapshot_ts)]

    mine, theirs = places(traj), places(reference)
    shared = [p for p in mine if p in theirs]
    if shared:
        rows = [mine.index(p) for p in shared]
        rows_ref = [theirs.index(p) for p in shared]
        flat_ref = flat_names(reference.snapshots)
        for name, values in flat_names(traj.snapshots).items():
            diff = np.abs(np.asarray(values, dtype=float)[rows]
                          - np.asarray(flat_ref[name], dtype=float)[rows_ref])
            snaps[name] = _CERTIFY_SAFETY * float(np.max(diff)) if diff.size else math.nan
    times = sorted((t, name) for name, t in traj.transitions.items() if math.isfinite(t))
    overlapping = set()
    for (ta, a), (tb, b) in zip(times[:-1], times[1:]):
        if max(trans[a], trans[b]) > tb - ta:
            overlapping |= {a, b}
    return dict(
        reference_rtol=reference.rtol,
        transitions=trans,
        observables=obs,
        snapshots=snaps,
        overlapping=sorted(overlapping),
    )
