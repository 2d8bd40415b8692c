"""`gflow.solve`: closed forms, invariants, an independent integrator, failure paths."""

import math

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest
from conftest import SAXE_S, SAXE_U0, mode_strengths

import gflow
from gflow.models import DeepLinear, deep_linear_loss
from gflow.theory import saxe_half_rise_time, saxe_mode


def test_saxe_mode_curve_and_half_rise(saxe_flow, saxe_target):
    rtol = 1e-10
    ts = gflow.linear_grid(0.0, 8.0, 161)
    transitions = [
        gflow.Transition(
            f"half_rise_{a}",
            lambda m, d, a=a, f=mode_strengths(saxe_target): f(m, d)[a] - SAXE_S[a] / 2,
            direction=True,
        )
        for a in range(len(SAXE_S))
    ]
    traj = gflow.solve(
        saxe_flow, 8.0, ts=ts, rtol=rtol, transitions=transitions,
        observers={"u": mode_strengths(saxe_target)},
    )
    assert traj.status == "completed"
    np.testing.assert_array_equal(traj.ts, ts)
    for a, s in enumerate(SAXE_S):
        exact = saxe_mode(ts, s, SAXE_U0)
        rel = np.abs(traj.observables["u"][:, a] - exact) / exact
        assert rel.max() <= 1e-6, (a, rel.max())
        t_half = saxe_half_rise_time(s, SAXE_U0)
        assert abs(traj.transitions[f"half_rise_{a}"] - t_half) <= 10 * rtol * t_half


def test_conservation_and_monotone_loss(random_flow):
    rtol = 1e-8

    def imbalance(model, data):
        w1, w2 = model.weights
        return w1 @ w1.T - w2.T @ w2

    def scale(model, data):
        w1, w2 = model.weights
        return jnp.linalg.norm(w1 @ w1.T) + jnp.linalg.norm(w2.T @ w2)

    traj = gflow.solve(random_flow, 20.0, rtol=rtol, observers={"C": imbalance, "scale": scale})
    assert traj.status == "completed"
    C = traj.observables["C"]
    drift = np.linalg.norm(C - C[0], axis=(1, 2)) / traj.observables["scale"]
    assert drift.max() <= 100 * rtol
    loss = traj.observables["loss"]
    assert loss[-1] < 1e-3 * loss[0]  # the flow actually learned the target
    assert np.all(np.diff(loss) <= rtol * loss[:-1])


def test_frozen_leaves_bit_identical_and_follow_closed_form():
    # W1 = I frozen: dW2/dt = S − W2, so W2(t) = S + (W2(0) − S) e^{−t}.
    key1, key2 = jax.random.split(jax.random.key(5))
    S = jax.random.normal(key1, (3, 4))
    w1 = jnp.eye(4) + 0.0
    model = DeepLinear([w1, jax.random.normal(key2, (3, 4))])
    spec = eqx.tree_at(lambda m: m.weights, jtu.tree_map(lambda _: False, model), (False, True))
    flow = gflow.GradientFlow(model, deep_linear_loss, S, trainable=spec)
    ts = gflow.linear_grid(0.0, 3.0, 31)
    traj = gflow.solve(flow, 3.0, ts=ts, rtol=1e-10, observers={"W2": lambda m, d: m.weights[1]})
    assert traj.final.weights[0] is model.weights[0] or np.array_equal(
        np.asarray(traj.final.weights[0]), np.asarray(w1)
    )
    assert np.asarray(traj.final.weights[0]).tobytes() == np.asarray(w1).tobytes()
    exact = S + (model.weights[1] - S) * np.exp(-ts)[:, None, None]
    np.testing.assert_allclose(traj.observables["W2"], exact, rtol=1e-8, atol=1e-9)


def test_preconditioner_rescales_time(random_flow):
    # P = c·I turns the flow at time t into the plain flow at time c·t.
    c = 2.5
    ts = gflow.linear_grid(0.0, 2.0, 21)
    pre = gflow.GradientFlow(
        random_flow.model, random_flow.loss, random_flow.data,
        preconditioner=lambda model, grads: jtu.tree_map(lambda g: c * g, grads),
    )
    state = {"W": lambda m, d: m.product()}
    fast = gflow.solve(pre, 2.0, ts=ts, rtol=1e-10, observers=state)
    plain = gflow.solve(random_flow, 5.0, ts=c * ts, rtol=1e-10, observers=state)
    np.testing.assert_allclose(fast.observables["W"], plain.observables["W"], rtol=1e-7, atol=1e-9)


