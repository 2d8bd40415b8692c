"""`StiffSwitching`: Tsit5 while the flow is not stiff, a matrix-free implicit method (the
variable-order BDF by default) while it is.

A gradient flow turns stiff late (near a minimum, or on a slow manifold beside a few sharp
directions): `λ_max` of the Hessian grows while the solution barely moves, and an explicit
method's step is then set by its stability interval (Tsit5: `h λ_max ≤ 3.507` on the negative
real axis), not by accuracy. This solver detects that and hands the flow to
`NewtonKrylovBDF` (or `NewtonKrylovESDIRK`), and back when the flow stops being stiff (a saddle
escape, a new stage). The BDF starts at order 1 from Tsit5's last step (its last stage is the
vector field there: no evaluation), and its cost is not judged while it builds up its order.

Detection, as Hairer & Wanner's DOPRI5 does it, costs no evaluation: Tsit5's sixth stage and
its last (first-same-as-last) stage both sit at the step's end, so
`h ρ = ‖k₇ − k₆‖ / ‖y₁ − z₆‖` (the stage increments `k = h f`) is `h` times a Rayleigh-type
quotient of the Jacobian along `y₁ − z₆`, the direction the step's error grows in. Steps with
`h ρ` above `stiff_fraction` of the stability limit count as stiff; `stiff_steps` of them
without `reset_steps` non-stiff ones in a row switch to the implicit method. In implicit mode
one warm-started power iteration a step (one Hessian-vector product at the linearisation the
step makes anyway) tracks `λ_max`; `nonstiff_steps` steps in a row with `h λ_max` below
`nonstiff_fraction` of the limit switch back (Tsit5 would take that step stably, for fewer
evaluations), and so do steps that cost more per unit time (gradients + 2 × Hessian-vector
products over `h`) than Tsit5 held at its stability limit would (6 evaluations per
`stiff_fraction · 3.507 / λ_max`): the switch must pay. Switching in again after that needs
`backoff_factor` times as many stiff steps each time.

Both branches produce the same dense output (`PolynomialInterpolation`: Tsit5's quartic
continuous extension in monomial form, or the implicit step's own: the BDF's interpolant, the
ESDIRK's cubic Hermite), so save times,
events and transitions see one representation. The mode, the detector and the work counters
live in the solver state; each switch's time is recorded there (`SWITCH_SLOTS` of them), and
`gflow.solve` reports them in `stats["switch_times"]`.

Under `vmap` (sweeps) one branch runs for the whole batch: the implicit one if any member is
stiff (`eqx.internal.unvmap_any` on the mode), which is valid for every member (an implicit
step of a non-stiff member is merely dearer), rather than `lax.cond` computing both.
"""

import functools
from typing import ClassVar

import diffrax
import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.flatten_util
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optimistix as optx

from ._bdf import NewtonKrylovBDF
from ._implicit import (
    DEGREE, GRADIENTS, HVPS, AbstractNewtonKrylov, PolynomialInterpolation, WORK_FIELDS,
    int_dtype,
)

# Tsit5's stability interval on the negative real axis (|R(z)| <= 1 for -3.507 <= z <= 0),
# computed from its tableau in tests/test_stiff.py.
TSIT5_STABILITY_LIMIT = 3.507

SWITCH_FIELDS = WORK_FIELDS + ("explicit_steps", "switches")
EXPLICIT_STEPS, SWITCHES = len(WORK_FIELDS), len(WORK_FIELDS) + 1
# Switch times kept per segment (later ones are counted, not timed).
SWITCH_SLOTS = 16


@functools.cache
def _tsit5_monomials() -> np.ndarray:
    """`B` with Tsit5's dense output `y0 + Σ_i b_i(s) k_i = y0 + Σ_m (B k)_m s^(4-m)`: the
    coefficients of diffrax's own interpolant, fitted exactly (each `b_i` is a quartic)."""
    interpolation = diffrax.Tsit5.interpolation_cls
    s = np.linspace(0.0, 1.0, 9)
    with jax.ensure_compile_time_eval():
        basis = interpolation(t0=0.0, t1=1.0, y0=jnp.zeros(7), y1=jnp.zeros(7),
                              k=jnp.eye(7, dtype=jnp.float64))
        values = np.stack([np.asarray(basis.evaluate(float(x))) for x in s])  # (9, 7)
    out = np.stack([np.polyfit(s, values[:, i], DEGREE) for i in range(7)], axis=1)  # (5, 7)
    # Every b_i(0) is 0: exactly so, so that the dense output at a step's start is its state
    # bit for bit (a save time at t0 observes the initial state itself).
    out[DEGREE] = 0.0
    return out


