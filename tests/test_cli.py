"""The command line, driven through `gflow._cli.main` and once as a real subprocess."""

import json
import os
import signal
import subprocess
import sys
import tomllib

import numpy as np
import pytest
from conftest import REDUCED_PRESETS

import gflow
# Private: the in-process command line, exactly what the console script `gflow-solve` runs,
# and its exit status for bad input (2, as docs/cli.md says).
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
        (["rank-collapse-binary", "--set", "problem.eps=abc"], "problem.eps must be a number"),
        (["deep-linear", "--set", "problem.depth=2.5"], "problem.depth must be an integer"),
        (["deep-linear", "--set", "problem.eps=-1"], "problem.eps must be positive"),
        (["--set", "problem.eps=-1"], "problem.eps must be positive"),
        (["rank-collapse-binary", "--set", "problem.loss='hinge'"], "problem.loss must be one of"),
        (["--set", "plot.labels=3"], "plot.labels must be a table"),
        (["--t1", "0"], "solve.t1 must be greater than solve.t0"),
        (["--rtol", "0"], "solve.rtol must be positive"),
        (["--solver", "rk99"], "unknown solver 'rk99'"),
        (["--set", "solve.grid='cubic'"], "solve.grid must be 'log', 'linear' or 'loglinear'"),
        (["--t1", "abc"], "argument --t1: invalid float value"),
        (["missing.toml"], "config file not found"),
        (["--set", "solve.checkpoint_steps=-1"], "solve.checkpoint_steps must be >= 0"),
        (["--set", "solve.pcoeff=2"], "solve.pcoeff must be in [0, 1]"),
        (["--set", "solve.icoeff=0"], "solve.icoeff must be in (0, 1]"),
        (["--resume", "no-such-run"], "--resume no-such-run: not a gflow run directory"),
        (["deep-linear", "--set", "solve.snapshot_points=3"], "takes no snapshots"),
        (["--set", "solve.snapshot_points=-1"], "solve.snapshot_points must be between 0 and"),
        (["--set", "solve.snapshot_grid='cubic'"], "solve.snapshot_grid must be 'log' or"),
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
    assert max(map(len, listed.splitlines())) <= 100  # descriptions wrap in their column
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


def test_binary_preset_shows_both_stages_in_order(tmp_path):
    """The theorems' setting: condensation, then key-query collapse, as issue 3 specifies."""
    out = tmp_path / "run"
    assert main(["rank-collapse-binary", "--out", str(out), "--quiet"]) == 0
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
    assert traj.predictions["escape_time"].holds
    assert traj.predictions["W_Q_direction_cosine"].measured > 0.9
    # The escape (the loss halves) is located last: in the burst that ends stage 2.
    assert list(traj.transitions) == ["condensation", "stage2_onset", "kq_collapse", "escape"]
    t_escape = traj.transitions["escape"]
    assert t_kq < t_escape < traj.t1
    loss = np.asarray(traj.observables["loss"])
    assert traj.ts[0] == traj.t0
    half = 0.5 * loss[0]
    # At the located state the loss is L(0)/2 to within the solver's relative tolerance (the
    # root finder stops at 1e-3 rtol in time, far below it).
    assert abs(float(traj.at_transitions["escape"]["loss"]) - half) < traj.rtol * half
    # ... and between the two save times whose losses straddle L(0)/2.
    i = int(np.searchsorted(traj.ts, t_escape))
    assert loss[i - 1] > half > loss[i] and traj.ts[i - 1] < t_escape <= traj.ts[i]
    # The bound compares the located time, with the transition's certified error (of the
    # order of the other transitions': the plateau amplifies the solver's error above rtol).
    escape = traj.predictions["escape_time"]
    assert escape.measured == t_escape and escape.relation == "<="
    assert escape.error == traj.errors["transitions"]["escape"]
    assert 0 < escape.error < 100 * traj.rtol * t_escape


# ---------------------------------------------------------------------------------------------
# Interrupt and resume, atomic writes: real SIGKILLs of a real process, at chosen points.

