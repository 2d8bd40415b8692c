"""`python -m gflow.solve`: run a preset or a TOML config and write a run directory.

A thin layer over `gflow.presets.resolve`/`run` and `Trajectory.save`: every check happens
before compilation, and bad input ends with one line on stderr and exit status 2.
"""

import argparse
import math
import os
import sys
import time
import warnings
from pathlib import Path

from ._errors import InputError
from ._prediction import render_predictions

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
    p.add_argument("--progress", action="store_true", help="show a progress bar over flow time")
    p.add_argument("--platform", choices=("cpu", "gpu", "tpu"),
                   help="run on this JAX platform (default: JAX's choice)")
    p.add_argument("--certify", action="store_true",
                   help="re-solve with 100x smaller tolerances and report error estimates "
                   "(solve.certify)")
    p.add_argument("--x32", action="store_true",
                   help="compute in float32 instead of float64 (solve.x32); needs rtol >= 1e-5")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue an interrupted run from its checkpoints, with its own "
                   "config.toml; the result equals that of an uninterrupted run")
    return p


def _enable_compilation_cache() -> None:
    """JAX's persistent compilation cache, so a repeated run skips compilation."""
    import jax

    cache = os.environ.get("GFLOW_CACHE_DIR") or str(Path.home() / ".cache" / "gflow" / "jax")
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


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


def _format_time(t) -> str:
    return "not reached" if t is None or not math.isfinite(t) else f"{t:.10g}"


def _report(traj, problem, out: Path) -> str:
    s = traj.stats
    lines = [
        f"status      {traj.status}" + (f" ({traj.message})" if traj.message else ""),
        f"time        t0={traj.t0:g} -> t_final={_format_time(traj.t_final)} (t1={traj.t1:g})",
        f"solver      {traj.solver}, rtol={traj.rtol:g}, atol={traj.atol:.3g}, "
        f"{s.get('dtype', 'float64')}",
        f"steps       {s['num_steps']} ({s['num_accepted_steps']} accepted, "
        f"{s['num_rejected_steps']} rejected) in {s['segments']} segment(s); "
        f"vector-field evaluations {s['vector_field_evaluations']}",
        f"seconds     compile {s['compile_seconds']:.2f}, run {s['run_seconds']:.2f}",
    ]
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
            lines.append(f"  {name:<{width}}  {_format_time(t):>16}{pm}   {criterion}{flag}")
    if traj.predictions:
        lines.append("predictions")
        lines += render_predictions(traj.predictions)
    lines.append(f"written     {out}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = _parser().parse_args(argv)
    # Warnings as one line each, like errors (not Python's file:line and source echo).
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = _show_warning
        try:
            return _run(args)
        except InputError as e:
            print(f"gflow: error: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"gflow: warning: {message}", file=sys.stderr)


# What a run directory may hold besides its results: checkpoints to resume from.
_CHECKPOINTS = "checkpoint-*.eqx"


def _run(args) -> int:
    from . import presets
    from ._config import dumps_toml
    from ._trajectory import atomic_write_bytes

    if args.platform:
        _select_platform(args.platform)
    if args.list:
        for name in presets.preset_names():
            config = presets.preset_config(name)
            default = " (default)" if name == presets.DEFAULT_PRESET else ""
            print(f"{name:<16} {config.get('preset', {}).get('description', '')}{default}")
        return 0

    overrides = list(args.set)
    for flag in ("t1", "rtol", "atol", "solver"):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"solve.{flag}={value!r}" if flag == "solver" else f"solve.{flag}={value}")
    if args.certify:
        overrides.append("solve.certify=true")
    if args.x32:
        overrides.append("solve.x32=true")
    if args.resume:
        out = Path(args.resume)
        given = [name for name, used in (("CONFIG", args.config), ("--out", args.out),
                                         ("--show", args.show)) if used]
        if not (out / "config.toml").is_file():
            raise InputError(f"--resume {out}: not a gflow run directory (no config.toml)")
        if given or overrides:
            raise InputError(
                f"--resume continues {out} with its own config.toml; drop "
                f"{', '.join(given) or 'the overrides'}"
            )
        if not any(out.glob(_CHECKPOINTS)) and (out / "summary.json").is_file():
            raise InputError(f"--resume {out}: the run has finished (no checkpoint left)")
        resolved = presets.resolve(str(out / "config.toml"))
        # A kill mid-write leaves its temporary file (never a partial file under a final name).
        for leftover in out.glob(".*.tmp"):
            leftover.unlink()
    else:
        source = args.config or presets.DEFAULT_PRESET
        resolved = presets.resolve(source, overrides)
        if args.show:
            print(dumps_toml(resolved.config), end="")
            return 0
        if args.out:
            out = Path(args.out)
        else:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            out = Path("runs") / f"{resolved.name}-{stamp}"
        if out.exists() and not out.is_dir():
            raise InputError(f"--out {out} exists and is not a directory")

    _enable_compilation_cache()
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    # The config first: an interrupted run directory is then resumable.
    atomic_write_bytes(out / "config.toml", dumps_toml(resolved.config).encode())
    try:
        problem, traj = presets.run(
            resolved, progress=args.progress, checkpoint_dir=out, resume=bool(args.resume)
        )
    except InputError:
        if not args.resume:  # bad input writes nothing
            (out / "config.toml").unlink()
            if created:
                out.rmdir()
        raise

    from .plot import save_figures

    traj.save(out)
    save_figures(
        traj, out / "figures", time_axis=resolved.plot.time_axis, labels=resolved.plot.labels,
        heatmaps=resolved.plot.heatmaps,
    )
    if problem.figures is not None:
        problem.figures(traj, out / "figures")
    # Results are complete: the checkpoints have served.
    for checkpoint in out.glob(_CHECKPOINTS):
        checkpoint.unlink()
    if not args.quiet:
        print(_report(traj, problem, out))
    return 0 if traj.status == "completed" else EXIT_RUN_FAILED
