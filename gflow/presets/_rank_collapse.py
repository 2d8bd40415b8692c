"""Problem builder `rank-collapse`: Chen & Luo's own experiment by exact gradient flow.

The multi-class anchor-function decoder of their Sec. 5 / App. B (docs/science.md §1b): one layer, one
head, no residual, no LayerNorm, tanh FFN with `d_ff = 2 d_model`; the token embedding, the
positional embedding and the output projection are fixed; `W_Q, W_K, W_V (d×d)`, `W1 (d×d_ff)`,
`W2 (d_ff×d)` learn from `N(0, σ²)`, `σ = d_model^(−0.85)`; cross-entropy on the last token.
The paper trains with AdamW; here the flow `dθ/dt = −∇L(θ)` is integrated exactly.

Fixed embeddings and readout (the paper does not state their distribution): `E, P ~ N(0, 1/d)`
(token rows of unit norm on average) and `W_out ~ N(0, 1/d)`; both are config fields
(`embedding_std`, `readout_std`). Measured: with `E, P ~ N(0, 1)` (PyTorch's `nn.Embedding`
default) the flow is stiff from t ≈ 50 on (steps of ~0.3 time units; no run of a minute reaches
the second stage), so the unit-norm scale is the one a CPU run can integrate.

**Assumption 1 (no multi-class analogue shipped).** At leading order in σ (uniform softmax,
tanh ≈ identity, logits near 0) the cross-entropy is `log V − tr(W_V W1 W2 C)` with the data
matrix `C = W_out Yᵀ X̄ / n` (`Y` rows `e_{y_i} − 1/V`, `X̄` rows the mean token of sample `i`):
the stage-1 energy is a three-factor product against a general `d × d` matrix, where the
theorems have a rank-one `vᵀ`. Only for a rank-one `C = σ u vᵀ` does it reduce to the binary
form, with `W_v = v W_V` and `W2 u` for `W2`; measured at the default size, `σ2/σ1 = 0.19`
(stable rank of `C` 1.33), so that reduction is approximate, and with `W1` of shape
`d × d_ff` the per-index condition (1), which pairs an index of `W_v` with one of `W2`,
has no canonical form. So the preset reports no Assumption-1 rates; `rank-collapse-binary`
does.

**What the flow shows** (measured; d = 64, d_ff = 128, n = 300, σ = 64^−0.85, seed 0, Tsit5
at rtol 1e-6 with PI step-size control (pcoeff 0.3, icoeff 0.4; the same numbers with integral
control), t1 = 1500): the outer groups condense first, on a loss plateau, while `W_Q, W_K`
sit at init (`condensation` t = 108.9: outer mean stable rank 20.5 → 4.1, `W_Q` moved 0.2 %;
loss 5.04 at t = 138, 4.92 at t = 506); then `W_Q, W_K` move (`stage2_onset` t = 565.1) and
collapse (`kq_collapse` t = 733.0: stable ranks 2.00 / 1.94 against 2.29–2.39 for the outer
groups; lowest 1.69 / 1.67 at t ≈ 805 against 2.72–2.83). Afterwards every rank grows back
while the flow memorises: at t = 1500 training accuracy 1.0, held-out 0.010 (chance 0.0103),
stable ranks 3.59 / 3.59 against 5.19–5.79. In stable rank the attention stays below the outer
groups from the collapse on; in effective rank it never does (44 / 43.6 against 24.8–33 at the
collapse), the untouched init bulk of `W_Q, W_K` dominating `exp H(σ/Σσ)`. The predictions
`attention_collapses_below_outer*` and `held_out_accuracy` report this for every run.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .. import measures
from .. import observers as obs
from .._errors import InputError
from .._flow import GradientFlow
from ..figures import save_index
from .._prediction import Prediction
from .._solve import Transition
from ..models._decoder import Decoder, TokenData, accuracy, cross_entropy
from ..tasks._anchor_function import PAIRINGS, anchor_function
from ._problem import Problem

# Parameter groups, in the order every per-group observable lists them.
GROUPS = ("W_Q", "W_K", "W_V", "W1", "W2")
ATTENTION = (0, 1)
OUTER = (2, 3, 4)


# Module-level selectors (not closures): equal observers built twice are equal, so sweep
# members share one compiled program.
def _groups(m):
    return (m.W_Q[0], m.W_K[0], m.W_V[0], m.W1, m.W2)


def _outer(m):
    return (m.W_V[0], m.W1, m.W2)


def _w_q(m):
    return m.W_Q[0]


def _w_k(m):
    return m.W_K[0]


def _w_v(m):
    return m.W_V[0]


def _w1(m):
    return m.W1


def _w2(m):
    return m.W2


_SELECTORS = dict(zip(GROUPS, (_w_q, _w_k, _w_v, _w1, _w2)))


class CosineMatrices(eqx.Module):
    """`{group: row cosine-similarity matrix}` (the paper's Fig. 1a panels; the figure orders
    the rows spectrally on the host)."""

    matrices: dict[str, obs.CosineMatrix]

    def __call__(self, model, data=None) -> dict[str, Float[Array, "k k"]]:
        return {name: c(model) for name, c in self.matrices.items()}


class ConservedDrift(eqx.Module):
    """`[‖Q(t) − Q(0)‖_F, ‖R(t) − R(0)‖_F]` of the flow's conserved quantities
    `Q = W_Qᵀ W_Q − W_Kᵀ W_K` (scores depend on `W_Q W_Kᵀ` only) and `R = W_Vᵀ W_V − W1 W1ᵀ`
    (`W_V` and `W1` meet as `W_V W1`, no residual in between): zero along the exact flow."""

    Q0: Float[Array, "d d"]
    R0: Float[Array, "d d"]

    @staticmethod
    def quantities(m) -> tuple[Array, Array]:
        W_Q, W_K, W_V = m.W_Q[0], m.W_K[0], m.W_V[0]
        return W_Q.T @ W_Q - W_K.T @ W_K, W_V.T @ W_V - m.W1 @ m.W1.T

    def __call__(self, model, data=None) -> Float[Array, " 2"]:
        Q, R = self.quantities(model)
        return jnp.stack([jnp.linalg.norm(Q - self.Q0), jnp.linalg.norm(R - self.R0)])


class Accuracy(eqx.Module):
    """Arg-max accuracy on `data` when `held_out` is `None`, else on `held_out`."""

    held_out: TokenData | None = None

    def __call__(self, model, data) -> Array:
        return accuracy(model, data if self.held_out is None else self.held_out)


class HeldOutLoss(eqx.Module):
    """Cross-entropy on a held-out draw."""

    held_out: TokenData

    def __call__(self, model, data=None) -> Array:
        return cross_entropy(model, self.held_out)


# Lanczos steps behind every stable rank this preset computes in the solve (its conditions,
# diffrax evaluates at every step, and its save-time observer): `2 x 16` products with each
# matrix instead of an SVD. At the located transitions the matrices have a leading singular
# value apart from the bulk, where 16 steps reach rounding; the worst case, a Gaussian matrix
# (the init), is within 2e-2 in σ_max², far from any transition level (see
# `gflow.measures.spectral_norm` and tests/test_measures.py).
LANCZOS_STEPS = 16


class OuterStableRankBelow(eqx.Module):
    """Condition: mean stable rank of `W_V, W1, W2` minus `level` (falls through 0 at
    condensation); each `σ_max` from `iterations` Lanczos steps (`None`: SVD)."""

    level: Float[Array, ""]
    iterations: int | None = eqx.field(static=True, default=LANCZOS_STEPS)

    def __call__(self, model, data=None) -> Array:
        ranks = jnp.stack([measures.stable_rank(W, self.iterations) for W in _outer(model)])
        return jnp.mean(ranks) - self.level


class QueryChangeAbove(eqx.Module):
    """Condition: `‖W_Q − W_Q(0)‖_F / ‖W_Q(0)‖_F` minus `level`."""

    W_Q0: Float[Array, "d d"]
    level: Float[Array, ""]

    def __call__(self, model, data=None) -> Array:
        return measures.relative_change(_w_q(model), self.W_Q0) - self.level


class AttentionStableRankBelow(eqx.Module):
    """Condition: `max(stable rank W_Q, stable rank W_K)` minus `level`; each `σ_max` from
    `iterations` Lanczos steps (`None`: SVD)."""

    level: Float[Array, ""]
    iterations: int | None = eqx.field(static=True, default=LANCZOS_STEPS)

    def __call__(self, model, data=None) -> Array:
        return jnp.maximum(measures.stable_rank(_w_q(model), self.iterations),
                           measures.stable_rank(_w_k(model), self.iterations)) - self.level


def rank_collapse(
    *,
    d: int,
    d_ff: int,
    n: int,
    n_held_out: int,
    length: int,
    vocab: int,
    pairing: str,
    seed: int,
    activation: str,
    condensation_fraction: float,
    onset_change: float,
    collapse_rank: float,
    singular_vectors: int,
    embedding_std: float | None = None,
    readout_std: float | None = None,
    eps: float | None = None,
    held_out_at_save_times: bool = False,
) -> Problem:
    """Chen & Luo's anchor-function decoder (docs/science.md §1b) under exact gradient flow.

    **Arguments:**

    - `d`, `d_ff`: model and FFN width (the paper: 640 and 1280; `d_ff = 2 d`).
    - `n`, `n_held_out`: training sequences and held-out sequences (a second draw).
    - `length`, `vocab`, `pairing`: the task's `s`, vocabulary and synonym pairing (see
        `gflow.tasks.anchor_function`).
    - `seed`: seeds data, held-out data and init.
    - `activation`: FFN activation (the paper: `"tanh"`).
    - `embedding_std`: std of the fixed token and positional embeddings; default `1/√d`.
    - `readout_std`: std of the fixed output projection; default `1/√d`.
    - `eps`: init std of every trainable weight; default `d^(−0.85)` (the paper's).
    - `condensation_fraction`: `condensation` is when the mean stable rank of `W_V, W1, W2`
        falls below this fraction of its initial value.
    - `onset_change`: `stage2_onset` is when `‖W_Q − W_Q(0)‖_F` reaches this multiple of
        `‖W_Q(0)‖_F`.
    - `collapse_rank`: `kq_collapse` is when the larger stable rank of `W_Q, W_K` falls below
        this value.
    - `singular_vectors`: how many leading singular vectors of each outer matrix are saved
        (for the adjacent-time similarity of Fig. 2b).
    - `held_out_at_save_times`: the held-out loss and accuracy at every save time; by default
        they are snapshots (t0, each transition, the chosen times, the end), since their
        forward pass on the held-out set is half as costly again as the rest of an ordinary
        save time.
    """
    if pairing not in PAIRINGS:
        raise InputError(f"problem.pairing must be one of {', '.join(PAIRINGS)}, got {pairing!r}")
    sigma = d ** -0.85 if eps is None else eps
    if not (math.isfinite(sigma) and sigma > 0):
        raise InputError(f"problem.eps must be positive, got {eps}")
    if not 0 < condensation_fraction < 1:
        raise InputError(f"problem.condensation_fraction must be in (0, 1), got "
                         f"{condensation_fraction}")
    if not onset_change > 0 or not collapse_rank >= 1:
        raise InputError("problem.onset_change must be > 0 and problem.collapse_rank >= 1, "
                         f"got {onset_change}, {collapse_rank}")
    embedding_std = d ** -0.5 if embedding_std is None else embedding_std
    readout_std = d ** -0.5 if readout_std is None else readout_std
    if not embedding_std > 0 or not readout_std > 0:
        raise InputError("problem.embedding_std and problem.readout_std must be positive")
    if singular_vectors < 1:
        raise InputError(f"problem.singular_vectors must be >= 1, got {singular_vectors}")
    key_data, key_held, key_model = jax.random.split(jax.random.key(seed), 3)
    train = anchor_function(n, key_data, length=length, vocab=vocab, pairing=pairing).data
    held_out = anchor_function(n_held_out, key_held, length=length, vocab=vocab,
                               pairing=pairing).data
    model = Decoder.init(
        key_model, vocab=vocab, length=length, d=d, m=d_ff, std=sigma,
        embedding_std=embedding_std, readout_std=readout_std,
        activation=activation, train_embeddings=False, residual=False, train_readout=False,
    )
    initial_outer = float(np.mean([measures.stable_rank(W) for W in _outer(model)]))
    Q0, R0 = ConservedDrift.quantities(model)

    # At every save time: what costs a few matrix-vector products, or shares the training
    # loss's forward pass (the training accuracy: XLA computes the logits once).
    observers = {
        "stable_rank": obs.stable_rank(_groups, LANCZOS_STEPS),
        "relative_change": obs.relative_change(_groups, model),
        "norm": obs.frobenius_norm(_groups),
        "train_accuracy": Accuracy(),
    }
    # A second forward pass, on the held-out set: at the paper's size 0.18 of a gradient,
    # which would make an ordinary save time 1.5 forward passes instead of 1.
    held_out_observers = {
        "held_out_accuracy": Accuracy(held_out),
        "held_out_loss": HeldOutLoss(held_out),
    }
    # Only where they are read (t0, the transitions, the chosen times, the end): full spectra
    # and cosine matrices (SVDs; at the paper's size a few gradients and 13 MB a time), and
    # the conserved drift, an integration check whose four d x d products cost as much as
    # the held-out forward pass (a check needs no curve of 200 points). The cosine matrices
    # and singular vectors are read as pictures and as |cos| to a few digits: stored in
    # float32.
    snapshots = {
        "effective_rank": obs.effective_rank(_groups),
        "conserved_drift": ConservedDrift(Q0, R0),
        "cosine": obs.stored_as(CosineMatrices({
            name: obs.cosine_matrix(_SELECTORS[name], axis="rows", ordered=False)
            for name in GROUPS}), jnp.float32),
        "singular_vectors": obs.stored_as(obs.singular_vectors(_outer, singular_vectors),
                                          jnp.float32),
    }
    (observers if held_out_at_save_times else snapshots).update(held_out_observers)
    level = condensation_fraction * initial_outer
    transitions = (
        Transition("condensation", OuterStableRankBelow(jnp.asarray(level)), direction=False),
        Transition("stage2_onset", QueryChangeAbove(_w_q(model), jnp.asarray(onset_change)),
                   direction=True),
        Transition("kq_collapse", AttentionStableRankBelow(jnp.asarray(collapse_rank)),
                   direction=False),
    )
    criteria = {
        "condensation": f"mean stable rank of W_V, W1, W2 falls below {condensation_fraction:g} "
        f"of its initial {initial_outer:.4g} (= {level:.4g})",
        "stage2_onset": f"‖W_Q − W_Q(0)‖_F reaches {onset_change:g} ‖W_Q(0)‖_F",
        "kq_collapse": f"max(stable rank W_Q, stable rank W_K) falls below {collapse_rank:g}",
    }
    chance = 1.0 / (KEY_COUNT + 1)

    def predict(traj):
        return rank_collapse_predictions(traj, chance)

    def references(traj):
        # At small init the logits are ~0: every token equally likely, the loss log V (the
        # stage-1 plateau); a model that cannot locate the answer is right by chance.
        plateau = {r"plateau $\log V$": math.log(vocab)}
        return {"loss": plateau, "held_out_loss": plateau,
                "held_out_accuracy": {f"chance 1/{KEY_COUNT + 1}": chance}}

    flow = GradientFlow(model, cross_entropy, train, trainable=model.trainable_spec())
    return Problem(flow, observers, transitions, criteria, predict, references=references,
                   snapshots=snapshots)


# The targets x + shift, x among the 96 keys, shift 0 or 1: 97 possible answers.
KEY_COUNT = 96


def _ranks_row(values: dict, t: float,
              measures_=(("effective", "effective_rank"), ("stable", "stable_rank"))
              ) -> tuple[bool, str]:
    """Whether W_Q, W_K lie below every outer group in effective AND in stable rank (or the
    given `measures_`) in the observables `values` (at time `t`), and the numbers, each
    measure with its own verdict."""
    parts, verdicts = [], []
    for label, key in measures_:
        r = np.asarray(values[key])
        below = bool(max(r[list(ATTENTION)]) < min(r[list(OUTER)]))
        verdicts.append(below)
        parts.append(f"{label} {'below' if below else 'NOT below'}: "
                     + ", ".join(f"{g} {x:.3g}" for g, x in zip(GROUPS, r)))
    return all(verdicts), "; ".join(parts) + f" (t={t:.6g})"


def _saved(traj, i: int) -> tuple[dict, float]:
    return {"stable_rank": np.asarray(traj.observables["stable_rank"])[i]}, float(traj.ts[i])


def ranks_at_snapshot(traj, label: str) -> tuple[dict, float] | None:
    """Both ranks where snapshot `label` was taken: the effective rank from the snapshot,
    the stable rank from the transition's state or the save time there (`t1` at the end);
    `None` if no snapshot was taken there."""
    if label not in traj.snapshot_labels:
        return None
    k = traj.snapshot_labels.index(label)
    t = float(traj.snapshot_ts[k])
    return {"effective_rank": np.asarray(traj.snapshots["effective_rank"])[k],
            "stable_rank": _observed_where(traj, "stable_rank", label, t)}, t


def _observed_where(traj, name: str, label: str, t: float):
    """Save-time observable `name` where snapshot `label` was taken (at time `t`): at a
    transition's located state, else at the save time nearest `t` (`t1` at the end)."""
    if label in traj.at_transitions:
        return traj.at_transitions[label][name]
    return np.asarray(traj.observables[name])[save_index(traj.ts, t)]


_STABLE_ONLY = (("stable", "stable_rank"),)


def rank_collapse_predictions(traj, chance: float) -> dict[str, Prediction]:
    """The preset's comparison rows: the paper's claim that attention ends lower in rank than
    the outer groups, read at the key-query collapse (the located state), at the attention's
    lowest stable rank and at the end; held-out against training accuracy."""
    out = {}
    claim = "W_Q, W_K below every outer group in effective and in stable rank"
    t_k = traj.transitions.get("kq_collapse", math.nan)
    taken = ranks_at_snapshot(traj, "kq_collapse") if math.isfinite(t_k) else None
    if taken is not None:
        holds, text = _ranks_row(*taken)
        out["attention_collapses_below_outer"] = Prediction.qualitative(
            claim, text, holds=holds,
            basis="Chen & Luo Fig. 1c, read at the located key-query collapse")
    else:
        out["attention_collapses_below_outer"] = Prediction.qualitative(
            claim, None, holds=None, basis="Chen & Luo Fig. 1c: kq_collapse not reached")
    # The effective rank is a snapshot observable: at the lowest point, which no snapshot
    # is placed at in advance, the claim is read in stable rank.
    attention = np.max(np.asarray(traj.observables["stable_rank"])[:, list(ATTENTION)], axis=1)
    holds, text = _ranks_row(*_saved(traj, int(np.argmin(attention))), _STABLE_ONLY)
    out["attention_collapses_below_outer_at_lowest"] = Prediction.qualitative(
        "W_Q, W_K below every outer group in stable rank", text, holds=holds,
        basis="read at the save time where max(stable rank W_Q, W_K) is lowest")
    taken = ranks_at_snapshot(traj, "end")
    if taken is not None:
        holds, text = _ranks_row(*taken)
        out["attention_collapses_below_outer_at_end"] = Prediction.qualitative(
            claim, text, holds=holds, basis="Chen & Luo Fig. 1c, read at the end")
    else:
        holds, text = _ranks_row(*_saved(traj, len(traj.ts) - 1), _STABLE_ONLY)
        out["attention_collapses_below_outer_at_end"] = Prediction.qualitative(
            "W_Q, W_K below every outer group in stable rank", text, holds=holds,
            basis="read at the last save time (the run did not reach its end)")
    held, train, t = _last_accuracies(traj)
    out["held_out_accuracy"] = Prediction.qualitative(
        f"near chance ({chance:.3g}): one layer without residual cannot locate the token after "
        "the anchor (docs/science.md §1b)", f"held-out {held:.3g}, train {train:.3g} (t={t:.6g})",
        holds=None,
        basis="arg-max accuracy at the end on a second draw of the task, beside training")
    return out


def _last_accuracies(traj) -> tuple[float, float, float]:
    """The held-out and training accuracy at the last time the held-out one was taken (the
    last save time, or the last snapshot where it is a snapshot observable), and that time."""
    if "held_out_accuracy" in traj.observables:
        return (float(np.asarray(traj.observables["held_out_accuracy"])[-1]),
                float(np.asarray(traj.observables["train_accuracy"])[-1]), float(traj.ts[-1]))
    label, t = traj.snapshot_labels[-1], float(traj.snapshot_ts[-1])
    return (float(np.asarray(traj.snapshots["held_out_accuracy"])[-1]),
            float(np.asarray(_observed_where(traj, "train_accuracy", label, t))), t)
