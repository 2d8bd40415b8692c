"""What a finished carry of the engine says: its status and counts (`outcome`), the
`Trajectory` of a solve or a sweep member (`trajectory`), and a member's statistics
(`member_stats`). Above the engine: it reads carries, it runs nothing."""

import math
import types
from collections.abc import Callable
from typing import Any, NamedTuple

import diffrax
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from ._engine import Carry, host_leaves
from ._flow import GradientFlow
from ._solvers import solver_name, vector_field_evaluations
from ._spec import SolveSpec
from ._status import Status
from ._trajectory import Trajectory
from ._work import work_stats


def _held_at_dtmin(controller_state) -> bool:
    """Whether diffrax's PID controller had clipped the step to its `dtmin` (the last entry of
    its state; the engine's controller state is that state and the proposed step): a
    divergence then is not told by the flow alone."""
    leaves = jtu.tree_leaves(controller_state)
    flags = [leaf for leaf in leaves if getattr(leaf, "dtype", None) == bool]
    return bool(flags) and bool(flags[-1])


def outcome(carry: Carry, names: list[str], max_steps: int) -> dict[str, Any]:
    """Status, message, transition times, end time, step counts and the solver's work record
    (`work`, host arrays) of a host carry."""
    status = Status.name(carry.status)
    t_final = float(carry.t)
    counts = [int(x) for x in carry.counts]
    message = Status.message(status, t_final, max_steps, held_at_dtmin=(
        status == "nonfinite" and _held_at_dtmin(carry.controller_state)))
    return dict(
        status=status,
        message=message,
        transitions={name: float(t) for name, t in zip(names, np.asarray(carry.found))},
        t_final=t_final,
        stats=dict(
            num_steps=counts[0],
            num_accepted_steps=counts[1],
            num_rejected_steps=counts[2],
            segments=int(carry.segments),
        ),
        starts=int(carry.starts),
        work=carry.work,
    )


def solve_outcome(carry: Carry, flow: GradientFlow, spec: SolveSpec) -> dict[str, Any]:
    """`outcome` of `spec`'s carry, whose message names a non-finite initial state of `flow`
    where that is why the solve failed."""
    done = outcome(carry, [tr.name for tr in spec.transitions], spec.max_steps)
    if done["status"] != "completed":
        done["message"] = _initial_state_failure(flow, spec.t0) or done["message"]
    return done


# The fields of a carry a result reads; the controller's state only after a divergence.
_READ = ("t", "status", "counts", "found", "segments", "starts", "work", "observables",
         "at_transitions", "snapshots")


def _on_host(carry: Carry) -> types.SimpleNamespace:
    """The fields of `carry` that a result reads, as host arrays, and only those (the state,
    the solver's state and the step size are not): flattened together, so that their
    transfers overlap off CPU (`gflow._engine.host_leaves`)."""
    leaves, treedef = jtu.tree_flatten(tuple(getattr(carry, name) for name in _READ))
    fields = jtu.tree_unflatten(treedef, host_leaves(leaves))
    return types.SimpleNamespace(controller_state=carry.controller_state,
                                 **dict(zip(_READ, fields)))


class Recorded(NamedTuple):
    """What a `Trajectory` records of its spec and state rather than of the carry (the same
    for every solve of one spec on flows of one structure: `gflow.solve` keeps it with the
    spec's plan)."""

    names: list  # the transitions'
    solver: str
    rtol: float
    atol: float
    dtype: str  # the state's

    @classmethod
    def of(cls, spec: SolveSpec, y) -> "Recorded":
        return cls([tr.name for tr in spec.transitions], solver_name(spec.solver), spec.rtol,
                   spec.atol, str(np.result_type(*(x.dtype for x in jtu.tree_leaves(y)))))


