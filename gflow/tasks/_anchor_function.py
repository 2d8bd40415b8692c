"""Chen & Luo's multi-class anchor-function task (NeurIPS 2025, Sec. 5 / App. B; docs/science.md §1b).

**Vocabulary** (`V = 201` tokens by default, ids `0..V−1`): anchors `A = {1, 2, 3, 4}`, keys
`Z = {5, ..., 100}`; targets lie in `5..101`; the other ids never occur.

**Sequence layout** (`s = 10` tokens): exactly one anchor `a` at a position `p` among the first
`s − 1` positions (`0 ≤ p ≤ s − 2`, 0-based), every other position a key drawn uniformly from
`Z`. The target (next-token prediction after the last position, cross-entropy on the last
token) is `x_{p+1} + shift(a)`, `x_{p+1}` the key right after the anchor.

**Synonym pairing** (`pairing`): the paper's formula is `shift(a) = a mod 2` (anchors `{1, 3}`
shift by one, `{2, 4}` by zero: pairing `"mod2"`), while its text calls `{1, 2}` and `{3, 4}`
synonyms (pairing `"pairs"`: `shift(a) = 1` for `a ∈ {1, 2}`, `0` for `a ∈ {3, 4}`). The
default is `"mod2"`: the formula is what defines the targets unambiguously.

**Exact proportions.** The anchors cycle `1, 2, 3, 4, 1, ...` over the samples (each appears
`⌊n/4⌋` or `⌈n/4⌉` times) and the anchor positions cycle `0, ..., s − 2` independently (in
an order shuffled once per draw), so every anchor and every position has its exact share;
keys are i.i.d. uniform. A held-out set is a second independent draw of the same law.
"""

import equinox as eqx
import jax
import numpy as np
from jaxtyping import Array, Int, PRNGKeyArray

from .._errors import InputError
from ..models._decoder import TokenData

ANCHORS = (1, 2, 3, 4)
KEYS = (5, 100)  # inclusive
VOCAB = 201
PAIRINGS = ("mod2", "pairs")


def anchor_shift(anchor: int, pairing: str = "mod2") -> int:
    """`shift(a)`: `a mod 2` for `"mod2"`; `1` for `a ∈ {1, 2}` and `0` for `{3, 4}` for
    `"pairs"`."""
    if pairing not in PAIRINGS:
        raise InputError(f"pairing must be one of {', '.join(PAIRINGS)}, got {pairing!r}")
    if anchor not in ANCHORS:
        raise InputError(f"anchor must be one of {ANCHORS}, got {anchor!r}")
    return anchor % 2 if pairing == "mod2" else int(anchor <= 2)


class AnchorFunctionData(eqx.Module):
    """One draw of the anchor-function task.

    **Fields:**

    - `data`: `TokenData` (tokens `(n, s)`, targets `(n,)`).
    - `anchors`: `(n,)` the anchor of each sequence; `positions`: `(n,)` its position.
    """

    data: TokenData
    anchors: Int[Array, " n"]
    positions: Int[Array, " n"]


def anchor_function(
    n: int,
    key: PRNGKeyArray,
    *,
    length: int = 10,
    vocab: int = VOCAB,
    pairing: str = "mod2",
) -> AnchorFunctionData:
    """Sample `n` sequences of the anchor-function task (layout in the module docstring).

    **Arguments:**

    - `n`: number of sequences (exactly; at least 1).
    - `key`: JAX PRNG key; the same key gives the same draw.
    - `length`: tokens per sequence `s ≥ 2`.
    - `vocab`: vocabulary size, at least 102 (the largest target is 101).
    - `pairing`: `"mod2"` (default) or `"pairs"`, see `anchor_shift`.

    **Returns:**

    An `AnchorFunctionData`.
    """
    if int(n) != n or n < 1:
        raise InputError(f"anchor_function needs n >= 1 sequences, got {n!r}")
    if int(length) != length or length < 2:
        raise InputError(f"anchor_function needs length >= 2, got {length!r}")
    if int(vocab) != vocab or vocab < KEYS[1] + 2:
        raise InputError(f"anchor_function needs vocab >= {KEYS[1] + 2}, got {vocab!r}")
    if pairing not in PAIRINGS:
        raise InputError(f"pairing must be one of {', '.join(PAIRINGS)}, got {pairing!r}")
    n, length = int(n), int(length)
    seed = int(jax.random.randint(key, (), 0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    tokens = rng.integers(KEYS[0], KEYS[1] + 1, size=(n, length))
    anchors = np.array([ANCHORS[i % len(ANCHORS)] for i in range(n)])
    # Positions cycle over 0..s-2 in a shuffled order of the cycle's slots, independent of the
    # anchors' cycle: exact shares of both without tying anchor to position.
    slots = rng.permutation(n)
    positions = slots % (length - 1)
    rows = np.arange(n)
    tokens[rows, positions] = anchors
    shift = {a: anchor_shift(a, pairing) for a in ANCHORS}
    targets = tokens[rows, positions + 1] + np.array([shift[a] for a in anchors])
    return AnchorFunctionData(
        data=TokenData(tokens, targets),
        anchors=np.asarray(anchors, dtype=np.int32),
        positions=np.asarray(positions, dtype=np.int32),
    )
