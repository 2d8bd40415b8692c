"""The competitors, run on any workload: gflow, bare diffrax, GD, optax, scipy.

A workload module (`deep_linear.py`, `cooccurrence.py`) builds a `Problem` and a `Settings`;
`run` measures everything against a Dopri8 reference and returns what the report needs.
"""

import dataclasses
import math
import os
import time
import warnings
from collections.abc import Callable
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax
import scipy.integrate
from jax.flatten_util import ravel_pytree

import gflow

from ._harness import (
    Result,
    best_time,
    fit_power_law,
    relative_trajectory_error,
    transition_errors,
)


@dataclasses.dataclass(frozen=True)
class Settings:
    """What to run on a workload.

    **Fields:**

    - `gflow_runs`: `(solver, rtol, with transitions, steps clipped to the save times)`.
    - `bare_runs`: `(solver, rtol)` of bare `diffrax.diffeqsolve`; each is also timed against
        the trajectory-only gflow call of the same solver and rtol, alternating calls.
    - `gd_etas`, `optax_etas`: steps of gradient descent (`lax.scan`) and `optax.sgd` (Python loop).
    - `scipy_runs`: `(method, "jax" | "numpy", rtol)`.
    - `torchdiffeq_rtols`: tolerances of torchdiffeq's `odeint(method="dopri5")` (skipped,
        with a note, where torch is not installed or the problem has no torch model).
    - `repeats`, `budget_s`: at most `repeats` timed calls per setting, fewer once `budget_s`
        seconds are spent (the minimum is reported).
    - `reference_rtol`, `cross_check_rtols`: the reference's tolerance, and the scipy DOP853
        tolerances it is checked against.
    - `count_evaluations`: also count gradient evaluations with a host callback (untimed).
    - `separate_reference_state`: take the reference state from a second run without
        transitions (see `reference`); `False` saves a compilation where errors of ~1e-11 do
        not matter.
    """

    gflow_runs: tuple[tuple[str, float, bool, bool], ...]
    bare_runs: tuple[tuple[str, float], ...]
    gd_etas: tuple[float, ...]
    optax_etas: tuple[float, ...]
    scipy_runs: tuple[tuple[str, str, float], ...]
    repeats: int
    budget_s: float
    reference_rtol: float = 1e-12
    cross_check_rtols: tuple[float, ...] = (1e-12,)
    count_evaluations: bool = False
    separate_reference_state: bool = True
    torchdiffeq_rtols: tuple[float, ...] = ()


@dataclasses.dataclass(frozen=True)
class Problem:
    """A flow to benchmark.

    **Fields:**

    - `name`: the workload's name.
    - `flow`, `transitions`: the `gflow.GradientFlow` and its `gflow.Transition`s.
    - `ts`: save times; every GD step η divides each gap between them.
    - `t1`: the horizon.
    - `scale`: RMS of the smallest initial trainable leaf; every method's atol is rtol × scale
        (gflow's default).
    - `state`: observer returning the trainable parameters as one flat vector (`ravel_pytree`
        order of `flow.params`).
    - `numpy_rhs`: optional hand-written numpy `f(t, y)` of the flow on flat vectors.
    - `torch_velocity`: optional; called with no arguments, returns the same flow as a torch
        `f(t, y)` on flat float64 tensors (`benchmarks/_torch.py`).
    """

    name: str
    flow: gflow.GradientFlow
    transitions: tuple
    ts: np.ndarray
    t1: float
    scale: float
    state: Callable
    numpy_rhs: Callable | None = None
    torch_velocity: Callable[[], Callable] | None = None

    def atol(self, rtol: float) -> float:
        return rtol * self.scale

    @property
    def transition_names(self) -> list[str]:
        return [tr.name for tr in self.transitions]

    @property
    def size(self) -> int:
        return int(ravel_pytree(self.flow.params)[0].size)


def flat_state_observer(flow: gflow.GradientFlow) -> Callable:
    """An observer returning the trainable leaves as one flat vector.

    Build it once per problem: gflow caches compiled programs by observer identity.
    """
    trainable = flow.trainable

    def state(model, data):
        del data
        return ravel_pytree(eqx.filter(model, trainable))[0]

    return state


def preset_problem(name: str, t1: float, ts: np.ndarray, extra=None) -> "Problem":
    """The `Problem` of a gflow preset's flow and transitions, up to `t1` on save times `ts`.

    `extra`: `extra(flow) -> {field: value}`, further `Problem` fields that need the preset's
    flow (e.g. `torch_velocity`).
    """
    problem = gflow.presets.build(gflow.presets.resolve(name, [f"solve.t1={t1}"]))
    flow = problem.flow
    fields = {} if extra is None else extra(flow)
    return Problem(
        name=name,
        flow=flow,
        transitions=problem.transitions,
        ts=ts,
        t1=t1,
        scale=initial_rms(flow.params),
        state=flat_state_observer(flow),
        **fields,
    )


