"""The names of a store's metadata entries: one spelling for every module that writes or reads them.

Creation meta sits in store.json's "meta"; what is added later is meta/<key>.json (``StoreWriter.set_meta``);
``StoreReader.meta`` merges both. Precompute writes all of these; train, inspect and verify read them.
"""

from __future__ import annotations

TEACHER_IDENTITY = "teacher_identity"  # the teacher that labelled: name, weights sha256, data config (creation)
PROBES = "probes"                      # hashes of a few replayed views (pipeline.probes), re-rendered before use
VERSIONS = "versions"                  # library versions when the probes were hashed (explains a drift)
SOURCE_STAMPS = "source_stamps"       # source files' name, size, mtime at indexing (creation; sources.check)
SOFT_ERROR = "soft_error_rank"         # + rank: that rank's soft-target error sums (storage.soft)


def soft_error_key(rank: int | str) -> str:
    """The meta entry of one precompute rank's soft-target error sums; a ``--join`` process, which has no
    rank, passes ``join-<worker id>`` (made safe for a file name)."""
    if isinstance(rank, int):
        return f"{SOFT_ERROR}{rank:05d}"
    return SOFT_ERROR + "-" + "".join(c if c.isalnum() or c in "-_" else "-" for c in rank)
