"""Run configurations: TOML data validated against the functions and settings they feed.

A configuration has four tables:

- `preset`: `name` and a one-line `description`;
- `problem`: `kind` (a registered problem builder) and its keyword arguments, checked against
  the builder's signature;
- `solve`: the `SolveSettings` below, passed to `gflow.solve`;
- `plot`: `time_axis = "log" | "linear" | "stages"`.
"""

import dataclasses
import inspect
import math
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

import numpy as np

from . import _defaults
from . import _toml
from ._errors import InputError
from ._rundir import check_name
from ._grids import linear_grid, log_grid
from ._precision import MATMUL_PRECISIONS, POLICIES, Precision
from ._solvers import SOLVER_NAMES


# Below this, float64's own rounding (2.2e-16 relative) dominates a step's error estimate.
_X64_MIN_RTOL = 1e-14
# Integers of a config are 64-bit (TOML's own range); step and save counts are also bounded by
# the int32 counters diffrax keeps and by memory.
_INT64 = (-(2**63), 2**63 - 1)
_MAX_STEPS_LIMIT = 2**31 - 1
_MAX_SAVE_POINTS = 10**6
_MAX_SNAPSHOT_POINTS = 1000
# An absolute tolerance of 1 or more resolves nothing of a flow from small init: every preset's
# state starts far below 1, so steps would be as long as the error estimate allows.
_MAX_ATOL = 1.0
# Flow times beyond this: the smallest step the solver may take (1e-12 of the horizon) is a unit
# of flow time, and float64 resolves times near t1 only to ~1e-4.
MAX_HORIZON = 1e12


