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


def plot_heatmaps(traj: Trajectory, name: str, *, times=None):
    """Heatmaps of a matrix-valued observable (e.g. a cosine-similarity matrix) at chosen times.

    **Arguments:**

    - `traj`: the trajectory.
    - `name`: a flattened observable name whose values are `(n, k, k)`.
    - `times`: the times to show; default `t0`, every reached transition and the last save.
        Each panel shows the last save at or before its time.

    **Returns:**

    A `matplotlib.figure.Figure` with one panel per time.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = np.asarray(_flat_names(traj.observables)[name], dtype=float)
    ts = np.asarray(traj.ts)
    if times is None:
        reached = sorted((t, k) for k, t in traj.transitions.items() if math.isfinite(t))
        times = [(ts[0], "t0")] + [(t, k) for t, k in reached] + [(ts[-1], "end")]
    else:
        times = [(t, f"t={t:.4g}") for t in times]
    fig, axes = plt.subplots(
        1, len(times), figsize=(2.6 * len(times), 2.9), layout="constrained", squeeze=False
    )
    symmetric = np.nanmin(values) < 0
    for ax, (t, label) in zip(axes[0], times):
        i = max(int(np.searchsorted(ts, t, side="right")) - 1, 0)
        image = ax.imshow(values[i], cmap="RdBu_r" if symmetric else "viridis",
                          vmin=-1 if symmetric else None, vmax=1 if symmetric else None)
        ax.set_title(f"{label}\n(t={ts[i]:.4g})", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    fig.suptitle(name, fontsize=9)
    return fig


def save_figures(
    traj: Trajectory,
    directory,
    *,
    time_axis: str = "log",
    labels: dict | None = None,
    heatmaps: tuple[str, ...] = (),
    formats: tuple[str, ...] = ("png", "pdf"),
) -> list[Path]:
    """Write one figure per observable (`<name>.png` and `.pdf`, `/` replaced by `__`).

    Scalar and vector observables are drawn over time; square-matrix observables named in
    `heatmaps` (e.g. cosine-similarity matrices) as heatmaps at t0, each transition and the end.
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
        if len(traj.ts) == 0:
            continue
        square = np.ndim(values) == 3 and values.shape[1] == values.shape[2]
        if np.ndim(values) <= 2:
            fig = plot_observable(
                traj, name, time_axis=time_axis, labels=tuple((labels or {}).get(name, ()))
            )
        elif square and name.split("/")[0] in heatmaps:
            fig = plot_heatmaps(traj, name)
        else:
            continue
        for fmt in formats:
            buffer = io.BytesIO()
            fig.savefig(buffer, format=fmt, dpi=110)
            path = directory / (name.replace("/", "__") + "." + fmt)
            atomic_write_bytes(path, buffer.getvalue())
            written.append(path)
        plt.close(fig)
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
            traj, Path(args.run_dir) / "figures", time_axis=axis, labels=plot.get("labels"),
            heatmaps=tuple(plot.get("heatmaps", ())),
        )
    except InputError as e:
        print(f"gflow.plot: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(paths)} figures to {Path(args.run_dir) / 'figures'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
