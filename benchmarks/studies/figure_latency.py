"""Figure latency: this tree's `gflow.plot` against another version's, side by side.

    python benchmarks/figure_latency.py RUN_DIR [RUN_DIR ...] --before PATH [--repeats 3] [--cli]

`PATH` holds the other version's `gflow` package (e.g. `git archive <commit> gflow | tar -x -C
PATH`); its `plot.py` and `_paper_figures.py` are loaded into this process next to this tree's,
so both draw the same loaded trajectories with the same imports. Variants, run in turn `--repeats` times so that a
change in the machine's load hits them alike: `before` (its defaults), `after` (this tree's
defaults: PNG only) and `after png+pdf` (like for like with a before that writes both), and
for a preset with its own composite figures (`Problem.figures`) `paper before`/`paper after`. For
each run directory and variant: the median CPU time (this process's user + system: robust
against other processes on a shared machine) and wall time of `save_figures`, and the files
written. With `--cli`, also the whole `python -m gflow.plot RUN_DIR` in a subprocess (imports
included: `import gflow` imports JAX), CPU and wall.
"""

import argparse
import importlib.util
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import gflow  # noqa: E402
from gflow import plot as after_plot  # noqa: E402


def _load_before(path: Path, name: str = "plot"):
    # As a module of this gflow package, so that its relative imports resolve here.
    spec = importlib.util.spec_from_file_location(f"gflow._{name.strip('_')}_before",
                                                  path / "gflow" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _paper_figures(run_dir: Path, before_module):
    """The preset's own composite figures (`Problem.figures`, e.g. `chen_luo_figures`) of this
    tree and the same function of the other version, with the preset's arguments; `None` when
    the run's preset has none."""
    from gflow import presets

    problem = presets.build(presets.resolve(str(run_dir / "config.toml")))
    after = problem.figures
    if after is None:
        return None
    func, keywords = (after.func, after.keywords) if hasattr(after, "func") else (after, {})
    before = getattr(before_module, func.__name__)
    return (lambda traj, d: before(traj, d, **keywords)), (lambda traj, d: after(traj, d))


def _in_process(save, traj, kwargs) -> tuple[float, float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        cpu, wall = time.process_time(), time.perf_counter()
        paths = save(traj, Path(tmp), **kwargs)
        return time.process_time() - cpu, time.perf_counter() - wall, len(paths)


def _subprocess(pythonpath: Path, run_dir: Path, extra: list[str]) -> tuple[float, float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / run_dir.name
        shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("figures"))
        env = os.environ | {"PYTHONPATH": str(pythonpath), "PYTHONDONTWRITEBYTECODE": "1"}
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "gflow.plot", str(copy), *extra], env=env,
                       check=True, capture_output=True)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        return cpu, wall, len(list((copy / "figures").iterdir()))


def _median(samples):
    return dict(cpu=statistics.median(s[0] for s in samples),
                wall=statistics.median(s[1] for s in samples), files=samples[0][2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--before", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cli", action="store_true")
    args = parser.parse_args()
    before_plot = _load_before(args.before)
    before_paper = _load_before(args.before, "_paper_figures")
    results = {}
    for run_dir in args.run_dirs:
        traj = gflow.load(run_dir)
        plot = (traj.config or {}).get("plot", {})
        kwargs = dict(time_axis=plot.get("time_axis", "log"), labels=plot.get("labels"),
                      heatmaps=tuple(plot.get("heatmaps", ())))
        variants = {
            "before": (before_plot.save_figures, kwargs),
            "after": (after_plot.save_figures, kwargs),
            "after png+pdf": (after_plot.save_figures, kwargs | {"formats": ("png", "pdf")}),
        }
        paper = _paper_figures(run_dir, before_paper)
        if paper is not None:
            variants |= {"paper before": (paper[0], {}), "paper after": (paper[1], {})}
        samples = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name, (save, kw) in variants.items():
                samples[name].append(_in_process(save, traj, kw))
        row = {name: _median(s) for name, s in samples.items()}
        if args.cli:
            cli = {"before": (args.before, []), "after": (ROOT, [])}
            cli_samples = {name: [] for name in cli}
            for _ in range(args.repeats):
                for name, (path, extra) in cli.items():
                    cli_samples[name].append(_subprocess(path, run_dir, extra))
            row |= {f"cli {name}": _median(s) for name, s in cli_samples.items()}
        results[run_dir.name] = row
        print(f"{run_dir.name:<14}" + "".join(
            f"  {name}: cpu {r['cpu']:.2f} s, wall {r['wall']:.2f} s, {r['files']} files;"
            for name, r in row.items())
            + f"  figures cpu before/after {row['before']['cpu'] / row['after']['cpu']:.1f}x"
            + (f", paper figures {row['paper before']['cpu'] / row['paper after']['cpu']:.1f}x"
               if "paper after" in row else ""),
            flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
