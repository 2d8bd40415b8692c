"""Stiff flows: gflow's `solver="auto"` (Tsit5 switching to the matrix-free BDF) against
the same switching with the ESDIRK branch and Tsit5, side by side at matched error (CVODE and
scipy's BDF: see below).

    python -m benchmarks.stiff [--workloads deep-linear-1e4,rank-collapse]
                               [--rtols 1e-4,1e-5,1e-6,1e-7,1e-8] [--esdirk-rtols 1e-6]
                               [--out DIR] [--report-only]

Writes `benchmarks/results/stiff/runs.json` (every run: cost, counters, wall time, state error
at the save times against the workload's reference, transition errors), `runs.md` beside it
(a summary with the command and the machine) and the results page's rows,
`benchmarks/results/stiff.json` (`python -m benchmarks.results_page` renders them).

Cost is gradients + 2 × Hessian-vector products (a product costs about 2.2 gradients here).
gflow's counters cover accepted steps (diffrax discards a rejected step's solver state) and
charge each rejected step Tsit5's 6 evaluations; `cost_bound` charges each rejected step the
mean implicit step's cost instead (an upper bound while rejections are rare), and
`cost_exact` adds the work of every implicit attempt, rejected ones included, counted by a host
callback in a run of its own (or in the one run of a workload timed once).

SUNDIALS CVODE (BDF + GMRES on the same JAX Hessian-vector products) needs SUNDIALS' official
`sundials4py` bindings, hence Python ≥ 3.12: `benchmarks/stiff_cvode.py` runs it there (its
docstring says how to set that environment up; the `bench` extra installs `sundials4py` only
under `python_version >= "3.12"`) and saves its states; `--cvode FILE` scores them here
against the same reference as gflow's runs:

    PYTHONPATH=. /work/venv312/bin/python -m benchmarks.stiff_cvode --out /tmp/cvode.npz
    python -m benchmarks.stiff --cvode /tmp/cvode.npz

scipy's BDF with the dense Hessian is not run here (the issue's numbers: 4,745–5,904).

Workloads: `deep-linear-1e4` (the deep-linear preset run to convergence, t1 = 1e4, 512
parameters; timed warm, best of several), `rank-collapse` (the default preset, t1 = 1500, its
PI controller; one run each, its wall time the solve's without compiling),
`rank-collapse-stiff` (its stiff phase alone: from the reference's state at t = 742.4 to
1500, the BDF alone against Tsit5; one run each).
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

import gflow
from gflow import internal, presets

from ._harness import best_time, machine, markdown_table, relative_trajectory_error, transition_errors
from ._workload import flat_state_observer
from .stiff_cvode import WORKLOADS as CVODE_WORKLOADS
from .results_page import RESULTS_DIR, write_suite


def _preset(name: str, overrides: list[str]):
    resolved = presets.resolve(name, ["solve.certify=false", *overrides])
    problem = presets.build(resolved)
    return resolved.solve, problem


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
    settings, problem = _preset(name, overrides)
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


WORKLOADS = {
    "deep-linear-1e4": ("deep-linear", ["solve.t1=1e4"]),
    "rank-collapse": ("rank-collapse", []),
    "rank-collapse-stiff": ("rank-collapse", []),
}
# Workloads started from the reference's state at its first save time from this t on: the
# default preset's stiff phase (after its last transition, λ_max up to 6).
STARTS = {"rank-collapse-stiff": 742.0}
# Workloads whose solves take minutes here: one run each (no warm-up, timed without compiling).
ONE_RUN = {"rank-collapse", "rank-collapse-stiff"}


SUITE = "stiff"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stiff",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="deep-linear-1e4")
    parser.add_argument("--rtols", default="1e-4,1e-5,1e-6,1e-7,1e-8")
    parser.add_argument("--tsit5-rtols", default="1e-6")
    parser.add_argument("--esdirk-rtols", default="1e-6",
                        help="rtols of auto with the ESDIRK as its implicit branch")
    parser.add_argument("--bdf-rtols", default="", help="rtols of the BDF alone")
    parser.add_argument("--one-run-rtols", default="1e-6",
                        help="rtols of auto on the workloads timed once (rank-collapse)")
    parser.add_argument("--reference", default="tsit5:1e-10",
                        help="solver:rtol of the reference (Tsit5 is held by stability on "
                             "these flows: a tight rtol costs it about what a loose one does)")
    parser.add_argument("--cvode", default=None, help="states saved by benchmarks.stiff_cvode")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite runs.md and the results page's rows from runs.json, "
                             "run nothing")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"directory for runs.json and runs.md (default: "
                             f"benchmarks/results/{SUITE}/); the suite's rows go to "
                             "benchmarks/results/ (into --out when given)")
    args = parser.parse_args(argv)
    out = (args.out or RESULTS_DIR / SUITE).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows_dir = out if args.out else RESULTS_DIR
    if args.report_only:
        payload = json.loads((out / "runs.json").read_text())
        _summary(out / "runs.md", payload)
        write_results(payload, rows_dir)
        return 0
    results, references = {}, {}
    for workload in args.workloads.split(","):
        name, overrides = WORKLOADS[workload]
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
            unravel = jax.flatten_util.ravel_pytree(_preset(name, overrides)[1].flow.params)[1]
            start = dict(y0=unravel(reference["_states"][i0]), t0=float(reference["_ts"][i0]))
            reference = dict(reference, _states=reference["_states"][i0:], transitions={})
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
            for rtol in [float(x) for x in rtols_of.split(",") if x]:
                runs.append(score(gflow_run(name, overrides, solver, rtol, repeats=repeats,
                                            **timing, **start), reference))
                print(public(runs[-1]), flush=True)
        if args.cvode and workload in CVODE_WORKLOADS:
            for run in np.load(args.cvode, allow_pickle=True)["runs"]:
                runs.append(score(dict(run), reference))
                print(public(runs[-1]), flush=True)
        results[workload] = dict(reference=public(reference), runs=[public(r) for r in runs])
    command = "python -m benchmarks.stiff " + " ".join(argv if argv is not None else sys.argv[1:])
    payload = dict(command=command.strip(), machine=machine(), workloads=results)
    (out / "runs.json").write_text(json.dumps(payload, indent=1))
    _summary(out / "runs.md", payload)
    write_results(payload, rows_dir)
    return 0


def _label(run: dict) -> str:
    return {"switching": "auto", "switching-esdirk": "auto (ESDIRK branch)", "tsit5": "Tsit5",
            "cvode": "CVODE", "bdf": "BDF alone"}.get(run["solver"], run["method"])


def _cost_at_error(runs: list[dict], error: float) -> float | None:
    """The cost of a method at state error `error`, interpolated log–log between its runs
    (`None` outside their range)."""
    pts = sorted((r["state_error"], r["cost"]) for r in runs
                 if r.get("state_error") and r.get("cost"))
    for (e0, c0), (e1, c1) in zip(pts, pts[1:]):
        if e0 <= error <= e1:
            w = 0.0 if e1 == e0 else math.log(error / e0) / math.log(e1 / e0)
            return math.exp((1 - w) * math.log(c0) + w * math.log(c1))
    return None


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


def write_results(payload: dict, directory: Path) -> Path:
    """The results page's rows (`benchmarks.results_page`): every run's cost and errors, and
    issue 31's targets on deep-linear to t1 = 1e4 (auto at rtol 1e-6)."""
    rows = []
    for workload, data in payload["workloads"].items():
        runs = data["runs"]
        for r in runs:
            detail = (f"state error {r['state_error']:.2g} over the save times, final "
                      f"{r['final_error']:.2g}; {r['steps']} steps"
                      + (f", {r['rejected']} rejected" if r.get("rejected") is not None else "")
                      + (f", {r['switches']} switch(es)" if r.get("switches") is not None else "")
                      + f"; wall {r['wall_s']:.3g} s")
            if r["solver"] == "cvode":
                detail += " (its own run under Python 3.12: `benchmarks.stiff_cvode`)"
            if r.get("cost_exact") is not None:
                detail += (f"; the counters' {r['cost']:,} (each rejected step at Tsit5's 6) plus "
                           f"{r['rejected_implicit']} rejected implicit attempt(s) at their own "
                           "cost")
            elif r.get("cost_bound", r["cost"]) != r["cost"]:
                detail += (f"; {round(r['cost_bound'])} charging each rejected step the mean "
                           "implicit step's cost")
            rows.append(dict(quantity=f"{workload}: {_label(r)} at rtol {r['rtol']:.0e}: cost",
                             value=_cost(r), unit="gradients + 2 × HVPs", detail=detail))
        auto = [r for r in runs if r["solver"] == "switching" and r["rtol"] == 1e-6]
        if workload == "rank-collapse" and auto:
            rows += _preset_targets(workload, auto[0], runs)
        if workload != "deep-linear-1e4" or not auto:
            continue
        auto = auto[0]
        cvode = _cost_at_error([r for r in runs if r["solver"] == "cvode"], auto["state_error"])
        tsit5 = [r for r in runs if r["solver"] == "tsit5" and r["rtol"] == 1e-6]
        rows += [
            dict(quantity=f"{workload}: auto at rtol 1e-6: state error",
                 value=auto["state_error"], target="≤ 1e-5",
                 verdict="met" if auto["state_error"] <= 1e-5 else "not met",
                 detail="largest relative error over the save times against "
                        f"{data['reference']['method']} at rtol {data['reference']['rtol']:g}"),
            dict(quantity=f"{workload}: auto at rtol 1e-6: cost against CVODE's at the same "
                          "error", value=_cost(auto),
                 target="≤ 4,000 and ≤ CVODE's",
                 verdict="met" if _cost(auto) <= 4000 and (cvode is None or _cost(auto) <= cvode)
                 else "not met",
                 detail="CVODE (BDF + GMRES on the same HVPs) at that error: "
                        + (f"{cvode:,.0f}, interpolated log–log between its rtols"
                           if cvode is not None else "outside its measured errors")),
        ]
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
                "JAX HVP, through `sundials4py` on Python 3.12 (`benchmarks/stiff_cvode.py`).")


def _summary(path: Path, payload: dict) -> None:
    lines = ["# Stiff flows: gflow auto (Tsit5 ↔ matrix-free BDF) against stiff solvers", "",
             f"Command: `{payload['command']}`  ", f"Machine: {payload['machine']}", ""]
    for workload, data in payload["workloads"].items():
        lines += [f"## {workload}", ""]
        rows = []
        for r in data["runs"]:
            rows.append([r["method"], f"{r['rtol']:.0e}", r["cost"], _cost(r),
                         round(r.get("cost_bound", r["cost"])), r["rejected"],
                         f"{r['state_error']:.2e}" if r.get("state_error") is not None else "",
                         f"{r['wall_s']:.2f}", r.get("switches", "")])
        lines.append(markdown_table(
            ["method", "rtol", "cost", "cost exact", "cost bound", "rejected", "state error",
             "wall s",
             "switches"], rows))
        lines.append("")
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
