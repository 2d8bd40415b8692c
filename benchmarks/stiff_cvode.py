"""SUNDIALS CVODE (BDF, matrix-free SPGMR whose Jacobian-times-vector is the same JAX
Hessian-vector product gflow uses) on the stiff benchmark's workloads: the trusted stiff
solver of `benchmarks.stiff`. Needs SUNDIALS' official `sundials4py` bindings, hence
Python >= 3.12:

    $(pyenv root)/versions/3.12.1/bin/python3.12 -m venv /work/venv312
    /work/venv312/bin/pip install jax diffrax equinox optimistix lineax numpy scipy \\
        matplotlib tqdm threadpoolctl jaxtyping tomli-w sundials4py
    PYTHONPATH=. python -m benchmarks.stiff --workloads rank-collapse-stiff \\
        --write-starts /tmp/starts.npz                       # the started workloads' y0
    PYTHONPATH=. /work/venv312/bin/python -m benchmarks.stiff_cvode \\
        --workloads deep-linear-1e4,rank-collapse,rank-collapse-stiff \\
        --rtols 1e-5,1e-6,1e-7,1e-8 --starts /tmp/starts.npz --out /tmp/cvode.npz

A started workload (`rank-collapse-stiff`: the default preset's stiff phase) begins from the
state `benchmarks.stiff --write-starts` saved: its reference's state at the first save time
from t = 742 on, the state gflow's runs of that workload start from (`benchmarks.stiff`
checks that it is). Choose rtols whose errors bracket the gflow run compared with (CVODE's
error is far above its rtol on these flows: `benchmarks.stiff` says which were used). The output file holds one list `runs`, each run a dict naming its
`workload`, with, per rtol, the flat state at the workload's save times and at t1, the
right-hand-side and Jacobian-times-vector evaluations (cost = rhs + 2 × jtimes, as gflow's),
CVODE's step, Newton and Krylov counts, and the wall time. `python -m benchmarks.stiff
--cvode FILE[,FILE...]` scores them against the same reference as gflow's runs.
"""

import argparse
import sys
import time

import numpy as np

from ._stiff_workloads import STARTS, WORKLOADS, FlatFlow, read_starts, workload_flow


def cvode_run(problem: FlatFlow, rtol: float) -> dict:
    """CVODE BDF + SPGMR (no preconditioner) on `problem` at `rtol` and gflow's default atol,
    the states at `problem.ts`."""
    from sundials4py import core
    from sundials4py import cvodes as cv

    f, jv, y0 = problem.velocity, problem.jvp, problem.y0
    f(y0).block_until_ready()  # compile outside the timing
    jv(y0, y0).block_until_ready()
    counts = dict(rhs=0, jtimes=0)

    def rhs(t, y, ydot, _):
        core.N_VGetArrayPointer(ydot)[:] = np.asarray(f(core.N_VGetArrayPointer(y)))
        counts["rhs"] += 1
        return 0

    def jtimes(v, jv_out, t, y, fy, _, tmp):
        core.N_VGetArrayPointer(jv_out)[:] = np.asarray(
            jv(core.N_VGetArrayPointer(y), core.N_VGetArrayPointer(v)))
        counts["jtimes"] += 1
        return 0

    status, ctx = core.SUNContext_Create(0)
    n = y0.size
    y = core.N_VNew_Serial(n, ctx)
    core.N_VGetArrayPointer(y)[:] = y0
    mem = cv.CVodeCreate(cv.CV_BDF, ctx)
    cv.CVodeInit(mem.get(), rhs, problem.t0, y)
    cv.CVodeSStolerances(mem.get(), rtol, problem.atol(rtol))
    ls = core.SUNLinSol_SPGMR(y, core.SUN_PREC_NONE, 0, ctx)
    cv.CVodeSetLinearSolver(mem.get(), ls, None)
    cv.CVodeSetJacTimes(mem.get(), None, jtimes)
    cv.CVodeSetMaxNumSteps(mem.get(), 10**7)
    yout = core.N_VNew_Serial(n, ctx)
    states, status = [], "completed"
    begin = time.perf_counter()
    for t in problem.ts:
        if t <= problem.t0:
            states.append(y0.copy())
            continue
        flag, _ = cv.CVode(mem.get(), float(t), yout, cv.CV_NORMAL)
        if flag < 0:
            status = f"CVODE failed with flag {flag} at t={t}"
            break
        states.append(np.array(core.N_VGetArrayPointer(yout)))
    wall = time.perf_counter() - begin
    steps = cv.CVodeGetNumSteps(mem.get())[1]
    newton = cv.CVodeGetNumNonlinSolvIters(mem.get())[1]
    krylov = cv.CVodeGetNumLinIters(mem.get())[1]
    cost = counts["rhs"] + 2 * counts["jtimes"]
    return dict(
        method="CVODE BDF+GMRES", solver="cvode", rtol=rtol, status=status,
        cost=cost, cost_bound=cost, gradients=counts["rhs"], hvps=counts["jtimes"],
        steps=int(steps), rejected=None, newton_iterations=int(newton),
        krylov_iterations=int(krylov), wall_s=wall, transitions={},
        _states=np.stack(states), _final=states[-1], _ts=problem.ts[:len(states)],
        _t0=problem.t0, _y0=y0,
    )


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stiff_cvode",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="deep-linear-1e4",
                        help=f"comma-separated, of {', '.join(WORKLOADS)}")
    parser.add_argument("--rtols", default="1e-4,1e-5,1e-6,1e-7,1e-8")
    parser.add_argument("--starts", default=None,
                        help="the started workloads' (t0, y0), from python -m benchmarks.stiff "
                             f"--write-starts (needed for {', '.join(STARTS)})")
    parser.add_argument("--out", required=True, help="the .npz file to write")
    args = parser.parse_args(argv)
    workloads = [w for w in args.workloads.split(",") if w]
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        print(f"stiff_cvode: unknown workload(s) {', '.join(unknown)} (known: "
              f"{', '.join(WORKLOADS)})", file=sys.stderr)
        return 2
    starts = read_starts(args.starts) if args.starts else {}
    missing = [w for w in workloads if w in STARTS and w not in starts]
    if missing:
        print(f"stiff_cvode: no start for {', '.join(missing)}: pass --starts FILE from "
              "python -m benchmarks.stiff --write-starts FILE", file=sys.stderr)
        return 2
    rtols = [float(x) for x in args.rtols.split(",") if x]
    runs = []
    for workload in workloads:
        problem = workload_flow(workload, starts.get(workload))
        for rtol in rtols:
            runs.append(dict(cvode_run(problem, rtol), workload=workload))
            print({k: v for k, v in runs[-1].items() if not k.startswith("_")}, flush=True)
            # Keep what was computed if a later run fails or is stopped.
            np.savez(args.out, runs=np.array(runs, dtype=object))
    return 0


if __name__ == "__main__":
    sys.exit(main())