def initial_rms(params) -> float:
    """RMS of the smallest non-zero leaf: gflow's default atol is rtol times this."""
    sizes = [float(np.sqrt(np.mean(np.square(np.asarray(x))))) for x in jtu.tree_leaves(params)]
    return min(s for s in sizes if s > 0)


def _error(states, ref_state: np.ndarray, ts: np.ndarray) -> dict:
    """The trajectory error and the save time where it is largest."""
    error = relative_trajectory_error(states, ref_state)
    worst = None
    if np.isfinite(error):
        states = np.asarray(states)
        rel = np.linalg.norm(states - ref_state, axis=1) / np.linalg.norm(ref_state, axis=1)
        worst = float(ts[int(np.argmax(rel))])
    return dict(traj_error=error, worst_t=worst)


# ---------------------------------------------------------------------------------------------
# gflow and bare diffrax


def _clipped_controller(p: Problem, rtol: float) -> diffrax.AbstractStepSizeController:
    """The PID controller with a step ending at every save time.

    Saved values are then step ends, not dense-output interpolants: diffrax's Dopri8 dense
    output is far less accurate than its steps (see docs/results.md). Tolerances are arrays so that
    one compiled program serves every rtol.
    """
    return diffrax.ClipStepSizeController(
        diffrax.PIDController(rtol=jnp.asarray(rtol), atol=jnp.asarray(p.atol(rtol))),
        step_ts=jnp.asarray(p.ts),
    )


def gflow_solve(p: Problem, solver: str, rtol: float, with_transitions: bool, *, flow=None,
                clipped: bool = False, observer_loss=None) -> gflow.Trajectory:
    return gflow.solve(
        p.flow if flow is None else flow,
        p.t1,
        solver=solver,
        rtol=rtol,
        atol=p.atol(rtol),
        ts=p.ts,
        observers={"state": p.state, "loss": observer_loss or p.flow.loss},
        transitions=p.transitions if with_transitions else (),
        controller=_clipped_controller(p, rtol) if clipped else None,
    )


@dataclasses.dataclass(frozen=True)
class Reference:
    state: np.ndarray
    transitions: dict[str, float]
    steps: int
    evaluations: int
    restart_difference: float


def reference(p: Problem, rtol: float, separate_state: bool = True) -> Reference:
    """Dopri8 at `rtol` with a step ending at every save time.

    The state comes from a run without transitions: after a transition gflow resumes from the
    dense-output state at the transition time, which carries the interpolant's error. The
    transition times come from a second run that locates them; `restart_difference` is how far
    that run's state strays from the first.
    """
    times = gflow_solve(p, "dopri8", rtol, True, clipped=True)
    state = gflow_solve(p, "dopri8", rtol, False, clipped=True) if separate_state else times
    for traj in (state, times):
        if traj.status != "completed":
            raise RuntimeError(f"reference solve failed: {traj.status} {traj.message}")
    return Reference(
        state=state.observables["state"],
        transitions=dict(times.transitions),
        steps=state.stats["num_steps"],
        evaluations=state.stats["vector_field_evaluations"],
        restart_difference=relative_trajectory_error(
            times.observables["state"], state.observables["state"]
        ),
    )


def run_gflow(p: Problem, ref: Reference, settings: Settings) -> list[Result]:
    ref_times = [ref.transitions[n] for n in p.transition_names]
    out = []
    for solver, rtol, with_transitions, clipped in settings.gflow_runs:
        call = lambda: gflow_solve(p, solver, rtol, with_transitions, clipped=clipped)  # noqa: E731
        first = call()
        timing = best_time(call, repeats=settings.repeats, budget_s=settings.budget_s)
        trajs = timing.outputs
        traj = trajs[-1]
        if traj.status != "completed":
            raise RuntimeError(f"gflow {solver} rtol={rtol}: {traj.status} {traj.message}")
        times = [traj.transitions.get(n, math.nan) for n in p.transition_names]
        out.append(
            Result(
                family=f"gflow {solver}"
                + (" + transitions" if with_transitions else "")
                + (", steps at save times" if clipped else ""),
                setting=f"rtol={rtol:g}",
                knob=rtol,
                **timing.result_fields,
                kernel_s=min(t.stats["run_seconds"] for t in trajs),
                compile_s=first.stats["compile_seconds"],
                evaluations=traj.stats["vector_field_evaluations"],
                steps=traj.stats["num_steps"],
                **_error(traj.observables["state"], ref.state, p.ts),
                transition_errors=transition_errors(times, ref_times) if with_transitions else None,
                timed_transitions=with_transitions,
                notes=f"{traj.stats['segments']} segments, "
                f"{traj.stats['num_rejected_steps']} rejected",
            )
        )
    return out


