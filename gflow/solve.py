"""`python -m gflow.solve` (or the console script `gflow-solve`): the command line of
`gflow._cli`. Imported, this module is the library function `gflow.solve` (see `gflow._entry`)."""

from gflow._entry import command_or_function

command_or_function(__name__, "gflow._cli", "gflow._solve", "solve")
