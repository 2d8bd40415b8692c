"""The one solve loop of gflow: every segment and every transition of a solve in one program.

A solve is a chain of segments: a `diffrax.diffeqsolve` from where the previous one stopped
until `t1`, the next transition (an `Event` whose condition is picked by `lax.switch` from the
transition index), a failure, or a cut every `segment_steps` steps. `run` chains them in a
`lax.while_loop`, so that the whole solve is one pure, traceable function of arrays:

- `gflow.solve` compiles `run` once per problem structure and calls it once, or chunk by chunk
  (a checkpoint, a progress update or a Ctrl-C check between chunks);
- `gflow.sweep` maps (`lax.map`, `vmap`, `shard_map`) the same `run` over members;
- `certify` calls the same compiled `run` again: tolerances are arrays in the `Plan`, not
  static, so the tighter reference solve needs no new compilation.

A cut does not change the solve: the solver's state (its first-same-as-last stage), the
step-size controller's state and the step size it proposed cross it in the carry, and the
next segment's `diffeqsolve` continues from them. So a solve cut every step takes exactly
the steps of one never cut, and a chunked (checkpointed, resumed) run is bit for bit the same
as one call. After a transition the next segment starts afresh (a new first step, as
`diffeqsolve` chooses one), from the dense-output state at the located time: diffrax's `Event`
truncates the step at the root and returns only the interpolated state. What that costs is one
interpolation error per transition: about one step's error with Tsit5, whose dense output is as
accurate as its steps; with Dopri8, whose dense output is 50-150x its rtol, a rtol-1e-12 solve
with transitions strays ~6e-12 from the same solve without them (docs/results.md).

Under `vmap` (sweeps on accelerators) a `lax.switch` or `lax.cond` with a batched index would
compute every branch for every member. Every running member of a batch looks for the same
transition (a segment ends for all of them at once, each at its own event), so the index is
made uniform with `eqx.internal.unvmap_max` and only the active condition runs; the rare batch
whose running members disagree (a sweep cut into chunks) takes the batched branch instead.
The other conditions of the engine (observing at the end of a segment or at a save time) are
taken when any member needs them.

Only arrays cross `lax.switch`, the loop carry and the program boundary: the model is split
into its trainable arrays (the state) and the rest, which the branches close over.
"""

import collections
import contextlib
import dataclasses
import time
import weakref
from collections.abc import Callable, Hashable
from typing import Any, ClassVar, NamedTuple

import diffrax
import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optimistix as optx
import threadpoolctl
from diffrax._term import WrapTerm  # what diffeqsolve hands a controller's `init`
from jaxtyping import Array, PyTree, Scalar

from ._flow import GradientFlow
from ._precision import FLOAT64, Precision
from ._status import Status
from ._work import add_work, work_template


# A state whose squared norm passes this (or is NaN) has diverged: float64 squares overflow at
# ~1e154, and no gradient flow of interest lives out there.
DIVERGED_SQUARED_NORM = 1e200

# Segments a single call of `run` may take when the solve is not chunked: no limit.
ALL_SEGMENTS = 2**30


def squared_norm(tree: PyTree) -> Scalar:
    return sum(jnp.sum(jnp.square(leaf)) for leaf in jtu.tree_leaves(tree))


def diverged_squared_norm(tree: PyTree) -> float:
    """`DIVERGED_SQUARED_NORM`, or less where the state's dtype (float32) overflows first."""
    dtype = jnp.result_type(*jtu.tree_leaves(tree))
    return min(DIVERGED_SQUARED_NORM, float(jnp.finfo(dtype).max) / 16)


