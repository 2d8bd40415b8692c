"""The one solve loop of gflow: every segment and every transition of a solve in one program.

A solve is a chain of segments: a `diffrax.diffeqsolve` from where the previous one stopped
until `t1`, the next transition (an `Event` whose condition is picked by `lax.switch` from the
transition index), a failure, or a cut every `segment_steps` steps. `run` chains them in a
`lax.while_loop`, each segment a fresh `diffeqsolve` from where the previous one stopped, so
that the whole solve is one pure, traceable function of arrays:

- `gflow.solve` compiles `run` once per problem structure and calls it once (or once per
  segment, writing a checkpoint of the carry in between: the same program on the same inputs,
  hence bit for bit the same result);
- `gflow.sweep` maps (`lax.map`, `vmap`, `shard_map`) the same `run` over members;
- `certify` calls the same compiled `run` again: tolerances are arrays in the `Plan`, not
  static, so the tighter reference solve needs no new compilation.

Only arrays cross `lax.switch`, the loop carry and the program boundary: the model is split
into its trainable arrays (the state) and the rest, which the branches close over (an
`eqx.nn.MLP`'s activation function, strings, Python ints stay static).

After a transition the next segment starts from the dense-output state at the located time,
not from a step end: diffrax's `Event` truncates the step at the root and returns only the
interpolated state (the step end is not kept; keeping it would mean saving every step). What
that costs is one interpolation error per transition. With Tsit5 (the default) the dense
output is as accurate as the steps (its save-grid error is measured at about 1x rtol in
benchmarks/RESULTS.md), so a restart adds an error of the order of one step's, against the
hundreds of steps that make up the global error: it does not matter there. With Dopri8 it
does at tight tolerances: its dense output is 50-150x its rtol, and a Dopri8 rtol-1e-12
solve with transitions strays ~6e-12 from the same solve without them (RESULTS.md).
"""

import collections
import math
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optimistix as optx
from jaxtyping import Array, PyTree, Scalar

from ._flow import GradientFlow
from ._precision import FLOAT64, Precision
from ._progress import SegmentMeter
from ._solvers import solver_name, vector_field_evaluations
from ._trajectory import Trajectory


# One status enumeration for solve and sweep. RUNNING marks a carry whose solve goes on.
STATUSES = ("completed", "max_steps", "nonfinite", "dt_min", "failed")
COMPLETED, MAX_STEPS, NONFINITE, DT_MIN, FAILED = range(len(STATUSES))
RUNNING = -1

# A state whose squared norm passes this (or is NaN) has diverged: float64 squares overflow at
# ~1e154, and no gradient flow of interest lives out there.
DIVERGED_SQUARED_NORM = 1e200

# Segments a single call of `run` may take when the solve is not checkpointed: no limit.
ALL_SEGMENTS = 2**30


def squared_norm(tree: PyTree) -> Scalar:
    return sum(jnp.sum(jnp.square(leaf)) for leaf in jtu.tree_leaves(tree))


def diverged_squared_norm(tree: PyTree) -> float:
    """`DIVERGED_SQUARED_NORM`, or less where the state's dtype (float32) overflows first."""
    dtype = jnp.result_type(*jtu.tree_leaves(tree))
    return min(DIVERGED_SQUARED_NORM, float(jnp.finfo(dtype).max) / 16)


class Plan(NamedTuple):
    """Everything a solve runs on, arrays and static parts together.

    Partitioned by `eqx.is_array` (`split`), its arrays are the program's inputs and
    everything else (functions, solver, settings) the program's identity. A named tuple, not
    an `eqx.Module`: it is a record built on every solve, and equinox's construction checks
    cost about 180 µs for these fields (measured), a tenth of a small solve's host work.
    """

    flow: GradientFlow
    observers: dict  # {name: observer(model, data)}, evaluated at the save times
    conditions: tuple  # transition conditions, condition(model, data) -> scalar
    directions: Array  # per condition (+1 up, -1 down, 0 either) and a trailing 0
    ts: Array
    t1: Array
    dt0: Array | None
    solver: diffrax.AbstractSolver
    controller: diffrax.AbstractStepSizeController
    root_finder: optx.AbstractRootFinder
    meter: diffrax.AbstractProgressMeter
    max_steps: int  # Python ints, static: `split` keeps every non-array leaf in the key
    segment_steps: int
    precision: Precision = FLOAT64  # in which types the velocity is computed


