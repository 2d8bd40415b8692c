"""Config tables: type checking against signatures, TOML round trip, save grids."""

import tomllib

import numpy as np
import pytest

import gflow
# Private: the config layer under `gflow.presets.resolve` (type checks against signatures,
# overrides, the TOML writer, the typed [solve] settings), tested directly.
from gflow._config import SolveSettings, apply_overrides, check_arguments, dumps_toml, parse_value


def _builder(*, eps: float, sizes: tuple[int, ...], name: str, flag: bool, scale: float | None = None):
    return None


def test_check_arguments_converts_and_rejects():
    out = check_arguments("problem", {"eps": 1, "sizes": [2, 3], "name": "a", "flag": True}, _builder)
    assert out == {"eps": 1.0, "sizes": (2, 3), "name": "a", "flag": True}
    assert isinstance(out["eps"], float)
    assert check_arguments("problem", {"eps": 1.0, "sizes": [], "name": "a", "flag": False,
                                       "scale": None}, _builder)["scale"] is None
    for values, message in [
        ({"eps": "x", "sizes": [], "name": "a", "flag": True}, "problem.eps must be a number"),
        ({"eps": 1.0, "sizes": [1.5], "name": "a", "flag": True}, r"problem.sizes\[0\] must be an integer"),
        ({"eps": 1.0, "sizes": [], "name": 3, "flag": True}, "problem.name must be str"),
        ({"eps": 1.0, "sizes": [], "name": "a", "flag": 1}, "problem.flag must be bool"),
        ({"eps": 1.0, "sizes": [], "name": "a"}, "missing config key problem.flag"),
        ({"eps": 1.0, "sizes": [], "name": "a", "flag": True, "other": 1}, "unknown config key"),
    ]:
        with pytest.raises(gflow.InputError, match=message):
            check_arguments("problem", values, _builder)


def test_parse_value_and_overrides():
    assert parse_value("1e-3") == 1e-3 and parse_value("[1, 2]") == [1, 2]
    assert parse_value("true") is True and parse_value("tsit5") == "tsit5"
    config = apply_overrides({"solve": {"t1": 1.0}}, ["solve.t1=2", "problem.eps=0.5"])
    assert config == {"solve": {"t1": 2}, "problem": {"eps": 0.5}}
    with pytest.raises(gflow.InputError, match="problem.kind cannot be overridden"):
        apply_overrides({}, ["problem.kind=x"])


def test_dumps_toml_round_trips():
    config = {
        "preset": {"name": "x", "description": 'with "quotes"'},
        "problem": {"kind": "k", "eps": 1e-4, "sizes": [1, 2], "flag": False},
        "solve": {"t1": 3.0, "atol": None},
        "plot": {"labels": {"a": ["W_Q", "W_K"]}},
    }
    back = tomllib.loads(dumps_toml(config))
    config["solve"].pop("atol")  # None is omitted: TOML has no null
    assert back == config


def test_refined_save_times_keep_the_count_and_resolve_the_window():
    settings = SolveSettings(t1=1000.0, save_points=200, grid="log", refine=True)
    coarse = settings.save_times()
    fine = settings.refined_save_times([500.0, 510.0, float("nan")])
    assert fine.shape == coarse.shape
    assert fine[0] == 0.0 and fine[-1] == 1000.0 and np.all(np.diff(fine) >= 0)
    window = (fine >= 490.0) & (fine <= 520.0)
    assert window.sum() >= 90  # half the points sit around the transitions
    assert settings.refined_save_times([float("nan")]) is None
