"""The one exception type gflow raises for bad input."""


class InputError(ValueError):
    """Bad input to gflow: an unknown name, a malformed config, an impossible value.

    The message is a single line naming the offending field or argument, so the command line can
    print it as it is and exit with status 2.
    """
