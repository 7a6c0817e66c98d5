"""Source files in a bucket (``--data s3://...`` or ``gs://...``): which objects a URL names, a tar's bytes by
range requests, and the loader's coalesced reads. The client and its configuration are the label
stores' (``storage.bucket``): one endpoint, one set of keys, one BucketError line for what a user must fix.

- ``expand_url``: a brace pattern (each name checked against one listing of its prefix, no listing
  needed to build the names), a glob in the last part (one listing and fnmatch) or a "directory" (a
  prefix: its objects of the first format with any). Nothing is fetched but listings.
- ``RangeFile``: a read-only file over one object, each read a range request of at least ``block``
  bytes; tarfile reads a tar's headers through it, skipping members' data by offset, so indexing
  without checksums reads headers (and the blocks around them), not whole objects.
- ``BucketTars``: the tar ``FileReader`` on a bucket. ``read_many`` groups a batch's samples by tar and
  merges neighbours (gap <= ``GAP``, span <= ``SPAN``) into one range request, ``READ_AHEAD`` requests
  in flight at once; ``requests`` and ``bytes_read`` count what it asked for (the tests and the
  benchmark compare them with the samples and bytes used). The loader adds a rank-level read-ahead
  (``bucket_cache``): its workers then take samples from a node-local cache the main process fills by
  the epoch's plan, and read directly only what is not there in time; the counters then count both.
- ``RangeReads``: that coalesced, counted read of (file, offset, size)s, shared by ``BucketTars`` and the
  parquet reader on a bucket (``hf_parquet.BucketParquet``: the images' offsets come from its page map).
- ``object_stamps``: each object's (size, ETag) from one listing of its prefix (the one ``expand_url``
  just made, when it made it), the bucket's stamps for ``check.unchanged_source``.

A web server (``http://``, ``https://``: ``storage.bucket.source_path``) is read the same way, by range
requests, but cannot list: a brace pattern names its files, each checked by one HEAD. Those HEADs' answers
are its stamps (size and ETag, or Last-Modified where the server sends no ETag: ``web_stamp``), plus one
HEAD of classes.txt; a server that sends neither gives no stamps (a store made from it then re-indexes the
source at each start, names only). Over https the server's certificate is checked against the system's
roots, or the CA file that ``SSL_CERT_FILE`` names (``storage.bucket``).
"""

from __future__ import annotations

import fnmatch
import posixpath
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from storage.bucket import BucketError, is_source_url, is_url, is_web_url
from storage.bucket import source_path as as_path
from storage.errors import printable

from ..source_errors import SourceError
from .base import FileReader
from .paths import expand_braces

LAST_MODIFIED = "last-modified:"  # a web object's stamp from its Last-Modified (no ETag): this and epoch seconds
GAP = 64 * 1024            # neighbours at most this far apart are read in one request (the gap is read too)
SPAN = 8 * 1024 * 1024     # ... as long as the request stays under this many bytes
READ_AHEAD = 4             # range requests of one batch in flight at once
HEADER_BLOCK = 64 * 1024   # a header read fetches this much: the next headers of small members come with it


def _source_error(e: Exception, url: str) -> Exception:
    """obstore's error as the source code expects it: FileNotFoundError for a missing object, the store
    seam's one line (as a SourceError: no OSError handler may swallow it) for what a user must fix."""
    from storage.bucket import _explain

    e = _explain(url, e) if not isinstance(e, BucketError | FileNotFoundError) else e
    if isinstance(e, BucketError):
        return SourceError(str(e))
    return e


class Counts:
    """Requests and bytes asked of a store (thread-safe: a batch's reads run in a pool)."""

    def __init__(self):
        self.requests = self.bytes_read = 0
        self._lock = threading.Lock()

    def add(self, requests: int, nbytes: int) -> None:
        with self._lock:
            self.requests += requests
            self.bytes_read += nbytes

    def __getstate__(self):
        return {"requests": self.requests, "bytes_read": self.bytes_read}

    def __setstate__(self, state):
        self.__init__()
        self.requests, self.bytes_read = state["requests"], state["bytes_read"]


