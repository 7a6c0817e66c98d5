"""Parquet sources in the Hugging Face ``datasets`` layout -> the manifest's rows, and reading them back.

ImageNet-1k and most image datasets on the Hugging Face hub ship as parquet shards written by the
``datasets`` library: an ``image`` column of struct ``{bytes, path}`` (the encoded file, embedded)
and an integer ``label`` column whose ``ClassLabel`` names sit in the schema metadata under
``b"huggingface"``. Each file is a shard, as a tar is; a sample's address is (file, row), kept in
the manifest's ``offset`` column (the row within its file), so a re-cut of class-sorted files
(``sources.recut_shards``) works as for tars, the ``file`` column then indexing the files.

Reading: files as ``datasets`` writes them (images uncompressed, PLAIN) are mapped once, page
headers walked (``parquet_pages``), and each image is then read alone, exactly its bytes; other files
are read by row group (the unit pyarrow reads): a shard read front to back reads each row group
once, and random reads keep a few files open and the last row groups decoded (``ParquetRows``).
Only the ``image`` column is read for images and only ``label`` (plus ``image.path``) to
index without checksums: parquet stores columns apart, so indexing never touches the image bytes
unless precompute asks for their checksums.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections import OrderedDict

import crc32c
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..source_errors import MAX_CLASSES, SourceError, check_class_count, check_label_bound, permission_error
from .base import NO_CRC, SCHEMA, FileReader, Indexed, SourceFormat, check_files, classes_txt_names
from .parquet_pages import RowBytes, Unmapped, footer, map_by_offset_index, map_column, read_footer
from .stamps import stamps_of

IMAGE, LABEL = "image", "label"
HF_META = b"huggingface"


def _open(path, name: str | None = None) -> pq.ParquetFile:
    """A parquet file by path (memory-mapped), or through an open file object ``path`` named ``name``."""
    try:
        # memory-mapped, no pre-buffering: a row group's image column is read from the page cache with
        # one copy (measured ~1.5x faster than the defaults on 4 MB row groups of JPEGs)
        if name is not None:  # (a file object: its footer in one small read, not pyarrow's 64 KiB)
            return pq.ParquetFile(path, metadata=read_footer(path), pre_buffer=False)
        return pq.ParquetFile(path, memory_map=True, pre_buffer=False)
    except PermissionError:
        raise permission_error(path) from None
    except (pa.ArrowException, OSError) as e:
        path = path if name is None else name
        raise SourceError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]}); "
                                 "re-download or re-write it, or remove it from --data") from None


def _check_schema(path: str, schema: pa.Schema) -> None:
    names = schema.names
    if IMAGE not in names or LABEL not in names:
        missing = IMAGE if IMAGE not in names else LABEL
        guess = [n for n in names if n not in (IMAGE, LABEL) and (
            _is_image_type(schema.field(n).type) if missing == IMAGE else pa.types.is_integer(schema.field(n).type))]
        raise SourceError(
            f"{path}: no {missing!r} column (columns: {', '.join(names)}); a parquet source needs the Hugging Face "
            f"layout, an 'image' column {{bytes, path}} and an integer 'label': rename the column "
            f"(datasets: ds.rename_column({guess[0] if guess else 'OLD'!r}, {missing!r}))")
    img = schema.field(IMAGE).type
    if not _is_image_type(img):
        raise SourceError(f"{path}: column 'image' is {img}, not struct<bytes: binary, path: string> "
                                 "(datasets' Image() feature); cast it with datasets: ds.cast_column('image', Image())")
    lab = schema.field(LABEL).type
    if not pa.types.is_integer(lab):
        raise SourceError(f"{path}: column 'label' is {lab}, not an integer class index; encode it "
                                 "(datasets: ds.class_encode_column('label'))")


def _is_image_type(t: pa.DataType) -> bool:
    """datasets' Image() feature as arrow: struct<bytes: binary, path: string>."""
    return (pa.types.is_struct(t) and t.get_field_index("bytes") >= 0
            and (pa.types.is_binary(t.field("bytes").type) or pa.types.is_large_binary(t.field("bytes").type)))


