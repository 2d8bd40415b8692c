"""`python -m gflow.solve`: run a preset or a TOML config and write a run directory.

A thin layer over `gflow.presets.resolve`/`run` and `Trajectory.save`: every check happens
before compilation, and bad input ends with one line on stderr and exit status 2.
"""

import argparse
import contextlib
import math
import os
import signal
import sys
import textwrap
import time
import warnings
from pathlib import Path

from ._errors import InputError
from ._prediction import render_predictions

EXIT_ENVIRONMENT = 1  # the file system or the output failed (full, read-only, closed)
EXIT_BAD_INPUT = 2
EXIT_RUN_FAILED = 3


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line, no usage block: the same shape as every other bad-input error.
        print(f"gflow: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m gflow.solve",
        description="Integrate the exact gradient flow of a preset or TOML config and write a "
        "run directory (trajectory.npz, summary.json, final.eqx, config.toml, figures).",
    )
    p.add_argument("config", nargs="?", default=None,
                   help="a preset name (see --list) or a path to a TOML config; "
                   "default: the default preset")
    p.add_argument("--out", help="run directory (default runs/<preset>-<timestamp>)")
    p.add_argument("--t1", type=float, help="end time (solve.t1)")
    p.add_argument("--rtol", type=float, help="relative tolerance (solve.rtol)")
    p.add_argument("--atol", type=float, help="absolute tolerance (solve.atol)")
    p.add_argument("--solver", help="solver name (solve.solver)")
    p.add_argument("--set", action="append", default=[], metavar="TABLE.KEY=VALUE",
                   help="override any config field, e.g. --set problem.eps=1e-4 (repeatable)")
    p.add_argument("--list", action="store_true", help="list the presets and exit")
    p.add_argument("--show", action="store_true",
                   help="print the resolved config as TOML and exit (save, edit, pass back)")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.add_argument("--progress", action="store_true",
                   help="show a progress bar over flow time (the default when stderr is a "
                        "terminal, unless --quiet)")
    p.add_argument("--platform", choices=("cpu", "gpu", "tpu"),
                   help="run on this JAX platform (default: JAX's choice)")
    p.add_argument("--certify", action=argparse.BooleanOptionalAction, default=None,
                   help="re-solve with 100x smaller tolerances and report error estimates "
                   "(solve.certify; default on with an adaptive solver, unless the config "
                   "sets it)")
    p.add_argument("--no-figures", action="store_true",
                   help="write no figures (python -m gflow.plot RUN_DIR draws them later)")
    p.add_argument("--precision", choices=("float64", "mixed", "float32"),
                   help="solve.precision: mixed = float64 state, float32 loss and gradient; "
                   "an rtol below its measured floor is refused")
    p.add_argument("--x32", action="store_true",
                   help="an alias of --precision float32 (solve.x32)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (every file a run writes there); "
                   "without it a new run goes only to a new or empty directory")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue an interrupted run from its checkpoints, with its own "
                   "config.toml; the result equals that of an uninterrupted run")
    p.add_argument("--critical-points", action="store_true",
                   help="refine the critical points at the run's plateaus and report their loss, "
                   "Hessian index and eigenvalues, and linearised exit times (summary.json too)")
    p.add_argument("--sensitivity", metavar="FIELD",
                   help="derivatives of the transition times with respect to the float problem "
                   "field FIELD (e.g. eps), by forward mode (summary.json too)")
    return p


def _enable_compilation_cache() -> "_CacheEntries":
    """JAX's persistent compilation cache, so a repeated run skips compilation (see
    `gflow.enable_compilation_cache`), and its entries now, for a refused command to remove
    what it added."""
    from ._cache import enable_compilation_cache

    return _CacheEntries(Path(enable_compilation_cache()))