# Every request of this process for source bytes (HEADs, range GETs, listings): what the tests and the
# benchmark count where a reader is made deep inside indexing.
COUNTS = Counts()
RECENT_LISTING_S = 60.0  # a listing expand_url made is the stamps' listing if taken within this long


_recent: dict[str, tuple[float, dict]] = {}  # prefix URL -> (when, listing): expand_url's, for object_stamps
_heads: dict[str, tuple[float, dict]] = {}  # web object URL -> (when, its HEAD): _expand_web's, for object_stamps


def _listing(prefix_url: str) -> dict[str, dict]:
    """{name: {"size", "e_tag"}} of the objects directly under a prefix URL (one listing)."""
    import obstore

    p = as_path(prefix_url.rstrip("/") or prefix_url)
    if is_web_url(p):
        raise SourceError(f"--data {printable(prefix_url)}: a web server cannot list its files; name them with a brace "
                          "pattern (https://host/path/shard-{000000..000009}.tar)")
    try:
        found = obstore.list_with_delimiter(p.store, p.key + "/" if p.key else None)
    except Exception as e:  # noqa: BLE001 (mapped to one line)
        raise _source_error(e, str(p)) from None
    COUNTS.add(1, 0)
    out = {posixpath.basename(o["path"]): {"size": int(o["size"]), "e_tag": o.get("e_tag") or ""}
           for o in found["objects"]}
    _recent[prefix_url.rstrip("/")] = (time.monotonic(), out)
    return out


def object_stamps(root: str, files: list[str]) -> dict | None:
    """The stamps of a bucket source's objects (all under ``root``) and of ``root``/classes.txt: each one's
    size and ETag, from one listing of ``root`` (the one expand_url just made, if it did: no HEAD per
    object). {"files": [[name, size, etag], ...], "classes": [size, etag] or None, "at": ns}. None where an
    object has no ETag (nothing then proves it unchanged). On a web server: ``_web_stamps``."""
    if is_web_url(root):
        return _web_stamps(root, files)
    at = time.time_ns()
    when, listing = _recent.pop(root.rstrip("/"), (0.0, None))
    if listing is None or time.monotonic() - when > RECENT_LISTING_S:
        listing = _listing(root)
        _recent.pop(root.rstrip("/"), None)
    out = []
    for f in files:
        meta = listing.get(posixpath.basename(f))
        if meta is None or not meta["e_tag"]:
            return None  # (gone since it was named: indexing says so, in its words)
        out.append([posixpath.basename(f), meta["size"], meta["e_tag"]])
    classes = listing.get("classes.txt")
    return {"files": out, "classes": [classes["size"], classes["e_tag"]] if classes else None, "at": at}


def web_stamp(meta: dict) -> str | None:
    """A web object's version from its HEAD: the ETag, else its Last-Modified ("last-modified:" and epoch
    seconds; ``stamps.racy_object`` distrusts one too close to its stamping), None with neither (obstore
    gives epoch 0 for a missing Last-Modified)."""
    if meta.get("e_tag"):
        return str(meta["e_tag"])
    seconds = int(meta["last_modified"].timestamp()) if meta.get("last_modified") else 0
    return f"{LAST_MODIFIED}{seconds}" if seconds > 0 else None


def _web_stamps(root: str, files: list[str]) -> dict | None:
    """``object_stamps`` on a web server: each file's size and ``web_stamp`` from the HEAD ``_expand_web``
    just made (a file without one is HEADed now), classes.txt's by one HEAD. None where one has no stamp."""
    at = time.time_ns()
    now = time.monotonic()
    metas = []
    for f in files:
        when, meta = _heads.pop(f, (0.0, None))
        metas.append(meta if meta is not None and now - when <= RECENT_LISTING_S else None)
    missing = [i for i, m in enumerate(metas) if m is None]
    if missing:
        with ThreadPoolExecutor(min(16, len(missing))) as pool:
            for i, meta in zip(missing, pool.map(_head, [files[i] for i in missing]), strict=True):
                metas[i] = meta
    out = []
    for f, meta in zip(files, metas, strict=True):
        stamp = web_stamp(meta)
        if stamp is None:
            return None
        out.append([posixpath.basename(f), int(meta["size"]), stamp])
    classes = _head(f"{root.rstrip('/')}/classes.txt", missing_ok=True)
    if classes is not None and web_stamp(classes) is None:
        return None
    return {"files": out, "classes": [int(classes["size"]), web_stamp(classes)] if classes else None, "at": at}