def hf_class_names(schema: pa.Schema, path: str = "the parquet file") -> list[str] | None:
    """The ``ClassLabel`` names the ``datasets`` library stored for the ``label`` column, if any."""
    raw = (schema.metadata or {}).get(HF_META)
    if raw is None:
        return None
    try:
        feature = json.loads(raw)["info"]["features"][LABEL]
    except (ValueError, KeyError, TypeError):
        return None
    names = feature.get("names") if isinstance(feature, dict) else None
    if not (isinstance(names, list) and names):
        return None
    check_class_count(len(names), f"{path}: its ClassLabel")
    return [str(n) for n in names]


def _open_source(path: str) -> pq.ParquetFile:
    """A parquet file on disk (``_open``), or on a bucket through a ``RangeFile``: the footer and the
    column chunks asked for are range requests, never the whole object."""
    from storage.bucket import is_source_url

    if not is_source_url(path):
        return _open(path)
    from .bucket_files import RangeFile

    try:
        return _open(RangeFile(path, block=PAGE_BLOCK), path)
    except FileNotFoundError:
        raise SourceError(f"{path}: no such object; check the URL or pattern given to --data") from None


def index_file(path: str, checksums: bool) -> dict:
    """One file's rows: labels, image paths, and (checksums) each image's size and crc32c.

    Null images (or images stored as a path only, not embedded) and null labels are refused with the
    row; ``sources`` checks the label range against the class names. On a bucket the same, by range
    requests: names only reads the footer and the label and image.path column chunks."""
    f = _open_source(path)
    _check_schema(path, f.schema_arrow)
    labels, paths, sizes, crcs = [], [], [], []
    for rg in range(f.num_row_groups):
        has_path = f.schema_arrow.field(IMAGE).type.get_field_index("path") >= 0
        cols = [IMAGE] if checksums else (["image.path"] if has_path else [])
        try:
            t = f.read_row_group(rg, columns=cols + [LABEL])
        except (pa.ArrowException, OSError) as e:
            raise SourceError(f"{path}: row group {rg} is unreadable ({str(e).splitlines()[0]}); "
                                     "re-download or re-write the file") from None
        lab = t.column(LABEL).combine_chunks()
        if lab.null_count:
            row = len(labels) + int(np.flatnonzero(lab.is_null().to_numpy(zero_copy_only=False))[0])
            raise SourceError(f"{path}: row {row} has no label (null); drop unlabelled rows "
                                     "(a test split?) or give them a class")
        _check_label_range(path, lab, sum(len(x) for x in labels))
        labels.append(lab.to_numpy().astype(np.int64))
        if checksums:
            img = t.column(IMAGE).combine_chunks()
            data = img.field("bytes")
            missing = np.flatnonzero(np.asarray(img.is_null().to_numpy(zero_copy_only=False))
                                     | np.asarray(data.is_null().to_numpy(zero_copy_only=False)))
            if len(missing):
                _null_image(path, sum(len(x) for x in labels[:-1]) + int(missing[0]))
            blobs = data.to_pylist()
            sizes.extend(len(b) for b in blobs)
            crcs.extend(crc32c.crc32c(b) for b in blobs)
            p = img.field("path") if img.type.get_field_index("path") >= 0 else pa.nulls(len(img), pa.string())
        else:  # a struct image{path} (read_row_group keeps the nesting) or null paths
            p = t.column(IMAGE).combine_chunks() if IMAGE in t.column_names else pa.nulls(t.num_rows, pa.string())
            p = p.field("path") if pa.types.is_struct(p.type) else p
            _no_null_images_by_statistics(f, path, rg)
        paths.extend("" if v is None else str(v) for v in p.to_pylist())
    return {"labels": np.concatenate(labels) if labels else np.zeros(0, np.int64), "paths": paths,
            "sizes": sizes, "crcs": crcs, "class_names": hf_class_names(f.schema_arrow, path)}


