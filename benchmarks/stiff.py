"""Stiff flows: gflow's `solver="auto"` (Tsit5 switching to the matrix-free BDF) against
the same switching with the ESDIRK branch, the BDF alone, Tsit5, SUNDIALS CVODE and scipy's
BDF with the dense Hessian, side by side at matched error.

    python -m benchmarks.stiff [--workloads deep-linear-1e4,rank-collapse,rank-collapse-stiff]
                               [--rtols 1e-4,1e-5,1e-6,1e-7,1e-8] [--esdirk-rtols 1e-6]
                               [--tsit5-rtols 1e-6] [--scipy-rtols ...] [--cvode FILE[,FILE]]
                               [--write-starts FILE] [--out DIR] [--report-only]

Writes `benchmarks/results/stiff/runs.json` (every run: cost, counters, wall time, state error
at the save times against the workload's reference, transition errors), `runs.md` beside it
(a summary with the command and the machine) and the results page's rows,
`benchmarks/results/stiff.json` (`python -m benchmarks.results_page` renders them).

Workloads: `deep-linear-1e4` (the deep-linear preset run to convergence, t1 = 1e4, 512
parameters; timed warm, best of several), `rank-collapse` (the default preset, t1 = 1500,
28,672 parameters, its PI controller; one run each, its wall time the solve's without
compiling), `rank-collapse-stiff` (its stiff phase alone: from the reference's state at its
first save time from t = 742 on, 742.4, to 1500; the BDF alone against Tsit5; one run each).

Cost is gradients + 2 × Hessian-vector products (a product costs about 2.2 gradients here).
gflow's counters cover accepted steps (diffrax discards a rejected step's solver state) and
charge each rejected step Tsit5's 6 evaluations; `cost_bound` charges each rejected step the
mean implicit step's cost instead (an upper bound while rejections are rare), and
`cost_exact` adds the work of every implicit attempt, rejected ones included, counted by a host
callback in a run of its own (or in the one run of a workload timed once).

SUNDIALS CVODE (BDF + GMRES on the same JAX Hessian-vector products) needs SUNDIALS' official
`sundials4py` bindings, hence Python ≥ 3.12: `benchmarks/stiff_cvode.py` runs it there (its
docstring says how to set that environment up; the `bench` extra installs `sundials4py` only
under `python_version >= "3.12"`) and saves its states; `--cvode FILE[,FILE...]` scores them
here against the same reference as gflow's runs (each file holds runs of one or more
workloads, each run naming its own). CVODE starts where gflow does: `--write-starts FILE`
computes the started workloads' references, saves every workload's start `(t0, flat y0)`
and stops; `stiff_cvode --starts FILE` starts from them; and a CVODE run whose start differs
from this run's by more than 1e-12 (relative) is not scored (JAX versions may differ in an
initialisation's last bit: the start file makes it 0):

    python -m benchmarks.stiff --workloads deep-linear-1e4,rank-collapse,rank-collapse-stiff \\
        --write-starts /tmp/starts.npz
    PYTHONPATH=. /work/venv312/bin/python -m benchmarks.stiff_cvode \\
        --workloads deep-linear-1e4,rank-collapse,rank-collapse-stiff \\
        --rtols 1e-5,1e-6,1e-7,1e-8 --starts /tmp/starts.npz --out /tmp/cvode.npz
    python -m benchmarks.stiff --workloads deep-linear-1e4,rank-collapse,rank-collapse-stiff \\
        --cvode /tmp/cvode.npz

CVODE's rtols must bracket the error of the gflow run it is compared with (CVODE's error is
far above its rtol on these flows): the committed results used 1e-4 to 1e-9 on deep-linear-1e4,
1e-5 to 1e-10 on rank-collapse and 1e-5 to 1e-8 on rank-collapse-stiff (the commands are in
the results' commit message).

scipy's BDF (`solve_ivp(method="BDF")`) gets the exact dense Jacobian −∇²L (`jax.jacfwd` of
the jitted gradient) on workloads of at most `DENSE_HESSIAN_MAX_PARAMS` = 5,000 parameters
(deep-linear-1e4's 512; not the default preset: 28,672 parameters, 6.6 GB a Hessian), at
`--scipy-rtols` (default: `--rtols`) and gflow's default atol, warm, best of 3. Its cost is
its gradients (`nfev`); its dense Hessians (`njev`, each 512 forward-over-reverse products,
and its wall time in gradients' measured beside it) and LU factorisations (`nlu`) are
reported beside it, not folded into one number.
"""


import argparse
import json
import math
import sys
from pathlib import Path

import diffrax
import equinox as eqx
import jax
import jax.flatten_util
import numpy as np
import scipy.integrate

