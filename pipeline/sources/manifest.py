"""The manifest: the fixed list of shards and samples every later stage addresses, and its bytes.

- ``shards``: one row per shard (a file as-is, or a virtual shard),
- ``samples``: key, label, shard, position, where its bytes live (``file`` and ``offset``: which file,
  and the address within it, a byte offset (tar) or a row (parquet)), and their size and crc32c,
- ``class_names`` and a ``fingerprint`` that changes when any file list, key or label changes.

The fingerprint leaves content out (a train start indexes names only, it does not read the whole
source); content is guarded per sample instead: whoever reads a sample's bytes checks them against
the size and crc32c recorded at indexing (``reader.check_sample``). The manifest is a parquet table with
the rest in its schema metadata, so a label store can carry it inside and ``train`` can tell a foreign
source from the right one. Stores written before the format-neutral names (a ``tars`` list, a ``tar``
column) still open: ``from_bytes`` reads those names, and the fingerprint hashes the same bytes.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage.errors import printable
from storage.spec import shard_starts

from ..source_errors import MAX_CLASSES, ManifestError, SourceError
from .base import FILE_COLUMN, NO_CRC, SCHEMA
from .reader import Sample, SampleReader
from .registry import FORMATS
from .stamps import stamps_problem

MANIFEST_VERSION = 2  # 2: size and crc32c of every sample; the shard layout (re-cut files)
# The names a manifest written before the format-neutral ones used (a store keeps its manifest's bytes).
OLD_FILES_KEY, OLD_FILE_COLUMN = "tars", "tar"


@dataclass
class Manifest:
    kind: str                 # a key of registry.FORMATS: "imagefolder", "wds" or "parquet" (stored: never renamed)
    root: str                 # directory the relative paths start from
    shards: list[str]         # file names (as-is) or virtual shard names (imagefolder, re-cut)
    class_names: list[str]
    samples: pa.Table         # base.SCHEMA: key, label, shard, position, path, offset, size, crc32c (+ file)
    shard_size: int = 0       # virtual shard size (imagefolder, re-cut files); files as-is: 0
    seed: int = 0             # the shuffle seed (imagefolder, re-cut files); files as-is: 0
    layout: str = ""          # "shuffle" (seeded virtual shards) or "as-is"; "" = the format's default
    files: list[str] = field(default_factory=list)  # re-cut files: their names (column "file" indexes them)
    skipped: tuple[str, ...] = ()  # non-regular files named like images, left out (not serialised)
    # each tar/parquet file's name, size, mtime_ns at indexing (sources.check). Not in to_bytes: a manifest's
    # bytes are the same for every copy of a source; a store keeps them in store.json (storage.meta.SOURCE_STAMPS)
    stamps: dict | None = field(default=None, compare=False)

    def __post_init__(self):
        if not self.layout:
            self.layout = "as-is" if FORMATS[self.kind].recut else "shuffle"
        self._reader = None  # reader.SampleReader, made on the first read

    def __getstate__(self):  # workers get a copy without open files (they make their own reader)
        return {**self.__dict__, "_reader": None}

    # ---- derived views ------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_samples(self) -> int:
        return self.samples.num_rows

    @property
    def file_count(self) -> int | None:
        """The source's files (a re-cut source lists them in ``files``; as-is each shard is one); None for
        a format whose shards are no files of its own (an ImageFolder's virtual shards)."""
        if not FORMATS[self.kind].recut:
            return None
        return len(self.files or self.shards)

    # The shard table (sizes, starts) is a bincount over every sample: worked out once per manifest,
    # not on every read_sample (11-19 ms a call at 1.28M samples), and worked out again only when
    # samples or shards are replaced.
    _SHARD_TABLE = ("shard_sizes", "shard_starts")

    def __setattr__(self, name, value):
        if name in ("samples", "shards", "files", "root"):
            for cached in self._SHARD_TABLE:
                self.__dict__.pop(cached, None)
            self.__dict__["_reader"] = None
        super().__setattr__(name, value)

    @functools.cached_property
    def shard_sizes(self) -> tuple[int, ...]:
        counts = np.bincount(self.samples.column("shard").to_numpy(), minlength=len(self.shards))
        return tuple(int(c) for c in counts)

    @property
    def fingerprint(self) -> str:
        """sha256 over what identifies the data: kind, shard names, keys, labels, positions, classes.

        Paths on disk (root) are left out on purpose: the same shards copied elsewhere are the
        same source.
        """
        h = hashlib.sha256()
        h.update(json.dumps([self.kind, self.shards, self.class_names, self.shard_size, self.seed]).encode())
        # (the same bytes as when the files were called tars: a store compares the fingerprint it carries)
        if self.files:  # the shard layout: a store made from the files as-is is not one for their re-cut
            h.update(json.dumps(["layout", self.layout, self.files]).encode())
        for col in ("key", "label", "shard", "position", "path") + ((FILE_COLUMN,) if self.files else ()):
            arr = self.samples.column(col).combine_chunks()
            for buf in arr.buffers():
                if buf is not None:
                    h.update(buf)
        return h.hexdigest()

    def shard_table(self, shard: int) -> pa.Table:
        start = self.shard_starts[shard]
        return self.samples.slice(start, self.shard_sizes[shard])

    @functools.cached_property
    def shard_starts(self) -> np.ndarray:
        # Samples are stored sorted by (shard, position): a shard is a contiguous slice.
        starts = shard_starts(self.shard_sizes)
        starts.setflags(write=False)  # shared by every caller: nobody may shift it in place
        return starts

    def labels(self, shard: int) -> np.ndarray:
        return self.shard_table(shard).column("label").to_numpy()

    def keys(self, shard: int) -> list[str]:
        return self.shard_table(shard).column("key").to_pylist()

    # ---- serialisation ------------------------------------------------------------------
    def with_checksums_of(self, stored: Manifest) -> Manifest:
        """This manifest (indexed without reading content) with the sizes and crc32c the store's
        manifest recorded: reads then check the bytes precompute labelled. Same fingerprint only."""
        if stored.fingerprint != self.fingerprint:
            raise SourceError("internal: checksums can only come from a manifest of the same source")
        # a format whose index records sizes without reading content (a tar's headers) keeps its own
        cols = ["crc32c"] + ([] if FORMATS[self.kind].sizes_without_content else ["size"])
        t = self.samples
        for c in cols:
            t = t.set_column(t.schema.get_field_index(c), c, stored.samples.column(c))
        return dataclasses.replace(self, samples=t)

    def first_changed_sample(self, other: Manifest) -> str | None:
        """Where two manifests of the same source (same fingerprint) disagree on content, in words."""
        a, b = self.samples.column("crc32c").to_numpy(), other.samples.column("crc32c").to_numpy()
        differ = np.flatnonzero((a != b) & (a != NO_CRC) & (b != NO_CRC))
        if not len(differ):
            return None
        i = int(differ[0])
        key, path = self.samples.column("key")[i].as_py(), self.samples.column("path")[i].as_py()
        return (f"sample {printable(key)!r} ({path}) has other bytes than when the store was made "
                f"(crc32c {int(b[i]):08x} -> {int(a[i]):08x}; {len(differ)} samples differ)")

    def to_bytes(self) -> bytes:
        meta = {
            "version": MANIFEST_VERSION, "kind": self.kind, "root": self.root, "shards": self.shards,
            "class_names": self.class_names, "shard_size": self.shard_size, "seed": self.seed,
            "fingerprint": self.fingerprint, "layout": self.layout, "files": self.files,
        }
        table = self.samples.replace_schema_metadata({b"deit_lockstep": json.dumps(meta).encode()})
        sink = io.BytesIO()
        pq.write_table(table, sink, compression="zstd")
        return sink.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, origin: str = "the label store's manifest.parquet") -> Manifest:
        """The manifest ``to_bytes`` wrote, checked whole before anything uses it (``origin`` names the
        file in the ManifestError): a cut or foreign file must be one line, not a traceback in
        inspect, verify, train or precompute, nor an index beyond a shard or a class."""
        def damaged(why: str) -> ManifestError:
            return ManifestError(f"{origin}: {why}; the store's manifest is damaged or not one precompute wrote: "
                                 "restore the store, or re-run precompute with --overwrite")
        try:
            table = pq.read_table(io.BytesIO(data))
        except (pa.ArrowException, OSError, ValueError) as e:
            raise damaged(f"not a readable parquet file ({printable(_first_line(e))})") from None
        try:
            meta = json.loads((table.schema.metadata or {})[b"deit_lockstep"])
        except (KeyError, ValueError):
            raise damaged("no deit_lockstep metadata (or not JSON)") from None
        meta, table = _new_names(meta, table)
        why = _manifest_meta_problem(meta) or _manifest_columns_problem(table)
        if why:
            raise damaged(why)
        if "crc32c" not in table.column_names:  # a manifest from before checksums: nothing to check
            table = table.append_column("crc32c", pa.array(np.full(table.num_rows, NO_CRC, np.int64)))
        m = cls(kind=meta["kind"], root=meta["root"], shards=meta["shards"],
                class_names=meta["class_names"], samples=table.replace_schema_metadata(None),
                shard_size=meta["shard_size"], seed=meta["seed"], layout=meta.get("layout", ""),
                files=meta.get("files", []))
        why = _manifest_rows_problem(m)
        # (an older version hashed otherwise: its rows are range-checked only)
        if why is None and meta.get("version") == MANIFEST_VERSION and m.fingerprint != meta.get("fingerprint"):
            why = "its rows do not hash to the fingerprint recorded with them"
        if why:
            raise damaged(why)
        return m

    # ---- reading samples ----------------------------------------------------------------
    def reader(self) -> SampleReader:
        """The shared sample reader of this manifest (made once per manifest copy; workers make their own)."""
        if self._reader is None:
            self._reader = SampleReader(self)
        return self._reader

    def read_sample(self, shard: int, position: int) -> Sample:
        """One sample by (shard, position): a file read, one seek into its tar, or its parquet row."""
        return self.reader().read_sample(shard, position)

    def iter_shard(self, shard: int) -> Iterator[Sample]:
        """A whole shard in position order, read in file order (``SampleReader.iter_shard``)."""
        return self.reader().iter_shard(shard)


