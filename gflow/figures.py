"""Figures in the layout of the papers' own, and the drawing conventions every gflow figure shares.

- `chen_luo_figure1`, `chen_luo_figure2`: Chen & Luo's Figs. 1 and 2 from a `rank-collapse` or
  `rank-collapse-binary` trajectory.
- `yang_figure1`: Yang et al.'s Fig. 1 from a `cooccurrence` trajectory.
- `paper_figures`: writes the paper figures of a saved run (chosen by its preset's kind).
- `format_time_axis`, `mark_transitions`: the time axis and the located transitions, as every
  gflow figure draws them (usable on any matplotlib axes).

Conventions: one qualitative, colour-blind-safe palette (`PALETTE`, up to 8 lines); every
panel lettered and the figure explained by a one-line caption; transitions drawn as dashed
vertical lines named above the axes, their labels stacked so that they never overlap; a time
axis of `TIME_AXES`:

- `"log"`: logarithmic (dynamics spanning decades, e.g. an escape from a small init);
- `"linear"`: linear;
- `"stages"`: linear within each stage, every stage (between consecutive transitions, and
  from the first save to the first transition and from the last transition to the end) given
  the same width, so that a short stage is as readable as a long one.

No pyplot and no JAX at import: `python -m gflow.plot` draws a saved run with matplotlib alone.
"""

import io
import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ._defaults import TIME_AXES
from ._errors import InputError
from ._trajectory import Trajectory, atomic_write_bytes


__all__ = [
    "PALETTE", "TIME_AXES", "adjacent_similarity", "caption", "chen_luo_figure1",
    "chen_luo_figure2", "colour", "format_time", "format_time_axis", "heatmap_times",
    "label_rows", "log_x_axis", "log_y_axis", "mark_transitions", "math_label", "paper_figures", "save_index",
    "series", "spectral_order", "stack_rows", "states", "time_rows", "transition_label",
    "yang_figure1",
]

# Okabe & Ito's colour-blind-safe qualitative palette (yellow replaced by olive, which reads
# on white), blue first.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000",
           "#999933")
_DPI = 110
_TRANSITION_COLOUR = "0.35"
_LABEL_SIZE = 7.0  # points, transition and level labels
_ROW = 9.0  # points between stacked transition-label rows


def colour(k: int) -> str:
    """The `k`-th colour of `PALETTE` (cycling)."""
    return PALETTE[k % len(PALETTE)]


def math_label(label: str) -> str:
    """A plain name written as mathtext where it is mathematics: `W1` → `$W_1$`,
    `W_Q^T W_Q - W_K^T W_K` → `$W_Q^\\top W_Q - W_K^\\top W_K$`, `G(mu1)` → `$G(\\mu_1)$`,
    `s_1/2` → `$s_1/2$`; words (`x-10 (compositional)`, `type1` → `type 1`) stay text."""
    if re.fullmatch(r"type\d+", label):
        return f"type {label[4:]}"
    if not re.fullmatch(r"[A-Za-z0-9_^()/+\-. ]+", label) or "$" in label:
        return label
    tokens = label.split(" ")
    mathy = [bool(re.search(r"[_^]|\bW\d|\bmu\d", t)) or t in "-+" for t in tokens]
    if not all(mathy) or not any(re.search(r"[_^]|W\d|mu\d", t) for t in tokens):
        return label
    text = re.sub(r"\bW(\d+)", r"W_{\1}", label)
    text = re.sub(r"_([A-Za-z0-9]{2,})", r"_{\1}", text)  # W_out: the whole subscript
    text = re.sub(r"\bmu(\d+)", r"\\mu_{\1}", text)
    text = text.replace("^T", r"^\top")
    return f"${text}$"


def format_time(t: float) -> str:
    """A time with 4 significant digits, positional between 1e-3 and 1e6 (`16880`, `0.0123`),
    else in exponent form."""
    if t != 0 and not 1e-3 <= abs(t) < 1e6:
        return f"{t:.3g}"
    return np.format_float_positional(t, precision=4, fractional=False, trim="-")


def transition_label(name: str) -> str:
    """A transition's name as words: `stage2_onset` → `stage-2 onset`, `kq_collapse` →
    `KQ collapse`, `mode1_learned` → `mode 1 learned`."""
    words = []
    for word in name.split("_"):
        if word == "kq":
            word = "KQ"
        word = re.sub(r"^stage(\d+)$", r"stage-\1", word)
        word = re.sub(r"^(mode|phase|type)(\d+)$", r"\1 \2", word)
        words.append(word)
    return " ".join(words)


def _knots(traj: Trajectory) -> np.ndarray:
    """The stage boundaries: first save, each reached transition inside the run, last save."""
    ts = np.asarray(traj.ts, dtype=float)
    inside = sorted(t for t in traj.transitions.values()
                    if math.isfinite(t) and ts[0] < t < ts[-1])
    knots = [ts[0]]
    span = ts[-1] - ts[0]
    for t in inside + [ts[-1]]:
        if t - knots[-1] > 1e-3 * span:  # coincident transitions make no stage
            knots.append(t)
    return np.asarray(knots)


