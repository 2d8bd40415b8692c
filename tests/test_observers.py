"""Observers of `gflow.observers`: they select the right arrays, agree with the measures under
`jax.jit`, keep their arrays as traced data, and work inside `gflow.solve`."""

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import gflow
from gflow import measures as M, observers as O
from gflow import InputError

RNG = np.random.default_rng(4)
C_W = 0.7  # weight of the quadratic penalty on `w`


class Inner(eqx.Module):
    A: jax.Array


class Toy(eqx.Module):
    W_Q: jax.Array  # 8 x 8
    W_K: jax.Array  # 8 x 8, rank 3
    w: jax.Array  # a vector, 5
    inner: Inner

    def energy(self, data):
        return jnp.sum(self.W_Q @ data["X"])


def _toy(scale: float = 1.0, seed: int = 0) -> Toy:
    rng = np.random.default_rng(seed)
    return Toy(
        W_Q=jnp.asarray(scale * rng.normal(size=(8, 8))),
        W_K=jnp.asarray(scale * rng.normal(size=(8, 3)) @ rng.normal(size=(3, 8))),
        w=jnp.asarray(scale * rng.normal(size=5)),
        inner=Inner(jnp.asarray(scale * rng.normal(size=(2, 3)))),
    )


DATA = {"X": jnp.asarray(RNG.normal(size=(8, 6))), "Y": jnp.asarray(RNG.normal(size=(8, 6)))}


def per_sample_loss(model, data):
    """`½ ‖W_Q x_i − y_i‖²` for each sample (column) i."""
    return 0.5 * jnp.sum((model.W_Q @ data["X"] - data["Y"]) ** 2, axis=0)


def quadratic_loss(model, data):
    return jnp.mean(per_sample_loss(model, data)) + 0.5 * C_W * jnp.sum(model.w**2)


def where_Q(m):
    return m.W_Q


def where_group(m):
    return (m.W_Q, m.W_K, m.w)


@eqx.filter_jit
def _evaluate_jit(observers, model, data):
    return {name: observer(model, data) for name, observer in observers.items()}


def _evaluate(observers: dict, model, data=DATA) -> dict:
    """Every observer under one jit, as `gflow.solve` evaluates them (compiled once per dict)."""
    return jax.tree.map(np.asarray, _evaluate_jit(observers, model, data))


def _np_effective_rank(W):
    s = np.linalg.svd(np.atleast_2d(W), compute_uv=False)
    p = s / s.sum()
    return float(np.exp(-np.sum(p * np.log(p))))


def _np_condensation(W):
    U = W / np.linalg.norm(W, axis=1, keepdims=True)
    C = np.abs(U @ U.T)
    return (C.sum() - np.trace(C)) / (C.shape[0] * (C.shape[0] - 1))


def test_matrix_observers_under_jit_match_measures():
    model = _toy()
    v = RNG.normal(size=8)
    observers = {
        "singular_values": O.singular_values(where_Q),
        "numerical_rank": O.numerical_rank(lambda m: m.W_K),
        "normalized_rank": O.normalized_rank(lambda m: m.W_K, rtol=1e-3),
        "effective_rank": O.effective_rank(where_Q),
        "stable_rank": O.stable_rank(where_Q),
        "frobenius_norm": O.frobenius_norm(where_Q),
        "alignment": O.alignment(where_Q, v, axis="columns", min_norm_fraction=0.2),
        "condensation": O.condensation(where_Q, axis=1),
        "cosine_matrix": O.cosine_matrix(where_Q, axis=0),
        "cosine_matrix_unordered": O.cosine_matrix(where_Q, axis=0, ordered=False),
    }
    got = _evaluate(observers, model)
    W = np.asarray(model.W_Q)

    @jax.jit
    def expected_from_measures(W):
        minimum, mean = M.alignment(W, v, axis=0, min_norm_fraction=0.2)
        return {
            "effective_rank": M.effective_rank(W),
            "stable_rank": M.stable_rank(W),
            "alignment": {"min": minimum, "mean": mean},
            "condensation": M.condensation(W, axis=1),
            "cosine_matrix": M.ordered_cosine_matrix(W, axis=0),
            "cosine_matrix_unordered": M.cosine_matrix(W, axis=0),
        }

    expected = {
        "singular_values": np.linalg.svd(W, compute_uv=False),
        "numerical_rank": 3.0,
        "normalized_rank": 3.0,
        "frobenius_norm": np.linalg.norm(W),
        **expected_from_measures(W),
    }
    for key in expected:
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(
                a, np.asarray(b), rtol=1e-13, atol=1e-14, err_msg=key
            ),
            got[key],
            expected[key],
        )
    assert got["numerical_rank"].dtype == np.float64  # counts share nan-filled buffers