def stored_manifest(reader) -> Manifest:
    """The manifest inside a label store (a storage reader), checked (``Manifest.from_bytes``)."""
    from storage.base import MANIFEST

    origin = os.path.join(str(reader.path), MANIFEST)
    try:
        data = reader.manifest_bytes
    except OSError as e:
        raise ManifestError(f"{origin}: cannot read the store's manifest ({e.strerror or e}); restore the store, "
                            "or re-run precompute with --overwrite") from None
    m = Manifest.from_bytes(data, origin)
    m.stamps = _stored_stamps(reader)
    return m


def _stored_stamps(reader) -> dict | None:
    """The source's stamps the store recorded at creation (store.json's meta), checked; None for a store made
    before stamps (its source is then indexed in full at each start, as before)."""
    from storage.base import STORE_JSON
    from storage.meta import SOURCE_STAMPS

    stamps = reader.meta.get(SOURCE_STAMPS)
    if stamps is not None and stamps_problem(stamps):
        raise ManifestError(f"{os.path.join(str(reader.path), STORE_JSON)}: {stamps_problem(stamps)}; the store's "
                            "metadata is damaged: restore the store, or re-run precompute with --overwrite")
    return stamps


def _new_names(meta, table: pa.Table) -> tuple[dict, pa.Table]:
    """A manifest written before the format-neutral names, in today's: its ``tars`` are its ``files`` and
    its ``tar`` column is the ``file`` column (the same values, so the same fingerprint)."""
    if isinstance(meta, dict) and OLD_FILES_KEY in meta and "files" not in meta:
        meta = {("files" if k == OLD_FILES_KEY else k): v for k, v in meta.items()}
    names = table.column_names
    if OLD_FILE_COLUMN in names and FILE_COLUMN not in names:
        table = table.rename_columns([FILE_COLUMN if n == OLD_FILE_COLUMN else n for n in names])
    return meta, table


