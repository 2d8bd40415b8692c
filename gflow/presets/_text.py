"""Problem builder for next-token prediction on real text (papers.md §1 on real data).

A small decoder with frozen random embeddings learns the Python language reference
(`pydoc_data.topics`, no network) from a small initialization; the preset records the same
per-group observables as `rank-collapse` (effective and stable rank, relative change, norm,
cosine-similarity matrices of the rows) so the two-stage picture can be compared on text, here
with a multi-class target where the outer parameters need more than one direction.

**What the shipped run shows (measured, seed 0; 256 char windows of length 8, 32 tokens,
d = 16, m = 32, ε = 1e-3).** The readout `W_out` and the value matrix `W_V` escape first
(`escape` at t ≈ 0.77; by t = 2 `W_V` has moved 8× its initial norm and its effective rank has
fallen from 12.7 to 4.0) while `W_Q, W_K` have moved by 0.2 % (the unigram/bigram stage, served
by the residual path). Then `W_Q, W_K` grow (~100× by t = 120) and their effective ranks fall
from 12.9/13.1 to 4.2, while the outer group keeps a higher rank (`W_V` 12.4, `W1` 7.2,
`W2` 6.4, `W_out` 15.0): the paper's attention-collapses-first picture on real text, with the
final loss 1.33 below the targets' unigram entropy 3.02.
"""


import jax
import numpy as np

from .. import observers as obs
from .._errors import InputError
from .._flow import GradientFlow
from .._solve import Transition
from ..models._decoder import WEIGHTS, Decoder, cross_entropy
from ..tasks._text import text_task
from .._prediction import Prediction
from ._problem import Problem

# Groups in the order every per-group observable lists them: attention (key-query), then the
# outer parameters (value, FFN, readout). Layer 0 for the stacked attention matrices.
GROUPS = WEIGHTS
_ATTENTION = (0, 1)
_OUTER = (2, 3, 4, 5)


def _weights(m):
    return tuple(getattr(m, name) if name in ("W1", "W2", "W_out") else getattr(m, name)[0]
                 for name in WEIGHTS)


def text(
    *,
    n: int,
    length: int,
    vocab_size: int,
    level: str,
    d: int,
    m: int,
    layers: int,
    eps: float,
    embedding_std: float,
    seed: int,
    activation: str,
    escape_fraction: float,
) -> Problem:
    """Next-token prediction on Python's language reference by a small-init decoder.

    **Arguments:**

    - `n`, `length`: windows and tokens per window; `vocab_size`, `level`: vocabulary cap
        (with `<unk>`) and `"char"`/`"word"` tokenization.
    - `d`, `m`, `layers`: width, FFN width, attention layers.
    - `eps`: init std of every trainable weight (`W_Q, W_K, W_V, W1, W2, W_out`).
    - `embedding_std`: std of the frozen random token and position embeddings.
    - `seed`: seeds windows and init.
    - `activation`: FFN activation.
    - `escape_fraction`: the transition `escape` is when the loss has fallen by this fraction
        of the gap between its initial value and the unigram entropy of the targets.
    """
    if not eps > 0 or not embedding_std > 0:
        raise InputError(f"problem.eps and problem.embedding_std must be positive, got {eps}, {embedding_std}")
    if not 0 < escape_fraction < 1:
        raise InputError(f"problem.escape_fraction must be in (0, 1), got {escape_fraction}")
    key_data, key_model = jax.random.split(jax.random.key(seed))
    data, vocab = text_task(n, length, vocab_size, key_data, level=level)
    model = Decoder.init(
        key_model, vocab=len(vocab), length=length, d=d, m=m, layers=layers, std=eps,
        embedding_std=embedding_std, activation=activation, train_embeddings=False,
    )
    counts = np.bincount(np.asarray(data.targets), minlength=len(vocab))
    freq = counts[counts > 0] / counts.sum()
    unigram_entropy = float(-np.sum(freq * np.log(freq)))
    initial_loss = float(cross_entropy(model, data))
    escape_level = initial_loss - escape_fraction * (initial_loss - unigram_entropy)

    cosines = {
        name: obs.cosine_matrix(lambda m_, i=i: _weights(m_)[i], axis="rows")
        for i, name in enumerate(GROUPS[:4])
    }
    observers = {
        "effective_rank": obs.effective_rank(_weights),
        "stable_rank": obs.stable_rank(_weights),
        "relative_change": obs.relative_change(_weights, model),
        "norm": obs.frobenius_norm(_weights),
        "cosine": lambda m_, d_: {name: cosine(m_, d_) for name, cosine in cosines.items()},
    }
    transitions = (
        Transition("escape", lambda m_, d_: cross_entropy(m_, d_) - escape_level, direction=False),
    )
    criteria = {
        "escape": f"loss falls below {escape_level:.4g} ({escape_fraction:g} of the way from "
        f"L(0) = {initial_loss:.4g} to the unigram entropy {unigram_entropy:.4g})"
    }

    def predict(traj):
        ranks = np.asarray(traj.observables["effective_rank"][-1])
        change = np.asarray(traj.observables["relative_change"][-1])
        attention, outer = float(np.mean(ranks[list(_ATTENTION)])), float(np.mean(ranks[list(_OUTER)]))
        loss_end = float(np.asarray(traj.observables["loss"][-1]))
        return {
            "attention_rank_below_outer": Prediction.bound(
                outer, attention, relation="<",
                basis="final mean effective rank of W_Q, W_K against that of W_V, W1, W2, W_out "
                "(the bound): Chen & Luo's attention-collapses-first picture",
            ),
            "loss_below_unigram": Prediction.bound(
                unigram_entropy, loss_end, relation="<",
                basis="final loss against the unigram entropy of the targets (a context-free "
                "model's loss); relative change per group at the end: "
                + ", ".join(f"{g} {c:.3g}" for g, c in zip(GROUPS, change)),
            ),
        }

    flow = GradientFlow(model, cross_entropy, data, trainable=model.trainable_spec())
    return Problem(flow, observers, transitions, criteria, predict)
