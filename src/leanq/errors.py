"""One exception type for everything a user can get wrong.

The CLI prints ``leanq: error: <message>`` for a :class:`LeanqError` and exits
with status 2; any other exception is a bug and keeps its traceback.
"""


class LeanqError(Exception):
    """A bad input, file or setting, described in one line for the user."""