def time_rows(traj: Trajectory, time_axis: str) -> np.ndarray:
    """Which save times a `time_axis` can show (a log axis cannot show t ≤ 0)."""
    return _shown(np.asarray(traj.ts, dtype=float), time_axis)


def _shown(ts: np.ndarray, time_axis: str) -> np.ndarray:
    if time_axis == "log" and np.any(ts > 0):
        return ts > 0
    return np.ones(ts.shape, dtype=bool)


def format_time_axis(ax, traj: Trajectory, time_axis: str = "log") -> None:
    """Make `ax`'s x axis the flow time on a `time_axis` of `TIME_AXES` (see the module).

    **Arguments:**

    - `ax`: a matplotlib `Axes` with the curves drawn at `traj.ts[time_rows(traj, time_axis)]`.
    - `traj`: the trajectory (its save times and transitions).
    - `time_axis`: `"log"`, `"linear"` or `"stages"`.
    """
    from matplotlib import ticker

    if time_axis not in TIME_AXES:
        raise InputError(f"time_axis must be one of {', '.join(TIME_AXES)}, got {time_axis!r}")
    ts = np.asarray(traj.ts, dtype=float)[time_rows(traj, time_axis)]
    knots = _knots(traj)
    if time_axis == "stages" and len(knots) > 2:
        stages = np.arange(len(knots), dtype=float)

        def forward(t):
            return np.interp(t, knots, stages)

        def inverse(x):
            return np.interp(x, stages, knots)

        ax.set_xscale("function", functions=(forward, inverse))
        ax.set_xlim(knots[0], knots[-1])
        # A few round ticks inside each stage, none crowding its ends (the transitions carry
        # their own labels).
        ticks = [knots[0], knots[-1]]
        for a, b in zip(knots[:-1], knots[1:]):
            inner = ticker.MaxNLocator(nbins=2, steps=[1, 2, 2.5, 5, 10]).tick_values(a, b)
            ticks += [v for v in inner if a + 0.25 * (b - a) < v < b - 0.25 * (b - a)]
        ax.xaxis.set_major_locator(ticker.FixedLocator(sorted(ticks)))
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: format_time(x)))
        ax.xaxis.set_minor_locator(ticker.NullLocator())
        ax.set_xlabel(r"flow time $t$ (linear within each stage)")
        return
    if time_axis == "log" and ts.size and ts[0] > 0:
        ax.set_xscale("log")
        # Decade labels as plain text: mathtext parsing is much of a panel's drawing time.
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x:g}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlim(ts[0], ts[-1])
        ax.set_xlabel(r"flow time $t$ (log scale)")
        return
    if ts.size > 1:
        ax.set_xlim(ts[0], ts[-1])
    ax.set_xlabel(r"flow time $t$")


def _text_width(text: str, size: float, dpi: float) -> float:
    """Width in pixels of `text` at `size` points, measured by the Agg renderer (no draw)."""
    from matplotlib.backends.backend_agg import RendererAgg
    from matplotlib.font_manager import FontProperties

    renderer = RendererAgg(1, 1, dpi)
    width, _, _ = renderer.get_text_width_height_descent(text, FontProperties(size=size),
                                                         ismath="$" in text)
    return width


def stack_rows(spans: Sequence[tuple[float, float]], gap: float = 0.0) -> list[int]:
    """The row of each interval such that intervals in one row do not overlap: each goes to
    the lowest row whose last interval ends `gap` before it starts (intervals taken from left
    to right).

    **Arguments:**

    - `spans`: `(start, end)` of each label, in any common unit.
    - `gap`: the least space between two labels of one row.

    **Returns:**

    The row (0, 1, ...) of each span, in the input order.
    """
    order = sorted(range(len(spans)), key=lambda i: spans[i][0])
    ends: list[float] = []
    rows = [0] * len(spans)
    for i in order:
        start, end = spans[i]
        row = next((r for r, e in enumerate(ends) if e + gap <= start), len(ends))
        if row == len(ends):
            ends.append(end)
        else:
            ends[row] = end
        rows[i] = row
    return rows


