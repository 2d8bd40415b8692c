"""Issue 32's precision measurements: what `"mixed"` and `"float32"` cost and how honest their
error bars are.

    python -m benchmarks.precision --out benchmarks/precision.json

1. deep-linear (the preset): for `"mixed"` and `"float32"`, whether the initial state equals
   float64's init cast (bitwise), the tolerance floor, and each transition's actual error
   against a float64 solve at rtol 1e-12 beside its certified bar, at rtol = the floor and
   at 10x the floor.
2. rank-collapse (the preset, d = 64; `--t1 760` stops after its last transition, 733): the cost of one velocity evaluation `-∇L` (jitted, best
   of several, the three precisions side by side in one process on this machine's CPU), the
   floor, and a certified `"mixed"` solve at rtol 1e-5 (above the floor) against the float64
   solve at the preset's rtol 1e-6: transition times, bars and wall time per evaluation. The
   solves record the transitions only (the instruments cost more than the flow).

Writes one JSON file, its suite on the results page (`benchmarks/results/precision.json`) and
prints a Markdown summary.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

import gflow
from gflow import presets

from .results_page import RESULTS_DIR, rows_directory, write_suite
from ._harness import best_time, fmt, machine, markdown_table

POLICIES = ("float64", "mixed", "float32")


def _solve_preset(resolved, problem, **kw):
    """`gflow.solve` on a preset's problem with its save times and horizon."""
    settings = resolved.solve
    return gflow.solve(problem.flow, settings.t1, t0=settings.t0, ts=settings.save_times(),
                       solver=settings.solver, observers=problem.observers,
                       transitions=problem.transitions, max_steps=settings.max_steps, **kw)


def initial_states(problem) -> dict:
    """Whether each precision's initial state is bitwise float64's init cast."""
    flow = problem.flow
    state = lambda m, d=None: jnp.concatenate(  # noqa: E731
        [jnp.ravel(x) for x in jtu.tree_leaves(eqx.filter(m, flow.trainable))])
    init = np.asarray(state(flow.model))
    out = {}
    for policy in POLICIES:
        traj = gflow.solve(flow, 1e-6, ts=[0.0, 1e-6], rtol=1e-4, precision=policy,
                           observers={"state": state})
        got = np.asarray(traj.observables["state"][0])
        want = init.astype(np.float32 if policy == "float32" else np.float64)
        out[policy] = dict(dtype=str(got.dtype), bitwise_equal=bool(
            got.dtype == want.dtype and np.array_equal(got, want)))
    return out


def deep_linear() -> dict:
    resolved = presets.resolve("deep-linear")
    problem = presets.build(resolved)
    exact = _solve_preset(resolved, problem, rtol=1e-12)
    rows = []
    floors = {}
    for policy in ("mixed", "float32"):
        floor, error = gflow.Precision.of(policy).rtol_floor(problem.flow)
        floors[policy] = dict(floor=floor, gradient_error=error)
        for factor in (1.0, 10.0):
            rtol = floor * factor
            begin = time.perf_counter()
            traj = _solve_preset(resolved, problem, rtol=rtol, certify=True, precision=policy)
            wall = time.perf_counter() - begin
            for name, t in traj.transitions.items():
                actual = abs(t - exact.transitions[name])
                bar = traj.errors["transitions"][name]
                rows.append(dict(policy=policy, rtol=rtol, transition=name, t=t,
                                 t_exact=exact.transitions[name], actual_error=actual, bar=bar,
                                 covered=bool(actual <= bar), steps=traj.stats["num_steps"],
                                 reference_dtype=traj.errors["reference_stats"]["dtype"],
                                 wall_seconds=wall))
    return dict(initial_states=initial_states(problem), floors=floors, rows=rows,
                exact_rtol=1e-12)


def evaluation_costs(flow, rounds: int = 6, repeats: int = 10) -> dict:
    """Best wall time of one jitted velocity under each precision, measured in interleaved
    rounds (each round times every precision), so that a shared machine's load falls alike
    on all three."""
    velocity = eqx.filter_jit(lambda flow, precision, y: precision.velocity(flow, y))
    prepared = {}
    for policy in POLICIES:
        precision = gflow.Precision.of(policy)
        with precision.scope():
            f = precision.cast(flow)
            jax.block_until_ready(velocity(f, precision, f.params))
        prepared[policy] = (precision, f)
    walls = {policy: [] for policy in POLICIES}
    for _ in range(rounds):
        for policy, (precision, f) in prepared.items():
            with precision.scope():
                timing = best_time(
                    lambda: jax.block_until_ready(velocity(f, precision, f.params)),
                    repeats=repeats, budget_s=10.0)
            walls[policy].append(timing.wall)
    return {policy: dict(seconds=min(w), median_seconds=float(np.median(w)), rounds=rounds,
                         repeats=repeats) for policy, w in walls.items()}


