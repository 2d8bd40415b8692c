"""Issue 14: `solver="auto"` (Tsit5 / DOP853) against scipy's DOP853 at matched trajectory error.

    python -m benchmarks.solvers                     # (a), (b), (c): benchmarks/results/auto-solver*
    python -m benchmarks.solvers --only deep-linear  # one workload (the others' rows are kept)
    python -m benchmarks.solvers --quick --out /tmp/solvers   # the smoke test's run

On each workload of `benchmarks.run` (same problem, save grid, tolerances atol = rtol × scale,
reference and error measure): gflow with `solver="auto"` over a range of rtol, gflow DOP853
and Tsit5 beyond auto's switch (to locate the crossover), scipy's DOP853 with a jitted JAX
right-hand side and, where torch is installed, torchdiffeq's dopri5 on the workload's PyTorch
model, all in one process, interleaved by tolerance. Reported: gradient evaluations and wall
time of each at matched error (interpolated log–log on the competitor's curve), the
crossover, and the evaluations against an estimated physical limit (see `_limit`).

Writes the detailed report (a block delimited by `BEGIN`/`END` markers in `report.md`,
replacing the previous one), `solvers.json` (every number) and one work–precision figure per
workload into `benchmarks/results/auto-solver/`, and the results page's rows into
`benchmarks/results/auto-solver.json` (`benchmarks.results_page`).
"""

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from gflow.internal import AUTO_CROSSOVER_RTOL, AUTO_DOP853_ERROR_SCALE

from .results_page import RESULTS_DIR, write_suite

from . import cooccurrence, deep_linear, rank_collapse
from ._harness import (
    Result,
    best_time,
    fmt,
    interpolate_cost,
    load_average,
    machine,
    markdown_table,
    work_precision_figure,
)
from ._workload import (
    TorchDiffeq,
    _Counted,
    _error,
    _jax_rhs,
    gflow_solve,
    reference,
    scipy_solve,
    torchdiffeq_missing,
)

HERE = Path(__file__).resolve().parent
REPORT = "report.md"
BEGIN = "<!-- solvers:begin (python -m benchmarks.solvers) -->"
END = "<!-- solvers:end -->"
# Butcher's bound: an explicit Runge–Kutta method of order 8 has at least 11 stages.
STAGES_OF_ORDER_8 = 11


@dataclasses.dataclass(frozen=True)
class Plan:
    """What to run on one workload: `(family, solver, rtols)` of gflow, scipy DOP853's and
    torchdiffeq dopri5's rtols."""

    gflow: tuple[tuple[str, str, tuple[float, ...]], ...]
    scipy_rtols: tuple[float, ...]
    torchdiffeq_rtols: tuple[float, ...]
    repeats: int
    budget_s: float
    reference_rtol: float = 1e-12


def _plan(auto_rtols, tsit5_rtols, dop853_rtols, scipy_rtols, torchdiffeq_rtols, repeats,
          budget_s) -> Plan:
    return Plan(
        gflow=(("gflow auto", "auto", auto_rtols), ("gflow tsit5", "tsit5", tsit5_rtols),
               ("gflow dop853", "dop853", dop853_rtols)),
        scipy_rtols=scipy_rtols, torchdiffeq_rtols=torchdiffeq_rtols, repeats=repeats,
        budget_s=budget_s,
    )


