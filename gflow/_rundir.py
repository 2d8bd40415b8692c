"""Directories gflow owns: a manifest of the files it wrote, a lock, and atomic writes.

A run (or sweep) directory is gflow's when gflow created it or when it carries gflow's
manifest, `.gflow-manifest.json`: the list of every file gflow wrote there (each entered before
it is written, so a kill at any moment leaves no unlisted file of gflow's). gflow writes a new
run only into a missing or empty directory, or into one of its own; it removes or replaces only
files its manifest lists (and its own temporary files), so a user's files placed beside a run
are never touched, with or without `--overwrite`.

`atomic_write_bytes` is the one way gflow writes a file: to a temporary file, then renamed.
When the file's directory (or its parent, for `figures/`) holds a manifest, the file is entered
in it first. The manifest also records the run's phase (`state`), so that `--resume` knows
whether the solve, or only the figures, remain.

No JAX here: `python -m gflow.plot` reads and writes run directories with numpy alone.
"""

import contextlib
import errno
import json
import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from ._errors import InputError

MANIFEST_FILE = ".gflow-manifest.json"
LOCK_FILE = ".gflow.lock"
_FORMAT = "gflow-manifest-1"
# `tempfile.mkstemp(prefix=".<name>.", suffix=".tmp")`: the temporary file of a write to <name>.
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]+\.tmp$")
# Names gflow's own runs have always written: temporary files of these are gflow's even in a
# directory written before manifests existed.
_KNOWN = re.compile(r"^(config\.toml|summary\.json|trajectory\.npz|transitions\.npz|final\.eqx"
                    r"|timings\.json|checkpoint-.+\.eqx|sweep\.json|members\.csv|members\.jsonl"
                    r"|\.gflow-manifest\.json)$")


# --------------------------------------------------------------------------------------------
# Atomic writes


def _write_atomically(path: Path, data: bytes | Callable[[BinaryIO], None]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates the file private; give it the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes | Callable[[BinaryIO], None]
                       ) -> None:
    """Write `data` to `path` so that a crash never leaves a partial file under that name, and
    enter `path` in the manifest of the directory that owns it (if any) first.

    **Arguments:**

    - `path`: the file.
    - `data`: its bytes, or a function writing them to the open (temporary) file: a large
        file is then streamed, never held whole in memory.
    """
    path = Path(path)
    record(path)
    _write_atomically(path, data)


def append_line(path: Path, text: str, at: int = 0) -> int:
    """Append `text` and a newline to `path` at byte `at` (what follows, a failed append's
    part, is cut off first), entered in its owner's manifest first and synced to disk: a log
    that a kill or a full disk leaves whole up to its last complete line.

    **Returns:**

    The file's size after the append.
    """
    path = Path(path)
    record(path)
    with open(path, "ab") as f:
        f.truncate(at)
        f.write((text + "\n").encode())
        f.flush()
        os.fsync(f.fileno())
        return f.tell()


# --------------------------------------------------------------------------------------------
# The manifest


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """`directory`'s manifest (`{"kind", "state", "files"}`), or `None` without one; a damaged
    manifest is an `InputError` naming it."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{path} is not a readable gflow manifest ({type(e).__name__}): "
                         "move the directory aside and start again") from None
    files = data.get("files") if isinstance(data, dict) else None
    if (not isinstance(data, dict) or data.get("format") != _FORMAT or not isinstance(files, list)
            or not all(isinstance(f, str) and _inside(f) for f in files)):
        raise InputError(f"{path} is not a gflow manifest of format {_FORMAT}")
    return data


def _inside(name: str) -> bool:
    """A manifest entry names a file below its directory: relative, no `..`."""
    parts = Path(name).parts
    return bool(parts) and not Path(name).is_absolute() and ".." not in parts


def write_manifest(directory: Path, *, kind: str | None = None, state: str | None = None,
                   add: tuple[str, ...] = (), discard: tuple[str, ...] = ()) -> dict:
    """Create or update `directory`'s manifest; returns it."""
    directory = Path(directory)
    data = read_manifest(directory) or dict(format=_FORMAT, kind=kind or "files", state=None,
                                            files=[])
    files = (set(data["files"]) | set(add)) - set(discard)
    changed = dict(data, files=sorted(files))
    if kind is not None:
        changed["kind"] = kind
    if state is not None:
        changed["state"] = state
    if changed != data or not (directory / MANIFEST_FILE).is_file():
        _write_atomically(directory / MANIFEST_FILE,
                          (json.dumps(changed, indent=1) + "\n").encode())
    return changed


def owner(path: Path) -> Path | None:
    """The directory whose manifest covers the file `path`: its own directory's, or (a file in
    `figures/`) its parent's."""
    path = Path(os.path.abspath(path))
    for directory in (path.parent, path.parent.parent):
        if (directory / MANIFEST_FILE).is_file():
            return directory
    return None


def record(path: Path) -> None:
    """Enter `path` in its owner's manifest, before it is written."""
    root = owner(path)
    if root is not None:
        name = Path(os.path.abspath(path)).relative_to(root).as_posix()
        if name not in read_manifest(root)["files"]:
            write_manifest(root, add=(name,))