class Plan(NamedTuple):
    """Everything a solve runs on, arrays and static parts together (built from a
    `gflow.SolveSpec` by `gflow._results.plan`).

    Partitioned by `eqx.is_array` (`split`), its arrays are the program's inputs and
    everything else (functions, solver, settings) the program's identity. A named tuple, not
    an `eqx.Module`: it is a record built on every solve, and equinox's construction checks
    cost about 180 µs for these fields, a tenth of a small solve's host work.
    """

    flow: GradientFlow
    observers: dict  # {name: observer(model, data)}, evaluated at the save times
    conditions: tuple  # transition conditions, condition(model, data) -> scalar
    directions: Array  # per condition (+1 up, -1 down, 0 either) and a trailing 0
    terminal: Array  # per condition: whether the solve ends there; and a trailing False
    ts: Array
    t1: Array
    dt0: Array | None
    solver: diffrax.AbstractSolver
    controller: diffrax.AbstractStepSizeController
    root_finder: optx.AbstractRootFinder
    meter: diffrax.AbstractProgressMeter  # diffrax's, per segment (gflow's bar is host-side)
    max_steps: int  # Python ints, static: `split` keeps every non-array leaf in the key
    segment_steps: int
    precision: Precision = FLOAT64  # in which types the velocity is computed
    # {name: observer(model, data)} evaluated only at `snapshot_ts` (t0, the chosen times and
    # t1, as `gflow.SolveSpec.all_snapshot_ts` gives them) and at the located transitions.
    snapshots: dict = {}
    snapshot_ts: Array | None = None


class Resumable(diffrax.AbstractAdaptiveStepSizeController):
    """An adaptive step-size controller whose state also holds the step it proposes next, so
    that a `diffeqsolve` continued from its state (`controller_state=`, `dt0=` that step)
    takes the steps the uninterrupted solve would have taken."""

    controller: diffrax.AbstractAdaptiveStepSizeController

    @property
    def rtol(self):
        return self.controller.rtol

    @property
    def atol(self):
        return self.controller.atol

    @property
    def norm(self):
        return self.controller.norm

    def wrap(self, direction):
        return Resumable(self.controller.wrap(direction))

    def init(self, terms, t0, t1, y0, dt0, args, func, error_order):
        tnext, state = self.controller.init(terms, t0, t1, y0, dt0, args, func, error_order)
        return tnext, (state, jnp.asarray(tnext - t0))

    def adapt_step_size(self, t0, t1, y0, y1_candidate, args, y_error, error_order,
                        controller_state):
        keep, next_t0, next_t1, jump, state, result = self.controller.adapt_step_size(
            t0, t1, y0, y1_candidate, args, y_error, error_order, controller_state[0])
        return keep, next_t0, next_t1, jump, (state, jnp.asarray(next_t1 - next_t0)), result


def _resumable(controller: diffrax.AbstractStepSizeController):
    """The controller the engine steps with: adaptive ones remember their next step."""
    if isinstance(controller, diffrax.AbstractAdaptiveStepSizeController):
        return Resumable(controller)
    return controller


def _observe(flow: GradientFlow, observers: dict, y: PyTree) -> dict:
    model = flow.combine(y)
    values = {name: obs(model, flow.data) for name, obs in observers.items()}
    return jtu.tree_map(lambda x: jnp.asarray(x, dtype=jnp.result_type(x, float)), values)


# Traced once per program, not at each of the places a solve calls them: a jitted function
# called again with the same structure inside one trace reuses its jaxpr. diffrax traces the
# vector field and the save function several times (shapes, closure conversion, the step, the
# interpolation), and a segment observes in three places.
_observe_once = eqx.filter_jit(_observe)
_velocity_once = eqx.filter_jit(lambda flow, precision, y: precision.velocity(flow, y))


def velocity_flops(flow: GradientFlow, precision: Precision) -> float | None:
    """XLA's count of the floating-point operations of one velocity of `flow` under
    `precision` (lowered, not compiled); `None` where the backend does not count them."""
    cost = _velocity_once.lower(flow, precision, flow.params).lowered.cost_analysis()
    if isinstance(cost, (list, tuple)):  # one entry per device in some JAX versions
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops is not None and flops > 0 else None


def observe(flow: GradientFlow, observers: dict, y: PyTree) -> dict:
    """`{name: observer(model, data)}` at state `y`, as floating arrays.

    Floating outputs only: diffrax fills unreached save times with inf, and an integer
    observable (a count, a rank) would not fit that buffer.
    """
    return _observe_once(flow, observers, y)


def _term(flow: GradientFlow, precision: Precision) -> diffrax.ODETerm:
    return diffrax.ODETerm(lambda t, y, args: _velocity_once(flow, precision, y))