def rank_collapse(float64_json: Path | None, mixed_rtol: float, t1: float | None) -> dict:
    resolved = presets.resolve("rank-collapse", [] if t1 is None else [f"solve.t1={t1}"])
    problem = presets.build(resolved)
    costs = evaluation_costs(problem.flow)
    floor, error = gflow.Precision.mixed().rtol_floor(problem.flow)
    runs = {}
    for policy, rtol in (("float64", resolved.solve.rtol), ("mixed", mixed_rtol)):
        certify = policy == "mixed"
        if policy == "float64" and float64_json is not None:
            runs[policy] = json.loads(float64_json.read_text())
            continue
        settings = resolved.solve
        controller = gflow.pid_controller(problem.flow, rtol, t1=settings.t1,
                                          pcoeff=settings.pcoeff, icoeff=settings.icoeff)
        begin = time.perf_counter()
        # The transitions only (their conditions): the instruments cost more than the flow.
        traj = gflow.solve(problem.flow, settings.t1, ts=settings.save_times(), rtol=rtol,
                           transitions=problem.transitions, stepsize_controller=controller,
                           max_steps=settings.max_steps, certify=certify, precision=policy)
        wall = time.perf_counter() - begin
        runs[policy] = dict(
            rtol=rtol, transitions=traj.transitions,
            bars=traj.errors.get("transitions", {}),
            steps=traj.stats["num_steps"], evaluations=traj.stats["vector_field_evaluations"],
            run_seconds=traj.stats["run_seconds"], wall_seconds=wall,
            precision=traj.stats["precision"], reference_stats=traj.errors.get(
                "reference_stats"))
    f64, mixed = runs["float64"], runs["mixed"]
    rows = []
    for name, t in mixed["transitions"].items():
        t64 = f64["transitions"][name]
        rows.append(dict(transition=name, t_mixed=t, bar_mixed=mixed["bars"][name],
                         t_float64=t64, difference=abs(t - t64),
                         within_bar=bool(abs(t - t64) <= mixed["bars"][name])))
    return dict(evaluation_costs=costs, floor=floor, gradient_error=error, runs=runs, rows=rows)


def markdown(result: dict) -> str:
    dl, rc = result["deep_linear"], result["rank_collapse"]
    return "\n\n".join(part for part in (dl and _deep_linear_markdown(dl),
                                            rc and _rank_collapse_markdown(rc)) if part)


def _deep_linear_markdown(dl: dict) -> str:
    lines = ["Initial state (deep-linear) against float64's init cast: " + ", ".join(
        f"{p} {'bitwise equal' if v['bitwise_equal'] else 'DIFFERS'} ({v['dtype']})"
        for p, v in dl["initial_states"].items()) + ".", ""]
    lines += ["Floors (deep-linear): " + ", ".join(
        f"{p} {fmt(v['floor'])} (gradient error {fmt(v['gradient_error'])})"
        for p, v in dl["floors"].items()) + ".", ""]
    lines.append(markdown_table(
        ["precision", "rtol", "transition", "actual error (vs float64 rtol 1e-12)",
         "certified bar", "covered", "steps"],
        [[r["policy"], fmt(r["rtol"]), r["transition"], fmt(r["actual_error"]), fmt(r["bar"]),
          "yes" if r["covered"] else "NO", r["steps"]] for r in dl["rows"]]))
    return "\n".join(lines)


def _rank_collapse_markdown(rc: dict) -> str:
    c = rc["evaluation_costs"]
    lines = ["rank-collapse (d = 64) velocity `-∇L`, best of 20 on this CPU: " + ", ".join(
        f"{p} {v['seconds'] * 1e3:.2f} ms ({c['float64']['seconds'] / v['seconds']:.2f}x "
        "float64's speed)" for p, v in c.items())
        + f"; mixed's floor {fmt(rc['floor'])} (gradient error {fmt(rc['gradient_error'])}).",
        ""]
    lines.append(markdown_table(
        ["transition", "mixed (rtol 1e-5, certified)", "bar", "float64 (rtol 1e-6)",
         "|difference|", "within mixed's bar"],
        [[r["transition"], f"{r['t_mixed']:.6f}", fmt(r["bar_mixed"]), f"{r['t_float64']:.6f}",
          fmt(r["difference"]), "yes" if r["within_bar"] else "NO"] for r in rc["rows"]]))
    m = rc["runs"]["mixed"]
    lines += ["", f"mixed run: {m['steps']} steps, {m['evaluations']} evaluations, run "
              f"{m['run_seconds']:.1f} s ({m['run_seconds'] / m['evaluations'] * 1e3:.2f} ms "
              "per evaluation, the float64 reference running alongside on the other thread)."]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.precision")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "precision.json")
    parser.add_argument("--mixed-rtol", type=float, default=1e-5)
    parser.add_argument("--float64-run", type=Path, default=None,
                        help="a JSON with the float64 run's `transitions` (skips solving it)")
    parser.add_argument("--t1", type=float, default=None,
                        help="rank-collapse's horizon (default the preset's 1500)")
    parser.add_argument("--only", choices=("deep-linear", "rank-collapse"), default=None)
    parser.add_argument("--report-only", action="store_true",
                        help="write the results page's suite from --out's JSON, measure nothing")
    args = parser.parse_args(argv)
    if args.report_only:
        write_results(json.loads(args.out.read_text()), rows_directory(args.out))
        return 0
    result = dict(machine=machine(), command="python -m benchmarks.precision " + " ".join(
        sys.argv[1:] if argv is None else argv))
    previous = json.loads(args.out.read_text()) if args.out.is_file() else {}
    # One part at a time (`--only`) keeps the other part's saved results.
    result["deep_linear"] = (deep_linear() if args.only in (None, "deep-linear")
                             else previous.get("deep_linear"))
    args.out.write_text(json.dumps(result, indent=1, default=float) + "\n")
    result["rank_collapse"] = (rank_collapse(args.float64_run, args.mixed_rtol, args.t1)
                               if args.only in (None, "rank-collapse")
                               else previous.get("rank_collapse"))
    args.out.write_text(json.dumps(result, indent=1, default=float) + "\n")
    write_results(result, rows_directory(args.out))
    print(markdown(result))
    return 0


