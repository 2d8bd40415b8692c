"""Any equinox module: `eqx.nn` layers with function, string, int, bool and `None` fields,
frozen layers, static fields and integer leaves, through observers, transitions, certify,
checkpoints and sweeps, each checked against a closed form or scipy's DOP853."""

import math
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import gflow

scipy_integrate = pytest.importorskip("scipy.integrate")
scipy_linalg = pytest.importorskip("scipy.linalg")
scipy_optimize = pytest.importorskip("scipy.optimize")

RTOL = 1e-10


def _dop853(flow, t1, ts, events=None):
    """scipy's DOP853 on the flattened trainable state, at 100x tighter tolerances."""
    params, unravel = ravel_pytree(flow.params)
    rhs = jax.jit(lambda p: ravel_pytree(flow.velocity(unravel(p)))[0])
    return scipy_integrate.solve_ivp(
        lambda t, p: np.asarray(rhs(p)), (0.0, t1), np.asarray(params), method="DOP853",
        t_eval=ts, rtol=1e-12, atol=1e-14, events=events, dense_output=True,
    ), unravel


def _state(model, data):
    return ravel_pytree(eqx.filter(model, eqx.is_inexact_array))[0]


def _relative(a, b):
    return np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)


# ---------------------------------------------------------------------------------------------
# eqx.nn.MLP: tanh, biases (its activation functions are fields of the module)

X = jax.random.normal(jax.random.key(0), (16, 2))
Y = jnp.sin(X[:, :1]) + 0.5 * X[:, 1:]


def mlp_loss(model, data):
    x, y = data
    return 0.5 * jnp.mean((jax.vmap(model)(x) - y) ** 2)


def mlp_flow(scale=1.0, seed=1):
    model = eqx.nn.MLP(2, 1, width_size=4, depth=1, activation=jnp.tanh, key=jax.random.key(seed))
    return gflow.GradientFlow(model, mlp_loss, (X, scale * Y))


class _LossBelow(eqx.Module):
    level: jax.Array

    def __call__(self, model, data):
        return mlp_loss(model, data) - self.level


T_MLP = 20.0
MLP_TS = gflow.linear_grid(0.0, T_MLP, 21)


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory):
    flow = mlp_flow()
    level = 0.5 * float(mlp_loss(flow.model, flow.data))
    halved = gflow.Transition("halved", _LossBelow(jnp.asarray(level)), direction=False)
    path = tmp_path_factory.mktemp("mlp") / "c.eqx"
    kw = dict(rtol=RTOL, ts=MLP_TS, observers={"state": _state}, transitions=[halved],
              checkpoint=path, checkpoint_steps=40)
    traj = gflow.solve(flow, T_MLP, certify=True, **kw)
    again = gflow.solve(flow, T_MLP, resume=True, **kw)
    return flow, level, traj, again


def test_mlp_against_dop853_with_transition_certify_and_checkpoint(mlp_run):
    flow, level, traj, again = mlp_run
    assert traj.status == "completed" and traj.stats["segments"] > 2  # cut, and a transition
    _, unravel = ravel_pytree(flow.params)
    ref, _ = _dop853(flow, T_MLP, MLP_TS, events=lambda t, p: float(
        mlp_loss(flow.combine(unravel(p)), flow.data)) - level)
    assert _relative(traj.observables["state"], ref.y.T).max() < 1e-8
    t_ref = ref.t_events[0][0]
    assert abs(traj.transitions["halved"] - t_ref) < 1e-8 * t_ref
    # certify ran the same flow at 100x smaller tolerances: its estimate bounds the error.
    assert abs(traj.transitions["halved"] - t_ref) <= traj.errors["transitions"]["halved"] < 1e-6
    # The activation function survived the solve: the final model is an MLP that evaluates.
    final = traj.final
    assert final.activation is jnp.tanh
    np.testing.assert_allclose(_state(final, None), ref.y[:, -1], rtol=1e-8)
    # Resumed from the finished checkpoint: the same run, bit for bit.
    np.testing.assert_array_equal(again.observables["state"], traj.observables["state"])
    assert again.transitions == {"halved": traj.transitions["halved"]}