def _workloads(quick: bool) -> dict[str, tuple]:
    """`name: (tag, build, plan)`.

    torchdiffeq's rtols bracket the errors auto reaches (dopri5 is 5th order: on (c) it needs
    rtol 1e-13, about 19,000 evaluations and 20 s a call on a quiet machine, for 7e-10).
    """
    if quick:
        return {"deep-linear": ("(a)", lambda: deep_linear.build(True), _plan(
            (1e-6, 1e-10), (1e-10,), (1e-6,), (1e-6, 1e-8, 1e-10), (1e-6, 1e-8, 1e-10), 2,
            0.3))}
    return {
        "deep-linear": ("(a)", lambda: deep_linear.build(False), _plan(
            (1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10, 1e-11),
            (1e-9, 1e-10), (1e-5, 1e-6, 1e-7),
            (1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10, 1e-11, 1e-12),
            (1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10, 1e-11, 1e-12), 5, 1.0)),
        "cooccurrence": ("(b)", cooccurrence.build, _plan(
            (1e-4, 1e-6, 1e-8, 1e-9, 1e-10), (1e-9,), (1e-6, 1e-7),
            (1e-4, 1e-6, 1e-8, 1e-9, 1e-10, 1e-11), (1e-4, 1e-6, 1e-8, 1e-9, 1e-10), 1, 5.0)),
        "rank-collapse": ("(c)", rank_collapse.build, _plan(
            (1e-6, 1e-7, 1e-8, 1e-9, 1e-10, 1e-11), (1e-9, 1e-10), (1e-6, 1e-7),
            (1e-6, 1e-7, 1e-8, 1e-9, 1e-10, 1e-11, 1e-12),
            (1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10, 1e-11, 1e-12, 1e-13), 3, 1.0)),
    }


def _run_gflow(p, ref_state, family, solver, rtol, plan) -> Result:
    call = lambda: gflow_solve(p, solver, rtol, False)  # noqa: E731
    first = call()
    timing = best_time(call, repeats=plan.repeats, budget_s=plan.budget_s)
    traj = timing.outputs[-1]
    if traj.status != "completed":
        raise RuntimeError(f"{family} rtol={rtol}: {traj.status} {traj.message}")
    return Result(
        family=family, setting=f"rtol={rtol:g}", knob=rtol, **timing.result_fields,
        kernel_s=min(t.stats["run_seconds"] for t in timing.outputs),
        compile_s=first.stats["compile_seconds"],
        evaluations=traj.stats["vector_field_evaluations"], steps=traj.stats["num_steps"],
        **_error(traj.observables["state"], ref_state, p.ts),
        notes=f"{traj.solver}; {traj.stats['num_accepted_steps']} accepted, "
        f"{traj.stats['num_rejected_steps']} rejected",
    )


def _run_scipy(p, ref_state, rhs, rtol, plan) -> Result:
    def call():
        counted = _Counted(rhs)
        return scipy_solve(counted, p, "DOP853", rtol, p.atol(rtol)), counted.count

    timing = best_time(call, repeats=plan.repeats, budget_s=plan.budget_s)
    sol, count = timing.outputs[-1]
    if not sol.success:
        raise RuntimeError(f"scipy DOP853 rtol={rtol}: {sol.message}")
    return Result(
        family="scipy DOP853 (jax rhs)", setting=f"rtol={rtol:g}", knob=rtol,
        **timing.result_fields, kernel_s=None, compile_s=None, evaluations=count, steps=None,
        **_error(sol.y.T, ref_state, p.ts), notes="",
    )


def _accepted(r: Result) -> int:
    return int(r.notes.split("; ")[1].split(" accepted")[0])


def _dop853_rows(results):
    """DOP853's curve: the raw `dop853` rows and auto's rows below the switch (the same method;
    auto's error scale only moves along the curve)."""
    return [r for r in results if r.family == "gflow dop853"
            or (r.family == "gflow auto" and r.knob < AUTO_CROSSOVER_RTOL)]


def _tsit5_rows(results):
    return [r for r in results if r.family == "gflow tsit5"
            or (r.family == "gflow auto" and r.knob >= AUTO_CROSSOVER_RTOL)]


def _limit(results, error: float) -> float | None:
    """Estimated fewest evaluations of an 8th-order method at trajectory error `error`.

    DOP853's *accepted* steps at that error (interpolated log–log over its runs) stand for an
    ideal step sequence: a step-size controller that equidistributes the local error is the
    optimum for a given number of steps, so what an ideal sequence saves over DOP853's is its
    rejected steps and its start from a 0.01 step, not its accepted ones. Each step then costs
    the 11 stages that Butcher's bound requires of any explicit 8th-order Runge–Kutta method,
    and values at save times come free (no dense-output stages): a lower bound for methods of
    DOP853's accuracy per step, not for every conceivable method.
    """
    rows = _dop853_rows(results)
    steps = interpolate_cost([r.traj_error for r in rows], [_accepted(r) for r in rows], error)
    return None if steps is None else STAGES_OF_ORDER_8 * steps


