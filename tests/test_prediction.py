"""`gflow.Prediction` and the predictions table: every kind in one row shape."""

import json

import pytest

import gflow
from gflow._prediction import render_predictions  # the report's table; no public name of its own


def _records():
    return {
        "mode1_learned": gflow.Prediction.value(2.0, 2.002, basis="Saxe closed form",
                                                error=3e-9),
        "unreached": gflow.Prediction.value(5.0, float("nan"), basis="never reached"),
        "escape_time": gflow.Prediction.bound(29339.4, 17325.3, basis="blow-up bound"),
        "r2": gflow.Prediction.bound(0.99, 0.95, relation=">", basis="R² of the line"),
        "preference": gflow.Prediction.qualitative("compositional x-10", "neither",
                                                   holds=False, basis="held-out pair"),
        "no_call": gflow.Prediction.qualitative("either", "memorized x-6", holds=None),
    }


def test_values_bounds_and_outcomes():
    p = _records()
    assert p["mode1_learned"].rel_error == pytest.approx(1e-3)
    assert p["unreached"].measured is None and p["unreached"].rel_error is None
    assert p["escape_time"].holds is True and p["r2"].holds is False
    assert gflow.Prediction.bound(1.0, None).holds is None
    assert gflow.Prediction.value(0.0, 1e-3).rel_error == pytest.approx(1e-3)  # absolute at 0
    with pytest.raises(ValueError):
        gflow.Prediction("guess", 1.0, 1.0)


def test_json_round_trip_has_no_nan():
    for name, p in _records().items():
        text = json.dumps(p.to_json(), allow_nan=False)
        assert gflow.Prediction.from_json(json.loads(text)) == p, name


def test_table_snapshot():
    # The basis moves under its row when the row would pass 100 columns (the report fits a
    # terminal of 100 columns: this layout changed on purpose, from one 104-column line).
    lines = render_predictions(_records())
    assert lines == [
        "                 kind                  predicted         measured  outcome              basis",
        "  mode1_learned  value                         2  2.002 ± 3.0e-09  rel. error 1.00e-03",
        "      basis: Saxe closed form",
        "  unreached      value                         5                -  -",
        "      basis: never reached",
        "  escape_time    bound                 ≤ 29339.4          17325.3  holds",
        "      basis: blow-up bound",
        "  r2             bound                    > 0.99             0.95  VIOLATED",
        "      basis: R² of the line",
        "  preference     qualitative  compositional x-10          neither  not as predicted",
        "      basis: held-out pair",
        "  no_call        qualitative              either    memorized x-6  no call",
    ]
    assert render_predictions(_records(), width=120)[1].endswith("1.00e-03  Saxe closed form")
    # One shape: the predicted and measured cells end, and the outcome cells start, at the
    # header's columns in every row.
    header = lines[0]
    ends = [header.index("predicted") + len("predicted"), header.index("measured") + len("measured")]
    start = header.index("outcome")
    for line in lines[1::2]:
        assert line[ends[0] - 1] != " " and line[ends[0]] == " "
        assert line[ends[1] - 1] != " " and line[ends[1]] == " "
        assert line[start - 1] == " " and line[start] != " "


def test_long_texts_wrap_under_their_row_within_100_columns():
    measured = "; ".join(f"group {k}: effective rank {40 - k}.5, stable rank {k}.25" for k in range(8))
    long = {"collapse": gflow.Prediction.qualitative("attention below outer", measured,
                                                     holds=False, basis="read at the collapse")}
    lines = render_predictions(long)
    assert max(map(len, lines)) <= 100
    assert lines[1].split() == ["collapse", "qualitative", "attention", "below", "outer",
                                "(below)", "not", "as", "predicted", "read", "at", "the", "collapse"]
    wrapped = [line for line in lines if line.startswith("      measured: ")]
    text = " ".join(line.strip() for line in lines[lines.index(wrapped[0]):])
    assert text == "measured: " + measured
