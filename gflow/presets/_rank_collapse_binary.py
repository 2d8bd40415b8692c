"""Problem builder `rank-collapse-binary`: the setting of Chen & Luo's theorems (docs/science.md §1).

A binary task with exponential loss and a scalar readout `W2 ∈ R^d`: the setting in which the
stage-1 blow-up bound, the stage-2 closed form and Assumption 1 are stated. The paper's own
figures come from a multi-class experiment: preset `rank-collapse` (`_rank_collapse.py`).
"""

import math
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .. import measures
from .. import observers as obs
from .._errors import InputError
from .._flow import GradientFlow
from .._solve import Transition
from ..models import AttentionFFN, OuterParameters, exponential_loss, logistic_loss, stage2_matrix
from ..models import target_direction
from ..tasks import rank_collapse_task
from ..theory import key_query_limit_directions, predicted_escape_time
from .._prediction import Prediction
from .._scaling import ScalingLaw
from ._problem import Problem, comparison

# Parameter groups, in the order every per-group observable lists them.
GROUPS = ("W_Q", "W_K", "W_V", "W1")
_LOSSES = {"exponential": exponential_loss, "logistic": logistic_loss}



def _matrices(m):
    return (m.W_Q, m.W_K, m.W_V, m.W1)


def _outer(m):
    return (m.W_V, m.W1, m.W2)


def _value_ffn(m):
    return (m.W_V, m.W1)


def _w_q(m):
    return m.W_Q


def _w_k(m):
    return m.W_K


def _w_v(m):
    return m.W_V


def _w1(m):
    return m.W1


def _identity(W):
    return W


_SELECTORS = dict(zip(GROUPS, (_w_q, _w_k, _w_v, _w1)))


# Observers and conditions as modules with array fields (no closures): equal problems built
# twice compare equal, so sweep members share one compiled program.
class ValueMisalignment(eqx.Module):
    """`1 − mean |cos(W_V columns, v)|` over the columns of non-negligible norm."""

    v: Float[Array, " d"]

    def __call__(self, m, data=None):
        _, mean = measures.alignment(m.W_V, self.v, axis="columns", min_norm_fraction=0.1)
        return 1.0 - mean


class Shifted(eqx.Module):
    """`fn(model, data) − level`."""

    fn: eqx.Module
    level: Float[Array, ""]

    def __call__(self, m, data=None):
        return self.fn(m, data) - self.level


class QueryChangeAbove(eqx.Module):
    """`‖W_Q − W_Q(0)‖_F / ‖W_Q(0)‖_F − level`."""

    W_Q0: Float[Array, "d d"]
    level: Float[Array, ""]

    def __call__(self, m, data=None):
        return measures.relative_change(m.W_Q, self.W_Q0) - self.level


class KeyQueryStableRankBelow(eqx.Module):
    """`max(stable rank W_Q, stable rank W_K) − level`."""

    level: Float[Array, ""]

    def __call__(self, m, data=None):
        return jnp.maximum(measures.stable_rank(m.W_Q), measures.stable_rank(m.W_K)) - self.level


class LossBelow(eqx.Module):
    """`loss(model, data) − level`."""

    loss: Callable = eqx.field(static=True)
    level: Float[Array, ""]

    def __call__(self, m, data):
        return self.loss(m, data) - self.level


class OuterEnergy(eqx.Module):
    """The stage-1 energy `E = v W_V W1 W2`."""

    v: Float[Array, " d"]

    def __call__(self, m, data=None):
        return jnp.asarray(OuterParameters.from_model(m).energy(self.v), dtype=float)


class Stage2Matrix(eqx.Module):
    """The stage-2 matrix `F` at the current outer parameters."""

    loss: str = eqx.field(static=True)

    def __call__(self, m, data):
        return stage2_matrix(m, data.X, data.y, loss=self.loss)


class CosineMatrices(eqx.Module):
    """`{group: ordered row cosine-similarity matrix}`."""

    matrices: dict[str, obs.CosineMatrix]

    def __call__(self, m, data=None):
        return {name: c(m) for name, c in self.matrices.items()}