def _scipy_dop853(flow, t1, ts):
    """The flattened state at `ts` by scipy's DOP853 at rtol 1e-12 (jitted JAX right-hand side),
    as `(len(ts), size)` rows."""
    scipy_integrate = pytest.importorskip("scipy.integrate")
    params, unravel = jax.flatten_util.ravel_pytree(flow.params)
    rhs = jax.jit(lambda p: jax.flatten_util.ravel_pytree(flow.velocity(unravel(p)))[0])
    ref = scipy_integrate.solve_ivp(
        lambda t, p: np.asarray(rhs(p)), (0.0, t1), np.asarray(params),
        method="DOP853", t_eval=ts, rtol=1e-12, atol=1e-14,
    )
    return ref.y.T


# The flattened trainable state, as an observer.
_STATE = {"state": lambda m, d: jax.flatten_util.ravel_pytree(
    eqx.filter(m, eqx.is_inexact_array))[0]}


def test_agrees_with_scipy_dop853(random_flow):
    ts = gflow.linear_grid(0.0, 10.0, 41)
    ref = _scipy_dop853(random_flow, 10.0, ts)
    traj = gflow.solve(random_flow, 10.0, ts=ts, solver="dopri8", rtol=1e-10, observers=_STATE)
    ours = traj.observables["state"]
    rel = np.linalg.norm(ours - ref, axis=1) / np.linalg.norm(ref, axis=1)
    assert rel.max() <= 1e-8


def test_pi_control_agrees_with_scipy_dop853_and_records_its_tolerances(random_flow):
    """A PI controller from `gflow.pid_controller` (as the rank-collapse preset uses) meets its
    tolerance against scipy's DOP853, with gflow's default atol, and certify keeps it PI."""
    ts = gflow.linear_grid(0.0, 10.0, 41)
    ref = _scipy_dop853(random_flow, 10.0, ts)
    rtol = 1e-8
    controller = gflow.pid_controller(random_flow, rtol, t1=10.0, pcoeff=0.3, icoeff=0.4)
    assert (controller.pcoeff, controller.icoeff) == (0.3, 0.4)
    plain = gflow.solve(random_flow, 10.0, ts=ts, solver="tsit5", rtol=rtol, observers=_STATE)
    traj = gflow.solve(random_flow, 10.0, ts=ts, solver="tsit5", observers=_STATE,
                       stepsize_controller=controller, certify=True)
    assert (traj.rtol, traj.atol) == (plain.rtol, plain.atol)  # the default atol, the same
    ours = traj.observables["state"]
    rel = np.linalg.norm(ours - ref, axis=1) / np.linalg.norm(ref, axis=1)
    assert rel.max() <= 100 * rtol
    # The reference is the same PI controller at 100x tighter tolerances: its error estimate
    # bounds the true error.
    assert np.max(traj.errors["observables"]["state"]) >= 0.5 * np.max(np.abs(ours - ref))


def test_gradient_descent_error_is_first_order(random_flow):
    T = 2.0
    flow_end = gflow.solve(random_flow, T, rtol=1e-12, solver="dopri8").final.product()

    def gd(eta):
        steps = int(round(T / eta))
        step = lambda p, _: (jtu.tree_map(lambda x, v: x + eta * v, p, random_flow.velocity(p)), None)
        final, _ = jax.lax.scan(step, random_flow.params, None, length=steps)
        return random_flow.combine(final).product()

    errors = [float(jnp.linalg.norm(gd(eta) - flow_end)) for eta in (1e-2, 5e-3, 2.5e-3)]
    ratios = [errors[0] / errors[1], errors[1] / errors[2]]
    assert all(1.8 < r < 2.2 for r in ratios), (errors, ratios)


def test_max_steps_gives_partial_trajectory(random_flow):
    traj = gflow.solve(random_flow, 20.0, max_steps=8, ts=gflow.linear_grid(0.0, 20.0, 201))
    assert traj.status == "max_steps"
    assert 0.0 < traj.t_final < 20.0
    assert traj.stats["num_steps"] == 8
    assert len(traj.ts) >= 1 and traj.ts[-1] <= traj.t_final
    assert np.all(np.isfinite(traj.observables["loss"]))
    # What was computed is right: it agrees with a full run on the shared save times.
    full = gflow.solve(random_flow, 20.0, ts=gflow.linear_grid(0.0, 20.0, 201))
    n = len(traj.ts)
    np.testing.assert_allclose(traj.observables["loss"], full.observables["loss"][:n], rtol=1e-6)


