"""`critical_points`: the saddles a trajectory lingers near, refined, with their spectra.

How it works
------------
A `Trajectory` holds observables at its save times and the final model, not the state at
every save time. So `critical_points` re-integrates the flow (`gflow.solve`, the trajectory's
own solver and tolerances) over the trajectory's save times, observing the loss, `‖∇L‖` and,
when they fit in memory, the whole trainable state; when they do not, a second solve saves the
state at the seed times only.

Seeds are the plateaus: local minima of `‖∇L‖` over the save times (on gflow's default log
grid a plateau spans many save points), kept when `‖∇L‖` rises by at least
`PLATEAU_PROMINENCE` (a factor 2) on each side before it falls below the minimum again (a side
that stays above it up to the end of the run counts as rising: the plateau at the start of a
small-init run, the approach to the final minimum). Or the times the caller gives (the
transitions, say).

Each seed is refined by Newton's method on `∇L = 0` (`optimistix.Newton`), whose linear
systems `H δ = ∇L` are solved matrix-free by `lineax.LSMR` on Hessian-vector products
(forward-over-reverse, `jax.linearize` of `∇L`): LSMR returns the minimum-norm least-squares
step, so the singular and indefinite Hessians of these saddles (every symmetry of the model
makes a flat direction) do not stop it. Where Newton does not reach `tol`, a Levenberg–
Marquardt (damped Gauss–Newton) solve of `∇L = 0` takes over; the better result is kept and
`converged` says whether `‖∇L‖ ≤ tol`.

Spectrum: below `dense_below` parameters the Hessian is built (`jax.jacfwd` of `∇L`, one HVP
per column) and diagonalised with `jnp.linalg.eigh`; above it the extreme eigenvalues come
from LOBPCG (`jax.experimental.sparse.linalg.lobpcg_standard`, a block Krylov method) on
HVPs (`gflow._hessian`). A block method rather than single-vector Lanczos: the saddles of
these networks have repeated eigenvalues (a negative eigenvalue per free hidden unit), which
single-vector Lanczos finds once each, so it would get the index wrong.

Exit prediction (the linearisation at the saddle θ*): the component `a` of `θ(t_s) − θ*` in
the eigenspace of the most negative eigenvalue `λ < 0` grows like `a e^{|λ|(t − t_s)}`, and
along it the loss falls by `½|λ|r²` at distance `r`. The plateau is taken as left when that
fall reaches half the drop `ΔL` to the next critical point found (or to the trajectory's last
loss, after the last one): `r_exit² = ΔL/|λ|`, so
`t_exit = t_s + ln(r_exit/a) / |λ|`. The measured exit is the first time after `t_s` at which
the loss of the trajectory falls through `L* − ΔL/2`, linearly interpolated between save times
(so it is as accurate as the save grid).
"""

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import optimistix as optx
from jax.flatten_util import ravel_pytree
from jaxtyping import ArrayLike, Float, PyTree

from ._errors import InputError
from ._flow import GradientFlow
from ._hessian import top_eigenpairs
from ._solve import solve
from ._spec import SolveSpec
from ._trajectory import Trajectory, _finite_or_none

# A plateau's ‖∇L‖ dips at least this factor below what it rises to on each side.
PLATEAU_PROMINENCE = 2.0

# Observe the whole state at every save time in one solve when it holds at most this many
# numbers (8 bytes each); a second solve to the seed times otherwise.
_STATE_BUDGET = 4_000_000

# Eigenvalues below −max(INDEX_RTOL·max|λ|, tol) count as negative: the flat directions that
# the model's symmetries give are zero only to roundoff and to the residual gradient.
INDEX_RTOL = 1e-8


