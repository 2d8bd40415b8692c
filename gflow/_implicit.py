"""A matrix-free ESDIRK for stiff gradient flows: Newton on each stage, its linear systems
solved by conjugate gradients on Hessian-vector products.

A gradient flow's Jacobian is `-∇²L`, symmetric: each stage's Newton system
`(I + hγ∇²L) δ = r` is symmetric, and positive definite wherever `hγ` times the most negative
curvature stays below one (near a minimum always; at a saddle whenever the step resolves the
escape, which accuracy asks for anyway). Conjugate gradients (lineax's `CG`) solve it on
Hessian-vector products of a `jax.linearize` of the vector field at the step's start (a chord
Newton: one linearisation a step, reused by every stage and iteration). No matrix is formed.

The stages are those of Kværnø's ESDIRK methods (diffrax's `Kvaerno3/4/5` tableaux: explicit
first stage, stiffly accurate, L-stable, an embedded error estimate); Newton starts each stage
from diffrax's predictor. The dense output is the cubic Hermite polynomial through the step's
ends (`PolynomialInterpolation`, the representation `gflow`'s switching solver shares).
"""

import abc
import functools
from typing import ClassVar, NamedTuple

import diffrax
import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import numpy as np
import optimistix as optx
from jaxtyping import Array, PyTree

# Order of the work counters a step adds to (`WORK_FIELDS[i]` is `work[i]`).
WORK_FIELDS = ("gradients", "hvps", "newton_iterations", "krylov_iterations", "implicit_steps")
GRADIENTS, HVPS, NEWTON, KRYLOV, IMPLICIT_STEPS = range(len(WORK_FIELDS))

_TABLEAUX = {"kvaerno3": diffrax.Kvaerno3, "kvaerno4": diffrax.Kvaerno4,
             "kvaerno5": diffrax.Kvaerno5}

# Degree of the dense-output polynomials (Tsit5's continuous extension is quartic).
DEGREE = 4


def _rescale(t, t0, t1):
    dt = t1 - t0
    return jnp.where(dt == 0, 0.0, (t - t0) / jnp.where(dt == 0, 1.0, dt))


class PolynomialInterpolation(diffrax.AbstractLocalInterpolation):
    """`y(t0 + s (t1 - t0)) = Σ_m coeffs[m] s^(DEGREE - m)` on one step (highest power first,
    as `jnp.polyval`): the dense output both branches of `StiffSwitching` produce."""

    t0: Array
    t1: Array
    coeffs: PyTree[Array]

    def evaluate(self, t0, t1=None, left=True):
        """The interpolant at `t0`, or its increment from `t0` to `t1`."""
        del left
        if t1 is not None:
            return jtu.tree_map(lambda a, b: a - b, self.evaluate(t1), self.evaluate(t0))
        s = _rescale(t0, self.t0, self.t1)
        return jtu.tree_map(lambda c: jnp.polyval(c, s.astype(c.dtype)), self.coeffs)


def hermite_coefficients(y0, y1, k0, k1):
    """`PolynomialInterpolation` coefficients of the cubic Hermite interpolant with values
    `y0, y1` and increments `k0 = h y'(t0)`, `k1 = h y'(t1)` (a zero quartic term)."""

    def one(y0, y1, k0, k1):
        a = k0 + k1 + 2 * y0 - 2 * y1
        b = -2 * k0 - k1 - 3 * y0 + 3 * y1
        return jnp.stack([jnp.zeros_like(y0), a, b, k0, y0])

    return jtu.tree_map(one, y0, y1, k0, k1)