def _bare_diffrax(flow, state, observer_loss, y0, ts, t1, rtol, atol, solver):
    """What a user writes with diffrax alone: same solver, controller, tolerances, observers."""

    def vector_field(t, y, args):
        return flow.velocity(y)

    def observe(t, y, args):
        model = flow.combine(y)
        return {"state": state(model, flow.data), "loss": observer_loss(model, flow.data)}

    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(vector_field),
        solver,
        0.0,
        t1,
        None,
        y0,
        saveat=diffrax.SaveAt(ts=ts, fn=observe),
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        max_steps=100_000,
        throw=False,
    )
    return sol.ys, sol.stats, sol.result


_bare_jit = eqx.filter_jit(_bare_diffrax)
_SOLVERS = {"tsit5": diffrax.Tsit5, "dopri8": diffrax.Dopri8}


def _bare_evaluations(solver: diffrax.AbstractSolver, steps: int) -> int:
    # Explicit RK: stages per step (less the first-same-as-last one), the two evaluations of
    # diffrax's initial step-size heuristic, and the first stage of the first step.
    stages = len(solver.tableau.c) + 1
    if solver.tableau.fsal:
        return (stages - 1) * steps + 1 + 2
    return stages * steps + 2


def _bare_args(p: Problem, name: str, rtol: float, flow=None, observer_loss=None):
    flow = p.flow if flow is None else flow
    return (flow, p.state, observer_loss or p.flow.loss, flow.params, jnp.asarray(p.ts), p.t1,
            jnp.asarray(rtol), jnp.asarray(p.atol(rtol)), _SOLVERS[name]())


def run_bare(p: Problem, ref: Reference, settings: Settings) -> tuple[list[Result], list[dict]]:
    """Bare diffrax at each setting, and its paired timing against gflow.

    The pairing alternates one gflow call and one bare call, so both see the same load on a
    shared machine; the minimum of each is kept.
    """
    out, pairs = [], []
    compiled_for: dict[str, Callable] = {}
    for name, rtol in settings.bare_runs:
        args = _bare_args(p, name, rtol)
        compile_s = 0.0
        if name not in compiled_for:
            start = time.perf_counter()
            compiled_for[name] = _bare_jit.lower(*args).compile()
            compile_s = time.perf_counter() - start
        compiled = compiled_for[name]

        def bare_call():
            return jax.block_until_ready(compiled(*args))

        gflow_call = lambda: gflow_solve(p, name, rtol, False)  # noqa: E731
        gflow_call()  # compiled already by run_gflow, or compiled now (not timed)
        bare_times, gflow_times, gflow_programs, bare_cpu, gflow_cpu = [], [], [], [], []
        spent = 0.0
        while len(bare_times) < settings.repeats and spent < 2 * settings.budget_s:
            start, start_cpu = time.perf_counter(), time.process_time()
            ys, stats, result = bare_call()
            middle, middle_cpu = time.perf_counter(), time.process_time()
            traj = gflow_call()
            end, end_cpu = time.perf_counter(), time.process_time()
            bare_times.append(middle - start)
            gflow_times.append(end - middle)
            bare_cpu.append(middle_cpu - start_cpu)
            gflow_cpu.append(end_cpu - middle_cpu)
            gflow_programs.append(traj.stats["run_seconds"])
            spent += end - start
        if result != diffrax.RESULTS.successful:
            raise RuntimeError(f"bare diffrax {name} rtol={rtol} failed")
        steps = int(stats["num_steps"])
        out.append(
            Result(
                family=f"bare diffrax {name}",
                setting=f"rtol={rtol:g}",
                knob=rtol,
                wall_s=min(bare_times),
                cpu_s=min(bare_cpu),
                wall_median_s=float(np.median(bare_times)),
                runs=len(bare_times),
                kernel_s=min(bare_times),
                compile_s=compile_s,
                evaluations=_bare_evaluations(_SOLVERS[name](), steps),
                steps=steps,
                **_error(np.asarray(ys["state"]), ref.state, p.ts),
                notes=f"{int(stats['num_rejected_steps'])} rejected",
            )
        )
        pairs.append(dict(
            solver=name, rtol=rtol, pairs=len(bare_times), bare_call=min(bare_times),
            gflow_call=min(gflow_times), gflow_program=min(gflow_programs),
            bare_call_median=float(np.median(bare_times)),
            gflow_call_median=float(np.median(gflow_times)),
            bare_cpu=min(bare_cpu), gflow_cpu=min(gflow_cpu),
            bare_steps=steps, gflow_steps=traj.stats["num_steps"],
            state_difference=relative_trajectory_error(traj.observables["state"],
                                                       np.asarray(ys["state"])),
        ))
    return out, pairs