SUITE = "precision"


def write_results(result: dict, directory: Path = RESULTS_DIR) -> Path:
    """The results page's rows from one run's JSON: per policy whether the certified error
    bars cover the actual errors, rank-collapse's transitions under mixed against float64's,
    and what a velocity costs in each policy."""
    rows = []
    dl = result.get("deep_linear")
    if dl:
        rows.append(dict(
            quantity="deep-linear: every policy starts from float64's init",
            value=all(v["bitwise_equal"] for v in dl["initial_states"].values()),
            detail="bitwise, against float64's init cast to the policy's state dtype"))
        for policy, floor in dl["floors"].items():
            mine = [r for r in dl["rows"] if r["policy"] == policy]
            covered = sum(r["covered"] for r in mine)
            worst = max(r["actual_error"] / r["bar"] for r in mine)
            rows.append(dict(
                quantity=f"deep-linear, {policy}: transitions whose certified bar covers the "
                         "actual error (float64 reference at rtol 1e-12)",
                value=f"{covered} of {len(mine)}", target="all",
                verdict="met" if covered == len(mine) else "not met",
                detail=f"at rtol = the floor {fmt(floor['floor'])} and 10× it; largest "
                       f"error / bar {worst:.2f}; gradient error {fmt(floor['gradient_error'])}"))
    rc = result.get("rank_collapse")
    if rc:
        inside = sum(r["within_bar"] for r in rc["rows"])
        rows.append(dict(
            quantity="rank-collapse d = 64: mixed's transitions (rtol 1e-5, certified) within "
                     "their bars of float64's (rtol 1e-6)",
            value=f"{inside} of {len(rc['rows'])}", target="all",
            verdict="met" if inside == len(rc["rows"]) else "not met",
            detail="; ".join(f"{r['transition']} |Δt| {fmt(r['difference'])} (bar "
                             f"{fmt(r['bar_mixed'])})" for r in rc["rows"])))
        c = rc["evaluation_costs"]
        for policy in ("mixed", "float32"):
            rows.append(dict(
                quantity=f"rank-collapse d = 64: one velocity, float64 / {policy} (CPU)",
                value=c["float64"]["seconds"] / c[policy]["seconds"], unit="×",
                detail=f"best of {c[policy]['rounds']} interleaved rounds of "
                       f"{c[policy]['repeats']}: {c['float64']['seconds'] * 1e3:.2f} against "
                       f"{c[policy]['seconds'] * 1e3:.2f} ms"))
        rows.append(dict(quantity="rank-collapse d = 64: mixed's tolerance floor",
                         value=rc["floor"],
                         detail=f"10 × the float32 gradient's relative error "
                                f"{fmt(rc['gradient_error'])} at the initial state"))
    return write_suite(
        SUITE, title="Precision policies: honest error bars in float32 and mixed",
        command=result["command"].strip(), machine=result["machine"], rows=rows,
        directory=directory,
        summary="`precision=\"mixed\"` (float64 state, float32 loss and gradient) and "
                "`\"float32\"` against float64. Each non-float64 run is certified against a "
                "float64 reference at 100× smaller tolerances, so its bars cover rounding as "
                "well as truncation; a tolerance below the policy's floor (10× the float32 "
                "gradient's relative error at the initial state) is refused. deep-linear is the "
                "preset (four modes, t1 = 12); rank-collapse the preset at d = 64 to t1 = 760, "
                "transitions only. On an accelerator the speed ratio is the hardware's "
                "float32:float64 throughput: not measured (no accelerator was lent).")


if __name__ == "__main__":
    sys.exit(main())
