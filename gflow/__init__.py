"""gflow: exact gradient flow of small Transformer-style models by adaptive ODE integration.

Importing gflow enables float64 in JAX: it sets `JAX_ENABLE_X64=1`, which JAX reads when it is
first imported, or updates JAX's config (`jax_enable_x64`) if JAX is already imported. Solver
tolerances of 1e-8 and below mean nothing in float32.

Equinox's runtime errors default to NaN (`EQX_ON_ERROR=nan`, equinox's documented setting,
read when equinox is first imported) unless the environment already sets it: gflow reports
failure through each solve's `status`, and a raising check embeds a host callback that makes
JAX's persistent compilation cache miss in every new process.

JAX's persistent compilation cache is on (`gflow.enable_compilation_cache`): programs compiled
once are loaded, not compiled again, by the next process, in `$GFLOW_CACHE_DIR` (default
`~/.cache/gflow/jax`); `GFLOW_CACHE_DIR=""` or a `JAX_COMPILATION_CACHE_DIR` of your own turns
gflow's default off.

The public names are imported on first use (PEP 562), so that `import gflow` costs nothing
until something is used, and `python -m gflow.plot` draws a saved run without importing JAX.
"""

import importlib as _importlib
import os as _os
import sys as _sys
from typing import TYPE_CHECKING as _TYPE_CHECKING

_os.environ.setdefault("EQX_ON_ERROR", "nan")
if "jax" in _sys.modules:
    _sys.modules["jax"].config.update("jax_enable_x64", True)
else:
    _os.environ["JAX_ENABLE_X64"] = "1"

from ._cache import enable_by_default as _enable_cache_by_default

_enable_cache_by_default()

__version__ = "0.1.0"

# {public name: (module, attribute)}; attribute None for a submodule.
_EXPORTS = {
    "CriticalPoint": ("._critical", "CriticalPoint"),
    "DOP853": ("._dop853", "DOP853"),
    "GradientFlow": ("._flow", "GradientFlow"),
    "InputError": ("._errors", "InputError"),
    "NewtonKrylovBDF": ("._bdf", "NewtonKrylovBDF"),
    "NewtonKrylovESDIRK": ("._implicit", "NewtonKrylovESDIRK"),
    "Precision": ("._precision", "Precision"),
    "Prediction": ("._prediction", "Prediction"),
    "Sensitivity": ("._sensitivity", "Sensitivity"),
    "ScalingFit": ("._sweep", "ScalingFit"),
    "ScalingLaw": ("._scaling", "ScalingLaw"),
    "SolveSpec": ("._spec", "SolveSpec"),
    "StiffSwitching": ("._switching", "StiffSwitching"),
    "Sweep": ("._sweep", "Sweep"),
    "SweepMember": ("._sweep", "SweepMember"),
    "Trajectory": ("._trajectory", "Trajectory"),
    "Transition": ("._spec", "Transition"),
    "auto_solver": ("._solvers", "auto_solver"),
    "converged": ("._convergence", "converged"),
    "critical_points": ("._critical", "critical_points"),
    "enable_compilation_cache": ("._cache", "enable_compilation_cache"),
    "error_estimates": ("._solve", "error_estimates"),
    "linear_grid": ("._grids", "linear_grid"),
    "load": ("._trajectory", "load"),
    "log_grid": ("._grids", "log_grid"),
    "pid_controller": ("._solve", "pid_controller"),
    "plot_fit": ("._sweep", "plot_fit"),
    "sensitivity": ("._sensitivity", "sensitivity"),
    "solve": ("._solve", "solve"),
    "sweep": ("._sweep", "sweep"),
    "sweep_points": ("._sweep", "sweep_points"),
    "figures": (".figures", None),
    "measures": (".measures", None),
    "models": (".models", None),
    "observers": (".observers", None),
    "presets": (".presets", None),
    "tasks": (".tasks", None),
    "theory": (".theory", None),
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    try:
        module, attribute = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'gflow' has no attribute {name!r}") from None
    value = _importlib.import_module(module, __name__)
    if attribute is not None:
        value = getattr(value, attribute)
    # Bound once: later lookups are plain attribute reads. (Importing a submodule binds it
    # too; `gflow.solve` and `gflow.sweep`, which share their names with the command-line
    # modules, stay the functions: see `gflow._entry`.)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if _TYPE_CHECKING:  # what static tools (type checkers, the API reference) read
    from . import (
        figures as figures,
        measures as measures,
        models as models,
        observers as observers,
        presets as presets,
        tasks as tasks,
        theory as theory,
    )
    from ._cache import enable_compilation_cache as enable_compilation_cache
    from ._convergence import converged as converged
    from ._critical import CriticalPoint as CriticalPoint, critical_points as critical_points
    from ._dop853 import DOP853 as DOP853
    from ._errors import InputError as InputError
    from ._flow import GradientFlow as GradientFlow
    from ._grids import linear_grid as linear_grid, log_grid as log_grid
    from ._bdf import NewtonKrylovBDF as NewtonKrylovBDF
    from ._implicit import NewtonKrylovESDIRK as NewtonKrylovESDIRK
    from ._precision import Precision as Precision
    from ._prediction import Prediction as Prediction
    from ._scaling import ScalingLaw as ScalingLaw
    from ._sensitivity import Sensitivity as Sensitivity, sensitivity as sensitivity
    from ._solve import (
        error_estimates as error_estimates, pid_controller as pid_controller, solve as solve,
    )
    from ._spec import SolveSpec as SolveSpec, Transition as Transition
    from ._solvers import auto_solver as auto_solver
    from ._switching import StiffSwitching as StiffSwitching
    from ._sweep import (
        ScalingFit as ScalingFit,
        Sweep as Sweep,
        SweepMember as SweepMember,
        plot_fit as plot_fit,
        sweep as sweep,
        sweep_points as sweep_points,
    )
    from ._trajectory import Trajectory as Trajectory, load as load
