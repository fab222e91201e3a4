"""The error a command raises for a problem the user can fix; the CLI prints it as one line."""


class CommandError(RuntimeError):
    """A user-fixable problem found by a command (bad flag combination, missing file, ...)."""
