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
"""

from __future__ import annotations

import fnmatch
import posixpath
from concurrent.futures import ThreadPoolExecutor

from storage.bucket import BucketError, as_path, is_url
from storage.errors import printable

from ..source_errors import SourceError
from .base import FileReader
from .paths import expand_braces

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


def _listing(prefix_url: str) -> dict[str, int]:
    """{name: size} of the objects directly under a prefix URL (one listing)."""
    import obstore

    p = as_path(prefix_url.rstrip("/") or prefix_url)
    try:
        found = obstore.list_with_delimiter(p.store, p.key + "/" if p.key else None)
    except Exception as e:  # noqa: BLE001 (mapped to one line)
        raise _source_error(e, str(p)) from None
    return {posixpath.basename(o["path"]): int(o["size"]) for o in found["objects"]}


def _parent(url: str) -> str:
    return url.rsplit("/", 1)[0]


def expand_url(src: str, exts: list[str]) -> list[str]:
    """The object URLs ``--data src`` names (module doc); a missing one is a one-line SourceError."""
    as_path(src)  # no bucket name: one line
    name = src.rsplit("/", 1)[1] if src.count("/") > 2 else ""
    if any(c in src for c in "{}"):
        urls = expand_braces(src)
        listings: dict[str, dict[str, int]] = {}
        for u in urls:
            names = listings.setdefault(_parent(u), _listing(_parent(u)))
            if posixpath.basename(u) not in names:
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


class RangeFile:
    """A read-only, seekable file over one object: each read past what it holds is one range request of
    at least ``block`` bytes (module doc). ``requests``/``bytes_read`` count them."""

    def __init__(self, url: str, block: int = HEADER_BLOCK):
        import obstore

        self.url, self.block = url, block
        p = as_path(url)
        self._store, self._key = p.store, p.key
        try:
            self.size = int(obstore.head(self._store, self._key)["size"])
        except Exception as e:  # noqa: BLE001
            raise _source_error(e, url) from None
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
        return bytes(obstore.get_range(store, key, start=start, end=end))
    except Exception as e:  # noqa: BLE001
        raise _source_error(e, url) from None


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


class BucketTars(FileReader):
    """Tar samples in a bucket by range requests; a batch's neighbours in one request (module doc).
    Picklable: a worker makes its own client on its first read. ``cache``: a ``bucket_cache.CacheView``
    (the rank's read-ahead) to take samples from first; what it has not, or not in time, is read directly."""

    def __init__(self, root: str, files: list[str]):
        self.root, self.files = root.rstrip("/"), list(files)
        self.cache = None
        self._requests = self._bytes_read = 0
        self._base = (0, 0)  # the cache's totals when the counters were last set

    def _shared(self) -> tuple[int, int]:
        return self.cache.totals() if self.cache is not None else (0, 0)

    @property
    def requests(self) -> int:
        """Range requests made: this reader's, plus (with a cache) the read-ahead's and every consumer's."""
        return self._requests + self._shared()[0] - self._base[0]

    @requests.setter
    def requests(self, value: int) -> None:
        self._requests, self._base = value, (self._shared()[0], self._base[1])

    @property
    def bytes_read(self) -> int:
        return self._bytes_read + self._shared()[1] - self._base[1]

    @bytes_read.setter
    def bytes_read(self, value: int) -> None:
        self._bytes_read, self._base = value, (self._base[0], self._shared()[1])

    def where(self, file: int, path: str) -> str:
        return f"{self.root}/{self.files[file]}"

    def read(self, file: int, offset: int, size: int, path: str) -> bytes:
        return self.read_many([(file, offset, size, path)])[0]

    def read_many(self, wanted: list[tuple[int, int, int, str]]) -> list[bytes]:
        """Each (file, offset, size, path)'s bytes; b"" for a sample whose object is gone or cut short."""
        if self.cache is None:
            out, requests, nbytes = self._direct(wanted)
            self._requests += requests
            self._bytes_read += nbytes
            return out
        out = self.cache.take(wanted)
        missing = [i for i, data in enumerate(out) if data is None]
        if missing:
            got, requests, nbytes = self._direct([wanted[i] for i in missing])
            self.cache.count(requests, nbytes)
            for i, data in zip(missing, got, strict=True):
                out[i] = data
        return out

    def _direct(self, wanted: list[tuple[int, int, int, str]]) -> tuple[list[bytes], int, int]:
        """The samples by coalesced range requests (GAP/SPAN), READ_AHEAD in flight; (bytes, requests, bytes read)."""
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
            url = self.where(file, "")
            p = as_path(url)
            try:
                return fetch_range(p.store, p.key, start, end, url)
            except SourceError:  # no such bucket, no credentials, no endpoint: one line, the run stops
                raise
            except Exception:  # noqa: BLE001 - gone, or shorter now (a range past its end): undecodable
                return b""

        if len(jobs) == 1:
            results = [get(jobs[0])]
        else:
            with ThreadPoolExecutor(min(READ_AHEAD, len(jobs))) as pool:
                results = list(pool.map(get, jobs))
        nbytes = 0
        for (_file, start, _end, members), data in zip(jobs, results, strict=True):
            nbytes += len(data)
            for i in members:
                off, size = wanted[i][1] - start, wanted[i][2]
                piece = data[off:off + size]
                out[i] = piece if len(piece) == size else b""  # the tar ends inside it: nothing of it
        return out, len(jobs), nbytes


__all__ = ["BucketTars", "RangeFile", "coalesce", "expand_url", "is_url"]