def listed(directory: Path) -> list[Path]:
    """The files `directory`'s manifest lists that exist."""
    manifest = read_manifest(directory) or {"files": []}
    return [directory / f for f in manifest["files"] if (directory / f).is_file()]


def remove(path: Path) -> None:
    """Remove a file gflow wrote and its manifest entry."""
    path = Path(path)
    root = owner(path)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    if root is not None:
        write_manifest(root, discard=(Path(os.path.abspath(path)).relative_to(root).as_posix(),))


def own_temporaries(directory: Path) -> list[Path]:
    """Temporary files that gflow's interrupted writes left in `directory` and its `figures/`:
    of files the manifest lists, of names a run writes, or of figures."""
    directory = Path(directory)
    manifest = read_manifest(directory) or {"files": []}
    names = {Path(f).name for f in manifest["files"]}
    found = []
    for folder in (directory, directory / "figures"):
        if not folder.is_dir() or folder.is_symlink():
            continue
        for entry in folder.iterdir():
            m = _TEMPORARY.match(entry.name)
            if m and entry.is_file() and (m["name"] in names or _KNOWN.match(m["name"])
                                          or folder.name == "figures"):
                found.append(entry)
    return found


def remove_stale(directory: Path, written: set[str], among) -> None:
    """Remove the files of an earlier write of `directory`'s manifest that `among(name)`
    selects and this write did not (re)write: e.g. the old `transitions.npz` of a run that
    reaches no transition now, or figures of fits a sweep no longer makes."""
    manifest = read_manifest(directory)
    if manifest is None:
        return
    for name in manifest["files"]:
        if among(name) and name not in written:
            remove(Path(directory) / name)


def clear(directory: Path) -> None:
    """Remove every file `directory`'s manifest lists and gflow's own temporary files, then
    the listed files' folders that are left empty; the manifest and the lock stay."""
    directory = Path(directory)
    folders = set()
    for path in listed(directory) + own_temporaries(directory):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        if path.parent != directory:
            folders.add(path.parent)
    for folder in sorted(folders, key=lambda p: -len(p.parts)):
        with contextlib.suppress(OSError):
            folder.rmdir()  # only when empty: a user's file inside keeps it
    if read_manifest(directory) is not None:
        write_manifest(directory, state="new", discard=tuple(read_manifest(directory)["files"]))


# --------------------------------------------------------------------------------------------
# Which directories a new run may use


def check_name(name: str, field: str = "preset.name") -> None:
    """A run's name (`[preset] name`) is a name, not a path: the default output directory is
    `runs/<name>-<stamp>`, which must stay inside `runs/`."""
    if (not name or "/" in name or "\\" in name or name in (".", "..") or ".." in name
            or "\0" in name or any(ord(c) < 32 for c in name)):
        raise InputError(f"{field} must be a plain name (no path separator, '..' or control "
                         f"character), got {name!r}")


def _entries(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.name not in (LOCK_FILE, MANIFEST_FILE))


def check_new(out: Path, *, overwrite: bool, kind: str, finished_file: str,
              flag: str = "--out", resume_hint: bool = True, locked: bool = False) -> None:
    """A new run (or sweep, `kind`) may be written to `out`: it is missing or empty, or it is
    gflow's own (a manifest) and holds no finished `kind` (its `finished_file`) unless
    `overwrite`. One line saying why not otherwise; nothing is written."""
    if not out.exists():
        return
    if not out.is_dir():
        raise InputError(f"{flag} {out} exists and is not a directory")
    if not locked and in_use(out):
        raise InputError(f"{flag} {out} is in use by another gflow process")
    manifest = read_manifest(out)
    entries = _entries(out)
    if manifest is None:
        if entries:
            raise InputError(
                f"{flag} {out} is a directory holding other files ({entries[0].name}, ...) that "
                "gflow did not write: give a new or empty directory"
                + (" (--overwrite replaces only a gflow run's own files)" if overwrite else ""))
        return
    if manifest.get("kind") not in (kind, "files") and listed(out):
        raise InputError(f"{flag} {out} holds a gflow {manifest.get('kind')}, not a {kind}: "
                         "give another directory")
    if overwrite:
        return
    if (out / finished_file).is_file():
        resume = f"continue it with --resume {out}, " if resume_hint else ""
        raise InputError(f"{flag} {out} already holds a {kind}: {resume}replace it with "
                         "--overwrite, or give another directory")
    kept = listed(out)
    if kept:  # e.g. a library save, or a sweep's members.jsonl: results, not leftovers
        raise InputError(f"{flag} {out} holds files of an earlier gflow write "
                         f"({kept[0].relative_to(out)}, ...): replace them with --overwrite, "
                         "or give another directory")


def in_use(out: Path) -> bool:
    """Whether another process holds `out`'s lock (checked without writing anything)."""
    import fcntl

    path = out / LOCK_FILE
    if not path.is_file():
        return False
    try:
        with open(path) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
    except OSError:
        return False
    return False


