"""Instruments priced for the paper's size: transition conditions and observers at the cost of
a few matrix–vector products must not move what they locate.

The reference times below were computed with gflow before its stable-rank conditions used
Lanczos (every `σ_max` by SVD), at rtol 1e-9 (same solver and PI coefficients as the preset),
so they carry the flow's own error at that tolerance, far below the 10x rtol asserted here.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gflow
import gflow.internal
from gflow import presets

# `python -m gflow.solve rank-collapse`'s transitions, every stable rank by SVD, rtol 1e-9.
RANK_COLLAPSE_REFERENCE = {
    "condensation": 108.90790216211424,
    "stage2_onset": 565.1258516643762,
    "kq_collapse": 733.0067258419821,
}


def _transitions(problem, settings, rtol, transitions=None):
    controller = gflow.pid_controller(problem.flow, rtol, t1=settings.t1, t0=settings.t0,
                                      pcoeff=settings.pcoeff, icoeff=settings.icoeff)
    traj = gflow.solve(problem.flow, settings.t1, t0=settings.t0, solver=settings.solver,
                       transitions=problem.transitions if transitions is None else transitions,
                       ts=[settings.t0, settings.t1], stepsize_controller=controller,
                       max_steps=settings.max_steps)
    assert traj.status == "completed"
    return traj.transitions


@pytest.mark.slow
def test_shipped_rank_collapse_transitions_unchanged():
    """The default preset at its own tolerance locates its three transitions within 10x rtol
    of the SVD-conditioned reference (its conditions now take `σ_max` from 16 Lanczos steps
    on 64 x 64, 64 x 128 and 128 x 64 matrices: a real test of the Lanczos path)."""
    resolved = presets.resolve("rank-collapse")
    problem = presets.build(resolved)
    rtol = resolved.solve.rtol
    found = _transitions(problem, resolved.solve, rtol)
    assert list(found) == list(RANK_COLLAPSE_REFERENCE)
    for name, t_ref in RANK_COLLAPSE_REFERENCE.items():
        assert abs(found[name] - t_ref) <= 10 * rtol * t_ref, name


def test_lanczos_conditions_locate_what_svd_conditions_locate():
    """A reduced rank-collapse (d = 32: the 16 Lanczos steps span half the space) locates each
    transition where the same conditions with `σ_max` by SVD do, to well within the solver's
    tolerance: the same solve, only the conditions differ."""
    resolved = presets.resolve("rank-collapse", [
        "problem.d=32", "problem.d_ff=64", "problem.n=64", "problem.n_held_out=16",
        "problem.condensation_fraction=0.4", "problem.collapse_rank=3.0", "solve.t1=300"])
    problem = presets.build(resolved)
    rtol = resolved.solve.rtol
    conditions = [type(tr.condition) for tr in problem.transitions]
    assert all(getattr(tr.condition, "iterations", None) in (None, 16)
               for tr in problem.transitions)

    def exact(tr):
        if getattr(tr.condition, "iterations", None) is None:
            return tr
        condition = type(tr.condition)(tr.condition.level, iterations=None)
        return gflow.Transition(tr.name, condition, direction=tr.direction)

    lanczos = _transitions(problem, resolved.solve, rtol)
    svd = _transitions(problem, resolved.solve, rtol, [exact(tr) for tr in problem.transitions])
    assert conditions and list(lanczos) == list(svd)
    for name in svd:
        assert np.isfinite(svd[name]), name
        assert abs(lanczos[name] - svd[name]) <= rtol * svd[name], name


class _ReadsHeldOut(eqx.Module):
    """An observer of a costly function of an array it holds (a held-out set's stand-in)."""

    held_out: jax.Array
    which: int = eqx.field(static=True)

    def __call__(self, model, data=None):
        return self.which * jnp.sum(jnp.tanh(self.held_out @ self.held_out))


def _program_flops(flow, observers):
    traj = gflow.solve(flow, 1.0, ts=[0.0, 1.0], observers=observers, solver="tsit5")
    # The program the solve ran: the cache's most recently used.
    analysis = gflow.internal.compiled_programs()[-1].cost_analysis()
    return traj, (analysis[0] if isinstance(analysis, list) else analysis)["flops"]


def test_observers_holding_one_array_share_its_computation(saxe_flow):
    """Two observers holding the same array (the preset's held-out loss and accuracy hold one
    held-out set): the program gets it as one input, so XLA computes what depends on it once;
    two equal but distinct arrays stay two inputs. Same observables either way."""
    held = jnp.asarray(np.random.default_rng(0).standard_normal((128, 128)))
    shared = {"a": _ReadsHeldOut(held, 1), "b": _ReadsHeldOut(held, 2)}
    copies = {"a": _ReadsHeldOut(held, 1), "b": _ReadsHeldOut(jnp.array(held), 2)}
    assert len(gflow.internal.split(shared)[0]) == 1
    assert len(gflow.internal.split(copies)[0]) == 2
    traj_shared, flops_shared = _program_flops(saxe_flow, shared)
    traj_copies, flops_copies = _program_flops(saxe_flow, copies)
    matmul = 2 * 128**3
    # Each save-time observation holds one product fewer (the program traces it several
    # times: at least one product's worth less).
    assert flops_copies - flops_shared >= matmul
    for name in shared:
        np.testing.assert_array_equal(traj_shared.observables[name],
                                      traj_copies.observables[name])
