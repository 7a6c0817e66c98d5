"""Sources -> manifests: the fixed list of shards and samples every later stage addresses.

A source is an ImageFolder directory (one sub-folder per class), WebDataset tar shards (a
directory of ``.tar`` files, a glob, or a brace pattern) or parquet files in the Hugging Face
``datasets`` layout (the same ways; ``hf_parquet``). Indexing it once gives a ``Manifest``:

- ``shards``: one row per shard (a tar or parquet file, or a virtual shard),
- ``samples``: key, label, shard, position, where its bytes live, and their size and crc32c,
- ``class_names`` and a ``fingerprint`` that changes when any file list, key or label changes.

The fingerprint leaves content out (a train start indexes names only, it does not read the whole
source); content is guarded per sample instead: whoever reads a sample's bytes checks them against
the size and crc32c recorded at indexing and stops with ``SourceChanged`` when they differ, so a
swapped or edited image is "source changed", never labels of another image nor "store damage".
Indexing refuses what it cannot index faithfully, in one line: a tar with two members of one name,
a label outside ``0..C-1``, a folder or file it may not read. Non-regular files (FIFOs, devices,
sockets, dangling links) named like images are skipped, counted and reported, never opened.

An ImageFolder is cut into fixed-size virtual shards after one seeded shuffle, so every shard
mixes classes (a shard is the unit of work and of streaming; a shard of one class would feed a
batch of one class). WebDataset tars (and parquet files) written in class order are re-cut the same way
(``recut_shards``): a seeded permutation of all samples into virtual shards, each sample keeping
its file and its place there (a tar's offset and size, a parquet file's row), so it is read by one
seek into its tar or from its parquet row group. ``--shards auto`` (default) re-cuts when
the tars hold far fewer classes than a random draw of their size would (``class_diversity``);
``as-is`` and ``shuffle`` force either way. The manifest is a parquet table with the rest in its schema metadata, so a
label store can carry it inside and ``train`` can tell a foreign source from the right one.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import glob
import hashlib
import io
import json
import logging
import os
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field

import crc32c
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from braceexpand import UnbalancedBracesError, braceexpand, char_range_re, int_range_re, make_char_range
from PIL import Image

from storage.errors import printable
from storage.spec import shard_starts

from .sample_format import IMAGE_EXTS, LABEL_EXT, MAX_LABEL_BYTES, NO_CRC  # noqa: F401 - re-exported
from .source_errors import (  # noqa: F401 - re-exported
    MAX_CLASSES,
    ManifestError,
    SourceChanged,
    SourceError,
    check_class_count,
    check_label_bound,
    permission_error,
)
from .source_stamps import stamps_of, stamps_problem
from .tar_index import index_tar

PARQUET_EXT = ".parquet"
MANIFEST_VERSION = 2  # 2: size and crc32c of every sample; the shard layout (re-cut tars)
SHARD_LAYOUTS = ("auto", "as-is", "shuffle")
# --shards auto re-cuts tars whose mean distinct classes per shard is under this fraction of a
# random draw's: class-sorted tars sit near 1 / (that draw's count), a shuffled tar near 1.0.
SKEW_THRESHOLD = 0.5
# A brace pattern may name at most this many files: it is counted before it is expanded, so a typo
# such as {0..99999999} is one line at once, not 10 GB of names and a minute and a half before
# "no such file". LAION-5B is ~230,000 tars.
MAX_PATTERN_FILES = 1_000_000

log = logging.getLogger("deit_lockstep.sources")


def source_errors_in_one_line(items):
    """Iterate a DataLoader; a SourceError raised in a worker process is re-raised with its own line.

    torch re-raises a worker's exception as the same type whose message is "Caught X in DataLoader
    worker ...", the traceback, and last "module.X: message"; only that last message is ours."""
    try:
        yield from items
    except SourceError as e:
        last = str(e).strip().splitlines()[-1] if str(e).strip() else ""
        prefix = f"{type(e).__module__}.{type(e).__name__}: "
        raise type(e)(last[len(prefix):] if last.startswith(prefix) else last) from None


@dataclass(frozen=True)
class Sample:
    key: str
    label: int
    shard: int
    position: int
    data: bytes


