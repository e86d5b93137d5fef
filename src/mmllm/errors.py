"""Errors a user can act on. The CLI prints them as one line and exits non-zero; no traceback."""


class MmllmError(Exception):
    """A problem with the user's input or environment, with a message that says what to do."""
