"""Bad input, end to end: every case is one line on stderr, exit status 2, and nothing written.

Command-line cases run in this process through `gflow._cli.main(argv)` (and
`gflow._sweep_cli.main`): these are exactly what `python -m gflow.solve` / `python -m gflow.sweep`
call with `sys.argv[1:]`, and a subprocess per case would cost ~2 s of imports each. What needs
a real process (Ctrl-C, a second process on one directory, a kill while writing, the module
entry point) runs as one, a handful of times.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gflow
from conftest import call_entry, tree_digest
from gflow import presets
# Private: the in-process command lines, exactly what the console scripts `gflow-solve` and
# `gflow-sweep` run (see above), and their exit statuses; and the TOML writer the command line
# uses for a run's config.toml, to lay out a run directory as it would.
from gflow._cli import EXIT_BAD_INPUT, EXIT_INTERRUPTED, main
from gflow._config import dumps_toml
from gflow._sweep_cli import main as sweep_main

# A reduced deep-linear run (seconds): 2 modes, width 6, checkpointed every 5 steps.
FAST = [
    "deep-linear", "--set", "problem.width=6", "--set", "problem.singular_values=[3.0, 1.5]",
    "--set", "solve.save_points=40", "--t1", "6", "--set", "solve.checkpoint_steps=5",
]
FAST_OVERRIDES = ["problem.width=6", "problem.singular_values=[3.0, 1.5]",
                  "solve.save_points=40", "solve.t1=6", "solve.checkpoint_steps=5"]
PRESET_TEXT = (Path(presets.__file__).parent / "deep-linear.toml").read_text()


def _fast(t1: str) -> list[str]:
    """FAST with another end time."""
    return [t1 if a == "6" else a for a in FAST]


def _assert_one_line(err: str, message: str):
    assert "Traceback" not in err, err
    assert err.count("\n") == 1 and err.startswith("gflow: error: "), err
    assert message in err, err


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run directory (config, results, figures) that bad input must not touch."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(FAST + ["--out", str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A run directory a solve left mid-way: config.toml and the first pass's last checkpoint."""
    out = tmp_path_factory.mktemp("checkpointed")
    resolved = presets.resolve("deep-linear", FAST_OVERRIDES)
    presets.run(resolved, checkpoint_dir=out)
    (out / "config.toml").write_text(dumps_toml(resolved.config))
    return out


def _toml(tmp_path, text: str) -> str:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    return str(path)


def _without(table: str) -> str:
    """The deep-linear preset's TOML without its `[table]`."""
    out, skip = [], False
    for line in PRESET_TEXT.splitlines():
        if line.startswith("["):
            skip = line.strip() == f"[{table}]"
        if not skip:
            out.append(line)
    return "\n".join(out) + "\n"