def _parent(url: str) -> str:
    return url.rsplit("/", 1)[0]


def expand_url(src: str, exts: list[str]) -> list[str]:
    """The object URLs ``--data src`` names (module doc); a missing one is a one-line SourceError."""
    as_path(src)  # no bucket name: one line
    name = src.rsplit("/", 1)[1] if src.count("/") > 2 else ""
    if is_web_url(src):
        return _expand_web(src, name, exts)
    if any(c in src for c in "{}"):
        urls = expand_braces(src)
        listings: dict[str, dict] = {}
        for u in urls:
            if _parent(u) not in listings:  # one listing per prefix (setdefault would list for every name)
                listings[_parent(u)] = _listing(_parent(u))
            if posixpath.basename(u) not in listings[_parent(u)]:
                raise SourceError(f"{printable(u)}: no such object; check the pattern given to --data")
        return urls
    if any(c in name for c in "*?["):
        if any(c in _parent(src).split("://", 1)[1] for c in "*?["):
            raise SourceError(f"--data {printable(src)}: a glob on a bucket may match names in one prefix only "
                              "(s3://bucket/prefix/*.tar); use a brace pattern for several prefixes")
        names = _listing(_parent(src))
        return [f"{_parent(src)}/{n}" for n in sorted(names) if fnmatch.fnmatchcase(n, name)]
    if name and any(name.endswith(e) for e in exts):
        names = _listing(_parent(src))
        if name not in names:
            raise SourceError(f"{printable(src)}: no such object; check the URL given to --data")
        return [src]
    names = _listing(src)  # a prefix: its files of the first format with any
    for ext in exts:
        found = sorted(n for n in names if n.endswith(ext))
        if found:
            return [f"{src.rstrip('/')}/{n}" for n in found]
    return []


def _expand_web(src: str, name: str, exts: list[str]) -> list[str]:
    """A web server's files: a brace pattern or one file, each checked by one HEAD (HTTP cannot list)."""
    if any(c in name for c in "*?[") or "{" not in src and not any(name.endswith(e) for e in exts):
        raise SourceError(f"--data {printable(src)}: a web server cannot list its files, so an http(s) source is a "
                          "brace pattern naming each one (https://host/path/shard-{000000..000009}.tar), not a "
                          "glob or a folder")
    urls = expand_braces(src) if "{" in src or "}" in src else [src]
    with ThreadPoolExecutor(min(16, len(urls))) as pool:  # (a thousand shards: not a thousand round trips)
        metas = list(pool.map(_head, urls))
    now = time.monotonic()
    for u in [u for u, (when, _) in _heads.items() if now - when > RECENT_LISTING_S]:
        del _heads[u]  # (taken for no stamps: kept no longer than object_stamps would use them)
    _heads.update((u, (now, meta)) for u, meta in zip(urls, metas, strict=True))
    return urls


def _head(url: str, missing_ok: bool = False) -> dict | None:
    """One HEAD: {size, e_tag, last_modified, ...}; a missing object is a one-line SourceError (None with
    ``missing_ok``)."""
    import obstore

    p = as_path(url)
    COUNTS.add(1, 0)
    try:
        return obstore.head(p.store, p.key)
    except Exception as e:  # noqa: BLE001
        err = _source_error(e, url)
        if isinstance(err, FileNotFoundError) and missing_ok:
            return None
        if isinstance(err, FileNotFoundError):
            raise SourceError(f"{printable(url)}: no such object; check the pattern given to --data") from None
        raise err from None


