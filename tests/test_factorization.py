"""Matrix factorization flows and ScaledGD's preconditioner (docs/science.md §5)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gflow
from gflow.models import (
    LowRankFactorization,
    SymmetricFactorization,
    factorization_loss,
    scaled_preconditioner,
)


def _target(condition: float, m=6, n=5, r=2, seed=0):
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.standard_normal((m, r)))
    V, _ = np.linalg.qr(rng.standard_normal((n, r)))
    return jnp.asarray(U @ np.diag([1.0, 1.0 / condition]) @ V.T)


def test_scaled_preconditioner_is_the_formula():
    model = LowRankFactorization.random(6, 5, 2, 0.5, jax.random.key(0))
    S = _target(10.0)
    grads = jax.grad(factorization_loss)(model, S)
    pre = scaled_preconditioner(model, grads)
    L, R = np.asarray(model.L), np.asarray(model.R)
    np.testing.assert_allclose(pre.L, np.asarray(grads.L) @ np.linalg.inv(R.T @ R), rtol=1e-10)
    np.testing.assert_allclose(pre.R, np.asarray(grads.R) @ np.linalg.inv(L.T @ L), rtol=1e-10)


def test_symmetric_factorization_gradient():
    model = SymmetricFactorization.random(4, 2, 0.3, jax.random.key(1))
    S = jnp.eye(4)
    U = np.asarray(model.U)
    grad = jax.grad(factorization_loss)(model, S).U
    np.testing.assert_allclose(grad, -2 * (np.eye(4) - U @ U.T) @ U, rtol=1e-12)


def test_scaled_flow_converges_at_a_rate_free_of_the_condition_number():
    # Plain gradient flow needs ~κ times longer for the small mode of an ill-conditioned target;
    # the preconditioned flow's loss decays like e^{-2t} whatever κ (from a balanced start).
    def time_to_fit(condition, preconditioner):
        S = _target(condition)
        U, s, Vt = np.linalg.svd(np.asarray(S), full_matrices=False)
        # Start near the target's factors, spectrally balanced, so the flow is in its basin.
        L0 = U[:, :2] * np.sqrt(s[:2]) * 0.5
        R0 = Vt[:2].T * np.sqrt(s[:2]) * 0.5
        flow = gflow.GradientFlow(
            LowRankFactorization(jnp.asarray(L0), jnp.asarray(R0)), factorization_loss, S,
            preconditioner=preconditioner,
        )
        threshold = 1e-8 * float(factorization_loss(flow.model, S))
        traj = gflow.solve(flow, 2000.0, rtol=1e-9, transitions=[gflow.Transition(
            "fitted", lambda m, d: jnp.log(factorization_loss(m, d)) - np.log(threshold),
            direction=False)])
        return traj.transitions["fitted"]

    scaled = [time_to_fit(k, scaled_preconditioner) for k in (2.0, 100.0)]
    plain = [time_to_fit(k, None) for k in (2.0, 100.0)]
    assert scaled[1] == pytest.approx(scaled[0], rel=0.05)
    assert plain[1] > 10 * plain[0]
