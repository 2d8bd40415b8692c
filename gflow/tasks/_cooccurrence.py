"""The word co-occurrence task of Yang, Kailkhura, Wang & Liang (NeurIPS 2024).

Vocabulary: one-hot embeddings `μ_1, ..., μ_d` (word `μ_k` is the standard basis vector with its
one at index `k − 1`). `μ_1` and `μ_2` are the target words, `μ_3` is a common word present in
every sample, `μ_4..μ_d` are irrelevant words. The label is `+1` exactly when both targets occur.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray

from .._errors import InputError

# Word numbers in the paper's 1-based naming; the token id (array index) is number − 1.
TARGET_1, TARGET_2, COMMON = 1, 2, 3
FIRST_IRRELEVANT = 4


class CooccurrenceData(eqx.Module):
    """A co-occurrence training set, samples grouped by type (1, then 2, 3, 4).

    **Fields:**

    - `X`: the samples, shape `(n, d, L)`, one one-hot token per column (the paper's layout).
    - `y`: labels `±1`, shape `(n,)`, default float dtype.
    - `type`: sample type `1..4`, shape `(n,)`, int.
    - `tokens`: token ids, shape `(n, L)`, int; id `k − 1` is word `μ_k`.
    """

    X: Float[Array, "n d L"]
    y: Float[Array, " n"]
    type: Int[Array, " n"]
    tokens: Int[Array, "n L"]

    def __check_init__(self):
        n, d, L = self.X.shape
        if self.y.shape != (n,) or self.type.shape != (n,) or self.tokens.shape != (n, L):
            raise InputError(
                f"CooccurrenceData: y, type, tokens must have shapes ({n},), ({n},), ({n}, {L}); "
                f"got {self.y.shape}, {self.type.shape}, {self.tokens.shape}"
            )


def _type_counts(n: int) -> tuple[int, int, int, int]:
    if int(n) != n or n < 6 or n % 6 != 0:
        raise InputError(
            f"cooccurrence: n must be a positive multiple of 6 so that the types hold exactly "
            f"the proportions 1/2, 1/6, 1/6, 1/6, got n={n}"
        )
    n = int(n)
    return n // 2, n // 6, n // 6, n // 6


def cooccurrence(
    n: int, L: int, d: int, key: PRNGKeyArray, *, distinct_irrelevant: bool = False
) -> CooccurrenceData:
    """The paper's training set, with exactly the type proportions of its distribution.

    Every sample holds the common word `μ_3` once, at a uniformly random position. Then:

    - type 1 (`n/2` samples, `y = +1`): `μ_1` and `μ_2` at two other random positions;
    - type 2 (`n/6`, `y = −1`): `μ_1` only;
    - type 3 (`n/6`, `y = −1`): `μ_2` only;
    - type 4 (`n/6`, `y = −1`): neither.

    Every other position holds an irrelevant word drawn uniformly from `μ_4..μ_d` (independently,
    so repeats are possible), or, with `distinct_irrelevant=True`, drawn without replacement so the
    irrelevant words of a sample are all distinct.

    **Arguments:**

    - `n`: number of samples, a positive multiple of 6 (e.g. 60 → 30/10/10/10).
    - `L`: sequence length, at least 3 (type 1 needs three distinct positions).
    - `d`: vocabulary size = embedding dimension, at least 4 (at least `L + 2` with
        `distinct_irrelevant`, so that a type-4 sample finds `L − 1` distinct irrelevant words).
    - `key`: a JAX PRNG key.
    - `distinct_irrelevant`: draw each sample's irrelevant words without replacement.

    **Returns:**

    A `CooccurrenceData` with `X` `(n, d, L)`, `y` `(n,)`, `type` `(n,)`, `tokens` `(n, L)`,
    samples grouped by type in the order 1, 2, 3, 4.
    """
    counts = _type_counts(n)
    if int(L) != L or L < 3:
        raise InputError(f"cooccurrence: L must be an integer >= 3, got L={L}")
    if int(d) != d or d < FIRST_IRRELEVANT:
        raise InputError(f"cooccurrence: d must be an integer >= 4, got d={d}")
    n, L, d = int(n), int(L), int(d)
    num_irrelevant_words = d - (FIRST_IRRELEVANT - 1)
    if distinct_irrelevant and num_irrelevant_words < L - 1:
        raise InputError(
            f"cooccurrence: distinct_irrelevant needs d >= L + 2 = {L + 2} so that a type-4 "
            f"sample has L - 1 distinct irrelevant words, got d={d}"
        )

    return _generate(key, counts, L, d, distinct_irrelevant)



def _numpy_rng(key: PRNGKeyArray) -> np.random.Generator:
    # The data are drawn in numpy, seeded by the JAX key's bits: the same key gives the same
    # data, and a few hundred integers cost no compilation (a jitted or op-by-op JAX generator
    # spends seconds compiling permutations and scatters for every new shape).
    key = jnp.asarray(key)
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return np.random.default_rng(np.asarray(key, dtype=np.uint32).ravel().tolist())


def _generate(
    key: PRNGKeyArray,
    counts: tuple[int, int, int, int],
    L: int,
    d: int,
    distinct_irrelevant: bool,
) -> CooccurrenceData:
    n = sum(counts)
    num_irrelevant_words = d - (FIRST_IRRELEVANT - 1)
    rng = _numpy_rng(key)
    sample_type = np.repeat(np.arange(1, 5), counts)

    # Fill L slots, then put slot s of sample i at position perms[i, s] (a uniformly random
    # permutation per sample): slot 0 holds the common word, slots 1.. irrelevant words, and the
    # targets the type asks for overwrite slots 1 and 2.
    perms = rng.permuted(np.tile(np.arange(L), (n, 1)), axis=1)
    if distinct_irrelevant:
        # The first L - 1 ids of a uniformly random ordering of all irrelevant ids: distinct.
        irrelevant = np.argsort(rng.random((n, num_irrelevant_words)), axis=1)[:, : L - 1]
    else:
        irrelevant = rng.integers(0, num_irrelevant_words, size=(n, L - 1))
    slots = np.concatenate(
        [np.full((n, 1), COMMON - 1), irrelevant + (FIRST_IRRELEVANT - 1)], axis=1
    )
    # Types 1, 2 put μ_1 in slot 1; type 3 puts its only target μ_2 there; type 1 adds μ_2 in
    # slot 2. Type 4 keeps irrelevant words.
    slots[sample_type <= 2, 1] = TARGET_1 - 1
    slots[sample_type == 3, 1] = TARGET_2 - 1
    slots[sample_type == 1, 2] = TARGET_2 - 1
    tokens = np.empty((n, L), dtype=np.int32)
    tokens[np.arange(n)[:, None], perms] = slots

    X = np.eye(d, dtype=np.float64)[tokens].transpose(0, 2, 1)
    y = np.where(sample_type == 1, 1.0, -1.0)
    return CooccurrenceData(
        X=jnp.asarray(X),
        y=jnp.asarray(y, dtype=float),
        type=jnp.asarray(sample_type, dtype=jnp.int32),
        tokens=jnp.asarray(tokens),
    )
