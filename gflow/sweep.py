"""`python -m gflow.sweep`: the sweep command line (its code lives in `gflow._sweep_cli`; also
installed as the console script `gflow-sweep`).

`gflow.sweep` is the library function. Python binds a package's attribute to a submodule when
the submodule is imported, so `import gflow.sweep` would replace the function with this module;
imported (rather than run), this module therefore puts the function itself in its place in
`sys.modules`, and `gflow.sweep` stays the function whatever is imported.
"""

import sys

if __name__ == "__main__":
    from gflow._sweep_cli import main

    sys.exit(main())
else:
    from gflow._sweep import sweep as _sweep

    sys.modules[__name__] = _sweep
