"""The one exception type for bad input: the command line prints it as one line and exits 2."""


class UserError(ValueError):
    """A problem with what the user gave (flags, paths, data, workdir) and how to fix it."""


class Interrupted(Exception):
    """The run was asked to stop (Ctrl-C, SIGTERM, or its `stop` event) and its latest state is
    saved: the same call (or command) again resumes from there."""

    def __init__(self, where: str, path: str):
        self.where, self.path = where, path
        super().__init__(f"stopped {where}; the state is saved in {path}: call it again to resume")

    def _render_traceback_(self):  # what IPython and Jupyter show instead of a traceback
        return [f"Interrupted: {self}"]
