"""The one base class of every error a user can cause or fix.

Its message is one line: the cause, then the fix. ``cli.py`` catches ``UserError`` alone, prints
``error: <message>`` and exits 2, so a new kind of bad input needs a subclass here or below, never
another handler. It lives on the ground floor so that ``storage/``, ``pipeline/`` and ``student/``
can all raise it. Most subclasses keep the builtin base they had (``ValueError`` for bad values) so that
code catching those still does. ``pipeline.sources.SourceError`` does not: the source readers turn
Python's ``ValueError`` (parsing a label, JSON, parquet) into SourceErrors, and those handlers
must not catch a SourceError raised inside them.
"""


class UserError(Exception):
    """Bad input or a state the user must change: one line naming the cause and the fix; exit 2."""


def printable(text: object, limit: int = 120) -> str:
    """``text`` made safe to print on a terminal: control characters (escape sequences, newlines,
    bidi overrides) as backslash escapes, and at most ``limit`` characters (then "...").

    Class names, keys and file names come from the dataset; a hostile one could otherwise move the
    cursor, rewrite what was printed before it or fill the screen. Printable text is unchanged."""
    s = str(text)
    out = []
    for ch in s[:limit + 1]:
        if ch.isprintable() or ch == " ":
            out.append(ch)
        else:  # C0/C1 controls, DEL, line and paragraph separators, format characters (bidi)
            out.append(ch.encode("unicode_escape").decode("ascii"))
    safe = "".join(out)
    return safe[:limit] + "..." if len(s) > limit or len(safe) > limit else safe
