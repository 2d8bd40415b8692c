"""Stiff flows: gflow's `solver="auto"` (Tsit5 switching to the matrix-free ESDIRK) against
Tsit5, side by side at matched error (CVODE and scipy's BDF: see below).

    python -m benchmarks.stiff [--workloads deep-linear-1e4,rank-collapse]
                               [--rtols 1e-4,1e-5,1e-6,1e-7,1e-8] [--out benchmarks]

Writes `benchmarks/stiff.json` (every run: cost, counters, wall time, state error at the save
times against the workload's reference, transition errors) and `benchmarks/stiff.md` (a
summary with the command and the machine).

Cost is gradients + 2 × Hessian-vector products (a product costs about 2.2 gradients here).
gflow's counters cover accepted steps (diffrax discards a rejected step's solver state) and
charge each rejected step Tsit5's 6 evaluations; `cost_bound` charges each rejected step the
mean implicit step's cost instead (an upper bound while rejections are rare).

SUNDIALS CVODE (BDF + GMRES on the same JAX Hessian-vector products) needs SUNDIALS' official
`sundials4py` bindings, hence Python ≥ 3.12: `benchmarks/stiff_cvode.py` runs it there (its
docstring says how to set that environment up; the `bench` extra installs `sundials4py` only
under `python_version >= "3.12"`) and saves its states; `--cvode FILE` scores them here
against the same reference as gflow's runs:

    PYTHONPATH=. /work/venv312/bin/python -m benchmarks.stiff_cvode --out /tmp/cvode.npz
    python -m benchmarks.stiff --cvode /tmp/cvode.npz

scipy's BDF with the dense Hessian is not run here (the issue's numbers: 4,745–5,904).

Workloads: `deep-linear-1e4` (the deep-linear preset run to convergence, t1 = 1e4, 512
parameters), `rank-collapse` (the default preset, t1 = 1500, its PI controller).
"""

import argparse
import json
import math
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.flatten_util
import numpy as np

import gflow
from gflow import presets

from ._harness import best_time, machine, markdown_table, relative_trajectory_error, transition_errors
from ._workload import flat_state_observer

ROOT = Path(__file__).resolve().parent.parent


def _preset(name: str, overrides: list[str]):
    resolved = presets.resolve(name, ["solve.certify=false", *overrides])
    problem = presets.build(resolved)
    return resolved.solve, problem


def gflow_run(name: str, overrides: list[str], solver: str, rtol: float, *, y0=None,
              t0: float | None = None, warm: bool = True, repeats: int = 3) -> dict:
    """One gflow solve of preset `name` (with `overrides`) by `solver` at `rtol`, the flat
    state observed at the preset's save times. `y0`/`t0`: start there instead."""
    settings, problem = _preset(name, overrides)
    flow = problem.flow
    if y0 is not None:
        flow = flow.__class__(flow.combine(y0), flow.loss, flow.data, flow.trainable)
    t0 = settings.t0 if t0 is None else t0
    ts = np.asarray(settings.save_times())
    ts = ts[ts >= t0]
    controller = None
    if (settings.pcoeff, settings.icoeff) != (0.0, 1.0):
        controller = gflow.pid_controller(flow, rtol, None, t0=t0, t1=settings.t1,
                                          pcoeff=settings.pcoeff, icoeff=settings.icoeff)
    kwargs = dict(t0=t0, ts=ts, solver=solver, rtol=rtol, stepsize_controller=controller,
                  observers={"state": flat_state_observer(flow)},
                  transitions=problem.transitions, max_steps=settings.max_steps)
    if warm:
        gflow.solve(flow, settings.t1, **kwargs)  # compile (and warm) outside the timing

    def run():
        traj = gflow.solve(flow, settings.t1, **kwargs)
        jax.block_until_ready(traj.final)
        return traj

    # Best of `repeats` (the machine is shared): the same solve each time.
    timing = best_time(run, repeats=repeats, budget_s=60.0)
    traj, wall = timing.outputs[-1], timing.wall
    st = traj.stats
    cost = st["vector_field_evaluations"]
    out = dict(
        method=f"gflow {traj.solver}", solver=traj.solver, rtol=rtol, status=traj.status,
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
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="deep-linear-1e4")
    parser.add_argument("--rtols", default="1e-4,1e-5,1e-6,1e-7,1e-8")
    parser.add_argument("--tsit5-rtols", default="1e-6")
    parser.add_argument("--reference", default="tsit5:1e-10",
                        help="solver:rtol of the reference (Tsit5 is held by stability on "
                             "these flows: a tight rtol costs it about what a loose one does)")
    parser.add_argument("--cvode", default=None, help="states saved by benchmarks.stiff_cvode")
    parser.add_argument("--out", default=str(ROOT / "benchmarks"))
    args = parser.parse_args(argv)
    rtols = [float(x) for x in args.rtols.split(",") if x]
    results = {}
    for workload in args.workloads.split(","):
        name, overrides = WORKLOADS[workload]
        ref_solver, ref_rtol = args.reference.split(":")
        print(f"[{workload}] reference: {ref_solver} at rtol {ref_rtol}", flush=True)
        reference = gflow_run(name, overrides, ref_solver, float(ref_rtol), warm=False,
                              repeats=1)
        runs = []
        for rtol in rtols:
            runs.append(score(gflow_run(name, overrides, "auto", rtol), reference))
            print(public(runs[-1]), flush=True)
        for rtol in [float(x) for x in args.tsit5_rtols.split(",") if x]:
            runs.append(score(gflow_run(name, overrides, "tsit5", rtol), reference))
            print(public(runs[-1]), flush=True)
        if args.cvode:
            for run in np.load(args.cvode, allow_pickle=True)["runs"]:
                runs.append(score(dict(run), reference))
                print(public(runs[-1]), flush=True)
        results[workload] = dict(reference=public(reference), runs=[public(r) for r in runs])
    out = Path(args.out)
    command = "python -m benchmarks.stiff " + " ".join(argv if argv is not None else sys.argv[1:])
    payload = dict(command=command, machine=machine(), workloads=results)
    (out / "stiff.json").write_text(json.dumps(payload, indent=1))
    _summary(out / "stiff.md", payload)


def _summary(path: Path, payload: dict) -> None:
    lines = ["# Stiff flows: gflow auto (Tsit5 ↔ matrix-free ESDIRK) against stiff solvers", "",
             f"Command: `{payload['command']}`  ", f"Machine: {payload['machine']}", ""]
    for workload, data in payload["workloads"].items():
        lines += [f"## {workload}", ""]
        rows = []
        for r in data["runs"]:
            rows.append([r["method"], f"{r['rtol']:.0e}", r["cost"],
                         round(r.get("cost_bound", r["cost"])), r["rejected"],
                         f"{r['state_error']:.2e}" if r.get("state_error") is not None else "",
                         f"{r['wall_s']:.2f}", r.get("switches", "")])
        lines.append(markdown_table(
            ["method", "rtol", "cost", "cost bound", "rejected", "state error", "wall s",
             "switches"], rows))
        lines.append("")
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