class AbstractNewtonKrylov(diffrax.AbstractImplicitSolver, diffrax.AbstractAdaptiveSolver):
    """A matrix-free implicit solver for gradient flows (Newton on Hessian-vector products),
    usable alone or as the implicit branch of `StiffSwitching`.

    Its solver state is a dict holding at least `work` (the counters of `WORK_FIELDS`); a
    step is `step_with_jvp`, which can also probe the Jacobian for the switching solver's
    stiffness tracking. The Newton tolerances are the step-size controller's (`rtol`, `atol`,
    `norm`), filled in by `diffrax.diffeqsolve` through `root_finder`.
    """

    root_finder: eqx.AbstractVar[optx.AbstractRootFinder]

    term_structure: ClassVar = diffrax.AbstractTerm
    interpolation_cls: ClassVar = PolynomialInterpolation

    def func(self, terms, t0, y0, args):
        """The vector field at `(t0, y0)`."""
        return terms.vf(t0, y0, args)

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        """One step from `t0` to `t1` (diffrax's solver interface)."""
        del made_jump
        y1, y_error, dense_info, state, result, _ = self.step_with_jvp(
            terms, t0, t1, y0, args, solver_state)
        return y1, y_error, dense_info, state, result

    @abc.abstractmethod
    def step_with_jvp(self, terms, t0, t1, y0, args, state, probe=None):
        """One step from `y0` at `t0` to `t1` from solver state `state`. Also returns
        `J @ probe` (one more Hessian-vector product) when a flat `probe` vector is given,
        for a caller tracking the stiffness.

        **Returns:**

        `(y1, y_error, dense_info, state, result, J @ probe or None)`, `state["work"]` the
        counters with this step's work added.
        """

    @abc.abstractmethod
    def blank_state(self, y0) -> dict:
        """A solver state for states shaped like `y0`, computing nothing: zeroed counters, to
        be `restart`ed before the first step."""

    def warming_up(self, state: dict):
        """Whether the solver is still building up after a `restart` (a multistep method's
        order and step): the switching solver does not judge its cost then. Never, here."""
        del state
        return jnp.asarray(False)

    @abc.abstractmethod
    def restart(self, state: dict, y0, f0) -> dict:
        """`state` made ready to step from `y0`, where the vector field is `f0` (pytrees),
        after steps that were not this solver's (the switching solver's Tsit5 steps); the
        counters are kept."""


