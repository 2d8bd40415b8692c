"""AttentionFFN against a hand-written numpy reference: forward pass, losses and gradients."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gflow  # noqa: F401  (enables float64)
from gflow import InputError
from gflow.models import (
    AttentionFFN,
    SequenceData,
    exponential_loss,
    logistic_loss,
)

VARIANTS = list(itertools.product(("tanh", "identity"), ("exact", "linearized")))
LOSSES = {"exponential": exponential_loss, "logistic": logistic_loss}
NAMES = ("W_Q", "W_K", "W_V", "W1", "W2")


# ---------------------------------------------------------------- numpy reference


def _np_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _np_output(params, X, activation, attention):
    """f(X)_s for one sample, written out from the paper's formula (full attention matrix)."""
    W_Q, W_K, W_V, W1, W2 = (params[k] for k in NAMES)
    s, d = X.shape
    logits = X @ W_Q @ W_K.T @ X.T / math.sqrt(d)
    if attention == "exact":
        A = _np_softmax(logits)
    else:
        A = 1.0 / s + (logits - logits.mean(axis=1, keepdims=True)) / s
    hidden = A @ X @ W_V @ W1
    act = np.tanh(hidden) if activation == "tanh" else hidden
    return (act @ W2)[-1]


def _np_loss(params, X, y, activation, attention, loss):
    f = np.array([_np_output(params, x, activation, attention) for x in X])
    if loss == "exponential":
        return np.mean(np.exp(-y * f))
    return np.mean(np.log1p(np.exp(-y * f)))


def _np_grad(params, X, y, activation, attention, loss, h=1e-6):
    """Central finite differences, entry by entry, in float64."""
    grads = {}
    for name in NAMES:
        g = np.zeros_like(params[name])
        for idx in np.ndindex(params[name].shape):
            plus = {k: v.copy() for k, v in params.items()}
            minus = {k: v.copy() for k, v in params.items()}
            plus[name][idx] += h
            minus[name][idx] -= h
            g[idx] = (_np_loss(plus, X, y, activation, attention, loss)
                      - _np_loss(minus, X, y, activation, attention, loss)) / (2 * h)
        grads[name] = g
    return grads


def _problem(seed=0, n=4, s=3, d=3, scale=0.6):
    rng = np.random.default_rng(seed)
    params = {k: scale * rng.standard_normal((d, d)) for k in NAMES[:4]}
    params["W2"] = scale * rng.standard_normal(d)
    X = rng.standard_normal((n, s, d))
    y = np.where(rng.standard_normal(n) > 0, 1.0, -1.0)
    y[0], y[1] = 1.0, -1.0  # both classes present
    return params, X, y


def _model(params, activation, attention):
    return AttentionFFN(**params, activation=activation, attention=attention)


# ---------------------------------------------------------------- forward and loss


@pytest.mark.parametrize("activation,attention", VARIANTS)
def test_forward_matches_numpy(activation, attention):
    params, X, y = _problem()
    model = _model(params, activation, attention)
    expected = np.array([_np_output(params, x, activation, attention) for x in X])
    np.testing.assert_allclose(np.asarray(model.batched(jnp.asarray(X))), expected,
                               rtol=1e-13, atol=1e-14)
    # the full per-token output agrees with the last-row shortcut of __call__
    np.testing.assert_allclose(float(model.token_outputs(jnp.asarray(X[0]))[-1]),
                               float(model(jnp.asarray(X[0]))), rtol=1e-13)


@pytest.mark.parametrize("activation,attention", VARIANTS)
@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_loss_and_gradient_match_numpy(activation, attention, loss):
    params, X, y = _problem(seed=1)
    model = _model(params, activation, attention)
    for data in (SequenceData(X, y), {"X": jnp.asarray(X), "y": jnp.asarray(y)}):
        value = float(LOSSES[loss](model, data))
        np.testing.assert_allclose(value, _np_loss(params, X, y, activation, attention, loss),
                                   rtol=1e-13)
    grads = jax.grad(LOSSES[loss])(model, SequenceData(X, y))
    reference = _np_grad(params, X, y, activation, attention, loss)
    for name in NAMES:
        # central differences with h = 1e-6: truncation ~h² and round-off ~1e-16/h, both ≲ 1e-9
        np.testing.assert_allclose(np.asarray(getattr(grads, name)), reference[name],
                                   rtol=1e-6, atol=1e-9, err_msg=name)