def trajectory(carry: Carry, *, flow: GradientFlow, spec: SolveSpec,
               stats: dict | None = None, done: dict | None = None,
               recorded: Recorded | None = None, final: Callable | None = None,
               spec_as_given: SolveSpec | None = None) -> Trajectory:
    """The `Trajectory` of a finished host carry (solve's, or a sweep member's) of `spec`;
    `done` its `solve_outcome` where the caller has it already (a failed solve's costs a
    loss and a gradient on the host); `recorded` its `Recorded` where the caller keeps it;
    `final(y)` the model at state `y` (default `flow.combine`); `spec_as_given` the spec the
    `Trajectory` keeps, where `spec` is another precision's copy of it."""
    y, carry = carry.y, _on_host(carry)
    recorded = Recorded.of(spec, y) if recorded is None else recorded
    names = recorded.names
    ts = spec.ts
    done = solve_outcome(carry, flow, spec) if done is None else done
    t_final = done["t_final"]
    saved = (ts <= t_final) if math.isfinite(t_final) else np.zeros_like(ts, dtype=bool)
    keep = (lambda x: x) if saved.all() else (lambda x: x[saved])
    found = carry.found
    at_transitions = {
        name: jtu.tree_map(lambda x, k=k: x[k], carry.at_transitions)
        for k, name in enumerate(names) if math.isfinite(float(found[k]))
    }
    snapshots, snapshot_ts, snapshot_labels = _snapshots(carry, spec, names, t_final)
    # Device arrays already from `gflow.solve`; host arrays from a sweep or a checkpoint.
    y = jtu.tree_map(lambda x: x if isinstance(x, jax.Array) else jnp.asarray(x), y)
    return Trajectory(
        ts=keep(ts),
        observables=jtu.tree_map(keep, carry.observables),
        transitions=done["transitions"],
        # Through the class: equinox wraps a method looked up on an instance in a new module,
        # which costs about 70 µs, a tenth of a small solve's host work.
        final=type(flow).combine(flow, y) if final is None else final(y),
        t0=spec.t0,
        t1=spec.t1,
        t_final=t_final,
        status=done["status"],
        message=done["message"],
        stats=member_stats(done, spec.solver) | dict(dtype=recorded.dtype) | dict(stats or {}),
        solver=recorded.solver,
        rtol=recorded.rtol,
        atol=recorded.atol,
        at_transitions=at_transitions,
        spec=spec if spec_as_given is None else spec_as_given,
        snapshots=snapshots,
        snapshot_ts=snapshot_ts,
        snapshot_labels=snapshot_labels,
    )


def _initial_state_failure(flow: GradientFlow, t0: float) -> str | None:
    """Why a solve failed, when it is its initial state (`flow`'s model) itself: a non-finite
    loss or gradient there, in one line; `None` otherwise. Evaluated on the host, only after a
    failure."""
    y = flow.params
    loss = float(flow.loss_at(y))
    if not math.isfinite(loss):
        return f"the loss is {loss} at the initial state (t0={t0:g})"
    velocity = jtu.tree_leaves(flow.velocity(y))
    if not all(bool(jnp.all(jnp.isfinite(v))) for v in velocity):
        return (f"the gradient is not finite at the initial state (t0={t0:g}, loss {loss:.6g}): "
                "nothing to integrate")
    return None
def _snapshots(carry: Carry, spec: SolveSpec, names: list[str],
               t_final: float) -> tuple[dict, np.ndarray, tuple[str, ...]]:
    """The snapshots a host carry holds, as `Trajectory.snapshots`, `snapshot_ts` and
    `snapshot_labels`: the rows taken (chosen times up to `t_final`, located transitions), in
    time order (a transition after a chosen time at the same time)."""
    if not spec.snapshots:
        return {}, np.zeros(0), ()
    chosen = SolveSpec.all_snapshot_ts(spec)
    found = np.asarray(carry.found, dtype=np.float64)
    times = np.concatenate([chosen, found])
    labels = ["t0" if t == spec.t0 else "end" if t == spec.t1 else "" for t in chosen] + names
    reached = np.concatenate([chosen <= t_final if math.isfinite(t_final)
                              else np.zeros(chosen.shape, bool), np.isfinite(found)])
    rows = np.flatnonzero(reached)
    rows = rows[np.argsort(times[rows], kind="stable")]
    return (jtu.tree_map(lambda x: np.asarray(x)[rows], carry.snapshots), times[rows],
            tuple(labels[k] for k in rows))


def member_stats(done: dict, solver: diffrax.AbstractSolver) -> dict:
    """Step counts, segments and vector-field evaluations of an `outcome`, with the work
    counters of a solver that keeps them (`gflow._work.work_stats`).

    An explicit solver's evaluations follow from its steps; those of gflow's implicit and
    switching solvers are what they counted (gradients + 2 × Hessian-vector products of the
    accepted steps) plus `rejected_step_cost` for each rejected step."""
    stats = done["stats"]
    counted = work_stats(solver, done["work"])
    evaluations = vector_field_evaluations(solver, stats["num_steps"], done["starts"])
    rejected_step_cost = counted.pop("rejected_step_cost", 0)
    if evaluations is None and counted:
        evaluations = counted["cost"] + rejected_step_cost * stats["num_rejected_steps"]
    return dict(stats) | dict(vector_field_evaluations=evaluations) | counted
