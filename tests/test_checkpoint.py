"""Checkpoints between segments: an interrupted solve resumed equals an uninterrupted one."""

import re

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest

import gflow
# Private: the tests interrupt a solve by wrapping the checkpoint writer `solve` calls.
import gflow._solve as solve_module
import gflow.internal
from gflow.models import DeepLinear

from conftest import SAXE_S, mode_strengths

RTOL = 1e-8
T1 = 6.0


def _transitions(target):
    strengths = mode_strengths(target)
    return [
        gflow.Transition(f"mode{k + 1}", lambda m, d, k=k, s=s: strengths(m, d)[k] - s / 2, True)
        for k, s in enumerate(SAXE_S)
    ]


_SETTINGS = {}


def _solve(flow, target, path, **kw):
    # Observers and transitions built once: new closures would compile a new program.
    if not _SETTINGS:
        _SETTINGS.update(observers={"modes": mode_strengths(target)},
                         transitions=_transitions(target))
    kw = dict(rtol=RTOL, checkpoint=path, checkpoint_steps=7) | _SETTINGS | kw
    return gflow.solve(flow, T1, **kw)


class _Interrupted(Exception):
    pass


def _interrupt_after(monkeypatch, writes: int) -> list:
    """Make the solve stop (as if killed) right after its `writes`-th checkpoint."""
    written = []
    write = solve_module.write_checkpoint

    def write_then_stop(path, carry, digests):
        write(path, carry, digests)
        written.append(carry.t)
        if len(written) == writes:
            raise _Interrupted

    monkeypatch.setattr(solve_module, "write_checkpoint", write_then_stop)
    return written


def _assert_same_run(a: gflow.Trajectory, b: gflow.Trajectory):
    """Bit-for-bit the same result (wall-clock seconds aside)."""
    assert a.status == b.status == "completed"
    assert a.transitions == b.transitions
    assert a.t_final == b.t_final
    np.testing.assert_array_equal(a.ts, b.ts)
    for x, y in zip(jtu.tree_leaves(a.observables), jtu.tree_leaves(b.observables)):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(jtu.tree_leaves(eqx.filter(a.final, eqx.is_array)),
                    jtu.tree_leaves(eqx.filter(b.final, eqx.is_array))):
        np.testing.assert_array_equal(x, y)
    counts = lambda s: {k: v for k, v in s.items() if not k.endswith("seconds")}
    assert counts(a.stats) == counts(b.stats)


@pytest.mark.parametrize("writes", [1, 4])
def test_interrupted_and_resumed_equals_uninterrupted(saxe_flow, saxe_target, tmp_path,
                                                      monkeypatch, writes):
    whole = _solve(saxe_flow, saxe_target, tmp_path / "whole.eqx")
    # Cut every 7 steps there are several checkpoints before, between and after transitions.
    assert whole.stats["segments"] > 6

    path = tmp_path / "cut.eqx"
    written = _interrupt_after(monkeypatch, writes)
    with pytest.raises(_Interrupted):
        _solve(saxe_flow, saxe_target, path)
    assert len(written) == writes and 0 < written[-1] < T1
    monkeypatch.undo()
    resumed = _solve(saxe_flow, saxe_target, path, resume=True)
    _assert_same_run(whole, resumed)


def test_checkpoint_cuts_change_the_solve_only_within_tolerance(saxe_flow, saxe_target):
    cut = _solve(saxe_flow, saxe_target, None)
    uncut = _solve(saxe_flow, saxe_target, None, checkpoint_steps=None)
    assert cut.stats["segments"] > uncut.stats["segments"] == 3
    for name, t in uncut.transitions.items():
        assert abs(cut.transitions[name] - t) < 10 * RTOL * t
    np.testing.assert_allclose(cut.observables["modes"], uncut.observables["modes"],
                               rtol=100 * RTOL, atol=100 * RTOL)


def test_resume_from_a_finished_checkpoint_runs_nothing(saxe_flow, saxe_target, tmp_path):
    path = tmp_path / "c.eqx"
    first = _solve(saxe_flow, saxe_target, path)
    again = _solve(saxe_flow, saxe_target, path, resume=True)
    _assert_same_run(first, again)
    assert again.stats["run_seconds"] == first.stats["run_seconds"]


