"""Issue 6's benchmark: throughput of a 64-member sweep on CPU.

Members: the two-layer 16×16×16 linear network of workload (a) (target singular values 4, 3,
2, 1; its four half-rise times are the transitions), 8 init scales ε from 1e-2 to 1e-5 times
8 init seeds. Every member is solved with Tsit5 at rtol 1e-8 to t1 = 16, its transitions
located, only the final state observed. Compared: `gflow.sweep` with `batch="map"`, `"vmap"`
and `"loop"`, and a Python loop of 64 `gflow.solve` calls (what a user writes without
`sweep`). Compilation is timed separately: the first call of each compiles, the following
calls reuse the program.
"""

import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import gflow
from gflow.models import DeepLinear, deep_linear_loss, whitened_target

from ._harness import best_time

WIDTH = 16
SINGULAR_VALUES = (4.0, 3.0, 2.0, 1.0)
T1 = 16.0
RTOL = 1e-8
BATCHES = ("map", "vmap", "loop")


def full_settings() -> dict:
    return dict(eps=tuple(np.geomspace(1e-2, 1e-5, 8)), seeds=tuple(range(8)), repeats=3,
                batches=BATCHES)


def quick_settings() -> dict:
    return dict(eps=(1e-2, 1e-4), seeds=(0, 1), repeats=1, batches=("map",))


def _problem() -> tuple[Callable, tuple]:
    """`make_flow(eps, seed)` and the transitions, built once so every member shares the same
    loss and condition functions (one compiled program for all)."""
    target = whitened_target(np.asarray(SINGULAR_VALUES), (WIDTH, WIDTH), jax.random.key(0))

    def make_flow(eps, seed):
        model = DeepLinear.random((WIDTH,) * 3, eps, jax.random.key(1000 + int(seed)))
        return gflow.GradientFlow(model, deep_linear_loss, target)

    transitions = tuple(
        gflow.Transition(
            f"mode{k + 1}_learned",
            lambda m, d, k=k, half=s / 2: jnp.linalg.svd(m.product(), compute_uv=False)[k] - half,
            direction=True,
        )
        for k, s in enumerate(SINGULAR_VALUES)
    )
    return make_flow, transitions


def run(settings: dict, log) -> dict:
    make_flow, transitions = _problem()
    points = [dict(eps=float(e), seed=int(s)) for e in settings["eps"] for s in settings["seeds"]]
    names = [tr.name for tr in transitions]
    repeats = settings["repeats"]
    log(f"sweep: {len(points)} members, tsit5 rtol={RTOL:g}, t1={T1:g}")

    def solve_loop():
        trajs = [gflow.solve(make_flow(**p), T1, rtol=RTOL, ts=np.asarray([T1]),
                             transitions=transitions) for p in points]
        return trajs

    rows = []
    start = time.perf_counter()
    first = solve_loop()
    first_wall = time.perf_counter() - start
    timing = best_time(solve_loop, repeats=repeats, budget_s=0.0 if repeats == 1 else 60.0)
    trajs = timing.outputs[-1]
    expected = np.array([[t.transitions[n] for n in names] for t in trajs])
    rows.append(dict(
        method="Python loop of gflow.solve",
        compile_seconds=first[0].stats["compile_seconds"],
        first_call=first_wall,
        wall=timing.wall, wall_median=timing.wall_median, cpu=timing.cpu, runs=timing.runs,
        in_program=min(sum(t.stats["run_seconds"] for t in ts) for ts in timing.outputs),
        completed=sum(t.status == "completed" for t in trajs),
        steps=sum(t.stats["num_steps"] for t in trajs),
        max_difference=0.0,
    ))
    log(f"  solve loop: {timing.wall:.2f} s (compile {rows[-1]['compile_seconds']:.1f} s)")

    for batch in settings["batches"]:
        def call(batch=batch):
            return gflow.sweep(make_flow, {"eps": [p["eps"] for p in points],
                                           "seed": [p["seed"] for p in points]},
                               T1, mode="zip", batch=batch, rtol=RTOL, transitions=transitions)

        start = time.perf_counter()
        first = call()
        first_wall = time.perf_counter() - start
        timing = best_time(call, repeats=repeats, budget_s=0.0 if repeats == 1 else 60.0)
        result = timing.outputs[-1]
        got = np.array([[m.transitions[n] for n in names] for m in result.members])
        rows.append(dict(
            method=f'gflow.sweep(batch="{batch}")',
            compile_seconds=sum(g["compile_seconds"] for g in first.groups),
            first_call=first_wall,
            wall=timing.wall, wall_median=timing.wall_median, cpu=timing.cpu, runs=timing.runs,
            in_program=min(sum(g["run_seconds"] for g in s.groups) for s in timing.outputs),
            groups=len(result.groups),
            completed=sum(m.completed for m in result.members),
            steps=sum(m.stats["num_steps"] for m in result.members),
            max_difference=float(np.max(np.abs(got - expected))),
        ))
        log(f"  sweep {batch}: {timing.wall:.2f} s (compile {rows[-1]['compile_seconds']:.1f} s)")
    spread = expected.min(axis=0), expected.max(axis=0)
    member_steps = [t.stats["num_steps"] for t in trajs]
    return dict(
        members=len(points), eps=list(settings["eps"]), seeds=list(settings["seeds"]),
        t1=T1, rtol=RTOL, solver="tsit5", transitions=names,
        transition_range={n: (float(a), float(b)) for n, a, b in zip(names, *spread)},
        devices=[str(d) for d in jax.devices()], rows=rows,
        step_spread=max(member_steps) / min(member_steps),
        reached=int(np.isfinite(expected).sum()), finite=bool(np.all(np.isfinite(expected))),
        max_transition=float(np.nanmax(expected)) if np.isfinite(expected).any() else math.nan,
    )