class _CacheEntries:
    """The compilation cache's entries when a command started: a command refused for bad
    input removes the entries it added (bad input writes nothing, the cache included)."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.before = self._entries()

    def _entries(self) -> set[str]:
        try:
            return set(os.listdir(self.directory))
        except OSError:
            return set()

    def forget_new(self) -> None:
        for name in self._entries() - self.before:
            with contextlib.suppress(OSError):
                (self.directory / name).unlink()


def _select_platform(name: str) -> None:
    """Run on JAX platform `name`, or say in one line that this machine has none."""
    import jax

    try:
        jax.config.update("jax_platforms", name)
        devices = jax.devices()
    except RuntimeError:
        raise InputError(f"--platform {name}: no {name} is available to JAX here") from None
    if not devices:
        raise InputError(f"--platform {name}: no {name} is available to JAX here")


# The report's widest line (a terminal of 100 columns).
REPORT_WIDTH = 100


def _format_time(t) -> str:
    return "not reached" if t is None or not math.isfinite(t) else f"{t:.10g}"


def _bytes(count: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.3g} {unit}"
    return f"{count:.0f} B"


def _memory_line(traj) -> str:
    """What the recorded observables weigh: per save time, and per snapshot."""
    memory = traj.memory()
    line = f"memory      {_bytes(memory['per_save_time'])} per save time ({len(traj.ts)} saved)"
    if traj.snapshot_labels:
        line += (f"; {_bytes(memory['per_snapshot'])} per snapshot "
                 f"({len(traj.snapshot_labels)} taken: {', '.join(sorted(traj.snapshots))})")
    return line


def _report(traj, problem, out: Path) -> str:
    s = traj.stats
    lines = [
        f"status      {traj.status}" + (f" ({traj.message})" if traj.message else ""),
        f"time        t0={traj.t0:g} -> t_final={_format_time(traj.t_final)} (t1={traj.t1:g})",
        f"solver      {traj.solver}, rtol={traj.rtol:g}, atol={traj.atol:.3g}, "
        f"{s.get('dtype', 'float64')} (precision {s.get('precision', 'float64')}, matmul "
        f"{s.get('matmul_precision', 'n/a')}, backend {s.get('backend', '?')})",
        f"steps       {s['num_steps']} ({s['num_accepted_steps']} accepted, "
        f"{s['num_rejected_steps']} rejected) in {s['segments']} segment(s); "
        f"vector-field evaluations {s['vector_field_evaluations']}",
        f"seconds     trace {s.get('trace_seconds', 0.0):.2f}, compile {s['compile_seconds']:.2f}, "
        f"run {s['run_seconds']:.2f}"
        + (f" (certify's reference, alongside: run {r['run_seconds']:.2f})"
           if (r := traj.errors.get("reference_stats")) else ""),
    ]
    lines.append(_memory_line(traj))
    if "hvps" in s:  # gflow's stiff solvers count their work
        switches = s.get("switch_times")
        lines.append(
            f"stiff work  {s['gradients']} gradients, {s['hvps']} Hessian-vector products, "
            f"{s['newton_iterations']} Newton and {s['krylov_iterations']} CG iterations, "
            f"{s['implicit_steps']} implicit steps"
            + (f"; {s['switches']} switch(es) at t = "
               + ", ".join(f"{t:.6g}" for t in switches) if switches else ""))
    if traj.transitions:
        lines.append("transitions")
        width = max(len(n) for n in traj.transitions)
        errors = traj.errors.get("transitions", {})
        overlapping = set(traj.errors.get("overlapping", ()))
        for name, t in traj.transitions.items():
            criterion = problem.criteria.get(name, "")
            error = errors.get(name)
            pm = f" ± {error:.1e}" if error is not None and math.isfinite(error) else ""
            flag = "  [order uncertain]" if name in overlapping else ""
            head = f"  {name:<{width}}  {_format_time(t):>16}{pm}   "
            lines += textwrap.wrap(criterion + flag, REPORT_WIDTH, initial_indent=head,
                                   subsequent_indent=" " * len(head)) or [head.rstrip()]
    if traj.predictions:
        lines.append("predictions")
        lines += render_predictions(traj.predictions)
    lines.append(f"written     {out}")
    # No line past REPORT_WIDTH: a long status message or path continues under its value.
    return "\n".join(part for line in lines for part in (
        textwrap.wrap(line, REPORT_WIDTH, subsequent_indent=" " * 12, break_on_hyphens=False,
                      break_long_words=False) if len(line) > REPORT_WIDTH else [line]))


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status.

    `argv=None` is the real command line (`python -m gflow.solve`): after Ctrl-C it exits the
    process at once with status 130 (see `_exit_interrupted`).
    """
    args = _parser().parse_args(argv)
    session = _Session()
    # Warnings as one line each, like errors (not Python's file:line and source echo).
    with warnings.catch_warnings(), _DeferredInterrupt():
        warnings.simplefilter("default")
        warnings.showwarning = _show_warning
        try:
            return _run(args, session)
        except InputError as e:
            print(f"gflow: error: {e}", file=sys.stderr)
            if session.cache is not None:
                session.cache.forget_new()
            return EXIT_BAD_INPUT
        except OSError as e:
            _quiet_stdout()
            print(f"gflow: error: {session.os_error_message(e)}", file=sys.stderr)
            session.remove_unstarted()  # a run that could not write its config leaves nothing
            return EXIT_ENVIRONMENT
        except KeyboardInterrupt:
            print(f"gflow: {session.interrupted_message()}", file=sys.stderr)
            session.remove_unstarted()
            if argv is None:
                _exit_interrupted()
            return EXIT_INTERRUPTED
        finally:
            session.release()


