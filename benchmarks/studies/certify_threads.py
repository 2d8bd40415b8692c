"""What certify's two concurrent solves cost when their LAPACK calls share the cores, against
each calling it with every core.

`gflow.solve(certify=True)` runs the reference solve on a second thread. The observers' and
conditions' SVDs go to SciPy's OpenBLAS, which starts a pool of every core per call; two
solves at once then run twice the threads the machine has. gflow limits each solve to its
share of the cores while both run (`threadpoolctl`). This times, in one process, calls
alternating:

- `shared`: `gflow.solve(certify=True)` as shipped;
- `every core`: the same with that limit removed (private API, on purpose: it is the one
  thing compared);
- `alone`: `gflow.solve(certify=False)`, the run without its reference.

on the default preset (`rank-collapse`, its observers, transitions and PI control) up to
`--t1` (default 300: 200 save times, observers dominate; the full preset is t1 = 1500).

Run: `python -m benchmarks.studies.certify_threads [--t1 T] [--repeats N]`.
"""

import argparse
import contextlib
import time

import jax
import numpy as np
import threadpoolctl

import gflow
import gflow.presets
from gflow import _solve
from gflow.presets import _solve_arguments


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--t1", type=float, default=300.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    resolved = gflow.presets.resolve("rank-collapse", [f"solve.t1={args.t1}"])
    problem = gflow.presets.build(resolved)
    kwargs = _solve_arguments(problem, resolved.solve)
    ts = resolved.solve.save_times()
    shared_by = _solve._cores_shared_by

    def solve(certify):
        return gflow.solve(problem.flow, ts=ts, certify=certify, **kwargs)

    def every_core():
        _solve._cores_shared_by = lambda solves: contextlib.nullcontext()
        try:
            return solve(True)
        finally:
            _solve._cores_shared_by = shared_by

    calls = {"shared": lambda: solve(True), "every core": every_core,
             "alone": lambda: solve(False)}
    first = {name: call() for name, call in calls.items()}  # compiles; checks agreement
    # The same numbers either way (nan: a transition after t1).
    np.testing.assert_array_equal(list(first["shared"].transitions.values()),
                                  list(first["every core"].transitions.values()))
    walls = {name: [] for name in calls}
    for _ in range(args.repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            walls[name].append(time.perf_counter() - start)
    pools = [(p["internal_api"], p["num_threads"]) for p in threadpoolctl.threadpool_info()]
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, BLAS pools {pools}, t1 "
          f"{args.t1:g}, steps {first['alone'].stats['num_steps']} (reference "
          f"{first['shared'].errors['reference_stats']['num_steps']}), repeats {args.repeats}")
    for name in calls:
        print(f"{name:10s} wall min {min(walls[name]):7.2f} s, median "
              f"{float(np.median(walls[name])):7.2f} s")
    print(f"every core / shared: {min(walls['every core']) / min(walls['shared']):.2f}; "
          f"shared / alone: {min(walls['shared']) / min(walls['alone']):.2f}")


if __name__ == "__main__":
    main()