def _fresh(plan: Plan, y: PyTree, t0) -> tuple:
    """The first step size, controller state and solver state of a segment that starts
    afresh at `t0` (the solve's start, or a located transition): what `diffeqsolve` itself
    would initialise (it hands `init` a `WrapTerm`, which makes diffrax's PID controller
    start from a step of 0.01 rather than run its initial-step heuristic)."""
    term = WrapTerm(_term(plan.flow, plan.precision), jnp.asarray(1))
    controller = _resumable(plan.controller).wrap(jnp.asarray(1))
    t1 = jnp.asarray(plan.t1, dtype=jnp.result_type(t0))
    dt0 = None if plan.dt0 is None else jnp.asarray(plan.dt0, dtype=jnp.result_type(t0))
    tnext, controller_state = controller.init(
        term, t0, t1, y, dt0, None, plan.solver.func, plan.solver.error_order(term))
    tnext = jnp.minimum(tnext, t1)
    solver_state = plan.solver.init(term, t0, tnext, y, None)
    return tnext - t0, controller_state, solver_state


class Carry(eqx.Module):
    """Where a solve stands between segments: the engine's loop carry, arrays only.

    **Fields:**

    - `t`, `y`: the flow time reached and the state there.
    - `index`: the transition looked for next.
    - `fresh`: whether the next segment starts afresh (at `t0` and after a transition) or
        continues the steps of the last one (after a cut), from `dt`, `controller_state` and
        `solver_state`, the step size proposed next and the controller's and solver's states.
    - `observables`: at each save time (NaN until reached); `found`: each transition's time
        (NaN until located); `at_transitions`: the observables there (NaN until reached);
        `snapshots`: the plan's snapshot observables at each of its `snapshot_ts`, then at
        each transition (NaN until reached).
    - `status`: a `Status` code, `Status.RUNNING` while the solve goes on.
    - `steps`: steps since the last transition (`max_steps` limits these); `counts`: steps,
        accepted, rejected; `segments`: segments run; `starts`: segments started afresh.
    - `work`: the work counters of a solver that keeps them (`gflow`'s implicit and switching
        solvers; empty otherwise), summed over the segments (`gflow._work`).
    """

    t: Array
    y: PyTree
    index: Array
    fresh: Array
    dt: Array
    controller_state: PyTree
    solver_state: PyTree
    observables: PyTree
    found: Array
    at_transitions: PyTree
    snapshots: PyTree
    status: Array
    steps: Array
    counts: Array
    segments: Array
    starts: Array
    work: PyTree

    # The fields that hold NaN by design (save times and transitions not reached yet); every
    # other field is finite unless the state diverged.
    NAN_BY_DESIGN: ClassVar[tuple[str, ...]] = ("observables", "found", "at_transitions",
                                                "snapshots")

    def result(self) -> "Carry":
        """This final carry as a solve's result reads it (`gflow._results`): what only a
        continued solve needs (the solver's state, the step proposed next, the transition
        index, the steps since the last one) is `None`, and of the controller's state only its
        flags remain (whether the step was held at `dtmin`). A program that runs a solve to
        its end returns this: half the buffers to hand back."""
        flags = tuple(x for x in jtu.tree_leaves(self.controller_state) if x.dtype == bool)
        return dataclasses.replace(self, index=None, fresh=None, dt=None, solver_state=None,
                                   steps=None, controller_state=flags)

    def nan_allowed(self) -> "Carry":
        """A tree of bools over this carry's leaves: where NaN is no sign of damage."""
        return Carry(**{
            field.name: jtu.tree_map(lambda _, n=field.name: n in self.NAN_BY_DESIGN,
                                     getattr(self, field.name))
            for field in dataclasses.fields(self)
        })


