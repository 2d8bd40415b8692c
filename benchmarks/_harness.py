"""Shared pieces of the benchmarks: timing, the machine, error metrics, fits, tables, figures."""

import dataclasses
import datetime
import importlib.metadata
import math
import os
import platform
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np


@dataclasses.dataclass
class Result:
    """One method at one accuracy setting.

    **Fields:**

    - `family`: the curve it belongs to in the work–precision figure (one method, one solver).
    - `setting`: the accuracy knob, as text (`rtol=1e-8`, `η=1e-3`).
    - `knob`: the same knob as a number (rtol or η), for sorting.
    - `wall_s`: best (minimum) wall time of a whole call (compilation excluded), over the
        repeats: on a shared machine the least disturbed call.
    - `cpu_s`: best CPU time of the process (all threads) over the same calls.
    - `kernel_s`: best time inside the compiled program alone, where that is separable.
    - `compile_s`: compile time paid by the first call (`0.0`: the program was reused).
    - `evaluations`: gradient (vector-field) evaluations.
    - `steps`: solver steps (accepted + rejected) or GD iterations.
    - `traj_error`: largest relative state error over the save grid.
    - `worst_t`: the save time where that error is largest.
    - `transition_errors`: `|t − t_ref|` per transition (`inf` if missed), or `None`.
    - `timed_transitions`: whether locating the transitions is inside `wall_s`.
    - `wall_median_s`, `runs`: the median wall time of the same timed calls, and their number
        (the spread between minimum and median shows how much other jobs disturbed them).
    """

    family: str
    setting: str
    knob: float
    wall_s: float
    cpu_s: float | None
    kernel_s: float | None
    compile_s: float | None
    evaluations: int
    steps: int | None
    traj_error: float
    worst_t: float | None = None
    transition_errors: list[float] | None = None
    timed_transitions: bool = False
    notes: str = ""
    wall_median_s: float | None = None
    runs: int | None = None


@dataclasses.dataclass
class Timing:
    """Repeated calls of one function: `wall`, `cpu` the minima, `wall_median` the median of
    the wall times, `runs` the number of calls, `outputs` what each call returned."""

    wall: float
    cpu: float
    wall_median: float
    runs: int
    outputs: list

    @property
    def result_fields(self) -> dict:
        """The `Result` fields this timing fills."""
        return dict(wall_s=self.wall, cpu_s=self.cpu, wall_median_s=self.wall_median,
                    runs=self.runs)


def best_time(fn: Callable[[], Any], *, repeats: int, budget_s: float) -> Timing:
    """Run `fn` up to `repeats` times (fewer once `budget_s` is spent, at least once).

    The minimum is the least disturbed by other jobs on a shared machine; the median says how
    disturbed the typical call was. CPU time (this process, all threads) is far less sensitive
    to other jobs than wall time.
    """
    walls, cpus, outputs = [], [], []
    while True:
        start, start_cpu = time.perf_counter(), time.process_time()
        outputs.append(fn())
        cpus.append(time.process_time() - start_cpu)
        walls.append(time.perf_counter() - start)
        if len(walls) >= repeats or sum(walls) > budget_s:
            return Timing(min(walls), min(cpus), float(np.median(walls)), len(walls), outputs)


def relative_trajectory_error(states: np.ndarray, reference: np.ndarray) -> float:
    """`max_i ‖θ_i − θ_ref,i‖ / ‖θ_ref,i‖` over the save grid (rows are save times)."""
    states = np.asarray(states, dtype=np.float64)
    if states.shape != reference.shape or not np.all(np.isfinite(states)):
        return math.inf
    num = np.linalg.norm(states - reference, axis=1)
    den = np.linalg.norm(reference, axis=1)
    return float(np.max(num / den))


def transition_errors(times: Sequence[float], reference: Sequence[float]) -> list[float]:
    """`|t − t_ref|` per transition the reference reaches; `inf` where the method misses it."""
    out = []
    for t, r in zip(times, reference):
        if not math.isfinite(r):
            continue
        out.append(abs(t - r) if math.isfinite(t) else math.inf)
    return out


