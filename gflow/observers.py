"""Observers for `gflow.solve`: what a theorist reads off a trajectory.

Every factory here returns an observer, a callable `observer(model, data) -> array or pytree of
arrays` that `gflow.solve(..., observers={name: observer})` evaluates inside the compiled solve
at each save time. Observers are small equinox modules: their array fields (an initial matrix, a
direction, group masks) are traced data, so a new initialization does not recompile. Observers
that hold the same array object (a held-out set read by a loss and an accuracy observer) get it
as one input of the compiled solve, so XLA computes what they derive from it (the logits) once:
build them from one array, not from copies.

Parameters are chosen by a `where` function, as for `eqx.tree_at`: `where=lambda m: m.W_Q`.
For the matrix measures `where` may also return a tuple (or list) of arrays, a parameter group
such as `lambda m: (m.W_V, m.W1, m.W2)`; the measure is then applied to each array and the
results are stacked along a new leading axis, in the order `where` returns them.

The matrix measures themselves live in `gflow.measures`, as pure functions of arrays; see there
for the numerics and the axis convention (`axis=1`/`"rows"` compares rows, `axis=0`/`"columns"`
compares columns).
"""

from collections.abc import Callable, Mapping
from typing import Any

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PyTree, Scalar

from . import measures
from ._errors import InputError
from ._hessian import top_eigenpairs


def _check_callable(value, name: str, signature: str) -> None:
    if not callable(value):
        raise InputError(f"{name} must be callable as {signature}, got {value!r}")


def _is_concrete(value) -> bool:
    return not isinstance(value, jax.core.Tracer)


def _selection(where: Callable, model) -> tuple[Any, bool]:
    """`where(model)` as a tuple of arrays, and whether it was a group (tuple/list)."""
    selected = where(model)
    if isinstance(selected, (tuple, list)):
        if len(selected) == 0:
            raise InputError("where selected an empty group of parameters")
        arrays, is_group = tuple(selected), True
    else:
        arrays, is_group = (selected,), False
    for array in arrays:
        if not eqx.is_array_like(array) or isinstance(array, (bool, str)):
            raise InputError(
                f"where must select an array or a tuple of arrays, got {type(array).__name__}"
            )
    return tuple(jnp.asarray(array, dtype=float) for array in arrays), is_group


def _stack(results: tuple[PyTree, ...]) -> PyTree:
    """Stack per-array results leaf-wise; vectors of unequal length are zero-padded at the end."""

    def stack_leaf(*leaves):
        if leaves[0].ndim == 1:
            longest = max(leaf.shape[0] for leaf in leaves)
            leaves = [jnp.pad(leaf, (0, longest - leaf.shape[0])) for leaf in leaves]
        return jnp.stack(leaves)

    return jtu.tree_map(stack_leaf, *results)


def _check_rtol(rtol) -> float:
    if isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not 0 <= rtol < 1:
        raise InputError(f"rtol must be a number in [0, 1), got {rtol!r}")
    return float(rtol)


def _check_direction(direction) -> Float[Array, " length"]:
    direction = jnp.asarray(direction, dtype=float)
    if direction.ndim != 1:
        raise InputError(f"direction must be a vector, got shape {direction.shape}")
    if _is_concrete(direction):
        if not np.all(np.isfinite(direction)):
            raise InputError("direction must be finite")
        if not np.any(direction != 0):
            raise InputError("direction must be non-zero")
    return direction


# --------------------------------------------------------------------------- matrix measures


class MatrixMeasure(eqx.Module):
    """A measure of the matrix (or each matrix of a group) that `where` selects.

    **Arguments:**

    - `where`: `where(model) -> array | tuple of arrays`.
    - `measure`: `measure(array) -> array or pytree of arrays`, e.g. from `gflow.measures`, or
        `measure(array, rtol=rtol)` when `rtol` is given.
    - `rtol`: the threshold passed to a rank measure, or `None`.
    - `iterations`: the Lanczos steps passed to a measure that takes them
        (`gflow.measures.spectral_norm`, `gflow.measures.stable_rank`), or `None`.
    """

    where: Callable[[Any], Any]
    measure: Callable[..., PyTree]
    # Plain static numbers rather than a `functools.partial` (compared by identity): equal
    # observers built twice then hit the same compiled solve.
    rtol: float | None = eqx.field(static=True, default=None)
    iterations: int | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        _check_callable(self.where, "where", "where(model)")
        _check_callable(self.measure, "measure", "measure(array)")
        measures._check_iterations(self.iterations)

    def __call__(self, model, data=None) -> PyTree:
        del data
        arrays, is_group = _selection(self.where, model)
        options = {k: v for k, v in (("rtol", self.rtol), ("iterations", self.iterations))
                   if v is not None}
        results = tuple(self.measure(array, **options) for array in arrays)
        return _stack(results) if is_group else results[0]


