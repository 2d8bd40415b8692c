"""What a solver reports about its own work: the counters of gflow's implicit and switching
solvers, accumulated over a solve's segments in the engine's carry.

The counters cover accepted steps: diffrax discards the solver state of a rejected step, so
its work is not in them (`num_rejected_steps` says how many there were). `gflow.solve`'s
`vector_field_evaluations` adds Tsit5's 6 evaluations per rejected step for the switching
solver (exact while every rejected step is an explicit one; a rejected implicit step costs
more than that) and nothing for an implicit solver alone (the BDF or the ESDIRK).
`benchmarks/stiff.py` counts every attempt with a host callback where it matters.
"""

import jax.numpy as jnp
from jaxtyping import PyTree

from ._implicit import GRADIENTS, HVPS, AbstractNewtonKrylov, WORK_FIELDS, int_dtype
from ._switching import SWITCH_FIELDS, SWITCH_SLOTS, SWITCHES, StiffSwitching

# Switch times a solve records across its segments (later ones are counted, not timed).
SOLVE_SWITCH_SLOTS = 64


def _fields(solver) -> tuple[str, ...] | None:
    if isinstance(solver, StiffSwitching):
        return SWITCH_FIELDS
    if isinstance(solver, AbstractNewtonKrylov):
        return WORK_FIELDS
    return None


def work_template(solver, dtype) -> dict:
    """The carry's work record for `solver` (empty for a solver that keeps no counters)."""
    fields = _fields(solver)
    if fields is None:
        return {}
    out = dict(counts=jnp.zeros(len(fields), int_dtype()))
    if isinstance(solver, StiffSwitching):
        out["switch_times"] = jnp.zeros(SOLVE_SWITCH_SLOTS, dtype)
    return out


def add_work(solver, work: dict, start_state: PyTree, end_state: PyTree) -> dict:
    """`work` plus what one segment counted: its final solver state's counters less those of
    the state it started from (zero after a fresh start; the last segment's after a cut)."""
    if not work:
        return work
    done = end_state["work"] - start_state["work"]
    out = dict(counts=work["counts"] + done.astype(work["counts"].dtype))
    if "switch_times" in work:
        # This segment's switches are the state's slots from `first` on; they go after those
        # the solve already recorded.
        recorded = work["counts"][SWITCHES]
        first = start_state["work"][SWITCHES]
        mine = jnp.clip(jnp.minimum(end_state["work"][SWITCHES], SWITCH_SLOTS) - first, 0)
        slots = jnp.arange(SOLVE_SWITCH_SLOTS)
        source = jnp.clip(slots - recorded + first, 0, SWITCH_SLOTS - 1)
        new = (slots >= recorded) & (slots < recorded + mine)
        out["switch_times"] = jnp.where(new, end_state["switch_times"][source],
                                        work["switch_times"])
    return out


def work_stats(solver, work: dict | None) -> dict:
    """The counters of a host carry's work record as `stats` entries: each field, the switch
    times, `cost` (gradients + 2 × Hessian-vector products of the accepted steps) and
    `rejected_step_cost` (what `member_stats` charges each rejected step)."""
    if not work:  # first: `_fields`' `isinstance` checks cost more than the rest
        return {}
    fields = _fields(solver)
    if fields is None:
        return {}
    counts = [int(x) for x in work["counts"]]
    out = dict(zip(fields, counts))
    out["cost"] = counts[GRADIENTS] + 2 * counts[HVPS]
    out["rejected_step_cost"] = 6 if isinstance(solver, StiffSwitching) else 0
    if "switch_times" in work:
        n = min(counts[SWITCHES], SOLVE_SWITCH_SLOTS)
        out["switch_times"] = [float(t) for t in list(work["switch_times"])[:n]]
    return out
