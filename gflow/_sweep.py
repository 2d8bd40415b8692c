"""`sweep`: many gradient flows in one compiled program, and scaling fits of their stage times.

How members are batched
-----------------------
Every member is prepared exactly as `gflow.solve` prepares a flow (same validation, default
`atol`, controller, root finder and initial carry), and solved by the same engine
(`gflow._engine.run`): one `lax.while_loop` over event segments inside the program. So
transitions are located inside the batched program, per member, with the same root finding,
step counts and results as `gflow.solve`.

Members are grouped by structure: the non-array parts of their arguments (functions, solver,
settings) and the shapes of their arrays. The array leaves of a group are stacked along a
leading member axis and the group runs as ONE compiled program, under `lax.map` (members one
after the other inside the program: each takes its own number of steps; the CPU default) or
`jax.vmap` (members in lock-step: every member steps until the slowest is done; right for
GPU/TPU, the default there). With more than one device the member axis is sharded over them
(`shard_map` over a one-axis `Mesh`; each device maps or vmaps its own shard). `"loop"`
runs the members of a group one by one in a Python loop through one compiled single-member
program. Every member is truly batched under `"map"`/`"vmap"`; members of different structure
form separate groups (one compiled program each).

Sharing a program. Functions compare by identity: members whose observers, conditions or
losses are fresh closures per member form groups of their own. Write them as `eqx.Module`s
with array fields (as `gflow.observers` and the presets do) or define them once, and members
built by separate calls share one program.

Devices and hosts. The members of a group are padded (by repeating the last one) to a multiple
of the device count and sharded over a one-axis `Mesh` of `jax.devices()`: the local devices of
this process or, after `jax.distributed.initialize` (`jax.process_count() > 1`), the devices of
every process. No device talks to another while solving. Across processes every process runs
the same Python code: it builds every member (so `make_flow` must build the same members on
every process: different groups or array shapes are an `InputError` before anything is
compiled; different values go unnoticed), assembles the global input arrays with
`jax.make_array_from_callback` (each process places only the shards of its own devices), runs
its shards, and gathers every output with `jax.experimental.multihost_utils.process_allgather`,
so that EVERY process returns the same `Sweep` (write files from process 0 only, as
`python -m gflow.sweep` does). In one process a group uses at most one device per member;
across processes it uses every device (each process must hold a shard), so a group of fewer
members than devices computes padding. `"loop"` and groups of one member run in every process,
unsharded. On GPU/TPU `vmap` is the default: members step in lock-step, so group members of
similar difficulty together (e.g. sweep seeds at one `eps`) for the best throughput.
"""

import csv
import dataclasses
import io
import itertools
import json
import math
import os
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.tree_util as jtu
import numpy as np
from jax.experimental import multihost_utils
from jaxtyping import ArrayLike, Float

from . import _engine as engine
from ._precision import Precision
from ._errors import InputError
from ._flow import GradientFlow
from ._results import member_stats, solve_outcome, trajectory
from ._scaling import ScalingLaw
from ._solve import checked_flow
from ._solvers import solver_name
from ._spec import (
    DEFAULT_ICOEFF, DEFAULT_MAX_STEPS, DEFAULT_PCOEFF, DEFAULT_RTOL,
    DEFAULT_SOLVER, SolveSpec, Transition,
)
from ._names import flat_names
from ._stats import fit_line
from ._trajectory import (
    Trajectory,
    _json_default,
    _json_ready,
    atomic_write_bytes,
    package_versions,
    remove_stale,
    write_manifest,
)


BATCH_MODES = ("auto", "map", "vmap", "loop")
_MEMBER_AXIS = "members"
SWEEP_FILE = "sweep.json"
MEMBERS_FILE = "members.csv"
# Final observables up to this many numbers go into sweep.json (matrices would swamp it).
_MAX_JSON_OBSERVABLE_SIZE = 64
# ... and into members.csv up to this many (one column each).
_MAX_CSV_OBSERVABLE_SIZE = 8
_RESERVED_AXES = ("status", "t_final", "steps")


# --------------------------------------------------------------------------------------------
# One member's whole solve: the engine's `run`, then the observers at the final state


def _member_solve(plan: engine.Plan, carry: engine.Carry, final_observers: dict) -> dict:
    """`gflow.solve`'s engine run for one member, plus the observables at its end."""
    c = engine.run(plan, carry, engine.ALL_SEGMENTS)
    return dict(carry=c, final=engine.observe(plan.flow, final_observers, c.y))


def _group(keys: list) -> list[list[int]]:
    """Indices of members sharing one structure, in order of first appearance."""
    groups: dict = {}
    order = []
    for i, key in enumerate(keys):
        if key is None:  # unhashable static data: a group of its own
            key = ("unhashable", i)
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(i)
    return [groups[k] for k in order]


