"""`python -m gflow.sweep`: sweep a preset over fields of its `[problem]` table.

```
python -m gflow.sweep deep-linear --over eps=1e-2,1e-3,1e-4 --over seed=0:8 --out runs/sw
```

Every point is resolved and built (`gflow.presets.resolve`/`build` with the point's
`problem.<axis>=<value>` overrides) before anything is compiled, so bad input ends with one line
on stderr and exit status 2. The members then run through `gflow._sweep.sweep` (members of one
structure in one compiled program) and the sweep directory receives `sweep.json`,
`members.csv` and, for each transition reached at three or more values of a swept axis, a
scaling figure `figures/<transition>_vs_<axis>.png` with its fit. Exit status 3 when a member
did not complete (the files are written all the same).

Members record transitions and the observables at their final state only: the preset's save
grid, `refine` and `certify` settings and its per-run predictions do not apply to a sweep.

Several processes (hosts, or one process per accelerator): `--distributed` calls
`jax.distributed.initialize` before JAX does anything else, with `--coordinator`,
`--num-processes` and `--process-id` where given; JAX detects what is not (Cloud TPU, SLURM,
Open MPI; `JAX_COORDINATOR_ADDRESS`). Every process runs the same command, builds every member,
and solves its shard of them (`gflow.sweep` over every process's devices); only process 0
prints and writes the sweep directory.
"""

import argparse
import json
import math
import re
import sys
import warnings
from pathlib import Path

from . import _rundir
from ._cli import (
    EXIT_BAD_INPUT,
    EXIT_ENVIRONMENT,
    EXIT_INTERRUPTED,
    _quiet_stdout,
    _show_warning,
    _DeferredInterrupt,
    _exit_interrupted,
    check_writable,
    EXIT_RUN_FAILED,
    _enable_compilation_cache,
    _format_time,
    _Parser,
    _select_platform,
)
from ._errors import InputError
from ._trajectory import _json_default

SWEEP_FILE = "sweep.json"

# A range of integers `a:b` (b excluded, as Python's range).
_RANGE = re.compile(r"^\s*(-?\d+)\s*:\s*(-?\d+)\s*$")
# Fewer distinct values than this give no figure and no fit in the report.
_MIN_FIT_VALUES = 3
# More members than this are refused unless --force: every member is built (its arrays held in
# memory) before anything is solved, and a typo such as seed=0:100000000 would run for days.
MAX_MEMBERS = 10_000


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m gflow.sweep",
        description="Solve a preset at many points of its [problem] fields (batched in one "
        "compiled program) and write sweep.json, members.csv and scaling figures.",
    )
    p.add_argument("config", help="a preset name (see python -m gflow.solve --list) or a TOML path")
    p.add_argument("--over", action="append", default=[], metavar="FIELD=VALUES",
                   help="a [problem] field and its values: a comma-separated list "
                   "(eps=1e-2,1e-3) or an integer range a:b, b excluded (seed=0:8); repeatable")
    p.add_argument("--zip", action="store_true",
                   help="read the --over axes in parallel (equal lengths) instead of a grid")
    p.add_argument("--out", help="sweep directory (default runs/<preset>-sweep-<timestamp>)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the sweep already in --out (the files it wrote, listed in its "
                   "manifest; nothing else)")
    p.add_argument("--t1", type=float, help="end time (solve.t1)")
    p.add_argument("--rtol", type=float, help="relative tolerance (solve.rtol)")
    p.add_argument("--atol", type=float, help="absolute tolerance (solve.atol)")
    p.add_argument("--solver", help="solver name (solve.solver)")
    p.add_argument("--set", action="append", default=[], metavar="TABLE.KEY=VALUE",
                   help="override a config field for every member (repeatable)")
    p.add_argument("--batch", choices=("auto", "map", "vmap", "loop"), default="auto",
                   help="lax.map, vmap or a loop over one compiled program (default: map on "
                   "CPU, vmap on GPU/TPU)")
    p.add_argument("--law", choices=("power", "log"), default=None,
                   help="scaling law fitted to each transition: power (T ∝ x^k) or log "
                   "(T = a + k ln(1/x)); default: against eps the law theory gives for the "
                   "preset's transition (with its slope), else power")
    p.add_argument("--against", action="append", default=[], metavar="AXIS",
                   help="axis to fit against (repeatable; default every swept axis but seed "
                   "with positive numeric values)")
    p.add_argument("--platform", choices=("cpu", "gpu", "tpu"),
                   help="run on this JAX platform (default: JAX's choice)")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.add_argument("--force", action="store_true",
                   help=f"run a sweep of more than {MAX_MEMBERS} members")
    d = p.add_argument_group(
        "several processes",
        "run the same command in every process; JAX detects on Cloud TPU, SLURM and Open MPI "
        "what is not given",
    )
    d.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize and shard the members over the "
                   "devices of every process; only process 0 prints and writes")
    d.add_argument("--coordinator", metavar="HOST:PORT",
                   help="address of process 0's coordinator (default: JAX_COORDINATOR_ADDRESS "
                   "or detected)")
    d.add_argument("--num-processes", type=int, metavar="N", help="number of processes")
    d.add_argument("--process-id", type=int, metavar="I", help="this process's id, 0 .. N-1")
    return p


