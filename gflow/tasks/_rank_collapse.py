"""A synthetic binary task on which Chen & Luo's two stages both show in one gradient-flow run.

**The task ("last-token sign").** Tokens are i.i.d. standard Gaussian in `R^d`; the label of a
sample is the sign of its LAST token along a fixed unit direction `a` (default `e_1`),
`y_i = sign(⟨x_{i,s}, a⟩)`. Labels are balanced exactly: the first `⌈n/2⌉` samples get `y = +1`,
the rest `y = −1`, and the last token's `a`-component is drawn as `y_i |g|`, `g ~ N(0, 1)` (the
Gaussian conditioned on the label), so the set is a fair draw with exact class proportions.

**Why both stages are visible.**

- Stage 1 (condensation). At a small initialization the softmax is uniform and the model only
  sees the mean token `X̄_i`. The label-weighted token sum `m = Σ_i y_i Σ_j X_ij ≈ n √(2/π) a`
  (plus noise of size `√(n s d)`) is large and non-zero, so the outer parameters condense on
  `v = m/‖m‖` and escape the plateau at a time `∝ 1/ε` (the stage-1 flow is cubic).
- Stage 2 (key-query collapse). Through the mean token the label is diluted by `s − 1` noise
  tokens: `⟨X̄_i, a⟩ = (y_i|g| + noise)/s`, so once `n` is a few times `d` the mean tokens are
  not linearly separable (for `n = 32, d = 8, s = 4`: 9 keys of 10), and the outer parameters,
  which see `X̄_i` alone and act nearly linearly at small scale, cannot fit every sample
  cheaply. The attention grows. At the onset of stage 2 (`w = W_V W1 W2 ∝ vᵀ` after condensation, all
  loss weights still ≈ 1) the stage-2 matrix is (`condensed_stage2_matrix`)
  `F ∝ Σ_i y_i x_{i,s}ᵀ v S_i ≈ n √(2/π) (s − 1) aᵀ v + O(√n)` (`y_i x_{i,s}` averages to
  `√(2/π) a`, the centred scatter `S_i` to `(s − 1) I`): one singular value of order `n`, the
  others of order `√n`, with `u1 ≈ a` and `v1 ≈ v`. The gap makes the collapse of `W_Q W_Kᵀ`
  to rank one (`∝ u1 v1ᵀ ≈ aᵀ v`) fast and clean: the last token, through its `a`-component,
  learns to weight the tokens whose projection on the read-out direction `v` agrees with its
  label, which restores the label signal the uniform average diluted.

In a binary task the outer group collapses too (the FFN only ever needs the one direction `v`);
this is expected and documented rather than hidden. Multi-class next-token data keep the outer
parameters at higher rank.

Measured with `d = 8, s = 4, n = 32`, exponential loss, tanh, exact softmax, `ε = 1e-4`, keys
`kd, km = jax.random.split(jax.random.PRNGKey(seed))` (data from `kd`, `AttentionFFN.init` from
`km`), seeds 0–9: the full flow escapes the plateau at `t ≈ 1.0e4–3.7e4` (the seed decides;
it scales like `1/ε`); just before `W_Q` moves by 1 %, the columns of `W_V` are aligned with `v`
to `1 − |cos| ≈ 1e-5`; within the next ~20 time units `W_Q, W_K` grow by `2000–3000×` and
their stable ranks fall to within 0.002 of 1 (9 seeds of 10; 1.08 for seed 4). Seed 8:
`E(0) > 0`, escape at `t = 1.73e4` (stage-1 bound `2.93e4`), stable rank of `W_Q` `1.0002`.
Stage 2 is short compared with stage 1: resolve it with a save grid refined around the escape.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from .._errors import InputError
from ..models._attention import SequenceData
from ..models._reduced import target_direction

# Below this relative gap (σ1 − σ2)/σ1 the onset stage-2 matrix has a (nearly) repeated top
# singular value and the predicted rank-one limit is not determined.
_MIN_RELATIVE_GAP = 1e-3


@jax.jit
def condensed_stage2_matrix(X: Float[Array, "n s d"], y: Float[Array, " n"]) -> Float[Array, "d d"]:
    """The stage-2 matrix `F` of a condensed, still small model, up to a positive factor.

    After stage 1, `w = W_V W1 W2 ∝ vᵀ` with a positive factor (the energy `v w` has grown
    positive) and, the outputs still being small, every loss weight `L1_i ≈ 1`. `F` then
    depends on the data alone: `F = (1/(n s √d)) Σ_i y_i x_{i,s}ᵀ v S_i` with
    `S_i = Σ_j (X_ij − X̄_i)ᵀ (X_ij − X̄_i)`; `gflow.models._reduced.stage2_matrix` at such a state
    is this matrix times `‖w‖`.

    **Arguments:**

    - `X`, `y`: the training set, shapes `(n, s, d)` and `(n,)`.

    **Returns:**

    `F`, shape `(d, d)`.
    """
    X, y = jnp.asarray(X, float), jnp.asarray(y, float)
    n, s, d = X.shape
    v, _ = target_direction(X, y)
    centred = X - jnp.mean(X, axis=1, keepdims=True)
    vS = jnp.einsum("is,isd->id", centred @ v, centred)  # row i: v S_i
    return jnp.einsum("i,ia,ib->ab", y, X[:, -1, :], vS) / (n * s * np.sqrt(d))


@functools.partial(jax.jit, static_argnums=(2, 3))
def _sample(key: PRNGKeyArray, a: Float[Array, " d"], n: int, s: int):
    d = a.shape[0]
    X = jax.random.normal(key, (n, s, d), float)
    y = jnp.where(jnp.arange(n) < (n + 1) // 2, 1.0, -1.0)
    # Replace the last token's a-component by y|g|: the Gaussian conditioned on the label.
    along = X[:, -1, :] @ a
    last = X[:, -1, :] + (y * jnp.abs(along) - along)[:, None] * a
    return X.at[:, -1, :].set(last), y


def rank_collapse_task(
    n: int,
    s: int,
    d: int,
    key: PRNGKeyArray,
    *,
    signal: Float[Array, " d"] | None = None,
) -> SequenceData:
    """The last-token-sign task: Gaussian tokens, label = sign of the last token along `a`.

    See the module docstring for why it shows condensation and then key-query collapse.

    **Arguments:**

    - `n`: number of samples, at least 2 (classes are balanced, `⌈n/2⌉` positives).
    - `s`: tokens per sample, at least 2 (with one token attention has nothing to choose).
    - `d`: model width, at least 2.
    - `key`: a JAX PRNG key.
    - `signal`: the direction `a` carrying the label, shape `(d,)`, normalized here; default the
        first basis vector `e_1` (tokens are isotropic, so this loses no generality).

    **Returns:**

    A `SequenceData` with `X` of shape `(n, s, d)` and `y` of shape `(n,)`.

    **Raises:**

    `InputError` for bad sizes or signal, or, for an unlucky key, when the target direction
    vanishes or the onset stage-2 matrix has a repeated top singular value.
    """
    for name, value, least in (("n", n, 2), ("s", s, 2), ("d", d, 2)):
        if int(value) != value or value < least:
            raise InputError(f"rank_collapse_task: {name} must be an integer >= {least}, "
                             f"got {value!r}")
    n, s, d = int(n), int(s), int(d)
    if signal is None:
        a = np.zeros(d)
        a[0] = 1.0
    else:
        a = np.asarray(signal, dtype=np.float64)
        if a.shape != (d,) or not np.all(np.isfinite(a)) or not np.linalg.norm(a) > 0:
            raise InputError(f"rank_collapse_task: signal must be a finite non-zero vector of "
                             f"shape ({d},), got shape {a.shape}")
        a = a / np.linalg.norm(a)
    X, y = _sample(key, jnp.asarray(a), n, s)
    data = SequenceData(X, y)

    _, norm = target_direction(X, y)
    if not float(norm) > 0:
        raise InputError("rank_collapse_task: the target direction vanishes for this key")
    sigma = np.linalg.svd(np.asarray(condensed_stage2_matrix(X, y)), compute_uv=False)
    if not sigma[0] > 0 or (sigma[0] - sigma[1]) < _MIN_RELATIVE_GAP * sigma[0]:
        raise InputError("rank_collapse_task: the onset stage-2 matrix has a repeated top "
                         "singular value for this key; choose another key")
    return data