# --------------------------------------------------------------------------------------------
# Compiled group programs


def _default_batch() -> str:
    # On CPU lax.map wins (each member takes its own steps); on accelerators vmap does.
    return "map" if jax.default_backend() == "cpu" else "vmap"


def _program(rebuild: Callable, batch: str, n_devices: int) -> Callable:
    def one(leaves):
        return _member_solve(*rebuild(leaves))

    if batch == "loop":
        return one
    batched = (lambda leaves: jax.lax.map(one, leaves)) if batch == "map" else jax.vmap(one)
    if n_devices == 1:
        return batched
    spec = jax.sharding.PartitionSpec(_MEMBER_AXIS)
    # Each device maps (or vmaps) its own shard: no cross-device synchronisation per step.
    return jax.shard_map(
        batched, mesh=_mesh(n_devices), in_specs=spec, out_specs=spec, check_vma=False
    )


def _mesh(n_devices: int) -> jax.sharding.Mesh:
    """The member axis over the first `n_devices` of `jax.devices()` (every process's)."""
    return jax.sharding.Mesh(np.asarray(jax.devices()[:n_devices]), (_MEMBER_AXIS,))


def _group_devices(n: int) -> int:
    """How many devices a group of `n` members is sharded over."""
    if jax.process_count() > 1:
        # Every process runs the program and must hold a shard of it: all devices.
        return jax.device_count()
    return min(jax.device_count(), n)


def _run_group(all_args: list[tuple], key, rebuild, batch: str) -> tuple[list[dict], dict]:
    """Solve the members of one group; their outputs as numpy, and the group's timings."""
    member_leaves = [engine.split(args)[0] for args in all_args]
    n = len(all_args)
    info = dict(size=n, batch=batch, devices=1, processes=1, compile_seconds=0.0,
                run_seconds=0.0)
    if batch == "loop" or n == 1:
        info["batch"] = "loop"  # a lone member needs no batching
        outputs = []
        for leaves in member_leaves:
            compiled, trace, compile_ = engine.compiled(
                ("sweep", "loop", 1, key), lambda: _program(rebuild, "loop", 1), leaves
            )
            seconds = trace + compile_
            start = time.perf_counter()
            out = engine.to_host(compiled(leaves))
            info["run_seconds"] += time.perf_counter() - start
            info["compile_seconds"] += seconds
            outputs.append(out)
        return outputs, info

    n_devices = _group_devices(n)
    padded = -n % n_devices
    # Pad to a multiple of the device count by repeating the last member; dropped afterwards.
    rows = member_leaves + [member_leaves[-1]] * padded
    stacked = [np.stack([np.asarray(x) for x in column]) for column in zip(*rows)]
    if n_devices > 1:
        sharding = jax.sharding.NamedSharding(
            _mesh(n_devices), jax.sharding.PartitionSpec(_MEMBER_AXIS)
        )
        # Every process holds every member's inputs and places the shards of its own devices.
        stacked = [
            jax.make_array_from_callback(x.shape, sharding, lambda index, x=x: x[index])
            for x in stacked
        ]
    compiled, trace, compile_ = engine.compiled(
        ("sweep", batch, n_devices, len(rows), key),
        lambda: _program(rebuild, batch, n_devices), stacked,
    )
    seconds = trace + compile_
    start = time.perf_counter()
    # Every process receives every shard (in one process: a plain copy to the host).
    out = multihost_utils.process_allgather(compiled(stacked), tiled=True)
    info.update(devices=n_devices, processes=jax.process_count(), compile_seconds=seconds,
                run_seconds=time.perf_counter() - start)
    return [jtu.tree_map(lambda x, i=i: x[i], out) for i in range(n)], info


# --------------------------------------------------------------------------------------------
# Results


class SweepMember(eqx.Module):
    """One point of a sweep.

    **Fields:**

    - `point`: the swept parameters, `{axis: value}`.
    - `status`: as `Trajectory.status` (`"completed"`, `"max_steps"`, `"nonfinite"`,
        `"dt_min"`, `"failed"`); `message` says more when it is not `"completed"`.
    - `transitions`: `{name: time}`, `nan` if not reached.
    - `final`: the observables (the loss included) evaluated at the final state, `t_final`.
    - `t_final`: where the solve stopped (`t1` when completed).
    - `stats`: steps (total, accepted, rejected), vector-field evaluations, segments; the
        timings are per group, in `Sweep.groups`.
    - `group`: index into `Sweep.groups` of the compiled program that ran this member.
    - `trajectory`: the full `Trajectory` when the sweep kept trajectories, else `None`.
    - `spec`: the `gflow.SolveSpec` the member ran.
    """

    point: dict[str, Any]
    status: str
    message: str
    transitions: dict[str, float]
    final: dict[str, Any]
    t_final: float
    stats: dict[str, Any]
    group: int
    trajectory: Trajectory | None = None
    spec: SolveSpec | None = None

    @property
    def completed(self) -> bool:
        """Whether the member's solve reached `t1`."""
        return self.status == "completed"