# (id, argv with {out}, {tmp}, {file}, {finished} placeholders, or a callable of tmp_path
#  giving argv; the expected message). {out} is a directory that must not come to exist.
CASES = [
    # Already one line before issue 17 (kept as regression cases).
    ("unknown preset", ["no-such-preset", "--out", "{out}"], "unknown preset"),
    ("unknown key", ["--set", "problem.foo=1", "--out", "{out}"], "unknown config key"),
    ("bad --set", ["--set", "nodot=1", "--out", "{out}"], "--set expects table.key=value"),
    ("eps not a number", FAST + ["--set", "problem.eps=abc", "--out", "{out}"],
     "problem.eps must be a number"),
    ("t1 <= t0", FAST + ["--t1", "0", "--out", "{out}"], "must be greater than solve.t0"),
    ("rtol 0", FAST + ["--rtol", "0", "--out", "{out}"], "solve.rtol must be positive"),
    ("unknown solver", FAST + ["--solver", "rk99", "--out", "{out}"], "unknown solver"),
    ("--t1 abc", FAST + ["--t1", "abc", "--out", "{out}"], "argument --t1"),
    ("missing config", ["missing.toml", "--out", "{out}"], "config file not found"),
    ("resume nothing", ["--resume", "{out}"], "not a gflow run directory"),
    # Known tables given as non-tables, and other malformed configs.
    ("problem = 5", lambda t: [_toml(t, "problem = 5\n" + _without("problem")), "--out", "{out}"],
     "config [problem] must be a table, got 5"),
    ("solve = 3", lambda t: [_toml(t, "solve = 3\n" + _without("solve")), "--out", "{out}"],
     "config [solve] must be a table, got 3"),
    ('plot = "x"', lambda t: [_toml(t, 'plot = "x"\n' + _without("plot")), "--out", "{out}"],
     "config [plot] must be a table"),
    ("[[solve]]", lambda t: [_toml(t, _without("solve") + "[[solve]]\nt1 = 1\n"), "--out", "{out}"],
     "config [solve] must be a table, got an array of tables"),
    ("[[problem]]", lambda t: [_toml(t, _without("problem") + "[[problem]]\nkind = 'x'\n"),
                               "--out", "{out}"], "config [problem] must be a table"),
    ("preset = 5", lambda t: [_toml(t, "preset = 5\n" + _without("preset")), "--out", "{out}"],
     "config [preset] must be a table, got 5"),
    ("kind a list", lambda t: [_toml(t, PRESET_TEXT.replace('kind = "deep-linear"',
                                                            'kind = ["deep-linear"]')),
                               "--out", "{out}"], "problem.kind must be one of"),
    ("config a directory", ["{tmp}", "--out", "{out}"], "is a directory, not a TOML file"),
    ("unknown table", lambda t: [_toml(t, PRESET_TEXT + "[extra]\na = 1\n"), "--out", "{out}"],
     "unknown config table 'extra'"),
    # Integers and floats out of range.
    ("seed overflow", FAST + ["--set", "problem.seed=99999999999999999999", "--out", "{out}"],
     "problem.seed must be a 64-bit integer"),
    ("max_steps overflow", FAST + ["--set", "solve.max_steps=100000000000000000000",
                                   "--out", "{out}"], "solve.max_steps must be a 64-bit integer"),
    ("max_steps beyond int32", FAST + ["--set", "solve.max_steps=3000000000", "--out", "{out}"],
     "solve.max_steps must be between 1 and"),
    ("width int64 max", ["deep-linear", "--set", "problem.width=9223372036854775807",
                         "--out", "{out}"], "problem.width must be between 0 and"),
    ("width beyond memory", ["deep-linear", "--set", "problem.width=65536", "--out", "{out}"],
     "would not fit in this machine's memory"),
    ("negative size", FAST + ["--set", "problem.depth=-3", "--out", "{out}"],
     "problem.depth must be between 0 and"),
    ("eps inf", FAST + ["--set", "problem.eps=inf", "--out", "{out}"],
     "problem.eps must be a finite number"),
    ("eps nan", FAST + ["--set", "problem.eps=nan", "--out", "{out}"],
     "problem.eps must be a finite number"),
    ("eps 1e-320", FAST + ["--set", "problem.eps=1e-320", "--out", "{out}"],
     "problem.eps must be between"),
    ("eps 1e300", FAST + ["--set", "problem.eps=1e300", "--out", "{out}"],
     "problem.eps must be between"),
    ("eps -1", FAST + ["--set", "problem.eps=-1", "--out", "{out}"], "problem.eps must be positive"),
    ("--atol 1e300", FAST + ["--atol", "1e300", "--out", "{out}"], "solve.atol must be below 1"),
    ("--atol -1", FAST + ["--atol", "-1", "--out", "{out}"], "solve.atol must be positive"),
    ("rtol 1e300", FAST + ["--set", "solve.rtol=1e300", "--out", "{out}"],
     "solve.rtol must be below 1"),
    ("rtol 1", FAST + ["--rtol", "1", "--out", "{out}"], "solve.rtol must be below 1"),
    ("rtol true", FAST + ["--set", "solve.rtol=true", "--out", "{out}"],
     "solve.rtol must be a number"),
    ("--t1 1e300", FAST + ["--t1", "1e300", "--out", "{out}"], "is beyond 1e+12"),
    ("--t1 inf", FAST + ["--t1", "inf", "--out", "{out}"], "must be a finite number"),
    ("save_points huge", ["deep-linear", "--set", "solve.save_points=100000000", "--out", "{out}"],
     "solve.save_points must be between 3 and"),
    ("--t1 conflicts with --set", FAST + ["--set", "solve.t1=4", "--out", "{out}"],
     "solve.t1 is given twice"),
    ("--set twice", FAST + ["--set", "problem.seed=1", "--set", "problem.seed=2",
                            "--out", "{out}"], "problem.seed is given twice"),
    ("unknown heatmap", FAST + ["--set", "plot.heatmaps=['nope']", "--out", "{out}"],
     "plot.heatmaps: no observable 'nope'"),
    ("unknown label", FAST + ["--set", "plot.labels={nope = ['a']}", "--out", "{out}"],
     "plot.labels: no observable 'nope'"),
    ("euler without dt0", FAST + ["--solver", "euler", "--out", "{out}"],
     "solver 'euler' has no error estimate"),
    # Unusable --out.
    ("--out /proc/x", FAST + ["--out", "/proc/x"], "cannot create a directory in /proc"),
    ("--out /dev/null/x", FAST + ["--out", "/dev/null/x"], "/dev/null is not a directory"),
    ("--out FILE/sub", FAST + ["--out", "{file}/sub"], "is not a directory"),
    ("--out FILE", FAST + ["--out", "{file}"], "exists and is not a directory"),
    ("--out 300 chars", FAST + ["--out", "{tmp}/" + "a" * 300], "longer than this file system"),
    ("--out 5000 chars", FAST + ["--out", "{tmp}/" + "/".join(["b" * 100] * 50)],
     "too long for this file system"),
    ('--out ""', FAST + ["--out", ""], "--out is empty"),
    ("--out nested, bad input", FAST + ["--solver", "euler", "--out", "{out}/p2/run"],
     "solver 'euler' has no error estimate"),
    ("--out holds other files", FAST + ["--out", "{tmp}"], "holding other files"),
    # An existing run: refused, never mixed, never deleted.
    ("new run into a run", FAST + ["--out", "{finished}"], "already holds a run"),
    ("euler into a run", FAST + ["--solver", "euler", "--out", "{finished}"],
     "already holds a run"),
    ("eps inf into a run", FAST + ["--set", "problem.eps=inf", "--out", "{finished}"],
     "problem.eps must be a finite number"),
    ("bad input --overwrite", FAST + ["--solver", "euler", "--overwrite", "--out", "{finished}"],
     "solver 'euler' has no error estimate"),
    ("resume a finished run", ["--resume", "{finished}"], "the run has finished"),
    ("resume with overrides", ["--resume", "{finished}", "--t1", "3"], "drop the overrides"),
    # --show checks what a run would.
    ("--show eps -1", ["deep-linear", "--show", "--set", "problem.eps=-1"],
     "problem.eps must be positive"),
    ("--show builder range", ["deep-linear", "--show", "--set", "problem.init='x'"],
     "problem.init must be 'random' or 'aligned'"),
]


