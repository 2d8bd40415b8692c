"""`gflow.critical_points` on two-layer linear networks, whose saddles are known in closed form
(docs/science.md §5): with modes `α ≤ k` of `S = Σ s_α u_α v_αᵀ` learned, `W2 W1 = Σ_{α≤k} s_α u_α v_αᵀ`,
`L = ½ Σ_{α>k} s_α²`, and (hidden width `h`, `r` non-zero modes) the Hessian has `(h − k)(r − k)`
negative eigenvalues: one per free hidden unit and unlearned mode."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import gflow
import gflow.presets
from gflow import theory
from gflow.models import DeepLinear, deep_linear_loss, whitened_target

S = (3.0, 1.0)
U0 = 1e-6


def _saddle_product(target, k):
    U, s, Vt = np.linalg.svd(np.asarray(target))
    return (U[:, :k] * s[:k]) @ Vt[:k]


def _dense_eigenvalues(flow, model):
    x, unravel = ravel_pytree(eqx.filter(model, flow.trainable))
    hessian = jax.hessian(lambda z: flow.loss_at(unravel(z)))(x)
    return np.linalg.eigvalsh(np.asarray(hessian))


@pytest.fixture(scope="module")
def aligned_run():
    """A 6x6 target with two modes, a balanced aligned init with 6 hidden units."""
    target = whitened_target(S, (6, 6), jax.random.key(0))
    model = DeepLinear.balanced_aligned(target, depth=2, u0=U0, hidden=6)
    flow = gflow.GradientFlow(model, deep_linear_loss, target)
    t1 = 2 * theory.saxe_half_rise_time(S[-1], U0)
    return flow, gflow.solve(flow, t1, rtol=1e-10)


N_EIGENVALUES = 4


@pytest.fixture(scope="module")
def aligned_points(aligned_run):
    flow, traj = aligned_run
    return gflow.critical_points(traj, flow, n_eigenvalues=N_EIGENVALUES)


# The matrix-free path is forced on this small problem (dense_below=0) to compare it with the
# dense Hessian; it compiles a LOBPCG program per block size, so it runs with -m slow.
@pytest.mark.parametrize("method", ["eigh", pytest.param("lobpcg", marks=pytest.mark.slow)])
def test_saddles_match_closed_form(aligned_run, aligned_points, method):
    flow, traj = aligned_run
    n = N_EIGENVALUES
    if method == "eigh":
        points = aligned_points
    else:
        points = gflow.critical_points(traj, flow, n_eigenvalues=n, dense_below=0)
    # One plateau per stage: the origin, mode 1 learned, both learned (the minimum).
    assert len(points) == 3
    hidden, r = 6, len(S)
    for k, point in enumerate(points):
        assert isinstance(point, gflow.CriticalPoint) and point.method == method
        assert point.converged and point.grad_norm <= 1e-10
        product = np.asarray(point.model.product())
        assert np.max(np.abs(product - _saddle_product(flow.data, k))) < 1e-9
        assert point.loss == pytest.approx(0.5 * sum(s**2 for s in S[k:]), abs=1e-9)
        dense = _dense_eigenvalues(flow, point.model)
        shown = np.asarray(point.eigenvalues)
        if method == "eigh":
            np.testing.assert_allclose(shown, np.concatenate([dense[:n], dense[-n:]]), atol=1e-9)
        else:  # the n most negative and the n most positive
            np.testing.assert_allclose(shown[:n], dense[:n], atol=1e-9)
            np.testing.assert_allclose(shown[-n:], dense[-n:], atol=1e-9)
        expected_index = (hidden - k) * (r - k)
        assert expected_index == int(np.sum(dense < -1e-8))
        if point.index_exact:
            assert point.index == expected_index
        else:  # LOBPCG's widest block (here 8 of 72) held only negative eigenvalues
            assert method == "lobpcg" and n <= point.index < expected_index
    assert points[-1].unstable_eigenvalue is None and points[-1].predicted_exit is None


def test_exit_of_the_first_plateau(aligned_points):
    """The linearised exit of the origin against Saxe's closed form.

    At the origin the unstable eigenvalue is −s₁, the seed's component along its eigenspace is
    `√(2u(t_s))` (both factors carry `√u`), and the drop to the next saddle is `ΔL = s₁²/2`;
    so `t_exit = t_s + ln(√(ΔL/s₁)/√(2u)) / s₁ = t_s + ln(s₁/(4u(t_s))) / (2s₁)`. The measured
    exit (the loss halfway down to the next saddle's) is where `½(s₁ − u)² = s₁²/4`, i.e.
    `u = s₁(1 − 1/√2)` on Saxe's sigmoid.
    """
    origin, *_ = aligned_points
    s1 = S[0]
    u_seed = float(theory.saxe_mode(origin.t, s1, U0))
    assert origin.unstable_eigenvalue == pytest.approx(-s1, abs=1e-9)
    assert origin.unstable_amplitude == pytest.approx(math.sqrt(2 * u_seed), rel=1e-6)
    predicted = origin.t + math.log(s1 / (4 * u_seed)) / (2 * s1)
    assert origin.predicted_exit == pytest.approx(predicted, rel=1e-6)
    u_half = s1 * (1 - 1 / math.sqrt(2))
    # Invert Saxe's sigmoid: e^{2st} = u (s/u0 − 1) / (s − u).
    measured = math.log(u_half * (s1 / U0 - 1) / (s1 - u_half)) / (2 * s1)
    # Linear interpolation of the loss between 200 log-spaced save times.
    assert origin.measured_exit == pytest.approx(measured, rel=2e-3)
    # The linearisation exits early, by ln(0.414/0.25)/(2 s₁) of the ~ln(s₁/u0)/(2s₁) plateau.
    assert 0.9 * measured < origin.predicted_exit < measured


def test_one_point_per_plateau_on_deep_linear_preset():
    """A random small init (ε = 1e-6) learns four modes in four stages: five plateaus (the
    origin, three saddles, the minimum), each refined to its saddle, one between each pair of
    transitions."""
    overrides = ["problem.width=8", "problem.eps=1e-6", "solve.t1=20", "solve.rtol=1e-10"]
    problem, traj = gflow.presets.run(gflow.presets.resolve("deep-linear", overrides))
    s = np.array([4.0, 3.0, 2.0, 1.0])
    points = gflow.critical_points(traj, problem.flow)
    assert len(points) == s.size + 1
    times = [traj.transitions[f"mode{k + 1}_learned"] for k in range(s.size)]
    edges = [traj.t0] + times + [traj.t1]
    for k, point in enumerate(points):
        assert edges[k] <= point.t <= edges[k + 1]
        assert point.converged
        assert point.loss == pytest.approx(0.5 * np.sum(s[k:] ** 2), abs=1e-9)
        assert point.index == (8 - k) * (s.size - k)
        if k < s.size:  # a saddle: escapes along −s_{k+1}
            assert point.unstable_eigenvalue == pytest.approx(-s[k], abs=1e-8)
            assert point.measured_exit is not None and point.t < point.measured_exit
            assert point.predicted_exit == pytest.approx(point.measured_exit, rel=0.1)
    summary = points[0].summary()
    assert summary["index"] == 32 and all(math.isfinite(x) for x in summary["eigenvalues"])


def test_given_times_and_bad_input(aligned_run):
    flow, traj = aligned_run
    t = float(traj.ts[len(traj.ts) // 2])
    (point,) = gflow.critical_points(traj, flow, times=[t])
    assert point.t == t and point.converged
    with pytest.raises(gflow.InputError, match="times"):
        gflow.critical_points(traj, flow, times=[traj.t1 * 2])
    with pytest.raises(gflow.InputError, match="tol"):
        gflow.critical_points(traj, flow, tol=0)
