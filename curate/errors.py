"""User-facing errors: one clear sentence that says what is wrong and the fix.

The CLI prints these without a traceback (``--debug`` shows it).
"""


class CurateError(Exception):
    """An error caused by the user's input or environment, not a bug."""
