"""DOP853 and `solver="auto"`: coefficients, order, dense output, and auto's accuracy at save times."""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
from jax.flatten_util import ravel_pytree

import gflow
from gflow.theory import saxe_mode

from conftest import SAXE_S, SAXE_U0, mode_strengths


def test_dop853_coefficients_match_scipys():
    # A private table: the coefficients are the method, and an independent transcription of
    # Hairer's dop853.f (scipy's) is the only check of 150 thirty-digit numbers.
    from gflow._dop853 import TABLEAU
    from scipy.integrate._ivp import dop853_coefficients as ref

    np.testing.assert_array_equal(TABLEAU["c"], ref.C)
    np.testing.assert_array_equal(TABLEAU["a"], ref.A)
    np.testing.assert_array_equal(TABLEAU["b"], ref.A[ref.N_STAGES, : ref.N_STAGES])
    np.testing.assert_array_equal(TABLEAU["e3"], ref.E3)
    np.testing.assert_array_equal(TABLEAU["e5"], ref.E5)
    np.testing.assert_array_equal(TABLEAU["d"], ref.D)
    # The quadrature conditions of order 8: sum_i b_i c_i^k = 1/(k+1), and row sums = c.
    b, c = TABLEAU["b"], TABLEAU["c"][: ref.N_STAGES]
    np.testing.assert_allclose([b @ c**k for k in range(8)], 1 / np.arange(1, 9), atol=1e-15)
    np.testing.assert_allclose(TABLEAU["a"].sum(axis=1), TABLEAU["c"], atol=1e-14)


def _scalar_solve(n_steps: int, ts=None):
    """`y' = y cos t`, `y(0) = 1` on [0, 6] with `n_steps` equal steps; exact `exp(sin t)`."""
    term = diffrax.ODETerm(lambda t, y, args: y * jnp.cos(t))
    saveat = diffrax.SaveAt(ts=ts) if ts is not None else diffrax.SaveAt(t1=True)
    sol = diffrax.diffeqsolve(
        term, gflow.DOP853(), 0.0, 6.0, 6.0 / n_steps, jnp.asarray(1.0), saveat=saveat,
        stepsize_controller=diffrax.ConstantStepSize(), max_steps=1000,
    )
    return np.asarray(sol.ys)


def test_dop853_converges_at_order_8():
    steps = np.array([6, 12, 24, 48])
    errors = [abs(_scalar_solve(n)[-1] - np.exp(np.sin(6.0))) for n in steps]
    orders = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    assert np.all((orders > 7.5) & (orders < 9.0)), (errors, orders)


def test_dop853_dense_output_has_the_steps_order():
    # Save times strictly inside steps: the 7th-order interpolant's error (O(h^8) per step)
    # shrinks with the steps' global error, not at Dopri8's interpolation order.
    ts = jnp.linspace(0.0, 6.0, 97)[1:-1] + 0.013
    errors = [
        np.max(np.abs(_scalar_solve(n, ts) - np.exp(np.sin(np.asarray(ts))))) for n in (12, 24, 48)
    ]
    orders = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    assert np.all(orders > 7.0), (errors, orders)


def test_auto_picks_tsit5_loose_and_dop853_tight(saxe_flow):
    # Private: the crossover rtol `auto_solver`'s docstring names (Tsit5 from it up, DOP853 below).
    from gflow._solvers import AUTO_CROSSOVER_RTOL

    assert isinstance(gflow.auto_solver(1e-6), gflow.StiffSwitching)
    assert isinstance(gflow.auto_solver(AUTO_CROSSOVER_RTOL / 10), gflow.DOP853)
    loose = gflow.solve(saxe_flow, 1.0, rtol=1e-5)
    tight = gflow.solve(saxe_flow, 1.0, rtol=1e-11)
    assert loose.solver == "switching" and tight.solver == "dop853"


