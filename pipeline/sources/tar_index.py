"""One WebDataset tar -> its samples, from the tar's headers read directly (``tar_headers``).

``sources._index_tar`` calls this first and falls back to its ``tarfile`` loop where the headers need
``tarfile``'s own reading (None here). The rules are that loop's, in the same order, so a tar gives
the same rows and the same first error either way: a member name twice is refused, the key is the
path up to the first dot of the basename, one image and one ``.cls`` per key, a label read from at
most MAX_LABEL_BYTES. Reads behave as ``tarfile``'s do on a tar cut short: an image whose bytes end
early gets NO_CRC (undecodable, its views flagged); a ``.cls`` cut short ends the listing there.
"""

from __future__ import annotations

import io
import os

from storage.errors import printable

from ..source_errors import MAX_CLASSES, SourceError, check_label_bound, permission_error
from . import tar_headers
from .base import IMAGE_EXTS, NO_CRC

LABEL_EXT = ".cls"
MAX_LABEL_BYTES = 64  # a .cls holds a class index: a few digits and maybe a newline

# tarfile reads a member through a BufferedReader of this size: a short read of fewer bytes than
# min(member size, this) is its "unexpected end of data", however few bytes were asked for.
_TARFILE_READ = io.DEFAULT_BUFFER_SIZE


def index_tar(path: str, checksums: bool = True) -> list[tuple[str, str, int, int, int, int]] | None:
    """(key, image member, data offset, size, label, crc32c) per sample, in tar order; None where only
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
        return _samples(path, members, tar_headers.Blocks(fd, members.file_size))
    finally:
        os.close(fd)


def _samples(path: str, members: tar_headers.TarMembers, blocks: tar_headers.Blocks):
    images: dict[str, tuple[str, int, int]] = {}
    labels: dict[str, int] = {}
    order: list[str] = []
    names: set[str] = set()
    # (a duplicate name is refused where the loop meets it, after what comes before: looked for per member
    # only in a tar that has one)
    unique = len(set(members.names)) == len(members.names)
    image_exts, read = IMAGE_EXTS, blocks.read
    for name, offset, size in zip(members.names, members.offsets.tolist(), members.sizes.tolist(), strict=True):
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
        if key not in images and key not in labels:
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
    out = []
    for key in order:
        if key not in images:
            continue
        if key not in labels:
            raise SourceError(f"{path}: sample {printable(key)!r} has no .cls label; every WebDataset sample "
                              "needs KEY.cls")
        name, offset, size = images[key]
        out.append((key, name, offset, size, labels[key], NO_CRC))
    return out
