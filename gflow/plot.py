"""Figures of a trajectory: each observable over time, transitions marked.

`python -m gflow.plot RUN_DIR` redraws every figure of a saved run (the preset's paper figures
included) without recomputing it.

Figures are `matplotlib.figure.Figure`s built directly: no pyplot, no backend switch, no global
state; `savefig` picks the renderer for each format. They follow `gflow.figures`' conventions
(palette, time axes, transition labels, captions).
"""

import contextlib
import dataclasses
import math
import os
import sys
from pathlib import Path

import numpy as np

from ._errors import InputError
from ._names import flat_names
from ._trajectory import Trajectory, atomic_write_bytes
from .figures import (
    PALETTE, TIME_AXES, caption, colour, format_time, format_time_axis, label_rows, log_y_axis,
    mark_transitions, math_label, paper_figures, time_rows, transition_label,
)


# Observables with more components are drawn as their largest this many.
_MAX_LINES = 32
# Up to this many lines get a legend: the palette's 8 colours, then each colour again with a
# second dash pattern (e.g. the groups of a second layer); more get a colour map.
_MAX_LEGEND = 16
_DPI = 110
# Fixed layout of a time-series figure, in inches: axes width and height, margins for the
# tick labels and axis label on the left, the right edge, the axis label and caption below,
# the title above (transition-label rows come on top), and the width of a character of a
# 7-point legend entry (an upper bound, so that no entry is clipped).
_AXES_WIDTH, _AXES_HEIGHT, _LEFT, _RIGHT, _BOTTOM, _TOP = 5.0, 3.2, 0.95, 0.25, 0.85, 0.4
_CHAR_WIDTH = 0.065
_ROW_INCHES = 9.0 / 72
FORMATS = ("png", "pdf", "svg")

# {observable: (title, y label, y scale)} of the shipped presets' observables; y scale "auto"
# is logarithmic for non-negative data spanning more than three decades. Other names are
# written as words.
_OBSERVABLES = {
    "loss": ("Training loss", r"loss $L(\theta)$", "auto"),
    "held_out_loss": ("Held-out loss", "held-out loss", "auto"),
    "train_accuracy": ("Training accuracy", "accuracy", "linear"),
    "held_out_accuracy": ("Held-out accuracy", "accuracy", "linear"),
    "held_out_probability": ("Held-out probability of each answer", "mean probability",
                             "linear"),
    "singular_values": ("Singular values of the end-to-end map", r"$\sigma_k(W_2 W_1)$",
                        "linear"),
    "layer_norms": ("Norm of each layer", r"$\|W_\ell\|_F$", "auto"),
    "imbalance_drift": ("Drift of the conserved imbalance (an integration check)",
                        "drift", "auto"),
    "norm": ("Frobenius norm of each group", r"$\|W\|_F$", "auto"),
    "relative_change": ("Relative change of each group",
                        r"$\|W(t)-W(0)\|_F\,/\,\|W(0)\|_F$", "auto"),
    "effective_rank": ("Effective rank of each group",
                       r"effective rank $\exp H(\sigma/\sum\sigma)$", "linear"),
    "stable_rank": ("Stable rank of each group", r"stable rank $\|W\|_F^2\,/\,\|W\|_2^2$",
                    "linear"),
    "conserved_drift": ("Drift of the conserved quantities (an integration check)",
                        r"$\|Q(t) - Q(0)\|_F$", "auto"),
    "value_misalignment": (r"Misalignment of the columns of $W_V$ with $v$",
                           r"mean $1 - |\cos(W_V[:, k], v)|$", "auto"),
    "energy": ("Outer energy", r"$E = W_v W_1 W_2$", "auto"),
    "assumption1_rates": ("Assumption-1 satisfaction rates", "rate", "linear"),
    "type_losses": ("Training loss per sample type", "logistic loss", "auto"),
    "G": ("Read-out of the signal words", r"$G(\mu) = \sum_j a_j w_j^\top W_V \mu$", "linear"),
    "margin": ("Smallest margin", r"$\min_i\, y_i F(X_i)$", "linear"),
    "scores": ("Attention scores", r"$\mu_i^\top W_K^\top W_Q \mu_j$", "linear"),
    "cosine": ("Row cosine similarity", "cosine similarity", "linear"),
}


