"""Never lose a user's file or a result (issue 33): owned run directories, sweeps as safe as
solves, damaged files refused in one line, and a full disk at every write.

Command lines run in this process through `gflow._cli.main` / `gflow._sweep_cli.main` /
`gflow.plot.main` (what the console scripts run); a few cases that need a real process (a
closed pipe, /dev/full) run as one.
"""

import errno
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import pytest

import gflow
from conftest import call_entry, tree_digest
# Private: the in-process command lines and their exit statuses (see the module docstring),
# and the one function through which gflow writes a file, which the disk-full tests make fail.
from gflow import _rundir
from gflow._cli import EXIT_BAD_INPUT, EXIT_ENVIRONMENT, main
from gflow._sweep_cli import main as sweep_main
from gflow.plot import main as plot_main

# A tiny deep-linear run (one mode, width 2): seconds once compiled, one transition.
TINY = ["deep-linear", "--set", "problem.width=2", "--set", "problem.singular_values=[1.5]",
        "--set", "solve.save_points=12", "--t1", "6", "--no-certify", "--quiet"]
SWEEP = ["deep-linear", "--set", "problem.width=2", "--set", "problem.singular_values=[1.5]",
         "--t1", "9", "--over", "eps=1e-2,1e-3,1e-4", "--quiet"]


def _one_line(err: str, message: str = "", prefix: str = "gflow: error: ") -> None:
    assert "Traceback" not in err, err
    assert err.count("\n") == 1 and err.startswith(prefix), err
    assert message in err, err


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(TINY + ["--out", str(out)]) == 0
    return out


def _user_folder(path: Path) -> Path:
    """A user's folder holding names a run writes (and no gflow manifest)."""
    (path / "figures").mkdir(parents=True)
    (path / "figures" / "paper_fig1.png").write_bytes(b"the user's figure")
    (path / "summary.json").write_text('{"mine": true}')
    (path / "final.eqx").write_bytes(b"the user's model")
    (path / ".draft.tmp").write_text("a draft")
    return path


# --------------------------------------------------------------------------------------------
# The table: command lines that must be refused in one line, exit 2, changing nothing


