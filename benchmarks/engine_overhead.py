"""`gflow.solve` against bare `diffrax.diffeqsolve` on a small flow: what the engine costs per
step over diffrax itself.

The problem: a two-layer 16×16×16 linear network, loss ½‖W2 W1 − M‖² with M of rank 4
(singular values 4, 2, 1, 0.5), init 1e-3·N(0, 1); Tsit5, rtol 1e-8, atol 1e-10, 101 save
times observing the loss, t1 = 50. Bare diffrax gets the same solver, `PIDController(rtol,
atol)` and `SaveAt(ts=..., fn=loss)`, compiled ahead of time. Calls alternate in one process so
that other jobs on the machine disturb both alike; the minimum and median of each are printed
and written to `benchmarks/engine_overhead.json` with the machine.

The same calls at a longer flow (t1 = 400, 101 save times again) separate the two costs: the
slope of the time over the steps between the two lengths is the cost per step (the compiled
program's), the intercept the cost per call (the host's work and the program's fixed part).

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

from ._harness import machine, median_and_quartiles
from .results_page import RESULTS_DIR, rows_directory, write_suite

RTOL, ATOL, T1, N_TS = 1e-8, 1e-10, 50.0, 101
T1_LONG = 400.0


class _TwoLayer(eqx.Module):
    w1: jax.Array
    w2: jax.Array


def _loss(model, target):
    return 0.5 * jnp.sum(jnp.square(model.w2 @ model.w1 - target))


def problem(seed: int = 0, t1: float = T1):
    """The flow, and its save times up to `t1`."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((16, 16)))
    v, _ = np.linalg.qr(rng.standard_normal((16, 16)))
    s = np.zeros(16)
    s[:4] = [4.0, 2.0, 1.0, 0.5]
    target = jnp.asarray(u @ np.diag(s) @ v.T)
    model = _TwoLayer(jnp.asarray(1e-3 * rng.standard_normal((16, 16))),
                      jnp.asarray(1e-3 * rng.standard_normal((16, 16))))
    return gflow.GradientFlow(model, _loss, target), np.linspace(0.0, t1, N_TS)


def _bare(flow, ts):
    """Bare diffrax on the same problem (until the last save time), compiled: a function of
    the initial state."""
    term = diffrax.ODETerm(lambda t, y, args: flow.velocity(y))
    saveat = diffrax.SaveAt(ts=jnp.asarray(ts), fn=lambda t, y, args: flow.loss(
        flow.combine(y), flow.data))

    @jax.jit
    def run(y0):
        sol = diffrax.diffeqsolve(
            term, diffrax.Tsit5(), 0.0, float(ts[-1]), None, y0, saveat=saveat,
            stepsize_controller=diffrax.PIDController(rtol=RTOL, atol=ATOL),
            max_steps=100_000, throw=False)
        return sol.ys, sol.stats["num_steps"]

    return run


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default=str(Path(__file__).with_name("engine_overhead.json")))
    parser.add_argument("--report-only", action="store_true",
                        help="write the results page's suite from --out's JSON, measure nothing")
    args = parser.parse_args(argv)
    if args.report_only:
        result = json.loads(Path(args.out).read_text())
        write_results(result, rows_directory(args.out))
        return result
    calls = {}
    for length in (T1, T1_LONG):
        flow, ts = problem(t1=length)
        bare = _bare(flow, ts)

        def run_gflow(flow=flow, ts=ts, length=length):
            traj = gflow.solve(flow, length, solver="tsit5", rtol=RTOL, atol=ATOL, ts=ts)
            jax.block_until_ready(traj.observables["loss"])
            return traj

        def run_bare(bare=bare, y0=flow.params):
            out = bare(y0)
            jax.block_until_ready(out)
            return out

        traj = run_gflow()
        ys, steps = run_bare()
        np.testing.assert_allclose(np.asarray(traj.observables["loss"]), np.asarray(ys),
                                   rtol=1e-9)
        calls[length] = dict(gflow=run_gflow, bare=run_bare,
                             steps=dict(gflow=traj.stats["num_steps"], bare=int(steps)))
    times = {(name, length): [] for length in calls for name in ("gflow", "bare")}
    cpu = {key: [] for key in times}
    for _ in range(args.repeats):
        for name, length in times:
            fn = calls[length][name]
            begin, begin_cpu = time.perf_counter(), time.process_time()
            fn()
            times[(name, length)].append(time.perf_counter() - begin)
            cpu[(name, length)].append(time.process_time() - begin_cpu)
    split, rounds = {}, {}
    for name in ("gflow", "bare"):
        n0, n1 = calls[T1]["steps"][name], calls[T1_LONG]["steps"][name]
        s0, s1 = min(times[(name, T1)]), min(times[(name, T1_LONG)])
        per_step = (s1 - s0) / (n1 - n0)
        split[name] = dict(steps=[n0, n1], us_per_step=1e6 * per_step,
                           per_call_ms=1e3 * (s0 - per_step * n0))
        rounds[name] = (np.asarray(times[(name, T1_LONG)])
                        - np.asarray(times[(name, T1)])) / (n1 - n0)
    # Per round (the four calls side by side), as a measure of the machine's noise.
    paired = rounds["gflow"] / rounds["bare"]
    split["per_step_ratio_paired"] = median_and_quartiles(paired)
    steps = calls[T1]["steps"]
    times = {name: times[(name, T1)] for name in ("gflow", "bare")}
    cpu = {name: cpu[(name, T1)] for name in ("gflow", "bare")}
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
        steps=steps,
        repeats=args.repeats,
        per_step_and_call=dict(t1=[T1, T1_LONG], **split,
                               per_step_ratio=split["gflow"]["us_per_step"]
                               / split["bare"]["us_per_step"]),
        times=summary,
        ratio_min=summary["gflow"]["min_ms"] / summary["bare"]["min_ms"],
        ratio_median=summary["gflow"]["median_ms"] / summary["bare"]["median_ms"],
        cpu_ratio_min=summary["gflow"]["cpu_min_ms"] / summary["bare"]["cpu_min_ms"],
        cpu_ratio_median=summary["gflow"]["cpu_median_ms"] / summary["bare"]["cpu_median_ms"],
    )
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    write_results(result, rows_directory(args.out))
    for name, s in summary.items():
        print(f"{name:6s} min {s['min_ms']:.2f} ms  median {s['median_ms']:.2f} ms  "
              f"(CPU min {s['cpu_min_ms']:.2f}, median {s['cpu_median_ms']:.2f})")
    print(f"steps gflow {result['steps']['gflow']} bare {result['steps']['bare']}; "
          f"ratio min {result['ratio_min']:.2f} median {result['ratio_median']:.2f}; CPU "
          f"{result['cpu_ratio_min']:.2f} / {result['cpu_ratio_median']:.2f}")
    return result