def _argv(template, tmp_path, finished):
    argv = template(tmp_path) if callable(template) else template
    file = tmp_path / "a-file"
    file.write_text("not a directory")
    names = dict(out=tmp_path / "out", tmp=tmp_path, file=file, finished=finished)
    return [a.format(**{k: str(v) for k, v in names.items()}) if "{" in a and "=" not in a
            else a for a in argv]


@pytest.mark.parametrize("case, argv, message", CASES, ids=[c[0] for c in CASES])
def test_bad_command_line_is_one_line_exit_2_and_writes_nothing(
    case, argv, message, tmp_path, finished, capsys
):
    argv = _argv(argv, tmp_path, finished)
    before = tree_digest(tmp_path), tree_digest(finished)
    assert call_entry(main, argv) == EXIT_BAD_INPUT
    captured = capsys.readouterr()
    _assert_one_line(captured.err, message)
    assert captured.out == ""
    assert (tree_digest(tmp_path), tree_digest(finished)) == before  # byte for byte, no empty parents


SWEEP = ["deep-linear", "--set", "problem.width=3", "--set", "problem.singular_values=[2.0]",
         "--t1", "4"]
SWEEP_CASES = [
    ("too many members", ["--over", "seed=0:100000000", "--out", "{out}"],
     "the range 0:100000000 has 100000000 values, beyond 10000 members (pass --force"),
    ("grid too large", ["--over", "seed=0:5001", "--over", "eps=1e-3,1e-4", "--out", "{out}"],
     "the sweep has 10002 members, beyond 10000: pass --force"),
    ("--out /proc/x", ["--over", "seed=0:2", "--out", "/proc/x"],
     "cannot create a directory in /proc"),
    ("--out FILE", ["--over", "seed=0:2", "--out", "{file}"], "exists and is not a directory"),
    ('--out ""', ["--over", "seed=0:2", "--out", ""], "--out is empty"),
    ("eps inf", ["--over", "eps=1e-3,inf", "--out", "{out}"], "problem.eps must be a finite"),
]


