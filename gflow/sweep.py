"""`python -m gflow.sweep` (or `gflow-sweep`): the sweep command line of `gflow._sweep_cli`.
Imported, this module is the library function `gflow.sweep` (see `gflow._entry`)."""

from gflow._entry import command_or_function

command_or_function(__name__, "gflow._sweep_cli", "gflow._sweep", "sweep")