def member_summary(m: SweepMember) -> dict[str, Any]:
    """One member's entry of `sweep.json` (JSON-ready; final observables with more than 64
    numbers are left out)."""
    final = {
        name: value
        for name, value in flat_names(m.final).items()
        if np.size(value) <= _MAX_JSON_OBSERVABLE_SIZE
    }
    return _json_ready(dict(
        point=m.point,
        status=m.status,
        message=m.message,
        t_final=m.t_final,
        transitions=m.transitions,
        stats=m.stats,
        group=m.group,
        final={k: np.asarray(v, dtype=float).tolist() for k, v in final.items()},
    ))


class ScalingFit(eqx.Module):
    """A least-squares scaling law of a transition time against a swept parameter.

    - `law="power"`: `T = A x^slope`, fitted as `ln T = ln A + slope ln x`.
    - `law="log"`: `T = intercept + slope ln(1/x)` (e.g. Saxe's `ln(1/u0)/(2s)`).

    Members sharing a value of `x` (other axes, e.g. seeds) are averaged first: the mean of
    `ln T` for a power law (a geometric mean), of `T` for a log law. The fit is ordinary least
    squares on these means; `ci95` is `slope ± t(0.975, n−2) · stderr` over the `n` distinct
    values (`nan` with two values). Members without a finite time (the transition was never
    reached) are left out; a time located before a member failed later is kept.

    **Fields:** `transition`, `against`, `law`, `slope`, `intercept`, `stderr`, `ci95`,
    `x` (distinct values), `y` (their mean times, in time units), `counts` (members averaged
    per value), `excluded` (members without a finite time),
    `expected` (the theory's slope, if given), `basis` (where that slope comes from).
    """

    transition: str
    against: str
    law: str
    slope: float
    intercept: float
    stderr: float
    ci95: tuple[float, float]
    x: Float[np.ndarray, " n"]
    y: Float[np.ndarray, " n"]
    counts: np.ndarray
    excluded: int
    expected: float | None = None
    basis: str = ""

    def predict(self, x: Float[ArrayLike, "..."]) -> Float[np.ndarray, "..."]:
        """The fitted transition time at `x`."""
        x = np.asarray(x, dtype=np.float64)
        if self.law == "power":
            return np.exp(self.intercept + self.slope * np.log(x))
        return self.intercept + self.slope * np.log(1.0 / x)

    @property
    def rel_error(self) -> float | None:
        """`|slope − expected| / |expected|`, or `None` without an expected slope."""
        if self.expected is None:
            return None
        return abs(self.slope - self.expected) / abs(self.expected)

    @property
    def agrees(self) -> bool | None:
        """Whether the expected slope lies in the 95% interval (`None` without one)."""
        if self.expected is None or not all(map(math.isfinite, self.ci95)):
            return None
        return bool(self.ci95[0] <= self.expected <= self.ci95[1])

    def summary(self) -> dict[str, Any]:
        """JSON-ready fields (non-finite numbers as `None`)."""
        finite = lambda v: float(v) if v is not None and math.isfinite(v) else None
        return dict(
            transition=self.transition,
            against=self.against,
            law=self.law,
            slope=finite(self.slope),
            intercept=finite(self.intercept),
            stderr=finite(self.stderr),
            ci95=[finite(v) for v in self.ci95],
            points=len(self.x),
            excluded=self.excluded,
            expected=self.expected,
            basis=self.basis,
            rel_error=finite(self.rel_error),
            agrees=self.agrees,
        )

    @property
    def description(self) -> str:
        """One line: the fitted slope with its interval, and the theory's beside it."""
        what = "exponent" if self.law == "power" else "slope vs ln(1/x)"
        low, high = self.ci95
        interval = f" (95%: {low:.4g} .. {high:.4g})" if math.isfinite(low) else ""
        line = f"{what} {self.slope:.6g}{interval}"
        if self.expected is not None:
            verdict = {True: "inside", False: "outside", None: "no"}[self.agrees]
            line += f"; theory {self.expected:.6g} ({verdict} the interval)"
            if self.basis:
                line += f" from {self.basis}"
        return line