def mark_transitions(ax, traj: Trajectory, *, only: Sequence[str] | None = None,
                     labels: bool = True) -> list:
    """Draw each located transition inside `ax`'s time range as a dashed vertical line named
    above the axes (`name (t=…)`); labels that would overlap are stacked in rows, and the
    axes' title is raised above them.

    **Arguments:**

    - `ax`: the axes, its time axis already set (`format_time_axis`) and curves drawn.
    - `traj`: the trajectory.
    - `only`: the transitions to draw (default every one reached).
    - `labels`: name them (else the lines only, e.g. in a panel below a labelled one).

    **Returns:**

    The label `Text`s (their rows never overlap).
    """
    x0, x1 = ax.get_xlim()
    scale = ax.xaxis.get_transform()
    lo, hi = sorted(scale.transform([x0, x1]))
    width_px = ax.bbox.width
    marks = []
    for name, t in traj.transitions.items():
        if (only is not None and name not in only) or not math.isfinite(t):
            continue
        if not (min(x0, x1) <= t <= max(x0, x1)) or (ax.get_xscale() == "log" and t <= 0):
            continue
        ax.axvline(t, color=_TRANSITION_COLOUR, ls="--", lw=0.9, zorder=1.5)
        marks.append((name, t, (scale.transform([t])[0] - lo) / (hi - lo)))
    if not labels or not marks:
        return []
    dpi = ax.figure.dpi
    texts = [f"{transition_label(name)} ($t$={format_time(t)})" for name, t, _ in marks]
    spans, aligns = [], []
    for text, (_, _, x) in zip(texts, marks):
        w = _text_width(text, _LABEL_SIZE, dpi) / width_px
        # Centred on its line unless that would run past the axes' ends.
        if x - w / 2 < -0.02:
            spans.append((x, x + w)), aligns.append("left")
        elif x + w / 2 > 1.02:
            spans.append((x - w, x)), aligns.append("right")
        else:
            spans.append((x - w / 2, x + w / 2)), aligns.append("center")
    rows = stack_rows(spans, gap=6.0 / width_px)
    artists = [
        ax.annotate(text, (x, 1.0), xycoords="axes fraction", xytext=(0, 2 + _ROW * row),
                    textcoords="offset points", ha=align, va="bottom", fontsize=_LABEL_SIZE,
                    color=_TRANSITION_COLOUR, annotation_clip=False)
        for text, (_, _, x), row, align in zip(texts, marks, rows, aligns)
    ]
    ax.set_title(ax.get_title(), pad=6 + _ROW * (max(rows) + 1))
    return artists


def label_rows(ax) -> int:
    """How many rows of transition labels `mark_transitions` stacked above `ax` (0 if none)."""
    return max((round((t.xyann[1] - 2) / _ROW) + 1 for t in ax.texts
                if getattr(t, "xyann", None) is not None and t.get_color() == _TRANSITION_COLOUR),
               default=0)


def _lines(ax, traj, values, labels, *, time_axis, log_y=False, ylabel="", colours=None,
           styles=None, widths=None, ts=None):
    """Lines over time, one per column of `values`, labelled (mathtext where mathematical);
    at the save times, or at `ts` (a snapshot observable's times: then marked)."""
    marker = None if ts is None else "o"
    ts = np.asarray(traj.ts if ts is None else ts, dtype=float)
    rows = _shown(ts, time_axis)
    ts = ts[rows]
    values = np.asarray(values, dtype=float)[rows]
    values = values.reshape(values.shape[0], -1)
    for k in range(values.shape[1]):
        ax.plot(ts, values[:, k], lw=(widths or {}).get(k, 1.5),
                color=(colours or {}).get(k, colour(k)), ls=(styles or {}).get(k, "-"),
                marker=marker, ms=3,
                label=math_label(labels[k]) if k < len(labels) else f"[{k}]")
    format_time_axis(ax, traj, time_axis)
    if log_y:
        log_y_axis(ax, values)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def log_y_axis(ax, values=None) -> None:
    """A log y axis with plain-text labels; labels at 1, 2, 5 of each decade where the data
    span fewer than two decades (a bare `10` would be the only label)."""
    ax.set_yscale("log", nonpositive="mask")
    _plain_log_labels(ax.yaxis, values)


def log_x_axis(ax, values=None) -> None:
    """`log_y_axis` for the x axis (a swept parameter, say)."""
    ax.set_xscale("log", nonpositive="mask")
    _plain_log_labels(ax.xaxis, values)


def _plain_log_labels(axis, values) -> None:
    # Plain text (`1e-06`, `0.01`): matplotlib's default mathtext labels cost most of a simple
    # figure's drawing time.
    from matplotlib import ticker

    if values is not None:
        positive = np.asarray(values, dtype=float)
        positive = positive[np.isfinite(positive) & (positive > 0)]
        if positive.size and positive.max() / positive.min() < 100:
            axis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(ticker.NullFormatter())


def save_index(ts, t: float) -> int:
    """The index of the save time nearest to `t`."""
    return int(np.argmin(np.abs(np.asarray(ts, dtype=float) - t)))


def states(traj: Trajectory) -> list[tuple[str, float, dict]]:
    """`(label, time, observables)` of the heat-map columns: `t0`, each reached transition and
    `end`, with the snapshot observables taken there (`Trajectory.snapshots`) beside the
    others. A transition's observables are those recorded at the located state
    (`Trajectory.at_transitions`); a trajectory without them (an older run directory) falls
    back to the save time nearest the transition. A run that stopped before `t1` has its
    last snapshot as `end`."""

    def saved(i):
        return float(traj.ts[i]), _tree_index(traj.observables, i)

    taken = {label: k for k, label in enumerate(traj.snapshot_labels) if label}
    if traj.snapshot_labels and "end" not in taken:
        taken["end"] = len(traj.snapshot_labels) - 1

    def column(label, t, values):
        if label not in taken:
            return label, t, values
        k = taken[label]
        return label, float(traj.snapshot_ts[k]), values | _tree_index(traj.snapshots, k)

    columns = [column("t0", *saved(0))]
    for name, t in traj.transitions.items():
        if not math.isfinite(t):
            continue
        if name in traj.at_transitions:
            columns.append(column(name, float(t), traj.at_transitions[name]))
        else:
            columns.append(column(name, *saved(save_index(traj.ts, t))))
    columns.append(column("end", *saved(len(traj.ts) - 1)))
    return columns