@dataclass
class Manifest:
    kind: str                 # "imagefolder", "wds" or "parquet" (offset = the row in its file)
    root: str                 # directory the relative paths start from
    shards: list[str]         # tar/parquet file names (as-is) or virtual shard names (imagefolder, re-cut)
    class_names: list[str]
    samples: pa.Table         # key, label, shard, position, path, offset, size, crc32c
    shard_size: int = 0       # virtual shard size (imagefolder, re-cut wds/parquet); wds/parquet as-is: 0
    seed: int = 0             # the shuffle seed (imagefolder, re-cut wds/parquet); wds/parquet as-is: 0
    layout: str = ""          # "shuffle" (seeded virtual shards) or "as-is"; "" = the kind's default
    tars: list[str] = field(default_factory=list)  # a re-cut wds/parquet: its files (column "tar" indexes them)
    skipped: tuple[str, ...] = ()  # non-regular files named like images, left out (not serialised)
    # each tar/parquet file's name, size, mtime_ns at indexing (source_check); no part of what the manifest is
    stamps: dict | None = field(default=None, compare=False)

    def __post_init__(self):
        if not self.layout:
            self.layout = "shuffle" if self.kind == "imagefolder" else "as-is"
        self._rows = None  # parquet: hf_parquet.ParquetRows, opened on the first read

    def __getstate__(self):  # workers get a copy without open files
        return {**self.__dict__, "_rows": None}

    def parquet_rows(self):
        """Row-group reader of a parquet source's files (opened once per manifest copy)."""
        if self._rows is None:
            from .hf_parquet import ParquetRows
            self._rows = ParquetRows(self.root, self.tars or self.shards)
        return self._rows

    # ---- derived views ------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_samples(self) -> int:
        return self.samples.num_rows

    # The shard table (sizes, starts) is a bincount over every sample: worked out once per manifest,
    # not on every read_sample (11-19 ms a call at 1.28M samples), and worked out again only when
    # samples or shards are replaced.
    _SHARD_TABLE = ("shard_sizes", "shard_starts")

    def __setattr__(self, name, value):
        if name in ("samples", "shards"):
            for cached in self._SHARD_TABLE:
                self.__dict__.pop(cached, None)
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
        if self.tars:  # the shard layout: a store made from the tars as-is is not one for their re-cut
            h.update(json.dumps(["layout", self.layout, self.tars]).encode())
        for col in ("key", "label", "shard", "position", "path") + (("tar",) if self.tars else ()):
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
        cols = ["crc32c"] + (["size"] if self.kind != "wds" else [])  # wds sizes come from the tar headers
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
            "fingerprint": self.fingerprint, "layout": self.layout, "tars": self.tars,
        }
        if self.stamps is not None:  # not part of the fingerprint: a copy of the source is the same source
            meta["stamps"] = self.stamps
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
        why = _manifest_meta_problem(meta) or _manifest_columns_problem(table)
        if why:
            raise damaged(why)
        if "crc32c" not in table.column_names:  # a manifest from before checksums: nothing to check
            table = table.append_column("crc32c", pa.array(np.full(table.num_rows, NO_CRC, np.int64)))
        m = cls(kind=meta["kind"], root=meta["root"], shards=meta["shards"],
                class_names=meta["class_names"], samples=table.replace_schema_metadata(None),
                shard_size=meta["shard_size"], seed=meta["seed"], layout=meta.get("layout", ""),
                tars=meta.get("tars", []), stamps=meta.get("stamps"))
        why = _manifest_rows_problem(m)
        # (an older version hashed otherwise: its rows are range-checked only)
        if why is None and meta.get("version") == MANIFEST_VERSION and m.fingerprint != meta.get("fingerprint"):
            why = "its rows do not hash to the fingerprint recorded with them"
        if why:
            raise damaged(why)
        return m

    # ---- reading samples ----------------------------------------------------------------
    def read_sample(self, shard: int, position: int) -> Sample:
        """One sample by (shard, position): a file read, or one seek into its tar."""
        row = self.shard_table(shard).slice(position, 1).to_pylist()[0]
        if self.kind == "imagefolder":
            path = os.path.join(self.root, row["path"])
            data = _read_file(path)
        elif self.kind == "parquet":
            file = row["tar"] if self.tars else shard
            path = self.parquet_rows().path(file)
            data = self.parquet_rows().image(file, row["offset"])
        else:
            path = os.path.join(self.root, self.tar_of(shard, row))
            try:
                with open(path, "rb") as f:
                    f.seek(row["offset"])
                    data = f.read(row["size"])
            except PermissionError:
                raise permission_error(path) from None
        check_sample(row["key"], path, data, row["size"], row["crc32c"])
        return Sample(row["key"], row["label"], shard, position, data)

    def tar_of(self, shard: int, row: dict) -> str:
        """The tar file holding a sample (a row of ``samples``)."""
        return self.tars[row["tar"]] if self.tars else self.shards[shard]

    def iter_shard(self, shard: int) -> Iterator[Sample]:
        """A whole shard in position order; a tar is read once, front to back, no seeks (a
        re-cut shard: one seek per sample, in file order, yielded in position order)."""
        rows = self.shard_table(shard).to_pylist()
        if self.kind == "parquet":  # by (file, row): each row group read once (hf_parquet.ParquetRows)
            rs = self.parquet_rows()
            for r in sorted(rows, key=lambda r: (r.get("tar", shard), r["offset"])):
                file = r["tar"] if self.tars else shard
                data = rs.image(file, r["offset"])
                check_sample(r["key"], rs.path(file), data, r["size"], r["crc32c"])
                r["data"] = data
            for r in rows:
                yield Sample(r["key"], r["label"], shard, r["position"], r.pop("data"))
            return
        if self.tars:
            yield from _iter_recut(self.root, self.tars, shard, rows)
            return
        if self.kind == "imagefolder":
            for r in rows:
                path = os.path.join(self.root, r["path"])
                data = _read_file(path)
                check_sample(r["key"], path, data, r["size"], r["crc32c"])
                yield Sample(r["key"], r["label"], shard, r["position"], data)
            return
        by_member = {r["path"]: r for r in rows}
        path = os.path.join(self.root, self.shards[shard])
        try:
            with tarfile.open(path, mode="r|*") as tar:
                for member in tar:
                    r = by_member.get(member.name)
                    if r is not None:
                        data = tar.extractfile(member).read()
                        del by_member[member.name]  # indexing refused duplicates: one copy per name
                        check_sample(r["key"], path, data, r["size"], r["crc32c"])  # SourceChanged is no OSError
                        yield Sample(r["key"], r["label"], shard, r["position"], data)
        except (tarfile.TarError, OSError, EOFError):
            pass  # a tar cut off (or damaged) after indexing: what is left is undecodable, below
        for r in by_member.values():  # every sample once, so its views are flagged, not lost
            check_sample(r["key"], path, b"", r["size"], r["crc32c"])
            yield Sample(r["key"], r["label"], shard, r["position"], b"")