class Sweep(eqx.Module):
    """The result of `sweep`: one `SweepMember` per point, in the order of the points.

    **Fields:**

    - `axes`: `{name: values}` as given in `over`.
    - `mode`: `"grid"` or `"zip"`.
    - `members`: the `SweepMember`s.
    - `groups`: one dict per compiled program: `members` (indices), `size`, `batch`
        (`"map"`, `"vmap"` or `"loop"`), `devices` (over all processes), `processes`,
        `compile_seconds`, `run_seconds`.
    - `t0`, `t1`, `solver`, `rtol`: the shared settings (`rtol` the step-size controller's, as
        `Trajectory.rtol`).
    """

    axes: dict[str, tuple]
    mode: str
    members: tuple[SweepMember, ...]
    groups: tuple[dict, ...]
    t0: float
    t1: float
    solver: str
    rtol: float

    def __len__(self) -> int:
        return len(self.members)

    def __repr__(self) -> str:
        from ._export import sweep_repr

        return sweep_repr(self)

    def _repr_html_(self) -> str:
        from ._export import sweep_html

        return sweep_html(self)

    def to_pandas(self):
        """`table()` as a `pandas.DataFrame`, one row per member (needs `pip install
        gflow[xarray]`).

        **Returns:**

        A `pandas.DataFrame` with the swept axes, `status`, each transition time (`nan` if
        not reached), `t_final`, `steps` and the final observables (`final_<name>`, see
        `table`).
        """
        from ._export import sweep_to_pandas

        return sweep_to_pandas(self)

    def __iter__(self) -> Iterator[SweepMember]:
        return iter(self.members)

    def __getitem__(self, i: int) -> SweepMember:
        return self.members[i]

    @property
    def transition_names(self) -> list[str]:
        """Every transition name, in order of first appearance."""
        names: dict[str, None] = {}
        for m in self.members:
            names.update(dict.fromkeys(m.transitions))
        return list(names)

    def table(self) -> list[dict[str, Any]]:
        """One row per member: its point, status, every transition time (`nan` if not
        reached), `t_final`, steps, and the final observables of at most 8 numbers:
        `final_<name>` for a scalar, `final_<name>_<k>` for the k-th entry of a vector (`nan`
        where a member lacks one)."""
        names = self.transition_names
        finals = [
            {f"final_{name}" + (f"_{k}" if np.ndim(value) else ""): float(x)
             for name, value in flat_names(m.final).items()
             if np.size(value) <= _MAX_CSV_OBSERVABLE_SIZE
             for k, x in enumerate(np.ravel(np.asarray(value, dtype=float)))}
            for m in self.members
        ]
        columns = dict.fromkeys(c for final in finals for c in final)
        return [
            dict(m.point)
            | dict(status=m.status)
            | {name: m.transitions.get(name, math.nan) for name in names}
            | dict(t_final=m.t_final, steps=m.stats["num_steps"])
            | {c: final.get(c, math.nan) for c in columns}
            for m, final in zip(self.members, finals)
        ]

    def summary(self) -> dict[str, Any]:
        """The JSON-ready content of `sweep.json` (non-finite numbers as `null`); final
        observables with more than 64 numbers are left out."""
        members = [member_summary(m) for m in self.members]
        return _json_ready(
            dict(
                axes={k: list(v) for k, v in self.axes.items()},
                mode=self.mode,
                t0=self.t0,
                t1=self.t1,
                solver=self.solver,
                rtol=self.rtol,
                groups=list(self.groups),
                members=members,
                versions=package_versions(),
            )
        )

    def save(
        self,
        path: str | os.PathLike,
        extra: Mapping[str, Any] | None = None,
        *,
        fits: Sequence["ScalingFit"] = (),
    ) -> Path:
        """Write `sweep.json` (`summary()`, updated with `extra` and the `fits`), `members.csv`
        (`table()`) and, for each fit, its figure `figures/<transition>_vs_<against>.png`
        (`plot_fit`).

        **Arguments:**

        - `path`: the directory (created if missing).
        - `extra`: more JSON-ready entries for `sweep.json` (e.g. the config).
        - `fits`: `ScalingFit`s of this sweep (from `Sweep.fit`), written to `sweep.json`
            under `fits` and drawn.

        **Returns:**

        The directory's path.
        """
        path = Path(path)
        if os.path.lexists(path) and not path.is_dir():
            raise InputError(f"cannot save the sweep to {path}: it exists and is not a "
                             "directory")
        path.mkdir(parents=True, exist_ok=True)
        try:
            self._save(path, extra, fits)
        except OSError as e:
            e.add_note(f"gflow: this Sweep is intact in memory: call its save() again (into "
                       f"{path} once it has room, or elsewhere)")
            raise
        return path

    def _save(self, path: Path, extra, fits) -> None:
        # The directory's manifest lists what gflow wrote there: figures of an earlier save
        # that this one does not redraw are removed, a user's files are not.
        write_manifest(path)
        extra = dict(extra or {}) | ({"fits": [f.summary() for f in fits]} if fits else {})
        summary = self.summary() | _json_ready(extra)
        text = json.dumps(summary, indent=2, default=_json_default, allow_nan=False)
        atomic_write_bytes(path / SWEEP_FILE, (text + "\n").encode())
        rows = self.table()
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})
        atomic_write_bytes(path / MEMBERS_FILE, buffer.getvalue().encode())
        names = [f"figures/{fit.transition}_vs_{fit.against}".replace("/", "__")
                 .replace("figures__", "figures/", 1) + ".png" for fit in fits]
        remove_stale(path, set(names), among=lambda name: name.startswith("figures/"))
        for fit, name in zip(fits, names):
            (path / "figures").mkdir(exist_ok=True)
            buffer = io.BytesIO()
            plot_fit(fit, self).savefig(buffer, format="png", dpi=110, bbox_inches="tight")
            atomic_write_bytes(path / name, buffer.getvalue())

    def fit(
        self,
        transition: str,
        against: str = "eps",
        law: "str | ScalingLaw" = "power",
        *,
        expected: float | None = None,
    ) -> ScalingFit:
        """Fit a scaling law of `transition`'s time against the swept parameter `against`.

        **Arguments:**

        - `transition`: a transition name.
        - `against`: a swept axis with positive numeric values.
        - `law`: `"power"` (slope of `ln T` against `ln x`: the exponent), `"log"` (slope of
            `T` against `ln(1/x)`), or a `gflow.ScalingLaw` (theory's law: fitted, with its
            slope as `expected` and its basis).
        - `expected`: the theory's slope, to compare with (`ScalingFit.agrees`, `rel_error`).

        **Returns:**

        A `ScalingFit`; members that never reached the transition are left out.
        """
        basis = ""
        if isinstance(law, ScalingLaw):
            law, expected, basis = law.law, law.slope if expected is None else expected, law.basis
        if law not in ("power", "log"):
            raise InputError(f"law must be 'power' or 'log', got {law!r}")
        if against not in self.axes:
            raise InputError(f"no swept axis {against!r}; axes: {', '.join(self.axes)}")
        if transition not in self.transition_names:
            raise InputError(
                f"no transition {transition!r}; transitions: {', '.join(self.transition_names)}"
            )
        by_value: dict[float, list[float]] = {}
        excluded = 0
        for m in self.members:
            x = m.point[against]
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not x > 0:
                raise InputError(f"axis {against!r} must hold positive numbers, got {x!r}")
            t = m.transitions.get(transition, math.nan)
            # A time located before a later failure is as accurate as any other: kept.
            if not (math.isfinite(t) and t > 0):
                excluded += 1
                continue
            by_value.setdefault(float(x), []).append(float(t))
        xs = np.asarray(sorted(by_value), dtype=np.float64)
        if xs.size < 2:
            raise InputError(
                f"fitting {transition!r} needs finite times at two or more values of {against!r}, "
                f"got {xs.size}"
            )
        times = [np.asarray(by_value[x]) for x in xs]
        if law == "power":
            u, v = np.log(xs), np.asarray([np.mean(np.log(t)) for t in times])
            y = np.exp(v)
        else:
            u, v = np.log(1.0 / xs), np.asarray([np.mean(t) for t in times])
            y = v
        slope, intercept, stderr, ci = fit_line(u, v)
        return ScalingFit(
            transition=transition,
            against=against,
            law=law,
            slope=slope,
            intercept=intercept,
            stderr=stderr,
            ci95=ci,
            x=xs,
            y=y,
            counts=np.asarray([t.size for t in times]),
            excluded=excluded,
            expected=None if expected is None else float(expected),
            basis=basis,
        )