class RangeFile:
    """A read-only, seekable file over one object: each read past what it holds is one range request of
    at least ``block`` bytes (module doc). ``requests``/``bytes_read`` count them."""

    closed = False  # (pyarrow asks)

    def __init__(self, url: str, block: int = HEADER_BLOCK, counts: Counts | None = None):
        import obstore

        self.url, self.block, self.counts = url, block, counts
        p = as_path(url)
        self._store, self._key = p.store, p.key
        try:
            self.size = int(obstore.head(self._store, self._key)["size"])
        except Exception as e:  # noqa: BLE001
            raise _source_error(e, url) from None
        COUNTS.add(1, 0)
        if counts is not None:
            counts.add(1, 0)
        self.pos, self._start, self._buf = 0, 0, b""
        self.requests, self.bytes_read = 1, 0  # the HEAD

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = offset if whence == 0 else self.pos + offset if whence == 1 else self.size + offset
        return self.pos

    def read(self, n: int = -1) -> bytes:
        end = self.size if n is None or n < 0 else min(self.size, self.pos + n)
        if end <= self.pos:
            return b""
        if not (self._start <= self.pos and end <= self._start + len(self._buf)):
            stop = min(self.size, max(end, self.pos + self.block))
            self._start, self._buf = self.pos, fetch_range(self._store, self._key, self.pos, stop, self.url)
            self.requests += 1
            self.bytes_read += len(self._buf)
            if self.counts is not None:
                self.counts.add(1, len(self._buf))
        out = self._buf[self.pos - self._start:end - self._start]
        self.pos += len(out)
        return out

    def close(self) -> None:
        self._buf = b""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def fetch_range(store, key: str, start: int, end: int, url: str) -> bytes:
    """Bytes [start, end) of one object in one range request."""
    import obstore

    try:
        data = bytes(obstore.get_range(store, key, start=start, end=end))
    except Exception as e:  # noqa: BLE001
        raise _source_error(e, url) from None
    COUNTS.add(1, len(data))
    return data


def coalesce(requests: list[tuple[int, int]], gap: int = GAP, span: int = SPAN) -> list[tuple[int, int, list[int]]]:
    """(offset, size) requests of one file -> (start, end, indices of the requests inside) ranges: sorted,
    neighbours at most ``gap`` apart merged while the range stays within ``span`` bytes."""
    order = sorted(range(len(requests)), key=lambda i: requests[i][0])
    out: list[tuple[int, int, list[int]]] = []
    for i in order:
        off, size = requests[i]
        if out and off - out[-1][1] <= gap and max(out[-1][1], off + size) - out[-1][0] <= span:
            start, end, members = out[-1]
            out[-1] = (start, max(end, off + size), members + [i])
        else:
            out.append((off, off + size, [i]))
    return out


def _shared_totals(*parts) -> tuple[int, int]:
    """(requests, bytes) counted in shared memory by a reader's read-ahead and copies (each may be None)."""
    totals = [p.totals() for p in parts if p is not None]
    return sum(t[0] for t in totals), sum(t[1] for t in totals)


