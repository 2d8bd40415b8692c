"""What locating transitions costs, and what `gflow.solve` costs over bare diffrax.

The `deep-linear` preset's problem (a two-layer 16×16×16 linear network, four modes, t1 = 12,
Tsit5 at rtol 1e-8, the default atol, 301 save times observing the loss), timed side by side
in one process, calls alternating so that other jobs on the machine disturb all alike:

- `gflow.solve` with the preset's four transitions (singular value k of `W2 W1` rising through
  `s_k/2`: an SVD near the crossing, a certified Frobenius bound elsewhere), against the same
  call without them; and with the same transitions computed by an SVD at every evaluation
  (the preset's condition before the bound);
- the same with four cheap conditions (the product projected on the target's singular pairs,
  `u_kᵀ W2 W1 v_k` rising through `s_k/2`: two matrix-vector products), which separates what
  locating transitions costs the solve loop from what evaluating the conditions costs;
- `gflow.solve` without transitions, against bare `diffrax.diffeqsolve` (compiled ahead of
  time) with the same solver, `PIDController` (rtol, atol, dtmin), save times and observer
  (`SaveAt(ts=..., fn=...)`) and gflow's divergence guard as an `Event`, without and with the
  end state saved (`Trajectory.final`);
- `gflow.solve`'s compiled engine program alone (what is left is host work per call:
  validation, the plan, the `Trajectory`).

Run: `python -m benchmarks.studies.transitions_overhead [--repeats N] [--observe-state]`
(`--observe-state`: every call also observes the 512 weights at each save time, as
`benchmarks.run`'s workload does). On a shared machine pin it to one core with XLA's Eigen
thread pool off (`XLA_FLAGS=--xla_cpu_multi_thread_eigen=false taskset -c 1 python -m ...`):
XLA's CPU thread pool otherwise makes a 7 ms solve vary by ±50% from call to call, and even
so a compiled program's speed varies by ±10% from process to process, so run it more than
once. Prints the minimum and median wall time and the minimum CPU time (this process) of
each, and the ratios of minima. On a shared machine CPU time is the steadier measure: waiting
for a core is not counted.
"""

import argparse
import functools
import time

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

import gflow
import gflow.presets

from .._workload import flat_state_observer

RTOL = 1e-8
T1 = 12.0


def _problem():
    resolved = gflow.presets.resolve("deep-linear", [f"solve.t1={T1}"])
    return gflow.presets.build(resolved)


class _ModeRise(eqx.Module):
    """`u_kᵀ W2 W1 v_k − s_k/2`: a transition condition without an SVD."""

    u: jax.Array
    v: jax.Array
    level: jax.Array

    def __call__(self, model, data):
        return self.u @ model.product() @ self.v - self.level


class _SingularValueBySVD(eqx.Module):
    """`σ_k(W2 W1) − s_k/2` by an SVD at every evaluation."""

    k: int = eqx.field(static=True)
    level: jax.Array

    def __call__(self, model, data):
        return jnp.linalg.svd(model.product(), compute_uv=False)[self.k] - self.level


def _svd_transitions(transitions):
    return [
        gflow.Transition(tr.name, _SingularValueBySVD(tr.condition.k, tr.condition.level),
                         direction=True)
        for tr in transitions
    ]


def _cheap_transitions(flow):
    u, s, vt = np.linalg.svd(np.asarray(flow.data))
    return [
        gflow.Transition(f"mode{k + 1}", _ModeRise(jnp.asarray(u[:, k]), jnp.asarray(vt[k]),
                                                   jnp.asarray(s[k] / 2)), direction=True)
        for k in range(4)
    ]


def _bare(flow, ts, atol, final=False, state=None):
    """Bare diffrax with what gflow.solve does: same solver, controller, observer, guard;
    with `final`, the end state saved too (what `Trajectory.final` holds); with `state` (an
    observer), that observed as well."""
    frozen = flow.frozen

    def vector_field(t, y, args):
        return flow.velocity(y)

    def observe(t, y, args):
        model = eqx.combine(y, frozen)
        out = {"loss": flow.loss(model, flow.data)}
        return out | ({} if state is None else {"state": state(model, flow.data)})

    def diverged(t, y, args, **kwargs):
        sq = sum(jnp.sum(jnp.square(x)) for x in jtu.tree_leaves(y))
        return jnp.logical_not(sq < 1e200)

    def run(y0, ts, rtol, atol):
        return diffrax.diffeqsolve(
            diffrax.ODETerm(vector_field), diffrax.Tsit5(), 0.0, T1, None, y0,
            saveat=(diffrax.SaveAt(subs=[diffrax.SubSaveAt(ts=ts, fn=observe),
                                         diffrax.SubSaveAt(t1=True)])
                    if final else diffrax.SaveAt(ts=ts, fn=observe)),
            stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol, dtmin=1e-12 * T1),
            event=diffrax.Event(diverged), max_steps=100_000, throw=False,
        )

    args = (flow.params, jnp.asarray(ts), jnp.asarray(RTOL), jnp.asarray(atol))
    compiled = jax.jit(run).lower(*args).compile()

    def call():
        sol = compiled(*args)
        return jax.device_get(sol.ys)

    return call


