"""Stiffness of the default preset: are its steps set by accuracy or by stability?

    python -m benchmarks.studies.stiffness [--points 24] [--methods tsit5:1e-6,bosh3:1e-6,...]
                                   [--reference 1e-10]

The default preset (`rank-collapse`, Chen & Luo's experiment) is solved with the preset's
solver and PI controller; along the accepted steps, the sharpness `λ_max` of the loss Hessian
(`gflow.observers.hessian_extremes`, LOBPCG on Hessian-vector products) is measured at
`--points` step ends and printed beside the step size `h`. An explicit method whose steps sit
at `h λ_max ≈` its stability interval (Tsit5: about 3.5 on the negative real axis) is held by
stability, not by accuracy: a tighter tolerance then costs few more steps. The second table
says what that buys: evaluations and the largest relative state error over the preset's save
times against Tsit5 at `--reference`, for each `solver:rtol` of `--methods` (under the
preset's PI controller). Lower-order methods reach further along the real axis per evaluation
(Bogacki–Shampine 3(2): about 2.5 in 3 evaluations, Heun: 2 in 2, against Tsit5's 3.5 in 6),
so where stability holds the steps they might cost less; the table says at what accuracy.
"""

import argparse
import time

import diffrax
import equinox as eqx
import jax
import jax.flatten_util
import numpy as np

import gflow
from gflow import presets

from .._workload import flat_state_observer


def _setup():
    resolved = presets.resolve(presets.DEFAULT_PRESET, ["solve.certify=false"])
    problem = presets.build(resolved)
    return resolved.solve, problem.flow


def _solve(flow, settings, rtol, saveat, max_steps=None):
    controller = gflow.pid_controller(flow, rtol, None, t0=settings.t0, t1=settings.t1,
                                      pcoeff=settings.pcoeff, icoeff=settings.icoeff)

    @eqx.filter_jit
    def run(flow, y0):
        return diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, y, flow: flow.velocity(y)), diffrax.Tsit5(),
            settings.t0, settings.t1, None, y0, args=flow, saveat=saveat,
            stepsize_controller=controller, max_steps=max_steps or settings.max_steps,
        )

    begin = time.perf_counter()
    sol = run(flow, flow.params)
    jax.block_until_ready(sol.ys)
    return sol, time.perf_counter() - begin


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=24)
    parser.add_argument("--methods",
                        default="tsit5:1e-6,tsit5:1e-8,bosh3:1e-6,bosh3:1e-5,heun:1e-6",
                        help="solver:rtol pairs for the second table (gflow solver names)")
    parser.add_argument("--reference", type=float, default=1e-10)
    args = parser.parse_args(argv)
    settings, flow = _setup()
    n_params = jax.flatten_util.ravel_pytree(flow.params)[0].size
    assert sum(w.size for w in _trainable(flow.model)) == n_params, "the preset's trainable set"
    print(f"default preset: {n_params} parameters, "
          f"t1 = {settings.t1:g}, Tsit5, rtol {settings.rtol:g}, PI control "
          f"({settings.pcoeff}, {settings.icoeff})")

    if args.points:  # 0: the second table alone
        # Saving every step allocates max_steps states: a bound above the preset's ~1,200 steps.
        sol, wall = _solve(flow, settings, settings.rtol, diffrax.SaveAt(steps=True), 4096)
        accepted = int(sol.stats["num_accepted_steps"])
        ts = np.asarray(sol.ts)[:accepted]
        steps = np.diff(np.concatenate([[settings.t0], ts]))
        sharpness = eqx.filter_jit(gflow.observers.hessian_extremes(flow.loss, _trainable))
        print(f"\n{accepted} accepted, {int(sol.stats['num_rejected_steps'])} rejected steps "
              f"({wall:.1f} s with compilation)\n")
        print("| t | step h | λ_max | h λ_max |\n|---|---|---|---|")
        products = []
        # The first and last steps are set by the start (0.01) and by t1's clipping.
        for i in np.unique(np.linspace(1, accepted - 2, args.points).astype(int)):
            y = jax.tree_util.tree_map(lambda leaf: leaf[i], sol.ys)
            lam = float(sharpness(flow.combine(y), flow.data)[0])
            products.append(steps[i] * lam)
            print(f"| {ts[i]:.4g} | {steps[i]:.4g} | {lam:.4g} | {steps[i] * lam:.3g} |")
        print(f"\nh λ_max over these steps: {min(products):.3g} … {max(products):.3g} "
              f"(median {np.median(products):.3g})\n")

    save = settings.save_times()
    # Built once: gflow caches compiled programs by observer identity.
    state = flat_state_observer(flow)
    ref = _states(flow, settings, "tsit5", args.reference, save, state)[0]
    print(f"| method | rtol | steps | evaluations | largest relative state error (reference "
          f"Tsit5 at rtol {args.reference:g}) |\n|---|---|---|---|---|")
    for method in args.methods.split(","):
        solver, rtol = method.split(":")
        ys, stats = _states(flow, settings, solver, float(rtol), save, state)
        error = np.max(np.linalg.norm(ys - ref, axis=1) / np.linalg.norm(ref, axis=1))
        print(f"| {solver} | {float(rtol):g} | {stats['num_steps']} "
              f"| {stats['vector_field_evaluations']} | {error:.3g} |")


def _states(flow, settings, solver, rtol, save, state):
    """The trainable state at the save times (rows) of `gflow.solve` with `solver` at `rtol`
    under the preset's PI controller, and the solve's stats."""
    controller = gflow.pid_controller(flow, rtol, None, t0=settings.t0, t1=settings.t1,
                                      pcoeff=settings.pcoeff, icoeff=settings.icoeff)
    traj = gflow.solve(flow, settings.t1, t0=settings.t0, solver=solver, ts=save,
                       stepsize_controller=controller, max_steps=settings.max_steps,
                       observers={"state": state})
    return np.asarray(traj.observables["state"]), traj.stats


def _trainable(model):
    # The preset's trainable weights (its embeddings and readout are frozen).
    return (model.W_Q, model.W_K, model.W_V, model.W1, model.W2)


if __name__ == "__main__":
    main()
