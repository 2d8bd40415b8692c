"""A sweep of the default preset under `vmap` against `lax.map`, side by side in one process.

Members: `rank-collapse` at its default size (d = 64) for seeds 0 to 7, integrated to
t1 = 200 (past the condensation transition) with the preset's own solve settings (Tsit5,
rtol 1e-6, PI control 0.3/0.4), its transitions located and its save-time observers
recorded at the final state. Under `vmap` every member steps in lock-step and the batch
runs one branch of each transition `lax.switch`/`lax.cond` (the segment index is uniform
over the running members); under `lax.map` each member takes its own steps. The two are
compiled first (timed apart), then called alternately, so that other jobs on the machine
disturb both alike; the minimum per member of each is compared, with CPU time beside it.

Run: `python -m benchmarks.sweep_vmap [--members 8] [--t1 200] [--repeats 3]`; it writes
`benchmarks/results/sweep-vmap.json` (the results page's section).
"""

import argparse
import sys
import time

import numpy as np

import gflow
from gflow import presets

from ._harness import machine
from .results_page import write_suite

SUITE = "sweep-vmap"


def _make_problem(seed):
    return presets.build(presets.resolve("rank-collapse", [f"problem.seed={int(seed)}"]))


def run(members: int, t1: float, repeats: int) -> dict:
    solve = presets.resolve("rank-collapse", []).solve
    over = {"seed": list(range(members))}
    options = dict(solver=solve.solver, rtol=solve.rtol, pcoeff=solve.pcoeff,
                   icoeff=solve.icoeff, max_steps=solve.max_steps)
    out = dict(members=members, t1=t1, repeats=repeats, rtol=solve.rtol, solver=solve.solver)

    def call(batch):
        start, start_cpu = time.perf_counter(), time.process_time()
        result = gflow.sweep(_make_problem, over, t1, batch=batch, **options)
        return result, time.perf_counter() - start, time.process_time() - start_cpu

    first = {batch: call(batch) for batch in ("map", "vmap")}
    out["first_call_seconds"] = {b: first[b][1] for b in first}
    walls = {b: [] for b in first}
    cpus = {b: [] for b in first}
    results = {}
    for _ in range(repeats):
        for batch in ("map", "vmap"):
            results[batch], wall, cpu = call(batch)
            walls[batch].append(wall)
            cpus[batch].append(cpu)
    out["wall_seconds"], out["cpu_seconds"] = walls, cpus
    names = results["map"].transition_names
    times = {b: np.asarray([[m.transitions.get(n, np.nan) for n in names]
                            for m in results[b].members], dtype=float) for b in results}
    reached = np.isfinite(times["map"]) & np.isfinite(times["vmap"])
    out["transitions"] = names
    out["transitions_reached"] = int(np.sum(reached))
    out["transitions_same_reach"] = bool(np.array_equal(np.isfinite(times["map"]),
                                                        np.isfinite(times["vmap"])))
    diff = np.abs(times["map"] - times["vmap"])[reached] / np.abs(times["map"][reached])
    out["transition_time_max_relative_difference"] = float(np.max(diff)) if diff.size else 0.0
    out["steps"] = {b: [int(m.stats["num_steps"]) for m in results[b].members]
                    for b in results}
    out["status"] = {b: sorted({m.status for m in results[b].members}) for b in results}
    out["ratio_min_wall"] = min(walls["vmap"]) / min(walls["map"])
    out["ratio_min_cpu"] = min(cpus["vmap"]) / min(cpus["map"])
    return out


def write_results(result: dict, command: str) -> None:
    n = result["members"]
    per = {b: min(result["wall_seconds"][b]) / n for b in ("map", "vmap")}
    rows = [
        dict(quantity="vmap sweep / lax.map sweep, wall time per member (min over calls)",
             value=result["ratio_min_wall"], unit="×", target="≤ 1.5",
             verdict="met" if result["ratio_min_wall"] <= 1.5 else "not met",
             detail=f"{per['vmap']:.2f} against {per['map']:.2f} s a member; "
                    f"{result['repeats']} alternating calls of each"),
        dict(quantity="vmap sweep / lax.map sweep, CPU time (min over calls)",
             value=result["ratio_min_cpu"], unit="×",
             detail=f"{min(result['cpu_seconds']['vmap']):.1f} against "
                    f"{min(result['cpu_seconds']['map']):.1f} s"),
        dict(quantity="first call (compile and run), map and vmap",
             value=f"{result['first_call_seconds']['map']:.1f} s, "
                   f"{result['first_call_seconds']['vmap']:.1f} s"),
        dict(quantity="transition times, largest relative difference vmap / map",
             value=result["transition_time_max_relative_difference"],
             detail=f"{result['transitions_reached']} located in both; the same transitions "
                    f"reached: {'yes' if result['transitions_same_reach'] else 'no'}"),
        dict(quantity="steps per member under map (vmap)",
             value=", ".join(map(str, result["steps"]["map"])),
             detail="vmap: " + ", ".join(map(str, result["steps"]["vmap"]))),
    ]
    write_suite(
        SUITE, title="Sweeps under vmap: the default preset's transitions, one branch a batch",
        command=command, machine=machine(), rows=rows,
        summary=f"{n} members of `rank-collapse` (d = 64; seeds 0–{n - 1}) to t1 = "
                f"{result['t1']:g}, {result['solver']} at rtol {result['rtol']:g} with the "
                "preset's PI control, transitions located, the final state observed. "
                "`gflow.sweep(batch=\"vmap\")` against `batch=\"map\"`, alternating calls in one "
                "process after each has compiled. Under vmap every running member is in the "
                "same segment, so each transition's `lax.switch`/`lax.cond` runs one branch "
                "for the batch (`eqx.internal.unvmap_max`); the members still step in "
                "lock-step, so a batch costs its slowest member's steps.")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sweep_vmap",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--t1", type=float, default=200.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.members < 2 or not args.t1 > 0 or args.repeats < 1:
        print("--members must be >= 2, --t1 > 0 and --repeats >= 1", file=sys.stderr)
        return 2
    result = run(args.members, args.t1, args.repeats)
    command = "python -m benchmarks.sweep_vmap " + " ".join(
        sys.argv[1:] if argv is None else argv)
    write_results(result, command.strip())
    print({k: v for k, v in result.items() if k not in ("steps",)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
