"""Checkpoints of a solve between its segments, and the fingerprint tying one to its problem.

A solve is a chain of segments (one per transition, optionally cut every `checkpoint_steps`
steps), run by `gflow._engine.run`. Between segments everything needed to continue is the
engine's carry: the state, the solver's and step-size controller's states, what has been
recorded so far, as arrays. Writing it at every segment boundary and continuing from it gives
the same result, bit for bit, as never stopping: the continued run executes the same compiled
program on the same inputs.
"""

import hashlib
import io
import json
from pathlib import Path
from typing import Any, NamedTuple

import jax.tree_util as jtu
import numpy as np
from jaxtyping import PyTree

from ._errors import InputError
from ._trajectory import atomic_write_bytes

_FORMAT = "gflow-checkpoint-2"


class Carry(NamedTuple):
    """Where a solve stands between two segments."""

    arrays: PyTree  # the engine's carry (host arrays)
    seconds: dict[str, float]  # compile_seconds and run_seconds spent so far

    @property
    def t(self) -> float:
        """The flow time reached."""
        return float(self.arrays["t"])


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
    arrays = {f"carry/{i}": np.asarray(leaf) for i, leaf in enumerate(jtu.tree_leaves(carry.arrays))}
    meta = dict(format=_FORMAT, fingerprint=digests, seconds=carry.seconds)
    arrays["meta"] = np.asarray(json.dumps(meta))
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())


def read_checkpoint(path: Path, digests: dict[str, str], like: PyTree) -> Carry:
    """The `Carry` saved at `path`, checked against this problem's fingerprint.

    **Arguments:**

    - `path`: a file written by `write_checkpoint`.
    - `digests`: this problem's `fingerprint`; every part must match the saved one.
    - `like`: a carry of this problem's structure (its leaves give shapes and dtypes).
    """
    try:
        with np.load(path) as npz:
            arrays = {name: npz[name] for name in npz.files}
        meta = json.loads(str(arrays.pop("meta")))
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"{path} is not a readable gflow checkpoint ({e})".splitlines()[0]) from None
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise InputError(f"{path} is not a gflow checkpoint of format {_FORMAT}")
    for name, digest in digests.items():
        if meta["fingerprint"].get(name) != digest:
            raise InputError(
                f"checkpoint {path} belongs to another problem: its {name.replace('_', ' ')} "
                "differs from this run's"
            )
    leaves, treedef = jtu.tree_flatten(like)
    saved = [arrays.get(f"carry/{i}") for i in range(len(leaves))]
    if any(s is None for s in saved) or len(arrays) != len(leaves):
        raise InputError(f"checkpoint {path}: its carry has another structure")
    for s, leaf in zip(saved, leaves):
        if s.shape != np.shape(leaf):
            raise InputError(
                f"checkpoint {path}: a carry array has shape {s.shape}, expected {np.shape(leaf)}"
            )
    saved = [np.asarray(s, dtype=leaf.dtype) for s, leaf in zip(saved, leaves)]
    seconds = {k: float(v) for k, v in meta.get("seconds", {}).items()}
    return Carry(jtu.tree_unflatten(treedef, saved), seconds)
