"""The one base class of every error a user can cause or fix.

Its message is one line: the cause, then the fix. ``cli.py`` catches ``UserError`` alone, prints
``error: <message>`` and exits 2, so a new kind of bad input needs a subclass here or below, never
another handler. It lives on the ground floor so that ``storage/``, ``pipeline/`` and ``student/``
can all raise it. Subclasses keep the builtin base they had (``ValueError`` for bad values) so that
code catching those still does.
"""


class UserError(Exception):
    """Bad input or a state the user must change: one line naming the cause and the fix; exit 2."""
