"""`Trajectory`: what a solve computed, and its run directory on disk.

No JAX at import: `python -m gflow.plot` reads and draws a run directory with numpy and
matplotlib alone (importing JAX is most of a plot command's time otherwise).
"""

import dataclasses
import io
import json
import math
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from ._defaults import TIME_AXES
from ._errors import InputError
from ._export import trajectory_html, trajectory_repr, trajectory_to_xarray
from ._names import flat_names, unescape
from ._prediction import Prediction
from ._rundir import atomic_write_bytes, remove_stale, write_manifest  # noqa: F401 (re-exported)


TRAJECTORY_FILE = "trajectory.npz"
SUMMARY_FILE = "summary.json"
AT_TRANSITIONS_FILE = "transitions.npz"
SNAPSHOTS_FILE = "snapshots.npz"
# snapshots.npz holds the snapshots' times and where each was taken under these names.
SNAPSHOT_TIME, SNAPSHOT_LABEL = "t", "label"
FINAL_FILE = "final.eqx"
# trajectory.npz stores the names of an observable's components beside it, under this prefix
# (a string array; files written before it have none, and read as before).
COMPONENTS_PREFIX = "components::"

_VERSIONED = ("gflow", "jax", "jaxlib", "diffrax", "equinox", "optax", "numpy")


def package_versions() -> dict[str, str]:
    """Versions of Python and of the packages a result depends on."""
    versions = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _nest(flat: dict[str, np.ndarray], where: str = "") -> dict[str, Any]:
    """`flat_names` undone; a name that is both a leaf and a group is an `InputError`
    naming `where` (the file it was read from)."""
    nested: dict[str, Any] = {}
    for name, value in flat.items():
        node = nested
        *parents, leaf = [unescape(p) for p in name.split("/")]
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise InputError(f"{where}: {name!r} is both an observable and a group of them")
        if leaf in node:
            raise InputError(f"{where}: {name!r} is both an observable and a group of them")
        node[leaf] = value
    return nested


