"""SUNDIALS CVODE (BDF, matrix-free SPGMR whose Jacobian-times-vector is the same JAX
Hessian-vector product gflow uses) on a gflow preset's flow: the trusted stiff solver of
`benchmarks.stiff`. Needs SUNDIALS' official `sundials4py` bindings, hence Python >= 3.12:

    $(pyenv root)/versions/3.12.1/bin/python3.12 -m venv /work/venv312
    /work/venv312/bin/pip install jax diffrax equinox optimistix lineax numpy scipy \\
        matplotlib tqdm threadpoolctl jaxtyping tomli-w sundials4py
    PYTHONPATH=. /work/venv312/bin/python -m benchmarks.stiff_cvode --rtols 1e-4,1e-6 \\
        --out /tmp/cvode.npz

It saves, per rtol, the flat state at the preset's save times and at t1, the right-hand-side
and Jacobian-times-vector evaluations (cost = rhs + 2 × jtimes, as gflow's), CVODE's step,
Newton and Krylov counts, and the wall time; `python -m benchmarks.stiff --cvode FILE` scores
them against the same reference as gflow's runs.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from gflow import presets


WORKLOADS = {"deep-linear-1e4": ("deep-linear", ["solve.t1=1e4"])}


def cvode_run(name: str, overrides: list[str], rtol: float) -> dict:
    from sundials4py import core, cvodes as cv

    resolved = presets.resolve(name, ["solve.certify=false", *overrides])
    settings, problem = resolved.solve, presets.build(resolved)
    flow = problem.flow
    y0, unravel = ravel_pytree(flow.params)
    y0 = np.asarray(y0, dtype=np.float64)
    f = jax.jit(lambda y: ravel_pytree(flow.velocity(unravel(y)))[0])
    jv = jax.jit(lambda y, v: jax.jvp(f, (y,), (v,))[1])
    f(jnp.asarray(y0)).block_until_ready()
    jv(jnp.asarray(y0), jnp.asarray(y0)).block_until_ready()
    # gflow's default atol: rtol times the initial RMS of the smallest non-zero parameter group
    # (benchmarks._workload.initial_rms, which imports optax: not needed here).
    sizes = [float(np.sqrt(np.mean(np.square(np.asarray(x)))))
             for x in jax.tree_util.tree_leaves(flow.params)]
    atol = rtol * min(s for s in sizes if s > 0)
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
    cv.CVodeInit(mem.get(), rhs, float(settings.t0), y)
    cv.CVodeSStolerances(mem.get(), rtol, atol)
    ls = core.SUNLinSol_SPGMR(y, core.SUN_PREC_NONE, 0, ctx)
    cv.CVodeSetLinearSolver(mem.get(), ls, None)
    cv.CVodeSetJacTimes(mem.get(), None, jtimes)
    cv.CVodeSetMaxNumSteps(mem.get(), 10**7)
    ts = np.asarray(settings.save_times())
    yout = core.N_VNew_Serial(n, ctx)
    states = []
    begin = time.perf_counter()
    for t in ts:
        if t <= settings.t0:
            states.append(y0.copy())
            continue
        flag, _ = cv.CVode(mem.get(), float(t), yout, cv.CV_NORMAL)
        if flag < 0:
            raise RuntimeError(f"CVODE failed with flag {flag} at t={t}")
        states.append(np.array(core.N_VGetArrayPointer(yout)))
    wall = time.perf_counter() - begin
    steps = cv.CVodeGetNumSteps(mem.get())[1]
    newton = cv.CVodeGetNumNonlinSolvIters(mem.get())[1]
    krylov = cv.CVodeGetNumLinIters(mem.get())[1]
    return dict(
        method="CVODE BDF+GMRES", solver="cvode", rtol=rtol, status="completed",
        cost=counts["rhs"] + 2 * counts["jtimes"], cost_bound=counts["rhs"] + 2 * counts["jtimes"],
        gradients=counts["rhs"], hvps=counts["jtimes"], steps=int(steps), rejected=None,
        newton_iterations=int(newton), krylov_iterations=int(krylov), wall_s=wall,
        transitions={}, _states=np.stack(states), _final=states[-1], _ts=ts,
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="deep-linear-1e4")
    parser.add_argument("--rtols", default="1e-4,1e-5,1e-6,1e-7,1e-8")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    name, overrides = WORKLOADS[args.workload]
    runs = []
    for rtol in [float(x) for x in args.rtols.split(",") if x]:
        runs.append(cvode_run(name, overrides, rtol))
        print({k: v for k, v in runs[-1].items() if not k.startswith("_")}, flush=True)
    np.savez(args.out, runs=np.array(runs, dtype=object))


if __name__ == "__main__":
    main()
