"""One solve specification for every entry point (`gflow.SolveSpec`): each entry point given
the same options integrates the same problem, step for step; a cut does not change the steps;
the package imports without cycles; under `vmap` only the active transition's condition runs."""

import ast
import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gflow
import gflow.presets
from gflow._sweep_cli import main as sweep_main

from conftest import REDUCED_RANK_COLLAPSE, mode_strengths

RTOL = 1e-8
T1 = 12.0
SAME = 1e-12  # "the same numbers": relative


def _transitions(target):
    return [gflow.Transition(f"mode{k + 1}",
                             lambda m, d, k=k, s=s: mode_strengths(target)(m, d)[k] - s / 2,
                             direction=True)
            for k, s in enumerate((3.0, 1.5))]


def _assert_same(a: gflow.Trajectory, b: gflow.Trajectory):
    assert a.status == b.status
    for name, t in a.transitions.items():
        assert b.transitions[name] == pytest.approx(t, rel=SAME)
    np.testing.assert_allclose(a.observables["loss"], b.observables["loss"], rtol=SAME)
    for key in ("num_steps", "num_accepted_steps", "num_rejected_steps"):
        assert a.stats[key] == b.stats[key], key


# --------------------------------------------------------------------------------------------
# The spec itself


def test_spec_resolves_auto_once_and_keeps_the_controller(saxe_flow):
    spec = gflow.SolveSpec.from_options(saxe_flow, T1, rtol=1e-10)
    assert isinstance(spec.solver, gflow.DOP853) and spec.solver.error_scale == 10.0
    assert isinstance(spec.stepsize_controller, diffrax.PIDController)
    assert spec.rtol == 1e-10 and spec.atol > 0
    tight = spec.tightened(100.0)
    assert tight.rtol == pytest.approx(1e-12) and tight.atol == pytest.approx(spec.atol / 100)
    assert tight.solver is spec.solver
    pi = gflow.SolveSpec.from_options(saxe_flow, T1, pcoeff=0.3, icoeff=0.4)
    assert (pi.stepsize_controller.pcoeff, pi.stepsize_controller.icoeff) == (0.3, 0.4)
    traj = gflow.solve(saxe_flow, pi)
    assert traj.spec is pi and traj.rtol == pi.rtol


@pytest.mark.parametrize("change, message", [
    (dict(ts=np.asarray([0.0, 20.0])), "ts must lie within"),
    (dict(max_steps=0), "max_steps must be an integer"),
    (dict(checkpoint_steps=0), "checkpoint_steps must be a positive integer"),
    (dict(transitions=("x",)), "transitions must be gflow.Transition objects"),
    (dict(stepsize_controller="pid"), "stepsize_controller must be a diffrax"),
    (dict(stepsize_controller=diffrax.ConstantStepSize()), "a constant step size needs dt0"),
])
def test_spec_is_checked_when_changed(saxe_flow, change, message):
    spec = gflow.SolveSpec.from_options(saxe_flow, T1)
    with pytest.raises(gflow.InputError, match=message):
        dataclasses.replace(spec, **change)


def test_solve_takes_a_spec_or_options_not_both(saxe_flow):
    spec = gflow.SolveSpec.from_options(saxe_flow, T1, rtol=1e-6)
    _assert_same(gflow.solve(saxe_flow, spec), gflow.solve(saxe_flow, T1, rtol=1e-6))
    with pytest.raises(gflow.InputError, match="takes its options from the spec; got rtol"):
        gflow.solve(saxe_flow, spec, rtol=1e-7)


# --------------------------------------------------------------------------------------------
# Every entry point: the same numbers as gflow.solve, steps included