def _engine_program(flow, ts, observers=None):
    """`gflow.solve`'s compiled engine program alone, on the inputs `gflow.solve` prepares for
    it (private API, on purpose: it separates the program's cost from the host's)."""
    from gflow import _engine, _solve

    setup = _solve._prepare(
        flow, t0=0.0, t1=T1, solver="auto", rtol=RTOL, atol=None, observers=observers,
        transitions=(), max_steps=100_000, dt0=None, stepsize_controller=None, ts=ts,
    )
    arrays, rebuild, key = parts = _engine.split(setup.plan)
    carry = _engine.start(_engine.carry_template(setup.plan, key), setup.y0, 0.0)
    program, _ = _solve._program(parts, carry)
    chunk = np.asarray(_engine.ALL_SEGMENTS, dtype=np.int32)
    return lambda: jax.block_until_ready(program(arrays, carry, chunk))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--observe-state", action="store_true",
                        help="observe the 512 weights at every save time too, as the "
                        "benchmarks.run workload does (a buffer of 301 x 512 numbers)")
    args = parser.parse_args(argv)
    problem = _problem()
    flow = problem.flow
    ts = gflow.linear_grid(0.0, T1, 301)
    # Built once: gflow caches compiled programs by observer identity.
    state = flat_state_observer(flow) if args.observe_state else None
    observers = None if state is None else {"state": state}
    solve = functools.partial(gflow.solve, flow, T1, rtol=RTOL, ts=ts, observers=observers)
    plain = solve
    with_transitions = functools.partial(solve, transitions=problem.transitions)
    cheap = _cheap_transitions(flow)
    with_cheap = functools.partial(solve, transitions=cheap)
    by_svd = _svd_transitions(problem.transitions)
    with_svd = functools.partial(solve, transitions=by_svd)
    first_plain, first_tr, first_cheap = plain(), with_transitions(), with_cheap()
    first_svd = with_svd()
    assert first_svd.transitions.keys() == first_tr.transitions.keys()
    print("largest difference of the transition times, bound against SVD at every "
          "evaluation: %.1e" % max(abs(first_svd.transitions[k] - first_tr.transitions[k])
                                   for k in first_tr.transitions))
    bare = _bare(flow, ts, first_plain.atol, state=state)
    bare_final = _bare(flow, ts, first_plain.atol, final=True, state=state)
    bare(), bare_final()
    calls = {"plain": plain, "transitions": with_transitions, "svd-always": with_svd,
             "cheap": with_cheap, "bare": bare,
             "bare+final": bare_final, "engine": _engine_program(flow, ts, observers)}
    walls = {k: [] for k in calls}
    cpus = {k: [] for k in calls}
    for _ in range(args.repeats):
        for name, call in calls.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            call()
            cpus[name].append(time.process_time() - start_cpu)
            walls[name].append(time.perf_counter() - start)
    best = {k: min(v) for k, v in walls.items()}
    best_cpu = {k: min(v) for k, v in cpus.items()}
    print(f"jax {jax.__version__}, diffrax {diffrax.__version__}, {jax.devices()[0].platform}, "
          f"repeats {args.repeats}")
    print(f"steps: plain {first_plain.stats['num_steps']}, with transitions "
          f"{first_tr.stats['num_steps']} in {first_tr.stats['segments']} segments, with cheap "
          f"conditions {first_cheap.stats['num_steps']} in {first_cheap.stats['segments']}")
    with open("/proc/loadavg") as f:
        print(f"load average after: {f.read().split()[0]}")
    for name in calls:
        print(f"{name:12s} wall min {1e3 * best[name]:8.2f} ms, median "
              f"{1e3 * float(np.median(walls[name])):8.2f} ms; CPU min {1e3 * best_cpu[name]:8.2f} ms")
    for label, a, b in (("transitions / plain", "transitions", "plain"),
                        ("SVD at every evaluation / plain", "svd-always", "plain"),
                        ("cheap-condition transitions / plain", "cheap", "plain"),
                        ("gflow.solve / bare diffrax", "plain", "bare"),
                        ("gflow.solve / bare diffrax with the final state", "plain",
                         "bare+final"),
                        ("engine program alone / bare diffrax with the final state", "engine",
                         "bare+final"),
                        ("gflow.solve with transitions / bare diffrax", "transitions", "bare")):
        print(f"{label}: wall {best[a] / best[b]:.3f}, CPU {best_cpu[a] / best_cpu[b]:.3f}")


if __name__ == "__main__":
    main()
