"""A one-shot accelerator probe: what a lent GPU (or TPU) says about a paper-size run.

    python -m benchmarks.gpu --out gpu.json                # on the accelerator (<= 10 min)
    python -m benchmarks.gpu --quick --out /tmp/g.json     # the recipe on CPU, small size
    python -m benchmarks.gpu --only gradient,instruments,estimate --budget 1200 --out cpu.json
                                                           # the paper's size on CPU
    ... --background-load 2 --out loaded.json             # the same beside 2 busy processes

The problem is the default preset `rank-collapse` at the paper's size (`problem.d=640`,
`problem.d_ff=1280`, `problem.n=1000`: 2.87 M parameters; `--quick`: d = 32, d_ff = 64,
n = 64). Sections, in order, each written to the JSON as soon as it is measured (a run cut
short keeps what it measured):

1. `environment`: device model, backend, versions, x64, default matmul precision, machine;
2. `gradient`: one jitted velocity `−∇L` in float64, float32 at the default matmul precision
   (TF32 on recent NVIDIA GPUs) and float32 at `"highest"`: best wall time, XLA's FLOP count
   (`cost_analysis`) and the achieved TFLOP/s, and the dtype the velocity came out in;
3. `linalg`: singular values at `d x d` and `d x d_ff` by each `jax.lax.linalg.SvdAlgorithm`
   the backend accepts, `eigh` of the `d x d` Gram matrix, `σ_max` by 16 Lanczos steps
   (`gflow.measures.spectral_norm`);
4. `instruments`: the observation of an ordinary save time, a snapshot, and both together
   (at a transition), each compiled as one program as the solve compiles it; each transition
   condition; each observer alone; in gradients (ratio to a gradient measured in the same
   process, alternating with it), with XLA's FLOP ratio, the observables' bytes per save time
   and per snapshot, and the snapshot with LAPACK on one thread (as solves run it) and on
   OpenBLAS's own pool;
5. `step_floor`: ms per step of `deep-linear` at rtol 1e-12 with `progress` off and on, per
   step (the slope between two lengths of the flow) and per solve (the intercept); and the
   bar's cost in its parts (per cut, per call, the host's own time), each resolvable where the
   whole is not;
6. `capped_solve`: the paper-size solve with its transitions and cheap observers, capped at 40
   steps: trace and compile seconds, ms per step, peak device memory; in float64 and under
   `precision="mixed"` (float32 gradients at the highest matmul precision, float64 state);
7. `sweep`: members per second of `gflow.sweep` under `vmap`, `map` and `loop` at 64 and 256
   members (`--quick`: 4) of `benchmarks.sweep`'s deep-linear problem;
8. `certify`: a small `deep-linear` solve with `certify` off and on;
9. `checkpoint`: the same solve writing a checkpoint every 20 steps, then resumed from it;
10. `estimate`: the whole default run at this size extrapolated from the numbers above (its
    assumptions are written beside it).

Unless `--quick`, the results page's rows go to `benchmarks/results/probe-<out's stem>.json` for
an `--out` inside this repository, and beside `--out` for one elsewhere.

A time-budget guard (`--budget`, default 540 s: the probe and its start fit in 10 minutes)
skips a section whose own estimate would not fit in what is left, and says so in the JSON.
Nothing here is tuned to a result.
"""

import argparse
import contextlib
import dataclasses
import importlib.metadata
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

import gflow
from gflow import internal, measures, presets

from . import sweep as sweep_benchmark
from ._harness import best_time, machine, median_and_quartiles
from .results_page import RESULTS_DIR, rows_directory, write_suite

SECTIONS = ("environment", "gradient", "linalg", "instruments", "step_floor", "capped_solve",
            "sweep", "certify", "checkpoint", "estimate")
PAPER = dict(d=640, d_ff=1280, n=1000)
QUICK = dict(d=32, d_ff=64, n=64)
# The default preset's steps at d = 64 (rtol 1e-6, PI control; docs/results.md): the
# estimate's step count, for want of a paper-size run to count them.
DEFAULT_RUN_STEPS = 1220
SAVE_POINTS = 200


def _cast(tree, dtype):
    return jtu.tree_map(
        lambda x: x.astype(dtype) if isinstance(x, jax.Array) and jnp.issubdtype(
            x.dtype, jnp.floating) else x, tree)


def _best(fn: Callable, repeats: int, budget_s: float) -> float:
    jax.block_until_ready(fn())
    return best_time(lambda: jax.block_until_ready(fn()), repeats=repeats,
                     budget_s=budget_s).wall


def _flops(compiled) -> float | None:
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend reports it
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    flops = (analysis or {}).get("flops")
    return float(flops) if flops else None