def test_mlp_sweep_shares_one_program_and_equals_solve(mlp_run):
    flow, level, traj, _ = mlp_run
    halved = gflow.Transition("halved", _LossBelow(jnp.asarray(level)), direction=False)
    result = gflow.sweep(lambda scale: mlp_flow(scale), {"scale": [1.0, 1.5]}, T_MLP,
                         rtol=RTOL, transitions=[halved], batch="map")
    assert len(result.groups) == 1 and all(m.completed for m in result)
    # scale 1 is the solve above without checkpoint cuts: equal within tolerance.
    assert result[0].transitions["halved"] == pytest.approx(traj.transitions["halved"], rel=1e-8)
    # scale 1.5 against DOP853.
    other = mlp_flow(1.5)
    _, unravel = ravel_pytree(other.params)
    ref, _ = _dop853(other, T_MLP, None, events=lambda t, p: float(
        mlp_loss(other.combine(unravel(p)), other.data)) - level)
    assert result[1].transitions["halved"] == pytest.approx(ref.t_events[0][0], rel=1e-8)


# ---------------------------------------------------------------------------------------------
# eqx.nn.Linear without bias (`bias` is None): linear regression, closed form


def test_linear_without_bias_closed_form():
    key1, key2, key3 = jax.random.split(jax.random.key(2), 3)
    x = jax.random.normal(key1, (20, 3))
    w_star = jax.random.normal(key2, (2, 3))
    y = x @ w_star.T
    model = eqx.nn.Linear(3, 2, use_bias=False, key=key3)
    assert model.bias is None

    def loss(m, data):
        xs, ys = data
        return 0.5 * jnp.mean(jnp.sum((jax.vmap(m)(xs) - ys) ** 2, axis=1))

    flow = gflow.GradientFlow(model, loss, (x, y))
    # dW/dt = -(W - W*) Σ with Σ = XᵀX/n: W(t) = W* + (W0 - W*) e^{-Σt}; L(t) in closed form.
    sigma = np.asarray(x.T @ x) / x.shape[0]
    w0, ws = np.asarray(model.weight), np.asarray(w_star)
    exact = lambda t: ws + (w0 - ws) @ scipy_linalg.expm(-sigma * t)  # noqa: E731
    exact_loss = lambda t: 0.5 * np.trace((exact(t) - ws) @ sigma @ (exact(t) - ws).T)  # noqa
    level = 0.1 * exact_loss(0.0)
    ts = gflow.linear_grid(0.0, 5.0, 11)
    traj = gflow.solve(
        flow, 5.0, rtol=RTOL, ts=ts, observers={"W": lambda m, d: m.weight},
        transitions=[gflow.Transition("tenth", lambda m, d: loss(m, d) - level, False)],
    )
    assert traj.status == "completed" and traj.final.bias is None
    for t, w in zip(ts, traj.observables["W"]):
        np.testing.assert_allclose(w, exact(t), rtol=1e-8, atol=1e-9)
    t_exact = scipy_optimize.brentq(lambda t: exact_loss(t) - level, 0.0, 5.0, xtol=1e-14)
    assert abs(traj.transitions["tenth"] - t_exact) < 1e-8 * t_exact


# ---------------------------------------------------------------------------------------------
# eqx.nn.MultiheadAttention (int and bool fields, Dropout submodule, optional biases)


def test_multihead_attention_against_dop853():
    k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
    model = eqx.nn.MultiheadAttention(num_heads=2, query_size=4, use_output_bias=True, key=k1)
    x = jax.random.normal(k2, (5, 4))
    target = jax.random.normal(k3, (5, 4))

    def loss(m, data):
        xs, ys = data
        return 0.5 * jnp.mean((m(xs, xs, xs) - ys) ** 2)

    flow = gflow.GradientFlow(model, loss, (x, target))
    ts = gflow.linear_grid(0.0, 3.0, 7)
    traj = gflow.solve(flow, 3.0, rtol=RTOL, ts=ts, observers={"state": _state})
    assert traj.status == "completed"
    ref, _ = _dop853(flow, 3.0, ts)
    assert _relative(traj.observables["state"], ref.y.T).max() < 1e-8
    assert traj.final.num_heads == 2  # an int field, carried along unchanged


# ---------------------------------------------------------------------------------------------
# A frozen eqx.nn.Embedding under a trainable Linear readout: linear regression in the readout


class EmbedRead(eqx.Module):
    embed: eqx.nn.Embedding
    head: eqx.nn.Linear

    def __call__(self, token):
        return self.head(self.embed(token))