# {matrix observable: (row axis, column axis)} of the heat maps.
_MATRIX_AXES = {"scores": ("key word", "query word"), "cosine": ("row", "row")}


def describe(name: str) -> tuple[str, str, str]:
    """`(title, y label, y scale)` of observable `name`: a shipped preset's observable gets its
    title in words and its mathematics as mathtext; any other its name as words, y scale
    `"auto"` (logarithmic for non-negative data spanning more than three decades)."""
    if name in _OBSERVABLES:
        return _OBSERVABLES[name]
    base, _, leaf = name.partition("/")
    if base in _OBSERVABLES:
        title, label, scale = _OBSERVABLES[base]
        return f"{title}: {math_label(leaf)}", label, scale
    words = name.replace("/", ": ").replace("_", " ")
    return words[:1].upper() + words[1:], words, "auto"


def _groups(traj: Trajectory) -> dict[str, list[str]]:
    """`{figure name: [flattened observable names]}`.

    The leaves of one observable that returned a dict of scalars (e.g. per-type losses
    `type_losses/type1 … type4`) are one figure, one line each, so that they can be compared;
    every other leaf is its own figure.
    """
    flat = flat_names(traj.observables)
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
    flat = flat_names(traj.observables)
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
    ax=None,
):
    """A figure of one observable over time.

    Up to 8 components are drawn in `gflow.figures.PALETTE` with a legend outside the axes;
    up to 16 reuse the colours with a second dash pattern; more with a colour map and a colour
    bar of the component index (at most the 32 largest), except that components a reference
    curve follows keep their palette colour and the others turn grey. The leaves of an
    observable returning a dict of scalars (e.g. per-type losses) share one panel.
    Transitions are dashed vertical lines named above the axes (labels never overlap). A
    reference that is a number is a dotted horizontal level (e.g. a target's singular value,
    a loss plateau, chance); one that is an array over the save times is a thin dashed curve
    (e.g. a closed-form solution), the i-th in the colour of the i-th component. A one-line
    caption says what the lines are.

    **Arguments:**

    - `traj`: the trajectory.
    - `name`: the observable's name, nested names joined by `/`, or the name of a dict
        observable of scalars.
    - `time_axis`: of `gflow.figures.TIME_AXES` (`"log"`, `"linear"`, `"stages"`).
    - `labels`: legend names of the components (default their indices, or the dict's keys).
    - `references`: `{label: level}`, a level a number or an array of one value per save time.
    - `ax`: a matplotlib `Axes` to draw into (no caption then: the figure is the caller's);
        default a new figure.

    **Returns:**

    The `matplotlib.figure.Figure` (of `ax` if given).
    """
    from matplotlib.figure import Figure

    if time_axis not in TIME_AXES:
        raise InputError(f"time_axis must be one of {', '.join(TIME_AXES)}, got {time_axis!r}")
    values, names = _series(traj, name, tuple(labels))
    styles = _layer_styles(names)
    names = [math_label(n) for n in names]
    rows = time_rows(traj, time_axis)
    ts, values = np.asarray(traj.ts)[rows], values[rows]

    levels, curves = _references(references or {}, name, len(traj.ts))
    curves = [(math_label(label), curve[rows]) for label, curve in curves]

    title, ylabel, yscale = describe(name)
    # The drawn position of each component (the i-th curve follows component i).
    position = {j: j for j in range(values.shape[1])}
    if values.shape[1] > _MAX_LINES:
        keep = np.sort(np.argsort(-np.nanmax(np.abs(values), axis=0))[:_MAX_LINES])
        title = f"{title} (largest {_MAX_LINES} of {values.shape[1]})"
        values, names = values[:, keep], [names[k] for k in keep]
        position = {int(j): p for p, j in enumerate(keep)}
    k = values.shape[1]
    followed = sorted({position[i] for i in range(len(curves)) if i in position})
    # Many components of which theory follows a few: those few in colour, the rest grey.
    highlight = k > len(PALETTE) and 0 < len(followed) <= len(PALETTE)
    # Named components (groups, words) up to 16 keep a legend; a longer run of indexed ones
    # (a spectrum) reads as a colour map of the index.
    named = bool(names) and names[0] != "[0]"
    colourmap = not highlight and (k > _MAX_LEGEND or (k > len(PALETTE) and not named))
    legend = highlight or (1 < k and not colourmap) or (k == 1 and bool(curves))
    side = 0.0
    if legend:
        if highlight:
            # The followed components by their rank, the theory curves as one entry.
            names = [rf"$k={j + 1}$" if n == f"[{j}]" else n for j, n in enumerate(names)]
            curves_label = _shared_label([label for label, _ in curves])
            entries = [names[j] for j in followed] + [curves_label, "other 99 components"]
        else:
            entries = (names if k > 1 else []) + [label for label, _ in curves]
        side = 0.35 + _CHAR_WIDTH * max(len(_plain(n)) for n in entries)
    elif colourmap:
        side = 0.2
    own = ax is None
    if own:
        width = _AXES_WIDTH + _LEFT + _RIGHT + side
        fig = Figure(figsize=(width, _AXES_HEIGHT + _BOTTOM + _TOP), dpi=_DPI)
        ax = fig.add_subplot()
        _layout(fig, ax, side, 0)
    fig = ax.figure
    pick = colour
    if colourmap:
        import matplotlib as mpl

        cmap = mpl.colormaps["viridis"]
        norm = mpl.colors.Normalize(0, k - 1)
        pick = lambda j: cmap(norm(j))  # noqa: E731
        for j in range(k):
            ax.plot(ts, values[:, j], lw=1.2, color=pick(j))
        bar = fig.colorbar(mpl.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, pad=0.02,
                           fraction=0.06)
        bar.set_label("component" + (f" (0 = {names[0]}, {k - 1} = {names[-1]})"
                                     if names[0] != "[0]" else " index"))
    elif highlight:
        pick = lambda j: colour(followed.index(j)) if j in followed else "0.7"  # noqa: E731
        others = [j for j in range(k) if j not in followed]
        for j in others:
            ax.plot(ts, values[:, j], lw=0.9, color="0.7",
                    label=f"other {len(others)} components" if j == others[0] else None)
        for j in followed:
            ax.plot(ts, values[:, j], lw=2.0, color=pick(j), alpha=0.85, label=names[j])
    else:
        for j in range(k):
            # A component a theory curve follows is solid (dashed in its colour is the
            # theory).
            c, ls = styles[j] if styles else (pick(j), "-" if j in followed else _dash(j))
            ax.plot(ts, values[:, j], lw=1.6, color=c, ls=ls,
                    label=names[j] if k > 1 else None)
    finite = values[np.isfinite(values)]
    positive = finite[finite > 0]
    # Non-negative data spanning decades (norms, relative changes from 0) reads on a log axis;
    # exact zeros (e.g. the change at t0) are simply not drawn there.
    if (yscale == "auto" and positive.size and np.all(finite >= 0)
            and positive.max() / positive.min() > 1e3):
        log_y_axis(ax, positive)
    format_time_axis(ax, traj, time_axis)
    theory = []
    for i, (label, curve) in enumerate(curves):
        # Drawn over its component, thin, so that where they part both stay visible.
        c = pick(position[i]) if i in position else "0.3"
        theory += ax.plot(ts, curve, color=c if not highlight else "k", ls="--", lw=0.9,
                          label=label if not highlight or i == 0 else None)
    if highlight and theory:
        theory[0].set_label(curves_label)
    _levels(ax, levels, values)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if legend:
        # Outside the axes, so that it hides no curve, in the room left for it.
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    elif theory:
        ax.legend(handles=theory, fontsize=7, loc="best", framealpha=0.85)
    mark_transitions(ax, traj)
    if own:
        _layout(fig, ax, side, label_rows(ax))
        caption(fig, _caption(traj, levels, curves, colourmap, bool(styles) and not colourmap),
                bottom=0.08)
    return fig


