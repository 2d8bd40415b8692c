"""`Problem`: what a preset builds: a flow, what to observe, which transitions to locate."""

import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax.tree_util as jtu

from .._errors import InputError

from .._flow import GradientFlow
from .._solve import Transition


class Problem(eqx.Module):
    """A flow with its observers, transitions and theory, built by a preset's problem builder.

    **Fields:**

    - `flow`: the `GradientFlow`.
    - `observers`: `{name: observer}` for `gflow.solve`.
    - `transitions`: the `Transition`s, in the order they are expected.
    - `criteria`: `{transition name: one-line criterion}` printed in the report and written to
        `summary.json`.
    - `predict`: optional `predict(trajectory) -> {name: {...}}` comparing the run with theory:
        each entry holds `predicted`, `measured` and `rel_error`, or `bound` and `holds`.
    """

    flow: GradientFlow
    observers: dict[str, Callable]
    transitions: tuple[Transition, ...] = ()
    criteria: dict[str, str] = eqx.field(default_factory=dict)
    predict: Callable[[Any], dict] | None = None


def comparison(predicted: float, measured: float) -> dict[str, float | None]:
    """`{predicted, measured, rel_error}` for the predictions table (`None` where unmeasured)."""
    import math

    if measured is None or not math.isfinite(measured):
        return dict(predicted=float(predicted), measured=None, rel_error=None)
    rel = abs(measured - predicted) / abs(predicted) if predicted else abs(measured - predicted)
    return dict(predicted=float(predicted), measured=float(measured), rel_error=float(rel))


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