import gflow
from gflow import internal

from ._harness import (
    best_time,
    interpolate_cost,
    machine,
    markdown_table,
    relative_trajectory_error,
    transition_errors,
)
from ._stiff_workloads import (
    STARTS,
    WORKLOADS,
    FlatFlow,
    flat_flow,
    preset,
    write_starts,
)
from ._workload import flat_state_observer
from .results_page import RESULTS_DIR, write_suite


class _Attempts(list):
    """A host-side list that a module may hold as a static field (hashed by identity)."""

    __hash__ = object.__hash__

    def __eq__(self, other):
        return self is other


class _CountedImplicit(internal.AbstractNewtonKrylov):
    """`inner`, recording `(t0, t1, cost)` of every step it attempts on the host (diffrax
    discards a rejected step's solver state, so its counters miss the rejected attempts)."""

    inner: internal.AbstractNewtonKrylov
    attempts: _Attempts = eqx.field(static=True)
    root_finder: object = diffrax.with_stepsize_controller_tols(diffrax.VeryChord)()
    root_find_max_steps: int = eqx.field(static=True, default=0)  # the inner solver's is used

    def order(self, terms):
        return self.inner.order(terms)

    def init(self, terms, t0, t1, y0, args):
        return self._inner().init(terms, t0, t1, y0, args)

    def blank_state(self, y0):
        return self.inner.blank_state(y0)

    def restart(self, state, y0, f0):
        return self.inner.restart(state, y0, f0)

    def warming_up(self, state):
        return self.inner.warming_up(state)

    def _inner(self):
        return eqx.tree_at(lambda s: s.root_finder, self.inner, self.root_finder)

    def _record(self, t0, t1, cost):
        self.attempts.append((float(t0), float(t1), int(cost)))

    def step_with_jvp(self, terms, t0, t1, y0, args, state, probe=None):
        out = self._inner().step_with_jvp(terms, t0, t1, y0, args, state, probe)
        work = out[3]["work"] - state["work"]
        jax.debug.callback(self._record, t0, t1, work[0] + 2 * work[1])
        return out


def _counted(solver):
    """`solver` with its implicit part recording its attempts, and their list; `None` for a
    solver without one."""
    attempts = _Attempts()
    if isinstance(solver, gflow.StiffSwitching):
        return eqx.tree_at(lambda s: s.implicit, solver,
                           _CountedImplicit(solver.implicit, attempts)), attempts
    if isinstance(solver, internal.AbstractNewtonKrylov):
        return _CountedImplicit(solver, attempts), attempts
    return None, attempts


def _rejected_implicit(attempts: list) -> tuple[int, int]:
    """How many implicit attempts were rejected and their cost: an attempt is retried (from
    the same `t0`, with a shorter step) exactly when it was rejected."""
    ordered = sorted(attempts, key=lambda a: (a[0], -a[1]))
    rejected = [a for a, b in zip(ordered, ordered[1:]) if b[0] == a[0]]
    return len(rejected), sum(a[2] for a in rejected)


