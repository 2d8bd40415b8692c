"""`python -m gflow.solve`: the command line (its code lives in `gflow._cli`; also installed
as the console script `gflow-solve`).

`gflow.solve` is the library function. Python binds a package's attribute to a submodule when
the submodule is imported, so `import gflow.solve` would replace the function with this module;
imported (rather than run), this module therefore puts the function itself in its place in
`sys.modules`, and `gflow.solve` stays the function whatever is imported.
"""

import sys

if __name__ == "__main__":
    from gflow._cli import main

    sys.exit(main())
else:
    from gflow._solve import solve as _solve

    sys.modules[__name__] = _solve
