"""The size ladder: Chen & Luo's experiment (`rank-collapse`) by exact flow as the model grows.

    python -m benchmarks.studies.size_ladder                  # d = 64, 128, 256, then the table
    python -m benchmarks.studies.size_ladder --sizes 64 128   # some sizes (each saved on its own)
    python -m benchmarks.studies.size_ladder --report         # the table from the saved sizes
    python -m benchmarks.studies.size_ladder --from-run RUN   # a size run by the command line

Every size is the `rank-collapse` preset with `d_ff = 2 d`, `σ = d^−0.85` (the preset's default),
the same seed, training set (`n = 300`) and held-out set, Tsit5 at the preset's rtol 1e-6 with
its PI control; only `t1` grows with `d` (`1500 · d / 64` by default: the plateau's escape time
grows like `1/σ`). `--n` and `--t1` set the training set and the flow time instead (Chen & Luo's
own size is d = 640 with n = 1000). Each size's run is saved as `d<d>.json` (`d<d>-n<n>.json`
for another n) under `--out` as soon as it ends, so sizes can be run one at a time (on
different days or machines) and assembled with `--report`; `--from-run` saves the row of a
finished `python -m gflow.solve rank-collapse --set problem.d=...` run directory instead
(its config gives the size; the wall time is its trace, compile and run seconds).

The table (`size_ladder.json`, `size_ladder.md`) holds, per size: the three transition times,
the effective and stable ranks of every group at each transition and at the end, held-out and
training accuracy, the largest drift of the two conserved quantities, the verdicts of
`attention_collapses_below_outer*`, and the run's steps and wall time. The figure
(`size-ladder-ranks.png`) draws the ranks at the key-query collapse and at the end against `d`.
Not part of the default benchmark suite: a size of 256 takes hours on two cores.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from .._harness import fmt, machine, markdown_table
from ..results_page import RESULTS_DIR, rows_directory, write_suite

SIZES = (64, 128, 256)
GROUPS = ("W_Q", "W_K", "W_V", "W1", "W2")
TRANSITIONS = ("condensation", "stage2_onset", "kq_collapse")
VERDICTS = ("attention_collapses_below_outer", "attention_collapses_below_outer_at_lowest",
            "attention_collapses_below_outer_at_end")
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "size_ladder"


def default_t1(d: int) -> float:
    return 1500.0 * d / 64


N_TRAIN = 300  # the preset's training set


def overrides(d: int, t1: float, precision: str, n: int = N_TRAIN) -> list[str]:
    out = [f"problem.d={d}", f"problem.d_ff={2 * d}", f"solve.t1={t1}"]
    out += [] if n == N_TRAIN else [f"problem.n={n}"]
    return out if precision == "float64" else out + [f"solve.precision=\"{precision}\""]


def row_name(d: int, n: int) -> str:
    return f"d{d}.json" if n == N_TRAIN else f"d{d}-n{n}.json"


def _ranks(values) -> dict:
    return {key: dict(zip(GROUPS, (float(x) for x in np.asarray(values[key]))))
            for key in ("effective_rank", "stable_rank")}


def run_size(d: int, t1: float, precision: str, n: int = N_TRAIN) -> dict:
    """Solve one size and return its row (JSON-safe)."""
    import gflow.presets as presets

    resolved = presets.resolve("rank-collapse", overrides(d, t1, precision, n))
    begin = time.perf_counter()
    _, traj = presets.run(resolved, progress=sys.stderr.isatty())
    wall = time.perf_counter() - begin
    extra = "" if n == N_TRAIN else f" --n {n}"
    return _row(traj, d=d, n=n, t1=t1, precision=precision, wall=wall, machine_=machine(),
                command=f"python -m benchmarks.studies.size_ladder --sizes {d}{extra}")


def row_from_run(run_dir: Path) -> dict:
    """The row of a finished `rank-collapse` run directory of the command line."""
    import gflow

    traj = gflow.load(run_dir)
    config = traj.config or {}
    problem, solve = config.get("problem", {}), config.get("solve", {})
    name = config.get("preset", {}).get("name", "rank-collapse")
    if name != "rank-collapse" or "d" not in problem:
        raise SystemExit(f"{run_dir}: not a rank-collapse run directory")
    d, n = int(problem["d"]), int(problem.get("n", N_TRAIN))
    if int(problem.get("d_ff", 2 * d)) != 2 * d:
        raise SystemExit(f"{run_dir}: d_ff = {problem['d_ff']} is not 2 d (the ladder's)")
    stats = traj.stats
    wall = sum(float(stats.get(k) or 0.0) for k in ("trace_seconds", "compile_seconds",
                                                    "run_seconds"))
    return _row(traj, d=d, n=n, t1=float(solve.get("t1", traj.t1)),
                precision=stats.get("precision", "float64"), wall=wall,
                machine_=machine(), command=_command_of(config))


def _command_of(config: dict) -> str:
    """The command line that makes a `rank-collapse` run of `config`: the preset, with its
    problem and solve fields that differ set (a run directory does not record its command)."""
    import tomli_w

    from gflow.presets import preset_config

    default = preset_config("rank-collapse")
    sets = [f"--set {table}.{key}={tomli_w.dumps({'v': value})[4:].strip()}"
            for table in ("problem", "solve")
            for key, value in config.get(table, {}).items()
            if default.get(table, {}).get(key) != value]
    return " ".join(["python -m gflow.solve rank-collapse", *sets])


def _row(traj, *, d, n, t1, precision, wall, machine_, command) -> dict:
    from gflow.figures import series
    from gflow.internal import ranks_at_snapshot

    obs = traj.observables
    # Effective rank and the conserved drift are snapshots: the last one is the end state.
    drift = np.asarray(traj.snapshots["conserved_drift"])
    end, _ = ranks_at_snapshot(traj, traj.snapshot_labels[-1])
    norm = np.asarray(obs["norm"])
    row = dict(
        d=d, d_ff=2 * d, n=n, t1=t1, sigma=d ** -0.85, precision=precision,
        command=command,
        status=traj.status, t_final=traj.t_final,
        transitions={k: _finite(v) for k, v in traj.transitions.items()},
        ranks_at={name: _ranks(ranks_at_snapshot(traj, name)[0])
                  for name in traj.at_transitions},
        ranks_end=_ranks(end),
        # A snapshot (the last one is the end state) unless taken at every save time.
        held_out_accuracy=float(np.asarray(series(traj, "held_out_accuracy")[1])[-1]),
        train_accuracy=float(np.asarray(obs["train_accuracy"])[-1]),
        loss_end=float(np.asarray(obs["loss"])[-1]),
        conserved_drift_max=[float(x) for x in np.nanmax(drift, axis=0)],
        norm_max=float(np.nanmax(norm)),
        verdicts={k: traj.predictions[k].holds for k in VERDICTS if k in traj.predictions},
        verdict_text={k: traj.predictions[k].measured for k in VERDICTS
                      if k in traj.predictions},
        stats={k: v for k, v in traj.stats.items() if isinstance(v, (int, float, str))},
        wall_seconds=wall, machine=machine_,
    )
    return row


def costs(d: int, repeats: int = 3) -> dict:
    """Best wall time of one velocity `-∇L` and of one observation (every observer and
    transition condition of the preset) at size `d`, jitted, on this machine."""
    import equinox as eqx
    import jax

    import gflow.presets as presets

    from .._harness import best_time

    problem = presets.build(presets.resolve("rank-collapse", overrides(d, default_t1(d),
                                                                       "float64")))
    flow = problem.flow
    y = flow.params
    velocity = eqx.filter_jit(lambda flow, y: flow.velocity(y))
    conditions = tuple(tr.condition for tr in problem.transitions)
    observe = eqx.filter_jit(lambda flow, y: (
        {k: o(flow.combine(y), flow.data) for k, o in problem.observers.items()},
        [c(flow.combine(y), flow.data) for c in conditions]))
    out = dict(d=d, parameters=sum(x.size for x in jax.tree_util.tree_leaves(y)))
    for name, fn in (("velocity", velocity), ("observation", observe)):
        jax.block_until_ready(fn(flow, y))
        timing = best_time(lambda: jax.block_until_ready(fn(flow, y)), repeats=repeats,
                           budget_s=60.0)
        out[f"{name}_seconds"] = timing.wall
    return out


def _finite(x):
    return float(x) if math.isfinite(x) else None


def report(out: Path) -> dict:
    """Assemble every saved size into `size_ladder.json`, `.md` and the figure."""
    rows = sorted((json.loads(p.read_text()) for p in out.glob("d*.json")),
                  key=lambda r: (r["d"], r.get("n", N_TRAIN)))
    if not rows:
        raise SystemExit(f"no saved sizes under {out}: run some first")
    # The machine the runs were made on (a row records its own), not the one assembling them.
    saved = out / "size_ladder.json"
    where = next((r["machine"] for r in rows if "machine" in r), None) or (
        json.loads(saved.read_text()).get("machine") if saved.is_file() else None) or machine()
    table = dict(rows=rows, machine=where,
                 missing=[d for d in SIZES if d not in {r["d"] for r in rows
                                                        if r.get("n", N_TRAIN) == N_TRAIN}])
    (out / "size_ladder.json").write_text(json.dumps(table, indent=1) + "\n")
    (out / "size_ladder.md").write_text(markdown(rows, table["missing"]))
    figure(rows, out / "size-ladder-ranks.png")
    # Into the results page only for the ladder kept in this repository.
    write_results(table, out, rows_directory(out / "size_ladder.json"))
    return table


SUITE = "size-ladder"


def write_results(table: dict, out: Path, directory: Path = RESULTS_DIR) -> Path:
    """The results page's rows: per size run, its transitions, cost and the collapse
    verdicts; per size measured, what one velocity and one observation cost; the sizes not
    run."""
    rows = []
    for r in table["rows"]:
        at = _size(r)
        rows += [
            dict(quantity=f"{at}: status, steps, evaluations",
                 value=f"{r['status']}, {r['stats']['num_steps']:,}, "
                       f"{r['stats']['vector_field_evaluations']:,}",
                 detail=f"t1 = {r['t1']:g}, {r['precision']}, {r['wall_seconds']:.0f} s wall"
                        + ("" if "size_ladder" in r["command"] else f"; `{r['command']}`")),
            dict(quantity=f"{at}: transition times",
                 value=", ".join(f"{k} {v:.4g}" if v is not None else f"{k} not reached"
                                 for k, v in r["transitions"].items())),
            dict(quantity=f"{at}: held-out / training accuracy at the end",
                 value=f"{r['held_out_accuracy']:.3g} / {r['train_accuracy']:.3g}"),
        ]
        for name in VERDICTS:
            rows.append(dict(quantity=f"{at}: {name}", value=_verdict(r, name)))
    costs_path = out / "costs.json"
    if costs_path.is_file():
        for c in json.loads(costs_path.read_text())["rows"]:
            rows.append(dict(
                quantity=f"d = {c['d']}: one observation / one velocity",
                value=c["observation_seconds"] / c["velocity_seconds"], unit="×",
                detail=f"{c['parameters']:,} parameters; velocity "
                       f"{c['velocity_seconds'] * 1e3:.1f} ms, observation (every instrument "
                       f"and condition) {c['observation_seconds']:.2f} s; jitted, best of 3"))
    for d in table["missing"]:
        rows.append(dict(quantity=f"d = {d}: run", value="not run", verdict="missing"))
    return write_suite(
        SUITE, title="Chen & Luo's rank collapse as the model grows (size ladder)",
        command="python -m benchmarks.studies.size_ladder", machine=table["machine"],
        rows=rows, figures=[out / "size-ladder-ranks.png"], directory=directory,
        summary="The `rank-collapse` preset with d_ff = 2d, σ = d^−0.85, the same seed and "
                "data (n = 300 training sequences unless a row says otherwise), Tsit5 at rtol "
                "1e-6 with the preset's PI control, t1 = 1500·d/64 unless a row says otherwise, "
                "float64. Full per-size tables (ranks of every group at every transition) in "
                "`benchmarks/size_ladder/size_ladder.md`.")


def _size(r: dict) -> str:
    n = r.get("n", N_TRAIN)
    return f"d = {r['d']}" + ("" if n == N_TRAIN else f", n = {n}")


def _group_ranks(r: dict, measure: str) -> str:
    return " / ".join(f"{r[measure][g]:.3g}" for g in GROUPS)


def _verdict(row: dict, name: str) -> str:
    """The claim's verdict, and which rank measure breaks it (from the prediction's text)."""
    holds, text = row["verdicts"].get(name), row["verdict_text"].get(name) or ""
    if holds is None:
        return "—"
    parts = [f"{m} {'yes' if f'{m} below' in text else 'no'}" for m in ("effective", "stable")]
    return f"{'holds' if holds else 'fails'} ({', '.join(parts)})"


def markdown(rows: list[dict], missing: list[int]) -> str:
    header = ["d", "n", "t1", "status", *TRANSITIONS, "steps", "wall (s)", "held-out / train acc.",
              "drift Q / R (max)", *(v.replace("attention_collapses_below_outer", "below") or "at kq"
                                     for v in VERDICTS)]
    body = []
    for r in rows:
        body.append([
            r["d"], r.get("n", N_TRAIN), fmt(r["t1"]), r["status"],
            *(fmt(r["transitions"].get(k)) if r["transitions"].get(k) is not None else "not reached"
              for k in TRANSITIONS),
            fmt(r["stats"].get("num_steps")), fmt(r["wall_seconds"]),
            f"{r['held_out_accuracy']:.3g} / {r['train_accuracy']:.3g}",
            " / ".join(fmt(x) for x in r["conserved_drift_max"]),
            *(_verdict(r, v) for v in VERDICTS),
        ])
    lines = ["# rank-collapse size ladder (`python -m benchmarks.studies.size_ladder`)", "",
             markdown_table(header, body), "",
             "Ranks (W_Q / W_K / W_V / W1 / W2), effective then stable:", ""]
    rank_rows = []
    for r in rows:
        for where in (*TRANSITIONS, "end"):
            ranks = r["ranks_end"] if where == "end" else r["ranks_at"].get(where)
            if ranks is None:
                continue
            rank_rows.append([_size(r), where, _group_ranks(ranks, "effective_rank"),
                              _group_ranks(ranks, "stable_rank")])
    lines += [markdown_table(["size", "at", "effective rank", "stable rank"], rank_rows), ""]
    if missing:
        lines += [f"Not run: d = {', '.join(map(str, missing))}.", ""]
    return "\n".join(lines)


def figure(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.8), sharex=True)
    ds = [r["d"] for r in rows]
    for ax, measure, title in ((axes[0], "effective_rank", "effective rank (Roy–Vetterli)"),
                               (axes[1], "stable_rank", "stable rank")):
        for k, g in enumerate(GROUPS):
            color = f"C{k}"
            at = [r["ranks_at"].get("kq_collapse", {}).get(measure, {}).get(g, math.nan)
                  for r in rows]
            end = [r["ranks_end"][measure][g] for r in rows]
            ax.plot(ds, at, "o-", color=color, label=f"{g} at kq_collapse")
            ax.plot(ds, end, "--", color=color, alpha=0.6)
            # The end of a run that never reached kq_collapse (still before stage 2): hollow.
            for collapsed in (True, False):
                picked = [(d, e) for d, e, r in zip(ds, end, rows)
                          if ("kq_collapse" in r["ranks_at"]) == collapsed]
                if picked:
                    ax.plot(*zip(*picked), "s", color=color, alpha=0.6,
                            markerfacecolor=None if collapsed else "none",
                            label=f"{g} at the end" if collapsed or len(picked) == len(rows)
                            else None)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ticks = sorted(set(ds) | set(SIZES))
        ax.set_xticks(ticks, [str(d) for d in ticks])
        ax.set_xlim(ticks[0] / 1.4, ticks[-1] * 1.4)
        others = sorted({f"d = {r['d']}: n = {r['n']}" for r in rows
                         if r.get("n", N_TRAIN) != N_TRAIN})
        ax.set_xlabel("d (d_ff = 2d, σ = d^−0.85; n = 300"
                      + "".join(f", {o}" for o in others) + ")")
        ax.set_title(title)
    axes[0].set_ylabel("rank")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=7)
    fig.suptitle("rank-collapse by exact gradient flow: ranks of every group vs model width"
                 + ("\n(hollow: the end of a run that did not reach kq_collapse)"
                    if any("kq_collapse" not in r["ranks_at"] for r in rows) else ""))
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.studies.size_ladder",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--t1", type=float, nargs="+", default=None,
                        help="flow time per size (default 1500 d / 64)")
    parser.add_argument("--n", type=int, default=N_TRAIN,
                        help=f"training sequences (default the preset's {N_TRAIN})")
    parser.add_argument("--precision", default="float64")
    parser.add_argument("--from-run", type=Path, nargs="+", default=None,
                        help="save the rows of these finished command-line run directories "
                             "(run this on the machine they ran on: a row records it)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--report", action="store_true", help="only assemble the saved sizes")
    parser.add_argument("--costs", action="store_true",
                        help="only measure one velocity and one observation per size "
                        "(costs.json), to estimate the sizes not run")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.costs:
        rows = [costs(d) for d in args.sizes]
        (args.out / "costs.json").write_text(json.dumps(dict(rows=rows, machine=machine()),
                                                        indent=1) + "\n")
        for r in rows:
            print(f"d={r['d']}: {r['parameters']} parameters, velocity "
                  f"{r['velocity_seconds'] * 1e3:.1f} ms, observation "
                  f"{r['observation_seconds'] * 1e3:.1f} ms")
        return 0
    if args.from_run:
        for run_dir in args.from_run:
            row = row_from_run(run_dir)
            (args.out / row_name(row["d"], row["n"])).write_text(json.dumps(row, indent=1) + "\n")
            print(f"d={row['d']}, n={row['n']}: {row['status']}, transitions "
                  f"{row['transitions']}", flush=True)
    elif not args.report:
        t1s = args.t1 or [default_t1(d) for d in args.sizes]
        if len(t1s) != len(args.sizes):
            parser.error("give one --t1 per size")
        for d, t1 in zip(args.sizes, t1s):
            row = run_size(d, t1, args.precision, args.n)
            (args.out / row_name(d, args.n)).write_text(json.dumps(row, indent=1) + "\n")
            print(f"d={d}: {row['status']} in {row['wall_seconds']:.0f} s, "
                  f"transitions {row['transitions']}", flush=True)
    table = report(args.out)
    print(markdown(table["rows"], table["missing"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
