"""Sweeps: batched members against closed forms and one-by-one solves; failure isolation;
sharding over devices; scaling fits; the command line."""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import gflow
# Private: the command line's exit status for bad input (2, as docs/cli.md says), pinned.
from gflow._cli import EXIT_BAD_INPUT
# A private helper, tested directly: the fits' Student-t quantile against scipy's.
# Private: the in-process sweep command line, exactly what the console script `gflow-sweep` runs.
from gflow._sweep_cli import main as sweep_main
from gflow.models import DeepLinear, deep_linear_loss, whitened_target
from gflow.theory import saxe_half_rise_time

Sweep, SweepMember, sweep, sweep_points = gflow.Sweep, gflow.SweepMember, gflow.sweep, gflow.sweep_points

RTOL = 1e-8

# ---------------------------------------------------------------------------------------------
# Two-layer linear network from a balanced aligned init: Saxe's closed form is exact.

SAXE_S = (3.0, 1.0)
SAXE_EPS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
SAXE_T1 = 4.0
SAXE_TS = gflow.linear_grid(0.0, SAXE_T1, 9)


def saxe_flow(eps, seed):
    target = whitened_target(SAXE_S, (4, 4), jax.random.key(seed))
    model = DeepLinear.balanced_aligned(target, depth=2, u0=eps)
    return gflow.GradientFlow(model, deep_linear_loss, target)


def top_singular_value(model, data):
    return jnp.linalg.svd(model.product(), compute_uv=False)[0]


MODE1 = gflow.Transition(
    "mode1", lambda m, d: top_singular_value(m, d) - SAXE_S[0] / 2, direction=True
)
SAXE_OBSERVERS = {"sigma1": top_singular_value}


@pytest.fixture(scope="module")
def saxe_sweep():
    return sweep(
        saxe_flow,
        {"eps": list(SAXE_EPS), "seed": [0, 1]},
        SAXE_T1,
        rtol=RTOL,
        ts=SAXE_TS,
        observers=SAXE_OBSERVERS,
        transitions=[MODE1],
        keep_trajectories=True,
        batch="map",
    )


def test_saxe_half_rise_times_and_log_law(saxe_sweep):
    assert len(saxe_sweep) == 10 and len(saxe_sweep.groups) == 1  # one compiled program
    for member in saxe_sweep:
        assert member.status == "completed"
        exact = saxe_half_rise_time(SAXE_S[0], member.point["eps"])
        assert member.transitions["mode1"] == pytest.approx(exact, rel=10 * RTOL)
    fit = saxe_sweep.fit("mode1", against="eps", law="log", expected=1 / (2 * SAXE_S[0]))
    # t½ = ln(s/u0 − 1)/(2s): slope 1/(2s) in ln(1/u0), up to the u0/s correction.
    assert fit.rel_error < 0.02 and fit.agrees
    assert list(fit.counts) == [2] * 5 and fit.excluded == 0
    # The fit itself: least squares on the closed-form times, by numpy and scipy.
    u = np.log(1 / np.asarray(SAXE_EPS))
    exact = np.asarray([saxe_half_rise_time(SAXE_S[0], e) for e in SAXE_EPS])
    reference = scipy.stats.linregress(u, exact)
    assert fit.slope == pytest.approx(reference.slope, rel=1e-6)
    half = scipy.stats.t.ppf(0.975, len(u) - 2) * reference.stderr
    assert fit.ci95[1] - fit.ci95[0] == pytest.approx(2 * half, rel=1e-3)


def test_sweep_equals_one_by_one_solves(saxe_sweep):
    for index in (0, 7):
        member = saxe_sweep[index]
        traj = gflow.solve(
            saxe_flow(**member.point), SAXE_T1, rtol=RTOL, ts=SAXE_TS,
            observers=SAXE_OBSERVERS, transitions=[MODE1],
        )
        assert member.transitions["mode1"] == pytest.approx(
            traj.transitions["mode1"], rel=10 * RTOL
        )
        kept = member.trajectory
        np.testing.assert_allclose(kept.ts, traj.ts)
        for name in ("loss", "sigma1"):
            np.testing.assert_allclose(
                kept.observables[name], traj.observables[name], rtol=10 * RTOL, atol=1e-14
            )
        assert member.final["loss"] == pytest.approx(traj.observables["loss"][-1], rel=10 * RTOL)
        assert member.stats["num_steps"] == traj.stats["num_steps"]
        assert member.stats["segments"] == traj.stats["segments"]
        assert member.stats["vector_field_evaluations"] == traj.stats["vector_field_evaluations"]
        assert kept.atol == traj.atol and kept.status == traj.status == "completed"


