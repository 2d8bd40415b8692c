"""`gflow.models.DeepLinear` and the linear closed forms of `gflow.theory`."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.integrate import solve_ivp

import gflow
from gflow import presets
# Private: the in-process command line, exactly what the console script `gflow-solve` runs.
from gflow._cli import main
from gflow.models import DeepLinear, deep_linear_loss, whitened_target
from gflow.theory import deep_mode_rate, saxe_half_rise_time, saxe_mode, two_layer_learning_times


def test_whitened_target_has_the_given_singular_values():
    S = whitened_target([3.0, 2.0, 0.5], (5, 4), jax.random.key(0))
    np.testing.assert_allclose(np.linalg.svd(S, compute_uv=False)[:3], [3.0, 2.0, 0.5], rtol=1e-12)
    assert np.linalg.matrix_rank(np.asarray(S)) == 3


def test_product_and_loss_against_numpy():
    model = DeepLinear.random((3, 4, 5, 2), 0.7, jax.random.key(1))
    W1, W2, W3 = (np.asarray(w) for w in model.weights)
    S = np.arange(6.0).reshape(2, 3)
    np.testing.assert_allclose(model.product(), W3 @ W2 @ W1, rtol=1e-13)
    assert model.dims == (3, 4, 5, 2)
    np.testing.assert_allclose(deep_linear_loss(model, S), 0.5 * np.sum((S - W3 @ W2 @ W1) ** 2))
    # ∂L/∂W1 = −(W3W2)ᵀ (S − P): check the autodiff gradient by hand.
    grad = jax.grad(deep_linear_loss)(model, jnp.asarray(S)).weights[0]
    np.testing.assert_allclose(grad, -(W3 @ W2).T @ (S - W3 @ W2 @ W1), rtol=1e-12)


def test_balanced_aligned_init_is_balanced_and_aligned():
    S = whitened_target([2.0, 1.0], (4, 4), jax.random.key(2))
    model = DeepLinear.balanced_aligned(S, depth=3, u0=[0.1, 0.05], hidden=5)
    U, s, Vt = np.linalg.svd(np.asarray(S))
    modes = np.diag(U[:, :2].T @ np.asarray(model.product()) @ Vt[:2].T)
    np.testing.assert_allclose(modes, [0.1, 0.05], rtol=1e-12)
    W = [np.asarray(w) for w in model.weights]
    for a, b in zip(W[:-1], W[1:]):
        np.testing.assert_allclose(a @ a.T, b.T @ b, atol=1e-14)


def test_shape_validation():
    with pytest.raises(gflow.InputError, match="do not chain"):
        DeepLinear([jnp.ones((3, 2)), jnp.ones((4, 4))])
    with pytest.raises(gflow.InputError, match="must be a matrix"):
        DeepLinear([jnp.ones(3)])


def test_saxe_closed_form_solves_its_ode():
    s, u0 = 2.0, 1e-3
    ref = solve_ivp(lambda t, u: 2 * u * (s - u), (0, 5), [u0], rtol=1e-12, atol=1e-15,
                    t_eval=np.linspace(0, 5, 11))
    np.testing.assert_allclose(saxe_mode(ref.t, s, u0), ref.y[0], rtol=1e-9)
    np.testing.assert_allclose(saxe_mode(saxe_half_rise_time(s, u0), s, u0), s / 2, rtol=1e-12)
    np.testing.assert_allclose(deep_mode_rate(0.3, s, 2), 2 * 0.3 * (s - 0.3))


def test_deep_chain_mode_ode_matches_the_flow():
    # Depth 3 on the balanced aligned manifold: du/dt = 3 u^{4/3} (s − u).
    S = whitened_target([1.5], (3, 3), jax.random.key(4))
    u0 = 0.02
    model = DeepLinear.balanced_aligned(S, depth=3, u0=u0)
    U, _, Vt = np.linalg.svd(np.asarray(S))
    u_obs = lambda m, d: jnp.asarray(U[:, 0]) @ m.product() @ jnp.asarray(Vt[0])
    ts = gflow.linear_grid(0.0, 6.0, 13)
    traj = gflow.solve(gflow.GradientFlow(model, deep_linear_loss, S), 6.0, ts=ts, rtol=1e-10,
                       observers={"u": u_obs})
    ref = solve_ivp(lambda t, u: deep_mode_rate(u, 1.5, 3), (0, 6), [u0], t_eval=ts,
                    rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(traj.observables["u"], ref.y[0], rtol=1e-7)


def test_two_layer_learning_times_reduce_to_saxe_on_the_aligned_manifold():
    S = whitened_target([3.0, 1.0], (4, 4), jax.random.key(5))
    model = DeepLinear.balanced_aligned(S, depth=2, u0=1e-4)
    times, s, u0 = two_layer_learning_times(*model.weights, S)
    np.testing.assert_allclose(u0, 1e-4, rtol=1e-10)
    np.testing.assert_allclose(times, [saxe_half_rise_time(3.0, 1e-4), saxe_half_rise_time(1.0, 1e-4)])


def test_preset_draws_saxe_curves_over_the_measured_singular_values(tmp_path):
    """The deep-linear figure's dashed curves are Saxe's closed form at the save times, from the
    u0 of the preset's own t½ predictions; the exact flow's rise follows them to first order
    in the init."""
    out = tmp_path / "run"
    assert main(["deep-linear", "--out", str(out), "--quiet", "--no-certify"]) == 0
    # Strict JSON: no NaN or Infinity anywhere.
    summary = json.loads((out / "summary.json").read_text(), parse_constant=_refuse)
    problem = presets.build(presets.resolve("deep-linear"))
    _, s, u0 = two_layer_learning_times(*problem.flow.model.weights, problem.flow.data)
    traj = gflow.load(out)
    ts, measured = traj.ts, traj.observables["singular_values"]
    references = summary["references"]["singular_values"]
    assert {references[f"s_{k + 1}"] for k in range(4)} == {4.0, 3.0, 2.0, 1.0}
    # One curve per mode, in the order of the singular values they follow.
    labels = [f"Saxe s={s_k:g} (first order in init)" for s_k in s]
    assert [label for label, v in references.items() if isinstance(v, list)] == labels
    fine = np.linspace(0.0, traj.t1, 400_001)
    for k, (s_k, u0_k, label) in enumerate(zip(s, u0, labels)):
        curve = np.asarray(references[label])
        np.testing.assert_allclose(curve, saxe_mode(ts, s_k, u0_k), rtol=1e-12, atol=0)
        np.testing.assert_array_equal(traj.references["singular_values"][label], curve)
        # Over the rise (1% to 99% of s_k) the measured singular value k reaches each level
        # within 5e-2 relative of the time the curve does (the t½ predictions, the same
        # theory at s_k/2, are off by 5e-4 … 1.8e-2; a wrong u0, time convention or
        # mode order is off by far more).
        m = measured[:, k]
        rise = (m > 0.01 * s_k) & (m < 0.99 * s_k)
        assert rise.sum() >= 10
        t_theory = np.interp(np.log(m[rise]), np.log(saxe_mode(fine, s_k, u0_k)), fine)
        assert np.max(np.abs(t_theory - ts[rise]) / ts[rise]) < 5e-2, label
        # Learned: both at s_k by the end.
        assert abs(curve[-1] - m[-1]) < 1e-4 * s_k
    assert (out / "figures" / "singular_values.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_preset_saxe_curves_are_exact_on_the_aligned_manifold():
    # Balanced, SVD-aligned init: the closed form is the exact flow, so the curves match the
    # measured singular values to the solver's accuracy (rtol 1e-8), at every save time.
    resolved = presets.resolve("deep-linear", [
        "problem.init='aligned'", "problem.width=6", "problem.singular_values=[3.0, 1.5]",
        "solve.save_points=40", "solve.t1=6", "solve.certify=false"])
    _, traj = presets.run(resolved)
    references = traj.references["singular_values"]
    measured = traj.observables["singular_values"]
    for k, label in enumerate(["Saxe s=3 (exact)", "Saxe s=1.5 (exact)"]):
        np.testing.assert_allclose(references[label], measured[:, k], rtol=100 * traj.rtol)


def test_preset_conditions_have_the_sign_and_roots_of_the_singular_values():
    # The preset's conditions skip the SVD where an upper bound of σ_k certifies the sign:
    # along the flow they must have the sign of σ_k − s_k/2, never lie below it, equal it
    # where it is positive (the bound is then above the level), and be located where σ_k
    # (computed by an SVD at the located state) is s_k/2.
    problem = presets.build(presets.resolve("deep-linear", ["solve.t1=12"]))
    conditions = [tr.condition for tr in problem.transitions]
    s = np.sort(np.linalg.svd(np.asarray(problem.flow.data), compute_uv=False))[::-1][:4]
    rtol = 1e-10
    observers = {f"c{k}": c for k, c in enumerate(conditions)} | {
        "sv": lambda m, d: jnp.linalg.svd(m.product(), compute_uv=False)[:4]}
    traj = gflow.solve(problem.flow, 12.0, rtol=rtol, ts=gflow.linear_grid(0.0, 12.0, 241),
                       observers=observers, transitions=problem.transitions)
    exact = traj.observables["sv"] - s / 2
    for k, tr in enumerate(problem.transitions):
        value = traj.observables[f"c{k}"]
        assert np.all(np.sign(value) == np.sign(exact[:, k])), k
        assert np.all(value >= exact[:, k] - 1e-12), k
        above = exact[:, k] >= 0
        assert above.any() and not above.all(), k
        np.testing.assert_allclose(value[above], exact[above, k], rtol=1e-12, atol=1e-14)
        at_root = traj.at_transitions[tr.name]["sv"][k]
        assert abs(at_root - s[k] / 2) <= 100 * rtol * s[k], k


def _refuse(constant):
    raise ValueError(f"summary.json holds {constant}")
