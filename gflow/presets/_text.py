"""Problem builder for next-token prediction on real text (Chen & Luo's Fig. 3; docs/science.md §1b).

The paper's real-text model: a 2-layer decoder with residual connections, a GeLU FFN in every
layer, no LayerNorm, every trainable weight `N(0, σ²)` with `σ = d^(−1.2)`, loss on the last
token; both layers' groups are observed. Text: the Python language reference
(`pydoc_data.topics`, offline) instead of WikiText, at character level. The token and
position embeddings are frozen random `N(0, embedding_std²)`; the readout `W_out` learns.

What a run shows is reported by the preset (`attention_rank_below_outer_layer1/2`, the loss
against the unigram entropy). Measured at the shipped size (n = 256, d = 16, m = 32, σ = 16^−1.2, seed 0,
Tsit5 rtol 1e-6, t1 = 120; 5,255 steps): `escape` at t = 0.84; at the end the attention pair
of each layer lies below its outer groups in effective rank (mean 10.3 against 12.9 in layer
1, 9.6 against 12.6 in layer 2) and in stable rank (about 2.4 against 3.2–5.2), the loss at
0.029 against the unigram entropy 3.02 (the windows are memorised).
"""


import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .. import observers as obs
from .._errors import InputError
from .._flow import GradientFlow
from .._solve import Transition
from ..models._decoder import Decoder, cross_entropy
from ..tasks._text import text_task
from .._prediction import Prediction
from ._problem import Problem

# Groups in the order every per-group observable lists them: per layer the attention
# (key-query) pair, then the outer parameters (value, FFN); the readout last.
_PER_LAYER = ("W_Q", "W_K", "W_V", "W1", "W2")


def group_names(layers: int) -> tuple[str, ...]:
    """`W_Q^1, W_K^1, W_V^1, W1^1, W2^1, W_Q^2, ..., W_out`."""
    return tuple(f"{g}^{l + 1}" for l in range(layers) for g in _PER_LAYER) + ("W_out",)


def _weights(m):
    return tuple(getattr(m, g)[l] for l in range(m.W_Q.shape[0]) for g in _PER_LAYER) + (
        m.W_out,)


class _Group(eqx.Module):
    """Selects group number `index` of `_weights` (a module, not a closure)."""

    index: int = eqx.field(static=True)

    def __call__(self, m):
        return _weights(m)[self.index]


class CosineMatrices(eqx.Module):
    """`{group: ordered row cosine-similarity matrix}`."""

    matrices: dict[str, obs.CosineMatrix]

    def __call__(self, m, data=None):
        return {name: c(m) for name, c in self.matrices.items()}


class EscapeCondition(eqx.Module):
    """`cross_entropy − level`."""

    level: Float[Array, ""]

    def __call__(self, m, data):
        return cross_entropy(m, data) - self.level


def text(
    *,
    n: int,
    length: int,
    vocab_size: int,
    level: str,
    d: int,
    m: int,
    layers: int,
    embedding_std: float,
    seed: int,
    activation: str,
    escape_fraction: float,
    eps: float | None = None,
) -> Problem:
    """Next-token prediction on Python's language reference by a small-init decoder.

    **Arguments:**

    - `n`, `length`: windows and tokens per window; `vocab_size`, `level`: vocabulary cap
        (with `<unk>`) and `"char"`/`"word"` tokenization.
    - `d`, `m`, `layers`: width, FFN width, layers (each attention + FFN, residual).
    - `eps`: init std of every trainable weight (`W_Q, W_K, W_V, W1, W2, W_out`); default
        the paper's `d^(−1.2)`.
    - `embedding_std`: std of the frozen random token and position embeddings.
    - `seed`: seeds windows and init.
    - `activation`: FFN activation.
    - `escape_fraction`: the transition `escape` is when the loss has fallen by this fraction
        of the gap between its initial value and the unigram entropy of the targets.
    """
    eps = d ** -1.2 if eps is None else eps
    if not eps > 0 or not embedding_std > 0:
        raise InputError(f"problem.eps and problem.embedding_std must be positive, got {eps}, {embedding_std}")
    if not 0 < escape_fraction < 1:
        raise InputError(f"problem.escape_fraction must be in (0, 1), got {escape_fraction}")
    key_data, key_model = jax.random.split(jax.random.key(seed))
    data, vocab = text_task(n, length, vocab_size, key_data, level=level)
    model = Decoder.init(
        key_model, vocab=len(vocab), length=length, d=d, m=m, layers=layers, std=eps,
        embedding_std=embedding_std, activation=activation, train_embeddings=False,
        residual=True, ffn_every_layer=True,
    )
    counts = np.bincount(np.asarray(data.targets), minlength=len(vocab))
    freq = counts[counts > 0] / counts.sum()
    unigram_entropy = float(-np.sum(freq * np.log(freq)))
    initial_loss = float(cross_entropy(model, data))
    escape_level = initial_loss - escape_fraction * (initial_loss - unigram_entropy)

    groups = group_names(layers)
    observers = {
        "stable_rank": obs.stable_rank(_weights),
        "relative_change": obs.relative_change(_weights, model),
        "norm": obs.frobenius_norm(_weights),
    }
    # Only where they are read (t0, the transition, the chosen times, the end): full spectra
    # and cosine matrices in spectral order (an SVD and an eigendecomposition per group).
    snapshots = {
        "effective_rank": obs.effective_rank(_weights),
        "cosine": CosineMatrices({name: obs.cosine_matrix(_Group(i), axis="rows")
                                  for i, name in enumerate(groups[:-1])}),
    }
    transitions = (
        Transition("escape", EscapeCondition(jnp.asarray(escape_level)), direction=False),
    )
    criteria = {
        "escape": f"loss falls below {escape_level:.4g} ({escape_fraction:g} of the way from "
        f"L(0) = {initial_loss:.4g} to the unigram entropy {unigram_entropy:.4g})"
    }

    def predict(traj):
        # The effective rank is a snapshot: read at the end (or, for a run that stopped
        # early, at its latest snapshot).
        k = (traj.snapshot_labels.index("end") if "end" in traj.snapshot_labels
             else int(np.argmax(traj.snapshot_ts)))
        ranks = np.asarray(traj.snapshots["effective_rank"][k])
        at = f" (t={float(traj.snapshot_ts[k]):.6g})"
        change = np.asarray(traj.observables["relative_change"][-1])
        loss_end = float(np.asarray(traj.observables["loss"][-1]))
        out = {}
        for l in range(layers):
            block = ranks[5 * l: 5 * l + 5]
            attention, outer = float(np.mean(block[:2])), float(np.mean(block[2:]))
            out[f"attention_rank_below_outer_layer{l + 1}"] = Prediction.bound(
                outer, attention, relation="<",
                basis=f"layer {l + 1}: final mean effective rank of W_Q, W_K against that of "
                "W_V, W1, W2 (the bound): Chen & Luo's attention-collapses-first picture" + at,
            )
        return out | {
            "loss_below_unigram": Prediction.bound(
                unigram_entropy, loss_end, relation="<",
                basis="final loss against the unigram entropy of the targets (a context-free "
                "model's loss); relative change per group at the end: "
                + ", ".join(f"{g} {c:.3g}" for g, c in zip(groups, change)),
            ),
        }

    flow = GradientFlow(model, cross_entropy, data, trainable=model.trainable_spec())
    return Problem(flow, observers, transitions, criteria, predict, snapshots=snapshots)
