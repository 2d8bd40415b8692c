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
from .._trajectory import Trajectory
from ._anchor import anchor
from ._cooccurrence import cooccurrence
from ._deep_linear import deep_linear
from ._rank_collapse import rank_collapse
from ._rank_collapse_binary import rank_collapse_binary
from ._text import text
from ._problem import Problem as Problem, comparison as comparison


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
        return self.config.get("preset", {}).get("name", self.problem_kind)


def resolve(source: str, overrides: list[str] = ()) -> Resolved:
    """Validate a preset name or a TOML path, with `table.key=value` overrides applied.

    Every check happens here, before anything is compiled.
    """
    path = Path(source)
    if source.endswith(".toml") or path.is_file():
        config = read_toml(path)
    else:
        config = preset_config(source)
    unknown = set(config) - {"preset", "problem", "solve", "plot"}
    if unknown:
        raise InputError(f"unknown config table {sorted(unknown)[0]!r}")
    config = apply_overrides(config, list(overrides))
    problem = dict(config.get("problem", {}))
    kind = problem.pop("kind", None)
    if kind not in PROBLEMS:
        raise InputError(f"problem.kind must be one of {', '.join(PROBLEMS)}, got {kind!r}")
    problem_args = check_arguments("problem", problem, PROBLEMS[kind])
    solve_settings = SolveSettings(**check_arguments("solve", config.get("solve", {}), SolveSettings))
    plot = PlotSettings(**check_arguments("plot", config.get("plot", {}), PlotSettings))
    return Resolved(config, kind, problem_args, solve_settings, plot)


def build(resolved: Resolved) -> Problem:
    """The `Problem` a resolved configuration describes."""
    return PROBLEMS[resolved.problem_kind](**resolved.problem_args)


def run(
    resolved: Resolved,
    *,
    progress: bool = False,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
) -> tuple[Problem, Trajectory]:
    """Build the problem and solve it as configured.

    **Arguments:**

    - `resolved`: from `resolve`.
    - `progress`: show a progress bar over flow time.
    - `checkpoint_dir`: write checkpoints there (`checkpoint-<pass>.eqx`), at every transition
        and every `solve.checkpoint_steps` steps.
    - `resume`: continue from the checkpoints in `checkpoint_dir`; the result equals that of
        an uninterrupted run.

    **Returns:**

    The problem and its trajectory, whose `config` is the resolved configuration and whose
    `predictions` compare the run with the problem's theory.
    """
    settings = resolved.solve
    warning = settings.precision_warning()
    if warning:
        warnings.warn(warning, stacklevel=2)
    # float32 on request, for this run only: the process keeps gflow's float64 default.
    with jax.enable_x64(not settings.x32):
        return _run(resolved, progress, checkpoint_dir, resume)


def with_times(grid, times) -> "np.ndarray":
    """`grid` (sorted) with each finite time of `times` replacing its nearest grid point, so
    that the count, hence the compiled program, stays the same; end points are kept."""
    import numpy as np

    grid = np.array(grid, dtype=float)
    for t in times:
        if not math.isfinite(t) or np.any(grid == t):
            continue
        inner = np.arange(1, grid.size - 1)
        if inner.size == 0:
            break
        taken = np.isin(grid[inner], list(times))
        candidates = inner[~taken]
        if candidates.size == 0:
            break
        grid[candidates[np.argmin(np.abs(grid[candidates] - t))]] = t
        grid.sort()
    return grid


def _run(resolved, progress, checkpoint_dir, resume) -> tuple[Problem, Trajectory]:
    problem = build(resolved)
    settings = resolved.solve

    def solve_on(ts, stage: str):
        checkpoint = None
        if checkpoint_dir is not None:
            checkpoint = Path(checkpoint_dir) / f"checkpoint-{stage}.eqx"
        return solve(
            problem.flow,
            settings.t1,
            t0=settings.t0,
            solver=settings.solver,
            rtol=settings.rtol,
            atol=settings.atol,
            ts=ts,
            observers=problem.observers,
            transitions=problem.transitions,
            max_steps=settings.max_steps,
            # Passes after the first say which they are on their bar.
            progress=progress and (True if stage == "first" else f"{stage} pass"),
            certify=settings.certify,
            checkpoint=checkpoint,
            checkpoint_steps=settings.checkpoint_steps or None,
            resume=resume,
        )

    traj = solve_on(settings.save_times(), "first")
    refined = settings.refine and settings.refined_save_times(traj.transitions.values())
    reached = [t for t in traj.transitions.values() if math.isfinite(t)]
    if (refined is None or refined is False) and problem.figures is not None and not all(
            t in traj.ts for t in reached):
        # A preset's own figures draw states at the transitions: solve again (same program)
        # with the transition times in the save grid.
        refined = settings.save_times()
    if refined is not None and refined is not False:
        # A save time exactly at each located transition: the refined pass takes the same
        # steps (save times do not steer the solver), so the state there is the transition's.
        refined = with_times(refined, traj.transitions.values())
    if refined is not None and refined is not False:
        first = traj
        traj = solve_on(refined, "refined")
        # Report the work of both passes.
        stats = {k: first.stats[k] + traj.stats[k] for k in traj.stats
                 if isinstance(traj.stats[k], (int, float)) and first.stats[k] is not None}
        traj = dataclasses.replace(traj, stats=traj.stats | stats | {"passes": 2})
    predictions = problem.predict(traj) if problem.predict is not None else {}
    # A prediction of a transition's time carries that transition's error estimate.
    errors = traj.errors.get("transitions", {})
    predictions = {name: p.with_error(errors[name]) if errors.get(name) is not None else p
                   for name, p in predictions.items()}
    return problem, dataclasses.replace(traj, config=resolved.config, predictions=predictions)
