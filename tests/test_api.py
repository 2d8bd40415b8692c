"""The public names: `gflow.solve` and `gflow.sweep` stay the functions whatever is imported,
the command lines and console scripts, dtypes, diffrax's vocabulary."""

import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gflow
from gflow.models import DeepLinear, deep_linear_loss

ROOT = Path(__file__).parent.parent


def test_importing_the_command_line_modules_keeps_the_functions():
    import gflow.solve  # noqa: F401  (the command-line module's name)
    import gflow.sweep  # noqa: F401

    assert callable(gflow.solve) and gflow.solve.__name__ == "solve"
    assert callable(gflow.sweep) and gflow.sweep.__name__ == "sweep"
    from gflow import solve, sweep

    assert solve is gflow.solve and sweep is gflow.sweep


@pytest.mark.parametrize("module", ["gflow.solve", "gflow.sweep", "gflow.plot"])
def test_python_dash_m_still_runs_the_command_lines(module):
    done = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout


def test_packaging_declares_what_the_code_uses():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"] == {
        "gflow-solve": "gflow._cli:main",
        "gflow-sweep": "gflow._sweep_cli:main",
        "gflow-plot": "gflow.plot:main",
    }
    names = [d.split(">")[0].split("=")[0].strip() for d in project["dependencies"]]
    assert {"optimistix", "lineax"} <= set(names) and "optax" not in names
    assert project["requires-python"] == ">=3.11"


def _flow(dtypes, target):
    model = DeepLinear.balanced_aligned(target, depth=2, u0=1e-3)
    weights = [np.asarray(np.asarray(w, np.float32), d) for w, d in zip(model.weights, dtypes)]
    return gflow.GradientFlow(DeepLinear(weights), deep_linear_loss, target)


@pytest.mark.parametrize("dtypes, leaf", [
    ((np.float32, np.float32), ".weights[0] and 1 more"),
    ((np.float64, np.float32), ".weights[1]"),  # mixed precision
])
def test_float32_leaves_are_promoted_with_a_one_line_warning(saxe_target, dtypes, leaf):
    reference = gflow.solve(_flow((np.float64, np.float64), saxe_target), 2.0, rtol=1e-8)
    with pytest.warns(UserWarning) as caught:
        traj = gflow.solve(_flow(dtypes, jnp.asarray(saxe_target)), 2.0, rtol=1e-8)
    (warning,) = [w for w in caught if "promoted" in str(w.message)]
    message = str(warning.message)
    assert "\n" not in message and f"float32 leaf {leaf} promoted to float64" in message
    assert traj.stats["dtype"] == "float64" and traj.final.weights[1].dtype == jnp.float64
    # The same (float32-representable) init in float64: the very same solve.
    np.testing.assert_array_equal(traj.observables["loss"], reference.observables["loss"])


def test_a_float64_model_solves_without_a_warning(saxe_flow):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gflow.solve(saxe_flow, 1.0)


def test_stepsize_controller_its_tolerances_are_recorded_and_certify_tightens_it(random_flow):
    controller = diffrax.PIDController(rtol=1e-7, atol=1e-10, pcoeff=0.1, icoeff=0.4)
    traj = gflow.solve(random_flow, 2.0, stepsize_controller=controller, certify=True,
                       ts=gflow.linear_grid(0.0, 2.0, 5), progress_meter=diffrax.NoProgressMeter())
    assert traj.status == "completed"
    assert (traj.rtol, traj.atol) == (1e-7, 1e-10)  # the controller's, not the defaults
    assert traj.errors["reference_rtol"] == pytest.approx(1e-9)
    # The reference kept the user's controller (the same compiled program).
    assert traj.errors["reference_stats"]["compile_seconds"] == 0.0
    plain = gflow.solve(random_flow, 2.0, rtol=1e-7, atol=1e-10, ts=gflow.linear_grid(0.0, 2.0, 5))
    # A different controller (PI coefficients), the same flow: equal within its tolerance.
    np.testing.assert_allclose(traj.observables["loss"], plain.observables["loss"], rtol=1e-5)
    assert traj.stats["num_steps"] != plain.stats["num_steps"]
    alias = gflow.solve(random_flow, 2.0, controller=controller, ts=gflow.linear_grid(0.0, 2.0, 5))
    np.testing.assert_array_equal(alias.observables["loss"], traj.observables["loss"])
    with pytest.raises(gflow.InputError, match="not both"):
        gflow.solve(random_flow, 1.0, controller=controller, stepsize_controller=controller)
    with pytest.raises(gflow.InputError, match="stepsize_controller must be a diffrax"):
        gflow.solve(random_flow, 1.0, stepsize_controller="pid")