def singular_values(where: Callable) -> MatrixMeasure:
    """Observer of the singular values (descending) of `where(model)`.

    **Arguments:**

    - `where`: selects a matrix, or a tuple of matrices.

    **Returns:**

    An observer giving a vector of `min(m, n)` singular values; for a group, a
    `(len(group), r)` array with each row zero-padded to the longest spectrum `r`.
    """
    return MatrixMeasure(where, measures.singular_values)


def numerical_rank(where: Callable, rtol: float = 1e-6) -> MatrixMeasure:
    """Observer of the number of singular values above `rtol · σ_max` (a float).

    **Arguments:**

    - `where`: selects a matrix, or a tuple of matrices (giving a stacked vector).
    - `rtol`: relative threshold, in `[0, 1)`.

    **Returns:**

    An observer; see `gflow.measures.numerical_rank`.
    """
    return MatrixMeasure(where, measures.numerical_rank, _check_rtol(rtol))


def effective_rank(where: Callable) -> MatrixMeasure:
    """Observer of the Roy–Vetterli effective rank `exp(H(σ/Σσ))` (0 for a zero matrix).

    **Arguments:**

    - `where`: selects a matrix, or a tuple of matrices (giving a stacked vector).

    **Returns:**

    An observer; see `gflow.measures.effective_rank`.
    """
    return MatrixMeasure(where, measures.effective_rank)


def _check_iterations(iterations) -> int | None:
    measures._check_iterations(iterations)
    return iterations


def stable_rank(where: Callable, iterations: int | None = None) -> MatrixMeasure:
    """Observer of the stable rank `‖W‖_F² / ‖W‖_2²` (0 for a zero matrix).

    **Arguments:**

    - `where`: selects a matrix, or a tuple of matrices (giving a stacked vector).
    - `iterations`: `None` for `σ_max` by SVD; `k` for `k` Lanczos steps (`2k` products with
        `W`: what an observer read at every save time of a large matrix can afford; its
        accuracy is in `gflow.measures.spectral_norm`).

    **Returns:**

    An observer; see `gflow.measures.stable_rank`.
    """
    return MatrixMeasure(where, measures.stable_rank, iterations=_check_iterations(iterations))


def spectral_norm(where: Callable, iterations: int | None = None) -> MatrixMeasure:
    """Observer of the largest singular value `σ_max = ‖W‖_2` (0 for a zero matrix).

    **Arguments:**

    - `where`: selects a matrix, or a tuple of matrices (giving a stacked vector).
    - `iterations`: `None` for the SVD; `k` for `k` Lanczos steps (see
        `gflow.measures.spectral_norm`).

    **Returns:**

    An observer; see `gflow.measures.spectral_norm`.
    """
    return MatrixMeasure(where, measures.spectral_norm, iterations=_check_iterations(iterations))


def normalized_rank(where: Callable, rtol: float) -> MatrixMeasure:
    """Observer of the rank of `W / ‖W‖_F`: the number of `σ_i / ‖W‖_F` above `rtol` (float).

    **Arguments:**

    - `where`: selects a matrix, or a tuple of matrices (giving a stacked vector).
    - `rtol`: threshold on `σ_i / ‖W‖_F`, in `[0, 1)`.

    **Returns:**

    An observer; see `gflow.measures.normalized_rank`.
    """
    return MatrixMeasure(where, measures.normalized_rank, _check_rtol(rtol))


def frobenius_norm(where: Callable) -> MatrixMeasure:
    """Observer of the Frobenius norm of `where(model)`.

    **Arguments:**

    - `where`: selects an array, or a tuple of arrays (giving the vector of their norms, one
        per array; the norm of the whole group is the norm of that vector).

    **Returns:**

    An observer; see `gflow.measures.frobenius_norm`.
    """
    return MatrixMeasure(where, measures.frobenius_norm)