def test_one_member_sweep_is_the_solve(saxe_flow, saxe_target):
    transitions = _transitions(saxe_target)
    ts = np.linspace(0.0, T1, 25)
    traj = gflow.solve(saxe_flow, T1, rtol=RTOL, ts=ts, transitions=transitions)
    result = gflow.sweep(lambda seed: saxe_flow, {"seed": [0]}, T1, rtol=RTOL, ts=ts,
                         transitions=transitions, keep_trajectories=True)
    (member,) = result.members
    _assert_same(traj, member.trajectory)
    assert member.stats["num_steps"] == traj.stats["num_steps"]
    assert result.rtol == traj.rtol == member.spec.rtol


def _cli_sweep(argv, out: Path) -> dict:
    assert sweep_main(argv + ["--quiet", "--out", str(out)]) == 0
    return json.loads((out / "sweep.json").read_text())["members"][0]


@pytest.mark.parametrize("preset, overrides, axis", [
    # PI control (pcoeff 0.3, icoeff 0.4) from the preset's own [solve] table.
    ("rank-collapse", REDUCED_RANK_COLLAPSE, "seed=0"),
    ("deep-linear", ["solve.pcoeff=0.3", "problem.width=4", "solve.t1=12"], "seed=0"),
])
def test_sweep_command_line_runs_the_solve_of_its_config(preset, overrides, axis, tmp_path):
    resolved = gflow.presets.resolve(preset, list(overrides) + [f"problem.{axis}"])
    problem = gflow.presets.build(resolved)
    spec = gflow.presets.solve_spec(problem, resolved.solve, resolved.solve.save_times())
    assert spec.stepsize_controller.pcoeff == 0.3
    traj = gflow.solve(problem.flow, spec)
    argv = [preset] + [a for o in overrides for a in ("--set", o)] + ["--over", axis]
    member = _cli_sweep(argv, tmp_path / "sweep")
    assert member["status"] == traj.status == "completed"
    for name, t in traj.transitions.items():
        got = member["transitions"][name]
        assert (got is None and not math.isfinite(t)) or got == pytest.approx(t, rel=SAME)
    assert member["stats"]["num_steps"] == traj.stats["num_steps"]


def test_sensitivity_runs_the_spec_and_its_tangent_takes_the_solves_steps(saxe_target):
    from gflow.models import DeepLinear, deep_linear_loss

    def make_flow(u0):
        model = DeepLinear.balanced_aligned(saxe_target, depth=2, u0=u0)
        return gflow.GradientFlow(model, deep_linear_loss, saxe_target)

    first = _transitions(saxe_target)[:1]
    controller = diffrax.PIDController(rtol=1e-10, atol=1e-13, pcoeff=0.2, icoeff=0.5)
    for options in (dict(solver="auto", rtol=1e-10), dict(stepsize_controller=controller)):
        result = gflow.sensitivity(make_flow, 1e-3, T1, transitions=first, **options)
        spec = result.trajectory.spec
        if "stepsize_controller" in options:
            assert (spec.stepsize_controller.pcoeff, spec.rtol) == (0.2, 1e-10)
        else:
            assert isinstance(spec.solver, gflow.DOP853)
        # The times are gflow.solve's with the same options.
        traj = gflow.solve(make_flow(1e-3), T1, transitions=first, ts=[T1], **options)
        assert result.times == pytest.approx(traj.transitions, rel=SAME)
        # The forward-mode solve to the located time takes the steps the solve takes to it.
        t_star = result.times["mode1"]
        to_star = gflow.solve(make_flow(1e-3), dataclasses.replace(
            spec, t1=t_star, ts=np.asarray([t_star]), transitions=()))
        assert result.tangent_steps == to_star.stats["num_steps"] > 10
        assert math.isfinite(result.derivatives["mode1"])


