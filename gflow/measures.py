"""Pure measures of weight matrices: spectra, ranks, norms, alignment and condensation.

Every function here takes plain arrays (no model, no `where`), is jit-able and
forward-differentiable (transition conditions built from them are root-found by Newton's
method), and is numerically safe on all-zero and tiny (1e-12-scale, or far smaller) inputs:

- scale-free quantities (ranks, cosines, condensation) are computed on the matrix divided by its
  largest absolute entry, so they are the same for `W` and `1e-12 * W` up to rounding;
- a quantity that would be `0/0` takes a documented conventional value instead of nan: the ranks
  of a zero matrix are 0, the cosine of a zero vector with anything is 0.

Every public function is wrapped in `eqx.filter_jit` (Python numbers such as `axis` or `rtol`
are static), so calling them eagerly, e.g. on saved trajectories, compiles once per shape instead
of dispatching op by op; inside a jitted solve the wrapper is inlined.

**Axis convention** (`cosines`, `alignment`, `condensation`, `cosine_matrix`): `axis` is the axis
the vectors *run along*, as in `np.linalg.norm(W, axis=axis)`. `axis=1` (or `"rows"`) compares
the rows `W[i, :]`; `axis=0` (or `"columns"`) compares the columns `W[:, j]`.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int

from ._errors import InputError


# --------------------------------------------------------------------------- safe arithmetic


def _safe_divide(numerator: Array, denominator: Array) -> Array:
    """`numerator / denominator`, and 0 where the denominator is 0.

    The double `where` keeps forward- and reverse-mode derivatives finite too: the division
    itself never sees a zero denominator.
    """
    nonzero = denominator != 0
    return jnp.where(nonzero, numerator / jnp.where(nonzero, denominator, 1.0), 0.0)


def _safe_sqrt(x: Array) -> Array:
    """`sqrt(x)` for `x >= 0` whose derivative at 0 is 0 instead of inf (hence no `inf * 0`)."""
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def _max_abs_scale(x: Array, axis=None) -> Array:
    """The largest absolute entry (along `axis`), or 1 where it is 0: a safe divisor that brings
    the entries to order one, so squares neither underflow nor overflow."""
    scale = jnp.max(jnp.abs(x), axis=axis, keepdims=axis is not None)
    return jnp.where(scale > 0, scale, 1.0)


def _as_matrix(W: ArrayLike, name: str = "W") -> Float[Array, "m n"]:
    """`W` as a float64 matrix; a vector counts as a `1 x n` matrix."""
    W = jnp.asarray(W, dtype=float)
    if W.ndim == 1:
        W = W[None, :]
    if W.ndim != 2:
        raise InputError(f"{name} must be a matrix (or a vector), got shape {W.shape}")
    return W


def _as_strict_matrix(W: ArrayLike) -> Float[Array, "m n"]:
    W = jnp.asarray(W, dtype=float)
    if W.ndim != 2:
        raise InputError(
            f"W must be a matrix whose rows or columns are compared, got shape {W.shape}"
        )
    return W


def _check_rtol(rtol) -> None:
    # Only a concrete number can be checked; a traced threshold is the caller's business.
    if isinstance(rtol, (int, float)) and not (0 <= rtol < 1):
        raise InputError(f"rtol must lie in [0, 1), got {rtol!r}")


def _vector_axis(axis: int | str) -> int:
    """Normalise `axis` to 0 (columns) or 1 (rows)."""
    aliases = {"rows": 1, "columns": 0, 1: 1, -1: 1, 0: 0, -2: 0}
    if isinstance(axis, bool) or axis not in aliases:
        raise InputError(f"axis must be 0/'columns' or 1/'rows', got {axis!r}")
    return aliases[axis]


def _vectors(W: Float[Array, "m n"], axis: int | str) -> Float[Array, "k length"]:
    """The vectors compared along `axis`, one per row of the result."""
    return W if _vector_axis(axis) == 1 else W.T


def _unit_vectors(
    V: Float[Array, "k length"],
) -> tuple[Float[Array, "k length"], Float[Array, " k"]]:
    """Each row of `V` normalised to unit length (a zero row stays zero), and the row norms.

    Each row is first divided by its own largest entry, so a 1e-200-scale row is handled as
    accurately as an O(1) one.
    """
    scale = _max_abs_scale(V, axis=-1)
    scaled = V / scale
    scaled_norm = _safe_sqrt(jnp.sum(scaled**2, axis=-1, keepdims=True))
    unit = _safe_divide(scaled, scaled_norm)
    return unit, (scale * scaled_norm)[:, 0]


def _normalized_singular_values(W: Float[Array, "m n"]) -> Float[Array, " r"]:
    """Singular values of `W / max|W_ij|` (zeros for a zero matrix), in descending order."""
    return jnp.linalg.svd(W / _max_abs_scale(W), compute_uv=False)


def _frobenius(W: Array) -> Float[Array, ""]:
    scale = _max_abs_scale(W)
    return jnp.where(
        jnp.any(W != 0), scale * _safe_sqrt(jnp.sum((W / scale) ** 2)), 0.0
    )


# --------------------------------------------------------------------------- spectra and ranks


@eqx.filter_jit
def singular_values(W: Float[ArrayLike, "m n"]) -> Float[Array, " min(m,n)"]:
    """The singular values of `W`, in descending order.

    **Arguments:**

    - `W`: a matrix (a vector counts as a `1 x n` matrix).

    **Returns:**

    The `min(m, n)` singular values, descending; all zero for a zero matrix. The matrix is
    rescaled by its largest entry before the SVD, so tiny matrices keep full relative accuracy.
    """
    W = _as_matrix(W)
    return jnp.max(jnp.abs(W)) * _normalized_singular_values(W)


@eqx.filter_jit
def numerical_rank(W: Float[ArrayLike, "m n"], rtol: float = 1e-6) -> Float[Array, ""]:
    """The number of singular values above `rtol` times the largest one.

    **Arguments:**

    - `W`: a matrix (a vector counts as a `1 x n` matrix).
    - `rtol`: relative threshold on `σ_i / σ_max`.

    **Returns:**

    `#{i : σ_i > rtol · σ_max}` as a float64 scalar (a float so that it can share a trajectory
    buffer with nan/inf fill values); 0 for a zero matrix. Scale invariant.
    """
    _check_rtol(rtol)
    sigma = _normalized_singular_values(_as_matrix(W))
    return jnp.sum(sigma > rtol * sigma[0]).astype(float)


@eqx.filter_jit
def effective_rank(W: Float[ArrayLike, "m n"]) -> Float[Array, ""]:
    """Roy–Vetterli effective rank `exp(H(p))`, `p_i = σ_i / Σ_j σ_j`, with `0 · log 0 = 0`.

    **Arguments:**

    - `W`: a matrix (a vector counts as a `1 x n` matrix).

    **Returns:**

    A float64 scalar in `[1, min(m, n)]` for a non-zero matrix: `n` for a multiple of the
    `n x n` identity, 1 for a rank-one matrix (up to rounding-level singular values, which add
    about `1e-14`); 0 for a zero matrix. Scale invariant.
    """
    sigma = _normalized_singular_values(_as_matrix(W))
    p = _safe_divide(sigma, jnp.sum(sigma))
    positive = p > 0
    plogp = jnp.where(positive, p * jnp.log(jnp.where(positive, p, 1.0)), 0.0)
    return jnp.where(sigma[0] > 0, jnp.exp(-jnp.sum(plogp)), 0.0)


def _check_iterations(iterations) -> None:
    if iterations is not None and (
        isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1
    ):
        raise InputError(f"iterations must be a positive integer or None, got {iterations!r}")


def _lanczos_top_eigenvalue(W: Float[Array, "m n"], steps: int) -> Float[Array, ""]:
    """The largest Ritz value of `steps` Lanczos steps on the Gram matrix of `W`'s shorter side
    (`W Wᵀ` for `m ≤ n`, else `Wᵀ W`; only products with `W` and `Wᵀ` are formed).

    Full reorthogonalization (twice, classical Gram-Schmidt against every earlier vector) keeps
    the basis orthonormal in floating point; it costs `O(steps² · min(m, n))`, negligible
    beside the `2 · steps` products with `W`. The start vector is a fixed normal draw (seed 0):
    the estimate is a deterministic, smooth function of `W`, as a transition condition needs.
    A breakdown (an invariant subspace found: `W` of rank below `steps`) continues with zero
    vectors, which adds zero Ritz values and leaves the largest one exact.
    """
    # Products in `W`'s own layout (`x @ W`, `W @ x`): a transpose inside the loop would be
    # materialized at every step.
    if W.shape[0] <= W.shape[1]:
        size = W.shape[0]

        def gram(x):
            return W @ (x @ W)
    else:
        size = W.shape[1]

        def gram(x):
            return (W @ x) @ W
    start = jax.random.normal(jax.random.key(0), (size,), W.dtype)
    basis = jnp.zeros((steps + 1, size), W.dtype).at[0].set(start / jnp.linalg.norm(start))

    def step(j, carry):
        basis, alpha, beta = carry
        w = gram(basis[j])
        a = basis[j] @ w
        for _ in range(2):
            w = w - basis.T @ (basis @ w)
        b = jnp.linalg.norm(w)
        basis = basis.at[j + 1].set(_safe_divide(w, b))
        return basis, alpha.at[j].set(a), beta.at[j].set(b)

    zeros = jnp.zeros(steps, W.dtype)
    _, alpha, beta = jax.lax.fori_loop(0, steps, step, (basis, zeros, zeros))
    off = beta[:-1]
    tridiagonal = jnp.diag(alpha) + jnp.diag(off, 1) + jnp.diag(off, -1)
    return jnp.linalg.eigvalsh(tridiagonal)[-1]


def _squared_spectral_norm(scaled: Float[Array, "m n"], iterations: int | None):
    """`σ_max²` of a matrix already divided by its largest entry: by SVD when `iterations` is
    `None` or at least `min(m, n)` (the Krylov space would be the whole space, and at such
    sizes the SVD is the cheaper), else by `iterations` Lanczos steps."""
    if iterations is None or iterations >= min(scaled.shape):
        return jnp.linalg.svd(scaled, compute_uv=False)[0] ** 2
    return _lanczos_top_eigenvalue(scaled, iterations)


@eqx.filter_jit
def spectral_norm(W: Float[ArrayLike, "m n"], iterations: int | None = None) -> Float[Array, ""]:
    """The largest singular value `σ_max = ‖W‖_2`.

    **Arguments:**

    - `W`: a matrix (a vector counts as a `1 x n` matrix).
    - `iterations`: `None` for the SVD (exact to rounding, `O(m n min(m, n))`); a number `k`
        for `k` Lanczos steps on the Gram matrix of the shorter side (`2k` products with `W`
        and `Wᵀ`, `O(k m n)`), from a fixed start vector. The SVD is used whenever
        `k ≥ min(m, n)`.

    **Returns:**

    A float64 scalar; 0 for a zero matrix. The Lanczos value never exceeds `σ_max` (a Ritz
    value bounds the largest eigenvalue from below) and converges geometrically at a rate set by
    the relative gap between `σ_max²` and the rest of the spectrum (Kaniel–Paige–Saad): for a
    matrix with a leading singular value apart from the bulk (a condensed or collapsed weight)
    16 steps reach rounding; at a random Gaussian 640 x 640, 640 x 1280 or 1280 x 640 matrix,
    the worst case (no gap), `σ_max²` is within `2e-2` (16 steps) and `1e-4` (32 steps). Those
    numbers are measured and tested (`tests/test_measures.py`), not guaranteed: the a-priori
    bound depends on the unknown gap.
    """
    _check_iterations(iterations)
    W = _as_matrix(W)
    scale = _max_abs_scale(W)
    return jnp.where(jnp.any(W != 0),
                     scale * _safe_sqrt(_squared_spectral_norm(W / scale, iterations)), 0.0)


@eqx.filter_jit
def stable_rank(W: Float[ArrayLike, "m n"], iterations: int | None = None) -> Float[Array, ""]:
    """Stable rank `‖W‖_F² / ‖W‖_2² = Σ σ_i² / σ_max²`.

    **Arguments:**

    - `W`: a matrix (a vector counts as a `1 x n` matrix).
    - `iterations`: how `σ_max` is found, as in `spectral_norm`: `None` for the SVD, `k` for
        `k` Lanczos steps (about `4k m n` flops: what a transition condition or a save-time
        observer of a large matrix can afford; the Frobenius norm is exact either way).

    **Returns:**

    A float64 scalar with `1 ≤ sr ≤ rank(W)` for a non-zero matrix (with Lanczos, an estimate
    from above: `σ_max` is estimated from below, see `spectral_norm`); 0 for a zero matrix.
    Scale invariant.
    """
    _check_iterations(iterations)
    W = _as_matrix(W)
    if iterations is None or iterations >= min(W.shape):
        sigma = _normalized_singular_values(W)
        return jnp.sum(_safe_divide(sigma, sigma[0]) ** 2)
    scaled = W / _max_abs_scale(W)
    return _safe_divide(jnp.sum(scaled**2), _squared_spectral_norm(scaled, iterations))


@eqx.filter_jit
def normalized_rank(W: Float[ArrayLike, "m n"], rtol: float) -> Float[Array, ""]:
    """The rank of the normalized matrix `W / ‖W‖_F`: its number of singular values > `rtol`.

    The singular values of `W / ‖W‖_F` are the ratios `σ_i / ‖W‖_F = σ_i / sqrt(Σ_j σ_j²)`,
    all in `[0, 1]` with squares summing to 1; this counts those above `rtol`. It differs from
    `numerical_rank(W, rtol)` only in the reference (`‖W‖_F` instead of `σ_max`), so it is
    never larger than it, and equals it up to a factor `sqrt(rank)` in the threshold.

    **Arguments:**

    - `W`: a matrix (a vector counts as a `1 x n` matrix).
    - `rtol`: threshold on `σ_i / ‖W‖_F`.

    **Returns:**

    `#{i : σ_i > rtol · ‖W‖_F}` as a float64 scalar; 0 for a zero matrix. Scale invariant.
    """
    _check_rtol(rtol)
    sigma = _normalized_singular_values(_as_matrix(W))
    frobenius = _safe_sqrt(jnp.sum(sigma**2))
    return jnp.sum((sigma > rtol * frobenius) & (sigma > 0)).astype(float)


@eqx.filter_jit
def frobenius_norm(W: Float[ArrayLike, "..."]) -> Float[Array, ""]:
    """The Frobenius (Euclidean) norm `sqrt(Σ W_ij²)` of an array of any shape.

    **Arguments:**

    - `W`: an array.

    **Returns:**

    A float64 scalar, computed on the array divided by its largest entry so that neither
    underflow (tiny arrays) nor overflow occurs; its derivative at a zero array is 0, not nan.
    """
    return _frobenius(jnp.asarray(W, dtype=float))


@eqx.filter_jit
def relative_change(W: Float[ArrayLike, "..."], W0: Float[ArrayLike, "..."]) -> Float[Array, ""]:
    """The relative change `‖W − W0‖_F / ‖W0‖_F`.

    **Arguments:**

    - `W`: the current array.
    - `W0`: the reference (initial) array, of the same shape.

    **Returns:**

    A float64 scalar; 0 when `W == W0`. When `W0` is exactly zero the relative change is
    undefined and the absolute change `‖W‖_F` is returned instead (finite, and 0 at `W = W0`).
    """
    W = jnp.asarray(W, dtype=float)
    W0 = jnp.asarray(W0, dtype=float)
    if W.shape != W0.shape:
        raise InputError(f"relative_change needs equal shapes, got {W.shape} and {W0.shape}")
    reference = _frobenius(W0)
    change = _frobenius(W - W0)
    return jnp.where(reference > 0, _safe_divide(change, reference), change)


# --------------------------------------------------------------------------- directions


@eqx.filter_jit
def cosines(
    W: Float[ArrayLike, "m n"], direction: Float[ArrayLike, " length"], axis: int | str
) -> Float[Array, " k"]:
    """`|cos|` of the angle between each row (or column) of `W` and a direction.

    **Arguments:**

    - `W`: a matrix.
    - `direction`: a vector, of length `n` for rows or `m` for columns.
    - `axis`: `1`/`"rows"` compares the rows `W[i, :]`, `0`/`"columns"` the columns `W[:, j]`
        (the axis the vectors run along, as in `np.linalg.norm(W, axis=axis)`).

    **Returns:**

    The `|cos|` values in `[0, 1]`, one per row (length `m`) or column (length `n`); 0 for a
    zero row/column or a zero direction. Scale invariant in both arguments.
    """
    V = _vectors(_as_strict_matrix(W), axis)
    direction = jnp.asarray(direction, dtype=float)
    if direction.shape != (V.shape[1],):
        raise InputError(
            f"direction must be a vector of length {V.shape[1]} for axis={axis!r}, "
            f"got shape {direction.shape}"
        )
    unit, _ = _unit_vectors(V)
    unit_direction, _ = _unit_vectors(direction[None, :])
    return jnp.clip(jnp.abs(unit @ unit_direction[0]), 0.0, 1.0)


def _significant(norms: Float[Array, " k"], min_norm_fraction: float) -> Array:
    """Mask of the vectors whose norm is non-zero and at least a fraction of the largest."""
    return (norms > 0) & (norms >= min_norm_fraction * jnp.max(norms))


def _check_fraction(min_norm_fraction: float) -> None:
    if not 0 <= min_norm_fraction <= 1:
        raise InputError(f"min_norm_fraction must lie in [0, 1], got {min_norm_fraction!r}")


@eqx.filter_jit
def alignment(
    W: Float[ArrayLike, "m n"],
    direction: Float[ArrayLike, " length"],
    axis: int | str,
    min_norm_fraction: float = 0.1,
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """Minimum and mean `|cos|` with a direction over the non-negligible rows (or columns).

    A row/column counts when its norm is non-zero and at least `min_norm_fraction` times the
    largest row/column norm: neurons that never grew are not asked to align.

    **Arguments:**

    - `W`: a matrix.
    - `direction`: a vector, of length `n` for rows or `m` for columns.
    - `axis`: `1`/`"rows"` or `0`/`"columns"`, as in `cosines`.
    - `min_norm_fraction`: the negligibility threshold, relative to the largest norm.

    **Returns:**

    `(minimum, mean)` of `|cos|` over the counted rows/columns, float64 scalars in `[0, 1]`;
    both 0 when nothing counts (a zero matrix) or the direction is zero. Scale invariant.
    """
    _check_fraction(min_norm_fraction)
    values = cosines(W, direction, axis)
    _, norms = _unit_vectors(_vectors(_as_strict_matrix(W), axis))
    mask = _significant(norms, min_norm_fraction)
    count = jnp.sum(mask)
    minimum = jnp.where(count > 0, jnp.min(jnp.where(mask, values, jnp.inf)), 0.0)
    mean = _safe_divide(jnp.sum(jnp.where(mask, values, 0.0)), count.astype(float))
    return minimum, mean


@eqx.filter_jit
def cosine_matrix(W: Float[ArrayLike, "m n"], axis: int | str) -> Float[Array, "k k"]:
    """Pairwise (signed) cosine similarity of the rows (or columns) of `W`.

    **Arguments:**

    - `W`: a matrix.
    - `axis`: `1`/`"rows"` (result `m x m`) or `0`/`"columns"` (result `n x n`), as in `cosines`.

    **Returns:**

    The symmetric matrix `C_ij = cos(w_i, w_j)` with entries in `[-1, 1]` and unit diagonal;
    the row, column and diagonal entry of a zero vector are 0. It is the Gram matrix of the
    unit vectors, hence positive semi-definite. Scale invariant.
    """
    unit, _ = _unit_vectors(_vectors(_as_strict_matrix(W), axis))
    return jnp.clip(unit @ unit.T, -1.0, 1.0)


@eqx.filter_jit
def condensation(
    W: Float[ArrayLike, "m n"], axis: int | str, min_norm_fraction: float = 0.1
) -> Float[Array, ""]:
    """Mean `|cos|` over the pairs of distinct non-negligible rows (or columns) of `W`.

    1 when every non-negligible row/column lies on one line (full condensation onto `±v`);
    about `sqrt(2 / (π·length))` for random directions.

    **Arguments:**

    - `W`: a matrix.
    - `axis`: `1`/`"rows"` or `0`/`"columns"`, as in `cosines`.
    - `min_norm_fraction`: a row/column counts when its norm is non-zero and at least this
        fraction of the largest norm.

    **Returns:**

    A float64 scalar in `[0, 1]`: the mean over the `k(k−1)` ordered pairs `i ≠ j` of counted
    vectors; 1 when exactly one vector counts (one orientation), 0 when none does (a zero
    matrix). Scale invariant.
    """
    _check_fraction(min_norm_fraction)
    unit, norms = _unit_vectors(_vectors(_as_strict_matrix(W), axis))
    mask = _significant(norms, min_norm_fraction)
    count = jnp.sum(mask)
    pairs = mask[:, None] & mask[None, :] & ~jnp.eye(mask.shape[0], dtype=bool)
    similarity = jnp.clip(jnp.abs(unit @ unit.T), 0.0, 1.0)
    mean = _safe_divide(jnp.sum(jnp.where(pairs, similarity, 0.0)), jnp.sum(pairs).astype(float))
    return jnp.where(count == 1, 1.0, mean)


@eqx.filter_jit
def leading_eigenvector_order(C: Float[ArrayLike, "k k"]) -> Int[Array, " k"]:
    """Order rows by the leading eigenvector of a symmetric similarity matrix (as in Zhou et al.).

    Rows with similar patterns get similar entries in the eigenvector of the largest eigenvalue,
    so sorting by it brings clusters together, and two clusters of opposite orientation (`±v`)
    to opposite ends.

    **Arguments:**

    - `C`: a symmetric `k x k` matrix, e.g. from `cosine_matrix` (PSD, so the largest eigenvalue
        is also the largest in magnitude).

    **Returns:**

    The permutation `argsort(u)` (ascending, stable), where `u` is the unit eigenvector of the
    largest eigenvalue with its sign fixed so that its largest-magnitude entry (the first such,
    on ties) is positive. With a repeated largest eigenvalue the eigenvector, hence the order,
    is whatever the eigensolver returns in that eigenspace.
    """
    C = jnp.asarray(C, dtype=float)
    if C.ndim != 2 or C.shape[0] != C.shape[1]:
        raise InputError(f"C must be a square matrix, got shape {C.shape}")
    _, eigenvectors = jnp.linalg.eigh(C)
    leading = eigenvectors[:, -1]
    sign = jnp.sign(leading[jnp.argmax(jnp.abs(leading))])
    return jnp.argsort(jnp.where(sign < 0, -leading, leading), stable=True)


@eqx.filter_jit
def ordered_cosine_matrix(W: Float[ArrayLike, "m n"], axis: int | str) -> Float[Array, "k k"]:
    """`cosine_matrix(W, axis)` with rows and columns permuted by `leading_eigenvector_order`.

    **Arguments:**

    - `W`: a matrix.
    - `axis`: `1`/`"rows"` or `0`/`"columns"`, as in `cosines`.

    **Returns:**

    `C[order][:, order]`, the heat map of Zhou et al. / Chen & Luo: clusters of aligned
    rows/columns appear as contiguous blocks.
    """
    C = cosine_matrix(W, axis)
    order = leading_eigenvector_order(C)
    return C[order][:, order]


# --------------------------------------------------------------------------- Chen & Luo, Fig. 2


@eqx.filter_jit
def assumption1_rates(
    W_v: Float[ArrayLike, " d"], W1: Float[ArrayLike, "d d"], W2: Float[ArrayLike, " d"]
) -> Float[Array, " 2"]:
    """Chen & Luo's Assumption-1 satisfaction rates `(|A1|/d, |A2|/d²)` (their Fig. 2a).

    With `W_v = v W_V` (entries `W_{v,i}`), `W1^{(i)}` the i-th column and `W1_i` the i-th row of
    `W1`, `W2_i` the i-th entry of `W2` (docs/science.md §1):

    - `A1`: the indices `i` with `W2_i (W_v W1^{(i)}) > 0` and `W_{v,i} (W1_i W2) > 0`;
    - `A2`: the ordered pairs `(i, j)`, `i = j` included, with
      `⟨W2_i W1^{(i)}, W2_j W1^{(j)}⟩ > 0` and `⟨W_{v,i} W1_i, W_{v,j} W1_j⟩ > 0`.

    Only signs enter, so the rates are the same for `W` and `1e-12 W` (computed on each factor
    divided by its largest entry). A zero product counts as not satisfied.

    **Arguments:**

    - `W_v`: `v W_V`, shape `(d,)`; `W1`: `(d, d)`; `W2`: `(d,)` (the binary model of §1).

    **Returns:**

    `[|A1|/d, |A2|/d²]`.
    """
    W_v, W2 = jnp.asarray(W_v, dtype=float), jnp.asarray(W2, dtype=float)
    W1 = jnp.asarray(W1, dtype=float)
    d = W_v.shape[0]
    if W_v.ndim != 1 or W1.shape != (d, d) or W2.shape != (d,):
        raise InputError(
            f"assumption1_rates needs W_v (d,), W1 (d, d), W2 (d,), got {W_v.shape}, "
            f"{W1.shape}, {W2.shape}"
        )
    W_v, W1, W2 = W_v / _max_abs_scale(W_v), W1 / _max_abs_scale(W1), W2 / _max_abs_scale(W2)
    first = (W2 * (W_v @ W1) > 0) & (W_v * (W1 @ W2) > 0)
    columns = W1 * W2[None, :]  # column i: W2_i W1^{(i)}
    rows = W_v[:, None] * W1  # row i: W_{v,i} W1_i
    second = (columns.T @ columns > 0) & (rows @ rows.T > 0)
    return jnp.stack([jnp.mean(first.astype(float)), jnp.mean(second.astype(float))])


def singular_vector_similarity(
    U_a: Float[ArrayLike, "... m k"], U_b: Float[ArrayLike, "... m k"]
) -> Float[Array, "..."]:
    """Mean `|cos|` between corresponding singular vectors (columns) of two times (Fig. 2b).

    Singular vectors are defined up to sign, hence the absolute value; the columns are
    normalized here, so padded zero columns count as 0.

    **Arguments:**

    - `U_a`, `U_b`: singular vectors as columns, e.g. `U[:, :k]` of `W(t)` and `W(t')`, with
        any leading batch axes (e.g. save times).

    **Returns:**

    `mean_k |⟨u_k(a), u_k(b)⟩| / (‖u_k(a)‖ ‖u_k(b)‖)`, in `[0, 1]`.
    """
    U_a, U_b = jnp.asarray(U_a, dtype=float), jnp.asarray(U_b, dtype=float)
    if U_a.shape != U_b.shape or U_a.ndim < 2:
        raise InputError(f"singular vectors must be matrices of one shape, got {U_a.shape}, "
                         f"{U_b.shape}")
    dot = jnp.abs(jnp.sum(U_a * U_b, axis=-2))
    norms = jnp.linalg.norm(U_a, axis=-2) * jnp.linalg.norm(U_b, axis=-2)
    return jnp.mean(jnp.clip(_safe_divide(dot, norms), 0.0, 1.0), axis=-1)