@dataclasses.dataclass(frozen=True)
class SolveSettings:
    """The `[solve]` table: how the flow is integrated and saved.

    **Fields:**

    - `t1`, `t0`: the interval (`t1 > t0`, both finite, `t1 - t0 <= 1e12`).
    - `solver`: a gflow solver name.
    - `rtol`: relative tolerance, in (0, 1) (below 1e-14 a warning: float64 cannot meet it);
        `atol`: absolute tolerance, in (0, 1), or omitted for the default scaled to the
        initial state.
    - `max_steps`: step limit per segment (at most 2**31 - 1).
    - `save_points`: number of save times (3 to 10**6); `grid`: `"log"`, `"linear"` or `"loglinear"`
        (half log-spaced, half linear, merged) spacing.
    - `snapshot_points`: chosen times of the problem's snapshot observables (full spectra,
        cosine matrices: taken at `t0`, at each located transition and at `t1` in any case):
        this many, strictly between `t0` and `t1`, spaced as `snapshot_grid` (`"linear"` or
        `"log"`); 0 for none (at most 1000).
    - `refine`: solve twice: the second solve (same compiled program) puts half of the save
        times evenly around the located transitions, so a fast stage between save times of
        the first grid is resolved.
    - `certify`: also solve with 100× smaller tolerances and report the differences as error
        estimates of every transition and observable.
    - `checkpoint_steps`: when run with checkpoints (`python -m gflow.solve` always is), also
        checkpoint every this many steps, not only at transitions; 0 for transitions only.
    - `precision`: `"float64"`, `"mixed"` (float64 time and state, float32 loss and
        gradient) or `"float32"` (see `gflow.Precision`); an `rtol` below the policy's
        measured floor is refused. `matmul_precision`: JAX's precision of float32 matrix
        products (`"highest"`: strict float32 on GPU and TPU).
    - `x32`: an alias of `precision = "float32"` (kept for older configs).
    - `pcoeff`, `icoeff`: the coefficients of diffrax's `PIDController` (its names and its
        defaults: 0 and 1, integral control). PI control (e.g. 0.3 and 0.4) damps the step
        size's oscillation where steps are limited by stability rather than accuracy, with
        fewer rejected steps (measured on `rank-collapse` in docs/results.md).
    """

    t1: float
    t0: float = 0.0
    solver: str = _defaults.SOLVER
    rtol: float = _defaults.RTOL
    atol: float | None = None
    max_steps: int = _defaults.MAX_STEPS
    save_points: int = _defaults.SAVE_POINTS
    grid: str = "log"
    refine: bool = False
    certify: bool = False
    checkpoint_steps: int = 0
    x32: bool = False
    precision: str = "float64"
    matmul_precision: str = "highest"
    pcoeff: float = _defaults.PCOEFF
    icoeff: float = _defaults.ICOEFF
    snapshot_points: int = 0
    snapshot_grid: str = "linear"

    def __post_init__(self):
        if not (math.isfinite(self.t0) and math.isfinite(self.t1)):
            raise InputError(f"solve.t0 and solve.t1 must be finite, got {self.t0}, {self.t1}")
        if not self.t1 > self.t0:
            raise InputError(f"solve.t1 must be greater than solve.t0, got t0={self.t0}, t1={self.t1}")
        if self.solver.lower() not in SOLVER_NAMES:
            raise InputError(
                f"solve.solver: unknown solver {self.solver!r}; known: {', '.join(SOLVER_NAMES)}"
            )
        if not self.t1 - self.t0 <= MAX_HORIZON:
            raise InputError(
                f"solve.t1 - solve.t0 = {self.t1 - self.t0:g} is beyond {MAX_HORIZON:g}: the "
                "solver's smallest step (1e-12 of it) would exceed the flow's own time scale"
            )
        if not (self.rtol > 0 and math.isfinite(self.rtol)):
            raise InputError(f"solve.rtol must be positive, got {self.rtol}")
        if not self.rtol < 1:
            raise InputError(f"solve.rtol must be below 1 (a relative error), got {self.rtol:g}")
        if self.atol is not None and not (self.atol > 0 and math.isfinite(self.atol)):
            raise InputError(f"solve.atol must be positive, got {self.atol}")
        if self.atol is not None and not self.atol < _MAX_ATOL:
            raise InputError(
                f"solve.atol must be below {_MAX_ATOL:g} (omit it for the default, scaled to "
                f"the initial state), got {self.atol:g}"
            )
        if not 1 <= self.max_steps <= _MAX_STEPS_LIMIT:
            raise InputError(
                f"solve.max_steps must be between 1 and {_MAX_STEPS_LIMIT}, got {self.max_steps}"
            )
        if not 0 <= self.checkpoint_steps <= _MAX_STEPS_LIMIT:
            raise InputError(
                f"solve.checkpoint_steps must be >= 0 (0: at transitions only) and at most "
                f"{_MAX_STEPS_LIMIT}, got {self.checkpoint_steps}"
            )
        if not 3 <= self.save_points <= _MAX_SAVE_POINTS:
            raise InputError(
                f"solve.save_points must be between 3 and {_MAX_SAVE_POINTS}, "
                f"got {self.save_points}"
            )
        if not (math.isfinite(self.pcoeff) and 0 <= self.pcoeff <= 1):
            raise InputError(f"solve.pcoeff must be in [0, 1], got {self.pcoeff}")
        if not (math.isfinite(self.icoeff) and 0 < self.icoeff <= 1):
            raise InputError(f"solve.icoeff must be in (0, 1], got {self.icoeff}")
        if self.precision not in POLICIES:
            raise InputError(f"solve.precision must be one of {', '.join(POLICIES)}, "
                             f"got {self.precision!r}")
        if self.x32 and self.precision not in ("float64", "float32"):
            raise InputError(f"solve.x32 means precision float32: drop it or solve.precision "
                             f"= {self.precision!r}")
        if self.matmul_precision not in MATMUL_PRECISIONS:
            raise InputError(f"solve.matmul_precision must be one of "
                             f"{', '.join(MATMUL_PRECISIONS)}, got {self.matmul_precision!r}")
        if not 0 <= self.snapshot_points <= _MAX_SNAPSHOT_POINTS:
            raise InputError(f"solve.snapshot_points must be between 0 and "
                             f"{_MAX_SNAPSHOT_POINTS}, got {self.snapshot_points}")
        if self.snapshot_grid not in ("log", "linear"):
            raise InputError(f"solve.snapshot_grid must be 'log' or 'linear', got "
                             f"{self.snapshot_grid!r}")
        if self.grid not in ("log", "linear", "loglinear"):
            raise InputError(
                f"solve.grid must be 'log', 'linear' or 'loglinear', got {self.grid!r}"
            )

    def precision_policy(self) -> Precision:
        """The `gflow.Precision` these settings ask for (`x32` is `precision = "float32"`)."""
        policy = "float32" if self.x32 else self.precision
        return Precision(policy, None if policy == "float64" else self.matmul_precision)

    def precision_warning(self) -> str | None:
        """Why these tolerances cannot be met in float64, if they cannot (other precisions
        refuse an rtol below their measured floor: `gflow.Precision.check_rtol`)."""
        if self.rtol < _X64_MIN_RTOL and self.precision_policy().policy == "float64":
            return (
                f"solve.rtol={self.rtol:g} is below what float64 resolves "
                f"({np.finfo(np.float64).eps:.1e}): steps may shrink until max_steps"
            )
        return None

    def save_times(self) -> np.ndarray:
        """The save grid: log-spaced, linear, or (`loglinear`) half of each, merged."""
        if self.grid == "log":
            return log_grid(self.t0, self.t1, self.save_points)
        if self.grid == "linear":
            return linear_grid(self.t0, self.t1, self.save_points)
        # Early phases need log spacing, late laws (e.g. 1/L̂ linear in t) even spacing.
        half = max(self.save_points // 2, 3)
        return np.union1d(
            log_grid(self.t0, self.t1, half, first=1e-6 * (self.t1 - self.t0)),
            linear_grid(self.t0, self.t1, half),
        )

    def snapshot_times(self) -> np.ndarray:
        """The snapshots' chosen times: `snapshot_points` of them strictly between `t0` and
        `t1`, spaced as `snapshot_grid`."""
        grid = log_grid if self.snapshot_grid == "log" else linear_grid
        return grid(self.t0, self.t1, self.snapshot_points + 2)[1:-1]

    def refined_save_times(self, transition_times) -> np.ndarray | None:
        """As many save times as `save_times()`, half of them evenly spread over the window
        around the finite `transition_times` (widened by their spread, at least 1% of the
        horizon on each side); `None` when no transition was reached."""
        times = [t for t in transition_times if math.isfinite(t)]
        if not times:
            return None
        n = len(self.save_times())
        margin = max(max(times) - min(times), 0.01 * (self.t1 - self.t0))
        lo, hi = max(self.t0, min(times) - margin), min(self.t1, max(times) + margin)
        dense = linear_grid(lo, hi, n // 2)
        coarse = log_grid(self.t0, self.t1, n - n // 2 + 2)
        grid = np.union1d(dense, coarse)
        # Keep the count (hence the compiled program): drop coarse points inside the window.
        inside = (grid > lo) & (grid < hi) & ~np.isin(grid, dense)
        grid = grid[~inside]
        if grid.size > n:
            grid = np.delete(grid, np.linspace(1, grid.size - 2, grid.size - n).astype(int))
        return np.pad(grid, (0, n - grid.size), mode="edge") if grid.size < n else grid


@dataclasses.dataclass(frozen=True)
class PlotSettings:
    """The `[plot]` table.

    **Fields:**

    - `time_axis`: `"log"` for multi-scale dynamics, `"stages"` for a linear axis on which
        every stage (between located transitions) has the same width, else `"linear"`.
    - `labels`: `{observable: [name of each component]}` for the figures' legends, e.g.
        `stable_rank = ["W_Q", "W_K", "W_V", "W1"]`.
    - `heatmaps`: matrix-valued observables drawn as heatmaps at t0, each transition and the
        end (e.g. `["cosine"]`).
    - `formats`: figure file formats, of `"png"`, `"pdf"`, `"svg"`; default PNG only (PDF is
        opt-in: it costs as much again).
    """

    time_axis: str = "log"
    labels: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    heatmaps: tuple[str, ...] = ()
    formats: tuple[str, ...] = ("png",)

    def __post_init__(self):
        if self.time_axis not in _defaults.TIME_AXES:
            raise InputError(f"plot.time_axis must be one of {', '.join(_defaults.TIME_AXES)}, "
                             f"got {self.time_axis!r}")
        if not self.formats or any(f not in ("png", "pdf", "svg") for f in self.formats):
            raise InputError(
                f"plot.formats must list formats among png, pdf, svg, got {list(self.formats)}")


def _type_name(annotation) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _check_value(field: str, value: Any, annotation) -> Any:
    """`value` converted to `annotation` (int → float, list → tuple), or an InputError."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_value(field, value, option)
            except InputError:
                pass
        raise InputError(f"{field} must be {_type_name(annotation)}, got {value!r}")
    if origin is dict:
        key_type, value_type = typing.get_args(annotation)
        if not isinstance(value, dict):
            raise InputError(f"{field} must be a table, got {value!r}")
        return {
            _check_value(f"{field} key", k, key_type): _check_value(f"{field}.{k}", v, value_type)
            for k, v in value.items()
        }
    if origin in (tuple, list):
        item = (typing.get_args(annotation) or (Any,))[0]
        if not isinstance(value, (list, tuple)):
            raise InputError(f"{field} must be a list, got {value!r}")
        return tuple(_check_value(f"{field}[{i}]", v, item) for i, v in enumerate(value))
    if annotation is Any:
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"{field} must be a number, got {value!r}")
        try:
            number = float(value)
        except OverflowError:  # an integer beyond float64
            raise InputError(f"{field} must be a finite number, got {value!r}") from None
        if not math.isfinite(number):
            raise InputError(f"{field} must be a finite number, got {value!r}")
        return number
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{field} must be an integer, got {value!r}")
        if not _INT64[0] <= value <= _INT64[1]:
            raise InputError(f"{field} must be a 64-bit integer, got {value}")
        return value
    if annotation in (str, bool):
        if not isinstance(value, annotation):
            raise InputError(f"{field} must be {annotation.__name__}, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {annotation!r} for {field}")


def check_arguments(table: str, values: dict, fn) -> dict:
    """Check `values` against the keyword parameters of `fn` (a function or dataclass).

    **Returns:**

    The values converted to the annotated types; defaults are not filled in.
    """
    params = inspect.signature(fn).parameters
    hints = typing.get_type_hints(fn.__init__ if inspect.isclass(fn) else fn)
    out = {}
    for key, value in values.items():
        if key not in params:
            known = ", ".join(f"{table}.{k}" for k in params)
            raise InputError(f"unknown config key {table}.{key}; known keys: {known}")
        out[key] = _check_value(f"{table}.{key}", value, hints.get(key, Any))
    missing = [
        k for k, p in params.items() if p.default is inspect.Parameter.empty and k not in out
    ]
    if missing:
        raise InputError(f"missing config key {table}.{missing[0]}")
    return out


def read_toml(path: str | Path) -> dict:
    """A TOML file as a dict, with a one-line error naming the file when it is malformed."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise InputError(f"config file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise InputError(f"malformed config {path}: {e}".splitlines()[0]) from None
    except OSError as e:  # a directory, no permission, a name too long
        raise InputError(f"cannot read config {path}: {e.strerror or e}") from None
    return _toml.loads(text, str(path))


def parse_value(text: str) -> Any:
    """A `--set` value: a TOML literal (`1e-3`, `true`, `[1, 2]`, `"s"`) or else a bare string."""
    if _toml._nesting(text) > _toml.MAX_DEPTH:
        raise InputError(f"--set value {text[:40]}...: nested deeper than {_toml.MAX_DEPTH} "
                         "levels")
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(config: dict, overrides: list[str]) -> dict:
    """`config` with each `table.key=value` override applied (the key must already exist)."""
    check_tables(config)
    config = {table: dict(values) for table, values in config.items()}
    given: dict[str, tuple[str, Any]] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        table, dot, field = key.strip().partition(".")
        if not sep or not dot or not field:
            raise InputError(f"--set expects table.key=value, got {item!r}")
        if table not in ("problem", "solve", "plot"):
            raise InputError(f"unknown config table {table!r} in --set {item!r}")
        if field == "kind":
            raise InputError("problem.kind cannot be overridden: choose another preset")
        value = parse_value(text.strip())
        name = f"{table}.{field.strip()}"
        # The same key twice with different values: which one was meant is not ours to guess.
        if name in given and given[name][1] != value:
            raise InputError(f"{name} is given twice, as {given[name][0]!r} and {item!r}")
        given[name] = (item, value)
        config.setdefault(table, {})[field] = value
    return config


TABLES = ("preset", "problem", "solve", "plot")


def check_tables(config: dict) -> None:
    """Each known table of `config` is a table (not a value or an array of tables), and no
    other table is present."""
    for table, values in config.items():
        if table not in TABLES:
            raise InputError(f"unknown config table {table!r}; known: {', '.join(TABLES)}")
        if not isinstance(values, dict):
            what = "an array of tables" if isinstance(values, list) else repr(values)
            raise InputError(f"config [{table}] must be a table, got {what}")
    for key in ("name", "description"):
        value = config.get("preset", {}).get(key)
        if value is not None and not isinstance(value, str):
            raise InputError(f"preset.{key} must be a string, got {value!r}")
    name = config.get("preset", {}).get("name")
    if name is not None:
        check_name(name)


def dumps_toml(config: dict, comments: bool = False, problem: Any = None) -> str:
    """`config` as TOML text (tables of scalars, lists and tables; `None` values are omitted),
    written by `tomli-w`.

    **Arguments:**

    - `config`: the tables.
    - `comments`: write above each key what it means: the `[solve]` and `[plot]` fields'
        documentation, and that of `problem` (the problem builder, a documented function) for
        `[problem]` (`python -m gflow.solve --show`).
    """
    notes = None
    if comments:
        notes = dict(solve=_toml.field_comments(SolveSettings),
                     plot=_toml.field_comments(PlotSettings))
        if problem is not None:
            notes["problem"] = _toml.field_comments(problem)
    return _toml.dumps(config, notes)