def test_critical_points_re_solve_is_the_solve(saxe_flow, saxe_target, monkeypatch):
    # Spies on the re-solve (a private call): its numbers must be the trajectory's.
    import gflow._critical as critical

    traj = gflow.solve(saxe_flow, T1, rtol=1e-6, solver="auto", pcoeff=0.3, icoeff=0.4,
                       transitions=_transitions(saxe_target), ts=np.linspace(0.0, T1, 41))
    seen = []

    def spy(flow, spec):
        out = gflow.solve(flow, spec)
        seen.append(out)
        return out

    monkeypatch.setattr(critical, "solve", spy)
    gflow.critical_points(traj, saxe_flow)
    rerun = seen[0]
    _assert_same(traj, rerun)
    assert rerun.spec.stepsize_controller.pcoeff == 0.3


def test_certify_main_solve_is_the_solve(random_flow):
    ts = gflow.linear_grid(0.0, 2.0, 9)
    plain = gflow.solve(random_flow, 2.0, rtol=1e-7, ts=ts, pcoeff=0.3, icoeff=0.4)
    certified = gflow.solve(random_flow, 2.0, rtol=1e-7, ts=ts, pcoeff=0.3, icoeff=0.4,
                            certify=True)
    _assert_same(plain, certified)
    assert certified.errors["reference_rtol"] == pytest.approx(1e-9)


# --------------------------------------------------------------------------------------------
# Cuts do not change the solve


def test_checkpoint_steps_1_takes_the_steps_of_an_uninterrupted_solve(saxe_flow, saxe_target):
    kw = dict(rtol=1e-12, transitions=_transitions(saxe_target), ts=np.linspace(0.0, T1, 13))
    whole = gflow.solve(saxe_flow, T1, **kw)
    cut = gflow.solve(saxe_flow, T1, checkpoint_steps=1, **kw)
    assert cut.status == whole.status == "completed"
    assert cut.stats["segments"] == cut.stats["num_steps"] > 100
    for key in ("num_steps", "num_accepted_steps", "num_rejected_steps",
                "vector_field_evaluations"):
        assert cut.stats[key] == whole.stats[key], key
    assert cut.transitions == whole.transitions
    np.testing.assert_array_equal(cut.observables["loss"], whole.observables["loss"])


def test_checkpointed_and_resumed_progress_run_is_bit_identical(saxe_flow, saxe_target,
                                                                tmp_path, monkeypatch):
    """A run chunked for a progress bar and a checkpoint file, interrupted and resumed: the
    numbers of the plain solve."""
    import gflow._solve as solve_module

    kw = dict(rtol=1e-10, transitions=_transitions(saxe_target), ts=np.linspace(0.0, T1, 13))
    plain = gflow.solve(saxe_flow, T1, **kw)
    write, calls = solve_module.write_checkpoint, []

    def write_then_interrupt(path, snapshot, digests):
        write(path, snapshot, digests)
        calls.append(snapshot.t)
        if len(calls) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(solve_module, "_CHECKPOINT_SECONDS", 0.0)
    monkeypatch.setattr(solve_module, "write_checkpoint", write_then_interrupt)
    path = tmp_path / "c.eqx"
    with pytest.raises(KeyboardInterrupt):
        gflow.solve(saxe_flow, T1, checkpoint=path, progress=True, **kw)
    assert 0 < calls[0] < T1
    monkeypatch.setattr(solve_module, "write_checkpoint", write)
    resumed = gflow.solve(saxe_flow, T1, checkpoint=path, resume=True, progress=True, **kw)
    assert resumed.transitions == plain.transitions
    np.testing.assert_array_equal(resumed.observables["loss"], plain.observables["loss"])
    assert resumed.stats["num_steps"] == plain.stats["num_steps"]


# --------------------------------------------------------------------------------------------
# Sweeps under vmap: one condition per segment