class StiffSwitching(diffrax.AbstractImplicitSolver, diffrax.AbstractAdaptiveSolver):
    """Tsit5, switching to a matrix-free implicit method where its steps are held by
    stability, and back (what `solver="auto"` runs at `rtol >= 1e-8`).

    **Arguments:**

    - `implicit`: the implicit solver (default `NewtonKrylovBDF()`; `NewtonKrylovESDIRK()`
        is the alternative).
    - `explicit`: the explicit solver, a `diffrax.Tsit5` (the detector reads its stages).
    - `stiff_fraction`, `stiff_steps`, `reset_steps`: a step counts as stiff when `h ρ` is
        above `stiff_fraction` of Tsit5's stability limit; `stiff_steps` such accepted steps,
        with no run of `reset_steps` non-stiff ones between them, switch to implicit.
    - `nonstiff_fraction`, `nonstiff_steps`: `nonstiff_steps` accepted implicit steps in a row
        with `h λ_max` below `nonstiff_fraction` of the limit, or costing more per unit time
        than Tsit5 held at `stiff_fraction` of its limit would, switch back to Tsit5.
    - `backoff_factor`: after a switch back for cost, the next switch to implicit needs this
        many times as many stiff steps as the last.

    The tolerances of the implicit stages are the step-size controller's (filled in by
    `diffrax.diffeqsolve` through `root_finder`).
    """

    implicit: AbstractNewtonKrylov = NewtonKrylovBDF()
    explicit: diffrax.Tsit5 = diffrax.Tsit5()
    stiff_fraction: float = eqx.field(static=True, default=0.8)
    stiff_steps: int = eqx.field(static=True, default=15)
    reset_steps: int = eqx.field(static=True, default=6)
    nonstiff_fraction: float = eqx.field(static=True, default=0.5)
    nonstiff_steps: int = eqx.field(static=True, default=5)
    backoff_factor: int = eqx.field(static=True, default=4)
    root_finder: optx.AbstractRootFinder = diffrax.with_stepsize_controller_tols(
        diffrax.VeryChord)()
    root_find_max_steps: int = eqx.field(static=True, default=6)

    term_structure: ClassVar = diffrax.AbstractTerm
    interpolation_cls: ClassVar = PolynomialInterpolation

    def __check_init__(self):
        if type(self.explicit) is not diffrax.Tsit5:
            raise ValueError(f"explicit must be a diffrax.Tsit5, got {self.explicit!r}")

    def order(self, terms):
        """5: Tsit5's order, the BDF's highest and Kværnø 5's."""
        return 5

    def _implicit(self) -> AbstractNewtonKrylov:
        # The implicit solver's tolerances are ours (diffeqsolve fills in only the top level).
        return eqx.tree_at(lambda s: s.root_finder, self.implicit, self.root_finder)

    def func(self, terms, t0, y0, args):
        """The vector field at `(t0, y0)`."""
        return terms.vf(t0, y0, args)

    def init(self, terms, t0, t1, y0, args):
        """The solver state: explicit mode, Tsit5's state, detector and work counters."""
        flat, _ = jax.flatten_util.ravel_pytree(y0)
        dtype = flat.dtype
        return dict(
            implicit=jnp.asarray(False),
            tsit5=self.explicit.init(terms, t0, t1, y0, args),
            stiff_count=jnp.asarray(0, int_dtype()),
            calm_count=jnp.asarray(0, int_dtype()),
            backoffs=jnp.asarray(0, int_dtype()),
            probe=jnp.zeros_like(flat),
            implicit_state=self._implicit().blank_state(y0),
            work=jnp.zeros(len(SWITCH_FIELDS), int_dtype()),
            # The first SWITCH_SLOTS switch times (slots past the switch count are unused).
            switch_times=jnp.zeros(SWITCH_SLOTS, dtype),
        )

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        """One step in the current mode (diffrax's solver interface)."""
        implicit_now = eqxi.unvmap_any(solver_state["implicit"])
        return jax.lax.cond(
            implicit_now,
            lambda: self._implicit_step(terms, t0, t1, y0, args, solver_state),
            lambda: self._explicit_step(terms, t0, t1, y0, args, solver_state, made_jump),
        )

    def _explicit_step(self, terms, t0, t1, y0, args, state, made_jump):
        first_step = state["tsit5"][0]
        y1, y_error, dense, tsit5_state, result = self.explicit.step(
            terms, t0, t1, y0, args, state["tsit5"], made_jump)
        k = dense["k"]
        # The stiffness quotient h ρ from the two stages at the step's end (see the module).
        tab = self.explicit.tableau
        flat = lambda tree: jax.flatten_util.ravel_pytree(tree)[0]
        ks = jax.vmap(flat)(k)  # (7, n)
        y0f, y1f = flat(y0), flat(y1)
        # Matrix products at full precision: the state may be float32, whose default
        # matmul precision on recent GPUs is TF32.
        z6 = y0f + jnp.tensordot(jnp.asarray(tab.a_lower[4], ks.dtype), ks[:5], axes=1,
                                 precision=jax.lax.Precision.HIGHEST)
        direction = y1f - z6
        dist = jnp.linalg.norm(direction)
        h_rho = jnp.linalg.norm(ks[6] - ks[5]) / jnp.where(dist > 0, dist, 1.0)
        h_rho = jnp.where(dist > 0, h_rho, 0.0)
        stiff = h_rho >= self.stiff_fraction * TSIT5_STABILITY_LIMIT
        calm = jnp.where(stiff, 0, state["calm_count"] + 1)
        count = jnp.where(stiff, state["stiff_count"] + 1,
                          jnp.where(calm >= self.reset_steps, 0, state["stiff_count"]))
        # After the implicit method was left for costing more, switching again needs
        # `backoff_factor` times as many stiff steps (no switching back and forth).
        needed = self.stiff_steps * self.backoff_factor ** jnp.minimum(state["backoffs"], 8)
        switch = count >= needed
        work = state["work"].at[GRADIENTS].add(6 + first_step.astype(int_dtype()))
        work = work.at[EXPLICIT_STEPS].add(1)
        coeffs = jtu.tree_map(
            lambda y0_, k_: jnp.tensordot(jnp.asarray(_tsit5_monomials(), k_.dtype), k_, axes=1,
                                          precision=jax.lax.Precision.HIGHEST)
            .at[DEGREE].add(y0_),
            y0, k,
        )
        new = dict(
            state,
            implicit=switch,
            tsit5=tsit5_state,
            stiff_count=jnp.where(switch, 0, count),
            calm_count=jnp.where(switch, 0, calm),
            # Power iteration starts along the direction the detector measured.
            probe=jnp.where(switch, direction / jnp.where(dist > 0, dist, 1.0), state["probe"]),
            # The implicit method starts from this step's end (Tsit5's last stage is f there),
            # restarted after every explicit step: under vmap a member still in explicit mode
            # takes the batch's implicit steps too, from its own state.
            implicit_state=self._implicit().restart(state["implicit_state"], y1, tsit5_state[1]),
            work=_record_switch(work, switch),
            switch_times=_record_time(state["switch_times"], state["work"][SWITCHES], switch, t1),
        )
        return y1, y_error, dict(coeffs=coeffs), new, result

    def _implicit_step(self, terms, t0, t1, y0, args, state):
        probe = state["probe"]
        # A member still in explicit mode (under vmap) has no probe yet: start it anywhere.
        probe = jnp.where(jnp.linalg.norm(probe) > 0, probe,
                          jnp.ones_like(probe) / np.sqrt(max(probe.size, 1)))
        y1, y_error, dense, implicit_state, result, j_probe = self._implicit().step_with_jvp(
            terms, t0, t1, y0, args, state["implicit_state"], probe)
        work = implicit_state["work"] - state["implicit_state"]["work"]
        lam = jnp.linalg.norm(j_probe)
        h = t1 - t0
        h_lam = h * lam
        # Not stiff any more: Tsit5 would take this step stably.
        calm_step = h_lam < self.nonstiff_fraction * TSIT5_STABILITY_LIMIT
        # Or stiff but not paying: this step cost more per unit time than Tsit5 held at its
        # stability limit would (6 evaluations per `stiff_fraction · limit / λ_max`).
        cost = work[GRADIENTS] + 2 * work[HVPS]
        explicit_rate = 6 * lam / (self.stiff_fraction * TSIT5_STABILITY_LIMIT)
        dear_step = cost > explicit_rate * h
        # Not judged while the implicit method builds up after the switch (a BDF's order).
        judged = ~self._implicit().warming_up(state["implicit_state"])
        calm = jnp.where(judged & (calm_step | dear_step), state["calm_count"] + 1, 0)
        was = state["implicit"]
        back = was & (calm >= self.nonstiff_steps)
        stays = was & ~back
        total = state["work"].at[: len(WORK_FIELDS)].add(work)
        # Tsit5 starts again (its first stage evaluated afresh, counted then) after a step
        # that was not its own.
        first, f0 = state["tsit5"]
        tsit5_state = (jnp.asarray(True) | first, f0)
        new = dict(
            state,
            implicit=stays,
            tsit5=tsit5_state,
            stiff_count=jnp.asarray(0, int_dtype()),
            calm_count=jnp.where(stays, calm, 0),
            probe=j_probe / jnp.where(lam > 0, lam, 1.0),
            implicit_state=implicit_state,
            backoffs=state["backoffs"] + (back & dear_step & ~calm_step).astype(int_dtype()),
            work=_record_switch(total, back),
            switch_times=_record_time(state["switch_times"], state["work"][SWITCHES], back, t1),
        )
        return y1, y_error, dense, new, result


def _record_switch(work, switch):
    return work.at[SWITCHES].add(switch.astype(work.dtype))


def _record_time(times, index, switch, t):
    slot = jnp.minimum(index, SWITCH_SLOTS - 1)
    keep = switch & (index < SWITCH_SLOTS)
    return times.at[slot].set(jnp.where(keep, t, times[slot]).astype(times.dtype))

