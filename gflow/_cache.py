"""JAX's persistent compilation cache, on by default for every gflow user.

`import gflow` points JAX's cache at `$GFLOW_CACHE_DIR` (default `~/.cache/gflow/jax`) and keeps
every program however quick to compile, unless the environment already chose a JAX cache
directory or `GFLOW_CACHE_DIR` is set to the empty string. A script or notebook run again in a
fresh process then loads its compiled programs instead of compiling them (building a model
runs dozens of small eager programs: random init, data; each is compiled in every new process
otherwise). No JAX is imported for it: the settings go through JAX's environment variables
when JAX is not imported yet, through `jax.config` otherwise.
"""

import os
import sys
from pathlib import Path


def default_cache_dir() -> str:
    """`$GFLOW_CACHE_DIR`, or `~/.cache/gflow/jax`."""
    return os.environ.get("GFLOW_CACHE_DIR") or str(Path.home() / ".cache" / "gflow" / "jax")


def enable_compilation_cache(path: str | os.PathLike | None = None) -> str:
    """Turn on JAX's persistent compilation cache in `path`, for every program compiled from
    now on, however quick to compile.

    `import gflow` already does this in the default directory (see `gflow` in the docs'
    Conventions page); call it to choose another directory, or after JAX has compiled
    something under other settings.

    **Arguments:**

    - `path`: the cache directory; default `$GFLOW_CACHE_DIR`, else `~/.cache/gflow/jax`.

    **Returns:**

    The cache directory, as a string.
    """
    import jax

    cache = str(path) if path is not None else default_cache_dir()
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    return cache


# Set beside JAX_COMPILATION_CACHE_DIR when gflow chose it, so that a child process (which
# inherits both) tells gflow's choice from its user's and follows its own GFLOW_CACHE_DIR.
_MARKER = "GFLOW_JAX_CACHE_DIR_SET"


def enable_by_default() -> None:
    """What `import gflow` does (see the module docstring); imports no JAX."""
    chosen = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if chosen and os.environ.get(_MARKER) == chosen:  # gflow's choice, inherited
        del os.environ["JAX_COMPILATION_CACHE_DIR"]
        chosen = None
    if os.environ.get("GFLOW_CACHE_DIR") == "" or chosen:
        return
    if "jax" in sys.modules:
        if sys.modules["jax"].config.jax_compilation_cache_dir is None:
            enable_compilation_cache()
    else:
        os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ[_MARKER] = default_cache_dir()
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