def test_frozen_embedding_stays_bit_identical_and_readout_follows_closed_form():
    k1, k2, k3 = jax.random.split(jax.random.key(4), 3)
    model = EmbedRead(eqx.nn.Embedding(5, 3, key=k1), eqx.nn.Linear(3, 2, key=k2))
    tokens = jnp.arange(5)
    targets = jax.random.normal(k3, (5, 2))

    def loss(m, data):
        toks, ys = data
        return 0.5 * jnp.mean(jnp.sum((jax.vmap(m)(toks) - ys) ** 2, axis=1))

    spec = jtu.tree_map(lambda _: False, model)
    spec = eqx.tree_at(lambda s: s.head, spec, jtu.tree_map(eqx.is_inexact_array, model.head))
    flow = gflow.GradientFlow(model, loss, (tokens, targets), trainable=spec)
    ts = gflow.linear_grid(0.0, 4.0, 9)
    traj = gflow.solve(flow, 4.0, rtol=RTOL, ts=ts, observers={
        "W": lambda m, d: jnp.concatenate([m.head.weight, m.head.bias[:, None]], axis=1)})
    assert np.asarray(traj.final.embed.weight).tobytes() == np.asarray(model.embed.weight).tobytes()
    # Features φ = [e_token; 1]: dW/dt = -(W Φᵀ - Yᵀ) Φ / n, W(t) = W∞ + (W0 - W∞) e^{-Σt}.
    phi = np.concatenate([np.asarray(model.embed.weight), np.ones((5, 1))], axis=1)
    sigma = phi.T @ phi / 5
    b = np.asarray(targets).T @ phi / 5
    w0 = np.concatenate([np.asarray(model.head.weight), np.asarray(model.head.bias)[:, None]], 1)
    for t, w in zip(ts, traj.observables["W"]):
        # d/dt W = b - W Σ: W(t) = W0 e^{-Σt} + b ∫0^t e^{-Σs} ds.
        integral = scipy_integrate.quad_vec(lambda s: scipy_linalg.expm(-sigma * s), 0.0, t,
                                            epsabs=1e-13, epsrel=1e-12)[0]
        np.testing.assert_allclose(w, w0 @ scipy_linalg.expm(-sigma * t) + b @ integral,
                                   rtol=1e-8, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# A static field, an integer leaf, a string and a function field


class Decaying(eqx.Module):
    w: jax.Array
    rate: jax.Array  # an integer array: a frozen leaf (only floating leaves evolve)
    power: int = eqx.field(static=True)
    name: str = "decaying"
    squash: Callable = jnp.tanh

    def energy(self):
        return self.rate / (2 * self.power) * jnp.sum(self.w ** (2 * self.power))


def decaying_loss(model, data):
    return model.energy()


def decaying_flow(rate):
    model = Decaying(jnp.asarray([1.0, -2.0]), jnp.asarray(rate, dtype=jnp.int32), power=1)
    # A loss defined once (not a fresh lambda per member), so that members share a program.
    return gflow.GradientFlow(model, decaying_loss, None)


HALF = gflow.Transition("half", lambda m, d: m.w[0] - 0.5, direction=False)


def test_static_field_and_integer_leaf_closed_form_in_solve_and_sweep():
    # dw/dt = -rate w: w(t) = w0 e^{-rate t}; w[0] halves at ln 2 / rate.
    ts = gflow.linear_grid(0.0, 2.0, 11)
    squash = {"squashed": lambda m, d: m.squash(m.w)}
    traj = gflow.solve(decaying_flow(3), 2.0, rtol=RTOL, ts=ts, transitions=[HALF],
                       observers=squash)
    exact = np.asarray([1.0, -2.0]) * np.exp(-3 * ts)[:, None]
    np.testing.assert_allclose(traj.observables["squashed"], np.tanh(exact), rtol=1e-8)
    assert traj.transitions["half"] == pytest.approx(math.log(2) / 3, rel=1e-8)
    assert traj.final.name == "decaying" and traj.final.power == 1
    assert traj.final.rate.dtype == jnp.int32 and int(traj.final.rate) == 3
    # The integer leaf is data: members with different rates share one program.
    result = gflow.sweep(decaying_flow, {"rate": [1, 2, 4]}, 2.0, rtol=RTOL, transitions=[HALF],
                         observers=squash, batch="map")
    assert len(result.groups) == 1
    for member in result:
        rate = member.point["rate"]
        assert member.transitions["half"] == pytest.approx(math.log(2) / rate, rel=1e-8)
        np.testing.assert_allclose(member.final["squashed"],
                                   np.tanh(np.asarray([1.0, -2.0]) * math.exp(-rate * 2.0)),
                                   rtol=1e-7)
