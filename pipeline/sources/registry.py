"""The source format registry: ``FORMATS`` maps a manifest's ``kind`` to its format (``base.SourceFormat``).

Which format a ``--data`` is, the help that lists the formats and the error for a source of none are
built from it, so a new format is its module, one line here and its case in the conformance tests
(tests/test_source_formats.py); nothing else dispatches on a kind. Order matters where a directory holds
files of two formats: the first format listed with files there wins (.tar before .parquet, as always).
"""

from __future__ import annotations

import os

from storage.bucket import is_source_url

from ..source_errors import SourceError
from . import folder, hf_parquet, tar
from .base import SourceFormat
from .paths import expand_pattern, files_in

FORMATS: dict[str, SourceFormat] = {f.kind: f for f in (folder.FORMAT, tar.FORMAT, hf_parquet.FORMAT)}

# A directory holding no file of a format with an extension is this format's (an ImageFolder), and a
# file list of no known extension is indexed as this format's (its one-line error names the file).
DIRECTORY_FORMAT = folder.FORMAT
DEFAULT_FILE_FORMAT = tar.FORMAT


def formats_in_words() -> str:
    """The formats in words ("an ImageFolder directory, WebDataset .tar shards or ..."), for help and errors."""
    words = [f.what for f in FORMATS.values()]
    return ", ".join(words[:-1]) + " or " + words[-1] if len(words) > 1 else words[0]


def format_of_kind(kind: str) -> SourceFormat:
    if kind not in FORMATS:
        raise SourceError(f"source kind {kind!r} is none of {', '.join(FORMATS)}; the manifest is not one "
                          "this version wrote: re-run precompute with --overwrite")
    return FORMATS[kind]


def _file_format(path: str) -> SourceFormat:
    for f in FORMATS.values():
        if f.ext and path.endswith(f.ext):
            return f
    return DEFAULT_FILE_FORMAT


def expand_files(src: str) -> list[str]:
    """A directory (its files of the first format that has any), a glob, a brace pattern or one file -> paths;
    the same on a bucket (a prefix is its directory: ``bucket_files.expand_url``)."""
    if is_source_url(src):
        from .bucket_files import expand_url

        return expand_url(src, [f.ext for f in FORMATS.values() if f.ext])
    if os.path.isdir(src):
        for f in FORMATS.values():
            names = files_in(src, f.ext) if f.ext else []
            if names:
                return [os.path.join(src, n) for n in names]
        return []
    return expand_pattern(src)


def source_format(src: str) -> tuple[SourceFormat, list[str]]:
    """The format of ``--data src`` and its files (none for a directory format): one format per source."""
    files = expand_files(src)
    if is_source_url(src) and not files:
        raise SourceError(f"{src}: no {', '.join(f.ext for f in FORMATS.values() if f.ext)} objects there; on a "
                          f"bucket pass {', '.join(f.what for f in FORMATS.values() if f.ext)} (a prefix, a glob "
                          f"or a brace pattern): {DIRECTORY_FORMAT.what} cannot be read from a bucket")
    if os.path.isdir(src) and not files:
        return DIRECTORY_FORMAT, []
    if not files:
        raise SourceError(f"{src}: no such directory or shards; pass {formats_in_words()} (a directory, a glob "
                          "or a brace pattern)")
    kinds = [_file_format(f) for f in files]
    first = kinds[0]
    mixed = next((k for k in kinds if k is not first), None)
    if mixed is not None:
        named = first if first is not DEFAULT_FILE_FORMAT else mixed  # name the format with its extension
        other = next(p for p, q in zip(files, kinds, strict=True) if q is not named)
        raise SourceError(f"{src}: mixes {named.ext} files with others ({other}); a source is one kind of "
                          "files: narrow the pattern given to --data")
    return first, files
