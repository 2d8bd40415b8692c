"""The benchmark harness: `python -m benchmarks.run --quick` in a subprocess (started when
collection ends, see conftest.py), numbers checked. A benchmark study of about two minutes:
`-m slow` (the default suite stays within ten minutes on two cores).

Only accuracy and counts are asserted (they are reproducible); never a wall-clock time.
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "docs" / "results.md"  # the results page: a quick run never touches it


def _digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


@pytest.fixture(scope="module")
def quick_run(quick_benchmark):
    # Started by conftest.py when collection ended, so that it runs alongside the suite.
    out, before, returncode, stderr = quick_benchmark
    assert returncode == 0, stderr[-3000:]
    assert _digest(COMMITTED) == before, "the quick run must not touch docs/results.md"
    data = json.loads((out.parent / "results.json").read_text())
    assert list(data["workloads"]) == ["deep-linear", "rank-collapse"]
    workload = data["workloads"]["deep-linear"]["data"]
    return out, data | {"deep_linear": workload}, workload["results"]


def _rows(rows, family):
    return sorted((r for r in rows if r["family"] == family), key=lambda r: -r["knob"])


@pytest.mark.slow
def test_report_has_machine_targets_and_tables(quick_run):
    out, data, _ = quick_run
    text = out.read_text()
    for heading in ("## Machine", "## Issue 7's targets", "## How it is measured",
                    "### Every method and setting", "### gflow against bare diffrax",
                    "### Ratio to gflow at matched error", "## (c) rank-collapse",
                    "## Peak memory against the number of steps",
                    "## Issue 6: throughput of a sweep on CPU", "## Not measured"):
        assert heading in text, heading
    for method in ("gflow tsit5", "bare diffrax tsit5", "GD (lax.scan)", "optax.sgd",
                   "scipy DOP853 (jax rhs)"):
        assert f"| {method}" in text, method
    assert "load average" in text and data["machine"]["logical_cores"] >= 1
    for name in ("deep-linear", "rank-collapse"):
        figure = out.parent / f"{name}-work-precision.png"
        assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and figure.stat().st_size > 10_000


@pytest.mark.slow
def test_reference_agrees_with_scipy_dop853(quick_run):
    _, data, _ = quick_run
    checks = data["deep_linear"]["cross_check"]
    at_reference_rtol = next(c for c in checks if c["rtol"] == 1e-12)
    # Two independent 8th-order integrators at rtol 1e-12: agreement far below every
    # competitor's error (the loosest setting measured is rtol 1e-10).
    assert at_reference_rtol["state_difference"] < 1e-10
    assert at_reference_rtol["transition_difference"] < 1e-10


@pytest.mark.slow
def test_gradient_descent_error_is_first_order(quick_run):
    _, data, rows = quick_run
    gd = _rows(rows, "GD (lax.scan)")
    etas = [r["knob"] for r in gd]
    assert etas == [1e-2, 1e-3, 1e-4]
    t1 = data["deep_linear"]["problem"]["t1"]
    for r in gd:
        assert r["evaluations"] == round(t1 / r["knob"])
    for coarse, fine in zip(gd, gd[1:]):
        # η shrinks 10×: a first-order method's error and stage times shrink about 10×.
        assert 5 <= coarse["traj_error"] / fine["traj_error"] <= 20
        for a, b in zip(coarse["transition_errors"], fine["transition_errors"]):
            assert 5 <= a / b <= 20
    fit = data["deep_linear"]["gd_fit"]
    assert 0.9 <= fit["fitted_power"] <= 1.1


@pytest.mark.slow
def test_gflow_error_follows_tolerance_and_matches_bare_diffrax(quick_run):
    _, _, rows = quick_run
    tsit5 = {r["knob"]: r for r in _rows(rows, "gflow tsit5")}
    assert tsit5[1e-10]["traj_error"] < 1e-8
    assert tsit5[1e-10]["traj_error"] < tsit5[1e-6]["traj_error"] < 1e-4
    # Same solver, controller and tolerances with and without gflow: the same trajectory.
    chained = _rows(rows, "gflow tsit5 + transitions")[0]
    bare = _rows(rows, "bare diffrax tsit5")[0]
    assert chained["knob"] == bare["knob"] == 1e-8
    np.testing.assert_allclose(chained["traj_error"], bare["traj_error"], rtol=0.5)
    # Transitions located by root finding carry the solver's accuracy.
    assert len(chained["transition_errors"]) == 3
    assert max(chained["transition_errors"]) < 1e-6
    gd_best = _rows(rows, "GD (lax.scan)")[-1]
    assert max(chained["transition_errors"]) < 1e-3 * min(gd_best["transition_errors"])


@pytest.mark.slow
def test_scipy_and_evaluation_counts(quick_run):
    _, _, rows = quick_run
    dop853 = _rows(rows, "scipy DOP853 (jax rhs)")[0]
    assert dop853["evaluations"] > 0 and dop853["traj_error"] < 1e-6
    for r in _rows(rows, "gflow tsit5"):
        # Tsit5 with first-same-as-last: 6 evaluations a step, plus the initial-step heuristic.
        assert 6 * r["steps"] <= r["evaluations"] <= 6 * r["steps"] + 3


@pytest.mark.slow
def test_torchdiffeq_model_matches_and_follows_tolerance(quick_run):
    pytest.importorskip("torch")
    pytest.importorskip("torchdiffeq")
    _, data, rows = quick_run
    info = data["deep_linear"]["torchdiffeq"]
    assert info["skipped"] is None
    # The PyTorch model's -∇L equals gflow's at the initial point and later reference states.
    assert len(info["check"]) == 3
    assert max(c["relative_difference"] for c in info["check"]) < 1e-12
    torch_rows = [r for r in rows if r["family"].startswith("torchdiffeq dopri5")]
    assert torch_rows and {r["family"] for r in torch_rows} <= {
        "torchdiffeq dopri5, 1 thread", "torchdiffeq dopri5, 2 threads"}
    gflow_dopri5 = _rows(rows, "gflow dopri5")[0]
    for r in torch_rows:
        assert r["knob"] == gflow_dopri5["knob"] == 1e-6
        # Same method, same tolerances, same flow: errors of the same size (the two
        # controllers differ in detail), each within a few hundred rtol of the reference.
        assert r["traj_error"] < 300 * r["knob"]
        assert 0.1 < r["traj_error"] / gflow_dopri5["traj_error"] < 10
        # Dopri5: 6 evaluations per step (first same as last) plus the initial-step heuristic.
        assert r["evaluations"] > 6 * 5


def test_attention_ffn_torch_velocity_matches_jax():
    # Workload (c)'s PyTorch model, torchdiffeq's right-hand side, against gflow's -∇L: at the
    # initial state and at a perturbed one with entries of order 0.3, where softmax and tanh
    # are far from linear; there also for the model's other activation and attention.
    torch = pytest.importorskip("torch")
    pytest.importorskip("torchdiffeq")
    import jax
    from jax.flatten_util import ravel_pytree

    import gflow
    from benchmarks import _torch, rank_collapse
    from gflow.models import AttentionFFN

    p = rank_collapse.build()
    y0 = ravel_pytree(p.flow.params)[0]
    perturbed = np.asarray(y0) + 0.3 * np.random.default_rng(0).normal(size=y0.size)
    X, y = np.asarray(p.flow.data.X), np.asarray(p.flow.data.y)
    weights = [getattr(p.flow.model, k) for k in ("W_Q", "W_K", "W_V", "W1", "W2")]
    cases = [(p.flow, p.torch_velocity(), y0), (p.flow, p.torch_velocity(), perturbed)]
    for activation, attention in (("identity", "exact"), ("tanh", "linearized")):
        model = AttentionFFN(*weights, activation=activation, attention=attention)
        cases.append((gflow.GradientFlow(model, p.flow.loss, p.flow.data),
                      _torch.attention_ffn(X, y, activation, attention), perturbed))
    for flow, velocity, state in cases:
        unravel = ravel_pytree(flow.params)[1]  # its treedef holds the model's static fields
        expected = np.asarray(jax.jit(lambda v: ravel_pytree(flow.velocity(unravel(v)))[0])(state))
        got = velocity(0.0, torch.tensor(np.asarray(state))).numpy()
        assert np.linalg.norm(got - expected) <= 1e-12 * np.linalg.norm(expected), (
            flow.model.activation, flow.model.attention)


@pytest.mark.slow
def test_rank_collapse_transitions(quick_run):
    _, data, _ = quick_run
    workload = data["workloads"]["rank-collapse"]["data"]
    ref = workload["reference"]["transitions"]
    assert list(ref) == ["condensation", "stage2_onset", "kq_collapse"]
    assert 0 < ref["condensation"] < ref["stage2_onset"] < ref["kq_collapse"] < 20_000
    rows = {r["family"]: r for r in workload["results"]}
    chained = rows["gflow tsit5 + transitions"]
    gd = rows["GD (lax.scan)"]
    # gflow locates all three; its times err far less than GD's at η = 0.5.
    assert len(chained["transition_errors"]) == 3
    assert max(chained["transition_errors"]) < 1e-2 * min(gd["transition_errors"])
    assert chained["traj_error"] < 1e-2 * gd["traj_error"]


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_steps(quick_run):
    _, data, _ = quick_run
    rows = data["memory"]
    assert len(rows) == 2 and all(r["save_times"] == 1000 for r in rows)
    (verdict,) = data["memory_verdict"]
    # The quick settings span more than 10× in steps with one compiled program.
    assert verdict["step_ratio"] >= 10 and verdict["same_program"]
    # Nothing is kept per step: the longer solve needs no memory beyond its short warm-up's
    # (beyond a tenth of one state per extra step).
    assert verdict["independent"] is True


@pytest.mark.slow
def test_sweep_matches_single_solves(quick_run):
    _, data, _ = quick_run
    sweep = data["sweep"]
    loop, *batched = sweep["rows"]
    assert loop["method"] == "Python loop of gflow.solve" and batched
    assert sweep["finite"]
    for row in batched:
        assert row["completed"] == sweep["members"]
        assert row["steps"] == loop["steps"]
        # The same segment program per member: the same transition times.
        assert row["max_difference"] <= 10 * sweep["rtol"] * sweep["max_transition"]


def test_solvers_section_is_replaced_and_carried_over(tmp_path):
    # The issue-14 block of RESULTS.md is written by its own run (`benchmarks.solvers`) and must
    # survive a rerun of `benchmarks.run`, which rewrites the rest of the file: private helpers,
    # tested here because a whole run of either takes minutes.
    from benchmarks.solvers import BEGIN, END, kept_section, write_section

    path = tmp_path / "RESULTS.md"
    path.write_text("# report\n\nbody\n")
    assert kept_section(path) is None
    write_section(path, f"{BEGIN}\nfirst\n{END}\n")
    write_section(path, f"{BEGIN}\nsecond\n{END}\n")
    text = path.read_text()
    assert text.startswith("# report\n\nbody\n") and "second" in text and "first" not in text
    assert text.count(BEGIN) == 1 and kept_section(path) == f"{BEGIN}\nsecond\n{END}\n"
    # Hand-written sections after the block (other commands' measurements) are carried too,
    # and survive the block's own rewrite.
    path.write_text(text + "\n## Round of some day\n\nhand-written\n")
    write_section(path, f"{BEGIN}\nthird\n{END}\n")
    assert kept_section(path) == f"{BEGIN}\nthird\n{END}\n\n## Round of some day\n\nhand-written\n"


@pytest.mark.slow
def test_solvers_quick_run(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.solvers", "--quick", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "solvers.json").read_text())["workloads"]["deep-linear"]
    matched = {m["rtol"]: m for m in data["analysis"]["matched"]}
    assert matched[1e-6]["solver"] == "switching" and matched[1e-10]["solver"] == "dop853"
    for rtol, m in matched.items():
        # auto's state at the save times against the Dopri8 reference (steps at save times).
        assert m["error"] < 10 * rtol, (rtol, m["error"])
    assert (tmp_path / "deep-linear-solvers-work-precision.png").read_bytes()[:4] == b"\x89PNG"


def test_results_page_is_generated_from_the_suites_json():
    # docs/results.md is exactly what `python -m benchmarks.results_page` makes of the
    # committed JSON: one command, no hand edits.
    from benchmarks import results_page

    assert results_page.main(["--check"]) == 0
    suites = results_page.load_suites()
    assert [s["suite"] for s in suites][:2] == ["gd-and-competitors", "auto-solver"]
    page = COMMITTED.read_text()
    for s in suites:
        assert f"## {s['title']}" in page and s["machine"]["cpu"] in page
        quantities = [r["quantity"] for r in s["rows"]]
        assert len(quantities) == len(set(quantities)) > 0  # one current row per quantity
    assert "## What earlier rounds concluded" in page


def test_a_new_suite_plugs_into_the_page(tmp_path):
    from benchmarks.results_page import load_suites, render, write_suite

    machine = dict(cpu="test CPU", usable_cores=2, jax_backend="cpu", date="today")
    write_suite("probe", title="A new suite", command="python -m benchmarks.probe",
                machine=machine, directory=tmp_path,
                rows=[dict(quantity="overhead", value=1.07, unit="×", target="≤ 1.1",
                           verdict="met"),
                      dict(quantity="not measured here", value=float("nan"))])
    data = json.loads((tmp_path / "probe.json").read_text())  # no NaN in the JSON
    assert data["rows"][1]["value"] is None
    page = render(load_suites(tmp_path), "")
    assert "## A new suite" in page and "| overhead | 1.07 × | ≤ 1.1 | met |" in page
    assert "| not measured here | — |" in page and "test CPU" in page
    with pytest.raises(ValueError, match="twice"):
        write_suite("bad", title="t", command="c", machine=machine, directory=tmp_path,
                    rows=[dict(quantity="q", value=1), dict(quantity="q", value=2)])
@pytest.mark.slow
def test_gpu_probe_quick(tmp_path):
    """`python -m benchmarks.gpu --quick` (the accelerator probe's recipe on CPU at a small
    size) writes every section, none failed; the float32 gradients stay float32 (not promoted
    to gflow's float64); XLA's FLOP count is positive; the estimate adds up."""
    out = tmp_path / "gpu.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu", "--quick", "--budget", "3600", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=3600,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads(out.read_text())
    sections = ("environment", "gradient", "linalg", "instruments", "step_floor",
                "capped_solve", "sweep", "certify", "checkpoint", "estimate")
    for name in sections:
        assert name in data and "error" not in data[name] and "skipped" not in data[name], name
    assert data["environment"]["x64"] is True
    gradient = data["gradient"]
    assert gradient["float64"]["velocity_dtype"] == "float64"
    for name in ("float32_default", "float32_highest"):
        assert gradient[name]["velocity_dtype"] == "float32"
    assert gradient["float64"]["flops"] > 0
    instruments = data["instruments"]
    assert set(instruments["conditions"]) == {"condensation", "stage2_onset", "kq_collapse"}
    # The save-time observation holds the preset's cheap observers, the snapshot the rest.
    observation = instruments["observation"]
    assert set(observation["observers"]) == {"loss", "norm", "relative_change", "stable_rank",
                                             "train_accuracy"}
    assert observation["gradients"] > 0 and observation["bytes"] > 0
    assert instruments["snapshot"]["bytes"] > observation["bytes"]
    assert data["capped_solve"]["steps"] == 10 and data["capped_solve"]["status"] == "max_steps"
    mixed = data["capped_solve"]["mixed"]
    assert mixed.get("precision") == "mixed" or "floor" in mixed.get("error", ""), mixed
    assert data["checkpoint"]["resumed_equal"]
    # The bar priced in its parts: more cuts at smaller chunks, each solve called at least once.
    parts = data["step_floor"]["decomposed"]
    assert parts["cuts"] == sorted(parts["cuts"], reverse=True) and parts["cuts"][0] > 1000
    assert all(calls >= 1 for calls in parts["calls"].values())
    est = data["estimate"]
    assert est["total_seconds"] == pytest.approx(
        est["flow_seconds"] + est["conditions_seconds"] + est["observation_seconds"])


def test_scipy_bdf_on_a_linear_flow_matches_the_closed_form():
    """`benchmarks.stiff`'s scipy BDF with the dense Hessian (from JAX) on the stiff linear
    flow dθ/dt = −Aθ (spectrum 0.01, 1, 100; a small and a large parameter group) agrees with
    θ(t) = exp(−At) θ0 at the save times, to 100× its rtol; and the benchmarks' copy of gflow's
    default atol (which CVODE and scipy get) is gflow's."""
    import scipy.linalg
    import jax.numpy as jnp

    import gflow
    from benchmarks._harness import relative_trajectory_error
    from benchmarks._stiff_workloads import flat_flow
    from benchmarks.stiff import scipy_bdf_run

    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))
    a = q @ np.diag([0.01, 1.0, 100.0]) @ q.T
    model = {"big": jnp.array([1.0, -2.0]), "small": jnp.array([3e-3])}

    def loss(model, data):
        theta = jnp.concatenate([model["big"], model["small"]])
        return 0.5 * theta @ (data @ theta)

    flow = gflow.GradientFlow(model, loss, jnp.asarray(a))
    ts = np.linspace(0.0, 50.0, 11)
    problem = flat_flow(flow, 0.0, 50.0, ts)
    rtol = 1e-8
    run = scipy_bdf_run(problem, rtol, repeats=1)
    exact = np.stack([scipy.linalg.expm(-a * t) @ problem.y0 for t in ts])
    assert run["status"] == "completed" and run["_states"].shape == exact.shape
    assert relative_trajectory_error(run["_states"], exact) < 100 * rtol
    assert run["hessians"] >= 1 and run["gradients"] > run["hessians"]
    assert problem.atol(rtol) == gflow.SolveSpec.from_options(flow, 50.0, rtol=rtol).atol