def _observe(flow: GradientFlow, observers: dict, y: PyTree) -> dict:
    model = flow.combine(y)
    values = {name: obs(model, flow.data) for name, obs in observers.items()}
    return jtu.tree_map(lambda x: jnp.asarray(x, dtype=jnp.result_type(x, float)), values)


# Traced once per program, not at each of the places a solve calls them: a jitted function
# called again with the same structure inside one trace reuses its jaxpr. diffrax traces the
# vector field and the save function several times (shapes, closure conversion, the step, the
# interpolation), and a segment observes in three places: the default preset's program traced
# its observers 7 and its gradient 5 times (measured), about a quarter of its tracing.
_observe_once = eqx.filter_jit(_observe)
_velocity_once = eqx.filter_jit(lambda flow, precision, y: precision.velocity(flow, y))


def observe(flow: GradientFlow, observers: dict, y: PyTree) -> dict:
    """`{name: observer(model, data)}` at state `y`, as floating arrays.

    Floating outputs only: diffrax fills unreached save times with inf, and an integer
    observable (a count, a rank) would not fit that buffer.
    """
    return _observe_once(flow, observers, y)


def _term(flow: GradientFlow, precision: Precision) -> diffrax.ODETerm:
    return diffrax.ODETerm(lambda t, y, args: _velocity_once(flow, precision, y))


def _controller_init(plan: Plan, y: PyTree, t0) -> PyTree:
    """The controller's initial state at `t0` (diffrax's own `init`), for its structure."""
    term = _term(plan.flow, plan.precision)
    dt0 = plan.t1 - t0 if plan.dt0 is None else plan.dt0
    _, state = plan.controller.init(
        term, t0, plan.t1, y, dt0, None, plan.solver.func, plan.solver.error_order(term)
    )
    return state


def initial_carry(plan: Plan, y0: PyTree, t0) -> dict:
    """The carry a solve starts from (traceable; `carry_template` evaluates it once).

    It holds no solver state: each segment starts its solver afresh (see `_segment`). The
    controller state is the last segment's, kept for what the host reads from it (whether
    steps were held at `dtmin`), zeros of its structure until a segment has run.
    """
    # As arrays (a wrapping controller may hold Python bools): the carry holds arrays only.
    # `filter_eval_shape` traces the plan's arrays too: host (numpy) tolerances would not mix
    # with diffrax's tree arithmetic outside a trace.
    controller_state = jtu.tree_map(
        lambda s: jnp.zeros(jnp.shape(s), jnp.result_type(s)),
        eqx.filter_eval_shape(lambda p, y, t: _controller_init(p, y, t), plan, y0, t0),
    )
    struct = eqx.filter_eval_shape(lambda p, y: observe(p.flow, p.observers, y), plan, y0)
    n_ts = plan.ts.shape[0]
    int_ = jnp.asarray(0).dtype
    return dict(
        t=jnp.asarray(t0, dtype=plan.ts.dtype),
        index=jnp.asarray(0, dtype=jnp.int32),
        y=y0,
        controller_state=controller_state,
        # nan where a save time was not (yet) reached.
        observables=jtu.tree_map(lambda s: jnp.full((n_ts,) + s.shape, jnp.nan, s.dtype), struct),
        found=jnp.full((len(plan.conditions),), jnp.nan, dtype=plan.ts.dtype),
        # The observables at each located transition (nan until it is reached): the state
        # there is the root finder's, which no save time holds.
        at_transitions=jtu.tree_map(
            lambda s: jnp.full((len(plan.conditions),) + s.shape, jnp.nan, s.dtype), struct
        ),
        status=jnp.asarray(RUNNING, dtype=jnp.int32),
        steps=jnp.asarray(0, dtype=int_),  # since the last transition: max_steps limits these
        counts=jnp.zeros(3, dtype=int_),  # steps, accepted, rejected
        segments=jnp.asarray(0, dtype=int_),
    )


