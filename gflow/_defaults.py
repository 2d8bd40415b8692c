"""The one default of each solve option, shared by `gflow.SolveSpec.from_options` (hence
`gflow.solve`, `gflow.sweep`, `gflow.sensitivity`) and a config's `[solve]` table. A leaf
module: the config layer reads it without importing JAX."""

SOLVER = "auto"
RTOL = 1e-8
MAX_STEPS = 100_000
SAVE_POINTS = 200
PCOEFF = 0.0  # diffrax's PIDController: integral control
ICOEFF = 1.0
# A figure's time axis (`gflow.figures`), as a config's `[plot] time_axis` names it.
TIME_AXES = ("log", "linear", "stages")
