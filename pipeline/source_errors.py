"""The errors a source raises and the bounds every source format checks, in a leaf module: ``sources``
and ``hf_parquet`` both raise them, and ``sources`` reads parquet through ``hf_parquet``, so they cannot
live in either without an import circle. ``pipeline.sources`` re-exports them; import them from there."""

from __future__ import annotations

from storage.errors import UserError
from storage.schema import MAX_CLASSES  # one bound for sources and stores; why: see there


class SourceError(UserError):
    """Bad input: the message is one line naming the path and the fix.

    Not a ``ValueError``: the source readers catch ``ValueError`` from parsing (``int`` of a .cls, JSON,
    pyarrow) and turn it into a SourceError; a SourceError that were also a ValueError would be caught by
    those handlers too and need an ``except SourceError: raise`` ahead of each."""


class SourceChanged(SourceError):
    """A sample's bytes differ from those indexed: the source changed (not the label store)."""


class ManifestError(SourceError):
    """A label store's manifest.parquet is cut off, damaged or not one this project wrote."""


def permission_error(path: str, what: str = "read this file") -> SourceError:
    return SourceError(f"{path}: permission denied (cannot {what}); fix its permissions "
                       "(chmod a+rX) or remove it from the source")


def check_label_bound(label: int, where: str) -> None:
    """Refuse a label that would size per-class structures beyond MAX_CLASSES (why: see there)."""
    if label >= MAX_CLASSES:
        raise SourceError(f"{where} has label {label}, more than the {MAX_CLASSES:,} classes a source may have "
                          f"(labels are class indices 0..C-1): fix the label")


def check_class_count(count: int, where: str) -> None:
    if count > MAX_CLASSES:
        raise SourceError(f"{where} names {count:,} classes, more than the {MAX_CLASSES:,} a source may have; "
                          "fix the class names")
