"""Shared fixtures: small exactly solvable linear flows."""

import hashlib
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gflow
from gflow.models import DeepLinear, deep_linear_loss, whitened_target


# rank-collapse at d = 16 (run end to end by tests/test_chen_luo.py): the outer groups' initial
# mean stable rank is 5.7 (20.5 at d = 64) and the attention's lowest about 2.6, hence the
# thresholds 0.4 and 3.0 for its three transitions.
REDUCED_RANK_COLLAPSE = [
    "problem.d=16", "problem.d_ff=32", "problem.n=64", "problem.n_held_out=64",
    "problem.condensation_fraction=0.4", "problem.collapse_rank=3.0",
    "solve.t1=300", "solve.save_points=40",
]

# The other presets at sizes and horizons that run in seconds (run end to end by
# tests/test_cli.py): the same builders, compiled programs of the same kind.
REDUCED_PRESETS = {
    "cooccurrence": ["problem.n=12", "problem.d=12", "problem.m=8", "problem.m1=16",
                     "solve.t1=30", "solve.save_points=30"],
    "anchor": ["problem.n_train=45", "problem.n_held_out=10", "problem.d=8", "problem.m=8",
               "solve.t1=20", "solve.save_points=20"],
    "text": ["problem.n=32", "problem.d=8", "problem.m=8", "solve.t1=20",
             "solve.save_points=20"],
}

SAXE_S = (3.0, 1.5)
SAXE_U0 = 1e-3


@pytest.fixture(scope="session")
def saxe_target():
    """A 4x4 target with two modes (s = 3, 1.5)."""
    return whitened_target(SAXE_S, (4, 4), jax.random.key(0))


@pytest.fixture(scope="session")
def saxe_flow(saxe_target):
    """Two-layer linear network, balanced and aligned with the target's SVD, u0 = 1e-3."""
    model = DeepLinear.balanced_aligned(saxe_target, depth=2, u0=SAXE_U0)
    return gflow.GradientFlow(model, deep_linear_loss, saxe_target)


def mode_strengths(target):
    """Observer: `u_α = u_αᵀ (W2 W1) v_α` for the singular pairs of the target."""
    U, _, Vt = np.linalg.svd(np.asarray(target), full_matrices=False)
    r = len(SAXE_S)
    U, V = jnp.asarray(U[:, :r]), jnp.asarray(Vt[:r].T)

    def observe(model, data):
        return jnp.einsum("ia,ij,ja->a", U, model.product(), V)

    return observe


@pytest.fixture(scope="session")
def random_flow():
    """Two-layer 6x5x4 linear network from a random O(0.3) init (not aligned, not balanced)."""
    target = whitened_target((2.0, 1.0, 0.5), (4, 6), jax.random.key(3))
    model = DeepLinear.random((6, 5, 4), 0.3, jax.random.key(4))
    return gflow.GradientFlow(model, deep_linear_loss, target)


# ---------------------------------------------------------------------------------------------
# The benchmark harness's quick run (tests/test_benchmarks.py, `-m slow`) is one subprocess of
# about two minutes. In one process it starts when collection is done, runs while the other
# selected tests do, and its tests are moved to the end, where they wait for it. On pytest-xdist
# workers (the default, two) every worker collects every test but only one runs this file, so
# the run starts when that worker first asks for it.

_BENCHMARK_TESTS = "test_benchmarks.py"


def pytest_collection_modifyitems(session, config, items):
    # Last, so that they wait for the quick run as late as possible.
    bench = [item for item in items if item.path.name == _BENCHMARK_TESTS]
    items[:] = [item for item in items if item.path.name != _BENCHMARK_TESTS] + bench


def _start_quick_benchmark(config) -> None:
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    committed = root / "docs" / "results.md"
    out = Path(tempfile.mkdtemp(prefix="gflow-bench-")) / "RESULTS.md"
    config._gflow_quick_benchmark = dict(
        out=out,
        digest=hashlib.sha256(committed.read_bytes()).hexdigest() if committed.exists() else None,
        proc=subprocess.Popen(
            [sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(out)],
            cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        ),
    )


def pytest_collection_finish(session):
    # After deselection (`-m slow` selects these tests): started only if they will run.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    if any(item.path.name == _BENCHMARK_TESTS and "quick_run" in item.fixturenames
           for item in session.items):
        _start_quick_benchmark(session.config)


def pytest_unconfigure(config):
    import shutil

    started = getattr(config, "_gflow_quick_benchmark", None)
    if started is None:
        return
    if started["proc"].poll() is None:  # e.g. the run stopped early
        started["proc"].kill()
        started["proc"].wait()
    shutil.rmtree(started["out"].parent, ignore_errors=True)


@pytest.fixture(scope="session")
def quick_benchmark(request):
    """`(report path, committed docs/results.md digest before the run, return code, stderr)` of
    the quick benchmark run started at collection."""
    if getattr(request.config, "_gflow_quick_benchmark", None) is None and os.environ.get(
        "PYTEST_XDIST_WORKER"
    ):
        _start_quick_benchmark(request.config)
    started = getattr(request.config, "_gflow_quick_benchmark", None)
    if started is None:
        pytest.skip("the quick benchmark run was not started")
    _, err = started["proc"].communicate(timeout=900)
    return started["out"], started["digest"], started["proc"].returncode, err


def tree_digest(path):
    """Every entry under `path` with its bytes' digest (a file's own digest; None when `path`
    does not exist): two calls compare a directory byte for byte."""
    path = Path(path)
    if not os.path.lexists(path):
        return None
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file()
        else "dir"
        for p in sorted(path.rglob("*"))
    }


def call_entry(entry, argv) -> int:
    """A command line's `main(argv)` as its exit status (argparse's own errors exit)."""
    try:
        return entry(argv)
    except SystemExit as e:
        return e.code
