"""The pure measures of `gflow.measures` against numpy references, closed forms and invariants.

Compilation dominates the run time, so most checks go through `_report`, one jitted function
evaluating every measure of a matrix (one compilation per shape); few shapes are used.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import gflow  # noqa: F401  (enables float64)
from gflow import measures as M
from gflow import InputError

RNG = np.random.default_rng(20251)
RTOL = 1e-6


def _low_rank(m: int, n: int, rank: int, rng) -> np.ndarray:
    return rng.normal(size=(m, rank)) @ rng.normal(size=(rank, n))


MATRICES = {
    "square": RNG.normal(size=(8, 8)),
    "wide": RNG.normal(size=(6, 10)),
    "rank1": _low_rank(8, 8, 1, RNG),
    "rank3": _low_rank(8, 8, 3, RNG),
    "rank3_wide": _low_rank(6, 10, 3, RNG),
}
TRUE_RANK = {"square": 8, "wide": 6, "rank1": 1, "rank3": 3, "rank3_wide": 3}


def _directions(W):
    """A direction for the rows (length n) and one for the columns (length m)."""
    m, n = W.shape
    rng = np.random.default_rng(m * 100 + n)
    return rng.normal(size=n), rng.normal(size=m)


@jax.jit
def _report_jit(W, d_rows, d_cols):
    return dict(
        singular_values=M.singular_values(W),
        numerical_rank=M.numerical_rank(W, rtol=RTOL),
        normalized_rank=M.normalized_rank(W, RTOL),
        effective_rank=M.effective_rank(W),
        stable_rank=M.stable_rank(W),
        frobenius_norm=M.frobenius_norm(W),
        relative_change=M.relative_change(W, W + 0.3 * jnp.roll(W, 1, axis=0)),
        cosines_rows=M.cosines(W, d_rows, axis=1),
        cosines_columns=M.cosines(W, d_cols, axis="columns"),
        alignment_rows=jnp.stack(M.alignment(W, d_rows, axis="rows", min_norm_fraction=0.0)),
        alignment_columns=jnp.stack(M.alignment(W, d_cols, axis=0, min_norm_fraction=0.0)),
        # Default threshold (0.1): only rows/columns of non-negligible norm count.
        alignment_rows_default=jnp.stack(M.alignment(W, d_rows, axis=1)),
        alignment_columns_default=jnp.stack(M.alignment(W, d_cols, axis="columns")),
        condensation_rows_default=M.condensation(W, axis="rows"),
        condensation_rows=M.condensation(W, axis=1, min_norm_fraction=0.0),
        condensation_columns=M.condensation(W, axis=0, min_norm_fraction=0.0),
        cosine_matrix_rows=M.cosine_matrix(W, axis=1),
        cosine_matrix_columns=M.cosine_matrix(W, axis=0),
        ordered_rows=M.ordered_cosine_matrix(W, axis=1),
        ordered_columns=M.ordered_cosine_matrix(W, axis=0),
    )


def _report(W, directions=None):
    d_rows, d_cols = _directions(W) if directions is None else directions
    return {k: np.asarray(v) for k, v in _report_jit(W, d_rows, d_cols).items()}


SCALE_FREE = [
    "numerical_rank", "normalized_rank", "effective_rank", "stable_rank", "relative_change",
    "cosines_rows", "cosines_columns", "alignment_rows", "alignment_columns",
    "condensation_rows", "condensation_columns", "cosine_matrix_rows", "cosine_matrix_columns",
    "alignment_rows_default", "alignment_columns_default", "condensation_rows_default",
    "ordered_rows", "ordered_columns",
]  # fmt: skip


# --------------------------------------------------------------------------- numpy references


def _np_sv(W):
    return np.linalg.svd(W, compute_uv=False)


def _np_effective_rank(W):
    s = _np_sv(W)
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-np.sum(p * np.log(p))))


def _np_vectors(W, axis):
    return W if axis == 1 else W.T


def _np_cosines(W, d, axis):
    V = _np_vectors(W, axis)
    return np.abs(V @ d) / (np.linalg.norm(V, axis=1) * np.linalg.norm(d))


def _np_cosine_matrix(W, axis):
    V = _np_vectors(W, axis)
    U = V / np.linalg.norm(V, axis=1, keepdims=True)
    return U @ U.T


def _np_condensation(W, axis):
    C = np.abs(_np_cosine_matrix(W, axis))
    k = C.shape[0]
    return (C.sum() - np.trace(C)) / (k * (k - 1))


def _np_order(C):
    _, vecs = np.linalg.eigh(C)
    u = vecs[:, -1]
    u = u * np.sign(u[np.argmax(np.abs(u))])
    return np.argsort(u, kind="stable")


def _np_report(W, d_rows, d_cols):
    s = _np_sv(W)
    W0 = W + 0.3 * np.roll(W, 1, axis=0)
    out = dict(
        singular_values=s,
        numerical_rank=np.sum(s > RTOL * s[0]),
        normalized_rank=np.sum(_np_sv(W / np.linalg.norm(W)) > RTOL),
        effective_rank=_np_effective_rank(W),
        stable_rank=np.sum(s**2) / s[0] ** 2,
        frobenius_norm=np.linalg.norm(W),
        relative_change=np.linalg.norm(W - W0) / np.linalg.norm(W0),
        condensation_rows=_np_condensation(W, 1),
        condensation_columns=_np_condensation(W, 0),
    )
    for axis, d, label in ((1, d_rows, "rows"), (0, d_cols, "columns")):
        cos = _np_cosines(W, d, axis)
        C = _np_cosine_matrix(W, axis)
        order = _np_order(C)
        out[f"cosines_{label}"] = cos
        out[f"alignment_{label}"] = np.array([cos.min(), cos.mean()])
        out[f"cosine_matrix_{label}"] = C
        out[f"ordered_{label}"] = C[np.ix_(order, order)]
    return out


# --------------------------------------------------------------------------- numpy references


@pytest.mark.parametrize("name", list(MATRICES))
def test_every_measure_matches_numpy(name):
    W = MATRICES[name]
    got, ref = _report(W), _np_report(W, *_directions(W))
    assert set(ref) <= set(got)
    for key in ref:
        # Rank-deficient spectra hold rounding-level singular values: absolute tolerance.
        atol = 1e-13 * ref["singular_values"][0] if key == "singular_values" else 1e-13
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-12, atol=atol, err_msg=key)
    assert got["numerical_rank"] == got["normalized_rank"] == TRUE_RANK[name]


def test_normalized_rank_threshold_is_relative_to_frobenius_norm():
    # σ = (1, 0.3, 0.01): σ/σ_max = (1, .3, .01), σ/‖W‖_F = (0.958, 0.287, 0.00958).
    W = np.diag([1.0, 0.3, 0.01])
    ranks = jax.jit(
        lambda W: (
            M.numerical_rank(W, rtol=0.0099),
            M.normalized_rank(W, 0.0099),
            M.normalized_rank(W, 0.0095),
        )
    )(W)
    assert [float(r) for r in ranks] == [3.0, 2.0, 3.0]


def test_ranks_of_identity_and_rank_one():
    got = _report(3.7 * np.eye(8))
    for key in ("effective_rank", "stable_rank", "numerical_rank", "normalized_rank"):
        np.testing.assert_allclose(got[key], 8.0, rtol=1e-14, err_msg=key)
    got = _report(MATRICES["rank1"])
    # Rounding-level singular values (~1e-16 σ_max) add ~1e-14 to the entropy.
    for key in ("effective_rank", "stable_rank", "numerical_rank", "normalized_rank"):
        np.testing.assert_allclose(got[key], 1.0, atol=1e-12, err_msg=key)
    # A vector counts as a 1 x n matrix: rank one, singular value = its norm.
    v = np.array([3.0, 4.0])
    assert float(M.effective_rank(v)) == 1.0
    np.testing.assert_allclose(np.asarray(M.singular_values(v)), [5.0], rtol=1e-15)


@settings(max_examples=25, deadline=None)
@given(
    shape=st.sampled_from([(8, 8), (6, 10)]),
    rank=st.integers(1, 8),
    log_scale=st.floats(-150.0, 10.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_rank_bounds(shape, rank, log_scale, seed):
    m, n = shape
    rank = min(rank, m, n)
    W = 10.0**log_scale * _low_rank(m, n, rank, np.random.default_rng(seed))
    got = _report(W)
    assert 1.0 - 1e-12 <= got["stable_rank"] <= rank + 1e-9
    assert 1.0 - 1e-12 <= got["effective_rank"] <= rank + 1e-9
    assert got["normalized_rank"] <= got["numerical_rank"] <= rank


# --------------------------------------------------------------------------- tiny and zero inputs


@pytest.mark.parametrize("scale", [1e-12, 1e-150])
@pytest.mark.parametrize("name", ["square", "rank1", "rank3", "rank3_wide"])
def test_tiny_matrices_give_the_same_values(name, scale):
    """Scale-free measures of `scale * W` equal those of `W`; norms and spectra scale exactly."""
    W = MATRICES[name]
    big, tiny = _report(W), _report(scale * W)
    for key in SCALE_FREE:
        assert np.all(np.isfinite(tiny[key])), key
        np.testing.assert_allclose(tiny[key], big[key], rtol=1e-10, atol=1e-10, err_msg=key)
    s = big["singular_values"]
    np.testing.assert_allclose(
        tiny["singular_values"], scale * s, rtol=0, atol=1e-13 * scale * s[0]
    )
    np.testing.assert_allclose(tiny["frobenius_norm"], scale * big["frobenius_norm"], rtol=1e-14)


@pytest.mark.parametrize("shape", [(8, 8), (6, 10)])
def test_zero_matrix_gives_zeros_not_nan(shape):
    got = _report(np.zeros(shape))
    for key, value in got.items():
        np.testing.assert_array_equal(value, np.zeros_like(value), err_msg=key)
    order = np.asarray(M.leading_eigenvector_order(np.zeros((5, 5))))
    assert sorted(order.tolist()) == list(range(5))


def test_zero_direction_gives_zero_cosines():
    W = MATRICES["square"]
    got = _report(W, (np.zeros(8), np.zeros(8)))
    for key in ("cosines_rows", "cosines_columns", "alignment_rows", "alignment_columns"):
        np.testing.assert_array_equal(got[key], np.zeros_like(got[key]), err_msg=key)


def test_relative_change_from_zero_reports_absolute_change():
    W = MATRICES["rank3"]
    np.testing.assert_allclose(
        float(M.relative_change(W, np.zeros_like(W))), np.linalg.norm(W), rtol=1e-14
    )
    assert float(M.relative_change(W, W)) == 0.0


def _differentiable(X, direction, reference):
    return dict(
        singular_values=M.singular_values(X),
        effective_rank=M.effective_rank(X),
        stable_rank=M.stable_rank(X),
        frobenius_norm=M.frobenius_norm(X),
        relative_change=M.relative_change(X, reference),
        alignment_mean=M.alignment(X, direction, axis=1, min_norm_fraction=0.0)[1],
        condensation=M.condensation(X, axis=0, min_norm_fraction=0.0),
        cosine_matrix=M.cosine_matrix(X, axis=1),
    )


def test_derivatives_are_finite_and_correct():
    """Transition conditions are root-found by Newton's method: forward derivatives of measures
    must be right on generic matrices and finite (never nan) at zero and rank-deficient ones."""
    W, dW, d = MATRICES["square"], RNG.normal(size=(8, 8)), RNG.normal(size=8)
    reference = W + 1.0
    value = jax.jit(_differentiable)
    tangent = jax.jit(
        lambda X, dX: jax.jvp(lambda Y: _differentiable(Y, d, reference), (X,), (dX,))[1]
    )
    h = 1e-6
    plus, minus = value(W + h * dW, d, reference), value(W - h * dW, d, reference)
    exact = tangent(W, dW)
    for key in exact:
        central = (np.asarray(plus[key]) - np.asarray(minus[key])) / (2 * h)
        np.testing.assert_allclose(
            np.asarray(exact[key]), central, rtol=1e-6, atol=1e-7, err_msg=key
        )
    for X in (np.zeros((8, 8)), MATRICES["rank1"], 1e-12 * MATRICES["rank3"]):
        for key, t in tangent(X, dW).items():
            assert np.all(np.isfinite(np.asarray(t))), key


# --------------------------------------------------------------------------- directions


def test_axis_convention_rows_and_columns():
    # `_report` already checks the aliases "rows"/"columns" against numpy; this pins the meaning.
    W = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])  # rows have length 3, columns length 2
    np.testing.assert_array_equal(np.asarray(M.cosines(W, [1.0, 0.0, 0.0], axis=1)), [1.0, 0.0])
    np.testing.assert_array_equal(np.asarray(M.cosines(W, [0.0, 1.0], axis=0)), [0.0, 1.0, 0.0])


def test_alignment_of_parallel_rows_is_one_and_negligible_rows_are_excluded():
    v = RNG.normal(size=8)
    parallel = np.array([3.0, -0.5, 2.0, -7.0, 1.0])[:, None] * v[None, :]
    # Random rows of norm 1e-3 x the largest.
    noise = RNG.normal(size=(3, 8))
    largest = np.linalg.norm(parallel, axis=1).max()
    noise *= 1e-3 * largest / np.linalg.norm(noise, axis=1, keepdims=True)
    W = np.concatenate([parallel, noise])

    # At the default min_norm_fraction = 0.1 the noise rows are excluded: exactly aligned.
    rows = _report(W, (-2.5 * v, np.ones(8)))["alignment_rows_default"]
    columns = _report(W.T, (np.ones(8), -2.5 * v))["alignment_columns_default"]
    np.testing.assert_allclose(rows, [1.0, 1.0], rtol=0, atol=1e-15)
    np.testing.assert_allclose(columns, [1.0, 1.0], rtol=0, atol=1e-15)
    # With no threshold the noise rows count, and pull the minimum down.
    every = _report(W, (v, np.ones(8)))["alignment_rows"]
    ref = _np_cosines(W, v, 1)
    np.testing.assert_allclose(every, [ref.min(), ref.mean()], rtol=1e-13)
    assert every[0] < 0.999


def test_condensation_limits():
    # Rank one: every row and every column on one line, of either sign.
    got = _report(MATRICES["rank1"])
    np.testing.assert_allclose(got["condensation_rows"], 1.0, atol=1e-14)
    np.testing.assert_allclose(got["condensation_columns"], 1.0, atol=1e-14)
    # Orthogonal rows are not condensed at all.
    assert _report(np.eye(8))["condensation_rows"] == 0.0
    # One dominant row, the others negligible: a single orientation.
    W = 1e-3 * RNG.normal(size=(8, 8))
    W[2] = np.arange(1.0, 9.0)
    got = _report(W)
    assert got["condensation_rows_default"] == 1.0
    assert got["condensation_rows"] < 0.9


def test_cosine_matrix_is_a_gram_matrix_with_unit_diagonal():
    got = _report(MATRICES["wide"])
    for key in ("cosine_matrix_rows", "cosine_matrix_columns"):
        C = got[key]
        np.testing.assert_allclose(np.diag(C), 1.0, atol=1e-15)
        np.testing.assert_array_equal(C, C.T)
        assert np.linalg.eigvalsh(C).min() > -1e-12


def _runs(labels) -> int:
    return 1 + int(np.sum(labels[1:] != labels[:-1]))


@pytest.mark.parametrize("opposite", [False, True])
def test_ordered_cosine_matrix_groups_planted_clusters(opposite):
    """Two planted clusters (orthogonal directions of unequal size, or ±v as in condensation)
    come out as two contiguous blocks, whatever the input order."""
    rng = np.random.default_rng(7)
    a, b = np.zeros(8), np.zeros(8)
    a[0], b[1] = 1.0, 1.0
    if opposite:
        b = -a
    labels = np.array([0] * 5 + [1] * 3)
    rows = np.where(labels[:, None] == 0, a, b) * rng.uniform(0.5, 2.0, size=(8, 1))
    rows += 0.05 * rng.normal(size=rows.shape)
    perm = np.array([0, 5, 1, 6, 2, 7, 3, 4])  # interleave the clusters
    W, labels = rows[perm], labels[perm]
    assert _runs(labels) == 7

    got = _report(W)
    order = np.asarray(M.leading_eigenvector_order(got["cosine_matrix_rows"]))
    np.testing.assert_array_equal(order, _np_order(_np_cosine_matrix(W, 1)))
    assert _runs(labels[order]) == 2
    np.testing.assert_allclose(got["ordered_rows"], got["cosine_matrix_rows"][np.ix_(order, order)])
    # The same vectors as columns of the transpose give the same heat map.
    np.testing.assert_allclose(_report(W.T)["ordered_columns"], got["ordered_rows"], atol=1e-15)


def test_bad_input_raises_input_error():
    W = MATRICES["square"]
    with pytest.raises(InputError, match="axis"):
        M.cosines(W, np.ones(8), axis=2)
    with pytest.raises(InputError, match="direction"):
        M.cosines(W, np.ones(5), axis=1)
    with pytest.raises(InputError, match="equal shapes"):
        M.relative_change(W, W[:4])
    with pytest.raises(InputError, match="matrix"):
        M.effective_rank(np.zeros((2, 3, 4)))
    with pytest.raises(InputError, match="min_norm_fraction"):
        M.condensation(W, axis=1, min_norm_fraction=1.5)
    with pytest.raises(InputError, match="rtol"):
        M.numerical_rank(W, rtol=-1.0)
    with pytest.raises(InputError, match="square"):
        M.leading_eigenvector_order(np.ones((3, 4)))


# --------------------------------------------------------------------------- Lanczos σ_max


def _spiked(m: int, n: int, strength: float, rng) -> np.ndarray:
    """Gaussian noise plus a rank-one spike whose singular value is `strength` times the
    noise's largest: a condensed or collapsed weight matrix."""
    noise = rng.normal(size=(m, n))
    u, v = rng.normal(size=m), rng.normal(size=n)
    edge = np.sqrt(m) + np.sqrt(n)
    return noise + strength * edge * np.outer(u / np.linalg.norm(u), v / np.linalg.norm(v))