# ---------------------------------------------------------------------------------------------
# dx/dt = −a x + b x²: decay for b = 0, finite-time blow-up for b = 1 and x0 = 2 > a.


class Pair(eqx.Module):
    x: jax.Array


def cubic_loss(model, data):
    a, b = data
    return 0.5 * a * jnp.sum(model.x**2) - b / 3 * jnp.sum(model.x**3)


def pair_flow(a, b):
    data = (jnp.asarray(a, dtype=float), jnp.asarray(b, dtype=float))
    return gflow.GradientFlow(Pair(jnp.full(2, 2.0)), cubic_loss, data)


HALVED = gflow.Transition("halved", lambda m, d: m.x[0] - 1.0, direction=False)
# Three decaying members, one blow-up at t = ln 2, one too stiff for 500 explicit steps.
PAIR_POINTS = {"a": [1.0, 2.0, 0.5, 1.0, 1e4], "b": [0.0, 0.0, 0.0, 1.0, 0.0]}
PAIR_T1 = 2.0
PAIR_MAX_STEPS = 500


@pytest.fixture(scope="module")
def pair_sweep():
    # Tsit5: its member a = 1e4 is meant to run out of steps (auto's implicit method would
    # finish it).
    return sweep(pair_flow, PAIR_POINTS, PAIR_T1, mode="zip", rtol=RTOL, transitions=[HALVED],
                 max_steps=PAIR_MAX_STEPS, batch="map", solver="tsit5")


def test_failing_members_are_isolated(pair_sweep):
    statuses = [m.status for m in pair_sweep]
    assert statuses[:3] == ["completed"] * 3
    for member in pair_sweep.members[:3]:
        a = member.point["a"]
        assert member.transitions["halved"] == pytest.approx(math.log(2) / a, rel=10 * RTOL)
        # x(t) = 2 e^{−at} in both coordinates: L = a · 4 e^{−2at}.
        assert member.final["loss"] == pytest.approx(4 * a * math.exp(-2 * a * PAIR_T1), rel=1e-6)
    blow_up = pair_sweep[3]
    # dx/dt = x(x − 1) from x0 = 2 blows up at t* = ln 2.
    assert blow_up.status in ("nonfinite", "dt_min") and blow_up.message
    assert blow_up.t_final == pytest.approx(math.log(2), rel=1e-6)
    assert math.isnan(blow_up.transitions["halved"])
    stiff = pair_sweep[4]
    assert stiff.status == "max_steps" and "max_steps=500" in stiff.message
    assert stiff.t_final < PAIR_T1
    assert stiff.transitions["halved"] == pytest.approx(math.log(2) / 1e4, rel=10 * RTOL)
    rows = pair_sweep.table()
    assert [r["status"] for r in rows] == statuses and math.isnan(rows[3]["halved"])
    with pytest.raises(gflow.InputError, match="must hold positive numbers"):
        pair_sweep.fit("halved", against="b")  # b = 0 has no logarithm
    fit = pair_sweep.fit("halved", against="a")
    # Power law T = ln2 / a: exponent −1, from every member that reached the transition (the
    # stiff one did, before running out of steps); the blow-up never did.
    assert fit.slope == pytest.approx(-1.0, rel=10 * RTOL) and fit.excluded == 1
    assert list(fit.x) == [0.5, 1.0, 2.0, 1e4] and list(fit.counts) == [1, 1, 1, 1]


_SHARDED = """
import json, sys
sys.path.insert(0, {tests!r})
import jax, test_sweep as t
from gflow import sweep
assert len(jax.devices()) == 4
s = sweep(t.pair_flow, t.PAIR_POINTS, t.PAIR_T1, mode="zip", rtol=t.RTOL, transitions=[t.HALVED],
          max_steps=t.PAIR_MAX_STEPS, batch="vmap", solver="tsit5")
print(json.dumps(dict(groups=list(s.groups), members=[
    dict(status=m.status, halved=m.transitions["halved"], t_final=m.t_final) for m in s])))
"""