def _segment(plan: Plan, c: dict) -> dict:
    """One diffrax solve from the carry `c` until `t1`, the next transition, a failure or
    `segment_steps` steps; returns the carry after it."""
    flow, index, y0, t0, t1 = plan.flow, c["index"], c["y"], c["t"], plan.t1
    n = len(plan.conditions)
    term = _term(flow, plan.precision)

    # Parameter names matter: diffrax calls these by keyword during root finding.
    def diverged(t, y, args, **kwargs):
        del t, args, kwargs
        return jnp.logical_not(squared_norm(y) < diverged_squared_norm(y))

    # Only the state crosses lax.switch; the rest of the model (functions, static fields,
    # frozen arrays) and the data are closed over.
    branches = [
        lambda y, cond=cond: jnp.asarray(cond(flow.combine(y), flow.data), dtype=float)
        for cond in plan.conditions
    ] + [lambda y: jnp.asarray(1.0, dtype=float)]

    def condition(y):
        return jax.lax.switch(index, branches, y)

    direction = plan.directions[index]
    # Either direction: the first change away from the sign at the segment's start. The
    # wanted crossing is then always an upcrossing for diffrax.
    # A cond, not a where: the condition (an SVD, say) is evaluated only when it is needed.
    sign = jax.lax.cond(
        direction == 0,
        lambda: jnp.where(condition(y0) > 0, -1.0, 1.0).astype(direction.dtype),
        lambda: direction,
    )

    def transition(t, y, args, **kwargs):
        del t, args, kwargs
        return sign * condition(y)

    if n:
        # Tree order decides which event wins when both trigger on one step: divergence first.
        event = diffrax.Event(
            [diverged, transition], root_finder=plan.root_finder, direction=[None, True]
        )
    else:
        event = diffrax.Event(diverged)
    # The save times this segment observes: after its start (from it, in the first segment).
    # They are rolled to the front of the segment's save array and the rest padded with `t1`,
    # rather than clipped to the start: clipped, every earlier save time would cost an
    # interpolation at the segment's first step, in every segment. A pad at `t1` costs one
    # only at the end of the last segment, and observes nothing: the observer is skipped at
    # `t1`, whose save times are observed on the end state instead (below).
    first = c["segments"] == 0
    n_ts = plan.ts.shape[0]
    ours = (plan.ts > t0) | (first & (plan.ts >= t0))
    skip = n_ts - jnp.sum(ours)
    source = jnp.arange(n_ts) + skip
    segment_ts = jnp.where(source < n_ts, plan.ts[jnp.minimum(source, n_ts - 1)], t1)
    struct = jax.eval_shape(lambda y: observe(flow, plan.observers, y), y0)

    def save(t, y, args):
        return jax.lax.cond(
            t < t1,
            lambda y: observe(flow, plan.observers, y),
            lambda y: jtu.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), struct),
            y,
        )

    # Only the controller's state is saved, for the host (`outcome`), and none is passed in:
    # every segment starts its solver and controller afresh, as a new diffeqsolve from the
    # segment's start. Passing them in (to resume the step-size history across a transition)
    # measured 2-4% slower on a small solve (benchmarks/RESULTS.md), and buys nothing after a
    # transition, where the step was cut at the root and the first stage must be evaluated
    # again anyway.
    saveat = diffrax.SaveAt(
        subs=[
            diffrax.SubSaveAt(ts=segment_ts, fn=save),
            diffrax.SubSaveAt(t1=True),
        ],
        controller_state=True,
    )
    meter = plan.meter
    if isinstance(meter, SegmentMeter):
        meter = meter.at_segment(t0, index)
    sol = diffrax.diffeqsolve(
        term,
        plan.solver,
        t0,
        t1,
        plan.dt0,
        y0,
        saveat=saveat,
        stepsize_controller=plan.controller,
        event=event,
        max_steps=plan.segment_steps,
        throw=False,
        progress_meter=meter,
    )
    t_end = sol.ts[1][0].astype(c["t"].dtype)
    y_end = jtu.tree_map(lambda leaf: leaf[0], sol.ys[1])

    result, results = sol.result, diffrax.RESULTS
    event_occurred = result == results.event_occurred
    mask = sol.event_mask
    blown = event_occurred & (mask[0] if n else mask)
    fired = event_occurred & jnp.logical_not(blown)
    reached = (t_end >= t1) & jnp.logical_not(blown)
    # The end state is observed when a transition fired there (its observables) or when it
    # is `t1` (the save times at `t1`); a segment cut or a failure needs neither.
    here = jax.lax.cond(
        fired | reached,
        lambda y: observe(flow, plan.observers, y),
        lambda y: jtu.tree_map(lambda s: jnp.full(s.shape, jnp.nan, s.dtype), struct),
        y_end,
    )
    # Save times this segment covered (none when t_end is nan), from the rolled array; those
    # at `t1` from the end state.
    covered = ours & (plan.ts <= t_end)
    at_end = covered & (plan.ts >= t1)
    unrolled = jnp.clip(jnp.arange(n_ts) - skip, 0, n_ts - 1)

    def merge(old, saved, end):
        shape = (-1,) + (1,) * (old.ndim - 1)
        new = jnp.where(at_end.reshape(shape), end.astype(old.dtype)[None],
                        saved[unrolled].astype(old.dtype))
        return jnp.where(covered.reshape(shape), new, old)

    observables = jtu.tree_map(merge, c["observables"], sol.ys[0], here)
    this = fired & (jnp.arange(n) == index)
    at_transitions = jtu.tree_map(
        lambda old, new: jnp.where(
            this.reshape((-1,) + (1,) * (old.ndim - 1)), new.astype(old.dtype)[None], old
        ),
        c["at_transitions"],
        here,
    )
    seg_steps = jnp.asarray(sol.stats["num_steps"]).astype(c["steps"].dtype)
    steps = c["steps"] + seg_steps
    max_reached = result == results.max_steps_reached
    status = jnp.select(
        [
            blown,
            fired & (t_end >= t1),
            fired,
            result == results.successful,
            # A cut every segment_steps steps goes on from the last step's end.
            max_reached & (steps >= plan.max_steps),
            max_reached,
            result == results.dt_min_reached,
        ],
        [NONFINITE, COMPLETED, RUNNING, COMPLETED, MAX_STEPS, RUNNING, DT_MIN],
        FAILED,
    ).astype(c["status"].dtype)
    # A failure after the state left float range (e.g. steps collapsing on NaNs) is that.
    failed = (status != RUNNING) & (status != COMPLETED)
    status = jnp.where(
        failed & jnp.logical_not(squared_norm(y_end) < diverged_squared_norm(y_end)),
        NONFINITE,
        status,
    ).astype(c["status"].dtype)
    counts = jnp.stack(
        [sol.stats["num_steps"], sol.stats["num_accepted_steps"], sol.stats["num_rejected_steps"]]
    ).astype(c["counts"].dtype)
    out = dict(
        t=t_end,
        index=c["index"] + fired.astype(c["index"].dtype),
        y=y_end,
        controller_state=sol.controller_state,
        observables=observables,
        found=jnp.where(this, t_end, c["found"]),
        at_transitions=at_transitions,
        status=status,
        steps=jnp.where(fired, 0, steps).astype(c["steps"].dtype),
        counts=c["counts"] + counts,
        segments=c["segments"] + 1,
    )
    # Exactly the carry's types, so the loop (and a resumed checkpoint) sees one structure.
    return jtu.tree_map(lambda new, old: jnp.asarray(new).astype(jnp.result_type(old)), out, c)