def _manifest_meta_problem(meta) -> str | None:
    """What is wrong with a manifest's metadata (types, kinds), in words; None when nothing is."""
    def strings(v) -> bool:
        return isinstance(v, list) and all(isinstance(x, str) for x in v)
    if not isinstance(meta, dict):
        return "its metadata is not an object"
    checks = {"kind": lambda v: v in FORMATS, "root": lambda v: isinstance(v, str),
              "shards": lambda v: strings(v) and v,
              "class_names": lambda v: strings(v) and 0 < len(v) <= MAX_CLASSES,
              "shard_size": lambda v: isinstance(v, int) and v >= 0, "seed": lambda v: isinstance(v, int),
              "layout": lambda v: v in ("", "shuffle", "as-is"), "files": strings}
    optional = ("layout", "files")  # manifests from before re-cut files lack them
    for key, ok in checks.items():
        if (key not in meta and key not in optional) or (key in meta and not ok(meta[key])):
            return f"its metadata field {key!r} is missing or invalid"
    return None


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _manifest_columns_problem(table: pa.Table) -> str | None:
    """Columns and types a manifest's rows need (crc32c may be absent: written before checksums)."""
    for f in SCHEMA:
        if f.name not in table.column_names:
            if f.name == "crc32c":
                continue
            return f"it has no column {f.name!r}"
        if table.schema.field(f.name).type != f.type:
            return f"its column {f.name!r} is {table.schema.field(f.name).type}, not {f.type}"
    if FILE_COLUMN in table.column_names and table.schema.field(FILE_COLUMN).type != pa.int32():
        return f"its column {FILE_COLUMN!r} is not int32"
    return None


