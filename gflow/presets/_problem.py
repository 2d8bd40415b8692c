"""`Problem`: what a preset builds: a flow, what to observe, which transitions to locate."""

import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax.tree_util as jtu

from .._errors import InputError

from .._flow import GradientFlow
from .._prediction import Prediction
from .._solve import Transition


class Problem(eqx.Module):
    """A flow with its observers, transitions and theory, built by a preset's problem builder.

    **Fields:**

    - `flow`: the `GradientFlow`.
    - `observers`: `{name: observer}` for `gflow.solve`, at every save time.
    - `snapshots`: `{name: observer}` for `gflow.solve(..., snapshots=...)`: the costly ones
        (full spectra, cosine matrices, singular vectors), taken only at `t0`, at the located
        transitions, at the `[solve] snapshot_points` chosen times and at the end.
    - `transitions`: the `Transition`s, in the order they are expected.
    - `criteria`: `{transition name: one-line criterion}` printed in the report and written to
        `summary.json`.
    - `predict`: optional `predict(trajectory) -> {name: gflow.Prediction}` comparing the run
        with theory.
    - `references`: optional `references(trajectory) -> {observable: {label: level}}`: what
        theory gives for an observable, drawn in its figure and written to `summary.json`. A
        level is a number (a horizontal line, e.g. `{"singular_values": {"s_1": 4.0}}`) or an
        array over `trajectory.ts` (a curve, e.g. a closed form at the save times: dashed,
        the i-th curve of an observable in the colour of its i-th component). Called like
        `predict`, on the trajectory timed from the init.
    - `scaling`: `{transition name: gflow.ScalingLaw}`: how theory says the transition's time
        scales with the init scale `eps`; a sweep over `eps` fits that law and draws its
        slope.
    """

    flow: GradientFlow
    observers: dict[str, Callable]
    transitions: tuple[Transition, ...] = ()
    criteria: dict[str, str] = eqx.field(default_factory=dict)
    predict: Callable[[Any], dict] | None = None
    references: Callable[[Any], dict] | None = None
    scaling: dict[str, Any] = eqx.field(default_factory=dict)
    snapshots: dict[str, Callable] = eqx.field(default_factory=dict)


def comparison(predicted: float, measured: float | None, basis: str = "") -> Prediction:
    """A value prediction (`Prediction.value`); `None` or non-finite `measured` is unmeasured."""
    return Prediction.value(predicted, measured, basis=basis)


def scaled_init(model: Any, trainable: Any, eps: float) -> Any:
    """`model` with its trainable leaves multiplied by `eps`: the init scale a sweep varies.

    **Arguments:**

    - `model`: the initialized model.
    - `trainable`: the flow's filter spec; frozen leaves (fixed readouts, frozen embeddings)
        are not scaled.
    - `eps`: the factor (> 0).
    """
    if not (math.isfinite(eps) and eps > 0):
        raise InputError(f"problem.eps must be positive, got {eps}")
    params, static = eqx.partition(model, trainable)
    return eqx.combine(jtu.tree_map(lambda x: eps * x, params), static)