def _split_top_level(text: str) -> list[str]:
    """`text` split at commas outside brackets and quotes (`[1, 2],[3, 4]` is two values)."""
    parts, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts]


def parse_over(item: str, force: bool = False) -> tuple[str, list[str]]:
    """`FIELD=VALUES` as `(field, [value literal, ...])`; `a:b` expands to `a, ..., b-1`."""
    name, sep, values = item.partition("=")
    name = name.strip()
    if name.startswith("problem."):
        name = name[len("problem."):]
    if not sep or not name or "." in name:
        raise InputError(f"--over expects FIELD=VALUES with a [problem] field, got {item!r}")
    match = _RANGE.match(values)
    if match:
        start, stop = int(match[1]), int(match[2])
        if stop <= start:
            raise InputError(f"--over {name}: the range {values.strip()} is empty (a:b needs a < b)")
        if stop - start > 10 * MAX_MEMBERS and not force:
            # Refused before the list is made: a range of 10**9 would not fit in memory.
            raise InputError(f"--over {name}: the range {values.strip()} has {stop - start} "
                             f"values, beyond {MAX_MEMBERS} members (pass --force to run it)")
        return name, [str(v) for v in range(start, stop)]
    literals = _split_top_level(values)
    if not values.strip() or any(not v for v in literals):
        raise InputError(f"--over {name}: empty value in {values!r}")
    return name, literals


def _fit_axes(axes: dict, chosen: list[str]) -> list[str]:
    if chosen:
        for name in chosen:
            if name not in axes:
                raise InputError(f"--against {name}: not a swept axis ({', '.join(axes)})")
        return chosen

    def numeric(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0

    return [k for k, v in axes.items() if k != "seed" and all(numeric(x) for x in v)]


def _initialize_distributed(args) -> None:
    """`jax.distributed.initialize` as the flags ask, before JAX has done anything else."""
    flags = {"--coordinator": args.coordinator, "--num-processes": args.num_processes,
             "--process-id": args.process_id}
    if not args.distributed:
        for flag, value in flags.items():
            if value is not None:
                raise InputError(f"{flag} needs --distributed")
        return
    if args.coordinator is not None:
        host, _, port = args.coordinator.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise InputError(f"--coordinator expects HOST:PORT, got {args.coordinator!r}")
    n, i = args.num_processes, args.process_id
    if n is not None and n < 1:
        raise InputError(f"--num-processes must be at least 1, got {n}")
    if i is not None and (i < 0 or (n is not None and i >= n)):
        bound = "" if n is None else f" and below --num-processes {n}"
        raise InputError(f"--process-id must be at least 0{bound}, got {i}")
    import jax

    try:
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=n,
                                   process_id=i)
    except (ValueError, TypeError, RuntimeError) as e:
        # JAX's own reasons, e.g. nothing detected and nothing given, or a coordinator that
        # cannot be reached: one line.
        reason = " ".join(str(e).split()) or type(e).__name__
        hint = ("" if isinstance(e, RuntimeError) else
                " (outside Cloud TPU, SLURM and Open MPI give --coordinator, --num-processes "
                "and --process-id)")
        raise InputError(
            f"--distributed: jax.distributed.initialize failed: {reason}{hint}"
        ) from None


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = _parser().parse_args(argv)
    session = _SweepSession()
    # Warnings as one line each, like errors (a failing member's included).
    with warnings.catch_warnings(), _DeferredInterrupt():
        warnings.simplefilter("default")
        warnings.showwarning = _show_warning
        try:
            return _run(args, session)
        except InputError as e:
            print(f"gflow: error: {e}", file=sys.stderr)
            session.abandon()
            return EXIT_BAD_INPUT
        except OSError as e:
            _quiet_stdout()
            print(f"gflow: error: {session.os_error_message(e)}", file=sys.stderr)
            return EXIT_ENVIRONMENT
        except KeyboardInterrupt:
            print(f"gflow: interrupted; {session.kept_message()}", file=sys.stderr)
            if argv is None:
                _exit_interrupted()
            return EXIT_INTERRUPTED
        finally:
            session.release()


