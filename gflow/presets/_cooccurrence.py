"""Problem builder for the word co-occurrence transformer (Yang et al.; papers.md §2)."""

import math

import jax

from .._errors import InputError
from .._flow import GradientFlow
from .._solve import Transition
from ..models import CooccurrenceTransformer, cooccurrence_loss
from ..tasks import cooccurrence as cooccurrence_data, cooccurrence_observers, phase1_condition
from ..theory import fit_inverse_loss
from .._prediction import Prediction
from ._problem import Problem, scaled_init

# Phase 2's law holds "close to linearly": R² of the 1/L̂ line above this counts as holding.
_LINEAR_R2 = 0.99


def cooccurrence(
    *,
    n: int,
    L: int,
    d: int,
    m: int,
    m1: int,
    sigma0: float,
    sigma1: float,
    seed: int,
    distinct_irrelevant: bool,
    eps: float = 1.0,
) -> Problem:
    """The paper's co-occurrence task and model; the readout signs `a` are frozen.

    **Arguments:**

    - `n`, `L`, `d`: samples (a multiple of 6), sequence length, vocabulary size.
    - `m`, `m1`: attention width and number of MLP neurons.
    - `sigma0`: init std of `W_Q, W_K, W_V`, in units of `1/√d` (1 = Kaiming fan-in).
    - `sigma1`: init std of `W`, in units of `1/√m`. A small value (the preset's 1e-3) starts
        every output near 0, where the paper's Phase-1 picture (type-2/3 losses rising first)
        holds; at 1 (Kaiming) the outputs start O(1) and that rise does not appear.
    - `seed`: seeds data and init.
    - `distinct_irrelevant`: irrelevant words of a sample all distinct.
    - `eps`: a factor on the whole trainable init (`sigma0` and `sigma1` alike), the scale a
        sweep varies.
    """
    if not (sigma0 >= 0 and sigma1 >= 0):
        raise InputError(f"problem.sigma0 and problem.sigma1 must be >= 0, got {sigma0}, {sigma1}")
    key_data, key_model = jax.random.split(jax.random.key(seed))
    data = cooccurrence_data(n, L, d, key_data, distinct_irrelevant=distinct_irrelevant)
    model = CooccurrenceTransformer.init(
        d, m, m1, key_model, sigma0=sigma0 / math.sqrt(d), sigma1=sigma1 / math.sqrt(m)
    )
    model = scaled_init(model, model.trainable_spec(), eps)
    flow = GradientFlow(model, cooccurrence_loss, data, trainable=model.trainable_spec())
    transitions = (Transition("phase1_end", phase1_condition(), direction=True),)
    criteria = {"phase1_end": "margin min_i y_i F(X_i) rises through 0 (all samples correct)"}

    def predict(traj):
        t1 = traj.transitions["phase1_end"]
        if not math.isfinite(t1) or t1 >= traj.ts[-1]:
            return {}
        fit = fit_inverse_loss(traj.ts, traj.observables["loss"], t1)
        return {
            "phase2_inverse_loss_r2": Prediction.bound(
                _LINEAR_R2, fit.r2, relation=">",
                basis="R² of the least-squares line 1/L̂(t) = c (t − T1) + b after Phase 1 "
                "(Yang et al.: 1/L̂ grows linearly in Phase 2)",
            ),
            "phase2_inverse_loss_slope": Prediction.qualitative(
                "c > 0", f"c = {fit.slope:.4g} ± {fit.slope_stderr:.2g}",
                holds=bool(fit.slope > 0),
                basis="fitted Phase-2 slope c of 1/L̂(t) (± its standard error)",
            ),
        }

    return Problem(flow, cooccurrence_observers(), transitions, criteria, predict)