def gflow_run(name: str, overrides: list[str], solver, rtol: float, *, y0=None,
              t0: float | None = None, warm: bool = True, repeats: int = 3) -> dict:
    """One gflow solve of preset `name` (with `overrides`) by `solver` (a name or a solver) at
    `rtol`, the flat state observed at the preset's save times. `y0`/`t0`: start there
    instead. `warm`: compile first and time the best of `repeats` (the exact count in a run of
    its own); else one run, counted, timed without compiling."""
    solver = internal.make_solver(solver, rtol)
    settings, problem = preset(name, overrides)
    flow = problem.flow
    if y0 is not None:
        flow = flow.__class__(flow.combine(y0), flow.loss, flow.data, flow.trainable)
    t0 = settings.t0 if t0 is None else t0
    ts = np.asarray(settings.save_times())
    ts = ts[ts >= t0]
    kwargs = dict(t0=t0, ts=ts, solver=solver, rtol=rtol, pcoeff=settings.pcoeff,
                  icoeff=settings.icoeff,
                  observers={"state": flat_state_observer(flow)},
                  transitions=problem.transitions, max_steps=settings.max_steps)
    counted, attempts = _counted(solver)

    def run(solver=solver):
        traj = gflow.solve(flow, settings.t1, **dict(kwargs, solver=solver))
        jax.block_until_ready(traj.final)
        return traj

    if warm:
        run()  # compile (and warm) outside the timing
        # Best of `repeats` (the machine is shared): the same solve each time.
        timing = best_time(run, repeats=repeats, budget_s=60.0)
        traj, wall = timing.outputs[-1], timing.wall
        if counted is not None:
            counted_traj = run(counted)
            assert counted_traj.stats["num_steps"] == traj.stats["num_steps"]
    else:
        traj = run(counted or solver)
        wall = traj.stats["run_seconds"]
    st = traj.stats
    cost = st["vector_field_evaluations"]
    label = internal.solver_name(solver)
    if isinstance(solver, gflow.StiffSwitching) and isinstance(solver.implicit,
                                                               gflow.NewtonKrylovESDIRK):
        label = "switching-esdirk"
    out = dict(
        method=f"gflow {label}", solver=label, rtol=rtol, status=traj.status,
        cost=cost, wall_s=wall, steps=st["num_steps"], rejected=st["num_rejected_steps"],
        transitions=traj.transitions,
        **{k: st[k] for k in ("gradients", "hvps", "newton_iterations", "krylov_iterations",
                              "implicit_steps", "explicit_steps", "switches", "switch_times")
           if k in st},
    )
    if "gradients" in st:
        # gflow charges each rejected step Tsit5's 6 evaluations; a rejected implicit step
        # costs at most about the dearest accepted one, bounded here by the mean implicit
        # step's cost when the run took implicit steps (conservative: most rejections are
        # explicit steps at the stability limit).
        implicit = st.get("implicit_steps", 0)
        accepted_cost = cost - 6 * st["num_rejected_steps"]
        implicit_cost = accepted_cost - 6 * st.get("explicit_steps", 0)
        per_step = max(6.0, implicit_cost / implicit) if implicit else 6.0
        out["cost_bound"] = accepted_cost + st["num_rejected_steps"] * per_step
        if counted is not None:
            # Rejected implicit attempts at their own cost, rejected Tsit5 steps at 6.
            n, rejected_cost = _rejected_implicit(attempts)
            explicit = (st["num_rejected_steps"] - n) * (6 if "explicit_steps" in st else 0)
            out["cost_exact"] = st["cost"] + rejected_cost + explicit
            out["rejected_implicit"] = n
    else:
        out["cost_bound"] = cost
    out["_states"] = np.asarray(traj.observables["state"])
    out["_final"] = np.asarray(
        jax.flatten_util.ravel_pytree(eqx.filter(traj.final, flow.trainable))[0])
    out["_ts"] = traj.ts
    return out


def score(run: dict, reference: dict) -> dict:
    """`run` with its state error at the save times and final, and transition errors."""
    err = relative_trajectory_error(run["_states"], reference["_states"])
    final = float(np.linalg.norm(run["_final"] - reference["_final"])
                  / np.linalg.norm(reference["_final"]))
    names = list(reference["transitions"])
    terr = transition_errors([run["transitions"].get(n, math.nan) for n in names],
                             [reference["transitions"][n] for n in names])
    return dict(run, state_error=err, final_error=final,
                transition_errors=dict(zip(names, terr)))


def public(run: dict) -> dict:
    out = {k: v for k, v in run.items() if not k.startswith("_")}
    return json.loads(json.dumps(out, default=float).replace("NaN", "null")
                      .replace("Infinity", "null"))


# Workloads whose solves take minutes here: one run each (no warm-up, timed without compiling).
ONE_RUN = {"rank-collapse", "rank-collapse-stiff"}


# scipy's BDF gets the dense Hessian only where it is cheap to hold and factor: at most this
# many parameters (a 5,000² float64 matrix is 200 MB). deep-linear-1e4 has 512; the default
# preset's 28,672 would take 6.6 GB a Hessian.
DENSE_HESSIAN_MAX_PARAMS = 5000


def scipy_bdf_run(problem: FlatFlow, rtol: float, *, repeats: int = 3) -> dict:
    """scipy's BDF (`solve_ivp(method="BDF")`) on `problem` at `rtol` and gflow's default
    atol, with the exact dense Jacobian −∇²L (`jax.jacfwd` of the jitted velocity: one
    forward-over-reverse product per parameter, batched), the states at `problem.ts`. Timed
    warm, best of `repeats`; `hessian_gradients` is one dense Hessian's wall time in
    gradients' (best of several each, in this process)."""
    velocity, y0 = problem.velocity, problem.y0
    jacobian = jax.jit(jax.jacfwd(velocity))

    def fun(t, y):
        return np.asarray(velocity(y))

    def jac(t, y):
        return np.asarray(jacobian(y))

    def run():
        return scipy.integrate.solve_ivp(fun, (problem.t0, problem.t1), y0, method="BDF",
                                         t_eval=problem.ts, rtol=rtol,
                                         atol=problem.atol(rtol), jac=jac)

    fun(0.0, y0), jac(0.0, y0)  # compile outside the timing
    timing = best_time(run, repeats=repeats, budget_s=60.0)
    sol = timing.outputs[-1]
    gradient = best_time(lambda: velocity(y0).block_until_ready(), repeats=200, budget_s=2.0)
    hessian = best_time(lambda: jacobian(y0).block_until_ready(), repeats=20, budget_s=5.0)
    states = np.asarray(sol.y.T)
    return dict(
        method="scipy BDF (dense Hessian)", solver="scipy-bdf", rtol=rtol,
        status="completed" if sol.status == 0 else f"failed: {sol.message}",
        cost=int(sol.nfev), cost_bound=int(sol.nfev), gradients=int(sol.nfev),
        hessians=int(sol.njev), lu_decompositions=int(sol.nlu), parameters=int(y0.size),
        hessian_gradients=hessian.wall / gradient.wall, steps=None, rejected=None,
        wall_s=timing.wall, transitions={},
        _states=states, _final=states[-1], _ts=np.asarray(sol.t),
    )


