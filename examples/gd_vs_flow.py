"""Plain gradient descent against the exact gradient flow: the first-order gap, and GD's
modified flow, which closes it to second order.

The papers approximate gradient flow with small-step gradient descent (`optax.sgd`) and read the
stage transitions off its curve. GD with step `η` follows the flow only to first order: its
trajectory and its transition times are off by `O(η)`. Here both are measured against the exact
flow (adaptive Tsit5, rtol 1e-10) of a two-layer linear network learning four modes from a small
init, at several `η`, and the slope of `log error` against `log η` is fitted (≈ 1). GD's
modified flow `dθ/dt = −∇(L + (η/4)‖∇L‖²)` (Barrett & Dherin; `GradientFlow(..., gd_step=η)`)
follows GD to `O(η²)`: its fitted slope is ≈ 2.

    python examples/gd_vs_flow.py [--quick] [--out DIR]
"""

import argparse
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax

import gflow
from gflow import models

matplotlib.use("Agg")
import matplotlib.pyplot as plt

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
parser.add_argument("--quick", action="store_true",
                    default=os.environ.get("GFLOW_EXAMPLES_QUICK") == "1")
args = parser.parse_args()

s = np.array([4.0, 3.0, 2.0, 1.0])
width, T = (8, 5.0) if args.quick else (16, 6.0)  # 16x16x16: 512 parameters
etas = 0.04 / 2.0 ** np.arange(4 if args.quick else 6)
dt_save = 0.04  # a multiple of every η: GD and flow are compared at the same times
key_target, key_init = jax.random.split(jax.random.key(1))
target = models.whitened_target(s, (width, width), key_target)
model = models.DeepLinear.random((width,) * 3, 1e-2, key_init)


def conditions(weights):  # mode k is learned when σ_k(W2 W1) passes s_k/2
    return jnp.linalg.svd(weights[1] @ weights[0], compute_uv=False)[: s.size] - s / 2


def flat(weights):
    return jnp.concatenate([w.ravel() for w in weights])


# The exact flow, its weights saved on the comparison grid, the transitions located.
ts = gflow.linear_grid(0.0, T, round(T / dt_save) + 1)
flow = gflow.GradientFlow(model, models.deep_linear_loss, target)
traj = gflow.solve(
    flow, T, ts=ts, rtol=1e-10, observers={"theta": lambda m, _: flat(m.weights),
                                 "modes": lambda m, _: conditions(m.weights) + s / 2},
    transitions=[gflow.Transition(f"mode{k + 1}", lambda m, _, k=k: conditions(m.weights)[k],
                                  direction=True) for k in range(s.size)],
)
flow_times = np.array(list(traj.transitions.values()))
print(f"exact flow: {traj.status}, {traj.stats['num_steps']} steps, "
      f"{traj.stats['vector_field_evaluations']} gradient evaluations; transitions at {flow_times}")


@jax.jit
def gradient_descent(weights, eta, steps_per_save):
    """GD with optax.sgd: parameters and modes at `ts[1:]`, and each mode's crossing time
    (linear interpolation of its condition between the two steps around the sign change)."""
    opt = optax.sgd(eta)
    loss = lambda w: models.deep_linear_loss(models.DeepLinear(w), target)

    def step(_, carry):
        w, state, k, before, crossing = carry
        updates, state = opt.update(jax.grad(loss)(w), state, w)
        w = optax.apply_updates(w, updates)
        after = conditions(w)
        fresh = jnp.isnan(crossing) & (before < 0) & (after >= 0)
        crossing = jnp.where(fresh, eta * (k + before / (before - after)), crossing)
        return w, state, k + 1, after, crossing

    def interval(carry, _):
        carry = jax.lax.fori_loop(0, steps_per_save, step, carry)
        return carry, (flat(carry[0]), carry[3] + s / 2)

    start = (weights, opt.init(weights), 0, conditions(weights), jnp.full(s.size, jnp.nan))
    (*_, crossing), (theta, modes) = jax.lax.scan(interval, start, None, length=ts.size - 1)
    return theta, modes, crossing