class CriticalPoint(eqx.Module):
    """A critical point of the loss near a plateau of a trajectory.

    **Fields:**

    - `t`: the seed time (where the trajectory was nearest the point).
    - `model`: the refined model (frozen leaves included).
    - `loss`, `grad_norm`: `L` and `‖∇L‖₂` at the refined point.
    - `converged`: whether `grad_norm <= tol`.
    - `distance`: `‖θ* − θ(t)‖₂`, from the trajectory's state at the seed.
    - `seed_grad_norm`: `‖∇L‖₂` at the trajectory's state at the seed.
    - `eigenvalues`: Hessian eigenvalues at the point, ascending: the most negative and the most
        positive `n_eigenvalues` each (all of them when there are no more).
    - `index`: the number of negative eigenvalues (below `−index_tol`).
    - `index_tol`: `INDEX_RTOL` times the largest `|λ|`, and at least `tol`.
    - `index_exact`: `False` when LOBPCG found only negative eigenvalues (below `−index_tol`)
        in its widest block (then `index` is a lower bound).
    - `method`: `"eigh"` (dense Hessian) or `"lobpcg"` (Hessian-vector products).
    - `unstable_eigenvalue`: the most negative eigenvalue, `None` at a minimum.
    - `unstable_amplitude`: `a`, the component of `θ(t) − θ*` in its eigenspace.
    - `predicted_exit`: the linearised exit time `t + ln(r_exit/a)/|λ|` (module docstring),
        `None` without an unstable direction or a later drop of the loss.
    - `measured_exit`: when the trajectory's loss falls through `L* − ΔL/2`, `None` if never.
    """

    t: float
    model: PyTree
    loss: float
    grad_norm: float
    converged: bool
    distance: float
    seed_grad_norm: float
    eigenvalues: Float[np.ndarray, " k"]
    index: int
    index_tol: float
    index_exact: bool
    method: str
    unstable_eigenvalue: float | None = None
    unstable_amplitude: float | None = None
    predicted_exit: float | None = None
    measured_exit: float | None = None

    def summary(self) -> dict[str, Any]:
        """A JSON-ready record (no NaN or inf: those become `None`)."""
        return dict(
            t=_finite_or_none(self.t),
            loss=_finite_or_none(self.loss),
            grad_norm=_finite_or_none(self.grad_norm),
            converged=bool(self.converged),
            distance=_finite_or_none(self.distance),
            seed_grad_norm=_finite_or_none(self.seed_grad_norm),
            eigenvalues=[_finite_or_none(float(x)) for x in self.eigenvalues],
            index=int(self.index),
            index_tol=_finite_or_none(self.index_tol),
            index_exact=bool(self.index_exact),
            method=self.method,
            unstable_eigenvalue=_finite_or_none(self.unstable_eigenvalue),
            unstable_amplitude=_finite_or_none(self.unstable_amplitude),
            predicted_exit=_finite_or_none(self.predicted_exit),
            measured_exit=_finite_or_none(self.measured_exit),
        )


def plateau_indices(grad_norm: Float[ArrayLike, " n"]) -> list[int]:
    """Indices of the plateaus of a `‖∇L‖` curve: local minima with a rise of at least
    `PLATEAU_PROMINENCE` on each side before the curve falls below the minimum again. A side
    that never falls below it up to the curve's end counts as rising (a plateau at the start,
    the approach to the final minimum), as long as the curve rises by that factor on one
    side at least."""
    g = np.log(np.maximum(np.asarray(grad_norm, dtype=float), np.finfo(float).tiny))
    n, need = g.size, math.log(PLATEAU_PROMINENCE)
    found = []
    for i in range(n):
        if (i > 0 and g[i - 1] <= g[i]) or (i < n - 1 and g[i + 1] < g[i]):
            continue  # not a local minimum (ties count once, at their left end)

        def side(indices):
            """`(rise to the highest point before the first lower one, whether none is lower)`."""
            peak = g[i]
            for j in indices:
                if g[j] < g[i]:
                    return peak - g[i], False
                peak = max(peak, g[j])
            return peak - g[i], True

        (left, left_open), (right, right_open) = side(range(i - 1, -1, -1)), side(range(i + 1, n))
        if ((left >= need or left_open) and (right >= need or right_open)
                and max(left, right) >= need):
            found.append(i)
    return found


class _Objective(eqx.Module):
    """The loss of the flat trainable vector (the state as one array)."""

    flow: GradientFlow
    unravel: Any = eqx.field(static=True)

    def loss(self, x):
        return self.flow.loss_at(self.unravel(x))

    def grad(self, x, args=None):
        return jax.grad(self.loss)(x)


# Newton steps per compiled call; the host checks ‖∇L‖ between calls.
_NEWTON_CHUNK = 8


