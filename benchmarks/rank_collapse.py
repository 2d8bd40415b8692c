"""Workload (c): the `rank-collapse` preset (the default preset; Chen & Luo), 264 parameters.

One softmax-attention layer and a tanh FFN (d = 8) from an N(0, 1e-4²) init on the
last-token-sign task (32 samples of 4 tokens), exponential loss, t1 = 20,000. A long plateau,
then condensation of the outer parameters (t ≈ 16,900) and, about 430 later, a burst in which
W_Q grows and W_Q, W_K collapse to rank one within less than one time unit.
"""

import dataclasses
import functools

import numpy as np


from . import _torch
from ._workload import Problem, Settings, preset_problem

T1 = 20_000.0
GRID_UNIT = 0.5  # every save time is a multiple of every GD step used here
# Where the stages happen for this preset (measured: condensation ≈ 16,880, stage-2 onset
# ≈ 17,309.5, key–query collapse ≈ 17,310.2): the save grid is denser there.
CONDENSATION_WINDOW = (16_000.0, 17_300.0, 20.0)
BURST_WINDOW = (17_300.0, 17_330.0, GRID_UNIT)


def full_settings() -> Settings:
    return Settings(
        gflow_runs=(
            tuple(("tsit5", r, False, False) for r in (1e-6, 1e-8, 1e-10))
            + tuple(("dopri8", r, False, False) for r in (1e-8, 1e-10))
            + tuple(("tsit5", r, True, False) for r in (1e-6, 1e-8, 1e-10))
            + (("dopri8", 1e-10, True, False),)
            + tuple(("auto", r, False, False) for r in (1e-8, 1e-10))
        ),
        bare_runs=(("tsit5", 1e-6), ("tsit5", 1e-8), ("tsit5", 1e-10)),
        # About 15 µs a step here: 40,000 to 2,000,000 GD steps.
        gd_etas=(0.5, 0.1, 0.05, 0.01),
        optax_etas=(),
        scipy_runs=tuple(("DOP853", "jax", r) for r in (1e-6, 1e-8, 1e-10)),
        repeats=7,
        budget_s=3.0,
        reference_rtol=1e-12,
        cross_check_rtols=(1e-12,),
        # Bracket the errors of the gflow rows (dopri5 reaches ~2e-3 at 1e-6, ~7e-10 at 1e-13,
        # where one call takes ~20 s on a quiet machine); 1e-6, 1e-8, 1e-10 are gflow tsit5's, for
        # the comparison at equal tolerance.
        torchdiffeq_rtols=(1e-5, 1e-6, 1e-8, 1e-10, 1e-12, 1e-13),
    )


def quick_settings() -> Settings:
    # The fewest compilations that still exercise every kind of row on this workload.
    return Settings(
        gflow_runs=(("tsit5", 1e-8, True, False),),
        bare_runs=(),
        gd_etas=(0.5,),
        optax_etas=(),
        scipy_runs=(("DOP853", "jax", 1e-8),),
        repeats=2,
        budget_s=0.5,
        reference_rtol=1e-12,
        cross_check_rtols=(),
        separate_reference_state=False,
    )


def _window(start: float, stop: float, step: float) -> np.ndarray:
    return start + step * np.arange(int(round((stop - start) / step)) + 1)


def _save_times() -> np.ndarray:
    """About 150 log-spaced times from 1 to t1, denser through condensation and the stage-2
    burst; all multiples of `GRID_UNIT`."""
    spread = np.rint(np.geomspace(1.0, T1, 150) / GRID_UNIT) * GRID_UNIT
    times = np.concatenate([[0.0], spread, _window(*CONDENSATION_WINDOW), _window(*BURST_WINDOW)])
    return np.unique(np.round(times, 9))


def build() -> Problem:
    problem = preset_problem(
        "rank-collapse-binary", T1, _save_times(),
        extra=lambda flow: {"torch_velocity": functools.partial(
            _torch.attention_ffn, np.asarray(flow.data.X), np.asarray(flow.data.y),
            flow.model.activation, flow.model.attention,
        )},
    )
    # The three stage transitions the committed results were measured with (the preset's
    # later `escape`, located after them, is left out so that those rows stay comparable).
    stages = ("condensation", "stage2_onset", "kq_collapse")
    return dataclasses.replace(
        problem, transitions=tuple(t for t in problem.transitions if t.name in stages))


DESCRIPTION = (
    "The `rank-collapse` preset's problem (Chen & Luo; gflow's default preset): one "
    "softmax-attention layer and a tanh FFN with last-token readout (d = 8; W_Q, W_K, W_V, W1, "
    "W2 trained: 264 parameters), 32 samples of 4 tokens, exponential loss, entries drawn "
    "N(0, 1e-4²), t1 = 20,000. Transitions: condensation (1 − mean |cos(W_V columns, v)| falls "
    "below 0.01), stage-2 onset (‖W_Q − W_Q(0)‖ reaches 5 ‖W_Q(0)‖) and key–query collapse "
    "(the larger stable rank of W_Q, W_K falls below 1.05). Save grid: about 150 log-spaced "
    "times, every 20 from 16,000 to 17,300 and every 0.5 from 17,300 to 17,330 (the burst), "
    "all multiples of 0.5."
)

NOTES = (
    "Every method's error is far above its rtol here and largest just after the stage-2 burst: "
    "on the plateau the flow sits near a saddle whose unstable directions amplify any "
    "perturbation of the state (local truncation error included) by the same large factor for "
    "every method; the burst then turns a small shift in time into a large state difference. "
    "This is the problem's conditioning, not a solver's: compare methods at matched error "
    "(the table above), and read errors near the reference's own cross-check difference as "
    "its floor.",
)
