"""Run the benchmarks of issue 7: a detailed report with figures, and the results page's rows.

    python -m benchmarks.run                 # the published benchmark (several minutes)
    python -m benchmarks.run --quick --out /tmp/bench/report.md    # the smoke test's run
    python -m benchmarks.run --only deep-linear    # or any name in WORKLOADS

Next to the Markdown file go `results.json` (every number) and one work–precision PNG per
workload. `--quick` never writes into `benchmarks/` unless `--out` says so.
"""

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import gflow  # noqa: F401  (enables float64 before any JAX work)

from . import cooccurrence, deep_linear, memory, rank_collapse
from . import sweep as sweep_benchmark
from ._harness import (
    Result,
    fmt,
    interpolate_cost,
    load_average,
    machine,
    markdown_table,
    work_precision_figure,
)
from ._workload import run as run_workload
from .results_page import RESULTS_DIR, write_suite

WORKLOADS = ("deep-linear", "cooccurrence", "rank-collapse", "torchdiffeq", "memory", "sweep",
             "cli-compile")
# What --quick runs (cooccurrence, torchdiffeq on (b) and cli-compile have no quick form;
# torchdiffeq runs on (a) inside deep-linear).
QUICK = ("deep-linear", "rank-collapse", "memory", "sweep")
TARGET_ERROR = 1e-6
HERE = Path(__file__).resolve().parent
SUITE = "gd-and-competitors"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="few settings and short horizons of " + ", ".join(QUICK)
                   + " (under two minutes): a smoke test, not the published numbers")
    p.add_argument("--only", choices=WORKLOADS, help="run one workload")
    p.add_argument("--out", type=Path, help="the run's detailed Markdown report, with "
                   "results.json and figures beside it (default: benchmarks/results/"
                   f"{SUITE}/report.md, or a temporary directory with --quick); the suite's "
                   "rows go to benchmarks/results/ (beside --out when given or --quick)")
    return p


# ---------------------------------------------------------------------------------------------
# CLI compile time


