"""Chen & Luo's two stages from the exact gradient flow: condensation, then key-query collapse.

An attention + FFN model (`gflow.models.AttentionFFN`) at a small init `ε` on the last-token-sign
task (the `rank-collapse-binary` preset: the setting of the theorems). Top: cosine similarity of the rows of each parameter group
(ordered by the leading eigenvector) at init, at the end of condensation and after the key-query
collapse. Bottom: effective rank and relative norm change per group, and the outer energy
`E = v W_V W1 W2` of the full flow against the stage-1 reduced flow (`stage1_flow`, run in
rescaled time and mapped back with `real_time`), which blows up in finite time where the full
flow leaves the plateau.

    python examples/rank_collapse.py [--quick] [--out DIR]
"""

import argparse
import os
from pathlib import Path

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

# Quick mode: ε ten times larger, so every time is ten times shorter (escape ∝ 1/ε).
eps, t1, n_save = (1e-3, 2e3, 150) if args.quick else (1e-4, 2e4, 400)
resolved = gflow.presets.resolve("rank-collapse-binary", [f"problem.eps={eps}"])
problem = gflow.presets.build(resolved)
model, data = problem.flow.model, problem.flow.data
groups = ("W_Q", "W_K", "W_V", "W1")
# The preset takes effective ranks and cosine matrices as snapshots (t0, transitions, a few
# chosen times); at d = 8 they are cheap, and this example reads them at save times of its own
# grid: observed at every save time here.
available = problem.observers | problem.snapshots
observers = {k: available[k] for k in ("effective_rank", "relative_change", "energy", "cosine")}


def solve(ts):
    return gflow.solve(problem.flow, t1, ts=ts, observers=observers,
                       transitions=problem.transitions)


# Pass 1 locates the transitions; pass 2 (same grid size: the compiled program is reused)
# saves densely across stage 2 and exactly at the end of condensation.
traj = solve(gflow.log_grid(0.0, t1, n_save, first=t1 * 1e-4))
compile_seconds = traj.stats["compile_seconds"]
t_c, t_k = traj.transitions["condensation"], traj.transitions["kq_collapse"]
span = t_k - t_c
dense = np.linspace(t_c - span / 2, t_k + span / 2, n_save // 2)
traj = solve(np.sort(np.concatenate(
    [gflow.log_grid(0.0, t1, n_save - dense.size - 1, first=t1 * 1e-4), dense, [t_c]])))
print(f"full flow: {traj.status}, {traj.stats['num_steps']} steps, "
      f"compile {compile_seconds:.1f} s (pass 2: {traj.stats['compile_seconds']:.1f} s), "
      f"run {traj.stats['run_seconds']:.2f} s")
for name, t in traj.transitions.items():
    print(f"transition {name:>12} at t = {t:.4f}   ({problem.criteria[name]})")
snapshots = {"init": 0.0, "condensation": t_c, f"t = {t1:g}": t1}
index = {label: int(np.argmin(np.abs(traj.ts - t))) for label, t in snapshots.items()}
print(f"{'':>30}" + "".join(f"{g:>10}" for g in groups))
for label, i in index.items():
    for key in ("effective_rank", "relative_change"):
        values = traj.observables[key][i]
        print(f"{key + ' @ ' + label:>30}" + "".join(f"{x:>10.4g}" for x in values))

# The stage-1 reduced flow, from the same init, in rescaled time t̄ and rescaled weights W/ε.
X, y = data.X, data.y
reduced_flow = models.stage1_flow(model, data, eps)
tb1 = float(models.rescaled_time(t1, eps, X, y))
reduced = gflow.solve(reduced_flow, tb1, ts=gflow.log_grid(0.0, tb1, 200, first=tb1 * 1e-4),
                      observers={"energy": lambda m, v: m.energy(v)})
t_reduced = np.asarray(models.real_time(reduced.ts, eps, X, y))
E_reduced = reduced.observables["energy"]
E_full = np.interp(t_reduced, traj.ts, traj.observables["energy"]) / eps**3
blowup = float(models.real_time(reduced.t_final, eps, X, y))
bound = float(theory.predicted_escape_time(model, X, y))
print(f"reduced flow: {reduced.status} at t̄ = {reduced.t_final:.5f}, real time {blowup:.2f} "
      f"(blow-up bound {bound:.2f}; full flow condenses at {t_c:.2f})")
deviation = np.abs(E_reduced - E_full) / np.abs(E_full)
for frac in (0.1, 0.3, 0.5, 0.7, 0.9):
    i = int(np.searchsorted(t_reduced, frac * t_c))
    print(f"  t = {t_reduced[i]:>10.2f} ({frac:.0%} of t_c): E_reduced {E_reduced[i]:.6g}, "
          f"E_full/ε³ {E_full[i]:.6g}, rel. deviation {deviation[i]:.2e}")

fig = plt.figure(figsize=(12, 9.5), layout="constrained")
top, bottom = fig.subfigures(2, 1, height_ratios=[3, 1.3])
axes = top.subplots(3, 4)
for row, (label, i) in enumerate(index.items()):
    for col, g in enumerate(groups):
        im = axes[row, col].imshow(traj.observables["cosine"][g][i], cmap="RdBu_r", vmin=-1, vmax=1)
        axes[row, col].set(xticks=[], yticks=[], title=f"{g} rows, {label}")
top.colorbar(im, ax=axes, shrink=0.6, label="cosine similarity")
ax_rank, ax_change, ax_energy = bottom.subplots(1, 3)
for k, g in enumerate(groups):
    ax_rank.plot(traj.ts, traj.observables["effective_rank"][:, k], label=g)
    ax_change.semilogy(traj.ts[1:], traj.observables["relative_change"][1:, k], label=g)
for ax in (ax_rank, ax_change):
    for t, style in ((t_c, "--"), (t_k, ":")):
        ax.axvline(t, color="k", ls=style, lw=0.8)
    ax.set(xlabel="t (dashed: condensation, dotted: key-query collapse)")
ax_rank.set(ylabel="effective rank", title="effective rank per group")
ax_change.set(ylabel="‖W(t) − W(0)‖ / ‖W(0)‖", title="relative change per group")
ax_rank.legend(fontsize=8)
ax_energy.semilogy(traj.ts, traj.observables["energy"] / eps**3, "k", label="full flow")
ax_energy.semilogy(t_reduced, E_reduced, "C3--", label="stage-1 reduced flow")
ax_energy.axvline(blowup, color="C3", ls=":", lw=0.8, label="reduced blow-up")
ax_energy.axvline(t_c, color="k", ls="--", lw=0.8, label="condensation")
ax_energy.set(xlabel="t", ylabel="E / ε³", ylim=(0.5 * E_full[0], 1e5 * E_full[0]),
              title="outer energy: full vs stage-1 flow")
ax_energy.legend(fontsize=8)
args.out.mkdir(parents=True, exist_ok=True)
fig.savefig(args.out / "rank_collapse.png", dpi=80)
print(f"wrote {args.out / 'rank_collapse.png'}")