def load_cvode(paths: list[str]) -> dict[str, list[dict]]:
    """The runs `benchmarks.stiff_cvode` saved in the files `paths`, by workload."""
    out = {}
    for path in paths:
        for run in np.load(path, allow_pickle=True)["runs"]:
            run = dict(run)
            out.setdefault(run.pop("workload"), []).append(run)
    return out


def _check_start(run: dict, t0: float, y0: np.ndarray) -> dict:
    """`run` (another process's) with `start_difference`, its start's largest difference from
    `(t0, y0)` relative to `y0`'s largest entry; raise `ValueError` past 1e-12 (JAX versions
    may differ in the initialisation's last bit: pass the same start file to both for 0)."""
    if run["_t0"] != t0 or run["_y0"].shape != y0.shape:
        raise ValueError(f"its start (t0 = {run['_t0']}, {run['_y0'].size} parameters) is not "
                         f"this run's (t0 = {t0}, {y0.size})")
    difference = float(np.max(np.abs(run["_y0"] - y0)) / np.max(np.abs(y0)))
    if difference > 1e-12:
        raise ValueError(f"its start differs from this run's by {difference:.2g} (relative)")
    return dict(run, start_difference=difference)


SUITE = "stiff"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stiff",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="deep-linear-1e4",
                        help=f"comma-separated, of {', '.join(WORKLOADS)}")
    parser.add_argument("--rtols", default="1e-4,1e-5,1e-6,1e-7,1e-8")
    parser.add_argument("--tsit5-rtols", default="1e-6")
    parser.add_argument("--esdirk-rtols", default="1e-6",
                        help="rtols of auto with the ESDIRK as its implicit branch")
    parser.add_argument("--bdf-rtols", default="", help="rtols of the BDF alone")
    parser.add_argument("--one-run-rtols", default="1e-6",
                        help="rtols of auto on the workloads timed once (rank-collapse)")
    parser.add_argument("--scipy-rtols", default=None,
                        help="rtols of scipy's BDF with the dense Hessian, on workloads of at "
                             f"most {DENSE_HESSIAN_MAX_PARAMS:,} parameters (default: --rtols; "
                             "'' for none)")
    parser.add_argument("--reference", default="tsit5:1e-10",
                        help="solver:rtol of the reference (Tsit5 is held by stability on "
                             "these flows: a tight rtol costs it about what a loose one does)")
    parser.add_argument("--cvode", default=None,
                        help="comma-separated .npz files saved by benchmarks.stiff_cvode")
    parser.add_argument("--write-starts", type=Path, default=None, metavar="FILE",
                        help="save every workload's start (t0, flat y0) for "
                             "benchmarks.stiff_cvode --starts (the started ones' needs their "
                             "reference) and stop")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite runs.md and the results page's rows from runs.json, "
                             "run nothing")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"directory for runs.json and runs.md (default: "
                             f"benchmarks/results/{SUITE}/); the suite's rows go to "
                             "benchmarks/results/ (into --out when given)")
    args = parser.parse_args(argv)
    workloads = [w for w in args.workloads.split(",") if w]
    problem = _bad_input(args, workloads)
    if problem:
        print(f"python -m benchmarks.stiff: {problem}", file=sys.stderr)
        return 2
    out = (args.out or RESULTS_DIR / SUITE).resolve()
    rows_dir = out if args.out else RESULTS_DIR
    if args.report_only:
        payload = json.loads((out / "runs.json").read_text())
        _summary(out / "runs.md", payload)
        write_results(payload, rows_dir)
        return 0
    cvode = load_cvode(args.cvode.split(",")) if args.cvode else {}
    scipy_rtols = args.rtols if args.scipy_rtols is None else args.scipy_rtols
    results, references, starts = {}, {}, {}
    for workload in workloads:
        name, overrides = WORKLOADS[workload]
        settings, problem = preset(name, overrides)
        init = jax.flatten_util.ravel_pytree(problem.flow.params)
        t0, y0, reference = settings.t0, np.asarray(init[0], dtype=np.float64), None
        if workload in STARTS or not args.write_starts:
            ref_solver, ref_rtol = args.reference.split(":")
            print(f"[{workload}] reference: {ref_solver} at rtol {ref_rtol}", flush=True)
            key = (name, tuple(overrides))
            if key not in references:
                references[key] = gflow_run(name, overrides, ref_solver, float(ref_rtol),
                                            warm=False, repeats=1)
            reference = references[key]
        start = {}
        if workload in STARTS:
            i0 = int(np.searchsorted(reference["_ts"], STARTS[workload]))
            t0, y0 = float(reference["_ts"][i0]), reference["_states"][i0]
            start = dict(y0=init[1](y0), t0=t0)
            reference = dict(reference, _states=reference["_states"][i0:], transitions={})
        starts[workload] = (t0, y0)
        if args.write_starts:
            continue
        runs = []
        timing = dict(warm=False) if workload in ONE_RUN else {}
        esdirk = gflow.StiffSwitching(implicit=gflow.NewtonKrylovESDIRK())
        auto_rtols = args.one_run_rtols if workload in ONE_RUN else args.rtols
        solvers = [
            # Best of 10: an auto solve takes a tenth of a second; Tsit5's best of 3 (seconds).
            ("auto", auto_rtols, 10), (esdirk, args.esdirk_rtols, 10),
            ("bdf", args.bdf_rtols, 10), ("tsit5", args.tsit5_rtols, 3),
        ]
        if start:  # the stiff phase alone: the implicit method against Tsit5 (and CVODE)
            solvers = [("bdf", args.one_run_rtols, 1), ("tsit5", args.tsit5_rtols, 1)]
        for solver, rtols_of, repeats in solvers:
            for rtol in _floats(rtols_of):
                runs.append(score(gflow_run(name, overrides, solver, rtol, repeats=repeats,
                                            **timing, **start), reference))
                print(public(runs[-1]), flush=True)
        if y0.size <= DENSE_HESSIAN_MAX_PARAMS:
            flat = flat_flow(problem.flow, t0, settings.t1, settings.save_times(), y0)
            for rtol in _floats(scipy_rtols):
                runs.append(score(scipy_bdf_run(flat, rtol), reference))
                print(public(runs[-1]), flush=True)
        elif _floats(scipy_rtols):
            print(f"[{workload}] scipy BDF not run: {y0.size:,} parameters (a dense Hessian "
                  f"only up to {DENSE_HESSIAN_MAX_PARAMS:,})", flush=True)
        for run in cvode.get(workload, []):
            try:
                run = _check_start(run, t0, y0)
            except ValueError as e:  # keep what this run computed; leave that one out
                print(f"CVODE's {workload} run at rtol {run['rtol']:g} not scored: {e}",
                      file=sys.stderr, flush=True)
                continue
            runs.append(score(run, reference))
            print(public(runs[-1]), flush=True)
        results[workload] = dict(reference=public(reference), runs=[public(r) for r in runs])
    if args.write_starts:
        write_starts(args.write_starts, starts)
        print(f"wrote {args.write_starts}: the starts of {', '.join(starts)}", flush=True)
        return 0
    command = "python -m benchmarks.stiff " + " ".join(argv if argv is not None else sys.argv[1:])
    payload = dict(command=command.strip(), machine=machine(), workloads=results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "runs.json").write_text(json.dumps(payload, indent=1))
    _summary(out / "runs.md", payload)
    write_results(payload, rows_dir)
    return 0


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _bad_input(args, workloads: list[str]) -> str | None:
    """What is wrong with the command line, if anything (checked before any solve)."""
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        return f"unknown workload(s) {', '.join(unknown)} (known: {', '.join(WORKLOADS)})"
    for option in ("rtols", "tsit5_rtols", "esdirk_rtols", "bdf_rtols", "one_run_rtols",
                   "scipy_rtols"):
        try:
            values = _floats(getattr(args, option) or "")
        except ValueError:
            return f"--{option.replace('_', '-')} must be comma-separated numbers"
        if any(not 0 < v < 1 for v in values):
            return f"--{option.replace('_', '-')}: every rtol must be in (0, 1)"
    solver, _, rtol = args.reference.partition(":")
    try:
        internal.make_solver(solver, float(rtol))
    except (ValueError, TypeError, KeyError) as e:
        return f"--reference {args.reference}: not solver:rtol ({e})"
    if args.report_only and not (
            (args.out or RESULTS_DIR / SUITE) / "runs.json").is_file():
        return f"--report-only: no runs.json in {args.out or RESULTS_DIR / SUITE}"
    if args.write_starts and args.write_starts.suffix != ".npz":
        return f"--write-starts {args.write_starts}: the file must end in .npz"
    for path in (args.cvode or "").split(","):
        if not path:
            continue
        try:
            held = set(load_cvode([path]))
        except (OSError, ValueError, KeyError) as e:
            return f"--cvode {path}: not a file saved by benchmarks.stiff_cvode ({e})"
        if held - set(workloads):
            print(f"--cvode {path}: its runs of {', '.join(sorted(held - set(workloads)))} "
                  "are not scored (not in --workloads)", flush=True)
    return None