def _check_lanczos(shape, gaussian_bounds):
    rng = np.random.default_rng(sum(shape))
    for W, bounds in ((rng.normal(size=shape), gaussian_bounds),
                      (_spiked(*shape, 2.0, rng), {16: 1e-13, 32: 1e-13})):
        s = np.linalg.svd(W, compute_uv=False)
        exact_rank = np.sum(s**2) / s[0] ** 2
        for steps, bound in bounds.items():
            squared = float(M.spectral_norm(W, steps)) ** 2
            assert squared <= s[0] ** 2 * (1 + 1e-14)
            assert 1 - squared / s[0] ** 2 <= bound
            sr = float(M.stable_rank(W, steps))
            assert sr >= exact_rank * (1 - 1e-13)
            assert sr / exact_rank - 1 <= bound * (1 + 1e-6) + 1e-13


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(640, 640), (640, 1280), (1280, 640)])
def test_lanczos_spectral_norm_at_the_papers_size(shape):
    """`σ_max` by 16 and 32 Lanczos steps against the SVD at the paper's matrix shapes: from
    below always; on a Gaussian matrix (no gap: the worst case) within the documented 2e-2 and
    1e-4 in `σ_max²`; with a leading singular value apart from the bulk (twice the noise's
    edge), at rounding after 16 steps. The stable rank inherits the relative error of
    `σ_max²`, from above."""
    _check_lanczos(shape, {16: 2e-2, 32: 1e-4})