def run(plan: Plan, carry: dict, max_segments) -> dict:
    """Run segments from `carry` until the solve ends or `max_segments` more have run."""
    start = carry["segments"]

    def going(c):
        return (c["status"] == RUNNING) & (c["segments"] - start < max_segments)

    return jax.lax.while_loop(going, lambda c: _segment(plan, c), carry)


# --------------------------------------------------------------------------------------------
# Programs: one bounded cache for solve's and sweep's compiled programs


class _LRU:
    """A bounded mapping that forgets the least recently used entry: compiled programs hold
    the functions they were built from, so an unbounded cache would keep every function ever
    passed alive."""

    def __init__(self, size: int):
        self.size = size
        self.entries: collections.OrderedDict = collections.OrderedDict()

    def get(self, key):
        if key is None or key not in self.entries:
            return None
        self.entries.move_to_end(key)
        return self.entries[key]

    def put(self, key, value):
        if key is None:
            return value
        self.entries[key] = value
        self.entries.move_to_end(key)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return value


CACHE = _LRU(64)


def compiled_programs() -> list:
    """The compiled programs now in the cache (for memory analyses)."""
    return [v for k, v in CACHE.entries.items() if not (isinstance(k, tuple) and k[0] == "template")]


def split(tree: PyTree) -> tuple[list, Any, Hashable | None]:
    """`tree`'s array leaves, a function rebuilding `tree` from them, and a hashable key of
    everything but the arrays' values (`None` when a static part is unhashable)."""
    leaves, treedef = jtu.tree_flatten(tree)
    is_array = [eqx.is_array(x) for x in leaves]
    arrays = [x for x, a in zip(leaves, is_array) if a]
    static = tuple(None if a else x for x, a in zip(leaves, is_array))
    key = (treedef, static, tuple((x.shape, x.dtype) for x in arrays))
    try:
        hash(key)
    except TypeError:  # an unhashable static leaf: compile without caching
        key = None

    def rebuild(arrays):
        it = iter(arrays)
        return jtu.tree_unflatten(treedef, [next(it) if a else x for x, a in zip(static, is_array)])

    return arrays, rebuild, key


