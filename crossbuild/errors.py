"""The one exception type the command line turns into a one-line message."""


class CrossbuildError(Exception):
    """A user-facing failure; ``str(error)`` is a single line that says what to do."""
