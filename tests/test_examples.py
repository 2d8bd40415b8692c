"""The examples gallery, each run in quick mode as a user would run it, its printed numbers checked.

Every example is a separate process (a script, not an import). Compilation dominates their run
time and is mostly single-threaded, so the selected examples run two at a time, all started
when the first test asks for its output.
"""

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NAMES = ("saxe_modes", "incremental_learning", "custom_flow", "gd_vs_flow", "rank_collapse",
         "cooccurrence", "escape_scaling")
FLOAT = r"[-+]?\d+(?:\.\d*)?(?:e[-+]?\d+)?"


def _run(name: str, out: Path, via_flag: bool) -> str:
    # Quick mode both ways: half the examples by the flag, half by the environment variable.
    env = os.environ | {"GFLOW_EXAMPLES_QUICK": "0" if via_flag else "1"}
    command = [sys.executable, str(EXAMPLES / f"{name}.py"), "--out", str(out)]
    result = subprocess.run(command + (["--quick"] if via_flag else []), env=env, check=False,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{name} failed:\n{result.stdout}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    """`{name: (stdout, out_dir)}` futures for the examples whose tests are selected."""
    selected = {item.name.removeprefix("test_") for item in request.session.items
                if item.module is request.module}
    pool = ThreadPoolExecutor(max_workers=2)
    futures = {}
    for k, name in enumerate(n for n in NAMES if n in selected):
        out = tmp_path_factory.mktemp(name)
        futures[name] = (pool.submit(_run, name, out, k % 2 == 0), out)
    yield futures
    pool.shutdown(wait=True)


def output(runs, name: str) -> tuple[str, Path]:
    future, out = runs[name]
    stdout = future.result()
    figure = out / f"{name}.png"
    assert figure.is_file() and figure.stat().st_size > 10_000, f"{name}: figure missing or empty"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return stdout, out


def numbers(pattern: str, text: str) -> list[tuple[float, ...]]:
    found = [tuple(float(x) for x in m) if isinstance(m, tuple) else (float(m),)
             for m in re.findall(pattern, text)]
    assert found, f"pattern {pattern!r} not in output:\n{text}"
    return found


def test_saxe_modes(runs):
    stdout, _ = output(runs, "saxe_modes")
    (error, rtol), = numbers(rf"against the closed form: ({FLOAT}) \(rtol ({FLOAT})\)", stdout)
    assert error < 100 * rtol
    rows = numbers(rf"\n\s+\d+\s+({FLOAT})\s+({FLOAT})\s+({FLOAT})\s+({FLOAT})\s+({FLOAT})", stdout)
    assert len(rows) == 2
    for s, measured, predicted, rel, _ in rows:
        assert abs(measured - predicted) / predicted < 1e-6 and rel < 1e-6
    assert rows[0][1] < rows[1][1]  # the larger mode is learned first


def test_incremental_learning(runs):
    stdout, _ = output(runs, "incremental_learning")
    assert "modes learned in order of decreasing s: True" in stdout
    rows = numbers(rf"\n\s+\d+\s+({FLOAT})\s+({FLOAT})\s+({FLOAT})\s+({FLOAT})\s+({FLOAT})", stdout)
    assert len(rows) == 3
    measured = [r[2] for r in rows]
    assert measured == sorted(measured)
    for s, u0, t_meas, t_pred, rel in rows:
        # The linearized prediction neglects the coupling of modes: a few percent at most.
        assert abs(t_meas - t_pred) / t_pred < 0.05
    for value, plateau in numbers(rf"loss ({FLOAT}), ½ Σ unlearned s² = ({FLOAT})", stdout)[:-1]:
        assert abs(value - plateau) < 0.15 * plateau


def test_custom_flow(runs):
    stdout, _ = output(runs, "custom_flow")
    runs_ = numbers(rf"compile ({FLOAT}) s .*?closed form ({FLOAT}), max \|drift of u²−v²\| "
                    rf"({FLOAT})", stdout)
    assert len(runs_) == 2
    assert runs_[1][0] == 0.0  # a new init reuses the compiled program
    for _, error, drift in runs_:
        assert error < 1e-6 and drift < 1e-12
    times = numbers(rf"learned at t = ({FLOAT}), closed form ({FLOAT})", stdout)
    assert len(times) == 8
    for measured, predicted in times:
        assert abs(measured - predicted) < 1e-6 * predicted
    assert stdout.count("final support size 4 (true support 4)") == 2


def test_gd_vs_flow(runs):
    stdout, _ = output(runs, "gd_vs_flow")
    (slope,), = numbers(rf"log\(trajectory deviation\) vs log\(eta\): ({FLOAT})", stdout)
    assert 0.8 <= slope <= 1.2
    (modified,), = numbers(rf"deviation from the modified flow, gd_step = eta\) vs log\(eta\): "
                           rf"({FLOAT})", stdout)
    assert abs(modified - 2) <= 0.15  # GD follows its modified flow to second order
    slopes = numbers(rf"mode \d: ({FLOAT})", stdout)
    assert len(slopes) == 4 and all(0.8 <= s <= 1.2 for (s,) in slopes)
    rows = numbers(rf"\n\s*({FLOAT})\s+\d+\s+({FLOAT})\s", stdout)
    deviations = [d for _, d in rows]
    assert len(rows) == 4 and deviations == sorted(deviations, reverse=True)


def test_rank_collapse(runs):
    stdout, _ = output(runs, "rank_collapse")
    (t_c,), = numbers(rf"condensation at t = ({FLOAT})", stdout)
    (t_k,), = numbers(rf"kq_collapse at t = ({FLOAT})", stdout)
    assert 0 < t_c < t_k
    groups = rf"\s+({FLOAT})\s+({FLOAT})\s+({FLOAT})\s+({FLOAT})"
    (rank_c,) = numbers(r"effective_rank @ condensation" + groups, stdout)
    (change_c,) = numbers(r"relative_change @ condensation" + groups, stdout)
    (rank_end,) = numbers(r"effective_rank @ t = \S+" + groups, stdout)
    # Condensation: the outer group (W_V, W1) has collapsed and moved, W_Q, W_K have not.
    assert max(rank_c[2:]) < 2.5 and min(rank_c[:2]) > 5
    assert max(change_c[:2]) < 1e-2 and min(change_c[2:]) > 1
    assert max(rank_end) < 2  # then the key-query group collapses as well
    (blowup, bound), = numbers(rf"real time ({FLOAT}) \(blow-up bound ({FLOAT})", stdout)
    assert t_c < blowup < bound and blowup < 1.1 * t_c
    first, *_ = numbers(rf"rel\. deviation ({FLOAT})", stdout)
    assert first[0] < 1e-2  # the reduced flow holds early in stage 1


def test_cooccurrence(runs):
    stdout, _ = output(runs, "cooccurrence")
    (T1,), = numbers(rf"Phase 1 ends at T1 = ({FLOAT})", stdout)
    assert 0 < T1 < 10
    (G,) = numbers(rf"at T1: ({FLOAT}) ({FLOAT}) ({FLOAT})", stdout)
    assert G[0] > 0 and G[1] > 0 and G[2] < 0
    change = {(i, j): v for i, j, v in numbers(
        rf"Δ μ(\d)ᵀW_KᵀW_Qμ(\d) = ({FLOAT})", stdout)}
    assert change[1, 2] > 0 and change[2, 1] > 0 and change[3, 1] < 0 and change[3, 2] < 0
    (phase1, final), = numbers(rf"during Phase 1: ({FLOAT}); by t = \S+: ({FLOAT})", stdout)
    # The quick run is the small-output variant (sigma1=1e-3), where theory's Phase-1 picture is
    # a given; at the preset's He-normal init the rise depends on the seed and the size.
    assert phase1 < 0.25 * final  # attention moves in Phase 2, not Phase 1
    rises = dict(numbers(rf"loss\s+type (\d):.*\(rise ({FLOAT})\)", stdout))
    assert rises[2] > 0 and rises[3] > 0  # type-2 and type-3 losses first rise
    (r2,), = numbers(rf"\[\S+, \S+\] only: c = {FLOAT}, R² = ({FLOAT})", stdout)
    assert r2 > 0.99


def test_escape_scaling(runs):
    stdout, _ = output(runs, "escape_scaling")
    assert stdout.count("statuses ['completed']") == 2
    assert stdout.count("in 1 program(s)") == 2  # every ε shares one compiled program
    rows = numbers(rf"\n\s*({FLOAT})\s+({FLOAT})\s+({FLOAT})(?=\n)", stdout)
    assert len(rows) >= 3
    products = [product for _, _, product in rows]
    assert max(products) < 1.1 * min(products)  # ε · t_escape nearly constant: t ∝ 1/ε
    linear = numbers(rf"\n\s*{FLOAT}" + rf"\s+({FLOAT})" * 4 + r"(?=\n)", stdout)
    assert len(linear) >= 3
    for t1, closed1, t2, closed2 in linear:  # Saxe's closed form on the aligned manifold
        assert abs(t1 - closed1) < 1e-5 * closed1 and abs(t2 - closed2) < 1e-5 * closed2
    (exponent, low, high), = numbers(
        rf"exponent of t_escape vs eps: ({FLOAT}) \(95% interval \[({FLOAT}), ({FLOAT})\]", stdout)
    assert abs(exponent + 1) < 0.1 and low < exponent < high
    fits = numbers(rf"mode\d \(s = ({FLOAT})\): slope of t vs ln\(1/eps\): ({FLOAT}) \(95% "
                   rf"interval \[({FLOAT}), ({FLOAT})\]\), predicted 1/s = ({FLOAT})", stdout)
    assert len(fits) == 2
    for s, slope, low, high, predicted in fits:
        assert predicted == pytest.approx(1 / s, rel=1e-4)  # eps scales each factor: u0 = eps²
        # ln(s/ε² − 1) is a line in ln(1/ε) only as ε → 0: a 2% band, not the interval.
        assert abs(slope - predicted) < 0.02 * predicted and low < slope < high