def _write_timings(out: Path, session: "_Session", traj) -> None:
    """`timings.json`: where the command's wall time went (`main_seconds` from the command
    line's start, after Python and gflow's command-line module were imported), with the
    solve's tracing, compiling and running and, with certify, its reference's running (which
    runs alongside, on a second thread)."""
    import json

    from ._trajectory import atomic_write_bytes

    stats = traj.stats
    timings = dict(session.timings) | {
        k: stats.get(k) for k in ("trace_seconds", "compile_seconds", "run_seconds")
    }
    reference = traj.errors.get("reference_stats")
    if reference:
        timings["certify_run_seconds"] = reference.get("run_seconds")
    timings["main_seconds"] = time.perf_counter() - session.started
    atomic_write_bytes(out / "timings.json",
                       (json.dumps(timings, indent=2, allow_nan=False) + "\n").encode())


def _show_progress(args) -> bool:
    """A bar when asked for, or by default on a terminal; `--quiet` wins. The bar is drawn by
    the host between chunks of the solve: the compiled program and its steps are the same."""
    if args.quiet:
        return False
    return bool(args.progress) or sys.stderr.isatty()


def _quiet_stdout() -> None:
    """Point standard output at /dev/null after it failed (a closed pipe, a full device), so
    that the interpreter's own flush at exit prints no second error."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"gflow: warning: {message}", file=sys.stderr)


EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C


def _exit_interrupted() -> None:
    """Leave the process now: interpreter teardown after an interrupt can crash in XLA's
    native threads (a compile still running), so output is flushed and the process exits
    without it."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_INTERRUPTED)


# Modules whose frames Ctrl-C must not interrupt: raising inside JAX's tracing, lowering or
# compiling (or inside a solver's Python) leaves native state half-built, and the process can
# crash on the way out.
_UNSAFE_MODULES = ("jax", "jaxlib", "equinox", "diffrax", "optimistix", "lineax", "mlir",
                   "matplotlib", "importlib", "tqdm")
# Functions that finish what they write before an interrupt may stop them.
_UNSAFE_FUNCTIONS = ("atomic_write_bytes", "_write_atomically", "append_line", "write_checkpoint",
                     "save", "save_figures")


def _safe_to_interrupt(frame) -> bool:
    """Whether raising KeyboardInterrupt at `frame` leaves nothing half-done: it is gflow's own
    code (or the script's), and no frame on the stack is JAX's or a write in progress."""
    module = frame.f_globals.get("__name__", "") or ""
    if not (module.startswith("gflow") or module == "__main__"):
        return False
    while frame is not None:
        module = frame.f_globals.get("__name__", "") or ""
        if module.split(".")[0] in _UNSAFE_MODULES or frame.f_code.co_name in _UNSAFE_FUNCTIONS:
            return False
        frame = frame.f_back
    return True


