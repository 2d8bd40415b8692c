"""Issue 14's accelerator measurements, as a recipe to run where a GPU or TPU is available.

    python -m benchmarks.gpu --out gpu.json          # on the accelerator machine (minutes)
    python -m benchmarks.gpu --quick --out /tmp/g.json   # a smoke test of the recipe (CPU)

Measures, on whatever `jax.default_backend()` is:

1. the cost of one gradient evaluation of workload (b) (co-occurrence, 57,344 parameters),
   jitted, in float64 and in float32 (the same flow with every array cast);
2. one `gflow.solve` of (b) with `solver="auto"` in float64 (rtol 1e-8) and, through
   `precision=`, mixed and float32 (rtol 1e-5; a floor above it is recorded as the error):
   wall time, evaluations, and the wall time per evaluation inside the solver;
3. sweep throughput of `gflow.sweep` with `batch="vmap"` against `batch="loop"` at 64 and 256
   members (the deep-linear sweep of `benchmarks.sweep`: init scale × seed), compile excluded.
   The issue's goal: vmap ≥ 20× the loop's throughput at 256 members on a GPU.

Smoke-tested on CPU (`--quick`): there the float32 solve stops with the engine's error (a
float32 state under gflow's float64 default; recorded in the JSON, the rest goes on), so item 2's
float32 row needs the engine's float32 mode. Not run on an accelerator in the session that wrote it (no accelerator was lent); nothing here is tuned to a
result. Writes one JSON file and prints a Markdown summary for docs/results.md.
"""

import argparse
import json
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

import gflow

from . import cooccurrence
from . import sweep as sweep_benchmark
from ._harness import best_time, machine


def _cast(tree, dtype):
    return jtu.tree_map(
        lambda x: x.astype(dtype) if isinstance(x, jax.Array) and jnp.issubdtype(
            x.dtype, jnp.floating) else x, tree)


def evaluation_cost(flow: gflow.GradientFlow, repeats: int) -> dict:
    """Best wall time of one jitted velocity `-∇L` in float64 and float32."""
    out = {}
    for name, dtype in (("float64", jnp.float64), ("float32", jnp.float32)):
        f = _cast(flow, dtype)
        velocity = eqx.filter_jit(lambda flow, params: flow.velocity(params))
        params = f.params
        jax.block_until_ready(velocity(f, params))
        timing = best_time(lambda: jax.block_until_ready(velocity(f, params)),
                           repeats=repeats, budget_s=10.0)
        out[name] = dict(seconds=timing.wall, median_seconds=timing.wall_median)
    return out


def solve_cost(flow: gflow.GradientFlow, ts, t1: float, repeats: int) -> dict:
    out = {}
    for name, rtol in (("float64", 1e-8), ("mixed", 1e-5), ("float32", 1e-5)):
        call = lambda: gflow.solve(flow, t1, ts=ts, rtol=rtol, precision=name)  # noqa: E731
        try:
            first = call()
            timing = best_time(call, repeats=repeats, budget_s=30.0)
        except Exception as e:  # a dtype the engine refuses: record why, keep measuring
            out[name] = dict(error=str(e).splitlines()[0])
            continue
        traj = timing.outputs[-1]
        evals = traj.stats["vector_field_evaluations"]
        out[name] = dict(
            rtol=rtol, solver=traj.solver, status=traj.status, wall=timing.wall,
            compile=first.stats["compile_seconds"], evaluations=evals,
            seconds_per_evaluation=min(t.stats["run_seconds"] for t in timing.outputs) / evals,
        )
    return out


def sweep_throughput(members: int, repeats: int) -> dict:
    make_flow, transitions = sweep_benchmark._problem()
    side = int(round(np.sqrt(members)))
    eps = np.geomspace(1e-2, 1e-5, side)
    grid = [(float(e), int(s)) for e in eps for s in range(members // side)]
    over = {"eps": [g[0] for g in grid], "seed": [g[1] for g in grid]}
    out = {}
    for batch in ("vmap", "loop"):
        call = lambda batch=batch: gflow.sweep(  # noqa: E731
            make_flow, over, sweep_benchmark.T1, mode="zip", batch=batch,
            rtol=sweep_benchmark.RTOL, transitions=transitions)
        first = call()
        timing = best_time(call, repeats=repeats, budget_s=120.0)
        out[batch] = dict(
            members=len(grid), wall=timing.wall,
            compile=sum(g["compile_seconds"] for g in first.groups),
            members_per_second=len(grid) / timing.wall,
            completed=sum(m.status == "completed" for m in timing.outputs[-1].members),
        )
    out["vmap_over_loop"] = out["vmap"]["members_per_second"] / out["loop"]["members_per_second"]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the recipe")
    parser.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    args = parser.parse_args(argv)
    p = cooccurrence.build()
    ts = p.ts[:20] if args.quick else p.ts
    t1 = float(ts[-1]) if args.quick else p.t1
    repeats = 1 if args.quick else 5
    result = dict(
        machine=machine(), backend=jax.default_backend(),
        evaluation=evaluation_cost(p.flow, repeats),
        solve=solve_cost(p.flow, ts, t1, repeats),
        sweep={n: sweep_throughput(n, 1 if args.quick else 3)
               for n in ((4, 8) if args.quick else (64, 256))},
    )
    args.out.write_text(json.dumps(result, indent=1, default=str))
    print(f"backend {result['backend']}: one evaluation of (b) "
          + ", ".join(f"{k} {v['seconds'] * 1e3:.3f} ms" for k, v in result["evaluation"].items()))
    for k, v in result["solve"].items():
        print(f"  solve {k}: {v}")
    for n, v in result["sweep"].items():
        print(f"  sweep {n} members: vmap {v['vmap']['members_per_second']:.1f}/s, loop "
              f"{v['loop']['members_per_second']:.1f}/s, vmap/loop {v['vmap_over_loop']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