class _Counter:
    def __init__(self):
        self.count = 0

    def increment(self):
        self.count += 1


def count_evaluations(p: Problem) -> list[dict]:
    """Count gradient evaluations with a host callback in the loss, against what is reported.

    The counting loss only drives the flow; the recorded loss uses the plain one, so observers
    are not counted.
    """
    rows = []
    plain = p.flow.loss
    for label, solver, rtol, with_transitions in [
        ("gflow tsit5", "tsit5", 1e-8, False),
        ("gflow tsit5 + transitions", "tsit5", 1e-8, True),
        ("gflow dopri8 + transitions", "dopri8", 1e-10, True),
        ("bare diffrax tsit5", "tsit5", 1e-8, None),
    ]:
        counter = _Counter()

        def counted(model, data, counter=counter):
            jax.debug.callback(counter.increment)
            return plain(model, data)

        flow = gflow.GradientFlow(p.flow.model, counted, p.flow.data, trainable=p.flow.trainable,
                                  preconditioner=p.flow.preconditioner)
        if with_transitions is None:
            args = _bare_args(p, solver, rtol, flow=flow, observer_loss=plain)
            _, stats, _ = jax.block_until_ready(_bare_jit(*args))
            reported = _bare_evaluations(args[-1], int(stats["num_steps"]))
        else:
            traj = gflow_solve(p, solver, rtol, with_transitions, flow=flow, observer_loss=plain)
            reported = traj.stats["vector_field_evaluations"]
        jax.effects_barrier()
        rows.append(dict(run=f"{label} rtol={rtol:g}", counted=counter.count, reported=reported))
    return rows


# ---------------------------------------------------------------------------------------------
# gradient descent


def _gd_steps(p: Problem, eta: float) -> np.ndarray:
    """GD steps between consecutive save times; η must divide every gap."""
    steps = np.diff(p.ts) / eta
    counts = np.rint(steps).astype(np.int64)
    if not np.allclose(steps, counts, rtol=1e-9, atol=1e-6) or np.any(counts < 1):
        raise ValueError(f"η={eta} does not divide the gaps between the save times")
    return counts


def _gd_scan(flow, y0, eta, counts):
    """GD from `y0`: `counts[i]` steps between save times i and i + 1, the state saved at each.

    GD's iterate k is the flow's state at t = k·η, so the saved states sit exactly on the
    save times.
    """
    grad = jax.grad(flow.loss_at)

    def step(_, y):
        g = grad(y)
        return jtu.tree_map(lambda a, b: a - eta * b, y, g)

    def block(y, count):
        y = jax.lax.fori_loop(0, count, step, y)
        return y, ravel_pytree(y)[0]

    _, saved = jax.lax.scan(block, y0, counts)
    return jnp.concatenate([ravel_pytree(y0)[0][None], saved])


def _gd_conditions(flow, conditions, unravel, y_flat, eta, inner: int):
    """Each transition condition before and after every step of `inner` GD steps from `y_flat`."""
    grad = jax.grad(flow.loss_at)

    def values(y):
        model = flow.combine(y)
        return jnp.stack([jnp.asarray(c(model, flow.data), float) for c in conditions])

    def step(y, _):
        g = grad(y)
        y = jtu.tree_map(lambda a, b: a - eta * b, y, g)
        return y, values(y)

    y = unravel(y_flat)
    _, vals = jax.lax.scan(step, y, None, length=inner)
    return jnp.concatenate([values(y)[None], vals])


_gd_scan_jit = eqx.filter_jit(_gd_scan)
_gd_conditions_jit = eqx.filter_jit(_gd_conditions)


def _crosses(a: float, b: float, direction: bool | None) -> bool:
    up = a < 0 <= b
    down = a > 0 >= b
    return up if direction is True else down if direction is False else (up or down)


