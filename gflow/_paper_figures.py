"""Composite figures in the layout of the papers' own figures, drawn from a `Trajectory`.

- `chen_luo_figures`: Chen & Luo's Fig. 1 ((a) row cosine-similarity heat maps, groups ×
  {t0, each located transition, end}; (b) relative change per group with the stage-2 onset
  marked; (c) effective rank per group; the loss with held-out accuracy) and Fig. 2 ((a)
  Assumption-1 rates where observed, (b) adjacent-time singular-vector similarity of the outer
  matrices, (c) Frobenius norms per group).
- `yang_figures`: Yang et al.'s Fig. 1 ((a) attention scores over time, (b) total and per-type
  losses) with the score matrices at t0, each transition and the end.

Time axes are logarithmic (both stages of a small-init run span decades); transitions are
vertical lines named in the legend, so their labels never overprint. A heat-map column is the
state where the transition was located (`Trajectory.at_transitions`: the engine observes
the root finder's state), so no second solve is needed to place a save time there.
"""

import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import measures
from ._trajectory import Trajectory, atomic_write_bytes

_TRANSITION_STYLES = ("--", "-.", ":", (0, (5, 1, 1, 1)), (0, (1, 1)))
_TRANSITION_COLOURS = ("tab:red", "tab:purple", "tab:brown", "tab:olive", "tab:cyan")


def save_index(ts, t: float) -> int:
    """The index of the save time nearest to `t`."""
    return int(np.argmin(np.abs(np.asarray(ts, dtype=float) - t)))


def states(traj: Trajectory) -> list[tuple[str, float, dict]]:
    """`(label, time, observables)` of the heat-map columns: `t0`, each reached transition and
    `end`. A transition's observables are those recorded at the located state
    (`Trajectory.at_transitions`); a trajectory without them (an older run directory) falls
    back to the save time nearest the transition."""
    import jax.tree_util as jtu

    def saved(i):
        return float(traj.ts[i]), jtu.tree_map(lambda x: np.asarray(x)[i], traj.observables)

    columns = [("t0", *saved(0))]
    for name, t in traj.transitions.items():
        if not math.isfinite(t):
            continue
        if name in traj.at_transitions:
            columns.append((name, float(t), traj.at_transitions[name]))
        else:
            columns.append((name, *saved(save_index(traj.ts, t))))
    columns.append(("end", *saved(len(traj.ts) - 1)))
    return columns


def heatmap_times(traj: Trajectory) -> dict[str, float]:
    """`{label: time}` of the heat-map columns (see `states`)."""
    return {label: t for label, t, _ in states(traj)}


def _positive_times(ts) -> np.ndarray:
    return np.asarray(ts, dtype=float) > 0


def _mark_transitions(ax, traj: Trajectory, only: Sequence[str] | None = None) -> None:
    for k, (name, t) in enumerate(traj.transitions.items()):
        if only is not None and name not in only:
            continue
        if math.isfinite(t) and t > 0:
            ax.axvline(t, color=_TRANSITION_COLOURS[k % 5], ls=_TRANSITION_STYLES[k % 5],
                       lw=1.1, label=f"{name} (t={t:.4g})")


def _plain_log(axis) -> None:
    """Log-axis labels as plain text (`100`, `0.001`, `2` between decades where few decades
    are shown): matplotlib's default writes them as mathtext, whose parsing is much of a line
    panel's drawing time."""
    from matplotlib import ticker

    axis.set_major_formatter(ticker.LogFormatter())
    axis.set_minor_formatter(ticker.LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))


