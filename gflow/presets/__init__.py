"""Presets: named TOML configurations over problem builders that call the public API.

`python -m gflow.solve PRESET` runs one; `resolve` and `run` are what it calls, so a script can
do the same: `gflow.presets.run(gflow.presets.resolve("deep-linear", ["solve.t1=5"]))`.
"""

import dataclasses
import math
import os
import warnings
from importlib import resources
from pathlib import Path

import jax

from .._config import (
    PlotSettings,
    SolveSettings,
    apply_overrides,
    check_arguments,
    read_toml,
)
from .._errors import InputError
from .._solve import solve
from .._spec import SolveSpec
from .._trajectory import Trajectory
# The problem builders and their helpers are public here (the `X as X` form re-exports).
from ._anchor import anchor as anchor
from ._cooccurrence import cooccurrence as cooccurrence
from ._deep_linear import deep_linear as deep_linear
from ._rank_collapse import rank_collapse as rank_collapse
from ._rank_collapse_binary import rank_collapse_binary as rank_collapse_binary
from ._text import text as text
from ._problem import Problem as Problem, comparison as comparison, scaled_init as scaled_init


PROBLEMS = {
    "deep-linear": deep_linear,
    "cooccurrence": cooccurrence,
    "rank-collapse": rank_collapse,
    "rank-collapse-binary": rank_collapse_binary,
    "anchor": anchor,
    "text": text,
}

DEFAULT_PRESET = "rank-collapse"


def preset_names() -> list[str]:
    """Names of the presets shipped with gflow."""
    files = resources.files(__name__).iterdir()
    return sorted(f.name[: -len(".toml")] for f in files if f.name.endswith(".toml"))


def preset_config(name: str) -> dict:
    """The raw configuration of a shipped preset."""
    if name not in preset_names():
        raise InputError(f"unknown preset {name!r}; known presets: {', '.join(preset_names())}")
    with resources.as_file(resources.files(__name__) / f"{name}.toml") as path:
        return read_toml(path)


@dataclasses.dataclass(frozen=True)
class Resolved:
    """A validated configuration: the raw tables and the typed settings built from them."""

    config: dict
    problem_kind: str
    problem_args: dict
    solve: SolveSettings
    plot: PlotSettings

    @property
    def name(self) -> str:
        """The preset's name (`preset.name`), else the problem kind."""
        return self.config.get("preset", {}).get("name", self.problem_kind)


def resolve(source: str, overrides: list[str] = ()) -> Resolved:
    """Validate a preset name or a TOML path, with `table.key=value` overrides applied.

    Every check happens here, before anything is compiled.
    """
    if not isinstance(source, str) or not source:
        raise InputError(f"a config is a preset name or a TOML path, got {source!r}")
    path = Path(source)
    if path.is_dir():
        raise InputError(f"config {source} is a directory, not a TOML file")
    if source.endswith(".toml") or path.is_file():
        config = read_toml(path)
    else:
        config = preset_config(source)
    config = apply_overrides(config, list(overrides))
    problem = dict(config.get("problem", {}))
    kind = problem.pop("kind", None)
    if not isinstance(kind, str) or kind not in PROBLEMS:
        raise InputError(f"problem.kind must be one of {', '.join(PROBLEMS)}, got {kind!r}")
    problem_args = check_arguments("problem", problem, PROBLEMS[kind])
    _check_problem_ranges(problem_args)
    solve_settings = SolveSettings(**check_arguments("solve", config.get("solve", {}), SolveSettings))
    plot = PlotSettings(**check_arguments("plot", config.get("plot", {}), PlotSettings))
    return Resolved(config, kind, problem_args, solve_settings, plot)


# Integer problem fields other than seeds are sizes and counts. XLA aborts the process (it does
# not raise) when an allocation fails, so sizes whose arrays cannot fit are refused up front:
# each size at most MAX_SIZE, and a square float64 matrix of the largest size within a quarter
# of this machine's memory. (A best effort: a builder's 3-d arrays are not modelled.)
MAX_SIZE = 2**16
_EPS_RANGE = (1e-150, 1e50)


