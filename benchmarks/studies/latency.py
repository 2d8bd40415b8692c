"""Where the time of `python -m gflow.solve PRESET` goes, cold and warm, for every preset.

Each preset is run twice in fresh processes, `python -m gflow.solve PRESET --out DIR --quiet
--overwrite` (the preset's defaults: certify on, figures on), with `GFLOW_CACHE_DIR` pointing at
an empty directory before the first run ("cold": nothing compiled yet) and at what it left for
the second ("warm": the persistent compilation cache full). The phases come from the run's
`timings.json` (written by the command line):

- *start*: the process's wall time before the command line's `main` (Python, gflow's
  command-line module);
- *import*: the imports the command line needs (JAX, diffrax, equinox, gflow's presets);
- *build*: resolving the config and building the preset's problem (data, init, the checks
  of `gflow.solve`), with the imports it triggers (JAX, diffrax, ...);
- *trace*, *compile*, *run*: the solve's engine program (tracing and lowering, XLA compiling or
  reading the persistent cache, running); *certify*: the reference solve's running, which runs
  alongside on a second thread (its program is the solve's);
- *solve other*: the rest of the solve phase (predictions, host work, waiting for the
  reference);
- *save*, *figures*: writing the run directory and drawing its figures.

Run: `python -m benchmarks.studies.latency [PRESET ...]` (default: every preset). Prints a Markdown
table.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import os


def _presets() -> list[str]:
    from gflow import presets

    return presets.preset_names()


def _one(preset: str, out: Path, cache: Path) -> dict:
    env = dict(os.environ, GFLOW_CACHE_DIR=str(cache))
    begin = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "gflow.solve", preset, "--out", str(out), "--quiet", "--overwrite"],
        env=env, capture_output=True, text=True,
    )
    whole = time.perf_counter() - begin
    if proc.returncode != 0:
        raise SystemExit(f"{preset}: exit {proc.returncode}: {proc.stderr[-2000:]}")
    timings = json.loads((out / "timings.json").read_text())
    return timings | {"whole_seconds": whole}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="*")
    args = parser.parse_args(argv)
    names = args.presets or _presets()
    print("| preset | cache | whole | start | import | build | trace | compile | run | certify "
          "(alongside) | solve other | save | figures |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        for name in names:
            cache = Path(scratch) / f"cache-{name}"
            for label in ("cold", "warm"):
                t = _one(name, Path(scratch) / name, cache)
                solve_other = t["solve_seconds"] - sum(
                    t.get(k) or 0.0 for k in ("trace_seconds", "compile_seconds", "run_seconds"))
                cells = [t["whole_seconds"], t["whole_seconds"] - t["main_seconds"],
                         t["import_seconds"], t["build_seconds"], t["trace_seconds"], t["compile_seconds"],
                         t["run_seconds"], t.get("certify_run_seconds"), solve_other,
                         t["save_seconds"], t.get("figures_seconds")]
                print(f"| {name} | {label} | " + " | ".join(
                    "—" if c is None else f"{c:.2f}" for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