class RelativeChange(eqx.Module):
    """`‖W − W0‖_F / ‖W0‖_F` of `W = where(model)` against stored initial arrays `W0`.

    **Arguments:**

    - `where`: selects an array or a tuple of arrays.
    - `initial`: `where(initial_model)` as a tuple of arrays (traced data).
    - `is_group`: whether `where` selects a group (the result is then a vector).
    """

    where: Callable[[Any], Any]
    initial: tuple[Array, ...]
    is_group: bool = eqx.field(static=True)

    def __check_init__(self):
        _check_callable(self.where, "where", "where(model)")

    def __call__(self, model, data=None) -> Float[Array, "*group"]:
        del data
        arrays, _ = _selection(self.where, model)
        if len(arrays) != len(self.initial):
            raise InputError("where selects a different number of arrays than in the initial model")
        results = tuple(
            measures.relative_change(array, initial)
            for array, initial in zip(arrays, self.initial, strict=True)
        )
        return jnp.stack(results) if self.is_group else results[0]


def relative_change(where: Callable, initial_model) -> RelativeChange:
    """Observer of the relative change `‖W(t) − W(0)‖_F / ‖W(0)‖_F` of `W = where(model)`.

    **Arguments:**

    - `where`: selects an array, or a tuple of arrays (giving a vector, one entry per array).
    - `initial_model`: the model at t0; `where(initial_model)` is stored.

    **Returns:**

    An observer, 0 at the initial model; where `W(0)` is exactly zero it reports the absolute
    change `‖W(t)‖_F` instead (see `gflow.measures.relative_change`).
    """
    _check_callable(where, "where", "where(model)")
    initial, is_group = _selection(where, initial_model)
    return RelativeChange(where, initial, is_group)


# --------------------------------------------------------------------------- directions


class Alignment(eqx.Module):
    """Minimum and mean `|cos|` of the rows or columns of `where(model)` with `direction`.

    **Arguments:**

    - `where`: selects a matrix (or a tuple of matrices of one shape).
    - `direction`: the direction (traced data).
    - `axis`: `1`/`"rows"` or `0`/`"columns"`.
    - `min_norm_fraction`: rows/columns with a smaller norm relative to the largest are ignored.
    """

    where: Callable[[Any], Any]
    direction: Float[Array, " length"]
    axis: int | str = eqx.field(static=True)
    min_norm_fraction: float = eqx.field(static=True)

    def __check_init__(self):
        _check_callable(self.where, "where", "where(model)")
        measures._vector_axis(self.axis)
        measures._check_fraction(self.min_norm_fraction)

    def __call__(self, model, data=None) -> dict[str, Float[Array, "*group"]]:
        del data
        arrays, is_group = _selection(self.where, model)
        results = tuple(
            dict(
                zip(
                    ("min", "mean"),
                    measures.alignment(array, self.direction, self.axis, self.min_norm_fraction),
                    strict=True,
                )
            )
            for array in arrays
        )
        return _stack(results) if is_group else results[0]


def alignment(
    where: Callable,
    direction: Float[ArrayLike, " length"],
    axis: int | str,
    min_norm_fraction: float = 0.1,
) -> Alignment:
    """Observer of the alignment of the rows or columns of `where(model)` with a direction.

    E.g. Chen & Luo's condensation of `W_V` onto the target direction `v`: every column of
    `W_V` becomes parallel to `v`, `alignment(lambda m: m.W_V, v, axis="columns")`; report
    `1 − |cos|` from the result.

    **Arguments:**

    - `where`: selects a matrix.
    - `direction`: a non-zero vector, of the rows' length (`axis=1`/`"rows"`) or the columns'
        length (`axis=0`/`"columns"`).
    - `axis`: which vectors are compared, see `gflow.measures`.
    - `min_norm_fraction`: rows/columns whose norm is below this fraction of the largest are
        excluded (they have not grown and carry no orientation).

    **Returns:**

    An observer giving `{"min": ..., "mean": ...}`, scalars in `[0, 1]` (both 0 for a zero
    matrix); see `gflow.measures.alignment`.
    """
    return Alignment(where, _check_direction(direction), axis, min_norm_fraction)


