"""`Precision`: the floating-point types a solve computes in, and what they can resolve.

Three policies, one object (`gflow.Precision`), resolved once from a string or given as is:

- `"float64"`: everything in float64 (gflow's default).
- `"mixed"`: time, state, the Runge–Kutta combinations and the error norm in float64; the loss,
  its gradient (and, with `gd_step`, its Hessian-vector product) in float32 under an explicit
  matmul precision. The velocity is the float64 cast of the float32 gradient at the float32
  cast of the float64 state.
- `"float32"`: everything in float32, time included (the solve runs with JAX's x64 off); the
  float64 init is cast, so every policy starts from the same numbers.

A float32 gradient carries rounding error; an error-controlled solver asked for more accuracy
than that error allows only chases noise (steps shrink, the error bars lie). So each
non-float64 policy has a tolerance floor, measured at the initial state: `rtol_floor(flow)` is
`FLOOR_SAFETY` times the relative difference of the float32 velocity from float64's (the
largest over the trainable leaves, at least float32's epsilon), and a solve asked for a
tighter `rtol` is refused.

The sums over samples are whatever the user's loss does (`jnp.mean` in float32): their
rounding is part of the measured gradient error, hence of the floor.
"""

import contextlib
import functools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import PyTree

from ._errors import InputError


POLICIES = ("float64", "mixed", "float32")
# JAX's names for the precision of float32 matrix products (`jax.default_matmul_precision`):
# "highest" is strict float32 on GPU (no TF32) and six bfloat16 passes on TPU; "high" three
# bfloat16 passes (TPU) or TF32 (GPU); "default" is TF32 on recent GPUs, one bfloat16 pass on
# TPU. On CPU all are float32.
MATMUL_PRECISIONS = ("highest", "float32", "high", "bfloat16_3x", "tensorfloat32", "default",
                     "bfloat16")
# The floor is this many times the measured relative gradient error: the trajectory's own
# error then dominates the rounding in every error estimate the controller makes.
FLOOR_SAFETY = 10.0
_EPS32 = float(np.finfo(np.float32).eps)