def _lsmr(n: int) -> lx.LSMR:
    # No relative stopping test: at a degenerate saddle the steps that matter are tiny next to
    # the right-hand side, and LSMR's tests would stop it short (measured: ‖∇L‖ stalls near
    # 1e-9). It stops at its step limit or when its condition estimate passes `conlim`.
    return lx.LSMR(rtol=0.0, atol=0.0, conlim=1e16, max_steps=min(10 * n, 1000))


@eqx.filter_jit
def _newton(objective, x0):
    # rtol = atol = 0: optimistix's Cauchy test (a small step) never ends the iteration. At a
    # degenerate critical point Newton converges linearly along the flat directions (a cubic
    # gradient there: each step keeps 2/3 of the distance), so steps stay large while ‖∇L‖ is
    # already tiny; the host ends the iteration on ‖∇L‖ itself.
    solver = optx.Newton(rtol=0.0, atol=0.0, norm=optx.two_norm, linear_solver=_lsmr(x0.size))
    sol = optx.root_find(objective.grad, solver, x0, tags=frozenset({lx.symmetric_tag}),
                         max_steps=_NEWTON_CHUNK, throw=False)
    return sol.value


@eqx.filter_jit
def _levenberg_marquardt(objective, x0, tol, max_steps, dense):
    linear_solver = lx.QR() if dense else _lsmr(x0.size)
    solver = optx.LevenbergMarquardt(rtol=0.0, atol=tol, norm=optx.two_norm,
                                     linear_solver=linear_solver)
    sol = optx.least_squares(objective.grad, solver, x0, max_steps=max_steps, throw=False)
    return sol.value