class Condensation(eqx.Module):
    """Mean `|cos|` among the non-negligible rows or columns of `where(model)`.

    **Arguments:**

    - `where`: selects a matrix or a tuple of matrices.
    - `axis`: `1`/`"rows"` or `0`/`"columns"`.
    - `min_norm_fraction`: rows/columns with a smaller norm relative to the largest are ignored.
    """

    where: Callable[[Any], Any]
    axis: int | str = eqx.field(static=True)
    min_norm_fraction: float = eqx.field(static=True)

    def __check_init__(self):
        _check_callable(self.where, "where", "where(model)")
        measures._vector_axis(self.axis)
        measures._check_fraction(self.min_norm_fraction)

    def __call__(self, model, data=None) -> Float[Array, "*group"]:
        del data
        arrays, is_group = _selection(self.where, model)
        results = tuple(
            measures.condensation(array, self.axis, self.min_norm_fraction) for array in arrays
        )
        return jnp.stack(results) if is_group else results[0]


def condensation(where: Callable, axis: int | str, min_norm_fraction: float = 0.1) -> Condensation:
    """Observer of the condensation of the rows or columns of `where(model)`.

    **Arguments:**

    - `where`: selects a matrix, or a tuple of matrices (giving a stacked vector).
    - `axis`: `1`/`"rows"` or `0`/`"columns"`, see `gflow.measures`.
    - `min_norm_fraction`: rows/columns whose norm is below this fraction of the largest are
        excluded.

    **Returns:**

    An observer giving the mean `|cos|` over pairs of counted rows/columns, in `[0, 1]`; see
    `gflow.measures.condensation`.
    """
    return Condensation(where, axis, min_norm_fraction)


class CosineMatrix(eqx.Module):
    """Pairwise cosine similarities of the rows or columns of `where(model)`.

    **Arguments:**

    - `where`: selects a matrix.
    - `axis`: `1`/`"rows"` or `0`/`"columns"`.
    - `ordered`: whether rows/columns are permuted by the leading eigenvector.
    """

    where: Callable[[Any], Any]
    axis: int | str = eqx.field(static=True)
    ordered: bool = eqx.field(static=True)

    def __check_init__(self):
        _check_callable(self.where, "where", "where(model)")
        measures._vector_axis(self.axis)

    def __call__(self, model, data=None) -> Float[Array, "k k"]:
        del data
        arrays, is_group = _selection(self.where, model)
        if is_group:
            raise InputError("cosine_matrix observes one matrix; where selected a group")
        if self.ordered:
            return measures.ordered_cosine_matrix(arrays[0], self.axis)
        return measures.cosine_matrix(arrays[0], self.axis)


def cosine_matrix(where: Callable, axis: int | str, ordered: bool = True) -> CosineMatrix:
    """Observer of the cosine-similarity matrix of the rows or columns of `where(model)`.

    For heat maps at chosen save times (pass few `ts`: the result is `k x k` per save).

    **Arguments:**

    - `where`: selects one matrix.
    - `axis`: `1`/`"rows"` (an `m x m` result) or `0`/`"columns"` (`n x n`).
    - `ordered`: permute rows and columns by `argsort` of the leading eigenvector of the
        similarity matrix, recomputed at every save time (so clusters form contiguous blocks;
        the order may differ between save times). `False` keeps the original order.

    **Returns:**

    An observer giving the signed `k x k` cosine matrix; see `gflow.measures.cosine_matrix`
    and `gflow.measures.ordered_cosine_matrix`.
    """
    return CosineMatrix(where, axis, bool(ordered))


# --------------------------------------------------------------------------- losses and gradients


class Loss(eqx.Module):
    """`loss_fn(model, data)`.

    **Arguments:**

    - `loss_fn`: `loss_fn(model, data) -> scalar`.
    """

    loss_fn: Callable[[Any, Any], Scalar]

    def __check_init__(self):
        _check_callable(self.loss_fn, "loss_fn", "loss_fn(model, data)")

    def __call__(self, model, data) -> Scalar:
        return jnp.asarray(self.loss_fn(model, data), dtype=float)


