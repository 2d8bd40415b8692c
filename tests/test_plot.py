"""Figures: written for every observable, heatmaps at t0/transitions/end, redrawn from disk."""

import numpy as np

import gflow
from gflow.plot import main as plot_main, plot_heatmaps, save_figures


def _trajectory():
    ts = np.linspace(0.0, 2.0, 21)
    return gflow.Trajectory(
        ts=ts,
        observables={
            "loss": np.exp(-ts),
            "ranks": np.stack([1 + ts, 2 + ts], axis=1),
            "cos": np.stack([np.eye(3) * (1 - t) + t for t in ts / 2]),
        },
        transitions={"half": 1.0, "never": float("nan")},
        final=None, t0=0.0, t1=2.0, t_final=2.0, status="completed", message="",
        stats={}, solver="tsit5", rtol=1e-8, atol=1e-10,
    )


def test_save_figures_and_heatmap_panels(tmp_path):
    traj = _trajectory()
    paths = save_figures(traj, tmp_path, labels={"ranks": ["a", "b"]}, heatmaps=("cos",))
    names = sorted(p.name for p in paths)
    assert names == sorted(f"{n}.{f}" for n in ("loss", "ranks", "cos") for f in ("png", "pdf"))
    assert all(p.stat().st_size > 1000 for p in paths)
    fig = plot_heatmaps(traj, "cos")
    panels = [ax for ax in fig.axes if ax.images]
    # t0, the one reached transition, and the end; each shows its own save.
    assert [ax.get_title().split("\n")[0] for ax in panels] == ["t0", "half", "end"]
    np.testing.assert_array_equal(panels[1].images[0].get_array(), traj.observables["cos"][10])


def test_redraw_from_a_run_directory(tmp_path, capsys):
    _trajectory().save(tmp_path)
    assert plot_main([str(tmp_path)]) == 0
    assert (tmp_path / "figures" / "loss.png").is_file()
    assert plot_main([str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("gflow.plot: error:")