def series(traj: Trajectory, name: str) -> tuple[np.ndarray, object]:
    """`(times, values)` of observable `name`: its save times and values, or, for a snapshot
    observable, the times of the snapshots (`Trajectory.snapshot_ts`) and its values there.
    A `KeyError` when the run has no such observable."""
    if name in traj.observables:
        return np.asarray(traj.ts, dtype=float), traj.observables[name]
    if name in traj.snapshots:
        return np.asarray(traj.snapshot_ts, dtype=float), traj.snapshots[name]
    raise KeyError(f"no observable or snapshot named {name!r}")


def _has(traj: Trajectory, name: str) -> bool:
    return name in traj.observables or name in traj.snapshots


def spectral_order(C) -> np.ndarray:
    """The spectral order of a symmetric similarity matrix, on the host (NumPy): `argsort` of
    its leading eigenvector, signed so that its largest-magnitude entry is positive (the
    order of `gflow.measures.leading_eigenvector_order`). `C[order][:, order]` shows
    clusters of aligned rows as contiguous blocks."""
    C = np.asarray(C, dtype=np.float64)
    leading = np.linalg.eigh(C)[1][:, -1]
    if leading[np.argmax(np.abs(leading))] < 0:
        leading = -leading
    return np.argsort(leading, kind="stable")


def _tree_index(tree, i: int):
    if isinstance(tree, dict):
        return {k: _tree_index(v, i) for k, v in tree.items()}
    return np.asarray(tree)[i]


def heatmap_times(traj: Trajectory) -> dict[str, float]:
    """`{label: time}` of the heat-map columns (see `states`)."""
    return {label: t for label, t, _ in states(traj)}


def _margins(width: float, height: float, *, left: float, right: float, bottom: float,
             top: float) -> dict[str, float]:
    """Gridspec margins from margins in inches. The figures use a fixed layout: matplotlib's
    constrained layout measured here at about 60% of a figure's drawing time (it draws every
    axis twice to size its ticks and labels)."""
    return dict(left=left / width, right=1 - right / width, bottom=bottom / height,
                top=1 - top / height)


def _spacing(extent: float, n: int, gap: float) -> float:
    """`wspace`/`hspace` for `n` panels with `gap` inches between them across `extent` inches."""
    if n < 2:
        return 0.0
    return gap / ((extent - (n - 1) * gap) / n)


def _new_figure(fig, width: float, height: float):
    """`fig` (a `Figure` or `SubFigure` to draw into) or a new `Figure` of this size."""
    if fig is not None:
        return fig
    from matplotlib.figure import Figure  # no pyplot: no backend state is touched

    return Figure(figsize=(width, height), dpi=_DPI)


def caption(fig, text: str, *, bottom: float = 0.06) -> None:
    """A one-line caption under the panels of `fig`, `bottom` inches above its lower edge."""
    height = fig.get_figheight() if hasattr(fig, "get_figheight") else fig.figure.get_figheight()
    fig.text(0.5, bottom / height, text, ha="center", va="bottom", fontsize=8, style="italic",
             color="0.2")


def _write(fig, directory: Path, stem: str, formats) -> list[Path]:
    written = []
    for fmt in formats:
        buffer = io.BytesIO()
        fig.savefig(buffer, format=fmt, dpi=_DPI)
        path = directory / f"{stem}.{fmt}"
        atomic_write_bytes(path, buffer.getvalue())
        written.append(path)
    return written


def _groups_of(traj: Trajectory) -> list[str]:
    """The parameter groups of a Chen & Luo trajectory, in the order of the columns of its
    per-group observables: the run's `plot.labels` of `effective_rank` (a saved run's
    `cosine` dict comes back with its keys sorted), else the keys of `cosine`."""
    named = (((traj.config or {}).get("plot") or {}).get("labels") or {}).get("effective_rank")
    columns = np.shape(series(traj, "effective_rank")[1])[-1]
    cosine = series(traj, "cosine")[1]
    if named and len(named) == columns and set(named) == set(cosine):
        return list(named)
    return list(cosine)


def _loss_name(traj: Trajectory) -> str:
    loss = ((traj.config or {}).get("problem") or {}).get("loss")
    return f"{loss} loss" if loss else "cross-entropy"


def _references(traj: Trajectory, name: str) -> dict[str, float]:
    """The constant reference levels of observable `name` (`Trajectory.references`)."""
    return {label: float(level) for label, level in (traj.references.get(name) or {}).items()
            if np.ndim(level) == 0 and math.isfinite(float(level))}


def _level(ax, level: float, label: str, *, colour_: str = "0.45") -> None:
    """A horizontal reference level, named at the axes' left inside."""
    ax.axhline(level, color=colour_, ls=":", lw=1.1, zorder=1.5)
    ax.annotate(math_label(label), (0.01, level), xycoords=("axes fraction", "data"),
                xytext=(0, 1.5), textcoords="offset points", va="bottom", fontsize=_LABEL_SIZE,
                color=colour_)


