"""Where each row's image bytes lie in a parquet file, found by walking the image column's page headers.

``datasets`` writes embedded images (its ``Image()`` feature) uncompressed and PLAIN-encoded: each
value is a 4-byte little-endian length and the encoded file, verbatim, in row order, pages of
256 KiB..1 MiB cut by content (``use_content_defined_chunking``) and row groups of up to 100 MB.
pyarrow reads no less than a whole column chunk of a row group, so one image cost a row group's
worth of images. Here the page headers of the ``image.bytes`` column chunks are walked (each header
says how long its page is; the next page follows it) and, inside each page, the values are hopped
over by their length prefixes: a few bytes a row, no image bytes. What comes out is each row's
(file offset, size), so an image is then one read of exactly its bytes.

Anything else (a compressed or dictionary-encoded column, repeated values, a page header this
minimal reader does not understand, counts that do not add up) is ``Unmapped``: the caller falls
back to reading row groups, which pyarrow does for any valid file. Nothing here trusts the file:
every length is bounded by the column chunk it sits in. The parsed layout is checked against the
footer (values per row group); the bytes read are checked by the caller against the size and
crc32c indexed, as every source's are.

Thrift's compact protocol (what parquet's page headers are written in) is read by a generic
skipper of ~40 lines, not a thrift dependency: only the fields named below are used.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..source_errors import SourceError

# parquet.thrift: PageType, Encoding, CompressionCodec values used here
DATA_PAGE, DICTIONARY_PAGE, DATA_PAGE_V2 = 0, 2, 3
PLAIN, RLE = 0, 3
HEADER_READ = 256  # bytes read for a page header (and its levels): more only if it is longer
MAX_HEADER = 1 << 24  # a page header past this is no header this reader will parse


class Unmapped(SourceError):
    """This file's image column is not laid out as plain uncompressed values: read row groups. Caught by
    ``ParquetRows``, never shown; a SourceError so that, if it ever escaped, it would be one line."""


@dataclass(frozen=True)
class RowBytes:
    """Each row's image bytes in one file: ``offsets[r]`` and ``sizes[r]`` (-1: a null image)."""

    offsets: np.ndarray
    sizes: np.ndarray


# ---- thrift compact protocol: just enough to read a struct into {field id: value} -------------------------
def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        b = buf[pos]  # IndexError past the end: the caller reads more and tries again
        pos += 1
        out |= (b & 0x7F) << shift
        if not b & 0x80:
            return out, pos
        shift += 7
        if shift > 70:
            raise Unmapped("a varint longer than 10 bytes")


def _zigzag(buf: bytes, pos: int) -> tuple[int, int]:
    v, pos = _varint(buf, pos)
    return (v >> 1) ^ -(v & 1), pos


def _value(buf: bytes, pos: int, kind: int, depth: int):
    if kind in (1, 2):  # a bool's value is its type (in a struct) or one byte (in a list)
        return kind == 1, pos
    if kind == 3:
        return buf[pos], pos + 1
    if kind in (4, 5, 6):
        return _zigzag(buf, pos)
    if kind == 7:
        if pos + 8 > len(buf):
            raise IndexError
        return None, pos + 8
    if kind == 8:
        n, pos = _varint(buf, pos)
        if pos + n > len(buf):
            raise IndexError
        return buf[pos:pos + n], pos + n
    if kind in (9, 10):
        head = buf[pos]
        pos += 1
        n, elem = head >> 4, head & 0x0F
        if n == 15:
            n, pos = _varint(buf, pos)
        out = []
        for _ in range(n):
            if elem in (1, 2):
                v, pos = buf[pos] == 1, pos + 1
            else:
                v, pos = _value(buf, pos, elem, depth + 1)
            out.append(v)
        return out, pos
    if kind == 11:
        n, pos = _varint(buf, pos)
        if n:
            types = buf[pos]
            pos += 1
            for i in range(2 * n):  # keys and values alternate; a map is skipped, never used
                _, pos = _value(buf, pos, (types >> 4) if i % 2 == 0 else (types & 0x0F), depth + 1)
        return None, pos
    if kind == 12:
        return _struct(buf, pos, depth + 1)
    raise Unmapped(f"thrift type {kind}")


def _struct(buf: bytes, pos: int, depth: int = 0) -> tuple[dict, int]:
    if depth > 16:
        raise Unmapped("thrift structs nested too deep")
    out, last = {}, 0
    while True:
        head = buf[pos]
        pos += 1
        if head == 0:
            return out, pos
        delta, kind = head >> 4, head & 0x0F
        if delta:
            fid = last + delta
        else:
            fid, pos = _zigzag(buf, pos)
        out[fid], pos = _value(buf, pos, kind, depth)
        last = fid


