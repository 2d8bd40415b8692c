"""A matrix-free variable-order BDF for stiff gradient flows: one chord Newton iteration a
step, usually, its linear system solved by conjugate gradients on Hessian-vector products.

The method is Shampine & Reichelt's NDF/BDF of orders 1–5 in backward-difference form (the
form of MATLAB's `ode15s` and scipy's `BDF`): the solver state holds the differences
`D[j] = ∇ʲ y_n` of the interpolating polynomial on a grid of spacing `h`, the predictor is
`Σ_{j≤q} D[j]`, and a step solves `d = c f(y_pred + d) − ψ` for the correction `d`
(`c = h / α_q`, `ψ` from the history). diffrax's controller picks each step size, so the
history is re-sampled at the new spacing at the start of each step (exactly: the same
polynomial at new nodes); a rejected step leaves the state as it was.

Newton's matrix `I − c J` (`J = −∇²L`, symmetric) is applied through a `jax.linearize` of
the vector field at the predictor, whose primal output is the first iteration's `f`: a step
that converges in one iteration costs one gradient and one conjugate-gradient solve. The
iteration is converged once its correction times `ρ / (1 − ρ)`, with `ρ` the contraction rate
last measured, is a tenth of the error tolerance (as SUNDIALS CVODE tests it, on the first
iteration too), and CG stops at a fifth of that
(`krylov_tol`; CVODE's GMRES stops at 5%).

Step size and order: the error estimate of order `q` is `C_{q+1} d` (`C` the error constants).
After `q + 1` steps at an order, the estimates at `q − 1` and `q + 1` (from `D[q]` and
`∇^{q+2} y`) choose the order whose step could grow most (scipy's rule). diffrax's
controller sees one error norm and a fixed error order `E`; this solver reports an error whose
norm is `ε^(E / (q' + 1))` for the chosen order's estimate `ε` (for the current order's on a
rejected step), so that the controller's step for order `E` is the step this order wants, and
accepts exactly when the current order's estimate is below one. This keeps the one controller
`gflow.solve` builds (and shares with Tsit5 inside `StiffSwitching`), whatever its PID
coefficients; a controller of its own would need the solver's order each step, which diffrax's
controller interface does not pass (its error order is fixed per solve).
"""

import functools

import diffrax
import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import lineax as lx
import numpy as np
import optimistix as optx

from ._implicit import (
    DEGREE, INITIAL_RATE, RATE_FLOOR, WORK_FIELDS, AbstractNewtonKrylov, int_dtype,
)

MAX_ORDER = 5
# Rows of the difference array: orders 0..MAX_ORDER, and ∇^{q+1}, ∇^{q+2} for order choice.
_ROWS = MAX_ORDER + 3
# Shampine & Reichelt's NDF coefficients κ_q (κ = 0 is the BDF); NDF5 is BDF5.
_NDF_KAPPA = np.array([0.0, -0.1850, -1 / 9, -0.0823, -0.0415, 0.0])


@functools.cache
def _coefficients(ndf: bool):
    """`(γ, α, C)`: γ_q = Σ_{j≤q} 1/j, α_q = (1 − κ_q) γ_q and the error constants
    C_q = κ_q γ_q + 1/(q + 1), indexed by order 0..MAX_ORDER (C also at MAX_ORDER + 1)."""
    kappa = _NDF_KAPPA if ndf else np.zeros(MAX_ORDER + 1)
    gamma = np.concatenate([[0.0], np.cumsum(1 / np.arange(1, MAX_ORDER + 1))])
    alpha = (1 - kappa) * gamma
    error = np.concatenate([kappa * gamma + 1 / np.arange(1, MAX_ORDER + 2), [np.inf]])
    return gamma, alpha, error


def _resample_matrix(order, factor):
    """`T` with `T @ D[:MAX_ORDER + 1]` the differences of the same order-`order` polynomial
    on a grid `factor` times as wide (scipy's `change_D`: `(R(factor) U)ᵀ`), identity on rows
    above `order`."""
    i = jnp.arange(1, MAX_ORDER + 1)[:, None]
    j = jnp.arange(1, MAX_ORDER + 1)[None, :]

    def r(f):
        m = jnp.zeros((MAX_ORDER + 1, MAX_ORDER + 1), jnp.result_type(f))
        m = m.at[0].set(1).at[1:, 1:].set((i - 1 - f * j) / i)
        return jnp.cumprod(m, axis=0)

    inside = jnp.arange(MAX_ORDER + 1) <= order
    both = inside[:, None] & inside[None, :]
    ru = jnp.matmul(jnp.where(both, r(factor), 0), jnp.where(both, r(jnp.ones_like(factor)), 0),
                    precision=jax.lax.Precision.HIGHEST)
    return jnp.where(both, ru.T, jnp.eye(MAX_ORDER + 1, dtype=ru.dtype))


