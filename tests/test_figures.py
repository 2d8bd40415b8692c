"""Paper figures and the conventions of every figure: drawn into a caller's figure or axes,
redrawn by `gflow.plot` for a saved run (paper figures included), time axes that resolve every
stage, transition labels that never overlap."""

import itertools

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import gflow
from gflow import figures
from gflow.plot import main as plot_main, plot_observable

GROUPS = ("W_Q", "W_K", "W_V", "W1", "W2")


def _chen_luo(n: int = 40) -> gflow.Trajectory:
    """A trajectory with the observables of a `rank-collapse` run (synthetic values)."""
    ts = np.linspace(0.0, 100.0, n)
    rng = np.random.default_rng(0)
    k = len(GROUPS)
    grow = np.outer(ts / 100, np.arange(1.0, k + 1))
    vectors = rng.normal(size=(n, 3, 6, 2)) * 0.01 + np.ones((n, 3, 6, 2))
    return gflow.Trajectory(
        ts=ts,
        observables={
            "loss": 5.3 * np.exp(-ts / 30),
            "held_out_loss": 5.3 * np.exp(-ts / 60),
            "train_accuracy": np.clip(ts / 80, 0, 1),
            "held_out_accuracy": 0.01 + 0.002 * np.sin(ts),
            "effective_rank": 4 - grow / 2,
            "stable_rank": 3 - grow / 3,
            "relative_change": grow ** 2,
            "norm": 1e-3 + grow,
            # Keys in another order than the columns: a saved run's dict comes back sorted.
            "cosine": {g: np.stack([np.eye(4) * (1 - s) + s for s in ts / 100])
                       for g in sorted(GROUPS)},
            "singular_vectors": {"U": vectors, "V": vectors},
        },
        transitions={"condensation": 10.0, "stage2_onset": 60.0, "kq_collapse": 61.0,
                     "never": float("nan")},
        final=None, t0=0.0, t1=100.0, t_final=100.0, status="completed", message="",
        stats={}, solver="tsit5", rtol=1e-8, atol=1e-10,
        references={"loss": {"plateau log V": 5.3},
                    "held_out_accuracy": {"chance 1/97": 1 / 97}},
        config={"problem": {"kind": "rank-collapse"},
                "plot": {"time_axis": "stages", "labels": {"effective_rank": list(GROUPS)}}},
    )


def _yang(n: int = 30) -> gflow.Trajectory:
    ts = np.concatenate([[0.0], np.logspace(-3, 2, n - 1)])
    scores = np.stack([np.arange(9.0).reshape(3, 3) * (1 + t / 100) for t in ts])
    return gflow.Trajectory(
        ts=ts,
        observables={"loss": np.exp(-ts / 50) + 0.1, "scores": scores,
                     "type_losses": {f"type{k}": np.exp(-k * ts / 50) for k in (1, 2, 3, 4)},
                     "G": np.outer(ts, [1.0, 1.0, -1.0]), "margin": ts - 0.5},
        transitions={"phase1_end": 0.5},
        final=None, t0=0.0, t1=100.0, t_final=100.0, status="completed", message="",
        stats={}, solver="tsit5", rtol=1e-8, atol=1e-10,
        config={"problem": {"kind": "cooccurrence"}, "plot": {"time_axis": "log",
                                                              "heatmaps": ["scores"]}},
    )


def _drawn(fig):
    renderer = FigureCanvasAgg(fig.figure if hasattr(fig, "figure") and fig.figure else fig) \
        .get_renderer()
    fig.draw(renderer)
    return renderer


@pytest.mark.parametrize("make, stems", [
    (_chen_luo, {"chen_luo_fig1", "chen_luo_fig2", "loss", "held_out_loss", "train_accuracy",
                 "held_out_accuracy", "effective_rank", "stable_rank", "relative_change",
                 "norm"}),
    (_yang, {"yang_fig1", "loss", "type_losses", "G", "margin", "scores"}),
])
def test_plot_redraws_every_figure_of_a_saved_run_paper_figures_included(tmp_path, make, stems):
    make().save(tmp_path)
    assert plot_main([str(tmp_path)]) == 0
    written = {p.stem for p in (tmp_path / "figures").iterdir()}
    assert written == stems
    assert plot_main([str(tmp_path), "--linear", "--formats", "pdf"]) == 0
    assert {p.stem for p in (tmp_path / "figures").glob("*.pdf")} == stems


