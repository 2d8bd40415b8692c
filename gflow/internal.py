"""gflow's internals that its own benchmarks and tests measure: not public API, and free to
change without notice.

- `compiled_programs()`: the programs compiled so far in this process (the engine's cache),
  e.g. to check that two settings ran the same program.
- `one_lapack_thread()`: the context every solve and sweep runs its programs in (one thread
  per BLAS/LAPACK call), for measuring a program outside a solve as a solve runs it.
- `chunk_steps(flow, spec)`: every how many steps a solve with a progress bar, a checkpoint
  file (without `checkpoint_steps`) or certify's reference is cut, so that the host can draw,
  write and honour Ctrl-C between calls (the cuts do not change the steps).
- `program_calls()`: how many times this process's solves have called their compiled
  programs (one per plain solve; an interactive one calls once per batch of chunks), e.g. to
  price what a progress bar costs per call.
- `ready_flow_ids()`: the `id`s of the flows whose plain solves `gflow.solve` keeps ready to
  run again (a solve repeated on the same flow and options skips its checks and planning);
  a flow's go when it does.
- `split(tree)`: a tree's inputs as the engine passes them to a program (its array leaves, each
  distinct array object once), a function rebuilding the tree from them, and the program
  cache's key of the rest.
- `PolynomialInterpolation`: the dense output of the switching solver's branches and of the
  matrix-free implicit solvers (`dense_info` of their steps builds one).
- `AbstractNewtonKrylov`: the interface of the matrix-free implicit solvers (the switching
  solver's implicit branch), e.g. to wrap one with instrumentation.
- `ranks_at_snapshot(traj, label)`: the effective and stable ranks of a `rank-collapse` run
  where its snapshot `label` was taken (a transition's name, `"end"`), and that time, as the
  preset's predictions read them (`None` where none was taken).
- `make_solver(solver, rtol)`, `solver_name(solver)`: a solver from its gflow name, and back.
- `AUTO_CROSSOVER_RTOL`, `AUTO_DOP853_ERROR_SCALE`: where `solver="auto"` switches from Tsit5 to
  DOP853, and the error scale it assumes for DOP853.
"""

from ._engine import (
    compiled_programs as compiled_programs,
    one_lapack_thread as one_lapack_thread,
    split as split,
)
from ._implicit import (
    AbstractNewtonKrylov as AbstractNewtonKrylov,
    PolynomialInterpolation as PolynomialInterpolation,
)
from ._solve import (
    chunk_steps as chunk_steps,
    program_calls as program_calls,
    ready_flow_ids as ready_flow_ids,
)
from ._solvers import (
    AUTO_CROSSOVER_RTOL as AUTO_CROSSOVER_RTOL,
    AUTO_DOP853_ERROR_SCALE as AUTO_DOP853_ERROR_SCALE,
    make_solver as make_solver,
    solver_name as solver_name,
)
from .presets._rank_collapse import ranks_at_snapshot as ranks_at_snapshot

__all__ = [
    "AUTO_CROSSOVER_RTOL", "AUTO_DOP853_ERROR_SCALE", "AbstractNewtonKrylov",
    "PolynomialInterpolation", "chunk_steps", "compiled_programs", "make_solver",
    "one_lapack_thread", "program_calls", "ranks_at_snapshot", "ready_flow_ids",
    "solver_name", "split",
]