@functools.cache
def _dense_matrices():
    """`(W, M)`: `W[k, j] = Π_{i<j} (s_k − 1 + i)/(i + 1)` (j ≥ 1), the weight of `D[j]`
    (differences at the step's end) in the interpolant at `s_k = ¼, ½, ¾, 1` (fractions of the
    step), whose value there is `y1 + Σ_j W[k, j] D[j]`; `M`
    maps the interpolant's values less `y0` at `s = ¼, ½, ¾, 1` to the monomial coefficients
    of `s⁴ … s` (`PolynomialInterpolation`, whose constant term is `y0` itself)."""
    nodes = np.arange(1, DEGREE + 1) / DEGREE  # 1/4, 1/2, 3/4, 1
    w = np.ones((DEGREE, MAX_ORDER + 1))
    for j in range(1, MAX_ORDER + 1):
        w[:, j] = w[:, j - 1] * (nodes - 1 + (j - 1)) / j
    w[:, 0] = 0.0  # D[0] = y1 enters through the values less y0: y1 - y0
    vandermonde = nodes[:, None] ** np.arange(DEGREE, 0, -1)[None, :]
    return w, np.linalg.inv(vandermonde)


class NewtonKrylovBDF(AbstractNewtonKrylov):
    """A variable-step, variable-order (1–5) NDF/BDF for gradient flows that never forms the
    Hessian: each step's Newton system `(I − c J) δ = r` (`J = −∇²L`) is solved by conjugate
    gradients on Jacobian-vector products of one `jax.linearize` of the vector field at the
    predictor. Use it as `solver=` in `gflow.solve` (by name: `"bdf"`) or as the implicit
    branch of `StiffSwitching`.

    **Arguments:**

    - `ndf`: Klopfenstein–Shampine NDFs (default; smaller error constants, as `ode15s` and
        scipy's `BDF`) or the plain BDFs (`False`, as CVODE).
    - `max_order`: the highest order used (1–5).
    - `newton_tol`: Newton's iteration stops once its correction times `ρ / (1 − ρ)` (`ρ` the
        contraction rate, on the first iteration the one last measured) is this fraction of
        the error tolerance (CVODE: 0.1).
    - `krylov_tol`: CG stops once the residual is this fraction of Newton's tolerance
        (CVODE's GMRES: 0.05), each component in units of its error scale
        (`atol + rtol |y|`).
    - `root_find_max_steps`: Newton iterations per step before the step is rejected (and
        retried smaller by the step-size controller).
    - `krylov_max_steps`: CG iterations per linear solve.
    - `warmup_steps`: steps after a restart (at order 1) during which `StiffSwitching` does
        not judge this solver's cost (reaching order 5 takes at least 14).

    The controller must be diffrax's `PIDController` with the error order diffrax infers
    (`order`, 5): the reported error is scaled so that its step suits the current order. The
    solver state counts the work of the accepted steps (`WORK_FIELDS`; a CG solve costs one
    product more than its iterations, lineax's initial residual) and, standing alone, one
    gradient at each (re)start.
    """

    ndf: bool = eqx.field(static=True, default=True)
    max_order: int = eqx.field(static=True, default=MAX_ORDER)
    newton_tol: float = eqx.field(static=True, default=0.1)
    krylov_tol: float = eqx.field(static=True, default=0.2)
    root_finder: optx.AbstractRootFinder = diffrax.with_stepsize_controller_tols(
        diffrax.VeryChord)()
    root_find_max_steps: int = eqx.field(static=True, default=4)
    krylov_max_steps: int = eqx.field(static=True, default=50)
    warmup_steps: int = eqx.field(static=True, default=15)

    def __check_init__(self):
        if not 1 <= self.max_order <= MAX_ORDER:
            raise ValueError(f"max_order must be in 1..{MAX_ORDER}, got {self.max_order!r}")

    def order(self, terms):
        """The highest order (the controller's error order: see the class)."""
        return MAX_ORDER

    def init(self, terms, t0, t1, y0, args):
        """A state at order 1 from `y0` and the vector field there (one gradient)."""
        del t1
        state = self.restart(self.blank_state(y0), y0, terms.vf(t0, y0, args))
        return dict(state, work=state["work"].at[0].add(1))

    def blank_state(self, y0):
        """Zeroed counters and history."""
        flat, _ = jax.flatten_util.ravel_pytree(y0)
        return dict(
            work=jnp.zeros(len(WORK_FIELDS), int_dtype()),
            rate=jnp.asarray(INITIAL_RATE, flat.dtype),
            differences=jnp.zeros((_ROWS,) + flat.shape, flat.dtype),
            spacing=jnp.asarray(1.0, flat.dtype),
            order=jnp.asarray(1, int_dtype()),
            steps=jnp.asarray(0, int_dtype()),
            age=jnp.asarray(0, int_dtype()),
        )

    def restart(self, state, y0, f0):
        """Order 1 from `y0`, with `f0` as the first difference on a grid of spacing 1 (exactly
        re-sampled to the first step); the counters and Newton rate are kept."""
        flat = jax.flatten_util.ravel_pytree(y0)[0]
        f = jax.flatten_util.ravel_pytree(f0)[0].astype(flat.dtype)
        diff = jnp.zeros_like(state["differences"]).at[0].set(flat).at[1].set(f)
        return dict(state, differences=diff, spacing=jnp.ones_like(state["spacing"]),
                    order=jnp.ones_like(state["order"]), steps=jnp.zeros_like(state["steps"]),
                    age=jnp.zeros_like(state["age"]))

    def warming_up(self, state):
        """Fewer than `warmup_steps` steps since the last restart."""
        return state["age"] < self.warmup_steps

    def step_with_jvp(self, terms, t0, t1, y0, args, state, probe=None):
        """One step to `t1`; the probe's product is at the predictor."""
        gamma, alpha, error_const = (jnp.asarray(x) for x in _coefficients(self.ndf))
        h = t1 - t0
        flat0, unravel = jax.flatten_util.ravel_pytree(y0)
        dtype = flat0.dtype
        int_ = int_dtype()
        q = state["order"]
        rows = jnp.arange(_ROWS)

        # The history at spacing h: the order-q polynomial re-sampled, and ∇^{q+1} (the last
        # correction, for the order-(q+1) estimate) scaled by its leading power, as CVODE does.
        ratio = (h / state["spacing"]).astype(dtype)
        old = state["differences"]
        resampled = jnp.tensordot(_resample_matrix(q, ratio).astype(dtype), old[: MAX_ORDER + 1],
                                  axes=1, precision=jax.lax.Precision.HIGHEST)
        diff = old.at[: MAX_ORDER + 1].set(resampled)
        diff = diff.at[q + 1].multiply(ratio ** (q + 1).astype(dtype))
        up_to_q = (rows <= q)[:, None]
        y_pred = jnp.sum(jnp.where(up_to_q, diff, 0), axis=0)
        weights = jnp.where((rows >= 1) & (rows <= q), jnp.pad(gamma, (0, _ROWS - len(gamma))),
                            0).astype(dtype)
        psi = jnp.tensordot(weights, diff, axes=1, precision=jax.lax.Precision.HIGHEST) / alpha[q]
        c = (h / alpha[q]).astype(dtype)

        def vf(v):
            return jax.flatten_util.ravel_pytree(terms.vf(t1, unravel(v), args))[0].astype(dtype)

        f_pred, jvp = jax.linearize(vf, y_pred)
        rtol, atol, norm = self.root_finder.rtol, self.root_finder.atol, self.root_finder.norm
        scale = atol + rtol * jnp.abs(y_pred)

        def scaled_norm(v):
            return norm(unravel(v / scale))

        operator = lx.FunctionLinearOperator(
            lambda v: v - c * jvp(v), jax.ShapeDtypeStruct(flat0.shape, dtype),
            tags=lx.positive_semidefinite_tag)
        # Newton's tolerance on its correction: `newton_tol` of the error test's, in which the
        # correction counts C_q times. A tolerance, not a function of the state: no derivative
        # flows through it (lineax refuses a solver with tangents).
        tol = jax.lax.stop_gradient(self.newton_tol / error_const[q])
        cg = lx.CG(rtol=0.0, atol=jax.lax.stop_gradient(self.krylov_tol * tol * scale),
                   norm=optx.rms_norm, max_steps=self.krylov_max_steps, stabilise_every=None)

        def cond(carry):
            return ~(carry[3] | carry[4])

        def body(carry):
            d, rhs, dz_prev, _, _, its, krylov, rate = carry
            # The right-hand side as the first guess: exact along the slow directions (c J
            # small there), so CG's initial residual is c J rhs, the stiff part alone. (A
            # guess only: lineax takes no derivative through it.)
            sol = lx.linear_solve(operator, rhs, cg, options=dict(y0=jax.lax.stop_gradient(rhs)),
                                  throw=False)
            delta = sol.value
            dz = scaled_norm(delta)
            rate = jnp.where(its > 0, dz / dz_prev, rate)
            d = d + delta
            its = its + 1
            finite = jnp.all(jnp.isfinite(delta))
            converged = finite & ((dz == 0) | ((rate < 1) & (rate / (1 - rate) * dz <= tol)))
            failed = (~finite) | ((its > 1) & (rate >= 1)) | (
                (its >= self.root_find_max_steps) & ~converged)
            going = ~(converged | failed)
            # The next iteration's residual, at the corrected state: a gradient, evaluated
            # only when some (vmapped) member iterates again.
            rhs = jax.lax.cond(eqx.internal.unvmap_any(going),
                               lambda: c * vf(y_pred + d) - psi - d, lambda: rhs)
            krylov = krylov + sol.stats["num_steps"].astype(int_)
            return d, rhs, dz, converged, failed, its, krylov, rate

        init = (jnp.zeros_like(flat0), c * f_pred - psi, jnp.asarray(jnp.inf, dtype),
                jnp.asarray(False), jnp.asarray(False), jnp.asarray(0, int_),
                jnp.asarray(0, int_), jnp.asarray(state["rate"], dtype))
        d, _, _, _, failed, its, krylov, rate = jax.lax.while_loop(cond, body, init)
        # Decays towards 1 between measurements (RADAU5's `faccon ** 0.8`).
        rate = jnp.maximum(rate, RATE_FLOOR) ** 0.8
        y1_flat = y_pred + d

        # The differences at t1: ∇^{q+1} y_1 = d, ∇^{q+2} y_1 = d − ∇^{q+1} y_0, and
        # ∇^j y_1 = ∇^j y_0 + ∇^{j+1} y_1 downwards.
        new = diff.at[q + 2].set(d - diff[q + 1]).at[q + 1].set(d)

        def add_down(k, x):
            j = MAX_ORDER - k
            return jnp.where(j <= q, x.at[j].add(x[j + 1]), x)

        new = jax.lax.fori_loop(0, MAX_ORDER + 1, add_down, new)

        # Error estimates in the controller's norm and scale.
        y1 = unravel(y1_flat)
        err_scale = atol + rtol * jnp.maximum(jnp.abs(flat0), jnp.abs(y1_flat))
        estimate = lambda v: norm(unravel(v / err_scale))
        err = error_const[q] * d
        err_q = estimate(err)
        err_down = jnp.where(q > 1, estimate(error_const[q - 1] * new[q]), jnp.inf)
        err_up = jnp.where(q < self.max_order,
                           estimate(error_const[jnp.minimum(q + 1, MAX_ORDER)] * new[q + 2]),
                           jnp.inf)
        # scipy's rule: after q + 1 steps at this order, the order whose step grows most.
        decide = state["steps"] + 1 >= q + 1
        growth = jnp.stack([err_down, err_q, err_up]) ** (-1.0 / (jnp.arange(3) + q).astype(dtype))
        growth = jnp.where(decide | (jnp.arange(3) == 1), growth, 0)
        pick = jnp.argmax(growth)
        accepted = err_q < 1
        controller_order = self.order(terms)
        reported = jnp.where(accepted, growth[pick] ** -controller_order,
                             err_q ** (controller_order / (q + 1).astype(dtype)))
        y_error = jnp.where(err_q > 0, err * (reported / jnp.where(err_q > 0, err_q, 1)), 0)
        y_error = jnp.where(failed, jnp.inf, y_error)
        new_order = q + pick.astype(int_) - 1

        # Dense output: the order-q interpolant on the step, fitted at DEGREE + 1 points.
        w, m = _dense_matrices()
        w = jnp.where(jnp.arange(MAX_ORDER + 1) <= q, jnp.asarray(w, dtype), 0)
        values = (y1_flat - flat0)[None] + jnp.tensordot(
            w, new[: MAX_ORDER + 1], axes=1, precision=jax.lax.Precision.HIGHEST)
        coeffs = jnp.tensordot(jnp.asarray(m, dtype), values, axes=1,
                               precision=jax.lax.Precision.HIGHEST)
        coeffs = jnp.concatenate([coeffs, flat0[None]])
        dense_info = dict(coeffs=jax.vmap(unravel)(coeffs))

        probed = None if probe is None else jvp(probe)
        work = jnp.stack([
            its,  # the linearisation's primal, then one gradient per further iteration
            its + krylov + (0 if probe is None else 1),  # CG products + initial residuals
            its,
            krylov,
            jnp.asarray(1, int_),
        ]).astype(int_)
        new_state = dict(
            work=state["work"] + work,
            rate=rate,
            differences=new,
            spacing=jnp.asarray(h, dtype),
            order=new_order,
            steps=jnp.where(new_order == q, state["steps"] + 1, 0).astype(int_),
            age=state["age"] + 1,
        )
        return y1, unravel(y_error), dense_info, new_state, diffrax.RESULTS.successful, probed