def test_vmap_sweep_evaluates_only_the_awaited_condition(saxe_flow):
    """Under `vmap` a batched `lax.switch` computes every branch. The engine makes the
    transition index uniform over the batch: a transition after one never reached is never
    evaluated (a host counter in its condition stays at zero), while the awaited one is."""
    counts = {"never": 0, "later": 0}

    def counted(name, value):
        def condition(model, data):
            jax.debug.callback(lambda: counts.__setitem__(name, counts[name] + 1))
            return jnp.asarray(value)
        return condition

    transitions = [gflow.Transition("never", counted("never", -1.0), direction=True),
                   gflow.Transition("later", counted("later", -1.0), direction=True)]
    result = gflow.sweep(lambda seed: saxe_flow, {"seed": [0, 1, 2]}, 2.0, batch="vmap",
                         transitions=transitions, rtol=1e-6)
    assert result.groups[0]["batch"] == "vmap"
    assert all(m.status == "completed" for m in result.members)
    assert counts["never"] > 0 and counts["later"] == 0


# --------------------------------------------------------------------------------------------
# The package's import graph


def _package_imports() -> dict[str, set[str]]:
    """{module: modules of the package it imports at its top level}, from the sources."""
    root = Path(gflow.__file__).parent
    graph = {}
    for path in sorted(root.rglob("*.py")):
        name = ".".join(("gflow",) + path.relative_to(root).with_suffix("").parts)
        name = name.removesuffix(".__init__")
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        targets = set()
        for node in ast.parse(path.read_text()).body:  # top level only
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
                if node.module is None:
                    targets |= {f"{module}.{a.name}" for a in node.names}
                else:
                    targets.add(module)
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("gflow.")}
        graph[name] = targets
    return {k: {t for t in v if t in graph and t != k} for k, v in graph.items()}


def test_the_package_import_graph_has_no_cycle():
    graph = _package_imports()
    assert "gflow._engine" in graph and "gflow._status" in graph
    assert graph["gflow._status"] == set()  # a leaf
    assert "gflow._engine" not in graph["gflow._checkpoint"]
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in graph[node]:
            if nxt == "gflow":  # the package's lazy __init__ imports nothing eagerly
                continue
            assert state.get(nxt) != "open", " -> ".join(path + [nxt])
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node, [node])


def test_each_module_imports_alone():
    modules = sorted(m for m in _package_imports() if m != "gflow")
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'gflow' or m.startswith('gflow.')]:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module(name)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"


def test_a_spec_solved_on_another_flow_keeps_its_observers_arrays():
    """An observer holding the first flow's own arrays (its initial model) shares that flow's
    program input; solving the same spec on a second flow of the same structure must still
    compare with the observer's model, not the second flow's (closed form at t0)."""
    k1, k2 = jax.random.split(jax.random.key(0))
    X = jax.random.normal(k1, (20, 4))
    Y = X @ jnp.diag(jnp.array([3.0, 2.0, 1.0, 0.5]))

    def loss(m, d):
        return 0.5 * jnp.mean(jnp.sum((d[0] @ m[0] @ m[1] - d[1]) ** 2, -1))

    m0 = (1e-3 * jax.random.normal(k2, (4, 4)), 1e-3 * jax.random.normal(k1, (4, 4)))
    m1 = (2e-3 * jax.random.normal(k1, (4, 4)), 2e-3 * jax.random.normal(k2, (4, 4)))
    first, second = gflow.GradientFlow(m0, loss, (X, Y)), gflow.GradientFlow(m1, loss, (X, Y))
    observers = {"change": gflow.observers.relative_change(lambda m: m[0], m0)}
    spec = gflow.SolveSpec.from_options(first, 5.0, observers=observers, ts=[0.0, 5.0])
    assert gflow.solve(first, spec).observables["change"][0] == 0.0
    change = gflow.solve(second, spec).observables["change"][0]
    expected = np.linalg.norm(np.asarray(m1[0] - m0[0])) / np.linalg.norm(np.asarray(m0[0]))
    assert change == pytest.approx(expected, rel=1e-12)


