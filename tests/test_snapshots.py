"""Snapshot observers (`gflow.solve(..., snapshots=..., snapshot_ts=...)`): evaluated at t0,
at each located transition, at the chosen times and at the end only, and equal there to the
same observer evaluated as an ordinary one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gflow
from gflow import measures
from gflow import observers as O
from gflow.figures import spectral_order

RTOL = 1e-8
# The snapshot and the ordinary observation of one state are the same function of the same
# numbers (at a chosen time, the same dense-output interpolation): equal to rounding.
ROUNDING = 1e-12


def _flow():
    """A two-layer linear network learning a diagonal map from small init: its singular
    values rise one after another (saddle-to-saddle), a transition at the loss's half."""
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    X = jax.random.normal(k1, (20, 4))
    Y = X @ jnp.diag(jnp.array([3.0, 2.0, 1.0, 0.5]))
    model = (1e-3 * jax.random.normal(k2, (4, 4)), 1e-3 * jax.random.normal(k3, (4, 4)))

    def loss(m, data):
        X, Y = data
        return 0.5 * jnp.mean(jnp.sum((X @ m[0] @ m[1] - Y) ** 2, -1))

    flow = gflow.GradientFlow(model, loss, (X, Y))
    half = 0.5 * float(loss(model, (X, Y)))
    return flow, gflow.Transition("half", lambda m, d: loss(m, d) - half)


def _product(m):
    return m[0] @ m[1]


SPECTRUM = O.singular_values(_product)


def test_snapshots_where_read_and_equal_to_ordinary_observations():
    flow, half = _flow()
    chosen = [5.0, 12.5]
    traj = gflow.solve(flow, 20.0, rtol=RTOL, observers={"sv": SPECTRUM},
                       snapshots={"sv_snapshot": SPECTRUM, "cosine": O.cosine_matrix(
                           lambda m: m[0], "rows", ordered=False)},
                       snapshot_ts=chosen, transitions=[half])
    t_half = traj.transitions["half"]
    assert traj.completed and 0 < t_half < chosen[0]
    assert traj.snapshot_labels == ("t0", "half", "", "", "end")
    np.testing.assert_array_equal(traj.snapshot_ts, [0.0, t_half, 5.0, 12.5, 20.0])
    assert traj.snapshots["cosine"].shape == (5, 4, 4)
    snap = traj.snapshots["sv_snapshot"]
    # At the transition: the located state, as the ordinary observer saw it there.
    np.testing.assert_allclose(traj.snapshot("half")["sv_snapshot"],
                               traj.at_transitions["half"]["sv"], rtol=ROUNDING)
    # At t0 and at the end: the initial and the final state.
    np.testing.assert_allclose(snap[0], SPECTRUM(flow.model), rtol=ROUNDING)
    np.testing.assert_allclose(snap[-1], SPECTRUM(traj.final), rtol=ROUNDING)
    # At a chosen time: what a save time there records (save times do not change the steps).
    saved = gflow.solve(flow, 20.0, rtol=RTOL, observers={"sv": SPECTRUM}, ts=chosen,
                        transitions=[half])
    np.testing.assert_allclose(snap[2:4], saved.observables["sv"], rtol=ROUNDING)
    # Not in the ordinary observables, and no snapshot at the other save times.
    assert set(traj.observables) == {"loss", "sv"}
    assert traj.stats["num_steps"] == saved.stats["num_steps"]


def test_snapshots_are_evaluated_only_where_they_are_taken():
    """The snapshot observer runs once per snapshot taken (a host callback counts), none at
    the 200 ordinary save times."""
    flow, half = _flow()
    calls = []

    def counted(m, data):
        jax.debug.callback(lambda: calls.append(1))
        return SPECTRUM(m)

    traj = gflow.solve(flow, 20.0, rtol=RTOL, snapshots={"sv": counted},
                       snapshot_ts=[1.0, 10.0], transitions=[half])
    jax.effects_barrier()
    assert len(traj.ts) == 200 and len(traj.snapshot_labels) == 5
    assert len(calls) == 5


def test_snapshots_round_trip_and_export(tmp_path):
    flow, half = _flow()
    cosine = O.stored_as(O.cosine_matrix(lambda m: m[0], "rows", ordered=False), jnp.float32)
    traj = gflow.solve(flow, 20.0, rtol=RTOL, snapshots={"sv": SPECTRUM, "cos": cosine},
                       snapshot_ts=[10.0], transitions=[half])
    assert traj.snapshots["cos"].dtype == np.float32  # stored in the precision it is read in
    memory = traj.memory()
    assert memory["per_snapshot"] == 4 * 8 + 16 * 4 and memory["per_save_time"] == 8
    loaded = gflow.load(traj.save(tmp_path / "run"))
    assert loaded.snapshot_labels == traj.snapshot_labels
    np.testing.assert_array_equal(loaded.snapshot_ts, traj.snapshot_ts)
    for name in ("sv", "cos"):
        np.testing.assert_array_equal(loaded.snapshots[name], traj.snapshots[name])
        assert loaded.snapshots[name].dtype == traj.snapshots[name].dtype
    ds = loaded.to_xarray()
    assert list(ds["snapshot_label"].values) == list(traj.snapshot_labels)
    assert ds["sv"].dims[0] == "snapshot" and ds["loss"].dims == ("t",)
    assert "snapshots:" in repr(loaded)
    # A later save without snapshots removes the file this one wrote.
    plain = gflow.solve(flow, 20.0, rtol=RTOL)
    plain.save(tmp_path / "run")
    assert not (tmp_path / "run" / "snapshots.npz").exists()
    assert gflow.load(tmp_path / "run").snapshots == {}


