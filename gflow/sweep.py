"""`python -m gflow.sweep`: the sweep command line (its code lives in `gflow._sweep_cli`).

This module only runs the command line. Import the library function as `gflow.sweep`; never
import this module (`import gflow.sweep` would rebind the package attribute to it).
"""

if __name__ == "__main__":
    import sys

    from gflow._sweep_cli import main

    sys.exit(main())