def cli_compile(log) -> list[dict]:
    """The default CLI run twice in fresh processes sharing an empty persistent cache."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, GFLOW_CACHE_DIR=str(Path(tmp) / "cache"))
        for label in ("cold cache", "warm cache"):
            out = Path(tmp) / label.replace(" ", "-")
            start = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "gflow.solve", "--quiet", "--out", str(out)],
                env=env, check=True, capture_output=True, text=True,
            )
            wall = time.perf_counter() - start
            summary = json.loads((out / "summary.json").read_text())
            stats = summary["stats"]
            rows.append(
                dict(
                    run=label,
                    preset=(summary.get("config") or {}).get("preset", {}).get("name", "?"),
                    process_seconds=wall,
                    compile_seconds=stats["compile_seconds"],
                    run_seconds=stats["run_seconds"],
                    steps=stats["num_steps"],
                )
            )
            log(f"  CLI {label}: compile {stats['compile_seconds']:.2f}s, process {wall:.1f}s")
    return rows


# ---------------------------------------------------------------------------------------------
# analysis


def _families(results, prefix):
    return [r for r in results if r.family.startswith(prefix)]


def _trajectory_only_gflow(results):
    return [r for r in results if r.family.startswith("gflow") and not r.timed_transitions]


def _gd_cost_at(fit, t1: float, error: float, *, fitted: bool = False):
    """GD's step η, gradient evaluations, wall and CPU time at `error`: on its first-order line
    through the smallest η measured, or (`fitted`) on its least-squares power law."""
    c, power = (fit["fitted_c"], fit["fitted_power"]) if fitted else (fit["c"], fit["power"])
    eta = (error / c) ** (1.0 / power)
    steps = t1 / eta
    return eta, steps, steps * fit["seconds_per_step"], steps * fit["cpu_seconds_per_step"]


def analyse(data: dict, tag: str) -> dict:
    """Issue 7's targets and the matched-error ratios on one workload (`tag`: "(a)", "(b)")."""
    results: list[Result] = data["results"]
    t1 = data["problem"]["t1"]
    fit = data["gd_fit"]
    out = dict(targets=[], matched=[], scipy_equal_tol=[])

    gflow_rows = _trajectory_only_gflow(results)
    good = [r for r in gflow_rows if r.traj_error <= TARGET_ERROR]
    if good and fit:
        eta, gd_steps, gd_wall, gd_cpu = _gd_cost_at(fit, t1, TARGET_ERROR)
        by_evals = min(good, key=lambda r: r.evaluations)
        by_wall = min(good, key=lambda r: r.wall_s)
        by_cpu = min(good, key=lambda r: r.cpu_s)
        line = (f"GD extrapolated along its first-order line error = {fit['c']:.3g}·η through "
                f"its smallest measured η = {fit['finest_eta']:g}; the least-squares slope over "
                f"the measured η is {fit['fitted_power']:.2f}")
        if fit["fitted_power"] > 1.2:
            # The measured slope is steeper than first order: its line reaches small errors
            # with fewer steps, so it bounds GD's cost from below.
            _, fit_steps, fit_wall, _ = _gd_cost_at(fit, t1, TARGET_ERROR, fitted=True)
            line += (f"; along that steeper fitted line (GD's most favourable case) GD needs "
                     f"{fit_steps:.2e} steps: {fit_steps / by_evals.evaluations:,.0f}× the "
                     f"evaluations and {fit_wall / by_wall.wall_s:,.0f}× the wall time")
        out["targets"].append(dict(
            target=f"≥1000× fewer gradient evaluations than GD at error ≤ {TARGET_ERROR:g} {tag}",
            measured=f"{gd_steps / by_evals.evaluations:,.0f}× ({by_evals.family} "
            f"{by_evals.setting}: {by_evals.evaluations:,} evaluations, error "
            f"{fmt(by_evals.traj_error)}; GD needs η ≈ {eta:.1e}, {gd_steps:.2e} steps; {line})",
            met=gd_steps / by_evals.evaluations >= 1000,
        ))
        out["targets"].append(dict(
            target=f"≥100× less wall time than GD at error ≤ {TARGET_ERROR:g} {tag}",
            measured=f"{gd_wall / by_wall.wall_s:,.0f}× wall, {gd_cpu / by_cpu.cpu_s:,.0f}× CPU "
            f"({by_wall.family} {by_wall.setting}: {fmt(by_wall.wall_s * 1e3)} ms per call; GD: "
            f"{fmt(gd_wall)} s at {fmt(fit['seconds_per_step'] * 1e6)} µs per `lax.scan` step, "
            f"measured at its smallest η; compile excluded on both sides)",
            met=gd_wall / by_wall.wall_s >= 100,
        ))

    if data["overhead"]:
        rows = data["overhead"]
        calls = [o["gflow_call"] / o["bare_call"] for o in rows]
        cpus = [o["gflow_cpu"] / o["bare_cpu"] for o in rows]
        programs = [o["gflow_program"] / o["bare_call"] for o in rows]
        worst = rows[int(np.argmax(calls))]
        out["targets"].append(dict(
            target="gflow's overhead over bare diffrax, same solver, tolerances and observers "
            f"≤ 1.25× {tag}",
            measured=f"whole `gflow.solve` call {min(calls):.2f}×–{max(calls):.2f}× (worst: "
            f"{worst['solver']} rtol={worst['rtol']:g}, {fmt(worst['gflow_call'] * 1e3)} vs "
            f"{fmt(worst['bare_call'] * 1e3)} ms); CPU time {min(cpus):.2f}×–{max(cpus):.2f}×; "
            f"gflow's compiled program alone {min(programs):.2f}×–{max(programs):.2f}× the bare "
            "call",
            met=max(calls) <= 1.25,
        ))

    tsit5 = {r.knob: r for r in results if r.family == "gflow tsit5"}
    for r in _families(results, "scipy DOP853"):
        g = tsit5.get(r.knob)
        if g is not None:
            out["scipy_equal_tol"].append(dict(
                scipy=r.family, rtol=r.knob, scipy_wall=r.wall_s, gflow_wall=g.wall_s,
                ratio=r.wall_s / g.wall_s, cpu_ratio=r.cpu_s / g.cpu_s,
                scipy_error=r.traj_error, gflow_error=g.traj_error,
            ))
    if out["scipy_equal_tol"]:
        parts = []
        for label, key in (("jitted JAX rhs", "jax"), ("numpy rhs", "numpy")):
            rows = [s for s in out["scipy_equal_tol"] if key in s["scipy"]]
            if rows:
                parts.append(f"{label}: scipy takes " + ", ".join(
                    f"{s['ratio']:.2f}× wall / {s['cpu_ratio']:.2f}× CPU (rtol {s['rtol']:g})"
                    for s in rows) + " of gflow tsit5's")
        informational = tag != "(b)"  # issue 7 sets this target on (b)
        out["targets"].append(dict(
            target=f"gflow ≥3× faster than scipy DOP853 at equal tolerance {tag}"
            + (" (the target is set on (b); for information)" if informational else ""),
            measured="; ".join(parts),
            met=None if informational else min(s["ratio"] for s in out["scipy_equal_tol"]) >= 3,
        ))

    torch_target = _torchdiffeq_target(results, data.get("torchdiffeq"), tag)
    if torch_target is not None:
        out["targets"].append(torch_target)

    # Matched error: what each competitor pays for the error a gflow setting reaches.
    competitors = {}
    for r in results:
        if r.family.startswith(("scipy", "optax", "bare diffrax", "torchdiffeq")):
            competitors.setdefault(r.family, []).append(r)
    for g in sorted(gflow_rows, key=lambda r: (r.family, -r.knob)):
        row = dict(gflow=f"{g.family} {g.setting}", error=g.traj_error, evaluations=g.evaluations,
                   wall=g.wall_s, others={})
        if fit and math.isfinite(g.traj_error):
            _, steps, wall, cpu = _gd_cost_at(fit, t1, g.traj_error)
            gd = [r for r in results if r.family == "GD (lax.scan)"]
            row["others"]["GD (lax.scan)"] = dict(
                evaluations_ratio=steps / g.evaluations, wall_ratio=wall / g.wall_s,
                cpu_ratio=cpu / g.cpu_s,
                extrapolated=min(r.traj_error for r in gd) > g.traj_error,
            )
        for family, rows in competitors.items():
            errors = [r.traj_error for r in rows]
            evals = interpolate_cost(errors, [r.evaluations for r in rows], g.traj_error)
            wall = interpolate_cost(errors, [r.wall_s for r in rows], g.traj_error)
            cpu = interpolate_cost(errors, [r.cpu_s for r in rows], g.traj_error)
            if evals is not None:
                row["others"][family] = dict(evaluations_ratio=evals / g.evaluations,
                                             wall_ratio=wall / g.wall_s, cpu_ratio=cpu / g.cpu_s,
                                             extrapolated=False)
        out["matched"].append(row)
    return out


def _torchdiffeq_target(results: list[Result], info: dict | None, tag: str) -> dict | None:
    """torchdiffeq dopri5 against gflow at the same rtol and atol (issue 7's target on (b)).

    At each rtol the faster of torch's thread counts is taken (its best case). The verdict
    compares with gflow's dopri5, the same method; gflow's default tsit5 is reported too.
    """
    target = f"gflow ≥2× faster than torchdiffeq at equal tolerance {tag}" + (
        "" if tag == "(b)" else " (the target is set on (b); for information)")
    if info is None or not info.get("rtols"):
        return None
    if info.get("skipped"):
        return dict(target=target, measured=f"not measured: {info['skipped']}", met=None)
    torch_rows = _families(results, "torchdiffeq")
    parts, ratios = [], []
    for rtol in info["rtols"]:
        rows = [r for r in torch_rows if r.knob == rtol]
        if not rows:
            continue
        best = min(rows, key=lambda r: r.wall_s)
        threads = best.family.split(", ")[-1]
        against = []
        for family in ("gflow dopri5", "gflow tsit5"):
            g = next((r for r in results if r.family == family and r.knob == rtol), None)
            if g is None:
                continue
            against.append(f"{best.wall_s / g.wall_s:.2f}× wall / {best.cpu_s / g.cpu_s:.2f}× "
                           f"CPU of {family}'s")
            if family == "gflow dopri5":
                ratios.append(best.wall_s / g.wall_s)
        parts.append(f"rtol {rtol:g} ({fmt(best.wall_s * 1e3)} ms, {threads}, error "
                     f"{fmt(best.traj_error)}): " + (", ".join(against) or "no gflow run at "
                                                      "this rtol"))
    return dict(
        target=target,
        measured="torchdiffeq dopri5 takes " + "; ".join(parts) + " (the faster of its thread "
        "counts at each rtol; matched-error ratios in the workload's section)",
        met=(min(ratios) >= 2 if ratios else None) if tag == "(b)" else None,
    )


