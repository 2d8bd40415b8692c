"""Would a multistep method beat DOP853's evaluations? scipy's Adams methods at matched error.

    python -m benchmarks.studies.multistep [--only deep-linear|cooccurrence|rank-collapse]

Issue 14 asks for ≤ 0.7× scipy DOP853's gradient evaluations at every matched error. No
8th-order Runge–Kutta method can get there (`benchmarks.solvers`: an ideal step sequence
needs 0.6–0.8× DOP853's evaluations), so the other classical family is measured here:
variable-order, variable-step Adams methods, which spend one or two evaluations a step and
are the textbook answer to "fewest function evaluations" on smooth non-stiff problems.

On the workloads of `benchmarks.solvers` (same problems, save grids, atol = rtol × scale,
Dopri8 reference at rtol 1e-12 and the largest relative state error over the save grid), at
each rtol: scipy's DOP853 (`solve_ivp`), LSODA (`solve_ivp`; Adams up to order 12 while the
problem is non-stiff, BDF when it detects stiffness) and VODE's Adams method up to order 12
(`scipy.integrate.ode`, interpolating to each save time), all on one jitted JAX right-hand
side that counts its calls. Each multistep row's evaluations are divided by DOP853's
evaluations at the same error (interpolated log–log between DOP853's tolerances; '—' outside
them). LSODA is skipped on the co-occurrence workload: it allocates its stiff mode's dense
Jacobian up front (57,344² floats, 24.5 GiB). Evaluation counts and errors are deterministic;
no time is reported.
"""

import argparse
import warnings

import numpy as np
import scipy.integrate

from .. import cooccurrence, deep_linear, rank_collapse
from .._harness import interpolate_cost, markdown_table, relative_trajectory_error
from .._workload import _Counted, _jax_rhs, reference, scipy_solve

WORKLOADS = {
    "deep-linear": ("(a)", lambda: deep_linear.build(False),
                    (1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10, 1e-11, 1e-12)),
    "cooccurrence": ("(b)", cooccurrence.build, (1e-4, 1e-6, 1e-8, 1e-10, 1e-12)),
    "rank-collapse": ("(c)", rank_collapse.build, (1e-4, 1e-6, 1e-8, 1e-10, 1e-12)),
}
# LSODA's work array holds the stiff mode's dense Jacobian: more than this many unknowns
# would not fit in memory.
LSODA_MAX_SIZE = 10_000


def _vode_adams(rhs, y0, ts, rtol, atol) -> np.ndarray:
    solver = scipy.integrate.ode(rhs).set_integrator(
        "vode", method="adams", order=12, rtol=rtol, atol=atol, nsteps=10**7)
    solver.set_initial_value(y0, ts[0])
    return np.array([y0] + [solver.integrate(t) for t in ts[1:]])


def run(name: str) -> list[list[str]]:
    tag, build, rtols = WORKLOADS[name]
    p = build()
    ref = reference(p, 1e-12, separate_state=False)
    rhs, _ = _jax_rhs(p)
    y0 = np.asarray(ref.state[0])
    rows = {}
    for rtol in rtols:
        atol = p.atol(rtol)
        runs = {}
        counted = _Counted(rhs)
        sol = scipy_solve(counted, p, "DOP853", rtol, atol)
        runs["DOP853"] = (counted.count, sol.y.T)
        if p.size <= LSODA_MAX_SIZE:
            counted = _Counted(rhs)
            sol = scipy_solve(counted, p, "LSODA", rtol, atol)
            runs["LSODA"] = (counted.count, sol.y.T)
        counted = _Counted(rhs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            states = _vode_adams(counted, y0, p.ts, rtol, atol)
        runs["VODE Adams"] = (counted.count, states)
        rows[rtol] = {k: (n, relative_trajectory_error(s, ref.state)) for k, (n, s) in runs.items()}
        print(f"{tag} rtol {rtol:g}: " + ", ".join(
            f"{k} {n} evals, error {e:.2e}" for k, (n, e) in rows[rtol].items()), flush=True)
    dop = [(rows[r]["DOP853"][1], rows[r]["DOP853"][0]) for r in rtols]
    table = []
    for rtol in rtols:
        for method in ("LSODA", "VODE Adams"):
            if method not in rows[rtol]:
                continue
            n, e = rows[rtol][method]
            d = interpolate_cost([x[0] for x in dop], [x[1] for x in dop], e)
            table.append([f"{tag} {name}", f"{rtol:g}", method, f"{e:.2e}", str(n),
                          "—" if d is None else f"{d:.0f}", "—" if d is None else f"{n / d:.2f}"])
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=list(WORKLOADS))
    args = parser.parse_args(argv)
    table = []
    for name in ([args.only] if args.only else list(WORKLOADS)):
        table += run(name)
    print(markdown_table(["workload", "rtol", "method", "traj. error", "evals",
                          "DOP853 evals at that error", "ratio"], table))


if __name__ == "__main__":
    main()