def _label(run: dict) -> str:
    return {"switching": "auto", "switching-esdirk": "auto (ESDIRK branch)", "tsit5": "Tsit5",
            "cvode": "CVODE", "bdf": "BDF alone",
            "scipy-bdf": "scipy BDF (dense Hessian)"}.get(run["solver"], run["method"])


def _at_error(runs: list[dict], solver: str, error: float, key=None) -> float | None:
    """`key(run)` (default: the cost) of `solver`'s runs at state error `error`, interpolated
    log–log between them (`None` outside their errors)."""
    mine = [r for r in runs if r["solver"] == solver and r.get("state_error") is not None]
    return interpolate_cost([r["state_error"] for r in mine], [(key or _cost)(r) for r in mine],
                            error)


def _rtol(run: dict) -> str:
    return f"{run['rtol']:.0e}".replace("e-0", "e-")


def _error_range(runs: list[dict], solver: str) -> str:
    errors = [r["state_error"] for r in runs
              if r["solver"] == solver and r.get("state_error") is not None]
    return f"{min(errors):.2g} to {max(errors):.2g}" if errors else "none"


def _cost(run: dict) -> int:
    """Every attempted step's evaluations where counted, else the counters' total."""
    return run.get("cost_exact") or run["cost"]


# Issue 31's baseline: Tsit5 on the default preset (evaluations, measured on main).
PRESET_TSIT5_COST = 7225