def modified_flow(eta):
    """GD's modified flow at step η, on the comparison grid."""
    flow_eta = gflow.GradientFlow(model, models.deep_linear_loss, target, gd_step=float(eta))
    out = gflow.solve(flow_eta, T, ts=ts, rtol=1e-10,
                      observers={"theta": lambda m, _: flat(m.weights)})
    return out.observables["theta"][1:]


exact = traj.observables["theta"][1:]
scale = np.linalg.norm(exact, axis=1).max()
deviation, modified_deviation, time_error, gd_modes = [], [], [], []
print(f"{'eta':>9} {'GD steps':>9} {'max |θ_GD − θ| / max |θ|':>25} "
      + " ".join(f"{'Δt mode ' + str(k + 1):>12}" for k in range(s.size))
      + f" {'vs modified flow':>17}")
for eta in etas:
    theta, modes, crossing = gradient_descent(model.weights, eta, round(dt_save / eta))
    deviation.append(np.linalg.norm(theta - exact, axis=1).max() / scale)
    modified_deviation.append(np.linalg.norm(theta - modified_flow(eta), axis=1).max() / scale)
    gd_modes.append(modes)
    time_error.append(np.abs(np.asarray(crossing) - flow_times))
    print(f"{eta:>9.2e} {round(T / eta):>9d} {deviation[-1]:>25.3e} "
          + " ".join(f"{e:>12.3e}" for e in time_error[-1]) + f" {modified_deviation[-1]:>17.3e}")
slope, *slopes = np.polyfit(np.log(etas), np.log(np.column_stack([deviation, time_error])), 1)[0]
modified_slope = np.polyfit(np.log(etas), np.log(modified_deviation), 1)[0]
print(f"fitted slope of log(trajectory deviation) vs log(eta): {slope:.3f}")
print(f"fitted slope of log(deviation from the modified flow, gd_step = eta) vs log(eta): "
      f"{modified_slope:.3f}")
print("fitted slopes of log(transition-time error) vs log(eta): "
      + ", ".join(f"mode {k + 1}: {v:.3f}" for k, v in enumerate(slopes)))
# Error ≈ C η: the steps GD would need for the flow's accuracy, against the solver's steps.
eta_needed = 1e-8 * etas[-1] / deviation[-1]
print(f"GD needs ~{T / eta_needed:.1e} steps for a 1e-8 trajectory error; "
      f"the adaptive solver took {traj.stats['num_steps']}")

fig, (ax_c, ax) = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
ax_c.plot(ts, traj.observables["modes"], "k", lw=1)
ax_c.plot(ts[1:], gd_modes[0], "C3--", lw=1)
ax_c.set(xlabel="t", ylabel="σ_k(W2 W1)", title=f"exact flow (black), GD η = {etas[0]:g} (red)")
ax.loglog(etas, deviation, "ko-", label=f"trajectory deviation (slope {slope:.2f})")
for k in range(s.size):
    ax.loglog(etas, np.array(time_error)[:, k], "o--", color=f"C{k}", ms=4,
              label=f"|Δt| mode {k + 1} (slope {slopes[k]:.2f})")
ax.loglog(etas, modified_deviation, "ks-", mfc="none",
          label=f"deviation from GD's modified flow (slope {modified_slope:.2f})")
ax.loglog(etas, deviation[-1] * etas / etas[-1], color="gray", lw=0.8, label="∝ η")
ax.loglog(etas, modified_deviation[-1] * (etas / etas[-1]) ** 2, color="gray", lw=0.8, ls=":",
          label="∝ η²")
ax.set(xlabel="GD step η", ylabel="error against the exact flow",
       title="plain flow: first order; modified flow: second")
ax.minorticks_off()
ax.set_xticks(etas, [f"{e:g}" for e in etas], rotation=30)
ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
ax.legend(fontsize=7)
args.out.mkdir(parents=True, exist_ok=True)
fig.savefig(args.out / "gd_vs_flow.png", dpi=80)
print(f"wrote {args.out / 'gd_vs_flow.png'}")