def chen_luo_figure1(traj: Trajectory, *, fig=None, time_axis: str = "stages"):
    """Chen & Luo's Fig. 1 by exact gradient flow.

    (a) row cosine-similarity matrices of every parameter group (rows in spectral order) at
    t0, at each located transition and at the end; (b) relative change of each group's norm,
    `‖W(t) − W(0)‖_F / ‖W(0)‖_F`; (c) effective rank `exp H(σ/Σσ)`; (d) stable rank
    `‖W‖_F² / ‖W‖_2²`; (e) training (and held-out) loss, with the plateau level where the
    run's references give one, and the accuracies.

    **Arguments:**

    - `traj`: a `rank-collapse` or `rank-collapse-binary` trajectory: observables `cosine`
        (`{group: (n, k, k)}`), `relative_change`, `effective_rank`, `stable_rank` (one
        column per group) and `loss`; optionally `held_out_loss`, `train_accuracy`,
        `held_out_accuracy`.
    - `fig`: a `matplotlib` `Figure` or `SubFigure` to draw into (default a new figure of
        the layout's size; margins are in inches, so a given one should be about as large).
    - `time_axis`: of `TIME_AXES`.

    **Returns:**

    The figure.
    """
    groups = _groups_of(traj)
    columns = states(traj)
    n_rows, n_cols = len(groups), len(columns)
    width, height = max(2.0 * n_cols + 2.6, 17.0), 2.0 * n_rows + 6.6
    fig = _new_figure(fig, width, height)
    width, height = _size(fig)
    heat_left, heat_right, heat_top = 0.9, 1.7, 1.15
    heat_height = 1.9 * n_rows
    heat_bottom = height - heat_top - heat_height
    top = fig.add_gridspec(
        n_rows, n_cols,
        **_margins(width, height, left=heat_left, right=heat_right, bottom=heat_bottom,
                   top=heat_top),
        hspace=_spacing(heat_height, n_rows, 0.12),
        wspace=_spacing(width - heat_left - heat_right, n_cols, 0.25),
    )
    lines_left, lines_right, lines_bottom = 0.85, 0.75, 0.95
    bottom = fig.add_gridspec(
        1, 4,
        **_margins(width, height, left=lines_left, right=lines_right, bottom=lines_bottom,
                   top=height - heat_bottom + 1.15),
        wspace=_spacing(width - lines_left - lines_right, 4, 1.0),
    )
    image = None
    for r, group in enumerate(groups):
        for c, (label, t, values) in enumerate(columns):
            ax = fig.add_subplot(top[r, c])
            # Ordered here, on the host: an eigendecomposition per matrix, per column only.
            C = np.asarray(values["cosine"][group], dtype=float)
            order = spectral_order(C)
            image = ax.imshow(C[order][:, order], cmap="RdBu_r", vmin=-1, vmax=1,
                              interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                name = "$t_0$" if label == "t0" else transition_label(label)
                ax.set_title(f"{name}\n$t$={format_time(t)}", fontsize=8)
            if c == 0:
                ax.set_ylabel(math_label(group), fontsize=10, rotation=0, ha="right",
                              va="center")
    cax = fig.add_axes([1 - (heat_right - 0.35) / width,
                        (heat_bottom + 0.2 * heat_height) / height, 0.2 / width,
                        0.6 * heat_height / height])
    fig.colorbar(image, cax=cax).set_label("cosine similarity of rows")
    fig.text(heat_left / width, 1 - 0.5 / height,
             "(a) cosine similarity of the rows of each group (spectral order) at $t_0$, at "
             "each located transition and at the end", fontsize=9, va="bottom")
    panels = (
        ("relative_change", "(b) relative change", r"$\|W(t)-W(0)\|_F\,/\,\|W(0)\|_F$", True),
        ("effective_rank", "(c) effective rank", r"$\exp H(\sigma/\sum\sigma)$", False),
        ("stable_rank", "(d) stable rank", r"$\|W\|_F^2\,/\,\|W\|_2^2$", False),
    )
    for spec, (key, title, ylabel, log_y) in zip(bottom, panels):
        ax = fig.add_subplot(spec)
        ts, values = series(traj, key)
        _lines(ax, traj, values, groups, time_axis=time_axis, log_y=log_y, ylabel=ylabel,
               ts=None if key in traj.observables else ts)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, loc="best", framealpha=0.85)
        mark_transitions(ax, traj)
    ax = fig.add_subplot(bottom[3])
    _loss_panel(ax, traj, time_axis)
    mark_transitions(ax, traj)
    fig.suptitle("Chen & Luo's Fig. 1 by exact gradient flow", fontsize=11,
                 y=1 - 0.12 / height)
    caption(fig, "Dashed vertical lines: transitions located by root finding. Outer groups "
            "($W_V$, $W_1$, $W_2$) condense in stage 1; $W_Q$, $W_K$ move and collapse in "
            "rank in stage 2.", bottom=0.1)
    return fig


