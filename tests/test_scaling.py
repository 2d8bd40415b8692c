"""Scaling laws from theory: ScalingLaw, Sweep.fit with theory's law, Sweep.save's figures."""

import json
import math

import numpy as np
import pytest

import gflow


def _sweep(times):
    """A Sweep of recorded members (no solve: the fit and the files are under test)."""
    eps = sorted(times)
    members = tuple(
        gflow.SweepMember(point={"eps": e}, status="completed", message="",
                          transitions={"escape": times[e]}, final={}, t_final=1e3,
                          stats={"num_steps": 10}, group=0)
        for e in eps
    )
    return gflow.Sweep(axes={"eps": tuple(eps)}, mode="grid", members=members, groups=({},),
                       t0=0.0, t1=1e3, solver="tsit5", rtol=1e-8)


def test_laws_of_products_of_factors():
    assert gflow.ScalingLaw.of_factors(2, rate=4.0) == gflow.ScalingLaw.log(0.25)
    assert gflow.ScalingLaw.of_factors(3).law == "power"
    assert gflow.ScalingLaw.of_factors(5).slope == -3.0
    with pytest.raises(ValueError):
        gflow.ScalingLaw.of_factors(2)  # a log law needs the growth rate
    with pytest.raises(ValueError):
        gflow.ScalingLaw("cubic", 1.0)


@pytest.mark.parametrize("law, slope", [("log", 0.5), ("power", -1.0)])
def test_fit_with_theory_law_and_save_its_figure(tmp_path, law, slope):
    eps = np.geomspace(1e-1, 1e-4, 6)
    wiggle = 1 + 1e-3 * np.sin(np.arange(eps.size))  # not an exact line: a finite interval
    if law == "log":
        times = {e: (3.0 + slope * math.log(1 / e)) * w for e, w in zip(eps, wiggle)}
    else:
        times = {e: 2.0 * e**slope * w for e, w in zip(eps, wiggle)}
    sw = _sweep(times)
    theory = gflow.ScalingLaw(law, slope, basis="a closed form")
    fit = sw.fit("escape", law=theory)
    assert fit.law == law and fit.expected == slope and fit.basis == "a closed form"
    assert fit.slope == pytest.approx(slope, rel=1e-2) and fit.agrees
    assert "theory " in fit.description and "inside the interval" in fit.description
    out = sw.save(tmp_path / "sw", fits=[fit])
    summary = json.loads((out / "sweep.json").read_text())
    (written,) = summary["fits"]
    assert written["expected"] == slope and written["law"] == law and written["agrees"]
    assert (out / "figures" / "escape_vs_eps.png").read_bytes()[:4] == b"\x89PNG"
    fig = gflow.plot_fit(fit, sw)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any(label.startswith("theory:") for label in labels)
    assert fig.axes[0].get_xlabel() and fig.axes[0].get_ylabel()