def _results_table(results: list[Result]) -> str:
    header = ["method", "setting", "grad evals", "steps", "wall [ms] min / median (calls)",
              "CPU [ms]", "in program [ms]",
              "compile [s]", "traj. error", "worst at t", "transition-time errors, in order"]
    rows = []
    for r in results:
        if r.transition_errors is None:
            transitions = "—"
        else:
            transitions = " / ".join(fmt(e, 1) for e in r.transition_errors)
            transitions += "" if r.timed_transitions else " (untimed)"
        rows.append([
            r.family, r.setting, fmt(int(r.evaluations)), "—" if r.steps is None else fmt(int(r.steps)),
            fmt(r.wall_s * 1e3) + ("" if r.wall_median_s is None else
                                   f" / {fmt(r.wall_median_s * 1e3)} ({r.runs})"),
            "—" if r.cpu_s is None else fmt(r.cpu_s * 1e3),
            "—" if r.kernel_s is None else fmt(r.kernel_s * 1e3),
            "—" if r.compile_s is None else ("reused" if r.compile_s == 0 else fmt(r.compile_s)),
            fmt(r.traj_error), "—" if r.worst_t is None else f"{r.worst_t:g}", transitions,
        ])
    return markdown_table(header, rows)


def _matched_table(analysis: dict) -> str:
    families = list(dict.fromkeys(f for row in analysis["matched"] for f in row["others"]))
    header = ["gflow setting", "its error", "evals", "wall [ms]"] + [
        f"{f}: evals × / wall × / CPU ×" for f in families
    ]
    rows = []
    for row in analysis["matched"]:
        cells = [row["gflow"], fmt(row["error"]), fmt(int(row["evaluations"])), fmt(row["wall"] * 1e3)]
        for f in families:
            o = row["others"].get(f)
            if o is None:
                cells.append("out of range")
            else:
                mark = " (fit)" if o["extrapolated"] else ""
                cells.append(f"{fmt(o['evaluations_ratio'])} / {fmt(o['wall_ratio'])} / "
                             f"{fmt(o['cpu_ratio'])}{mark}")
        rows.append(cells)
    return markdown_table(header, rows)


def _findings(data: dict) -> list[str]:
    """Observations computed from this run's numbers."""
    results = data["results"]
    by = {(r.family, r.knob): r for r in results}
    notes = []
    ref = data["reference"]
    if ref["transitions"] and ref["restart_difference"] is not None:
        notes.append(
            f"Resuming after a transition: the reference solver (Dopri8 rtol {ref['rtol']:g}, a "
            "step ending at every save time) run with the transitions strays "
            f"{fmt(ref['restart_difference'])} from the same run without them: after each "
            "transition gflow restarts from the dense-output state at the transition time, "
            "which carries the interpolant's error rather than the step's."
        )
    for rtol in sorted({r.knob for r in results if r.family == "gflow dopri8"}):
        plain = by[("gflow dopri8", rtol)]
        tsit5 = by.get(("gflow tsit5", rtol))
        clipped = by.get(("gflow dopri8, steps at save times", rtol))
        text = (f"Dopri8 at rtol {rtol:g}: save-grid error {fmt(plain.traj_error)} "
                f"({fmt(plain.traj_error / rtol)}× rtol, worst at t = {plain.worst_t:g})")
        if tsit5:
            text += (f", where Tsit5 at the same rtol reaches {fmt(tsit5.traj_error)} "
                     f"({fmt(tsit5.traj_error / rtol)}× rtol)")
        if clipped:
            text += (f"; with a step ending at every save time (no interpolation) Dopri8 reaches "
                     f"{fmt(clipped.traj_error)} with {clipped.evaluations:,} evaluations instead "
                     f"of {plain.evaluations:,}")
        if plain.traj_error > 10 * rtol and (tsit5 is None
                                             or plain.traj_error > 10 * tsit5.traj_error):
            text += (". The save-grid values come from diffrax's Dopri8 dense output, which is "
                     "far less accurate than its steps here")
        notes.append(text + ".")
    for rtol in sorted({r.knob for r in results if r.family == "gflow tsit5 + transitions"}):
        plain, chained = by.get(("gflow tsit5", rtol)), by.get(("gflow tsit5 + transitions", rtol))
        if plain and chained:
            notes.append(
                f"Tsit5 rtol {rtol:g}: locating the transitions costs "
                f"{chained.evaluations - plain.evaluations:+,} evaluations; the call takes "
                f"{fmt(chained.wall_s * 1e3)} ms against {fmt(plain.wall_s * 1e3)} ms "
                f"({chained.steps} steps in {chained.notes.split(',')[0]} against {plain.steps}); "
                f"worst transition-time error {fmt(max(chained.transition_errors or [math.nan]))}."
            )
    worst = [r.worst_t for r in results if r.worst_t is not None]
    if len(worst) >= 3:
        common = max(set(worst), key=worst.count)
        if worst.count(common) >= 0.8 * len(worst):
            notes.append(f"{worst.count(common)} of the {len(worst)} rows have their largest "
                         f"trajectory error at the same save time, t = {common:g}.")
    if data["overhead"]:
        extra = [o["gflow_call"] - o["gflow_program"] for o in data["overhead"]]
        program = [o["gflow_program"] - o["bare_call"] for o in data["overhead"]]
        def signed(seconds: float) -> str:
            return f"{fmt(abs(seconds) * 1e3)} ms {'more' if seconds >= 0 else 'less'}"

        notes.append(
            f"Outside its compiled program, a `gflow.solve` call spends {fmt(min(extra) * 1e3)}–"
            f"{fmt(max(extra) * 1e3)} ms on the host (validating and preparing the arguments, "
            "reading the results into host memory); its compiled program, with the transfer of "
            "its outputs, takes from " + signed(min(program)) + " to " + signed(max(program))
            + " than the bare diffrax call, whose outputs stay on the device."
        )
    return notes