def _refine(objective, x_seed, tol, max_steps, dense) -> tuple:
    """`(x, loss, ‖∇L‖)` of the refined point: Newton, then Levenberg–Marquardt if short."""
    x, best = x_seed, None
    for _ in range(max(1, max_steps // _NEWTON_CHUNK)):
        x = _newton(objective, x)
        loss, g = (float(v) for v in _loss_and_grad_norm(objective, x))
        if not math.isfinite(g):
            break
        if best is not None and not g < 0.5 * best[2]:  # stalled
            best = min(best, (x, loss, g), key=lambda b: b[2])
            break
        best = (x, loss, g)
        if g <= tol:
            return best
    x_lm = _levenberg_marquardt(objective, x_seed, tol, max_steps, dense)
    loss_lm, g_lm = (float(v) for v in _loss_and_grad_norm(objective, x_lm))
    if best is None or g_lm < best[2]:
        return x_lm, loss_lm, g_lm
    return best


@eqx.filter_jit
def _loss_and_grad_norm(objective, x):
    loss, grad = jax.value_and_grad(objective.loss)(x)
    return loss, jnp.linalg.norm(grad)


@eqx.filter_jit
def _dense_hessian(objective, x):
    hessian = jax.jacfwd(objective.grad)(x)
    return jnp.linalg.eigh(0.5 * (hessian + hessian.T))


@eqx.filter_jit
def _lobpcg_block(objective, x, X, sign):
    # One compiled program per objective and block size, for every point (LOBPCG's own jit
    # would recompile for each new closure).
    return top_eigenpairs(objective.grad, x, X, sign, 500)


def _lobpcg(objective, x, k, sign, key):
    """The `k` largest eigenpairs of `sign·H` by LOBPCG on HVPs."""
    X = jax.random.normal(key, (x.size, k), dtype=x.dtype)
    theta, U = _lobpcg_block(objective, x, X, jnp.asarray(sign, dtype=x.dtype))
    return np.asarray(theta), np.asarray(U)


def _spectrum(objective, x, n_eigenvalues, dense_below):
    """`(eigenvalues ascending, eigenvectors as columns, method, low_top)`: all of them
    (dense), or the extreme few from both ends (LOBPCG); `low_top` is the largest eigenvalue
    of LOBPCG's widest low block (`inf` for dense): the index is complete when it does not
    count as negative."""
    n = x.size
    if n <= dense_below or 5 * max(n_eigenvalues, 1) >= n:
        w, V = _dense_hessian(objective, x)
        return np.asarray(w), np.asarray(V), "eigh", math.inf
    key_low, key_high = jax.random.split(jax.random.key(0))
    k = n_eigenvalues
    while True:
        low, U_low = _lobpcg(objective, x, k, -1.0, key_low)
        # Widen the block while every eigenvalue it found is negative: the index needs one
        # non-negative eigenvalue to be known.
        if low.max() >= 0 or 5 * 2 * k >= n:
            break
        k *= 2
    high, U_high = _lobpcg(objective, x, n_eigenvalues, 1.0, key_high)
    w = np.concatenate([low, high])
    V = np.concatenate([U_low, U_high], axis=1)
    order = np.argsort(w)
    return w[order], V[:, order], "lobpcg", float(low.max())


def _crossing(ts, values, level, after) -> float | None:
    """First time after `after` at which `values` falls through `level` (interpolated)."""
    ts, values = np.asarray(ts, dtype=float), np.asarray(values, dtype=float)
    for i in range(1, ts.size):
        if ts[i] <= after or not (values[i - 1] > level >= values[i]):
            continue
        lo = max(i - 1, int(np.searchsorted(ts, after)))
        t0, v0 = (ts[lo], values[lo]) if ts[lo] >= after else (after, values[i - 1])
        if v0 <= level:
            return float(t0)
        return float(t0 + (ts[i] - t0) * (v0 - level) / (v0 - values[i]))
    return None


def critical_points(
    traj: Trajectory,
    flow: GradientFlow,
    *,
    times: Sequence[float] | None = None,
    tol: float = 1e-10,
    n_eigenvalues: int = 6,
    dense_below: int = 2000,
    max_steps: int = 100,
) -> list[CriticalPoint]:
    """The critical points the trajectory passes near, refined, with Hessian spectra.

    See the module docstring for how seeds are chosen, how they are refined and what the exit
    prediction is.

    **Arguments:**

    - `traj`: a trajectory of `flow` (from `gflow.solve`).
    - `flow`: the `GradientFlow` that produced it (its state at the seed times is re-integrated
        with the trajectory's solver and tolerances).
    - `times`: seed times within the trajectory's save range; default: its plateaus.
    - `tol`: refinement target for `‖∇L‖₂`.
    - `n_eigenvalues`: how many of the most negative and of the most positive eigenvalues to
        report.
    - `dense_below`: build the dense Hessian up to this many parameters; LOBPCG above.
    - `max_steps`: Newton steps of each refinement at most (and as many for its fallback).

    **Returns:**

    A list of `CriticalPoint`, one per seed, in time order.
    """
    if not isinstance(traj, Trajectory):
        raise InputError(f"critical_points expects a gflow.Trajectory, got {type(traj).__name__}")
    if not isinstance(flow, GradientFlow):
        raise InputError(f"critical_points expects a gflow.GradientFlow, got {type(flow).__name__}")
    if not (isinstance(tol, (int, float)) and tol > 0 and math.isfinite(tol)):
        raise InputError(f"tol must be a positive number, got {tol!r}")
    if int(n_eigenvalues) != n_eigenvalues or n_eigenvalues < 1:
        raise InputError(f"n_eigenvalues must be a positive integer, got {n_eigenvalues!r}")
    ts = np.asarray(traj.ts, dtype=float)
    if ts.size == 0:
        raise InputError("the trajectory has no save times")
    t0, t_end = float(traj.t0), float(ts[-1])
    if times is not None:
        times = np.sort(np.asarray(times, dtype=float).ravel())
        if times.size == 0 or not np.all(np.isfinite(times)):
            raise InputError("times must be a non-empty list of finite times")
        if times[0] < t0 or times[-1] > t_end:
            raise InputError(f"times must lie within the saved range [{t0}, {t_end}]")
        grid = np.union1d(ts, times)
    else:
        grid = ts

    x_init, unravel = ravel_pytree(flow.params)
    objective = _Objective(flow, unravel)
    observe_state = x_init.size * grid.size <= _STATE_BUDGET

    def grad_norm(model, data):
        # The gradient over the trainable leaves only (frozen ones do not move).
        del data
        grad = jax.grad(flow.loss_at)(eqx.filter(model, flow.trainable))
        return jnp.linalg.norm(ravel_pytree(grad)[0])

    def state(model, data):
        return ravel_pytree(eqx.filter(model, flow.trainable))[0]

    observers = {"grad_norm": grad_norm} | ({"state": state} if observe_state else {})
    rerun = _resolve(flow, traj, grid, observers)
    loss_curve = np.asarray(rerun.observables["loss"])
    reached = np.asarray(rerun.ts)
    if times is None:
        seed_index = plateau_indices(rerun.observables["grad_norm"])
        seeds = reached[seed_index]
    else:
        seeds = times
        seed_index = [int(np.searchsorted(reached, t)) for t in seeds]
    if len(seeds) == 0:
        return []
    if observe_state:
        states = np.asarray(rerun.observables["state"])[seed_index]
    else:
        states = np.asarray(_resolve(flow, traj, np.asarray(seeds), {"state": state})
                            .observables["state"])

    refined = []
    for t, x_seed in zip(seeds, states):
        x_seed = jnp.asarray(x_seed)
        x, loss, g = _refine(objective, x_seed, tol, max_steps, x_init.size <= dense_below)
        refined.append((float(t), x_seed, x, loss, g))

    points = []
    for k, (t, x_seed, x, loss, g) in enumerate(refined):
        w, V, method, low_top = _spectrum(objective, x, int(n_eigenvalues), dense_below)
        # Relative to the spectrum, and never below `tol`: where the whole Hessian vanishes (the
        # degenerate saddle at the origin of a model homogeneous of degree ≥ 3, the zero-loss
        # asymptote of a separable classifier) the index is 0, not a count of roundoff.
        index_tol = max(INDEX_RTOL * float(np.max(np.abs(w))), tol)
        negative = w < -index_tol
        # Complete when the low block reached an eigenvalue the index does not count (a flat
        # direction's roundoff, -1e-15 say, is not negative).
        complete = not low_top < -index_tol
        shown = w if w.size <= 2 * n_eigenvalues else np.concatenate(
            [w[:n_eigenvalues], w[-n_eigenvalues:]])
        after = refined[k + 1][3] if k + 1 < len(refined) else float(loss_curve[-1])
        drop = loss - after
        measured = predicted = lam = amplitude = None
        if drop > 0:
            measured = _crossing(reached, loss_curve, loss - drop / 2, t)
        if negative.any():
            lam = float(w[0])
            # The eigenspace of the most negative eigenvalue (repeated eigenvalues are the rule).
            same = np.abs(w - lam) <= 1e-6 * abs(lam)
            amplitude = float(np.linalg.norm(V[:, same].T @ np.asarray(x_seed - x)))
            if drop > 0 and amplitude > 0:
                r_exit = math.sqrt(drop / abs(lam))
                predicted = t + math.log(r_exit / amplitude) / abs(lam)
        seed_g = float(_loss_and_grad_norm(objective, x_seed)[1])
        points.append(CriticalPoint(
            t=t, model=flow.combine(unravel(x)), loss=loss, grad_norm=g, converged=g <= tol,
            distance=float(jnp.linalg.norm(x - x_seed)), seed_grad_norm=seed_g,
            eigenvalues=shown, index=int(negative.sum()), index_tol=index_tol,
            index_exact=complete, method=method,
            unstable_eigenvalue=lam, unstable_amplitude=amplitude, predicted_exit=predicted,
            measured_exit=measured,
        ))
    return points


def _resolve(flow: GradientFlow, traj: Trajectory, ts: np.ndarray, observers: dict):
    """`flow` re-integrated as `traj` was (its `SolveSpec`: the same solver, controller,
    transitions and steps), saving `observers` at `ts`."""
    spec = traj.spec
    if spec is None:  # a trajectory loaded from disk: its recorded settings
        spec = SolveSpec.from_options(flow, traj.t1, t0=traj.t0, solver=traj.solver,
                                      rtol=traj.rtol, atol=traj.atol)
    # To `t1` as the solve went (the same steps); short of it only where the solve stopped
    # short, at the last time asked for (nothing beyond is needed, and it may not be reached).
    t1 = spec.t1 if traj.status == "completed" or not float(ts[-1]) > spec.t0 else float(ts[-1])
    # Only what is read here is observed (observers do not change the steps; the transitions,
    # where the solve restarts, do).
    spec = dataclasses.replace(spec, t1=t1, ts=np.asarray(ts, dtype=np.float64),
                               observers=observers)
    out = solve(flow, spec)
    if out.status != "completed":
        raise InputError(
            f"re-integrating the flow to the seed times failed ({out.status}: {out.message})"
        )
    return out