# Each member's result, one JSON line as it arrives: a sweep stopped before its sweep.json is
# written (a full disk, Ctrl-C) keeps every member it computed.
MEMBERS_LOG = "members.jsonl"


class _SweepSession:
    """The sweep directory's claim, and the members' results written as they arrive."""

    def __init__(self):
        self.claim = None
        self.kept = 0
        self.size = 0  # bytes of the log written whole
        self.pending: list[str] = []  # lines not written yet (the disk was full)

    def keep(self, index: int, member) -> None:
        from ._sweep import member_summary

        if self.claim is None:
            return
        line = json.dumps(dict(index=index) | member_summary(member), allow_nan=False,
                          default=_json_default)
        self.pending.append(line)
        path = self.claim.directory / MEMBERS_LOG
        try:
            self.size = _rundir.append_line(path, "\n".join(self.pending), at=self.size)
        except OSError:
            return  # kept in memory; written with sweep.json, or reported
        self.kept += len(self.pending)
        self.pending = []

    def kept_message(self) -> str:
        if self.claim is None or not self.kept:
            return "the sweep wrote no result"
        return (f"the results of {self.kept} member(s) are in "
                f"{self.claim.directory / MEMBERS_LOG} (one JSON object a line)")

    def os_error_message(self, e: OSError) -> str:
        line = _rundir.describe_os_error(e)
        if self.claim is None:
            return line
        if (self.claim.directory / SWEEP_FILE).is_file():
            return f"{line}; every member's result is in {self.claim.directory / SWEEP_FILE}"
        return f"{line}; {self.kept_message()}"

    def finished(self) -> None:
        """sweep.json holds every member: the log has served."""
        _rundir.remove(self.claim.directory / MEMBERS_LOG)
        self.claim.set_state("finished")

    def abandon(self) -> None:
        if self.claim is not None and not (self.claim.directory / MEMBERS_LOG).exists():
            _rundir.clear(self.claim.directory)
            self.claim.abandon()
            self.claim = None

    def release(self) -> None:
        if self.claim is not None:
            self.claim.release()
            self.claim = None


def _key(point: dict) -> tuple:
    return tuple(repr(v) for v in point.values())