def _size(fig) -> tuple[float, float]:
    root = getattr(fig, "figure", None) or fig
    if hasattr(fig, "bbox") and root is not fig:
        return fig.bbox.width / root.dpi, fig.bbox.height / root.dpi
    return tuple(fig.get_size_inches())


def _loss_panel(ax, traj: Trajectory, time_axis: str) -> None:
    """(e) of Fig. 1: training and held-out loss (log y), plateau level, accuracies on a twin
    axis; the held-out ones at the snapshots (marked) where they are snapshot observables."""
    loss_name = _loss_name(traj)
    drawn = [np.asarray(traj.observables["loss"], dtype=float)]
    _lines(ax, traj, drawn[0], ["training loss"], time_axis=time_axis, ylabel=loss_name)
    if _has(traj, "held_out_loss"):
        ts, values = series(traj, "held_out_loss")
        drawn.append(np.asarray(values, dtype=float))
        _lines(ax, traj, drawn[1], ["held-out loss"], time_axis=time_axis, ylabel=loss_name,
               colours={0: colour(1)}, ts=None if "held_out_loss" in traj.observables else ts)
    log_y_axis(ax, np.concatenate([x.ravel() for x in drawn]))
    for label, level in _references(traj, "loss").items():
        _level(ax, level, label)
    handles, names = ax.get_legend_handles_labels()
    if "train_accuracy" in traj.observables:
        twin = ax.twinx()
        for k, key in enumerate(("train_accuracy", "held_out_accuracy")):
            if not _has(traj, key):
                continue
            ts, values = series(traj, key)
            rows = _shown(ts, time_axis)
            handles += twin.plot(ts[rows], np.asarray(values, dtype=float)[rows], lw=1.1,
                                 color=colour(2 + k), ls="-.",
                                 marker=None if key in traj.observables else "o", ms=3)
            names.append(key.replace("_", " "))
        for label, level in _references(traj, "held_out_accuracy").items():
            _level(twin, level, label, colour_=colour(3))
        twin.set_ylabel("accuracy (dash-dot)")
        twin.set_ylim(-0.02, 1.02)
    ax.legend(handles, names, fontsize=7, loc="center left", framealpha=0.85)
    ax.set_title("(e) loss and accuracy", fontsize=9)


def adjacent_similarity(traj: Trajectory) -> dict[str, np.ndarray]:
    """Mean `|cos|` between corresponding leading singular vectors of each outer matrix at
    adjacent save times, or adjacent snapshots (those not at transitions) where it is a
    snapshot observable (Chen & Luo Fig. 2b), from the saved `singular_vectors`:
    `{"t": (n−1,) later times, "dt": (n−1,) intervals, "U": (n−1, group), "V": (n−1, group)}`."""
    from . import measures  # imports JAX: only for this panel

    ts, saved = series(traj, "singular_vectors")
    if "singular_vectors" not in traj.observables:
        # Between the evenly placed snapshots only: a transition's snapshot falls anywhere
        # between two of them, and a similarity over a shorter interval is not comparable.
        rows = np.asarray([label in ("", "t0", "end") for label in traj.snapshot_labels])
        ts = ts[rows]
        saved = {side: np.asarray(saved[side])[rows] for side in ("U", "V")}
    out = {"t": ts[1:], "dt": np.diff(ts)}
    for side in ("U", "V"):
        vectors = np.asarray(saved[side], dtype=float)
        out[side] = np.asarray(measures.singular_vector_similarity(vectors[:-1], vectors[1:]))
    return out