def _crossover(results) -> dict | None:
    """The trajectory error below which DOP853 needs fewer evaluations than Tsit5."""
    ts5, d8 = _tsit5_rows(results), _dop853_rows(results)
    errors = np.geomspace(1e-3, 1e-13, 401)
    diff = []
    for e in errors:
        a = interpolate_cost([r.traj_error for r in ts5], [r.evaluations for r in ts5], e)
        b = interpolate_cost([r.traj_error for r in d8], [r.evaluations for r in d8], e)
        diff.append(None if a is None or b is None else math.log(a / b))
    known = [(e, d) for e, d in zip(errors, diff) if d is not None]
    if not known:
        return None
    for (e0, d0), (e1, d1) in zip(known, known[1:]):
        if d0 <= 0 < d1:
            e = math.exp(math.log(e0) + (math.log(e1) - math.log(e0)) * (-d0) / (d1 - d0))
            return dict(error=e, range=[known[0][0], known[-1][0]], kind="crossing")
    kind = "Tsit5 cheaper throughout" if known[-1][1] <= 0 else (
        "DOP853 cheaper throughout" if known[0][1] > 0 else "no single crossing")
    return dict(error=None, range=[known[0][0], known[-1][0]], kind=kind)


def _torchdiffeq_best(results) -> list[Result]:
    """torchdiffeq dopri5's rows, at each rtol the faster of its thread counts (its best case;
    the thread count changes its speed, not its steps)."""
    best: dict[float, Result] = {}
    for r in results:
        if r.family.startswith("torchdiffeq dopri5") and (
                r.knob not in best or r.wall_s < best[r.knob].wall_s):
            best[r.knob] = r
    return [best[k] for k in sorted(best)]


def analyse(results, name: str = "") -> dict:
    scipy = [r for r in results if r.family == "scipy DOP853 (jax rhs)"]
    torch = _torchdiffeq_best(results)
    rows = []
    for r in sorted((r for r in results if r.family == "gflow auto"), key=lambda r: -r.knob):
        e = r.traj_error
        se = interpolate_cost([s.traj_error for s in scipy], [s.evaluations for s in scipy], e)
        sw = interpolate_cost([s.traj_error for s in scipy], [s.wall_s for s in scipy], e)
        sc = interpolate_cost([s.traj_error for s in scipy], [s.cpu_s for s in scipy], e)
        limit = _limit(results, e)
        rows.append(dict(
            rtol=r.knob, solver=r.notes.split(";")[0], error=e, evaluations=r.evaluations,
            wall_s=r.wall_s, cpu_s=r.cpu_s, scipy_evaluations=se, scipy_wall_s=sw,
            evaluation_ratio=None if se is None else r.evaluations / se,
            wall_speedup=None if sw is None else sw / r.wall_s,
            cpu_speedup=None if sc is None else sc / r.cpu_s,
            limit=limit, over_limit=None if limit is None else r.evaluations / limit,
        ))
        if torch:
            te = interpolate_cost([t.traj_error for t in torch], [t.evaluations for t in torch], e)
            tw = interpolate_cost([t.traj_error for t in torch], [t.wall_s for t in torch], e)
            rows[-1].update(
                torch_evaluations=te, torch_wall_s=tw,
                torch_evaluation_ratio=None if te is None else r.evaluations / te,
                torch_wall_speedup=None if tw is None else tw / r.wall_s,
            )
    return dict(matched=rows, crossover=_crossover(results))


