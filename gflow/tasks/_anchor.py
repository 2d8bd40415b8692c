"""The composite-shift "anchor function" task of Zhang et al. (NeurIPS 2024, arXiv 2405.05409).

**Vocabulary** (`V = 110` tokens, ids `0..109`):

- `1, 2, 3, 4`: the anchors, acting as shifts `g(x;1) = x+5, g(x;2) = x+1, g(x;3) = x−2,
  g(x;4) = x−8`;
- `20..99`: keys and noise tokens;
- targets: the composite shifts range from `−16` (pair `(4,4)`) to `+10` (pair `(1,1)`), so
  for keys `x ∈ 20..99` every target, the held-out answers `x−10` and `x−6` included, lies
  in `4..109`. Ids `0` and `5..19` never occur as inputs, `100..109` only as targets.

**Sequence layout** (length `s = 9` by default): the key `x` at position `p`, the anchors
`a1, a2` at `p+1, p+2`, every other position a noise token drawn uniformly from `20..99`;
`p` is uniform in `0..s−3`. The target (the next token after the last position) is
`g(g(x;a1);a2)`, except for the non-compositional pair `(3,4)`, trained with `x−6` (its
compositional answer would be `x−10`). The pair `(4,3)` is held out of training: its
compositional answer is `x−10` ("reasoning"), the answer by analogy with `(3,4)` is `x−6`
("memorizing").

Training pairs cycle through the 15 pairs other than `(4,3)` in lexicographic order, so every
training pair appears `⌊n/15⌋` or `⌈n/15⌉` times.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int, PRNGKeyArray

from .._errors import InputError
from ..models._decoder import TokenData

SHIFTS = {1: 5, 2: 1, 3: -2, 4: -8}
HELD_OUT = (4, 3)
NON_COMPOSITIONAL = (3, 4)
NON_COMPOSITIONAL_SHIFT = -6
KEY_RANGE = (20, 99)  # inclusive
VOCAB = 110
TRAIN_PAIRS = tuple(
    (a1, a2) for a1 in SHIFTS for a2 in SHIFTS if (a1, a2) != HELD_OUT
)


def composite_shift(a1: int, a2: int) -> int:
    """The shift the training data teach for the pair `(a1, a2)`: `g(g(x;a1);a2) − x`, or
    `−6` for the non-compositional pair `(3, 4)`."""
    if (a1, a2) == NON_COMPOSITIONAL:
        return NON_COMPOSITIONAL_SHIFT
    return SHIFTS[a1] + SHIFTS[a2]


class AnchorData(eqx.Module):
    """The anchor task's training set and held-out probe.

    **Fields:**

    - `train`: `TokenData` of the 15 training pairs.
    - `held_out`: `TokenData` of the pair `(4,3)`, targets the compositional `x−10`.
    - `train_pairs`: `(n_train, 2)` anchors of each training sample; `train_keys`: `(n_train,)`.
    - `held_out_keys`: `(n_held_out,)` keys `x` of the held-out samples; the memorized answer
        is `held_out_keys − 6`.
    """

    train: TokenData
    held_out: TokenData
    train_pairs: Int[Array, "n 2"]
    train_keys: Int[Array, " n"]
    held_out_keys: Int[Array, " m"]


def _sequences(rng: np.random.Generator, pairs: np.ndarray, length: int):
    n = pairs.shape[0]
    lo, hi = KEY_RANGE
    tokens = rng.integers(lo, hi + 1, size=(n, length))
    keys = rng.integers(lo, hi + 1, size=n)
    positions = rng.integers(0, length - 2, size=n)
    rows = np.arange(n)
    tokens[rows, positions] = keys
    tokens[rows, positions + 1] = pairs[:, 0]
    tokens[rows, positions + 2] = pairs[:, 1]
    return tokens, keys


def anchor_task(n_train: int, n_held_out: int, key: PRNGKeyArray, length: int = 9) -> AnchorData:
    """Sample the anchor task (layout in the module docstring), deterministic in `key`.

    **Arguments:**

    - `n_train`: training samples (at least 15: one per training pair).
    - `n_held_out`: samples of the held-out pair `(4,3)`.
    - `key`: JAX PRNG key (its data seed the numpy generator).
    - `length`: sequence length `s ≥ 3`.

    **Returns:**

    An `AnchorData`.
    """
    if n_train < len(TRAIN_PAIRS) or n_held_out < 1:
        raise InputError(f"anchor_task needs n_train >= 15 and n_held_out >= 1, got {n_train}, {n_held_out}")
    if length < 3:
        raise InputError(f"anchor_task needs length >= 3, got {length}")
    seed = int(jax.random.randint(key, (), 0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    pairs = np.array([TRAIN_PAIRS[i % len(TRAIN_PAIRS)] for i in range(n_train)])
    tokens, keys = _sequences(rng, pairs, length)
    targets = keys + np.array([composite_shift(a1, a2) for a1, a2 in pairs])
    held_pairs = np.tile(np.array(HELD_OUT), (n_held_out, 1))
    held_tokens, held_keys = _sequences(rng, held_pairs, length)
    compositional = held_keys + SHIFTS[HELD_OUT[0]] + SHIFTS[HELD_OUT[1]]
    return AnchorData(
        train=TokenData(tokens, targets),
        held_out=TokenData(held_tokens, compositional),
        train_pairs=jnp.asarray(pairs, dtype=jnp.int32),
        train_keys=jnp.asarray(keys, dtype=jnp.int32),
        held_out_keys=jnp.asarray(held_keys, dtype=jnp.int32),
    )