# ---- the footer -------------------------------------------------------------------------------------------
FOOTER_READ = 16 * 1024  # the tail read for a footer (pyarrow reads 64 KiB): more only for a longer footer


def read_footer(f):
    """A parquet file's FileMetaData from an open file object's tail, in one read of ``FOOTER_READ`` bytes
    (two for a longer footer): pyarrow's own first read is 64 KiB, a request's worth on a bucket for a
    footer of a few KiB. None when the tail is no parquet footer (pyarrow then opens it and says why)."""
    got = footer(f)
    return None if got is None else got[0]


def footer(f):
    """(FileMetaData, the footer's thrift bytes) of an open parquet file (``read_footer``), or None."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    size = f.seek(0, 2)
    if size < 12:
        return None
    f.seek(size - min(size, FOOTER_READ))
    tail = f.read(min(size, FOOTER_READ))
    if len(tail) < 8 or tail[-4:] != b"PAR1":
        return None
    n = int.from_bytes(tail[-8:-4], "little")
    if n + 12 > size:
        return None
    if n + 8 > len(tail):
        f.seek(size - 8 - n)
        tail = f.read(n + 8 - len(tail)) + tail
        if len(tail) != n + 8:
            return None
    try:
        return pq.read_metadata(io.BytesIO(b"PAR1" + tail[-(n + 8):])), tail[-(n + 8):-8]
    except (pa.ArrowException, OSError):
        return None


# ---- the offset index: every page's place without reading a page header -----------------------------------
MAX_OFFSET_INDEX = 64 << 20  # the offset indexes of one file's image column, read in one request, at most


def map_by_offset_index(f, raw_footer: bytes, meta, column: int, max_def: int, max_rep: int,
                        known: np.ndarray) -> RowBytes:
    """Each row's (offset, size) from the image column's offset index (where each data page lies and its
    first row; ``datasets`` writes one) and the indexed sizes ``known``: a page's values end where the
    page ends, each after its 4-byte length, so they are placed from the page's end backwards. One read
    for the offset indexes of all row groups (written together, before the footer) and one page header
    per row group, its first page walked (``_map_chunk``) to check the placing. Unmapped when the file
    has no offset index or anything does not add up: the caller walks the page headers instead."""
    if max_rep or len(known) != meta.num_rows:
        raise Unmapped("a repeated image column, or sizes not the file's rows")
    try:
        groups = _struct(raw_footer, 0)[0].get(4)
        if not isinstance(groups, list) or len(groups) != meta.num_row_groups:
            raise Unmapped("row groups in the footer")
        where = []
        for rg, g in enumerate(groups):
            cc = meta.row_group(rg).column(column)
            if cc.physical_type != "BYTE_ARRAY" or cc.compression != "UNCOMPRESSED" or cc.has_dictionary_page:
                raise Unmapped("image column not plain")
            chunk = g.get(1)[column] if isinstance(g, dict) and isinstance(g.get(1), list) else None
            at, n = (chunk.get(4), chunk.get(5)) if isinstance(chunk, dict) else (None, None)
            if not (isinstance(at, int) and isinstance(n, int) and at >= 0 and n > 0):
                raise Unmapped("no offset index")
            where.append((at, n))
        lo, hi = min(a for a, _ in where), max(a + n for a, n in where)
        if hi - lo > MAX_OFFSET_INDEX:
            raise Unmapped("offset indexes too far apart")
        f.seek(lo)
        buf = f.read(hi - lo)
        if len(buf) != hi - lo:
            raise Unmapped("offset index past the file")
        offsets = np.empty(meta.num_rows, np.int64)
        first = 0
        for rg, (at, n) in enumerate(where):
            pages = _struct(buf[at - lo:at - lo + n], 0)[0].get(1)
            rows = meta.row_group(rg).num_rows
            cc = meta.row_group(rg).column(column)
            start, end = cc.data_page_offset, cc.data_page_offset + cc.total_compressed_size
            if not isinstance(pages, list) or not pages:
                raise Unmapped("an empty offset index")
            locs = [(p.get(1), p.get(2), p.get(3)) if isinstance(p, dict) else (None,) * 3 for p in pages]
            if locs[0][2] != 0 or locs[0][0] != start:
                raise Unmapped("the first page is not where the column chunk starts")
            for j, (off, length, r0) in enumerate(locs):
                r1 = locs[j + 1][2] if j + 1 < len(locs) else rows
                if not all(isinstance(v, int) for v in (off, length, r0, r1)) or not (
                        start <= off and off + length <= end and 0 <= r0 <= r1 <= rows):
                    raise Unmapped("a page outside its column chunk")
                e = off + length
                for k in range(first + r1 - 1, first + r0 - 1, -1):
                    offsets[k] = e - int(known[k])
                    e = offsets[k] - 4
                if e <= off:
                    raise Unmapped("sizes longer than their page")
            first_rows = locs[1][2] if len(locs) > 1 else rows
            page_end = locs[0][0] + locs[0][1]
            o, _ = _map_chunk(_Reader(f, page_end), start, page_end, max_def, first_rows,
                              known[first:first + first_rows])
            if not np.array_equal(o, offsets[first:first + first_rows]):
                raise Unmapped("the first page's values are not where the offset index puts them")
            first += rows
    except (IndexError, TypeError, AttributeError):
        raise Unmapped("a footer or offset index this reader does not understand") from None
    return RowBytes(offsets, np.asarray(known, np.int64))


# ---- the page walk -----------------------------------------------------------------------------------------
def _rle_levels(buf: bytes, count: int, bit_width: int) -> np.ndarray:
    """Parquet's RLE/bit-packed hybrid: ``count`` levels of ``bit_width`` bits."""
    out = np.empty(count, np.int64)
    n = pos = 0
    width = (bit_width + 7) // 8
    while n < count:
        head, pos = _varint(buf, pos)
        if head & 1:  # bit-packed: (head >> 1) groups of 8 values, LSB first
            groups = head >> 1
            raw = np.frombuffer(buf[pos:pos + groups * bit_width], np.uint8)
            if len(raw) < groups * bit_width:
                raise Unmapped("bit-packed levels past their page")
            bits = np.unpackbits(raw, bitorder="little").reshape(-1, bit_width)
            vals = (bits.astype(np.int64) << np.arange(bit_width)).sum(axis=1)
            take = min(len(vals), count - n)
            out[n:n + take] = vals[:take]
            n, pos = n + take, pos + groups * bit_width
        else:  # a run: (head >> 1) copies of one value
            run = head >> 1
            if run == 0 or pos + width > len(buf):
                raise Unmapped("an empty or cut RLE run")
            take = min(run, count - n)
            out[n:n + take] = int.from_bytes(buf[pos:pos + width], "little")
            n, pos = n + take, pos + width
    return out