@pytest.mark.parametrize("case, argv, message", SWEEP_CASES, ids=[c[0] for c in SWEEP_CASES])
def test_bad_sweep_command_line(case, argv, message, tmp_path, capsys):
    argv = _argv(SWEEP + argv, tmp_path, None)
    before = tree_digest(tmp_path)
    start = time.perf_counter()
    assert call_entry(sweep_main, argv) == EXIT_BAD_INPUT
    assert time.perf_counter() - start < 60  # refused before any member was solved
    _assert_one_line(capsys.readouterr().err, message)
    assert tree_digest(tmp_path) == before


# ---------------------------------------------------------------------------------------------
# Corrupt checkpoints: --resume refuses them in one line and touches nothing.


def _corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "flipped bytes":
        i = len(data) // 3
        path.write_bytes(data[:i] + bytes(b ^ 0xFF for b in data[i:i + 8]) + data[i + 8:])
    elif how == "a directory":
        path.unlink()
        path.mkdir()
    else:
        with np.load(path) as npz:
            arrays = {name: npz[name] for name in npz.files}
        meta = json.loads(str(arrays["meta"]))
        if how == "no fingerprint":
            del meta["fingerprint"]
        elif how == "nan state":
            name = next(k for k in sorted(arrays) if k.startswith("carry/y/"))
            arrays[name] = np.full_like(arrays[name], np.nan)
        arrays["meta"] = np.asarray(json.dumps(meta))
        with open(path, "wb") as f:
            np.savez(f, **arrays)


CORRUPT = [
    ("empty", "is not a readable gflow checkpoint"),
    ("truncated", "is not a readable gflow checkpoint"),
    ("flipped bytes", "is not a readable gflow checkpoint"),
    ("no fingerprint", "its metadata lacks a valid 'fingerprint'"),
    ("a directory", "is not a file"),
    ("nan state", "holds non-finite values in carry/y/"),
]


