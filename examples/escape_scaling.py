"""Escape time from a small init against the init scale `ε`: `∝ 1/ε` or `∝ ln(1/ε)`.

Two plateaus, two laws, each from one `gflow.sweep` over `ε` (all members in one compiled
program) and its `Sweep.fit`. Left: the attention + FFN model of the `rank-collapse-binary` preset
(homogeneous of degree ≥ 3 near the origin, so the escape is a finite-time blow-up of the
reduced flow and takes a time `∝ 1/ε`); the escape is where the exponential loss, `≈ 1` at a
small init, falls below `1/2`. Fitted exponent of `T` against `ε`: `−1` (`ε T` settles to a
constant as `ε → 0`; at the larger `ε` it is a few percent higher). Right: a two-layer
linear network from Saxe's balanced aligned init (degree 2: the modes grow exponentially,
`∝ e^{2 s t}`).

One convention for `ε` throughout (gflow's, see `gflow.ScalingLaw`): `ε` scales every weight.
Both factors of the linear network carry `ε` of each mode, so a mode starts at strength
`u0 = ε²`, its half-rise comes at `ln(s/ε² − 1) / (2s)`, and its time against `ln(1/ε)` is a
line of slope `1/s` (against `ln(1/u0)` it would be `1/(2s)`: the same law in the mode-strength
variable).

    python examples/escape_scaling.py [--quick] [--out DIR]
"""

import argparse
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

import gflow
import gflow.presets
from gflow import models, theory

matplotlib.use("Agg")
import matplotlib.pyplot as plt

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
parser.add_argument("--quick", action="store_true",
                    default=os.environ.get("GFLOW_EXAMPLES_QUICK") == "1")
args = parser.parse_args()

# The attention escape at ε = 1e-3 comes near t ≈ 1.7e3, at 1e-4 near 1.7e4 (∝ 1/ε).
attention_eps, attention_t1 = (([1e-2, 3e-3, 1e-3], 2.5e3) if args.quick
                               else (list(np.geomspace(1e-2, 1e-4, 7)), 2.5e4))
linear_eps = list(np.geomspace(1e-1, 1e-3, 3 if args.quick else 9))
s = np.array([2.0, 1.0])


def attention_flow(eps):
    overrides = [f"problem.eps={eps}", "solve.refine=false"]
    return gflow.presets.build(gflow.presets.resolve("rank-collapse-binary", overrides)).flow


# One threshold for every member (the loss starts at ≈ 1), so one compiled program serves all.
escape = gflow.Transition("escape", lambda m, d: models.exponential_loss(m, d) - 0.5,
                          direction=False)
attention = gflow.sweep(attention_flow, over={"eps": attention_eps}, t1=attention_t1,
                        transitions=[escape])

target = models.whitened_target(s, (4, 4), jax.random.key(0))
U, _, Vt = np.linalg.svd(np.asarray(target))
U, V = jnp.asarray(U[:, : s.size]), jnp.asarray(Vt[: s.size].T)


def modes(m, _):  # mode strengths: the product projected on the target's singular pairs
    return jnp.einsum("ia,ij,ja->a", U, m.product(), V)


def linear_flow(eps):
    model = models.DeepLinear.balanced_aligned(target, depth=2, u0=eps**2, hidden=4)
    return gflow.GradientFlow(model, models.deep_linear_loss, target)


half_rises = [gflow.Transition(f"mode{k + 1}", lambda m, d, k=k: modes(m, d)[k] - s[k] / 2,
                               direction=True) for k in range(s.size)]
linear_t1 = 1.2 * theory.saxe_half_rise_time(s[-1], min(linear_eps) ** 2)
linear = gflow.sweep(linear_flow, over={"eps": linear_eps}, t1=linear_t1, transitions=half_rises)

for name, sw in (("attention", attention), ("linear", linear)):
    g = sw.groups
    print(f"{name} sweep: {len(sw)} members in {len(g)} program(s), statuses "
          f"{sorted({m.status for m in sw})}, compile {sum(x['compile_seconds'] for x in g):.1f} s,"
          f" run {sum(x['run_seconds'] for x in g):.2f} s")

print(f"{'eps':>10} {'t_escape':>12} {'eps * t_escape':>15}")
for m in attention:
    t = m.transitions["escape"]
    print(f"{m.point['eps']:>10.3e} {t:>12.4f} {m.point['eps'] * t:>15.4f}")
power = attention.fit("escape", against="eps", law="power", expected=-1.0)
print(f"attention: exponent of t_escape vs eps: {power.slope:.4f} "
      f"(95% interval [{power.ci95[0]:.4f}, {power.ci95[1]:.4f}]), predicted -1")

print(f"{'eps':>10}" + "".join(f" {f'mode{k + 1} t':>12} {'closed form':>12}" for k in range(s.size)))
for m in linear:
    row = "".join(f" {m.transitions[f'mode{k + 1}']:>12.6f} "
                  f"{theory.saxe_half_rise_time(s[k], m.point['eps'] ** 2):>12.6f}" for k in range(s.size))
    print(f"{m.point['eps']:>10.3e}" + row)
fits = [linear.fit(f"mode{k + 1}", against="eps",
                   law=gflow.ScalingLaw.of_factors(2, rate=s[k], basis="u0 = ε²"))
        for k in range(s.size)]
for k, fit in enumerate(fits):
    print(f"linear mode{k + 1} (s = {s[k]:g}): slope of t vs ln(1/eps): {fit.slope:.5f} "
          f"(95% interval [{fit.ci95[0]:.5f}, {fit.ci95[1]:.5f}]), predicted 1/s = "
          f"{fit.expected:.5f}")

fig, (ax_att, ax_lin) = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
grid = np.geomspace(min(attention_eps), max(attention_eps), 100)
ax_att.loglog(power.x, power.y, "ko", ms=5, label="escape (loss < 1/2), located")
ax_att.loglog(grid, power.predict(grid), "C3-",
              label=f"fit: exponent {power.slope:.3f} [{power.ci95[0]:.3f}, {power.ci95[1]:.3f}]")
ax_att.loglog(grid, power.y[0] * power.x[0] / grid, "C0--", lw=1, label="∝ 1/ε")
ax_att.set(xlabel="init scale ε", ylabel="escape time",
           title="attention + FFN (rank-collapse-binary preset)")
ax_att.legend(fontsize=8)
grid = np.geomspace(min(linear_eps), max(linear_eps), 100)
for k, fit in enumerate(fits):
    ax_lin.plot(np.log(1 / fit.x), fit.y, "o", color=f"C{k}", ms=5)
    ax_lin.plot(np.log(1 / grid), fit.predict(grid), "-", color=f"C{k}",
                label=f"mode {k + 1} (s = {s[k]:g}): slope {fit.slope:.4f}, theory 1/s = "
                      f"{fit.expected:.4f}")
ax_lin.set(xlabel="ln(1/ε)", ylabel="half-rise time",
           title="two-layer linear network, each factor ε (u0 = ε²)")
ax_lin.legend(fontsize=8)
args.out.mkdir(parents=True, exist_ok=True)
fig.savefig(args.out / "escape_scaling.png", dpi=80)
print(f"wrote {args.out / 'escape_scaling.png'}")