def gd_transitions(p: Problem, saved: np.ndarray, eta: float, counts: np.ndarray) -> list[float]:
    """Each transition as GD sees it: the first step at which its condition changes sign
    (after the previous transition), linearly interpolated between the two steps.

    The sign change is bracketed on the save grid, then the bracketing block of GD steps is
    replayed from its saved start with the condition evaluated after every step (GD is
    deterministic: the replay reproduces the iterates).
    """
    _, unravel = ravel_pytree(p.flow.params)
    conditions = tuple(tr.condition for tr in p.transitions)

    def at(y):
        model = p.flow.combine(unravel(y))
        return jnp.stack([jnp.asarray(c(model, p.flow.data), float) for c in conditions])

    saved_values = np.asarray(jax.lax.map(at, jnp.asarray(saved)))
    first_step = np.concatenate([[0], np.cumsum(counts)])
    found, t_prev = [], p.ts[0]
    for k, tr in enumerate(p.transitions):
        time_k = math.nan
        for i in range(len(p.ts) - 1):
            if p.ts[i + 1] <= t_prev:
                continue
            if not _crosses(saved_values[i, k], saved_values[i + 1, k], tr.direction):
                continue
            vals = np.asarray(_gd_conditions_jit(
                p.flow, conditions, unravel, saved[i], jnp.asarray(eta), int(counts[i])
            ))[:, k]
            for j in range(int(counts[i])):
                t_j = p.ts[0] + (first_step[i] + j) * eta
                if t_j + eta > t_prev and _crosses(vals[j], vals[j + 1], tr.direction):
                    time_k = t_j + eta * vals[j] / (vals[j] - vals[j + 1])
                    break
            if math.isfinite(time_k):
                break
        found.append(time_k)
        if not math.isfinite(time_k):
            found += [math.nan] * (len(p.transitions) - k - 1)
            break
        t_prev = time_k
    return found


def run_gd(p: Problem, ref: Reference, settings: Settings) -> list[Result]:
    ref_times = [ref.transitions[n] for n in p.transition_names]
    out = []
    for eta in settings.gd_etas:
        counts = _gd_steps(p, eta)
        args = (p.flow, p.flow.params, jnp.asarray(eta), jnp.asarray(counts))
        start = time.perf_counter()
        compiled = _gd_scan_jit.lower(*args).compile()
        compile_s = time.perf_counter() - start
        timing = best_time(
            lambda: np.asarray(jax.block_until_ready(compiled(*args))),
            repeats=settings.repeats,
            budget_s=settings.budget_s,
        )
        saved = timing.outputs[-1]
        times = gd_transitions(p, saved, eta, counts)
        out.append(
            Result(
                family="GD (lax.scan)",
                setting=f"η={eta:g}",
                knob=eta,
                **timing.result_fields,
                kernel_s=None,
                compile_s=compile_s,
                evaluations=int(counts.sum()),
                steps=int(counts.sum()),
                **_error(saved, ref.state, p.ts),
                transition_errors=transition_errors(times, ref_times),
                notes="transitions from an untimed replay",
            )
        )
    return out


def run_optax(p: Problem, ref: Reference, settings: Settings) -> list[Result]:
    """`optax.sgd` stepped from a Python loop over a jitted step: a typical training script."""
    out = []
    grad = jax.grad(p.flow.loss_at)
    for eta in settings.optax_etas:
        counts = _gd_steps(p, eta)
        save_after = set(np.cumsum(counts).tolist())
        optimizer = optax.sgd(eta)

        @jax.jit
        def step(params, state):
            updates, state = optimizer.update(grad(params), state, params)
            return optax.apply_updates(params, updates), state

        params0 = p.flow.params
        state0 = optimizer.init(params0)
        start = time.perf_counter()
        jax.block_until_ready(step(params0, state0))
        first = time.perf_counter() - start
        start = time.perf_counter()
        jax.block_until_ready(step(params0, state0))
        compile_s = first - (time.perf_counter() - start)

        def flat(params):
            return np.concatenate([np.asarray(x).ravel() for x in jtu.tree_leaves(params)])

        def train():
            params, state = params0, state0
            saved = [flat(params)]
            for k in range(1, int(counts.sum()) + 1):
                params, state = step(params, state)
                if k in save_after:  # logging, as a script would: a host transfer per save time
                    saved.append(flat(params))
            return np.stack(saved)

        timing = best_time(train, repeats=2, budget_s=settings.budget_s)
        out.append(
            Result(
                family="optax.sgd (Python loop)",
                setting=f"η={eta:g}",
                knob=eta,
                **timing.result_fields,
                kernel_s=None,
                compile_s=compile_s,
                evaluations=int(counts.sum()),
                steps=int(counts.sum()),
                **_error(timing.outputs[-1], ref.state, p.ts),
            )
        )
    return out


# ---------------------------------------------------------------------------------------------
# scipy