class RangeReads:
    """(file, offset, size)s of one source's objects in few range requests: a batch's neighbours in one
    (``coalesce``), ``READ_AHEAD`` in flight; ``counts`` (requests, bytes_read) counts them."""

    def __init__(self, where, counts: Counts):
        self.where, self.counts = where, counts  # where(file) -> the object's URL

    def read(self, wanted: list[tuple[int, int, int]]) -> list[bytes]:
        """Each (file, offset, size)'s bytes; b"" for one whose object is gone or cut short."""
        by_file: dict[int, list[int]] = {}
        for i, (file, *_rest) in enumerate(wanted):
            by_file.setdefault(file, []).append(i)
        jobs = []
        for file, idx in by_file.items():
            for start, end, members in coalesce([(wanted[i][1], wanted[i][2]) for i in idx]):
                jobs.append((file, start, end, [idx[m] for m in members]))
        out = [b""] * len(wanted)

        def get(job):
            file, start, end, _ = job
            url = self.where(file)
            p = as_path(url)
            try:
                return fetch_range(p.store, p.key, start, end, url)
            except SourceError:  # no such bucket, no credentials, no endpoint: one line, the run stops
                raise
            except Exception:  # noqa: BLE001 - gone, or shorter now (a range past its end): undecodable
                return b""

        if len(jobs) <= 1:  # (none: every one of them came from a local copy)
            results = [get(job) for job in jobs]
        else:
            with ThreadPoolExecutor(min(READ_AHEAD, len(jobs))) as pool:
                results = list(pool.map(get, jobs))
        for (_file, start, _end, members), data in zip(jobs, results, strict=True):
            self.counts.add(1, len(data))
            for i in members:
                off, size = wanted[i][1] - start, wanted[i][2]
                piece = data[off:off + size]
                out[i] = piece if len(piece) == size else b""  # the object ends inside it: nothing of it
        return out


class BucketTars(FileReader):
    """Tar samples in a bucket by range requests; a batch's neighbours in one request (module doc).
    Picklable: a worker makes its own client on its first read. ``copies``: whole objects on node-local disk
    (``local_copies``), taken first; ``cache``: a ``bucket_cache.CacheView`` (the rank's read-ahead) to take
    samples from next; what neither has, or not in time, is read directly."""

    def __init__(self, root: str, files: list[str]):
        self.root, self.files = root.rstrip("/"), list(files)
        self.counts = Counts()
        self.cache = None
        self.copies = None  # a local_copies.LocalCopies: whole objects kept on node-local disk (--source-cache)
        self._base = (0, 0)  # the shared totals when the counters were last set

    def _shared(self) -> tuple[int, int]:
        return _shared_totals(self.cache, self.copies)

    @property
    def requests(self) -> int:
        """Range requests made: this reader's, plus (with a cache) the read-ahead's and every consumer's."""
        return self.counts.requests + self._shared()[0] - self._base[0]

    @requests.setter
    def requests(self, value: int) -> None:
        self.counts.requests, self._base = value, (self._shared()[0], self._base[1])

    @property
    def bytes_read(self) -> int:
        return self.counts.bytes_read + self._shared()[1] - self._base[1]

    @bytes_read.setter
    def bytes_read(self, value: int) -> None:
        self.counts.bytes_read, self._base = value, (self._base[0], self._shared()[1])

    def where(self, file: int, path: str) -> str:
        return f"{self.root}/{self.files[file]}"

    def read(self, file: int, offset: int, size: int, path: str) -> bytes:
        return self.read_many([(file, offset, size, path)])[0]

    def read_many(self, wanted: list[tuple[int, int, int, str]]) -> list[bytes]:
        """Each (file, offset, size, path)'s bytes; b"" for a sample whose object is gone or cut short."""
        out: list[bytes | None] = self.copies.read(wanted) if self.copies is not None else [None] * len(wanted)
        todo = [i for i, data in enumerate(out) if data is None]
        if todo and self.cache is not None:
            for i, data in zip(todo, self.cache.take([wanted[i] for i in todo]), strict=True):
                out[i] = data
            todo = [i for i in todo if out[i] is None]
        if todo:
            counts = Counts() if self.cache is not None else self.counts  # (a worker's: in the cache's totals)
            got = self._direct([wanted[i] for i in todo], counts)
            if self.cache is not None:
                self.cache.count(counts.requests, counts.bytes_read)
            for i, data in zip(todo, got, strict=True):
                out[i] = data
        return out

    def _direct(self, wanted: list[tuple[int, int, int, str]], counts: Counts) -> list[bytes]:
        """The samples by coalesced range requests (``RangeReads``), counted in ``counts``."""
        return RangeReads(lambda f: self.where(f, ""), counts).read([w[:3] for w in wanted])


__all__ = ["COUNTS", "BucketTars", "Counts", "RangeFile", "RangeReads", "coalesce", "expand_url", "is_source_url",
           "is_url", "object_stamps"]