def _check_label_range(path: str, lab: pa.Array, first_row: int) -> None:
    """Labels under MAX_CLASSES, checked in the column's own type: a uint64 of 2**63 is no negative
    number, and nothing is sized by a label before it passed (sources.check_label_bound)."""
    bound = pa.scalar(MAX_CLASSES, pa.uint64() if pa.types.is_unsigned_integer(lab.type) else pa.int64())
    too_big = pc.greater_equal(lab, bound)
    if pc.any(too_big).as_py():
        i = int(np.flatnonzero(too_big.to_numpy(zero_copy_only=False))[0])
        check_label_bound(lab[i].as_py(), f"{path}: row {first_row + i}")


def _null_image(path: str, row: int):
    raise SourceError(f"{path}: row {row} has no image bytes (null, or a path only); embed the images "
                             "(datasets' to_parquet embeds Image() files) or drop the row")


def _no_null_images_by_statistics(f: pq.ParquetFile, path: str, rg: int) -> None:
    """Without reading image bytes: the row group's statistics say whether any image is null."""
    meta = f.metadata.row_group(rg)
    for c in range(meta.num_columns):
        col = meta.column(c)
        if col.path_in_schema == "image.bytes" and col.statistics is not None and col.statistics.has_null_count:
            if col.statistics.null_count:
                raise SourceError(f"{path}: row group {rg} has {col.statistics.null_count} rows without "
                                         "image bytes (null, or a path only); embed the images (datasets' "
                                         "to_parquet embeds Image() files) or drop those rows")


# Bytes of decoded row groups a ParquetRows keeps (per copy: each loader worker has its own), for
# files read by row group (not datasets' own, which are read image by image). Row groups of 100
# images (~10 MB of ImageNet JPEGs): a few fit, which is what a loader batch drawing from several
# row groups needs. A file written as one row group (pyarrow's default, a whole 140 MB file) keeps
# only itself, the one group being read, not 8 such files.
ROW_GROUP_CACHE_BYTES = 64 << 20