class _Scalar(eqx.Module):
    x: jax.Array


def test_blow_up_is_reported_nonfinite():
    # L = −x³/3 gives dx/dt = x², x(t) = 1/(1 − t) from x(0) = 1: blow-up at t = 1.
    flow = gflow.GradientFlow(_Scalar(jnp.array(1.0)), lambda m, d: -(m.x**3) / 3, None)
    traj = gflow.solve(flow, 2.0, ts=gflow.linear_grid(0.0, 2.0, 41), max_steps=100_000)
    assert traj.status == "nonfinite"
    assert abs(traj.t_final - 1.0) < 1e-6
    # Every save time before the blow-up is there and right.
    before = traj.ts < 1.0
    assert before.sum() == 20
    exact = -(1.0 / (1.0 - traj.ts[before])) ** 3 / 3
    np.testing.assert_allclose(traj.observables["loss"][before], exact, rtol=1e-6)


def test_overflowing_state_is_reported_nonfinite():
    # L = −x²/2 gives dx/dt = x: exponential growth overflows the 1e200 squared-norm guard near
    # t = ln(1e100) ≈ 230, long before t1.
    flow = gflow.GradientFlow(_Scalar(jnp.array(1.0)), lambda m, d: -(m.x**2) / 2, None)
    traj = gflow.solve(flow, 1000.0, ts=gflow.linear_grid(0.0, 1000.0, 101))
    assert traj.status == "nonfinite"
    assert 225.0 < traj.t_final < 240.0
    assert traj.ts[-1] <= traj.t_final
    np.testing.assert_allclose(traj.observables["loss"], -np.exp(2 * traj.ts) / 2, rtol=1e-6)


def test_transitions_in_order_and_unreached_is_nan(saxe_flow, saxe_target):
    u = mode_strengths(saxe_target)
    traj = gflow.solve(
        saxe_flow, 3.0,
        transitions=[
            gflow.Transition("first", lambda m, d: u(m, d)[0] - SAXE_S[0] / 2, True),
            gflow.Transition("never", lambda m, d: u(m, d)[0] - 10.0, True),
        ],
    )
    assert traj.status == "completed"
    assert abs(traj.transitions["first"] - saxe_half_rise_time(SAXE_S[0], SAXE_U0)) < 1e-6
    assert math.isnan(traj.transitions["never"])


def test_chained_segments_cost_about_one_solve(saxe_flow, saxe_target):
    u = mode_strengths(saxe_target)
    trs = [gflow.Transition(f"t{a}", lambda m, d, a=a: u(m, d)[a] - SAXE_S[a] / 2) for a in (0, 1)]
    plain = gflow.solve(saxe_flow, 8.0, rtol=1e-8)
    chained = gflow.solve(saxe_flow, 8.0, rtol=1e-8, transitions=trs)
    assert chained.stats["segments"] == 3
    assert chained.stats["num_accepted_steps"] <= plain.stats["num_accepted_steps"] + 10
    np.testing.assert_allclose(
        chained.observables["loss"], plain.observables["loss"], rtol=1e-5, atol=1e-12
    )


def test_locating_a_transition_takes_a_few_condition_evaluations(saxe_flow, saxe_target):
    # A segment evaluates its condition at its start and at every step end until the first
    # positive value (an upcrossing), then in root finding only. A secant that converges from
    # one side must not then walk the bracket's far end in by bisection (that took ~20 more
    # evaluations on some transitions).
    u = mode_strengths(saxe_target)
    values = {a: [] for a in range(len(SAXE_S))}

    def counted(a):
        def condition(m, d):
            value = u(m, d)[a] - SAXE_S[a] / 2
            jax.debug.callback(lambda v: values[a].append(float(v)), value)
            return value
        return condition

    rtol = 1e-10
    trs = [gflow.Transition(f"t{a}", counted(a), direction=True) for a in range(len(SAXE_S))]
    traj = gflow.solve(saxe_flow, 8.0, rtol=rtol, transitions=trs)
    jax.effects_barrier()
    for a, s in enumerate(SAXE_S):
        crossing = next(i for i, v in enumerate(values[a]) if v > 0)
        root_finding = len(values[a]) - crossing - 1
        # lower and upper ends again, then a few secant steps and one to close the bracket
        assert 2 < root_finding <= 8, (a, values[a][crossing:])
        t_half = saxe_half_rise_time(s, SAXE_U0)
        assert abs(traj.transitions[f"t{a}"] - t_half) <= 10 * rtol * t_half