def _preset_targets(workload: str, auto: dict, runs: list[dict]) -> list[dict]:
    """Issue 31's targets on the default preset: cost ≤ 0.55 × Tsit5's at the preset's own
    accuracy (Tsit5's state error there), transitions within 10 × rtol (relative)."""
    tsit5 = [r for r in runs if r["solver"] == "tsit5" and r["rtol"] == 1e-6]
    tsit5_error = tsit5[0]["state_error"] if tsit5 else 3e-6
    limit = 0.55 * PRESET_TSIT5_COST
    ratio = (f"; {_cost(auto) / _cost(tsit5[0]):.2f}× Tsit5's {_cost(tsit5[0]):,} in this run"
             if tsit5 else "")
    relative = {n: e / abs(auto["transitions"][n]) for n, e in auto["transition_errors"].items()
                if e is not None and auto["transitions"].get(n)}
    worst = max(relative.values()) if relative else math.inf
    return [
        dict(quantity=f"{workload}: auto at rtol 1e-6: cost", value=_cost(auto),
             target=f"≤ 0.55 × {PRESET_TSIT5_COST:,} = {limit:,.0f}",
             verdict="met" if _cost(auto) <= limit else "not met",
             detail=f"every attempted step counted{ratio}"),
        dict(quantity=f"{workload}: auto at rtol 1e-6: state error", value=auto["state_error"],
             target="≈ 3e-6, the preset's accuracy (within 1.5×)",
             verdict="met" if auto["state_error"] <= 1.5 * 3e-6 else "not met",
             detail="largest relative error over the save times against the reference; "
                    f"Tsit5's in this run {tsit5_error:.2g} "
                    f"({auto['state_error'] / tsit5_error:.2f}× that)"),
        dict(quantity=f"{workload}: auto at rtol 1e-6: transition times, largest relative error",
             value=worst, target="≤ 10 × rtol = 1e-5",
             verdict="met" if worst <= 1e-5 else "not met",
             detail=", ".join(f"{n} {e:.2g}" for n, e in relative.items())),
    ]


