"""Saxe's sigmoidal mode learning: a two-layer linear network from a balanced aligned init.

On the balanced manifold aligned with the target's SVD, each mode strength `u_α = u_αᵀ W2 W1 v_α`
obeys `du/dt = 2u(s_α − u)` on its own, a logistic curve with the closed form
`gflow.theory.saxe_mode`. The exact flow is integrated with the full weights (no reduction), the
closed form is overlaid, and each mode's half-rise is located by root finding and compared with
`gflow.theory.saxe_half_rise_time`.

    python examples/saxe_modes.py [--quick] [--out DIR]
"""

import argparse
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

import gflow
from gflow import models, theory

matplotlib.use("Agg")
import matplotlib.pyplot as plt

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
parser.add_argument("--quick", action="store_true",
                    default=os.environ.get("GFLOW_EXAMPLES_QUICK") == "1")
args = parser.parse_args()

# Quick mode: fewer modes, a coarser save grid and a looser tolerance; the same closed form.
s = np.array([3.0, 1.5] if args.quick else [4.0, 3.0, 2.0, 1.0])
width, u0, rtol = (4, 1e-3, 1e-8) if args.quick else (16, 1e-3, 1e-10)
t1 = 1.6 * theory.saxe_half_rise_time(s[-1], u0)  # the slowest mode has saturated by then

target = models.whitened_target(s, (width, width), jax.random.key(0))
model = models.DeepLinear.balanced_aligned(target, depth=2, u0=u0, hidden=width)
flow = gflow.GradientFlow(model, models.deep_linear_loss, target)

# Mode strengths: the product projected on the target's singular pairs.
U, _, Vt = np.linalg.svd(np.asarray(target))
U, V = jnp.asarray(U[:, : s.size]), jnp.asarray(Vt[: s.size].T)


def modes(m, _):
    return jnp.einsum("ia,ij,ja->a", U, m.product(), V)


# The k-th mode passes s_k/2 upward: one Transition per mode, located in order.
transitions = [
    gflow.Transition(f"mode{k + 1}", lambda m, d, k=k: modes(m, d)[k] - s[k] / 2, direction=True)
    for k in range(s.size)
]
ts = gflow.linear_grid(0.0, t1, 80 if args.quick else 400)
traj = gflow.solve(flow, t1, ts=ts, rtol=rtol, observers={"modes": modes},
                   transitions=transitions)
print(f"status {traj.status}: {traj.stats['num_steps']} steps, "
      f"compile {traj.stats['compile_seconds']:.1f} s, run {traj.stats['run_seconds']:.2f} s")

measured = traj.observables["modes"]
closed = np.stack([theory.saxe_mode(traj.ts, s_k, u0) for s_k in s], axis=1)
# The error relative to the mode's own size: u0 = 1e-3 at the start, s at the end.
rel_error = np.abs(measured - closed) / closed
print(f"{'mode':>4} {'s':>5} {'t_half measured':>16} {'t_half closed form':>19} "
      f"{'rel. diff':>10} {'max rel. error u(t)':>20}")
for k, s_k in enumerate(s):
    t_meas = traj.transitions[f"mode{k + 1}"]
    t_pred = theory.saxe_half_rise_time(s_k, u0)
    print(f"{k + 1:>4} {s_k:>5.2f} {t_meas:>16.10f} {t_pred:>19.10f} "
          f"{abs(t_meas - t_pred) / t_pred:>10.2e} {rel_error[:, k].max():>20.2e}")
print(f"max relative error against the closed form: {rel_error.max():.3e} (rtol {rtol:g})")

fig, (ax, ax_err) = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
for k, s_k in enumerate(s):
    line, = ax.plot(traj.ts, measured[:, k] / s_k, lw=2.5, alpha=0.5, label=f"s = {s_k:g}")
    ax.plot(traj.ts, closed[:, k] / s_k, "k--", lw=0.8)
    ax.axvline(traj.transitions[f"mode{k + 1}"], color=line.get_color(), ls=":", lw=1)
    ax_err.semilogy(traj.ts[1:], rel_error[1:, k], color=line.get_color())
ax.plot([], [], "k--", lw=0.8, label="closed form")
ax.set(xlabel="t", ylabel="u_α(t) / s_α", title="mode strengths (dotted: located half-rise)")
ax.legend()
ax_err.axhline(rtol, color="gray", ls="--", lw=0.8, label="rtol")
ax_err.set(xlabel="t", ylabel="|u − u_closed| / u_closed", title="error of the exact flow")
ax_err.legend()
args.out.mkdir(parents=True, exist_ok=True)
fig.savefig(args.out / "saxe_modes.png", dpi=80)
print(f"wrote {args.out / 'saxe_modes.png'}")
