"""Does restarting after a transition from the interpolated state cost accuracy?

After a located transition the engine resumes from the dense-output state at the root, not
from a step end (see `gflow._engine`). This measures what that costs on the `deep-linear`
preset's problem (16×16×16, four modes, t1 = 12, 301 save times): for each solver and
tolerance, the largest error of W1 over the save grid against a Dopri8 reference at
rtol 1e-13, solved without transitions and with the preset's four transitions (five
segments), and how far the two solves are from each other.

Run: `python -m benchmarks.studies.restart_error`.
"""

import numpy as np

import gflow
import gflow.presets

CASES = (("tsit5", 1e-8), ("auto", 1e-10), ("dop853", 1e-12), ("dopri8", 1e-12))


def main() -> None:
    problem = gflow.presets.build(gflow.presets.resolve("deep-linear", ["solve.t1=12"]))
    flow = problem.flow
    ts = gflow.linear_grid(0.0, 12.0, 301)
    observers = {"W1": lambda model, data: model.weights[0]}
    reference = gflow.solve(flow, 12.0, solver="dopri8", rtol=1e-13, ts=ts, observers=observers)
    exact = np.asarray(reference.observables["W1"])
    scale = np.max(np.abs(exact))
    print("| solver | rtol | error without transitions | error with four (5 segments) "
          "| with against without |")
    print("|---|---|---|---|---|")
    for solver, rtol in CASES:
        runs = [gflow.solve(flow, 12.0, solver=solver, rtol=rtol, ts=ts, observers=observers,
                            transitions=transitions)
                for transitions in ((), problem.transitions)]
        plain, chained = (np.asarray(r.observables["W1"]) for r in runs)
        print(f"| {solver} | {rtol:.0e} | {np.max(np.abs(plain - exact)) / scale:.2e} "
              f"| {np.max(np.abs(chained - exact)) / scale:.2e} "
              f"| {np.max(np.abs(chained - plain)) / scale:.2e} |")


if __name__ == "__main__":
    main()