def loss(loss_fn: Callable) -> Loss:
    """Observer of a loss (the flow's own loss is always recorded by `gflow.solve` as `"loss"`).

    **Arguments:**

    - `loss_fn`: `loss_fn(model, data) -> scalar`, e.g. another loss than the one the flow
        descends (a test loss on other data closed over in `loss_fn`).

    **Returns:**

    An observer giving the scalar loss.
    """
    return Loss(loss_fn)


class LossByGroup(eqx.Module):
    """Mean per-sample loss over groups of samples.

    **Arguments:**

    - `per_sample_loss`: `per_sample_loss(model, data) -> (n,)` vector of per-sample losses.
    - `groups`: `{name: indices or boolean mask}` (traced data).
    """

    per_sample_loss: Callable[[Any, Any], Float[Array, " n"]]
    groups: dict[str, Array]

    def __check_init__(self):
        _check_callable(self.per_sample_loss, "per_sample_loss", "per_sample_loss(model, data)")

    def __call__(self, model, data) -> dict[str, Scalar]:
        losses = jnp.asarray(self.per_sample_loss(model, data), dtype=float)
        if losses.ndim != 1:
            raise InputError(f"per_sample_loss must return a vector, got shape {losses.shape}")
        means = {}
        for name, group in self.groups.items():
            if group.dtype == bool:
                if group.shape != losses.shape:
                    raise InputError(
                        f"group {name!r}: mask of shape {group.shape} for {losses.shape[0]} samples"
                    )
                # The constructor guarantees at least one selected sample.
                means[name] = jnp.sum(jnp.where(group, losses, 0.0)) / jnp.sum(group)
            else:
                means[name] = jnp.mean(losses[group])
        return means


def _check_group(name, group) -> Array:
    if not isinstance(name, str):
        raise InputError(f"group names must be strings, got {name!r}")
    group = jnp.asarray(group)
    if group.ndim != 1:
        raise InputError(
            f"group {name!r} must be a 1-D index array or mask, got shape {group.shape}"
        )
    if group.dtype == bool:
        if _is_concrete(group) and not np.any(group):
            raise InputError(f"group {name!r} selects no sample")
        return group
    if not jnp.issubdtype(group.dtype, jnp.integer):
        raise InputError(f"group {name!r} must hold integer indices or booleans, got {group.dtype}")
    if group.shape[0] == 0:
        raise InputError(f"group {name!r} selects no sample")
    if _is_concrete(group) and np.any(np.asarray(group) < 0):
        raise InputError(f"group {name!r} holds negative indices")
    return group


def loss_by_group(per_sample_loss: Callable, groups: Mapping[str, ArrayLike]) -> LossByGroup:
    """Observer of the mean loss over each of several groups of samples (e.g. sample types).

    **Arguments:**

    - `per_sample_loss`: `per_sample_loss(model, data) -> (n,)` vector of per-sample losses
        (the flow's loss being their mean, for the group means to average back to it).
    - `groups`: `{name: group}`, each group a 1-D integer index array into the samples or a
        boolean mask of length `n`; non-empty. Groups may overlap.

    **Returns:**

    An observer giving `{name: mean per-sample loss over the group}`.
    """
    if not isinstance(groups, Mapping) or len(groups) == 0:
        raise InputError("groups must be a non-empty mapping name -> index array or mask")
    return LossByGroup(
        per_sample_loss, {name: _check_group(name, group) for name, group in groups.items()}
    )


def _loss_of_selection(loss_fn: Callable, where: Callable, model, data) -> tuple[PyTree, Callable]:
    """The floating-point arrays `where(model)` selects, and the loss as a function of them
    (the rest of the model and `data` held fixed): what `gradient_norm` and
    `hessian_extremes` differentiate."""
    params, static = eqx.partition(where(model), eqx.is_inexact_array)
    if not jtu.tree_leaves(params):
        raise InputError("where selects no floating-point array to differentiate")

    def loss_of(selected):
        return loss_fn(eqx.tree_at(where, model, eqx.combine(selected, static)), data)

    return params, loss_of


