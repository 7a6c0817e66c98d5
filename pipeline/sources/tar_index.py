"""One WebDataset tar -> its samples, from the tar's headers read directly (``tar_headers``).

``sources._index_tar`` calls this first and falls back to its ``tarfile`` loop where the headers need
``tarfile``'s own reading (None here). The rules are that loop's, in the same order, so a tar gives
the same rows and the same first error either way: a member name twice is refused, the key is the
path up to the first dot of the basename, one image and one ``.cls`` per key, a label read from at
most MAX_LABEL_BYTES, samples in the order their keys first appear. Reads behave as ``tarfile``'s do on
a tar cut short: an image whose bytes end early gets NO_CRC (undecodable, its views flagged); a ``.cls``
cut short ends the listing there.

The usual tar (every key with one image and one plain-integer label, UTF-8 names) is indexed column-wise
(``_columns``: numpy over the names' bytes, no Python object per member); ``_samples``, the loop, takes
every other tar and says what is wrong with it in the order it meets it.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from storage.errors import printable

from ..source_errors import MAX_CLASSES, SourceError, check_label_bound, permission_error
from . import tar_headers
from .base import IMAGE_EXTS, NO_CRC

LABEL_EXT = ".cls"
MAX_LABEL_BYTES = 64  # a .cls holds a class index: a few digits and maybe a newline

# tarfile reads a member through a BufferedReader of this size: a short read of fewer bytes than
# min(member size, this) is its "unexpected end of data", however few bytes were asked for.
_TARFILE_READ = io.DEFAULT_BUFFER_SIZE


@dataclass
class TarRows:
    """A tar's samples in tar order, column-wise: the manifest's columns of one shard."""
    keys: pa.Array      # string
    members: pa.Array   # string: each sample's image member
    offsets: np.ndarray  # int64: the image's data offset
    sizes: np.ndarray
    labels: np.ndarray
    crcs: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets)

    @classmethod
    def of(cls, rows: list[tuple[str, str, int, int, int, int]]) -> TarRows:
        keys, members, offsets, sizes, labels, crcs = zip(*rows, strict=True) if rows else ((),) * 6
        return cls(pa.array(keys, pa.string()), pa.array(members, pa.string()), np.asarray(offsets, np.int64),
                   np.asarray(sizes, np.int64), np.asarray(labels, np.int64), np.asarray(crcs, np.int64))

    def tuples(self) -> list[tuple[str, str, int, int, int, int]]:
        return list(zip(self.keys.to_pylist(), self.members.to_pylist(), self.offsets.tolist(), self.sizes.tolist(),
                        self.labels.tolist(), self.crcs.tolist(), strict=True))


def index_tar(path: str, checksums: bool = True) -> TarRows | None:
    """A tar's samples (key, image member, data offset, size, label, crc32c), in tar order; None where only
    ``tarfile`` can read the headers (``tar_headers.scan``), and with ``checksums``: then every byte is read
    anyway, and ``tarfile``'s one streaming pass reads each once (the header walk reads small members' data
    with their headers, and the checksums would read it again: a fresh fleet must read its source once)."""
    if checksums:
        return None
    try:
        members = tar_headers.scan(path)
        if members is None:
            return None
        fd = os.open(path, os.O_RDONLY)
    except PermissionError:
        raise permission_error(path) from None
    try:
        blocks = tar_headers.Blocks(fd, members.file_size)
        return _columns(members, blocks) or TarRows.of(_samples(path, members, blocks))
    finally:
        os.close(fd)


_EXTS = [e.encode() for e in IMAGE_EXTS] + [LABEL_EXT.encode()]  # (ASCII; the last one is the label's)
_EXT_BYTES = max(len(e) for e in _EXTS)
_NO_DOT = 1 << 62


def _columns(members: tar_headers.TarMembers, blocks: tar_headers.Blocks) -> TarRows | None:
    """``_samples`` column-wise, for the usual tar: its names UTF-8, unique and not empty, none with "//",
    ASCII extensions, at most one image and one .cls per key, every image's key with a .cls, every label a
    plain integer under MAX_CLASSES, no label cut short. None for anything else: ``_samples`` then gives
    the rows, or the error, in the order its loop meets them (so both agree on every tar). Works on the
    names' bytes end to end (the Arrow array's own buffers): no Python object per member but a label's
    bytes, and a handful of numpy steps per tar."""
    names = members.names
    if not isinstance(names, pa.Array) or len(names) == 0 or names.offset:
        return None
    n = len(names)
    _, offsets_buf, data_buf = names.buffers()
    starts = np.frombuffer(offsets_buf, np.int32, n + 1).astype(np.int64)
    data = np.frombuffer(data_buf, np.uint8, int(starts[-1])) if starts[-1] else np.zeros(0, np.uint8)
    lengths = np.diff(starts)
    starts = starts[:-1]
    if starts[0] != 0 or not lengths.all():
        return None
    row = np.repeat(np.arange(n), lengths)
    within = np.arange(len(data)) - starts[row]
    slash = data == ord("/")
    if (slash[1:] & slash[:-1] & (row[1:] == row[:-1])).any():
        return None  # "//": the loop's os.path.join says what the key is
    # WebDataset's convention: the key is the path up to the first dot of the basename
    last_slash = np.maximum.reduceat(np.where(slash, within, -1), starts)
    dot = np.minimum.reduceat(np.where((data == ord(".")) & (within > last_slash[row]), within, _NO_DOT),
                              starts)
    key_len = np.where(dot < _NO_DOT, dot, lengths)
    ext_len = lengths - key_len  # the dot included
    in_ext = within >= key_len[row]
    if (data[in_ext] >= 0x80).any():
        return None  # str.lower outside ASCII: the loop decides
    # the extension's first bytes, lowered (ASCII), NUL past its end: [n, _EXT_BYTES]
    col = np.arange(_EXT_BYTES)
    at = np.minimum(starts[:, None] + key_len[:, None] + col, len(data) - 1)
    ext = np.where(col < ext_len[:, None], data[at], 0)
    ext = ext + ((ext >= ord("A")) & (ext <= ord("Z"))) * 32
    kinds = [(ext_len == len(e)) & (ext[:, :len(e)] == np.frombuffer(e, np.uint8)).all(1) for e in _EXTS]
    is_image, is_label = np.logical_or.reduce(kinds[:-1]), kinds[-1]
    # the keys' bytes end to end -> keys numbered in the order the loop first meets them (every member)
    key_ends = np.cumsum(key_len)
    keys = pa.StringArray.from_buffers(n, pa.py_buffer(np.concatenate([[0], key_ends]).astype(np.int32)),
                                       pa.py_buffer(data[~in_ext].tobytes()))
    codes = pc.dictionary_encode(keys).indices.to_numpy().astype(np.int64)
    image_codes, label_codes = codes[is_image], codes[is_label]
    n_keys = int(codes.max()) + 1
    images_of, labels_of = np.bincount(image_codes, minlength=n_keys), np.bincount(label_codes, minlength=n_keys)
    if images_of.max(initial=0) > 1 or labels_of.max(initial=0) > 1 or (labels_of < images_of).any():
        return None  # a key with two images or two labels, or an image without a label
    if not (is_image | is_label).all() and pc.count_distinct(names).as_py() != n:
        return None  # a name twice (among images and labels, two names of one key would be caught above)
    label_at = np.flatnonzero(is_label)
    got = _labels(members.offsets[label_at], members.sizes[label_at], blocks)
    if got is None:
        return None
    values = np.zeros(n_keys, np.int64)
    values[label_codes] = got
    order = np.argsort(image_codes, kind="stable")
    at = np.flatnonzero(is_image)[order]  # the images, in their keys' order
    take = pa.array(at)
    return TarRows(keys.take(take), names.take(take), members.offsets[at], members.sizes[at],
                   values[image_codes[order]], np.full(len(at), NO_CRC, np.int64))


_DENSE = 8 * 1024  # labels closer than this on average: read all of them in one read, parsed at once


def _labels(offsets: np.ndarray, sizes: np.ndarray, blocks: tar_headers.Blocks) -> np.ndarray | None:
    """The labels at these offsets (ascending) as the loop reads them, where each is a plain integer in a
    small .cls read whole, under MAX_CLASSES; else None (the loop reads them, and says what is wrong)."""
    if not len(sizes):
        return np.zeros(0, np.int64)
    if int(sizes.max()) > MAX_LABEL_BYTES or int(sizes.min()) < 1:
        return None
    lo, hi = int(offsets[0]), int(offsets[-1] + sizes[-1])
    values = None
    if hi - lo <= _DENSE * len(sizes):  # small members: a read per window (the header walk read these bytes too)
        values = _dense_labels(offsets, sizes, blocks)
    if values is None:
        read, out = blocks.read, []
        try:
            for offset, size in zip(offsets.tolist(), sizes.tolist(), strict=True):
                data = read(offset, size)
                # int() of the bytes: what int() of their text accepts, but no other whitespace or digits
                out.append(int(data) if len(data) == size else None)
        except ValueError:
            return None
        if None in out:
            return None
        values = np.asarray(out, dtype=object)
    if values.min() < 0 or values.max() >= MAX_CLASSES:
        return None  # (a negative label: the loop takes it, and the caller refuses it by name)
    return values.astype(np.int64)


_WINDOW = 4 << 20  # bytes of a tar read at once for the labels in them


def _dense_labels(offsets: np.ndarray, sizes: np.ndarray, blocks: tar_headers.Blocks) -> np.ndarray | None:
    """``_plain_labels`` of labels close together, a window of at most _WINDOW bytes read at a time."""
    ends, out, i = offsets + sizes, [], 0
    while i < len(offsets):
        lo = int(offsets[i])
        j = max(i + 1, int(np.searchsorted(ends, lo + _WINDOW, side="right")))
        hi = int(ends[j - 1])
        buf = blocks.read(lo, hi - lo)
        if len(buf) != hi - lo:
            return None
        got = _plain_labels(np.frombuffer(buf, np.uint8), offsets[i:j] - lo, sizes[i:j])
        if got is None:
            return None
        out.append(got)
        i = j
    return np.concatenate(out)


def _plain_labels(buf: np.ndarray, at: np.ndarray, sizes: np.ndarray) -> np.ndarray | None:
    """Labels written as 1-18 ASCII digits, maybe then a newline (every writer's), parsed at once; None
    if any is written otherwise (the per-label ``int`` reads those)."""
    width = int(sizes.max())  # (at most MAX_LABEL_BYTES)
    col = np.arange(width)
    b = buf[np.minimum(at[:, None] + col, len(buf) - 1)]
    digit = (b >= ord("0")) & (b <= ord("9")) & (col < sizes[:, None])
    ndigits = np.where(digit.all(1), width, (~digit).argmax(1))  # the leading digits
    newline = b[np.arange(len(b)), np.minimum(ndigits, width - 1)] == ord("\n")
    if not (((ndigits == sizes) | ((ndigits == sizes - 1) & newline)) & (ndigits >= 1) & (ndigits <= 18)).all():
        return None
    values = np.zeros(len(b), np.int64)
    for c in range(min(width, 18)):  # Horner's rule, a column at a time: the digits before each one's end
        values = np.where(c < ndigits, values * 10 + (b[:, c].astype(np.int64) - ord("0")), values)
    return values


def _samples(path: str, members: tar_headers.TarMembers, blocks: tar_headers.Blocks):
    images: dict[str, tuple[str, int, int]] = {}
    labels: dict[str, int] = {}
    order: list[str] = []
    seen: set[str] = set()
    names: set[str] = set()
    # (a duplicate name is refused where the loop meets it, after what comes before: looked for per member
    # only in a tar that has one)
    names_of = members.name_list()
    unique = len(set(names_of)) == len(names_of)
    image_exts, read = IMAGE_EXTS, blocks.read
    for name, offset, size in zip(names_of, members.offsets.tolist(), members.sizes.tolist(), strict=True):
        if not unique:
            if name in names:
                raise SourceError(f"{path}: member {printable(name)!r} appears twice (appended with tar -r?); "
                                  "readers would disagree on which copy is the sample: rewrite the shard "
                                  "with one copy")
            names.add(name)
        slash = name.rfind("/")
        stem, dot, rest = name[slash + 1:].partition(".")
        # WebDataset's convention: the key is the path up to the first dot of the basename.
        key = (stem if slash < 0 else name[:slash + 1] + stem) if "//" not in name else \
            os.path.join(os.path.dirname(name), stem)
        ext = "." + rest.lower() if dot else ""
        if key not in seen:  # (a key once, where any of its members comes first: a .json before the image too)
            seen.add(key)
            order.append(key)
        if ext in image_exts:
            if key in images:
                raise SourceError(f"{path}: sample {printable(key)!r} has two images "
                                  f"({printable(images[key][0])}, {printable(name)}); keep one per sample")
            images[key] = (name, offset, size)
        elif ext == LABEL_EXT:
            need = min(size, _TARFILE_READ)
            data = read(offset, need)
            if len(data) < need:
                break  # the file ends inside this label: the tar was cut here
            text = data[:min(size, MAX_LABEL_BYTES)].decode(errors="replace").strip()
            try:
                if size > MAX_LABEL_BYTES:
                    raise ValueError
                labels[key] = int(text)
            except ValueError:
                raise SourceError(f"{path}: sample {printable(key)!r} has a non-integer label "
                                  f"{printable(text, 40)!r} in its .cls") from None
            if labels[key] >= MAX_CLASSES:  # (the message is built only for a label out of bounds)
                check_label_bound(labels[key], f"{path}: sample {printable(key)!r}")
    return rows_in_order(path, order, {key: (*image, NO_CRC) for key, image in images.items()}, labels)


def rows_in_order(path: str, order: list[str], images: dict[str, tuple[str, int, int, int]],
                  labels: dict[str, int]) -> list[tuple[str, str, int, int, int, int]]:
    """Both loops' rows (this module's and ``tar``'s tarfile loop): each key with an image, (member, offset,
    size, crc32c), in the order keys first appeared; an image's key without a label is refused."""
    out = []
    for key in order:
        if key not in images:
            continue
        if key not in labels:
            raise SourceError(f"{path}: sample {printable(key)!r} has no .cls label; every WebDataset sample "
                              "needs KEY.cls")
        name, offset, size, crc = images[key]
        out.append((key, name, offset, size, labels[key], crc))
    return out