def _workload_section(title: str, description: str, data: dict, analysis: dict,
                      figure: Path | None, notes: tuple[str, ...] = ()) -> list[str]:
    prob, ref = data["problem"], data["reference"]
    load = data.get("load_average")
    lines = [
        f"## {title}",
        "",
        description + f" {prob['save_times']} save times, t1 = {prob['t1']:g}. Every method "
        f"gets the same tolerances: atol = rtol × {prob['atol_scale']:.3e} (gflow's default: "
        "rtol times the RMS of the smallest initial trainable leaf).",
        "",
    ]
    if load:
        lines += [f"Load average (1 min) while this workload ran: {load['start'][0]:.2f} at its "
                  f"start, {load['end'][0]:.2f} at its end.", ""]
    lines += [
        f"**Reference.** {ref['solver']}, rtol {ref['rtol']:g}, {ref['steps']} steps, run "
        "through `gflow.solve` with `controller=diffrax.ClipStepSizeController(PIDController(...), "
        "step_ts=save times)`."
        + (" Checked against `scipy.integrate.solve_ivp` DOP853 (events for the transitions):"
           if data["cross_check"] else " Not cross-checked against scipy in this run."),
        "",
    ]
    if data["cross_check"]:
        lines += [
            markdown_table(
                ["scipy DOP853 rtol", "right-hand side", "max relative state difference",
                 "max transition-time difference"],
                [[f"{c['rtol']:g}", c["rhs"], fmt(c["state_difference"]),
                  fmt(c["transition_difference"])] for c in data["cross_check"]],
            ),
            "",
        ]
    lines += [
        "Reference transition times: "
        + ", ".join(f"{k} = {f'{v:.12g}' if math.isfinite(v) else 'not reached'}"
                    for k, v in ref["transitions"].items()) + ".",
        "",
    ]
    if data["evaluation_counts"]:
        lines += [
            "Reported evaluation counts against a host-callback counter in the loss (untimed "
            "runs; the observers use the uncounted loss):",
            "",
            markdown_table(["run", "counted", "reported"],
                           [[c["run"], c["counted"], c["reported"]]
                            for c in data["evaluation_counts"]]),
            "",
        ]
    torch_info = data.get("torchdiffeq") or {}
    if torch_info.get("check"):
        lines += [
            "**torchdiffeq's model** (`benchmarks/_torch.py`, float64, gradient by "
            "`torch.autograd.grad`) against gflow's velocity `-∇L`, untimed: relative "
            "difference " + ", ".join(f"{fmt(c['relative_difference'])} at t = {c['t']:g}"
                                      for c in torch_info["check"])
            + f" (t > 0: the reference state). torch {torch_info['versions']['torch']}, "
            f"torchdiffeq {torch_info['versions']['torchdiffeq']}; timed with "
            + " and ".join(f"`torch.set_num_threads({n})`" for n in torch_info["threads"])
            + " (XLA uses every usable core; see 'How it is measured'). One evaluation of "
            "the torch velocity took "
            + ", ".join(f"{fmt(sec * 1e3)} ms with {n} thread{'s' if int(n) > 1 else ''}"
                        for n, sec in torch_info["seconds_per_evaluation"].items())
            + (f" (best of up to 10); {', '.join(map(str, torch_info['skipped_threads']))} "
               "thread(s) took more than twice the fastest, so odeint was not run with that "
               "count." if torch_info["skipped_threads"] else " (best of up to 10)."),
            "",
        ]
    elif torch_info.get("skipped"):
        lines += [f"**torchdiffeq**: not run: {torch_info['skipped']}.", ""]
    lines += ["### Every method and setting", "", _results_table(data["results"]), ""]
    if figure is not None:
        lines += [f"![work–precision, {prob['name']}]({figure.name})", ""]
    if data["gd_fit"]:
        f = data["gd_fit"]
        etas = ", ".join(f"{r.knob:g}" for r in data["results"] if r.family == "GD (lax.scan)")
        lines += [
            f"GD: least-squares fit error = {f['fitted_c']:.3g} · η^{f['fitted_power']:.3f} over "
            f"η ∈ {{{etas}}}. Extrapolations use the first-order line error = {f['c']:.3g} · η "
            f"through the smallest η measured ({f['finest_eta']:g}), and "
            f"{fmt(f['seconds_per_step'] * 1e6)} µs wall ({fmt(f['cpu_seconds_per_step'] * 1e6)} "
            "µs CPU) per step measured there.",
            "",
        ]
    lines += [] if not analysis["matched"] else [
        "### Ratio to gflow at matched error",
        "",
        "For each trajectory-only gflow setting: what a competitor pays to reach the same "
        "trajectory error, as multiples of gflow's gradient evaluations and wall time. "
        "Interpolated log–log between the competitor's measured settings; GD beyond its "
        "measured range follows its first-order line (marked 'fit'); 'out of range' where the "
        "competitor's settings do not bracket that error.",
        "",
        _matched_table(analysis),
        "",
    ]
    if data["overhead"]:
        lines += [
            "### gflow against bare diffrax (same solver, tolerances, observers)",
            "",
            "Calls alternate (one gflow, one bare, repeated) so both see the same load; minimum "
            "of each. 'gflow program' is `stats['run_seconds']`, the compiled segment alone.",
            "",
            markdown_table(
                ["solver", "rtol", "pairs", "gflow call [ms]", "gflow program [ms]",
                 "bare call [ms]", "call ratio", "CPU ratio", "program ratio",
                 "steps gflow / bare", "state difference gflow vs bare"],
                [[o["solver"], f"{o['rtol']:g}", o["pairs"], fmt(o["gflow_call"] * 1e3),
                  fmt(o["gflow_program"] * 1e3), fmt(o["bare_call"] * 1e3),
                  f"{o['gflow_call'] / o['bare_call']:.2f}",
                  f"{o['gflow_cpu'] / o['bare_cpu']:.2f}",
                  f"{o['gflow_program'] / o['bare_call']:.2f}",
                  f"{o['gflow_steps']} / {o['bare_steps']}",
                  fmt(o["state_difference"])]
                 for o in data["overhead"]],
            ),
            "",
        ]
    findings = _findings(data)
    if findings:
        lines += ["### Observations from this run", ""] + [f"- {n}" for n in findings] + [""]
    if notes:
        lines += ["### Notes", ""] + [f"- {n}" for n in notes] + [""]
    return lines


