"""The benchmark results page: every suite's JSON in `benchmarks/results/`, one page in the docs.

    python -m benchmarks.results_page            # writes docs/results.md
    python -m benchmarks.results_page --check    # exit 1 if docs/results.md is not current

The JSON contract
-----------------
A suite (any module under `benchmarks/`) ends its run with

    from benchmarks.results_page import write_suite
    write_suite("engine-overhead", title="gflow.solve against bare diffrax",
                command="python -m benchmarks.engine_overhead", machine=machine(),
                rows=[dict(quantity="whole call / bare diffrax, deep-linear tsit5 rtol 1e-8",
                           value=1.07, unit="×", detail="min of 60 calls; median 1.09")],
                summary="What the suite measures, how, and what to read from it.")

which writes `benchmarks/results/engine-overhead.json`:

    {"suite": str,            # the file's name, unique among suites
     "title": str,            # the section heading on the page
     "command": str,          # how to reproduce every number of the file
     "machine": dict,         # benchmarks._harness.machine(): cpu, cores, backend, versions,
                              #   date, commit (shown under the section)
     "summary": str,          # optional: one paragraph above the table
     "rows": [{"quantity": str,          # what was measured: unique within the suite
               "value": float | int | str | None,
               "unit": str,              # optional
               "target": str,            # optional: what the value should reach
               "verdict": str,           # optional: "met", "not met", "reported", ...
               "detail": str}],          # optional: setting, spread, how it was read
     "figures": [str]}        # optional: PNGs under the JSON's folder (paths relative to
                              #   it), shown under the table

A rerun of a suite replaces its file: the page holds one current row per measured quantity.
`results_page` turns every file into a section, in the order of `ORDER` (others after, by
name), and appends `benchmarks/conclusions.md`: what earlier rounds concluded, one paragraph
per topic (prose, edited by hand when a finding changes). JSON holds no NaN or infinity: a
number that could not be measured is `null` and shows as "—".
"""

import argparse
import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
CONCLUSIONS = HERE / "conclusions.md"
PAGE = HERE.parent / "docs" / "results.md"
# Sections first, in this order; suites not listed follow by name.
ORDER = ("gd-and-competitors", "auto-solver", "engine-overhead", "precision", "size-ladder")
_ROW_KEYS = {"quantity", "value", "unit", "target", "verdict", "detail"}


def rows_directory(out: Path) -> Path:
    """Where the results page's rows of a measurement written to `out` go: the page's own
    folder for one kept in this repository, beside it for one written elsewhere (a scratch
    run must not change the page)."""
    root = RESULTS_DIR.resolve().parents[1]
    return RESULTS_DIR if Path(out).resolve().is_relative_to(root) else Path(out).resolve().parent