def _plain(label: str) -> str:
    """`label` without mathtext markup, to size its legend entry."""
    return label.replace("$", "").replace("\\top", "T").replace("\\mu", "m").replace("{", "") \
        .replace("}", "")


def _shared_label(labels: list[str]) -> str:
    """One legend entry for several theory curves: `closed form`, with the qualifier in
    parentheses that all their labels share (e.g. `(first order in init)`)."""
    suffixes = {label[label.rfind("("):] for label in labels if label.endswith(")")}
    if len(labels) == 1:
        return labels[0]
    return "closed form" + (f" {suffixes.pop()}" if len(suffixes) == 1 and
                            all(label.endswith(")") for label in labels) else "")


def _layer_styles(names: list[str]) -> list[tuple[str, str]] | None:
    """Colour by group and dash pattern by layer for names of a multi-layer model (`W_Q^1`,
    `W_Q^2`, ..., `W_out`), else `None`."""
    import re

    parsed = [re.fullmatch(r"(.+?)\^(\d+)", n) for n in names]
    if sum(p is not None for p in parsed) < 2 or len({p[2] for p in parsed if p}) < 2:
        return None
    bases = list(dict.fromkeys(p[1] if p else n for p, n in zip(parsed, names)))
    layers = sorted({int(p[2]) for p in parsed if p})
    return [(colour(bases.index(p[1] if p else n)),
             ("-", "--", "-.", ":")[layers.index(int(p[2])) % 4] if p else "-")
            for p, n in zip(parsed, names)]