def _lines(ax, traj, values, labels, *, log_y=False, ylabel=""):
    rows = _positive_times(traj.ts)
    ts = np.asarray(traj.ts)[rows]
    values = np.asarray(values, dtype=float)[rows]
    values = values.reshape(values.shape[0], -1)
    for k in range(values.shape[1]):
        ax.plot(ts, values[:, k], lw=1.4,
                label=labels[k] if k < len(labels) else f"[{k}]")
    ax.set_xscale("log")
    _plain_log(ax.xaxis)
    if log_y:
        ax.set_yscale("log", nonpositive="mask")
        _plain_log(ax.yaxis)
    ax.set_xlabel("flow time t (log scale)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


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


def _write(fig, directory: Path, stem: str, formats) -> list[Path]:
    written = []
    for fmt in formats:
        buffer = io.BytesIO()
        fig.savefig(buffer, format=fmt, dpi=110)
        path = directory / f"{stem}.{fmt}"
        atomic_write_bytes(path, buffer.getvalue())
        written.append(path)
    return written


def chen_luo_figure1(traj: Trajectory, groups: Sequence[str], loss_name: str = "cross-entropy"):
    """Chen & Luo's Fig. 1 as one `matplotlib.figure.Figure` (layout in the module docstring).

    **Arguments:**

    - `traj`: a trajectory with observables `cosine` (`{group: (n, k, k)}`),
        `relative_change`, `effective_rank` (`(n, len(groups))`) and `loss`.
    - `groups`: the group names, in the observables' order.
    - `loss_name`: what the loss is, for its axis label.
    """
    from matplotlib.figure import Figure  # no pyplot: no backend state is touched
    columns = states(traj)
    n_rows, n_cols = len(groups), len(columns)
    width, height = max(2.1 * n_cols + 1.0, 16.0), 2.0 * n_rows + 6.4
    fig = Figure(figsize=(width, height))
    # In inches: the title and column titles above the heat maps, the row names left of them,
    # the colour bar right; below, four panels with room for their axis labels.
    heat_left, heat_right, heat_top = 0.9, 1.6, 1.15
    heat_height = 2.0 * n_rows - 0.3
    heat_bottom = height - heat_top - heat_height
    top = fig.add_gridspec(
        n_rows, n_cols,
        **_margins(width, height, left=heat_left, right=heat_right, bottom=heat_bottom,
                   top=heat_top),
        hspace=_spacing(heat_height, n_rows, 0.12),
        wspace=_spacing(width - heat_left - heat_right, n_cols, 0.25),
    )
    lines_left, lines_right, lines_bottom = 0.85, 0.75, 0.55
    bottom = fig.add_gridspec(
        1, 4,
        **_margins(width, height, left=lines_left, right=lines_right, bottom=lines_bottom,
                   top=height - heat_bottom + 0.55),
        wspace=_spacing(width - lines_left - lines_right, 4, 1.05),
    )
    image = None
    for r, group in enumerate(groups):
        for c, (label, t, values) in enumerate(columns):
            ax = fig.add_subplot(top[r, c])
            image = ax.imshow(np.asarray(values["cosine"][group], dtype=float), cmap="RdBu_r",
                              vmin=-1, vmax=1,
                              interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"{label}\nt={t:.4g}", fontsize=8)
            if c == 0:
                ax.set_ylabel(group, fontsize=10, rotation=0, ha="right", va="center")
    cax = fig.add_axes([1 - (heat_right - 0.35) / width, (heat_bottom + 0.25 * heat_height) / height,
                        0.22 / width, 0.5 * heat_height / height])
    bar = fig.colorbar(image, cax=cax)
    bar.set_label("cosine similarity of rows (spectral order)")
    for spec, (key, title, ylabel, log_y, only) in zip(bottom, (
        ("relative_change", "(b) relative change per group", "‖W(t) − W(0)‖_F / ‖W(0)‖_F",
         True, ("stage2_onset",)),
        ("effective_rank", "(c) effective rank per group", "effective rank exp H(σ/Σσ)",
         False, None),
        ("stable_rank", "(c, in stable rank) per group", "stable rank ‖W‖_F² / ‖W‖_2²",
         False, None),
    )):
        ax = fig.add_subplot(spec)
        _lines(ax, traj, traj.observables[key], groups, log_y=log_y, ylabel=ylabel)
        _mark_transitions(ax, traj, only=only)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    ax_d = fig.add_subplot(bottom[3])
    _lines(ax_d, traj, traj.observables["loss"], ["training loss"], log_y=True,
           ylabel=f"{loss_name} (log scale)")
    if "held_out_loss" in traj.observables:
        _lines(ax_d, traj, traj.observables["held_out_loss"], ["held-out loss"], log_y=True,
               ylabel=f"{loss_name} (log scale)")
    _mark_transitions(ax_d, traj)
    if "train_accuracy" in traj.observables:
        twin = ax_d.twinx()
        rows = _positive_times(traj.ts)
        ts = np.asarray(traj.ts)[rows]
        twin.plot(ts, np.asarray(traj.observables["train_accuracy"])[rows], color="0.4",
                  lw=1.0, label="train accuracy")
        if "held_out_accuracy" in traj.observables:
            twin.plot(ts, np.asarray(traj.observables["held_out_accuracy"])[rows],
                      color="0.7", lw=1.0, label="held-out accuracy")
        twin.set_ylabel("accuracy")
        twin.set_ylim(0, 1.02)
        twin.legend(fontsize=7, loc="center left")
    ax_d.set_title("loss (plateau between the stages)", fontsize=9)
    ax_d.legend(fontsize=7, loc="lower left")
    fig.suptitle("Chen & Luo Fig. 1 by exact gradient flow\n(a) cosine similarity of the rows "
                 "of each group (spectral order) at t0, at each located transition, at the end",
                 fontsize=10)
    return fig


def adjacent_similarity(traj: Trajectory) -> dict[str, np.ndarray]:
    """Mean `|cos|` between corresponding leading singular vectors of each outer matrix at
    adjacent save times (Chen & Luo Fig. 2b), from the saved `singular_vectors` observable:
    `{"t": (n−1,) later times, "U": (n−1, group), "V": (n−1, group)}`."""
    saved = traj.observables["singular_vectors"]
    out = {"t": np.asarray(traj.ts, dtype=float)[1:]}
    for side in ("U", "V"):
        vectors = np.asarray(saved[side], dtype=float)
        out[side] = np.asarray(measures.singular_vector_similarity(vectors[:-1], vectors[1:]))
    return out


def chen_luo_figure2(traj: Trajectory, groups: Sequence[str], outer: Sequence[str]):
    """Chen & Luo's Fig. 2 as one figure: (a) Assumption-1 rates (where observed), (b)
    adjacent-time singular-vector similarity of the outer matrices `outer` (where observed),
    (c) Frobenius norm per group."""
    from matplotlib.figure import Figure  # no pyplot: no backend state is touched
    panels = [p for p in ("assumption1_rates", "singular_vectors") if p in traj.observables]
    width, height, left, right = 5.0 * (len(panels) + 1), 4.0, 0.85, 0.25
    fig = Figure(figsize=(width, height))
    grid = fig.add_gridspec(
        1, len(panels) + 1,
        **_margins(width, height, left=left, right=right, bottom=0.55, top=0.6),
        wspace=_spacing(width - left - right, len(panels) + 1, 1.05),
    )
    axes = grid.subplots(squeeze=False)[0]
    k = 0
    if "assumption1_rates" in traj.observables:
        _lines(axes[k], traj, traj.observables["assumption1_rates"], ["|A1|/d", "|A2|/d²"],
               ylabel="satisfaction rate")
        _mark_transitions(axes[k], traj)
        axes[k].set_title("(a) Assumption-1 rates", fontsize=9)
        axes[k].legend(fontsize=7)
        k += 1
    if "singular_vectors" in traj.observables:
        sim = adjacent_similarity(traj)
        ax = axes[k]
        keep = sim["t"] > 0
        for g, name in enumerate(outer):
            line, = ax.plot(sim["t"][keep], sim["U"][keep, g], lw=1.4, label=f"{name} left")
            ax.plot(sim["t"][keep], sim["V"][keep, g], lw=1.0, ls="--", color=line.get_color(),
                    label=f"{name} right")
        ax.set_xscale("log")
        _plain_log(ax.xaxis)
        ax.set_xlabel("flow time t (log scale)")
        ax.set_ylabel("mean |cos| of singular vectors, adjacent saves")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        _mark_transitions(ax, traj)
        ax.set_title("(b) quasi-static outer parameters", fontsize=9)
        ax.legend(fontsize=7)
        k += 1
    _lines(axes[k], traj, traj.observables["norm"], groups, log_y=True,
           ylabel="Frobenius norm ‖W‖_F")
    _mark_transitions(axes[k], traj)
    axes[k].set_title("(c) norm per group", fontsize=9)
    axes[k].legend(fontsize=7)
    fig.suptitle("Chen & Luo Fig. 2 by exact gradient flow", fontsize=10)
    return fig


def chen_luo_figures(
    traj: Trajectory,
    directory,
    groups: Sequence[str] = ("W_Q", "W_K", "W_V", "W1", "W2"),
    outer: Sequence[str] = ("W_V", "W1", "W2"),
    formats: tuple[str, ...] = ("png",),
    loss_name: str = "cross-entropy",
) -> list[Path]:
    """Write `chen_luo_fig1.*` and `chen_luo_fig2.*` into `directory`.

    **Arguments:**

    - `traj`: a `rank-collapse` (or `rank-collapse-binary`) trajectory.
    - `directory`: the figures' folder (created if missing).
    - `groups`, `outer`: names of the observed groups and of the outer matrices whose
        singular vectors were saved, in the observables' order.
    - `formats`: file formats.
    - `loss_name`: what the loss is (e.g. `"exponential loss"` on the binary task), for its
        axis label.

    **Returns:**

    The paths written.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if len(traj.ts) < 2:
        return []
    written = _write(chen_luo_figure1(traj, groups, loss_name), directory, "chen_luo_fig1",
                     formats)
    written += _write(chen_luo_figure2(traj, groups, outer), directory, "chen_luo_fig2", formats)
    return written


def yang_figure1(traj: Trajectory):
    """Yang et al.'s Fig. 1: (a) attention scores `μ_iᵀ W_Kᵀ W_Q μ_j`, `i, j ∈ {1, 2, 3}`, over
    time with the phase boundary; (b) the total and per-type training losses; below, the score
    matrices at t0, each transition and the end on one shared colour scale spanning their
    values (so their change shows)."""
    from matplotlib.figure import Figure  # no pyplot: no backend state is touched
    scores = np.asarray(traj.observables["scores"], dtype=float)
    columns = states(traj)
    times = [(label, t) for label, t, _ in columns]
    width, height = max(11.0, 2.4 * len(times)), 8.0
    fig = Figure(figsize=(width, height))
    # In inches: the title, two panels with their axis labels, the score matrices below (each
    # colour bar takes its room from the panels it serves).
    top = fig.add_gridspec(1, 2, **_margins(width, height, left=0.85, right=0.3, bottom=3.6,
                                             top=0.65),
                           wspace=_spacing(width - 1.15, 2, 1.0))
    ax_a = fig.add_subplot(top[0])
    labels = [f"μ{i + 1}ᵀW_KᵀW_Qμ{j + 1}" for i in range(3) for j in range(3)]
    rows = _positive_times(traj.ts)
    ts = np.asarray(traj.ts)[rows]
    for idx, label in enumerate(labels):
        i, j = divmod(idx, 3)
        ax_a.plot(ts, scores[rows, i, j], lw=1.3, label=label)
    ax_a.set_xscale("log")
    _plain_log(ax_a.xaxis)
    ax_a.set_xlabel("flow time t (log scale)")
    ax_a.set_ylabel("attention score (key i, query j)")
    ax_a.grid(alpha=0.3)
    _mark_transitions(ax_a, traj)
    ax_a.legend(fontsize=6, ncol=2)
    ax_a.set_title("(a) attention score correlations", fontsize=9)
    ax_b = fig.add_subplot(top[1])
    per_type = traj.observables["type_losses"]
    for name in sorted(per_type):
        ax_b.plot(ts, np.asarray(per_type[name])[rows], lw=1.4, label=name.replace("type", "type "))
    ax_b.plot(ts, np.asarray(traj.observables["loss"])[rows], color="k", lw=1.8, label="total")
    ax_b.set_xscale("log")
    _plain_log(ax_b.xaxis)
    ax_b.set_yscale("log", nonpositive="mask")
    _plain_log(ax_b.yaxis)
    ax_b.set_xlabel("flow time t (log scale)")
    ax_b.set_ylabel("training loss (logistic)")
    ax_b.grid(alpha=0.3)
    _mark_transitions(ax_b, traj)
    ax_b.legend(fontsize=7)
    ax_b.set_title("(b) total and per-type loss", fontsize=9)
    # Attention moves little against its O(1) initial scores: the t0 panel shows S(0) on its
    # own scale, the others the change S(t) − S(0) on one symmetric scale spanning it.
    bottom = fig.add_gridspec(1, len(times), **_margins(width, height, left=0.7, right=0.3,
                                                         bottom=0.45, top=5.25),
                              wspace=_spacing(width - 1.0, len(times), 1.2))
    shown = np.stack([np.asarray(values["scores"], dtype=float) for _, _, values in columns])
    first = float(np.max(np.abs(shown[0]))) or 1.0
    change = float(np.max(np.abs(shown[1:] - shown[0]))) if len(times) > 1 else 0.0
    change = change or 1.0
    panels = []
    for c, (label, t) in enumerate(times):
        ax = fig.add_subplot(bottom[c])
        if c == 0:
            image0 = ax.imshow(shown[0], cmap="RdBu_r", vmin=-first, vmax=first)
        else:
            image = ax.imshow(shown[c] - shown[0], cmap="PuOr_r", vmin=-change, vmax=change)
            panels.append(ax)
        ax.set_xticks(range(3), ["μ1", "μ2", "μ3"], fontsize=7)
        ax.set_yticks(range(3), ["μ1", "μ2", "μ3"], fontsize=7)
        ax.set_xlabel("query word", fontsize=7)
        if c == 0:
            ax.set_ylabel("key word", fontsize=7)
        what = "score S(t0)" if c == 0 else "change S(t) − S(t0)"
        ax.set_title(f"{label}, t={t:.4g}\n{what}", fontsize=8)
        if c == 0:
            fig.colorbar(image0, ax=ax, shrink=0.8).set_label("score (key, query)")
    if panels:
        fig.colorbar(image, ax=panels, shrink=0.8).set_label("change of the score since t0")
    fig.suptitle("Yang et al. Fig. 1 by exact gradient flow", fontsize=10)
    return fig


def yang_figures(traj: Trajectory, directory, formats: tuple[str, ...] = ("png",)
                 ) -> list[Path]:
    """Write `yang_fig1.*` (see `yang_figure1`) into `directory`; returns the paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if len(traj.ts) < 2:
        return []
    return _write(yang_figure1(traj), directory, "yang_fig1", formats)
