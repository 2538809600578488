"""The one exception type for bad input: the command line prints it as one line and exits 2."""


class UserError(ValueError):
    """A problem with what the user gave (flags, paths, data, workdir) and how to fix it."""


class Interrupted(Exception):
    """The run was asked to stop (SIGTERM / Ctrl-C) and its latest state is saved."""