class ParquetRows:
    """Image bytes by (file, row): each image read alone where the file allows, else by row group.

    Files as ``datasets`` writes them (the image column uncompressed, PLAIN) are mapped once on
    first use (``parquet_pages``: page headers walked, a few bytes a row, no image bytes) and each
    image is then one read of exactly its bytes, wherever the loader's batches fall. The maps are
    kept for every file touched (16 bytes a row: 20 MB for ImageNet's 1.28M rows), so a file closed
    by the ``open_files`` bound is reopened without mapping it again.

    Other files (compressed or dictionary-encoded images, pyarrow's defaults) are read by row group:
    one read per row group while the rows asked for stay in it (a shard read front to back, or the
    samples of a loader batch from one row group). The kept groups are bounded by count and by
    ``cache_bytes`` (the group being read is always kept).

    ``opener(path)`` opens a file for reading (binary, seek/read); a caller counting bytes passes
    one, and every byte then goes through it (footers, pages, row groups). ``pages=False`` reads
    by row group always (the benchmark's before). Picklable: workers start with empty caches."""

    def __init__(self, root: str, files: list[str], open_files: int = 16, row_groups: int = 8,
                 cache_bytes: int = ROW_GROUP_CACHE_BYTES, opener=None, pages: bool = True):
        self.root, self.files = root, list(files)
        self.open_files, self.row_groups, self.cache_bytes = open_files, row_groups, cache_bytes
        self.opener, self.pages = opener, pages
        self._files: OrderedDict[int, tuple[pq.ParquetFile, np.ndarray]] = OrderedDict()
        self._groups: OrderedDict[tuple[int, int], pa.Array] = OrderedDict()
        self._maps: dict[int, RowBytes | None] = {}  # None: not mappable, read by row group
        self._handles: OrderedDict[int, object] = OrderedDict()  # files open for direct reads
        self.known = None  # file -> each row's indexed size, or None (BucketParquet: map_column's ``known``)
        self.group_reads = 0  # row groups read (what the benchmark and tests count)
        self.offset_index_maps = 0  # files mapped by their offset index (no page header walked but one a group)
        self.direct_reads = 0  # images read alone, at their offset

    @property
    def cached_bytes(self) -> int:
        return sum(g.nbytes for g in self._groups.values())

    def __getstate__(self):
        return {**self.__dict__, "_files": OrderedDict(), "_groups": OrderedDict(), "_maps": {},
                "_handles": OrderedDict()}

    def path(self, file: int) -> str:
        return os.path.join(self.root, self.files[file])

    def _raw(self, file: int):
        """A file open for reading (``opener``), of the last ``open_files`` used."""
        hit = self._handles.pop(file, None)
        if hit is None:
            path = self.path(file)
            try:
                hit = self.opener(path) if self.opener else self._open_regular(path)
            except PermissionError:
                raise permission_error(path) from None
            while len(self._handles) >= self.open_files:
                self._handles.popitem(last=False)[1].close()
        self._handles[file] = hit  # most recently used last
        return hit

    @staticmethod
    def _open_regular(path: str):
        """Unbuffered (a read is exactly the bytes asked for), never blocking on a FIFO swapped in
        after indexing (O_NONBLOCK; then only a regular file is kept: else OSError, the image b"")."""
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(f"{path} is not a regular file")
        return os.fdopen(fd, "rb", buffering=0)

    def _map(self, file: int) -> RowBytes | None:
        """Where each row's image lies in ``file`` (mapped on first use), or None: read row groups."""
        if file in self._maps:
            return self._maps[file]
        if not self.pages:
            return None
        raw = self._raw(file)
        try:
            meta, thrift = footer(raw) or (pq.ParquetFile(raw, pre_buffer=False).metadata, None)
            columns = [meta.schema.column(i) for i in range(meta.num_columns)]
            col = next(i for i, c in enumerate(columns) if c.path == "image.bytes")
            levels = columns[col].max_definition_level, columns[col].max_repetition_level
            known = self.known(file) if self.known else None
            rows = None
            if known is not None and thrift is not None:  # the offset index and the sizes: no page walk
                with contextlib.suppress(Unmapped):
                    rows = map_by_offset_index(raw, thrift, meta, col, *levels, known)
                    self.offset_index_maps += 1
            if rows is None:
                try:
                    rows = map_column(raw, meta, col, *levels, known)
                except Unmapped:
                    if known is None:
                        raise
                    rows = map_column(raw, meta, col, *levels)  # the sizes do not fit (changed?): read them
        except (Unmapped, StopIteration):
            rows = None  # not plain uncompressed images: pyarrow reads its row groups
        self._maps[file] = rows
        return rows

    def _file(self, file: int) -> tuple[pq.ParquetFile, np.ndarray]:
        hit = self._files.pop(file, None)
        if hit is None:
            f = _open(self.path(file)) if self.opener is None else _open(self._raw(file), self.path(file))
            rows = [f.metadata.row_group(i).num_rows for i in range(f.num_row_groups)]
            hit = (f, np.cumsum([0] + rows))  # first row of each row group, then the total
            while len(self._files) >= self.open_files:
                self._files.popitem(last=False)
        self._files[file] = hit  # most recently used last
        return hit

    def image(self, file: int, row: int) -> bytes:
        """The image bytes of one row; b"" when the file or row is gone or unreadable (the caller's
        crc32c check then says the source changed, or the image is undecodable)."""
        try:
            rows = self._map(file)
        except SourceError as e:
            if "permission denied" in str(e):  # unreadable now: an error, never a silently dropped image
                raise
            return b""
        except (pa.ArrowException, OSError):
            return b""  # gone or no longer parquet
        if rows is not None:
            if not 0 <= row < len(rows.offsets) or rows.sizes[row] < 0:
                return b""
            try:
                raw = self._raw(file)
                raw.seek(int(rows.offsets[row]))
                data = raw.read(int(rows.sizes[row]))
            except OSError:
                return b""
            self.direct_reads += 1
            return data or b""
        return self._image_by_group(file, row)

    def _image_by_group(self, file: int, row: int) -> bytes:
        try:
            f, starts = self._file(file)
        except SourceError as e:
            if "permission denied" in str(e):
                raise
            return b""  # gone or no longer parquet
        except OSError:
            return b""
        rg = int(np.searchsorted(starts, row, side="right")) - 1
        if not 0 <= rg < len(starts) - 1:
            return b""
        group = self._groups.pop((file, rg), None)
        if group is None:
            try:
                col = f.read_row_group(rg, columns=["image.bytes"]).column(IMAGE)
                col = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()  # no copy of one chunk
            except (pa.ArrowException, OSError):
                return b""
            group = col.field("bytes")  # kept as arrow: only the rows asked for become Python bytes
            self.group_reads += 1
            self._make_room(group.nbytes)
        self._groups[file, rg] = group
        at = row - int(starts[rg])
        if at >= len(group):  # pages holding fewer values than the footer says: a damaged file
            return b""
        data = group[at].as_py()
        return b"" if data is None else data

    def _make_room(self, incoming: int) -> None:
        """Drop the least recently used groups until one of ``incoming`` bytes fits both bounds."""
        held = self.cached_bytes
        while self._groups and (len(self._groups) >= self.row_groups or held + incoming > self.cache_bytes):
            held -= self._groups.popitem(last=False)[1].nbytes


