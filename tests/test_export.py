"""Results to keep working with: short reprs, notebook tables, xarray and pandas exports, the
component names in trajectory.npz, and the compilation cache of scripts and notebooks."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gflow

ROOT = Path(__file__).parents[1]


class Pair(eqx.Module):
    a: jax.Array
    w: jax.Array


def _loss(m, data):
    return 0.5 * jnp.sum((data - m.a * m.w) ** 2)


@pytest.fixture(scope="module")
def traj():
    """A two-layer scalar-product flow with a vector, a matrix and a nested observable."""
    flow = gflow.GradientFlow(Pair(jnp.array(1e-2), jnp.full(3, 1e-2)), _loss,
                              jnp.array([3.0, 2.0, 1.0]))
    observers = {
        "w": lambda m, d: m.w,
        "outer": lambda m, d: jnp.outer(m.w, m.w),
        "parts": lambda m, d: {"a": m.a, "w0": m.w[0]},  # a pytree-valued observer
    }
    result = gflow.solve(flow, 10.0, rtol=1e-8, observers=observers,
                         ts=gflow.linear_grid(0.0, 10.0, 50),
                         transitions=[gflow.Transition("half", lambda m, d: m.a * m.w[0] - 1.5,
                                                       direction=True),
                                      gflow.Transition("never", lambda m, d: m.a - 1e6)])
    import dataclasses

    return dataclasses.replace(result, components={"w": ("x", "y", "z")})


def test_repr_is_a_few_lines_with_shapes_status_and_transitions(traj):
    text = repr(traj)
    assert len(text) <= 1000 and len(text.splitlines()) <= 6
    assert "completed" in text and "w (50, 3)" in text and "outer (50, 3, 3)" in text
    assert "half=" in text and "never=not reached" in text
    t = float(re.search(r"half=([0-9.e+-]+)", text)[1])
    assert t == pytest.approx(traj.transitions["half"], rel=1e-5)
    html = traj._repr_html_()
    assert html.startswith("<b>gflow.Trajectory</b><table>") and "parts/a (50,)" in html


def test_repr_of_many_observables_stays_short(traj):
    import dataclasses

    many = {f"observable_number_{k}": np.zeros((400, 5)) for k in range(300)}
    crowded = dataclasses.replace(traj, observables=many, ts=np.zeros(400),
                                  transitions={f"transition_{k}": float(k) for k in range(50)})
    text = repr(crowded)
    assert len(text) <= 1000 and "(+" in text and "more)" in text


def test_to_xarray_round_trips_every_observable_with_component_names(traj, tmp_path):
    ds = traj.to_xarray()
    np.testing.assert_array_equal(ds["t"].values, traj.ts)
    np.testing.assert_array_equal(ds["w"].values, traj.observables["w"])
    assert list(ds["w"].dims) == ["t", "w_component"]
    assert list(ds["w_component"].values) == ["x", "y", "z"]
    np.testing.assert_array_equal(ds["w"].sel(w_component="y").values, traj.observables["w"][:, 1])
    np.testing.assert_array_equal(ds["outer"].values, traj.observables["outer"])
    np.testing.assert_array_equal(ds["parts/a"].values, traj.observables["parts"]["a"])
    assert ds.attrs["transition/half"] == traj.transitions["half"]
    # Through a run directory: the names are stored in trajectory.npz and read back.
    traj.save(tmp_path / "run")
    loaded = gflow.load(tmp_path / "run")
    assert loaded.components == {"w": ("x", "y", "z")}
    again = loaded.to_xarray()
    for name in ds.data_vars:
        np.testing.assert_array_equal(again[name].values, ds[name].values)
    assert list(again["w_component"].values) == ["x", "y", "z"]


def test_run_directories_without_component_names_still_load(traj, tmp_path):
    run = traj.save(tmp_path / "run")
    with np.load(run / "trajectory.npz") as npz:
        old = {k: npz[k] for k in npz.files if not k.startswith("components::")}
    assert set(old) == {"t", "loss", "w", "outer", "parts/a", "parts/w0"}
    np.savez(run / "trajectory.npz", **old)  # as gflow wrote it before component names
    loaded = gflow.load(run)
    assert loaded.components == {} and set(loaded.observables) == {"loss", "w", "outer", "parts"}
    assert list(loaded.to_xarray()["w"].dims) == ["t", "w_dim1"]


def test_sweep_repr_table_and_pandas():
    def flow_of(eps):
        return gflow.GradientFlow(Pair(jnp.array(eps), jnp.full(3, eps)), _loss,
                                  jnp.array([3.0, 2.0, 1.0]))
    result = gflow.sweep(flow_of, {"eps": [1e-2, 1e-3, 1e-4]}, t1=20.0, rtol=1e-8,
                         observers={"w": lambda m, d: m.w},
                         transitions=[gflow.Transition("half", lambda m, d: m.a * m.w[0] - 1.5,
                                                       direction=True)])
    text = repr(result)
    assert len(text.splitlines()) <= 4 and "3 members" in text and "half 3/3" in text
    frame = result.to_pandas()
    assert list(frame.columns) == ["eps", "status", "half", "t_final", "steps", "final_loss",
                                   "final_w_0", "final_w_1", "final_w_2"]
    for row, member in zip(frame.itertuples(), result.members):
        assert row.half == member.transitions["half"]
        np.testing.assert_array_equal([row.final_w_0, row.final_w_1, row.final_w_2],
                                      member.final["w"])
    assert "<table>" in result._repr_html_()


_README_EXAMPLE = """
import jax.monitoring
events = {}
jax.monitoring.register_event_listener(
    lambda name, **kw: events.__setitem__(name, events.get(name, 0) + 1))