@pytest.mark.slow
def test_size_ladder_row_from_a_command_line_run(tmp_path):
    """`python -m benchmarks.studies.size_ladder --from-run RUN` reads a finished command-line
    run directory: its size and flow time from the run's config, its transitions and steps as
    the run's summary has them, the command that remakes it; a ladder outside this repository
    leaves the results page's rows alone."""
    run = tmp_path / "run"
    sets = ["--set", "problem.d=16", "--set", "problem.d_ff=32", "--set", "problem.n=120"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "gflow.solve", "rank-collapse", *sets, "--t1", "50",
                    "--no-certify", "--no-figures", "--quiet", "--out", str(run)],
                   cwd=ROOT, check=True, timeout=900, env=env)
    rows_before = _files(ROOT / "benchmarks" / "results")
    ladder = tmp_path / "ladder"
    subprocess.run([sys.executable, "-m", "benchmarks.studies.size_ladder", "--from-run", str(run),
                    "--out", str(ladder)], cwd=ROOT, check=True, timeout=900, env=env,
                   capture_output=True)
    row = json.loads((ladder / "d16-n120.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert (row["d"], row["d_ff"], row["n"], row["t1"]) == (16, 32, 120, 50.0)
    assert row["transitions"] == summary["transitions"]
    assert row["stats"]["num_steps"] == summary["stats"]["num_steps"]
    assert row["command"] == ("python -m gflow.solve rank-collapse --set problem.d=16 "
                              "--set problem.d_ff=32 --set problem.n=120 --set solve.t1=50.0 "
                              "--set solve.certify=false")
    assert "d = 16, n = 120" in (ladder / "size_ladder.md").read_text()
    assert _files(ROOT / "benchmarks" / "results") == rows_before


def _files(directory: Path) -> dict:
    return {str(p): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}
