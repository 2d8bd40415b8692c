"""`Trajectory.save` and `gflow.load`: a faithful round trip through the run directory."""

import json
import math

import numpy as np
import pytest

import gflow


def test_save_load_round_trip(random_flow, tmp_path):
    traj = gflow.solve(
        random_flow, 2.0, rtol=1e-9,
        observers={"nested": lambda m, d: {"a": m.product(), "b": m.weights[0]}},
        transitions=[gflow.Transition("never", lambda m, d: 1.0 + 0 * m.weights[0][0, 0])],
    )
    path = traj.save(tmp_path / "run")
    back = gflow.load(path, like=random_flow.model)
    np.testing.assert_array_equal(back.ts, traj.ts)
    np.testing.assert_array_equal(back.observables["nested"]["a"], traj.observables["nested"]["a"])
    np.testing.assert_array_equal(back.observables["loss"], traj.observables["loss"])
    for w_back, w in zip(back.final.weights, traj.final.weights):
        np.testing.assert_array_equal(np.asarray(w_back), np.asarray(w))
    assert math.isnan(back.transitions["never"])
    assert back.status == traj.status and back.stats == traj.stats
    summary = json.loads((path / "summary.json").read_text())
    assert summary["transitions"] == {"never": None}  # JSON has no nan
    assert summary["versions"]["jax"] and summary["rtol"] == 1e-9
    with np.load(path / "trajectory.npz") as npz:
        assert set(npz.files) == {"t", "loss", "nested/a", "nested/b"}


def test_load_rejects_a_directory_that_is_not_a_run(tmp_path):
    with pytest.raises(gflow.InputError, match="not a gflow run directory"):
        gflow.load(tmp_path)


def test_atomic_write_leaves_no_temporary_files(random_flow, tmp_path):
    traj = gflow.solve(random_flow, 1.0)
    traj.save(tmp_path)
    traj.save(tmp_path)  # overwriting is atomic too
    # The manifest: what gflow wrote there (a later save removes its own stale files only).
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".gflow-manifest.json", "final.eqx", "summary.json", "trajectory.npz"
    ]