def test_sharded_vmap_over_four_devices(pair_sweep):
    """Five members over four devices (padded to eight), vmap within each device."""
    env = os.environ | {
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
    }
    script = _SHARDED.format(tests=str(Path(__file__).parent))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["groups"][0]["devices"] == 4 and result["groups"][0]["batch"] == "vmap"
    for sharded, member in zip(result["members"], pair_sweep):
        assert sharded["status"] == member.status
        assert sharded["t_final"] == pytest.approx(member.t_final, rel=10 * RTOL)
        if math.isfinite(member.transitions["halved"]):
            assert sharded["halved"] == pytest.approx(member.transitions["halved"], rel=10 * RTOL)
        else:
            assert sharded["halved"] is None or math.isnan(sharded["halved"])


# ---------------------------------------------------------------------------------------------
# Fits and points, without solving


def _member(point, time, status="completed"):
    return SweepMember(point=point, status=status, message="", transitions={"T": time}, final={},
                  t_final=1.0, stats={"num_steps": 1}, group=0)


def test_power_fit_averages_seeds_and_matches_linregress():
    rng = np.random.default_rng(0)
    eps = [1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4]
    members, logs = [], []
    for e in eps:
        times = 2.0 * e**-1.5 * np.exp(0.05 * rng.standard_normal(3))
        logs.append(np.mean(np.log(times)))
        members += [_member({"eps": e, "seed": s}, t) for s, t in enumerate(times)]
    members.append(_member({"eps": 1e-2, "seed": 9}, math.nan, status="nonfinite"))
    result = Sweep(axes={"eps": tuple(eps), "seed": (0, 1, 2, 9)}, mode="grid",
                   members=tuple(members), groups=(), t0=0.0, t1=1.0, solver="tsit5", rtol=RTOL)
    fit = result.fit("T", against="eps", law="power", expected=-1.5)
    reference = scipy.stats.linregress(np.log(eps), logs)
    assert fit.slope == pytest.approx(reference.slope, rel=1e-12)
    assert fit.stderr == pytest.approx(reference.stderr, rel=1e-10)
    half = scipy.stats.t.ppf(0.975, len(eps) - 2) * reference.stderr
    np.testing.assert_allclose(fit.ci95, [reference.slope - half, reference.slope + half],
                               rtol=1e-10)
    assert fit.excluded == 1 and list(fit.counts) == [3] * 6 and fit.agrees
    np.testing.assert_allclose(fit.predict(fit.x), np.exp(reference.intercept) * fit.x ** fit.slope)


def test_two_point_fit_warns_that_it_has_no_interval():
    members = tuple(_member({"eps": e}, 3.0 / e) for e in (1e-2, 1e-3))
    result = Sweep(axes={"eps": (1e-2, 1e-3)}, mode="grid", members=members, groups=(), t0=0.0,
                   t1=1.0, solver="tsit5", rtol=RTOL)
    with pytest.warns(UserWarning, match="no residual"):
        fit = result.fit("T", against="eps", law="power")
    assert fit.slope == pytest.approx(-1.0, rel=1e-12)  # the line through both points
    assert math.isnan(fit.stderr) and all(math.isnan(c) for c in fit.ci95)


def test_points_grid_and_zip_and_bad_arguments():
    assert sweep_points({"a": [1, 2], "b": "xy".split("x")[:1] + ["z"]}) == [
        {"a": 1, "b": ""}, {"a": 1, "b": "z"}, {"a": 2, "b": ""}, {"a": 2, "b": "z"}]
    assert sweep_points({"a": [1, 2], "b": range(2)}, "zip") == [{"a": 1, "b": 0}, {"a": 2, "b": 1}]
    with pytest.raises(gflow.InputError, match="equal length"):
        sweep_points({"a": [1, 2], "b": [1]}, "zip")
    with pytest.raises(gflow.InputError, match="has no values"):
        sweep_points({"a": []})
    with pytest.raises(gflow.InputError, match="batch must be one of"):
        sweep(pair_flow, {"a": [1.0], "b": [0.0]}, 1.0, batch="pmap")
    with pytest.raises(gflow.InputError, match="must return a gflow.GradientFlow"):
        sweep(lambda a: a, {"a": [1.0]}, 1.0)
    with pytest.raises(gflow.InputError, match="t1 must be greater than t0"):
        sweep(pair_flow, {"a": [1.0], "b": [0.0]}, 0.0)