def test_adjacent_similarity_of_snapshots_spans_the_evenly_placed_ones():
    """Fig. 2's quasi-static panel from snapshot singular vectors: adjacent snapshots among
    t0, the chosen times and the end (a transition's snapshot between two of them is left
    out), each the mean |cos| of corresponding vectors, here rotating at a known rate:
    |cos(ω Δt)|; the panel names the interval."""
    import dataclasses

    omega = 0.01
    ts = np.array([0.0, 10.0, 25.0, 50.0, 75.0, 100.0])
    labels = ("t0", "condensation", "", "", "", "end")

    def rotated(t):  # two orthonormal columns in the first two coordinates of R^6
        c, s = np.cos(omega * t), np.sin(omega * t)
        return np.array([[c, -s], [s, c], [0, 0], [0, 0], [0, 0], [0, 0]])

    vectors = np.stack([np.stack([rotated(t)] * 3) for t in ts])  # (snapshot, group, 6, 2)
    traj = _chen_luo()
    traj = dataclasses.replace(
        traj, observables={k: v for k, v in traj.observables.items() if k != "singular_vectors"},
        snapshots={"singular_vectors": {"U": vectors, "V": vectors}}, snapshot_ts=ts,
        snapshot_labels=labels)
    sim = figures.adjacent_similarity(traj)
    np.testing.assert_array_equal(sim["t"], [25.0, 50.0, 75.0, 100.0])
    np.testing.assert_array_equal(sim["dt"], [25.0] * 4)
    for side in ("U", "V"):
        np.testing.assert_allclose(sim[side], np.cos(omega * 25.0), rtol=1e-12)
    fig = figures.chen_luo_figure2(traj)
    static = next(ax for ax in fig.axes if "quasi-static" in ax.get_title())
    assert static.get_ylabel().endswith("at adjacent snapshots ($\\Delta t$ = 25)")
    np.testing.assert_allclose(static.lines[0].get_ydata(), np.cos(omega * 25.0), rtol=1e-12)


def test_chen_luo_figures_draw_into_a_given_figure():
    traj = _chen_luo()
    # The layout is in inches: a figure of each one's own size, side by side.
    parent = Figure(figsize=(17 + 11, 16.6))
    left, right = parent.subfigures(1, 2, width_ratios=(17, 11))
    assert figures.chen_luo_figure1(traj, fig=left) is left
    assert figures.chen_luo_figure2(traj, fig=right) is right
    lines = [ax for ax in parent.axes if ax.lines and ax.get_title()]  # not the twin axis
    assert len(lines) == 4 + 2  # Fig. 1 (b)-(e), Fig. 2 (b)-(c) (no Assumption-1 rates here)
    assert {ax.get_xscale() for ax in lines} == {"function"}  # "stages" by default
    titles = [ax.get_title() for ax in lines]
    assert [t[:3] for t in titles] == ["(b)", "(c)", "(d)", "(e)", "(a)", "(b)"]
    # Columns named by the run's labels, not by the saved dict's sorted keys.
    rank_panel = next(ax for ax in lines if ax.get_title().startswith("(c)"))
    assert [t.get_text() for t in rank_panel.get_legend().get_texts()] == [
        "$W_Q$", "$W_K$", "$W_V$", "$W_{1}$", "$W_{2}$"]
    # Outer singular vectors that agree on both sides are one legend entry each.
    static = next(ax for ax in lines if "quasi-static" in ax.get_title())
    assert [t.get_text() for t in static.get_legend().get_texts()] == [
        "$W_V$ (left = right)", "$W_{1}$ (left = right)", "$W_{2}$ (left = right)"]
    # Its range fits the data (all within 0.99-1), not 0-1.
    low, high = static.get_ylim()
    assert low > 0.9 and high < 1.01
    _drawn(parent)


def test_held_out_curves_taken_as_snapshots_are_drawn_at_the_snapshots():
    """The `rank-collapse` preset takes the held-out loss and accuracy as snapshots: panel (e)
    draws them at the snapshot times, marked, beside the training curves at every save time."""
    import dataclasses

    traj = _chen_luo()
    rows = [0, 10, 20, 39]
    held = {k: np.asarray(traj.observables[k])[rows] for k in ("held_out_loss",
                                                             "held_out_accuracy")}
    traj = dataclasses.replace(
        traj, observables={k: v for k, v in traj.observables.items() if k not in held},
        snapshots=held, snapshot_ts=traj.ts[rows], snapshot_labels=("t0", "", "", "end"))
    fig = figures.chen_luo_figure1(traj)
    panel = next(ax for ax in fig.axes if ax.get_title().startswith("(e)"))
    twin = next(ax for ax in fig.axes if ax is not panel and ax.bbox.bounds == panel.bbox.bounds)
    by_label = {line.get_label(): line for line in panel.lines + twin.lines}
    training, held_out = by_label["training loss"], by_label["held-out loss"]
    np.testing.assert_array_equal(training.get_xdata(), traj.ts)
    np.testing.assert_array_equal(held_out.get_xdata(), traj.ts[rows])
    np.testing.assert_array_equal(held_out.get_ydata(), held["held_out_loss"])
    assert held_out.get_marker() == "o" and training.get_marker() in ("None", None, "")
    accuracy = [line for line in twin.lines if line.get_marker() == "o"]
    assert len(accuracy) == 1
    np.testing.assert_array_equal(accuracy[0].get_ydata(), held["held_out_accuracy"])