def _peak_memory() -> dict:
    stats = {}
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - CPU devices have none
        pass
    out = dict(process_max_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    for key in ("peak_bytes_in_use", "bytes_in_use", "bytes_limit"):
        if key in stats:
            out[f"device_{key}"] = int(stats[key])
    return out


class Probe:
    """Runs sections under a wall-time budget and writes the JSON after each."""

    def __init__(self, out: Path, budget_s: float, only: set[str] | None = None):
        self.out, self.budget_s, self.start = out, budget_s, time.perf_counter()
        self.only = only
        self.result: dict = {}

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)

    def section(self, name: str, needs_s: float, fn: Callable[[], dict]) -> dict | None:
        if self.only is not None and name != "environment" and name not in self.only:
            return None
        if needs_s > self.left():
            self.result[name] = dict(skipped=f"estimated {needs_s:.0f} s, {self.left():.0f} s "
                                     "of the budget left")
            print(f"[{name}] skipped ({self.result[name]['skipped']})", flush=True)
            self._write()
            return None
        begin = time.perf_counter()
        try:
            value = fn()
        except Exception as e:  # noqa: BLE001 - one failing section must not lose the others
            value = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        value["section_seconds"] = time.perf_counter() - begin
        self.result[name] = value
        print(f"[{name}] {value['section_seconds']:.1f} s", flush=True)
        self._write()
        return value

    def _write(self) -> None:
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text(json.dumps(self.result, indent=1, default=_json_default,
                                  allow_nan=False))
        os.replace(tmp, self.out)


def _json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return str(x)