def median_and_quartiles(values: Sequence[float], scale: float = 1.0) -> dict[str, Any]:
    """`{"median", "quartiles": [q1, q3]}` of `values` times `scale`: how measurements of one
    quantity spread over rounds (a machine's noise)."""
    q1, median, q3 = np.percentile(np.asarray(values, dtype=float) * scale, [25, 50, 75])
    return dict(median=float(median), quartiles=[float(q1), float(q3)])


def fit_power_law(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Least-squares fit `y = c · x^p` in log–log; returns `(c, p)`."""
    lx, ly = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
    p, logc = np.polyfit(lx, ly, 1)
    return float(math.exp(logc)), float(p)


def interpolate_cost(errors: Sequence[float], costs: Sequence[float], at: float) -> float | None:
    """A method's cost at error `at`, interpolated log–log between its measured settings.

    `None` outside the measured range of errors: no extrapolation is implied.
    """
    pairs = sorted(
        (e, c) for e, c in zip(errors, costs) if math.isfinite(e) and e > 0 and c > 0
    )
    if len(pairs) < 1 or not pairs[0][0] <= at <= pairs[-1][0]:
        return None
    le = np.log([p[0] for p in pairs])
    lc = np.log([p[1] for p in pairs])
    return float(np.exp(np.interp(math.log(at), le, lc)))


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import jax

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for package in ("jax", "jaxlib", "diffrax", "equinox", "optax", "numpy", "scipy", "matplotlib"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], capture_output=True, text=True, check=True
        ).stdout.strip()
        commit += " (+ uncommitted changes)" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return dict(
        cpu=cpu,
        logical_cores=os.cpu_count(),
        usable_cores=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        jax_backend=jax.default_backend(),
        jax_devices=[str(d) for d in jax.devices()],
        python=platform.python_version(),
        platform=platform.platform(),
        versions=versions,
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        commit=commit,
    )


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


def fmt(x: float | None, digits: int = 2) -> str:
    """A number for a table: `—` for missing, `missed` for infinite, scientific when tiny."""
    if x is None:
        return "—"
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}"
    x = float(x)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "missed"
    if x == 0:
        return "0"
    if 100 <= abs(x) < 1e7:
        return f"{x:,.0f}"
    if 1e-2 <= abs(x) < 100:
        return f"{x:.{digits + 1}g}"
    return f"{x:.{digits}e}".replace("e-0", "e-").replace("e+0", "e+")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def work_precision_figure(
    results: Sequence[Result],
    path: Path,
    title: str,
    extrapolations: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = (),
    target_error: float | None = None,
) -> None:
    """Three panels: gradient evaluations, wall time and CPU time against trajectory error.

    `extrapolations`: `(label, errors, evaluations, walls, cpus)` drawn dashed (fitted lines).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5.5), constrained_layout=True)
    families = list(dict.fromkeys(r.family for r in results))
    markers = "osD^v<>pPX*h"
    for i, family in enumerate(families):
        rows = sorted(
            (r for r in results if r.family == family and math.isfinite(r.traj_error)),
            key=lambda r: r.traj_error,
        )
        if not rows:
            continue
        errors = [max(r.traj_error, 1e-17) for r in rows]
        style = dict(marker=markers[i % len(markers)], label=family)
        axes[0].loglog(errors, [r.evaluations for r in rows], **style)
        axes[1].loglog(errors, [r.wall_s for r in rows], **style)
        axes[2].loglog(errors, [r.cpu_s for r in rows], **style)
    for label, errors, evaluations, walls, cpus in extrapolations:
        axes[0].loglog(errors, evaluations, "k--", lw=1, label=label)
        axes[1].loglog(errors, walls, "k--", lw=1, label=label)
        axes[2].loglog(errors, cpus, "k--", lw=1, label=label)
    ylabels = ["gradient evaluations", "wall time [s] (compile excluded)",
               "CPU time [s], all threads (compile excluded)"]
    for ax, ylabel in zip(axes, ylabels):
        ax.set_xlabel("max relative trajectory error over the save grid")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.invert_xaxis()
        if target_error is not None:
            ax.axvline(target_error, color="grey", lw=0.8, ls=":")
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