class GradientNorm(eqx.Module):
    """`‖∂ loss_fn(model, data) / ∂ where(model)‖`.

    **Arguments:**

    - `loss_fn`: `loss_fn(model, data) -> scalar`.
    - `where`: selects the parameters (an array, a tuple of arrays, or a sub-module).
    """

    loss_fn: Callable[[Any, Any], Scalar]
    where: Callable[[Any], Any]

    def __check_init__(self):
        _check_callable(self.loss_fn, "loss_fn", "loss_fn(model, data)")
        _check_callable(self.where, "where", "where(model)")

    def __call__(self, model, data) -> Scalar:
        params, loss_of = _loss_of_selection(self.loss_fn, self.where, model, data)
        grads = jax.grad(loss_of)(params)
        norms = jnp.stack([measures.frobenius_norm(g) for g in jtu.tree_leaves(grads)])
        return measures.frobenius_norm(norms)


def gradient_norm(loss_fn: Callable, where: Callable) -> GradientNorm:
    """Observer of the norm of the loss gradient with respect to a parameter group.

    **Arguments:**

    - `loss_fn`: `loss_fn(model, data) -> scalar` (usually the flow's loss).
    - `where`: selects the parameters: an array, a tuple of arrays, or a sub-module (its
        floating-point arrays). Frozen parameters may be selected too: the gradient is taken
        with respect to what `where` selects, whatever the flow evolves.

    **Returns:**

    An observer giving one scalar: the Euclidean norm of the whole selected gradient,
    `sqrt(Σ_arrays ‖∂L/∂W‖_F²)` (for a group, one number, not one per array).
    """
    return GradientNorm(loss_fn, where)


class HessianExtremes(eqx.Module):
    """The largest and smallest eigenvalues of `∂² loss_fn(model, data) / ∂ where(model)²`,
    by LOBPCG on Hessian-vector products (the routine `gflow.critical_points` uses).

    **Arguments:**

    - `loss_fn`: `loss_fn(model, data) -> scalar`.
    - `where`: selects the parameters (an array, a tuple of arrays, or a sub-module).
    - `iterations`: LOBPCG's iteration limit at each end of the spectrum.
    - `seed`: seeds the (fixed) start vectors.
    """

    loss_fn: Callable[[Any, Any], Scalar]
    where: Callable[[Any], Any]
    iterations: int = eqx.field(static=True)
    seed: int = eqx.field(static=True)

    def __check_init__(self):
        _check_callable(self.loss_fn, "loss_fn", "loss_fn(model, data)")
        _check_callable(self.where, "where", "where(model)")
        if (isinstance(self.iterations, bool) or not isinstance(self.iterations, int)
                or self.iterations < 1):
            raise InputError(f"iterations must be a positive integer, got {self.iterations!r}")

    def __call__(self, model, data) -> Float[Array, " 2"]:
        params, loss_of = _loss_of_selection(self.loss_fn, self.where, model, data)
        flat, unravel = jax.flatten_util.ravel_pytree(params)
        flat = flat.astype(float)  # float64 under gflow's default, as the matrix measures

        def grad(x):
            return jax.flatten_util.ravel_pytree(jax.grad(loss_of)(unravel(x)))[0]

        if 5 >= flat.shape[0]:  # LOBPCG needs n > 5 k: a few parameters get the dense Hessian
            eigenvalues = jnp.linalg.eigvalsh(jax.jacfwd(grad)(flat))
            return jnp.stack([eigenvalues[-1], eigenvalues[0]])
        top, bottom = jax.random.split(jax.random.key(self.seed))
        ends = [
            top_eigenpairs(grad, flat, jax.random.normal(key, (flat.shape[0], 1), flat.dtype),
                           sign, self.iterations)[0][0]
            for key, sign in ((top, 1.0), (bottom, -1.0))
        ]
        return jnp.stack(ends)