def run_workload(name, tag, build, plan, log) -> dict:
    p = build()
    log(f"{name}: {p.size} parameters, {len(p.ts)} save times, t1={p.t1:g}")
    load_start = load_average()
    start = time.perf_counter()
    ref = reference(p, plan.reference_rtol, separate_state=False)
    log(f"  reference: {ref.steps} steps ({time.perf_counter() - start:.0f} s)")
    results = []
    rhs, _ = _jax_rhs(p)
    skipped = torchdiffeq_missing(p)
    if skipped:
        log(f"  torchdiffeq skipped: {skipped}")
    torch = None if skipped or not plan.torchdiffeq_rtols else TorchDiffeq(
        p, ref, plan.repeats, plan.budget_s, jax_rhs=rhs)
    torch_info = dict(skipped=skipped, **({} if torch is None else torch.info))

    def record(r: Result) -> None:
        results.append(r)
        log(f"  {r.family} {r.setting}: {r.evaluations} evals, error {r.traj_error:.2e}, "
            f"{r.wall_s * 1e3:.1f} ms")

    # Interleaved by tolerance, so that gflow, scipy and torchdiffeq see about the same load.
    for rtol in sorted({r for _, _, rs in plan.gflow for r in rs} | set(plan.scipy_rtols)
                       | set(plan.torchdiffeq_rtols), reverse=True):
        for family, solver, rtols in plan.gflow:
            if rtol in rtols:
                record(_run_gflow(p, ref.state, family, solver, rtol, plan))
        if rtol in plan.scipy_rtols:
            record(_run_scipy(p, ref.state, rhs, rtol, plan))
        if torch is not None and rtol in plan.torchdiffeq_rtols:
            for threads in torch.threads:
                record(torch(rtol, threads))
    return dict(name=name, tag=tag, parameters=p.size, save_times=len(p.ts), t1=p.t1,
                seconds=time.perf_counter() - start, date=machine()["date"],
                atol_scale=p.scale, reference_steps=ref.steps, results=results,
                torchdiffeq=torch_info, analysis=analyse(results, name),
                load_average=dict(start=load_start, end=load_average()))


# ---------------------------------------------------------------------------------------------
# Report


def _section(workloads: dict, info: dict, command: str, seconds: float, figures_dir: Path) -> str:
    lines = [
        BEGIN,
        "## Issue 14: `solver=\"auto\"` against scipy's DOP853 at matched error",
        "",
        f"Reproduce: `{command}` (minutes per workload below). Machine: "
        f"{info['cpu']}, {info['usable_cores']} usable cores, JAX {info['jax_backend']}, "
        f"{info['date']}, gflow commit {info['commit']}; load averages during the run "
        f"{_load_span(workloads)} (per workload below). Wall times are minima over repeated "
        "calls (one call where a call takes seconds); gradient-evaluation counts and errors "
        "are exact and reproducible, and the claims below rest on them."
        + ("" if info["jax_backend"] != "cpu" else
           " No accelerator: the GPU recipe is `benchmarks/gpu.py`."),
        "",
        f"`solver=\"auto\"` (the default of `gflow.solve`): Tsit5 at rtol ≥ "
        f"{AUTO_CROSSOVER_RTOL:g}, below it DOP853 (Hairer's 8(5,3) pair with its 7th-order "
        f"dense output, `gflow.DOP853`) with its error estimate scaled by "
        f"{AUTO_DOP853_ERROR_SCALE:g}. Same problems, save grids, tolerances (atol = rtol × "
        "scale), reference (Dopri8, a step at every save time, rtol 1e-12) and error measure "
        "(largest relative state error over the save grid) as the sections above. gflow, "
        "scipy and torchdiffeq rows are interleaved by tolerance in one process. 'scipy DOP853 "
        "at that error': its evaluations and wall time interpolated log–log between its "
        "measured tolerances ('—' outside them); torchdiffeq's likewise. torchdiffeq: "
        "`odeint(method='dopri5')` on the same model written in PyTorch "
        "(`benchmarks/_torch.py`, float64, `-∇L` by `torch.autograd.grad`, checked against "
        "gflow's velocity before timing), timed with torch's threads set to the usable cores "
        "and to one; at each tolerance the faster of the two is compared (its best case).",
        "",
    ] + _torchdiffeq_skipped(workloads) + [
        "**Physical limit** (column 'limit'): the evaluations of an 8th-order method with an "
        "ideal step sequence, estimated as DOP853's *accepted* steps at that error × 11 "
        "(Butcher's bound: an explicit Runge–Kutta method of order 8 needs at least 11 "
        "stages), with values at save times free. An error-per-step controller that "
        "equidistributes the local error is the optimal sequence for a given number of steps, "
        "so an ideal sequence saves DOP853's rejected steps and its 0.01 start-up step, not "
        "its accepted steps; DOP853 itself pays 12 evaluations per step (11 new stages and the "
        "first-same-as-last one) and 3 more for its dense output.",
        "",
    ]
    lines += _summary(workloads)
    for w in workloads.values():
        lines += _workload_lines(w, figures_dir)
    lines.append(END)
    return "\n".join(lines) + "\n"


