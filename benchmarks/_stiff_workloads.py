"""The stiff benchmark's workloads as flat ODEs `dy/dt = f(y)` for solvers outside gflow
(SUNDIALS CVODE in `benchmarks.stiff_cvode`, scipy's BDF in `benchmarks.stiff`), with
gflow's default absolute tolerance and the start states that `benchmarks.stiff` passes on.

Imports only JAX, NumPy and gflow: `benchmarks.stiff_cvode` runs it under Python 3.12,
where the benchmarks' other extras (optax, torch) need not be installed.
"""

import dataclasses
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from jax.flatten_util import ravel_pytree

import gflow
from gflow import presets

# Workload name -> (preset, overrides).
WORKLOADS = {
    "deep-linear-1e4": ("deep-linear", ["solve.t1=1e4"]),
    "rank-collapse": ("rank-collapse", []),
    "rank-collapse-stiff": ("rank-collapse", []),
}
# Workloads started from the reference's state at its first save time from this t on: the
# default preset's stiff phase (after its last transition, λ_max up to 6).
STARTS = {"rank-collapse-stiff": 742.0}


def preset(name: str, overrides: list[str]):
    """`(settings, problem)` of preset `name` with `overrides`, certify off."""
    resolved = presets.resolve(name, ["solve.certify=false", *overrides])
    return resolved.solve, presets.build(resolved)


def default_atol(params, rtol: float) -> float:
    """gflow's default `atol` (see `gflow.solve`): `rtol` times the RMS size, in float64, of the
    smallest non-zero trainable leaf at the start."""
    sizes = [float(np.sqrt(np.mean(np.square(np.asarray(leaf, dtype=np.float64)))))
             for leaf in jax.tree_util.tree_leaves(params) if np.size(leaf) > 0]
    sizes = [s for s in sizes if s > 0]
    return rtol * (min(sizes) if sizes else 1.0)


@dataclasses.dataclass(frozen=True)
class FlatFlow:
    """A gradient flow as a flat ODE.

    **Fields:**

    - `velocity`: `y -> -∇L(y)` on the flat trainable state (jitted; takes NumPy arrays).
    - `jvp`: `(y, v) -> -∇²L(y) v`, the same Hessian-vector product gflow uses (jitted).
    - `y0`, `t0`, `t1`: the start (float64) and the horizon.
    - `ts`: the save times from `t0` on (the preset's grid; the first is `t0`).
    - `atol_scale`: gflow's default `atol` is `rtol × atol_scale` (`default_atol` at `y0`).
    """

    velocity: Callable
    jvp: Callable
    y0: np.ndarray
    t0: float
    t1: float
    ts: np.ndarray
    atol_scale: float

    def atol(self, rtol: float) -> float:
        return rtol * self.atol_scale


def flat_flow(flow: gflow.GradientFlow, t0: float, t1: float, ts, y0=None) -> FlatFlow:
    """`flow` (started from the flat trainable state `y0` when given) as a `FlatFlow` from `t0`
    to `t1`, saved at the `ts` from `t0` on."""
    params, unravel = ravel_pytree(flow.params)
    y = np.asarray(params if y0 is None else y0, dtype=np.float64)
    velocity = jax.jit(lambda y: ravel_pytree(flow.velocity(unravel(y)))[0])
    jvp = jax.jit(lambda y, v: jax.jvp(velocity, (y,), (v,))[1])
    ts = np.asarray(ts, dtype=np.float64)
    return FlatFlow(velocity=velocity, jvp=jvp, y0=y, t0=float(t0), t1=float(t1),
                    ts=ts[ts >= t0], atol_scale=default_atol(unravel(y), 1.0))


def workload_flow(workload: str, start: tuple[float, np.ndarray] | None = None) -> FlatFlow:
    """Workload `workload`'s flow as a `FlatFlow`, from `start = (t0, flat y0)` when given
    (a started workload needs one: `read_starts`)."""
    if workload in STARTS and start is None:
        raise ValueError(f"workload {workload!r} starts from the reference's state: pass its "
                         "start (python -m benchmarks.stiff --write-starts FILE)")
    settings, problem = preset(*WORKLOADS[workload])
    t0, y0 = (settings.t0, None) if start is None else start
    return flat_flow(problem.flow, t0, settings.t1, settings.save_times(), y0)


def write_starts(path: Path, starts: dict[str, tuple[float, np.ndarray]]) -> None:
    """Save `{workload: (t0, flat y0)}` to the `.npz` file `path`."""
    arrays = {}
    for workload, (t0, y0) in starts.items():
        arrays[f"{workload}/t0"] = np.float64(t0)
        arrays[f"{workload}/y0"] = np.asarray(y0, dtype=np.float64)
    np.savez(path, **arrays)


def read_starts(path: Path) -> dict[str, tuple[float, np.ndarray]]:
    """The `{workload: (t0, flat y0)}` that `write_starts` saved."""
    with np.load(path) as data:
        names = {key.rsplit("/", 1)[0] for key in data.files}
        return {w: (float(data[f"{w}/t0"]), np.array(data[f"{w}/y0"])) for w in names}
