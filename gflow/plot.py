"""Figures of a trajectory: each observable over time, transitions marked.

`python -m gflow.plot RUN_DIR` redraws the figures of a saved run without recomputing it.

Figures are `matplotlib.figure.Figure`s built directly: no pyplot, no backend switch, no global
state; `savefig` picks the renderer for each format.
"""

import contextlib
import math
import os
import sys
from pathlib import Path

import numpy as np

from ._errors import InputError
from ._trajectory import Trajectory, _flat_names, atomic_write_bytes


# Observables with more components are drawn as their largest this many.
_MAX_LINES = 32
# Up to this many lines get a legend (colours and dash patterns); more get a colour map.
_MAX_LEGEND = 8
# One dash pattern per colour cycle, so that two curves that coincide (e.g. the norms of a
# balanced pair of layers) both stay visible.
_DASHES = ("-", "--", "-.", ":")
_DPI = 110
# Fixed layout of a time-series figure, in inches: axes width, margins for the tick labels and
# axis label on the left and the title's overhang on the right, and the width of a character
# of a 7-point legend entry (an upper bound, so that no entry is clipped).
_AXES_WIDTH, _LEFT, _RIGHT, _CHAR_WIDTH = 5.0, 0.85, 0.2, 0.065
FORMATS = ("png", "pdf", "svg")


def _plain_log_ticks(axis) -> None:
    """Decade labels as plain text (`1e-06`, `0.01`, `100`): matplotlib's default writes them
    as mathtext, whose parsing is most of a simple figure's drawing time."""
    from matplotlib import ticker

    axis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x:g}"))
    axis.set_minor_formatter(ticker.NullFormatter())


def _time_axis(ts: np.ndarray, time_axis: str) -> tuple[np.ndarray, bool]:
    """Rows to draw, and whether to use a log axis (t = t0 cannot sit on a log axis)."""
    if time_axis == "log" and np.any(ts > 0):
        return ts > 0, True
    return np.ones_like(ts, dtype=bool), False


def _groups(traj: Trajectory) -> dict[str, list[str]]:
    """`{figure name: [flattened observable names]}`.

    The leaves of one observable that returned a dict of scalars (e.g. per-type losses
    `type_losses/type1 … type4`) are one figure, one line each, so that they can be compared;
    every other leaf is its own figure.
    """
    flat = _flat_names(traj.observables)
    groups: dict[str, list[str]] = {}
    for name, values in flat.items():
        parent = name.rpartition("/")[0]
        siblings = [n for n in flat if n.rpartition("/")[0] == parent] if parent else []
        if len(siblings) > 1 and all(np.ndim(flat[n]) == 1 for n in siblings):
            groups.setdefault(parent, []).append(name)
        else:
            groups[name] = [name]
    return groups


def _series(traj: Trajectory, name: str, labels: tuple[str, ...]) -> tuple[np.ndarray, list[str]]:
    """The values of observable (or group) `name` as `(n, k)` and the names of the k lines."""
    flat = _flat_names(traj.observables)
    members = _groups(traj).get(name, [name] if name in flat else [])
    if not members:
        raise InputError(f"no observable named {name!r}; have: {', '.join(_groups(traj))}")
    if len(members) > 1:
        values = np.stack([np.asarray(flat[m], dtype=float) for m in members], axis=1)
        default = [m.rpartition("/")[2] for m in members]
    else:
        values = np.asarray(flat[name], dtype=float).reshape(len(traj.ts), -1)
        default = [f"[{k}]" for k in range(values.shape[1])]
    names = list(labels) if len(labels) == values.shape[1] else default
    return values, names


