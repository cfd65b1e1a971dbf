"""User-facing errors: the CLI prints these as one line, never a traceback."""


class CapshapeError(Exception):
    """A problem with the user's input (config, task name, file) that names the field and the fix.

    The message is kept to one line whatever it quotes: line breaks and other control characters
    from user input (a field name, a file's contents) are shown escaped, as in a Python string."""

    def __init__(self, message: str):
        super().__init__("".join(c if c.isprintable() else repr(c)[1:-1] for c in str(message)))