def _run(args, session: _SweepSession) -> int:
    import jax

    from . import presets
    from ._config import parse_value
    from ._sweep import sweep, sweep_points

    if not args.over:
        raise InputError("nothing to sweep: give at least one --over FIELD=VALUES")
    _initialize_distributed(args)
    if args.platform:
        _select_platform(args.platform)
    overrides = list(args.set)
    for flag in ("t1", "rtol", "atol", "solver"):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"solve.{flag}={value!r}" if flag == "solver" else f"solve.{flag}={value}")
    base = presets.resolve(args.config, overrides)
    fields = set(base.config.get("problem", {})) - {"kind"}
    literals: dict[str, list[str]] = {}
    for item in args.over:
        name, values = parse_over(item, args.force)
        if name not in fields:
            raise InputError(
                f"--over {name}: not a field of [problem]; fields: {', '.join(sorted(fields))}"
            )
        if name in literals:
            raise InputError(f"--over {name} is given twice")
        literals[name] = values
    axes = {name: [parse_value(v) for v in values] for name, values in literals.items()}
    mode = "zip" if args.zip else "grid"
    lengths = [len(v) for v in literals.values()]
    count = lengths[0] if args.zip and len(set(lengths)) == 1 else math.prod(lengths)
    if count > MAX_MEMBERS and not args.force:
        raise InputError(f"the sweep has {count} members, beyond {MAX_MEMBERS}: pass --force "
                         "to run it")
    if args.out is not None and not args.out:
        raise InputError("--out is empty: give a directory")
    out = Path(args.out) if args.out else None
    # Before any member is built or solved: a sweep must not lose its results at the end, nor
    # write over a directory that is not its own (the rules of a run directory: gflow._rundir).
    if jax.process_index() == 0:
        if out is not None:
            check_writable(out)
            _rundir.check_new(out, overwrite=args.overwrite, kind="sweep",
                              finished_file=SWEEP_FILE, resume_hint=False)
        else:
            check_writable(Path("runs"), flag="the default output directory")
    if not args.quiet and jax.process_index() == 0:
        print(f"sweep       {count} member(s) of {base.name} over {', '.join(literals)}",
              flush=True)

    # Resolve and build every point now: a bad value is bad input, before any compilation.
    problems = {}
    for point, point_literals in zip(sweep_points(axes, mode), sweep_points(literals, mode)):
        point_overrides = [f"problem.{k}={v}" for k, v in point_literals.items()]
        resolved = presets.resolve(args.config, overrides + point_overrides)
        problems[_key(point)] = presets.build(resolved)
    against = _fit_axes(axes, args.against)

    # Process 0 alone prints and writes; every process returns the same result.
    lead = jax.process_index() == 0
    refusal = ""
    if lead:
        try:  # the directory is taken (and checked again) under its lock
            if out is not None:
                session.claim = _rundir.claim(out, kind="sweep", overwrite=args.overwrite,
                                              finished_file=SWEEP_FILE, resume_hint=False)
            else:
                session.claim = _rundir.claim_default(Path("runs"), f"{base.name}-sweep",
                                                      kind="sweep")
            out = session.claim.directory
        except InputError as e:
            refusal = str(e)
    if jax.process_count() > 1:
        # Process 0's verdict for all: a process that stopped alone would leave the others
        # waiting in the sweep's collectives.
        from jax.experimental import multihost_utils

        refused = bool(multihost_utils.broadcast_one_to_all(bool(refusal)))
        if refused and not refusal:
            refusal = "process 0 could not take the sweep directory"
    if refusal:
        raise InputError(refusal)

    settings = base.solve
    total = len(sweep_points(axes, mode))
    quiet = args.quiet or not lead

    def progress(index: int, member) -> None:
        if lead:
            session.keep(index, member)
        if quiet:
            return
        point = " ".join(f"{k}={v!r}" for k, v in member.point.items())
        times = " ".join(f"{k}={_format_time(t)}" for k, t in member.transitions.items())
        print(f"[{index + 1}/{total}] {point}  {member.status}  {times}", flush=True)

    _enable_compilation_cache()
    result = sweep(
        lambda **point: problems[_key(point)],
        axes,
        settings.t1,
        mode=mode,
        batch=args.batch,
        # The options a solve of this config runs with (PI control included): the same spec.
        **{k: v for k, v in presets.solve_options(settings).items() if k != "checkpoint_steps"},
        callback=progress,
    )
    failed = [m for m in result.members if not m.completed]
    if not lead:  # every process holds the same result, hence the same exit status
        return EXIT_RUN_FAILED if failed else 0

    # Theory's law of each transition in eps (the preset's `scaling`), where every member's
    # problem gives the same one.
    laws = {}
    for transition in result.transition_names:
        given = {problem.scaling.get(transition) for problem in problems.values()}
        if len(given) == 1 and None not in given:
            laws[transition] = given.pop()
    fits, lines = [], []
    for transition in result.transition_names:
        for axis in against:
            reached = {
                m.point[axis]
                for m in result.members
                if math.isfinite(m.transitions.get(transition, math.nan))
            }
            if len(reached) < _MIN_FIT_VALUES:
                continue
            theory = laws.get(transition) if axis == "eps" else None
            if theory is not None and args.law in (None, theory.law):
                fit = result.fit(transition, against=axis, law=theory)
            else:
                fit = result.fit(transition, against=axis, law=args.law or "power")
            fits.append(fit)
            lines.append(f"  {transition} vs {axis} ({fit.law} law): {fit.description}; "
                         f"{len(fit.x)} values, {fit.excluded} member(s) excluded")
    result.save(out, extra=dict(preset=base.name, config=base.config, batch=args.batch),
                fits=fits)
    session.finished()

    if not quiet:
        compile_s = sum(g["compile_seconds"] for g in result.groups)
        run_s = sum(g["run_seconds"] for g in result.groups)
        print(f"members     {total} ({total - len(failed)} completed) in "
              f"{len(result.groups)} compiled program(s), batch {result.groups[0]['batch']}")
        print(f"seconds     compile {compile_s:.2f}, run {run_s:.2f}")
        if lines:
            print("fits (power law: ln T = a + k ln x; log law: T = a + k ln(1/x))")
            print("\n".join(lines))
        print(f"written     {out}")
    return EXIT_RUN_FAILED if failed else 0