SUITE = "engine-overhead"


def write_results(result: dict, directory: Path = RESULTS_DIR) -> Path:
    """The results page's rows from one run's JSON: `gflow.solve` over bare diffrax, by wall
    and by CPU time (the steadier on a shared machine), against issue 29's target."""
    t = result["times"]
    rows = [
        dict(quantity="gflow.solve / bare diffeqsolve, CPU time (min over calls)",
             value=result["cpu_ratio_min"], unit="×", target="≤ 1.1",
             verdict="met" if result["cpu_ratio_min"] <= 1.1 else "not met",
             detail=f"{t['gflow']['cpu_min_ms']:.1f} against {t['bare']['cpu_min_ms']:.1f} ms; "
                    f"median of calls {result['cpu_ratio_median']:.2f}×"),
        dict(quantity="gflow.solve / bare diffeqsolve, wall time (median over calls)",
             value=result["ratio_median"], unit="×",
             detail=f"{t['gflow']['median_ms']:.1f} against {t['bare']['median_ms']:.1f} ms; "
                    f"minima {t['gflow']['min_ms']:.1f} and {t['bare']['min_ms']:.1f} ms"),
    ]
    parts = result.get("per_step_and_call")
    if parts:
        g, b, paired = parts["gflow"], parts["bare"], parts["per_step_ratio_paired"]
        rows += [
            dict(quantity="gflow.solve / bare diffeqsolve, per step (the compiled program)",
                 value=parts["per_step_ratio"], unit="×",
                 detail=f"{g['us_per_step']:.1f} against {b['us_per_step']:.1f} µs: the slope "
                        f"of the minima between t1 = {parts['t1'][0]:g} and "
                        f"{parts['t1'][1]:g} ({g['steps'][0]} → {g['steps'][1]} steps); per "
                        f"round median {paired['median']:.3f}, quartiles "
                        f"{paired['quartiles'][0]:.3f}–{paired['quartiles'][1]:.3f}"),
            dict(quantity="gflow.solve − bare diffeqsolve, per call (host work and the "
                          "program's fixed part)",
                 value=g["per_call_ms"] - b["per_call_ms"], unit="ms",
                 detail=f"the intercepts of the same fit: {g['per_call_ms']:.2f} against "
                        f"{b['per_call_ms']:.2f} ms"),
        ]
    rows += [
        dict(quantity="steps taken (gflow.solve, bare diffrax)",
             value=f"{result['steps']['gflow']}, {result['steps']['bare']}",
             verdict="equal" if result["steps"]["gflow"] == result["steps"]["bare"]
             else "differ"),
    ]
    p = result["problem"]
    return write_suite(
        SUITE, title="`gflow.solve` against bare diffrax on a small flow",
        command=result["command"].strip(), machine=result["machine"], rows=rows,
        directory=directory,
        summary=f"A {p['width']}×{p['width']}×{p['width']} two-layer linear network (target of "
                f"rank {p['rank']}), {p['solver']}, rtol {p['rtol']:g}, atol {p['atol']:g}, "
                f"t1 = {p['t1']:g}, {p['save_times']} save times observing the loss; "
                f"{result['repeats']} interleaved calls of each in one process. The bare call "
                "gets the same solver, controller and observed save times, compiled ahead of "
                "time. On a machine shared with other jobs only the CPU-time ratio means "
                "anything; rerun on an idle machine for the wall-time ratio.")


if __name__ == "__main__":
    main()