class _DeferredInterrupt:
    """SIGINT raises KeyboardInterrupt only at a safe point (`_safe_to_interrupt`). When it
    arrives elsewhere (JAX tracing or compiling, a file being written) it is kept pending, and
    a trace function (`sys.settrace`, main thread only, while pending) raises it at the next
    call of gflow's own code from a safe stack, e.g. the next segment of a solve. A compile or
    a compiled segment in progress runs to its end first. A second Ctrl-C while one is pending
    exits at once (status 130; the last checkpoint still resumes)."""

    def __init__(self):
        self.pending = False
        self.active = False

    def __enter__(self):
        import threading

        # Signal handlers belong to the main thread; elsewhere Python's default stays.
        self.active = threading.current_thread() is threading.main_thread()
        if self.active:
            self.previous = signal.signal(signal.SIGINT, self._on_interrupt)
            self.previous_trace = sys.gettrace()
        return self

    def __exit__(self, *exc):
        if self.active:
            signal.signal(signal.SIGINT, self.previous)
            if self.pending:
                sys.settrace(self.previous_trace)
        return False

    def _on_interrupt(self, signum, frame):
        if self.pending:  # asked twice: do not wait for a safe point
            print("gflow: interrupted twice; run directories keep their last checkpoint",
                  file=sys.stderr)
            _exit_interrupted()
        if frame is not None and _safe_to_interrupt(frame):
            raise KeyboardInterrupt
        self.pending = True
        sys.settrace(self._trace)
        # The frames already running below the unsafe ones (a solve's loop waiting on its
        # compiled call, say) get no call event: they are traced line by line, so that the
        # interrupt is raised at their next line once the unsafe calls above them return.
        while frame is not None:
            if _safe_to_interrupt(frame):
                frame.f_trace_lines = True
                frame.f_trace = self._trace
            frame = frame.f_back

    def _trace(self, frame, event, arg):
        if event in ("call", "line") and self.pending and _safe_to_interrupt(frame):
            self.pending = False
            sys.settrace(self.previous_trace)
            raise KeyboardInterrupt
        return self._trace if event == "line" else None


class _Session:
    """What a command holds: the run directory's claim (lock), and what to say if interrupted."""

    def __init__(self):
        self.run_dir: Path | None = None
        self.t0: float | None = None
        self.claim = None  # gflow._rundir.Claim of the run directory, once held
        self.cache = None  # the compilation cache's entries at the start (_CacheEntries)
        self.started = time.perf_counter()
        self.timings: dict[str, float] = {}  # seconds of each phase, for timings.json

    @contextlib.contextmanager
    def timed(self, phase: str):
        """A context adding its wall seconds to `timings[phase]`."""
        begin = time.perf_counter()
        try:
            yield
        finally:
            self.timings[phase] = self.timings.get(phase, 0.0) + time.perf_counter() - begin

    def interrupted_message(self) -> str:
        if self.run_dir is None or not (self.run_dir / "config.toml").is_file():
            return "interrupted before the run started; nothing was written"
        from ._checkpoint import checked_checkpoint
        from ._rundir import read_manifest

        with contextlib.suppress(InputError):
            if (read_manifest(self.run_dir) or {}).get("state") in ("figures", "timings"):
                return ("interrupted after the results were written; draw the figures with "
                        f"python -m gflow.solve --resume {self.run_dir}")

        times = []
        for path in self.run_dir.glob(_CHECKPOINTS):
            try:
                times.append((path.stat().st_mtime, checked_checkpoint(path)[1]["t"]))
            except (InputError, OSError):
                pass
        t = max(times)[1] if times else self.t0
        return (f"interrupted at t={t:.10g}; resume with python -m gflow.solve --resume "
                f"{self.run_dir}")

    def os_error_message(self, e: OSError) -> str:
        """One line for an operating-system failure (full disk, read-only, closed output):
        what failed, and how to finish the run once it is fixed."""
        from ._rundir import describe_os_error, read_manifest

        line = describe_os_error(e)
        run = self.run_dir
        if run is None or not (run / "config.toml").is_file():
            return line + ("; nothing of the run was kept" if run is not None else "")
        try:
            state = (read_manifest(run) or {}).get("state")
        except InputError:
            state = None
        if state == "finished":
            return f"{line}; the run is complete in {run}"
        return f"{line}; then finish the run with python -m gflow.solve --resume {run}"

    def remove_unstarted(self) -> None:
        """Undo what a new run made before its config.toml: its manifest, the lock file and
        the directories it created (nothing, once the run directory holds a config)."""
        if self.claim is None or (self.claim.directory / "config.toml").exists():
            return
        self.claim.abandon()
        self.claim = None

    def release(self) -> None:
        """Drop the lock and remove its file (a run directory keeps no lock when done)."""
        if self.claim is not None:
            self.claim.release()
            self.claim = None


