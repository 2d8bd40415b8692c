"""`python -m gflow.solve`: the command line (its code lives in `gflow._cli`).

This module only runs the command line. Import the library function as `gflow.solve`; never
import this module (`import gflow.solve` would rebind the package attribute to it).
"""

if __name__ == "__main__":
    import sys

    from gflow._cli import main

    sys.exit(main())