def _cases(tmp_path: Path, finished: Path) -> list[tuple[str, object, list[str], str, Path]]:
    """(name, entry, argv, message, directory that must stay byte-for-byte as it was)."""
    user = _user_folder(tmp_path / "user")
    saved = tmp_path / "saved"  # a library save: results without a config
    gflow.solve(gflow.GradientFlow(jnp.ones(2), lambda m, d: jnp.sum(m**2), None), 0.1,
                ts=np.linspace(0, 0.1, 3)).save(saved)
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    deep = tmp_path / "deep.toml"
    deep.write_text("[preset]\nname = 'x'\n[problem]\nkind = 'deep-linear'\nx = "
                    + "[" * 3000 + "]" * 3000 + "\n")
    inline = tmp_path / "inline.toml"
    inline.write_text("a = " + "{b = " * 3000 + "1" + "}" * 3000 + "\n")
    for name, text in (("slash", "runs/../../x"), ("abs", "/tmp/elsewhere/run"), ("dots", "..")):
        (tmp_path / f"{name}.toml").write_text(
            (Path(gflow.presets.__file__).parent / "deep-linear.toml").read_text()
            .replace('name = "deep-linear"', f'name = "{text}"'))
    return [
        ("user folder", main, TINY + ["--out", str(user)], "holding other files",
         user),
        ("user folder, --overwrite", main, TINY + ["--out", str(user), "--overwrite"],
         "--overwrite replaces only a gflow run's own files", user),
        ("finished run", main, TINY + ["--out", str(run)], "already holds a run", run),
        ("a library save", main, TINY + ["--out", str(saved)],
         "holds files of an earlier gflow write", saved),
        ("sweep into a user folder", sweep_main, SWEEP + ["--out", str(user)],
         "holding other files", user),
        ("sweep into a run", sweep_main, SWEEP + ["--out", str(run), "--overwrite"],
         "holds a gflow run, not a sweep", run),
        ("TOML 3000 deep", main, [str(deep), "--out", str(tmp_path / "n1")],
         "nested deeper than 32 levels", tmp_path / "n1"),
        ("inline tables 3000 deep", main, [str(inline), "--out", str(tmp_path / "n2")],
         "nested deeper than 32 levels", tmp_path / "n2"),
        ("--set 3000 deep", main, TINY + ["--set", "problem.eps=" + "[" * 3000 + "]" * 3000,
                                          "--out", str(tmp_path / "n3")],
         "nested deeper than 32 levels", tmp_path / "n3"),
        ("preset name with ..", main, [str(tmp_path / "slash.toml")],
         "preset.name must be a plain name", tmp_path / "runs"),
        ("preset name absolute", sweep_main, [str(tmp_path / "abs.toml"), "--over",
                                              "eps=1e-2,1e-3"],
         "preset.name must be a plain name", Path("/tmp/elsewhere")),
        ("preset name ..", main, [str(tmp_path / "dots.toml")],
         "preset.name must be a plain name", tmp_path / "runs"),
        ("--out with a newline", main, TINY + ["--out", str(tmp_path / "a\nb")],
         "contains a control character", tmp_path / "a\nb"),
        ("--resume with --no-figures", main, ["--resume", str(run), "--no-figures"],
         "drop --no-figures", run),
        ("--resume with --critical-points", main, ["--resume", str(run), "--critical-points"],
         "drop --critical-points", run),
        ("--resume with --list", main, ["--resume", str(run), "--list"], "drop --list", run),
        ("--resume with --sensitivity", main, ["--resume", str(run), "--sensitivity", "eps"],
         "drop --sensitivity", run),
        ("--resume of a finished run", main, ["--resume", str(run)],
         "the run has finished; redraw its figures with python -m gflow.plot", run),
    ]


