"""What `gflow/solve.py` and `gflow/sweep.py` do: run a command line, or stand for a function.

Python binds a package's attribute to a submodule when the submodule is imported, so
`import gflow.solve` would replace the function `gflow.solve` with the command-line module.
Imported (rather than run with `python -m`), such a module therefore puts the library function
itself in its place in `sys.modules`: `gflow.solve` and `gflow.sweep` stay the functions
whatever is imported.
"""

import importlib
import sys


def command_or_function(module_name: str, command: str, library: str, function: str) -> None:
    """Run `command`'s `main` when `module_name` is `"__main__"`; otherwise make the module
    `module_name` the function `library.function`."""
    if module_name == "__main__":
        sys.exit(importlib.import_module(command).main())
    sys.modules[module_name] = getattr(importlib.import_module(library), function)