def _memory_bytes() -> float:
    try:
        return float(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 16e9


def _check_problem_ranges(args: dict) -> None:
    """Ranges every problem builder shares: sizes are non-negative and below `MAX_SIZE`,
    seeds fit JAX's 64-bit keys, `eps` (the init scale) is positive. (Each builder checks its
    own further ranges when it is built: `python -m gflow.solve --show` builds too.)"""
    for name, value in args.items():
        values = value if isinstance(value, tuple) else (value,)
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int) or "seed" in name:
                continue
            if not 0 <= v <= MAX_SIZE:
                raise InputError(f"problem.{name} must be between 0 and {MAX_SIZE}, got {v}")
            if 8 * v * v > _memory_bytes() / 4:
                raise InputError(
                    f"problem.{name} = {v}: a {v}x{v} float64 matrix ({8 * v * v / 1e9:.3g} GB) "
                    f"would not fit in this machine's memory ({_memory_bytes() / 1e9:.3g} GB)"
                )
    eps = args.get("eps")
    if isinstance(eps, float) and not eps > 0:
        raise InputError(f"problem.eps must be positive, got {eps}")
    # Below, squares of the init underflow float64 (and XLA flushes subnormals to zero: the
    # init would be exactly 0); above, the init's squared norm passes the divergence guard.
    if isinstance(eps, float) and not _EPS_RANGE[0] <= eps <= _EPS_RANGE[1]:
        raise InputError(
            f"problem.eps must be between {_EPS_RANGE[0]:g} and {_EPS_RANGE[1]:g}, got {eps:g}"
        )


def build(resolved: Resolved) -> Problem:
    """The `Problem` a resolved configuration describes.

    A builder that fails on its arguments (an allocation too large, an overflow) is bad input:
    its error comes back as a one-line `InputError` naming the builder.
    """
    kind = resolved.problem_kind
    try:
        return PROBLEMS[kind](**resolved.problem_args)
    except InputError:
        raise
    except (ArithmeticError, MemoryError, ValueError, TypeError, IndexError,
            jax.errors.JaxRuntimeError) as e:
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        raise InputError(f"problem: the {kind!r} builder failed: {reason}") from None


def check(resolved: Resolved) -> Problem:
    """Build the problem and run every check `run` would make before computing anything
    (the `[plot]` names, `gflow.solve`'s own input checks), without compiling (but for the two
    gradient evaluations that measure a float32 precision's tolerance floor).

    **Returns:**

    The problem, to pass on to `run`.
    """
    settings = resolved.solve
    # Built in float64 whatever the precision: every precision starts from the same init
    # (the solve casts it).
    problem = build(resolved)
    if settings.snapshot_points and not problem.snapshots:
        raise InputError(f"solve.snapshot_points: the {resolved.problem_kind!r} problem takes "
                         "no snapshots (it has no snapshot observers)")
    names = {"loss", *problem.observers, *problem.snapshots}
    plot = resolved.plot
    for field, given in (("heatmaps", plot.heatmaps), ("labels", tuple(plot.labels))):
        for name in given:
            if name.split("/")[0] not in names:
                raise InputError(
                    f"plot.{field}: no observable {name!r} in this problem; observables: "
                    f"{', '.join(sorted(names))}"
                )
    _check_plot_shapes(problem, plot)
    # What gflow.solve validates before it compiles (the first pass's save times).
    solve_spec(problem, settings, settings.save_times())
    return problem


def _check_plot_shapes(problem: Problem, plot) -> None:
    """`plot.labels` name one label per component of their observable, and `plot.heatmaps`
    square-matrix observables (shapes by abstract evaluation: nothing is compiled)."""
    observers = {"loss": problem.flow.loss, **problem.observers, **problem.snapshots}
    flow = problem.flow

    def leaves(name: str) -> list:
        top, _, rest = name.partition("/")
        out = jax.eval_shape(observers[top], flow.model, flow.data)
        for part in rest.split("/") if rest else ():
            if not isinstance(out, dict) or part not in out:
                raise InputError(f"plot: observable {top!r} has no part {rest!r}")
            out = out[part]
        return jax.tree_util.tree_leaves(out)

    for name, labels in plot.labels.items():
        found = leaves(name)
        if found and all(len(leaf.shape) >= 2 for leaf in found):
            continue  # a heatmap's row names
        if len(found) > 1 and all(leaf.shape == () for leaf in found):
            count = len(found)  # a dict of scalars: one figure, a line each
        elif len(found) == 1:
            count = math.prod(found[0].shape)
        else:
            continue  # one figure per leaf: labels do not apply to the group
        if count != len(labels):
            raise InputError(f"plot.labels.{name}: {len(labels)} label(s) for {count} "
                             f"component(s) of the observable {name!r}")
    for name in plot.heatmaps:
        for leaf in leaves(name):
            if len(leaf.shape) != 2 or leaf.shape[0] != leaf.shape[1]:
                raise InputError(f"plot.heatmaps: {name!r} is not a square matrix (shape "
                                 f"{leaf.shape}): only square-matrix observables are drawn "
                                 "as heatmaps")


