"""`gflow.solve` against bare `diffrax.diffeqsolve` on a small flow: what the engine costs per
step over diffrax itself.

The problem: a two-layer 16×16×16 linear network, loss ½‖W2 W1 − M‖² with M of rank 4
(singular values 4, 2, 1, 0.5), init 1e-3·N(0, 1); Tsit5, rtol 1e-8, atol 1e-10, 101 save
times observing the loss, t1 = 50. Bare diffrax gets the same solver, `PIDController(rtol,
atol)` and `SaveAt(ts=..., fn=loss)`, compiled ahead of time. Calls alternate in one process so
that other jobs on the machine disturb both alike; the minimum and median of each are printed
and written to `benchmarks/engine_overhead.json` with the machine.

Run: `python -m benchmarks.engine_overhead [--repeats N] [--out FILE]`; on a shared machine
pinned to one core with XLA's Eigen pool off (`XLA_FLAGS=--xla_cpu_multi_thread_eigen=false
taskset -c 1 ...`). CPU time of this process is recorded too: on a shared machine it is the
steadier measure.
"""

import argparse
import json
import time
from pathlib import Path

import gflow  # first: it sets EQX_ON_ERROR=nan before equinox is imported, for both sides

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._harness import machine

RTOL, ATOL, T1, N_TS = 1e-8, 1e-10, 50.0, 101


class _TwoLayer(eqx.Module):
    w1: jax.Array
    w2: jax.Array


def _loss(model, target):
    return 0.5 * jnp.sum(jnp.square(model.w2 @ model.w1 - target))


def problem(seed: int = 0):
    """The flow, and its save times."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((16, 16)))
    v, _ = np.linalg.qr(rng.standard_normal((16, 16)))
    s = np.zeros(16)
    s[:4] = [4.0, 2.0, 1.0, 0.5]
    target = jnp.asarray(u @ np.diag(s) @ v.T)
    model = _TwoLayer(jnp.asarray(1e-3 * rng.standard_normal((16, 16))),
                      jnp.asarray(1e-3 * rng.standard_normal((16, 16))))
    return gflow.GradientFlow(model, _loss, target), np.linspace(0.0, T1, N_TS)


def _bare(flow, ts):
    """Bare diffrax on the same problem, compiled: a function of the initial state."""
    term = diffrax.ODETerm(lambda t, y, args: flow.velocity(y))
    saveat = diffrax.SaveAt(ts=jnp.asarray(ts), fn=lambda t, y, args: flow.loss(
        flow.combine(y), flow.data))

    @jax.jit
    def run(y0):
        sol = diffrax.diffeqsolve(
            term, diffrax.Tsit5(), 0.0, T1, None, y0, saveat=saveat,
            stepsize_controller=diffrax.PIDController(rtol=RTOL, atol=ATOL),
            max_steps=100_000, throw=False)
        return sol.ys, sol.stats["num_steps"]

    return run


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default=str(Path(__file__).with_name("engine_overhead.json")))
    args = parser.parse_args(argv)
    flow, ts = problem()
    bare = _bare(flow, ts)
    y0 = flow.params

    def run_gflow():
        traj = gflow.solve(flow, T1, solver="tsit5", rtol=RTOL, atol=ATOL, ts=ts)
        jax.block_until_ready(traj.observables["loss"])
        return traj

    def run_bare():
        out = bare(y0)
        jax.block_until_ready(out)
        return out

    traj = run_gflow()
    ys, steps = run_bare()
    np.testing.assert_allclose(np.asarray(traj.observables["loss"]), np.asarray(ys), rtol=1e-9)
    times = {"gflow": [], "bare": []}
    cpu = {"gflow": [], "bare": []}
    for _ in range(args.repeats):
        for name, fn in (("gflow", run_gflow), ("bare", run_bare)):
            begin, begin_cpu = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - begin)
            cpu[name].append(time.process_time() - begin_cpu)
    summary = {
        name: dict(min_ms=1e3 * min(v), median_ms=1e3 * float(np.median(v)),
                   cpu_min_ms=1e3 * min(cpu[name]), cpu_median_ms=1e3 * float(np.median(cpu[name])))
        for name, v in times.items()
    }
    result = dict(
        command="python -m benchmarks.engine_overhead " + " ".join(argv or []),
        machine=machine(),
        problem=dict(width=16, rank=4, rtol=RTOL, atol=ATOL, t1=T1, save_times=N_TS,
                     solver="tsit5"),
        steps=dict(gflow=traj.stats["num_steps"], bare=int(steps)),
        repeats=args.repeats,
        times=summary,
        ratio_min=summary["gflow"]["min_ms"] / summary["bare"]["min_ms"],
        ratio_median=summary["gflow"]["median_ms"] / summary["bare"]["median_ms"],
        cpu_ratio_min=summary["gflow"]["cpu_min_ms"] / summary["bare"]["cpu_min_ms"],
        cpu_ratio_median=summary["gflow"]["cpu_median_ms"] / summary["bare"]["cpu_median_ms"],
    )
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for name, s in summary.items():
        print(f"{name:6s} min {s['min_ms']:.2f} ms  median {s['median_ms']:.2f} ms  "
              f"(CPU min {s['cpu_min_ms']:.2f}, median {s['cpu_median_ms']:.2f})")
    print(f"steps gflow {result['steps']['gflow']} bare {result['steps']['bare']}; "
          f"ratio min {result['ratio_min']:.2f} median {result['ratio_median']:.2f}; CPU "
          f"{result['cpu_ratio_min']:.2f} / {result['cpu_ratio_median']:.2f}")
    return result


if __name__ == "__main__":
    main()