def test_logistic_loss_is_stable_for_large_margins():
    params, X, y = _problem(seed=2)
    model = _model({k: 40.0 * v for k, v in params.items()}, "identity", "exact")
    value = float(logistic_loss(model, SequenceData(X, y)))
    f = np.asarray(model.batched(jnp.asarray(X)))
    expected = np.mean(np.logaddexp(0.0, -y * f))  # exact, overflow-free reference
    assert np.isfinite(value)
    np.testing.assert_allclose(value, expected, rtol=1e-12)


def test_linearized_softmax_is_first_order_accurate():
    params, X, _ = _problem(seed=3)
    errors = []
    for delta in (1e-2, 1e-3):
        scaled = dict(params, W_Q=delta * params["W_Q"], W_K=delta * params["W_K"])
        exact = _model(scaled, "identity", "exact").attention_weights(jnp.asarray(X[0]))
        lin = _model(scaled, "identity", "linearized").attention_weights(jnp.asarray(X[0]))
        np.testing.assert_allclose(np.asarray(lin).sum(axis=1), 1.0, rtol=1e-14)
        errors.append(float(jnp.max(jnp.abs(exact - lin))))
    # logits scale like δ², so the second-order remainder falls like δ⁴: 10⁴ per decade of δ
    np.testing.assert_allclose(errors[0] / errors[1], 1e4, rtol=1e-2)


def test_zero_and_tiny_models_are_finite():
    _, X, y = _problem()
    data = SequenceData(X, y)
    zero = AttentionFFN.init(3, 0.0, jax.random.PRNGKey(0))
    assert float(exponential_loss(zero, data)) == 1.0
    assert float(logistic_loss(zero, data)) == pytest.approx(math.log(2.0), rel=1e-15)
    grads = jax.grad(exponential_loss)(zero, data)
    assert all(np.all(np.asarray(getattr(grads, k)) == 0.0) for k in NAMES)  # a saddle
    tiny = AttentionFFN.init(3, 1e-12, jax.random.PRNGKey(1), attention="linearized")
    grads = jax.grad(exponential_loss)(tiny, data)
    assert all(np.all(np.isfinite(np.asarray(getattr(grads, k)))) for k in NAMES)


# ---------------------------------------------------------------- init and validation


def test_init_statistics_and_dtype():
    d, eps = 40, 1e-3
    model = AttentionFFN.init(d, eps, jax.random.PRNGKey(0))
    entries = np.concatenate([np.asarray(getattr(model, k)).ravel() for k in NAMES])
    assert all(getattr(model, k).dtype == jnp.float64 for k in NAMES)
    assert entries.size == 4 * d * d + d
    # 6440 i.i.d. N(0, eps²) draws: the sample std is within a few 1/√(2N) ≈ 0.9% of eps
    np.testing.assert_allclose(entries.std(), eps, rtol=0.04)
    assert abs(entries.mean()) < 4 * eps / math.sqrt(entries.size)
    # distinct keys per matrix: no two groups share draws
    assert not np.allclose(np.asarray(model.W_Q), np.asarray(model.W_K))


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(W_Q=np.zeros((3, 4))), "W_Q"),
        (dict(W_K=np.zeros((4, 4))), "W_K"),
        (dict(W_V=np.zeros(3)), "W_V"),
        (dict(W1=np.zeros((3, 2))), "W1"),
        (dict(W2=np.zeros((3, 1))), "W2"),
        (dict(activation="relu"), "activation"),
        (dict(attention="sparse"), "attention"),
    ],
)
def test_constructor_validates(change, message):
    params, _, _ = _problem()
    kwargs = dict(params, activation="tanh", attention="exact") | change
    with pytest.raises(InputError, match=message):
        AttentionFFN(**kwargs)


def test_init_and_inputs_validate():
    with pytest.raises(InputError, match="d must"):
        AttentionFFN.init(0, 1e-3, jax.random.PRNGKey(0))
    with pytest.raises(InputError, match="eps"):
        AttentionFFN.init(3, -1.0, jax.random.PRNGKey(0))
    with pytest.raises(InputError, match="eps"):
        AttentionFFN.init(3, float("nan"), jax.random.PRNGKey(0))
    model = AttentionFFN.init(3, 1e-3, jax.random.PRNGKey(0))
    with pytest.raises(InputError, match=r"\(s, d=3\)"):
        model(jnp.zeros((4, 2)))
    with pytest.raises(InputError, match=r"\(n, s, d=3\)"):
        model.batched(jnp.zeros((2, 4, 5)))
    with pytest.raises(InputError, match="y must"):
        SequenceData(np.zeros((2, 3, 3)), np.ones(3))
    with pytest.raises(InputError, match="X must"):
        SequenceData(np.zeros((3, 3)), np.ones(3))
    with pytest.raises(InputError, match="labels"):
        SequenceData(np.zeros((2, 3, 3)), np.array([1.0, 0.5]))