def environment() -> dict:
    versions = {}
    for package in ("jax", "jaxlib", "diffrax", "equinox", "optimistix", "lineax"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    device = jax.devices()[0]
    return dict(
        backend=jax.default_backend(), device_kind=device.device_kind,
        device_count=jax.device_count(), versions=versions,
        x64=bool(jax.config.jax_enable_x64),
        default_matmul_precision=str(jax.config.jax_default_matmul_precision),
        machine=machine(),
    )


def gradient(flow: gflow.GradientFlow, repeats: int) -> dict:
    out = {}
    for name, dtype, precision in (("float64", jnp.float64, None),
                                   ("float32_default", jnp.float32, None),
                                   ("float32_highest", jnp.float32, "highest")):
        arrays, static = eqx.partition(_cast(flow, dtype), eqx.is_array)
        params = eqx.combine(arrays, static).params

        def velocity_of(arrays, y, static=static):
            return eqx.combine(arrays, static).velocity(y)

        with jax.default_matmul_precision(precision):
            compiled = jax.jit(velocity_of).lower(arrays, params).compile()
        velocity = jax.block_until_ready(compiled(arrays, params))
        seconds = _best(lambda compiled=compiled, a=arrays, p=params: compiled(a, p),
                        repeats, 60.0)
        flops = _flops(compiled)
        out[name] = dict(
            seconds=seconds, flops=flops,
            tflops_per_second=None if flops is None else flops / seconds / 1e12,
            velocity_dtype=str(jnp.result_type(*jtu.tree_leaves(velocity))),
            matmul_precision=precision or "default",
        )
    return out


def linalg(d: int, d_ff: int, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    out = {}
    for shape in ((d, d), (d, d_ff)):
        W = jnp.asarray(rng.normal(size=shape))
        row = {}
        for algorithm in jax.lax.linalg.SvdAlgorithm.__members__.values():
            def svd(W, algorithm=algorithm):
                return jax.lax.linalg.svd(W, full_matrices=False, compute_uv=False,
                                          algorithm=algorithm)
            try:
                fn = jax.jit(svd)
                row[f"svd_{algorithm.name.lower()}"] = _best(lambda fn=fn: fn(W), repeats, 30.0)
            except Exception as e:  # noqa: BLE001 - an algorithm this backend lacks
                row[f"svd_{algorithm.name.lower()}"] = f"unavailable: {type(e).__name__}"
        gram = jax.jit(lambda W: jnp.linalg.eigvalsh(W @ W.T))
        row["eigh_of_gram"] = _best(lambda: gram(W), repeats, 30.0)
        lanczos = jax.jit(lambda W: measures.spectral_norm(W, 16))
        row["sigma_max_lanczos16"] = _best(lambda: lanczos(W), repeats, 30.0)
        out[f"{shape[0]}x{shape[1]}"] = row
    return out


def instruments(problem, gradient_seconds: float, repeats: int, budget_s: float) -> dict:
    flow, y = problem.flow, problem.flow.params
    begin = time.perf_counter()
    grad = eqx.filter_jit(lambda fl, y: fl.velocity(y))
    # The gradient again, in this section's process state: ratios side by side.
    g = _best(lambda: grad(flow, y), repeats, 60.0)
    out = dict(gradient_seconds=g, conditions={}, observers={})
    observers = {"loss": flow.loss} | dict(problem.observers)
    snapshots = dict(getattr(problem, "snapshots", {}))

    def observation(obs: dict, shared: bool = True) -> Callable[[], dict]:
        # Compiled with its inputs as the engine passes them (one input for an array two
        # observers share, e.g. the held-out set), so XLA shares what the solve's program
        # shares; `shared=False`: one input per leaf, as before the engine shared them.
        if shared:
            arrays, rebuild, _ = internal.split((flow, obs))
        else:
            arrays, static = eqx.partition((flow, obs), eqx.is_array)

            def rebuild(arrays, static=static):
                return eqx.combine(arrays, static)

        def observe(arrays, y):
            fl, o = rebuild(arrays)
            return {k: v(fl.combine(y), fl.data) for k, v in o.items()}

        program = jax.jit(observe).lower(arrays, y).compile()
        return lambda: program(arrays, y), _flops(program)

    flow_arrays, flow_static = eqx.partition(flow, eqx.is_array)
    grad_flops = _flops(jax.jit(
        lambda a, y: eqx.combine(a, flow_static).velocity(y)).lower(flow_arrays, y).compile())

    def timed(obs: dict, repeats: int, shared: bool = True, one_thread: bool = True) -> dict:
        # As a solve runs them: one thread per LAPACK call (`one_thread=False`: OpenBLAS's
        # own pool of every core, as before solves limited it).
        with internal.one_lapack_thread() if one_thread else contextlib.nullcontext():
            return _timed(obs, repeats, shared)

    def _timed(obs: dict, repeats: int, shared: bool) -> dict:
        call, flops = observation(obs, shared)
        value = jax.block_until_ready(call())
        # Alternating with the gradient, so that both see the same load: the ratio of the
        # two minima.
        s = g_here = math.inf
        for _ in range(max(repeats, 2)):
            s = min(s, best_time(lambda: jax.block_until_ready(call()), repeats=1,
                                 budget_s=0.0).wall)
            g_here = min(g_here, best_time(lambda: jax.block_until_ready(grad(flow, y)),
                                           repeats=1, budget_s=0.0).wall)
        # XLA's FLOP count beside the time: steady on a shared machine, but blind to what
        # runs outside XLA's own kernels (the SVDs and eigendecompositions call LAPACK).
        return dict(seconds=s, gradients=s / g_here, gradient_seconds=g_here, bytes=int(sum(
            np.asarray(x).nbytes for x in jtu.tree_leaves(value))),
            flops_gradients=None if flops is None or not grad_flops else flops / grad_flops)

    # What the solve evaluates, each compiled as one program as the engine compiles it: at an
    # ordinary save time the observers; at a chosen time the snapshots; at a transition (and
    # at t1) both.
    out["observation"] = timed(observers, repeats) | dict(
        observers=sorted(observers), note="every observer of an ordinary save time, one program")
    out["observation_unshared"] = timed(observers, repeats, shared=False) | dict(
        note="the same, one program input per array leaf (an array two observers hold enters "
             "twice)")
    if snapshots:
        out["snapshot"] = timed(snapshots, min(repeats, 2)) | dict(
            observers=sorted(snapshots), note="every snapshot observer, one program")
        out["snapshot_default_pool"] = timed(
            snapshots, min(repeats, 2), one_thread=False) | dict(
            note="the same, LAPACK on OpenBLAS's own pool of every core (before solves ran "
                 "it on one thread)")
        out["at_transition"] = timed(observers | snapshots, min(repeats, 2)) | dict(
            note="observers and snapshots together (at a transition and at t1), one program")
    cond = eqx.filter_jit(lambda fl, y, c: c(fl.combine(y), fl.data))
    for tr in problem.transitions:
        s = _best(lambda tr=tr: cond(flow, y, tr.condition), repeats, 60.0)
        out["conditions"][tr.name] = dict(seconds=s, gradients=s / g)
        if getattr(tr.condition, "iterations", None) is not None:
            # The same condition with σ_max by SVD (what it was before Lanczos): before and
            # after, side by side in one process.
            by_svd = dataclasses.replace(tr.condition, iterations=None)
            s = _best(lambda by_svd=by_svd: cond(flow, y, by_svd), min(repeats, 2), 60.0)
            out["conditions"][tr.name] |= dict(svd_seconds=s, svd_gradients=s / g)
    # Each observer alone (XLA shares nothing between them), while the budget lasts.
    for name, obs in (observers | snapshots).items():
        if time.perf_counter() - begin > budget_s / 2:
            out["observers"][name] = "skipped: budget"
            continue
        out["observers"][name] = timed({name: obs}, 1) | dict(
            placed="snapshot" if name in snapshots else "save time")
        if getattr(obs, "iterations", None) is not None:
            by_svd = dataclasses.replace(obs, iterations=None)
            s = _best(observation({name: by_svd})[0], 1, 0.0)
            out["observers"][name] |= dict(svd_seconds=s, svd_gradients=s / g)
    return out


def _deep_linear(overrides=()):
    resolved = presets.resolve("deep-linear", list(overrides))
    return resolved, presets.build(resolved)


def _solve_small(problem, resolved, **kwargs):
    s = resolved.solve
    return gflow.solve(problem.flow, s.t1, t0=s.t0, rtol=s.rtol, solver=s.solver,
                       transitions=problem.transitions, **kwargs)


def step_floor(lengths=(12.0, 1e4), repeats: int = 21, fine_chunks=(8, 32)) -> dict:
    """Time per step of deep-linear at rtol 1e-12 with the progress bar off and on, at two
    lengths of the flow (t1 = 12, the preset's own, 1,201 steps; t1 = 1e4, 30,196 steps);
    calls alternate (all compiled first; the order reversed every other round) so that all
    see the same load.

    A bar costs something once per solve (opening and closing tqdm, the first short call) and
    something per step (the cuts into chunks, the calls between them): the slope between the
    two lengths is the cost per step, the intercept the cost per solve. The ratio of slopes
    is given from the minima and, as a measure of the machine's noise, per round (the calls
    of one round side by side): their median and quartiles.

    Where that noise is larger than the bar's cost, the cost is measured in its parts
    (`decomposed`), each resolvable on its own: the long solve with the bar on and chunks of
    `fine_chunks` steps (`checkpoint_steps`, no file) times the cuts up to 128-fold, and the
    slope of its time over the number of cuts is the cost of one cut inside the program; one
    call of the program that takes one step bounds what a call costs beside its steps; the
    host's own time (wall less the program's calls) with the bar on and off is measured
    directly. The bar's cost is then cuts × per cut + calls × per call + host, over the solve
    without it."""
    variants = {}
    for t1 in lengths:
        resolved, problem = _deep_linear(["solve.rtol=1e-12", f"solve.t1={t1}"])
        for progress in (False, True):
            variants[(t1, progress)] = (problem, resolved, dict(progress=progress))
    long = lengths[1]
    for chunk in fine_chunks:
        variants[(long, chunk)] = (*variants[(long, False)][:2],
                                   dict(progress=True, checkpoint_steps=chunk))
    # One call of one step (the bar on): what a call costs beside the steps it runs.
    resolved, problem = _deep_linear(["solve.rtol=1e-12", "solve.t1=1e-9"])
    variants["one_call"] = (problem, resolved, dict(progress=True))
    # Compiled; the default bar's spec (its chunks) read from its trajectory.
    first = {key: _solve_small(problem, resolved, **kwargs)
             for key, (problem, resolved, kwargs) in variants.items()}
    runs = {key: [] for key in variants}
    walls = {key: [] for key in variants}
    steps, calls = {}, {}
    for round_ in range(repeats):
        order = list(variants.items())
        for key, (problem, resolved, kwargs) in order[::-1] if round_ % 2 else order:
            before, begin = internal.program_calls(), time.perf_counter()
            traj = _solve_small(problem, resolved, **kwargs)
            walls[key].append(time.perf_counter() - begin)
            runs[key].append(traj.stats["run_seconds"])
            steps[key] = traj.stats["num_steps"]
            calls[key] = internal.program_calls() - before
    short = lengths[0]
    out = dict(lengths=list(lengths), repeats=repeats)
    slopes = {}
    for progress in (False, True):
        n0, n1 = steps[(short, progress)], steps[(long, progress)]
        s0, s1 = min(runs[(short, progress)]), min(runs[(long, progress)])
        per_step = (s1 - s0) / (n1 - n0)
        slopes[progress] = (np.asarray(runs[(long, progress)])
                            - np.asarray(runs[(short, progress)])) / (n1 - n0)
        out["progress_on" if progress else "progress_off"] = dict(
            steps=[n0, n1], run_seconds=[s0, s1], ms_per_step=1e3 * s0 / n0,
            ms_per_step_slope=1e3 * per_step, per_solve_seconds=s0 - per_step * n0)
    on, off = out["progress_on"], out["progress_off"]
    out["on_over_off"] = on["ms_per_step_slope"] / off["ms_per_step_slope"]
    paired = slopes[True] / slopes[False]
    out["on_over_off_paired"] = median_and_quartiles(paired)
    out["on_over_off_short"] = on["ms_per_step"] / off["ms_per_step"]
    out["bar_per_solve_seconds"] = on["per_solve_seconds"] - off["per_solve_seconds"]
    default_chunk = internal.chunk_steps(variants[(long, True)][0].flow, first[(long, True)].spec)
    out["decomposed"] = _bar_decomposed(runs, walls, steps, calls, long,
                                        (*fine_chunks, default_chunk))
    return out


def _bar_decomposed(runs, walls, steps, calls, long, chunks) -> dict:
    """`step_floor`'s bar cost from its parts, per round (see `step_floor`); `chunks`: the
    fine chunks, then the default bar's."""
    n = steps[(long, False)]
    keys = [*((long, c) for c in chunks[:-1]), (long, True)]
    cuts = np.asarray([math.ceil(n / c) - 1 for c in chunks], dtype=float)
    run = {k: np.asarray(v) for k, v in runs.items()}
    host = {k: np.asarray(walls[k]) - run[k] for k in runs}
    # Per round: the program's time against the cuts (least squares over the chunk sizes).
    per_cut = np.asarray([np.polyfit(cuts, [run[k][r] for k in keys], 1)[0]
                          for r in range(len(run[(long, False)]))])
    per_call = run["one_call"]  # one step included: an upper bound
    bar = (cuts[-1] * per_cut + calls[(long, True)] * per_call
           + host[(long, True)] - host[(long, False)])
    ratio = 1.0 + bar / run[(long, False)]
    spread = median_and_quartiles  # of the rounds
    return dict(
        steps=n, chunks=list(chunks), cuts=[int(c) for c in cuts],
        calls={str(c): calls[k] for c, k in zip(chunks, keys)},
        run_seconds_min={str(c): float(run[k].min()) for c, k in zip(chunks, keys)}
        | {"off": float(run[(long, False)].min())},
        per_cut_us=spread(per_cut, 1e6), per_call_ms=spread(per_call, 1e3),
        host_ms=dict(on=spread(host[(long, True)], 1e3), off=spread(host[(long, False)], 1e3)),
        bar_ms=spread(bar, 1e3), on_over_off=spread(ratio),
    )


def capped_solve(problem, t1: float, steps: int) -> dict:
    """A solve capped at `steps` steps in float64 (rtol 1e-6, the preset's), and the same
    under `precision="mixed"` at rtol 1e-5 (refused, and recorded so, where the size's float32
    tolerance floor is above it)."""
    cheap = dict(problem.observers)  # the preset's save-time observers (no snapshots)

    def run(**kwargs) -> dict:
        traj = gflow.solve(problem.flow, t1, solver="tsit5", observers=cheap,
                           transitions=problem.transitions, max_steps=steps, **kwargs)
        s = traj.stats
        return dict(
            status=traj.status, t_final=traj.t_final, steps=s["num_steps"],
            evaluations=s["vector_field_evaluations"], trace_seconds=s["trace_seconds"],
            compile_seconds=s["compile_seconds"], run_seconds=s["run_seconds"],
            ms_per_step=1e3 * s["run_seconds"] / max(1, s["num_steps"]),
            precision=s.get("precision"), matmul_precision=s.get("matmul_precision"),
            observers=sorted(cheap), memory=_peak_memory(),
        )

    out = run(rtol=1e-6)
    try:
        out["mixed"] = run(rtol=1e-5, precision="mixed")
    except gflow.InputError as e:
        out["mixed"] = dict(error=str(e))
    return out


def sweep(members: int) -> dict:
    make_flow, transitions = sweep_benchmark._problem()
    side = int(round(np.sqrt(members)))
    eps = np.geomspace(1e-2, 1e-5, side)
    grid = [(float(e), int(s)) for e in eps for s in range(members // side)]
    over = {"eps": [g[0] for g in grid], "seed": [g[1] for g in grid]}
    out = {}
    for batch in ("vmap", "map", "loop"):
        def call(batch=batch):
            return gflow.sweep(make_flow, over, sweep_benchmark.T1, mode="zip", batch=batch,
                               rtol=sweep_benchmark.RTOL, transitions=transitions)
        first = call()
        timing = best_time(call, repeats=2, budget_s=60.0)
        out[batch] = dict(
            members=len(grid), wall=timing.wall,
            compile=sum(g["compile_seconds"] for g in first.groups),
            members_per_second=len(grid) / timing.wall,
            completed=sum(m.status == "completed" for m in timing.outputs[-1].members),
        )
    return out


def certify() -> dict:
    resolved, problem = _deep_linear()
    out = {}
    for on in (False, True):
        _solve_small(problem, resolved, certify=on)
        timing = best_time(lambda on=on: _solve_small(problem, resolved, certify=on),
                           repeats=3, budget_s=30.0)
        out["on" if on else "off"] = dict(wall=timing.wall)
    out["on_over_off"] = out["on"]["wall"] / out["off"]["wall"]
    return out


def checkpoint() -> dict:
    resolved, problem = _deep_linear()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run.ckpt"
        plain = _solve_small(problem, resolved, checkpoint_steps=20)
        begin = time.perf_counter()
        written = _solve_small(problem, resolved, checkpoint=path, checkpoint_steps=20)
        with_checkpoints = time.perf_counter() - begin
        begin = time.perf_counter()
        resumed = _solve_small(problem, resolved, checkpoint=path, checkpoint_steps=20,
                               resume=True)
        resume_seconds = time.perf_counter() - begin
        size = path.stat().st_size
    return dict(
        segments=written.stats["segments"], checkpoint_bytes=size,
        plain_run_seconds=plain.stats["run_seconds"], with_checkpoints_seconds=with_checkpoints,
        resume_from_end_seconds=resume_seconds,
        resumed_equal=bool(resumed.transitions == written.transitions
                           and np.array_equal(resumed.ts, written.ts)),
    )


def estimate(result: dict) -> dict:
    """The whole default run at this size, from the measured unit costs."""
    grad = result.get("gradient", {}).get("float64", {}).get("seconds")
    ins = result.get("instruments", {})
    if grad is None or "conditions" not in ins:
        return dict(skipped="needs the gradient and instruments sections")
    # Tsit5 with FSAL: 6 new evaluations a step, rejected steps included (their stages are
    # computed too); one condition evaluation per step (diffrax evaluates the event's
    # condition at every step end) plus a few for each root found.
    evaluations = 6 * DEFAULT_RUN_STEPS
    # Each instrument as its ratio to a gradient measured beside it, times the gradient
    # section's: every term at one machine load.
    condition = max(v["gradients"] for v in ins["conditions"].values()) * grad
    observation = ins["observation"]["gradients"] * grad
    snapshot = ins.get("snapshot", {}).get("gradients", 0.0) * grad
    # The snapshots at t0, the chosen times and t1, and at each transition.
    snapshots = (2 + result.get("size", {}).get("snapshot_points", 0)
                 + len(ins["conditions"])) if snapshot else 0
    flow_seconds = evaluations * grad
    conditions_seconds = DEFAULT_RUN_STEPS * condition
    observation_seconds = ((SAVE_POINTS + len(ins["conditions"])) * observation
                           + snapshots * snapshot)
    return dict(
        assumptions=(f"{DEFAULT_RUN_STEPS} steps (the default preset's count at d = 64; the "
                     "paper-size count is unmeasured), 6 gradients a step, the costliest "
                     f"condition at every step, the save-time observation at {SAVE_POINTS} "
                     f"save times and at each transition, a snapshot at {snapshots} times "
                     "(t0, the chosen times, each transition, t1)"),
        gradients=evaluations, flow_seconds=flow_seconds, conditions_seconds=conditions_seconds,
        observation_seconds=observation_seconds,
        total_seconds=flow_seconds + conditions_seconds + observation_seconds,
        instruments_fraction=(conditions_seconds + observation_seconds)
        / (flow_seconds + conditions_seconds + observation_seconds),
    )


@contextlib.contextmanager
def _busy(processes: int):
    """`processes` other processes multiplying NumPy matrices (each on OpenBLAS's own pool)
    for the time of the block: the load of a machine shared with other jobs."""
    code = "import numpy as np\na = np.ones((400, 400))\nwhile True:\n    a @ a\n"
    workers = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(processes)]
    try:
        yield
    finally:
        for w in workers:
            w.kill()
            w.wait()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="d = 32, d_ff = 64, n = 64 and small sweeps: checks the recipe")
    parser.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    parser.add_argument("--budget", type=float, default=540.0,
                        help="wall seconds for the whole probe (default 540)")
    parser.add_argument("--only", default=None,
                        help="comma-separated sections to run (environment always runs)")
    parser.add_argument("--background-load", type=int, default=0, metavar="N",
                        help="while the instruments are measured, N other processes keep the "
                             "cores busy with NumPy matrix products (a shared machine)")
    parser.add_argument("--report-only", action="store_true",
                        help="write the results page's suite from --out's JSON, measure nothing")
    args = parser.parse_args(argv)
    if args.report_only:
        write_results(json.loads(args.out.read_text()), args.out, rows_directory(args.out))
        return 0
    if args.background_load < 0:
        print(f"--background-load must be >= 0, got {args.background_load}", file=sys.stderr)
        return 2
    if not args.budget > 0:
        print(f"--budget must be positive, got {args.budget}", file=sys.stderr)
        return 2
    if not args.out.parent.is_dir():
        print(f"--out: no directory {args.out.parent}", file=sys.stderr)
        return 2
    only = None if args.only is None else set(args.only.split(","))
    if only is not None and not only <= set(SECTIONS):
        print(f"--only: unknown sections {', '.join(sorted(only - set(SECTIONS)))}; known: "
              f"{', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    size = QUICK if args.quick else PAPER
    repeats = 2 if args.quick else 5
    probe = Probe(args.out, args.budget, only)
    probe.result["command"] = "python -m benchmarks.gpu " + " ".join(
        sys.argv[1:] if argv is None else argv)
    probe.result["machine"] = machine()
    probe.result["size"] = size
    probe.section("environment", 0, environment)
    begin = time.perf_counter()
    resolved = presets.resolve("rank-collapse", [f"problem.{k}={v}" for k, v in size.items()])
    problem = presets.build(resolved)
    probe.result["size"]["snapshot_points"] = resolved.solve.snapshot_points
    probe.result["size"]["build_seconds"] = time.perf_counter() - begin
    probe.result["size"]["parameters"] = int(sum(
        x.size for x in jtu.tree_leaves(problem.flow.params)))
    grad = probe.section("gradient", 0, lambda: gradient(problem.flow, repeats))
    g = (grad or {}).get("float64", {}).get("seconds", 1.0)
    probe.section("linalg", 10, lambda: linalg(size["d"], size["d_ff"], repeats))
    # A snapshot measured here on CPU: about 20 gradients; with the conditions by SVD and the
    # observers one by one, about 80.
    probe.result["size"]["background_load"] = args.background_load
    with _busy(args.background_load):
        probe.section("instruments", 80 * g,
                      lambda: instruments(problem, g, repeats, max(probe.left(), 1.0)))
    probe.section("step_floor", 150, lambda: step_floor(repeats=3 if args.quick else 21))
    steps = 10 if args.quick else 40
    probe.section("capped_solve", 12 * steps * g + 120,
                  lambda: capped_solve(problem, resolved.solve.t1, steps))
    probe.section("sweep", 60, lambda: {str(n): sweep(n) for n in
                                        ((4,) if args.quick else (64, 256))})
    probe.section("certify", 20, certify)
    probe.section("checkpoint", 20, checkpoint)
    probe.section("estimate", 0, lambda: estimate(probe.result))
    print(json.dumps({k: probe.result[k] for k in ("gradient", "estimate")
                      if k in probe.result}, indent=1, default=_json_default))
    if not args.quick:
        write_results(json.loads(args.out.read_text()), args.out, rows_directory(args.out))
    return 0


def _flops_note(timed: dict) -> str:
    f = timed.get("flops_gradients")
    return "" if f is None else f"; by XLA's FLOP count {f:.3g} gradients"


def _judged(spread: dict, target: float) -> str:
    """A ratio's verdict against `target` from its per-round quartiles
    (`median_and_quartiles`): judged only where their spread leaves no doubt either way."""
    low, high = spread["quartiles"]
    return ("met" if high <= target else "not met" if low > target
            else "not resolved: the rounds spread across the target")


def _remeasured(section: dict) -> str:
    """Where a section was measured by a later run than the rest of its probe: that run."""
    again = section.get("remeasured")
    return (f" (this section re-measured by `{again['command']}` at {again['commit']}, "
            f"{again['date']})" if again else "")


def write_results(result: dict, out: Path, directory: Path = RESULTS_DIR) -> Path:
    """The results page's rows from one probe's JSON (suite `probe-<out's stem>`): issue 30's
    instrument costs in gradients, before (σ_max by SVD) and after (Lanczos), and the estimate
    of the whole default run at the probe's size."""
    rows = []
    size = result["size"]
    grad = result.get("gradient", {}).get("float64")
    if grad:
        rows.append(dict(quantity="one float64 gradient", value=grad["seconds"], unit="s",
                         detail=f"{grad['flops'] / 1e9:.2f} GFLOP by XLA's cost analysis"))
    inst = result.get("instruments") or {}
    for name, c in (inst.get("conditions") or {}).items():
        before = (f"with σ_max by SVD {c['svd_gradients']:.3g} gradients"
                  if "svd_gradients" in c else "no SVD in it")
        rows.append(dict(quantity=f"condition {name}, one evaluation", value=c["gradients"],
                         unit="gradients", target="≤ 0.05",
                         verdict="met" if c["gradients"] <= 0.05 else "not met", detail=before))
    observation = inst.get("observation")
    if observation:
        size_ = observation.get("bytes", observation.get("bytes_per_save_time"))
        by_flops = observation.get("flops_gradients")
        verdict = "met" if observation["gradients"] <= 0.5 else "not met"
        if verdict == "not met" and by_flops is not None and by_flops <= 0.5:
            verdict = (f"met by XLA's FLOP count, not by time "
                       f"({observation['gradients']:.4f})")
        rows.append(dict(quantity="one ordinary save-time observation",
                         value=observation["gradients"], unit="gradients", target="≤ 0.5",
                         verdict=verdict,
                         detail=observation.get("note", "") + _flops_note(observation)))
        unshared = inst.get("observation_unshared")
        if unshared:
            rows.append(dict(quantity="the same observation, each array leaf its own input",
                             value=unshared["gradients"], unit="gradients",
                             detail="as before the engine passed an array two observers "
                                    "hold once (the held-out set, at save times until it "
                                    "moved to the snapshots)" + _flops_note(unshared)))
        rows.append(dict(quantity="observables per ordinary save time", value=size_ / 2**20,
                         unit="MiB", target="≤ 1",
                         verdict="met" if size_ <= 2**20 else "not met", detail=f"{size_:,} bytes"))
    for key, what in (("snapshot", "one snapshot (at a chosen time)"),
                      ("snapshot_default_pool", "one snapshot, LAPACK on every core"),
                      ("at_transition", "one observation at a transition (observers and "
                                        "snapshots)")):
        if key in inst:
            judged = key != "snapshot_default_pool"
            rows.append(dict(quantity=what, value=inst[key]["gradients"], unit="gradients",
                             target="≤ 5" if judged else "",
                             verdict=("met" if inst[key]["gradients"] <= 5 else "not met")
                             if judged else "",
                             detail=f"{inst[key]['bytes']:,} bytes; "
                                    + inst[key].get("note", "")))
    timed = {k: o for k, o in (inst.get("observers") or {}).items() if isinstance(o, dict)}
    for name, o in sorted(timed.items(), key=lambda kv: -kv[1]["gradients"]):
        rows.append(dict(quantity=f"observer {name}, one evaluation", value=o["gradients"],
                         unit="gradients", detail=f"{o['bytes']:,} bytes"
                         + (f"; {o['placed']}" if "placed" in o else "") + _flops_note(o)))
    floor = result.get("step_floor")
    if floor and "on_over_off" in floor:
        on, off = floor["progress_on"], floor["progress_off"]
        (n0, n1), (m0, m1) = on["steps"], off["steps"]
        paired = floor["on_over_off_paired"]
        low, high = paired["quartiles"]
        verdict = _judged(paired, 1.05)
        spread = (f"; per round (four calls side by side) median {paired['median']:.3f}, "
                  f"quartiles {low:.3f}–{high:.3f}")
        rows.append(dict(
            quantity="progress bar on / off, time per step (deep-linear, rtol 1e-12)",
            value=floor["on_over_off"], unit="×", target="≤ 1.05", verdict=verdict,
            detail=f"{1e3 * on['ms_per_step_slope']:.1f} against "
                   f"{1e3 * off['ms_per_step_slope']:.1f} µs a step: the slope between "
                   f"t1 = {floor['lengths'][0]:g} and {floor['lengths'][1]:g} ({n0:,} → "
                   f"{n1:,} steps; {m0:,} → {m1:,} off), from the minima of "
                   f"{floor['repeats']} alternating calls each{spread}; the bar is drawn by "
                   "the host between chunks of steps" + _remeasured(floor)))
        parts = floor.get("decomposed")
        if parts:
            ratio, cut, call = parts["on_over_off"], parts["per_cut_us"], parts["per_call_ms"]
            low, high = ratio["quartiles"]
            rows.append(dict(
                quantity="progress bar on / off on the long solve, from its parts "
                         "(deep-linear, rtol 1e-12)",
                value=ratio["median"], unit="×", target="≤ 1.05",
                verdict=_judged(ratio, 1.05),
                detail=f"per round, quartiles {low:.3f}–{high:.3f}: {parts['cuts'][-1]} cuts "
                       f"(chunks of {parts['chunks'][-1]} steps of {parts['steps']:,}) × "
                       f"{cut['median']:.0f} µs (quartiles {cut['quartiles'][0]:.0f}–"
                       f"{cut['quartiles'][1]:.0f}; the slope of the program's time over "
                       f"the cuts at chunks of {', '.join(map(str, parts['chunks']))} steps) "
                       f"+ {parts['calls'][str(parts['chunks'][-1])]} calls × "
                       f"{call['median']:.2f} ms (a one-step call: an upper bound) + the "
                       f"host's own time, {parts['host_ms']['on']['median']:.1f} ms on "
                       f"against {parts['host_ms']['off']['median']:.1f} ms off; over the "
                       f"solve without the bar ({parts['run_seconds_min']['off']:.2f} s). "
                       "Assumed: the programs differ only by the cuts and the controller "
                       "keeping its proposed step (one subtraction a step)"
                       + _remeasured(floor)))
        rows.append(dict(
            quantity="progress bar, cost per solve (deep-linear, rtol 1e-12)",
            value=1e3 * floor["bar_per_solve_seconds"], unit="ms",
            detail=f"the intercept of the same fit; on the preset's own solve ({n0:,} "
                   f"steps) on / off is {floor['on_over_off_short']:.2f}× "
                   f"({1e3 * on['run_seconds'][0]:.1f} against "
                   f"{1e3 * off['run_seconds'][0]:.1f} ms)"))
    est = result.get("estimate")
    if est:
        rows.append(dict(quantity="estimate of the whole default run at this size",
                         value=est["total_seconds"] / 3600, unit="h",
                         detail=f"flow {est['flow_seconds'] / 3600:.2f} h, conditions "
                                f"{est['conditions_seconds'] / 3600:.2f} h, observations "
                                f"{est['observation_seconds'] / 3600:.2f} h; "
                                f"{est['assumptions']}"))
    parameters = size.get("parameters")
    return write_suite(
        f"probe-{out.stem}",
        title=f"rank-collapse at d = {size['d']}, d_ff = {size['d_ff']}, n = {size['n']}: "
              f"what the instruments cost ({result['machine'].get('jax_backend', '?')}, "
              + ("costly observers as snapshots" if "snapshot" in inst
                 else "every observer at every save time")
              + (f", {size['background_load']} busy processes beside it)"
                 if size.get("background_load") else ")"),
        command=result["command"], machine=result["machine"], rows=rows, directory=directory,
        summary="`python -m benchmarks.gpu`'s probe of the default preset at this size"
                + (f" ({parameters:,} parameters)" if parameters else "")
                + ": each condition and observer timed alone, in "
                "units of one float64 gradient measured in the same process. The estimate "
                "multiplies these by an assumed step count (below); the paper-size step count "
                "itself is unmeasured. Beside the times, XLA's FLOP ratio (steady on a shared "
                "machine, blind to the SVDs and eigendecompositions, which run in LAPACK)."
                + (f" While the instruments were measured, {size['background_load']} other "
                   "processes multiplied NumPy matrices on every core (a shared machine)."
                   if size.get("background_load") else ""))


if __name__ == "__main__":
    sys.exit(main())