class NewtonKrylovESDIRK(AbstractNewtonKrylov):
    """A stiff solver for gradient flows that never forms the Hessian.

    An ESDIRK method (Kværnø's, from diffrax's tableaux) whose stages are solved by chord
    Newton iterations, each linear system `(I - hγ J) δ = -r` (`J = -∇²L` for a gradient
    flow) by conjugate gradients on Jacobian-vector products of the vector field
    (`jax.linearize` once a step). Use it as `solver=` in `gflow.solve` (by name:
    `"esdirk"`), or let `solver="auto"` switch to it where explicit steps are held by
    stability.

    **Arguments:**

    - `method`: `"kvaerno5"` (default), `"kvaerno4"` or `"kvaerno3"`: the tableau.
    - `newton_tol`: a stage's Newton iteration stops once its (rate-corrected) change is below
        this fraction of the step's error tolerance.
    - `krylov_tol`: conjugate gradients stop once the residual's RMS, each component in units
        of its error scale (`atol + rtol |y|`) over `γ`, is below `krylov_tol`.
    - `root_find_max_steps`: Newton iterations per stage before the step is rejected (and
        retried smaller by the step-size controller).
    - `krylov_max_steps`: CG iterations per linear solve.

    The Newton tolerances are the step-size controller's (`rtol`, `atol`, `norm`), filled in
    by `diffrax.diffeqsolve` (`root_finder` holds them; its algorithm is not used).

    The solver state counts the work of the accepted steps (`WORK_FIELDS`: gradients,
    Hessian-vector products, Newton and CG iterations, steps); `gflow.solve` reports them in
    `stats`. A CG solve costs one product more than its iterations (lineax evaluates the
    initial residual).
    """

    method: str = eqx.field(static=True, default="kvaerno5")
    newton_tol: float = eqx.field(static=True, default=0.05)
    krylov_tol: float = eqx.field(static=True, default=0.01)
    root_finder: optx.AbstractRootFinder = diffrax.with_stepsize_controller_tols(
        diffrax.VeryChord)()
    root_find_max_steps: int = eqx.field(static=True, default=6)
    krylov_max_steps: int = eqx.field(static=True, default=50)

    def __check_init__(self):
        if self.method not in _TABLEAUX:
            raise ValueError(f"method must be one of {sorted(_TABLEAUX)}, got {self.method!r}")

    @property
    def tableau(self):
        """The Butcher tableau of `method` (diffrax's)."""
        return _TABLEAUX[self.method].tableau

    def order(self, terms):
        """The order of the method (its error estimate's is one less)."""
        return _TABLEAUX[self.method]().order(terms)

    def init(self, terms, t0, t1, y0, args):
        """The solver state: zeroed work counters and the initial Newton rate."""
        del terms, t0, t1, args
        return self.blank_state(y0)

    def blank_state(self, y0):
        """Zeroed work counters and the initial Newton contraction rate."""
        dtype = jnp.result_type(*jtu.tree_leaves(y0))
        return dict(work=jnp.zeros(len(WORK_FIELDS), dtype=int_dtype()),
                    rate=jnp.asarray(INITIAL_RATE, dtype))

    def restart(self, state, y0, f0):
        """`state` itself: a step needs nothing from the last (the Newton rate is kept)."""
        del y0, f0
        return state

    def step_with_jvp(self, terms, t0, t1, y0, args, state, probe=None):
        """One step from `y0` at `t0` to `t1`; the state's `rate` is the Newton contraction
        rate last measured (it decides whether a stage's first iteration has converged). The
        probe's product is at `y0`."""
        rate = state["rate"]
        tab = self.tableau
        h = t1 - t0
        flat0, unravel = jax.flatten_util.ravel_pytree(y0)
        dtype = flat0.dtype

        def vf(t, v):
            return jax.flatten_util.ravel_pytree(terms.vf(t, unravel(v), args))[0].astype(dtype)

        f0, jvp = jax.linearize(lambda v: vf(t0, v), flat0)
        rtol, atol, norm = self.root_finder.rtol, self.root_finder.atol, self.root_finder.norm
        scale = atol + rtol * jnp.abs(flat0)

        def scaled_norm(v):
            return norm(unravel(v / scale))

        gamma = float(tab.a_diagonal[1])
        hg = h * gamma
        struct = jax.ShapeDtypeStruct(flat0.shape, dtype)
        operator = lx.FunctionLinearOperator(
            lambda v: v - hg * jvp(v), struct, tags=lx.positive_semidefinite_tag
        )
        int_ = int_dtype()

        # CG stops once the residual's RMS, in units of the error scale, is below `krylov_tol`
        # (the operator's eigenvalues are >= 1 where it is positive definite, so the
        # solution's error is as small): a stage's first Newton iteration then solves its
        # linear part to the Newton tolerance, in the controller's own (RMS) norm.
        # A tolerance, not a function of the state: no derivative flows through it (lineax
        # refuses a solver with tangents, and forward-mode sensitivities run this solver).
        cg_atol = jax.lax.stop_gradient(self.krylov_tol * scale / gamma)

        def newton(base, k_guess, t_stage, rate):
            # Solve k = h f(base + γ k) for the stage increment k. Converged once the change,
            # times rate / (1 - rate) (what the remaining iterations would still change at
            # that contraction rate), is below `newton_tol`: on the first iteration with the
            # rate last measured, as Hairer & Wanner's RADAU5 does.
            def cond(c):
                return ~(c[3] | c[4])

            def body(c):
                k, it, dz_prev, _, _, krylov, rate = c
                fz = vf(t_stage, base + gamma * k)
                residual = k - h * fz
                cg = lx.CG(rtol=0.0, atol=cg_atol, norm=optx.rms_norm,
                           max_steps=self.krylov_max_steps, stabilise_every=None)
                sol = lx.linear_solve(operator, -residual, cg, throw=False)
                delta = sol.value
                dz = scaled_norm(gamma * delta)
                rate = jnp.where(it > 0, dz / dz_prev, rate)
                converged = (dz <= self.newton_tol) | (
                    (rate < 1) & (rate / (1 - rate) * dz <= self.newton_tol))
                finite = jnp.all(jnp.isfinite(delta))
                failed = (~finite) | ((it > 0) & (rate >= 1)) | (
                    (it + 1 >= self.root_find_max_steps) & ~converged
                )
                return (k + delta, it + 1, dz, converged & finite, failed,
                        krylov + sol.stats["num_steps"].astype(int_), rate)

            init = (k_guess, jnp.asarray(0, int_), jnp.asarray(jnp.inf, dtype),
                    jnp.asarray(False), jnp.asarray(False), jnp.asarray(0, int_),
                    jnp.asarray(rate, dtype))
            k, its, _, _, failed, krylov, rate = jax.lax.while_loop(cond, body, init)
            # Decays towards 1 between measurements (RADAU5's `faccon ** 0.8`): a rate
            # measured on an easy stage is not trusted forever.
            rate = jnp.maximum(rate, RATE_FLOOR) ** 0.8
            return k, its, krylov, failed, rate

        # The stages in one loop, so that the Newton iteration (a gradient and a CG solve on
        # Hessian-vector products) is traced and compiled once, not once per stage.
        # Combinations of stages are sums of products, not matrix products: those would run
        # at the backend's default matmul precision (TF32 on recent GPUs) in float32.
        stages = _stage_matrices(self.method)
        a, predictor = jnp.asarray(stages.a, dtype), jnp.asarray(stages.predictor, dtype)
        c_stage = jnp.asarray(stages.c, jnp.result_type(h))
        combine = lambda row, ks: jnp.sum(jnp.asarray(row, dtype)[:, None] * ks, axis=0)

        def stage(i, c):
            ks, newton_its, krylov_its, failed, rate = c
            base = flat0 + combine(a[i], ks)
            k_guess = combine(predictor[i], ks)
            k, its, krylov, fail, rate = newton(base, k_guess, t0 + c_stage[i] * h, rate)
            return (ks.at[i].set(k), newton_its + its, krylov_its + krylov, failed | fail,
                    rate)

        ks = jnp.zeros((len(stages.c),) + flat0.shape, dtype).at[0].set(h * f0)
        init = (ks, jnp.asarray(0, int_), jnp.asarray(0, int_), jnp.asarray(False),
                jnp.asarray(rate, dtype))
        ks, newton_its, krylov_its, failed, rate = jax.lax.fori_loop(
            1, len(stages.c), stage, init)
        # Stiffly accurate: the last stage is the step's end.
        y1_flat = flat0 + combine(stages.b_sol, ks)
        err = combine(stages.b_error, ks)
        # A failed Newton iteration rejects the step: the controller retries it smaller.
        err = jnp.where(failed, jnp.inf, err)
        y1 = unravel(y1_flat)
        y_error = unravel(err)
        dense_info = dict(coeffs=hermite_coefficients(y0, y1, unravel(ks[0]), unravel(ks[-1])))
        probed = None if probe is None else jvp(probe)
        work = jnp.stack([
            1 + newton_its,  # the linearisation's primal, one gradient per Newton iteration
            # CG products plus lineax's initial residual per solve; the probe
            newton_its + krylov_its + (0 if probe is None else 1),
            newton_its,
            krylov_its,
            jnp.asarray(1, int_),
        ]).astype(int_)
        state = dict(work=state["work"] + work, rate=rate)
        return y1, y_error, dense_info, state, diffrax.RESULTS.successful, probed


