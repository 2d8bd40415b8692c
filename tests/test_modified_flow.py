"""GD's modified flow (`GradientFlow(..., gd_step=η)`, Barrett & Dherin): gradient descent at
step η follows it to O(η²), where it follows the plain flow to O(η)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gflow
from gflow.models import DeepLinear, deep_linear_loss, whitened_target

T = 2.0
ETAS = 0.04 / 2.0 ** np.arange(4)


def _flat(m):
    return jnp.concatenate([w.ravel() for w in m.weights])


def _gradient_descent(model, target, eta):
    grad = jax.grad(lambda w: deep_linear_loss(DeepLinear(w), target))

    def step(w, _):
        return jax.tree.map(lambda a, b: a - eta * b, w, grad(w)), None

    weights, _ = jax.lax.scan(step, model.weights, None, length=round(T / eta))
    return np.asarray(_flat(DeepLinear(weights)))


def test_gd_tracks_modified_flow_to_second_order(random_flow):
    model, target = random_flow.model, random_flow.data
    observe = {"theta": lambda m, _: _flat(m)}

    def flow_at_T(gd_step):
        flow = gflow.GradientFlow(model, deep_linear_loss, target, gd_step=gd_step)
        # rtol 1e-12: the solver's error stays far below the smallest GD gap (~1e-6).
        traj = gflow.solve(flow, T, ts=[T], rtol=1e-12, observers=observe)
        assert traj.completed
        return traj.observables["theta"][-1]

    plain = flow_at_T(0.0)
    to_plain, to_modified = [], []
    for eta in ETAS:
        gd = _gradient_descent(model, target, eta)
        to_plain.append(np.linalg.norm(gd - plain))
        to_modified.append(np.linalg.norm(gd - flow_at_T(float(eta))))
    slope_plain = np.polyfit(np.log(ETAS), np.log(to_plain), 1)[0]
    slope_modified = np.polyfit(np.log(ETAS), np.log(to_modified), 1)[0]
    assert abs(slope_plain - 1) < 0.15, (slope_plain, to_plain)
    assert abs(slope_modified - 2) < 0.15, (slope_modified, to_modified)
    # And the modified flow is the closer one by a factor ~ 1/η.
    assert all(m < 0.1 * p for m, p in zip(to_modified, to_plain))


def test_modified_flow_vector_field(random_flow):
    """The velocity is −∇(L + (η/4)‖∇L‖²), checked against autodiff of that loss."""
    eta = 0.05
    flow = gflow.GradientFlow(random_flow.model, deep_linear_loss, random_flow.data,
                              gd_step=eta)
    params = flow.params

    def modified_loss(p):
        g = jax.grad(flow.loss_at)(p)
        return flow.loss_at(p) + eta / 4 * sum(jnp.sum(x**2) for x in jax.tree.leaves(g))

    expected = jax.tree.map(jnp.negative, jax.grad(modified_loss)(params))
    got = flow.velocity(params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), "0.1", True])
def test_gd_step_validated(random_flow, bad):
    with pytest.raises(gflow.InputError, match="gd_step"):
        gflow.GradientFlow(random_flow.model, deep_linear_loss, random_flow.data, gd_step=bad)


def test_gd_step_refuses_preconditioner(random_flow):
    with pytest.raises(gflow.InputError, match="preconditioner"):
        gflow.GradientFlow(random_flow.model, deep_linear_loss, random_flow.data,
                           preconditioner=lambda m, g: g, gd_step=0.1)