def test_a_solve_repeated_is_the_same_and_follows_what_changed(random_flow):
    """A plain solve given the same flow and options again runs what the first call prepared
    (the same numbers, bit for bit); save times changed in place, a flow's NumPy data changed
    in place, or a flow of another init give the solve of what they are now."""
    ts = np.linspace(0.0, 3.0, 7)
    first = gflow.solve(random_flow, 3.0, rtol=RTOL, ts=ts)
    again = gflow.solve(random_flow, 3.0, rtol=RTOL, ts=ts)
    np.testing.assert_array_equal(again.observables["loss"], first.observables["loss"])
    assert again.stats["num_steps"] == first.stats["num_steps"]
    assert again.spec is first.spec and again.status == "completed"
    for a, b in zip(jax.tree.leaves(again.final), jax.tree.leaves(first.final)):
        np.testing.assert_array_equal(a, b)
    # Save times changed in place: the solve of the new times.
    ts[3] = 1.25
    moved = gflow.solve(random_flow, 3.0, rtol=RTOL, ts=ts)
    fresh = gflow.solve(random_flow, 3.0, rtol=RTOL, ts=np.array(ts))
    assert moved.ts[3] == 1.25
    np.testing.assert_array_equal(moved.observables["loss"], fresh.observables["loss"])
    assert moved.observables["loss"][3] != first.observables["loss"][3]
    # A NumPy init changed in place: the solve of the new init (its default atol too), and
    # a refusal once it is not finite.
    model = jax.tree.map(np.array, random_flow.model)
    flow = gflow.GradientFlow(model, random_flow.loss, random_flow.data)
    before = gflow.solve(flow, 3.0, rtol=RTOL, ts=ts)
    for leaf in jax.tree.leaves(model):
        leaf *= 1e-3
    after = gflow.solve(flow, 3.0, rtol=RTOL, ts=ts)
    expected = gflow.solve(gflow.GradientFlow(jax.tree.map(jnp.asarray, model),
                                              random_flow.loss, random_flow.data),
                           3.0, rtol=RTOL, ts=ts)
    assert after.atol == expected.atol == pytest.approx(1e-3 * before.atol, rel=1e-12)
    np.testing.assert_array_equal(after.observables["loss"], expected.observables["loss"])
    assert after.stats["num_steps"] == expected.stats["num_steps"]
    jax.tree.leaves(model)[0][0, 0] = np.nan
    with pytest.raises(gflow.InputError, match="initial state has non-finite"):
        gflow.solve(flow, 3.0, rtol=RTOL, ts=ts)
    # Another init of the same structure, under the spec of the first solve.
    other = gflow.GradientFlow(jax.tree.map(lambda x: 2 * x, random_flow.model),
                               random_flow.loss, random_flow.data)
    spec = first.spec
    assert gflow.solve(random_flow, spec).observables["loss"][0] == first.observables["loss"][0]
    twice = gflow.solve(other, spec).observables["loss"]
    np.testing.assert_array_equal(
        twice, gflow.solve(other, dataclasses.replace(spec)).observables["loss"])
    assert twice[0] == pytest.approx(float(other.loss(other.model, other.data)), rel=1e-12)


def test_a_ready_solve_does_not_outlive_its_flow(random_flow):
    """The ready solves of a flow hold its arrays: they go when the flow does. (Through
    `gflow.internal`: what the cache holds is not visible through the public API.)"""
    import gc
    import weakref

    import gflow.internal

    def solve_a_new_flow():  # in a frame of its own: JAX may snapshot a caller's locals
        flow = gflow.GradientFlow(jax.tree.map(lambda x: x + 0.0, random_flow.model),
                                  random_flow.loss, random_flow.data)
        gflow.solve(flow, 1.0, rtol=RTOL, ts=[0.0, 1.0])
        assert id(flow) in gflow.internal.ready_flow_ids()
        return id(flow), weakref.ref(flow)

    key, ref = solve_a_new_flow()
    gc.collect()
    assert ref() is None and key not in gflow.internal.ready_flow_ids()
