"""Problem builder for deep linear networks (docs/science.md §5)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Scalar

from .. import observers as obs
from .._errors import InputError
from .._flow import GradientFlow
from .._scaling import ScalingLaw
from .._solve import Transition
from ..models import DeepLinear, deep_linear_loss, whitened_target
from ..theory import saxe_half_rise_time, saxe_mode, two_layer_learning_times
from ._problem import Problem, comparison


def _layer_imbalance(model: DeepLinear):
    """`W_{k+1}ᵀ W_{k+1} − W_k W_kᵀ` for each pair of layers: conserved by the flow."""
    return jnp.stack(
        [b.T @ b - a @ a.T for a, b in zip(model.weights[:-1], model.weights[1:])]
    )


def _product(model: DeepLinear):
    return model.product()


def _weights(model: DeepLinear):
    return model.weights


def _imbalance(model: DeepLinear, data):
    del data
    return _layer_imbalance(model)


class _SingularValueRise(eqx.Module):
    """Transition condition: singular value `k + 1` of `P = W_D⋯W_1` minus `level`.

    A module with array fields rather than a closure: every member of a sweep builds an equal
    one (the level and basis are data), so all members share one compiled program.

    diffrax evaluates the condition at every step end, and a 16×16 SVD costs more than the
    gradient; but far from the crossing its sign is certain without one. By Eckart–Young,
    `σ_{k+1}(P)² ≤ ‖P − P V Vᵀ‖_F² = ‖P‖_F² − ‖P V‖_F²` for any `k` orthonormal columns `V`
    (here the target's top `k` right singular vectors, which the learned modes align with).
    Where that bound is below `level` (with a margin far above rounding), the condition is
    certainly negative and the bound minus `level` is returned: the same sign everywhere and
    the same root (at the root the bound is at least `level`, so the SVD branch is taken
    there, and so are the derivatives the sensitivity analysis takes), at the cost of a matrix
    product. Under `vmap` both branches run.
    """

    k: int = eqx.field(static=True)
    level: Array
    basis: Array  # (in, k): the target's top k right singular vectors

    def __call__(self, model: DeepLinear, data) -> Scalar:
        del data
        product = model.product()
        residual = jnp.sum(jnp.square(product)) - jnp.sum(jnp.square(product @ self.basis))
        certain = residual < (1 - 1e-8) * jnp.square(self.level)
        return jax.lax.cond(
            certain,
            lambda: jnp.sqrt(jnp.maximum(residual, 0.0)) - self.level,
            lambda: jnp.linalg.svd(product, compute_uv=False)[self.k] - self.level,
        )


def deep_linear(
    *,
    depth: int,
    width: int,
    singular_values: tuple[float, ...],
    init: str,
    eps: float,
    seed: int,
) -> Problem:
    """A depth-`depth` linear network of width `width` fitting a target with the given
    singular values; each mode's half-rise is a transition. The `singular_values` figure
    carries the levels `s_k`, `s_k/2` and, for depth 2, Saxe's closed-form rise of each mode
    (`gflow.theory.saxe_mode` from the u0 its t½ prediction uses) as dashed curves.

    **Arguments:**

    - `depth`: number of weight matrices (≥ 2).
    - `width`: input, hidden and output width.
    - `singular_values`: the target's non-zero singular values, distinct and positive.
    - `init`: `"random"` (entries N(0, eps²)) or `"aligned"` (balanced, SVD-aligned, every
        factor carrying `eps` of each mode, which starts at strength `eps^depth`; Saxe's closed
        form holds exactly for depth 2).
    - `eps`: the init scale of every weight (gflow's one convention, see `gflow.ScalingLaw`).
    - `seed`: seeds the target's singular vectors and the init.
    """
    s = np.asarray(singular_values, dtype=np.float64)
    if depth < 2 or width < 1:
        raise InputError(f"problem.depth must be >= 2 and problem.width >= 1, got {depth}, {width}")
    if s.size == 0 or s.size > width or np.any(s <= 0) or len(set(s.tolist())) != s.size:
        raise InputError("problem.singular_values must be distinct, positive and at most width")
    if not eps > 0:
        raise InputError(f"problem.eps must be positive, got {eps}")
    if init not in ("random", "aligned"):
        raise InputError(f"problem.init must be 'random' or 'aligned', got {init!r}")
    order = np.argsort(-s)
    s = s[order]
    key_target, key_init = jax.random.split(jax.random.key(seed))
    target = whitened_target(s, (width, width), key_target)
    if init == "random":
        model = DeepLinear.random((width,) * (depth + 1), eps, key_init)
    else:
        model = DeepLinear.balanced_aligned(target, depth, eps**depth, hidden=width)

    # Module-level functions (not closures): observers equal across members of a sweep.
    observers = {
        "singular_values": obs.singular_values(_product),
        "layer_norms": obs.frobenius_norm(_weights),
        "imbalance_drift": obs.conserved(_imbalance, model),
    }
    transitions, criteria = [], {}
    right = np.linalg.svd(np.asarray(target))[2][: s.size].T  # (in, r), ordered as s
    for k, s_k in enumerate(s):
        name = f"mode{k + 1}_learned"
        condition = _SingularValueRise(k, jnp.asarray(s_k / 2), jnp.asarray(right[:, :k]))
        transitions.append(Transition(name, condition, direction=True))
        criteria[name] = f"singular value {k + 1} of W_D⋯W_1 rises through s_{k + 1}/2 = {s_k / 2:g}"

    # Saxe's theory (depth 2): each mode follows `saxe_mode` from its initial strength u0,
    # exactly on the balanced aligned manifold, else from the effective start of the
    # linearised flow (first order in the init scale).
    if depth == 2 and init == "aligned":
        u0 = np.full(s.size, eps**depth)
        times = [saxe_half_rise_time(s_k, u0_k) for s_k, u0_k in zip(s, u0)]
        basis = "Saxe et al.'s closed form t½ = ln(s/u0 − 1)/(2s), exact on this manifold"
        accuracy = "exact"
    elif depth == 2:
        times, _, u0 = two_layer_learning_times(*model.weights, target)
        basis = "decoupled-mode learning times, first order in the init scale"
        accuracy = "first order in init"

    def predict(traj):
        if depth != 2:
            return {}
        return {
            f"mode{k + 1}_learned": comparison(
                times[k], traj.transitions[f"mode{k + 1}_learned"], basis)
            for k in range(s.size)
        }

    def references(traj):
        # The target's singular values and the half-rise levels, then (depth 2) each mode's
        # closed-form rise at the save times: the k-th curve follows singular value k.
        levels = ({f"s_{k + 1}": s_k for k, s_k in enumerate(s)}
                  | {f"s_{k + 1}/2": s_k / 2 for k, s_k in enumerate(s)})
        if depth == 2:
            levels |= {f"Saxe s={s_k:g} ({accuracy})": saxe_mode(traj.ts, s_k, u0_k)
                       for s_k, u0_k in zip(s, u0)}
        # The loss plateaus between stages: with modes 1..m learned, L = ½ Σ_{k>m} s_k².
        plateaus = {f"plateau, {m} of {s.size} modes learned": 0.5 * float(np.sum(s[m:] ** 2))
                    for m in range(s.size)}
        return {"singular_values": levels, "loss": plateaus}
    # Each factor grows like e^{s t} from eps: log law of slope 1/s for two factors, power
    # law of exponent -(depth - 2) for more.
    scaling = {
        f"mode{k + 1}_learned": ScalingLaw.of_factors(
            depth, rate=s_k,
            basis=f"ln(1/eps)/s_{k + 1} as eps -> 0 (Saxe, u0 ∝ eps²)" if depth == 2
            else f"eps^-{depth - 2} as eps -> 0 (du/dt = D u^(2-2/D)(s - u), u0 ∝ eps^D)")
        for k, s_k in enumerate(s)
    }
    flow = GradientFlow(model, deep_linear_loss, target)
    return Problem(flow, observers, tuple(transitions), criteria, predict,
                   references=references, scaling=scaling)