# The driver reaches private names: `gflow._cli.main`, exactly what the console script
# `gflow-solve` runs, and the checkpoint writer `gflow._solve.write_checkpoint`, wrapped to
# kill the process at a chosen checkpoint.
_DRIVER = """
import os, signal, sys
import gflow._solve
from gflow._cli import main

def kill():
    os.kill(os.getpid(), signal.SIGKILL)

after = int(os.environ.get("KILL_AFTER_CHECKPOINTS", "0"))
if after:  # killed right after the n-th checkpoint is written
    write, count = gflow._solve.write_checkpoint, [0]
    def write_then_kill(*args):
        write(*args)
        count[0] += 1
        if count[0] == after:
            kill()
    gflow._solve.write_checkpoint = write_then_kill

target = os.environ.get("KILL_WRITING")
if target:  # killed while writing `target`: its bytes are out, the rename not yet done
    fsync = os.fsync
    def fsync_or_kill(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith("." + target):
            kill()
        fsync(fd)
    os.fsync = fsync_or_kill

sys.exit(main(sys.argv[1:]))
"""

CHECKPOINTED = FAST + ["--set", "solve.checkpoint_steps=5", "--quiet"]


def _killed_run(tmp_path, out, **env) -> None:
    """Run the CLI in a subprocess that SIGKILLs itself at the point `env` names."""
    proc = subprocess.run(
        [sys.executable, "-c", _DRIVER] + CHECKPOINTED + ["--out", str(out)],
        capture_output=True, text=True, timeout=300,
        env=os.environ | {"GFLOW_CACHE_DIR": str(tmp_path.parent / "jax-cache")} | env,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def _assert_same_run_directory(a, b):
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert sa["status"] == sb["status"] == "completed"
    assert sa["transitions"] == sb["transitions"] and sa["t_final"] == sb["t_final"]
    counts = lambda s: {k: v for k, v in s["stats"].items() if not k.endswith("seconds")}
    assert counts(sa) == counts(sb)
    with np.load(a / "trajectory.npz") as x, np.load(b / "trajectory.npz") as y:
        assert x.files == y.files
        for name in x.files:
            np.testing.assert_array_equal(x[name], y[name])
    assert (a / "final.eqx").read_bytes() == (b / "final.eqx").read_bytes()
    assert (a / "config.toml").read_text() == (b / "config.toml").read_text()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "whole"
    assert main(CHECKPOINTED + ["--out", str(out)]) == 0
    assert not list(out.glob("checkpoint-*"))  # removed once the results are written
    return out


def test_killed_run_resumes_to_the_same_result(uninterrupted, tmp_path):
    out = tmp_path / "cut"
    _killed_run(tmp_path, out, KILL_AFTER_CHECKPOINTS="4")
    assert (out / "config.toml").is_file() and (out / "checkpoint-first.eqx").is_file()
    assert not (out / "summary.json").exists()
    assert main(["--resume", str(out), "--quiet"]) == 0
    _assert_same_run_directory(uninterrupted, out)
    assert not list(out.glob("checkpoint-*"))
    # A finished run has nothing left to resume.
    assert main(["--resume", str(out)]) == EXIT_BAD_INPUT


# A checkpoint and a result file (every final file goes through the same atomic write).
@pytest.mark.parametrize("target", ["checkpoint-first.eqx", "summary.json"])
def test_a_kill_while_writing_leaves_no_partial_file(uninterrupted, tmp_path, target):
    out = tmp_path / "cut"
    _killed_run(tmp_path, out, KILL_WRITING=target)
    assert not (out / target).exists()
    assert list(out.glob(f".{target}.*.tmp"))  # the unfinished write, under a temporary name
    # Every file under a final name is complete.
    tomllib.loads((out / "config.toml").read_text())
    if (out / "trajectory.npz").exists():
        np.load(out / "trajectory.npz")["t"]
    assert main(["--resume", str(out), "--quiet"]) == 0
    _assert_same_run_directory(uninterrupted, out)
    assert not list(out.glob(".*.tmp"))


@pytest.mark.parametrize(
    "extra, message",
    [(["deep-linear"], "drop CONFIG"), (["--set", "solve.t1=3"], "drop the overrides"),
     (["--x32"], "drop the overrides"), (["--out", "elsewhere"], "drop --out")],
)
def test_resume_takes_everything_from_the_run_directory(tmp_path, capsys, extra, message):
    (tmp_path / "config.toml").write_text("")
    assert main(["--resume", str(tmp_path)] + extra) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith(f"gflow: error: --resume continues {tmp_path} with its own config")
    assert message in err and err.count("\n") == 1


def test_x32_runs_in_float32_and_refuses_tolerances_below_its_floor(tmp_path, capsys):
    out32 = tmp_path / "x32"
    assert main(FAST + ["--x32", "--rtol", "1e-5", "--out", str(out32), "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    s32 = json.loads((out32 / "summary.json").read_text())
    assert s32["stats"]["dtype"] == "float32"
    assert "x32 = true" in (out32 / "config.toml").read_text()
    assert s32["stats"]["precision"] == "float32"
    # float32 casts float64's init; Saxe's prediction from it holds as in float64 (the
    # float32 solve itself is checked against float64 in test_solve and test_precision).
    for name, p in s32["predictions"].items():
        assert p["rel_error"] < 0.05, (name, p)
    # Tolerances below float32's measured floor: refused in one line, nothing written.
    tight = tmp_path / "tight"
    assert main(FAST + ["--x32", "--out", str(tight)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("gflow: error: rtol=1e-08 is below precision float32's floor")
    assert err.count("\n") == 1 and not tight.exists()


_SUMMARY_KEYS = ("status", "t0", "t1", "t_final", "solver", "rtol", "atol", "stats",
                 "transitions", "predictions", "config", "versions")


# The text preset's process compiles longest (a two-layer residual Transformer): it runs in
# the slow set, and its model's flow in tests/test_text.py by default. The anchor preset's
# process runs in the slow set too (its flow and predictions in tests/test_anchor.py): the
# command line is the same code for every preset, and the default suite runs it on four.
@pytest.mark.parametrize("selected", [("cooccurrence",),
                                      pytest.param(("anchor",), marks=pytest.mark.slow),
                                      pytest.param(("text",), marks=pytest.mark.slow)])
def test_every_other_preset_end_to_end(tmp_path, selected):
    """deep-linear and rank-collapse run above; the others here, as concurrent processes
    (compilation dominates and is mostly single-threaded). Only cooccurrence certifies (the
    default, tested here and by the binary preset's run above): a certified run compiles a
    second solve; certifying is the same code for every preset, and the others would add
    about 25 s of CPU."""
    from gflow import presets

    certified = {"cooccurrence"}
    reduced = {name: REDUCED_PRESETS[name] for name in selected}

    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "gflow.solve", name,
             *(arg for o in overrides for arg in ("--set", o)),
             "--out", str(tmp_path / name), "--quiet",
             *(() if name in certified else ("--no-certify",))],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            # A cache each: processes sharing one can read an entry another is still writing
            # (JAX warns "incomplete or truncated stream"); they compile different programs.
            env=os.environ | {"GFLOW_CACHE_DIR": str(tmp_path / f"jax-cache-{name}")},
        )
        for name, overrides in reduced.items()
    }
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, (name, err)
        assert err == "", (name, err)
    for name, overrides in reduced.items():
        out = tmp_path / name
        for file in ("config.toml", "summary.json", "trajectory.npz", "final.eqx",
                     "figures/loss.png"):
            assert (out / file).is_file(), (name, file)
        summary = json.loads((out / "summary.json").read_text())
        assert all(key in summary for key in _SUMMARY_KEYS), name
        assert summary["status"] == "completed" and summary["t_final"] == summary["t1"]
        # config.toml is the exact resolved config, and reading it back resolves the same.
        config = tomllib.loads((out / "config.toml").read_text())
        assert config == summary["config"] == presets.resolve(str(out / "config.toml")).config
        # The command line certifies by default, and says so in the config it writes.
        certify = "true" if name in certified else "false"
        resolved = presets.resolve(name, overrides + [f"solve.certify={certify}"])
        assert config == resolved.config
        problem = presets.build(resolved)
        assert set(summary["transitions"]) == {tr.name for tr in problem.transitions}
        # The recorded loss starts at the initial loss and decreases along the flow.
        loss = gflow.load(out).observables["loss"]
        initial = float(problem.flow.loss(problem.flow.model, problem.flow.data))
        assert abs(loss[0] - initial) <= 1e-12 * abs(initial), name
        assert np.all(np.diff(loss) <= 1e-9 * abs(initial)), name