def _finite(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def check_suite(data: dict, where: str = "suite") -> None:
    """Raise `ValueError` naming what in `data` breaks the contract above."""
    for key in ("suite", "title", "command", "machine", "rows"):
        if key not in data:
            raise ValueError(f"{where}: no {key!r}")
    seen = set()
    for row in data["rows"]:
        if "quantity" not in row or "value" not in row:
            raise ValueError(f"{where}: a row without 'quantity' and 'value': {row}")
        if set(row) - _ROW_KEYS:
            raise ValueError(f"{where}: unknown row keys {sorted(set(row) - _ROW_KEYS)}")
        if row["quantity"] in seen:
            raise ValueError(f"{where}: quantity {row['quantity']!r} twice: one current row each")
        seen.add(row["quantity"])


def write_suite(suite: str, *, title: str, command: str, machine: dict, rows: list[dict],
                summary: str = "", figures: tuple[str, ...] = (),
                directory: Path = RESULTS_DIR) -> Path:
    """Write `directory/<suite>.json` (the contract in this module's docstring).

    **Arguments:**

    - `suite`: the file's name; `title`, `command`, `machine`, `rows`, `summary`: as above.
    - `figures`: PNG files to show (copied beside the JSON unless they are under its folder).
    - `directory`: where suites' JSON lives (default `benchmarks/results/`).

    **Returns:**

    The JSON file's path.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = []
    for figure in map(Path, figures):
        figure = figure.resolve()
        if not figure.is_relative_to(directory.resolve()):
            shutil.copyfile(figure, directory / figure.name)
            figure = directory.resolve() / figure.name
        names.append(figure.relative_to(directory.resolve()).as_posix())
    data = _finite(dict(suite=suite, title=title, command=command, machine=machine,
                        summary=summary, rows=rows, figures=names))
    check_suite(data, suite)
    path = directory / f"{suite}.json"
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False, allow_nan=False) + "\n")
    return path


def _cell(x: Any) -> str:
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1e4 else f"{x:,.0f}"
    return str(x).replace("|", "\\|").replace("\n", " ")


def _machine(m: dict) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in (m.get("versions") or {}).items())
    parts = [m.get("cpu"), m.get("usable_cores") and f"{m['usable_cores']} usable cores",
             m.get("jax_backend") and f"JAX {m['jax_backend']}", m.get("date"),
             m.get("commit") and f"gflow commit {m['commit']}", versions]
    return "; ".join(str(p) for p in parts if p)


def load_suites(directory: Path = RESULTS_DIR) -> list[dict]:
    """Every suite's JSON in `directory`, checked, in page order (other JSON there, a suite's
    raw data, is skipped)."""
    suites = []
    for path in sorted(Path(directory).glob("*.json")):
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not {"suite", "rows"} & set(data):
            continue  # a suite's raw data written beside its rows (e.g. a --quick --out run)
        check_suite(data, str(path))
        data["_dir"] = path.parent
        suites.append(data)
    rank = {name: k for k, name in enumerate(ORDER)}
    return sorted(suites, key=lambda s: (rank.get(s["suite"], len(rank)), s["suite"]))


def render(suites: list[dict], conclusions: str, figures_link: str = "results-figures") -> str:
    """The page's Markdown."""
    lines = [
        "# Benchmark results",
        "",
        "<!-- Generated by `python -m benchmarks.results_page` from benchmarks/results/*.json:",
        "     edit the suites or benchmarks/conclusions.md, not this file. -->",
        "",
        "What gflow costs and how accurate it is, against gradient descent, bare diffrax, scipy",
        "and torchdiffeq. Every number comes from the JSON a suite wrote on the machine named "
        "under it; one current row per measured quantity (rerunning a suite replaces its rows).",
        "Evaluation counts and errors are exact and reproducible; wall times are minima over",
        "repeated calls on a shared machine and carry noise of tens of percent.",
        "How to add a suite: `benchmarks/results_page.py`'s docstring.",
        "",
    ]
    for s in suites:
        lines += [f"## {s['title']}", "", f"Reproduce: `{s['command']}`. Machine: "
                  f"{_machine(s['machine'])}.", ""]
        if s.get("summary"):
            lines += [s["summary"], ""]
        rows = s["rows"]
        columns = ["quantity", "value"] + [c for c in ("target", "verdict", "detail")
                                            if any(r.get(c) for r in rows)]
        lines.append("| " + " | ".join(columns) + " |")
        lines.append("|" + "---|" * len(columns))
        for r in rows:
            value = _cell(r["value"]) + (f" {r['unit']}" if r.get("unit") and r["value"]
                                         is not None else "")
            cells = [_cell(r["quantity"]), value] + [_cell(r.get(c) or "") for c in columns[2:]]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        for name in s.get("figures", ()):
            lines += [f"![{Path(name).stem}]({figures_link}/{Path(name).name})", ""]
    if conclusions.strip():
        lines += [conclusions.strip(), ""]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.results_page",
                                description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=RESULTS_DIR, help="the suites' JSON folder")
    p.add_argument("--out", type=Path, default=PAGE, help="the page (default docs/results.md)")
    p.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 if the page is not what the JSON gives")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    suites = load_suites(args.results)
    conclusions = CONCLUSIONS.read_text() if CONCLUSIONS.is_file() else ""
    text = render(suites, conclusions)
    figures = args.out.parent / "results-figures"
    if args.check:
        current = args.out.is_file() and args.out.read_text() == text
        missing = [n for s in suites for n in s.get("figures", ())
                   if not (figures / Path(n).name).is_file()]
        if not current or missing:
            print(f"{args.out} is not current: run python -m benchmarks.results_page",
                  file=sys.stderr)
            return 1
        return 0
    for s in suites:
        for name in s.get("figures", ()):
            figures.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(s["_dir"] / name, figures / Path(name).name)
    args.out.write_text(text)
    print(f"wrote {args.out} ({len(suites)} suites)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