class _Stages(NamedTuple):
    a: np.ndarray  # (s, s): row i the coefficients of stage i's base (strictly lower)
    predictor: np.ndarray  # (s, s): row i the coefficients of stage i's Newton start
    c: np.ndarray  # (s,): the stages' times, as fractions of the step
    b_sol: np.ndarray  # (s,)
    b_error: np.ndarray  # (s,)


@functools.cache
def _stage_matrices(method: str) -> _Stages:
    """A Kværnø tableau as dense arrays (stage 0 explicit; the diagonal γ is Newton's)."""
    tab = _TABLEAUX[method].tableau
    s = len(tab.c) + 1
    a, predictor = np.zeros((s, s)), np.zeros((s, s))
    for i in range(1, s):
        a[i, :i] = tab.a_lower[i - 1]
        predictor[i, :i] = tab.a_predictor[i - 1]
    return _Stages(a, predictor, np.concatenate([[0.0], tab.c]), np.asarray(tab.b_sol),
                   np.asarray(tab.b_error))


def int_dtype():
    """The integer dtype of the work counters (int64 under x64)."""
    return jnp.zeros((), jnp.int64 if jax.config.jax_enable_x64 else jnp.int32).dtype


# The Newton contraction rate assumed before any is measured, and the smallest trusted.
INITIAL_RATE = 0.5
RATE_FLOOR = 1e-3


def _check_tableaux():
    # Every Kværnø tableau here is stiffly accurate with a constant diagonal after an explicit
    # first stage: what `step_with_jvp` assumes.
    for cls in _TABLEAUX.values():
        tab = cls.tableau
        assert tab.a_diagonal[0] == 0 and np.all(tab.a_diagonal[1:] == tab.a_diagonal[1])
        assert np.allclose(tab.b_sol, np.append(tab.a_lower[-1], tab.a_diagonal[-1]))


_check_tableaux()