def initial_carry(plan: Plan, y0: PyTree, t0) -> Carry:
    """The carry a solve starts from (traceable; `carry_template` evaluates it once)."""

    def zeros_like_shapes(tree):
        # As arrays (a controller may hold Python bools): the carry holds arrays only.
        return jtu.tree_map(lambda s: jnp.zeros(jnp.shape(s), jnp.result_type(s)), tree)

    dt, controller_state, solver_state = zeros_like_shapes(eqx.filter_eval_shape(
        lambda p, y, t: _fresh(p, y, t), plan, y0, jnp.asarray(t0, dtype=plan.ts.dtype)))
    struct = eqx.filter_eval_shape(lambda p, y: observe(p.flow, p.observers, y), plan, y0)
    rich = eqx.filter_eval_shape(lambda p, y: observe(p.flow, p.snapshots, y), plan, y0)
    n_ts = plan.ts.shape[0]
    n = len(plan.conditions)
    int_ = jnp.asarray(0).dtype

    def nans(lead, struct=struct):
        return jtu.tree_map(lambda s: jnp.full((lead,) + s.shape, jnp.nan, s.dtype), struct)

    return Carry(
        t=jnp.asarray(t0, dtype=plan.ts.dtype),
        y=y0,
        index=jnp.asarray(0, dtype=jnp.int32),
        fresh=jnp.asarray(True),
        dt=jnp.asarray(dt, dtype=plan.ts.dtype),
        controller_state=controller_state,
        solver_state=solver_state,
        observables=nans(n_ts),
        found=jnp.full((n,), jnp.nan, dtype=plan.ts.dtype),
        # The state at a located transition is the root finder's, which no save time holds.
        at_transitions=nans(n),
        snapshots=nans(_snapshot_count(plan) + n if plan.snapshots else 0, rich),
        status=jnp.asarray(Status.RUNNING, dtype=jnp.int32),
        steps=jnp.asarray(0, dtype=int_),
        counts=jnp.zeros(3, dtype=int_),
        segments=jnp.asarray(0, dtype=int_),
        starts=jnp.asarray(0, dtype=int_),
        work=work_template(plan.solver, plan.ts.dtype),
    )


def _snapshot_count(plan: Plan) -> int:
    return 0 if plan.snapshot_ts is None else plan.snapshot_ts.shape[0]


def _this_segment(ts, t0, t1, first) -> tuple:
    """The times of `ts` a segment from `t0` observes, after its start (from it, in the first
    segment): which they are, and the segment's save array.

    They are rolled to the front of the segment's save array and the rest padded with `t1`,
    rather than clipped to the start: clipped, every earlier time would cost an interpolation
    at the segment's first step, in every segment. A pad at `t1` costs one only at the end of
    the last segment, and observes nothing: the observer is skipped at `t1`, whose times are
    observed on the end state instead (`_merge`)."""
    n_ts = ts.shape[0]
    ours = (ts > t0) | (first & (ts >= t0))
    skip = n_ts - jnp.sum(ours)
    source = jnp.arange(n_ts) + skip
    return ours, skip, jnp.where(source < n_ts, ts[jnp.minimum(source, n_ts - 1)], t1)


def _merge(ts, ours, skip, t_end, t1, old: PyTree, saved: PyTree, end: PyTree) -> PyTree:
    """`old` with the times of `ts` a segment covered (up to `t_end`; none when it is nan)
    filled from its rolled save array `saved`, those at `t1` from the end state's `end`."""
    n_ts = ts.shape[0]
    covered = ours & (ts <= t_end)
    at_end = covered & (ts >= t1)
    unrolled = jnp.clip(jnp.arange(n_ts) - skip, 0, n_ts - 1)

    def merge(old, saved, end):
        shape = (-1,) + (1,) * (old.ndim - 1)
        new = jnp.where(at_end.reshape(shape), end.astype(old.dtype)[None],
                        saved[unrolled].astype(old.dtype))
        return jnp.where(covered.reshape(shape), new, old)

    return jtu.tree_map(merge, old, saved, end)


def _uniform(index, running):
    """`index` made unbatched under `vmap` when every running member agrees on it (and
    whether they do); outside `vmap`, `index` itself."""
    active = jnp.where(running, index, -1)
    top = eqxi.unvmap_max(active)
    low = -eqxi.unvmap_max(jnp.where(running, -index, 1))
    return jnp.maximum(top, 0), (top == low) | (top < 0)


