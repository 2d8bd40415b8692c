"""The matrix-free ESDIRK and the Tsit5/ESDIRK switching solver ("auto"): order and dense output
against closed forms, switching on a stiff flow, certify and resume across a switch."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optimistix as optx
import pytest

import gflow
from gflow import _solve as solve_module, internal

from gflow.theory import saxe_mode

from conftest import SAXE_S, SAXE_U0, mode_strengths

# A quadratic loss ½ θᵀAθ with a known spectrum: one sharp direction (λ = 50) over a slow
# bulk. Its gradient flow θ(t) = exp(-At) θ0 is stiff once the sharp component has decayed.
SPECTRUM = np.array([50.0, 2.0, 0.5, 0.2, 0.1, 0.05])
THETA0 = np.array([1.0, -0.5, 0.8, 0.3, -0.6, 0.9])


class Quadratic(eqx.Module):
    theta: jax.Array


def _quadratic_flow():
    loss = lambda m, data: 0.5 * jnp.sum(data * m.theta**2)
    return gflow.GradientFlow(Quadratic(jnp.asarray(THETA0)), loss, jnp.asarray(SPECTRUM))


def _exact(ts):
    return THETA0 * np.exp(-np.outer(ts, SPECTRUM))


def _state(model, data):
    del data
    return model.theta


def _fixed_step_errors(n_steps, t1=2.0):
    """Errors at the step ends and between them (dense output) of fixed-step ESDIRK solves."""
    # diffrax directly: gflow's solve drives the implicit solver with an adaptive controller;
    # the order needs fixed steps, with Newton tolerances far below the truncation error.
    solver = gflow.NewtonKrylovESDIRK(
        root_finder=diffrax.VeryChord(rtol=1e-10, atol=1e-12, norm=optx.rms_norm),
        root_find_max_steps=20)
    a = jnp.asarray(SPECTRUM[1:])  # the smooth part: order is about the non-stiff regime
    term = diffrax.ODETerm(lambda t, y, args: -a * y)
    h = t1 / n_steps
    ends = np.linspace(0.0, t1, n_steps + 1)
    mids = ends[:-1] + 0.37 * h
    ts = np.sort(np.concatenate([ends, mids]))  # diffrax saves at increasing times
    sol = diffrax.diffeqsolve(
        term, solver, 0.0, t1, h, jnp.asarray(THETA0[1:]), saveat=diffrax.SaveAt(ts=ts),
        stepsize_controller=diffrax.ConstantStepSize())
    exact = THETA0[1:] * np.exp(-np.outer(ts, SPECTRUM[1:]))
    err = np.abs(np.asarray(sol.ys) - exact).max(axis=1)
    at_end = np.isin(ts, ends)
    return err[at_end].max(), err[~at_end].max()


def test_esdirk_order_and_dense_output_order_on_a_linear_flow():
    errors = np.array([_fixed_step_errors(n) for n in (8, 16, 32)])
    orders = np.log2(errors[:-1] / errors[1:])
    # Kværnø 5: fifth order at the step ends; the cubic Hermite dense output: fourth order.
    assert np.all(orders[:, 0] > 4.6), (errors, orders)
    assert np.all(orders[:, 1] > 3.6), (errors, orders)


@pytest.mark.parametrize("solver", [pytest.param("esdirk", marks=pytest.mark.slow), "auto"])
def test_stiff_linear_flow_matches_closed_form_at_save_times(solver):
    flow = _quadratic_flow()
    ts = np.linspace(0.0, 40.0, 161)
    rtol = 1e-6
    traj = gflow.solve(flow, 40.0, ts=ts, rtol=rtol, solver=solver,
                       observers={"theta": _state})
    assert traj.status == "completed"
    err = np.abs(traj.observables["theta"] - _exact(ts))
    # Relative to each component's initial size (gflow's atol resolves it), a few rtol.
    assert np.max(err / np.abs(THETA0)) < 20 * rtol, np.max(err / np.abs(THETA0))
    st = traj.stats
    assert st["cost"] == st["gradients"] + 2 * st["hvps"]
    rejected = st["num_rejected_steps"] * (6 if solver == "auto" else 0)
    assert st["vector_field_evaluations"] == st["cost"] + rejected
    assert st["newton_iterations"] > 0 and st["krylov_iterations"] > 0
    if solver == "auto":
        # Tsit5 until its steps sit at its stability limit (h·50 ≈ 3.5), the ESDIRK after.
        assert traj.solver == "switching"
        assert st["switches"] >= 1 and 0 < st["switch_times"][0] < 10.0
        assert st["implicit_steps"] > 0 and st["explicit_steps"] > 0


@pytest.mark.slow
def test_auto_is_much_cheaper_than_tsit5_on_a_stiff_flow():
    flow = _quadratic_flow()
    auto = gflow.solve(flow, 200.0, rtol=1e-6, solver="auto")
    tsit5 = gflow.solve(flow, 200.0, rtol=1e-6, solver="tsit5")
    # Tsit5 is held at h ≈ 3.5/50 for the whole run: ~2,900 steps.
    assert tsit5.stats["vector_field_evaluations"] > 10_000
    assert auto.stats["vector_field_evaluations"] < tsit5.stats["vector_field_evaluations"] / 5
    # Within a few rtol of each component's initial size (gflow's default atol).
    assert np.all(np.abs(np.asarray(auto.final.theta) - _exact([200.0])[0]) < 10 * 1e-6 * np.abs(THETA0))


@pytest.mark.slow
@pytest.mark.parametrize("solver", ["esdirk", "bdf"])
def test_saxe_modes_with_the_implicit_method(saxe_flow, saxe_target, solver):
    ts = np.linspace(0.0, 8.0, 241)
    rtol = 1e-6
    traj = gflow.solve(saxe_flow, 8.0, ts=ts, rtol=rtol, solver=solver,
                       observers={"u": mode_strengths(saxe_target)})
    assert traj.status == "completed"
    for a, s in enumerate(SAXE_S):
        err = np.max(np.abs(traj.observables["u"][:, a] - saxe_mode(ts, s, SAXE_U0)))
        # The cubic Hermite dense output between the ESDIRK's long steps: measured at 80x
        # rtol on the fast mode's sigmoid (the BDF's interpolant 24x; Tsit5's quartic
        # extension: under 10x).
        assert err < 100 * rtol * s, (a, err)


def _transition():
    # The slowest component falls below half its start: t = ln 2 / 0.05, after the switch.
    return gflow.Transition("half", lambda m, d: m.theta[-1] - 0.5 * THETA0[-1], direction=False)


def test_certify_bounds_the_true_error_across_a_switch():
    flow = _quadratic_flow()
    ts = np.linspace(0.0, 30.0, 61)
    traj = gflow.solve(flow, 30.0, ts=ts, rtol=1e-5, solver="auto", certify=True,
                       observers={"theta": _state}, transitions=[_transition()])
    assert traj.stats["switches"] >= 1
    # certify's bound is the largest error over the save times (those after the switch too).
    true = np.abs(traj.observables["theta"] - _exact(ts)).max()
    bound = traj.errors["observables"]["theta"]
    assert true <= bound, (true, bound)
    t_half = np.log(2.0) / SPECTRUM[-1]
    assert abs(traj.transitions["half"] - t_half) <= traj.errors["transitions"]["half"] + 1e-12


def test_resume_across_a_switch_is_bit_identical(tmp_path, monkeypatch):
    flow = _quadratic_flow()
    kw = dict(rtol=1e-6, solver="auto", checkpoint_steps=40, observers={"theta": _state},
              transitions=[_transition()])
    whole = gflow.solve(flow, 30.0, checkpoint=tmp_path / "whole.eqx", **kw)
    assert whole.stats["switches"] >= 1
    written = []
    write = solve_module.write_checkpoint

    class Interrupted(Exception):
        pass

    def write_then_stop(path, carry, digests):
        write(path, carry, digests)
        written.append(carry.t)
        # Stop after the first checkpoint past the first switch.
        if carry.t > whole.stats["switch_times"][0]:
            raise Interrupted

    monkeypatch.setattr(solve_module, "write_checkpoint", write_then_stop)
    with pytest.raises(Interrupted):
        gflow.solve(flow, 30.0, checkpoint=tmp_path / "cut.eqx", **kw)
    monkeypatch.undo()
    resumed = gflow.solve(flow, 30.0, checkpoint=tmp_path / "cut.eqx", resume=True, **kw)
    assert resumed.status == whole.status == "completed"
    assert resumed.transitions == whole.transitions
    for x, y in zip(jtu.tree_leaves(resumed.observables), jtu.tree_leaves(whole.observables)):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(np.asarray(resumed.final.theta), np.asarray(whole.final.theta))
    counts = lambda s: {k: v for k, v in s.items() if not k.endswith("seconds")}
    assert counts(resumed.stats) == counts(whole.stats)


def test_tsit5_stability_limit_constant():
    # The limit the detector compares h·ρ with, from Tsit5's tableau: |R(z)| <= 1 on [-L, 0].
    from gflow._switching import TSIT5_STABILITY_LIMIT  # private: the detector's constant

    tab = diffrax.Tsit5.tableau
    a = np.zeros((7, 7))
    for i, row in enumerate(tab.a_lower):
        a[i + 1, : len(row)] = row
    stable = lambda z: abs(1 + z * tab.b_sol @ np.linalg.solve(np.eye(7) - z * a, np.ones(7))) <= 1
    assert stable(-(TSIT5_STABILITY_LIMIT - 1e-3)) and not stable(-(TSIT5_STABILITY_LIMIT + 1e-3))


def test_converged_ends_the_solve_where_the_gradient_falls_below_tol():
    flow = _quadratic_flow()
    tol = 1e-6
    traj = gflow.solve(flow, 1e4, rtol=1e-6, solver="auto", observers={"theta": _state},
                       transitions=[gflow.converged(flow, tol)])
    assert traj.status == "completed"
    t_conv = traj.transitions["converged"]
    assert traj.t_final == t_conv < 1e4
    # The solve stops on the root: ‖∇L‖ = ‖Aθ‖ of its final state is tol (root finder's
    # accuracy), and there the closed form ‖A exp(-At) θ0‖ agrees to the state's accuracy
    # (gflow's atol, rtol × the initial scale, is 3% of the slowest component by then).
    final = np.asarray(traj.final.theta)
    assert abs(np.linalg.norm(SPECTRUM * final) / tol - 1) < 1e-6
    grad_norm = lambda t: np.linalg.norm(SPECTRUM * THETA0 * np.exp(-SPECTRUM * t))
    assert abs(grad_norm(t_conv) / tol - 1) < 0.1
    assert traj.ts[-1] <= t_conv


def test_auto_on_a_non_stiff_flow_is_tsit5(saxe_flow):
    # Saddle-to-saddle growth is accuracy-bound: the switch never fires, and auto takes
    # Tsit5's steps and evaluations exactly.
    auto = gflow.solve(saxe_flow, 8.0, rtol=1e-6, solver="auto")
    tsit5 = gflow.solve(saxe_flow, 8.0, rtol=1e-6, solver="tsit5")
    assert auto.stats["switches"] == 0 and auto.stats["implicit_steps"] == 0
    assert auto.stats["num_steps"] == tsit5.stats["num_steps"]
    assert auto.stats["vector_field_evaluations"] == tsit5.stats["vector_field_evaluations"]
    np.testing.assert_array_equal(np.asarray(auto.final.weights[0]),
                                  np.asarray(tsit5.final.weights[0]))


def test_sensitivity_across_a_switch_matches_the_closed_form():
    # Spectrum scaled by p: the slowest component halves at t* = ln 2 / (0.05 p), after the
    # switch, so dt*/dp = -ln 2 / 0.05 at p = 1. Forward mode runs through both branches.
    def make_flow(p):
        return gflow.GradientFlow(Quadratic(jnp.asarray(THETA0)), _quadratic_flow().loss,
                                  p * jnp.asarray(SPECTRUM))

    rtol = 1e-6
    result = gflow.sensitivity(make_flow, 1.0, 30.0, transitions=[_transition()], rtol=rtol)
    assert result.trajectory.solver == "switching" and result.trajectory.stats["switches"] >= 1
    t_half = np.log(2.0) / SPECTRUM[-1]
    assert abs(result.times["half"] / t_half - 1) < 10 * rtol
    assert abs(result.derivatives["half"] / -t_half - 1) < 10 * rtol


def test_a_terminal_transition_is_part_of_the_spec():
    flow = _quadratic_flow()
    plain = gflow.SolveSpec.from_options(flow, 10.0, transitions=[_transition()])
    ending = gflow.SolveSpec.from_options(
        flow, 10.0, transitions=[eqx.tree_at(lambda t: t.terminal, _transition(), True)])
    # Checkpoints' fingerprint: a run that ends at the transition is another problem.
    assert plain.settings() != ending.settings()
    with pytest.raises(gflow.InputError, match="terminal"):
        gflow.Transition("x", lambda m, d: 0.0, terminal="yes")


def _bdf_step_errors(order, h, ndf):
    """Local errors at the step's end and at its middle (dense output), and the step's error
    estimate, of one BDF step of `order` from an exact history of spacing `h`."""
    # The state is built by hand (its documented fields: differences at spacing `h`, order):
    # an exact history isolates one step's local error, which a run from order 1 cannot.
    solver = gflow.NewtonKrylovBDF(
        ndf=ndf, root_finder=diffrax.VeryChord(rtol=1e-12, atol=1e-14, norm=optx.rms_norm),
        root_find_max_steps=20, newton_tol=1e-4)
    a = jnp.asarray(SPECTRUM[2:5])  # the smooth part: h λ small, the asymptotic regime
    y0 = THETA0[2:5]
    exact = lambda t: y0 * np.exp(-np.asarray(a) * t)
    term = diffrax.ODETerm(lambda t, y, args: -a * y)
    t = 1.0
    values = np.stack([exact(t - j * h) for j in range(order + 1)])
    diffs = [values[0]]
    table = values
    for _ in range(order):
        table = table[:-1] - table[1:]  # backward differences at t
        diffs.append(table[0])
    state = solver.blank_state(jnp.asarray(y0))
    d = state["differences"].at[: order + 1].set(jnp.asarray(np.stack(diffs)))
    state = dict(state, differences=d, spacing=jnp.asarray(h), order=jnp.asarray(order))
    y1, _, dense, new, _, _ = solver.step_with_jvp(
        term, t, t + h, jnp.asarray(values[0]), None, state)
    interp = internal.PolynomialInterpolation(t0=t, t1=t + h, **dense)
    end = np.max(np.abs(np.asarray(y1) - exact(t + h)))
    mid = np.max(np.abs(np.asarray(interp.evaluate(t + 0.5 * h)) - exact(t + 0.5 * h)))
    assert int(new["order"]) == order  # no order change on the first step at an order
    return end, mid


@pytest.mark.parametrize("ndf", [True, False])
def test_bdf_local_order_and_dense_output_on_a_linear_flow(ndf):
    for order in range(1, 6):
        errors = np.array([_bdf_step_errors(order, h, ndf) for h in (0.1, 0.05)])
        orders = np.log2(errors[0] / errors[1])
        # Local error O(h^{q+1}) at the step's end; the dense output is the order-q
        # interpolant (O(h^{q+1})), fitted by a quartic on the step (O(h^5) at q = 5).
        assert orders[0] > order + 1 - 0.3, (order, errors, orders)
        assert orders[1] > min(order + 1, 5) - 0.3, (order, errors, orders)


@pytest.mark.parametrize("rtol", [1e-4, 1e-6, 1e-8])
def test_bdf_matches_the_closed_form_at_save_times(rtol):
    flow = _quadratic_flow()
    ts = np.linspace(0.0, 40.0, 161)
    traj = gflow.solve(flow, 40.0, ts=ts, rtol=rtol, solver="bdf",
                       observers={"theta": _state})
    assert traj.status == "completed" and traj.solver == "bdf"
    err = np.abs(traj.observables["theta"] - _exact(ts))
    # Relative to each component's initial size (gflow's atol resolves it): a few rtol, the
    # dense output between the long steps included.
    assert np.max(err / np.abs(THETA0)) < 30 * rtol, np.max(err / np.abs(THETA0)) / rtol
    st = traj.stats
    assert st["cost"] == st["gradients"] + 2 * st["hvps"] == st["vector_field_evaluations"]
    # About one Newton iteration a step: the chord Jacobian is the predictor's.
    assert st["newton_iterations"] < 1.5 * st["implicit_steps"]


def test_switching_under_vmap_takes_each_members_own_steps():
    # Under vmap the batch takes implicit steps once any member is stiff: a member still in
    # explicit mode takes them too, from its own (restarted) BDF history. diffrax directly:
    # the batch of solves without a sweep's machinery around it.
    a, y0 = jnp.asarray(SPECTRUM), jnp.asarray(THETA0)

    def solve(p):
        term = diffrax.ODETerm(lambda t, y, args: -p * a * y)
        sol = diffrax.diffeqsolve(
            term, gflow.StiffSwitching(), 0.0, 30.0, 0.01, y0, max_steps=10_000,
            stepsize_controller=diffrax.PIDController(rtol=1e-6, atol=1e-6))
        return sol.ys[-1], sol.stats["num_steps"]

    ps = jnp.asarray([1.0, 0.7])  # the first member turns stiff first
    batched, steps = jax.jit(jax.vmap(solve))(ps)
    for i, p in enumerate(np.asarray(ps)):
        alone, alone_steps = jax.jit(solve)(p)
        # The same steps up to rounding (a batched reduction may round otherwise, and move a
        # step); a member taking steps from another's history would be far off.
        assert abs(int(steps[i]) - int(alone_steps)) <= 2
        np.testing.assert_allclose(np.asarray(batched[i]), np.asarray(alone), rtol=0, atol=1e-6)
        assert np.max(np.abs(np.asarray(alone) - THETA0 * np.exp(-p * SPECTRUM * 30.0))) < 1e-5