def test_group_observers_stack_in_order():
    model = _toy()
    arrays = [np.asarray(a) for a in where_group(model)]
    got = _evaluate(
        {
            "singular_values": O.singular_values(where_group),
            "effective_rank": O.effective_rank(where_group),
            "numerical_rank": O.numerical_rank(where_group),
            "frobenius_norm": O.frobenius_norm(where_group),
            "condensation": O.condensation(lambda m: [m.W_Q, m.W_K], axis="rows"),
        },
        model,
    )
    # Spectra zero-padded to the longest: the vector w has the single singular value ‖w‖.
    assert got["singular_values"].shape == (3, 8)
    spectra = got["singular_values"]
    np.testing.assert_allclose(spectra[2], [np.linalg.norm(arrays[2])] + [0.0] * 7, rtol=1e-14)
    np.testing.assert_allclose(spectra[1], np.linalg.svd(arrays[1], compute_uv=False), atol=1e-13)
    np.testing.assert_allclose(
        got["effective_rank"], [_np_effective_rank(a) for a in arrays], rtol=1e-12
    )
    np.testing.assert_array_equal(got["numerical_rank"], [8.0, 3.0, 1.0])
    np.testing.assert_allclose(
        got["frobenius_norm"], [np.linalg.norm(a) for a in arrays], rtol=1e-14
    )
    # min_norm_fraction = 0.1 excludes no row of these random matrices.
    np.testing.assert_allclose(
        got["condensation"], [_np_condensation(a) for a in arrays[:2]], rtol=1e-12
    )


def test_tiny_and_zero_models_give_finite_meaningful_values():
    observers = {
        "effective_rank": O.effective_rank(where_group),
        "stable_rank": O.stable_rank(where_group),
        "alignment": O.alignment(where_Q, np.ones(8), axis=1),
        "condensation": O.condensation(where_Q, axis=0),
    }
    big, tiny = _evaluate(observers, _toy()), _evaluate(observers, _toy(scale=1e-12))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10), tiny, big)
    zero = _evaluate(observers, _toy(scale=0.0))
    jax.tree.map(lambda a: np.testing.assert_array_equal(a, np.zeros_like(a)), zero)


def test_relative_change_is_zero_at_init_and_matches_numpy():
    model0, model1 = _toy(seed=0), _toy(seed=1)
    single = O.relative_change(where_Q, model0)
    group = O.relative_change(where_group, model0)
    at_init = _evaluate({"single": single, "group": group}, model0)
    assert at_init["single"] == 0.0
    np.testing.assert_array_equal(at_init["group"], np.zeros(3))
    later = _evaluate({"single": single, "group": group}, model1)
    expected = [
        np.linalg.norm(np.asarray(a1) - np.asarray(a0)) / np.linalg.norm(np.asarray(a0))
        for a0, a1 in zip(where_group(model0), where_group(model1), strict=True)
    ]
    np.testing.assert_allclose(later["single"], expected[0], rtol=1e-14)
    np.testing.assert_allclose(later["group"], expected, rtol=1e-14)


def test_array_fields_are_traced_data_not_constants():
    """A new initial model, direction or group, or an equal threshold, reuses the compiled code."""
    traces = []

    @eqx.filter_jit
    def run(observer, model):
        traces.append(None)
        return observer(model, DATA)

    model0, model1 = _toy(seed=0), _toy(seed=1)
    first = run(O.relative_change(where_Q, model0), model1)
    second = run(O.relative_change(where_Q, model1), model0)
    assert len(traces) == 1 and float(first) > 0 and float(second) > 0
    assert float(run(O.relative_change(where_Q, model1), model1)) == 0.0 and len(traces) == 1

    traces.clear()
    a = run(O.alignment(where_Q, np.ones(8), axis=1), model0)
    b = run(O.alignment(where_Q, np.arange(1.0, 9.0), axis=1), model0)
    assert len(traces) == 1 and float(a["mean"]) != float(b["mean"])

    traces.clear()
    run(O.numerical_rank(where_Q, rtol=1e-4), model0)
    run(O.numerical_rank(where_Q, rtol=1e-4), model1)
    run(O.loss_by_group(per_sample_loss, {"a": np.array([0, 1])}), model0)
    run(O.loss_by_group(per_sample_loss, {"a": np.array([4, 5])}), model0)
    assert len(traces) == 2


