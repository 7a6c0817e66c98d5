"""A tar's regular members (name, data offset, size) read from its 512-byte headers directly.

``tarfile`` builds a ``TarInfo`` per member and decodes every header field: 78 us a sample at
ImageNet scale, two minutes per rank per start. This reads each header once, decodes only the name,
type and size, skips the data by offset, and checks the header checksums and the number fields
``tarfile`` would reject in numpy, many headers at a time. Two readers: ``_plain_tar``, a walk that
follows only the sizes, for the usual tar (regular files, directories, links, pax headers that set
neither path nor size, as webdataset writes one per member, a clean end); ``_scan`` for every other
case it knows (GNU longnames 'L', longlinks 'K', pax ``path`` and ``size``, a tar cut short or
damaged after its first member).

Both give exactly what ``tarfile`` (Python 3.11, ``mode="r:"``, iterating until it stops or raises)
gives for ``isfile()`` members. Where matching ``tarfile`` would need its own slow paths they give up
(None), so the caller asks ``tarfile`` itself: a number field not in the plain octal or base-256 form
writers use, sparse members, pax global headers ('g') and ``hdrcharset``, and any header problem in
the first member (``tarfile`` raises there, with its own message).

A file that ends early (a cut copy) ends the listing as ``tarfile`` ends it: the member whose data is
cut is listed, nothing after it. A leaf module: it imports nothing from the project.
"""

from __future__ import annotations

import bisect
import codecs
import os
import re
import tarfile
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ..source_errors import SourceError

BLOCK = 512
_ZERO = bytes(BLOCK)
_CHUNK = 1 << 16        # read ahead this much when members are small (most tars of images are)
_SMALL = 1 << 14        # a member under this: the next header is probably in the same chunk
_BIG = 1 << 20          # read ahead this much in a tar of small members (_plain_tar)
_BATCH = 4096           # headers checked at a time (_plain_tar): 2 MiB
_AROUND = 8 * BLOCK     # else this much at a header: an image's label and the next image's pax headers
_ENCODING = tarfile.ENCODING  # what tarfile decodes names with (errors "surrogateescape")
_UTF8 = codecs.lookup(_ENCODING).name == "utf-8"  # (then a name's UTF-8 bytes are its str, Arrow's too)
_REGULAR = (b"0", b"\0", b"7")  # tarfile.REGULAR_TYPES less sparse ("S": given up on)
_SUPPORTED = (b"0", b"\0", b"1", b"2", b"5", b"6", b"7", b"3", b"4")  # tarfile.SUPPORTED_TYPES less GNU's
_NO_DATA = tuple(b"123456")  # links, devices, directories, FIFOs: no data follows (as ints)
_EXTENDED = (b"L", b"K", b"x", b"X")  # headers that extend the next one (tarfile: GNU longname/link, pax)
_PAX_RECORD = re.compile(rb"(\d+) ([^=]+)=")
_MAX_EXTENDED = 1 << 20  # a longname or pax header larger than this is checked before it is read
_MAX_CHAIN = 16         # extended headers before one member: more is no tar a writer makes
# The number fields tarfile parses (nti) in every header: mode, uid, gid, size, mtime, chksum, devmajor, devminor.
_NUMBER_FIELDS = ((100, 8), (108, 8), (116, 8), (124, 12), (136, 12), (148, 8), (329, 8), (337, 8))

# Where the bytes come from: a seam, so a test can count what indexing reads.
read_at = os.pread


@dataclass(frozen=True)
class TarMembers:
    """A tar's regular members in file order: ``names``, data ``offsets`` and ``sizes``, and
    ``file_size``, the file's length when it was read (a member's data may run past it: a cut tar).
    ``names`` is an Arrow string array where every name is UTF-8 as written by ``_plain_tar`` (no Python
    object per member: ``tar_index`` works on it column-wise), else a list of str as tarfile decodes them."""
    names: list[str] | pa.Array
    offsets: np.ndarray
    sizes: np.ndarray
    file_size: int

    def name_list(self) -> list[str]:
        return self.names.to_pylist() if isinstance(self.names, pa.Array) else self.names


