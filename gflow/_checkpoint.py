"""Checkpoints of a solve between its segments, and the fingerprint tying one to its problem.

A solve is a chain of segments (one per transition, optionally cut every `checkpoint_steps`
steps). Between segments everything needed to continue is a `Carry`: the state, the solver's
and step-size controller's states, what has been recorded so far. Writing it at every segment
boundary and continuing from it gives the same result, bit for bit, as never stopping: the
continued run executes the same compiled program on the same inputs.
"""

import hashlib
import io
import json
import math
from pathlib import Path
from typing import Any, NamedTuple

import jax.tree_util as jtu
import numpy as np
from jaxtyping import PyTree

from ._errors import InputError
from ._trajectory import atomic_write_bytes

_FORMAT = "gflow-checkpoint-1"
_ARRAY_PARTS = ("y", "solver_state", "controller_state", "observables")


class Carry(NamedTuple):
    """Where a solve stands between two segments."""

    t: float  # flow time reached
    index: int  # the transition looked for next
    y: PyTree
    solver_state: PyTree
    controller_state: PyTree
    made_jump: bool
    observables: PyTree  # host arrays over all save times, nan where not yet saved
    found: dict[str, float]  # transition times, nan until found
    stats: dict[str, Any]
    steps: int  # steps since the last transition: `max_steps` limits these
    status: str | None  # None while the solve goes on


def fingerprint(**parts: Any) -> dict[str, str]:
    """A digest of each named part of a problem (arrays, pytrees of arrays, or plain data)."""
    digests = {}
    for name, value in parts.items():
        h = hashlib.sha256()
        leaves, treedef = jtu.tree_flatten(value)
        h.update(str(treedef).encode())
        for leaf in leaves:
            arr = np.asarray(leaf)
            if arr.dtype == object:
                h.update(repr(leaf).encode())
            else:
                h.update(f"{arr.dtype}{arr.shape}".encode())
                h.update(np.ascontiguousarray(arr).tobytes())
        digests[name] = h.hexdigest()
    return digests


def write_checkpoint(path: Path, carry: Carry, digests: dict[str, str]) -> None:
    """Write `carry` to `path` atomically (a kill never leaves a partial checkpoint)."""
    arrays = {}
    for part in _ARRAY_PARTS:
        for i, leaf in enumerate(jtu.tree_leaves(getattr(carry, part))):
            arrays[f"{part}/{i}"] = np.asarray(leaf)
    meta = dict(
        format=_FORMAT,
        fingerprint=digests,
        t=carry.t,
        index=carry.index,
        made_jump=bool(carry.made_jump),
        found=carry.found,
        stats=carry.stats,
        steps=carry.steps,
        status=carry.status,
    )
    # Python's float repr round-trips exactly, nan included (json's NaN extension).
    arrays["meta"] = np.asarray(json.dumps(meta))
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())


def read_checkpoint(path: Path, digests: dict[str, str], like: dict[str, PyTree]) -> Carry:
    """The `Carry` saved at `path`, checked against this problem's fingerprint.

    **Arguments:**

    - `path`: a file written by `write_checkpoint`.
    - `digests`: this problem's `fingerprint`; every part must match the saved one.
    - `like`: for each array part (`y`, `solver_state`, `controller_state`, `observables`),
        a pytree of the structure to rebuild (leaves: arrays or `jax.ShapeDtypeStruct`s).
    """
    try:
        with np.load(path) as npz:
            arrays = {name: npz[name] for name in npz.files}
        meta = json.loads(str(arrays.pop("meta")))
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"{path} is not a readable gflow checkpoint ({e})") from None
    if meta.get("format") != _FORMAT:
        raise InputError(f"{path} is not a gflow checkpoint of format {_FORMAT}")
    for name, digest in digests.items():
        if meta["fingerprint"].get(name) != digest:
            raise InputError(
                f"checkpoint {path} belongs to another problem: its {name.replace('_', ' ')} "
                "differs from this run's"
            )
    parts = {}
    for part in _ARRAY_PARTS:
        leaves, treedef = jtu.tree_flatten(like[part])
        saved = [arrays.get(f"{part}/{i}") for i in range(len(leaves))]
        extra = sum(name.startswith(f"{part}/") for name in arrays) - len(leaves)
        if any(s is None for s in saved) or extra:
            raise InputError(
                f"checkpoint {path}: its {part.replace('_', ' ')} has another structure"
            )
        if part != "observables":
            for s, leaf in zip(saved, leaves):
                if s.shape != tuple(leaf.shape):
                    raise InputError(
                        f"checkpoint {path}: its {part.replace('_', ' ')} has shape {s.shape}, "
                        f"expected {tuple(leaf.shape)}"
                    )
            saved = [np.asarray(s, dtype=leaf.dtype) for s, leaf in zip(saved, leaves)]
        parts[part] = jtu.tree_unflatten(treedef, saved)
    found = {k: (math.nan if v is None else float(v)) for k, v in meta["found"].items()}
    return Carry(
        t=float(meta["t"]),
        index=int(meta["index"]),
        y=parts["y"],
        solver_state=parts["solver_state"],
        controller_state=parts["controller_state"],
        made_jump=bool(meta["made_jump"]),
        observables=parts["observables"],
        found=found,
        stats=meta["stats"],
        steps=int(meta["steps"]),
        status=meta["status"],
    )