def test_conserved_reports_drift_from_init():
    def invariants(m, data):  # a pytree, one entry depending on the data
        return {"gram": m.W_Q @ m.W_Q.T - m.W_K.T @ m.W_K, "energy": m.energy(data)}

    model0, model1 = _toy(seed=0), _toy(seed=1)
    observer = O.conserved(invariants, model0)
    at_init = _evaluate({"c": observer}, model0)["c"]
    # Zero up to rounding: XLA may evaluate fn on the traced and the stored model differently.
    scale = {k: np.max(np.abs(np.asarray(v))) for k, v in invariants(model0, DATA).items()}
    for key, value in at_init.items():
        assert np.max(np.abs(value)) <= 1e-14 * scale[key], key
    later = _evaluate({"c": observer}, model1)["c"]
    jax.tree.map(
        lambda a, b, c: np.testing.assert_allclose(
            a, np.asarray(b) - np.asarray(c), rtol=1e-12, atol=1e-12
        ),
        later,
        invariants(model1, DATA),
        invariants(model0, DATA),
    )


def test_gradient_norm_of_a_quadratic():
    model = _toy()
    W, w, X, Y = (np.asarray(a) for a in (model.W_Q, model.w, DATA["X"], DATA["Y"]))
    n = X.shape[1]
    grad_Q = (W @ X - Y) @ X.T / n  # ∂/∂W_Q of mean_i ½‖W_Q x_i − y_i‖²
    grad_w = C_W * w
    got = _evaluate(
        {
            "W_Q": O.gradient_norm(quadratic_loss, where_Q),
            "group": O.gradient_norm(quadratic_loss, where_group),  # ∂L/∂W_K = 0
            "unused": O.gradient_norm(quadratic_loss, lambda m: m.inner),  # a sub-module
        },
        model,
    )
    np.testing.assert_allclose(got["W_Q"], np.linalg.norm(grad_Q), rtol=1e-13)
    np.testing.assert_allclose(
        got["group"], np.sqrt(np.sum(grad_Q**2) + np.sum(grad_w**2)), rtol=1e-13
    )
    assert got["unused"] == 0.0


def _shifted_loss(model, data):
    return quadratic_loss(model, data) + 0.5 * C_W * jnp.sum(model.W_Q**2)


def test_hessian_extremes_of_a_quadratic_with_repeated_eigenvalues():
    # ∂²/∂W_Q² of mean_i ½‖W_Q x_i − y_i‖² + ½ C_W ‖W_Q‖² is (X Xᵀ / n + C_W I) ⊗ I: each of
    # 8 eigenvalues (all ≥ C_W > 0) eight times; C_W five times for w; zero for W_K (absent
    # from the loss). Both ends are exact, with no ghost eigenvalue outside the spectrum.
    model = _toy()
    X = np.asarray(DATA["X"])
    spectrum = np.linalg.eigvalsh(X @ X.T / X.shape[1]) + C_W
    got = _evaluate(
        {
            "W_Q": O.hessian_extremes(_shifted_loss, where_Q),
            "group": O.hessian_extremes(_shifted_loss, where_group),
        },
        model,
    )
    np.testing.assert_allclose(got["W_Q"], [spectrum[-1], spectrum[0]], rtol=1e-10)
    np.testing.assert_allclose(got["group"], [spectrum[-1], 0.0], rtol=1e-10, atol=1e-12)


class _TwoLayer(eqx.Module):
    A: jax.Array
    b: jax.Array


def _two_layer_loss(model, data):
    return 0.5 * jnp.mean((jnp.tanh(data["X"].T @ model.A) @ model.b - data["Y"][0]) ** 2)