class _GiveUp(SourceError):
    """Only tarfile can say what this tar holds (see the module doc). Caught by ``scan``, never shown; a
    SourceError so that, if it ever escaped, it would be one line."""


def _block(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def _number(field: bytes) -> int:
    """tarfile.nti for the plain forms (octal digits, NUL or space padding, or base-256)."""
    if field[0] in (0o200, 0o377):
        return tarfile.nti(field)
    p = field.find(b"\0")
    try:
        return int((field[:p] if p >= 0 else field).strip() or b"0", 8)
    except ValueError:
        raise _GiveUp from None


def _name(field: bytes) -> str:
    p = field.find(b"\0")
    return (field[:p] if p >= 0 else field).decode(_ENCODING, "surrogateescape")


class Blocks:
    """Blocks of one file by offset, through a read-ahead chunk: one read per many small members, and
    one block-sized read per header where members are large (their data is never read)."""

    def __init__(self, fd: int, size: int):
        self.fd, self.size = fd, size
        self.start, self.buf = 0, b""

    def read(self, pos: int, n: int) -> bytes:
        end = pos + n
        have = self.start + len(self.buf)
        if pos < self.start or end > have:
            near = self.start <= pos < have + _SMALL  # the last chunk ended close by: small members, read ahead
            self.buf = read_at(self.fd, max(n, _CHUNK if near or not self.buf else _AROUND), pos)
            self.start = pos
        return self.buf[pos - self.start:end - self.start]


def scan(path: str) -> TarMembers | None:
    """The regular members of the tar at ``path`` (see the module doc); None: ask tarfile."""
    fd = os.open(path, os.O_RDONLY)
    try:
        file_size = os.fstat(fd).st_size
        try:
            return _plain_tar(fd, file_size) or _scan(Blocks(fd, file_size), file_size)
        except _GiveUp:
            return None
    finally:
        os.close(fd)


def _plain_tar(fd: int, file_size: int) -> TarMembers | None:
    """The usual tar, fast: a walk that only follows the sizes, the names decoded and the headers checked
    behind it, a batch at a time in numpy. Usual: regular files ('0'), directories, links and devices, pax headers that
    set neither path nor size (webdataset's: an mtime), plain number fields, a clean end. Anything else
    (None) is left to ``_scan``, which reads every case as tarfile does.

    In a chunk read far ahead (small members), every block's type and size are parsed at once and the walk
    follows them (``_Chunk.follow``) until a header that needs this loop's own checks; this loop takes that
    header, and so on."""
    headers = _Headers()
    names: list[tuple[np.ndarray, np.ndarray]] = []  # per batch checked: the names' bytes and lengths
    offsets: list[int] = []
    sizes: list[int] = []
    chunk, start, parsed = b"", 0, None
    pos, chained = 0, False
    while True:
        at = pos - start
        if at < 0 or at > len(chunk) - BLOCK:
            near = start <= pos < start + len(chunk) + _SMALL  # small members: read far ahead
            ahead = near or not chunk
            chunk, start, at = read_at(fd, _BIG if ahead else _AROUND, pos), pos, 0
            parsed = _Chunk(chunk, file_size - start) if ahead and len(chunk) >= 4 * BLOCK else None
            if len(chunk) < BLOCK:
                if pos == file_size and pos and not chained:
                    break  # the file ends at a header boundary: tarfile ends there too
                return None
        if parsed is not None:
            b, chained, rows = parsed.follow(at // BLOCK, chained)
            if len(rows):
                headers.add_rows(parsed.blocks[rows], parsed.regular[rows])
                regular = rows[parsed.regular[rows]]
                offsets += (start + (regular + 1) * BLOCK).tolist()
                sizes += parsed.sizes[regular].tolist()
                pos, at = start + b * BLOCK, b * BLOCK
                if headers.count >= _BATCH and not chained and not _checked_and_named(headers, names):
                    return None
                if at > len(chunk) - BLOCK:
                    continue  # the next header is past this chunk
        typ = chunk[at + 156]
        if not typ and not chunk[at] and chunk[at:at + BLOCK] == _ZERO:
            if chained:
                return None
            break  # the end-of-archive block
        if chunk[at + 135]:
            return None
        try:
            size = int(chunk[at + 124:at + 135], 8)
        except ValueError:
            return None
        if headers.count >= _BATCH and not chained:  # checked and named a batch at a time: in cache, memory bounded
            if not _checked_and_named(headers, names):
                return None
        data = pos + BLOCK
        headers.add(chunk[at:at + BLOCK], typ == 48)
        if typ == 48:  # '0', a regular file
            offsets.append(data)
            sizes.append(size)
            pos, chained = data + ((size + BLOCK - 1) & -BLOCK), False
            if pos > file_size:
                return None  # cut short
        elif typ == 120:  # 'x', a pax header for the next one
            length = (size + BLOCK - 1) & -BLOCK
            if chained or not 0 <= size <= _MAX_EXTENDED:
                return None
            pax = chunk[at + BLOCK:at + BLOCK + length]
            if len(pax) < length:
                pax = read_at(fd, length, data)
            if not _pax_sets_nothing(pax, size):
                return None
            pos, chained = data + length, True
        elif typ in _NO_DATA:
            pos, chained = data, False
        else:
            return None
    if not _checked_and_named(headers, names):
        return None
    data = np.concatenate([b for b, _ in names]) if names else np.zeros(0, np.uint8)
    lengths = np.concatenate([n for _, n in names]) if names else np.zeros(0, np.int64)
    return TarMembers(_decoded(data, lengths), np.asarray(offsets, np.int64), np.asarray(sizes, np.int64), file_size)


_OCTAL_PLACES = 8 ** np.arange(10, -1, -1, dtype=np.int64)
_NO_DATA_CODES = np.frombuffer(bytes(_NO_DATA), np.uint8)


class _Chunk:
    """A chunk read far ahead, every block taken as if it were a header: its type and plain octal size
    parsed at once, so the walk over the headers in it follows a list of steps (``follow``). ``room``: the
    bytes from the chunk's start to the file's end."""

    def __init__(self, chunk: bytes, room: int):
        n = len(chunk) // BLOCK
        self.chunk = chunk
        self.blocks = np.frombuffer(chunk, np.uint8, n * BLOCK).reshape(n, BLOCK)
        digits = self.blocks[:, 124:135].astype(np.int64) - ord("0")
        plain = ((digits >= 0) & (digits <= 7)).all(1) & (self.blocks[:, 135] == 0)
        self.sizes = digits @ _OCTAL_PLACES
        typ = self.blocks[:, 156]
        self.regular = typ == 48
        pax = typ == 120
        step = np.where(self.regular | pax, 1 + (self.sizes + BLOCK - 1) // BLOCK,
                        np.isin(typ, _NO_DATA_CODES).astype(np.int64))
        step = np.where(plain, step, 0)  # 0: the loop looks at this header itself (the end, any other type...)
        cut = self.regular & ((np.arange(n) + step) * BLOCK > room)  # a file cut short: the loop says so
        self.steps = step.tolist()
        # a regular file (not cut short), a directory, link or device: taken without a look; a pax header
        # of one mtime record (webdataset's), negated: taken unless it follows another
        plain_pax = _mtime_only(self.blocks, np.flatnonzero(pax & (step == 2)), self.sizes)
        self.plain = np.where(pax | cut, 0, step)
        self.plain[plain_pax] = -2
        self.plain = self.plain.tolist()

    def follow(self, b: int, chained: bool) -> tuple[int, bool, np.ndarray]:
        """Walk from block ``b`` while each header is one the loop would take without a question: a regular
        file that ends before the file does, a directory, link or device, a pax header (not after another)
        that sets nothing, with its records in the chunk. -> (the block where the walk stopped, whether a pax
        header waits for its member, the headers walked)."""
        plain, walked, n = self.plain, [], len(self.plain)
        last_pax = chained
        while b < n:
            step = plain[b]
            if step > 0:
                walked.append(b)
                b += step
                last_pax = False
                continue
            if step < 0 and not last_pax:  # a pax header of one mtime record (its records: the next block)
                walked.append(b)
                b -= step
                last_pax = True
                continue
            step = self.steps[b]
            if not step or self.regular[b]:
                break
            size = int(self.sizes[b])  # a pax header
            if last_pax or size > _MAX_EXTENDED or b + step > n or \
                    not _pax_sets_nothing(self.chunk[(b + 1) * BLOCK:(b + step) * BLOCK], size):
                break  # (the loop says what is wrong, or reads the records past the chunk)
            walked.append(b)
            b += step
            last_pax = True
        return b, last_pax, np.asarray(walked, np.int64)


def _mtime_only(blocks: np.ndarray, at: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Of the pax headers at rows ``at`` (one block of records after each), those whose records are one
    ``mtime`` record spanning the whole size with NUL padding after: what ``_pax_sets_nothing``'s first test
    accepts (it then returns True), checked for all at once. The others it reads itself."""
    at = at[at + 1 < len(blocks)]
    size = sizes[at]
    rec = blocks[at + 1]
    col = np.arange(BLOCK)
    space_in = rec[:, :24] == ord(" ")
    space = np.where(space_in.any(1), space_in.argmax(1), 0)
    digit = (rec[:, :24] >= ord("0")) & (rec[:, :24] <= ord("9"))
    digits_before = np.where(col[:24] < space[:, None], digit, True).all(1)
    length = np.zeros(len(at), np.int64)
    for c in range(min(int(space.max(initial=0)), 18)):  # the record's length, the digits before the space
        length = np.where(c < space, length * 10 + (rec[:, c].astype(np.int64) - ord("0")), length)
    tag = np.frombuffer(b"mtime=", np.uint8)
    tagged = (rec[np.arange(len(at))[:, None], np.minimum(space[:, None] + 1 + np.arange(6), BLOCK - 1)] == tag).all(1)
    # NUL after the records: past the longest, eight bytes at a time; up to it, byte by byte
    longest = min(-(-int(size.max(initial=0)) // 8) * 8, BLOCK)
    padded = ~rec[:, longest:].view(np.uint64).any(1) & \
        np.where(col[:longest] < size[:, None], True, rec[:, :longest] == 0).all(1)
    ok = (space > 0) & (space <= 18) & digits_before & (length == size) & tagged & (space + 7 <= size) & \
        (size <= BLOCK) & padded
    return at[ok]


class _Headers:
    """The headers walked since the last batch was checked, in order: blocks the loop took one at a time and
    rows the chunk walk took at once; and which of them are regular members'."""

    def __init__(self):
        self.count = 0
        self._pieces: list[np.ndarray] = []
        self._regular: list[np.ndarray] = []
        self._blocks: list[bytes] = []
        self._block_regular: list[bool] = []

    def add(self, header: bytes, regular: bool) -> None:
        self._blocks.append(header)
        self._block_regular.append(regular)
        self.count += 1

    def add_rows(self, rows: np.ndarray, regular: np.ndarray) -> None:
        self._flush()
        self._pieces.append(rows)
        self._regular.append(regular)
        self.count += len(rows)

    def _flush(self) -> None:
        if self._blocks:
            self._pieces.append(np.frombuffer(b"".join(self._blocks), np.uint8).reshape(-1, BLOCK))
            self._regular.append(np.asarray(self._block_regular, bool))
            self._blocks, self._block_regular = [], []

    def take(self) -> tuple[np.ndarray, np.ndarray]:
        """(headers [n, 512], which are regular), and empty for the next batch."""
        self._flush()
        h = np.concatenate(self._pieces) if self._pieces else np.zeros((0, BLOCK), np.uint8)
        regular = np.concatenate(self._regular) if self._regular else np.zeros(0, bool)
        self._pieces, self._regular, self.count = [], [], 0
        return h, regular


def _checked_and_named(headers: _Headers, names: list) -> bool:
    """Check a batch of headers (False: one is bad, leave the tar to ``_scan``), append the names of its
    regular members to ``names`` (``_name_bytes``), and empty it for the next batch."""
    h, regular = headers.take()
    if not len(h):
        return True
    if _first_bad_row(h) is not None:
        return False
    if regular.any():
        names.append(_name_bytes(h[regular]))
    return True


def _name_bytes(h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Headers [n, 512] -> each one's name as tarfile reads a regular member's (``_name(prefix) + "/" +
    _name(name)`` where the ustar prefix is not empty, else ``_name(name)``), all at once: the names' bytes
    end to end, and each name's length. No Python object per member, and no work per byte of the fields
    but finding each one's end."""
    name = h[:, :100]
    if not h[:, 345].any():  # no prefix (the usual tar): each name's bytes up to its first NUL
        nul = name == 0
        nlen = np.where(nul.any(1), nul.argmax(1), 100)
        return name[np.arange(100) < nlen[:, None]], nlen.astype(np.int64)
    lengths = []
    for lo, width in ((345, 155), (0, 100)):  # the prefix, then the name
        nul = h[:, lo:lo + width] == 0
        lengths.append(np.where(nul.any(1), nul.argmax(1), width).astype(np.int64))
    plen, nlen = lengths
    slash = (plen > 0).astype(np.int64)
    total = plen + slash + nlen
    # each output byte's place in h (flattened): the prefix's bytes, then "/" (taken from a spare
    # column, set below), then the name's
    starts = np.cumsum(total) - total
    within = np.arange(int(total.sum()), dtype=np.int64) - np.repeat(starts, total)
    row = np.repeat(np.arange(len(h), dtype=np.int64) * BLOCK, total)
    p, s = np.repeat(plen, total), np.repeat(slash, total)
    column = np.where(within < p, 345 + within, np.where(within < p + s, 511, within - p - s))
    flat = h.reshape(-1).copy() if slash.any() else h.reshape(-1)
    if slash.any():
        flat[np.arange(len(h)) * BLOCK + 511] = ord("/")  # (the header's last byte: padding, not read)
    return flat[row + column], total


def _decoded(data: np.ndarray, lengths: np.ndarray) -> pa.Array | list[str]:
    """Names' bytes -> an Arrow string array where all are UTF-8 (tarfile's encoding here), else each
    decoded as tarfile decodes it (``surrogateescape``)."""
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    binary = pa.LargeBinaryArray.from_buffers(pa.large_binary(), len(lengths),
                                              [None, pa.py_buffer(offsets), pa.py_buffer(data.tobytes())])
    if _UTF8:
        try:
            return binary.cast(pa.string())  # (checks every name is valid UTF-8)
        except pa.ArrowInvalid:
            pass
    return [b.decode(_ENCODING, "surrogateescape") for b in binary.to_pylist()]


def _pax_sets_nothing(buf: bytes, size: int) -> bool:
    """Whether tarfile, reading this pax header (``size`` bytes of records, padded to blocks), would set
    neither path nor size and reject no record (of length 0); ``hdrcharset`` only changes how a path
    record is decoded, and a path record is not "nothing". Where the padding is all NUL, as writers leave
    it, tarfile's record walk ends in the first ``size`` bytes: walked there only."""
    if buf[size:] != _ZERO[:len(buf) - size]:
        return False
    text = buf[:size]
    space = text.find(b" ", 0, 24)
    if 0 < space and text[:space].isdigit() and int(text[:space]) == size and text.startswith(b"mtime=", space + 1):
        return True  # webdataset's: one record, an mtime, the whole header (the walk's next record: padding)
    pos = 0
    while match := _PAX_RECORD.match(text, pos):
        length, key = int(match.group(1)), match.group(2)
        if length == 0 or key == b"path" or key == b"size" or key.startswith(b"GNU.sparse."):
            return False
        pos += length
    return True


def _scan(r: Blocks, file_size: int) -> TarMembers:
    """One flat loop over the headers (the hot path: a webdataset tar has a pax header per member).

    A member is a chain of headers: 'L'/'K' longname/longlink and 'x' pax headers, then its own. tarfile
    reads a chain by recursion and patches the inner member on the way out, so the outermost 'L' or pax
    ``path`` names it and the outermost pax ``size`` sizes it: here, the first one seen wins."""
    names: list[str] = []
    offsets: list[int] = []
    sizes: list[int] = []
    headers: list[bytes] = []   # every header block read, checked at the end in one pass
    firsts: list[int] = [0]     # [k]: the index of the first header read after k members were listed
    first_chain = None          # how many headers the first member has (its chain included)
    read = r.read
    pos = start = depth = 0
    over_name = over_size = None
    chunk, chunk_start = b"", 0
    while True:
        at = pos - chunk_start  # the header from the chunk at hand, else through Blocks (a refill)
        if 0 <= at <= len(chunk) - BLOCK:
            buf = chunk[at:at + BLOCK]
        else:
            buf = read(pos, BLOCK)
            chunk, chunk_start = r.buf, r.start
        if len(buf) < BLOCK or (not buf[0] and buf == _ZERO):
            if len(buf) == BLOCK and not depth:
                break  # the end-of-archive block (also before any member: an empty tar)
            if start == 0:
                raise _GiveUp  # tarfile raises on the first member, in its own words
            break  # a cut or missing header: tarfile's listing ends here
        headers.append(buf)
        typ = buf[156:157]
        try:  # the usual field: 11 octal digits and a NUL (any other form: _number, checked at the end)
            size = int(buf[124:135], 8) if not buf[135] else _number(buf[124:136])
        except ValueError:
            size = _number(buf[124:136])
        data = pos + BLOCK
        if size < 0 or depth >= _MAX_CHAIN:
            raise _GiveUp  # a negative (base-256) size: tarfile would read or seek backwards
        if typ in _EXTENDED:
            if size > _MAX_EXTENDED and not _valid(buf):
                # (the end-of-scan check covers the usual small ones; this one's size is about to be trusted)
                if start == 0:
                    raise _GiveUp
                break
            if typ == b"L":
                if over_name is None:
                    over_name = _name(read(data, _block(size)))
                chunk, chunk_start = r.buf, r.start
            elif typ != b"K":
                pax = _pax_fields(read(data, _block(size)))
                chunk, chunk_start = r.buf, r.start
                if over_name is None and "path" in pax:
                    over_name = pax["path"].rstrip("/")
                if over_size is None and "size" in pax:
                    try:
                        over_size = int(pax["size"])
                    except ValueError:
                        over_size = 0
            pos = data + _block(size)
            depth += 1
            continue
        if typ == b"S" or typ == b"g":
            raise _GiveUp  # sparse files and global pax headers: tarfile's own paths
        if over_name is not None:
            name = over_name
            if typ == b"\0" and _name(buf[0:100]).endswith("/"):
                typ = b"5"  # an old V7 directory (by its own header's name)
        else:
            name = _name(buf[0:100])
            if typ == b"\0" and name.endswith("/"):
                typ = b"5"
            if typ == b"5":
                name = name.rstrip("/")
            if buf[345]:
                name = _name(buf[345:500]) + "/" + name
        nxt = data + ((size + BLOCK - 1) & -BLOCK if typ in _REGULAR or typ not in _SUPPORTED else 0)
        if over_size is not None:
            if over_size < 0:
                raise _GiveUp
            size = over_size
            nxt = data + (_block(size) if typ in _REGULAR or typ not in _SUPPORTED else 0)
        if typ in _REGULAR:
            names.append(name)
            offsets.append(data)
            sizes.append(size)
            firsts.append(len(headers))
        if first_chain is None:
            first_chain = len(headers)
        if nxt > data and nxt > file_size:
            break  # tarfile.next: the byte before the next header is missing (a cut tar)
        pos = start = nxt
        depth, over_name, over_size = 0, None, None
    bad = _first_bad_header(headers)
    if bad is not None:
        # tarfile stops at a header it rejects (raising on the first member); what follows was never read.
        keep = bisect.bisect_right(firsts, bad) - 1  # the members listed before the bad header's
        if first_chain is None or bad < first_chain:
            raise _GiveUp  # a header of the first member
        names, offsets, sizes = names[:keep], offsets[:keep], sizes[:keep]
    return TarMembers(names, np.asarray(offsets, np.int64), np.asarray(sizes, np.int64), file_size)


def _valid(buf: bytes) -> bool:
    """tarfile's own check of one header: its checksum and number fields."""
    try:
        if tarfile.nti(buf[148:156]) not in tarfile.calc_chksums(buf):
            return False
        for start, width in _NUMBER_FIELDS:
            tarfile.nti(buf[start:start + width])
    except tarfile.HeaderError:
        return False
    return True


def _pax_fields(buf: bytes) -> dict[str, str]:
    """An 'x' header's ``path`` and ``size`` records, parsed and decoded as tarfile does (a later record
    wins); gives up on sparse files and on ``hdrcharset`` (tarfile's other paths). Keywords are compared
    as bytes: no other bytes decode to these ASCII words."""
    if b"hdrcharset=" in buf and re.search(rb"\d+ hdrcharset=([^\n]+)\n", buf) is not None:
        raise _GiveUp
    fields, pos = {}, 0
    if b"path=" not in buf and b"size=" not in buf and b"GNU.sparse." not in buf:
        while match := _PAX_RECORD.match(buf, pos):  # only tarfile's zero-length check to do
            length = int(match.group(1))
            if length == 0:
                raise _GiveUp
            pos += length
        return fields
    while match := _PAX_RECORD.match(buf, pos):
        length, keyword = int(match.group(1)), match.group(2)
        if length == 0:
            raise _GiveUp  # tarfile: invalid header
        if keyword == b"path" or keyword == b"size":
            value = buf[match.end(2) + 1:match.start(1) + length - 1]
            fields[keyword.decode()] = _pax_text(value, _ENCODING if keyword == b"path" else "utf-8")
        elif keyword.startswith(b"GNU.sparse."):
            raise _GiveUp
        pos += length
    return fields


def _pax_text(value: bytes, fallback: str) -> str:
    """tarfile's _decode_pax_field: strict UTF-8, else ``fallback`` with surrogateescape."""
    try:
        return value.decode("utf-8", "strict")
    except UnicodeDecodeError:
        return value.decode(fallback, "surrogateescape")


def _first_bad_header(headers: list[bytes]) -> int | None:
    """The index of the first header tarfile would reject (checksum, number fields), else None.
    A number field in a form other than plain octal or base-256 is given up on (tarfile may accept it)."""
    if not headers:
        return None
    return _first_bad_row(np.frombuffer(b"".join(headers), np.uint8).reshape(-1, BLOCK))


def _first_bad_row(h: np.ndarray) -> int | None:
    """``_first_bad_header`` of headers [n, 512]."""
    if not all(((_TYPICAL.take(h[:, a:b]) == _TYPICAL_ROW[a:b]) | (h[:, a:b] == 0)).all() for a, b in _NUMBER_SPANS):
        ok8, _ = _plain_numbers(h[:, _NARROW].reshape(len(h), -1, 8))  # mode, uid, gid, chksum, dev*
        ok12, _ = _plain_numbers(h[:, _WIDE].reshape(len(h), -1, 12))  # size, mtime
        if not (ok8.all() and ok12.all()):
            raise _GiveUp  # (else each field's form, in full)
    field = h[:, 148:156]
    unsigned = 256 + _byte_sums(h) - np.add.reduce(field, axis=1, dtype=np.int64)
    signed = unsigned.copy()  # (worked out only where the unsigned sum misses: some tars sum signed bytes)
    chksum = _octal(field, _digits(field))
    miss = np.flatnonzero(unsigned != chksum)
    signed[miss] = (256 + np.add.reduce(h[miss].view(np.int8), axis=1, dtype=np.int64)
                    - np.add.reduce(field[miss].view(np.int8), axis=1, dtype=np.int64))
    bad = np.flatnonzero((chksum != unsigned) & (chksum != signed))
    return int(bad[0]) if len(bad) else None


# The number fields as tarfile and GNU tar write them: octal digits then NUL (the checksum: six digits,
# NUL, space), or all NUL. Per byte of the fields in _NUMBER_FIELDS order: 1 where a digit may be, 2 a
# NUL, 3 a space; any byte may be NUL instead (what precedes the first NUL is then digits only: plain).
_NUMBER_SPANS = ((100, 156), (329, 345))  # mode..chksum (and the type byte), devmajor..devminor
_TYPICAL_ROW = np.zeros(BLOCK, np.uint8)
for _start, _width in _NUMBER_FIELDS:
    _TYPICAL_ROW[_start:_start + _width - 1], _TYPICAL_ROW[_start + _width - 1] = 1, 2
_TYPICAL_ROW[154:156] = 2, 3  # the checksum: six digits, NUL, space
_TYPICAL = np.zeros(256, np.uint8)  # byte -> 1 digit, 2 NUL, 3 space, 0 other
_TYPICAL[ord("0"):ord("8")], _TYPICAL[0], _TYPICAL[ord(" ")] = 1, 2, 3
_NARROW = np.concatenate([np.arange(s, s + 8) for s in (100, 108, 116, 148, 329, 337)])
_WIDE = np.concatenate([np.arange(s, s + 12) for s in (124, 136)])


def _plain_numbers(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fields [rows, fields, bytes] -> (each field is base-256, or up to its first NUL spaces, octal
    digits, spaces; the octal digits before the first NUL)."""
    n = f.shape[-1]
    before = ~np.logical_or.accumulate(f == 0, axis=-1)
    digit = (f >= ord("0")) & (f <= ord("7")) & before
    allowed = (digit | (f == ord(" ")) | ~before).all(axis=-1)
    count = digit.sum(axis=-1)
    cols = np.arange(n)
    first = np.where(digit, cols, n).min(axis=-1)
    last = np.where(digit, cols, -1).max(axis=-1)
    contiguous = (count == 0) | (last - first + 1 == count)
    base256 = (f[..., 0] == 0o200) | (f[..., 0] == 0o377)
    return base256 | (allowed & contiguous), digit


def _byte_sums(h: np.ndarray) -> np.ndarray:
    """Per row of [rows, 512] bytes, their sum (at most 512 x 255: uint32 holds it; numpy's own sum is the
    fastest way here, faster than summing 8-byte words in lanes)."""
    return h.sum(axis=1, dtype=np.uint32).astype(np.int64)


def _digits(f: np.ndarray) -> np.ndarray:
    """Where [rows, bytes] fields hold an octal digit before their first NUL."""
    return (f >= ord("0")) & (f <= ord("7")) & ~np.logical_or.accumulate(f == 0, axis=-1)


def _octal(f: np.ndarray, digit: np.ndarray) -> np.ndarray:
    """Plain fields [rows, bytes] (``_plain_numbers``) and their digits -> values, all rows at once."""
    values = np.zeros(len(f), np.int64)
    for c in range(f.shape[1]):
        values = np.where(digit[:, c], values * 8 + (f[:, c].astype(np.int64) - ord("0")), values)
    for i in np.flatnonzero((f[:, 0] == 0o200) | (f[:, 0] == 0o377)):
        values[i] = tarfile.nti(bytes(f[i]))
    return values