def hessian_extremes(loss_fn: Callable, where: Callable, iterations: int = 100,
                     seed: int = 0) -> HessianExtremes:
    """Observer of the extreme eigenvalues of the loss Hessian with respect to a parameter
    group: `[λ_max, λ_min]`.

    `λ_max` is the *sharpness* (edge-of-stability and progressive-sharpening studies), and it
    says how stiff the flow is: an explicit solver's step is bounded by its stability
    interval over `λ_max` (Tsit5: `h λ_max ≲ 3.5`). `λ_min < 0` is negative curvature, the
    direction a saddle is escaped along. Each end is found by LOBPCG on Hessian-vector
    products (`jax.experimental.sparse.linalg.lobpcg_standard`, as `gflow.critical_points`),
    converged to rounding or stopped at `iterations`; with five or fewer parameters the
    Hessian is built and diagonalised.

    **Arguments:**

    - `loss_fn`: `loss_fn(model, data) -> scalar` (usually the flow's loss).
    - `where`: selects the parameters: an array, a tuple of arrays, or a sub-module (its
        floating-point arrays).
    - `iterations`: LOBPCG's iteration limit at each end (each iteration one Hessian-vector
        product, about two to three gradients).
    - `seed`: the start vectors are fixed normal draws of this seed.

    **Returns:**

    An observer giving a vector `[λ_max, λ_min]`.
    """
    return HessianExtremes(loss_fn, where, iterations, seed)


# --------------------------------------------------------------------------- energies, invariants


def _model_energy(model, data):
    method = getattr(model, "energy", None)
    if not callable(method):
        raise InputError(f"{type(model).__name__} defines no energy(data) method")
    return method(data)


class Energy(eqx.Module):
    """`fn(model, data)`, a model-defined energy.

    **Arguments:**

    - `fn`: `fn(model, data) -> scalar or pytree of arrays`.
    """

    fn: Callable[[Any, Any], PyTree]

    def __check_init__(self):
        _check_callable(self.fn, "fn", "fn(model, data)")

    def __call__(self, model, data) -> PyTree:
        return jtu.tree_map(lambda x: jnp.asarray(x, dtype=float), self.fn(model, data))


def energy(fn: Callable | None = None) -> Energy:
    """Observer of an energy of the model (e.g. Chen & Luo's `E = W_v W1 W2` of stage 1).

    **Arguments:**

    - `fn`: `fn(model, data) -> scalar or pytree of arrays`. Default: the model's own
        `model.energy(data)` method.

    **Returns:**

    An observer giving the energy.
    """
    return Energy(_model_energy if fn is None else fn)


class Conserved(eqx.Module):
    """Drift `fn(model, data) − fn(initial_model, data)` of a conserved quantity.

    **Arguments:**

    - `fn`: `fn(model, data) -> array or pytree of arrays`.
    - `initial_model`: the model at t0 (its arrays are traced data).
    """

    fn: Callable[[Any, Any], PyTree]
    initial_model: PyTree

    def __check_init__(self):
        _check_callable(self.fn, "fn", "fn(model, data)")

    def __call__(self, model, data) -> PyTree:
        # The reference value is re-evaluated with the same data rather than stored, so that
        # data-dependent invariants (e.g. built on a direction computed from `data`) work and a
        # new `data` never meets a stale reference.
        return jtu.tree_map(
            lambda now, then: jnp.asarray(now, dtype=float) - jnp.asarray(then, dtype=float),
            self.fn(model, data),
            self.fn(self.initial_model, data),
        )


def conserved(fn: Callable, initial_model) -> Conserved:
    """Observer of the drift from t0 of a quantity that the exact flow conserves.

    E.g. the balancedness `W1 W1ᵀ − W2ᵀ W2` of a two-layer linear network:
    `conserved(lambda m, d: m.W1 @ m.W1.T - m.W2.T @ m.W2, model0)`. Along the exact flow the
    drift is zero; along the integrated one it measures the integration error.

    **Arguments:**

    - `fn`: `fn(model, data) -> array or pytree of arrays` (the observer signature, so that an
        invariant may depend on the data).
    - `initial_model`: the model at t0.

    **Returns:**

    An observer giving `fn(model, data) − fn(initial_model, data)`, same structure as `fn`'s
    result; 0 at the initial model (up to rounding: the compiler may evaluate `fn` on the
    stored and on the current model in a different order).
    """
    _check_callable(fn, "fn", "fn(model, data)")
    return Conserved(fn, initial_model)


# --------------------------------------------------------------------------- Chen & Luo, Fig. 2


