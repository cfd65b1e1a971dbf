"""User-facing errors: the CLI prints these as one line, never a traceback."""


class CapshapeError(Exception):
    """A problem with the user's input (config, task name, file) that names the field and the fix."""
