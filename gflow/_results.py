"""What a finished carry of the engine says: its status and counts (`outcome`), the
`Trajectory` of a solve or a sweep member (`trajectory`), and a member's statistics
(`member_stats`). Above the engine: it reads carries, it runs nothing."""

import math
import types
from typing import Any

import diffrax
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from ._engine import Carry, to_host
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
    """The fields of `carry` that a result reads, as host arrays: each array read once (about
    10 µs each from a device), and only those (the state, the solver's state and the step
    size are not)."""
    return types.SimpleNamespace(controller_state=carry.controller_state, **{
        name: to_host(getattr(carry, name)) for name in _READ})


def trajectory(carry: Carry, *, flow: GradientFlow, spec: SolveSpec,
               stats: dict | None = None, done: dict | None = None) -> Trajectory:
    """The `Trajectory` of a finished host carry (solve's, or a sweep member's) of `spec`;
    `done` its `solve_outcome` where the caller has it already (a failed solve's costs a
    loss and a gradient on the host)."""
    y, carry = carry.y, _on_host(carry)
    names = [tr.name for tr in spec.transitions]
    ts = spec.ts
    done = solve_outcome(carry, flow, spec) if done is None else done
    t_final = done["t_final"]
    saved = (ts <= t_final) if math.isfinite(t_final) else np.zeros_like(ts, dtype=bool)
    keep = (lambda x: x) if saved.all() else (lambda x: x[saved])
    found = np.asarray(carry.found)
    at_transitions = {
        name: jtu.tree_map(lambda x, k=k: np.asarray(x)[k], carry.at_transitions)
        for k, name in enumerate(names) if math.isfinite(float(found[k]))
    }
    snapshots, snapshot_ts, snapshot_labels = _snapshots(carry, spec, names, t_final)
    return Trajectory(
        ts=keep(ts),
        observables=jtu.tree_map(lambda x: keep(np.asarray(x)), carry.observables),
        transitions=done["transitions"],
        # Device arrays already from `gflow.solve`; host arrays from a sweep or a checkpoint.
        # Through the class: equinox wraps a method looked up on an instance in a new module,
        # which costs about 70 µs, a tenth of a small solve's host work.
        final=type(flow).combine(flow, jtu.tree_map(
            lambda x: x if isinstance(x, jax.Array) else jnp.asarray(x), y)),
        t0=spec.t0,
        t1=spec.t1,
        t_final=t_final,
        status=done["status"],
        message=done["message"],
        stats=member_stats(done, spec.solver) | dict(
            dtype=str(np.result_type(*(x.dtype for x in jtu.tree_leaves(y)))),
        ) | dict(stats or {}),
        solver=solver_name(spec.solver),
        rtol=spec.rtol,
        atol=spec.atol,
        at_transitions=at_transitions,
        spec=spec,
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