# What a run directory may hold besides its results: checkpoints to resume from.
_CHECKPOINTS = "checkpoint-*.eqx"


def check_writable(out: Path, flag: str = "--out") -> None:
    """`out` can be a directory this process writes into: not a file, a path the file system
    accepts, and (itself or its nearest existing parent) a directory where a directory can be
    made. Checked by making and removing a temporary directory there: nothing is left."""
    import errno
    import tempfile

    if str(out) == "":
        raise InputError(f"{flag} is empty: give a directory")
    if "\0" in str(out):
        raise InputError(f"{flag} contains a NUL character")
    if any(ord(c) < 32 or ord(c) == 127 for c in str(out)):
        raise InputError(f"{flag} {str(out)!r} contains a control character (a newline?): "
                         "give a plain path")
    absolute = Path(os.path.abspath(out))
    try:
        name_max = os.pathconf(os.getcwd(), "PC_NAME_MAX")
        path_max = os.pathconf(os.getcwd(), "PC_PATH_MAX")
    except (OSError, ValueError):
        name_max, path_max = 255, 4096
    for part in absolute.parts:
        if len(os.fsencode(part)) > name_max - 40:  # room for temporary-file names
            raise InputError(f"{flag} {out}: a path component of {len(part)} characters is "
                             f"longer than this file system allows (~{name_max - 40})")
    # Room for the longest file a run writes below it (figures, temporary files).
    if len(os.fsencode(str(absolute))) > path_max - 200:
        raise InputError(f"{flag} {out}: the path ({len(str(absolute))} characters) is too "
                         f"long for this file system (PATH_MAX {path_max})")
    ancestor = absolute
    while not os.path.lexists(ancestor):
        ancestor = ancestor.parent
    if ancestor == absolute and not ancestor.is_dir():
        raise InputError(f"{flag} {out} exists and is not a directory")
    if not ancestor.is_dir():
        raise InputError(f"{flag} {out}: {ancestor} is not a directory")
    try:
        probe = tempfile.mkdtemp(dir=ancestor, prefix=".gflow-probe-")
        os.rmdir(probe)
    except OSError as e:
        reason = e.strerror or errno.errorcode.get(e.errno, str(e))
        raise InputError(f"{flag} {out}: cannot create a directory in {ancestor} "
                         f"({reason})") from None