def _torchdiffeq_skipped(workloads: dict) -> list[str]:
    """One line per reason torchdiffeq was not run (torch not installed: one line in all)."""
    reasons: dict[str, list[str]] = {}
    for w in workloads.values():
        info = w.get("torchdiffeq")
        why = "these rows come from a run that did not measure it" if info is None \
            else info.get("skipped")
        if why:
            reasons.setdefault(why, []).append(w["tag"])
    return [f"torchdiffeq dopri5 not measured on {', '.join(tags)}: {why}."
            for why, tags in reasons.items()] + ([""] if reasons else [])


def _span(values, digits: int = 2) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    lo, hi = min(values), max(values)
    return fmt(lo, digits) if lo == hi else f"{fmt(lo, digits)}–{fmt(hi, digits)}"


def _summary(workloads: dict) -> list[str]:
    rows = []
    for w in workloads.values():
        m = w["analysis"]["matched"]
        for pick in ("switching", "tsit5", "dop853"):
            mm = [x for x in m if x["solver"] == pick]
            if not mm:
                continue
            ratios = [x["evaluation_ratio"] for x in mm]
            met = sum(r is not None and r <= 0.7 for r in ratios)
            known = sum(r is not None for r in ratios)
            rows.append([
                f"{w['tag']} {w['name']}", pick, _span([x["error"] for x in mm]),
                f"{_span(ratios)} ({met} of {known} ≤ 0.7)",
                _span([x["over_limit"] for x in mm]),
                _span([x["wall_speedup"] for x in mm]), _span([x["cpu_speedup"] for x in mm]),
                _span([x.get("torch_evaluation_ratio") for x in mm]),
                _span([x.get("torch_wall_speedup") for x in mm]),
            ])
    return [
        "### Targets against what was measured",
        "",
        markdown_table(
            ["workload", "auto picks", "errors", "evals / scipy DOP853's (target ≤ 0.7)",
             "evals / limit", "wall speed-up vs scipy, this run (target ≥ 3)",
             "CPU speed-up vs scipy, this run",
             "evals / torchdiffeq's", "wall speed-up vs torchdiffeq, this run"], rows),
        "",
    ] + _findings(workloads) + [""]


def _load_span(workloads: dict) -> str:
    """The range of the 1-minute load averages at the workloads' starts and ends."""
    loads = [w["load_average"][k][0] for w in workloads.values() for k in ("start", "end")]
    return f"{min(loads):.1f}–{max(loads):.1f}" if loads else "unknown"