# ---- the format: indexing files into a manifest's rows, and reading them by (file, row) -------------
class ParquetFiles(FileReader):
    """A sample's image by (file, row), through ``ParquetRows`` (``rows``: its counters)."""

    def __init__(self, root: str, files: list[str]):
        self.rows = ParquetRows(root, files, OPEN_FILES)

    def read(self, file: int, offset: int, size: int, path: str) -> bytes:
        return self.rows.image(file, offset)

    def where(self, file: int, path: str) -> str:
        return self.rows.path(file)


OPEN_FILES = 16  # parquet files a reader keeps open (as tars: a batch or a re-cut shard spans several)
PAGE_BLOCK = 4096  # on a bucket, a read of a footer, page header or value length fetches at least this much


class _RangeOpener:
    """ParquetRows' opener for objects: a RangeFile counting into the reader's counts (picklable)."""

    def __init__(self, counts):
        self.counts = counts

    def __call__(self, url: str):
        from .bucket_files import RangeFile

        return RangeFile(url, block=PAGE_BLOCK, counts=self.counts)


class BucketParquet(FileReader):
    """Parquet files on a bucket (or a web server), by range requests. Each file is mapped on first use
    as on disk (``ParquetRows``: the footer, then the image column's page headers; with the manifest's
    sizes (``use_sizes``) a request per page, else a small one per row as well), and a batch's images
    are then read by their offsets, neighbours merged into one request (``bucket_files.RangeReads``).
    Files the map does not understand are read by row group through a ``RangeFile``. ``requests`` and
    ``bytes_read`` count everything asked of the store. Picklable: workers start with empty maps."""

    def __init__(self, root: str, files: list[str]):
        from .bucket_files import Counts

        self.root, self.files = root.rstrip("/"), list(files)
        self.counts = Counts()
        self.rows = ParquetRows(self.root, self.files, OPEN_FILES, opener=_RangeOpener(self.counts))
        self.rows.known = self._known
        self._sizes, self._order = None, None
        self.copies = None  # a local_copies.LocalCopies (--source-cache): images read from whole local copies
        self.cache = None   # a bucket_cache.CacheView: the rank's read-ahead, keyed by (file, byte offset)

    def __getstate__(self):
        return {**self.__dict__, "_order": None}

    def _shared(self) -> tuple[int, int]:
        from .bucket_files import _shared_totals

        return _shared_totals(self.cache, self.copies)

    # everything asked of the store: this reader's requests, and those counted in shared memory (the
    # read-ahead's, its consumers' direct reads, the copies')
    requests = property(lambda self: self.counts.requests + self._shared()[0])
    bytes_read = property(lambda self: self.counts.bytes_read + self._shared()[1])

    def byte_addresses(self, file_index: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each manifest row's image as (byte offset, size) in its file, mapping every file here (the main
        process, for a read-ahead's plan); size 0 where a file cannot be mapped (read by row group)."""
        offsets, sizes = np.zeros(len(rows), np.int64), np.zeros(len(rows), np.int64)
        for f in np.unique(file_index).tolist():
            mine = np.flatnonzero(file_index == f)
            try:
                m = self.rows._map(f)
            except (pa.ArrowException, OSError):
                m = None
            if m is None:
                continue
            r = np.asarray(rows[mine], np.int64)
            ok = (r >= 0) & (r < len(m.offsets))
            offsets[mine[ok]] = m.offsets[r[ok]]
            sizes[mine[ok]] = np.maximum(m.sizes[r[ok]], 0)
        return offsets, sizes

    def where(self, file: int, path: str) -> str:
        return f"{self.root}/{self.files[file]}"

    def use_sizes(self, file_index, offsets, sizes) -> None:
        self._sizes, self._order = (file_index, offsets, sizes), None

    def _known(self, file: int) -> np.ndarray | None:
        """Each row's indexed size in ``file``, in row order; None where the manifest has none (names only)."""
        if self._sizes is None:
            return None
        which, rows, sizes = self._sizes
        if self._order is None:  # (file, row) order, and where each file's rows start in it
            order = np.lexsort((rows, which))
            self._order = order, np.searchsorted(which[order], np.arange(len(self.files) + 1))
        order, starts = self._order
        mine = order[starts[file]:starts[file + 1]]
        if not len(mine) or not np.array_equal(rows[mine], np.arange(len(mine))) or sizes[mine].min() <= 0:
            return None
        return np.asarray(sizes[mine], np.int64)

    def read(self, file: int, offset: int, size: int, path: str) -> bytes:
        return self.read_many([(file, offset, size, path)])[0]

    def read_many(self, wanted: list[tuple[int, int, int, str]]) -> list[bytes]:
        from .bucket_files import Counts, RangeReads

        out: list[bytes] = [b""] * len(wanted)
        direct = []  # (i, file, byte offset, size)
        for i, (file, row, _size, _path) in enumerate(wanted):
            try:
                rows = self.rows._map(file)
            except SourceError:  # no such bucket, no credentials, no endpoint: one line, the run stops
                raise
            except (pa.ArrowException, OSError):
                continue  # gone, or no longer parquet: b"" (the crc32c check says the source changed)
            if rows is None:
                out[i] = self.rows._image_by_group(file, row)
            elif 0 <= row < len(rows.offsets) and rows.sizes[row] >= 0:
                direct.append((i, file, int(rows.offsets[row]), int(rows.sizes[row])))
        if self.copies is not None:  # (the files are still mapped from the bucket: once per file per worker)
            local = self.copies.read([d[1:] for d in direct])
            for (i, *_), data in zip(direct, local, strict=True):
                if data is not None:
                    out[i] = data
            direct = [d for d, data in zip(direct, local, strict=True) if data is None]
        if self.cache is not None and direct:  # the read-ahead's, then (not there in time) directly
            cached = self.cache.take([(*d[1:], "") for d in direct])
            for (i, *_), data in zip(direct, cached, strict=True):
                if data is not None:
                    out[i] = data
            direct = [d for d, data in zip(direct, cached, strict=True) if data is None]
        counts = self.counts if self.cache is None else Counts()  # (a consumer's: in the cache's shared totals)
        got = RangeReads(lambda f: self.where(f, ""), counts).read([d[1:] for d in direct])
        if self.cache is not None:
            self.cache.count(counts.requests, counts.bytes_read)
        self.rows.direct_reads += len(direct)
        for (i, *_), data in zip(direct, got, strict=True):
            out[i] = data
        return out


class HfParquet(SourceFormat):
    kind, ext, what, recut = "parquet", ".parquet", "Hugging Face parquet files", True
    sizes_without_content = False  # the image column is read only for checksums

    def index(self, src, files, *, checksums, shard_size, seed, shuffle) -> Indexed:
        return _index_parquet(src, files, checksums=checksums)

    def open_files(self, root, files) -> FileReader:
        from storage.bucket import is_source_url

        if is_source_url(root):  # on a bucket: page-mapped images by range requests, a batch's merged
            return BucketParquet(root, files)
        return ParquetFiles(root, files)


FORMAT = HfParquet()


def _index_parquet(src: str, files: list[str], checksums: bool = True) -> Indexed:
    """Parquet files in the Hugging Face ``datasets`` layout -> a manifest of the files as-is.

    Key ``<file stem>/<row>``, path the image's own ``path`` field, offset its row in the file. Class
    names: the ``ClassLabel`` names in the files' ``huggingface`` metadata, else ``classes.txt``
    beside the files, else "0".."C-1"."""
    root = check_files(src, files)
    stamps = stamps_of(root, files)  # before reading: a file changed meanwhile fails its stamp next time
    cols = {name: [] for name in SCHEMA.names}
    names, named_by = None, None
    for shard, path in enumerate(files):
        rows = index_file(path, checksums)
        if rows["class_names"] is not None:
            if names is not None and rows["class_names"] != names:
                raise SourceError(f"{path}: its ClassLabel names differ from those of {named_by}; all files of "
                                  "one source need the same classes (re-export them from one dataset)")
            names, named_by = rows["class_names"], path
        n = len(rows["labels"])
        if n and rows["labels"].min() < 0:
            i = int(np.argmax(rows["labels"] < 0))
            raise SourceError(f"{path}: row {i} has label {int(rows['labels'][i])}; labels are class indices "
                              "0..C-1 (-1 is the datasets library's 'no label', e.g. a test split): use a "
                              "labelled split or drop those rows")
        stem = os.path.splitext(os.path.basename(path))[0]
        cols["key"] += [f"{stem}/{r}" for r in range(n)]
        cols["label"] += rows["labels"].tolist()
        cols["shard"] += [shard] * n
        cols["position"] += list(range(n))
        cols["path"] += rows["paths"]
        cols["offset"] += list(range(n))
        cols["size"] += rows["sizes"] if checksums else [0] * n
        cols["crc32c"] += rows["crcs"] if checksums else [NO_CRC] * n
        cols.setdefault("file", []).extend([path] * n)
    if not cols["key"]:
        raise SourceError(f"{src}: the parquet files hold no rows")
    files_of = cols.pop("file")
    labels = np.asarray(cols["label"])
    if names is None:
        names = classes_txt_names(root, int(labels.max()) + 1)
        named_by = os.path.join(root, "classes.txt")
    if labels.max() >= len(names):
        i = int(np.argmax(labels >= len(names)))
        raise SourceError(f"{files_of[i]}: row {cols['offset'][i]} has label {labels[i]}, but {named_by} names "
                          f"{len(names)} classes (0..{len(names) - 1}); fix the label or the class names")
    return Indexed("parquet", root, [os.path.basename(f) for f in files], names, pa.table(cols, schema=SCHEMA),
                   stamps=stamps)