def _segment(plan: Plan, c: Carry) -> Carry:
    """One diffrax solve from the carry `c` until `t1`, the next transition, a failure or
    `segment_steps` steps; returns the carry after it."""
    flow, y0, t0, t1 = plan.flow, c.y, c.t, plan.t1
    n = len(plan.conditions)
    term = _term(flow, plan.precision)
    running = c.status == Status.RUNNING
    uniform_index, agree = _uniform(c.index, running)

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
        if n == 0:
            return branches[0](y)
        # A real branch for the batch when its members agree (an unbatched predicate); the
        # batched switch, which computes every condition, only when they do not.
        return jax.lax.cond(
            agree,
            lambda y: jax.lax.switch(uniform_index, branches, y),
            lambda y: jax.lax.switch(c.index, branches, y),
            y,
        )

    direction = plan.directions[c.index]
    # Either direction: the first change away from the sign at the segment's start. The
    # wanted crossing is then always an upcrossing for diffrax. A cond, not a where: the
    # condition (an SVD, say) is evaluated only when it is needed.
    if n:
        sign = jax.lax.cond(
            eqxi.unvmap_any(direction == 0),
            lambda: jnp.where(
                direction == 0, jnp.where(condition(y0) > 0, -1.0, 1.0), direction
            ).astype(direction.dtype),
            lambda: direction,
        )

        def transition(t, y, args, **kwargs):
            del t, args, kwargs
            return sign * condition(y)

        # Tree order decides which event wins when both trigger on one step: divergence first.
        event = diffrax.Event(
            [diverged, transition], root_finder=plan.root_finder, direction=[None, True]
        )
    else:
        event = diffrax.Event(diverged)
    # The save times and snapshot times this segment observes (see `_this_segment`).
    first = c.segments == 0
    ours, skip, segment_ts = _this_segment(plan.ts, t0, t1, first)
    rich = bool(plan.snapshots)
    struct = jax.eval_shape(lambda y: observe(flow, plan.observers, y), y0)
    rich_struct = jax.eval_shape(lambda y: observe(flow, plan.snapshots, y), y0)

    def observe_with(observers):
        def observe_state(y):
            # diffrax's dense output mixes the state with the (float64) time: the observers
            # see the state in its own dtype, so both branches of a save agree under any
            # precision.
            y = jtu.tree_map(lambda a, b: a.astype(b.dtype), y, y0)
            return observe(flow, observers, y)

        return observe_state

    def saver(observers, struct):
        def save(t, y, args):
            return jax.lax.cond(
                eqxi.unvmap_any(t < t1),
                observe_with(observers),
                lambda y: jtu.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), struct),
                y,
            )

        return save

    # Where the last segment was cut, its steps go on: the solver's and controller's states
    # and the proposed step cross the cut. After a transition (and at the start) the segment
    # starts afresh, as a new diffeqsolve would.
    dt, controller_state, solver_state = jax.lax.cond(
        eqxi.unvmap_any(c.fresh),
        lambda: jtu.tree_map(
            lambda new, old: jnp.where(c.fresh, new, old),
            _fresh(plan, y0, t0), (c.dt, c.controller_state, c.solver_state)),
        lambda: (c.dt, c.controller_state, c.solver_state),
    )
    subs = [
        diffrax.SubSaveAt(ts=segment_ts, fn=saver(plan.observers, struct)),
        diffrax.SubSaveAt(t1=True),
    ]
    if rich:
        # The snapshots' chosen times: a save array of their own, so that the ordinary save
        # times never evaluate them.
        rich_ours, rich_skip, rich_ts = _this_segment(plan.snapshot_ts, t0, t1, first)
        subs.append(diffrax.SubSaveAt(ts=rich_ts, fn=saver(plan.snapshots, rich_struct)))
    saveat = diffrax.SaveAt(
        subs=subs,
        controller_state=True,
        solver_state=True,
    )
    # The step proposed next is read only where a segment is cut: a plan never cut steps with
    # the controller itself (an operation a step less), and its carry keeps the first step.
    resumed = isinstance(plan.controller, diffrax.AbstractAdaptiveStepSizeController)
    remember = resumed and plan.segment_steps < plan.max_steps
    sol = diffrax.diffeqsolve(
        term,
        plan.solver,
        t0,
        t1,
        dt,
        y0,
        saveat=saveat,
        stepsize_controller=_resumable(plan.controller) if remember else plan.controller,
        event=event,
        max_steps=plan.segment_steps,
        throw=False,
        progress_meter=plan.meter,
        solver_state=solver_state,
        controller_state=controller_state if remember or not resumed else controller_state[0],
    )
    end_controller_state = sol.controller_state if remember or not resumed else (
        sol.controller_state, controller_state[1])
    t_end = sol.ts[1][0].astype(c.t.dtype)
    y_end = jtu.tree_map(lambda leaf: leaf[0], sol.ys[1])

    result, results = sol.result, diffrax.RESULTS
    event_occurred = result == results.event_occurred
    mask = sol.event_mask
    blown = event_occurred & (mask[0] if n else mask)
    fired = event_occurred & jnp.logical_not(blown)
    reached = (t_end >= t1) & jnp.logical_not(blown)
    # The end state is observed (snapshots included) when a transition fired there (its
    # observables) or when it is `t1` (the save and snapshot times at `t1`); a segment cut or
    # a failure needs neither.
    def nans(struct):
        return jtu.tree_map(lambda s: jnp.full(s.shape, jnp.nan, s.dtype), struct)

    here, here_rich = jax.lax.cond(
        eqxi.unvmap_any(fired | reached),
        lambda y: (observe_with(plan.observers)(y), observe_with(plan.snapshots)(y)),
        lambda y: (nans(struct), nans(rich_struct)),
        y_end,
    )
    observables = _merge(plan.ts, ours, skip, t_end, t1, c.observables, sol.ys[0], here)
    this = fired & (jnp.arange(n) == c.index)

    def at_this(old, new):
        return jnp.where(this.reshape((-1,) + (1,) * (old.ndim - 1)),
                         new.astype(old.dtype)[None], old)

    at_transitions = jtu.tree_map(at_this, c.at_transitions, here)
    snapshots = c.snapshots
    if rich:
        m = _snapshot_count(plan)
        chosen = _merge(plan.snapshot_ts, rich_ours, rich_skip, t_end, t1,
                        jtu.tree_map(lambda x: x[:m], c.snapshots), sol.ys[2], here_rich)
        snapshots = jtu.tree_map(
            lambda a, old, new: jnp.concatenate([a, at_this(old[m:], new)]),
            chosen, c.snapshots, here_rich)
    seg_steps = jnp.asarray(sol.stats["num_steps"]).astype(c.steps.dtype)
    steps = c.steps + seg_steps
    max_reached = result == results.max_steps_reached
    status = jnp.select(
        [
            blown,
            fired & (t_end >= t1),
            # A terminal transition (e.g. `gflow.converged`) ends the solve where it fired.
            fired & plan.terminal[c.index],
            fired,
            result == results.successful,
            # A cut every segment_steps steps goes on from the last step's end.
            max_reached & (steps >= plan.max_steps),
            max_reached,
            result == results.dt_min_reached,
        ],
        [Status.NONFINITE, Status.COMPLETED, Status.COMPLETED, Status.RUNNING,
         Status.COMPLETED, Status.MAX_STEPS, Status.RUNNING, Status.DT_MIN],
        Status.FAILED,
    )
    # A failure after the state left float range (e.g. steps collapsing on NaNs) is that.
    failed = (status != Status.RUNNING) & (status != Status.COMPLETED)
    status = jnp.where(
        failed & jnp.logical_not(squared_norm(y_end) < diverged_squared_norm(y_end)),
        Status.NONFINITE,
        status,
    )
    counts = jnp.stack(
        [sol.stats["num_steps"], sol.stats["num_accepted_steps"], sol.stats["num_rejected_steps"]]
    )
    # The step proposed next, from the controller's state (a constant step: dt0 again).
    next_dt = end_controller_state[1] if resumed else dt
    out = Carry(
        t=t_end,
        y=y_end,
        index=c.index + fired,
        fresh=fired,
        dt=next_dt,
        controller_state=end_controller_state,
        solver_state=sol.solver_state,
        observables=observables,
        found=jnp.where(this, t_end, c.found),
        at_transitions=at_transitions,
        snapshots=snapshots,
        status=status,
        steps=jnp.where(fired, 0, steps),
        counts=c.counts + counts,
        segments=c.segments + 1,
        starts=c.starts + c.fresh,
        # What the solver counted in this segment: its state at the end less the one it
        # started from (a cut continues the last segment's state and its counts).
        work=add_work(plan.solver, c.work, solver_state, sol.solver_state),
    )
    # Exactly the carry's types, so the loop (and a resumed checkpoint) sees one structure.
    return jtu.tree_map(lambda new, old: jnp.asarray(new).astype(jnp.result_type(old)), out, c)


