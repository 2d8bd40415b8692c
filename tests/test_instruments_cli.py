"""`python -m gflow.solve --critical-points --sensitivity FIELD`: the report, summary.json, and
bad flags refused before anything is written."""

import json
import math

import pytest

# Private: the in-process command line, exactly what the console script `gflow-solve` runs.
from gflow._cli import main

SMALL = ["deep-linear", "--set", "problem.width=4", "--set", "problem.singular_values=[3.0, 1.0]",
         "--set", "problem.eps=1e-6", "--t1", "20"]


@pytest.mark.slow  # a whole CLI run with both instruments: about a minute and a half here
def test_critical_points_and_sensitivity_in_summary(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(SMALL + ["--out", str(out), "--critical-points", "--sensitivity", "eps"]) == 0
    report = capsys.readouterr().out
    assert "critical points" in report and "d ln t*/d ln eps" in report
    text = (out / "summary.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    summary = json.loads(text)
    points = summary["critical_points"]
    # The origin, the saddle with mode 1 learned, the minimum: losses ½ Σ unlearned s².
    assert [round(p["loss"], 9) for p in points] == [5.0, 0.5, 0.0]
    assert [p["index"] for p in points] == [8, 3, 0]  # (h − k)(r − k), h = 4, r = 2
    assert points[-1]["predicted_exit"] is None  # JSON null, not NaN
    sens = summary["sensitivity"]
    assert sens["parameter"] == "eps" and sens["p"] == 1e-6
    # From a random init of scale ε, t* ≈ ln(1/ε²)/(2s) + const: dt*/dε ≈ −1/(s ε).
    for name, s in (("mode1_learned", 3.0), ("mode2_learned", 1.0)):
        assert sens["derivatives"][name] == pytest.approx(-1 / (s * 1e-6), rel=1e-3)
        assert math.isfinite(sens["exponents"][name])


@pytest.mark.parametrize("flags, message", [
    (["--sensitivity", "seed"], "not a floating-point number"),
    (["--sensitivity", "nope"], "no field 'nope'"),
    (["--critical-points", "--x32"], "need float64"),
])
def test_bad_instrument_flags(tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    assert main(SMALL + ["--out", str(out)] + flags) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
