"""A store for a solve's progress: a pytree of arrays, written atomically with a fingerprint
of the problem it belongs to, and read back only into a problem with the same fingerprint.

What the tree holds is the caller's business (`gflow.solve` stores the engine's carry); the
store knows its leaves by their paths only. The writer says which leaves may hold NaN by design;
every other floating leaf must be finite for the file to be resumed from.

`CheckpointWriter` writes them on a thread of its own, one at a time, while the solve goes on.
"""

import hashlib
import json
import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax.tree_util as jtu
import numpy as np
from jaxtyping import PyTree

from ._errors import InputError
from ._trajectory import atomic_write_bytes

_FORMAT = "gflow-checkpoint-5"


class Snapshot(NamedTuple):
    """What a checkpoint holds: a pytree of arrays and the seconds spent computing it."""

    arrays: PyTree  # host or device arrays
    seconds: dict[str, float]  # e.g. compile_seconds and run_seconds spent so far
    t: float  # the flow time reached (for messages and the metadata)
    nan_allowed: PyTree  # bools over `arrays`' leaves (or a prefix): NaN there is no damage


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


def _names(tree: PyTree) -> list[str]:
    """`carry/<key>/<key>...` for each leaf of the stored tree, in leaf order."""

    def part(k):
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                return str(getattr(k, attr))
        return str(k)

    return ["/".join(["carry", *map(part, path)])
            for path, _ in jtu.tree_flatten_with_path(tree)[0]]


def write_checkpoint(path: Path, snapshot: Snapshot, digests: dict[str, str]) -> None:
    """Write `snapshot` to `path` atomically (a kill never leaves a partial checkpoint).

    Each array is fetched to the host (a view of the buffer on CPU) and streamed into the
    file, so the host holds the checkpoint once, not again as the file's bytes."""
    leaves = jtu.tree_leaves(snapshot.arrays)
    names = _names(snapshot.arrays)
    arrays = {name: np.asarray(leaf) for name, leaf in zip(names, leaves)}
    allowed = jtu.tree_leaves(jtu.tree_map(
        lambda flag, sub: jtu.tree_map(lambda _: bool(flag), sub),
        snapshot.nan_allowed, snapshot.arrays))
    meta = dict(format=_FORMAT, fingerprint=digests, seconds=snapshot.seconds, t=snapshot.t,
                may_be_nan=[name for name, ok in zip(names, allowed) if ok])
    arrays["meta"] = np.asarray(json.dumps(meta))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, lambda f: np.savez(f, **arrays))


class CheckpointWriter:
    """Writes a solve's checkpoints to one file on a thread of its own, one at a time: the
    solve goes on while a checkpoint is written, and waits only when the next is due before
    the previous is complete.

    Every write is atomic (`write_checkpoint`), so the file is always the last complete
    checkpoint: a kill, or an interrupt that leaves without `wait`, at worst loses the write
    in flight (its temporary file stays behind, see `gflow._rundir`). The thread is not a
    daemon: a process that ends normally finishes the write first.

    **Arguments:**

    - `path`: the checkpoint file.
    - `digests`: the problem's `fingerprint`, written with every checkpoint.
    - `write`: the function that writes one (default `write_checkpoint`).
    """

    def __init__(self, path: Path, digests: dict[str, str],
                 write: Callable[[Path, Snapshot, dict], None] = write_checkpoint):
        self.path, self.digests, self.write = Path(path), digests, write
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, snapshot: Snapshot) -> None:
        """Write `snapshot` once the write before it is complete (waited for here). Its arrays
        must not change while written: a solve donating its carry submits a copy."""
        self.wait()
        self._thread = threading.Thread(target=self._run, args=(snapshot,),
                                        name="gflow-checkpoint")
        self._thread.start()

    def _run(self, snapshot: Snapshot) -> None:
        try:
            self.write(self.path, snapshot, self.digests)
        except BaseException as e:  # noqa: BLE001 - raised in the solve's thread by `wait`
            self._error = e

    def wait(self) -> None:
        """Block until the write in flight (if any) is complete, and raise what it raised
        (an `OSError` of a full disk, say). Ctrl-C interrupts the wait, not the write."""
        while self._thread is not None and self._thread.is_alive():
            _join(self._thread)
        self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error


def _join(thread: threading.Thread) -> None:
    # A short join per call: SIGINT's handler runs between them, and the command line's
    # deferred interrupt is raised at a call of gflow's own code (see `gflow._cli`).
    thread.join(0.05)


# What a checkpoint's metadata holds, and the types it must have.
_META = dict(format=str, fingerprint=dict, seconds=dict, t=(int, float), may_be_nan=list)


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
        if key not in meta or (isinstance(meta[key], bool) and kind == (int, float)) \
                or not isinstance(meta[key], kind):
            raise InputError(f"checkpoint {path} is damaged: its metadata lacks a valid {key!r}")
    if not math.isfinite(meta["t"]):
        raise InputError(f"checkpoint {path} is damaged: t={meta['t']}")
    may_be_nan = set(meta["may_be_nan"])
    for name, arr in arrays.items():
        if name in may_be_nan:
            continue
        if np.issubdtype(arr.dtype, np.inexact) and not np.all(np.isfinite(arr)):
            raise InputError(f"checkpoint {path} holds non-finite values in {name}: refusing "
                             "to resume from it")
    return arrays, meta


def read_checkpoint(path: Path, digests: dict[str, str], like: PyTree) -> Snapshot:
    """The `Snapshot` saved at `path`, checked against this problem's fingerprint.

    **Arguments:**

    - `path`: a file written by `write_checkpoint`.
    - `digests`: this problem's `fingerprint`; every part must match the saved one.
    - `like`: a tree of this problem's structure (its leaves give shapes and dtypes).
    """
    arrays, meta = checked_checkpoint(path)
    for name, digest in digests.items():
        if meta["fingerprint"].get(name) != digest:
            raise InputError(
                f"checkpoint {path} belongs to another problem: its {name.replace('_', ' ')} "
                "differs from this run's"
            )
    leaves, treedef = jtu.tree_flatten(like)
    saved = [arrays.get(name) for name in _names(like)]
    if any(s is None for s in saved) or len(arrays) != len(leaves):
        raise InputError(f"checkpoint {path}: its carry has another structure")
    for s, leaf in zip(saved, leaves):
        if s.shape != np.shape(leaf):
            raise InputError(
                f"checkpoint {path}: a carry array has shape {s.shape}, expected {np.shape(leaf)}"
            )
    saved = [np.asarray(s, dtype=leaf.dtype) for s, leaf in zip(saved, leaves)]
    seconds = {k: float(v) for k, v in meta.get("seconds", {}).items()}
    return Snapshot(jtu.tree_unflatten(treedef, saved), seconds, float(meta["t"]),
                    jtu.tree_unflatten(treedef, [n in set(meta["may_be_nan"]) for n in _names(like)]))