@pytest.mark.parametrize("how, message", CORRUPT, ids=[c[0] for c in CORRUPT])
def test_resume_refuses_a_corrupt_checkpoint(how, message, checkpoint, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(checkpoint, run)
    (run / ".checkpoint-first.eqx.x1.tmp").write_bytes(b"left by a kill")
    _corrupt(run / "checkpoint-first.eqx", how)
    before = tree_digest(run)
    assert main(["--resume", str(run)]) == EXIT_BAD_INPUT
    _assert_one_line(capsys.readouterr().err, message)
    assert tree_digest(run) == before  # not even the leftover temporary file was removed


def test_library_refuses_a_checkpoint_path_that_is_a_directory(tmp_path):
    resolved = presets.resolve("deep-linear", FAST_OVERRIDES)
    problem = presets.build(resolved)
    for resume in (False, True):
        with pytest.raises(gflow.InputError, match="is a directory"):
            gflow.solve(problem.flow, 6.0, observers=problem.observers,
                        checkpoint=tmp_path, resume=resume)
    assert list(tmp_path.iterdir()) == []


def test_library_resume_refuses_a_nan_checkpoint(checkpoint, tmp_path):
    resolved = presets.resolve("deep-linear", FAST_OVERRIDES)
    problem = presets.build(resolved)
    path = tmp_path / "c.eqx"
    path.write_bytes((checkpoint / "checkpoint-first.eqx").read_bytes())
    _corrupt(path, "nan state")
    with pytest.raises(gflow.InputError, match="holds non-finite values in carry/y/"):
        gflow.solve(problem.flow, 6.0, ts=resolved.solve.save_times(),
                    observers=problem.observers, transitions=problem.transitions,
                    checkpoint=path, checkpoint_steps=5, resume=True)


# ---------------------------------------------------------------------------------------------
# What used to crash after computing: now written, as data.


def test_certify_without_a_transition_writes_null_and_resumes(tmp_path, capsys):
    """`--certify` on a horizon too short for any transition used to crash writing NaN into
    summary.json, leaving a directory --resume could not finish. Here: that directory (config
    and the final checkpoints of both passes, no results), resumed to a strict-JSON summary."""
    out = tmp_path / "run"
    out.mkdir()
    overrides = [o.replace("solve.t1=6", "solve.t1=2") for o in FAST_OVERRIDES]
    resolved = presets.resolve("deep-linear", overrides + ["solve.certify=true"])
    presets.run(resolved, checkpoint_dir=out)
    (out / "config.toml").write_text(dumps_toml(resolved.config))
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint-first-reference.eqx", "checkpoint-first.eqx", "config.toml"]
    assert main(["--resume", str(out), "--quiet"]) == 0
    text = (out / "summary.json").read_text()
    # Strict JSON: NaN and Infinity would fail here.
    summary = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in summary.json"))
    assert summary["transitions"] == {"mode1_learned": None, "mode2_learned": None}
    assert summary["errors"]["transitions"] == {"mode1_learned": None, "mode2_learned": None}
    assert summary["predictions"]["mode1_learned"]["measured"] is None
    traj = gflow.load(out)
    assert math.isnan(traj.transitions["mode1_learned"])


# ---------------------------------------------------------------------------------------------
# The library: one-line InputError naming the function; user exceptions pass through, named.


class _Scalar(eqx.Module):
    x: jax.Array


def _loss(m, d):
    return 0.5 * (m.x - 1.0) ** 2


_FLOW = gflow.GradientFlow(_Scalar(jnp.array(0.5)), _loss, None)


LIBRARY = [
    ("observer returns a string", dict(observers={"s": lambda m, d: "hello"}),
     "observer 's' .* must return arrays, got str"),
    ("condition returns a vector",
     dict(transitions=[gflow.Transition("v", lambda m, d: m.x * jnp.ones(3))]),
     r"condition of transition 'v' .* must return a scalar, got shape \(3,\)"),
    ("t1 a string", dict(t1="abc"), "t1 must be a real number, got 'abc'"),
    ("t1 inf", dict(t1=math.inf), "t1 must be finite"),
    ("t1 1e300", dict(t1=1e300), "is beyond 1e\\+12"),
    ("t1 before t0", dict(t1=1.0, t0=2.0), "t1 must be greater than t0"),
    ("observer named t", dict(observers={"t": lambda m, d: m.x}), "observer name 't'"),
    ("observer not callable", dict(observers={"x": 3}), "observer 'x' must be callable"),
    ("observers a list", dict(observers=[lambda m, d: m.x]), "observers must be a dict"),
    ("rtol True", dict(rtol=True), "rtol must be a number in \\(0, 1\\), got True"),
    ("rtol 1e300", dict(rtol=1e300), "rtol must be a number in \\(0, 1\\)"),
    ("atol negative", dict(atol=-1.0), "atol must be a positive number"),
    ("max_steps 0", dict(max_steps=0), "max_steps must be an integer between 1"),
    ("max_steps 1.5", dict(max_steps=1.5), "max_steps must be an integer"),
    ("max_steps 1e20", dict(max_steps=10**20), "max_steps must be an integer between 1"),
    ("dt0 zero", dict(solver="euler", dt0=0.0), "dt0 must be a number in \\(0, t1 - t0\\]"),
    ("dt0 negative", dict(solver="euler", dt0=-0.1), "dt0 must be a number"),
    ("not a Transition", dict(transitions=["x"]), "transitions must be gflow.Transition"),
    ("bad ts", dict(ts=[3.0, 1.0]), "ts must be non-decreasing"),
    ("non-scalar loss", dict(flow=gflow.GradientFlow(_Scalar(jnp.array(0.5)),
                                                     lambda m, d: m.x * jnp.ones(3), None)),
     r"the loss .* must return a scalar, got shape \(3,\)"),
    ("complex loss", dict(flow=gflow.GradientFlow(_Scalar(jnp.array(0.5)),
                                                  lambda m, d: m.x + 1j, None)),
     "the loss .* must return a real scalar, got dtype complex128"),
    ("integer loss", dict(flow=gflow.GradientFlow(_Scalar(jnp.array(0.5)),
                                                  lambda m, d: jnp.int32(1), None)),
     "must return a floating-point scalar"),
    ("preconditioner of another structure",
     dict(flow=gflow.GradientFlow(_Scalar(jnp.array(0.5)), _loss, None,
                                  preconditioner=lambda m, g: (g, g))),
     "the preconditioner .* must return a pytree of the gradient's structure"),
    ("init underflows", dict(flow=gflow.GradientFlow(_Scalar(jnp.array(1e-200)), _loss, None)),
     "squares underflow"),
    ("init beyond the divergence guard",
     dict(flow=gflow.GradientFlow(_Scalar(jnp.array(1e120)), _loss, None)),
     "passes gflow's divergence threshold"),
    ("non-finite init", dict(flow=gflow.GradientFlow(_Scalar(jnp.array(jnp.nan)), _loss, None)),
     "the initial state has non-finite values"),
    ("not a flow", dict(flow="flow"), "solve expects a gflow.GradientFlow"),
]


@pytest.mark.parametrize("case, kwargs, message", LIBRARY, ids=[c[0] for c in LIBRARY])
def test_bad_library_input_is_one_line_input_error(case, kwargs, message):
    kwargs = dict(kwargs)
    flow, t1 = kwargs.pop("flow", _FLOW), kwargs.pop("t1", 2.0)
    with pytest.raises(gflow.InputError, match=message) as info:
        gflow.solve(flow, t1, **kwargs)
    assert "\n" not in str(info.value)


def test_user_exceptions_pass_through_with_the_function_named():
    def exploding_observer(m, d):
        raise ZeroDivisionError("user code failed")

    with pytest.raises(ZeroDivisionError, match="user code failed") as info:
        gflow.solve(_FLOW, 2.0, observers={"boom": exploding_observer})
    assert any("observer 'boom'" in n and "exploding_observer" in n for n in info.value.__notes__)

    def exploding_loss(m, d):
        raise KeyError("missing")

    with pytest.raises(KeyError) as info:
        gflow.solve(gflow.GradientFlow(_Scalar(jnp.array(0.5)), exploding_loss, None), 2.0)
    assert any("loss" in n and "exploding_loss" in n for n in info.value.__notes__)


# ---------------------------------------------------------------------------------------------
# Fuzz: configs and --set values never give a traceback (checked as --show does: resolve,
# build, gflow.solve's own checks; nothing is compiled).

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

_KEYS = {
    "problem": ["kind", "depth", "width", "singular_values", "init", "eps", "seed", "other"],
    "solve": ["t0", "t1", "solver", "rtol", "atol", "max_steps", "save_points", "grid",
              "refine", "certify", "checkpoint_steps", "x32", "precision",
              "matmul_precision", "other"],
    "plot": ["time_axis", "labels", "heatmaps", "other"],
    "preset": ["name", "description"],
}
_scalars = st.one_of(
    st.integers(-3, 40), st.sampled_from([2**63 - 1, -(2**63), 10**30, 0]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1e-320, 1e300, 0.5, 1e-8]),
    st.booleans(), st.text(max_size=8), st.sampled_from(["deep-linear", "tsit5", "log", "x"]),
)
_values = st.one_of(_scalars, st.lists(_scalars, max_size=3),
                    st.dictionaries(st.sampled_from(["loss", "x"]), st.lists(_scalars, max_size=2),
                                    max_size=2))