def plot_observable(
    traj: Trajectory,
    name: str,
    *,
    time_axis: str = "log",
    labels: tuple[str, ...] = (),
    references: dict[str, float | np.ndarray] | None = None,
):
    """A figure of one observable over time.

    Up to 8 components are drawn with a legend (outside the axes, colours and dash patterns);
    more with a colour map and a colour bar of the component index (at most the 32 largest).
    The leaves of an observable returning a dict of scalars (e.g. per-type losses) share one
    panel. Transitions are vertical dashed lines with their names. A reference that is a
    number is a horizontal dotted line (a level theory gives, e.g. a target's singular value);
    one that is an array over the save times is a thin dashed curve (e.g. a closed-form
    solution), the i-th curve in the colour of the i-th component, named in a legend.

    **Arguments:**

    - `traj`: the trajectory.
    - `name`: the observable's name, nested names joined by `/`, or the name of a dict
        observable of scalars.
    - `time_axis`: `"log"` or `"linear"`.
    - `labels`: legend names of the components (default their indices, or the dict's keys).
    - `references`: `{label: level}`, a level a number or an array of one value per save time.

    **Returns:**

    A `matplotlib.figure.Figure`.
    """
    from matplotlib.figure import Figure

    values, names = _series(traj, name, tuple(labels))
    rows, log_t = _time_axis(np.asarray(traj.ts), time_axis)
    ts, values = np.asarray(traj.ts)[rows], values[rows]

    levels, curves = _references(references or {}, name, len(traj.ts))
    curves = [(label, curve[rows]) for label, curve in curves]

    title = name
    # The drawn position of each component (the i-th curve follows component i).
    position = {j: j for j in range(values.shape[1])}
    if values.shape[1] > _MAX_LINES:
        keep = np.sort(np.argsort(-np.nanmax(np.abs(values), axis=0))[:_MAX_LINES])
        title = f"{name} (largest {_MAX_LINES} of {values.shape[1]} components)"
        values, names = values[:, keep], [names[k] for k in keep]
        position = {int(j): p for p, j in enumerate(keep)}
    k = values.shape[1]
    # A fixed layout (no layout engine, no tight box: each costs a second draw), with room on
    # the right for the legend or colour bar, sized from the longest legend entry. With a
    # colour bar there, the curves' legend goes inside the axes.
    legend = 1 < k <= _MAX_LEGEND or (k == 1 and bool(curves))
    side = 0.0
    if legend:
        entries = (names if k > 1 else []) + [label for label, _ in curves]
        side = 0.35 + _CHAR_WIDTH * max(len(n) for n in entries)
    elif k > _MAX_LEGEND:
        side = 0.2
    width = _AXES_WIDTH + _LEFT + _RIGHT + side
    fig = Figure(figsize=(width, 4.0))
    fig.subplots_adjust(left=_LEFT / width, right=1 - (_RIGHT + side) / width, bottom=0.12,
                        top=0.92)
    ax = fig.add_subplot()
    colour = lambda j: f"C{j % 10}"  # noqa: E731
    if k > _MAX_LEGEND:
        import matplotlib as mpl

        cmap = mpl.colormaps["viridis"]
        norm = mpl.colors.Normalize(0, k - 1)
        colour = lambda j: cmap(norm(j))  # noqa: E731
        for j in range(k):
            ax.plot(ts, values[:, j], lw=1.2, color=colour(j))
        bar = fig.colorbar(mpl.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, pad=0.02,
                           fraction=0.06)
        bar.set_label("component" + (f" (0 = {names[0]}, {k - 1} = {names[-1]})"
                                     if names[0] != "[0]" else " index"))
    else:
        # A component a theory curve follows is solid: dashed in its colour is the theory.
        followed = {position[i] for i in range(len(curves)) if i in position}
        for j in range(k):
            ax.plot(ts, values[:, j], lw=1.4, color=colour(j),
                    ls="-" if j in followed else _DASHES[(j // 10 + j) % 4],
                    label=names[j] if k > 1 else None)
    finite = values[np.isfinite(values)]
    positive = finite[finite > 0]
    # Non-negative data spanning decades (norms, relative changes from 0) reads on a log axis;
    # exact zeros (e.g. the change at t0) are simply not drawn there.
    if positive.size and np.all(finite >= 0) and positive.max() / positive.min() > 1e3:
        ax.set_yscale("log", nonpositive="mask")
        _plain_log_ticks(ax.yaxis)
    if log_t:
        ax.set_xscale("log")
        _plain_log_ticks(ax.xaxis)
    # Equal levels share one line and one label (e.g. s_1/2 = s_3 when s = 4, 3, 2, 1): two
    # labels at one height would print over each other.
    shared: dict[float, list[str]] = {}
    for label, level in levels.items():
        if math.isfinite(level):
            shared.setdefault(float(level), []).append(label)
    for level, labels in shared.items():
        ax.axhline(level, color="0.45", ls=":", lw=1.0)
        ax.annotate(" = ".join(labels), (0.01, level), xycoords=("axes fraction", "data"),
                    va="bottom", fontsize=7, color="0.35")
    theory = []
    for i, (label, curve) in enumerate(curves):
        # Drawn over its component, thin, so that where they part both stay visible.
        c = colour(position[i]) if i in position else "0.45"
        theory += ax.plot(ts, curve, color=c, ls="--", lw=0.9, label=label)
    for tname, t in traj.transitions.items():
        if math.isfinite(t) and (not log_t or t > 0):
            ax.axvline(t, color="0.3", ls="--", lw=0.9)
            ax.annotate(tname, (t, 1.0), xycoords=("data", "axes fraction"), rotation=90,
                        va="top", ha="right", fontsize=7, color="0.3")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("flow time t" + (" (log scale)" if log_t else ""))
    ax.set_ylabel(name)
    if legend:
        # Outside the axes, so that it hides no curve, in the room left for it.
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    elif theory:
        ax.legend(handles=theory, fontsize=7, loc="best", framealpha=0.85)
    ax.grid(alpha=0.3)
    return fig


def _references(references: dict, name: str, n: int) -> tuple[dict[str, float], list]:
    """`references` split into levels `{label: number}` and curves `[(label, (n,) array)]`."""
    levels, curves = {}, []
    for label, level in references.items():
        level = np.asarray(level, dtype=float)
        if level.ndim == 0:
            levels[label] = float(level)
        elif level.shape == (n,):
            curves.append((label, level))
        else:
            raise InputError(
                f"reference {label!r} of {name!r}: a level is a number or one value per save "
                f"time ({n}), got shape {level.shape}")
    return levels, curves


def plot_heatmaps(traj: Trajectory, name: str, *, times=None, labels: tuple[str, ...] = ()):
    """Heatmaps of a matrix-valued observable (e.g. a cosine-similarity matrix) at chosen times.

    **Arguments:**

    - `traj`: the trajectory.
    - `name`: a flattened observable name whose values are `(n, k, k)`.
    - `times`: the times to show; default `t0`, every reached transition and the last save.
        Each panel shows the last save at or before its time.
    - `labels`: names of the `k` rows (and columns), for the ticks; default indices.

    **Returns:**

    A `matplotlib.figure.Figure` with one panel per time and a labelled colour bar.
    """
    from matplotlib.figure import Figure

    flat = _flat_names(traj.observables)
    if name not in flat:
        raise InputError(f"no observable named {name!r}; have: {', '.join(flat)}")
    values = np.asarray(flat[name], dtype=float)
    ts = np.asarray(traj.ts)
    if times is None:
        reached = sorted((t, k) for k, t in traj.transitions.items() if math.isfinite(t))
        times = [(ts[0], "t0")] + [(t, k) for t, k in reached] + [(ts[-1], "end")]
    else:
        times = [(t, f"t={t:.4g}") for t in times]
    # A fixed layout in inches (no layout engine, no tight box: each costs a second draw):
    # square panels, then the colour bar and its label.
    panel, gap, left, right, bottom, top = 2.1, 0.35, 0.55, 1.05, 0.5, 0.75
    width = left + len(times) * panel + (len(times) - 1) * gap + right
    height = bottom + panel + top
    fig = Figure(figsize=(width, height))
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height,
                        top=1 - top / height, wspace=gap / panel)
    axes = fig.subplots(1, len(times), squeeze=False)[0]
    symmetric = np.nanmin(values) < 0
    rows, cols = values.shape[1:]
    for j, (ax, (t, label)) in enumerate(zip(axes, times)):
        i = max(int(np.searchsorted(ts, t, side="right")) - 1, 0)
        image = ax.imshow(values[i], cmap="RdBu_r" if symmetric else "viridis",
                          vmin=-1 if symmetric else None, vmax=1 if symmetric else None,
                          interpolation="nearest")
        ax.set_title(f"{label}\n(t={ts[i]:.4g})", fontsize=8)
        ax.set_xlabel("column", fontsize=7)
        if j == 0:
            ax.set_ylabel("row", fontsize=7)
        for axis, n in ((ax.xaxis, cols), (ax.yaxis, rows)):
            # Named rows get every tick; indices only the first and last (ticks are most of
            # a heatmap's drawing time), row ticks only on the first panel.
            if len(labels) == n and (axis is ax.xaxis or j == 0):
                axis.set_ticks(range(n), labels, fontsize=6)
            elif axis is ax.xaxis or j == 0:
                axis.set_ticks([0, n - 1], ["0", str(n - 1)], fontsize=6)
            else:
                axis.set_ticks([])
    cax = fig.add_axes([1 - (right - 0.15) / width, bottom / height, 0.12 / width,
                        panel / height])
    bar = fig.colorbar(image, cax=cax)
    bar.set_label(name, fontsize=8)
    fig.suptitle(name, fontsize=9, y=1 - 0.12 / height)
    return fig


def figure_names(traj: Trajectory, heatmaps: tuple[str, ...] = ()) -> list[str]:
    """The figures `save_figures` draws for `traj`: every group of scalar leaves, every scalar
    or vector observable, and the square-matrix observables named in `heatmaps`."""
    if len(traj.ts) == 0:
        return []
    flat = _flat_names(traj.observables)
    names = []
    for name, members in _groups(traj).items():
        values = flat[members[0]]
        square = np.ndim(values) == 3 and values.shape[1] == values.shape[2]
        if len(members) > 1 or np.ndim(values) <= 2 or (square and name.split("/")[0] in heatmaps):
            names.append(name)
    return names


def save_figures(
    traj: Trajectory,
    directory,
    *,
    time_axis: str = "log",
    labels: dict | None = None,
    heatmaps: tuple[str, ...] = (),
    formats: tuple[str, ...] = ("png",),
    references: dict | None = None,
) -> list[Path]:
    """Write one figure per observable (`<name>.<format>`, `/` replaced by `__`).

    Scalar and vector observables are drawn over time, the scalars of one dict observable in
    one figure; square-matrix observables named in `heatmaps` (e.g. cosine-similarity
    matrices) as heatmaps at t0, each transition and the end. Observables with more than two
    axes per save that are not heatmaps are not drawn.

    **Arguments:**

    - `traj`: the trajectory.
    - `directory`: where to write (created if missing).
    - `time_axis`: `"log"` or `"linear"`.
    - `labels`: `{observable: [name of each component]}`.
    - `heatmaps`: observables drawn as heatmaps.
    - `formats`: file formats, of `"png"`, `"pdf"`, `"svg"`.
    - `references`: `{observable: {label: level}}`; default the trajectory's own
        (`Trajectory.references`, set by presets).

    **Returns:**

    The paths written.
    """
    import io

    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise InputError(f"figure formats must be among {', '.join(FORMATS)}, got {list(formats)}")
    labels = labels or {}
    references = traj.references if references is None else references
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    flat = _flat_names(traj.observables)
    for name in figure_names(traj, tuple(heatmaps)):
        if name in flat and np.ndim(flat[name]) == 3:
            fig = plot_heatmaps(traj, name, labels=tuple(labels.get(name.split("/")[0], ())))
        else:
            fig = plot_observable(traj, name, time_axis=time_axis,
                                  labels=tuple(labels.get(name, ())),
                                  references=references.get(name))
        for fmt in formats:
            buffer = io.BytesIO()
            fig.savefig(buffer, format=fmt, dpi=_DPI)  # laid out to fit: no tight box
            path = directory / (name.replace("/", "__") + "." + fmt)
            atomic_write_bytes(path, buffer.getvalue())
            written.append(path)
    return written


def _parser():
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            # One line, no usage block, as every other error of gflow's commands.
            print(f"gflow.plot: error: {message} (see --help)", file=sys.stderr)
            raise SystemExit(2)

    parser = Parser(
        prog="python -m gflow.plot",
        description="Redraw the figures of a saved run (RUN_DIR/figures) with its [plot] settings.")
    parser.add_argument("run_dir", metavar="RUN_DIR")
    parser.add_argument("--linear", action="store_true", help="linear time axis")
    parser.add_argument("--formats", metavar="LIST",
                        help="comma-separated figure formats, of png, pdf, svg "
                        "(default: the run's plot.formats, else png)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """`python -m gflow.plot RUN_DIR [--linear] [--formats png,pdf]`: redraw a saved run's
    figures; returns the exit status."""
    from ._rundir import describe_os_error
    from ._trajectory import read_run

    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:
        return e.code
    figures = Path(args.run_dir) / "figures"
    try:
        traj, plot = read_run(args.run_dir)
        if os.path.lexists(figures) and not figures.is_dir():
            raise InputError(f"{figures} exists and is not a directory: move it aside")
        axis = "linear" if args.linear else plot["time_axis"]
        formats = (tuple(f.strip() for f in args.formats.split(",")) if args.formats
                   else plot["formats"])
        paths = save_figures(traj, figures, time_axis=axis, labels=plot["labels"],
                             heatmaps=plot["heatmaps"], formats=formats)
        print(f"wrote {len(paths)} figures to {figures}")
        sys.stdout.flush()
    except InputError as e:
        print(f"gflow.plot: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        with contextlib.suppress(OSError, ValueError):  # no second error at exit's flush
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print(f"gflow.plot: error: {describe_os_error(e)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
