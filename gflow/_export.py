"""Results you keep working with: short `repr`s, notebook tables, xarray and pandas exports.

`Trajectory` and `Sweep` call these from their methods (so this module imports neither: the
`traj` these functions take is a `gflow.Trajectory`); xarray and pandas are imported only when
an export is asked for (the `xarray` extra).
"""

import html
import math
from typing import Any

import numpy as np

from ._errors import InputError
from ._names import flat_names

# A repr list longer than this ends in "…, (+k more)": a preset records dozens of observables.
_LINE = 84


def _number(x: Any) -> str:
    if isinstance(x, (bool, np.bool_)) or x is None:
        return str(x)
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    x = float(x)
    return "nan" if math.isnan(x) else f"{x:.6g}"


def _listing(items: list[str], width: int = _LINE) -> str:
    """`a, b, c` cut to `width` characters with the count of what was left out."""
    shown: list[str] = []
    for k, item in enumerate(items):
        more = len(items) - k
        tail = f", … (+{more} more)" if more > 1 else ""
        if shown and len(", ".join(shown + [item])) + len(tail) > width:
            return ", ".join(shown) + f", … (+{more} more)"
        shown.append(item)
    return ", ".join(shown)


def _shapes(observables) -> list[str]:
    return [f"{name} {tuple(np.shape(v))}" for name, v in flat_names(observables).items()]


def _transitions(transitions: dict[str, float]) -> list[str]:
    return [f"{name}={_number(t) if math.isfinite(t) else 'not reached'}"
            for name, t in transitions.items()]


def _stats(stats: dict[str, Any]) -> str:
    parts = []
    if stats.get("num_steps") is not None:
        rejected = stats.get("num_rejected_steps")
        parts.append(f"{stats['num_steps']} steps"
                     + (f" ({rejected} rejected)" if rejected else ""))
    for key, label in (("run_seconds", "run"), ("compile_seconds", "compile")):
        if isinstance(stats.get(key), (int, float)):
            parts.append(f"{stats[key]:.3g} s {label}")
    return ", ".join(parts)


def _status(status: str, message: str) -> str:
    if status == "completed" or not message:
        return status
    return f"{status}: {message if len(message) <= 80 else message[:79] + '…'}"


def _predictions(predictions: dict) -> str:
    verdicts = [p.holds for p in predictions.values()]
    held = sum(v is True for v in verdicts)
    failed = sum(v is False for v in verdicts)
    return f"{len(predictions)} ({held} hold, {failed} fail)" if failed or held else str(
        len(predictions))


def _prediction(p) -> str:
    text = f"{p.kind}: predicted {_value(p.predicted)}, measured {_value(p.measured)}"
    if p.rel_error is not None:
        text += f" (rel. error {p.rel_error:.2e})"
    elif p.holds is not None:
        text += " (holds)" if p.holds else " (does not hold)"
    return text + (f"; {p.basis}" if p.basis else "")


def _value(x) -> str:
    return x if isinstance(x, str) else "-" if x is None else _number(x)


def trajectory_repr(traj) -> str:
    """A few lines: status, interval, settings and work, observables' shapes, transitions."""
    n = np.shape(traj.ts)[0]
    lines = [
        f"Trajectory({_status(traj.status, traj.message)}, t in [{_number(traj.t0)}, "
        f"{_number(traj.t1)}], t_final={_number(traj.t_final)}, {n} save times",
        f"  solver={traj.solver}, rtol={_number(traj.rtol)}, atol={_number(traj.atol)}"
        + (f"; {s}" if (s := _stats(traj.stats)) else ""),
        "  observables: " + _listing(_shapes(traj.observables)),
    ]
    if traj.snapshot_labels:
        lines.append("  snapshots: " + _snapshots(traj))
    if traj.transitions:
        lines.append("  transitions: " + _listing(_transitions(traj.transitions)))
    if traj.predictions:
        lines.append(f"  predictions: {_predictions(traj.predictions)}")
    return "\n".join(lines) + ")"


def _snapshots(traj) -> str:
    """The snapshot observables and where they were taken, in one line."""
    labels = traj.snapshot_labels
    chosen = sum(label == "" for label in labels)
    places = [x for x in ("t0",) if x in labels] + [
        f"{len(labels) - chosen - ('t0' in labels) - ('end' in labels)} transition(s)",
        f"{chosen} chosen time(s)"] + [x for x in ("end",) if x in labels]
    return f"{', '.join(sorted(traj.snapshots))} at {len(labels)} times ({', '.join(places)})"


