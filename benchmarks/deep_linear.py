"""Workload (a): the `deep-linear` preset's problem.

A two-layer 16×16×16 linear network (512 parameters) from an N(0, 1e-3²) init learns a rank-4
target (singular values 4, 3, 2, 1) mode by mode; the four half-rise times are the transitions.
"""

import functools
from collections.abc import Callable

import numpy as np

import gflow
import gflow.presets

from . import _torch
from ._workload import Problem, Settings, flat_state_observer, initial_rms

SAVE_SPACING = 0.04  # a multiple of every GD step, so GD's iterates sit on the save times


def full_settings() -> Settings:
    return Settings(
        gflow_runs=tuple(
            [("tsit5", r, False, False) for r in (1e-4, 1e-6, 1e-8, 1e-10)]
            + [("dopri8", r, False, False) for r in (1e-8, 1e-10)]
            + [("tsit5", r, True, False) for r in (1e-4, 1e-6, 1e-8, 1e-10)]
            + [("dopri8", r, True, False) for r in (1e-8, 1e-10)]
            + [("dopri8", r, False, True) for r in (1e-6, 1e-8)]
            + [("dopri5", r, False, False) for r in (1e-4, 1e-6, 1e-8, 1e-10)]
            + [("auto", r, False, False) for r in (1e-4, 1e-6, 1e-8, 1e-10)]
        ),
        bare_runs=tuple(
            [("tsit5", r) for r in (1e-4, 1e-6, 1e-8, 1e-10)]
            + [("dopri8", r) for r in (1e-8, 1e-10)]
        ),
        gd_etas=(1e-2, 1e-3, 1e-4, 1e-5),
        optax_etas=(1e-2, 1e-3),
        scipy_runs=tuple(
            [("DOP853", "jax", r) for r in (1e-4, 1e-6, 1e-8, 1e-10)]
            + [("RK45", "jax", r) for r in (1e-4, 1e-6, 1e-8, 1e-10)]
            + [("DOP853", "numpy", r) for r in (1e-4, 1e-6, 1e-8, 1e-10)]
            + [("RK45", "numpy", r) for r in (1e-4, 1e-6, 1e-8)]
        ),
        repeats=15,
        budget_s=1.5,
        reference_rtol=1e-12,
        cross_check_rtols=(1e-12, 1e-14),
        count_evaluations=True,
        torchdiffeq_rtols=(1e-4, 1e-6, 1e-8, 1e-10),
    )


def quick_settings() -> Settings:
    return Settings(
        gflow_runs=(
            ("tsit5", 1e-6, False, False),
            ("tsit5", 1e-10, False, False),
            ("tsit5", 1e-8, True, False),
            ("dopri5", 1e-6, False, False),
        ),
        bare_runs=(("tsit5", 1e-8),),
        gd_etas=(1e-2, 1e-3, 1e-4),
        optax_etas=(1e-2,),
        scipy_runs=(("DOP853", "jax", 1e-8), ("RK45", "numpy", 1e-6)),
        repeats=3,
        budget_s=0.5,
        reference_rtol=1e-12,
        cross_check_rtols=(1e-12,),
        separate_reference_state=False,
        torchdiffeq_rtols=(1e-6,),
    )


def _numpy_velocity(target: np.ndarray, width: int) -> Callable:
    """`-∇L` of `½‖S − W2 W1‖²` in numpy, on the `ravel_pytree` layout `[W1.ravel(), W2.ravel()]`."""
    n = width * width

    def velocity(t, y):
        w1 = y[:n].reshape(width, width)
        w2 = y[n:].reshape(width, width)
        residual = target - w2 @ w1
        return np.concatenate([(w2.T @ residual).ravel(), (residual @ w1.T).ravel()])

    return velocity


def build(quick: bool) -> Problem:
    t1 = 4.0 if quick else 12.0
    resolved = gflow.presets.resolve("deep-linear", [f"solve.t1={t1}"])
    problem = gflow.presets.build(resolved)
    flow = problem.flow
    width = flow.params.weights[0].shape[0]
    if len(flow.params.weights) != 2 or flow.params.weights[1].shape != (width, width):
        raise ValueError("the numpy right-hand side is written for two square layers")
    n = int(round(t1 / SAVE_SPACING))
    return Problem(
        name="deep-linear",
        flow=flow,
        transitions=problem.transitions,
        ts=gflow.linear_grid(0.0, t1, n + 1),
        t1=t1,
        scale=initial_rms(flow.params),
        state=flat_state_observer(flow),
        numpy_rhs=_numpy_velocity(np.asarray(flow.data), width),
        torch_velocity=functools.partial(
            _torch.deep_linear, np.asarray(flow.data), [w.shape for w in flow.params.weights]
        ),
    )


DESCRIPTION = (
    "The `deep-linear` preset's problem: `½‖S − W2 W1‖²` for a two-layer 16×16×16 linear "
    "network (512 parameters), S of rank 4 with singular values 4, 3, 2, 1, entries of W1, W2 "
    "drawn N(0, 1e-3²). Transitions: singular value k of W2 W1 rising through s_k/2. Save grid: "
    "equally spaced times 0.04 apart."
)