def _literal(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value == math.inf else
                                                "-inf" if value == -math.inf else repr(value))
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    return "{" + ", ".join(f"{k} = {_literal(v)}" for k, v in value.items()) + "}"


@st.composite
def _configs(draw):
    lines = []
    if draw(st.booleans()):  # a top-level key where a table belongs
        lines.append(f"{draw(st.sampled_from(list(_KEYS)))} = {_literal(draw(_scalars))}")
    base = presets.preset_config("deep-linear")
    for table, keys in _KEYS.items():
        if draw(st.integers(0, 5)) == 0:
            continue
        values = dict(base.get(table, {}))
        for key in draw(st.lists(st.sampled_from(keys), max_size=3)):
            values[key] = draw(_values)
        if table == "problem":  # keep built arrays small
            for k in ("width", "depth"):
                if isinstance(values.get(k), int) and 64 < values[k] < 2**62:
                    values[k] = 64
        lines.append(f"[{table}]")
        lines += [f"{k} = {_literal(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


_SET_TEXT = st.one_of(
    st.text(alphabet="[]{}=,.'\"0123456789aeinftrx -", max_size=12),
    st.sampled_from(["1e-320", "inf", "nan", "-1", "99999999999999999999", "true", "[]",
                     "{a = 1}", "'aligned'", "1e300"]),
)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(config=_configs(), sets=st.lists(
    st.tuples(st.sampled_from([f"{t}.{k}" for t, ks in _KEYS.items() for k in ks] + ["x.y", "z"]),
              _SET_TEXT), max_size=3))
def test_fuzzed_configs_never_give_a_traceback(config, sets, tmp_path_factory):
    directory = tmp_path_factory.mktemp("fuzz")
    path = directory / "c.toml"
    path.write_text(config)
    argv = [str(path), "--show"]
    for key, text in sets:
        if key in ("problem.width", "problem.depth") and text.strip().isdigit() \
                and 64 < int(text) < 2**62:
            text = "64"  # building a huge model is slow, not wrong; the table tests refuse one
        argv += ["--set", f"{key}={text}"]
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = call_entry(main, argv)
    text = err.getvalue()
    assert "Traceback" not in text
    assert code in (0, EXIT_BAD_INPUT), (argv, config, text)
    if code == EXIT_BAD_INPUT:
        assert text.count("\n") == 1 and text.startswith("gflow: error: "), text
    assert sorted(p.name for p in directory.iterdir()) == ["c.toml"]


# ---------------------------------------------------------------------------------------------
# Real processes: Ctrl-C, two processes on one directory, a kill during the first write.

# The driver reaches private names: `gflow._cli.main`, exactly what the console script
# `gflow-solve` runs, and the checkpoint writer `gflow._solve.write_checkpoint`, wrapped to
# pause the run at a chosen checkpoint.
_DRIVER = """
import os, signal, sys, time
import gflow._solve
from gflow._cli import main

pause = int(os.environ.get("PAUSE_AFTER_CHECKPOINTS", "0"))
if pause:  # sleep (holding the run directory) right after the n-th checkpoint is written
    import threading
    # Certify's reference writes its checkpoints from a second thread: the lock, held while
    # paused, keeps every thread from writing, so the directory stands still.
    write, count, lock = gflow._solve.write_checkpoint, [0], threading.Lock()
    def write_then_pause(*args):
        with lock:
            write(*args)
            count[0] += 1
            if count[0] == pause:
                print("paused", flush=True)
                time.sleep(120)
    gflow._solve.write_checkpoint = write_then_pause

target = os.environ.get("KILL_WRITING")
if target:  # SIGKILL while writing `target`: its bytes are out, the rename not yet done
    fsync = os.fsync
    def fsync_or_kill(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith("." + target):
            os.kill(os.getpid(), signal.SIGKILL)
        fsync(fd)
    os.fsync = fsync_or_kill

sys.exit(main())
"""


def _start(argv, cache: Path | None = None, **env) -> subprocess.Popen:
    """The CLI in a subprocess; `cache`: its own compilation cache (default: this process's,
    so that programs compiled here load there)."""
    if cache is not None:
        env["GFLOW_CACHE_DIR"] = str(cache)
    return subprocess.Popen(
        [sys.executable, "-c", _DRIVER] + argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=os.environ | env,
    )


def _same_results(a: Path, b: Path):
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert sa["status"] == sb["status"] == "completed"
    assert sa["transitions"] == sb["transitions"] and sa["t_final"] == sb["t_final"]
    assert (a / "final.eqx").read_bytes() == (b / "final.eqx").read_bytes()


def test_lock_then_ctrl_c_then_resume(finished, tmp_path, capsys):
    """A run holds its directory: a second run, --overwrite and --resume are refused in one line
    and touch nothing. Ctrl-C then stops it at a safe point: one line, status 130, and the
    directory resumes to the uninterrupted result."""
    out = tmp_path / "run"
    proc = _start(FAST + ["--out", str(out), "--quiet"], PAUSE_AFTER_CHECKPOINTS="2")
    try:
        assert proc.stdout.readline().strip() == "paused"
        before = tree_digest(out)
        for argv, message in [
            (FAST + ["--out", str(out)], "is in use by another gflow process"),
            (FAST + ["--out", str(out), "--overwrite"], "is in use by another gflow process"),
            (["--resume", str(out)], "is in use by another gflow process"),
        ]:
            assert main(argv) == EXIT_BAD_INPUT
            _assert_one_line(capsys.readouterr().err, message)
            assert tree_digest(out) == before
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith("gflow: interrupted at t=")
    assert err.strip().endswith(f"; resume with python -m gflow.solve --resume {out}")
    assert main(["--resume", str(out), "--quiet"]) == 0
    _same_results(finished, out)


def test_ctrl_c_during_compilation_exits_130_without_a_crash(tmp_path):
    out = tmp_path / "run"
    # A small program (one mode, a 3-stage solver) on a fresh cache: compiled, not loaded.
    small = ["deep-linear", "--set", "problem.width=2", "--set", "problem.singular_values=[1.0]",
             "--set", "solve.save_points=10", "--solver", "bosh3", "--t1", "3"]
    proc = _start(small + ["--out", str(out), "--quiet"], cache=tmp_path / "fresh-cache")
    try:
        deadline = time.monotonic() + 60
        while not (out / "config.toml").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)  # compiling now
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_INTERRUPTED, (proc.returncode, err)  # not -11 (SIGSEGV)
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith("gflow: interrupted at t=")