def test_hessian_extremes_against_the_dense_hessian_of_a_nonconvex_loss():
    rng = np.random.default_rng(7)
    model = _TwoLayer(jnp.asarray(rng.normal(size=(8, 4))), jnp.asarray(rng.normal(size=4)))
    flat, unravel = jax.flatten_util.ravel_pytree(model)
    dense = np.linalg.eigvalsh(np.asarray(
        jax.hessian(lambda x: _two_layer_loss(unravel(x), DATA))(flat)))
    assert dense[0] < 0 < dense[-1]  # indefinite: both ends are tested
    where = lambda m: (m.A, m.b)  # noqa: E731
    exact = _evaluate({"h": O.hessian_extremes(_two_layer_loss, where)}, model)["h"]
    np.testing.assert_allclose(exact, [dense[-1], dense[0]], rtol=1e-10)
    # Stopped early, the Rayleigh–Ritz values lie inside the spectrum.
    few = _evaluate({"h": O.hessian_extremes(_two_layer_loss, where, iterations=1)}, model)["h"]
    assert dense[0] - 1e-12 <= few[1] and few[0] <= dense[-1] + 1e-12
    # Five or fewer parameters (LOBPCG needs more): the dense Hessian, exactly.
    small = _TwoLayer(model.A[:1, :2], model.b[:2])
    small_flat, small_unravel = jax.flatten_util.ravel_pytree(small)
    small_data = {"X": DATA["X"][:1], "Y": DATA["Y"]}
    small_dense = np.linalg.eigvalsh(np.asarray(jax.hessian(
        lambda x: _two_layer_loss(small_unravel(x), small_data))(small_flat)))
    got = _evaluate({"h": O.hessian_extremes(_two_layer_loss, where)}, small, small_data)["h"]
    np.testing.assert_allclose(got, [small_dense[-1], small_dense[0]], rtol=1e-12)


def test_hessian_extremes_along_a_solve_of_linear_regression():
    # Least squares: the Hessian X Xᵀ / n does not move along the flow.
    X = np.asarray(DATA["X"])
    spectrum = np.linalg.eigvalsh(X @ X.T / X.shape[1])
    model = _toy()
    flow = gflow.GradientFlow(model, lambda m, d: jnp.mean(per_sample_loss(m, d)), DATA,
                              trainable=eqx.tree_at(lambda m: m.W_Q, jax.tree_util.tree_map(
                                  lambda _: False, model), True))
    traj = gflow.solve(flow, 1.0, rtol=1e-9, ts=np.linspace(0.0, 1.0, 3),
                       observers={"h": O.hessian_extremes(flow.loss, where_Q)})
    assert traj.status == "completed"
    np.testing.assert_allclose(traj.observables["h"],
                               np.tile([spectrum[-1], spectrum[0]], (3, 1)), rtol=1e-10, atol=1e-12)
    with pytest.raises(InputError, match="iterations"):
        O.hessian_extremes(quadratic_loss, where_Q, iterations=0)
    # Parameters the loss does not see (6 of them, so LOBPCG): a zero Hessian, [0, 0], no NaN.
    zero = _evaluate({"h": O.hessian_extremes(quadratic_loss, lambda m: m.inner)}, model)["h"]
    np.testing.assert_array_equal(zero, [0.0, 0.0])


def test_loss_and_loss_by_group():
    model = _toy()
    losses = np.asarray(per_sample_loss(model, DATA))
    mask = np.array([True, False, True, True, False, False])
    got = _evaluate(
        {
            "loss": O.loss(quadratic_loss),
            "by_group": O.loss_by_group(
                per_sample_loss,
                {"first_three": np.array([0, 1, 2]), "masked": mask, "all": np.arange(6)},
            ),
        },
        model,
    )
    np.testing.assert_allclose(got["loss"], float(quadratic_loss(model, DATA)), rtol=1e-15)
    np.testing.assert_allclose(got["by_group"]["first_three"], losses[:3].mean(), rtol=1e-14)
    np.testing.assert_allclose(got["by_group"]["masked"], losses[mask].mean(), rtol=1e-14)
    np.testing.assert_allclose(got["by_group"]["all"], losses.mean(), rtol=1e-14)


def test_energy_default_and_custom():
    model = _toy()
    got = _evaluate(
        {"model": O.energy(), "custom": O.energy(lambda m, d: jnp.sum(m.w) * jnp.sum(d["Y"]))},
        model,
    )
    expected = np.sum(np.asarray(model.W_Q) @ np.asarray(DATA["X"]))
    np.testing.assert_allclose(got["model"], expected, rtol=1e-13)
    np.testing.assert_allclose(got["custom"], np.sum(model.w) * np.sum(DATA["Y"]), rtol=1e-13)
    with pytest.raises(InputError, match="energy"):
        O.energy()(Inner(jnp.zeros(2)), DATA)