METHODS_TEXT = [
    "## How it is measured",
    "",
    "- **Trajectory error**: the largest over the save grid of ‖θ(t) − θ_ref(t)‖ / ‖θ_ref(t)‖, "
    "θ all trainable parameters (final-state error alone would not do: GD reaches the same "
    "minimum along a wrong path). Errors near the reference's cross-check difference are at "
    "its floor.",
    "- **Transition-time error**: |t − t_ref| per transition. gflow: its `gflow.Transition`s "
    "(timed, rows '+ transitions'). scipy: `events` (the same conditions, jitted) in a separate "
    "untimed run at the same settings. GD: the first step at which the condition changes sign, "
    "linearly interpolated between the two steps (bracketed on the save grid, then that block "
    "of steps replayed untimed).",
    "- **GD on the save grid**: GD's iterate k is compared with the flow at t = k·η. Every save "
    "time is a multiple of every η used, so the iterate nearest each save time sits exactly on "
    "it: no interpolation, no time offset.",
    "- **Wall time** excludes compilation: the minimum over repeated calls after a first, "
    "compiling call, with the median of the same calls and their number next to it (the "
    "number of calls is capped by a time budget: long GD runs are timed once). On a shared "
    "machine the minimum is the least disturbed call; a median far above it means other jobs "
    "competed for the cores. 'compile' is the first call's compile time ('reused': a program "
    "compiled for an earlier row served). gflow: the whole `gflow.solve` call; 'in program' is its "
    "`stats['run_seconds']`. Bare diffrax: `eqx.filter_jit(diffeqsolve)` compiled ahead of "
    "time, same solver, `PIDController`, rtol, atol, and the same observers through "
    "`SaveAt(ts=..., fn=...)`. GD: one `lax.scan` program per η, saving at each save time. "
    "optax: `optax.sgd` stepped from a Python loop over a jitted step, with a host transfer at "
    "each save time, as a training script logs. scipy: `solve_ivp(..., t_eval=save times)` "
    "with a jitted JAX right-hand side on flat float64 vectors (compile: the jit's first call) "
    "or a hand-written numpy one. torchdiffeq: `torchdiffeq.odeint(f, y0, save times, rtol, "
    "atol, method='dopri5')` under `torch.no_grad()`, `f` the same model written in PyTorch "
    "(float64) returning `-∇L` by `torch.autograd.grad`, timed with torch's threads set to "
    "the cores XLA uses (`torch.set_num_threads`) and to one: torch's OpenMP regions spin at "
    "a barrier, so when other jobs hold a core more threads can be far slower; the faster is "
    "torch's best case. Its rhs agrees with gflow's to ~1e-16 (checked untimed in each run). "
    "gflow dopri5 rows use the same method as torchdiffeq.",
    "- **Gradient evaluations**: gflow: `stats['vector_field_evaluations']`; bare diffrax: the "
    "same count from its steps; GD and optax: one per step; scipy and torchdiffeq: calls of the "
    "right-hand side (counted by a wrapper, dense-output stages included).",
    "",
]


def _mib(x: float) -> str:
    return f"{x / 2**20:.1f}"


def _memory_target(rows: list[dict] | None) -> list:
    target = "peak memory of a solve with 1000 save times independent of the step count"
    if not rows:
        return [target, "not measured in this run (`python -m benchmarks.run --only memory`)",
                "—"]
    parts, verdicts = [], []
    for v in memory.verdict(rows):
        verdicts.append(v["independent"])
        parts.append(
            f"{v['problem']}: {v['steps'][0]:,} to {v['steps'][1]:,} steps "
            f"({v['step_ratio']:.0f}×); the measured solve's peak RSS exceeds its few-step "
            f"warm-up's by at most {_mib(v['rss_growth_after_warm_up'])} MiB, where one state "
            f"kept per step would add {_mib(v['per_step_storage'])} MiB; "
            + ("the compiled program and its `memory_analysis()` are the same for every "
               "setting" if v["same_program"] else "the programs differ between settings")
            + ("" if v["independent"] is not None else
               " (steps differ by less than 10×: no verdict)")
        )
    met = None if None in verdicts else all(verdicts)
    return [target, "; ".join(parts), {True: "met", False: "**not met**", None: "—"}[met]]


def _memory_section(rows: list[dict], load: dict) -> list[str]:
    def analysis(r, key):
        a = r["memory_analysis"]
        return fmt(int(a[key])) if isinstance(a, dict) and key in a else "—"

    lines = [
        "## Peak memory against the number of steps (1000 save times)",
        "",
        "Each row is a fresh process (`python -m benchmarks.memory SPEC`): build the preset's "
        "problem, solve once at rtol 1e-3 with the same 1000 save times (compiles the "
        "program and runs a few steps), read the peak RSS, solve at the row's "
        "rtol with the same compiled program, read the peak RSS again (`VmHWM`: the "
        "process's high-water mark of resident memory). Observers: the loss and "
        "the parameter norm at each save time. 'memory_analysis' is the compiled segment "
        "program's (`jax.stages.Compiled.memory_analysis()`, bytes). Load average (1 min): "
        f"{load['start'][0]:.2f} at the start, {load['end'][0]:.2f} at the end.",
        "",
        markdown_table(
            ["problem", "t1", "rtol", "steps", "warm-up steps", "solve [s]",
             "peak RSS after warm-up [MiB]", "peak RSS after solve [MiB]", "growth [MiB]",
             "temp bytes", "argument bytes", "output bytes"],
            [[r["problem"], f"{r['t1']:g}", f"{r['rtol']:g}", fmt(int(r["steps"])),
              r["warm_up_steps"], fmt(r["solve_seconds"]), _mib(r["rss_after_warm_up"]),
              _mib(r["rss_peak"]), _mib(r["rss_peak"] - r["rss_after_warm_up"]),
              analysis(r, "temp"), analysis(r, "argument"), analysis(r, "output")]
             for r in rows],
        ),
        "",
    ]
    for v in memory.verdict(rows):
        lines.append(
            f"- {v['problem']}: steps {v['steps'][0]:,} to {v['steps'][1]:,} "
            f"({v['step_ratio']:.1f}×); peak RSS spread between processes "
            f"{_mib(v['rss_spread'])} MiB (process-to-process noise: allocator and thread "
            f"start-up), growth beyond the warm-up at most "
            f"{_mib(v['rss_growth_after_warm_up'])} MiB against "
            f"{_mib(v['per_step_storage'])} MiB for one state per extra step: "
            + {True: "independent of the step count.", False: "grows with the step count.",
               None: "no verdict (steps differ by less than 10×)."}[v["independent"]]
        )
    return lines + [""]