def test_kill_during_the_first_config_write_is_explained(tmp_path, capsys):
    out = tmp_path / "run"
    proc = _start(FAST + ["--out", str(out), "--quiet"], KILL_WRITING="config.toml")
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "config.toml").exists() and list(out.glob(".config.toml.*.tmp"))
    before = tree_digest(out)
    assert main(["--resume", str(out)]) == EXIT_BAD_INPUT
    _assert_one_line(capsys.readouterr().err,
                     "stopped while writing its config.toml, before computing anything")
    assert tree_digest(out) == before
    # Starting it again there is allowed (what the kill left is the run's own): the directory
    # passes, and a bad solver setting is what this (cheap, not computing) run is refused for.
    assert main(FAST + ["--solver", "euler", "--out", str(out)]) == EXIT_BAD_INPUT
    _assert_one_line(capsys.readouterr().err, "solver 'euler' has no error estimate")
    assert tree_digest(out) == before


def test_overwrite_replaces_a_run_wholly_and_predictions_count_from_t0(finished, tmp_path):
    """--overwrite into a run directory that also holds what a kill left: nothing of the old
    run stays (a figure it drew, a leftover temporary file, a checkpoint), and nothing else
    goes (a user's file beside them). The new run starts at t0 = -2: it is the old one
    shifted, and its predictions compare the same durations."""
    import shutil

    from gflow._rundir import write_manifest  # private: enters the old run's own files

    out = tmp_path / "run"
    shutil.copytree(finished, out)
    (out / "figures" / "stale.png").write_bytes(b"from the old run")
    (out / "figures" / "notes.md").write_bytes(b"the user's")
    (out / ".summary.json.x1.tmp").write_bytes(b"left by a kill")
    (out / "checkpoint-refined.eqx").write_bytes(b"an old pass")
    write_manifest(out, add=("figures/stale.png", "checkpoint-refined.eqx"))
    argv = _fast("4") + ["--set", "solve.t0=-2", "--out", str(out), "--quiet", "--overwrite"]
    assert main(argv) == 0
    assert not (out / "figures" / "stale.png").exists()
    assert (out / "figures" / "notes.md").read_bytes() == b"the user's"
    assert not list(out.glob(".*.tmp")) and not list(out.glob("checkpoint-*"))
    shifted = json.loads((out / "summary.json").read_text())
    base = json.loads((finished / "summary.json").read_text())
    assert shifted["t0"] == -2.0 and shifted["t1"] == 4.0
    for name, p in base["predictions"].items():
        q = shifted["predictions"][name]
        assert q["predicted"] == p["predicted"]
        assert abs(shifted["transitions"][name] + 2 - base["transitions"][name]) < 1e-5
        assert q["measured"] == pytest.approx(p["measured"], abs=1e-5)
        assert q["rel_error"] == pytest.approx(p["rel_error"], abs=1e-5)