def solve_options(settings: SolveSettings) -> dict:
    """The options of `gflow.SolveSpec.from_options` (and `gflow.solve`, `gflow.sweep`) that
    a `[solve]` table sets, besides the problem's own observers and transitions."""
    return dict(
        t0=settings.t0, solver=settings.solver, rtol=settings.rtol, atol=settings.atol,
        max_steps=settings.max_steps, pcoeff=settings.pcoeff, icoeff=settings.icoeff,
        checkpoint_steps=settings.checkpoint_steps or None,
        precision=settings.precision_policy(),
    )


def solve_spec(problem: Problem, settings: SolveSettings, ts) -> SolveSpec:
    """The `gflow.SolveSpec` a `[solve]` table gives for `problem`, saving at `ts` (and
    taking its snapshots at the table's chosen times)."""
    return SolveSpec.from_options(
        problem.flow, settings.t1, observers=problem.observers,
        transitions=problem.transitions, ts=ts, snapshots=problem.snapshots,
        snapshot_ts=settings.snapshot_times() if problem.snapshots else None,
        **solve_options(settings),
    )


def run(
    resolved: Resolved,
    *,
    progress: bool = False,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    problem: Problem | None = None,
) -> tuple[Problem, Trajectory]:
    """Build the problem and solve it as configured.

    **Arguments:**

    - `resolved`: from `resolve`.
    - `progress`: show a progress bar over flow time.
    - `checkpoint_dir`: write checkpoints there (`checkpoint-<pass>.eqx`), at every transition
        and every `solve.checkpoint_steps` steps.
    - `resume`: continue from the checkpoints in `checkpoint_dir`; the result equals that of
        an uninterrupted run.
    - `problem`: the problem `check(resolved)` built, if it was called (else built here).

    **Returns:**

    The problem and its trajectory, whose `config` is the resolved configuration and whose
    `predictions` compare the run with the problem's theory. Theory starts its clock at the
    initial state: predictions compare durations measured from `solve.t0`.
    """
    settings = resolved.solve
    warning = settings.precision_warning()
    if warning:
        warnings.warn(warning, stacklevel=2)
    return _run(resolved, progress, checkpoint_dir, resume, problem)


def _run(resolved, progress, checkpoint_dir, resume, problem) -> tuple[Problem, Trajectory]:
    problem = build(resolved) if problem is None else problem
    settings = resolved.solve

    def solve_on(ts, stage: str, certify: bool):
        checkpoint = None
        if checkpoint_dir is not None:
            checkpoint = Path(checkpoint_dir) / f"checkpoint-{stage}.eqx"
        return solve(
            problem.flow,
            solve_spec(problem, settings, ts),
            # Passes after the first say which they are on their bar.
            progress=progress and (True if stage == "first" else f"{stage} pass"),
            certify=certify,
            checkpoint=checkpoint,
            resume=resume,
        )

    # Certify the pass that is reported: with `refine`, the refined one. A preset's own
    # figures need no second pass: the engine records the observables at each transition.
    second = settings.refine
    traj = solve_on(settings.save_times(), "first", settings.certify and not second)
    refined = settings.refined_save_times(traj.transitions.values()) if second else None
    if refined is None and second and settings.certify:
        refined = settings.save_times()  # nothing reached to refine around: certify as is
    if refined is not None:
        first = traj
        traj = solve_on(refined, "refined", settings.certify)
        # Report the work of both passes.
        stats = {k: first.stats[k] + traj.stats[k] for k in traj.stats
                 if isinstance(traj.stats[k], (int, float)) and first.stats[k] is not None}
        traj = dataclasses.replace(traj, stats=traj.stats | stats | {"passes": 2})
    # Theory's clock starts at the init; a run starting at t0 != 0 is compared as such.
    t0 = settings.t0
    from_zero = traj if t0 == 0 else dataclasses.replace(
        traj, ts=traj.ts - t0, t0=0.0, t1=traj.t1 - t0, t_final=traj.t_final - t0,
        transitions={k: v - t0 for k, v in traj.transitions.items()},
        snapshot_ts=traj.snapshot_ts - t0,
    )
    predictions = {} if problem.predict is None else problem.predict(from_zero)
    references = {} if problem.references is None else problem.references(from_zero)
    # A prediction of a transition's time carries that transition's error estimate.
    errors = traj.errors.get("transitions", {})
    predictions = {name: p.with_error(errors[name]) if errors.get(name) is not None else p
                   for name, p in predictions.items()}
    return problem, dataclasses.replace(traj, config=resolved.config, predictions=predictions,
                                        criteria=dict(problem.criteria),
                                        references=references,
                                        components=dict(resolved.plot.labels))
