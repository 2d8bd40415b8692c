"""Solver names, the `"auto"` choice of solver per tolerance, and what each solver costs per step."""

import functools

import diffrax

from ._bdf import NewtonKrylovBDF
from ._dop853 import DOP853
from ._errors import InputError
from ._implicit import NewtonKrylovESDIRK
from ._switching import StiffSwitching


_SOLVERS: dict[str, type[diffrax.AbstractSolver]] = {
    "euler": diffrax.Euler,
    "heun": diffrax.Heun,
    "midpoint": diffrax.Midpoint,
    "ralston": diffrax.Ralston,
    "bosh3": diffrax.Bosh3,
    "tsit5": diffrax.Tsit5,
    "dopri5": diffrax.Dopri5,
    "dopri8": diffrax.Dopri8,
    "dop853": DOP853,
    "implicit_euler": diffrax.ImplicitEuler,
    "kvaerno3": diffrax.Kvaerno3,
    "kvaerno4": diffrax.Kvaerno4,
    "kvaerno5": diffrax.Kvaerno5,
    "esdirk": NewtonKrylovESDIRK,
    "bdf": NewtonKrylovBDF,
    "switching": StiffSwitching,
}

SOLVER_NAMES: tuple[str, ...] = ("auto",) + tuple(_SOLVERS)

# `"auto"` takes DOP853 below this rtol and Tsit5 from it up. Measured (docs/results.md,
# "The auto solver's choice"): at matched trajectory error Tsit5 needs fewer gradient evaluations
# than DOP853 down to errors of about 1e-8 on the deep-linear flow and 1e-10 on the co-occurrence
# flow (where Tsit5 at rtol 1e-8 already reaches 4e-11); DOP853 needs fewer below.
AUTO_CROSSOVER_RTOL = 1e-8

# DOP853's global error is 10-100x its rtol on gflow's flows (Hairer's combined error estimate;
# scipy's DOP853 alike), Tsit5's a few rtol: "auto" runs DOP853 with its error estimate scaled by
# this (tolerances 10x tighter) so that one rtol means about one accuracy across the switch.
AUTO_DOP853_ERROR_SCALE = 10.0


def auto_solver(rtol: float) -> diffrax.AbstractSolver:
    """The solver `"auto"` picks at relative tolerance `rtol`.

    At `rtol >= AUTO_CROSSOVER_RTOL` (1e-8), `gflow.StiffSwitching`: Tsit5 (5th order, 6
    evaluations a step, a free 4th-order interpolant), handing the flow to the matrix-free
    variable-order `gflow.NewtonKrylovBDF` where Tsit5's steps are held by stability and back
    (on a flow that never gets stiff it takes Tsit5's steps exactly). Below, DOP853 (8th order, 15
    evaluations a step with its 7th-order dense output), whose higher order pays for its dearer
    steps there, with its error estimate scaled by `AUTO_DOP853_ERROR_SCALE` (10) so that its
    error at save times is about rtol, as Tsit5's is. Both keep the PID controller gflow builds
    from `rtol` and `atol`; with either, values at save times come from an interpolant as
    accurate as the steps.
    """
    return _named("switching" if rtol >= AUTO_CROSSOVER_RTOL else "auto-dop853")


# Solvers are immutable and cost tens of microseconds to build, a few percent of a small
# solve's host work: each name's is built once (a bounded cache: one entry per name).
@functools.lru_cache(maxsize=None)
def _named(name: str) -> diffrax.AbstractSolver:
    if name == "auto-dop853":
        return DOP853(error_scale=AUTO_DOP853_ERROR_SCALE)
    return _SOLVERS[name]()


def make_solver(
    solver: str | diffrax.AbstractSolver, rtol: float | None = None
) -> diffrax.AbstractSolver:
    """A diffrax solver from its gflow name (see `SOLVER_NAMES`), or `solver` itself.

    `"auto"` resolves through `auto_solver(rtol)`, so it needs `rtol`.
    """
    if isinstance(solver, diffrax.AbstractSolver):
        return solver
    if isinstance(solver, str) and solver.lower() == "auto":
        if rtol is None:
            raise InputError('solver "auto" is chosen per tolerance: give rtol')
        return auto_solver(rtol)
    if isinstance(solver, str) and solver.lower() in _SOLVERS:
        return _named(solver.lower())
    raise InputError(f"unknown solver {solver!r}; known solvers: {', '.join(SOLVER_NAMES)}")


def solver_name(solver: diffrax.AbstractSolver) -> str:
    """The gflow name of a solver, or its class name for one gflow does not name."""
    for name, cls in _SOLVERS.items():
        if type(solver) is cls:
            return name
    return type(solver).__name__


def is_adaptive(solver: diffrax.AbstractSolver) -> bool:
    """Whether the solver has an embedded error estimate (so a PID controller can drive it)."""
    # Euler has no embedded method; every other solver named here has one.
    return not isinstance(solver, diffrax.Euler)


def evaluations_per_step(solver: diffrax.AbstractSolver) -> tuple[int, int] | None:
    """Vector-field evaluations of an explicit Runge–Kutta solver.

    **Returns:**

    `(per_step, first_step_extra)`: evaluations of each step (accepted or rejected), and the extra
    evaluation the first step of a segment pays when the method is first-same-as-last (its first
    stage is otherwise reused from the previous step). `None` for implicit solvers, whose count
    depends on their Newton iterations.
    """
    try:  # a solver is an immutable module: equal ones count alike (`isinstance` on
        return _evaluations_per_step_of(solver)  # diffrax's classes costs ~20 µs)
    except TypeError:  # unhashable fields
        return _evaluations_per_step(solver)


@functools.lru_cache(maxsize=64)
def _evaluations_per_step_of(solver: diffrax.AbstractSolver) -> tuple[int, int] | None:
    return _evaluations_per_step(solver)


def _evaluations_per_step(solver: diffrax.AbstractSolver) -> tuple[int, int] | None:
    if isinstance(solver, diffrax.Euler):
        return 1, 0
    if isinstance(solver, DOP853):
        # 11 new stages, the last stage f(t1, y1) and 3 dense-output stages; first same as last.
        return 15, 1
    tableau = getattr(solver, "tableau", None)
    if not isinstance(solver, diffrax.AbstractERK) or tableau is None:
        return None
    stages = len(tableau.c) + 1
    if tableau.fsal:
        return stages - 1, 1
    return stages, 0


def vector_field_evaluations(
    solver: diffrax.AbstractSolver, num_steps: int, starts: int
) -> int | None:
    """Vector-field evaluations of a solve taking `num_steps` steps, started afresh `starts`
    times (at `t0` and after each transition; a cut continues the steps of the last segment
    and pays nothing).

    Each fresh start of a first-same-as-last method pays one fresh first stage. diffrax's
    initial-step heuristic costs nothing: in diffrax 0.7 it only runs for a bare `ODETerm`,
    `diffeqsolve` hands the controller a wrapped term (the engine does as it does), and the
    first step is 0.01 (checked against a host-callback counter in tests/test_solvers.py and
    docs/results.md). The count is short by one for each rejected *first* attempt of a
    start (diffrax keeps the solver state of a rejected step, so the retry evaluates the first
    stage again; the stats do not say how many there were): exact in most solves, at most a
    few short. `None` for implicit solvers (see `evaluations_per_step`).
    """
    per_step = evaluations_per_step(solver)
    if per_step is None:
        return None
    evals, first_extra = per_step
    return starts * first_extra + evals * num_steps
