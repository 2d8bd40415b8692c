"""DOP853: Dormand and Prince's 8(5,3) Runge–Kutta method with its 7th-order dense output.

diffrax's `Dopri8` interpolates between steps with a polynomial that is far less accurate than
its steps (measured here at 50–150× its rtol at save times), so an 8th-order method was of no
use for observables saved between steps. DOP853 comes with a published 7th-order continuous
extension (three extra stages per step), so values at save times carry the steps' accuracy.

Coefficients: Hairer's `dop853.f` (E. Hairer, S. P. Nørsett, G. Wanner, *Solving Ordinary
Differential Equations I*, 2nd ed., Springer 1993, section II.10), to 30 digits; the tests
check them against an independent transcription (scipy's).
"""

from typing import ClassVar

import diffrax
import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, ArrayLike, PyTree


# fmt: off
_C = (
    0.0,
    0.526001519587677318785587544488e-01,
    0.789002279381515978178381316732e-01,
    0.118350341907227396726757197510,
    0.281649658092772603273242802490,
    0.333333333333333333333333333333,
    0.25,
    0.307692307692307692307692307692,
    0.651282051282051282051282051282,
    0.6,
    0.857142857142857142857142857142,
    1.0,
    1.0,
    0.1,
    0.2,
    0.777777777777777777777777777778,
)

_A_ENTRIES = (
    (1, 0, 5.26001519587677318785587544488e-2),
    (2, 0, 1.97250569845378994544595329183e-2),
    (2, 1, 5.91751709536136983633785987549e-2),
    (3, 0, 2.95875854768068491816892993775e-2),
    (3, 2, 8.87627564304205475450678981324e-2),
    (4, 0, 2.41365134159266685502369798665e-1),
    (4, 2, -8.84549479328286085344864962717e-1),
    (4, 3, 9.24834003261792003115737966543e-1),
    (5, 0, 3.7037037037037037037037037037e-2),
    (5, 3, 1.70828608729473871279604482173e-1),
    (5, 4, 1.25467687566822425016691814123e-1),
    (6, 0, 3.7109375e-2),
    (6, 3, 1.70252211019544039314978060272e-1),
    (6, 4, 6.02165389804559606850219397283e-2),
    (6, 5, -1.7578125e-2),
    (7, 0, 3.70920001185047927108779319836e-2),
    (7, 3, 1.70383925712239993810214054705e-1),
    (7, 4, 1.07262030446373284651809199168e-1),
    (7, 5, -1.53194377486244017527936158236e-2),
    (7, 6, 8.27378916381402288758473766002e-3),
    (8, 0, 6.24110958716075717114429577812e-1),
    (8, 3, -3.36089262944694129406857109825),
    (8, 4, -8.68219346841726006818189891453e-1),
    (8, 5, 2.75920996994467083049415600797e1),
    (8, 6, 2.01540675504778934086186788979e1),
    (8, 7, -4.34898841810699588477366255144e1),
    (9, 0, 4.77662536438264365890433908527e-1),
    (9, 3, -2.48811461997166764192642586468),
    (9, 4, -5.90290826836842996371446475743e-1),
    (9, 5, 2.12300514481811942347288949897e1),
    (9, 6, 1.52792336328824235832596922938e1),
    (9, 7, -3.32882109689848629194453265587e1),
    (9, 8, -2.03312017085086261358222928593e-2),
    (10, 0, -9.3714243008598732571704021658e-1),
    (10, 3, 5.18637242884406370830023853209),
    (10, 4, 1.09143734899672957818500254654),
    (10, 5, -8.14978701074692612513997267357),
    (10, 6, -1.85200656599969598641566180701e1),
    (10, 7, 2.27394870993505042818970056734e1),
    (10, 8, 2.49360555267965238987089396762),
    (10, 9, -3.0467644718982195003823669022),
    (11, 0, 2.27331014751653820792359768449),
    (11, 3, -1.05344954667372501984066689879e1),
    (11, 4, -2.00087205822486249909675718444),
    (11, 5, -1.79589318631187989172765950534e1),
    (11, 6, 2.79488845294199600508499808837e1),
    (11, 7, -2.85899827713502369474065508674),
    (11, 8, -8.87285693353062954433549289258),
    (11, 9, 1.23605671757943030647266201528e1),
    (11, 10, 6.43392746015763530355970484046e-1),
    (12, 0, 5.42937341165687622380535766363e-2),
    (12, 5, 4.45031289275240888144113950566),
    (12, 6, 1.89151789931450038304281599044),
    (12, 7, -5.8012039600105847814672114227),
    (12, 8, 3.1116436695781989440891606237e-1),
    (12, 9, -1.52160949662516078556178806805e-1),
    (12, 10, 2.01365400804030348374776537501e-1),
    (12, 11, 4.47106157277725905176885569043e-2),
    (13, 0, 5.61675022830479523392909219681e-2),
    (13, 6, 2.53500210216624811088794765333e-1),
    (13, 7, -2.46239037470802489917441475441e-1),
    (13, 8, -1.24191423263816360469010140626e-1),
    (13, 9, 1.5329179827876569731206322685e-1),
    (13, 10, 8.20105229563468988491666602057e-3),
    (13, 11, 7.56789766054569976138603589584e-3),
    (13, 12, -8.298e-3),
    (14, 0, 3.18346481635021405060768473261e-2),
    (14, 5, 2.83009096723667755288322961402e-2),
    (14, 6, 5.35419883074385676223797384372e-2),
    (14, 7, -5.49237485713909884646569340306e-2),
    (14, 10, -1.08347328697249322858509316994e-4),
    (14, 11, 3.82571090835658412954920192323e-4),
    (14, 12, -3.40465008687404560802977114492e-4),
    (14, 13, 1.41312443674632500278074618366e-1),
    (15, 0, -4.28896301583791923408573538692e-1),
    (15, 5, -4.69762141536116384314449447206),
    (15, 6, 7.68342119606259904184240953878),
    (15, 7, 4.06898981839711007970213554331),
    (15, 8, 3.56727187455281109270669543021e-1),
    (15, 12, -1.39902416515901462129418009734e-3),
    (15, 13, 2.9475147891527723389556272149),
    (15, 14, -9.15095847217987001081870187138),
)

