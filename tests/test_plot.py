"""Figures: written for every observable, labelled, grouped, heatmaps at t0/transitions/end,
redrawn from disk, drawn without pyplot."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

import gflow
from gflow.plot import main as plot_main, plot_heatmaps, plot_observable, save_figures


def _trajectory():
    ts = np.linspace(0.0, 2.0, 21)
    return gflow.Trajectory(
        ts=ts,
        observables={
            "loss": np.exp(-ts),
            "ranks": np.stack([1 + ts, 2 + ts], axis=1),
            "cos": np.stack([np.eye(3) * (1 - t) + t for t in ts / 2]),
            "type_losses": {f"type{k}": np.exp(-k * ts) for k in (1, 2, 3)},
            "spectrum": np.exp(-np.outer(ts, np.arange(12.0))),
        },
        transitions={"half": 1.0, "never": float("nan")},
        final=None, t0=0.0, t1=2.0, t_final=2.0, status="completed", message="",
        stats={}, solver="tsit5", rtol=1e-8, atol=1e-10,
        references={"spectrum": {"s_1": 1.0, "s_1/2": 0.5}},
    )


def _labelled(fig) -> None:
    """Every axes with data has both axis labels; every colour bar has a label."""
    for ax in fig.axes:
        if ax.lines or ax.images:
            assert ax.get_xlabel() and ax.get_ylabel() or ax.images, ax.get_title()
            assert ax.get_xlabel(), ax.get_title()
        else:  # a colour bar
            assert ax.get_ylabel() or ax.get_xlabel()


def test_save_figures_png_by_default_and_heatmap_panels(tmp_path):
    traj = _trajectory()
    paths = save_figures(traj, tmp_path, labels={"ranks": ["a", "b"]}, heatmaps=("cos",))
    names = sorted(p.name for p in paths)
    # The per-type losses are one figure; PNG only unless asked.
    assert names == sorted(f"{n}.png" for n in ("loss", "ranks", "cos", "type_losses",
                                                 "spectrum"))
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
    fig = plot_heatmaps(traj, "cos")
    panels = [ax for ax in fig.axes if ax.images]
    # t0, the one reached transition, and the end; each shows its own save.
    assert [ax.get_title().split("\n")[0] for ax in panels] == ["$t_0$", "half", "end"]
    np.testing.assert_array_equal(panels[1].images[0].get_array(), traj.observables["cos"][10])
    _labelled(fig)
    paths = save_figures(traj, tmp_path / "pdf", formats=("png", "pdf"))
    assert {p.suffix for p in paths} == {".png", ".pdf"}
    assert all(p.read_bytes()[:4] == b"%PDF" for p in paths if p.suffix == ".pdf")
    with pytest.raises(gflow.InputError, match="formats"):
        save_figures(traj, tmp_path, formats=("gif",))


def test_figures_are_labelled_grouped_and_carry_references():
    traj = _trajectory()
    groups = plot_observable(traj, "type_losses")
    (ax,) = groups.axes
    assert [line.get_label() for line in ax.lines[:3]] == ["type 1", "type 2", "type 3"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["type 1", "type 2", "type 3"]
    _labelled(groups)
    # Two lines that coincide stay distinguishable: different dash patterns.
    ranks = plot_observable(traj, "ranks", labels=("a", "b"))
    assert len({line.get_linestyle() for line in ranks.axes[0].lines[:2]}) == 2
    # Many lines: a colour map and a labelled colour bar instead of a legend.
    spectrum = plot_observable(traj, "spectrum", references=traj.references["spectrum"])
    main, bar = spectrum.axes
    assert main.get_legend() is None and bar.get_ylabel().startswith("component")
    _labelled(spectrum)
    levels = sorted(line.get_ydata()[0] for line in main.lines if line.get_linestyle() == ":")
    assert levels == [0.5, 1.0]
    assert {t.get_text() for t in main.texts} >= {"$s_1$", "$s_1/2$", "half ($t$=1)"}
    # Equal levels (s_1/2 = s_3 for s = 4, 3, 2, 1) share one line and one label.
    shared = plot_observable(traj, "spectrum", references={"s_1/2": 2.0, "s_3": 2.0, "s_4": 1.0})
    main = shared.axes[0]
    assert sorted(line.get_ydata()[0] for line in main.lines if line.get_linestyle() == ":") \
        == [1.0, 2.0]
    assert {t.get_text() for t in main.texts} >= {"$s_1/2$ = $s_3$", "$s_4$"}


def test_reference_curves_are_dashed_in_their_components_colours_and_round_trip(tmp_path):
    traj = _trajectory()
    ts = traj.ts
    broken = np.exp(-ts)
    broken[3] = np.nan  # JSON has no NaN: written as null, read back as nan
    references = {
        "ranks": {"level": 2.5, "theory a": 1 + 1.01 * ts, "theory b": 2 + 0.99 * ts},
        "spectrum": {"theory 0": np.ones_like(ts), "theory 1": np.exp(-1.02 * ts)},
        "loss": {"theory": broken},
    }
    traj = dataclasses.replace(traj, references=references)
    # A few components: the curves join the outside legend, the i-th in component i's colour.
    (ax,) = plot_observable(traj, "ranks", labels=("a", "b"),
                            references=references["ranks"]).axes
    measured = {line.get_label(): line for line in ax.lines[:2]}
    theory = {line.get_label(): line for line in ax.lines if line.get_label().startswith("th")}
    assert [theory[k].get_color() for k in ("theory a", "theory b")] == [
        measured["a"].get_color(), measured["b"].get_color()]
    # Dashed is the theory: the components it follows are solid.
    assert {line.get_linestyle() for line in theory.values()} == {"--"}
    assert {line.get_linestyle() for line in measured.values()} == {"-"}
    # On the log time axis, without t0 = 0, like the measured lines.
    np.testing.assert_array_equal(theory["theory b"].get_ydata(), (2 + 0.99 * ts)[1:])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a", "b", "theory a",
                                                                  "theory b"]
    # Many components of which theory follows a few (a Saxe plot): those few solid in the
    # palette's first colours, the others grey, the theory curves one dashed legend entry.
    (main,) = plot_observable(traj, "spectrum", references=references["spectrum"]).axes
    coloured = [line for line in main.lines if line.get_color() != "0.7"
                and line.get_linestyle() == "-"]
    assert [line.get_color() for line in coloured] == list(gflow.figures.PALETTE[:2])
    np.testing.assert_array_equal(coloured[1].get_ydata(), traj.observables["spectrum"][1:, 1])
    assert [t.get_text() for t in main.get_legend().get_texts()] == [
        "other 10 components", "$k=1$", "$k=2$", "closed form"]
    # One component: a legend for the curve alone.
    (ax,) = plot_observable(traj, "loss", references=references["loss"]).axes
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["theory"]
    with pytest.raises(gflow.InputError, match="one value per save time"):
        plot_observable(traj, "loss", references={"short": np.ones(3)})

    traj.save(tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text(), parse_constant=_refuse)
    assert summary["references"]["loss"]["theory"][3] is None
    loaded = gflow.load(tmp_path).references
    assert loaded["ranks"]["level"] == 2.5
    for name, levels in references.items():
        for label, level in levels.items():
            np.testing.assert_array_equal(loaded[name][label], level)
    assert loaded["loss"]["theory"].dtype == np.float64
    # Redrawn from disk, curves and all.
    paths = save_figures(gflow.load(tmp_path), tmp_path / "figures")
    assert {p.stem for p in paths} == {"loss", "ranks", "type_losses", "spectrum"}


def _refuse(constant):
    raise ValueError(f"summary.json holds {constant}")


def test_redraw_from_a_run_directory(tmp_path, capsys):
    _trajectory().save(tmp_path)
    assert gflow.load(tmp_path).references == {"spectrum": {"s_1": 1.0, "s_1/2": 0.5}}
    assert plot_main([str(tmp_path)]) == 0
    assert (tmp_path / "figures" / "loss.png").is_file()
    assert not (tmp_path / "figures" / "loss.pdf").exists()
    assert plot_main([str(tmp_path), "--formats", "pdf,png"]) == 0
    assert (tmp_path / "figures" / "loss.pdf").is_file()
    assert plot_main([str(tmp_path), "--formats", "gif"]) == 2
    assert plot_main([str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("gflow.plot: error:")


def test_figures_need_neither_pyplot_nor_a_backend_switch(tmp_path):
    # In a fresh process: pytest or another test may have imported pyplot here.
    code = (
        "import sys, numpy as np, gflow; from gflow.plot import save_figures; "
        "import matplotlib; backend = dict.__getitem__(matplotlib.rcParams, 'backend'); "
        "t = gflow.Trajectory(ts=np.linspace(0, 1, 5), observables={'x': np.arange(5.0)}, "
        "transitions={}, final=None, t0=0.0, t1=1.0, t_final=1.0, status='completed', "
        "message='', stats={}, solver='tsit5', rtol=1e-8, atol=1e-10); "
        f"save_figures(t, {str(tmp_path)!r}); "
        "assert 'matplotlib.pyplot' not in sys.modules; "
        "assert dict.__getitem__(matplotlib.rcParams, 'backend') == backend"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert (tmp_path / "x.png").is_file()


@pytest.mark.parametrize("draw", [
    lambda t: plot_observable(t, "ranks", labels=("a", "b")),
    lambda t: plot_observable(t, "ranks", labels=("a long legend entry of forty characters!", "b")),
    lambda t: plot_observable(t, "ranks", labels=("a", "b"),
                              references={"a theory curve with a long label": 1 + t.ts}),
    lambda t: plot_observable(t, "spectrum", references={"theory": np.exp(-t.ts)}),
    lambda t: plot_observable(t, "spectrum"),
    lambda t: plot_heatmaps(t, "cos"),
    lambda t: plot_heatmaps(t, "cos", labels=("mu_1", "mu_2", "mu_3")),
])
def test_nothing_is_clipped(draw):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = draw(_trajectory())
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    # Everything drawn (legend outside the axes included) lies inside the figure.
    box = fig.get_tightbbox(renderer)
    width, height = fig.get_size_inches()
    assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= width and box.y1 <= height, box