class _Reader:
    """Reads [offset, offset+n) of a file object, counting nothing itself (the file may)."""

    def __init__(self, f, end: int):
        self.f, self.end = f, end

    def read(self, offset: int, n: int) -> bytes:
        n = min(n, self.end - offset)
        if n <= 0:
            return b""
        self.f.seek(offset)
        return self.f.read(n)

    def header(self, offset: int) -> tuple[dict, int, bytes]:
        """The page header at ``offset``: (fields, its length, the bytes read from offset)."""
        n = HEADER_READ
        while True:
            buf = self.read(offset, n)
            try:
                fields, length = _struct(buf, 0)
                return fields, length, buf
            except IndexError:
                if len(buf) < n or n >= MAX_HEADER:
                    raise Unmapped("a page header cut by its column chunk") from None
                n *= 4


def map_column(f, meta, column: int, max_def: int, max_rep: int, known: np.ndarray | None = None) -> RowBytes:
    """Each row's (offset, size) in column ``column`` (a BYTE_ARRAY leaf) over all row groups.

    ``f`` is an open binary file (seek/read); ``meta`` its pyarrow FileMetaData. Raises Unmapped
    when the column is not plain uncompressed values in data pages this reader understands.

    ``known``: each row's size as indexed (a manifest with checksums has them). Then a value's length
    is not read from the file: the page headers alone place every value (a read per page, not per
    row: what a file on a bucket, read by range requests, needs). The sizes must still fill each page
    exactly, else Unmapped; a size that is wrong but fits is caught by the crc32c of what is read."""
    if max_rep:
        raise Unmapped("a repeated image column")
    if known is not None and len(known) != meta.num_rows:
        raise Unmapped(f"{len(known)} sizes known, {meta.num_rows} rows in the footer")
    offsets, sizes = [], []
    first = 0
    for rg in range(meta.num_row_groups):
        cc = meta.row_group(rg).column(column)
        if cc.physical_type != "BYTE_ARRAY" or cc.compression != "UNCOMPRESSED" or cc.has_dictionary_page:
            raise Unmapped(f"image column {cc.physical_type}, {cc.compression}, dictionary {cc.has_dictionary_page}")
        start = cc.data_page_offset
        end = start + cc.total_compressed_size
        rows = meta.row_group(rg).num_rows
        o, s = _map_chunk(_Reader(f, end), start, end, max_def, rows,
                          None if known is None else known[first:first + rows])
        first += rows
        if len(o) != rows or cc.num_values != rows:
            raise Unmapped(f"row group {rg}: {len(o)} values in its pages, {rows} rows in the footer")
        offsets.append(o)
        sizes.append(s)
    if not offsets:
        return RowBytes(np.zeros(0, np.int64), np.zeros(0, np.int64))
    return RowBytes(np.concatenate(offsets), np.concatenate(sizes))