_B3_ENTRIES = (
    (0, 0.244094488188976377952755905512),
    (8, 0.733846688281611857341361741547),
    (11, 0.220588235294117647058823529412e-1),
)

_E5_ENTRIES = (
    (0, 0.1312004499419488073250102996e-1),
    (5, -0.1225156446376204440720569753e+1),
    (6, -0.4957589496572501915214079952),
    (7, 0.1664377182454986536961530415e+1),
    (8, -0.3503288487499736816886487290),
    (9, 0.3341791187130174790297318841),
    (10, 0.8192320648511571246570742613e-1),
    (11, -0.2235530786388629525884427845e-1),
)

_D_ENTRIES = (
    (0, 0, -0.84289382761090128651353491142e+1),
    (0, 5, 0.56671495351937776962531783590),
    (0, 6, -0.30689499459498916912797304727e+1),
    (0, 7, 0.23846676565120698287728149680e+1),
    (0, 8, 0.21170345824450282767155149946e+1),
    (0, 9, -0.87139158377797299206789907490),
    (0, 10, 0.22404374302607882758541771650e+1),
    (0, 11, 0.63157877876946881815570249290),
    (0, 12, -0.88990336451333310820698117400e-1),
    (0, 13, 0.18148505520854727256656404962e+2),
    (0, 14, -0.91946323924783554000451984436e+1),
    (0, 15, -0.44360363875948939664310572000e+1),
    (1, 0, 0.10427508642579134603413151009e+2),
    (1, 5, 0.24228349177525818288430175319e+3),
    (1, 6, 0.16520045171727028198505394887e+3),
    (1, 7, -0.37454675472269020279518312152e+3),
    (1, 8, -0.22113666853125306036270938578e+2),
    (1, 9, 0.77334326684722638389603898808e+1),
    (1, 10, -0.30674084731089398182061213626e+2),
    (1, 11, -0.93321305264302278729567221706e+1),
    (1, 12, 0.15697238121770843886131091075e+2),
    (1, 13, -0.31139403219565177677282850411e+2),
    (1, 14, -0.93529243588444783865713862664e+1),
    (1, 15, 0.35816841486394083752465898540e+2),
    (2, 0, 0.19985053242002433820987653617e+2),
    (2, 5, -0.38703730874935176555105901742e+3),
    (2, 6, -0.18917813819516756882830838328e+3),
    (2, 7, 0.52780815920542364900561016686e+3),
    (2, 8, -0.11573902539959630126141871134e+2),
    (2, 9, 0.68812326946963000169666922661e+1),
    (2, 10, -0.10006050966910838403183860980e+1),
    (2, 11, 0.77771377980534432092869265740),
    (2, 12, -0.27782057523535084065932004339e+1),
    (2, 13, -0.60196695231264120758267380846e+2),
    (2, 14, 0.84320405506677161018159903784e+2),
    (2, 15, 0.11992291136182789328035130030e+2),
    (3, 0, -0.25693933462703749003312586129e+2),
    (3, 5, -0.15418974869023643374053993627e+3),
    (3, 6, -0.23152937917604549567536039109e+3),
    (3, 7, 0.35763911791061412378285349910e+3),
    (3, 8, 0.93405324183624310003907691704e+2),
    (3, 9, -0.37458323136451633156875139351e+2),
    (3, 10, 0.10409964950896230045147246184e+3),
    (3, 11, 0.29840293426660503123344363579e+2),
    (3, 12, -0.43533456590011143754432175058e+2),
    (3, 13, 0.96324553959188282948394950600e+2),
    (3, 14, -0.39177261675615439165231486172e+2),
    (3, 15, -0.14972683625798562581422125276e+3),
)
# fmt: on