@pytest.mark.parametrize("time_axis, scale", [("log", "log"), ("linear", "linear")])
def test_one_time_axis_for_every_panel(time_axis, scale):
    fig = figures.chen_luo_figure2(_chen_luo(), time_axis=time_axis)
    assert {ax.get_xscale() for ax in fig.axes if ax.lines} == {scale}


def test_yang_figure_and_plot_observable_draw_into_a_callers_axes():
    traj = _yang()
    fig = Figure(figsize=(14, 9.5))
    assert figures.yang_figure1(traj, fig=fig) is fig
    assert [ax.get_title()[:3] for ax in fig.axes if ax.lines] == ["(a)", "(b)"]
    ours = Figure()
    ax = ours.add_subplot()
    assert plot_observable(traj, "type_losses", ax=ax) is ours
    assert len(ours.axes) == 1 and ax.get_title() == "Training loss per sample type"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "type 1", "type 2", "type 3", "type 4"]


def _overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


@pytest.mark.parametrize("time_axis", ["linear", "log", "stages"])
def test_transition_labels_never_overlap_each_other_nor_the_title(time_axis):
    traj = _chen_luo()
    import dataclasses

    # Four transitions within 2% of the run, one alone.
    crowded = {"a_first": 50.0, "b_second": 50.5, "c_third": 51.0, "d_fourth": 51.5,
               "late_one": 90.0}
    traj = dataclasses.replace(traj, transitions=crowded)
    # Three reference levels within 1% of each other too.
    fig = plot_observable(traj, "loss", time_axis=time_axis,
                          references={"level a": 2.0, "level b": 2.01, "level c": 2.02})
    (ax,) = fig.axes
    renderer = _drawn(fig)
    labels = [t for t in ax.texts if "$t$=" in t.get_text()]
    assert len(labels) == len(crowded)
    levels = [t for t in ax.texts if t.get_text().startswith("level")]
    assert len(levels) == 3
    boxes = [t.get_window_extent(renderer) for t in labels]
    for a, b in itertools.combinations(boxes, 2):
        assert not _overlap(a, b)
    for a, b in itertools.combinations([t.get_window_extent(renderer) for t in levels], 2):
        assert not _overlap(a, b)
    title = ax.title.get_window_extent(renderer)
    assert not any(_overlap(title, box) for box in boxes)
    # Everything lies inside the figure.
    box = fig.get_tightbbox(renderer)
    width, height = fig.get_size_inches()
    assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= width and box.y1 <= height


def test_stack_rows_puts_overlapping_spans_in_separate_rows():
    spans = [(0.0, 1.0), (0.5, 1.5), (1.2, 2.0), (3.0, 4.0), (0.9, 1.1)]
    rows = figures.stack_rows(spans, gap=0.05)
    for (i, a), (j, b) in itertools.combinations(enumerate(spans), 2):
        if rows[i] == rows[j]:
            assert a[1] + 0.05 <= b[0] or b[1] + 0.05 <= a[0]
    assert rows[3] == 0  # room in the first row: it goes there


def test_stages_axis_gives_every_stage_the_same_width():
    traj = _chen_luo()
    fig = Figure()
    ax = fig.add_subplot()
    ax.plot(traj.ts, traj.observables["loss"])
    figures.format_time_axis(ax, traj, "stages")
    knots = [0.0, 10.0, 60.0, 61.0, 100.0]
    x = ax.transData.transform(np.column_stack([knots, np.ones(5)]))[:, 0]
    np.testing.assert_allclose(np.diff(x), np.diff(x)[0], rtol=1e-9)
    with pytest.raises(gflow.InputError, match="time_axis"):
        figures.format_time_axis(ax, traj, "symlog")


def test_names_become_words_and_mathematics_mathtext():
    assert figures.math_label("W1") == "$W_{1}$"
    assert figures.math_label("W_out") == "$W_{out}$"
    assert figures.math_label("W_Q^T W_Q - W_K^T W_K") == r"$W_Q^\top W_Q - W_K^\top W_K$"
    assert figures.math_label("G(mu2)") == r"$G(\mu_{2})$"
    assert figures.math_label("x-10 (compositional)") == "x-10 (compositional)"
    assert figures.transition_label("stage2_onset") == "stage-2 onset"
    assert figures.transition_label("kq_collapse") == "KQ collapse"
    assert figures.transition_label("mode1_learned") == "mode 1 learned"
    assert figures.format_time(16884.3) == "16880"
    assert len(set(figures.PALETTE)) == 8