def stored_manifest(reader) -> Manifest:
    """The manifest inside a label store (a storage reader), checked (``Manifest.from_bytes``)."""
    from storage.base import MANIFEST

    origin = os.path.join(str(reader.path), MANIFEST)
    try:
        data = reader.manifest_bytes
    except OSError as e:
        raise ManifestError(f"{origin}: cannot read the store's manifest ({e.strerror or e}); restore the store, "
                            "or re-run precompute with --overwrite") from None
    return Manifest.from_bytes(data, origin)


_MANIFEST_KINDS = ("imagefolder", "wds", "parquet")


def _manifest_meta_problem(meta) -> str | None:
    """What is wrong with a manifest's metadata (types, kinds), in words; None when nothing is."""
    def strings(v) -> bool:
        return isinstance(v, list) and all(isinstance(x, str) for x in v)
    if not isinstance(meta, dict):
        return "its metadata is not an object"
    checks = {"kind": lambda v: v in _MANIFEST_KINDS, "root": lambda v: isinstance(v, str),
              "shards": lambda v: strings(v) and v,
              "class_names": lambda v: strings(v) and 0 < len(v) <= MAX_CLASSES,
              "shard_size": lambda v: isinstance(v, int) and v >= 0, "seed": lambda v: isinstance(v, int),
              "layout": lambda v: v in ("", "shuffle", "as-is"), "tars": strings}
    optional = ("layout", "tars")  # manifests from before re-cut tars lack them
    for key, ok in checks.items():
        if (key not in meta and key not in optional) or (key in meta and not ok(meta[key])):
            return f"its metadata field {key!r} is missing or invalid"
    return stamps_problem(meta["stamps"]) if "stamps" in meta else None  # absent: written before stamps


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _manifest_columns_problem(table: pa.Table) -> str | None:
    """Columns and types a manifest's rows need (crc32c may be absent: written before checksums)."""
    for f in _SCHEMA:
        if f.name not in table.column_names:
            if f.name == "crc32c":
                continue
            return f"it has no column {f.name!r}"
        if table.schema.field(f.name).type != f.type:
            return f"its column {f.name!r} is {table.schema.field(f.name).type}, not {f.type}"
    if "tar" in table.column_names and table.schema.field("tar").type != pa.int32():
        return "its column 'tar' is not int32"
    return None


def _manifest_rows_problem(m: Manifest) -> str | None:
    """Every index in range and consistent: labels name a class, shards and tars exist, rows sorted by
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
    if m.tars:
        tar = t.column("tar").to_numpy() if "tar" in t.column_names else None
        if tar is None or t.column("tar").null_count or tar.min() < 0 or tar.max() >= len(m.tars):
            return f"its tar ids lie outside 0..{len(m.tars) - 1}"
    elif "tar" in t.column_names:
        return "it has a 'tar' column but no tars"
    return None


def read_regular_file(path: str) -> bytes:
    """A file's bytes. Never blocks on a FIFO or device swapped in after indexing (O_NONBLOCK, then
    only a regular file is read); a permission problem is a one-line SourceError."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except PermissionError:
        raise permission_error(path) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SourceChanged(f"{path} is not a regular file any more (a FIFO, device or socket?); "
                                "restore the image file, or re-run precompute on the new source")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


def _iter_recut(root: str, tars: list[str], shard: int, rows: list[dict]) -> Iterator[Sample]:
    """A re-cut shard's samples in position order, each tar opened once and read forwards; every
    sample's bytes checked against the manifest (a changed sample is SourceChanged)."""
    data = {r["position"]: b"" for r in rows}  # unreadable stays empty: undecodable, its views flagged
    by_tar: dict[int, list[dict]] = {}
    for r in rows:
        by_tar.setdefault(r["tar"], []).append(r)
    for tar, members in sorted(by_tar.items()):
        path = os.path.join(root, tars[tar])
        try:
            with open(path, "rb") as f:
                for r in sorted(members, key=lambda r: r["offset"]):
                    f.seek(r["offset"])
                    data[r["position"]] = f.read(r["size"])
                    check_sample(r["key"], path, data[r["position"]], r["size"], r["crc32c"])
        except PermissionError:
            raise permission_error(path) from None
        except OSError:
            pass  # a tar cut short or gone: the samples not read stay empty and are flagged
    for r in rows:
        yield Sample(r["key"], r["label"], shard, r["position"], data[r["position"]])


def _read_file(path: str) -> bytes:
    try:
        return read_regular_file(path)
    except OSError:  # a SourceError (permission denied, not a regular file) is no OSError: it propagates
        # Gone or unreadable (EIO): empty bytes. check_sample then calls it a changed source when the
        # manifest recorded its bytes, else it is an undecodable image whose views get flagged.
        return b""