def _findings(workloads: dict) -> list[str]:
    """What the table says, computed from this run's numbers (no text fixed by an earlier run)."""
    matched = [(w, m) for w in workloads.values() for m in w["analysis"]["matched"]]
    ratios = [m["evaluation_ratio"] for _, m in matched if m["evaluation_ratio"] is not None]
    dop = [m for _, m in matched if m["solver"] == "dop853"]
    ideal = [m["limit"] / m["scipy_evaluations"] for _, m in matched
             if m["limit"] is not None and m["scipy_evaluations"] is not None]
    lines = [
        f"- Evaluations: auto is at or below 0.7× scipy DOP853's at "
        f"{sum(r <= 0.7 for r in ratios)} of {len(ratios)} matched errors "
        f"({_span(ratios)}). Where auto runs DOP853 it is scipy's method and takes its steps, "
        "so it cannot be below scipy's count: it pays 3 more evaluations on each rejected step "
        "(its dense-output stages are computed before the controller decides) and on each "
        "step that holds no save time, where scipy computes its dense output only for steps "
        "that hold one. The ideal 8th-order method (column 'limit') needs "
        f"{_span(ideal)}× scipy's evaluations"
        + (f", auto's DOP853 rows {_span([m['over_limit'] for m in dop])}× the limit" if dop
           else "")
        + ": the 0.7× target asks for about what an ideal 8th-order Runge–Kutta method would "
        "need, or less.",
    ]
    crossings = []
    for w in workloads.values():
        c = w["analysis"]["crossover"]
        where = (f"at error {c['error']:.2g}" if c.get("error") is not None
                 else c.get("kind", "not measured"))
        crossings.append(f"{w['tag']} {where}")
    lines.append(
        f"- Tsit5 or DOP853: auto switches by rtol (at {AUTO_CROSSOVER_RTOL:g}); the crossover "
        "in evaluations at matched error: " + "; ".join(crossings) + ". Where a "
        "workload's crossover lies elsewhere, auto's rows on the wrong side of it cost more "
        "than the other method would.")
    speed = []
    for w in workloads.values():
        m = w["analysis"]["matched"]
        part = f"{w['tag']} {_span([x['wall_speedup'] for x in m])}× against scipy"
        if any(x.get("torch_wall_speedup") is not None for x in m):
            part += f", {_span([x.get('torch_wall_speedup') for x in m])}× against torchdiffeq"
        speed.append(part)
    lines.append(
        "- Wall time at matched error, gflow auto faster by: " + "; ".join(speed) + ". On the "
        "small models the competitors' per-step Python dominates; on (b), where one gradient "
        "takes milliseconds, gflow's lead is the evaluations it saves and its compiled loop.")
    return lines


def _workload_lines(w: dict, figures_dir: Path) -> list[str]:
    a = w["analysis"]
    lines = [
        f"### {w['tag']} {w['name']}: {w['parameters']:,} parameters, {w['save_times']} save "
        f"times, t1 = {w['t1']:g}",
        "",
        (f"Run {w['date']}, {w['seconds'] / 60:.1f} min. " if w.get("seconds") else "")
        + f"Load average (1, 5, 15 min): start {', '.join(f'{x:.2f}' for x in w['load_average']['start'])}; "
        f"end {', '.join(f'{x:.2f}' for x in w['load_average']['end'])}.",
        "",
        markdown_table(
            ["auto rtol", "picks", "traj. error", "evals", "scipy DOP853 evals at that error",
             "evals ratio (target ≤ 0.7)", "limit", "evals / limit", "wall [ms]",
             "scipy wall at that error [ms]", "wall speed-up (target ≥ 3)", "CPU speed-up"],
            [[fmt(m["rtol"]), m["solver"], fmt(m["error"]), fmt(m["evaluations"]),
              fmt(m["scipy_evaluations"]), fmt(m["evaluation_ratio"]), fmt(m["limit"]),
              fmt(m["over_limit"]), fmt(m["wall_s"] * 1e3),
              fmt(None if m["scipy_wall_s"] is None else m["scipy_wall_s"] * 1e3),
              fmt(m["wall_speedup"]), fmt(m["cpu_speedup"])] for m in a["matched"]],
        ),
        "",
    ]
    torch_rows = [m for m in a["matched"] if m.get("torch_evaluations") is not None]
    info = w.get("torchdiffeq") or {}
    if torch_rows:
        check = max(c["relative_difference"] for c in info["check"])
        kept = [n for n in info["threads"] if n not in info["skipped_threads"]]
        threads = " and ".join(f"{n} thread{'s' if n > 1 else ''}" for n in kept)
        lines += [
            "torchdiffeq dopri5 at the same errors, measured in this run (torch "
            f"{info['versions']['torch']}, torchdiffeq {info['versions']['torchdiffeq']}; its "
            f"velocity agrees with gflow's to {check:.1e} relative at 3 states, untimed). Wall "
            "time: " + (f"the faster of {threads}" if len(kept) > 1 else threads)
            + " at each tolerance"
            + (f" ({', '.join(map(str, info['skipped_threads']))} threads not timed: one "
               "evaluation took over twice as long as at the fastest count)"
               if info["skipped_threads"] else "") + ".",
            "",
            markdown_table(
                ["auto rtol", "traj. error", "auto evals", "torchdiffeq evals at that error",
                 "evals ratio", "auto wall [ms]", "torchdiffeq wall at that error [ms]",
                 "wall speed-up"],
                [[fmt(m["rtol"]), fmt(m["error"]), fmt(m["evaluations"]),
                  fmt(m["torch_evaluations"]), fmt(m["torch_evaluation_ratio"]),
                  fmt(m["wall_s"] * 1e3), fmt(m["torch_wall_s"] * 1e3),
                  fmt(m["torch_wall_speedup"])] for m in torch_rows],
            ),
            "",
        ]
    c = a["crossover"]
    if c is not None:
        where = (f"at trajectory error {c['error']:.1e}" if c["error"] is not None
                 else c["kind"])
        lines += [f"Crossover of Tsit5 and DOP853 in evaluations at matched error: {where} "
                  f"(compared over errors {c['range'][1]:.0e} … {c['range'][0]:.0e}).", ""]
    lines += [
        "<details><summary>every run</summary>",
        "",
        markdown_table(
            ["method", "setting", "grad evals", "steps", "traj. error", "wall [ms] min / median "
             "(calls)", "CPU [ms]", "compile [s]", "notes"],
            [[r.family, r.setting, fmt(r.evaluations), fmt(r.steps), fmt(r.traj_error),
              f"{fmt(r.wall_s * 1e3)} / {fmt(r.wall_median_s * 1e3)} ({r.runs})",
              fmt(r.cpu_s * 1e3), fmt(r.compile_s), r.notes] for r in w["results"]],
        ),
        "",
        "</details>",
        "",
        f"![work–precision with auto, {w['name']}]({w['name']}-solvers-work-precision.png)",
        "",
    ]
    return lines


