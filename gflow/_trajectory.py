"""`Trajectory`: what a solve computed, and its run directory on disk.

No JAX at import: `python -m gflow.plot` reads and draws a run directory with numpy and
matplotlib alone (importing JAX is most of a plot command's time otherwise).
"""

import contextlib
import dataclasses
import io
import json
import math
import os
import platform
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from ._errors import InputError
from ._prediction import Prediction


TRAJECTORY_FILE = "trajectory.npz"
SUMMARY_FILE = "summary.json"
AT_TRANSITIONS_FILE = "transitions.npz"
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


def _flat_names(tree) -> dict[str, np.ndarray]:
    """`{"a/b": leaf}` for a (nested) dict or other pytree of arrays."""
    if _nested_dicts_of_arrays(tree):
        # A loaded run's observables, without JAX; other pytrees need it.
        flat = {}
        for key, value in tree.items():
            if isinstance(value, dict):
                flat.update({f"{key}/{k}": v for k, v in _flat_names(value).items()})
            else:
                flat[key] = np.asarray(value)
        return flat
    import jax.tree_util as jtu

    flat = {}
    for path, leaf in jtu.tree_flatten_with_path(tree)[0]:
        parts = []
        for key in path:
            for attr in ("key", "name", "idx"):
                if hasattr(key, attr):
                    parts.append(str(getattr(key, attr)))
                    break
        flat["/".join(parts)] = np.asarray(leaf)
    return flat


def _nested_dicts_of_arrays(tree) -> bool:
    if not isinstance(tree, dict) or not all(isinstance(k, str) for k in tree):
        return False
    return all(_nested_dicts_of_arrays(v) if isinstance(v, dict)
               else isinstance(v, (np.ndarray, np.generic, float, int)) for v in tree.values())


def _nest(flat: dict[str, np.ndarray]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for name, value in flat.items():
        node = nested
        *parents, leaf = name.split("/")
        for part in parents:
            node = node.setdefault(part, {})
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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a crash never leaves a partial file under that name."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
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
    - `t0`, `t1`: the requested interval; `t_final`: where the solve stopped.
    - `status`: `"completed"`, `"max_steps"`, `"nonfinite"`, `"dt_min"` or `"failed"`;
        `message` says more when it is not `"completed"`.
    - `stats`: steps (total, accepted, rejected), vector-field evaluations (`None` for implicit
        solvers), segments, compile and run seconds.
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
    - `components`: `{observable: (name of each component, ...)}`: what the last axis of an
        observable holds, e.g. `{"stable_rank": ("W_Q", "W_K", "W_V", "W1")}` (presets fill it
        from their `[plot] labels`). Saved in `trajectory.npz`, used by `to_xarray` and the
        figures' legends.

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
    components: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)

    def __repr__(self) -> str:
        from ._export import trajectory_repr

        return trajectory_repr(self)

    def _repr_html_(self) -> str:
        from ._export import trajectory_html

        return trajectory_html(self)

    def to_xarray(self):
        """The save times and observables as an `xarray.Dataset` (needs `pip install
        gflow[xarray]`).

        One variable per observable (nested observables as `a/b`), dimension `t` first; an
        observable with named components (see `components`) has them as the coordinate of its
        last axis (`<name>_component`), other axes are `<name>_dim<k>`. Transitions, status,
        solver and tolerances are the dataset's attributes.

        **Returns:**

        An `xarray.Dataset`.
        """
        from ._export import trajectory_to_xarray

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
        """Write the run directory: `trajectory.npz`, `summary.json`, `final.eqx` and (when a
        transition was reached) `transitions.npz`, the observables at the transitions.

        Each file is written atomically (temporary file, then rename).

        **Arguments:**

        - `path`: the directory (created if missing).

        **Returns:**

        The directory's path.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        arrays = {"t": np.asarray(self.ts)}
        for name, value in _flat_names(self.observables).items():
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
                    for obs, value in _flat_names(values).items()}
            buffer = io.BytesIO()
            np.savez(buffer, **flat)
            atomic_write_bytes(path / AT_TRANSITIONS_FILE, buffer.getvalue())
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
    for name in (TRAJECTORY_FILE, SUMMARY_FILE):
        if not (path / name).is_file():
            raise InputError(f"{path} is not a gflow run directory: {name} is missing")
    summary = json.loads((path / SUMMARY_FILE).read_text())
    with np.load(path / TRAJECTORY_FILE) as npz:
        arrays = {name: npz[name] for name in npz.files}
    ts = arrays.pop("t")
    components = {name[len(COMPONENTS_PREFIX):]: tuple(str(c) for c in arrays.pop(name))
                  for name in list(arrays) if name.startswith(COMPONENTS_PREFIX)}
    final = None
    if like is not None:
        import equinox as eqx

        final = eqx.tree_deserialise_leaves(path / FINAL_FILE, like)
    nan_if_none = lambda x: math.nan if x is None else x
    at_transitions = {}
    if (path / AT_TRANSITIONS_FILE).is_file():
        names = list(summary["transitions"])
        with np.load(path / AT_TRANSITIONS_FILE) as npz:
            for key in npz.files:
                index, obs = key.split("/", 1)
                at_transitions.setdefault(names[int(index)], {})[obs] = npz[key]
        at_transitions = {name: _nest(values) for name, values in at_transitions.items()}
    return Trajectory(
        ts=ts,
        observables=_nest(arrays),
        transitions={k: nan_if_none(v) for k, v in summary["transitions"].items()},
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
        predictions={k: Prediction.from_json(p)
                     for k, p in summary.get("predictions", {}).items()},
        errors=summary.get("errors", {}),
        criteria=summary.get("criteria", {}),
        references={k: {label: _level(v) for label, v in levels.items()}
                    for k, levels in summary.get("references", {}).items()},
        at_transitions=at_transitions,
        components=components,
    )