def _check_resume(out: Path, given: list[str]) -> str:
    """`out` is a run directory --resume can continue; one line saying why not otherwise.

    **Returns:**

    What remains: `"solve"` (from its checkpoints), or `"figures"` (the results are written,
    the figures and timings.json not yet).
    """
    from ._checkpoint import checked_checkpoint
    from ._rundir import in_use, read_manifest

    if not out.is_dir():
        raise InputError(f"--resume {out}: not a gflow run directory (no such directory)")
    if not (out / "config.toml").is_file():
        if list(out.glob(".config.toml.*.tmp")):
            raise InputError(
                f"--resume {out}: the run was stopped while writing its config.toml, before "
                f"computing anything; start it again with --out {out}"
            )
        raise InputError(f"--resume {out}: not a gflow run directory (no config.toml)")
    if given:
        raise InputError(
            f"--resume continues {out} with its own config.toml and flags; drop "
            f"{', '.join(given)} (only --progress, --quiet and --platform go with it)"
        )
    manifest = read_manifest(out)
    if manifest is not None and manifest.get("kind") not in ("run", "files"):
        raise InputError(f"--resume {out}: it holds a gflow {manifest.get('kind')}, not a run")
    state = (manifest or {}).get("state")
    checkpoints = sorted(out.glob(_CHECKPOINTS))
    if state == "finished" or (manifest is None and not checkpoints
                               and (out / "summary.json").is_file()):
        raise InputError(f"--resume {out}: the run has finished; redraw its figures with "
                         f"python -m gflow.plot {out}")
    if in_use(out):
        raise InputError(f"--resume {out}: the run is in use by another gflow process")
    if state == "figures":
        return "figures"
    for path in checkpoints:
        checked_checkpoint(path)
    return "solve"


def _certify_by_default(resolved) -> bool:
    """Error bars by default on the command line: certify unless the config (or
    --no-certify) says otherwise, or the solver has no error estimate to tighten."""
    from ._solvers import is_adaptive, make_solver

    return "certify" not in resolved.config.get("solve", {}) and is_adaptive(
        make_solver(resolved.solve.solver, resolved.solve.rtol))


