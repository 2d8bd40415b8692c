"""Precision policies (`gflow.Precision`): the same init in every precision, certified error
bars that hold against float64, the tolerance floor, and what a run records."""

import json
import math

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest

import gflow
from gflow import presets
from gflow._cli import EXIT_BAD_INPUT, main

# deep-linear at a size that compiles and runs in seconds: two modes (s = 3, 1.5).
SMALL = ["problem.width=6", "problem.singular_values=[3.0, 1.5]", "solve.save_points=40",
         "solve.t1=6"]
CLI = ["deep-linear", "--set", "problem.width=6", "--set", "problem.singular_values=[3.0, 1.5]",
       "--set", "solve.save_points=40", "--t1", "6"]
POLICIES = ("float64", "mixed", "float32")


@pytest.fixture(scope="module")
def problem():
    return presets.build(presets.resolve("deep-linear", SMALL))


def _state(model, data=None):
    """The trainable weights, flattened: observed at t0, it is the solve's initial state."""
    return jnp.concatenate([jnp.ravel(w) for w in model.weights])


def _initial_state(flow, policy):
    traj = gflow.solve(flow, 1e-3, ts=[0.0, 1e-3], rtol=1e-5, precision=policy,
                       observers={"state": _state})
    return np.asarray(traj.observables["state"][0])


@pytest.mark.filterwarnings("ignore:.*promoted")
def test_every_precision_starts_from_float64s_init(problem):
    flow64 = problem.flow
    init64 = np.asarray(_state(flow64.model))
    # A model whose leaves are float32 (what building under JAX's x64 off gives, with the
    # init drawn in float64 and cast).
    flow32 = gflow.GradientFlow(
        jtu.tree_map(lambda x: x.astype(jnp.float32) if hasattr(x, "astype") else x,
                     flow64.model),
        flow64.loss, flow64.data)
    for policy in POLICIES:
        from64, from32 = _initial_state(flow64, policy), _initial_state(flow32, policy)
        if policy == "float32":
            # Bitwise float64's init cast, from either model.
            assert from64.dtype == from32.dtype == np.float32
            np.testing.assert_array_equal(from64, init64.astype(np.float32))
            np.testing.assert_array_equal(from32, init64.astype(np.float32))
        else:
            assert from64.dtype == np.float64
            np.testing.assert_array_equal(from64, init64)  # bitwise, mixed included
            # The float32 model's init is float64's up to float32 rounding, not another draw.
            np.testing.assert_allclose(from32, init64, rtol=np.finfo(np.float32).eps, atol=0)


@pytest.mark.parametrize("policy", ["mixed", "float32"])
def test_certified_bars_cover_the_error_against_float64(problem, policy):
    """Certify's reference runs in float64: its bars cover rounding as well as truncation, so
    every transition's actual error (against a tight float64 solve) is within its bar."""
    kw = dict(observers=problem.observers, transitions=problem.transitions)
    floor, _ = gflow.Precision.of(policy).rtol_floor(problem.flow)
    rtol = 2 * floor
    traj = gflow.solve(problem.flow, 6.0, rtol=rtol, certify=True, precision=policy, **kw)
    exact = gflow.solve(problem.flow, 6.0, rtol=1e-12, **kw)
    assert traj.status == exact.status == "completed"
    assert traj.stats["precision"] == policy and traj.stats["matmul_precision"] == "highest"
    assert traj.stats["dtype"] == ("float32" if policy == "float32" else "float64")
    assert traj.errors["reference_stats"]["dtype"] == "float64"
    assert traj.errors["reference_stats"]["precision"] == "float64"
    assert traj.transitions.keys() == exact.transitions.keys() and traj.transitions
    for name, t in traj.transitions.items():
        actual = abs(t - exact.transitions[name])
        bar = traj.errors["transitions"][name]
        assert actual <= bar, (name, actual, bar)
        # and the bar is an error estimate of the run's tolerance, not a blanket.
        assert bar < 1e3 * rtol * exact.transitions[name], (name, bar)


def test_rtol_below_the_floor_is_refused(problem):
    mixed = gflow.Precision.mixed()
    floor, error = mixed.rtol_floor(problem.flow)
    # float32's epsilon bounds the floor from below; the measured error is float32-sized.
    assert 10 * np.finfo(np.float32).eps <= floor < 1e-4 and 0 < error < 1e-5
    assert gflow.Precision.float64().rtol_floor(problem.flow) == (0.0, 0.0)
    with pytest.raises(gflow.InputError, match="below precision mixed's floor"):
        gflow.solve(problem.flow, 6.0, rtol=floor / 2, precision=mixed)


def test_command_line_refuses_the_floor_and_records_the_precision(tmp_path, capsys):
    refused = tmp_path / "refused"
    assert main(CLI + ["--precision", "mixed", "--out", str(refused)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("gflow: error: rtol=1e-08 is below precision mixed's floor")
    assert err.count("\n") == 1 and not refused.exists()
    out = tmp_path / "mixed"
    assert main(CLI + ["--precision", "mixed", "--rtol", "1e-5", "--out", str(out),
                       "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stats"]["precision"] == "mixed"
    assert summary["stats"]["matmul_precision"] == "highest"
    assert summary["stats"]["backend"] == "cpu"
    assert summary["stats"]["dtype"] == "float64"
    assert "precision = \"mixed\"" in (out / "config.toml").read_text()
    assert all(math.isfinite(t) for t in summary["transitions"].values())


def test_bad_precision_is_one_line(problem):
    with pytest.raises(gflow.InputError, match="precision must be one of"):
        gflow.solve(problem.flow, 6.0, rtol=1e-5, precision="float16")
    with pytest.raises(gflow.InputError, match="matmul precision must be one of"):
        gflow.Precision.mixed("fast")
    with pytest.raises(gflow.InputError, match="takes no matmul"):
        gflow.Precision("float64", "highest")


def test_mixed_computes_the_gradient_in_float32_under_the_matmul_precision(problem):
    """The velocity's program: float32 products at the requested precision, float64 out."""
    flow = problem.flow
    for matmul, name in (("highest", "HIGHEST"), ("default", "DEFAULT")):
        precision = gflow.Precision.mixed(matmul)
        jaxpr = str(jax.make_jaxpr(lambda y: precision.velocity(flow, y))(flow.params))
        dots = [line for line in jaxpr.splitlines() if "dot_general" in line]
        assert dots and all(":f32[" in line for line in dots), dots
        assert f"Precision.{name}" in jaxpr or (name == "DEFAULT" and "precision=None" in jaxpr)
        out = jax.eval_shape(lambda y: precision.velocity(flow, y), flow.params)
        assert all(x.dtype == jnp.float64 for x in jtu.tree_leaves(out))


def test_a_sweep_runs_and_records_its_precision(problem):
    """A sweep member under `mixed` takes the steps of `gflow.solve` under `mixed` (the same
    program per member) and records its precision like a trajectory."""
    rtol = 2 * gflow.Precision.mixed().rtol_floor(problem.flow)[0]
    kw = dict(rtol=rtol, transitions=problem.transitions, precision="mixed")
    result = gflow.sweep(lambda copy: problem.flow, {"copy": [0, 1]}, 6.0, batch="map", **kw)
    traj = gflow.solve(problem.flow, 6.0, **kw)
    for member in result.members:
        assert member.status == "completed"
        assert member.stats["precision"] == "mixed" and member.stats["matmul_precision"] == "highest"
        assert member.stats["num_steps"] == traj.stats["num_steps"]
        for name, t in traj.transitions.items():
            assert member.transitions[name] == pytest.approx(t, rel=10 * rtol)