import os
os.chdir(sys.argv[1])
exec(compile(CODE, "README.md", "exec"))
print(json.dumps(events))
"""


def test_second_run_of_the_readme_example_compiles_nothing(tmp_path):
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(import gflow.*?)```", readme, re.S).group(1)
    script = "import json, sys\nCODE = " + repr(code) + _README_EXAMPLE
    env = {"GFLOW_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT),
           "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu", "HOME": str(tmp_path)}
    runs = []
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env,
                             capture_output=True, text=True, timeout=300, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    first, second = runs
    misses = "/jax/compilation_cache/cache_misses"
    hits = "/jax/compilation_cache/cache_hits"
    requests = "/jax/compilation_cache/compile_requests_use_cache"
    assert first.get(misses, 0) > 0  # the first process compiled and wrote its programs
    # The second compiled nothing: every program it needed came from the cache.
    assert second.get(misses, 0) == 0 and second[hits] == second[requests] > 0


def test_cache_directory_follows_each_process_own_setting(tmp_path):
    # A child process inherits gflow's choice for its parent and follows its own
    # GFLOW_CACHE_DIR; "" turns the default off; a JAX_COMPILATION_CACHE_DIR of the user's wins.
    probe = "import gflow, jax; print(jax.config.jax_compilation_cache_dir)"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMP", "GFLOW_"))}
    parent = dict(base, GFLOW_CACHE_DIR=str(tmp_path / "parent"))
    out = subprocess.run(
        [sys.executable, "-c", "import os, subprocess, sys; import gflow; "
         f"os.environ['GFLOW_CACHE_DIR'] = {str(tmp_path / 'child')!r}; "
         f"subprocess.run([sys.executable, '-c', {probe!r}], check=True)"],
        env=parent, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(tmp_path / "child")
    off = subprocess.run([sys.executable, "-c", probe], env=dict(base, GFLOW_CACHE_DIR=""),
                         capture_output=True, text=True, check=True)
    assert off.stdout.strip() == "None"
    own = subprocess.run([sys.executable, "-c", probe],
                         env=dict(base, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "own")),
                         capture_output=True, text=True, check=True)
    assert own.stdout.strip() == str(tmp_path / "own")