def run(plan: Plan, carry: Carry, max_segments) -> Carry:
    """Run segments from `carry` until the solve ends or `max_segments` more have run."""
    start = carry.segments

    def going(c):
        return (c.status == Status.RUNNING) & (c.segments - start < max_segments)

    return jax.lax.while_loop(going, lambda c: _segment(plan, c), carry)


# --------------------------------------------------------------------------------------------
# Programs: one bounded cache for solve's and sweep's compiled programs


class LRU:
    """A bounded mapping that forgets the least recently used entry: compiled programs hold
    the functions they were built from, so an unbounded cache would keep every function ever
    passed alive."""

    def __init__(self, size: int):
        self.size = size
        self.entries: collections.OrderedDict = collections.OrderedDict()

    def get(self, key):
        if key is None:
            return None
        try:  # one lookup: certify's two solves share the caches from two threads
            self.entries.move_to_end(key)
            return self.entries[key]
        except KeyError:
            return None

    def put(self, key, value):
        if key is None:
            return value
        self.entries[key] = value
        self.entries.move_to_end(key)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return value


CACHE = LRU(64)


def compiled_programs() -> list:
    """The compiled programs now in the cache (for memory analyses)."""
    return [v for k, v in CACHE.entries.items() if not (isinstance(k, tuple) and k[0] == "template")]


