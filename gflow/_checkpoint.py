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


# What a checkpoint's metadata holds, and the types it must have.
_META = dict(format=str, fingerprint=dict, t=(int, float), index=int, made_jump=bool,
             found=dict, stats=dict, steps=int, status=(str, type(None)))


def checked_checkpoint(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The arrays and metadata of the checkpoint file at `path`, or a one-line `InputError`
    saying why it cannot be resumed from: not a file, unreadable or corrupt (empty, truncated,
    altered bytes), metadata missing or mistyped, or a non-finite state."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint {path} is not a file")
    try:
        # Opened here, so that a file np.load refuses is closed all the same.
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
        meta = json.loads(str(arrays.pop("meta")))
    except Exception as e:  # noqa: BLE001 - any failure to read is a corrupt file
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise InputError(f"{path} is not a readable gflow checkpoint ({reason})") from None
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise InputError(f"{path} is not a gflow checkpoint of format {_FORMAT}")
    for key, kind in _META.items():
        if key not in meta or isinstance(meta[key], bool) and kind in (int, (int, float)) \
                or not isinstance(meta[key], kind):
            raise InputError(f"checkpoint {path} is damaged: its metadata lacks a valid {key!r}")
    if not math.isfinite(meta["t"]) or meta["index"] < 0 or meta["steps"] < 0:
        raise InputError(f"checkpoint {path} is damaged: t={meta['t']}, index={meta['index']}, "
                         f"steps={meta['steps']}")
    for name, arr in arrays.items():
        # Observables hold nan at save times not reached yet; the state only once diverged.
        if meta["status"] != "nonfinite" and not name.startswith("observables/") \
                and np.issubdtype(arr.dtype, np.inexact) and not np.all(np.isfinite(arr)):
            raise InputError(f"checkpoint {path} holds non-finite values in {name}: refusing "
                             "to resume from it")
    return arrays, meta


def read_checkpoint(path: Path, digests: dict[str, str], like: dict[str, PyTree]) -> Carry:
    """The `Carry` saved at `path`, checked against this problem's fingerprint.

    **Arguments:**

    - `path`: a file written by `write_checkpoint`.
    - `digests`: this problem's `fingerprint`; every part must match the saved one.
    - `like`: for each array part (`y`, `solver_state`, `controller_state`, `observables`),
        a pytree of the structure to rebuild (leaves: arrays or `jax.ShapeDtypeStruct`s).
    """
    arrays, meta = checked_checkpoint(path)
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