def _lock(out: Path):
    """An open lock file of `out` holding an exclusive flock, or `None` when another process
    holds it. A holder removes the file when it is done: a lock taken on a file that is no
    longer `out`'s is dropped and taken again on the current one."""
    import fcntl

    path = out / LOCK_FILE
    while True:
        try:
            f = open(path, "a")  # "a": created if missing, never truncated
        except OSError as e:
            raise InputError(f"cannot lock {path} ({e.strerror}): make {out} writable or give "
                             "another directory") from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            return None
        try:
            current = os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            current = False
        if current:
            return f
        f.close()


class Claim:
    """A directory held for one run: its lock, and the directories made for it."""

    def __init__(self, directory: Path, lock, created: list[Path]):
        self.directory = directory
        self.lock = lock
        self.created = created
        self.adopted = False  # whether `adopt` gave a run of older gflow its manifest

    def undo_adoption(self) -> None:
        """Remove the manifest `adopt` wrote (a resume refused: the directory as it was)."""
        if self.adopted:
            with contextlib.suppress(OSError):
                (self.directory / MANIFEST_FILE).unlink()
            self.adopted = False

    def set_state(self, state: str) -> None:
        write_manifest(self.directory, state=state)

    def release(self, *, remove_lock: bool = True) -> None:
        """Drop the lock (and its file, unless told otherwise)."""
        if self.lock is None:
            return
        if remove_lock:
            with contextlib.suppress(OSError):
                (self.directory / LOCK_FILE).unlink()
        self.lock.close()
        self.lock = None

    def abandon(self) -> None:
        """Undo a claim of a run that wrote nothing: the manifest, the lock, and the
        directories made for it."""
        manifest = read_manifest(self.directory) if self.directory.is_dir() else None
        if manifest is not None and not listed(self.directory):
            with contextlib.suppress(OSError):
                (self.directory / MANIFEST_FILE).unlink()
        self.release()
        for path in reversed(self.created):
            with contextlib.suppress(OSError):
                path.rmdir()


def _created_parents(out: Path) -> list[Path]:
    """The directories `out.mkdir(parents=True)` would create, outermost first."""
    missing = []
    path = Path(os.path.abspath(out))
    while not path.exists():
        missing.append(path)
        path = path.parent
    return missing[::-1]


def claim(out: Path, *, kind: str, overwrite: bool, finished_file: str,
          flag: str = "--out", resume_hint: bool = True) -> Claim:
    """Make or take `out` for a new `kind` (checked again under its lock) and clear what an
    earlier gflow write left there (the files its manifest lists, nothing else)."""
    created = _created_parents(out)
    out.mkdir(parents=True, exist_ok=True)
    lock = _lock(out)
    held = Claim(out, lock, created)
    if lock is None:
        held.abandon()
        raise InputError(f"{flag} {out} is in use by another gflow process (its lock "
                         f"{out / LOCK_FILE} is held)")
    try:
        check_new(out, overwrite=overwrite, kind=kind, finished_file=finished_file, flag=flag,
                  resume_hint=resume_hint, locked=True)
        clear(out)
        write_manifest(out, kind=kind, state="new")
    except BaseException:
        held.abandon()
        raise
    return held


def claim_default(parent: Path, stem: str, *, kind: str) -> Claim:
    """A new directory `parent/<stem>-<stamp>` (with `-2`, `-3`, ... when that name is taken,
    by another process in the same second included), made atomically and claimed."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    created = _created_parents(parent)
    parent.mkdir(parents=True, exist_ok=True)
    for k in range(1, 10_000):
        out = parent / (f"{stem}-{stamp}" + (f"-{k}" if k > 1 else ""))
        try:
            out.mkdir()
        except FileExistsError:
            continue
        lock = _lock(out)  # a new directory: nobody else holds it
        write_manifest(out, kind=kind, state="new")
        return Claim(out, lock, created + [Path(os.path.abspath(out))])
    raise InputError(f"no free name {parent}/{stem}-{stamp}-N: give --out")


def adopt(out: Path, flag: str = "--resume") -> Claim:
    """Hold an existing run directory of gflow's (to resume it); a run written before
    manifests existed gets one listing the files a run writes."""
    lock = _lock(out)
    if lock is None:
        raise InputError(f"{flag} {out}: the run is in use by another gflow process")
    held = Claim(out, lock, [])
    try:
        if read_manifest(out) is None:
            names = [p.name for p in out.iterdir() if _KNOWN.match(p.name) and p.is_file()]
            write_manifest(out, kind="run", state="solving", add=tuple(names))
            held.adopted = True
    except BaseException:
        held.release(remove_lock=False)
        raise
    return held


# --------------------------------------------------------------------------------------------
# Operating-system errors as one line


def describe_os_error(e: OSError, run_dir: Path | None = None) -> str:
    """One line naming what failed, on which path, and what to do about it."""
    reason = e.strerror or errno.errorcode.get(e.errno or 0, "") or type(e).__name__
    where = f" {e.filename}" if e.filename else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        remedy = "free space there"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        remedy = "make it writable"
    elif e.errno == errno.EPIPE:
        return f"output{where} closed before gflow finished writing ({reason})"
    else:
        remedy = "check the path"
    return f"cannot write{where} ({reason}): {remedy}"