_STAGES = 12  # stages of the 8th-order step; stage 12 is f(t1, y1) (first same as last)
_STAGES_EXTENDED = 16  # with the three stages of the dense output


def _tableau() -> dict[str, np.ndarray]:
    """The coefficients as dense float64 arrays (built once, at import)."""
    a = np.zeros((_STAGES_EXTENDED, _STAGES_EXTENDED))
    for i, j, value in _A_ENTRIES:
        a[i, j] = value
    b = a[_STAGES, :_STAGES].copy()  # row 12 of A holds the weights: stage 12 is at y1
    b3 = np.zeros(_STAGES + 1)
    for i, value in _B3_ENTRIES:
        b3[i] = value
    e3 = np.zeros(_STAGES + 1)
    e3[:_STAGES] = b
    e3 -= b3
    e5 = np.zeros(_STAGES + 1)
    for i, value in _E5_ENTRIES:
        e5[i] = value
    d = np.zeros((4, _STAGES_EXTENDED))
    for i, j, value in _D_ENTRIES:
        d[i, j] = value
    return dict(c=np.asarray(_C), a=a, b=b, e3=e3, e5=e5, d=d)


TABLEAU: dict[str, np.ndarray] = _tableau()


def _combine(weights: Array, stacked: PyTree[Array]) -> PyTree[Array]:
    """`Σ_j weights[j] · stacked[j]` leaf by leaf (the stage axis first)."""
    return jtu.tree_map(
        lambda k: jnp.tensordot(weights.astype(k.dtype), k[: weights.shape[0]], axes=1), stacked
    )


def _squared_norm(tree: PyTree[Array]) -> Array:
    return sum(jnp.sum(jnp.square(leaf)) for leaf in jtu.tree_leaves(tree))


class DOP853Interpolation(diffrax.AbstractLocalInterpolation):
    """DOP853's 7th-order dense output on one step.

    `y(t0 + θh) = y0 + θ(F0 + (1−θ)(F1 + θ(F2 + (1−θ)(F3 + θ(F4 + (1−θ)(F5 + θF6))))))`,
    with `F0 = y1 − y0`, `F1 = h f0 − F0`, `F2 = 2F0 − h(f0 + f1)` and `F3..F6 = h D·k` (Hairer's
    `contd8`).
    """

    t0: ArrayLike
    t1: ArrayLike
    y0: PyTree[Array]
    coeffs: PyTree[Array]  # per leaf, the seven F stacked on a leading axis

    def evaluate(self, t0, t1=None, left: bool = True) -> PyTree[Array]:
        del left
        if t1 is not None:
            return jtu.tree_map(jnp.subtract, self.evaluate(t1), self.evaluate(t0))
        h = self.t1 - self.t0
        theta = jnp.where(h == 0, 0.0, (t0 - self.t0) / jnp.where(h == 0, 1.0, h))

        def leaf(y0, f):
            x = theta.astype(f.dtype)
            y = jnp.zeros_like(y0)
            for i in range(f.shape[0] - 1, -1, -1):
                y = (y + f[i]) * (x if (f.shape[0] - 1 - i) % 2 == 0 else 1 - x)
            return y0 + y

        return jtu.tree_map(leaf, self.y0, self.coeffs)


