"""gflow: exact gradient flow of small Transformer-style models by adaptive ODE integration.

Importing gflow enables float64 in JAX (`jax_enable_x64`): solver tolerances of 1e-8 and below
mean nothing in float32.

Equinox's runtime errors default to NaN (`EQX_ON_ERROR=nan`, equinox's documented setting,
read when equinox is first imported) unless the environment already sets it: gflow reports
failure through each solve's `status`, and a raising check embeds a host callback that makes
JAX's persistent compilation cache miss in every new process.
"""

import os as _os

_os.environ.setdefault("EQX_ON_ERROR", "nan")

import jax as _jax

_jax.config.update("jax_enable_x64", True)

from ._errors import InputError as InputError
from ._flow import GradientFlow as GradientFlow
from ._dop853 import DOP853 as DOP853
from ._grids import linear_grid as linear_grid, log_grid as log_grid
from ._prediction import Prediction as Prediction
from ._solvers import auto_solver as auto_solver
from ._scaling import ScalingLaw as ScalingLaw
from ._solve import Transition as Transition, error_estimates as error_estimates, solve as solve
from ._trajectory import Trajectory as Trajectory, load as load
from ._critical import CriticalPoint as CriticalPoint, critical_points as critical_points
from ._sensitivity import Sensitivity as Sensitivity, sensitivity as sensitivity
from ._sweep import (
    ScalingFit as ScalingFit,
    Sweep as Sweep,
    SweepMember as SweepMember,
    plot_fit as plot_fit,
    sweep as sweep,
    sweep_points as sweep_points,
)
from . import measures as measures
from . import models as models
from . import observers as observers
from . import tasks as tasks
from . import theory as theory
from . import presets as presets

__version__ = "0.1.0"

__all__ = [
    "CriticalPoint",
    "DOP853",
    "GradientFlow",
    "InputError",
    "Prediction",
    "Sensitivity",
    "ScalingFit",
    "ScalingLaw",
    "Sweep",
    "SweepMember",
    "Trajectory",
    "Transition",
    "auto_solver",
    "critical_points",
    "error_estimates",
    "linear_grid",
    "load",
    "log_grid",
    "plot_fit",
    "sensitivity",
    "solve",
    "sweep",
    "sweep_points",
    "measures",
    "models",
    "observers",
    "presets",
    "tasks",
    "theory",
]
