"""The command line's results at a glance: error bars by default, criteria in summary.json,
results before figures."""

import json
import math

# Private: the in-process command line, exactly what the console script `gflow-solve` runs.
from gflow._cli import main

# A reduced deep-linear run: 2 modes, 6 wide, short horizon.
FAST = [
    "deep-linear", "--set", "problem.width=6", "--set", "problem.singular_values=[3.0, 1.5]",
    "--set", "solve.save_points=40", "--t1", "6", "--quiet",
]


def test_summary_carries_an_error_for_every_reached_transition_by_default(tmp_path):
    out = tmp_path / "run"
    assert main(FAST + ["--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["solve"]["certify"] is True
    reached = {k: t for k, t in summary["transitions"].items() if t is not None}
    assert set(reached) == {"mode1_learned", "mode2_learned"}
    errors = summary["errors"]["transitions"]
    for name in reached:
        # Certified at 100x smaller tolerances: finite, positive, and small against the time
        # (the solve's rtol is 1e-8).
        assert errors[name] is not None and 0 < errors[name] < 1e-5 * reached[name], name
        assert summary["predictions"][name]["error"] == errors[name]
    # The criterion of every transition, as the report prints it.
    assert set(summary["criteria"]) == set(summary["transitions"])
    assert summary["criteria"]["mode2_learned"].endswith("s_2/2 = 0.75")
    assert summary["errors"]["reference_stats"]["num_steps"] > summary["stats"]["num_steps"]
    # Figures come after the results: PNG only by default.
    assert sorted(p.suffix for p in (out / "figures").iterdir()) == [".png"] * 3
    # The theory's levels and curves (one value per save time) travel with the run, for
    # `python -m gflow.plot`.
    references = summary["references"]["singular_values"]
    assert {k: v for k, v in references.items() if not isinstance(v, list)} == {
        "s_1": 3.0, "s_2": 1.5, "s_1/2": 1.5, "s_2/2": 0.75}
    curves = {k: v for k, v in references.items() if isinstance(v, list)}
    assert list(curves) == ["Saxe s=3 (first order in init)", "Saxe s=1.5 (first order in init)"]
    assert all(len(v) == 40 for v in curves.values())


def test_no_certify_and_no_figures(tmp_path):
    out = tmp_path / "run"
    assert main(FAST + ["--no-certify", "--no-figures", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["errors"] == {} and summary["config"]["solve"]["certify"] is False
    assert not (out / "figures").exists()
    assert all(math.isfinite(t) for t in summary["transitions"].values())
