"""Saddle-to-saddle (incremental) learning of a two-layer linear network from a small random init.

From `W ~ N(0, ε²)` the flow lingers near the saddle at the origin, then learns the target's
modes one at a time, largest singular value first, each after its own plateau: the loss falls in
steps, and on a log scale each singular value grows along a straight line, `∝ e^{2 s_α t}`.
While the weights are small the flow is linear, which predicts each mode's half-rise time
from the initial weights (`gflow.theory.two_layer_learning_times`); the exact flow locates each
half-rise by root finding and the two are compared.

    python examples/incremental_learning.py [--quick] [--out DIR]
"""

import argparse
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

import gflow
from gflow import models, observers, theory

matplotlib.use("Agg")
import matplotlib.pyplot as plt

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
parser.add_argument("--quick", action="store_true",
                    default=os.environ.get("GFLOW_EXAMPLES_QUICK") == "1")
args = parser.parse_args()

s = np.array([3.0, 2.0, 1.0] if args.quick else [4.0, 3.0, 2.0, 1.0])
width, eps = (8, 1e-3) if args.quick else (16, 1e-4)
key_target, key_init = jax.random.split(jax.random.key(0))
target = models.whitened_target(s, (width, width), key_target)
model = models.DeepLinear.random((width, width, width), eps, key_init)
flow = gflow.GradientFlow(model, models.deep_linear_loss, target)

# Theory from the initial weights alone: the linearized flow near the origin.
predicted, _, u0 = theory.two_layer_learning_times(*model.weights, target)
t1 = 1.5 * predicted.max()


def product_singular_values(m, _):
    return jnp.linalg.svd(m.product(), compute_uv=False)


transitions = [
    gflow.Transition(f"mode{k + 1}", lambda m, d, k=k: product_singular_values(m, d)[k] - s[k] / 2,
                     direction=True)
    for k in range(s.size)
]
traj = gflow.solve(
    flow, t1, ts=gflow.linear_grid(0.0, t1, 120 if args.quick else 400),
    observers={"singular_values": observers.singular_values(lambda m: m.product())},
    transitions=transitions,
)
print(f"status {traj.status}: {traj.stats['num_steps']} steps, "
      f"compile {traj.stats['compile_seconds']:.1f} s, run {traj.stats['run_seconds']:.2f} s")
measured = np.array([traj.transitions[f"mode{k + 1}"] for k in range(s.size)])
print(f"{'mode':>4} {'s':>5} {'u0 (effective)':>15} {'t_half measured':>16} "
      f"{'t_half predicted':>17} {'rel. error':>11}")
for k in range(s.size):
    print(f"{k + 1:>4} {s[k]:>5.2f} {u0[k]:>15.3e} {measured[k]:>16.6f} {predicted[k]:>17.6f} "
          f"{abs(measured[k] - predicted[k]) / predicted[k]:>11.2e}")
print("modes learned in order of decreasing s:", bool(np.all(np.diff(measured) > 0)))
loss = traj.observables["loss"]
# Plateau k lies between the k-th and the (k+1)-th half-rise (geometric middle on the log axis).
edges = np.append(measured, t1)
for k in range(s.size):
    t_mid = np.sqrt(edges[k] * edges[k + 1]) if k + 1 < s.size else t1
    value = np.interp(t_mid, traj.ts, loss)
    print(f"plateau after mode {k + 1} (t = {t_mid:.3f}): loss {value:.4f}, "
          f"½ Σ unlearned s² = {0.5 * np.sum(s[k + 1:] ** 2):.4f}")

fig, (ax, ax_loss) = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
t, sv = traj.ts, traj.observables["singular_values"]
for k in range(s.size):
    line, = ax.semilogy(t, sv[:, k], lw=2, label=f"σ{k + 1}  (s = {s[k]:g})")
    ax.axvline(predicted[k], color=line.get_color(), ls="--", lw=1)
    ax.plot(measured[k], s[k] / 2, "o", color=line.get_color(), ms=5)
ax.semilogy(t, sv[:, s.size:], color="gray", lw=0.8)
ax.set(xlabel="t", ylabel="singular values of W2 W1",
       title="dashed: predicted half-rise; dots: located")
ax.legend(loc="lower right", fontsize=8)
ax_loss.semilogy(t, loss, "k")
for k in range(s.size):
    ax_loss.axvline(measured[k], color=f"C{k}", ls=":", lw=1)
ax_loss.set(xlabel="t", ylabel="loss", ylim=(1e-2, 2 * loss[0]),
            title="loss: one plateau per saddle")
args.out.mkdir(parents=True, exist_ok=True)
fig.savefig(args.out / "incremental_learning.png", dpi=80)
print(f"wrote {args.out / 'incremental_learning.png'}")