# ---------------------------------------------------------------------------------------------
# The command line

CLI_FAST = [
    "deep-linear", "--set", "problem.width=3", "--set", "problem.singular_values=[2.0, 1.0]",
    "--set", 'problem.init="aligned"', "--t1", "12",
]


def _exit_code(argv) -> int:
    try:
        return sweep_main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize(
    "argv, message",
    [
        (["no-such-preset", "--over", "eps=1e-3"], "unknown preset 'no-such-preset'"),
        (["deep-linear"], "nothing to sweep"),
        (["deep-linear", "--over", "eps"], "--over expects FIELD=VALUES"),
        (["deep-linear", "--over", "solve.rtol=1e-3"], "--over expects FIELD=VALUES"),
        (["deep-linear", "--over", "foo=1,2"], "--over foo: not a field of [problem]"),
        (["deep-linear", "--over", "seed=3:1"], "the range 3:1 is empty"),
        (["deep-linear", "--over", "eps=1e-3,,1e-4"], "--over eps: empty value"),
        (["deep-linear", "--over", "eps=abc"], "problem.eps must be a number"),
        (["deep-linear", "--over", "eps=1e-3,-1"], "problem.eps must be positive"),
        (["deep-linear", "--over", "eps=1e-3", "--over", "eps=1e-4"], "--over eps is given twice"),
        (["deep-linear", "--over", "eps=1e-3,1e-4", "--over", "seed=0:3", "--zip"],
         "equal length"),
        (["deep-linear", "--over", "eps=1e-3", "--against", "seed"], "--against seed"),
        (["deep-linear", "--over", "eps=1e-3", "--t1", "0"], "solve.t1 must be greater"),
        (["deep-linear", "--over", "eps=1e-3", "--batch", "pmap"], "argument --batch"),
        (["deep-linear", "--over", "eps=1e-3", "--set", "solve.precision='mixed'"],
         "below precision mixed's floor"),
        (["deep-linear", "--over", "eps=1e-3", "--process-id", "1"],
         "--process-id needs --distributed"),
        (["deep-linear", "--over", "eps=1e-3", "--distributed", "--coordinator", "nohost"],
         "--coordinator expects HOST:PORT"),
        (["deep-linear", "--over", "eps=1e-3", "--distributed", "--num-processes", "0"],
         "--num-processes must be at least 1"),
        (["deep-linear", "--over", "eps=1e-3", "--distributed", "--num-processes", "2",
          "--process-id", "2"], "--process-id must be at least 0 and below --num-processes 2"),
        (["deep-linear", "--over", "eps=1e-3", "--num-processes", "two"],
         "argument --num-processes"),
        # This process has already used JAX: JAX's own refusal, in one line.
        (["deep-linear", "--over", "eps=1e-3", "--distributed"],
         "--distributed: jax.distributed.initialize failed"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(argv, message, capsys, tmp_path):
    out = tmp_path / "sweep"
    assert _exit_code(argv + ["--out", str(out)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert not out.exists()


def test_cli_writes_members_json_and_scaling_figure(tmp_path, capsys):
    out = tmp_path / "sweep"
    eps = [1e-2, 1e-3, 1e-4, 1e-5]
    # No --law: the preset's theory gives a log law for two factors.
    argv = CLI_FAST + ["--over", "eps=" + ",".join(map(str, eps)), "--over", "seed=0:2",
                       "--out", str(out)]
    assert sweep_main(argv) == 0
    report = capsys.readouterr().out
    assert "[8/8]" in report and "1 compiled program(s)" in report
    rows = np.genfromtxt(out / "members.csv", delimiter=",", names=True, dtype=None,
                         encoding="utf-8")
    # The final observables follow the transition times (members.csv has them since the
    # sweep's results became a table to keep working with: the columns changed on purpose).
    assert rows.dtype.names[:7] == ("eps", "seed", "status", "mode1_learned", "mode2_learned",
                                    "t_final", "steps")
    summary = json.loads((out / "sweep.json").read_text())
    np.testing.assert_array_equal(rows["final_loss"],
                                  [m["final"]["loss"] for m in summary["members"]])
    assert len(rows) == 8 and set(rows["status"]) == {"completed"}
    for row in rows:
        for k, s in enumerate((2.0, 1.0)):
            exact = saxe_half_rise_time(s, row["eps"] ** 2)  # each factor carries eps
            assert row[f"mode{k + 1}_learned"] == pytest.approx(exact, rel=10 * RTOL)
    # Each member was built by its own call of the preset's builder (new closures), yet all
    # share one compiled program.
    assert len(summary["groups"]) == 1 and summary["groups"][0]["size"] == 8
    assert summary["preset"] == "deep-linear" and summary["axes"]["eps"] == eps
    fits = {f["transition"]: f for f in summary["fits"]}
    for name, s in (("mode1_learned", 2.0), ("mode2_learned", 1.0)):
        assert fits[name]["slope"] == pytest.approx(1 / s, rel=0.02)
        assert fits[name]["points"] == 4 and fits[name]["law"] == "log"
        assert fits[name]["expected"] == pytest.approx(1 / s) and fits[name]["agrees"] is not None
        assert f"{name} vs eps (log law): slope vs ln(1/x)" in report and "theory " in report
        figure = out / "figures" / f"{name}_vs_eps.png"
        assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


# Three processes compiling (30-40 s): the slow set; the sharding itself runs by default in
# test_sharded_vmap_over_four_devices.
@pytest.mark.slow
def test_cli_distributed_over_two_processes_equals_one_process(tmp_path):
    """Two processes on localhost with two CPU devices each (gloo collectives): three members
    over four devices (padded to four), against the same sweep in this one process."""
    argv = CLI_FAST + ["--over", "eps=1e-2,1e-3,1e-4", "--quiet"]
    assert sweep_main(argv + ["--out", str(tmp_path / "single")]) == 0
    env = os.environ | {
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
        "GFLOW_CACHE_DIR": str(tmp_path / "cache"),
    }
    coordinator = f"localhost:{_free_port()}"
    argv = [a for a in argv if a != "--quiet"]
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "gflow.sweep", *argv, "--out", str(tmp_path / f"p{i}"),
             "--distributed", "--coordinator", coordinator, "--num-processes", "2",
             "--process-id", str(i)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]
    try:
        done = [p.communicate(timeout=600) for p in processes]
    finally:
        for p in processes:
            p.kill()
    for p, (_, err) in zip(processes, done):
        assert p.returncode == 0, err[-2000:]
    # Process 0 alone reports (gloo's own connection lines go to both stdouts, interleaved).
    for marker in ("[1/3] eps=0.01", "[3/3] eps=0.0001", "members     3", "written     "):
        assert marker in done[0][0] and marker not in done[1][0]
    assert not (tmp_path / "p1").exists()  # ... and writes
    summary = json.loads((tmp_path / "p0" / "sweep.json").read_text())
    group = summary["groups"][0]
    assert (group["size"], group["devices"], group["processes"]) == (3, 4, 2)
    single = json.loads((tmp_path / "single" / "sweep.json").read_text())
    assert single["groups"][0]["processes"] == 1
    for many, one in zip(summary["members"], single["members"], strict=True):
        assert many["point"] == one["point"] and many["status"] == one["status"] == "completed"
        for name, t in one["transitions"].items():
            assert many["transitions"][name] == pytest.approx(t, rel=10 * RTOL)
    assert (tmp_path / "p0" / "figures" / "mode1_learned_vs_eps.png").exists()


# ---------------------------------------------------------------------------------------------
# Slow study: the rank-collapse model's stage-1 escape time scales like 1/eps.


@pytest.mark.slow
def test_rank_collapse_escape_time_scales_like_inverse_eps():
    from gflow import presets
    from gflow.models import exponential_loss

    def make(eps, seed):
        overrides = [f"problem.eps={eps}", f"problem.seed={seed}"]
        return presets.build(presets.resolve("rank-collapse-binary", overrides)).flow

    # Escape from the small-init plateau: the loss (≈ 1 at init) falls to half.
    escape = gflow.Transition(
        "escape", lambda m, d: exponential_loss(m, d) - 0.5, direction=False
    )
    result = sweep(make, {"eps": list(np.geomspace(1e-3, 1e-4, 5)), "seed": [8, 1]}, 40000.0,
                   transitions=[escape])
    assert all(m.completed for m in result)
    fit = result.fit("escape", against="eps", law="power", expected=-1.0)
    assert fit.rel_error < 0.05