def _saxe_errors(flow, target, rtol, solver="auto"):
    """Largest |u − u_exact| of each mode over a dense save grid, in units of rtol × s (the
    size the mode grows to), and the trajectory."""
    ts = np.linspace(0.0, 8.0, 241)
    traj = gflow.solve(flow, 8.0, ts=ts, rtol=rtol, solver=solver,
                       observers={"u": mode_strengths(target)})
    assert traj.status == "completed"
    errors = [
        np.max(np.abs(traj.observables["u"][:, a] - saxe_mode(ts, s, SAXE_U0))) / (rtol * s)
        for a, s in enumerate(SAXE_S)
    ]
    return np.array(errors), traj


@pytest.mark.parametrize("rtol", [1e-5, 1e-7, 1e-9, 1e-11])
def test_auto_observables_at_save_times_match_the_saxe_closed_form(saxe_flow, saxe_target, rtol):
    # Dense save grid (several save times per step): values come from the interpolant. The
    # dense-output problem of diffrax's Dopri8 (50-150x rtol) must not come back.
    errors, traj = _saxe_errors(saxe_flow, saxe_target, rtol)
    assert traj.solver == ("switching" if rtol >= 1e-8 else "dop853")
    assert traj.stats["num_steps"] < 241 / 2  # many save times fall between step ends
    assert np.all(errors < 10), (traj.solver, errors)


def test_dopri8_dense_output_fails_that_bound(saxe_flow, saxe_target):
    # The same check catches diffrax's Dopri8, whose interpolant is the problem auto avoids.
    errors, _ = _saxe_errors(saxe_flow, saxe_target, 1e-11, solver="dopri8")
    assert errors.max() > 10, errors


@pytest.mark.parametrize("rtol", [1e-6, 1e-10])
def test_auto_state_at_save_times_matches_scipy_dop853(random_flow, rtol):
    # A flow with no closed form (random, unaligned init): scipy's DOP853 at rtol 1e-13 is the
    # reference, for the whole state at every save time.
    y0, unravel = ravel_pytree(random_flow.params)
    rhs = jax.jit(lambda y: ravel_pytree(random_flow.velocity(unravel(y)))[0])
    ts = np.linspace(0.0, 6.0, 121)
    ref = scipy.integrate.solve_ivp(
        lambda t, y: np.asarray(rhs(y)), (0.0, 6.0), np.asarray(y0), method="DOP853",
        t_eval=ts, rtol=1e-13, atol=1e-13,
    )
    state = lambda m, d: ravel_pytree(m)[0]  # noqa: E731
    traj = gflow.solve(random_flow, 6.0, ts=ts, rtol=rtol, observers={"state": state})
    states = np.asarray(traj.observables["state"])
    rel = np.linalg.norm(states - ref.y.T, axis=1) / np.linalg.norm(ref.y.T, axis=1)
    assert rel.max() < 10 * rtol, (traj.solver, rel.max() / rtol)


def test_dop853_evaluation_count_is_exact(saxe_flow, saxe_target):
    # Count every call of the loss's gradient with a host callback (the observers use the
    # uncounted flow), against the count gflow reports from its steps, with transitions (several
    # segments, each restarting the first-same-as-last stage).
    calls = []

    def counted_loss(model, data):
        jax.debug.callback(lambda: calls.append(1))
        return saxe_flow.loss(model, data)

    flow = gflow.GradientFlow(saxe_flow.model, counted_loss, saxe_target)
    u = mode_strengths(saxe_target)
    transitions = [
        gflow.Transition("first", lambda m, d: u(m, d)[0] - SAXE_S[0] / 2, direction=True)
    ]
    traj = gflow.solve(flow, 6.0, solver="dop853", rtol=1e-9, transitions=transitions,
                       observers={"loss": saxe_flow.loss})
    jax.effects_barrier()
    assert traj.solver == "dop853"
    assert traj.stats["segments"] == 2
    assert traj.stats["vector_field_evaluations"] == len(calls)
