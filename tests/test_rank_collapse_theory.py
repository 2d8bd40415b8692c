"""Chen & Luo's reduced flows and closed forms: the stage-2 matrix F, the cosh/sinh solution, the
stage-1 invariants and blow-up bound, and the full model against the stage-1 reduced flow."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gflow
from gflow import InputError
from gflow.models import (
    AttentionFFN,
    KeyQueryParameters,
    OuterParameters,
    SequenceData,
    exponential_loss,
    logistic_loss,
    real_time,
    rescaled_time,
    stage1_flow,
    stage1_invariants,
    stage1_loss,
    stage2_flow,
    stage2_loss,
    stage2_matrix,
    target_direction,
)
from gflow.tasks import condensed_stage2_matrix, rank_collapse_task
from gflow.theory import (
    key_query_limit_directions,
    key_query_rates,
    key_query_solution,
    predicted_escape_time,
    stage1_blowup_bound,
    stage1_energy_lower_bound,
)

# A small instance of the rank-collapse task; seed 0 gives E(W̄(0)) = 6.82 > 0 (blow-up bound
# T̄* ≤ 0.527; the reduced flow actually blows up at T̄* ≈ 0.486).
N, S, D = 8, 3, 4
KEY_DATA, KEY_MODEL = jax.random.split(jax.random.PRNGKey(0))


def _data():
    return rank_collapse_task(N, S, D, KEY_DATA)


def _random_problem(seed, n=6, s=4, d=5):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, s, d))
    y = np.array([1.0, -1.0] * (n // 2))
    return X, y


# ---------------------------------------------------------------- target direction, time


def test_target_direction_and_time_rescaling():
    X, y = _random_problem(0)
    m = np.einsum("i,isd->d", y, X)
    v, norm = target_direction(X, y)
    np.testing.assert_allclose(float(norm), np.linalg.norm(m), rtol=1e-14)
    np.testing.assert_allclose(np.asarray(v), m / np.linalg.norm(m), rtol=1e-14)
    eps, t = 1e-3, np.array([0.0, 2.0, 5e3])
    expected = eps * np.linalg.norm(m) / (X.shape[0] * X.shape[1]) * t
    np.testing.assert_allclose(np.asarray(rescaled_time(t, eps, X, y)), expected, rtol=1e-14)
    np.testing.assert_allclose(np.asarray(real_time(expected, eps, X, y)), t, rtol=1e-14)
    # no signal: a zero direction, not nan
    v0, n0 = target_direction(np.zeros((2, 3, 4)), np.array([1.0, -1.0]))
    assert float(n0) == 0.0 and np.all(np.asarray(v0) == 0.0)


# ---------------------------------------------------------------- the stage-2 matrix F


def _papers_F(model, X, y):
    """docs/science.md §1, transcribed literally (identity activation, exponential loss)."""
    n, s, d = X.shape
    W_V, W1, W2 = (np.asarray(a) for a in (model.W_V, model.W1, model.W2))
    F = np.zeros((d, d))
    for i in range(n):
        mean = X[i].mean(axis=0)
        L1 = np.exp(-y[i] * (mean @ W_V @ W1 @ W2))
        inner = sum(np.outer(X[i, j], X[i, j] - mean) for j in range(s))  # Σ_j X_ijᵀ(X_ij − X̄)
        F += y[i] * L1 * np.outer(X[i, -1], (W2 @ W1.T @ W_V.T) @ inner)
    return F / (n * s * math.sqrt(d))


def test_stage2_matrix_is_the_papers_formula():
    X, y = _random_problem(1)
    model = AttentionFFN.init(5, 0.5, jax.random.PRNGKey(3), activation="identity")
    np.testing.assert_allclose(np.asarray(stage2_matrix(model, X, y)), _papers_F(model, X, y),
                               rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(
    "activation,attention,loss",
    list(itertools.product(("identity", "tanh"), ("exact", "linearized"),
                           ("exponential", "logistic"))),
)
def test_stage2_matrix_is_the_first_order_gradient(activation, attention, loss):
    """-∂L/∂W_Q = F W_K and -∂L/∂W_K = Fᵀ W_Q up to a relative error of the order of the
    logits, which scale like δ² when W_Q, W_K are scaled by δ."""
    X, y = _random_problem(2)
    base = AttentionFFN.init(5, 0.7, jax.random.PRNGKey(4), activation=activation,
                             attention=attention)
    F = stage2_matrix(base, X, y, loss=loss)
    loss_fn = exponential_loss if loss == "exponential" else logistic_loss
    residuals = []
    for delta in (1e-3, 1e-4):
        model = AttentionFFN(delta * base.W_Q, delta * base.W_K, base.W_V, base.W1, base.W2,
                             activation=activation, attention=attention)
        grads = jax.grad(loss_fn)(model, SequenceData(X, y))
        rq = jnp.linalg.norm(grads.W_Q + F @ model.W_K) / jnp.linalg.norm(F @ model.W_K)
        rk = jnp.linalg.norm(grads.W_K + F.T @ model.W_Q) / jnp.linalg.norm(F.T @ model.W_Q)
        residuals.append(max(float(rq), float(rk)))
    assert residuals[0] < 1e-4
    np.testing.assert_allclose(residuals[0] / residuals[1], 100.0, rtol=0.02)  # δ² scaling


def test_condensed_stage2_matrix_is_stage2_matrix_at_a_condensed_state():
    data = _data()
    v, _ = target_direction(data.X, data.y)
    delta = 1e-4  # outputs ~δ³: every loss weight is 1 to 1e-12
    model = AttentionFFN(jnp.zeros((D, D)), jnp.zeros((D, D)), delta * jnp.outer(v, v),
                         delta * jnp.eye(D), delta * v, activation="identity")
    np.testing.assert_allclose(np.asarray(stage2_matrix(model, data.X, data.y)) / delta**3,
                               np.asarray(condensed_stage2_matrix(data.X, data.y)), rtol=1e-10)


# ---------------------------------------------------------------- the rank-collapse task


def test_task_labels_balance_and_stage2_gap():
    data = rank_collapse_task(128, 4, 8, jax.random.PRNGKey(1))
    X, y = np.asarray(data.X), np.asarray(data.y)
    assert X.shape == (128, 4, 8) and y.shape == (128,)
    assert np.sum(y == 1) == 64 and np.sum(y == -1) == 64
    np.testing.assert_array_equal(np.sign(X[:, -1, 0]), y)
    v, norm = target_direction(X, y)
    assert float(norm) > 0
    U, sigma, Vh = np.linalg.svd(np.asarray(condensed_stage2_matrix(X, y)))
    # as documented: one dominant singular value, u1 ≈ a = e_1, v1 ≈ v
    assert sigma[1] < 0.5 * sigma[0]
    assert abs(U[0, 0]) > 0.9 and abs(Vh[0] @ np.asarray(v)) > 0.9
    # a custom signal direction is normalized and carries the label
    a = np.array([0.0, 3.0, 4.0, 0.0])
    other = rank_collapse_task(N, S, D, jax.random.PRNGKey(2), signal=a)
    np.testing.assert_array_equal(np.sign(np.asarray(other.X)[:, -1] @ a), np.asarray(other.y))
    assert np.sum(np.asarray(other.y) == 1) == N // 2


@pytest.mark.parametrize(
    "args,kwargs,message",
    [
        ((1, 3, 4), {}, "n must"),
        ((4, 1, 4), {}, "s must"),
        ((4, 3, 1), {}, "d must"),
        ((4, 3, 4), dict(signal=np.zeros(4)), "signal"),
        ((4, 3, 4), dict(signal=np.ones(3)), "signal"),
    ],
)
def test_task_validates(args, kwargs, message):
    with pytest.raises(InputError, match=message):
        rank_collapse_task(*args, jax.random.PRNGKey(0), **kwargs)


# ---------------------------------------------------------------- stage 2: closed form


def _stage2_problem(p=4, q=4, k=4, seed=5):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((p, q)), rng.standard_normal((p, k)), rng.standard_normal((q, k))


@pytest.mark.parametrize("shape", [(4, 4, 4), (3, 5, 2), (5, 3, 4)])
def test_closed_form_solves_the_linear_flow(shape):
    """Independent of any integrator: the initial value and dW/dt = (F W_K, Fᵀ W_Q)."""
    F, Q0, K0 = _stage2_problem(*shape)
    solution = jax.jit(lambda tau: key_query_solution(F, Q0, K0, tau))
    Q, K = solution(0.0)
    np.testing.assert_allclose(np.asarray(Q), Q0, atol=1e-13)
    np.testing.assert_allclose(np.asarray(K), K0, atol=1e-13)
    t = 0.7
    dQ, dK = jax.jit(jax.jacfwd(solution))(jnp.asarray(t))
    Q, K = solution(t)
    np.testing.assert_allclose(np.asarray(dQ), np.asarray(F @ K), rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(np.asarray(dK), np.asarray(F.T @ Q), rtol=1e-11, atol=1e-12)


def test_stage2_flow_matches_closed_form():
    F, Q0, K0 = _stage2_problem()
    sigma1, _ = key_query_rates(F)
    t1 = 6.0 / float(sigma1)  # the leading mode grows by e^6 ≈ 400
    ts = gflow.linear_grid(0.0, t1, 9)
    flow = gflow.GradientFlow(KeyQueryParameters(Q0, K0), stage2_loss, jnp.asarray(F))
    # the flow is -∇(−tr(W_Qᵀ F W_K)): check the vector field once, exactly
    velocity = flow.velocity(flow.params)
    np.testing.assert_allclose(np.asarray(velocity.W_Q), F @ K0, rtol=1e-14)
    np.testing.assert_allclose(np.asarray(velocity.W_K), F.T @ Q0, rtol=1e-14)
    traj = gflow.solve(flow, t1, ts=ts, rtol=1e-10,
                       observers=dict(Q=lambda m, F: m.W_Q, K=lambda m, F: m.W_K))
    assert traj.status == "completed"
    for i, t in enumerate(traj.ts):
        Q, K = key_query_solution(F, Q0, K0, t)
        for measured, exact in ((traj.observables["Q"][i], Q), (traj.observables["K"][i], K)):
            error = np.linalg.norm(measured - np.asarray(exact)) / np.linalg.norm(exact)
            assert error <= 1e-8, (t, error)  # rtol 1e-10 → global error ~1e-9


def test_stage2_threshold_crossing_matches_closed_form():
    # A Transition on ‖W_Q‖_F located by root finding agrees with the closed form's crossing
    # time (found by bisection on the cosh/sinh solution) to 10×rtol.
    from scipy.optimize import brentq

    F, Q0, K0 = _stage2_problem()
    sigma1, _ = key_query_rates(F)
    target = 50.0 * float(np.linalg.norm(Q0))
    rtol = 1e-10
    flow = gflow.GradientFlow(KeyQueryParameters(Q0, K0), stage2_loss, jnp.asarray(F))
    t1 = 8.0 / float(sigma1)
    traj = gflow.solve(flow, t1, rtol=rtol, transitions=[gflow.Transition(
        "grown", lambda m, F: jnp.linalg.norm(m.W_Q) - target, direction=True)])
    exact = brentq(
        lambda t: float(np.linalg.norm(key_query_solution(F, Q0, K0, t)[0])) - target,
        0.0, t1, xtol=1e-15, rtol=1e-15,
    )
    assert abs(traj.transitions["grown"] - exact) <= 10 * rtol * exact


def test_stage2_flow_from_a_full_model():
    data = _data()
    model = AttentionFFN.init(D, 0.3, KEY_MODEL)
    flow = stage2_flow(model, data, loss="logistic")
    F = stage2_matrix(model, data.X, data.y, loss="logistic")
    np.testing.assert_array_equal(np.asarray(flow.data), np.asarray(F))
    velocity = flow.velocity(flow.params)
    np.testing.assert_allclose(np.asarray(velocity.W_Q), np.asarray(F @ model.W_K), rtol=1e-13)
    np.testing.assert_allclose(np.asarray(velocity.W_K), np.asarray(F.T @ model.W_Q), rtol=1e-13)
    # and the stage-1 flow starts from W̄ = W/ε with the target direction as data
    flow1 = stage1_flow(model, data, 0.3)
    np.testing.assert_allclose(np.asarray(flow1.model.W1), np.asarray(model.W1) / 0.3, rtol=1e-15)
    np.testing.assert_allclose(np.asarray(flow1.data),
                               np.asarray(target_direction(data.X, data.y)[0]), rtol=1e-15)
    with pytest.raises(InputError, match="loss"):
        stage2_matrix(model, data.X, data.y, loss="hinge")


def test_limit_directions_and_rank_collapse():
    F, Q0, K0 = _stage2_problem()
    sigma1, gap = key_query_rates(F)
    DQ, DK = key_query_limit_directions(F, Q0, K0)
    np.testing.assert_allclose(float(jnp.linalg.norm(DQ)), 1.0, rtol=1e-14)
    assert int(jnp.linalg.matrix_rank(DQ)) == 1 and int(jnp.linalg.matrix_rank(DK)) == 1
    previous = np.inf
    for t in (4.0 / float(gap), 8.0 / float(gap)):
        Q, K = key_query_solution(F, Q0, K0, t)
        miss_Q = 1.0 - abs(float(jnp.sum(DQ * Q)) / float(jnp.linalg.norm(Q)))
        miss_K = 1.0 - abs(float(jnp.sum(DK * K)) / float(jnp.linalg.norm(K)))
        # the sub-leading modes fall like e^{-(σ1−σ2)t}: 1 − cos like e^{-2(σ1−σ2)t}
        assert max(miss_Q, miss_K) < 10 * math.exp(-2 * float(gap) * t)
        assert max(miss_Q, miss_K) < previous
        previous = max(miss_Q, miss_K)
        sQ = np.linalg.svd(np.asarray(Q), compute_uv=False)
        assert np.sum(sQ**2) / sQ[0] ** 2 - 1 < 10 * math.exp(-2 * float(gap) * t)
    # u1 r/‖r‖ and v1 r/‖r‖ from numpy's SVD with either joint sign of (u1, v1): it cancels
    U, _, Vh = np.linalg.svd(F)
    for sign in (1.0, -1.0):
        u1, v1 = sign * U[:, 0], sign * Vh[0]
        r = u1 @ Q0 + v1 @ K0
        np.testing.assert_allclose(np.asarray(DQ), np.outer(u1, r) / np.linalg.norm(r),
                                   rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(np.asarray(DK), np.outer(v1, r) / np.linalg.norm(r),
                                   rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------- stage 1: reduced flow


def test_stage1_gradient_is_the_papers_reduced_flow():
    rng = np.random.default_rng(6)
    state = OuterParameters(*(rng.standard_normal(sh) for sh in ((D, D), (D, D), (D,))))
    v = rng.standard_normal(D)
    v /= np.linalg.norm(v)
    velocity = jax.tree_util.tree_map(jnp.negative, jax.grad(stage1_loss)(state, jnp.asarray(v)))
    W_V, W1, W2 = (np.asarray(a) for a in (state.W_V, state.W1, state.W2))
    W_v = v @ W_V
    np.testing.assert_allclose(np.asarray(velocity.W_V), np.outer(v, W1 @ W2), rtol=1e-13)
    np.testing.assert_allclose(v @ np.asarray(velocity.W_V), W1 @ W2, rtol=1e-13)  # dW_v/dt̄
    np.testing.assert_allclose(np.asarray(velocity.W1), np.outer(W_v, W2), rtol=1e-13)
    np.testing.assert_allclose(np.asarray(velocity.W2), W_v @ W1, rtol=1e-13)


# Module-level observers and one save-grid length for every stage-1 solve: solve caches its
# compiled programs by function identity and array shapes, so these tests compile each flow once.
OUTER_OBSERVERS = dict(W_V=lambda m, d: m.W_V, W1=lambda m, d: m.W1, W2=lambda m, d: m.W2)
STAGE1_OBSERVERS = OUTER_OBSERVERS | dict(
    E=lambda m, v: m.energy(v),
    invariants=lambda m, v: jnp.stack(stage1_invariants(m, v)),
    squared_norm=lambda m, v: sum(jnp.sum(a**2) for a in (m.W_V, m.W1, m.W2)),
)
SAVE_POINTS = 12


@pytest.mark.parametrize("sign,t_bar", [(1.0, 0.44), (-1.0, 0.5)])
def test_stage1_invariants_and_energy_bound(sign, t_bar):
    """sign +1: E(0) = 6.82 > 0, blow-up at T̄* ≈ 0.486 < 0.527 (the bound); we stop at 0.44
    where E has grown ~1500×. sign −1 (W2 flipped): E(0) = −6.82 < 0, the bound is negative
    and must hold all the same."""
    rtol = 1e-10
    data = _data()
    model = AttentionFFN.init(D, 1e-4, KEY_MODEL)
    model = AttentionFFN(model.W_Q, model.W_K, model.W_V, model.W1, sign * model.W2)
    flow = stage1_flow(model, data, 1e-4)
    traj = gflow.solve(flow, t_bar, ts=gflow.linear_grid(0.0, t_bar, SAVE_POINTS), rtol=rtol,
                       observers=STAGE1_OBSERVERS)
    assert traj.status == "completed"
    E, inv = traj.observables["E"], traj.observables["invariants"]
    assert np.sign(E[0]) == sign
    if sign > 0:
        assert E[-1] > 1000 * E[0]
        assert t_bar < float(stage1_blowup_bound(E[0]))
    # conserved to 100 × rtol on the scale of the state, ‖W̄(0)‖²
    drift = np.max(np.abs(inv - inv[0]))
    assert drift <= 100 * rtol * traj.observables["squared_norm"][0], drift
    bound = np.asarray(stage1_energy_lower_bound(E[0], traj.ts))
    assert np.all(E >= bound - 1e-9 * np.abs(bound))
    assert np.all(np.diff(E) > 0)  # dE/dt̄ = ‖∇E‖² ≥ 0


def test_stage1_bound_functions():
    assert float(stage1_blowup_bound(8.0)) == pytest.approx(0.5, rel=1e-15)
    assert float(stage1_blowup_bound(0.0)) == np.inf and float(stage1_blowup_bound(-1.0)) == np.inf
    np.testing.assert_allclose(np.asarray(stage1_energy_lower_bound(8.0, [0.0, 0.25, 0.5, 1.0])),
                               [8.0, 64.0, np.inf, np.inf], rtol=1e-14)
    np.testing.assert_allclose(np.asarray(stage1_energy_lower_bound(-8.0, [0.0, 0.5])),
                               [-8.0, -1.0], rtol=1e-14)
    np.testing.assert_array_equal(np.asarray(stage1_energy_lower_bound(0.0, [0.0, 3.0])), 0.0)
    # real time: the rescaled bound mapped back; ε cancels and the time scales like 1/ε
    data = _data()
    v, _ = target_direction(data.X, data.y)
    for eps in (1e-3, 1e-4):
        model = AttentionFFN.init(D, eps, KEY_MODEL)
        E0 = OuterParameters.from_model(model, eps).energy(v)
        np.testing.assert_allclose(
            float(predicted_escape_time(model, data.X, data.y)),
            float(real_time(stage1_blowup_bound(E0), eps, data.X, data.y)), rtol=1e-12)
    flipped = AttentionFFN.init(D, 1e-4, KEY_MODEL)
    flipped = AttentionFFN(flipped.W_Q, flipped.W_K, flipped.W_V, flipped.W1, -flipped.W2)
    assert float(predicted_escape_time(flipped, data.X, data.y)) == np.inf  # E(0) < 0


# ---------------------------------------------------------------- full model vs reduced flow


FULL_OBSERVERS = OUTER_OBSERVERS | dict(W_Q=lambda m, d: m.W_Q)


def test_full_model_follows_stage1_reduced_flow():
    """Early phase t̄ ≤ 0.3 (E(t̄) has grown ~30×, T̄* ≈ 0.486). The full model's outer
    parameters, rescaled, follow the reduced flow to O(ε²) relative, not merely O(ε): the
    leading correction is the non-uniform softmax, whose logits are O(‖W_Q‖‖W_K‖) = O(ε²)
    (tanh and exp(−yf) corrections are O(ε⁴) and O(ε³)). Measured: 4.6e-8 at ε = 1e-4, 4.5e-6
    at ε = 1e-3; both solves at rtol 1e-10 add ~1e-10. W_Q moves by O(ε²) relative too."""
    data = _data()
    ts_bar = gflow.linear_grid(0.0, 0.3, SAVE_POINTS)
    # W̄(0) = W(0)/ε is the same standard-normal draw for every ε: one reduced run serves all.
    reduced = gflow.solve(stage1_flow(AttentionFFN.init(D, 1.0, KEY_MODEL), data, 1.0),
                          ts_bar[-1], ts=ts_bar, rtol=1e-10, observers=STAGE1_OBSERVERS)
    assert reduced.status == "completed"
    errors, moved = {}, {}
    for eps in (1e-3, 1e-4):
        model = AttentionFFN.init(D, eps, KEY_MODEL)
        ts = np.asarray(real_time(ts_bar, eps, data.X, data.y))
        full = gflow.solve(gflow.GradientFlow(model, exponential_loss, data), ts[-1], ts=ts,
                           rtol=1e-10, observers=FULL_OBSERVERS)
        assert full.status == "completed"
        errors[eps] = max(
            np.max(np.linalg.norm((full.observables[k] / eps - reduced.observables[k])
                                  .reshape(len(ts), -1), axis=1)
                   / np.linalg.norm(reduced.observables[k].reshape(len(ts), -1), axis=1))
            for k in OUTER_OBSERVERS
        )
        W_Q = full.observables["W_Q"]
        moved[eps] = np.linalg.norm(W_Q[-1] - W_Q[0]) / np.linalg.norm(W_Q[0])
    assert errors[1e-4] < 1e-6  # = 100 ε², far below ε
    assert moved[1e-4] < 1e-6  # attention does not move at this order
    assert 50 < errors[1e-3] / errors[1e-4] < 200  # ε² scaling: 10× smaller ε, 100× smaller error


@pytest.mark.slow
def test_escape_time_scales_like_one_over_eps():
    """The full model leaves the plateau (loss crosses 1/2) at a rescaled time t̄ that tends to
    the blow-up time T̄* of the stage-1 reduced flow as ε → 0, with an O(ε) lag: the real escape
    time is T̄*·n s/(ε‖m‖) ∝ 1/ε. Measured lags: 4.9e-4 at ε = 1e-4, 6.7e-5 at ε = 1e-5."""
    data = _data()
    reduced = gflow.solve(stage1_flow(AttentionFFN.init(D, 1.0, KEY_MODEL), data, 1.0), 0.6,
                          rtol=1e-10)
    assert reduced.status == "nonfinite"  # blew up: |W̄|² passed 1e200, so t_final = T̄*
    blowup = reduced.t_final
    escape = gflow.Transition(
        "escape", lambda m, d: exponential_loss(m, d) - 0.5, direction=False)
    lags = {}
    for eps in (1e-4, 1e-5):
        model = AttentionFFN.init(D, eps, KEY_MODEL)
        bound = float(predicted_escape_time(model, data.X, data.y))
        traj = gflow.solve(gflow.GradientFlow(model, exponential_loss, data), 2 * bound,
                           rtol=1e-10, transitions=[escape])
        t_escape = traj.transitions["escape"]
        assert t_escape < bound  # the stage-1 bound, in real time
        lags[eps] = float(rescaled_time(t_escape, eps, data.X, data.y)) - blowup
        assert 0 < lags[eps] < 50 * eps
    assert 4 < lags[1e-4] / lags[1e-5] < 20  # the lag is O(ε)
