"""The errors a source raises, in a leaf module: ``sources`` and ``hf_parquet`` both raise them, and
``sources`` reads parquet through ``hf_parquet``, so the errors cannot live in either without an
import circle. ``pipeline.sources`` re-exports all three; import them from there."""

from __future__ import annotations

from storage.errors import UserError


class SourceError(UserError, ValueError):
    """Bad input: the message is one line naming the path and the fix."""


class SourceChanged(SourceError):
    """A sample's bytes differ from those indexed: the source changed (not the label store)."""


def permission_error(path: str, what: str = "read this file") -> SourceError:
    return SourceError(f"{path}: permission denied (cannot {what}); fix its permissions "
                       "(chmod a+rX) or remove it from the source")