def _run(args, session: _Session) -> int:
    with session.timed("import_seconds"):  # JAX, diffrax, equinox, ... come in here
        from . import _cli_instruments, _rundir, presets
        from ._config import dumps_toml
        from ._trajectory import atomic_write_bytes

    if args.platform:
        _select_platform(args.platform)
    # Before the preset is built: its eager programs are cached too (and a refused input's
    # are taken out again, see `_Session.forget_compilations`).
    session.cache = _enable_compilation_cache()
    if args.list and args.resume:
        raise InputError(f"--resume continues {args.resume} with its own config.toml and "
                         "flags; drop --list (only --progress, --quiet and --platform go with "
                         "it)")
    if args.list:
        names = presets.preset_names()
        column = max(map(len, names)) + 2
        for name in names:
            config = presets.preset_config(name)
            default = "(default) " if name == presets.DEFAULT_PRESET else ""
            description = default + config.get("preset", {}).get("description", "")
            print("\n".join(textwrap.wrap(
                description, REPORT_WIDTH, initial_indent=f"{name:<{column}}",
                subsequent_indent=" " * column, break_on_hyphens=False)) or name)
        sys.stdout.flush()  # a closed or full output is reported here, in one line
        return 0

    overrides = list(args.set)
    for flag in ("t1", "rtol", "atol", "solver"):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"solve.{flag}={value!r}" if flag == "solver" else f"solve.{flag}={value}")
    if args.certify is not None:
        overrides.append(f"solve.certify={str(args.certify).lower()}")
    if args.x32:
        overrides.append("solve.x32=true")
    if args.precision is not None:
        overrides.append(f"solve.precision={args.precision!r}")
    if args.resume:
        out = Path(args.resume)
        given = [name for name, used in (
            ("CONFIG", args.config), ("--out", args.out is not None), ("--show", args.show),
            ("--overwrite", args.overwrite), ("--no-figures", args.no_figures),
            ("--critical-points", args.critical_points),
            ("--sensitivity", args.sensitivity is not None)) if used]
        if overrides:
            given.append("the overrides (--set, --t1, --rtol, --atol, --solver, --certify, "
                         "--x32)")
        remaining = _check_resume(out, given)
        resolved = presets.resolve(str(out / "config.toml"))
        _cli_instruments.check(args, resolved)  # first: cheaper than a precision's floor
        with session.timed("build_seconds"):
            problem = presets.check(resolved)
        session.claim = _rundir.adopt(out)
        # A kill mid-write leaves its temporary file (never a partial file under a final name).
        for leftover in _rundir.own_temporaries(out):
            leftover.unlink()
        session.run_dir, session.t0 = out, resolved.solve.t0
        if remaining == "figures":
            from ._trajectory import load

            traj = load(out)
            return _finish(args, session, resolved, problem, traj, out, instruments=[])
    else:
        source = args.config or presets.DEFAULT_PRESET
        resolved = presets.resolve(source, overrides)
        if _certify_by_default(resolved):
            resolved = presets.resolve(source, overrides + ["solve.certify=true"])
        if args.show:
            presets.check(resolved)  # ranges a builder checks are bad input here too
            print(dumps_toml(resolved.config, comments=True,
                             problem=presets.PROBLEMS[resolved.problem_kind]), end="")
            sys.stdout.flush()  # a closed output is reported here, in one line
            return 0
        if args.out is not None:
            out = Path(args.out)
            if not args.out:
                raise InputError("--out is empty: give a directory")
            check_writable(out)
            _rundir.check_new(out, overwrite=args.overwrite, kind="run",
                              finished_file="config.toml")
        else:
            check_writable(Path("runs"), flag="the default output directory")
        # Every check (gflow.solve's included) before anything is written or compiled.
        _cli_instruments.check(args, resolved)  # first: cheaper than a precision's floor
        with session.timed("build_seconds"):
            problem = presets.check(resolved)
        if args.out is not None:
            # With --overwrite the files of the old run (its manifest's) go; nothing else.
            session.claim = _rundir.claim(out, kind="run", overwrite=args.overwrite,
                                          finished_file="config.toml")
        else:
            session.claim = _rundir.claim_default(Path("runs"), resolved.name, kind="run")
        out = session.claim.directory
        session.run_dir, session.t0 = out, resolved.solve.t0
        # The config first: an interrupted run directory is then resumable.
        atomic_write_bytes(out / "config.toml", dumps_toml(resolved.config).encode())
        session.claim.set_state("solving")
    try:
        with session.timed("solve_seconds"):
            problem, traj = presets.run(
                resolved, progress=_show_progress(args), checkpoint_dir=out, resume=bool(args.resume),
                problem=problem,
            )
    except InputError:
        if not args.resume:  # bad input found late still leaves nothing of a new run
            _rundir.clear(out)
            session.remove_unstarted()
        else:  # a refused resume (a checkpoint of another problem) changes nothing
            session.claim.undo_adoption()
        raise

    # Results first (summary.json, trajectory.npz), figures after: they are redrawable.
    with session.timed("save_seconds"):
        traj.save(out)
    instruments = _cli_instruments.run(args, resolved, problem, traj, out)
    # Results are complete: the checkpoints have served; what remains is the figures.
    session.claim.set_state("figures" if not args.no_figures else "timings")
    for checkpoint in out.glob(_CHECKPOINTS):
        _rundir.remove(checkpoint)
    return _finish(args, session, resolved, problem, traj, out, instruments)


def _finish(args, session: _Session, resolved, problem, traj, out: Path,
            instruments: list[str]) -> int:
    """The figures (unless the run was started with --no-figures), timings.json and the
    report: the last phase of a run, which --resume redoes when it was cut short."""
    from ._rundir import read_manifest

    if (read_manifest(out) or {}).get("state") == "figures":
        from .plot import save_figures

        plot = resolved.plot
        with session.timed("figures_seconds"):
            save_figures(traj, out / "figures", time_axis=plot.time_axis, labels=plot.labels,
                         heatmaps=plot.heatmaps, formats=plot.formats)
    _write_timings(out, session, traj)
    session.claim.set_state("finished")
    if not args.quiet:
        print("\n".join([_report(traj, problem, out)] + instruments))
        sys.stdout.flush()  # a closed or full output is reported here, in one line
    return 0 if traj.status == "completed" else EXIT_RUN_FAILED