def _table(rows: list[tuple[str, str]]) -> str:
    cells = "".join(
        f"<tr><th style='text-align:left'>{html.escape(k)}</th>"
        f"<td style='text-align:left'>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table>{cells}</table>"


def trajectory_html(traj) -> str:
    """A notebook table: the `repr`'s content, every observable and every transition."""
    rows = [
        ("status", _status(traj.status, traj.message)),
        ("t", f"[{_number(traj.t0)}, {_number(traj.t1)}], final {_number(traj.t_final)}, "
              f"{np.shape(traj.ts)[0]} save times"),
        ("solver", f"{traj.solver}, rtol={_number(traj.rtol)}, atol={_number(traj.atol)}"),
        ("work", _stats(traj.stats)),
        ("observables", ", ".join(_shapes(traj.observables))),
    ]
    if traj.snapshot_labels:
        rows.append(("snapshots", _snapshots(traj)))
    rows += [(f"transition {name}", text.partition("=")[2])
             for name, text in zip(traj.transitions, _transitions(traj.transitions))]
    rows += [(f"prediction {name}", _prediction(p)) for name, p in traj.predictions.items()]
    return "<b>gflow.Trajectory</b>" + _table(rows)


def _import_xarray():
    try:
        import xarray
    except ImportError:
        raise InputError("Trajectory.to_xarray needs xarray: pip install 'gflow[xarray]'")
    return xarray


def _variable(traj, name: str, value: np.ndarray, lead: str,
              coords: dict) -> tuple[list[str], np.ndarray]:
    """An observable's dimensions (`lead` first, its named components last) and values;
    the components' coordinate is added to `coords`."""
    dims = [lead] + [f"{name}_dim{k}" for k in range(1, value.ndim)]
    names = traj.components.get(name)
    if names and value.ndim >= 2 and len(names) == value.shape[-1]:
        dims[-1] = f"{name}_component"
        coords[dims[-1]] = (dims[-1], np.asarray(names, dtype=np.str_))
    return dims, value


def trajectory_to_xarray(traj):
    """See `Trajectory.to_xarray`."""
    xr = _import_xarray()
    ts = np.asarray(traj.ts)
    variables, coords = {}, {"t": ("t", ts)}
    for name, value in flat_names(traj.observables).items():
        value = np.asarray(value)
        if value.ndim == 0 or value.shape[0] != ts.shape[0]:
            raise InputError(f"observable {name!r} of shape {value.shape} has no leading time "
                             f"axis of {ts.shape[0]}")
        variables[name] = _variable(traj, name, value, "t", coords)
    if len(traj.snapshot_labels):
        # Snapshot observables on their own axis: the times and places they were taken.
        coords["snapshot_t"] = ("snapshot", np.asarray(traj.snapshot_ts, dtype=float))
        coords["snapshot_label"] = ("snapshot", np.asarray(traj.snapshot_labels, dtype=np.str_))
        for name, value in flat_names(traj.snapshots).items():
            variables[name] = _variable(traj, name, np.asarray(value), "snapshot", coords)
    attrs = dict(status=traj.status, message=traj.message, solver=traj.solver,
                 rtol=float(traj.rtol), atol=float(traj.atol), t0=float(traj.t0),
                 t1=float(traj.t1), t_final=float(traj.t_final))
    attrs |= {f"transition/{name}": float(t) for name, t in traj.transitions.items()}
    return xr.Dataset(variables, coords=coords, attrs=attrs)


def _reached(sweep, name: str) -> int:
    return sum(math.isfinite(m.transitions.get(name, math.nan)) for m in sweep.members)


def sweep_repr(sweep) -> str:
    """A few lines: axes, members by status, transitions reached, compiled programs."""
    statuses: dict[str, int] = {}
    for m in sweep.members:
        statuses[m.status] = statuses.get(m.status, 0) + 1
    axes = [f"{name}=" + _listing([_number(v) if isinstance(v, (int, float)) else repr(v)
                                   for v in values], 60)
            for name, values in sweep.axes.items()]
    reached = [f"{name} {_reached(sweep, name)}/{len(sweep.members)}"
               for name in sweep.transition_names]
    lines = [
        f"Sweep({len(sweep.members)} members ({sweep.mode}), "
        + ", ".join(f"{k} {v}" for k, v in statuses.items())
        + f"; t in [{_number(sweep.t0)}, {_number(sweep.t1)}], solver={sweep.solver}, "
        f"rtol={_number(sweep.rtol)}, {len(sweep.groups)} compiled program(s)",
        "  axes: " + _listing(axes),
    ]
    if reached:
        lines.append("  transitions reached: " + _listing(reached))
    return "\n".join(lines) + ")"


def sweep_html(sweep) -> str:
    """A notebook table: the `repr`'s summary, then the members (at most 50 rows)."""
    head = html.escape(sweep_repr(sweep)).replace("\n", "<br>")
    rows = sweep.table()
    shown = rows[:50]
    columns = list(rows[0]) if rows else []
    header = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_number(v) if isinstance(v, (int, float)) else str(v))}"
                         "</td>" for v in row.values()) + "</tr>" for row in shown)
    more = f"<p>… {len(rows) - len(shown)} more members</p>" if len(rows) > len(shown) else ""
    return f"<p><b>gflow.Sweep</b><br>{head}</p><table><tr>{header}</tr>{body}</table>{more}"


def sweep_to_pandas(sweep):
    """See `Sweep.to_pandas`."""
    try:
        import pandas as pd
    except ImportError:
        raise InputError("Sweep.to_pandas needs pandas: pip install 'gflow[xarray]'")
    return pd.DataFrame(sweep.table())
