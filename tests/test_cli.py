"""The command line, driven through `gflow._cli.main` and once as a real subprocess."""

import json
import subprocess
import sys

import numpy as np
import pytest

import gflow
from gflow._cli import EXIT_BAD_INPUT, main

# A reduced deep-linear run: 2 modes, 8 wide, short horizon (seconds, not a minute).
FAST = [
    "deep-linear", "--set", "problem.width=6", "--set", "problem.singular_values=[3.0, 1.5]",
    "--set", "solve.save_points=40", "--t1", "6",
]


def _exit_code(argv) -> int:
    """`main`'s exit status, whether it returns it or argparse raises SystemExit."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize(
    "argv, message",
    [
        (["no-such-preset"], "unknown preset 'no-such-preset'"),
        (["--set", "problem.foo=1"], "unknown config key problem.foo"),
        (["--set", "solve.bar=1"], "unknown config key solve.bar"),
        (["--set", "nodot=1"], "--set expects table.key=value"),
        (["--set", "problem.eps=abc"], "problem.eps must be a number"),
        (["deep-linear", "--set", "problem.depth=2.5"], "problem.depth must be an integer"),
        (["deep-linear", "--set", "problem.eps=-1"], "problem.eps must be positive"),
        (["--set", "problem.eps=-1"], "problem.eps must be positive"),
        (["--set", "problem.loss='hinge'"], "problem.loss must be one of"),
        (["--set", "plot.labels=3"], "plot.labels must be a table"),
        (["--t1", "0"], "solve.t1 must be greater than solve.t0"),
        (["--rtol", "0"], "solve.rtol must be positive"),
        (["--solver", "rk99"], "unknown solver 'rk99'"),
        (["--set", "solve.grid='cubic'"], "solve.grid must be 'log', 'linear' or 'loglinear'"),
        (["--t1", "abc"], "argument --t1: invalid float value"),
        (["missing.toml"], "config file not found"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys, tmp_path):
    out = tmp_path / "run"
    assert _exit_code(argv + ["--out", str(out)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert not out.exists()


def test_malformed_toml_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[solve\nt1 = 3\n")
    assert main([str(bad), "--out", str(tmp_path / "run")]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("gflow: error: malformed config") and err.count("\n") == 1


def test_list_and_show(capsys):
    assert main(["--list"]) == 0
    listed = capsys.readouterr().out
    assert "deep-linear" in listed and "cooccurrence" in listed
    assert "rank-collapse" in listed and "(default)" in listed.split("rank-collapse")[1].splitlines()[0]
    assert main(["deep-linear", "--show", "--set", "problem.eps=0.002"]) == 0
    shown = capsys.readouterr().out
    assert "eps = 0.002" in shown and "[solve]" in shown


def test_run_directory_and_show_round_trip(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(FAST + ["--out", str(out), "--quiet"]) == 0
    for name in ("trajectory.npz", "summary.json", "final.eqx", "config.toml",
                 "figures/loss.png", "figures/singular_values.png"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed"
    for key in ("t0", "t1", "t_final", "solver", "rtol", "atol", "stats", "transitions",
                "predictions", "config", "versions"):
        assert key in summary
    # Saxe's learning times predicted from the initial state hold to a few percent at eps=1e-3.
    for name, p in summary["predictions"].items():
        assert p["rel_error"] < 0.05, (name, p)
    t1, t2 = summary["transitions"]["mode1_learned"], summary["transitions"]["mode2_learned"]
    assert 0 < t1 < t2 < 6

    # The saved config reproduces the run exactly.
    again = tmp_path / "again"
    assert main([str(out / "config.toml"), "--out", str(again), "--quiet"]) == 0
    repeat = json.loads((again / "summary.json").read_text())
    assert repeat["transitions"] == summary["transitions"]
    a = gflow.load(out)
    b = gflow.load(again)
    np.testing.assert_array_equal(a.observables["loss"], b.observables["loss"])


def test_run_that_stops_early_writes_what_it_computed(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(FAST + ["--set", "solve.max_steps=20", "--out", str(out)]) == 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "max_steps"
    assert summary["t_final"] < 6
    traj = gflow.load(out)
    assert len(traj.ts) > 0 and traj.ts[-1] <= summary["t_final"]
    assert "status      max_steps" in capsys.readouterr().out


def test_missing_platform_is_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "gflow.solve", "--platform", "tpu", "--out", str(tmp_path / "r")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "gflow: error: --platform tpu: no tpu is available to JAX here"
    assert not (tmp_path / "r").exists()


def test_python_dash_m_entry_point(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "gflow.solve", "no-such-preset"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("gflow: error: unknown preset")
    assert "RuntimeWarning" not in proc.stderr


def test_default_preset_shows_both_stages_in_order(tmp_path):
    """The main job: condensation, then key-query collapse, as issue 3 specifies."""
    out = tmp_path / "run"
    assert main(["--out", str(out), "--quiet"]) == 0
    traj = gflow.load(out)
    t_cond, t_kq = traj.transitions["condensation"], traj.transitions["kq_collapse"]
    assert 0 < t_cond < t_kq < traj.t1
    i_cond = np.searchsorted(traj.ts, t_cond)
    rel = traj.observables["relative_change"]  # columns: W_Q, W_K, W_V, W1
    # At condensation the outer group has moved, the attention group has not (yet).
    assert rel[i_cond, 0] < 1e-2 and rel[i_cond, 1] < 1e-2
    assert rel[i_cond, 2] > 1.0
    assert traj.observables["value_misalignment"][i_cond] < 1e-2
    # Key-query collapse: stable ranks of W_Q and W_K within 0.05 of 1 by the end.
    assert np.all(np.abs(traj.observables["stable_rank"][-1, :2] - 1.0) < 0.05)
    assert traj.predictions["escape_time"]["holds"]
    assert traj.predictions["W_Q_direction_cosine"]["measured"] > 0.9