def _figure(w: dict, out: Path) -> None:
    """The work–precision figure of every row (torchdiffeq's one curve per thread count)."""
    work_precision_figure(
        w["results"], out / f"{w['name']}-solvers-work-precision.png",
        f"{w['tag']} {w['name']}, {w['parameters']:,} parameters: auto against scipy DOP853 "
        "and torchdiffeq dopri5",
    )


def _result(d: dict) -> Result:
    return Result(**d)


def _jsonable(x):
    if isinstance(x, Result):
        return _jsonable(dataclasses.asdict(x))
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def write_section(results_md: Path, section: str) -> None:
    """Replace the block between the markers in `results_md` (or append it)."""
    text = results_md.read_text() if results_md.exists() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        text = head + section + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + section
    results_md.write_text(text)


def kept_section(results_md: Path) -> str | None:
    """What `benchmarks.run` carries over when it rewrites `results_md`: this script's block
    and every hand-written section after it (each round's measurements by other commands), as
    they stand."""
    if not results_md.exists():
        return None
    text = results_md.read_text()
    if BEGIN not in text or END not in text:
        return None
    return BEGIN + text.split(BEGIN, 1)[1].rstrip("\n") + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.solvers",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="(a) at t1 = 4, few settings")
    parser.add_argument("--only", choices=("deep-linear", "cooccurrence", "rank-collapse"))
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the section and figures from solvers.json, run nothing")
    parser.add_argument("--out", type=Path, help="directory for the detailed report.md, "
                        f"solvers.json and figures (default: benchmarks/results/{SUITE}/); the "
                        "suite's rows go to benchmarks/results/ (into --out when given)")
    args = parser.parse_args(argv)
    out = (args.out or RESULTS_DIR / SUITE).resolve()
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.solvers" + (" --quick" if args.quick else "") + (
        f" --only {args.only}" if args.only else "")
    log = lambda s: print(s, flush=True)  # noqa: E731
    start = time.perf_counter()
    info = machine()
    json_path = out / "solvers.json"
    previous = json.loads(json_path.read_text())["workloads"] if json_path.exists() else {}
    workloads = {}
    if args.report_only:
        stored = json.loads(json_path.read_text())
        for name, w in stored["workloads"].items():
            results = [_result(r) for r in w["results"]]
            workloads[name] = w | dict(results=results, analysis=analyse(results, name))
            _figure(workloads[name], out)
        json_path.write_text(json.dumps(_jsonable(stored | dict(workloads=workloads)), indent=1))
        write_section(out / REPORT, _section(workloads, stored["machine"],
                                                   stored["command"], stored["seconds"], out))
        _write_suite(workloads, stored["machine"], stored["command"], out,
                     out if args.out else RESULTS_DIR)
        return 0
    for name, (tag, build, plan) in _workloads(args.quick).items():
        if args.only and name != args.only:
            if name in previous and not args.quick:  # keep the other workloads' last rows
                w = previous[name]
                results = [_result(r) for r in w["results"]]
                workloads[name] = w | dict(results=results, analysis=analyse(results, name))
            continue
        workloads[name] = run_workload(name, tag, build, plan, log)
        _figure(workloads[name], out)
    seconds = time.perf_counter() - start
    json_path.write_text(json.dumps(_jsonable(dict(
        command=command, machine=info, seconds=seconds, workloads=workloads)), indent=1))
    write_section(out / REPORT, _section(workloads, info, command, seconds, out))
    _write_suite(workloads, info, command, out, out if args.out else RESULTS_DIR)
    log(f"wrote {out / REPORT} ({seconds:.0f} s)")
    return 0