def check_sample(key: str, path: str, data: bytes, size: int, crc: int) -> None:
    """Raise SourceChanged when bytes read differ from those indexed (size, then crc32c)."""
    if crc == NO_CRC:
        return
    if len(data) != size or crc32c.crc32c(data) != crc:
        raise SourceChanged(
            f"sample {printable(key)!r} in {path} changed since it was indexed ({size} bytes crc32c {crc:08x} then, "
            f"{len(data)} bytes crc32c {crc32c.crc32c(data):08x} now): the source changed, the label store "
            "is not damaged; re-run precompute on the new source (--overwrite), or restore the original file")


@dataclass(frozen=True)
class Undecodable:
    """What ``decode_image`` returns for bytes that are no image it can decode (``reason``: the
    exception's name). A value, not an exception: every reader (precompute, the loader, probes,
    verify, inspect) flags the image and goes on, and none can miss a kind of failure."""
    reason: str


def decode_image(data: bytes) -> Image.Image | Undecodable:
    """Bytes -> RGB PIL image, fully loaded; ``Undecodable`` for anything else, never an exception.

    Image bytes are untrusted: Pillow's plugins raise far more than OSError on hostile input
    (DecompressionBombError for a 20000x20000 PNG of 1 MB, NotImplementedError, SyntaxError,
    struct.error, ...), so every failure of the decode is caught here, in one place."""
    if not data:
        return Undecodable("empty file")
    try:
        return _to_rgb(_loaded(data))
    except Exception as e:  # noqa: BLE001 - any failure to decode hostile bytes is the image's, see above
        return Undecodable(type(e).__name__)