def _manifest_rows_problem(m: Manifest) -> str | None:
    """Every index in range and consistent: labels name a class, shards and files exist, rows sorted by
    (shard, position) with positions 0..n-1 in each shard, offsets and sizes not negative."""
    t = m.samples
    if not t.num_rows:
        return "it lists no samples"
    col = {c: t.column(c).to_numpy() for c in ("label", "shard", "position", "offset", "size", "crc32c")}
    if t.column("key").null_count or t.column("path").null_count or any(t.column(c).null_count for c in col):
        return "it has empty (null) fields"
    label, shard, position = col["label"], col["shard"], col["position"]
    if label.min() < 0 or label.max() >= m.num_classes:
        return f"a label lies outside 0..{m.num_classes - 1}"
    if shard.min() < 0 or shard.max() >= len(m.shards) or (np.diff(shard) < 0).any():
        return f"its shard ids are not sorted within 0..{len(m.shards) - 1}"
    if not np.array_equal(position, np.arange(len(shard)) - m.shard_starts[shard]):
        return "its positions are not 0..n-1 within each shard"
    if col["offset"].min() < 0 or col["size"].min() < 0:
        return "an offset or size is negative"
    if col["crc32c"].min() < NO_CRC or col["crc32c"].max() > 0xFFFFFFFF:
        return "a crc32c lies outside 32 bits"
    if m.files:
        file = t.column(FILE_COLUMN).to_numpy() if FILE_COLUMN in t.column_names else None
        if file is None or t.column(FILE_COLUMN).null_count or file.min() < 0 or file.max() >= len(m.files):
            return f"its file ids lie outside 0..{len(m.files) - 1}"
    elif FILE_COLUMN in t.column_names:
        return f"it has a {FILE_COLUMN!r} column but no files"
    return None



def check_same_classes(train: Manifest, val: Manifest, *, val_src: str) -> None:
    if train.class_names != val.class_names:
        only_train = [printable(n, 40) for n in sorted(set(train.class_names) - set(val.class_names))[:3]]
        only_val = [printable(n, 40) for n in sorted(set(val.class_names) - set(train.class_names))[:3]]
        raise SourceError(f"{val_src}: its classes differ from the training source's "
                          f"(only in train: {only_train}, only in val: {only_val}); use the same class folders")