def plot_fit(fit: ScalingFit, sweep: "Sweep | None" = None):
    """A figure of a scaling fit: transition time against the swept parameter.

    Each member is a small grey dot (when `sweep` is given), the per-value means black
    dots, the fitted law a line labelled with its slope and 95% interval, and the theory's
    law (if the fit has an expected slope) a dashed line of that slope through the data's
    centre, labelled with its slope. Log-log axes for a power law; time against `ln(1/x)`
    (log x axis) for a log law.

    **Returns:**

    A `matplotlib.figure.Figure` (no pyplot: nothing global changes).
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot()
    if sweep is not None:
        points = [
            (m.point[fit.against], m.transitions.get(fit.transition, math.nan))
            for m in sweep.members
        ]
        points = [(x, t) for x, t in points if math.isfinite(t) and t > 0]
        if points:
            px, pt = zip(*points)
            ax.plot(px, pt, ".", color="0.6", ms=4, label="members")
    ax.plot(fit.x, fit.y, "o", color="k", ms=5, label="mean per value")
    grid = np.geomspace(fit.x.min(), fit.x.max(), 200)
    low, high = fit.ci95
    interval = f" [{low:.4g}, {high:.4g}]" if math.isfinite(low) else ""
    what = "exponent" if fit.law == "power" else "slope vs ln(1/x)"
    ax.plot(grid, fit.predict(grid), "-", color="tab:red", lw=1.4,
            label=f"fit: {what} {fit.slope:.4g}{interval}")
    if fit.expected is not None:
        if fit.law == "power":
            centre = np.exp(np.mean(np.log(fit.y)) - fit.expected * np.mean(np.log(fit.x)))
            expected = centre * grid**fit.expected
        else:
            centre = np.mean(fit.y) - fit.expected * np.mean(np.log(1.0 / fit.x))
            expected = centre + fit.expected * np.log(1.0 / grid)
        basis = f"\n({fit.basis})" if fit.basis else ""
        ax.plot(grid, expected, "--", color="tab:blue", lw=1.2,
                label=f"theory: {what} {fit.expected:.4g}{basis}")
    from .figures import log_x_axis, log_y_axis

    log_x_axis(ax, fit.x)
    if fit.law == "power":
        log_y_axis(ax, fit.y)
    ax.set_xlabel(f"{fit.against} (log scale)")
    ax.set_ylabel(f"time of {fit.transition}" + (" (log scale)" if fit.law == "power" else ""))
    law = "T = A x^k" if fit.law == "power" else "T = a + k ln(1/x)"
    ax.set_title(f"{fit.transition} against {fit.against}: {law}", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.grid(alpha=0.3, which="both")
    return fig


# --------------------------------------------------------------------------------------------
# sweep


def _axes(over: Mapping[str, Sequence]) -> dict[str, list]:
    """`over` checked: non-empty, string axis names, non-empty sequences of values."""
    if not isinstance(over, Mapping) or not over:
        raise InputError("over must be a non-empty mapping {axis: [values]}")
    axes = {}
    for name, values in over.items():
        if not isinstance(name, str) or not name:
            raise InputError(f"axis names must be non-empty strings, got {name!r}")
        if name in _RESERVED_AXES or name.startswith("final_"):
            raise InputError(f"{name!r} cannot name an axis: it is a column of Sweep.table()")
        if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, np.ndarray)):
            raise InputError(f"axis {name!r} must be a sequence of values, got {values!r}")
        values = [v.item() if isinstance(v, np.generic) else v for v in values]
        if not values:
            raise InputError(f"axis {name!r} has no values")
        axes[name] = values
    return axes


def sweep_points(over: Mapping[str, Sequence], mode: str = "grid") -> list[dict[str, Any]]:
    """The points of a sweep: every combination (`"grid"`, last axis fastest) or the axes
    read in parallel (`"zip"`, equal lengths).

    **Arguments:**

    - `over`: `{axis: [values]}`.
    - `mode`: `"grid"` or `"zip"`.

    **Returns:**

    A list of `{axis: value}` dicts.
    """
    axes = _axes(over)
    if mode == "grid":
        return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]
    if mode == "zip":
        lengths = {name: len(v) for name, v in axes.items()}
        if len(set(lengths.values())) != 1:
            raise InputError(f"mode='zip' needs axes of equal length, got {lengths}")
        return [dict(zip(axes, combo)) for combo in zip(*axes.values())]
    raise InputError(f"mode must be 'grid' or 'zip', got {mode!r}")


def _flow_parts(built, point) -> tuple[GradientFlow, dict, tuple, dict]:
    if isinstance(built, GradientFlow):
        return built, {}, (), {}
    flow = getattr(built, "flow", None)
    if not isinstance(flow, GradientFlow):
        raise InputError(
            f"make_flow({point}) must return a gflow.GradientFlow or an object with a `flow` "
            f"GradientFlow (e.g. gflow.presets.Problem), got {type(built).__name__}"
        )
    return flow, dict(getattr(built, "observers", None) or {}), tuple(
        getattr(built, "transitions", None) or ()
    ), dict(getattr(built, "snapshots", None) or {})

def _prepare(flow: GradientFlow, spec: SolveSpec, keep_trajectories: bool) -> tuple[tuple, dict]:
    """`_member_solve`'s arguments for one member's `spec`, and what is needed to report it."""
    flow = checked_flow(flow)
    precision = spec.precision
    with precision.scope():
        # Under "float32" the member runs on float32 copies of its float64 init and data.
        run_flow, run_spec, observers = precision.cast((flow, spec, spec.with_loss(flow)))
        # Without trajectories only the final state is observed: the segments save the loss
        # once, and take no snapshots.
        plan = run_spec.plan(run_flow, observers if keep_trajectories
                             else {"loss": observers["loss"]},
                             snapshots=None if keep_trajectories else {})
        _, _, plan_key = engine.split(plan)
        template = engine.carry_template(plan, plan_key)
        args = (plan, engine.start(template, run_flow.params, spec.t0), observers)
    return args, dict(flow=flow, spec=spec)


def sweep(
    make_flow: Callable[..., Any],
    over: Mapping[str, Sequence],
    t1: float,
    *,
    mode: str = "grid",
    batch: str = "auto",
    t0: float = 0.0,
    solver: str | diffrax.AbstractSolver = DEFAULT_SOLVER,
    rtol: float = DEFAULT_RTOL,
    atol: float | None = None,
    ts: ArrayLike | None = None,
    max_steps: int = DEFAULT_MAX_STEPS,
    dt0: float | None = None,
    stepsize_controller: diffrax.AbstractStepSizeController | None = None,
    observers: Mapping[str, Callable] | None = None,
    transitions: Sequence[Transition] = (),
    keep_trajectories: bool = False,
    callback: Callable[[int, SweepMember], None] | None = None,
    controller: diffrax.AbstractStepSizeController | None = None,
    pcoeff: float = DEFAULT_PCOEFF,
    icoeff: float = DEFAULT_ICOEFF,
    spec: SolveSpec | None = None,
    precision: "str | Precision" = "float64",
    snapshots: Mapping[str, Callable] | None = None,
    snapshot_ts: ArrayLike | None = None,
) -> Sweep:
    """Solve the gradient flows of many points at once and collect their stage times.

    **Arguments:**

    - `make_flow`: `make_flow(**point)` returns a `GradientFlow`, or an object with a `flow`
        attribute and optional `observers` and `transitions` (e.g. a `gflow.presets.Problem`).
    - `over`: `{axis: [values]}`, e.g. `{"eps": [1e-2, 1e-3], "seed": range(4)}`.
    - `t1`: end time, shared by all members.
    - `mode`: `"grid"` (every combination) or `"zip"` (axes read in parallel).
    - `batch`: `"map"` (`lax.map` inside one program), `"vmap"` (lock-step), `"loop"` (one
        member at a time through one compiled program) or `"auto"` (`"map"` on CPU, `"vmap"`
        on GPU/TPU). With several devices, `"map"`/`"vmap"` shard the members over them: the
        local devices, or every process's after `jax.distributed.initialize` (module notes).
    - `t0`, `solver`, `rtol`, `atol`, `ts`, `max_steps`, `dt0`, `stepsize_controller`: as
        `gflow.solve`, for every member (`atol=None` is scaled to each member's own init);
        `controller` is an alias of `stepsize_controller`; `pcoeff`, `icoeff` the default
        controller's PID coefficients. Each member runs the `gflow.SolveSpec` that
        `gflow.solve(flow, t1, **these)` would (`SweepMember.spec`).
    - `spec`: instead of those options, one `gflow.SolveSpec` for every member (its `atol` is
        then shared); the problem's own observers and transitions are added to it.
    - `precision`: as `gflow.solve`'s, for every member (each member's `rtol` floor is measured
        on its own init; under `"float32"` each member runs on float32 copies of its init).
    - `observers`, `transitions`, `snapshots`: added after the problem's own (if `make_flow`
        returns one); `snapshot_ts`: as `gflow.solve`'s. Snapshots are taken only with
        `keep_trajectories` (`SweepMember.trajectory.snapshots`).
    - `keep_trajectories`: keep each member's full `Trajectory` (observables at the save times
        `ts`, default a 200-point log grid); otherwise only observables at the final state.
    - `callback`: `callback(index, member)` as each member's result is ready (progress).

    **Returns:**

    A `Sweep`. A member that fails (`max_steps`, a blow-up, a collapsed step) is reported
    with its status and does not affect the others. Across several processes (after
    `jax.distributed.initialize`) every process must make the same call, each computes its
    shard of the members, and every process returns the same, complete `Sweep`.
    """
    if not callable(make_flow):
        raise InputError("make_flow must be callable as make_flow(**point)")
    if batch not in BATCH_MODES:
        raise InputError(f"batch must be one of {', '.join(BATCH_MODES)}, got {batch!r}")
    points = sweep_points(over, mode)
    if spec is not None and not isinstance(spec, SolveSpec):
        raise InputError(f"spec must be a gflow.SolveSpec, got {type(spec).__name__}")
    if ts is None and not keep_trajectories:
        ts = [t1]  # only the final state is observed
    batch = _default_batch() if batch == "auto" else batch

    all_args, infos, models = [], [], []
    for point in points:
        flow, own_observers, own_transitions, own_snapshots = _flow_parts(make_flow(**point),
                                                                          point)
        models.append(flow.model)
        if spec is None:
            member_spec = SolveSpec.from_options(
                flow, t1, t0=t0, solver=solver, rtol=rtol, atol=atol, ts=ts,
                observers=own_observers | dict(observers or {}),
                transitions=own_transitions + tuple(transitions), max_steps=max_steps,
                dt0=dt0, stepsize_controller=stepsize_controller, controller=controller,
                pcoeff=pcoeff, icoeff=icoeff, precision=precision,
                snapshots=own_snapshots | dict(snapshots or {}), snapshot_ts=snapshot_ts,
            )
        else:
            member_spec = dataclasses.replace(
                spec, observers=own_observers | dict(spec.observers),
                transitions=own_transitions + tuple(spec.transitions),
                snapshots=own_snapshots | dict(spec.snapshots))
        args, info = _prepare(flow, member_spec, keep_trajectories)
        all_args.append(args)
        infos.append(info)

    _check_shared_observers(spec.observers if spec is not None else observers, models)
    splits = [engine.split(args) for args in all_args]
    groups = _group([key for _, _, key in splits])
    if jax.process_count() > 1:
        _check_same_groups(groups, all_args)

    first = infos[0]["spec"]
    members: list[SweepMember | None] = [None] * len(points)
    group_infos = []
    for g, indices in enumerate(groups):
        _, rebuild, key = splits[indices[0]]
        with infos[indices[0]]["spec"].precision.scope(), engine.one_lapack_thread():
            outputs, info = _run_group([all_args[i] for i in indices], key, rebuild, batch)
        group_infos.append(dict(members=list(indices)) | info)
        for i, out in zip(indices, outputs):
            members[i] = _member(points[i], infos[i], out, g, keep_trajectories)
            if callback is not None:
                callback(i, members[i])
    return Sweep(
        axes={k: tuple(v) for k, v in _axes(over).items()},
        mode=mode,
        members=tuple(members),
        groups=tuple(group_infos),
        t0=first.t0,
        t1=first.t1,
        solver=solver_name(first.solver),
        rtol=first.rtol,
    )

def _held_arrays(fn, depth: int = 0) -> list[np.ndarray]:
    """The arrays an observer holds: its module fields' and, for a function, those of the
    variables it closes over (one level of nesting)."""
    arrays = [np.asarray(x) for x in jtu.tree_leaves(eqx.filter(fn, eqx.is_array))]
    if depth < 2:
        for cell in getattr(fn, "__closure__", None) or ():
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            if callable(value):
                arrays += _held_arrays(value, depth + 1)
            else:
                arrays += [np.asarray(x) for x in jtu.tree_leaves(eqx.filter(value, eqx.is_array))]
    return arrays


def _digest(x: np.ndarray) -> tuple:
    return (x.shape, str(x.dtype), zlib.crc32(np.ascontiguousarray(x).tobytes()))


def _check_shared_observers(observers: Mapping[str, Callable] | None, models: list) -> None:
    """`sweep(observers=...)` are shared by every member: one holding a member's own initial
    arrays (e.g. `observers.relative_change(where, initial_model)` built from one member's
    model) would compare every other member with that one. Refused in one line that says how
    to give each member its own: from `make_flow`."""
    if not observers or len(models) < 2:
        return
    per_member = [{_digest(np.asarray(x)) for x in jtu.tree_leaves(eqx.filter(m, eqx.is_array))}
                  for m in models]
    everywhere = set.intersection(*per_member)
    for name, obs in observers.items():
        for x in _held_arrays(obs):
            d = _digest(x)
            if d not in everywhere and any(d in member for member in per_member):
                raise InputError(
                    f"observer {name!r} holds an array of one member's model (an initial "
                    "model?) and would compare every member with that one: build it in "
                    "make_flow from the member's own model and return it there, e.g. "
                    "SimpleNamespace(flow=flow, observers={...})")


def _check_same_groups(groups: list[list[int]], all_args: list[tuple]) -> None:
    """Every process must run the same programs on arrays of the same shapes, in the same
    order, or the collectives of a multi-process sweep would hang: compare fingerprints."""
    first = [jtu.tree_leaves(eqx.filter(all_args[g[0]], eqx.is_array)) for g in groups]
    shapes = [[(np.shape(x), str(x.dtype)) for x in leaves] for leaves in first]
    fingerprint = np.uint32(zlib.crc32(repr((groups, shapes)).encode()))
    try:
        multihost_utils.assert_equal(fingerprint)
    except AssertionError:
        raise InputError(
            "make_flow built different members (groups or array shapes) on different processes"
        ) from None

def _member(point, info, out, group, keep_trajectories) -> SweepMember:
    """A `SweepMember` (and its `Trajectory`) from the program's outputs for one member."""
    spec = info["spec"]
    carry = out["carry"]
    done = solve_outcome(carry, info["flow"], spec)
    traj = None
    if keep_trajectories:
        traj = trajectory(carry, flow=info["flow"], spec=spec, done=done)
    return SweepMember(
        point=dict(point),
        status=done["status"],
        message=done["message"],
        transitions=done["transitions"],
        final=jtu.tree_map(np.asarray, out["final"]),
        t_final=done["t_final"],
        stats=member_stats(done, spec.solver) | spec.precision.describe(),
        group=group,
        trajectory=traj,
        spec=spec,
    )