def _loaded(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def _to_rgb(im: Image.Image) -> Image.Image:
    # Most photos are RGB already: convert() would only copy them.
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I;16") or im.mode == "I":
        # 16-bit grayscale: Pillow's convert() clips to 255 (a white image). Keep the high byte, as
        # Pillow itself does for 16-bit RGB(A) PNGs, so one picture decodes the same in any of them.
        a = np.asarray(im).astype(np.int64)
        a = (np.clip(a, 0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(np.repeat(a[:, :, None], 3, axis=2), "RGB")
    return im.convert("RGB")


# ---- indexing ---------------------------------------------------------------------------
_SCHEMA = pa.schema([
    ("key", pa.string()), ("label", pa.int32()), ("shard", pa.int32()), ("position", pa.int32()),
    ("path", pa.string()), ("offset", pa.int64()), ("size", pa.int64()), ("crc32c", pa.int64()),
])


def index_source(src: str, *, shard_size: int = 1024, seed: int = 0, shards: str = "auto",
                 checksums: bool = True) -> Manifest:
    """Index an ImageFolder directory, WebDataset shards or Hugging Face parquet files into a
    manifest (see module doc).

    ``shards``: "auto" (ImageFolder: seeded virtual shards; WebDataset and parquet: re-cut only if
    the files are class-skewed), "shuffle" (always re-cut) or "as-is" (the files, or the folder order).
    checksums=True reads every sample once to record its size and crc32c (precompute); False
    records names and labels only (a train or verify start, which then takes the checksums from
    the store's manifest: ``Manifest.with_checksums_of``).
    """
    if shards not in SHARD_LAYOUTS:
        raise SourceError(f"--shards {shards!r} is not one of {', '.join(SHARD_LAYOUTS)}")
    if os.path.isdir(src) and not _tar_files_in(src) and not _files_in(src, PARQUET_EXT):
        return _index_imagefolder(src, shard_size=shard_size, seed=seed, shuffle=shards != "as-is",
                                  checksums=checksums)
    files = expand_files(src)
    parquet = [f.endswith(PARQUET_EXT) for f in files]
    if any(parquet) and not all(parquet):
        other = files[parquet.index(False)]
        raise SourceError(f"{src}: mixes .parquet files with others ({other}); a source is one kind of "
                          "files: narrow the pattern given to --data")
    if files and all(parquet):
        m = _index_parquet(src, files, checksums=checksums)
    else:
        m = _index_wds(src, checksums=checksums)
    return apply_layout(m, shards=shards, shard_size=shard_size, seed=seed)


def apply_layout(m: Manifest, *, shards: str = "auto", shard_size: int = 1024, seed: int = 0) -> Manifest:
    """A wds or parquet manifest of its files as-is -> the layout asked for (``index_source``'s ``shards``)."""
    if shards == "shuffle" or (shards == "auto" and is_class_skewed(m)):
        return recut_shards(m, shard_size=shard_size, seed=seed)
    return m


def layout_for_store(asked: str, stored: Manifest, store: str) -> tuple[str, str | None]:
    """(the layout to index a source in for the store at ``store``, made from ``stored``; None), or
    (``asked``, why it cannot be: one line, the caller adds its own fix and error type).

    ``--shards auto`` means the store's layout: indexing the source again must find the shards the store
    was made from, whatever auto would pick for the source alone. An explicit layout other than the
    store's cannot match it, and is named as such before any indexing, so the user hears that the layout
    differs rather than that the data is another source."""
    if asked == "auto" or asked == stored.layout:
        return stored.layout, None
    return asked, (f"the store {store} was made with --shards {stored.layout}, not --shards {asked}; "
                   f"pass --shards {stored.layout} or auto (the store's layout)")


# ---- class diversity per shard, and the re-cut ------------------------------------------------
@dataclass(frozen=True)
class ClassDiversity:
    """Distinct classes per shard, observed and expected of a random draw of the shard's size."""
    observed: np.ndarray   # [S] distinct classes in each shard
    expected: np.ndarray   # [S] sum_c 1 - (1 - p_c)^n_j, p = the source's class frequencies

    @property
    def ratio(self) -> float:
        """Mean observed / mean expected: about 1 for shuffled shards, about 1/n_j * C for sorted ones."""
        return float(self.observed.mean() / max(self.expected.mean(), 1e-12))


def class_diversity(m: Manifest) -> ClassDiversity:
    shard = m.samples.column("shard").to_numpy().astype(np.int64)
    label = m.samples.column("label").to_numpy().astype(np.int64)
    c = max(m.num_classes, int(label.max()) + 1 if len(label) else 1)
    distinct = np.unique(shard * c + label) // c
    observed = np.bincount(distinct, minlength=len(m.shards)).astype(np.float64)
    p = np.bincount(label, minlength=c) / max(len(label), 1)
    p = p[p > 0]
    n = np.asarray(m.shard_sizes, dtype=np.float64)
    return ClassDiversity(observed, _expected_distinct(p, n))


def _expected_distinct(p: np.ndarray, n: np.ndarray) -> np.ndarray:
    """sum_c 1 - (1 - p_c)^n_j for each shard size n_j: worked out once per distinct size and indexed
    ([classes x distinct sizes], not [classes x shards]: 5.4 GB and ~1 min at 21,841 classes and 14,000
    shards). Bit-identical to the [classes x shards] sum: numpy adds the rows of a 2-D array one after
    another (per column, in class order) but sums a single column pairwise, so a fleet of equal shards
    keeps a second, duplicate column to be summed the way it always was."""
    sizes, shard_of = np.unique(n, return_inverse=True)
    if len(n) > 1 and len(sizes) == 1:
        sizes = np.repeat(sizes, 2)
    per_size = (1.0 - np.power.outer(1.0 - p, sizes)).sum(axis=0)
    return per_size[shard_of.reshape(-1)]


def is_class_skewed(m: Manifest) -> bool:
    """True when the shards hold far fewer classes than random draws of their sizes would."""
    return len(m.shards) > 1 and class_diversity(m).ratio < SKEW_THRESHOLD


def recut_shards(m: Manifest, *, shard_size: int, seed: int) -> Manifest:
    """A wds or parquet manifest -> seeded virtual shards of ``shard_size`` across its files.

    Every sample keeps its member path, offset (a parquet sample's: its row) and size and gains a
    ``tar`` column (index into ``Manifest.tars``, which lists tars and parquet files alike), so a
    virtual shard is read by one seek per sample into a tar, or from the parquet row groups it needs.
    """
    if shard_size < 1:
        raise SourceError(f"--shard-size must be >= 1, got {shard_size}")
    n = m.num_samples
    order = np.random.Generator(np.random.Philox(key=[seed, 0x5eed])).permutation(n)
    idx = np.arange(n)
    t = m.samples.take(pa.array(order))
    tar = t.column("shard").cast(pa.int32())
    t = t.set_column(t.schema.get_field_index("shard"), "shard", pa.array((idx // shard_size).astype(np.int32)))
    t = t.set_column(t.schema.get_field_index("position"), "position",
                     pa.array((idx % shard_size).astype(np.int32)))
    t = t.append_column("tar", tar)
    shards = [f"virtual-{i:06d}" for i in range((n + shard_size - 1) // shard_size)]
    return Manifest(m.kind, m.root, shards, m.class_names, t, shard_size, seed, "shuffle", list(m.shards),
                    stamps=m.stamps)


def _files_in(directory: str, ext: str) -> list[str]:
    try:
        return sorted(f for f in os.listdir(directory) if f.endswith(ext))
    except PermissionError:
        raise permission_error(directory, "list this folder") from None


def _tar_files_in(directory: str) -> list[str]:
    return _files_in(directory, ".tar")


def _report_skipped(root: str, skipped: list[str]) -> None:
    if skipped:
        log.warning("%s: skipped %d non-regular file(s) named like images (FIFO, device, socket or dangling "
                    "link), e.g. %s; they are not images and are never opened", root, len(skipped), skipped[0])


def _index_imagefolder(root: str, *, shard_size: int, seed: int, shuffle: bool = True,
                       checksums: bool = True) -> Manifest:
    if shard_size < 1:
        raise SourceError(f"--shard-size must be >= 1, got {shard_size}")
    try:
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    except PermissionError:
        raise permission_error(root, "list this folder") from None
    if not classes:
        raise SourceError(f"{root}: no class folders found; an ImageFolder source needs one sub-folder per class")

    def unlistable(e: OSError):  # os.walk skips a folder it cannot list: a class would vanish silently
        if e.errno in (errno.EACCES, errno.EPERM):
            raise permission_error(e.filename, "list this folder") from None
        raise SourceError(f"{e.filename}: cannot list this folder ({e.strerror}); fix or remove it") from None

    paths, labels, sizes, crcs, skipped = [], [], [], [], []
    for label, name in enumerate(classes):
        for dirpath, dirnames, files in os.walk(os.path.join(root, name), onerror=unlistable):
            dirnames.sort()
            for f in sorted(files):
                if f.lower().endswith(IMAGE_EXTS):
                    full = os.path.join(dirpath, f)
                    rel = os.path.relpath(full, root)
                    try:
                        st = os.stat(full)  # follows links: a link to an image is an image
                    except PermissionError:
                        raise permission_error(full) from None
                    except FileNotFoundError:
                        st = None  # a dangling link
                    if st is None or not stat.S_ISREG(st.st_mode):
                        skipped.append(rel)  # opening a FIFO would hang the run
                        continue
                    if checksums:
                        data = read_regular_file(full)
                        sizes.append(len(data))
                        crcs.append(crc32c.crc32c(data))
                    paths.append(rel)
                    labels.append(label)
    _report_skipped(root, skipped)
    if not paths:
        raise SourceError(f"{root}: no images ({', '.join(IMAGE_EXTS)}) in its class folders")
    # One seeded shuffle, then fixed-size virtual shards: every shard mixes classes.
    order = np.random.Generator(np.random.Philox(key=[seed, 0x5eed])).permutation(len(paths))
    n = len(paths)
    if not shuffle:  # --shards as-is: folder order (class-sorted shards, on request)
        order = np.arange(n)
    idx = np.arange(n)
    table = pa.table({
        "key": [os.path.splitext(paths[i])[0] for i in order],
        "label": pa.array(np.asarray(labels, dtype=np.int32)[order]),
        "shard": pa.array((idx // shard_size).astype(np.int32)),
        "position": pa.array((idx % shard_size).astype(np.int32)),
        "path": [paths[i] for i in order],
        "offset": pa.array(np.zeros(n, dtype=np.int64)),
        "size": pa.array(np.asarray(sizes, np.int64)[order] if checksums else np.zeros(n, dtype=np.int64)),
        "crc32c": pa.array(np.asarray(crcs, np.int64)[order] if checksums else np.full(n, NO_CRC, np.int64)),
    }, schema=_SCHEMA)
    num_shards = (n + shard_size - 1) // shard_size
    shards = [f"virtual-{i:06d}" for i in range(num_shards)]
    return Manifest("imagefolder", os.path.abspath(root), shards, classes, table, shard_size, seed,
                    "shuffle" if shuffle else "as-is", skipped=tuple(skipped))


def expand_wds(src: str) -> list[str]:
    """A directory of .tar files, a glob, or a brace pattern -> sorted list of tar paths."""
    return expand_files(src, ".tar")


def expand_files(src: str, ext: str | None = None) -> list[str]:
    """A directory (its .tar files, else its .parquet files), a glob, a brace pattern or one file -> paths."""
    if os.path.isdir(src):
        names = _files_in(src, ext) if ext else (_tar_files_in(src) or _files_in(src, PARQUET_EXT))
        return [os.path.join(src, f) for f in names]
    if any(c in src for c in "{}"):
        return expand_braces(src)
    if any(c in src for c in "*?["):
        return sorted(glob.glob(src))
    return [src]


def expand_braces(src: str) -> list[str]:
    """A brace pattern -> its files, counted before they are expanded (braceexpand builds every name
    of a range up front) and each named once: a file named twice would repeat all its samples."""
    try:
        count = brace_count(src)
        if count > MAX_PATTERN_FILES:
            raise SourceError(f"--data {printable(src)}: the pattern names {count:,} files, more than the "
                              f"{MAX_PATTERN_FILES:,} a source may have; check its ranges")
        files = list(braceexpand(src))
    except UnbalancedBracesError:
        raise SourceError(f"--data {printable(src)}: unbalanced braces in the pattern; close every '{{' "
                          "with '}' (or escape a literal brace as \\{)") from None
    seen: dict[str, str] = {}
    for f in files:
        same = seen.setdefault(os.path.normpath(os.path.abspath(f)), f)
        if same is not f:
            raise SourceError(f"--data {printable(src)}: the pattern names {printable(f)} twice (as {printable(same)} "
                              "too), which would repeat its samples; name every file once")
    return files


def brace_count(pattern: str) -> int:
    """How many strings ``braceexpand(pattern)`` yields, without building them; the same grammar
    (a product of literals and {a,b} / {1..9} / {a..z} items, nested, backslash escapes)."""
    total, start, pos, depth = 1, 0, 0, 0
    while pos < len(pattern):
        c = pattern[pos]
        if c == "\\":
            pos += 2
            continue
        if c == "{":
            if depth == 0:
                start = pos
            depth += 1
        elif c == "}":  # as braceexpand: a stray "}" unbalances the pattern
            depth -= 1
            if depth == 0:
                expr = pattern[start + 1:pos]
                n = _brace_item_count(expr)
                total *= brace_count(expr) if n is None else n  # no item: literal braces around a pattern
        pos += 1
    if depth:
        raise UnbalancedBracesError(pattern)
    return total


def _brace_item_count(expr: str) -> int | None:
    """Strings of one brace item: a range or a comma sequence; None when it is neither."""
    m = int_range_re.match(expr)
    if m:
        a, b, step = m.groups()
        step = (int(step) or 1) if step else 1
        a, b = int(a), int(b)
        return len(range(a, b + 1, step) if a < b else range(a, b - 1, -step))
    m = char_range_re.match(expr)
    if m:
        return len(make_char_range(*m.groups()))
    parts, start, pos, depth = [], 0, 0, 0
    while pos < len(expr):
        c = expr[pos]
        if c == "\\":
            pos += 2
            continue
        depth += (c == "{") - (c == "}")
        if c == "," and depth == 0:
            parts.append(expr[start:pos])
            start = pos + 1
        pos += 1
    if depth or not parts:
        return None
    return sum(brace_count(p) for p in parts + [expr[start:]])


def check_outside_source(src: str, out: str, option: str = "--out") -> None:
    """Refuse an output folder (a label store, a train run) inside the source directory ``src``.

    An ImageFolder indexes every sub-folder as a class: a store written inside it becomes one more
    class, so the next run indexes another source and refuses its own store. Stores and runs belong
    beside the data, never in it (the rule holds for any source directory, so it is one rule)."""
    if not os.path.isdir(src):
        return
    root, target = os.path.realpath(src), os.path.realpath(out)
    if target == root or target.startswith(root.rstrip(os.sep) + os.sep):
        raise SourceError(f"{option} {printable(out)} is inside the source --data {printable(src)}: the source would "
                          f"change under it (an ImageFolder would gain a class); put {option} outside {printable(src)}")


def _check_files(src: str, files: list[str]) -> str:
    """The files of a tar or parquet source exist, are regular and sit in one directory: that directory."""
    for f in files:
        if not os.path.isfile(f):
            what = "not a regular file (a FIFO or device?)" if os.path.exists(f) else "no such file"
            raise SourceError(f"{f}: {what}; check the path or pattern given to --data")
    root = os.path.dirname(os.path.abspath(files[0]))
    if any(os.path.dirname(os.path.abspath(f)) != root for f in files):
        raise SourceError(f"{src}: shards must sit in one directory")
    return root


def _index_parquet(src: str, files: list[str], checksums: bool = True) -> Manifest:
    """Parquet files in the Hugging Face ``datasets`` layout -> a manifest of the files as-is.

    Key ``<file stem>/<row>``, path the image's own ``path`` field, offset its row in the file. Class
    names: the ``ClassLabel`` names in the files' ``huggingface`` metadata, else ``classes.txt``
    beside the files, else "0".."C-1"."""
    from .hf_parquet import index_file

    root = _check_files(src, files)
    stamps = stamps_of(root, files)  # before reading: a file changed meanwhile fails its stamp next time
    cols = {name: [] for name in _SCHEMA.names}
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
        names = _wds_class_names(root, int(labels.max()) + 1)
        named_by = os.path.join(root, "classes.txt")
    if labels.max() >= len(names):
        i = int(np.argmax(labels >= len(names)))
        raise SourceError(f"{files_of[i]}: row {cols['offset'][i]} has label {labels[i]}, but {named_by} names "
                          f"{len(names)} classes (0..{len(names) - 1}); fix the label or the class names")
    return Manifest("parquet", root, [os.path.basename(f) for f in files], names, pa.table(cols, schema=_SCHEMA),
                    stamps=stamps)


def _index_wds(src: str, checksums: bool = True) -> Manifest:
    files = expand_wds(src)
    if not files:
        raise SourceError(f"{src}: no such directory or shards; pass an ImageFolder directory, .tar shards or "
                          ".parquet files (a directory, a glob or a brace pattern)")
    root = _check_files(src, files)
    stamps = stamps_of(root, files)  # before reading: a tar changed meanwhile fails its stamp next time
    cols = {name: [] for name in _SCHEMA.names}
    for shard, path in enumerate(files):
        for pos, (key, member, offset, size, label, crc) in enumerate(_index_tar(path, checksums)):
            if label < 0:  # numpy would read -1 as the last class
                raise SourceError(f"{path}: sample {printable(key)!r} has label {label} in its .cls; labels are class "
                                  "indices 0..C-1: fix the label")
            for name, v in zip(_SCHEMA.names, (key, label, shard, pos, member, offset, size, crc), strict=True):
                cols[name].append(v)
    if not cols["key"]:
        raise SourceError(f"{src}: the shards hold no images ({', '.join(IMAGE_EXTS)})")
    table = pa.table(cols, schema=_SCHEMA)
    num_classes = int(max(cols["label"])) + 1
    names = _wds_class_names(root, num_classes)
    labels = np.asarray(cols["label"])
    if labels.max() >= len(names):  # classes.txt is shorter than the labels used
        i = int(np.argmax(labels >= len(names)))
        raise SourceError(f"{files[cols['shard'][i]]}: sample {printable(cols['key'][i])!r} has label {labels[i]}, but "
                          f"{os.path.join(root, 'classes.txt')} lists {len(names)} classes (0..{len(names) - 1}); "
                          "fix the label or classes.txt")
    return Manifest("wds", root, [os.path.basename(f) for f in files], names, table, stamps=stamps)


def _index_tar(path: str, checksums: bool = True) -> list[tuple[str, str, int, int, int, int]]:
    """(key, image member, data offset, size, label, crc32c) per sample, in tar order; one pass.

    Two members of one name (valid in a tar: ``tar -r`` appends a second copy) are refused: a
    sequential reader would take one copy and a seek by offset the other.

    The headers are read directly (``tar_index``, well under 10 us a sample); this ``tarfile`` loop
    reads the tars that needs (see ``tar_headers``), by the same rules."""
    fast = index_tar(path, checksums)
    if fast is not None:
        return fast
    images: dict[str, tarfile.TarInfo] = {}
    crcs: dict[str, int] = {}
    labels: dict[str, int] = {}
    order: list[str] = []
    names: set[str] = set()
    try:
        with tarfile.open(path, mode="r:") as tar:
            for m in _members_until_cut(tar):
                if not m.isfile():
                    continue
                if m.name in names:
                    raise SourceError(f"{path}: member {printable(m.name)!r} appears twice (appended with tar -r?); "
                                      "readers would disagree on which copy is the sample: rewrite the shard "
                                      "with one copy")
                names.add(m.name)
                base = os.path.basename(m.name)
                # WebDataset's convention: the key is the path up to the first dot of the basename.
                key = os.path.join(os.path.dirname(m.name), base.split(".", 1)[0])
                ext = "." + base.split(".", 1)[1].lower() if "." in base else ""
                if key not in images and key not in labels:
                    order.append(key)
                if ext in IMAGE_EXTS:
                    if key in images:
                        raise SourceError(f"{path}: sample {printable(key)!r} has two images "
                                          f"({printable(images[key].name)}, {printable(m.name)}); "
                                          "keep one per sample")
                    images[key] = m
                    if checksums:
                        try:
                            crcs[key] = crc32c.crc32c(tar.extractfile(m).read())
                        except (tarfile.ReadError, EOFError, OSError):
                            crcs[key] = NO_CRC  # the file ends inside this image (a cut copy): undecodable
                elif ext == LABEL_EXT:
                    try:  # a class index is a few digits: a longer .cls is no label, read no more of it
                        text = tar.extractfile(m).read(min(m.size, MAX_LABEL_BYTES)).decode(errors="replace").strip()
                    except tarfile.ReadError:
                        break  # the file ends inside this label: the tar was cut here
                    try:
                        if m.size > MAX_LABEL_BYTES:
                            raise ValueError
                        labels[key] = int(text)
                    except ValueError:
                        raise SourceError(f"{path}: sample {printable(key)!r} has a non-integer label "
                                          f"{printable(text, 40)!r} in its .cls") from None
                    check_label_bound(labels[key], f"{path}: sample {printable(key)!r}")
    except tarfile.ReadError as e:
        raise SourceError(f"{path}: not a readable tar ({e}); re-create the shard") from None
    except PermissionError:
        raise permission_error(path) from None
    out = []
    for key in order:
        if key not in images:
            continue
        if key not in labels:
            raise SourceError(f"{path}: sample {printable(key)!r} has no .cls label; every WebDataset sample "
                              "needs KEY.cls")
        m = images[key]
        out.append((key, m.name, m.offset_data, m.size, labels[key], crcs.get(key, NO_CRC)))
    return out


def _members_until_cut(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """A tar's members up to where the file ends early (a copy cut off mid-member): the member
    being cut is indexed and, undecodable, gets its views flagged; the run goes on. A tar that is
    unreadable from its first header still raises."""
    while True:
        try:
            m = tar.next()
        except tarfile.ReadError:
            if tar.offset == 0:
                raise
            return
        if m is None:
            return
        yield m


def _wds_class_names(root: str, num_classes: int) -> list[str]:
    """Class names from ``classes.txt`` (one per line) beside the shards, else "0".."C-1".

    ``num_classes`` comes from the largest label, which the caller bounded (check_label_bound)."""
    path = os.path.join(root, "classes.txt")
    if os.path.isfile(path):
        names = []
        with open(path, errors="replace") as f:
            for line in f:
                if line.strip():
                    names.append(line.strip())
                    check_class_count(len(names), path)  # stop reading a hostile file early
        return names  # fewer names than labels used: _index_wds names the sample
    return [str(i) for i in range(num_classes)]


def check_same_classes(train: Manifest, val: Manifest, *, val_src: str) -> None:
    if train.class_names != val.class_names:
        only_train = [printable(n, 40) for n in sorted(set(train.class_names) - set(val.class_names))[:3]]
        only_val = [printable(n, 40) for n in sorted(set(val.class_names) - set(train.class_names))[:3]]
        raise SourceError(f"{val_src}: its classes differ from the training source's "
                          f"(only in train: {only_train}, only in val: {only_val}); use the same class folders")


def write_wds_shards(samples: list[tuple[str, bytes, str, int]], out_dir: str, *, per_shard: int,
                     prefix: str = "shard", class_names: list[str] | None = None) -> list[str]:
    """Write (key, image bytes, image ext, label) samples as WebDataset tars; used by the demo and tests.

    Each file appears whole or not at all, and durably (storage.fsutil): a demo killed mid-write leaves
    no torn shard for the next run to index."""
    import webdataset as wds

    from storage.fsutil import atomic_file, atomic_write

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for start in range(0, len(samples), per_shard):
        path = os.path.join(out_dir, f"{prefix}-{start // per_shard:06d}.tar")
        with atomic_file(path) as f, wds.TarWriter(f) as sink:
            for key, data, ext, label in samples[start:start + per_shard]:
                sink.write({"__key__": key, ext: data, "cls": str(label).encode()})
        paths.append(path)
    if class_names is not None:
        atomic_write(os.path.join(out_dir, "classes.txt"), ("\n".join(class_names) + "\n").encode())
    return paths
