"""Ctrl-C within a second: the command line runs the solve in chunks of steps of about a quarter
of a second (cuts that do not change the steps), so SIGINT is honoured between two chunks; the
run directory keeps a checkpoint from which `--resume` finishes the very same run."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

# deep-linear at a tight tolerance and long enough (about 90,000 steps) for some seconds of
# solving after compiling.
RUN = ["deep-linear", "--rtol", "1e-12", "--t1", "30000", "--no-figures", "--quiet"]


def _cli(args, tmp_path, **kw):
    env = os.environ | {"GFLOW_CACHE_DIR": str(tmp_path / "jax-cache")}
    return subprocess.Popen([sys.executable, "-m", "gflow.solve", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _finished(out) -> bool:
    manifest = out / ".gflow-manifest.json"
    return manifest.is_file() and json.loads(manifest.read_text()).get("state") == "finished"


def _summary(out):
    summary = json.loads((out / "summary.json").read_text())
    return summary, np.load(out / "trajectory.npz")


@pytest.mark.slow
def test_sigint_exits_within_two_seconds_and_resumes_bit_identical(tmp_path):
    whole = tmp_path / "whole"
    proc = _cli(RUN + ["--out", str(whole)], tmp_path)
    assert proc.wait(timeout=900) == 0, proc.stderr.read()
    expected, expected_arrays = _summary(whole)
    rng = random.Random(0)
    interrupted = 0
    for attempt in range(2):
        out = tmp_path / f"cut{attempt}"
        proc = _cli(RUN + ["--out", str(out)], tmp_path)
        # Interrupted while solving: once the first checkpoint is there, at a random moment.
        deadline = time.monotonic() + 600
        while not list(out.glob("checkpoint-first*.eqx")) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.0))
        if proc.poll() is not None:
            pytest.skip("the run finished before it could be interrupted")
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
        waited = time.monotonic() - sent
        if code == -signal.SIGINT and _finished(out):
            # The signal came as the finished run's interpreter was shutting down (Python
            # restores the default handler then): nothing was interrupted.
            continue
        assert code == 130, proc.stderr.read()
        interrupted += 1
        assert waited < 2.0, waited
        assert list(out.glob("checkpoint-*.eqx"))
        resumed = _cli(["--resume", str(out), "--quiet"], tmp_path)
        assert resumed.wait(timeout=900) == 0, resumed.stderr.read()
        summary, arrays = _summary(out)
        assert summary["transitions"] == expected["transitions"]
        assert summary["t_final"] == expected["t_final"]
        assert {k: v for k, v in summary["stats"].items() if not k.endswith("seconds")} == {
            k: v for k, v in expected["stats"].items() if not k.endswith("seconds")}
        assert arrays.files == expected_arrays.files
        for name in arrays.files:
            np.testing.assert_array_equal(arrays[name], expected_arrays[name])
    if not interrupted:
        pytest.skip("every run finished before it could be interrupted")