def test_new_data_and_init_reuse_the_compiled_program(random_flow):
    gflow.solve(random_flow, 1.0)
    other = gflow.GradientFlow(
        DeepLinear.random((6, 5, 4), 0.1, jax.random.key(9)), deep_linear_loss,
        2.0 * random_flow.data,
    )
    traj = gflow.solve(other, 1.0)
    assert traj.stats["compile_seconds"] == 0.0


# Tsit5 in the default run; each solver compiles a program with a host callback (about 13 s),
# so DOP853 (not first-same-as-last) and Bogacki–Shampine run in the slow set.
@pytest.mark.parametrize("solver", ["tsit5", *(pytest.param(s, marks=pytest.mark.slow)
                                               for s in ("dopri8", "bosh3"))])
def test_vector_field_evaluation_count_matches_actual_calls(random_flow, solver):
    calls = []

    def counted_loss(model, data):
        jax.debug.callback(lambda: calls.append(1))
        return deep_linear_loss(model, data)

    flow = gflow.GradientFlow(random_flow.model, counted_loss, random_flow.data)
    traj = gflow.solve(flow, 2.0, solver=solver, observers={"loss": deep_linear_loss})
    jax.effects_barrier()
    # Counted from the tableau; a rejected first step evaluates its first stage again,
    # which the stats cannot see, so the calls may exceed the count by one or two.
    assert 0 <= len(calls) - traj.stats["vector_field_evaluations"] <= 2, solver


def test_small_init_is_resolved_relative_to_its_size(saxe_target):
    # At a 1e-7 init, the plateau state is 1e-7-sized: the default atol must still resolve it.
    model = DeepLinear.balanced_aligned(saxe_target, depth=2, u0=1e-14)
    flow = gflow.GradientFlow(model, deep_linear_loss, saxe_target)
    ts = gflow.linear_grid(0.0, 2.0, 21)
    traj = gflow.solve(flow, 2.0, ts=ts, rtol=1e-8, observers={"u": mode_strengths(saxe_target)})
    exact = saxe_mode(ts, SAXE_S[1], 1e-14)
    rel = np.abs(traj.observables["u"][:, 1] - exact) / exact
    assert rel.max() < 1e-5
    assert traj.atol < 1e-13


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(t1=0.0), "t1 must be greater than t0"),
        (dict(t1=1.0, t0=2.0), "t1 must be greater than t0"),
        (dict(t1=1.0, solver="rk99"), "unknown solver"),
        (dict(t1=1.0, rtol=-1.0), "rtol"),
        (dict(t1=1.0, ts=[0.5, 0.2]), "non-decreasing"),
        (dict(t1=1.0, ts=[0.5, 2.0]), "within"),
        (dict(t1=1.0, solver="euler"), "dt0"),
    ],
)
def test_bad_input_is_one_line_input_error(random_flow, kwargs, message):
    with pytest.raises(gflow.InputError, match=message) as info:
        t1 = kwargs.pop("t1")
        gflow.solve(random_flow, t1, **kwargs)
    assert "\n" not in str(info.value)


def test_non_finite_data_is_rejected(random_flow):
    bad = gflow.GradientFlow(random_flow.model, random_flow.loss, random_flow.data.at[0, 0].set(jnp.nan))
    with pytest.raises(gflow.InputError, match="data has non-finite"):
        gflow.solve(bad, 1.0)