def test_checkpoints_are_written_while_the_solve_goes_on(saxe_flow, saxe_target, tmp_path,
                                                         monkeypatch):
    """Each checkpoint is written on a thread of its own while the solve runs on to its next
    call (each write here waits until the solve has copied the carry of the next checkpoint:
    a write that held the solve up would wait in vain); the last is complete when the solve
    returns; a write's failure reaches the caller."""
    import threading
    import time

    import gflow._engine as engine_module  # private: counts the carry copies a solve makes

    whole = _solve(saxe_flow, saxe_target, tmp_path / "whole.eqx")
    copies, overlapped, threads = [0], [], set()
    copied, write = engine_module.copied, solve_module.write_checkpoint

    def counted(tree):
        copies[0] += 1
        return copied(tree)

    def write_once_the_solve_moved_on(path, snapshot, digests):
        threads.add(threading.get_ident())
        seen, deadline = copies[0], time.monotonic() + 2.0
        while copies[0] == seen and time.monotonic() < deadline:
            time.sleep(0.005)
        overlapped.append(copies[0] > seen)
        write(path, snapshot, digests)

    monkeypatch.setattr(engine_module, "copied", counted)
    monkeypatch.setattr(solve_module, "write_checkpoint", write_once_the_solve_moved_on)
    path = tmp_path / "beside.eqx"
    beside = _solve(saxe_flow, saxe_target, path)
    _assert_same_run(whole, beside)
    assert threading.get_ident() not in threads
    # Every write but the last saw the solve reach its next checkpoint meanwhile.
    assert len(overlapped) == whole.stats["segments"] and all(overlapped[:-1])
    monkeypatch.undo()
    _assert_same_run(whole, _solve(saxe_flow, saxe_target, path, resume=True))

    def full_disk(path, snapshot, digests):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(solve_module, "write_checkpoint", full_disk)
    with pytest.raises(OSError, match="No space left"):
        _solve(saxe_flow, saxe_target, tmp_path / "full.eqx")


def test_resume_without_a_checkpoint_starts_afresh(saxe_flow, saxe_target, tmp_path):
    path = tmp_path / "none-yet.eqx"
    resumed = _solve(saxe_flow, saxe_target, path, resume=True)
    _assert_same_run(_solve(saxe_flow, saxe_target, None), resumed)
    assert path.is_file()


def test_resume_refuses_a_checkpoint_of_another_problem(saxe_flow, saxe_target, tmp_path):
    path = tmp_path / "c.eqx"
    _solve(saxe_flow, saxe_target, path)
    other_init = gflow.GradientFlow(
        DeepLinear.balanced_aligned(saxe_target, depth=2, u0=2e-3), saxe_flow.loss, saxe_target
    )
    with pytest.raises(gflow.InputError, match="its initial state differs"):
        _solve(other_init, saxe_target, path, resume=True, atol=1e-11)
    with pytest.raises(gflow.InputError, match="its settings differs"):
        _solve(saxe_flow, saxe_target, path, resume=True, rtol=1e-7)
    with pytest.raises(gflow.InputError, match="its save times differs"):
        _solve(saxe_flow, saxe_target, path, resume=True, ts=np.linspace(0, T1, 11))


def test_max_steps_is_enforced_across_cuts(saxe_flow, saxe_target):
    traj = _solve(saxe_flow, saxe_target, None, max_steps=20)
    assert traj.status == "max_steps"
    # Checked at the cuts (every 7 steps): stops at the first cut with 20 or more steps.
    assert traj.stats["num_steps"] == 21
    assert 0 < traj.t_final < T1


def test_resume_with_a_controller_gflow_does_not_initialize(saxe_flow, saxe_target, tmp_path,
                                                           monkeypatch):
    """Fixed-step Heun: diffrax builds the first states itself; a checkpoint still resumes."""
    kw = dict(solver="heun", dt0=0.1, stepsize_controller=diffrax.ConstantStepSize(),
              checkpoint_steps=9)
    whole = _solve(saxe_flow, saxe_target, None, **kw)
    path = tmp_path / "c.eqx"
    _interrupt_after(monkeypatch, 5)
    with pytest.raises(_Interrupted):
        _solve(saxe_flow, saxe_target, path, **kw)
    monkeypatch.undo()
    _assert_same_run(whole, _solve(saxe_flow, saxe_target, path, resume=True, **kw))


