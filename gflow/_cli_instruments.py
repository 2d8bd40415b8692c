"""`--critical-points` and `--sensitivity NAME` of `python -m gflow.solve`: thin over
`gflow.critical_points` and `gflow.sensitivity`, kept here so the command line stays small."""

import dataclasses
import json
import math
import numbers
from pathlib import Path
from typing import Any

from ._errors import InputError
from ._trajectory import SUMMARY_FILE, _json_default, _json_ready, atomic_write_bytes


def check(args, resolved) -> None:
    """Refuse bad instrument flags before anything is written or compiled."""
    if not (args.critical_points or args.sensitivity):
        return
    if resolved.solve.precision_policy().policy != "float64":
        raise InputError("--critical-points and --sensitivity need float64: drop --x32 and "
                         "--precision")
    name = args.sensitivity
    if name is not None:
        value = resolved.problem_args.get(name)
        if name not in resolved.problem_args:
            raise InputError(f"--sensitivity {name}: the problem has no field {name!r} "
                             f"(fields: {', '.join(sorted(resolved.problem_args))})")
        if (isinstance(value, bool) or not isinstance(value, numbers.Real)
                or isinstance(value, numbers.Integral) or not math.isfinite(value)):
            raise InputError(f"--sensitivity {name}: problem.{name} = {value!r} is not a "
                             "floating-point number")


def _fmt(x, spec=".6g") -> str:
    return "-" if x is None or not math.isfinite(x) else format(x, spec)


def run(args, resolved, problem, traj, out: Path) -> list[str]:
    """Compute what the flags ask for, add it to `summary.json` in `out`, and return the
    report's lines."""
    from . import presets
    from ._critical import INDEX_RTOL, critical_points
    from ._sensitivity import sensitivity

    extra: dict[str, Any] = {}
    lines: list[str] = []
    if args.critical_points:
        try:
            points = critical_points(traj, problem.flow)
        except InputError as e:
            extra["critical_points"] = dict(error=str(e))
            lines.append(f"critical points  failed: {e}")
        else:
            extra["critical_points"] = [p.summary() for p in points]
            lines.append(f"critical points  (index: eigenvalues below -max({INDEX_RTOL:g} max|λ|, "
                         "1e-10); exit: linearised along the unstable direction / measured)")
            lines.append(f"  {'t':>12} {'loss':>12} {'|∇L|':>9} {'distance':>9} {'index':>6} "
                         f"{'λ_min':>10} {'λ_max':>10} {'exit pred.':>11} {'measured':>11}")
            for p in points:
                index = f"{p.index}" if p.index_exact else f">={p.index}"
                lines.append(
                    f"  {p.t:>12.6g} {p.loss:>12.8g} {p.grad_norm:>9.2e} {p.distance:>9.2e} "
                    f"{index:>6} {_fmt(float(p.eigenvalues[0]), '.4g'):>10} "
                    f"{_fmt(float(p.eigenvalues[-1]), '.4g'):>10} "
                    f"{_fmt(p.predicted_exit):>11} {_fmt(p.measured_exit):>11}"
                    + ("" if p.converged else "  [not converged]"))
    if args.sensitivity:
        name = args.sensitivity

        def build(q):
            args_q = resolved.problem_args | {name: float(q)}
            return presets.build(dataclasses.replace(resolved, problem_args=args_q))

        settings = resolved.solve
        p = float(resolved.problem_args[name])
        try:
            result = sensitivity(
                lambda q: build(q).flow, p, settings.t1, transitions=lambda q: build(q).transitions,
                # The options the run itself had (PI control included).
                **{k: v for k, v in presets.solve_options(settings).items()
                   if k != "checkpoint_steps"},
            )
        except InputError as e:
            extra["sensitivity"] = dict(parameter=name, error=str(e))
            lines.append(f"sensitivity      failed: {e}")
        else:
            extra["sensitivity"] = dict(parameter=name) | result.summary()
            lines.append(f"sensitivity      to problem.{name} = {p:g} (forward mode through the "
                         f"solve, implicit-function theorem; construction: {result.construction})")
            width = max(len(k) for k in result.times) if result.times else 0
            lines.append(f"  {'':<{width}}  {'t*':>14} {'dt*/d' + name:>14} "
                         f"{'d ln t*/d ln ' + name:>16}")
            for k, t in result.times.items():
                lines.append(f"  {k:<{width}}  {_fmt(t, '.10g'):>14} "
                             f"{_fmt(result.derivatives[k], '.6e'):>14} "
                             f"{_fmt(result.exponents[k], '.6f'):>16}")
    if extra:
        summary = json.loads((out / SUMMARY_FILE).read_text()) | extra
        text = json.dumps(_json_ready(summary), indent=2, default=_json_default, allow_nan=False)
        atomic_write_bytes(out / SUMMARY_FILE, (text + "\n").encode())
    return lines