def _sweep_summary(data: dict) -> str:
    """The fastest way through the sweep, and map against vmap, from this run's numbers."""
    rows = {r["method"]: r for r in data["rows"]}
    loop = data["rows"][0]
    best = min(data["rows"], key=lambda r: r["wall"])
    if best is loop:
        text = "Fastest here: the Python loop of `gflow.solve` itself (compile excluded)."
    else:
        text = (f"Fastest here: {best['method']}, {loop['wall'] / best['wall']:.2f}× the "
                "Python loop's throughput (compile excluded).")
    mapped, vmapped = rows.get('gflow.sweep(batch="map")'), rows.get('gflow.sweep(batch="vmap")')
    if mapped and vmapped:
        faster = "vmap" if vmapped["wall"] < mapped["wall"] else "map"
        text += (f" On this CPU `{faster}` beat the other by "
                 f"{max(mapped['wall'], vmapped['wall']) / min(mapped['wall'], vmapped['wall']):.2f}× "
                 f"({fmt(mapped['wall'])} s map, {fmt(vmapped['wall'])} s vmap; members' step "
                 f"counts differ by at most {data['step_spread']:.1f}× here, so lock-step costs "
                 "little).")
    return text


def _sweep_section(data: dict, load: dict, command: str) -> list[str]:
    rows = data["rows"]
    loop = rows[0]
    lines = [
        "## Issue 6: throughput of a sweep on CPU",
        "",
        f"Measured by `{command}` (alone: `python -m benchmarks.run --only sweep`). "
        f"{data['members']} members: the "
        "two-layer 16×16×16 linear network of (a) (target singular values 4, 3, 2, 1; the four "
        "half-rise times are the transitions), init scale ε ∈ {"
        + ", ".join(f"{e:.3g}" for e in data["eps"]) + "} × init seeds "
        f"{data['seeds'][0]}–{data['seeds'][-1]}, each solved with {data['solver']} at rtol "
        f"{data['rtol']:g} to t1 = {data['t1']:g} with its transitions located and only the "
        "final state observed. 'Python loop' is "
        "`[gflow.solve(make_flow(**p), t1, transitions=...) for p in points]`; the others are "
        "one `gflow.sweep(make_flow, over, t1, batch=...)` call. The first call of each "
        "compiles ('compile' as reported by gflow, 'first call' the whole first call); the "
        "timed calls reuse the program. Wall time: minimum / median of the timed calls. "
        f"Devices: {', '.join(data['devices'])}. Load average (1 min): "
        f"{load['start'][0]:.2f} at the start, {load['end'][0]:.2f} at the end.",
        "",
        markdown_table(
            ["method", "compile [s]", "first call [s]", "wall [s] min / median (calls)",
             "CPU [s]", "in program [s]", "members / s", "speed-up vs Python loop",
             "steps (all members)", "completed", "max |t − t_loop| over all transitions"],
            [[r["method"], fmt(r["compile_seconds"]), fmt(r["first_call"]),
              f"{fmt(r['wall'])} / {fmt(r['wall_median'])} ({r['runs']})", fmt(r["cpu"]),
              fmt(r["in_program"]), fmt(data["members"] / r["wall"]),
              f"{loop['wall'] / r['wall']:.2f}×", fmt(int(r["steps"])),
              f"{r['completed']} / {data['members']}", fmt(r["max_difference"])]
             for r in rows],
        ),
        "",
        _sweep_summary(data),
        "",
        "Transition times reached: " + ", ".join(
            f"{n} {fmt(a)}–{fmt(b)}" for n, (a, b) in data["transition_range"].items())
        + f" ({data['reached']} of {data['members'] * len(data['transitions'])} reached).",
        "",
        "GPU: no GPU or TPU was available to this benchmark run (the session that wrote this "
        "harness was not lent one), so `vmap` on an accelerator is not measured; on a machine "
        "with one, `python -m benchmarks.run --only sweep` times the same rows there "
        "(`batch=\"auto\"` picks `vmap` on GPU/TPU).",
        "",
    ]
    return lines


