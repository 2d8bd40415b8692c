"""Real English text without network access: Python's own language reference.

**Corpus.** The values of `pydoc_data.topics.topics` (the help texts of the language
reference, shipped with CPython) joined in sorted-key order with `"\\n"`, lower-cased.

**Tokenization.**

- `"char"`: one token per character;
- `"word"`: maximal runs of letters/digits/underscore, and every other non-space character
  alone (`re.findall(r"\\w+|[^\\w\\s]")`).

The vocabulary is capped at `vocab_size`: id `0` is `<unk>`, ids `1..vocab_size−1` are the
most frequent tokens, ties broken by the token's text, so the map is deterministic.

**Windows.** `n` windows of `length` consecutive token ids start at positions drawn uniformly
without replacement from the seed; the target of a window is the id of the token right after
it (next-token prediction at the last position).
"""

import collections
import re

import jax
import numpy as np
from jaxtyping import PRNGKeyArray

from .._errors import InputError
from ..models._decoder import TokenData

UNKNOWN = "<unk>"
_LEVELS = ("char", "word")


def corpus_text() -> str:
    """The lower-cased text of `pydoc_data.topics` (about 0.5 M characters, no network)."""
    from pydoc_data.topics import topics

    return "\n".join(topics[key] for key in sorted(topics)).lower()


def tokenize(text: str, level: str) -> list[str]:
    """Split `text` into character or word tokens (module docstring)."""
    if level not in _LEVELS:
        raise InputError(f"level must be 'char' or 'word', got {level!r}")
    return list(text) if level == "char" else re.findall(r"\w+|[^\w\s]", text)


def vocabulary(tokens: list[str], vocab_size: int) -> list[str]:
    """`<unk>` followed by the `vocab_size − 1` most frequent tokens (ties by text)."""
    if vocab_size < 2:
        raise InputError(f"vocab_size must be at least 2, got {vocab_size}")
    counts = collections.Counter(tokens)
    ranked = sorted(counts, key=lambda tok: (-counts[tok], tok))
    return [UNKNOWN, *ranked[: vocab_size - 1]]


def encode(tokens: list[str], vocab: list[str]) -> np.ndarray:
    """Token ids under `vocab`; tokens outside it map to `0` (`<unk>`)."""
    index = {tok: i for i, tok in enumerate(vocab)}
    return np.array([index.get(tok, 0) for tok in tokens], dtype=np.int32)


def text_task(
    n: int, length: int, vocab_size: int, key: PRNGKeyArray, level: str = "char"
) -> tuple[TokenData, list[str]]:
    """`n` next-token windows of the Python reference text (module docstring).

    **Arguments:**

    - `n`: number of windows; `length`: tokens per window.
    - `vocab_size`: vocabulary cap, `<unk>` included.
    - `key`: JAX PRNG key choosing the window starts.
    - `level`: `"char"` or `"word"`.

    **Returns:**

    `(TokenData, vocab)` with `vocab[i]` the text of token id `i`.
    """
    if n < 1 or length < 1:
        raise InputError(f"text_task needs n >= 1 and length >= 1, got {n}, {length}")
    tokens = tokenize(corpus_text(), level)
    vocab = vocabulary(tokens, vocab_size)
    ids = encode(tokens, vocab)
    if n > ids.size - length:
        raise InputError(f"text_task: the corpus has only {ids.size - length} windows, got n={n}")
    seed = int(jax.random.randint(key, (), 0, 2**31 - 1))
    starts = np.sort(np.random.default_rng(seed).choice(ids.size - length, size=n, replace=False))
    windows = ids[starts[:, None] + np.arange(length)]
    return TokenData(windows, ids[starts + length]), vocab