class Precision(eqx.Module):
    """In which floating-point types a solve computes.

    **Arguments:**

    - `policy`: `"float64"`, `"mixed"` (float64 time and state, float32 loss and gradient) or
        `"float32"` (all float32).
    - `matmul`: the precision of float32 matrix products (`jax.default_matmul_precision`),
        `"highest"` by default (`None`): strict float32 on GPU and TPU, where JAX's own
        default is TF32 (GPU) or one bfloat16 pass (TPU). Not given for `"float64"`.

    Use the constructors `Precision.float64()`, `Precision.mixed()`, `Precision.float32()`, or
    pass the policy's name wherever a precision is accepted.
    """

    policy: str = eqx.field(static=True)
    matmul: str | None = eqx.field(static=True, default=None)

    def __init__(self, policy: str, matmul: str | None = None):
        self.policy = policy
        # float32 products are strict float32 unless asked otherwise.
        self.matmul = "highest" if matmul is None and policy != "float64" else matmul

    def __check_init__(self):
        if self.policy not in POLICIES:
            raise InputError(f"precision must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.policy == "float64":
            if self.matmul is not None:
                raise InputError("precision float64 takes no matmul precision (float32 only)")
        elif self.matmul not in MATMUL_PRECISIONS:
            raise InputError(
                f"matmul precision must be one of {', '.join(MATMUL_PRECISIONS)}, "
                f"got {self.matmul!r}"
            )

    @classmethod
    def float64(cls) -> "Precision":
        """Everything in float64 (gflow's default)."""
        return cls("float64")

    @classmethod
    def mixed(cls, matmul: str = "highest") -> "Precision":
        """float64 time and state, float32 loss and gradient under `matmul` precision."""
        return cls("mixed", matmul)

    @classmethod
    def float32(cls, matmul: str = "highest") -> "Precision":
        """Everything in float32 (time included), matrix products under `matmul`."""
        return cls("float32", matmul)

    @classmethod
    def of(cls, spec: "str | Precision") -> "Precision":
        """`spec` as a `Precision`: itself, or the policy it names (default matmul)."""
        if isinstance(spec, Precision):
            return spec
        if isinstance(spec, str) and spec in POLICIES:
            return _NAMED.get(spec) or cls(spec)
        raise InputError(
            f"precision must be one of {', '.join(POLICIES)} or a gflow.Precision, got {spec!r}"
        )

    @property
    def state_dtype(self):
        """The dtype of the solve's state (and time): float32 under `"float32"`."""
        return jnp.float32 if self.policy == "float32" else jnp.float64

    def scope(self) -> contextlib.AbstractContextManager:
        """The JAX configuration a solve under this policy is prepared and run in: x64 off for
        `"float32"` (time, tolerances and counters in 32 bits), else unchanged."""
        return jax.enable_x64(False) if self.policy == "float32" else contextlib.nullcontext()

    def cast(self, tree: PyTree) -> PyTree:
        """`tree` (a model, data, observers...) as a solve under this policy holds it: under
        `"float32"` every floating array in float32 and every 64-bit integer array in int32;
        unchanged otherwise."""
        if self.policy != "float32":
            return tree
        return _cast(tree, jnp.float32)

    def velocity(self, flow, y: PyTree) -> PyTree:
        """`flow.velocity(y)` computed under this policy, in `y`'s dtypes."""
        if self.policy == "float64":
            return flow.velocity(y)
        if self.policy == "float32":
            with jax.default_matmul_precision(self.matmul):
                return flow.velocity(y)
        # mixed: x64 off while the loss is traced, so that arrays the loss creates itself
        # (`jnp.ones(n)`, one-hot labels) are float32 too and nothing promotes back.
        with jax.enable_x64(False), jax.default_matmul_precision(self.matmul):
            v = _cast(flow, jnp.float32).velocity(_cast(y, jnp.float32))
        return jtu.tree_map(lambda v, y: v.astype(y.dtype), v, y)

    def gradient_error(self, flow) -> float:
        """The relative difference, at the initial state, of this policy's velocity from the
        float64 one: the largest over the trainable leaves of `‖v − v64‖ / ‖v64‖` (leaves
        whose float64 velocity is zero skipped); 0 for `"float64"`."""
        if self.policy == "float64":
            return 0.0
        with jax.enable_x64(True):
            flow64 = _cast(flow, jnp.float64)
            exact = jtu.tree_leaves(_measure(flow64, Precision.float64(), flow64.params))
        with self.scope():
            ours = self.cast(flow64)
            approx = jtu.tree_leaves(_measure(ours, self, ours.params))
        worst = 0.0
        for a, e in zip(approx, exact):
            a, e = np.asarray(a, dtype=np.float64), np.asarray(e, dtype=np.float64)
            scale = float(np.linalg.norm(e))
            if scale > 0 and math.isfinite(scale):
                worst = max(worst, float(np.linalg.norm(a - e)) / scale)
        return worst

    def rtol_floor(self, flow) -> tuple[float, float]:
        """The smallest `rtol` this policy can honour on `flow`, and the measured gradient
        error it comes from (`(0, 0)` for `"float64"`)."""
        if self.policy == "float64":
            return 0.0, 0.0
        error = self.gradient_error(flow)
        if not math.isfinite(error):
            raise InputError(f"precision {self.policy}: the float32 gradient at the initial "
                             "state is not finite (it overflows float32): use float64")
        return FLOOR_SAFETY * max(error, _EPS32), error

    def check_rtol(self, flow, rtol: float) -> None:
        """Refuse (one-line `InputError`) an `rtol` below `rtol_floor(flow)`."""
        if self.policy == "float64":
            return  # no floor (and no method lookup, which equinox makes cost ~35 µs)
        floor, error = self.rtol_floor(flow)
        if rtol < floor:
            raise InputError(
                f"rtol={rtol:g} is below precision {self.policy}'s floor {floor:.2g}: its "
                f"float32 gradient differs from float64's by {error:.2g} (relative, at the "
                f"initial state), and steps asked for more would chase rounding; use "
                f"rtol >= {floor:.2g} or precision float64"
            )

    def describe(self) -> dict:
        """What a run records: `precision`, `matmul_precision` and JAX's `backend`."""
        return dict(precision=self.policy, matmul_precision=self.matmul or "n/a (float64)",
                    backend=jax.default_backend())


FLOAT64 = Precision.float64()
# The policies by name, with their default matmul precision: `Precision.of` returns these
# (building an equinox module costs ~30 µs a solve).
_NAMED = {policy: Precision(policy) for policy in POLICIES}


def in_scope(fn):
    """`fn(..., precision=...)` run inside its precision's `scope()`, with `precision`
    (a policy's name or a `Precision`) resolved once."""

    @functools.wraps(fn)
    def wrapped(*args, precision: "str | Precision" = "float64", **kwargs):
        precision = Precision.of(precision)
        with precision.scope():
            return fn(*args, precision=precision, **kwargs)

    return wrapped


def _cast(tree: PyTree, dtype) -> PyTree:
    """Every floating array of `tree` (JAX or NumPy) in `dtype`; under float32 also every
    64-bit integer array in int32 (x64 off has no 64-bit integers)."""
    narrow = jnp.dtype(dtype) == jnp.float32

    def one(x):
        if not isinstance(x, (jax.Array, np.ndarray, np.generic)):
            return x
        kind = jnp.result_type(x)
        if jnp.issubdtype(kind, jnp.floating):
            return x.astype(dtype)
        if narrow and kind == jnp.int64:
            return x.astype(jnp.int32)
        return x

    return jtu.tree_map(one, tree)


_measure = eqx.filter_jit(lambda flow, precision, y: precision.velocity(flow, y))