class _Counted:
    def __init__(self, fn):
        self.fn, self.count = fn, 0

    def __call__(self, t, y):
        self.count += 1
        return self.fn(t, y)


def _jax_rhs(p: Problem) -> tuple[Callable, float]:
    """A jitted JAX right-hand side on flat float64 vectors, and its compile time."""
    y0, unravel = ravel_pytree(p.flow.params)
    fn = jax.jit(lambda y: ravel_pytree(p.flow.velocity(unravel(y)))[0])
    start = time.perf_counter()
    jax.block_until_ready(fn(y0))
    first = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(fn(y0))
    compile_s = first - (time.perf_counter() - start)
    return (lambda t, y: np.asarray(fn(y))), compile_s


def _jax_events(p: Problem) -> list[Callable]:
    """scipy events from the transitions' conditions (jitted, on flat vectors)."""
    _, unravel = ravel_pytree(p.flow.params)
    events = []
    for tr in p.transitions:
        fn = jax.jit(lambda y, c=tr.condition: c(p.flow.combine(unravel(y)), p.flow.data))

        def event(t, y, fn=fn):
            return float(fn(y))

        event.direction = {True: 1.0, False: -1.0, None: 0.0}[tr.direction]
        events.append(event)
    return events


def scipy_solve(rhs, p: Problem, method: str, rtol: float, atol: float, events=None):
    y0 = np.asarray(ravel_pytree(p.flow.params)[0])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "At least one element of `rtol` is too small")
        return scipy.integrate.solve_ivp(
            rhs, (float(p.ts[0]), p.t1), y0, method=method, t_eval=p.ts, rtol=rtol, atol=atol,
            events=events,
        )


def _first_events(sol) -> list[float]:
    return [float(t[0]) if len(t) else math.nan for t in sol.t_events]


def run_scipy(p: Problem, ref: Reference, settings: Settings) -> list[Result]:
    ref_times = [ref.transitions[n] for n in p.transition_names]
    jax_rhs, jax_compile = _jax_rhs(p)
    if p.numpy_rhs is not None:
        y_test = np.random.default_rng(0).normal(size=p.size)
        np.testing.assert_allclose(p.numpy_rhs(0.0, y_test), jax_rhs(0.0, y_test),
                                   rtol=1e-12, atol=1e-12)
    events = _jax_events(p)
    out, compile_reported = [], False
    for method, rhs_kind, rtol in settings.scipy_runs:
        rhs = jax_rhs if rhs_kind == "jax" else p.numpy_rhs
        atol = p.atol(rtol)

        def call():
            counted = _Counted(rhs)
            sol = scipy_solve(counted, p, method, rtol, atol)
            return sol, counted.count

        timing = best_time(call, repeats=settings.repeats, budget_s=settings.budget_s)
        sol, count = timing.outputs[-1]
        if not sol.success:
            raise RuntimeError(f"scipy {method} rtol={rtol} failed: {sol.message}")
        times = _first_events(scipy_solve(rhs, p, method, rtol, atol, events=events))
        compile_s = None
        if rhs_kind == "jax":
            compile_s = 0.0 if compile_reported else jax_compile
            compile_reported = True
        out.append(
            Result(
                family=f"scipy {method} ({rhs_kind} rhs)",
                setting=f"rtol={rtol:g}",
                knob=rtol,
                **timing.result_fields,
                kernel_s=None,
                compile_s=compile_s,
                evaluations=count,
                steps=None,
                **_error(sol.y.T, ref.state, p.ts),
                transition_errors=transition_errors(times, ref_times),
                notes="transitions from an untimed events run",
            )
        )
    return out


# ---------------------------------------------------------------------------------------------
# torchdiffeq


