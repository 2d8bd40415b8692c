"""Cost of `gflow.sensitivity` (one solve + one forward-mode solve) against the central
difference it replaces (the same solve + two more), on the deep-linear preset's network.

    python -m benchmarks.studies.sensitivity [--repeats N]

Every program is compiled by a first, untimed round; the timed rounds reuse them (the flows'
functions are the same objects for every p). Wall times are minima over the repeats.
"""

import argparse
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

import gflow
from gflow.models import DeepLinear, deep_linear_loss, whitened_target

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--repeats", type=int, default=5)
parser.add_argument("--rtol", type=float, default=1e-10)
args = parser.parse_args()

s = np.array([4.0, 3.0, 2.0, 1.0])
width, eps, t1 = 16, 1e-3, 12.0
key_target, key_init = jax.random.split(jax.random.key(0))
target = whitened_target(s, (width, width), key_target)
unit = DeepLinear.random((width,) * 3, 1.0, key_init)


def make_flow(p):  # traceable: the construction is differentiated by jax.jvp
    return gflow.GradientFlow(DeepLinear([p * w for w in unit.weights]), deep_linear_loss, target)


transitions = [
    gflow.Transition(f"mode{k + 1}", lambda m, d, k=k: jnp.linalg.svd(
        m.product(), compute_uv=False)[k] - s[k] / 2, direction=True)
    for k in range(s.size)
]
h = 1e-3 * eps


def solve(p):
    return gflow.solve(make_flow(p), t1, transitions=transitions, rtol=args.rtol, ts=[t1])


def central_difference():
    plus, minus = solve(eps + h), solve(eps - h)
    return {k: (plus.transitions[k] - minus.transitions[k]) / (2 * h) for k in plus.transitions}


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


# Compile everything once.
result = gflow.sensitivity(make_flow, eps, t1, transitions=transitions, rtol=args.rtol)
central_difference()
rounds = []
for _ in range(args.repeats):
    t_sens, result = timed(lambda: gflow.sensitivity(make_flow, eps, t1, transitions=transitions,
                                                     rtol=args.rtol))
    t_fd, fd = timed(central_difference)
    t_solve, _ = timed(lambda: solve(eps))
    rounds.append((t_sens, result.seconds["solve"], result.seconds["tangent"], t_fd, t_solve))
best = np.min(np.array(rounds), axis=0)
steps = result.trajectory.stats["num_steps"]
print(f"machine: {platform.processor() or platform.machine()}, {jax.devices()[0].platform}, "
      f"jax {jax.__version__}")
print(f"problem: 16x16x16 linear network (512 parameters), eps = {eps:g}, t1 = {t1:g}, "
      f"tsit5 rtol = {args.rtol:g}, {steps} steps, 4 transitions")
print(f"sensitivity: {best[0] * 1e3:.1f} ms (solve {best[1] * 1e3:.1f} ms + forward-mode "
      f"tangent and IFT {best[2] * 1e3:.1f} ms); central difference: two more solves "
      f"{best[3] * 1e3:.1f} ms")
print(f"one solve alone (gflow.solve, same settings): {best[4] * 1e3:.1f} ms")
print(f"extra cost of the derivative: forward mode {best[2] * 1e3:.1f} ms = "
      f"{best[2] / best[4]:.2f} solves; central difference {best[3] * 1e3:.1f} ms = "
      f"{best[3] / best[4]:.2f} solves; forward mode / central difference = "
      f"{best[2] / best[3]:.2f}")
for k, d in result.derivatives.items():
    print(f"  {k}: dt*/deps = {d:.10e} (forward mode), {fd[k]:.10e} (central difference, "
          f"h = {h:g}), rel. difference {abs(d - fd[k]) / abs(d):.1e}")