def test_a_run_cut_short_keeps_the_snapshots_it_reached():
    flow, half = _flow()
    traj = gflow.solve(flow, 20.0, rtol=RTOL, snapshots={"sv": SPECTRUM},
                       snapshot_ts=[1.0, 10.0], transitions=[half], max_steps=12)
    assert traj.status == "max_steps" and traj.t_final < 20.0
    assert "end" not in traj.snapshot_labels
    assert all(t <= traj.t_final for t in traj.snapshot_ts)
    assert not np.any(np.isnan(traj.snapshots["sv"]))


def test_sweep_members_carry_their_snapshots():
    flow, half = _flow()
    options = dict(rtol=RTOL, snapshots={"sv": SPECTRUM}, snapshot_ts=[10.0],
                   transitions=[half])
    sweep = gflow.sweep(lambda scale: gflow.GradientFlow(
        tuple(scale * w for w in flow.model), flow.loss, flow.data), {"scale": [1.0, 2.0]},
        20.0, keep_trajectories=True, batch="map", **options)
    alone = gflow.solve(gflow.GradientFlow(tuple(2.0 * w for w in flow.model), flow.loss,
                                           flow.data), 20.0, **options)
    member = sweep.members[1].trajectory
    assert member.snapshot_labels == alone.snapshot_labels
    np.testing.assert_allclose(member.snapshots["sv"], alone.snapshots["sv"], rtol=ROUNDING)


@pytest.mark.parametrize("options, message", [
    (dict(snapshot_ts=[25.0]), "snapshot_ts: 25 lies outside [t0, t1] = [0, 20]"),
    (dict(snapshot_ts=[-1.0]), "snapshot_ts: -1 lies outside"),
    (dict(snapshot_ts=[float("nan")]), "snapshot_ts has non-finite times"),
    (dict(snapshot_ts=[[1.0]]), "snapshot_ts must be a 1-d array"),
    (dict(snapshots={"loss": SPECTRUM}), "snapshot 'loss' is also an observer's name"),
    (dict(snapshots={"sv": SPECTRUM}, observers={"sv": SPECTRUM}),
     "snapshot 'sv' is also an observer's name"),
    (dict(snapshots={"sv": 3}), "snapshot 'sv' must be callable"),
    (dict(snapshots=None, snapshot_ts=[1.0]), "snapshot_ts given without snapshots"),
])
def test_bad_snapshots_are_refused_in_one_line(options, message):
    flow, _ = _flow()
    options = dict(snapshots={"sv": SPECTRUM}) | options
    with pytest.raises(gflow.InputError) as e:
        gflow.solve(flow, 20.0, **options)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_spectral_order_on_the_host_is_the_measures_order():
    W = np.random.default_rng(3).normal(size=(12, 5))
    C = np.asarray(measures.cosine_matrix(W, "rows"))
    np.testing.assert_array_equal(spectral_order(C), measures.leading_eigenvector_order(C))
    order = spectral_order(C)
    np.testing.assert_allclose(C[order][:, order], measures.ordered_cosine_matrix(W, "rows"),
                               rtol=1e-12, atol=1e-12)


def test_certify_bounds_the_snapshots_error():
    """certify's error bars cover the snapshots too: at every place a snapshot was taken (t0,
    the transition at its located state, the chosen times, the end) the bar bounds the actual
    error against a solve at 1e-4 × the tolerance."""
    flow, half = _flow()
    options = dict(observers={"sv": SPECTRUM}, snapshots={"sv_snapshot": SPECTRUM},
                   snapshot_ts=[5.0, 12.5], transitions=[half])
    rtol = 1e-5
    traj = gflow.solve(flow, 20.0, rtol=rtol, certify=True, **options)
    truth = gflow.solve(flow, 20.0, rtol=rtol * 1e-4, **options)
    assert traj.snapshot_labels == truth.snapshot_labels == ("t0", "half", "", "", "end")
    bar = traj.errors["snapshots"]["sv_snapshot"]
    actual = np.max(np.abs(traj.snapshots["sv_snapshot"] - truth.snapshots["sv_snapshot"]))
    assert 0 < actual <= bar
    # The bar is an estimate of this error, not a bound by orders of magnitude.
    assert bar < 100 * actual
    # As for the ordinary observables over the save times.
    assert traj.errors["observables"]["sv"] > 0