SUITE = "auto-solver"


def _write_suite(workloads: dict, info: dict, command: str, figures_dir: Path,
                 directory: Path) -> Path:
    """The results page's rows: per workload and solver `auto` picks, the ranges over the
    measured tolerances of its cost against scipy's DOP853, the ideal 8th-order method and
    torchdiffeq at matched error."""
    rows = []
    for w in workloads.values():
        for pick in ("switching", "tsit5", "dop853"):
            mm = [x for x in w["analysis"]["matched"] if x["solver"] == pick]
            if not mm:
                continue
            errors = _span([x["error"] for x in mm])
            where = f"{w['tag']} {w['name']}, auto = {pick} (errors {errors})"
            ratios = [x["evaluation_ratio"] for x in mm]
            met = sum(r is not None and r <= 0.7 for r in ratios)
            known = sum(r is not None for r in ratios)
            rows += [
                dict(quantity=f"{where}: evaluations / scipy DOP853's at matched error",
                     value=_span(ratios), target="≤ 0.7", verdict=f"{met} of {known} met"),
                dict(quantity=f"{where}: evaluations / an ideal 8th-order method's",
                     value=_span([x["over_limit"] for x in mm])),
                dict(quantity=f"{where}: wall speed-up against scipy DOP853",
                     value=_span([x["wall_speedup"] for x in mm]), target="≥ 3",
                     detail=f"CPU speed-up {_span([x['cpu_speedup'] for x in mm])}"),
                dict(quantity=f"{where}: evaluations / torchdiffeq dopri5's",
                     value=_span([x.get("torch_evaluation_ratio") for x in mm]),
                     detail="wall speed-up "
                            f"{_span([x.get('torch_wall_speedup') for x in mm])}"),
            ]
    figures = [figures_dir / f"{w['name']}-solvers-work-precision.png" for w in workloads.values()]
    return write_suite(
        SUITE, title='`solver="auto"` against scipy\'s DOP853 and torchdiffeq at matched error',
        command=command, machine=info, rows=rows, figures=[f for f in figures if f.is_file()],
        directory=directory,
        summary=f'`solver="auto"` (the default) is Tsit5 at rtol ≥ {AUTO_CROSSOVER_RTOL:g} '
                "(since issue 31 inside `StiffSwitching`, \"switching\": the same steps while "
                "the flow is not stiff) and "
                f"DOP853 (its error estimate scaled by {AUTO_DOP853_ERROR_SCALE:g}) below. Same "
                "problems, reference and error measure as the section above; scipy's and "
                "torchdiffeq's costs are interpolated log–log between their measured "
                "tolerances to gflow's error. The ideal 8th-order method: DOP853's accepted "
                "steps × 11 stages (Butcher's bound). Ranges are over the measured tolerances.")


if __name__ == "__main__":
    sys.exit(main())