def split(tree: PyTree) -> tuple[list, Any, Hashable | None]:
    """`tree`'s array leaves, a function rebuilding `tree` from them, and a hashable key of
    everything but the arrays' values (`None` when a static part is unhashable).

    A leaf that occurs more than once (the same array object: a held-out set that two
    observers read) is one input of the program, so that XLA computes what depends on it
    once; which leaves share an input is part of the key.
    """
    leaves, treedef = jtu.tree_flatten(tree)
    is_array = [eqx.is_array(x) for x in leaves]
    arrays, slot, position = [], [], {}
    for x, a in zip(leaves, is_array):
        if a:
            if id(x) not in position:
                position[id(x)] = len(arrays)
                arrays.append(x)
            slot.append(position[id(x)])
        else:
            slot.append(None)
    slot = tuple(slot)
    static = tuple(None if a else x for x, a in zip(leaves, is_array))
    key = (treedef, static, slot, tuple((x.shape, x.dtype) for x in arrays))
    try:
        hash(key)
    except TypeError:  # an unhashable static leaf: compile without caching
        key = None

    def rebuild(arrays):
        return jtu.tree_unflatten(treedef, [x if i is None else arrays[i]
                                            for x, i in zip(static, slot)])

    return arrays, rebuild, key


def carry_template(plan: Plan, key: Hashable | None) -> Carry:
    """`initial_carry` for `plan` as host arrays (built once per structure: it costs
    milliseconds); `t` and `y` are placeholders, replaced by `start`."""
    entry = CACHE.get(("template", key))
    if entry is None:
        entry = jtu.tree_map(np.asarray, initial_carry(plan, plan.flow.params, plan.t1))
        entry = CACHE.put(("template", key), entry)
    return entry


def start(template: Carry, y0: PyTree, t0) -> Carry:
    """The initial carry: `template` at state `y0` (of the structure of `template.y`) and
    time `t0`."""
    # Rebuilt from its leaves, whose first are `t` and `y`'s (the fields' order): about
    # 20 µs, where `eqx.tree_at` takes ~170 µs.
    leaves, treedef = jtu.tree_flatten(template)
    y_leaves, y_def = jtu.tree_flatten(y0)
    if y_def != jtu.tree_structure(template.y):
        raise ValueError(f"the state's structure {y_def} is not the carry's")
    return jtu.tree_unflatten(treedef, [np.asarray(t0, dtype=template.t.dtype), *y_leaves,
                                        *leaves[1 + len(y_leaves):]])


def compiled(key: Hashable | None, build: Callable[[], Callable], *example,
             donate_argnums: tuple[int, ...] = ()) -> tuple[Callable, float, float]:
    """The compiled program cached under `key`, or `build()` compiled at `example` inputs
    (its arguments `donate_argnums` donated: their buffers become the outputs', and the
    arrays passed there are deleted by a call); and the seconds spent tracing (with lowering)
    and compiling it (0 and 0 when cached).

    Programs are compiled with equinox's runtime errors turned into NaNs (`EQX_ON_ERROR=nan`,
    set by `gflow` at import unless the user set it): failure is reported through
    `Solution.result` (`throw=False`), and a raising check would embed a host callback that
    makes JAX's persistent compilation cache miss in every new process. With that cache warm,
    compiling is a cache read, while tracing is paid in every process.
    """
    entry = CACHE.get(key)
    if entry is not None:
        return entry, 0.0, 0.0
    begin = time.perf_counter()
    lowered = jax.jit(build(), donate_argnums=donate_argnums).lower(*example)
    traced = time.perf_counter()
    program = lowered.compile()
    CACHE.put(key, program)
    return program, traced - begin, time.perf_counter() - traced


