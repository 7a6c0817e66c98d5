"""No re-index at start: a store's manifest is the source's, while each source file's stamp holds.

Indexing records, per tar or parquet file of a source, its name, size and mtime_ns (``stamps_of``; and
``classes.txt`` beside them, which names the classes), in the manifest it writes into a label store.
A later ``train``, ``verify``, probes or ``inspect --render`` on that store asks ``unchanged_source``:
it lists the --data files as indexing would, stats each once (one stat per file, never per sample)
and, where every stamp holds, takes the stored manifest (its root moved to the --data given) without
reading a byte of the source. A file whose stamp changed (touched, copied without -p, rewritten), or
whose mtime lies within a coarse file system's tick of when it was stamped (``stamps.racy``),
is re-indexed alone and its rows compared with the stored ones: equal, the start goes on; else, or for
other files, another layout, or a manifest without stamps (written before them), it gives None and
the caller indexes the whole source as before, so every refusal keeps its words ("--data ... is not
the source the store ... was made from", naming the difference and the fix).

Content is not stamped: every read checks a sample's bytes against its size and crc32c (``check_sample``),
so bytes changed under an unchanged stamp are still "source changed" at the read.

An ImageFolder keeps its re-index at start (None here): a stamp per image would be a stat per sample,
and stamping its folders' mtimes would save little, since listing the folders (what names its samples
and labels) is most of what indexing it names-only costs.
"""

from __future__ import annotations

import dataclasses
import os
import stat

import numpy as np

from storage.bucket import is_source_url

from ..source_errors import SourceError
from .registry import expand_files, format_of_kind
from .stamps import classes_stamp, is_bucket_stamps, racy, racy_object


def unchanged_source(stored, data: str):
    """The stored manifest (a ``sources.Manifest``) with its root at ``data``, when ``data`` is the source it
    was made from by the stamps, each changed file re-indexed alone to the same rows; else None (the caller
    indexes ``data`` in full, as before stamps)."""
    if stored.kind not in ("wds", "parquet") or not stored.stamps:
        return None
    try:
        files = expand_files(data)
    except SourceError:
        return None  # (a bad pattern: the full index says so, in its order)
    if not files or any(not f.endswith(format_of_kind(stored.kind).ext) for f in files):
        return None
    names = [os.path.basename(f) for f in files]
    stamps = stored.stamps["files"]
    if names != (stored.files or stored.shards) or [s[0] for s in stamps] != names:
        return None
    if is_source_url(files[0]):
        return _unchanged_objects(stored, files)
    if is_bucket_stamps(stored.stamps):
        return None  # a store made from a bucket, a local copy now: indexed in full (names only)
    root = os.path.dirname(os.path.abspath(files[0]))
    if any(os.path.dirname(os.path.abspath(f)) != root for f in files):
        return None
    changed = []
    for i, f in enumerate(files):
        try:
            st = os.stat(f)
        except OSError:
            return None  # gone or unreadable: indexing says which, in its words
        if not stat.S_ISREG(st.st_mode):
            return None
        if [st.st_size, st.st_mtime_ns] != stamps[i][1:] or racy(st.st_mtime_ns, stored.stamps):
            changed.append(i)
    classes = classes_stamp(root)
    if classes != stored.stamps["classes"] or (classes is not None and racy(classes[1], stored.stamps)):
        return None
    try:
        if any(not _same_rows(stored, i, files[i]) for i in changed):
            return None
    except SourceError:
        return None  # the full index raises it again, with its context
    return dataclasses.replace(stored, root=root)


def _unchanged_objects(stored, files: list[str]):
    """``unchanged_source`` on a bucket: each object's size and ETag, from one listing of the prefix (the one
    ``expand_files`` just made), against its stamp; a changed object re-indexed alone, as a file on disk.
    On a web server the same from the HEAD that ``expand_files`` made of each file (and one of classes.txt);
    a stamp that is a Last-Modified too close to its stamping (``racy_object``) counts as changed."""
    from .bucket_files import object_stamps

    root = files[0].rsplit("/", 1)[0]
    if any(f.rsplit("/", 1)[0] != root for f in files) or not is_bucket_stamps(stored.stamps):
        return None
    try:
        now = object_stamps(root, files)
    except SourceError:
        return None
    if now is None or now["classes"] != stored.stamps["classes"] or (
            now["classes"] is not None and racy_object(now["classes"][1], stored.stamps)):
        return None  # no ETags, or classes.txt changed (or came or went): a full index says how
    changed = [i for i, (a, b) in enumerate(zip(now["files"], stored.stamps["files"], strict=True))
               if a != b or racy_object(b[2], stored.stamps)]
    try:
        if any(not _same_rows(stored, i, files[i]) for i in changed):
            return None
    except SourceError:
        return None
    return dataclasses.replace(stored, root=root)


def _same_rows(stored, file: int, path: str) -> bool:
    """Whether ``path`` (file ``file`` of the source) indexes, names only, to the rows the manifest holds for it."""
    t = stored.samples
    which = t.column("file" if stored.files else "shard").to_numpy()
    rows = np.flatnonzero(which == file)
    mine = {c: t.column(c).to_numpy(zero_copy_only=False)[rows] for c in ("key", "path", "offset", "size", "label")}
    order = np.argsort(mine["offset"], kind="stable")  # the file's own order (a re-cut permutes it)
    mine = {c: v[order].tolist() for c, v in mine.items()}
    if stored.kind == "wds":
        from .tar import _index_tar, _open_url

        got = _index_tar(path, False, _open_url(path))  # (an object: its headers by range requests)
        return [(k, m, o, s, lab) for k, m, o, s, lab, _ in got] == list(
            zip(mine["key"], mine["path"], mine["offset"], mine["size"], mine["label"], strict=True))
    from .hf_parquet import index_file

    got = index_file(path, False)
    if got["class_names"] != stored.class_names:
        # (None: its names came from another file or classes.txt, which only a full index can tell)
        return False
    stem = os.path.splitext(os.path.basename(path))[0]
    n = len(got["labels"])
    return ([f"{stem}/{r}" for r in range(n)] == mine["key"] and got["labels"].tolist() == mine["label"]
            and list(got["paths"]) == mine["path"] and list(range(n)) == mine["offset"])