def chen_luo_figure2(traj: Trajectory, *, fig=None, time_axis: str = "stages"):
    """Chen & Luo's Fig. 2 by exact gradient flow: (a) Assumption-1 satisfaction rates (where
    observed), (b) mean `|cos|` between corresponding singular vectors of each outer matrix at
    adjacent save times (where observed), (c) Frobenius norm of each group.

    **Arguments:**

    - `traj`: a `rank-collapse` or `rank-collapse-binary` trajectory (observables `norm`,
        `cosine`; optionally `assumption1_rates`, `singular_vectors`).
    - `fig`: a `matplotlib` `Figure` or `SubFigure` to draw into (default a new figure of
        the layout's size; margins are in inches, so a given one should be about as large).
    - `time_axis`: of `TIME_AXES`.

    **Returns:**

    The figure.
    """
    groups = _groups_of(traj)
    outer = [g for g in groups if g not in ("W_Q", "W_K")]
    kinds = [p for p in ("assumption1_rates", "singular_vectors") if _has(traj, p)]
    n = len(kinds) + 1
    fig = _new_figure(fig, 5.2 * n + 0.4, 4.6)
    width, height = _size(fig)
    left, right = 0.85, 0.3
    grid = fig.add_gridspec(
        1, n, **_margins(width, height, left=left, right=right, bottom=0.95, top=0.95),
        wspace=_spacing(width - left - right, n, 1.0))
    axes = [fig.add_subplot(spec) for spec in grid]
    letters = iter("abc")
    k = 0
    if "assumption1_rates" in traj.observables:
        ax = axes[k]
        _lines(ax, traj, traj.observables["assumption1_rates"], [r"$|A_1|/d$", r"$|A_2|/d^2$"],
               time_axis=time_axis, ylabel="satisfaction rate")
        ax.set_title(f"({next(letters)}) Assumption-1 rates", fontsize=9)
        ax.legend(fontsize=7, loc="best", framealpha=0.85)
        mark_transitions(ax, traj)
        k += 1
    if _has(traj, "singular_vectors"):
        ax = axes[k]
        sim = adjacent_similarity(traj)
        snapshot = "singular_vectors" not in traj.observables
        keep = _shown(sim["t"], time_axis)
        t = sim["t"][keep]
        marker = "o" if snapshot else None
        for g, name in enumerate(outer[: sim["U"].shape[1]]):
            left_, right_ = sim["U"][keep, g], sim["V"][keep, g]
            # Left and right vectors that agree are one curve: a second on top would be an
            # invisible legend entry.
            if np.nanmax(np.abs(left_ - right_)) < 2e-3:
                ax.plot(t, left_, lw=1.5, color=colour(g), marker=marker, ms=3,
                        label=f"{math_label(name)} (left = right)")
            else:
                ax.plot(t, left_, lw=1.5, color=colour(g), marker=marker, ms=3,
                        label=f"{math_label(name)} left")
                ax.plot(t, right_, lw=1.2, ls="--", color=colour(g), marker=marker, ms=3,
                        label=f"{math_label(name)} right")
        format_time_axis(ax, traj, time_axis)
        # The interval the similarity spans: evenly placed snapshots have one.
        dt = sim["dt"]
        even = snapshot and dt.size and np.allclose(dt, dt[0], rtol=1e-9, atol=0.0)
        ax.set_ylabel("mean |cos| of singular vectors\n"
                      + ((f"at adjacent snapshots ($\\Delta t$ = {format_time(dt[0])})" if even
                          else "at adjacent snapshots") if snapshot else "at adjacent saves"))
        ax.grid(alpha=0.3)
        ax.set_title(f"({next(letters)}) quasi-static outer parameters", fontsize=9)
        ax.legend(fontsize=7, loc="best", framealpha=0.85)
        mark_transitions(ax, traj)
        k += 1
    ax = axes[k]
    _lines(ax, traj, traj.observables["norm"], groups, time_axis=time_axis, log_y=True,
           ylabel=r"$\|W\|_F$")
    ax.set_title(f"({next(letters)}) Frobenius norm per group", fontsize=9)
    ax.legend(fontsize=7, loc="best", framealpha=0.85)
    mark_transitions(ax, traj)
    fig.suptitle("Chen & Luo's Fig. 2 by exact gradient flow", fontsize=11, y=1 - 0.1 / height)
    static = (f"quasi-static in direction ({chr(ord('a') + k - 1)}) and "
              if _has(traj, "singular_vectors") else "")
    caption(fig, f"Dashed vertical lines: located transitions. The outer parameters stay "
            f"{static}O(1) in norm while $W_Q$, $W_K$ grow ({chr(ord('a') + k)}).", bottom=0.1)
    return fig


