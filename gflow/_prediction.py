"""`Prediction`: one comparison of a run with theory, and the table every report prints."""

import dataclasses
import math
import textwrap
from typing import Any, Literal


Kind = Literal["value", "bound", "qualitative"]
_KINDS = ("value", "bound", "qualitative")
_RELATIONS = ("<=", ">=", "<", ">")


def _finite(x: Any) -> float | None:
    if x is None or isinstance(x, bool):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


@dataclasses.dataclass(frozen=True)
class Prediction:
    """What theory says next to what the flow did.

    Build one with `Prediction.value`, `Prediction.bound` or `Prediction.qualitative`.

    **Fields:**

    - `kind`: `"value"` (a predicted number: `rel_error` says how close), `"bound"` (an
        inequality `measured <relation> predicted`: `holds` says whether it does) or
        `"qualitative"` (a predicted outcome in words, e.g. which answer a model prefers:
        `holds` says whether the flow showed it, `None` where theory makes no call).
    - `predicted`: the predicted number, the bound, or the predicted outcome (a string).
    - `measured`: the measured number or outcome; `None` where it was not measured (a
        transition never reached).
    - `basis`: one line: which formula or claim, and its stated accuracy (e.g. "Saxe et al.'s
        closed form, first order in the init scale").
    - `error`: the certified error of `measured` (from `certify`), or `None`.
    - `relation`: for a bound, how `measured` compares with it (`"<="`, `">="`, `"<"`, `">"`).
    - `holds`: for a bound or a qualitative outcome, whether it held; `None` otherwise or
        where unmeasured.
    """

    kind: Kind
    predicted: float | str | None
    measured: float | str | None
    basis: str = ""
    error: float | None = None
    relation: str | None = None
    holds: bool | None = None

    def __post_init__(self):
        if self.kind not in _KINDS:
            raise ValueError(f"Prediction.kind must be one of {_KINDS}, got {self.kind!r}")
        if self.kind == "bound" and self.relation not in _RELATIONS:
            raise ValueError(f"a bound needs a relation in {_RELATIONS}, got {self.relation!r}")

    @classmethod
    def value(cls, predicted: float, measured: float | None, *, basis: str = "",
              error: float | None = None) -> "Prediction":
        """A predicted number against the measured one (`None` or non-finite: unmeasured)."""
        return cls("value", float(predicted), _finite(measured), basis, _finite(error))

    @classmethod
    def bound(cls, bound: float, measured: float | None, *, relation: str = "<=",
              basis: str = "", error: float | None = None) -> "Prediction":
        """`measured <relation> bound`; `holds` is `None` where unmeasured."""
        measured = _finite(measured)
        holds = None
        if measured is not None:
            holds = {"<=": measured <= bound, ">=": measured >= bound,
                     "<": measured < bound, ">": measured > bound}[relation]
        return cls("bound", float(bound), measured, basis, _finite(error), relation, holds)

    @classmethod
    def qualitative(cls, predicted: str, measured: str | None, *, holds: bool | None,
                    basis: str = "") -> "Prediction":
        """A predicted outcome in words against the observed one."""
        return cls("qualitative", str(predicted), None if measured is None else str(measured),
                   basis, None, None, None if holds is None else bool(holds))

    @property
    def rel_error(self) -> float | None:
        """`|measured − predicted| / |predicted|` for a value (absolute where predicted is 0)."""
        if self.kind != "value" or self.measured is None:
            return None
        diff = abs(self.measured - self.predicted)
        return diff / abs(self.predicted) if self.predicted else diff

    def with_error(self, error: float | None) -> "Prediction":
        """The same prediction with the measurement's certified error attached."""
        return dataclasses.replace(self, error=_finite(error))

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (no NaN or inf: unmeasured is `null`)."""
        return dict(kind=self.kind, predicted=self.predicted, measured=self.measured,
                    error=self.error, rel_error=self.rel_error, relation=self.relation,
                    holds=self.holds, basis=self.basis)

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> "Prediction":
        """The inverse of `to_json`."""
        return cls(entry["kind"], entry.get("predicted"), entry.get("measured"),
                   entry.get("basis", ""), entry.get("error"), entry.get("relation"),
                   entry.get("holds"))


# A predicted or measured text longer than this is printed under its row.
_MAX_CELL = 30


def _number(x: float | None) -> str:
    return "-" if x is None else f"{x:.8g}"


def _outcome(p: Prediction) -> str:
    if p.kind == "value":
        return "-" if p.rel_error is None else f"rel. error {p.rel_error:.2e}"
    if p.holds is None:
        return "not measured" if p.measured is None else "no call"
    if p.kind == "bound":
        return "holds" if p.holds else "VIOLATED"
    return "as predicted" if p.holds else "not as predicted"


def render_predictions(predictions: dict[str, Prediction], width: int = 100) -> list[str]:
    """The predictions table: one row shape for every kind, no line wider than `width`.

    Columns: name, kind, predicted (a bound carries its relation, e.g. `≤ 29339.4`), measured
    (`± error` where certified), outcome (relative error, holds / VIOLATED, or as predicted /
    not as predicted), basis. A predicted or measured text longer than 30 characters shows as
    `(below)` in its cell and in full, wrapped, on the lines under its row; so does a basis
    that would push its row past `width`.

    **Arguments:**

    - `predictions`: `{name: Prediction}`.
    - `width`: the widest line allowed.

    **Returns:**

    The table's lines, header first; empty for no predictions.
    """
    if not predictions:
        return []
    symbol = {"<=": "≤", ">=": "≥", "<": "<", ">": ">", None: ""}
    texts = []
    for name, p in predictions.items():
        if p.kind == "qualitative":
            predicted, measured = p.predicted, "-" if p.measured is None else p.measured
        else:
            predicted = (symbol[p.relation] + " " if p.kind == "bound" else "") + _number(
                p.predicted)
            measured = _number(p.measured)
            if p.error is not None and p.measured is not None:
                measured += f" ± {p.error:.1e}"
        texts.append((name, p, predicted, measured))
    header = ("", "kind", "predicted", "measured", "outcome", "basis")
    # Cells longer than `longest` go under their row; `longest` shrinks until every row's
    # columns fit in `width`.
    for longest in range(_MAX_CELL, 6, -1):
        rows, below = [], []
        for name, p, predicted, measured in texts:
            long = [(label, text) for label, text in (("predicted", predicted),
                                                      ("measured", measured))
                    if len(text) > longest]
            cells = [text if len(text) <= longest else "(below)"
                     for text in (predicted, measured)]
            rows.append((name, p.kind, *cells, _outcome(p), p.basis))
            below.append(long)
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(5)]
        if 2 + sum(widths) + 2 * 4 <= width:
            break
    lines = []
    for k, row in enumerate([header, *rows]):
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
        cells += [row[i].rjust(widths[i]) for i in (2, 3)]
        cells += [row[4].ljust(widths[4])]
        line = "  " + "  ".join(cells)
        extra = [] if k == 0 else below[k - 1]
        if row[5] and len(line) + 2 + len(row[5]) <= width:
            line += "  " + row[5]
        elif row[5] and k > 0:
            extra = extra + [("basis", row[5])]
        lines.append(line.rstrip())
        for label, text in extra:
            lines += textwrap.wrap(text, width, initial_indent=f"      {label}: ",
                                   subsequent_indent=" " * (8 + len(label)),
                                   break_on_hyphens=False)
    return lines