def rank_collapse_binary(
    *,
    d: int,
    s: int,
    n: int,
    eps: float,
    seed: int,
    loss: str,
    activation: str,
    attention: str,
    condensation_threshold: float,
    onset_growth: float,
    collapse_delta: float,
) -> Problem:
    """The two-stage dynamics of a small-init attention + FFN model on the last-token-sign task.

    Stage 1 (condensation): the outer parameters escape the small-init plateau along the data's
    target direction `v` (the columns of `W_V` align with `v`) while `W_Q, W_K` stay put.
    Stage 2: `W_Q, W_K` grow along the top singular pair of `F` and collapse to rank one. In a
    binary task the outer group collapses too. The loss halves only in the burst that ends
    stage 2, after the collapse: transition `escape` (the loss falls through `L(0)/2`) is
    located last, and its time is compared with the stage-1 blow-up bound (`escape_time`).

    **Arguments:**

    - `d`, `s`, `n`: width, tokens per sample, samples.
    - `eps`: init std of every entry; the escape time scales like `1/eps`.
    - `seed`: seeds data and init.
    - `loss`: `"exponential"` or `"logistic"`.
    - `activation`: `"tanh"` or `"identity"`; `attention`: `"exact"` or `"linearized"`.
    - `condensation_threshold`: condensation ends when `1 − mean|cos|` of the columns of `W_V`
        with `v` falls below it.
    - `onset_growth`: stage 2 starts when `‖W_Q − W_Q(0)‖` reaches this multiple of `‖W_Q(0)‖`
        (measured here: by then the outer parameters have condensed and are quasi-static, and
        `F` there predicts `W_Q`'s late direction to a cosine of ~0.97, where `F` on the
        plateau gives only ~0.6).
    - `collapse_delta`: key–query collapse is when the larger stable rank of `W_Q`, `W_K`
        falls below `1 + collapse_delta`.
    """
    if loss not in _LOSSES:
        raise InputError(f"problem.loss must be one of {', '.join(_LOSSES)}, got {loss!r}")
    if not eps > 0:
        raise InputError(f"problem.eps must be positive, got {eps}")
    if not 0 < condensation_threshold < 1 or not collapse_delta > 0 or not onset_growth > 0:
        raise InputError(
            "problem.condensation_threshold must be in (0, 1), onset_growth and "
            "collapse_delta > 0"
        )
    key_data, key_model = jax.random.split(jax.random.key(seed))
    data = rank_collapse_task(n, s, d, key_data)
    model = AttentionFFN.init(d, eps, key_model, activation=activation, attention=attention)
    v, _ = target_direction(data.X, data.y)
    loss_fn = _LOSSES[loss]
    misalignment = ValueMisalignment(v)
    observers = {
        "stable_rank": obs.stable_rank(_matrices),
        "relative_change": obs.relative_change(_matrices, model),
        "norm": obs.frobenius_norm(_matrices),
        "value_misalignment": misalignment,
        "energy": OuterEnergy(v),
        "W_Q": obs.MatrixMeasure(_w_q, _identity),
        "W_K": obs.MatrixMeasure(_w_k, _identity),
        "F": Stage2Matrix(loss),
        "assumption1_rates": obs.assumption1_rates(_outer, v),
        "singular_vectors": obs.singular_vectors(_value_ffn, 4),
    }
    # Only where they are read (t0, the transitions, the chosen times, the end): full spectra,
    # and the cosine similarity of the rows of each group, ordered by the leading eigenvector
    # (the paper's Figure 1 panels).
    snapshots = {
        "effective_rank": obs.effective_rank(_matrices),
        "cosine": CosineMatrices({name: obs.cosine_matrix(_SELECTORS[name], axis="rows")
                                  for name in GROUPS}),
    }
    transitions = (
        Transition("condensation", Shifted(misalignment, jnp.asarray(condensation_threshold)),
                   direction=False),
        Transition("stage2_onset", QueryChangeAbove(model.W_Q, jnp.asarray(onset_growth)),
                   direction=True),
        Transition("kq_collapse", KeyQueryStableRankBelow(jnp.asarray(1.0 + collapse_delta)),
                   direction=False),
        # Last: the loss halves in the burst that ends stage 2, after the key-query collapse
        # (here ~10 time units later); transitions are detected in order.
        Transition("escape", LossBelow(loss_fn, 0.5 * loss_fn(model, data)), direction=False),
    )
    criteria = {
        "condensation": f"1 − mean |cos(W_V columns, v)| falls below {condensation_threshold:g}",
        "stage2_onset": f"‖W_Q − W_Q(0)‖ reaches {onset_growth:g} ‖W_Q(0)‖ (outer parameters "
        "condensed and quasi-static; the linear key-query flow takes over)",
        "kq_collapse": f"max(stable rank W_Q, stable rank W_K) falls below {1 + collapse_delta:g}",
        "escape": "the loss falls through L(0)/2 (the model has left the small-init plateau)",
    }
    escape_bound = float(predicted_escape_time(model, data.X, data.y))

    def predict(traj):
        out = {}
        # Named apart from its transition (the row predates it): its certified error is
        # attached here rather than by name.
        out["escape_time"] = Prediction.bound(
            escape_bound, traj.transitions["escape"], relation="<=",
            error=traj.errors.get("transitions", {}).get("escape"),
            basis="located time at which the loss falls through L(0)/2 ≤ the stage-1 blow-up "
            "time bound E(0)^(−1/3) (leading order in ε)",
        )
        t_c = traj.transitions["condensation"]
        if math.isfinite(t_c):
            i_c = int(np.argmin(np.abs(traj.ts - t_c)))
            r1, r2 = (float(x) for x in np.asarray(traj.observables["assumption1_rates"][i_c]))
            out["assumption1_rates_at_condensation"] = Prediction.qualitative(
                "|A1|/d = |A2|/d² = 1", f"|A1|/d = {r1:.3g}, |A2|/d² = {r2:.3g}",
                holds=r1 == 1.0 and r2 == 1.0,
                basis="Chen & Luo Fig. 2a: both Assumption-1 rates reach 1 early in stage 1; "
                f"read at the save time nearest the condensation (t={traj.ts[i_c]:.6g})")
        t_k = traj.transitions["kq_collapse"]
        t_o = traj.transitions["stage2_onset"]
        if math.isfinite(t_o) and math.isfinite(t_k):
            # F and (W_Q, W_K) at the first save after the onset of stage 2 predict the
            # direction W_Q takes; compare with W_Q at the last save before the collapse.
            i0 = int(np.searchsorted(traj.ts, t_o))
            i1 = max(int(np.searchsorted(traj.ts, t_k, side="right")) - 1, i0)
            F, WQ0, WK0 = (np.asarray(traj.observables[k][i0]) for k in ("F", "W_Q", "W_K"))
            predicted, _ = key_query_limit_directions(F, WQ0, WK0)
            measured = np.asarray(traj.observables["W_Q"][i1])
            cosine = abs(np.sum(predicted * measured)) / (
                np.linalg.norm(predicted) * np.linalg.norm(measured)
            )
            out["W_Q_direction_cosine"] = comparison(
                1.0, float(cosine), "|cos| of W_Q with u1 rᵀ from F's SVD at the stage-2 onset "
                "(linearised key-query flow)")
        return out

    flow = GradientFlow(model, loss_fn, data)
    # Three factors (W_V, W1, W2) meet at the origin: stage 1 escapes in time ~ 1/eps.
    scaling = {name: ScalingLaw.of_factors(
        3, basis="stage 1 is the cubic energy flow of W_V W1 W2: real time scales as 1/eps")
        for name in ("condensation",)}
    # With every output ~0 at small init, each sample's loss is the loss at margin 0.
    plateau = {"exponential": 1.0, "logistic": math.log(2.0)}[loss]

    def references(traj):
        return {"loss": {"plateau (f = 0)": plateau}}

    return Problem(flow, observers, transitions, criteria, predict, references=references,
                   scaling=scaling, snapshots=snapshots)
