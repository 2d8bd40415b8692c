"""Input checks of `gflow.solve` (and `gflow.sweep`) that need no compilation.

Settings are checked as plain values; the user's functions (loss, observers, transition
conditions, preconditioner) are traced abstractly with `equinox.filter_eval_shape` (no
compiling, no computing), so that an output of the wrong kind is a one-line `InputError` naming
the function, not a JAX trace at compile time. An exception raised by a user function passes
through unchanged, with a note naming that function.
"""

import inspect
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from ._errors import InputError

# Beyond this horizon the solver's smallest step (1e-12 of it) is a unit of flow time: the same
# limit as the `[solve]` table's.
from ._config import MAX_HORIZON

_MAX_STEPS = 2**31 - 1  # diffrax counts steps in int32
# An observer's name becomes a figure's file name (and its temporary file's, 20 bytes more):
# file systems allow 255 bytes.
_MAX_NAME_BYTES = 200


def _is_real(x: Any) -> bool:
    """A real number: int, float or a numpy/JAX real scalar, but not a bool."""
    if isinstance(x, (bool, np.bool_)):
        return False
    if isinstance(x, numbers.Real):
        return True
    return (isinstance(x, (np.ndarray, jax.Array)) and np.ndim(x) == 0
            and (jnp.issubdtype(x.dtype, jnp.integer) or jnp.issubdtype(x.dtype, jnp.floating)))


def _name(fn: Callable) -> str:
    """How a user function is named in messages."""
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    return name or type(fn).__name__


def check_times(t0: Any, t1: Any) -> None:
    """`t0` and `t1` are finite real numbers with `0 < t1 - t0 <= MAX_HORIZON`."""
    for label, t in (("t0", t0), ("t1", t1)):
        if not _is_real(t):
            raise InputError(f"{label} must be a real number, got {t!r}")
        if not math.isfinite(float(t)):
            raise InputError(f"{label} must be finite, got {t!r}")
    t0, t1 = float(t0), float(t1)
    if not t1 > t0:
        raise InputError(f"t1 must be greater than t0, got t0={t0}, t1={t1}")
    if not t1 - t0 <= MAX_HORIZON:
        raise InputError(
            f"t1 - t0 = {t1 - t0:g} is beyond {MAX_HORIZON:g}: the solver's smallest step "
            "(1e-12 of it) would exceed the flow's own time scale"
        )


def check_settings(*, t0, t1, rtol, atol, max_steps, dt0) -> None:
    """Ranges of a solve's settings (see `gflow.solve`)."""
    check_times(t0, t1)
    check_tolerances(rtol, atol)
    check_steps(t0=t0, t1=t1, max_steps=max_steps, dt0=dt0)


def check_tolerances(rtol, atol) -> None:
    """`rtol` in (0, 1); `atol` positive and finite, or `None`."""
    if not (_is_real(rtol) and 0 < float(rtol) < 1):
        raise InputError(f"rtol must be a number in (0, 1), got {rtol!r}")
    if atol is not None and not (
        _is_real(atol) and float(atol) > 0 and math.isfinite(float(atol))
    ):
        raise InputError(f"atol must be a positive number or None, got {atol!r}")


def check_steps(*, t0, t1, max_steps, dt0) -> None:
    """`max_steps` a positive integer diffrax can count; `dt0` in (0, t1 - t0] or `None`."""
    if isinstance(max_steps, (bool, np.bool_)) or not isinstance(max_steps, numbers.Integral) \
            or not 1 <= int(max_steps) <= _MAX_STEPS:
        raise InputError(f"max_steps must be an integer between 1 and {_MAX_STEPS}, got "
                         f"{max_steps!r}")
    if dt0 is not None and not (
        _is_real(dt0) and 0 < float(dt0) <= float(t1) - float(t0)
    ):
        raise InputError(f"dt0 must be a number in (0, t1 - t0], got {dt0!r}")