def carry_template(plan: Plan, key: Hashable | None) -> dict:
    """`initial_carry` for `plan` as host arrays (built once per structure: it costs
    milliseconds); `t` and `y` are placeholders, replaced by `start`."""
    entry = CACHE.get(("template", key))
    if entry is None:
        entry = jtu.tree_map(np.asarray, initial_carry(plan, plan.flow.params, plan.t1))
        entry = CACHE.put(("template", key), entry)
    return entry


def start(template: dict, y0: PyTree, t0) -> dict:
    """The initial carry: `template` at state `y0` and time `t0`."""
    return dict(template, t=np.asarray(t0, dtype=template["t"].dtype), y=y0)


def compiled(key: Hashable | None, build: Callable[[], Callable], *example) -> tuple[Callable, float, float]:
    """The compiled program cached under `key`, or `build()` compiled at `example` inputs;
    and the seconds spent tracing (with lowering) and compiling it (0 and 0 when cached).

    Programs are compiled with equinox's runtime errors turned into NaNs (`EQX_ON_ERROR=nan`,
    set by `gflow` at import unless the user set it): failure is reported through
    `Solution.result` (`throw=False`), and a raising check would embed a host callback that
    makes JAX's persistent compilation cache miss in every new process. With that cache warm,
    compiling is a cache read, while tracing is paid in every process.
    """
    import time

    entry = CACHE.get(key)
    if entry is not None:
        return entry, 0.0, 0.0
    begin = time.perf_counter()
    lowered = jax.jit(build()).lower(*example)
    traced = time.perf_counter()
    program = lowered.compile()
    CACHE.put(key, program)
    return program, traced - begin, time.perf_counter() - traced


def solve_program(rebuild: Callable) -> Callable:
    """`run` over a plan given as its array leaves."""

    def program(plan_arrays, carry, max_segments):
        return run(rebuild(plan_arrays), carry, max_segments)

    return program


# --------------------------------------------------------------------------------------------
# Host side: what a finished carry says