def test_bad_checkpoint_arguments(saxe_flow, saxe_target, tmp_path):
    with pytest.raises(gflow.InputError, match="checkpoint_steps must be a positive integer"):
        _solve(saxe_flow, saxe_target, None, checkpoint_steps=0)
    with pytest.raises(gflow.InputError, match="resume needs the checkpoint file"):
        _solve(saxe_flow, saxe_target, None, resume=True)
    garbage = tmp_path / "garbage.eqx"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(gflow.InputError, match="not a readable gflow checkpoint"):
        _solve(saxe_flow, saxe_target, garbage, resume=True)


def test_one_progress_bar_spans_all_segments(saxe_flow, saxe_target, capsys):
    """Percentages shown never go back: the bar is over [t0, t1], not per segment."""
    traj = _solve(saxe_flow, saxe_target, None, progress=True, checkpoint_steps=None)
    assert traj.stats["segments"] == 3
    err = capsys.readouterr().err
    shown = [float(p) for p in re.findall(r"(\d+\.\d)%\|", err)]
    assert len(shown) > 3 and shown[-1] == 100.0
    assert all(b >= a for a, b in zip(shown, shown[1:])), shown
    # The bar names the transition it waits for, then the time reached.
    assert "next mode2" in err and "t=6" in err
    assert err.count("\n") <= 2  # one bar, closed once


def test_an_interactive_solve_is_cut_by_its_cost(saxe_flow, saxe_target):
    """A bar or a checkpoint file cuts the solve into chunks (each cut restarts diffrax's
    loop): a cheap flow's chunks are long (1,024 steps), a dear flow's 32 steps, so that
    its first call, one chunk, stays short. (`gflow.internal.chunk_steps` is the rule
    itself: a timing would not be a test. That the cuts leave the steps alone is
    `test_checkpointed_and_resumed_progress_run_is_bit_identical`.)"""
    spec = gflow.SolveSpec.from_options(saxe_flow, T1, rtol=RTOL)
    assert gflow.internal.chunk_steps(saxe_flow, spec) == 1024
    rng = np.random.default_rng(0)

    def chunk(width):  # a velocity takes three width³ products: ~6 width³ operations
        target = rng.standard_normal((width, width))
        flow = gflow.GradientFlow(
            DeepLinear.balanced_aligned(target, depth=2, u0=1e-3),
            lambda m, d: 0.5 * jnp.sum(jnp.square(m.weights[1] @ m.weights[0] - d)), target)
        return gflow.internal.chunk_steps(flow, gflow.SolveSpec.from_options(flow, T1))

    # Tsit5's 6 velocities a step: ~9.4e6 operations at width 64, 1e9 / 9.4e6 ≈ 106 steps,
    # the power of two below; at width 512 a step is ~5e9: the floor of 32.
    assert chunk(64) == 64
    assert chunk(512) == 32


def test_program_calls_count_the_hosts_round_trips(saxe_flow, saxe_target, tmp_path):
    """`gflow.internal.program_calls` (internal: `benchmarks.gpu` prices a bar's calls with
    it) counts the program's calls: one for a plain solve, one a segment for a solve that
    writes every cut, and a bar's solve fewer calls than chunks (it batches them)."""
    before = gflow.internal.program_calls()
    _solve(saxe_flow, saxe_target, None, checkpoint_steps=None)
    assert gflow.internal.program_calls() - before == 1
    before = gflow.internal.program_calls()
    cut = _solve(saxe_flow, saxe_target, tmp_path / "cut.eqx")
    assert gflow.internal.program_calls() - before == cut.stats["segments"] > 6
    before = gflow.internal.program_calls()
    barred = _solve(saxe_flow, saxe_target, None, progress=True)
    assert 1 <= gflow.internal.program_calls() - before < cut.stats["segments"]
    assert barred.stats["num_steps"] == cut.stats["num_steps"]  # the same cuts


def test_a_progress_bar_puts_no_host_callback_in_the_program(saxe_flow, saxe_target):
    """The bar is drawn by the host between chunks: the compiled program has no host
    callback (which would sync every step and make every new process recompile, its
    function pointer being part of the compilation cache's key)."""
    before = len(gflow.internal.compiled_programs())
    _solve(saxe_flow, saxe_target, None, progress=True, checkpoint_steps=None)
    programs = gflow.internal.compiled_programs()
    texts = [p.as_text() for p in programs[before:]] or [programs[-1].as_text()]
    # The probe works: a program with a debug callback does contain one.
    probe = jax.jit(lambda x: (jax.debug.callback(lambda: None), x + 1)[1]).lower(1.0)
    assert "callback" in probe.compile().as_text()
    assert not any("callback" in text for text in texts)