def _traced(fn: Callable, what: str, *args):
    """The abstract output of `fn(*args)`; an exception it raises gets a note naming it. A
    function that cannot take `(model, data)` is a one-line `InputError` naming it."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without a signature: its call will tell
        signature = None
    if signature is not None:
        try:
            signature.bind(*args)
        except TypeError as e:
            raise InputError(f"the {what} {_name(fn)} must be callable as (model, data), "
                             f"but {e}") from None
    try:
        return eqx.filter_eval_shape(fn, *args)
    except InputError:
        raise
    except Exception as e:
        e.add_note(f"gflow: raised by the {what} {_name(fn)}")
        raise


def _is_numeric(leaf) -> bool:
    """An abstract array of numbers or bools, or a plain Python/numpy number (a constant)."""
    if isinstance(leaf, (bool, int, float, np.number, np.bool_)):
        return True
    return isinstance(leaf, jax.ShapeDtypeStruct) and (
        jnp.issubdtype(leaf.dtype, jnp.number) or jnp.issubdtype(leaf.dtype, jnp.bool_)
    )


def _scalar(out, what: str) -> None:
    """`out` (an abstract output) is one real scalar."""
    leaves = jtu.tree_leaves(out)
    if len(leaves) != 1 or not _is_numeric(leaves[0]):
        raise InputError(f"{what} must return one real scalar, got {_describe(out)}")
    leaf = jax.eval_shape(lambda: jnp.asarray(leaves[0])) if not isinstance(
        leaves[0], jax.ShapeDtypeStruct) else leaves[0]
    if jnp.issubdtype(leaf.dtype, jnp.complexfloating):
        raise InputError(f"{what} must return a real scalar, got dtype {leaf.dtype}")
    if leaf.shape != ():
        raise InputError(f"{what} must return a scalar, got shape {leaf.shape}")


def _describe(out) -> str:
    leaves = jtu.tree_leaves(out)
    if len(leaves) == 1 and isinstance(leaves[0], jax.ShapeDtypeStruct):
        return f"an array of shape {leaves[0].shape}"
    if len(leaves) == 1:
        return f"{type(leaves[0]).__name__} {leaves[0]!r}"[:120]
    return f"a pytree of {len(leaves)} leaves"


def check_state_scale(params) -> None:
    """Every trainable leaf's entries are squarable in their dtype: squares neither underflow
    (the default `atol` scales with them) nor pass the divergence threshold. `params` is the
    initial state, preferably on the host (one transfer serves every check of a solve)."""
    for k, leaf in enumerate(jtu.tree_leaves(params)):
        arr = np.asarray(leaf)
        if arr.size == 0 or not np.issubdtype(arr.dtype, np.floating):
            continue
        finite = arr[np.isfinite(arr)]
        if finite.size == 0:
            continue  # non-finite values: refused by solve's own check
        largest = float(np.max(np.abs(finite)))
        info = np.finfo(arr.dtype)
        low, high = math.sqrt(float(info.tiny)), math.sqrt(min(1e200, float(info.max) / 16))
        if not (0 < largest < low or largest > high / math.sqrt(arr.size)):
            continue
        # Its path only for a message: flattening with paths costs more than the checks.
        where = jtu.keystr(jtu.tree_flatten_with_path(params)[0][k][0]) or "the state"
        if 0 < largest < low:
            raise InputError(
                f"the initial state at {where} has entries of size {largest:.3g}: below "
                f"{low:.1e} their squares underflow {arr.dtype} (use a larger init scale)"
            )
        if largest > high / math.sqrt(arr.size):
            raise InputError(
                f"the initial state at {where} has entries of size {largest:.3g}: its squared "
                f"norm passes gflow's divergence threshold (use a smaller init scale)"
            )


def _function_key(fn, depth: int = 0):
    """A hashable key under which `fn` traces to the same abstract output for inputs of one
    structure: its code, and what its closure and defaults hold (arrays by shape and dtype,
    functions by their own key, other values as they are). `None` when unsure (a value that
    is neither, or too deep): such functions are checked every time."""
    code = getattr(fn, "__code__", None)
    if code is None or depth > 4:
        return None
    held = []
    for value in [c.cell_contents for c in (getattr(fn, "__closure__", None) or ())] + list(
        getattr(fn, "__defaults__", None) or ()
    ):
        if isinstance(value, (jax.Array, np.ndarray)):
            held.append(("array", value.shape, str(value.dtype)))
        elif isinstance(value, (int, float, str, bool, type(None))):
            held.append((type(value).__name__, value))
        else:
            key = _value_key(value, depth + 1)
            if key is None:
                return None
            held.append(key)
    return code, tuple(held)


def _value_key(value, depth: int):
    """A function by `_function_key`; a pytree (an equinox module, a tuple) by its structure,
    arrays by shape and dtype; `None` when unsure."""
    if getattr(value, "__code__", None) is not None:
        return _function_key(value, depth)
    if isinstance(value, (jax.Array, np.ndarray)):
        return ("array", value.shape, str(value.dtype))
    if depth > 4:
        return None
    leaves, treedef = jtu.tree_flatten(value)
    if len(leaves) == 1 and leaves[0] is value:
        return None  # an opaque object
    keys = []
    for leaf in leaves:
        if isinstance(leaf, (jax.Array, np.ndarray)):
            keys.append(("array", leaf.shape, str(leaf.dtype)))
        elif isinstance(leaf, (int, float, str, bool, type(None))):
            keys.append((type(leaf).__name__, leaf))
        else:
            key = _value_key(leaf, depth + 1)
            if key is None:
                return None
            keys.append(key)
    return str(treedef), tuple(keys)


# Checks passed, by the keys of the functions and input structures checked: a sweep prepares
# many members built by one builder (new closures of the same code), checked once. (A function
# whose output shape depends on the values, not the shapes, of arrays it closes over would be
# checked for its first member only; JAX itself still refuses a bad one, at compile time.)
_PASSED: dict = {}
_PASSED_LIMIT = 256




def check_functions(flow, *, observers: Mapping[str, Callable] | None, transitions) -> None:
    """The loss, observers and transition conditions of a solve return what gflow records:
    a real scalar loss, numeric observables, a real scalar per condition; observer names are
    strings other than `"t"` (the time axis of `trajectory.npz`)."""
    try:
        functions = [flow.loss, flow.preconditioner, *dict(observers or {}).values(),
                     *(getattr(tr, "condition", None) for tr in transitions)]
        keys = [None if f is None else _value_key(f, 0) for f in functions]
        key = None
        if all(k is not None for k, f in zip(keys, functions) if f is not None):
            key = (tuple(keys), tuple(dict(observers or {})), tuple(
                getattr(tr, "name", None) for tr in transitions),
                _value_key(flow.model, 0), _value_key(flow.data, 0))
            if key[-2] is None or (key[-1] is None and flow.data is not None):
                key = None
            hash(key)
    except (TypeError, AttributeError):
        key = None
    if key is not None and key in _PASSED:
        return
    _check_functions(flow, observers=observers, transitions=transitions)
    if key is not None:
        if len(_PASSED) >= _PASSED_LIMIT:
            _PASSED.pop(next(iter(_PASSED)))
        _PASSED[key] = True


def _check_functions(flow, *, observers, transitions) -> None:
    model, data = flow.model, flow.data
    loss = _traced(flow.loss, "loss", model, data)
    _scalar(loss, f"the loss {_name(flow.loss)}")
    dtype = jnp.result_type(jtu.tree_leaves(loss)[0])
    if not jnp.issubdtype(dtype, jnp.floating):
        raise InputError(f"the loss {_name(flow.loss)} must return a floating-point scalar, "
                         f"got dtype {dtype}")
    if flow.preconditioner is not None:
        grads = _traced(flow.velocity, "preconditioner", flow.params)
        if jtu.tree_structure(grads) != jtu.tree_structure(
            jax.eval_shape(lambda p: p, flow.params)
        ):
            raise InputError(
                f"the preconditioner {_name(flow.preconditioner)} must return a pytree of the "
                "gradient's structure"
            )
    if observers is not None and not isinstance(observers, Mapping):
        raise InputError(f"observers must be a dict of name: observer(model, data), got "
                         f"{type(observers).__name__}")
    for name, obs in dict(observers or {}).items():
        if not isinstance(name, str) or not name or name == "t" or name.startswith("t/"):
            raise InputError(
                f"observer name {name!r}: names are non-empty strings other than 't' (the "
                "time axis)"
            )
        if len(name.encode()) > _MAX_NAME_BYTES:
            raise InputError(f"observer name {name[:40]!r}... is {len(name.encode())} bytes "
                             f"long: at most {_MAX_NAME_BYTES} (it names a figure's file)")
        if not callable(obs):
            raise InputError(f"observer {name!r} must be callable as observer(model, data)")
        out = _traced(obs, f"observer {name!r}", model, data)
        for leaf in jtu.tree_leaves(out):
            if not _is_numeric(leaf):
                raise InputError(
                    f"observer {name!r} ({_name(obs)}) must return arrays, got "
                    f"{type(leaf).__name__} {leaf!r}"[:200]
                )
    for tr in transitions:
        condition = getattr(tr, "condition", None)
        if condition is None or not callable(condition):
            continue  # not a Transition: refused by solve's own check
        out = _traced(condition, f"condition of transition {tr.name!r}", model, data)
        _scalar(out, f"the condition of transition {tr.name!r} ({_name(condition)})")