class DOP853(diffrax.AbstractAdaptiveSolver):
    """Dormand and Prince's explicit Runge–Kutta method of order 8 (Hairer's DOP853).

    12 stages with first-same-as-last, an error estimate that combines embedded 5th- and
    3rd-order methods, and a 7th-order dense output from three more stages: 15 evaluations
    of the vector field per step (accepted or rejected), one more on a segment's first step.
    For ODEs (`diffrax.ODETerm`).

    The combined estimate is `err5 · ‖err5‖ / √(‖err5‖² + 0.01 ‖err3‖²)`, as Hairer's, except
    that the norms here are of the unscaled errors (the solver does not see the controller's
    rtol and atol); the factor is at most 1 and tends to `10 ‖err5‖/‖err3‖ = O(h³)`.

    **Arguments:**

    - `error_scale`: the error estimate is multiplied by this before the step-size controller
        sees it: the same as tolerances `error_scale` times tighter. With the combined estimate
        the global error reaches 10–100× rtol on gflow's flows (scipy's DOP853 as well), where
        Tsit5's stays within a few rtol; `solver="auto"` uses 10 (see `gflow.auto_solver`).
    """

    error_scale: float = eqx.field(static=True, default=1.0)

    term_structure: ClassVar = diffrax.AbstractTerm
    interpolation_cls: ClassVar = DOP853Interpolation

    def order(self, terms) -> int:
        """The method's order, 8."""
        del terms
        return 8

    def error_order(self, terms) -> int:
        """The order the step-size controller uses, 8."""
        # The combined estimate is O(h^8) (err5² / err3 ~ h^12 / h^4): the controller's exponent
        # is 1/8, as in Hairer's code.
        del terms
        return 8

    def init(self, terms, t0, t1, y0, args):
        """The solver state: whether the next step is a first one, and the stored `f(t0, y0)`."""
        del t1
        shapes = jax.eval_shape(lambda: terms.vf(t0, y0, args))
        return jnp.array(True), jtu.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def func(self, terms, t0, y0, args):
        """The vector field at `(t0, y0)`."""
        return terms.vf(t0, y0, args)

    def _error_factor(self, err5, err3, y0, y1) -> Array:
        """`‖err5‖ / √(‖err5‖² + 0.01 ‖err3‖²)`, 1 where both vanish."""
        del y0, y1
        n5, n3 = _squared_norm(err5), _squared_norm(err3)
        denom = jnp.sqrt(n5 + 0.01 * n3)
        return jnp.where(denom > 0, jnp.sqrt(n5) / jnp.where(denom > 0, denom, 1.0), 1.0)

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        """One step from `t0` to `t1`: the new state, its error estimate, the dense output and
        the new solver state (diffrax's `AbstractSolver.step` contract)."""
        first_step, f_stored = solver_state
        h = t1 - t0
        # The first stage is the last step's last one, except on a segment's first step or
        # after a jump; unvmap_any keeps this a real branch under vmap.
        f0 = jax.lax.cond(
            eqxi.unvmap_any(first_step | made_jump),
            lambda: terms.vf(t0, y0, args),
            lambda: f_stored,
        )
        dtype = jnp.result_type(*jtu.tree_leaves(f0))
        tab = {name: jnp.asarray(value, dtype=dtype) for name, value in TABLEAU.items()}
        ks = jtu.tree_map(
            lambda f: jnp.zeros((_STAGES_EXTENDED,) + f.shape, f.dtype).at[0].set(f), f0
        )

        def stage(ks, xs):
            # One traced evaluation of the vector field serves all 15 stages (compile time).
            index, a_row, c = xs
            y = jtu.tree_map(
                lambda y, dy: y + dy, y0, terms.prod(_combine(a_row, ks), h)
            )
            f = terms.vf(t0 + c * h, y, args)
            return jtu.tree_map(lambda k, fi: k.at[index].set(fi), ks, f), None

        indices = jnp.arange(1, _STAGES_EXTENDED)
        ks, _ = jax.lax.scan(stage, ks, (indices, tab["a"][1:], tab["c"][1:]))

        y1 = jtu.tree_map(lambda y, dy: y + dy, y0, terms.prod(_combine(tab["b"], ks), h))
        err5 = terms.prod(_combine(tab["e5"], ks), h)
        err3 = terms.prod(_combine(tab["e3"], ks), h)
        factor = self._error_factor(err5, err3, y0, y1) * self.error_scale
        y_error = jtu.tree_map(lambda e: e * factor.astype(e.dtype), err5)

        f1 = jtu.tree_map(lambda k: k[_STAGES], ks)
        delta = jtu.tree_map(jnp.subtract, y1, y0)
        hf0 = terms.prod(f0, h)
        hf1 = terms.prod(f1, h)
        high = terms.prod(jtu.tree_map(lambda k: jnp.tensordot(tab["d"], k, axes=1), ks), h)
        coeffs = jtu.tree_map(
            lambda dy, a, b, hd: jnp.concatenate(
                [jnp.stack([dy, a - dy, 2 * dy - (a + b)]), hd]
            ),
            delta, hf0, hf1, high,
        )
        dense_info = dict(y0=y0, coeffs=coeffs)
        return y1, y_error, dense_info, (jnp.array(False), f1), diffrax.RESULTS.successful