def _against_cvode(workload: str, run: dict, runs: list[dict], target: str,
                   limit: float = math.inf) -> dict:
    """The row comparing `run`'s cost with CVODE's interpolated at `run`'s state error: `met`
    when it is at most CVODE's (and `limit`)."""
    label = f"{workload}: {_label(run)} at rtol {_rtol(run)}"
    cvode = _at_error(runs, "cvode", run["state_error"])
    if cvode is None:
        verdict = "not measured"
        detail = (f"CVODE's errors ({_error_range(runs, 'cvode')}) do not bracket "
                  f"{run['state_error']:.2g}")
    else:
        verdict = "met" if _cost(run) <= min(cvode, limit) else "not met"
        detail = (f"CVODE (BDF + GMRES on the same HVPs) at state error "
                  f"{run['state_error']:.2g}: {cvode:,.0f}, interpolated log–log between its "
                  f"rtols; {_label(run)} / CVODE = {_cost(run) / cvode:.2f}")
    return dict(quantity=f"{label}: cost against CVODE's at the same error", value=_cost(run),
                unit="gradients + 2 × HVPs", target=target, verdict=verdict, detail=detail)


def _against_scipy(workload: str, run: dict, runs: list[dict]) -> dict | None:
    """The row comparing `run`'s cost with scipy's BDF (dense Hessian) at `run`'s error."""
    scipy_runs = [r for r in runs if r["solver"] == "scipy-bdf"]
    if not scipy_runs:
        return None
    gradients = _at_error(runs, "scipy-bdf", run["state_error"])
    hessians = _at_error(runs, "scipy-bdf", run["state_error"], key=lambda r: r["hessians"])
    n = scipy_runs[0]["parameters"]
    ratio = np.median([r["hessian_gradients"] for r in scipy_runs])
    if gradients is None:
        detail = (f"scipy BDF's errors ({_error_range(runs, 'scipy-bdf')}) do not bracket "
                  f"{run['state_error']:.2g}")
    else:
        detail = (f"scipy BDF at state error {run['state_error']:.2g}: {gradients:,.0f} "
                  f"gradients and {hessians:,.0f} dense Hessians, each interpolated log–log "
                  f"between its rtols; a Hessian is {n} forward-over-reverse products "
                  f"(`jax.jacfwd` of the gradient), so at 2 gradients a product "
                  f"{gradients + 2 * n * hessians:,.0f} gradients; by wall time one Hessian took "
                  f"{ratio:.0f} gradients' here (median over its runs), "
                  f"{gradients + ratio * hessians:,.0f} gradients")
    return dict(quantity=f"{workload}: {_label(run)} at rtol {_rtol(run)}: cost against "
                         "scipy BDF's (dense Hessian) at the same error",
                value=_cost(run), unit="gradients + 2 × HVPs", verdict="reported", detail=detail)


def _run_detail(r: dict) -> str:
    detail = (f"state error {r['state_error']:.2g} over the save times, final "
              f"{r['final_error']:.2g}" if r.get("state_error") is not None
              else f"no state error ({r['status']})")
    if r.get("steps") is not None:
        detail += f"; {r['steps']} steps"
    if r.get("rejected") is not None:
        detail += f", {r['rejected']} rejected"
    if r.get("switches") is not None:
        detail += f", {r['switches']} switch(es)"
    detail += f"; wall {r['wall_s']:.3g} s"
    if r["solver"] == "cvode":
        detail += (f"; {r['gradients']:,} gradients + {r['hvps']:,} HVPs, "
                   f"{r['newton_iterations']} Newton and {r['krylov_iterations']} GMRES "
                   "iterations (its own run under Python 3.12: `benchmarks.stiff_cvode`)")
    if r["solver"] == "scipy-bdf":
        detail += (f"; plus {r['hessians']} dense Hessians ({r['parameters']} forward-over-reverse"
                   f" products each; one took {r['hessian_gradients']:.0f} gradients' wall time "
                   f"here) and {r['lu_decompositions']} LU factorisations")
    if r.get("cost_exact") is not None:
        detail += (f"; the counters' {r['cost']:,} (each rejected step at Tsit5's 6) plus "
                   f"{r['rejected_implicit']} rejected implicit attempt(s) at their own cost")
    elif r.get("cost_bound", r["cost"]) != r["cost"]:
        detail += (f"; {round(r['cost_bound'])} charging each rejected step the mean implicit "
                   "step's cost")
    return detail