# Whether a compiled program calls LAPACK, by program (read once from its HLO).
_CALLS_LAPACK: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def calls_lapack(program) -> bool:
    """Whether a compiled program calls LAPACK (an SVD, an eigendecomposition, a solve: JAX's
    CPU kernels, named `lapack_*`), so that it should run in `one_lapack_thread`; `True`
    when that cannot be told."""
    try:
        return _CALLS_LAPACK[program]
    except KeyError:
        pass
    except TypeError:  # not weakly referable
        return True
    try:
        calls = "lapack_" in program.as_text()
    except Exception:  # a program without HLO text
        calls = True
    _CALLS_LAPACK[program] = calls
    return calls


_THREADPOOLS: list = []  # one `threadpoolctl.ThreadpoolController`, made at the first solve


def one_lapack_thread() -> contextlib.AbstractContextManager:
    """A context in which each BLAS/LAPACK call runs on one thread (process-wide, restored
    on exit): the engine's programs run in it.

    On CPU the SVDs and eigendecompositions of observers, conditions and snapshots call
    SciPy's OpenBLAS, which starts a pool of every core per call, while XLA runs the
    program's independent operations (five SVDs of one snapshot, two solves under certify)
    at once on its own pool of every core: together they oversubscribe the machine, and
    OpenBLAS's waiting threads then take the cores from the work. XLA's own matrix products
    do not use this pool. Measured side by side (docs/results.md, the paper-size probes): a
    snapshot of the default preset at the paper's size costs about the same on a quiet
    2-core machine with one thread or two, and a third with one thread when two other
    processes keep the cores busy.
    """
    # A controller finds the loaded BLAS libraries once (about 1.6 ms, a tenth of a small
    # solve); limiting through it then costs about 40 µs. JAX's CPU LAPACK kernels are
    # SciPy's, which JAX loads only at its first decomposition: loaded here, so that the
    # controller finds them.
    if not _THREADPOOLS:
        import scipy.linalg  # noqa: F401

        _THREADPOOLS.append(threadpoolctl.ThreadpoolController())
    return _THREADPOOLS[0].limit(limits=1, user_api="blas")


# One program copies any tree (compiled once per structure): a copy in new device buffers
# stays valid after the original is donated to a call.
_COPY = jax.jit(lambda tree: jtu.tree_map(jnp.copy, tree))


def copied(tree: PyTree) -> PyTree:
    """`tree`'s arrays copied into new buffers on their device, by one asynchronous call: what
    outlives the tree's donation to a program (a checkpoint being written, the flow's own
    parameters as the initial state)."""
    return _COPY(tree)


def solve_program(rebuild: Callable, to_the_end: bool = False) -> Callable:
    """`run` over a plan given as its array leaves; `to_the_end`: a program called once per
    solve, with `max_segments` at least the solve's segments, returning `Carry.result`."""

    def program(plan_arrays, carry, max_segments):
        out = run(rebuild(plan_arrays), carry, max_segments)
        return out.result() if to_the_end else out

    return program


# --------------------------------------------------------------------------------------------
# Host side


def to_host(tree: PyTree) -> PyTree:
    """`tree` with every array as a NumPy array (read-only where it views a CPU buffer).

    On CPU `np.asarray` leaf by leaf: a view of the buffer, about 2 µs a leaf, where
    `jax.device_get` copies at about 20 µs a leaf and `copy_to_host_async` alone costs 6 µs.
    Elsewhere every leaf's copy is started before the first is waited for, so that the
    transfers overlap: one round trip rather than one a leaf.
    """
    leaves, treedef = jtu.tree_flatten(tree)
    return jtu.tree_unflatten(treedef, host_leaves(leaves))


def host_leaves(leaves: list) -> list:
    """`to_host` of a list of leaves."""
    device = [x for x in leaves if isinstance(x, jax.Array)]
    if device and next(iter(device[0].devices())).platform != "cpu":
        for x in device:
            x.copy_to_host_async()
    return [np.asarray(x) for x in leaves]
