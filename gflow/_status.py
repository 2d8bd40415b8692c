"""The statuses a solve ends with, and what each one means: one enumeration for the engine,
`gflow.solve`, `gflow.sweep` and checkpoints (in the style of optimistix's `RESULTS`).

The engine carries a status as an int32 code; the host turns a code into its name (the
`status` of a `Trajectory` or `SweepMember`) and its one-line message. A leaf module: it
imports nothing of gflow.
"""

import math


class Status:
    """Status codes of a solve. `RUNNING` marks a carry whose solve goes on; the others end
    it, and index `NAMES`.

    - `COMPLETED`: reached `t1`, or a terminal `Transition` (e.g. `gflow.converged`).
    - `MAX_STEPS`: took `max_steps` steps (accepted plus rejected) before `t1`.
    - `NONFINITE`: the state diverged (or a failure happened after it left float range).
    - `DT_MIN`: the step size collapsed to the controller's smallest step.
    - `FAILED`: any other failure of the solver.
    """

    NAMES = ("completed", "max_steps", "nonfinite", "dt_min", "failed")
    COMPLETED, MAX_STEPS, NONFINITE, DT_MIN, FAILED = range(len(NAMES))
    RUNNING = -1

    @classmethod
    def name(cls, code: int) -> str:
        """The name of a final status code (a carry still `RUNNING` reads as `"failed"`)."""
        code = int(code)
        return cls.NAMES[code] if 0 <= code < len(cls.NAMES) else "failed"

    @staticmethod
    def message(name: str, t_final: float, max_steps: int, held_at_dtmin: bool = False) -> str:
        """The one-line explanation of a status other than `"completed"` (empty when
        completed). `held_at_dtmin`: the controller had clipped its last steps to its smallest
        step, which tells a divergence of the flow from one the step size could not follow."""
        t = f"{t_final:.16g}" if math.isfinite(t_final) else str(t_final)
        if name == "completed":
            return ""
        if name == "max_steps":
            return f"reached max_steps={max_steps} before t1"
        if name == "nonfinite":
            message = f"the state diverged near t={t} (finite-time blow-up?)"
            if held_at_dtmin:
                message += ("; steps were held at the smallest allowed step: a blow-up, or a "
                            "flow too stiff for that step")
            return message
        if name == "dt_min":
            return (
                f"the step size collapsed near t={t}: the flow is singular there "
                "(finite-time blow-up or a non-smooth loss)"
            )
        return "the solver failed"