def _json_default(value):
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _json_ready(tree):
    """Floats as JSON allows them: nan and inf become null (numpy scalars and arrays too)."""
    if isinstance(tree, dict):
        return {k: _json_ready(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_json_ready(v) for v in tree]
    if isinstance(tree, np.ndarray):
        return _json_ready(tree.tolist())
    if isinstance(tree, (np.floating, np.integer, np.bool_)):
        tree = tree.item()
    if isinstance(tree, float):
        return _finite_or_none(tree)
    return tree


def _finite_or_none(x: float) -> float | None:
    # JSON has no nan: a transition never reached is written as null.
    return None if x is None or not math.isfinite(x) else float(x)


@dataclasses.dataclass(frozen=True)
class Trajectory:
    """The result of `gflow.solve`.

    **Fields:**

    - `ts`: the save times actually reached, shape `(n,)`.
    - `observables`: `{name: array}` with leading axis `n` (observers returning pytrees keep
        their structure).
    - `transitions`: `{name: time}`, `nan` for a transition never reached (`null` in
        `summary.json`, which holds no NaN or infinity anywhere: see `summary`).
    - `final`: the model (frozen leaves included) at `t_final`.
    - `t0`, `t1`: the requested interval; `t_final`: where the solve stopped (`t1`, a
        failure, or a terminal transition such as `gflow.converged`).
    - `status`: `"completed"`, `"max_steps"`, `"nonfinite"`, `"dt_min"` or `"failed"`;
        `message` says more when it is not `"completed"`.
    - `stats`: steps (total, accepted, rejected), vector-field evaluations (`None` for
        diffrax's implicit solvers), segments, compile and run seconds; gflow's stiff solvers
        (`NewtonKrylovBDF`, `NewtonKrylovESDIRK`, `StiffSwitching`) add their counters:
        `gradients`, `hvps`, `newton_iterations`, `krylov_iterations`, `implicit_steps`,
        `cost` (gradients + 2 × HVPs), and for the switching solver `explicit_steps`,
        `switches`, `switch_times`.
    - `solver`, `rtol`, `atol`: the settings used.
    - `config`: the configuration that produced the run (set by the command line), or `None`.
    - `predictions`: `{name: gflow.Prediction}` comparisons with theory, filled by presets.
    - `errors`: error estimates from `solve(..., certify=True)` (see `gflow.error_estimates`),
        else empty.
    - `criteria`: `{transition name: one-line criterion}`, filled by presets.
    - `references`: `{observable: {label: level}}`: what theory gives for an observable,
        filled by presets: a number (e.g. a target's singular value, drawn as a horizontal
        line) or an array of one value per save time (a closed-form curve, drawn dashed).
    - `at_transitions`: `{transition name: {observable name: value}}`, every observable at the
        state where each reached transition was located (the root finder's state, which no
        save time holds unless one is placed there).
    - `spec`: the `gflow.SolveSpec` the solve ran (re-solves, e.g. `gflow.critical_points`,
        run the same solve from it); `None` for a trajectory loaded from disk.
    - `components`: `{observable: (name of each component, ...)}`: what the last axis of an
        observable holds, e.g. `{"stable_rank": ("W_Q", "W_K", "W_V", "W1")}` (presets fill it
        from their `[plot] labels`). Saved in `trajectory.npz`, used by `to_xarray` and the
        figures' legends.
    - `snapshots`: `{name: array}` of the solve's snapshot observers (`gflow.solve(...,
        snapshots=...)`: full spectra, cosine matrices, singular vectors), with leading axis
        `k`, one row per place they were taken, in time order: `t0`, each chosen time
        reached, each reached transition (at its located state) and `t1`.
    - `snapshot_ts`: the times of those rows, shape `(k,)`.
    - `snapshot_labels`: where each row was taken: `"t0"`, `"end"` (`t1`), a transition's
        name, or `""` for a chosen time.

    `repr` gives a few lines (status, shapes, transitions); in a notebook `_repr_html_` a
    table. `to_xarray()` returns an `xarray.Dataset` (the `xarray` extra).
    """

    ts: np.ndarray  # (n,)
    observables: dict[str, Any]
    transitions: dict[str, float]
    final: Any  # the model, a pytree
    t0: float
    t1: float
    t_final: float
    status: str
    message: str
    stats: dict[str, Any]
    solver: str
    rtol: float
    atol: float
    config: dict[str, Any] | None = None
    predictions: dict[str, Prediction] = dataclasses.field(default_factory=dict)
    errors: dict[str, Any] = dataclasses.field(default_factory=dict)
    criteria: dict[str, str] = dataclasses.field(default_factory=dict)
    references: dict[str, dict[str, float | np.ndarray]] = dataclasses.field(default_factory=dict)
    at_transitions: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    spec: Any = dataclasses.field(default=None, repr=False, compare=False)
    components: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    snapshots: dict[str, Any] = dataclasses.field(default_factory=dict)
    snapshot_ts: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
    snapshot_labels: tuple[str, ...] = ()

    def snapshot(self, label: str) -> dict[str, Any]:
        """The snapshot observables taken at `label` (`"t0"`, `"end"` or a transition's
        name), e.g. `traj.snapshot("kq_collapse")["cosine"]`; a `KeyError` if none was."""
        if label not in self.snapshot_labels or not label:
            raise KeyError(f"no snapshot at {label!r}; taken at "
                           f"{[x for x in self.snapshot_labels if x]}")
        return _index(self.snapshots, self.snapshot_labels.index(label))

    def memory(self) -> dict[str, float]:
        """What the recorded observables weigh.

        **Returns:**

        `{"per_save_time": bytes, "per_snapshot": bytes}`: the observables of one save time
        (`observables`), and the snapshot observables of one snapshot (`snapshots`; 0
        without).
        """

        def weight(tree, rows: int) -> float:
            total = sum(np.asarray(v).nbytes for v in flat_names(tree).values())
            return total / rows if rows else 0.0

        return dict(per_save_time=weight(self.observables, len(self.ts)),
                    per_snapshot=weight(self.snapshots, len(self.snapshot_labels)))

    def __repr__(self) -> str:
        return trajectory_repr(self)

    def _repr_html_(self) -> str:
        return trajectory_html(self)

    def to_xarray(self):
        """The save times and observables as an `xarray.Dataset` (needs `pip install
        gflow[xarray]`).

        One variable per observable (nested observables as `a/b`), dimension `t` first; an
        observable with named components (see `components`) has them as the coordinate of its
        last axis (`<name>_component`), other axes are `<name>_dim<k>`. Snapshot observables
        have dimension `snapshot` first instead, with coordinates `snapshot_t` and
        `snapshot_label` (see `snapshot_labels`). Transitions, status, solver and tolerances
        are the dataset's attributes.

        **Returns:**

        An `xarray.Dataset`.
        """
        return trajectory_to_xarray(self)

    @property
    def completed(self) -> bool:
        """Whether the solve reached `t1`."""
        return self.status == "completed"

    def summary(self) -> dict[str, Any]:
        """The JSON-ready summary written to `summary.json`.

        JSON has no NaN or infinity: every such number (a transition never reached, an error
        estimate or prediction that could not be measured) is written as `null`, and `load`
        reads a `null` time back as `nan`.
        """
        return _json_ready(dict(
            status=self.status,
            message=self.message,
            t0=self.t0,
            t1=self.t1,
            t_final=_finite_or_none(self.t_final),
            solver=self.solver,
            rtol=self.rtol,
            atol=self.atol,
            stats=self.stats,
            transitions={k: _finite_or_none(v) for k, v in self.transitions.items()},
            criteria=self.criteria,
            references=_json_ready(self.references),
            predictions={k: p.to_json() for k, p in self.predictions.items()},
            errors=_json_ready(self.errors),
            config=self.config,
            versions=package_versions(),
        ))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the run directory: `trajectory.npz`, `summary.json`, `final.eqx`, (when a
        transition was reached) `transitions.npz`, the observables at the transitions, and
        (with snapshots) `snapshots.npz`.

        Each file is written atomically (temporary file, then rename).

        **Arguments:**

        - `path`: the directory (created if missing).

        **Returns:**

        The directory's path.
        """
        path = Path(path)
        if os.path.lexists(path) and not path.is_dir():
            raise InputError(f"cannot save the run to {path}: it exists and is not a directory")
        path.mkdir(parents=True, exist_ok=True)
        # The directory's manifest lists what gflow wrote there: an earlier save's files that
        # this one does not rewrite (transitions.npz) are removed, a user's files are not.
        write_manifest(path)
        written = {TRAJECTORY_FILE, FINAL_FILE, SUMMARY_FILE}
        arrays = {"t": np.asarray(self.ts)}
        for name, value in flat_names(self.observables).items():
            if name == "t" or name.startswith(COMPONENTS_PREFIX):
                raise InputError(f"an observable may not be named {name!r} (reserved)")
            arrays[name] = value
            names = self.components.get(name)
            if names:
                arrays[COMPONENTS_PREFIX + name] = np.asarray(names, dtype=np.str_)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        atomic_write_bytes(path / TRAJECTORY_FILE, buffer.getvalue())
        if self.at_transitions:
            # Keyed by the transition's position in `transitions` (names may hold any
            # character, `/` included).
            order = {name: k for k, name in enumerate(self.transitions)}
            flat = {f"{order[name]}/{obs}": value
                    for name, values in self.at_transitions.items()
                    for obs, value in flat_names(values).items()}
            buffer = io.BytesIO()
            np.savez(buffer, **flat)
            atomic_write_bytes(path / AT_TRANSITIONS_FILE, buffer.getvalue())
            written.add(AT_TRANSITIONS_FILE)
        if len(self.snapshot_labels):
            arrays = {SNAPSHOT_TIME: np.asarray(self.snapshot_ts, dtype=np.float64),
                      SNAPSHOT_LABEL: np.asarray(self.snapshot_labels, dtype=np.str_)}
            for name, value in flat_names(self.snapshots).items():
                if name in arrays:
                    raise InputError(f"a snapshot may not be named {name!r} (reserved)")
                arrays[name] = value
            buffer = io.BytesIO()
            np.savez(buffer, **arrays)
            atomic_write_bytes(path / SNAPSHOTS_FILE, buffer.getvalue())
            written.add(SNAPSHOTS_FILE)
        remove_stale(path, written,
                     among=lambda name: name in (AT_TRANSITIONS_FILE, SNAPSHOTS_FILE))
        import equinox as eqx

        buffer = io.BytesIO()
        eqx.tree_serialise_leaves(buffer, self.final)
        atomic_write_bytes(path / FINAL_FILE, buffer.getvalue())
        text = json.dumps(self.summary(), indent=2, default=_json_default, allow_nan=False)
        atomic_write_bytes(path / SUMMARY_FILE, (text + "\n").encode())
        return path


def _level(value) -> float | np.ndarray:
    """A reference read back from `summary.json`: a number, or a curve (a list) as an array;
    `null` (a non-finite value) as `nan` either way."""
    if isinstance(value, list):
        return np.array([math.nan if v is None else v for v in value], dtype=np.float64)
    return math.nan if value is None else value


def load(path: str | os.PathLike, like: Any = None) -> Trajectory:
    """Read a run directory written by `Trajectory.save`.

    **Arguments:**

    - `path`: the run directory.
    - `like`: a model of the same structure as the saved final model (e.g. the initial model),
        used to deserialise `final`. Without it, `final` is `None`.

    **Returns:**

    The `Trajectory`; observables come back as nested dicts of numpy arrays (names split at
    `/`), transitions never reached as `nan`, reference curves as float64 arrays.
    """
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path} is not a gflow run directory (not a directory)")
    for name in (TRAJECTORY_FILE, SUMMARY_FILE):
        if not (path / name).is_file():
            raise InputError(f"{path} is not a gflow run directory: {name} is missing")
    summary = _read_summary(path / SUMMARY_FILE)
    arrays = _read_npz(path / TRAJECTORY_FILE)
    where = path / TRAJECTORY_FILE
    if "t" not in arrays:
        raise InputError(f"{where} is damaged: it has no time axis 't'")
    ts = arrays.pop("t")
    components = {name[len(COMPONENTS_PREFIX):]: tuple(str(c) for c in arrays.pop(name))
                  for name in list(arrays) if name.startswith(COMPONENTS_PREFIX)}
    if ts.ndim != 1 or not np.issubdtype(ts.dtype, np.number):
        raise InputError(f"{where} is damaged: 't' has shape {ts.shape} and dtype {ts.dtype}")
    for name, value in arrays.items():
        if value.ndim == 0 or value.shape[0] != ts.shape[0]:
            raise InputError(f"{where} is damaged: observable {name!r} has shape {value.shape}, "
                             f"not {ts.shape[0]} rows (one per save time)")
    final = None if like is None else _read_final(path / FINAL_FILE, like)
    nan_if_none = lambda x: math.nan if x is None else x
    transitions = {k: nan_if_none(v) for k, v in summary["transitions"].items()}
    at_transitions = {}
    if (path / AT_TRANSITIONS_FILE).is_file():
        where = path / AT_TRANSITIONS_FILE
        names = list(summary["transitions"])
        for key, value in _read_npz(where).items():
            index, _, obs = key.partition("/")
            if not index.isdigit() or not obs or int(index) >= len(names):
                raise InputError(f"{where} is damaged: entry {key!r} names no transition of "
                                 f"{path / SUMMARY_FILE}")
            name = names[int(index)]
            if not math.isfinite(transitions[name]):
                raise InputError(f"{where} does not belong to this run: it holds a state at "
                                 f"{name!r}, which the run never reached")
            at_transitions.setdefault(name, {})[obs] = value
        at_transitions = {name: _nest(values, str(where))
                          for name, values in at_transitions.items()}
    snapshots, snapshot_ts, snapshot_labels = _read_snapshots(path / SNAPSHOTS_FILE)
    try:
        predictions = {k: Prediction.from_json(p)
                       for k, p in summary.get("predictions", {}).items()}
        references = {k: {label: _level(v) for label, v in levels.items()}
                      for k, levels in summary.get("references", {}).items()}
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise InputError(f"{path / SUMMARY_FILE} is damaged: its predictions or references "
                         f"cannot be read ({type(e).__name__}: {e})".splitlines()[0]) from None
    return Trajectory(
        ts=ts,
        observables=_nest(arrays, str(path / TRAJECTORY_FILE)),
        transitions=transitions,
        final=final,
        t0=summary["t0"],
        t1=summary["t1"],
        t_final=nan_if_none(summary["t_final"]),
        status=summary["status"],
        message=summary["message"],
        stats=summary["stats"],
        solver=summary["solver"],
        rtol=summary["rtol"],
        atol=summary["atol"],
        config=summary.get("config"),
        predictions=predictions,
        errors=summary.get("errors", {}),
        criteria=summary.get("criteria", {}),
        references=references,
        at_transitions=at_transitions,
        components=components,
        snapshots=snapshots,
        snapshot_ts=snapshot_ts,
        snapshot_labels=snapshot_labels,
    )


def _index(tree, i: int):
    if isinstance(tree, dict):
        return {k: _index(v, i) for k, v in tree.items()}
    return np.asarray(tree)[i]


def _read_snapshots(file: Path) -> tuple[dict, np.ndarray, tuple[str, ...]]:
    """`snapshots.npz` as `Trajectory.snapshots`, `snapshot_ts`, `snapshot_labels` (empty
    without the file), checked: an `InputError` naming the file and what is wrong."""
    if not file.is_file():
        return {}, np.zeros(0), ()
    arrays = _read_npz(file)
    ts, labels = arrays.pop(SNAPSHOT_TIME, None), arrays.pop(SNAPSHOT_LABEL, None)
    if (ts is None or labels is None or ts.ndim != 1 or labels.shape != ts.shape
            or not np.issubdtype(ts.dtype, np.number) or labels.dtype.kind != "U"):
        raise InputError(f"{file} is damaged: its snapshot times or labels are missing or "
                         "malformed")
    for name, value in arrays.items():
        if value.ndim == 0 or value.shape[0] != ts.shape[0]:
            raise InputError(f"{file} is damaged: snapshot {name!r} has shape {value.shape}, "
                             f"not {ts.shape[0]} rows (one per snapshot)")
    return _nest(arrays, str(file)), ts, tuple(str(x) for x in labels)


_NUMBER = (int, float)
# The fields of summary.json that `load` needs, and their JSON types (None: null allowed).
_SUMMARY_FIELDS = dict(t0=_NUMBER, t1=_NUMBER, t_final=_NUMBER + (type(None),), status=str,
                       message=str, stats=dict, solver=str, rtol=_NUMBER, atol=_NUMBER,
                       transitions=dict)
_OPTIONAL_FIELDS = dict(config=(dict, type(None)), predictions=dict, errors=dict, criteria=dict,
                        references=dict)


def _read_summary(file: Path) -> dict:
    """`summary.json`, checked: an `InputError` naming the file and what is wrong with it."""
    try:
        summary = json.loads(file.read_bytes().decode())
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError included
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise InputError(f"{file} is not readable JSON ({reason})") from None
    if not isinstance(summary, dict):
        raise InputError(f"{file} is damaged: it holds a JSON {type(summary).__name__}, not an "
                         "object")
    for fields, required in ((_SUMMARY_FIELDS, True), (_OPTIONAL_FIELDS, False)):
        for key, kind in fields.items():
            if key not in summary:
                if required:
                    raise InputError(f"{file} is damaged: it has no {key!r}")
                continue
            value = summary[key]
            if isinstance(value, bool) or not isinstance(value, kind):
                raise InputError(f"{file} is damaged: {key!r} is {value!r:.60}")
    for name, t in summary["transitions"].items():
        if isinstance(t, bool) or not isinstance(t, _NUMBER + (type(None),)):
            raise InputError(f"{file} is damaged: transition {name!r} has time {t!r:.60}")
    for name, levels in summary.get("references", {}).items():
        if not isinstance(levels, dict):
            raise InputError(f"{file} is damaged: references of {name!r} are not a table")
    return summary


def _read_npz(file: Path) -> dict[str, np.ndarray]:
    """The arrays of an `.npz` file (no pickles), or an `InputError` naming it."""
    try:
        with open(file, "rb") as f, np.load(f, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except Exception as e:  # noqa: BLE001 - any failure to read is a damaged file
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise InputError(f"{file} is not a readable .npz file ({reason})") from None


def _read_final(file: Path, like: Any) -> Any:
    """`final.eqx` deserialised into the structure of `like`: every leaf of the file read, of
    the shape and dtype of `like`'s, or an `InputError` naming the file."""
    import equinox as eqx

    if not file.is_file():
        raise InputError(f"{file} is missing: the run's final model cannot be read")
    try:
        with open(file, "rb") as f:
            final = eqx.tree_deserialise_leaves(f, like)
            rest = f.read(1)
    except Exception as e:  # noqa: BLE001 - a damaged file, or `like` of another structure
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise InputError(f"{file} does not match `like` (a model of the saved structure): "
                         f"{reason}") from None
    if rest:
        raise InputError(f"{file} holds more than `like` has: give a model of the saved "
                         "structure (e.g. the initial model)")
    return final


_PLOT_FORMATS = ("png", "pdf", "svg")


def read_run(path: str | os.PathLike) -> tuple[Trajectory, dict[str, Any]]:
    """A run directory as `python -m gflow.plot` draws it: the `Trajectory` (`load`) and the
    `[plot]` settings of its config (`time_axis`, `labels`, `heatmaps`, `formats`), each
    checked: an `InputError` naming the file and what is wrong."""
    traj = load(path)
    where = Path(path) / SUMMARY_FILE
    plot = (traj.config or {}).get("plot", {})
    if not isinstance(plot, dict):
        raise InputError(f"{where}: the config's [plot] is not a table")
    settings = dict(time_axis=plot.get("time_axis", "log"), labels=plot.get("labels", {}),
                    heatmaps=plot.get("heatmaps", []), formats=plot.get("formats", ["png"]))
    if settings["time_axis"] not in TIME_AXES:
        raise InputError(f"{where}: plot.time_axis must be one of {', '.join(TIME_AXES)}, got "
                         f"{settings['time_axis']!r:.60}")
    formats = settings["formats"]
    if (not isinstance(formats, list) or not formats
            or any(f not in _PLOT_FORMATS for f in formats)):
        raise InputError(f"{where}: plot.formats must list formats among "
                         f"{', '.join(_PLOT_FORMATS)}, got {formats!r:.60}")
    labels = settings["labels"]
    if not isinstance(labels, dict) or not all(
            isinstance(v, list) and all(isinstance(x, str) for x in v) for v in labels.values()):
        raise InputError(f"{where}: plot.labels must be a table of lists of names, got "
                         f"{labels!r:.60}")
    heatmaps = settings["heatmaps"]
    if not isinstance(heatmaps, list) or not all(isinstance(h, str) for h in heatmaps):
        raise InputError(f"{where}: plot.heatmaps must be a list of observable names, got "
                         f"{heatmaps!r:.60}")
    settings.update(formats=tuple(formats), heatmaps=tuple(heatmaps),
                    labels={k: tuple(v) for k, v in labels.items()})
    return traj, settings
