"""Observables of the co-occurrence experiment (Yang et al., Fig. 1), as `(model, data) -> array`.

Each observer is an `eqx.Module` so it can be passed to `gflow.solve(observers=...)` and compiled
into the solve. Words are named by their paper numbers (`1` for `μ_1`, ...); they are static
configuration, not data.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Scalar

from .._errors import InputError
from ..models._cooccurrence import CooccurrenceTransformer, margins, per_sample_loss
from ._cooccurrence import COMMON, TARGET_1, TARGET_2

_PAPER_WORDS = (TARGET_1, TARGET_2, COMMON)


def _check_words(owner: str, words: tuple[int, ...]) -> None:
    if len(words) == 0 or any(int(w) != w or w < 1 for w in words):
        raise InputError(f"{owner}: words must be paper word numbers >= 1, got {words!r}")


def _embedding(model: CooccurrenceTransformer, word: int) -> Float[Array, " d"]:
    # Word μ_k is the one-hot vector with its one at index k − 1.
    return jax.nn.one_hot(word - 1, model.d, dtype=float)


class TypeLosses(eqx.Module):
    """Mean logistic loss over the samples of each type: `{"type1": ..., ..., "type4": ...}`.

    A type absent from `data` reads 0 (its sum over no samples) rather than nan.
    """

    def __call__(self, model: CooccurrenceTransformer, data) -> dict[str, Scalar]:
        losses = per_sample_loss(model, data)
        out = {}
        for t in (1, 2, 3, 4):
            mask = data.type == t
            out[f"type{t}"] = jnp.sum(jnp.where(mask, losses, 0.0)) / jnp.maximum(
                jnp.sum(mask), 1
            )
        return out


class TotalLoss(eqx.Module):
    """The training loss `(1/n) Σ_i log(1 + exp(-y_i F(X_i)))`."""

    def __call__(self, model: CooccurrenceTransformer, data) -> Scalar:
        return jnp.mean(per_sample_loss(model, data))


class ScoreMatrix(eqx.Module):
    """`S[i, j] = μ_{w_i}ᵀ W_Kᵀ W_Q μ_{w_j}` for the words `w = words` (default `(1, 2, 3)`).

    Row `i` is the KEY word, column `j` the QUERY word: `S[1, 0]` is `μ_2ᵀ W_Kᵀ W_Q μ_1`, how much
    a `μ_1` query attends to a `μ_2` key (before the softmax's `1/√m`).
    """

    words: tuple[int, ...] = eqx.field(static=True, default=_PAPER_WORDS)

    def __check_init__(self):
        _check_words("ScoreMatrix", self.words)

    def __call__(self, model: CooccurrenceTransformer, data) -> Float[Array, "k k"]:
        del data
        # For one-hot words the scores are a block of W_Kᵀ W_Q: columns of W_K and W_Q.
        index = jnp.asarray(self.words) - 1
        return model.W_K[:, index].T @ model.W_Q[:, index]


class WordReadouts(eqx.Module):
    """`G(μ_w) = Σ_j a_j w_jᵀ W_V μ_w` for the words `w = words` (default `(1, 2, 3)`)."""

    words: tuple[int, ...] = eqx.field(static=True, default=_PAPER_WORDS)

    def __check_init__(self):
        _check_words("WordReadouts", self.words)

    def __call__(self, model: CooccurrenceTransformer, data) -> Float[Array, " k"]:
        del data
        return jnp.stack([model.G(_embedding(model, w)) for w in self.words])


class Margin(eqx.Module):
    """The classification margin `min_i y_i F(X_i)`.

    Its first upcrossing of 0 is the end of the paper's Phase 1 (every sample classified
    correctly): use it as the condition of a `gflow.Transition` with `direction=True`.
    """

    def __call__(self, model: CooccurrenceTransformer, data) -> Scalar:
        return jnp.min(margins(model, data))


def phase1_condition() -> Margin:
    """The Phase-1 end condition: the margin, whose upcrossing of 0 marks "all samples
    correctly classified". Pass it to `gflow.Transition("phase1", phase1_condition(),
    direction=True)`."""
    return Margin()


def cooccurrence_observers() -> dict[str, eqx.Module]:
    """The observables of the paper's Fig. 1, keyed as the `cooccurrence` preset records them.

    **Returns:**

    `{"type_losses": TypeLosses(), "loss": TotalLoss(), "scores": ScoreMatrix(),
    "G": WordReadouts(), "margin": Margin()}`; `scores` is `(3, 3)` over `μ_1, μ_2, μ_3`
    (row key, column query) and `G` is `(G(μ_1), G(μ_2), G(μ_3))`.
    """
    return {
        "type_losses": TypeLosses(),
        "loss": TotalLoss(),
        "scores": ScoreMatrix(),
        "G": WordReadouts(),
        "margin": Margin(),
    }
