"""Figures of a trajectory: each observable over time, transitions marked.

`python -m gflow.plot RUN_DIR` redraws the figures of a saved run without recomputing it.
"""

import math
import sys
from pathlib import Path

import numpy as np

from ._errors import InputError
from ._trajectory import Trajectory, _flat_names, atomic_write_bytes


_MAX_LINES = 16  # observables with more components are drawn as their largest few


def _time_axis(ts: np.ndarray, time_axis: str) -> tuple[np.ndarray, bool]:
    """Rows to draw, and whether to use a log axis (t = t0 cannot sit on a log axis)."""
    if time_axis == "log" and np.any(ts > 0):
        return ts > 0, True
    return np.ones_like(ts, dtype=bool), False


def plot_observable(
    traj: Trajectory, name: str, *, time_axis: str = "log", labels: tuple[str, ...] = ()
):
    """A matplotlib figure of one observable (a flattened name, e.g. `"layer_norms"`).

    Vector-valued observables are drawn one line per component (at most 16: the largest ones);
    transitions are vertical dashed lines with their names.

    **Arguments:**

    - `traj`: the trajectory.
    - `name`: the observable's name, nested names joined by `/`.
    - `time_axis`: `"log"` or `"linear"`.
    - `labels`: legend names of the components (default their indices).

    **Returns:**

    A `matplotlib.figure.Figure`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    flat = _flat_names(traj.observables)
    if name not in flat:
        raise InputError(f"no observable named {name!r}; have: {', '.join(flat)}")
    values = np.asarray(flat[name], dtype=float)
    rows, log_t = _time_axis(np.asarray(traj.ts), time_axis)
    ts, values = np.asarray(traj.ts)[rows], values[rows].reshape(rows.sum(), -1)

    fig, ax = plt.subplots(figsize=(6.4, 4.0), layout="constrained")
    names = list(labels) if len(labels) == values.shape[1] else [f"[{k}]" for k in range(values.shape[1])]
    if values.shape[1] > _MAX_LINES:
        keep = np.sort(np.argsort(-np.nanmax(np.abs(values), axis=0))[:_MAX_LINES])
        values, names = values[:, keep], [names[k] for k in keep]
        ax.set_title(f"{name} (largest {_MAX_LINES} of its components)")
    else:
        ax.set_title(name)
    for k in range(values.shape[1]):
        ax.plot(ts, values[:, k], lw=1.4, label=names[k] if values.shape[1] > 1 else None)
    finite = values[np.isfinite(values)]
    positive = finite[finite > 0]
    # Non-negative data spanning decades (norms, relative changes from 0) reads on a log axis;
    # exact zeros (e.g. the change at t0) are simply not drawn there.
    if positive.size and np.all(finite >= 0) and positive.max() / positive.min() > 1e3:
        ax.set_yscale("log", nonpositive="mask")
    if log_t:
        ax.set_xscale("log")
    for i, (tname, t) in enumerate(traj.transitions.items()):
        if math.isfinite(t) and (not log_t or t > 0):
            ax.axvline(t, color="0.3", ls="--", lw=0.9)
            ax.annotate(
                tname, (t, 1.0), xycoords=("data", "axes fraction"), rotation=90,
                va="top", ha="right", fontsize=7, color="0.3",
            )
    ax.set_xlabel("flow time t" + (" (log scale)" if log_t else ""))
    if 1 < values.shape[1] <= 8:
        ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    return fig


def save_figures(
    traj: Trajectory, directory, *, time_axis: str = "log", labels: dict | None = None
) -> list[Path]:
    """Write one PNG per observable (`<name>.png`, `/` replaced by `__`) into `directory`.

    `labels` maps observable names to the legend names of their components.

    Observables with more than two axes per save (e.g. matrices) are not drawn here.

    **Returns:**

    The paths written.
    """
    import io

    import matplotlib.pyplot as plt

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, values in _flat_names(traj.observables).items():
        if np.ndim(values) > 2 or len(traj.ts) == 0:
            continue
        fig = plot_observable(
            traj, name, time_axis=time_axis, labels=tuple((labels or {}).get(name, ()))
        )
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110)
        plt.close(fig)
        path = directory / (name.replace("/", "__") + ".png")
        atomic_write_bytes(path, buffer.getvalue())
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    """`python -m gflow.plot RUN_DIR [--linear]`: redraw a saved run's figures."""
    import argparse

    from ._trajectory import load

    parser = argparse.ArgumentParser(prog="python -m gflow.plot", description=main.__doc__)
    parser.add_argument("run_dir")
    parser.add_argument("--linear", action="store_true", help="linear time axis")
    args = parser.parse_args(argv)
    try:
        traj = load(args.run_dir)
        plot = (traj.config or {}).get("plot", {})
        axis = "linear" if args.linear else plot.get("time_axis", "log")
        paths = save_figures(
            traj, Path(args.run_dir) / "figures", time_axis=axis, labels=plot.get("labels")
        )
    except InputError as e:
        print(f"gflow.plot: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(paths)} figures to {Path(args.run_dir) / 'figures'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
