"""User-facing errors: one line that names the problem and the fix. The CLI prints them without a traceback."""


class QosoraError(Exception):
    """A problem with the user's input (path, file, option) that the user can fix."""