def torch_threads() -> list[int]:
    """The thread counts torch is timed with: the cores this process may use (what XLA's CPU
    client uses), and one.

    One as well because torch's OpenMP parallel regions spin at a barrier: when other jobs
    occupy a core, a two-thread region waits for its descheduled thread and even a 57k-entry
    negation takes milliseconds (measured here), so on a loaded machine one thread is
    torch's best case.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return sorted({int(cores), 1}, reverse=True)


def torchdiffeq_missing(p: Problem) -> str | None:
    """Why torchdiffeq cannot run on `p` (torch not installed, or no torch model), else `None`."""
    from . import _torch

    return _torch.available() or (
        None if p.torch_velocity is not None else "no PyTorch model written for this workload"
    )


class TorchDiffeq:
    """torchdiffeq `odeint(method="dopri5")` on the same flow written in PyTorch, float64.

    Built untimed: the torch velocity against the JAX one at the initial point and at two
    later points of the reference (a relative difference above 1e-10 raises), and one
    evaluation timed at each thread count of `torch_threads`. Then each call times one
    tolerance at one thread count on the same save grid, the right-hand side counted by a
    wrapper. Requires `torchdiffeq_missing(p) is None`.

    **Arguments:**

    - `p`, `ref`: the workload and its reference.
    - `repeats`, `budget_s`: as `Settings`'s, per tolerance and thread count.
    - `jax_rhs`: the jitted JAX right-hand side of `_jax_rhs(p)`, if the caller has one.

    `info` holds the check, the versions, the thread counts and the seconds per evaluation;
    `threads` the thread counts worth timing.
    """

    def __init__(self, p: Problem, ref: Reference, repeats: int, budget_s: float,
                 jax_rhs: Callable | None = None):
        import torch
        import torchdiffeq

        self.p, self.ref, self.repeats, self.budget_s = p, ref, repeats, budget_s
        self.velocity = p.torch_velocity()
        self.info = dict(check=[], threads=torch_threads(), versions=dict(
            torch=torch.__version__, torchdiffeq=getattr(torchdiffeq, "__version__", "?")))
        jax_rhs = jax_rhs or _jax_rhs(p)[0]
        y0 = np.asarray(ravel_pytree(p.flow.params)[0])
        # The initial point and two reference states while the parameters still move (near
        # the end -∇L is tiny and its relative difference measures rounding, not the model).
        for index in (0, len(p.ts) // 4, len(p.ts) // 2):
            y = y0 if index == 0 else ref.state[index]
            expected = np.asarray(jax_rhs(0.0, y))
            got = self.velocity(0.0, torch.tensor(y, dtype=torch.float64)).numpy()
            difference = float(np.linalg.norm(got - expected) / np.linalg.norm(expected))
            self.info["check"].append(dict(t=float(p.ts[index]), relative_difference=difference))
            if not difference <= 1e-10:
                raise RuntimeError(f"torch velocity differs from JAX's by {difference:.2e} at "
                                   f"t = {p.ts[index]:g}")

        self.y0 = torch.tensor(y0, dtype=torch.float64)
        self.ts = torch.tensor(p.ts, dtype=torch.float64)
        # One evaluation per thread count first: a count far slower than the best
        # (oversubscribed cores, see `torch_threads`) is reported, not run through every
        # tolerance.
        seconds = self.info["seconds_per_evaluation"] = {}
        for threads in self.info["threads"]:
            torch.set_num_threads(threads)
            seconds[threads] = best_time(lambda: self.velocity(0.0, self.y0), repeats=10,
                                         budget_s=2.0).wall
        torch.set_num_threads(self.info["threads"][0])
        fastest = min(seconds.values())
        self.info["skipped_threads"] = [n for n, sec in seconds.items() if sec > 2 * fastest]
        self.threads = [n for n in self.info["threads"] if n not in self.info["skipped_threads"]]

    def __call__(self, rtol: float, threads: int) -> Result:
        import torch
        import torchdiffeq

        def call():
            counted = _Counted(self.velocity)
            with torch.no_grad():
                ys = torchdiffeq.odeint(counted, self.y0, self.ts, rtol=rtol,
                                        atol=self.p.atol(rtol), method="dopri5")
            return ys.numpy(), counted.count

        torch.set_num_threads(threads)
        try:
            timing = best_time(call, repeats=self.repeats, budget_s=self.budget_s)
        finally:
            torch.set_num_threads(self.info["threads"][0])
        ys, count = timing.outputs[-1]
        return Result(
            family=f"torchdiffeq dopri5, {threads} thread" + ("s" if threads > 1 else ""),
            setting=f"rtol={rtol:g}",
            knob=rtol,
            **timing.result_fields,
            kernel_s=None,
            compile_s=None,
            evaluations=count,
            steps=None,
            **_error(ys, self.ref.state, self.p.ts),
            notes=f"torch.set_num_threads({threads})",
        )


def run_torchdiffeq(p: Problem, ref: Reference, settings: Settings) -> tuple[list[Result], dict]:
    """`TorchDiffeq` at every tolerance of `settings`, at each thread count worth timing;
    skipped, with the reason in the returned info, where `torchdiffeq_missing(p)`."""
    info = dict(rtols=list(settings.torchdiffeq_rtols), skipped=None, check=[], threads=[])
    if not settings.torchdiffeq_rtols:
        return [], info
    info["skipped"] = torchdiffeq_missing(p)
    if info["skipped"]:
        return [], info
    solve = TorchDiffeq(p, ref, settings.repeats, settings.budget_s)
    info |= solve.info
    return [solve(rtol, threads) for threads in solve.threads
            for rtol in settings.torchdiffeq_rtols], info


def cross_check(p: Problem, ref: Reference, rtols: tuple[float, ...]) -> list[dict]:
    """The reference against scipy DOP853 (numpy right-hand side where there is one, else the
    jitted JAX one; events for the transitions)."""
    rhs = p.numpy_rhs if p.numpy_rhs is not None else _jax_rhs(p)[0]
    events = _jax_events(p)
    rows = []
    for rtol in rtols:
        start = time.perf_counter()
        sol = scipy_solve(rhs, p, "DOP853", rtol, p.atol(rtol), events=events)
        seconds = time.perf_counter() - start
        times = _first_events(sol)
        differences = [abs(ref.transitions[n] - t) for n, t in zip(p.transition_names, times)
                       if math.isfinite(ref.transitions[n])]
        rows.append(dict(
            rtol=rtol,
            atol=p.atol(rtol),
            rhs="numpy" if p.numpy_rhs is not None else "jax",
            state_difference=relative_trajectory_error(sol.y.T, ref.state),
            transition_difference=max(differences) if differences else None,
            transitions=dict(zip(p.transition_names, times)),
            scipy_evaluations=int(sol.nfev),
            scipy_seconds=seconds,
        ))
    return rows


def _gd_fit(results: list[Result]) -> dict | None:
    """GD's error line: the least-squares power law, and the first-order line through the
    smallest η measured (error ∝ η), which is what the extrapolations use."""
    rows = [r for r in results if r.family == "GD (lax.scan)" and math.isfinite(r.traj_error)]
    if not rows:
        return None
    finest = min(rows, key=lambda r: r.knob)
    fitted = fit_power_law([r.knob for r in rows], [r.traj_error for r in rows]) if len(rows) > 1 \
        else (math.nan, math.nan)
    return dict(
        c=finest.traj_error / finest.knob,  # error = c · η, anchored at the finest η
        power=1.0,
        fitted_c=fitted[0],
        fitted_power=fitted[1],
        finest_eta=finest.knob,
        seconds_per_step=finest.wall_s / finest.steps,
        cpu_seconds_per_step=finest.cpu_s / finest.steps,
    )


def run(p: Problem, settings: Settings, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every competitor on one workload; returns everything the report needs."""
    log(f"{p.name}: {p.size} parameters, t1={p.t1:g}, {len(p.ts)} save times, "
        f"atol = rtol × {p.scale:.3e}")
    load_start = os.getloadavg()
    start = time.perf_counter()
    ref = reference(p, settings.reference_rtol, settings.separate_reference_state)
    log(f"  reference dopri8 rtol={settings.reference_rtol:g}: {ref.steps} steps "
        f"({time.perf_counter() - start:.1f}s)")
    check = cross_check(p, ref, settings.cross_check_rtols)
    for row in check:
        log(f"  scipy DOP853 rtol={row['rtol']:g} cross-check: state difference "
            f"{row['state_difference']:.2e}, transitions {row['transition_difference']}")
    results, overhead, torch_info = [], [], None
    for name, fn in [("gflow", run_gflow), ("bare diffrax", run_bare), ("GD", run_gd),
                     ("optax", run_optax), ("scipy", run_scipy),
                     ("torchdiffeq", run_torchdiffeq)]:
        start = time.perf_counter()
        rows = fn(p, ref, settings)
        if name == "bare diffrax":
            rows, overhead = rows
        elif name == "torchdiffeq":
            rows, torch_info = rows
            if torch_info["skipped"]:
                log(f"  torchdiffeq skipped: {torch_info['skipped']}")
        results += rows
        log(f"  {name}: {len(rows)} settings in {time.perf_counter() - start:.1f}s")
    counts = count_evaluations(p) if settings.count_evaluations else []
    return dict(
        problem=dict(name=p.name, t1=p.t1, save_times=len(p.ts), parameters=p.size,
                     atol_scale=p.scale),
        reference=dict(
            solver="dopri8, a step ending at every save time",
            rtol=settings.reference_rtol,
            steps=ref.steps,
            evaluations=ref.evaluations,
            transitions=ref.transitions,
            restart_difference=ref.restart_difference
            if settings.separate_reference_state
            else None,
        ),
        cross_check=check,
        results=results,
        overhead=overhead,
        evaluation_counts=counts,
        gd_fit=_gd_fit(results),
        torchdiffeq=torch_info,
        load_average=dict(start=load_start, end=os.getloadavg()),
    )