def write_report(path: Path, *, command: str, info: dict, loads: dict, sections: list,
                 cli: list[dict] | None, memory_rows: list[dict] | None,
                 sweep_data: dict | None, quick: bool, seconds: float,
                 cpu_seconds: float) -> None:
    lines = ["# gflow benchmarks (issues 7 and 6)", ""]
    if quick:
        lines += ["**Quick run** (`--quick`): few settings and a short horizon; a smoke test of "
                  "the harness, not the published numbers.", ""]
    lines += [
        f"Reproduce: `{command}` from the repository root (took {seconds / 60:.1f} min wall, "
        f"{cpu_seconds / 60:.1f} min CPU in the benchmark process, here). "
        "Every number below comes from that one run; `results.json` next to this file holds "
        "them all. torchdiffeq rows need `pip install -e '.[bench]'` (torch 2.13.0, "
        "torchdiffeq 0.2.5; see the README's note on a CPU-only torch).",
        "",
        "## Machine",
        "",
        markdown_table(["", ""], [
            ["CPU", info["cpu"]],
            ["cores", f"{info['logical_cores']} logical, {info['usable_cores']} usable"],
            ["JAX backend", f"{info['jax_backend']} ({', '.join(info['jax_devices'])})"],
            ["versions", ", ".join(f"{k} {v}" for k, v in info["versions"].items())
             + f", python {info['python']}"],
            ["platform", info["platform"]],
            ["date", info["date"]],
            ["gflow commit", info["commit"]],
            ["load average (1, 5, 15 min)",
             f"start {', '.join(f'{x:.2f}' for x in loads['start'])}; "
             f"end {', '.join(f'{x:.2f}' for x in loads['end'])}"],
        ]),
        "",
        "The machine was shared with other jobs (a load average above the core count means "
        "other processes competed for the CPU), so wall times are minima over repeated calls, "
        "with medians beside them, and still carry noise of tens of percent; evaluation counts "
        "and errors are exact and reproducible.",
        "",
        "## Issue 7's targets against what was measured",
        "",
    ]
    rows = []
    for _, _, _, analysis, _ in sections:
        for t in analysis["targets"]:
            verdict = {True: "met", False: "**not met**", None: "—"}[t["met"]]
            rows.append([t["target"], t["measured"], verdict])
    measured = {name for name, *_ in sections}
    if "cooccurrence" not in measured:
        rows.append(["targets on (b): GD, scipy DOP853 ≥3×, torchdiffeq ≥2×, overhead",
                     "(b) not measured in this run", "—"])
    if cli:
        cold, warm = cli[0], cli[-1]
        rows.append([
            "compile time of the default CLI run, cold and with the persistent cache warm",
            f"`{cold['preset']}` preset: cold {fmt(cold['compile_seconds'])} s compile "
            f"({fmt(cold['process_seconds'])} s whole process); warm {fmt(warm['compile_seconds'])} "
            f"s compile ({fmt(warm['process_seconds'])} s whole process)",
            "reported",
        ])
    else:
        rows.append(["compile time of the default CLI run, cold and warm",
                     "not measured in this run", "—"])
    rows.append(_memory_target(memory_rows))
    lines += [markdown_table(["target", "measured", "verdict"], rows), ""]
    lines += METHODS_TEXT
    for name, title, module, analysis, (data, figure) in sections:
        lines += _workload_section(title, module.DESCRIPTION, data, analysis, figure,
                                   getattr(module, "NOTES", ()))
    if cli:
        lines += [
            "## Compile time of the default CLI run",
            "",
            f"`python -m gflow.solve --quiet` (the default preset, `{cli[0]['preset']}`) twice, "
            "each in a fresh process, with `GFLOW_CACHE_DIR` pointing at an empty directory "
            "before the first:",
            "",
            markdown_table(["run", "compile [s]", "solve [s]", "whole process [s]", "steps"],
                           [[c["run"], fmt(c["compile_seconds"]), fmt(c["run_seconds"]),
                             fmt(c["process_seconds"]), c["steps"]] for c in cli]),
            "",
        ]
    if memory_rows:
        lines += _memory_section(memory_rows, loads["memory"])
    if sweep_data:
        lines += _sweep_section(sweep_data, loads["sweep"], command)
    missing = []
    for name, text in (
        ("deep-linear", "(a) the deep linear network"),
        ("cooccurrence", "(b) the co-occurrence Transformer (`cooccurrence` preset)"),
        ("rank-collapse", "(c) the `rank-collapse` preset"),
    ):
        if name not in measured:
            missing.append(f"- {text}: not measured in this run "
                           f"(`python -m benchmarks.run --only {name}`).")
    skipped = {d.get("torchdiffeq", {}).get("skipped") for _, _, _, _, (d, _) in sections}
    skipped.discard(None)
    missing += [f"- torchdiffeq: {why}." for why in sorted(skipped)]
    missing.append("- `optax.sgd` on (b) and (c): not run (a Python loop of tens of thousands "
                   "to millions of steps adds minutes and nothing that (a) does not show).")
    if not memory_rows:
        missing.append("- Peak memory against the number of steps: not measured in this run "
                       "(`--only memory`).")
    if not sweep_data:
        missing.append("- Issue 6's sweep throughput: not measured in this run (`--only sweep`).")
    missing.append("- Issue 6 on a GPU (`vmap`): no accelerator available here.")
    lines += ["## Not measured", ""] + missing + [""]
    path.parent.mkdir(parents=True, exist_ok=True)
    # The section of `python -m benchmarks.solvers` (issue 14) is its own run, and the
    # hand-written sections after it are other commands' measurements: carry them over.
    from .solvers import kept_section

    kept = kept_section(path)
    path.write_text("\n".join(lines) + ("\n\n" + kept if kept else ""))


def _jsonable(x):
    if dataclasses.is_dataclass(x):
        return _jsonable(dataclasses.asdict(x))
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


def _gd_extrapolation(data: dict):
    f = data["gd_fit"]
    gd = [r.traj_error for r in data["results"] if r.family == "GD (lax.scan)"]
    if not f or not gd:
        return []
    errors = np.geomspace(min(gd), 1e-11, 20)
    steps = data["problem"]["t1"] / (errors / f["c"])
    return [("GD, first-order line", errors, steps, steps * f["seconds_per_step"],
             steps * f["cpu_seconds_per_step"])]


def _torchdiffeq_only(settings):
    """The rows torchdiffeq is compared with: gflow tsit5 and dopri5 at its tolerances."""
    keep = set(settings.torchdiffeq_rtols)
    return dataclasses.replace(
        settings,
        gflow_runs=tuple(r for r in settings.gflow_runs
                         if r[0] in ("tsit5", "dopri5") and r[1] in keep and not (r[2] or r[3])),
        bare_runs=(), gd_etas=(), optax_etas=(), scipy_runs=(), cross_check_rtols=(),
        count_evaluations=False,
    )