def test_bad_input_raises_input_error():
    with pytest.raises(InputError, match="rtol"):
        O.numerical_rank(where_Q, rtol=2.0)
    with pytest.raises(InputError, match="rtol"):
        O.normalized_rank(where_Q, rtol="small")
    with pytest.raises(InputError, match="axis"):
        O.condensation(where_Q, axis=3)
    with pytest.raises(InputError, match="non-zero"):
        O.alignment(where_Q, np.zeros(8), axis=1)
    with pytest.raises(InputError, match="where"):
        O.effective_rank("W_Q")
    with pytest.raises(InputError, match="no sample"):
        O.loss_by_group(per_sample_loss, {"empty": np.zeros(6, dtype=bool)})
    with pytest.raises(InputError, match="integer indices or booleans"):
        O.loss_by_group(per_sample_loss, {"floats": np.array([0.0, 1.0])})
    with pytest.raises(InputError, match="group"):
        O.cosine_matrix(where_group, axis=1)(_toy(), DATA)
    with pytest.raises(InputError, match="where must select"):
        O.effective_rank(lambda m: m.inner)(_toy(), DATA)


def test_observers_inside_solve_on_a_two_layer_linear_network():
    """In a real solve: relative change and drift are exactly 0 at t0, the balancedness drift
    stays at the solver's error level, and the final values match the measures of the final
    model."""

    class TwoLayer(eqx.Module):
        W1: jax.Array
        W2: jax.Array

    rng = np.random.default_rng(3)
    S = jnp.asarray(np.diag([3.0, 2.0, 1.0]))
    model0 = TwoLayer(*(jnp.asarray(0.1 * rng.normal(size=(3, 3))) for _ in range(2)))

    def loss(m, target):
        return 0.5 * jnp.sum((target - m.W2 @ m.W1) ** 2)

    def balancedness(m, data):
        return m.W1 @ m.W1.T - m.W2.T @ m.W2

    flow = gflow.GradientFlow(model0, loss, S)
    traj = gflow.solve(
        flow,
        5.0,
        ts=gflow.linear_grid(0.0, 5.0, 11),
        rtol=1e-9,
        observers={
            "change": O.relative_change(lambda m: (m.W1, m.W2), model0),
            "drift": O.conserved(balancedness, model0),
            "rank": O.effective_rank(lambda m: m.W1),
            "alignment": O.alignment(lambda m: m.W2, np.array([1.0, 0.0, 0.0]), axis="columns"),
        },
    )
    obs = traj.observables
    assert traj.status == "completed"
    np.testing.assert_array_equal(obs["change"][0], [0.0, 0.0])
    assert np.max(np.abs(obs["drift"][0])) < 1e-16
    assert np.max(np.abs(obs["drift"])) < 1e-6
    final = traj.final
    np.testing.assert_allclose(obs["rank"][-1], float(M.effective_rank(final.W1)), rtol=1e-10)
    np.testing.assert_allclose(
        obs["change"][-1],
        [float(M.relative_change(a, b)) for a, b in ((final.W1, model0.W1), (final.W2, model0.W2))],
        rtol=1e-10,
    )
    assert set(obs["alignment"]) == {"min", "mean"} and obs["alignment"]["min"].shape == (11,)


def test_lanczos_observers():
    """`stable_rank(where, iterations)` and `spectral_norm(where, iterations)` give the measures'
    values, per matrix of a group; with `W_K` of rank 3, 4 Lanczos steps are exact (breakdown),
    so they match the SVD there; bad `iterations` are refused when the observer is built."""
    model = _toy()
    group = lambda m: (m.W_Q, m.W_K)  # noqa: E731
    got = _evaluate({"sr": O.stable_rank(group, 4), "norm": O.spectral_norm(group, 4),
                     "norm_svd": O.spectral_norm(group)}, model)
    for k, W in enumerate((model.W_Q, model.W_K)):
        assert got["sr"][k] == pytest.approx(float(M.stable_rank(W, 4)), rel=1e-13)
        assert got["norm"][k] == pytest.approx(float(M.spectral_norm(W, 4)), rel=1e-13)
        assert got["norm_svd"][k] == pytest.approx(np.linalg.svd(W, compute_uv=False)[0],
                                                   rel=1e-13)
    assert got["norm"][1] == pytest.approx(got["norm_svd"][1], rel=1e-12)
    assert got["norm"][0] <= got["norm_svd"][0] * (1 + 1e-14)
    for bad in (0, 1.5, True):
        with pytest.raises(InputError):
            O.stable_rank(group, bad)