def yang_figure1(traj: Trajectory, *, fig=None, time_axis: str = "log"):
    """Yang et al.'s Fig. 1 by exact gradient flow: (a) attention scores
    `μ_iᵀ W_Kᵀ W_Q μ_j`, `i, j ∈ {1, 2, 3}`, over time; (b) the total and per-type training
    losses; (c) the score matrix at t0, and its change since t0 at each transition and at
    the end, on one symmetric colour scale (so that the change shows).

    **Arguments:**

    - `traj`: a `cooccurrence` trajectory (observables `scores` `(n, 3, 3)`, `type_losses`,
        `loss`).
    - `fig`: a `matplotlib` `Figure` or `SubFigure` to draw into (default a new figure of
        the layout's size; margins are in inches, so a given one should be about as large).
    - `time_axis`: of `TIME_AXES`.

    **Returns:**

    The figure.
    """
    scores = np.asarray(traj.observables["scores"], dtype=float)
    columns = states(traj)
    fig = _new_figure(fig, max(14.0, 2.6 * len(columns) + 1.0), 9.5)
    width, height = _size(fig)
    # In inches: each line panel keeps room on its right for its legend (and the second
    # panel's axis labels); the heat maps below, under the line panels' axis labels.
    top = fig.add_gridspec(1, 2, **_margins(width, height, left=0.85, right=1.1, bottom=4.9,
                                             top=0.95),
                           wspace=_spacing(width - 1.95, 2, 2.8))
    ax_a = fig.add_subplot(top[0])
    rows = time_rows(traj, time_axis)
    ts = np.asarray(traj.ts, dtype=float)[rows]
    # Colour: the key word; line style: the query word.
    for i in range(3):
        for j in range(3):
            ax_a.plot(ts, scores[rows, i, j], lw=1.4, color=colour(i),
                      ls=("-", "--", ":")[j],
                      label=rf"$\mu_{i + 1}^\top W_K^\top W_Q \mu_{j + 1}$")
    format_time_axis(ax_a, traj, time_axis)
    ax_a.set_ylabel(r"attention score $\mu_i^\top W_K^\top W_Q \mu_j$")
    ax_a.grid(alpha=0.3)
    ax_a.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0,
                title="key $i$ (colour),\nquery $j$ (style)", title_fontsize=7)
    ax_a.set_title("(a) attention scores", fontsize=9)
    mark_transitions(ax_a, traj)
    ax_b = fig.add_subplot(top[1])
    per_type = traj.observables["type_losses"]
    names = sorted(per_type)
    values = np.stack([np.asarray(per_type[n], dtype=float) for n in names]
                      + [np.asarray(traj.observables["loss"], dtype=float)], axis=1)
    _lines(ax_b, traj, values, names + ["total"], time_axis=time_axis, log_y=True,
           ylabel="training loss (logistic)", colours={len(names): "k"},
           widths={len(names): 2.2})
    ax_b.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax_b.set_title("(b) total and per-type loss", fontsize=9)
    mark_transitions(ax_b, traj)
    # Right margin of the top row is the legends' room; the bottom row uses the full width.
    bottom = fig.add_gridspec(1, len(columns), **_margins(width, height, left=0.7, right=0.9,
                                                           bottom=0.75, top=6.1),
                              wspace=_spacing(width - 1.6, len(columns), 1.25))
    shown = np.stack([np.asarray(values_["scores"], dtype=float) for _, _, values_ in columns])
    first = float(np.max(np.abs(shown[0]))) or 1.0
    change = float(np.max(np.abs(shown[1:] - shown[0]))) if len(columns) > 1 else 0.0
    change = change or 1.0
    words = [r"$\mu_1$", r"$\mu_2$", r"$\mu_3$"]
    panels, image = [], None
    for c, (label, t, _) in enumerate(columns):
        ax = fig.add_subplot(bottom[c])
        if c == 0:
            image0 = ax.imshow(shown[0], cmap="RdBu_r", vmin=-first, vmax=first)
        else:
            image = ax.imshow(shown[c] - shown[0], cmap="PuOr_r", vmin=-change, vmax=change)
            panels.append(ax)
        ax.set_xticks(range(3), words, fontsize=8)
        ax.set_yticks(range(3), words, fontsize=8)
        ax.set_xlabel("query word", fontsize=8)
        if c == 0:
            ax.set_ylabel("key word", fontsize=8)
        name = "$t_0$" if label == "t0" else transition_label(label)
        what = "$S(t_0)$" if c == 0 else "$S(t) - S(t_0)$"
        ax.set_title(f"{name}, $t$={format_time(t)}\n{what}", fontsize=8)
        if c == 0:
            fig.colorbar(image0, ax=ax, shrink=0.8).set_label("score", fontsize=8)
    if panels:
        fig.colorbar(image, ax=panels, shrink=0.8).set_label("change of the score since $t_0$",
                                                             fontsize=8)
    fig.text(0.7 / width, 4.0 / height, "(c) score matrix at $t_0$, and its change at "
             "each located transition and at the end", fontsize=9, va="bottom")
    fig.suptitle("Yang et al.'s Fig. 1 by exact gradient flow", fontsize=11,
                 y=1 - 0.1 / height)
    caption(fig, "Dashed vertical lines: located transitions (Phase 1 ends when every sample "
            "is classified correctly).", bottom=0.1)
    return fig


# {preset kind: (stem, figure function)}: the paper figures a run of that kind gets.
_PAPER_FIGURES = {
    "rank-collapse": (("chen_luo_fig1", chen_luo_figure1), ("chen_luo_fig2", chen_luo_figure2)),
    "rank-collapse-binary": (("chen_luo_fig1", chen_luo_figure1),
                             ("chen_luo_fig2", chen_luo_figure2)),
    "cooccurrence": (("yang_fig1", yang_figure1),),
}


def paper_figures(traj: Trajectory, directory, *, time_axis: str | None = None,
                  formats: Sequence[str] = ("png",)) -> list[Path]:
    """Write the paper figures of a run of a shipped preset (`chen_luo_fig1/2.*` for
    `rank-collapse` and `rank-collapse-binary`, `yang_fig1.*` for `cooccurrence`; none for the
    others), chosen by the kind in `traj.config`.

    **Arguments:**

    - `traj`: the trajectory (with the `config` the command line saves).
    - `directory`: the figures' folder (created if missing).
    - `time_axis`: of `TIME_AXES`; default each figure's own (`"stages"` for Chen & Luo,
        `"log"` for Yang et al.).
    - `formats`: file formats, of `"png"`, `"pdf"`, `"svg"`.

    **Returns:**

    The paths written.
    """
    kind = ((traj.config or {}).get("problem") or {}).get("kind")
    if kind not in _PAPER_FIGURES or len(traj.ts) < 2:
        return []
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, draw in _PAPER_FIGURES[kind]:
        fig = draw(traj) if time_axis is None else draw(traj, time_axis=time_axis)
        written += _write(fig, directory, stem, formats)
    return written