def _dash(j: int):
    """One dash pattern per component within a colour cycle, so that two curves that coincide
    (e.g. the norms of a balanced pair of layers) both stay visible, and in grey print."""
    return ("-", "--", "-.", ":")[(j + j // len(PALETTE)) % 4]


def _layout(fig, ax, side: float, rows: int) -> None:
    """Size `fig` to the axes plus margins: `side` inches of legend room on the right, `rows`
    rows of transition labels above (the axes keep their size in inches)."""
    top = _TOP + rows * _ROW_INCHES
    width = _AXES_WIDTH + _LEFT + _RIGHT + side
    height = _AXES_HEIGHT + _BOTTOM + top
    fig.set_size_inches(width, height)
    fig.subplots_adjust(left=_LEFT / width, right=1 - (_RIGHT + side) / width,
                        bottom=_BOTTOM / height, top=1 - top / height)


def _levels(ax, levels: dict[str, float], values: np.ndarray) -> None:
    """Reference levels: dotted lines named inside the axes at the end (left or right) where
    the data `(n, k)` lie farther from them; equal levels share one
    line and one label (e.g. s_1/2 = s_3 when s = 4, 3, 2, 1), and labels of close levels are
    pushed apart upwards so that they never overlap. Call with the axes' y scale set."""
    shared: dict[float, list[str]] = {}
    for label, level in levels.items():
        if math.isfinite(level):
            shared.setdefault(float(level), []).append(math_label(label))
    for level in shared:
        ax.axhline(level, color="0.45", ls=":", lw=1.1, zorder=1.5)
    if not shared:
        return
    ax.get_ylim()  # autoscale now, with the levels in
    heights = {level: ax.transData.transform((0.0, level))[1] for level in shared}
    gap = 9.0 * ax.figure.dpi / 72  # one 7-point line
    # Labels closer than a line apart form a cluster, spread a line apart about the
    # cluster's own mean height (the least total displacement for equal spacing).
    clusters: list[list[float]] = []
    for level in sorted(shared, key=heights.get):
        if clusters and heights[level] - heights[clusters[-1][-1]] < gap:
            clusters[-1].append(level)
        else:
            clusters.append([level])
    placed: dict[float, float] = {}
    for cluster in clusters:
        centre = np.mean([heights[level] for level in cluster])
        for i, level in enumerate(cluster):
            placed[level] = centre + (i - (len(cluster) - 1) / 2) * gap
    # The data's display heights at each end, against the labels' heights.
    def distance(rows):
        ends = values[rows][np.isfinite(values[rows])]
        if not ends.size:
            return math.inf
        drawn = np.array([ax.transData.transform((0.0, v))[1] for v in ends
                          if ax.get_yscale() != "log" or v > 0] or [math.inf])
        return min(abs(drawn[:, None] - np.array(list(placed.values()))[None, :]).min(), 1e9)

    tenth = max(len(values) // 10, 1)
    right = distance(slice(-tenth, None)) > distance(slice(0, tenth))
    for level, labels in shared.items():
        lift = (placed[level] - heights[level]) * 72 / ax.figure.dpi
        ax.annotate(" = ".join(labels), (0.99 if right else 0.01, level),
                    xycoords=("axes fraction", "data"), xytext=(0, 1.5 + lift),
                    textcoords="offset points", va="bottom", ha="right" if right else "left",
                    fontsize=7, color="0.3",
                    # Over the other levels' lines where labels had to be spread apart.
                    bbox=dict(boxstyle="square,pad=0.1", fc="white", ec="none", alpha=0.85))


def _caption(traj: Trajectory, levels: dict, curves: list, colourmap: bool,
             layers: bool) -> str:
    """One line saying what the figure's lines are."""
    parts = ["colour: group; solid: layer 1, dashed: layer 2"] if layers else []
    if any(math.isfinite(t) for t in traj.transitions.values()):
        parts.append("dashed verticals: located transitions")
    if levels:
        parts.append("dotted: " + (", ".join(math_label(label) for label in levels)
                                   if len(levels) <= 3 else "reference levels from theory"))
    if curves:
        parts.append("thin dashed: closed form")
    if colourmap:
        parts.append("colour: component index")
    text = "; ".join(parts)
    return text[:1].upper() + text[1:] + "." if parts else ""


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

    flat = flat_names(traj.observables)
    if name not in flat:
        raise InputError(f"no observable named {name!r}; have: {', '.join(flat)}")
    values = np.asarray(flat[name], dtype=float)
    ts = np.asarray(traj.ts)
    if times is None:
        reached = sorted((t, k) for k, t in traj.transitions.items() if math.isfinite(t))
        times = ([(ts[0], "$t_0$")] + [(t, transition_label(k)) for t, k in reached]
                 + [(ts[-1], "end")])
    else:
        times = [(t, f"$t$={format_time(t)}") for t in times]
    # A fixed layout in inches (no layout engine, no tight box: each costs a second draw):
    # square panels, then the colour bar and its label.
    panel, gap, left, right, bottom, top = 2.1, 0.35, 0.6, 1.15, 0.8, 0.95
    width = left + len(times) * panel + (len(times) - 1) * gap + right
    height = bottom + panel + top
    fig = Figure(figsize=(width, height), dpi=_DPI)
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height,
                        top=1 - top / height, wspace=gap / panel)
    axes = fig.subplots(1, len(times), squeeze=False)[0]
    symmetric = np.nanmin(values) < 0
    rows, cols = values.shape[1:]
    title, what, _ = describe(name)
    ticks = [math_label(label) for label in labels]
    for j, (ax, (t, label)) in enumerate(zip(axes, times)):
        i = max(int(np.searchsorted(ts, t, side="right")) - 1, 0)
        image = ax.imshow(values[i], cmap="RdBu_r" if symmetric else "viridis",
                          vmin=-1 if symmetric else None, vmax=1 if symmetric else None,
                          interpolation="nearest")
        # The state shown: the last save at or before the time asked for.
        ax.set_title(f"{label}\n($t$={format_time(ts[i])})", fontsize=8)
        row_axis, column_axis = _MATRIX_AXES.get(name.split("/")[0], ("row", "column"))
        ax.set_xlabel(column_axis, fontsize=7)
        if j == 0:
            ax.set_ylabel(row_axis, fontsize=7)
        for axis, n in ((ax.xaxis, cols), (ax.yaxis, rows)):
            # Named rows get every tick; indices only the first and last (ticks are most of
            # a heatmap's drawing time), row ticks only on the first panel.
            if len(ticks) == n and (axis is ax.xaxis or j == 0):
                axis.set_ticks(range(n), ticks, fontsize=7)
            elif axis is ax.xaxis or j == 0:
                axis.set_ticks([0, n - 1], ["0", str(n - 1)], fontsize=6)
            else:
                axis.set_ticks([])
        ax.text(0.0, 1.0, f"({chr(ord('a') + j)})", transform=ax.transAxes, ha="left",
                va="bottom", fontsize=8, fontweight="bold", clip_on=False,
                # Above the panel's own two-line title.
                position=(-0.02, 1.2))
    cax = fig.add_axes([1 - (right - 0.15) / width, bottom / height, 0.12 / width,
                        panel / height])
    bar = fig.colorbar(image, cax=cax)
    bar.set_label(what, fontsize=8)
    fig.suptitle(title, fontsize=10, y=1 - 0.08 / height)
    caption(fig, "Panels: the state at the first save, at each located transition and at the "
            "last save.", bottom=0.06)
    return fig


def figure_names(traj: Trajectory, heatmaps: tuple[str, ...] = ()) -> list[str]:
    """The figures `save_figures` draws for `traj`: every group of scalar leaves, every scalar
    or vector observable, and the square-matrix observables named in `heatmaps`."""
    if len(traj.ts) == 0:
        return []
    flat = flat_names(traj.observables)
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
    """Write every figure of a run: one per observable (`<name>.<format>`, `/` replaced by
    `__`), then the paper figures of its preset (`gflow.figures.paper_figures`).

    Scalar and vector observables are drawn over time (snapshot observables over the times
    of the snapshots), the scalars of one dict observable in one figure; square-matrix observables named in `heatmaps` (e.g. cosine-similarity
    matrices) as heatmaps at t0, each transition and the end. Observables with more than two
    axes per save that are not heatmaps are not drawn.

    **Arguments:**

    - `traj`: the trajectory.
    - `directory`: where to write (created if missing).
    - `time_axis`: of `gflow.figures.TIME_AXES`, for every figure (paper figures included).
    - `labels`: `{observable: [name of each component]}`.
    - `heatmaps`: observables drawn as heatmaps.
    - `formats`: file formats, of `"png"`, `"pdf"`, `"svg"`.
    - `references`: `{observable: {label: level}}`; default the trajectory's own
        (`Trajectory.references`, set by presets).

    **Returns:**

    The paths written.
    """
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise InputError(f"figure formats must be among {', '.join(FORMATS)}, got {list(formats)}")
    if time_axis not in TIME_AXES:
        raise InputError(f"time_axis must be one of {', '.join(TIME_AXES)}, got {time_axis!r}")
    labels = labels or {}
    references = traj.references if references is None else references
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    # Snapshot observables are drawn as the others, over the times of the snapshots (their
    # names differ from the observables'), with their references that are levels (a curve
    # follows the save times).
    views = [(traj, references)]
    if len(traj.snapshot_labels):
        levels = {name: {label: level for label, level in named.items() if np.ndim(level) == 0}
                  for name, named in references.items() if name in traj.snapshots}
        views.append((dataclasses.replace(traj, ts=traj.snapshot_ts, observables=traj.snapshots),
                      levels))
    for view, levels in views:
        written += _draw(view, directory, time_axis=time_axis, labels=labels,
                         heatmaps=heatmaps, formats=formats, references=levels)
    return written + paper_figures(traj, directory, time_axis=time_axis, formats=formats)


def _draw(traj: Trajectory, directory: Path, *, time_axis, labels, heatmaps, formats,
          references) -> list[Path]:
    import io

    written = []
    flat = flat_names(traj.observables)
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
    parser.add_argument("--linear", action="store_true",
                        help="a linear time axis in every figure (default: the run's "
                        "plot.time_axis)")
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