def _map_chunk(r: _Reader, pos: int, end: int, max_def: int, rows: int,
               known: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(offset, size) of each value in one column chunk [pos, end) of ``rows`` rows (``known``: their
    sizes, not read from the file: ``map_column``)."""
    offsets, sizes = [], []
    bit_width = int(max_def).bit_length()
    while pos < end:
        h, hlen, buf = r.header(pos)
        kind, page_size = h.get(1), h.get(3)
        if not isinstance(page_size, int) or page_size < 0 or pos + hlen + page_size > end:
            raise Unmapped("a page longer than its column chunk")
        body, body_end = pos + hlen, pos + hlen + page_size
        if kind == DATA_PAGE:
            dp = h.get(5)
            if not isinstance(dp, dict) or dp.get(2) != PLAIN:
                raise Unmapped("a data page not PLAIN-encoded")
            count = dp.get(1)
            values = body
            if max_def:  # V1: the levels' length (4 bytes LE), then the levels
                if dp.get(3) != RLE:
                    raise Unmapped("definition levels not RLE")
                head = r.read(body, 4)
                n = int.from_bytes(head, "little") if len(head) == 4 else -1
                if n < 0 or body + 4 + n > body_end:
                    raise Unmapped("definition levels past their page")
                levels = _levels(r, buf, pos, body + 4, n, count, bit_width, rows - len(offsets))
                values = body + 4 + n
        elif kind == DATA_PAGE_V2:
            dp = h.get(8)
            if not isinstance(dp, dict) or dp.get(4) != PLAIN:
                raise Unmapped("a data page v2 not PLAIN-encoded")
            count, def_len, rep_len = dp.get(1), dp.get(5), dp.get(6)
            if not all(isinstance(v, int) and v >= 0 for v in (count, def_len, rep_len)) or rep_len:
                raise Unmapped("a data page v2 with repetition levels or bad lengths")
            if body + def_len > body_end:
                raise Unmapped("definition levels past their page")
            levels = (_levels(r, buf, pos, body, def_len, count, bit_width, rows - len(offsets))
                      if max_def else None)
            values = body + def_len
        elif kind == DICTIONARY_PAGE:
            raise Unmapped("a dictionary page")
        else:  # an index page (never written by parquet-cpp) or an unknown type
            raise Unmapped(f"page type {kind}")
        if not isinstance(count, int) or count < 0 or len(offsets) + count > rows:
            raise Unmapped("a page with more values than its row group has rows")
        present = np.ones(count, bool) if not max_def else (levels == max_def)
        at = values
        for p in present:
            if not p:
                offsets.append(-1)
                sizes.append(-1)
                continue
            if known is not None:
                size = int(known[len(offsets)])
            else:
                head = r.read(at, 4)
                if len(head) != 4:
                    raise Unmapped("a value's length past its page")
                size = int.from_bytes(head, "little")
            if at + 4 + size > body_end:
                raise Unmapped("a value past its page")
            offsets.append(at + 4)
            sizes.append(size)
            at += 4 + size
        if at != body_end:
            raise Unmapped("a page's values do not fill it")
        pos = body_end
    return np.asarray(offsets, np.int64), np.asarray(sizes, np.int64)


def _levels(r: _Reader, buf: bytes, buf_at: int, at: int, n: int, count, bit_width: int,
            rows_left: int) -> np.ndarray:
    """``count`` definition levels of ``n`` bytes at ``at`` (from ``buf`` when the header read held them)."""
    if not isinstance(count, int) or count < 0 or count > rows_left:
        raise Unmapped("a page with more values than its row group has rows")
    lo = at - buf_at
    data = buf[lo:lo + n] if lo + n <= len(buf) else r.read(at, n)
    if len(data) != n:
        raise Unmapped("definition levels cut")
    try:
        return _rle_levels(data, count, bit_width)
    except IndexError:
        raise Unmapped("definition levels cut") from None