class Assumption1Rates(eqx.Module):
    """Chen & Luo's Assumption-1 satisfaction rates of `(W_V, W1, W2) = where(model)` against
    the target direction `direction` (traced data); see `gflow.measures.assumption1_rates`."""

    where: Callable[[Any], Any]
    direction: Float[Array, " d"]

    def __check_init__(self):
        _check_callable(self.where, "where", "where(model)")

    def __call__(self, model, data=None) -> Float[Array, " 2"]:
        del data
        W_V, W1, W2 = self.where(model)
        W_v = self.direction @ jnp.asarray(W_V, dtype=float)
        return measures.assumption1_rates(W_v, W1, jnp.reshape(W2, (-1,)))


def assumption1_rates(where: Callable, direction: Float[ArrayLike, " d"]) -> Assumption1Rates:
    """Observer of Chen & Luo's Assumption-1 rates `[|A1|/d, |A2|/d²]` (their Fig. 2a).

    **Arguments:**

    - `where`: `where(model) -> (W_V, W1, W2)`, with `W_V, W1` `(d, d)` and `W2` `(d,)`, e.g.
        `lambda m: (m.W_V, m.W1, m.W2)` for `gflow.models.AttentionFFN`.
    - `direction`: the target direction `v` (`W_v = v W_V`), shape `(d,)`.

    **Returns:**

    An observer giving the two rates.
    """
    _check_callable(where, "where", "where(model)")
    return Assumption1Rates(where, _check_direction(direction))


class SingularVectors(eqx.Module):
    """The leading `k` left and right singular vectors (as columns) of each matrix `where`
    selects: `{"U": (group, m, k), "V": (group, n, k)}` (zero-padded to the largest shape)."""

    where: Callable[[Any], Any]
    k: int = eqx.field(static=True)

    def __check_init__(self):
        _check_callable(self.where, "where", "where(model)")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise InputError(f"k must be a positive integer, got {self.k!r}")

    def __call__(self, model, data=None) -> dict[str, Float[Array, "group r k"]]:
        del data
        arrays, _ = _selection(self.where, model)
        rows = max(a.shape[0] for a in arrays)
        cols = max(a.shape[1] for a in arrays)
        Us, Vs = [], []
        for a in arrays:
            # Scale-free: the singular vectors of W and of W / max|W| are the same.
            U, _, Vt = jnp.linalg.svd(a / measures._max_abs_scale(a), full_matrices=False)
            k = min(self.k, U.shape[1])
            Us.append(jnp.pad(U[:, :k], ((0, rows - a.shape[0]), (0, self.k - k))))
            Vs.append(jnp.pad(Vt[:k].T, ((0, cols - a.shape[1]), (0, self.k - k))))
        return {"U": jnp.stack(Us), "V": jnp.stack(Vs)}


class StoredAs(eqx.Module):
    """`observer`'s floating outputs cast to `dtype` (see `stored_as`)."""

    observer: Callable[[Any, Any], PyTree]
    dtype: Any = eqx.field(static=True)

    def __check_init__(self):
        _check_callable(self.observer, "observer", "observer(model, data)")
        if not jnp.issubdtype(self.dtype, jnp.floating):
            raise InputError(f"stored_as: dtype must be a floating type, got {self.dtype!r}")

    def __call__(self, model, data=None) -> PyTree:
        return jtu.tree_map(
            lambda x: x.astype(self.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
            self.observer(model, data))


def stored_as(observer: Callable, dtype) -> StoredAs:
    """`observer`, its observables stored in `dtype`: the precision they are read in.

    An observable computed in float64 and read only as a picture (a cosine-similarity heat
    map) or through a few significant digits (the similarity of singular vectors between
    times) needs no more than float32, which halves its memory in the solve and on disk.

    **Arguments:**

    - `observer`: any observer.
    - `dtype`: a floating dtype, e.g. `jnp.float32`.

    **Returns:**

    An observer giving `observer`'s outputs with every floating leaf cast to `dtype`.
    """
    return StoredAs(observer, jnp.dtype(dtype))


def singular_vectors(where: Callable, k: int) -> SingularVectors:
    """Observer of the leading `k` singular vectors of a matrix or group, for
    `gflow.measures.singular_vector_similarity` between save times on the host (Fig. 2b).

    **Arguments:**

    - `where`: selects a matrix or a tuple of matrices.
    - `k`: how many singular pairs to keep.

    **Returns:**

    An observer giving `{"U": (group, m, k), "V": (group, n, k)}`.
    """
    return SingularVectors(where, int(k))