def _workloads(selected: list[str], quick: bool) -> list[tuple]:
    """`(name, tag, module, problem, settings)` of the flow workloads to run."""
    torch_only = selected == ["torchdiffeq"]
    specs = []
    if "deep-linear" in selected or torch_only:
        settings = deep_linear.quick_settings() if quick else deep_linear.full_settings()
        specs.append(("deep-linear", "(a)", deep_linear, lambda: deep_linear.build(quick),
                      settings))
    if "cooccurrence" in selected or (torch_only and not quick):
        specs.append(("cooccurrence", "(b)", cooccurrence, cooccurrence.build,
                      cooccurrence.full_settings()))
    if "rank-collapse" in selected:
        settings = rank_collapse.quick_settings() if quick else rank_collapse.full_settings()
        specs.append(("rank-collapse", "(c)", rank_collapse, rank_collapse.build, settings))
    if torch_only:
        specs = [(n, t, m, b, _torchdiffeq_only(s)) for n, t, m, b, s in specs]
    return specs


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.quick and args.only == "cooccurrence":
        _parser().error("the cooccurrence workload has no --quick variant")
    if args.quick and args.only == "cli-compile":
        _parser().error("cli-compile has no --quick variant")
    if args.out is not None:
        out = args.out
    elif args.quick:
        out = Path(tempfile.mkdtemp(prefix="gflow-bench-")) / "RESULTS.md"
    else:
        out = RESULTS_DIR / SUITE / "report.md"
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.run" + (" --quick" if args.quick else "") + (
        f" --only {args.only}" if args.only else "")
    log = lambda s: print(s, flush=True)  # noqa: E731
    start, start_cpu = time.perf_counter(), time.process_time()
    loads = dict(start=load_average())
    info = machine()
    log(f"machine: {info['cpu']}, {info['usable_cores']} cores, load {loads['start']}")

    selected = [args.only] if args.only else list(QUICK if args.quick else WORKLOADS)
    sections, cli, memory_rows, sweep_data = [], None, None, None
    for name, tag, module, build, settings in _workloads(selected, args.quick):
        data = run_workload(build(), settings, log=log)
        analysis = analyse(data, tag)
        figure = out.parent / f"{name}-work-precision.png"
        work_precision_figure(data["results"], figure,
                              f"{tag} {name}, {data['problem']['parameters']:,} parameters, "
                              f"t1={data['problem']['t1']:g}",
                              _gd_extrapolation(data), target_error=TARGET_ERROR)
        title = f"{tag} {name}: {data['problem']['parameters']:,} parameters"
        sections.append((name, title, module, analysis, (data, figure)))
    if "memory" in selected:
        log("memory:")
        loads["memory"] = dict(start=load_average())
        memory_rows = memory.run(
            memory.quick_settings() if args.quick else memory.full_settings(), log)
        loads["memory"]["end"] = load_average()
    if "sweep" in selected:
        loads["sweep"] = dict(start=load_average())
        sweep_data = sweep_benchmark.run(
            sweep_benchmark.quick_settings() if args.quick else sweep_benchmark.full_settings(),
            log)
        loads["sweep"]["end"] = load_average()
    if "cli-compile" in selected and not args.quick:
        log("cli-compile:")
        cli = cli_compile(log)
    loads["end"] = load_average()
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - start_cpu
    write_report(out, command=command, info=info, loads=loads, sections=sections, cli=cli,
                 memory_rows=memory_rows, sweep_data=sweep_data, quick=args.quick,
                 seconds=seconds, cpu_seconds=cpu_seconds)
    data = _jsonable(dict(
        command=command, machine=info, load_average=loads, seconds=seconds,
        workloads={name: dict(data=d, analysis=a) for name, _, _, a, (d, _) in sections},
        cli_compile=cli, memory=memory_rows,
        memory_verdict=memory.verdict(memory_rows) if memory_rows else None,
        sweep=sweep_data,
    ))
    (out.parent / "results.json").write_text(json.dumps(data, indent=1))
    rows, figures = suite_rows(data, out.parent)
    write_suite(SUITE, title=SUITE_TITLE, command=command, machine=info, rows=rows,
                summary=SUITE_SUMMARY, figures=figures,
                directory=out.parent if args.quick or args.out else RESULTS_DIR)
    log(f"wrote {out} ({seconds:.0f} s)")
    return 0


SUITE_TITLE = "Exact flow against gradient descent, bare diffrax, scipy and torchdiffeq"
SUITE_SUMMARY = (
    "Three problems: (a) `deep-linear` (512 parameters), (b) `cooccurrence` (57,344), (c) "
    "the two-stage attention model of Chen & Luo's theorems (264). Every method is scored by "
    "its largest relative state error over the save grid against a Dopri8 reference at rtol "
    "1e-12 (cross-checked with scipy's DOP853); gradient descent's iterate k is compared with the flow at t = kη. Wall times "
    "exclude compilation. The detailed tables (every method and setting, matched-error "
    "ratios) are in the run's `report.md` beside its JSON.")


def suite_rows(data: dict, figures_dir: Path) -> tuple[list[dict], list[Path]]:
    """The results page's rows of one run's `results.json` (`data`), and its figures (in
    `figures_dir`)."""
    rows = []
    for name, w in data["workloads"].items():
        for t in w["analysis"]["targets"]:
            rows.append(dict(quantity=t["target"], value=t["measured"],
                             verdict={True: "met", False: "not met"}.get(t["met"], "reported")))
    for run in data.get("cli_compile") or ():
        rows.append(dict(quantity=f"compile seconds of the default CLI run, {run['run']}",
                         value=run["compile_seconds"], unit="s",
                         detail=f"`{run['preset']}` preset; whole process "
                                f"{run['process_seconds']:.1f} s, "
                                f"solve {run['run_seconds']:.1f} s"))
    for m in data.get("memory") and data.get("memory_verdict") or ():
        rows.append(dict(
            quantity=f"peak memory growth over {m['steps'][0]}–{m['steps'][1]} steps, "
                     f"{m['problem']} (1000 save times)",
            value=m["rss_growth_after_warm_up"] / 2**20, unit="MiB",
            detail=f"one state kept per step would add {m['per_step_storage'] / 2**20:.1f} MiB; "
                   f"same compiled program for every setting: {m['same_program']}"))
    sweep = data.get("sweep")
    for r in (sweep or {}).get("rows", ()):
        rows.append(dict(
            quantity=f"sweep of {sweep['members']} deep-linear members: {r['method']}",
            value=r["wall"], unit="s",
            detail=f"compile {r['compile_seconds']:.1f} s; {r['completed']} completed, "
                   f"{r['steps']:,} steps; largest transition-time difference "
                   f"{r['max_difference']:.1e}"))
    figures = [figures_dir / f"{name}-work-precision.png" for name in data["workloads"]]
    return rows, [f for f in figures if f.is_file()]


if __name__ == "__main__":
    sys.exit(main())
