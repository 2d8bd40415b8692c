"""`gflow.sensitivity`: transition times' derivatives by forward mode and the implicit-function
theorem, against Saxe's closed form and central differences of two solves."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gflow
import gflow.presets
from gflow import theory
from gflow.models import DeepLinear, deep_linear_loss

from conftest import REDUCED_PRESETS, SAXE_S, SAXE_U0, mode_strengths


def _half_rises(target):
    modes = mode_strengths(target)
    return [gflow.Transition(f"mode{k + 1}", lambda m, d, k=k: modes(m, d)[k] - SAXE_S[k] / 2,
                             direction=True) for k in range(len(SAXE_S))]


# Each construction compiles its own solve and forward-mode programs: the second runs with -m slow.
@pytest.mark.parametrize("construction", ["central-difference",
                                          pytest.param("jvp", marks=pytest.mark.slow)])
def test_saxe_half_rise_derivative(saxe_target, construction):
    """t½ = ln(s/u0 − 1)/(2s), so dt½/du0 = −1/(2 u0 (s − u0))."""
    if construction == "jvp":
        # Written in jax.numpy, so the construction itself is differentiated by `jax.jvp`.
        unit = DeepLinear.balanced_aligned(saxe_target, depth=2, u0=1.0)

        def make_flow(u0):
            weights = [jnp.sqrt(u0) * w for w in unit.weights]
            return gflow.GradientFlow(DeepLinear(weights), deep_linear_loss, saxe_target)
    else:
        # `balanced_aligned` builds with numpy: its arrays are differenced (no solve is).
        def make_flow(u0):
            model = DeepLinear.balanced_aligned(saxe_target, depth=2, u0=u0)
            return gflow.GradientFlow(model, deep_linear_loss, saxe_target)

    result = gflow.sensitivity(make_flow, SAXE_U0, 8.0, transitions=_half_rises(saxe_target),
                               rtol=1e-10)
    assert isinstance(result, gflow.Sensitivity) and result.construction == construction
    for k, s in enumerate(SAXE_S):
        name = f"mode{k + 1}"
        assert result.times[name] == pytest.approx(theory.saxe_half_rise_time(s, SAXE_U0),
                                                   rel=1e-8)
        expected = -1.0 / (2 * SAXE_U0 * (s - SAXE_U0))
        assert result.derivatives[name] == pytest.approx(expected, rel=1e-7)
        assert result.exponents[name] == pytest.approx(
            SAXE_U0 * result.derivatives[name] / result.times[name], rel=1e-12)
    summary = result.summary()
    assert summary["construction"] == construction and set(summary["derivatives"]) == {
        "mode1", "mode2"}


def _preset(name, overrides, p):
    return gflow.presets.build(gflow.presets.resolve(name, overrides + [f"problem.eps={p!r}"]))


@pytest.mark.parametrize("name, overrides, p, rtol", [
    ("deep-linear", ["problem.width=8"], 1e-3, 1e-11),
    # A second preset of another kind (attention, a margin condition); slower to compile.
    pytest.param("cooccurrence", REDUCED_PRESETS["cooccurrence"], 1.0, 1e-11,
                 marks=pytest.mark.slow),
])
def test_preset_derivatives_match_central_differences(name, overrides, p, rtol):
    t1 = gflow.presets.resolve(name, overrides).solve.t1

    def make_flow(q):
        return _preset(name, overrides, q).flow

    def transitions(q):
        return _preset(name, overrides, q).transitions

    result = gflow.sensitivity(make_flow, p, t1, transitions=transitions, rtol=rtol)
    reached = {k: t for k, t in result.times.items() if math.isfinite(t)}
    assert reached, result.times
    # Central differences of two whole solves at the same tolerance, step 1e-3 p: truncation
    # ~(1e-3)² relative, the solves' error ~rtol·t/(1e-3 p) — both below 1e-5 here.
    h = 1e-3 * p
    plus, minus = (gflow.solve(make_flow(q), t1, transitions=transitions(q), rtol=rtol, ts=[t1])
                   for q in (p + h, p - h))
    for k, t in reached.items():
        fd = (plus.transitions[k] - minus.transitions[k]) / (2 * h)
        assert result.derivatives[k] == pytest.approx(fd, rel=1e-5), (k, result.derivatives, fd)


def test_bad_input(saxe_flow, saxe_target):
    with pytest.raises(gflow.InputError, match="p must be"):
        gflow.sensitivity(lambda u: saxe_flow, float("nan"), 1.0,
                          transitions=_half_rises(saxe_target))
    with pytest.raises(gflow.InputError, match="GradientFlow"):
        gflow.sensitivity(lambda u: None, 1.0, 1.0, transitions=_half_rises(saxe_target))
    with pytest.raises(gflow.InputError, match="at least one transition"):
        gflow.sensitivity(lambda u: saxe_flow, 1.0, 1.0, transitions=[])


def _rank_collapse_name():
    # The binary rank-collapse preset is being renamed; accept either name.
    names = gflow.presets.preset_names()
    return "rank-collapse-binary" if "rank-collapse-binary" in names else "rank-collapse"


@pytest.mark.slow
def test_rank_collapse_escape_exponent_agrees_with_sweep():
    """The escape from the small-init plateau of the attention model takes a time ∝ 1/ε
    (docs/science.md §1, §3): the local exponent d ln t/d ln ε at one ε is ≈ −1, and equals the
    slope that `gflow.sweep` fits to solves at ε/2 … 2ε."""
    from gflow.models import exponential_loss

    name, eps0 = _rank_collapse_name(), 3e-3
    t1 = 4 / eps0  # the escape comes near 1.7/ε

    def make_flow(eps):  # the name `gflow.sweep` passes the point by
        overrides = [f"problem.eps={eps!r}", "solve.refine=false"]
        return gflow.presets.build(gflow.presets.resolve(name, overrides)).flow

    escape = gflow.Transition("escape", lambda m, d: exponential_loss(m, d) - 0.5,
                              direction=False)
    result = gflow.sensitivity(make_flow, eps0, t1, transitions=[escape])
    local = result.exponents["escape"]
    sweep = gflow.sweep(make_flow, over={"eps": list(np.geomspace(eps0 / 2, 2 * eps0, 5))},
                        t1=2 * t1, transitions=[escape])
    fit = sweep.fit("escape", against="eps", law="power", expected=-1.0)
    print(f"local exponent {local:.5f}, sweep's fitted exponent {fit.slope:.5f} "
          f"(95% [{fit.ci95[0]:.5f}, {fit.ci95[1]:.5f}])")
    assert abs(local + 1) < 0.1
    assert abs(local - fit.slope) < 0.02