def to_host(tree: PyTree) -> PyTree:
    """`tree` with every array as a NumPy array (read-only where it views a CPU buffer).

    `np.asarray` leaf by leaf rather than `jax.device_get`: on CPU it is a view of the
    buffer, about 1.5 µs a leaf, where `device_get` copies at about 12 µs a leaf (measured:
    13 leaves, 16 against 162 µs): a fifth of a small solve's host work. Elsewhere it is one
    blocking copy a leaf, which for the few leaves of a carry costs about what
    `device_get`'s overlapped copies do.
    """
    return jtu.tree_map(np.asarray, tree)


def _held_at_dtmin(controller_state) -> bool:
    """Whether diffrax's PID controller had clipped the step to its `dtmin` (the last entry of
    its state): a divergence then is not told by the flow alone."""
    leaves = jtu.tree_leaves(controller_state)
    return bool(leaves) and getattr(leaves[-1], "dtype", None) == bool and bool(leaves[-1])


def outcome(carry: dict, names: list[str], max_steps: int) -> dict[str, Any]:
    """Status, message, transition times, end time and step counts of a host carry."""
    from ._solve import status_message  # the message wording lives with solve's docs

    status_index = int(carry["status"])
    status = "failed" if status_index == RUNNING else STATUSES[status_index]
    t_final = float(carry["t"])
    counts = [int(x) for x in carry["counts"]]
    message = status_message(status, t_final, max_steps)
    if status == "nonfinite" and _held_at_dtmin(carry["controller_state"]):
        # Told apart from a divergence of the flow itself: the step could shrink no further.
        message += ("; steps were held at the smallest allowed step: a blow-up, or a flow too "
                    "stiff for that step")
    return dict(
        status=status,
        message=message,
        transitions={name: float(t) for name, t in zip(names, np.asarray(carry["found"]))},
        t_final=t_final,
        stats=dict(
            num_steps=counts[0],
            num_accepted_steps=counts[1],
            num_rejected_steps=counts[2],
            segments=int(carry["segments"]),
        ),
    )


def trajectory(
    carry: dict, *, flow: GradientFlow, ts: np.ndarray, names: list[str], t0: float, t1: float,
    solver: diffrax.AbstractSolver, rtol: float, atol: float, max_steps: int, dt0_given: bool,
    stats: dict | None = None,
) -> Trajectory:
    """The `Trajectory` of a finished host carry (solve's, or a sweep member's)."""
    done = outcome(carry, names, max_steps)
    t_final = done["t_final"]
    saved = (ts <= t_final) if math.isfinite(t_final) else np.zeros_like(ts, dtype=bool)
    keep = (lambda x: x) if saved.all() else (lambda x: x[saved])
    found = np.asarray(carry["found"])
    at_transitions = {
        name: jtu.tree_map(lambda x, k=k: np.asarray(x)[k], carry["at_transitions"])
        for k, name in enumerate(names) if math.isfinite(float(found[k]))
    }
    return Trajectory(
        ts=keep(ts),
        observables=jtu.tree_map(lambda x: keep(np.asarray(x)), carry["observables"]),
        transitions=done["transitions"],
        # Device arrays already from `gflow.solve`; host arrays from a sweep or a checkpoint.
        # Through the class: equinox wraps a method looked up on an instance in a new module,
        # which costs about 70 µs, a tenth of a small solve's host work (measured).
        final=type(flow).combine(flow, jtu.tree_map(
            lambda x: x if isinstance(x, jax.Array) else jnp.asarray(x), carry["y"])),
        t0=t0,
        t1=t1,
        t_final=t_final,
        status=done["status"],
        message=done["message"],
        stats=member_stats(done, solver, dt0_given) | dict(
            dtype=str(jnp.result_type(*jtu.tree_leaves(carry["y"]))),
        ) | dict(stats or {}),
        solver=solver_name(solver),
        rtol=float(rtol),
        atol=float(atol),
        at_transitions=at_transitions,
    )


def member_stats(done: dict, solver: diffrax.AbstractSolver, dt0_given: bool) -> dict:
    """Step counts, segments and vector-field evaluations of an `outcome`."""
    stats = done["stats"]
    return dict(stats) | dict(
        vector_field_evaluations=vector_field_evaluations(
            solver, stats["num_steps"], stats["segments"], dt0_given
        )
    )