def test_certify_error_estimates_bound_the_true_error(saxe_flow, saxe_target):
    u = mode_strengths(saxe_target)
    ts = gflow.linear_grid(0.0, 5.0, 51)
    traj = gflow.solve(
        saxe_flow, 5.0, ts=ts, rtol=1e-6, certify=True, observers={"u": u},
        transitions=[gflow.Transition("half", lambda m, d: u(m, d)[0] - SAXE_S[0] / 2, True)],
    )
    errors = traj.errors
    assert errors["reference_rtol"] == pytest.approx(1e-8)
    true_t = abs(traj.transitions["half"] - saxe_half_rise_time(SAXE_S[0], SAXE_U0))
    assert true_t <= errors["transitions"]["half"] <= 100 * true_t
    true_u = np.max(np.abs(traj.observables["u"] - np.stack(
        [saxe_mode(ts, s, SAXE_U0) for s in SAXE_S], axis=1)))
    assert true_u <= errors["observables"]["u"] <= 100 * true_u
    assert errors["overlapping"] == []


def _blas_threads() -> int:
    import threadpoolctl

    return max(p["num_threads"] for p in threadpoolctl.threadpool_info()
               if p["user_api"] == "blas")


def test_solves_run_lapack_on_one_thread_and_restore_it(random_flow):
    # The pool's size as the running solves see it (certify's two: the run and its reference),
    # every BLAS library JAX's LAPACK may use: an observer calling back to the host.
    before, seen = _blas_threads(), []

    def record(x):
        seen.append(_blas_threads())
        return np.zeros((), np.float64)

    def blas(model, data):
        return jax.pure_callback(record, jax.ShapeDtypeStruct((), jnp.float64), 0.0)

    traj = gflow.solve(random_flow, 1.0, ts=gflow.linear_grid(0.0, 1.0, 5), certify=True,
                       observers={"blas": blas})
    assert traj.status == "completed" and len(seen) >= 10  # both solves, every save time
    assert set(seen) == {1}
    assert _blas_threads() == before


def test_integer_observables_are_recorded_as_floats(random_flow):
    traj = gflow.solve(random_flow, 1.0, observers={
        "count": lambda m, d: jnp.sum(jnp.abs(m.weights[0]) > 0.1),
        "flag": lambda m, d: m.weights[0][0, 0] > 0,
    })
    assert traj.observables["count"].dtype == np.float64
    assert np.all(traj.observables["count"] == np.round(traj.observables["count"]))
    assert set(np.unique(traj.observables["flag"])) <= {0.0, 1.0}


# The observer's float64 constants (built with x64 on) are truncated in the float32 solve.
@pytest.mark.filterwarnings("ignore:Explicitly requested dtype float64")
def test_float32_solve_matches_float64_within_its_tolerance(saxe_flow, saxe_target):
    """With JAX's x64 off (what `--x32` does) the whole solve runs in float32."""
    u = mode_strengths(saxe_target)
    transitions = [
        gflow.Transition(f"mode{k}", lambda m, d, k=k: u(m, d)[k] - SAXE_S[k] / 2, True)
        for k in range(2)
    ]
    # The same float32-representable init and data in both precisions.
    cast = lambda dtype: lambda tree: jtu.tree_map(
        lambda x: np.asarray(np.asarray(x, np.float32), dtype), tree
    )
    flow = lambda dtype: gflow.GradientFlow(
        cast(dtype)(saxe_flow.model), deep_linear_loss, cast(dtype)(saxe_target)
    )
    kw = dict(rtol=1e-5, transitions=transitions, observers={"modes": u})
    reference = gflow.solve(flow(np.float64), 6.0, **kw)
    with jax.enable_x64(False):
        traj = gflow.solve(flow(np.float32), 6.0, **kw)
        assert traj.final.weights[0].dtype == jnp.float32
    assert traj.status == reference.status == "completed"
    assert traj.stats["dtype"] == "float32" and reference.stats["dtype"] == "float64"
    for name, t in reference.transitions.items():
        assert abs(traj.transitions[name] - t) < 10 * 1e-5 * t
    np.testing.assert_allclose(traj.observables["modes"], reference.observables["modes"],
                               rtol=1e-4, atol=1e-4 * max(SAXE_S))


def test_float32_overflow_is_reported_nonfinite():
    # dx/dt = x overflows float32's squared norm (~3e38) near t = ln(1e19) ≈ 44.
    with jax.enable_x64(False):
        flow = gflow.GradientFlow(_Scalar(jnp.array(1.0)), lambda m, d: -(m.x**2) / 2, None)
        traj = gflow.solve(flow, 100.0, rtol=1e-5, ts=gflow.linear_grid(0.0, 100.0, 101))
    assert traj.status == "nonfinite"
    assert 40.0 < traj.t_final < 45.0
