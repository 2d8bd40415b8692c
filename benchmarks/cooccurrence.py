"""Workload (b): the `cooccurrence` preset's problem (Yang et al.), 57,344 trained parameters.

A one-layer softmax-attention Transformer with a linear MLP (d = 64, m = 128, m1 = 256) on
60 co-occurrence samples of length 5, logistic loss, t1 = 300. The transition is the end of
Phase 1 (every sample classified correctly).
"""

import functools

import numpy as np


from . import _torch
from ._workload import Problem, Settings, preset_problem

T1 = 300.0
GRID_UNIT = 0.04  # every save time is a multiple of every GD step used here


def full_settings() -> Settings:
    return Settings(
        gflow_runs=(
            ("tsit5", 1e-4, False, False),
            ("tsit5", 1e-6, False, False),
            ("tsit5", 1e-8, False, False),
            ("dopri8", 1e-8, False, False),
            ("tsit5", 1e-8, True, False),
            ("dopri5", 1e-4, False, False),
            ("dopri5", 1e-6, False, False),
            ("dopri5", 1e-8, False, False),
            ("auto", 1e-10, False, False),
        ),
        bare_runs=(("tsit5", 1e-4), ("tsit5", 1e-6), ("tsit5", 1e-8)),
        # One gradient costs about a millisecond here: 7,500 to 60,000 GD steps.
        gd_etas=(4e-2, 2e-2, 1e-2, 5e-3),
        optax_etas=(),
        scipy_runs=(("DOP853", "jax", 1e-4), ("DOP853", "jax", 1e-5), ("DOP853", "jax", 1e-6),
                    ("DOP853", "jax", 1e-8)),
        repeats=2,
        budget_s=10.0,
        reference_rtol=1e-12,
        cross_check_rtols=(1e-12,),
        # One transition, early (t ≈ 0.06): the reference is taken from the run that locates it.
        separate_reference_state=False,
        torchdiffeq_rtols=(1e-4, 1e-6, 1e-8),
    )


def _save_times() -> np.ndarray:
    """Every 0.04 up to t = 1 (Phase 1 ends near t = 0.06), then about log-spaced to t1,
    rounded to multiples of 0.04."""
    early = GRID_UNIT * np.arange(0, 26)
    late = np.rint(np.geomspace(1.0, T1, 120) / GRID_UNIT) * GRID_UNIT
    return np.unique(np.round(np.concatenate([early, late]), 12))


def build() -> Problem:
    return preset_problem(
        "cooccurrence", T1, _save_times(),
        extra=lambda flow: {"torch_velocity": functools.partial(
            _torch.cooccurrence, flow.data.X, flow.data.y, flow.model.a,
            flow.model.W_Q.shape[0], flow.model.W.shape[0],
        )},
    )


DESCRIPTION = (
    "The `cooccurrence` preset's problem (Yang et al., NeurIPS 2024): one softmax-attention "
    "layer and a linear MLP with fixed ±1 readout (d = 64, m = 128, m1 = 256; W_Q, W_K, W_V, W "
    "trained: 57,344 parameters), 60 samples of length 5, logistic loss, t1 = 300. Transition: "
    "the end of Phase 1 (the smallest margin rises through 0). Save grid: every 0.04 up to "
    "t = 1, then about log-spaced to 300, all multiples of 0.04."
)

NOTES = (
    "The benchmark's `state` observer saves all 57,344 parameters at each save time (145 × "
    "57,344 float64, 66 MB), far more than a study's observers. Most of gflow's host-side time "
    "per call on this workload is the transfer of that array into host memory, which the timed "
    "bare diffrax call leaves on the device.",
)