@pytest.mark.parametrize("shape", [(96, 192), (192, 96)])
def test_lanczos_spectral_norm(shape):
    """As above at a size the default suite affords (the Gaussian worst case converges
    faster on a smaller spectrum)."""
    _check_lanczos(shape, {16: 2e-2, 32: 1e-4})


def test_lanczos_exact_cases():
    """The Lanczos path's conventions match the SVD path's: exact for a low-rank matrix
    (breakdown after `rank` steps), 0 for a zero matrix, scale invariant at 1e-200; with
    at least `min(m, n)` steps the SVD itself; bad `iterations` are refused."""
    rng = np.random.default_rng(3)
    low = _low_rank(40, 30, 3, rng)
    s = np.linalg.svd(low, compute_uv=False)
    assert float(M.spectral_norm(low, 8)) == pytest.approx(s[0], rel=1e-13)
    assert float(M.stable_rank(low, 8)) == pytest.approx(np.sum(s**2) / s[0] ** 2, rel=1e-12)
    assert float(M.stable_rank(1e-200 * low, 8)) == pytest.approx(
        float(M.stable_rank(low, 8)), rel=1e-13)
    assert float(M.spectral_norm(1e-200 * low, 8)) == pytest.approx(1e-200 * s[0], rel=1e-13)
    assert float(M.stable_rank(np.zeros((40, 30)), 8)) == 0.0
    assert float(M.spectral_norm(np.zeros((40, 30)), 8)) == 0.0
    small = rng.normal(size=(5, 9))
    assert float(M.stable_rank(small, 5)) == float(M.stable_rank(small))
    for bad in (0, -1, 2.5, True):
        with pytest.raises(InputError):
            M.stable_rank(small, bad)
    # Forward-differentiable (transition conditions are root-found): the tangent matches a
    # central difference.
    W, dW = jnp.asarray(rng.normal(size=(50, 40))), jnp.asarray(rng.normal(size=(50, 40)))
    _, tangent = jax.jvp(lambda X: M.stable_rank(X, 12), (W,), (dW,))
    h = 1e-6
    fd = (M.stable_rank(W + h * dW, 12) - M.stable_rank(W - h * dW, 12)) / (2 * h)
    assert float(tangent) == pytest.approx(float(fd), rel=1e-6)