def test_corrupt_checkpoint_refused_by_the_real_command(checkpoint, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(checkpoint, run)
    _corrupt(run / "checkpoint-first.eqx", "flipped bytes")
    proc = subprocess.run([sys.executable, "-m", "gflow.solve", "--resume", str(run)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_BAD_INPUT
    _assert_one_line(proc.stderr, "is not a readable gflow checkpoint")


def _quadratic(m, d):
    return d * m.x**2


def test_a_step_size_floor_is_told_apart_from_divergence():
    """dx/dt = -50 x converges; over t1 = 1e12 the smallest step allowed (1e-12 of the
    horizon) is 1, too long for it: the blow-up this forces says so. A true divergence
    (dx/dt = x overflowing) does not. (One loss, the coefficient as data: one program.)"""
    stiff = gflow.GradientFlow(_Scalar(jnp.array(1.0)), _quadratic, jnp.array(25.0))
    traj = gflow.solve(stiff, 1e12, ts=gflow.linear_grid(0.0, 1e12, 11))
    assert traj.status == "nonfinite" and traj.t_final < 1e3
    assert "steps were held at the smallest allowed" in traj.message
    growing = gflow.GradientFlow(_Scalar(jnp.array(1.0)), _quadratic, jnp.array(-0.5))
    traj = gflow.solve(growing, 1000.0, ts=gflow.linear_grid(0.0, 1000.0, 11))
    assert traj.status == "nonfinite" and 225.0 < traj.t_final < 240.0
    assert "held" not in traj.message