def write_results(payload: dict, directory: Path) -> Path:
    """The results page's rows (`benchmarks.results_page`): every run's cost and errors,
    issue 31's targets on deep-linear to t1 = 1e4 and the default preset (auto at rtol 1e-6),
    and auto's (on the stiff phase alone, the BDF's) cost against CVODE's and scipy BDF's at
    the same error."""
    rows = []
    for workload, data in payload["workloads"].items():
        runs = data["runs"]
        for r in runs:
            rows.append(dict(quantity=f"{workload}: {_label(r)} at rtol {r['rtol']:.0e}: cost",
                             value=_cost(r),
                             unit="gradients" if r["solver"] == "scipy-bdf"
                             else "gradients + 2 × HVPs", detail=_run_detail(r)))
        auto = [r for r in runs if r["solver"] == "switching" and r["rtol"] == 1e-6]
        bdf = [r for r in runs if r["solver"] == "bdf" and r["rtol"] == 1e-6]
        if workload == "rank-collapse" and auto:
            rows += _preset_targets(workload, auto[0], runs)
            rows.append(_against_cvode(workload, auto[0], runs, "≤ CVODE's"))
        if workload == "rank-collapse-stiff" and bdf:
            rows.append(_against_cvode(workload, bdf[0], runs, "≤ CVODE's"))
        if workload != "deep-linear-1e4" or not auto:
            continue
        auto = auto[0]
        rows += [
            dict(quantity=f"{workload}: auto at rtol 1e-6: state error",
                 value=auto["state_error"], target="≤ 1e-5",
                 verdict="met" if auto["state_error"] <= 1e-5 else "not met",
                 detail="largest relative error over the save times against "
                        f"{data['reference']['method']} at rtol {data['reference']['rtol']:g}"),
            _against_cvode(workload, auto, runs, "≤ 4,000 and ≤ CVODE's", limit=4000),
        ]
        scipy_row = _against_scipy(workload, auto, runs)
        if scipy_row:
            rows.append(scipy_row)
        tsit5 = [r for r in runs if r["solver"] == "tsit5" and r["rtol"] == 1e-6]
        if tsit5:
            ratio = tsit5[0]["wall_s"] / auto["wall_s"]
            rows.append(dict(
                quantity=f"{workload}: wall time, Tsit5 / auto at rtol 1e-6",
                value=round(ratio, 1), unit="×", target="≥ 30",
                verdict="met" if ratio >= 30 else "not met",
                detail=f"{tsit5[0]['wall_s']:.3g} s / {auto['wall_s']:.3g} s, best of 3 and of "
                       f"10 in one process; evaluations {tsit5[0]['cost']:,} / {_cost(auto):,}"))
    return write_suite(
        SUITE, title="Stiff flows: auto (Tsit5 ↔ matrix-free BDF) against Tsit5 and CVODE",
        command=payload["command"], machine=payload["machine"], rows=rows,
        directory=directory,
        summary='`solver="auto"` at rtol ≥ 1e-8 is `gflow.StiffSwitching`: Tsit5 until its '
                "steps are held by stability, then `gflow.NewtonKrylovBDF` (variable-order "
                "NDF, one linearisation a step at the predictor, CG on Hessian-vector products), "
                "and back; \"auto (ESDIRK branch)\" is the same switching with "
                "`gflow.NewtonKrylovESDIRK` (Kværnø 5). Cost is gradients + 2 × HVPs of every "
                "attempted step (rejected implicit attempts counted by a host callback, rejected "
                "Tsit5 steps at 6). Errors are relative state "
                "errors at the preset's save times against a Tsit5 rtol-1e-10 reference. CVODE "
                "is SUNDIALS' BDF with matrix-free GMRES (no preconditioner) on the same jitted "
                "JAX HVP, through `sundials4py` on Python 3.12 (`benchmarks/stiff_cvode.py`), "
                "from the same start states and with gflow's default atol. scipy's BDF gets the "
                "exact dense Hessian (`jax.jacfwd` of the gradient, jitted) and runs only where "
                f"a Hessian is small (≤ {DENSE_HESSIAN_MAX_PARAMS:,} parameters: deep-linear's "
                "512, not the default preset's 28,672); its cost counts gradients, its dense "
                "Hessians are stated beside it. Costs are compared at the same state error, "
                "interpolated log–log between a solver's rtols.")


def _summary(path: Path, payload: dict) -> None:
    lines = ["# Stiff flows: gflow auto (Tsit5 ↔ matrix-free BDF) against stiff solvers", "",
             f"Command: `{payload['command']}`  ", f"Machine: {payload['machine']}", ""]
    for workload, data in payload["workloads"].items():
        lines += [f"## {workload}", ""]
        rows = []
        for r in data["runs"]:
            rows.append([r["method"], f"{r['rtol']:.0e}", r["cost"], _cost(r),
                         round(r.get("cost_bound", r["cost"])), r.get("hessians", ""),
                         r["rejected"],
                         f"{r['state_error']:.2e}" if r.get("state_error") is not None else "",
                         f"{r['wall_s']:.2f}", r.get("switches", "")])
        lines.append(markdown_table(
            ["method", "rtol", "cost", "cost exact", "cost bound", "dense Hessians", "rejected",
             "state error", "wall s", "switches"], rows))
        lines.append("")
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