def test_refusals_are_one_line_exit_2_and_touch_nothing(finished, tmp_path, capsys,
                                                        monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, entry, argv, message, keep in _cases(tmp_path, finished):
        before = tree_digest(keep)
        assert call_entry(entry, argv) == EXIT_BAD_INPUT, name
        _one_line(capsys.readouterr().err, message)
        assert tree_digest(keep) == before, name
        if keep.is_dir():
            assert not (keep / _rundir.LOCK_FILE).exists(), name
    assert not (tmp_path / "runs").exists()


def test_overwrite_replaces_the_old_runs_files_only(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    notes = out / "figures" / "my_notes.md"
    notes.write_text("my notes")
    (out / "mine.txt").write_text("mine")
    old_figure = out / "figures" / "loss.png"
    old_figure.write_bytes(b"an old figure of the old run")
    assert main(TINY + ["--t1", "5", "--out", str(out), "--overwrite"]) == 0
    assert notes.read_text() == "my notes" and (out / "mine.txt").read_text() == "mine"
    assert old_figure.read_bytes() != b"an old figure of the old run"
    assert json.loads((out / "summary.json").read_text())["t1"] == 5.0
    assert not (out / _rundir.LOCK_FILE).exists()  # a finished run keeps no lock


def test_default_names_never_collide(tmp_path, monkeypatch):
    """Two runs started in the same second get two directories. (Private `claim_default`:
    the command line's own way to name and make its directory, called twice at one stamp.)"""
    monkeypatch.setattr(_rundir.time, "strftime", lambda *_: "20260101-000000")
    a = _rundir.claim_default(tmp_path / "runs", "deep-linear", kind="run")
    b = _rundir.claim_default(tmp_path / "runs", "deep-linear", kind="run")
    assert a.directory != b.directory and a.directory.is_dir() and b.directory.is_dir()
    assert b.directory.name == "deep-linear-20260101-000000-2"
    a.release(), b.release()


def test_sweep_overwrite_and_sweep_save_remove_only_their_stale_files(tmp_path):
    out = tmp_path / "sweep"
    assert sweep_main(SWEEP + ["--out", str(out)]) == 0
    figure = out / "figures" / "mode1_learned_vs_eps.png"
    assert figure.is_file() and not (out / _rundir.LOCK_FILE).exists()
    (out / "figures" / "mine.png").write_bytes(b"mine")
    assert sweep_main(SWEEP + ["--out", str(out)]) == EXIT_BAD_INPUT  # no --overwrite
    # Two values only: no fit, so the old fit's figure is stale and goes; the user's stays.
    argv = [a if a != "eps=1e-2,1e-3,1e-4" else "eps=1e-2,1e-3" for a in SWEEP]
    assert sweep_main(argv + ["--out", str(out), "--overwrite"]) == 0
    assert not figure.exists() and (out / "figures" / "mine.png").read_bytes() == b"mine"
    assert len(json.loads((out / "sweep.json").read_text())["members"]) == 2
    # The library's Sweep.save, twice into one folder: the second save's fits only.
    import gflow.presets as presets

    def make(eps):
        return presets.build(presets.resolve("deep-linear", [
            "problem.width=2", "problem.singular_values=[1.5]", f"problem.eps={eps}"]))

    sweep = gflow.sweep(make, {"eps": [1e-2, 1e-3, 1e-4]}, 9.0)
    lib = tmp_path / "lib"
    sweep.save(lib, fits=[sweep.fit("mode1_learned", law="log")])
    assert (lib / "figures" / "mode1_learned_vs_eps.png").is_file()
    sweep.save(lib)
    assert not (lib / "figures" / "mode1_learned_vs_eps.png").exists()


# --------------------------------------------------------------------------------------------
# Damaged run directories: gflow.plot and gflow.load refuse them in one line


def _damage(run: Path, how: str) -> None:
    summary = run / "summary.json"
    data = json.loads(summary.read_text())
    if how == "summary garbage":
        summary.write_bytes(b"\xff\xfe garbage")
    elif how == "summary empty":
        summary.write_text("")
    elif how == "summary a list":
        summary.write_text("[1, 2]")
    elif how in ("no transitions", "no t0"):
        data.pop(how.split()[1])
        summary.write_text(json.dumps(data))
    elif how == "bad [plot]":
        data["config"]["plot"] = {"time_axis": "cubic"}
        summary.write_text(json.dumps(data))
    elif how == "bad plot.formats":
        data["config"]["plot"] = {"formats": ["gif"]}
        summary.write_text(json.dumps(data))
    elif how == "trajectory truncated":
        blob = (run / "trajectory.npz").read_bytes()
        (run / "trajectory.npz").write_bytes(blob[: len(blob) // 2])
    elif how == "trajectory empty":
        (run / "trajectory.npz").write_bytes(b"")
    elif how == "trajectory without t":
        with np.load(run / "trajectory.npz") as npz:
            arrays = {k: npz[k] for k in npz.files if k != "t"}
        np.savez(run / "trajectory.npz", **arrays)
    elif how == "trajectory ragged":
        with np.load(run / "trajectory.npz") as npz:
            arrays = {k: npz[k] for k in npz.files}
        arrays["loss"] = arrays["loss"][:-3]
        np.savez(run / "trajectory.npz", **arrays)
    elif how == "transitions truncated":
        blob = (run / "transitions.npz").read_bytes()
        (run / "transitions.npz").write_bytes(blob[:100])
    elif how == "figures a file":
        shutil.rmtree(run / "figures")
        (run / "figures").write_text("not a folder")
    else:
        raise AssertionError(how)


DAMAGES = ["summary garbage", "summary empty", "summary a list", "no transitions", "no t0",
           "bad [plot]", "bad plot.formats", "trajectory truncated", "trajectory empty",
           "trajectory without t", "trajectory ragged", "transitions truncated",
           "figures a file"]


def test_plot_and_load_refuse_damaged_runs_in_one_line(finished, tmp_path, capsys):
    for how in DAMAGES:
        run = tmp_path / how.replace(" ", "_").replace("[", "").replace("]", "")
        shutil.copytree(finished, run)
        _damage(run, how)
        before = tree_digest(run)
        assert plot_main([str(run)]) == 2, how
        _one_line(capsys.readouterr().err, "", prefix="gflow.plot: error: ")
        assert tree_digest(run) == before, how
        if how not in ("bad [plot]", "bad plot.formats", "figures a file"):
            with pytest.raises(gflow.InputError):
                gflow.load(run)


def test_plot_argument_errors_are_one_line(finished, capsys):
    assert plot_main([str(finished), "--bogus"]) == 2
    _one_line(capsys.readouterr().err, "unrecognized arguments", prefix="gflow.plot: error: ")


def test_load_like_of_another_structure_is_refused(tmp_path):
    class Two(eqx.Module):
        a: jnp.ndarray
        b: jnp.ndarray

    model = Two(jnp.ones(3), jnp.ones(4))
    flow = gflow.GradientFlow(model, lambda m, d: jnp.sum(m.a**2) + jnp.sum(m.b**2), None)
    traj = gflow.solve(flow, 0.1, ts=np.linspace(0, 0.1, 4))
    traj.save(tmp_path)
    assert gflow.load(tmp_path, like=model).final.b.shape == (4,)
    for like, message in [(jnp.ones(3), "holds more than"),
                          (Two(jnp.ones(5), jnp.ones(4)), "does not match"),
                          (Two(jnp.ones(3, dtype=jnp.int32), jnp.ones(4)), "does not match")]:
        with pytest.raises(gflow.InputError, match=message):
            gflow.load(tmp_path, like=like)
    with pytest.raises(gflow.InputError, match="not a directory"):
        traj.save(tmp_path / "summary.json")


def test_names_round_trip_and_never_collide(tmp_path):
    flow = gflow.GradientFlow(jnp.ones(2), lambda m, d: jnp.sum(m**2), None)
    observers = {"a/b": lambda m, d: m[0], "a": {"b": lambda m, d: m[1] * 2}, "x%y": lambda m, d: m[0]}
    traj = gflow.solve(flow, 0.1, ts=np.linspace(0, 0.1, 3),
                       observers={"a/b": observers["a/b"], "x%y": observers["x%y"],
                                  "a": lambda m, d: {"b": m[1] * 2}})
    traj.save(tmp_path)
    back = gflow.load(tmp_path)
    assert set(back.observables) == {"a/b", "a", "x%y", "loss"}
    np.testing.assert_array_equal(back.observables["a/b"], traj.observables["a/b"])
    np.testing.assert_array_equal(back.observables["a"]["b"], traj.observables["a"]["b"])


def test_save_removes_its_own_stale_transitions_file(finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    assert (run / "transitions.npz").is_file()
    traj = gflow.load(run)
    (run / "mine.npz").write_bytes(b"mine")
    plain = gflow.solve(gflow.GradientFlow(jnp.ones(2), lambda m, d: jnp.sum(m**2), None), 0.1,
                        ts=np.linspace(0, 0.1, 3))
    plain.save(run)  # reaches no transition
    assert not (run / "transitions.npz").exists() and (run / "mine.npz").read_bytes() == b"mine"
    assert gflow.load(run).at_transitions == {} and traj.at_transitions


# --------------------------------------------------------------------------------------------
# Library messages


def test_wrong_signatures_are_one_line_and_a_single_transition_is_accepted(tmp_path):
    flow = gflow.GradientFlow(jnp.ones(2), lambda m, d: jnp.sum(m**2), None)
    with pytest.raises(gflow.InputError, match=r"observer 'n' .* must be callable as \(model, "
                                               r"data\)"):
        gflow.solve(flow, 1.0, observers={"n": lambda m: jnp.sum(m)})
    with pytest.raises(gflow.InputError, match=r"loss .* must be callable as \(model, data\)"):
        gflow.solve(gflow.GradientFlow(jnp.ones(2), lambda m: jnp.sum(m**2), None), 1.0)
    # A single Transition is accepted as the list of it: the loss 2 exp(-4t) halves at ln 2 / 4.
    one = gflow.Transition("half", lambda m, d: jnp.sum(m**2) - 1.0)
    traj = gflow.solve(flow, 1.0, transitions=one, rtol=1e-8)
    assert traj.transitions["half"] == pytest.approx(np.log(2) / 4, rel=1e-6)
    with pytest.raises(gflow.InputError, match="at most 200"):
        gflow.solve(flow, 1.0, observers={"x" * 300: lambda m, d: m[0]})
    (Path(tmp_path) / "afile").write_text("a file")
    with pytest.raises(gflow.InputError, match="is a file, not a directory"):
        gflow.solve(flow, 1.0, checkpoint=tmp_path / "afile" / "c.eqx")
    for ts in ("abc", np.array([0.1, 0.5]) + 1j):
        with pytest.raises(gflow.InputError, match="ts must be a 1-d array of real save times"):
            gflow.solve(flow, 1.0, ts=ts)
    traj = gflow.solve(flow, 1.0, rtol=np.float32(1e-6))
    assert traj.completed and traj.rtol == pytest.approx(1e-6)


def test_a_nonfinite_initial_state_is_named_as_such():
    # Not "the state diverged near t=1e-12 (finite-time blow-up?)": the init itself is bad.
    nan_loss = gflow.GradientFlow(jnp.ones(2), lambda m, d: jnp.sum(m**2) * jnp.nan, None)
    traj = gflow.solve(nan_loss, 1.0)
    assert traj.status == "nonfinite"
    assert traj.message == "the loss is nan at the initial state (t0=0)"
    kink = gflow.GradientFlow(jnp.ones(2), lambda m, d: jnp.sum(jnp.sqrt(jnp.abs(m - 1.0))), None)
    traj = gflow.solve(kink, 1.0, max_steps=50)
    assert not traj.completed
    assert traj.message.startswith("the gradient is not finite at the initial state (t0=0")
    # A flow that is finite at its init keeps the engine's own message.
    blow_up = gflow.GradientFlow(jnp.ones(1), lambda m, d: -jnp.sum(m**3) / 3, None)
    traj = gflow.solve(blow_up, 2.0)  # dm/dt = m², m = 1/(1 - t): blows up at t = 1
    assert traj.status in ("nonfinite", "dt_min") and "initial state" not in traj.message
    assert traj.t_final == pytest.approx(1.0, abs=1e-3)


# --------------------------------------------------------------------------------------------
# Operating-system failures: one line


def test_closed_pipe_and_full_device_are_one_line(tmp_path):
    code = "import sys; from gflow._cli import main; sys.exit(main())"
    for command in ("--list | head -c 10", "deep-linear --show | true"):
        pipe = subprocess.run(f"{sys.executable} -c '{code}' {command}", shell=True,
                              capture_output=True, text=True, timeout=120)
        assert "Traceback" not in pipe.stderr and pipe.stderr.count("\n") <= 1, pipe.stderr
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-c", code, "--list"], stdout=full,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    assert proc.returncode == EXIT_ENVIRONMENT
    _one_line(proc.stderr, "No space left on device")


# --------------------------------------------------------------------------------------------
# A full disk at each write: nothing computed is lost


class _FullDisk:
    """`_rundir`'s writes (atomic files, appended logs), the `fail_at`-th of them raising
    ENOSPC; `names` records what each write was for."""

    def __init__(self, monkeypatch, fail_at: int | None):
        self.count, self.fail_at, self.names = 0, fail_at, []
        write, append = _rundir._write_atomically, _rundir.append_line

        def check(path):
            self.count += 1
            self.names.append(Path(path).name)
            if self.count == self.fail_at:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

        def failing_write(path, data):
            check(path)
            return write(path, data)

        def failing_append(path, text, at=0):
            check(path)
            return append(path, text, at)

        monkeypatch.setattr(_rundir, "_write_atomically", failing_write)
        monkeypatch.setattr(_rundir, "append_line", failing_append)


def test_a_full_disk_at_any_write_of_a_solve_loses_nothing(finished, tmp_path, capsys,
                                                          monkeypatch):
    """ENOSPC at the k-th write, for every k: one line, exit 1; then --resume (or, before the
    config was written, nothing left) gives the uninterrupted run's results and figures."""
    with monkeypatch.context() as m:
        clean = _FullDisk(m, None)
        assert main(TINY + ["--out", str(tmp_path / "clean")]) == 0
    capsys.readouterr()
    assert clean.count >= 10, clean.names
    reference = tree_digest(finished)
    for k in range(1, clean.count + 1):
        out = tmp_path / f"k{k}"
        with monkeypatch.context() as m:
            _FullDisk(m, k)
            assert main(TINY + ["--out", str(out)]) == EXIT_ENVIRONMENT, (k, clean.names[k - 1])
        err = capsys.readouterr().err
        _one_line(err, "No space left on device")
        if "--resume" not in err:
            assert not out.exists() or tree_digest(out) == {}, (k, err)
            continue
        assert main(["--resume", str(out), "--quiet"]) == 0, (k, capsys.readouterr().err)
        done = tree_digest(out)
        for name in ("final.eqx", "trajectory.npz", "transitions.npz"):
            assert done[name] == reference[name], (k, name)
        assert {n for n in done if n.startswith("figures/")} == {
            n for n in reference if n.startswith("figures/")}, k
        assert "timings.json" in done and not list(out.glob("checkpoint-*")), k
        assert not (out / _rundir.LOCK_FILE).exists(), k


def test_a_full_disk_at_any_write_of_a_sweep_keeps_every_member(tmp_path, capsys,
                                                               monkeypatch):
    with monkeypatch.context() as m:
        clean = _FullDisk(m, None)
        assert sweep_main(SWEEP + ["--out", str(tmp_path / "clean")]) == 0
    expected = json.loads((tmp_path / "clean" / "sweep.json").read_text())["members"]
    capsys.readouterr()
    for k in range(1, clean.count + 1):
        out = tmp_path / f"k{k}"
        with monkeypatch.context() as m:
            _FullDisk(m, k)
            code = sweep_main(SWEEP + ["--out", str(out)])
        err = capsys.readouterr().err
        if k == 1:  # the directory could not even be claimed: nothing was computed
            assert code == EXIT_ENVIRONMENT and not out.exists()
            continue
        kept = []
        if (out / "sweep.json").is_file():
            kept = json.loads((out / "sweep.json").read_text())["members"]
        elif (out / "members.jsonl").is_file():
            kept = [json.loads(line) for line in (out / "members.jsonl").read_text().splitlines()]
            kept = [{k2: v for k2, v in m.items() if k2 != "index"} for m in kept]
        assert [m["transitions"] for m in kept] == [m["transitions"] for m in expected], (k, err)
        if code != 0:
            assert code == EXIT_ENVIRONMENT
            _one_line(err, "No space left on device")


def test_library_save_on_a_full_disk_says_the_result_is_intact(tmp_path, monkeypatch):
    flow = gflow.GradientFlow(jnp.ones(2), lambda m, d: jnp.sum(m**2), None)
    traj = gflow.solve(flow, 0.1, ts=np.linspace(0, 0.1, 3))
    with monkeypatch.context() as m:
        _FullDisk(m, 2)
        with pytest.raises(OSError) as info:
            traj.save(tmp_path / "a")
    traj.save(tmp_path / "a")  # the Trajectory is intact: saved once there is room
    assert gflow.load(tmp_path / "a").ts.shape == (3,)
    assert zipfile.is_zipfile(tmp_path / "a" / "trajectory.npz")
    assert info.value.errno == errno.ENOSPC


# --------------------------------------------------------------------------------------------
# Configs written by tomli-w, commented by --show; sweep observers per member


def test_show_is_valid_commented_toml_for_any_string(tmp_path, capsys):
    import tomllib

    text = (Path(gflow.presets.__file__).parent / "deep-linear.toml").read_text()
    text = text.replace('description = "', 'description = "two\\nlines \\u0001 \\"quoted\\" ')
    path = tmp_path / "c.toml"
    path.write_text(text)
    assert main([str(path), "--show", "--set", "plot.labels={\"a.b\" = [\"x\"]}"]) == \
        EXIT_BAD_INPUT  # no observable a.b: the dotted key is one name, not a table
    capsys.readouterr()
    assert main([str(path), "--show"]) == 0
    shown = capsys.readouterr().out
    back = tomllib.loads(shown)
    assert back["preset"]["description"].startswith("two\nlines \x01 \"quoted\" ")
    assert back["problem"] == tomllib.loads(text)["problem"]
    lines = shown.splitlines()
    eps = lines.index("eps = 0.001")
    assert lines[eps - 1].startswith("# the init scale of every weight")
    assert any(line.startswith("# ") and "relative tolerance" in line for line in lines)


def test_sweep_observers_holding_one_members_init_are_refused_and_the_right_way_works():
    from types import SimpleNamespace

    def make(eps):
        return gflow.GradientFlow(eps * jnp.ones(3), lambda m, d: jnp.sum(m**2), None)

    change = gflow.observers.relative_change(lambda m: m, make(1e-3).model)
    with pytest.raises(gflow.InputError, match="build it in make_flow"):
        gflow.sweep(make, {"eps": [1e-2, 1e-3]}, 1.0, observers={"change": change})

    def make_own(eps):
        flow = make(eps)
        return SimpleNamespace(flow=flow, observers={
            "change": gflow.observers.relative_change(lambda m: m, flow.model)})

    sweep = gflow.sweep(make_own, {"eps": [1e-2, 1e-3]}, 1.0, rtol=1e-10)
    # dθ/dt = -2θ: θ(1) = θ0 e^-2, so the relative change is 1 - e^-2 for every member.
    for member in sweep:
        assert float(member.final["change"]) == pytest.approx(1 - np.exp(-2.0), rel=1e-7)


def test_a_failing_sweep_member_warns_in_one_line(tmp_path, capsys):
    argv = SWEEP + ["--set", "solve.max_steps=3", "--out", str(tmp_path / "sweep")]
    assert sweep_main(argv) == 3  # EXIT_RUN_FAILED: the files are written all the same
    err = capsys.readouterr().err
    assert "Traceback" not in err and "warnings.warn" not in err, err
    assert all(line.startswith("gflow: ") for line in err.splitlines()), err
    assert (tmp_path / "sweep" / "sweep.json").is_file()


def test_a_refused_resume_leaves_no_lock_no_manifest_and_no_cache_entry(tmp_path):
    """A checkpoint of another problem (the config edited after the run started) is refused
    in one line; the directory stays byte for byte as it was (no lock, no manifest), and the
    compilation cache (a fresh one, in a real process) holds no entry of the refused run."""
    from gflow import presets
    from gflow._config import dumps_toml

    out = tmp_path / "run"
    overrides = ["problem.width=2", "problem.singular_values=[1.5]", "solve.save_points=12",
                 "solve.t1=6"]
    presets.run(presets.resolve("deep-linear", overrides), checkpoint_dir=out)
    edited = presets.resolve("deep-linear", overrides + ["problem.eps=0.002"])
    (out / "config.toml").write_text(dumps_toml(edited.config))
    before, cache = tree_digest(out), tmp_path / "cache"
    proc = subprocess.run([sys.executable, "-m", "gflow.solve", "--resume", str(out)],
                          capture_output=True, text=True, timeout=300,
                          env=os.environ | {"GFLOW_CACHE_DIR": str(cache)})
    assert proc.returncode == EXIT_BAD_INPUT
    _one_line(proc.stderr, "belongs to another problem")
    assert tree_digest(out) == before
    assert not cache.exists() or not list(cache.iterdir())
