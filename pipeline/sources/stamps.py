"""Stamps of a source's files (name, size, mtime_ns) as indexing records them in a manifest, and their
check on reading one back: a leaf module (``sources`` records them, ``check`` compares them).

Objects on a bucket are stamped (name, size, ETag), all from one listing of their prefix
(``bucket_files.object_stamps``): the ETag changes with every write of other bytes, so there is no
"racy" case. A web server's files (no listing) are stamped from the HEAD that names each: its ETag, or,
from a server that sends none, its Last-Modified (``bucket_files.LAST_MODIFIED`` and epoch seconds). That one has the
racy case of an mtime, a whole second coarse: ``racy_object``."""

from __future__ import annotations

import os
import stat
import time

CLASSES_FILE = "classes.txt"
RACY_NS = 3 * 10**9  # the coarsest mtime tick we allow for (FAT: 2 s), and a margin


def stamps_of(root: str, files: list[str]) -> dict | None:
    """The stamps of a source's files (paths, all in ``root``) and of ``root``/classes.txt, for the manifest:
    {"files": [[name, size, mtime_ns], ...], "classes": [size, mtime_ns] or None}. Taken before the files
    are read: a file changed while it is indexed then has another stamp at the next start."""
    if "://" in root:  # a bucket: sizes and ETags from one listing (a web server: none)
        from .bucket_files import object_stamps

        return object_stamps(root, files)
    at = time.time_ns()
    out = []
    for f in files:
        st = os.stat(f)
        out.append([os.path.basename(f), st.st_size, st.st_mtime_ns])
    return {"files": out, "classes": classes_stamp(root), "at": at}


def is_bucket_stamps(stamps: dict) -> bool:
    """Whether stamps are a bucket's (an ETag, a string, where a file has its mtime_ns)."""
    return bool(stamps["files"]) and isinstance(stamps["files"][0][2], str)


def racy(mtime_ns: int, stamps: dict) -> bool:
    """Whether a file's mtime lies so close to when it was stamped that it could change again within the
    same mtime tick (coarse file systems: 1-2 s) and keep its stamp: such a file proves nothing by its
    stamp (git's "racy clean"). A source written just before its store was made is re-indexed per file."""
    return mtime_ns >= stamps.get("at", 0) - RACY_NS


def racy_object(stamp: str, stamps: dict) -> bool:
    """Whether an object's stamp is a Last-Modified (HTTP dates: whole seconds) too close to when it was
    stamped to prove anything (``racy``): a rewrite within that second keeps it. The server's clock
    against this host's: a clock skewed by more than RACY_NS can make this miss."""
    from .bucket_files import LAST_MODIFIED  # (the one direction between the two: stamps_of's URL branch too)

    if not stamp.startswith(LAST_MODIFIED):
        return False  # an ETag: another one with every write of other bytes
    try:
        seconds = int(stamp[len(LAST_MODIFIED):])
    except ValueError:
        return True
    return racy(seconds * 10**9 + 10**9 - 1, stamps)  # (any instant of that second)


def stamps_problem(stamps) -> str | None:
    """What is wrong with a manifest's ``stamps`` metadata field, in words; None when nothing is."""
    ok = (isinstance(stamps, dict) and set(stamps) == {"files", "classes", "at"} and isinstance(stamps["at"], int)
          and isinstance(stamps["files"], list)
          and all(isinstance(s, list) and len(s) == 3 and isinstance(s[0], str) and isinstance(s[1], int)
                  and isinstance(s[2], int | str) for s in stamps["files"])
          and len({type(s[2]) for s in stamps["files"]}) <= 1  # all mtimes (a disk) or all ETags (a bucket)
          and (stamps["classes"] is None or (isinstance(stamps["classes"], list) and len(stamps["classes"]) == 2
                                             and isinstance(stamps["classes"][0], int)
                                             and isinstance(stamps["classes"][1], int | str))))
    return None if ok else "its metadata field 'stamps' is invalid"


def classes_stamp(root: str) -> list[int] | None:
    try:
        st = os.stat(os.path.join(root, CLASSES_FILE))
    except (FileNotFoundError, NotADirectoryError):
        return None
    return [st.st_size, st.st_mtime_ns] if stat.S_ISREG(st.st_mode) else None
