"""Peak memory of a solve with 1000 save times against its number of steps (issue 7).

Each setting runs in a fresh process (`python -m benchmarks.memory SPEC`, SPEC a JSON
object): it builds the problem, compiles and runs a warm-up solve at a loose tolerance (few
steps; the same compiled program, since tolerances are arguments of it), reads the process's
peak RSS, runs the measured solve, and reads the peak RSS again. It prints one JSON line with
the step count, both peaks and the compiled program's `memory_analysis()`.

If a solve kept anything per step (a step history, a growing buffer), the peak would grow with
the steps: by at least the state size per step.
"""

import json
import math
import resource
import subprocess
import sys
import time

SAVE_TIMES = 1000
WARM_UP_RTOL = 1e-3


def full_settings() -> list[dict]:
    return (
        [dict(problem="deep-linear", t1=12.0, rtol=r) for r in (1e-4, 1e-7, 1e-10, 1e-12)]
        + [dict(problem="cooccurrence", t1=300.0, rtol=r) for r in (1e-4, 1e-8, 1e-11)]
        + [dict(problem="cooccurrence", t1=3000.0, rtol=1e-11)]
    )


def quick_settings() -> list[dict]:
    # Long enough that keeping a state per step would add several MB: at t1 = 4 (495 steps at
    # rtol 1e-11) a tenth of that was 190 KB, inside the allocator's page-level noise (200 KB
    # measured with nothing kept per step).
    return [dict(problem="deep-linear", t1=12.0, rtol=r) for r in (1e-4, 1e-12)]


def _peak_rss() -> int:
    """This process's peak resident set size so far, in bytes.

    `VmHWM` of /proc/self/status: the high-water mark of this process image, which starts
    afresh at `exec`. (`getrusage`'s `ru_maxrss` does not: a child forked from a large parent
    keeps the parent's peak through `exec`.)
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _memory_analysis(compiled) -> dict | None:
    """`memory_analysis()` of a compiled program (equinox wraps jax's `Compiled`)."""
    for candidate in (compiled, getattr(compiled, "compiled", None)):
        analyse = getattr(candidate, "memory_analysis", None)
        if analyse is None:
            continue
        stats = analyse()
        return {
            name: int(getattr(stats, f"{name}_size_in_bytes"))
            for name in ("temp", "argument", "output", "alias", "generated_code")
            if hasattr(stats, f"{name}_size_in_bytes")
        }
    return None


def child(spec: dict) -> dict:
    """One setting, measured in this (fresh) process."""
    start_rss = _peak_rss()
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import numpy as np

    import gflow
    import gflow.internal
    import gflow.presets

    from ._workload import initial_rms

    resolved = gflow.presets.resolve(spec["problem"], [f"solve.t1={spec['t1']}"])
    flow = gflow.presets.build(resolved).flow
    scale = initial_rms(flow.params)
    ts = gflow.linear_grid(0.0, spec["t1"], SAVE_TIMES)
    # Small observers: what the save grid holds is fixed (1000 × two numbers); only the step
    # count varies.
    observers = {"norm": lambda m, d: jnp.sqrt(sum(
        jnp.vdot(x, x) for x in jax.tree_util.tree_leaves(eqx.filter(m, eqx.is_inexact_array))
    ))}

    def solve(rtol):
        # Tsit5 at every rtol: one compiled program, and the step count spans what it does
        # ("auto" would switch to DOP853, another program, below rtol 1e-8).
        traj = gflow.solve(flow, spec["t1"], solver="tsit5", rtol=rtol, atol=rtol * scale,
                           ts=ts, observers=observers, max_steps=100_000)
        if traj.status != "completed":
            raise RuntimeError(f"{spec}: {traj.status} {traj.message}")
        return traj

    built_rss = _peak_rss()
    warm = solve(WARM_UP_RTOL)
    warm_rss = _peak_rss()
    start = time.perf_counter()
    traj = solve(spec["rtol"])
    seconds = time.perf_counter() - start
    peak_rss = _peak_rss()
    programs = gflow.internal.compiled_programs()
    analyses = [a for a in (_memory_analysis(c) for c in programs) if a is not None]
    return dict(
        spec,
        save_times=SAVE_TIMES,
        parameters=int(sum(np.size(x) for x in jax.tree_util.tree_leaves(flow.params))),
        steps=traj.stats["num_steps"],
        warm_up_steps=warm.stats["num_steps"],
        recompiled=traj.stats["compile_seconds"] > 0,
        solve_seconds=seconds,
        rss_start=start_rss,
        rss_built=built_rss,
        rss_after_warm_up=warm_rss,
        rss_peak=peak_rss,
        programs=len(programs),
        memory_analysis=analyses[0] if len(analyses) == 1 else analyses or None,
    )


def run(settings: list[dict], log) -> list[dict]:
    """Each setting in its own fresh process."""
    rows = []
    for spec in settings:
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.memory", json.dumps(spec)],
            capture_output=True, text=True, check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"memory child {spec} failed:\n{proc.stderr[-2000:]}")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
        log(f"  memory {spec['problem']} t1={spec['t1']:g} rtol={spec['rtol']:g}: "
            f"{row['steps']} steps, peak RSS {row['rss_peak'] / 2**20:.0f} MiB "
            f"(after warm-up {row['rss_after_warm_up'] / 2**20:.0f} MiB)")
    return rows


def verdict(rows: list[dict]) -> list[dict]:
    """Per problem: the spread of step counts and of peak RSS, against what keeping one state
    per step would add."""
    out = []
    for problem in dict.fromkeys(r["problem"] for r in rows):
        group = [r for r in rows if r["problem"] == problem]
        few, many = min(group, key=lambda r: r["steps"]), max(group, key=lambda r: r["steps"])
        state_bytes = 8 * group[0]["parameters"]
        spread = max(r["rss_peak"] for r in group) - min(r["rss_peak"] for r in group)
        # What the measured solve needed beyond the warm-up's few steps: zero if nothing
        # grows with the step count (the warm-up already touched every buffer).
        growth = max(r["rss_peak"] - r["rss_after_warm_up"] for r in group)
        per_step = state_bytes * (many["steps"] - few["steps"])
        analyses = {json.dumps(r["memory_analysis"], sort_keys=True) for r in group}
        wide_enough = many["steps"] >= 10 * few["steps"]
        out.append(dict(
            problem=problem,
            step_ratio=many["steps"] / max(few["steps"], 1),
            steps=(few["steps"], many["steps"]),
            rss_spread=spread,
            rss_growth_after_warm_up=growth,
            per_step_storage=per_step,
            same_program=len(analyses) == 1 and not any(r["recompiled"] for r in group),
            independent=(growth < 0.1 * per_step) if wide_enough else None,
        ))
    return out


if __name__ == "__main__":
    result = child(json.loads(sys.argv[1]))
    print(json.dumps({k: (v if not isinstance(v, float) or math.isfinite(v) else str(v))
                      for k, v in result.items()}))
