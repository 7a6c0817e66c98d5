"""pipeline.sources.tar_headers lists a tar's regular members exactly as tarfile does (issue 22 item 1).

Random tars written by tarfile itself (GNU and pax formats, long names and link names, directories,
symlinks, empty and block-sized files), whole or cut off anywhere, compared member by member with what
``tarfile`` lists the way ``pipeline.sources`` reads it (``mode="r:"``, up to where it stops)."""

from __future__ import annotations

import io
import os
import tarfile

import crc32c
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.sources import tar_headers
from pipeline.sources.tar import _members_until_cut

_SEGMENT = st.text(alphabet="abcdefghij_-.é", min_size=1, max_size=40).filter(lambda s: s not in (".", ".."))
_NAME = st.lists(_SEGMENT, min_size=1, max_size=6).map("/".join)
_ENTRY = st.tuples(st.sampled_from(["file", "file", "file", "dir", "symlink"]), _NAME,
                   st.sampled_from([0, 1, 100, 511, 512, 513, 1500]))


def _tar(entries, fmt: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for i, (kind, name, size) in enumerate(entries):
            info = tarfile.TarInfo(name)
            info.mtime = 1.5e9 + i / 3 if i % 2 else 0  # a float: a pax mtime record (webdataset's), in pax
            if kind == "file":
                info.size = size
                tar.addfile(info, io.BytesIO(bytes([i % 251]) * size))
            elif kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.type, info.linkname = tarfile.SYMTYPE, name + "-target" * (size // 100)
                tar.addfile(info)
    return buf.getvalue()


def _by_tarfile(path) -> list[tuple[str, int, int]] | str:
    try:
        with tarfile.open(path, mode="r:") as tar:
            return [(m.name, m.offset_data, m.size) for m in _members_until_cut(tar) if m.isfile()]
    except tarfile.ReadError as e:
        return f"ReadError: {e}"


def _by_scan(path) -> list[tuple[str, int, int]] | None:
    got = tar_headers.scan(str(path))
    if got is None:
        return None
    return [(n, int(o), int(s)) for n, o, s in zip(got.name_list(), got.offsets, got.sizes, strict=True)]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entries=st.lists(_ENTRY, max_size=12), fmt=st.sampled_from([tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]),
       cut=st.one_of(st.none(), st.floats(0, 1)))
def test_scan_lists_what_tarfile_lists(tmp_path, entries, fmt, cut):
    data = _tar(entries, fmt)
    if cut is not None:
        data = data[:int(len(data) * cut)]
    path = tmp_path / "t.tar"
    path.write_bytes(data)
    want, got = _by_tarfile(path), _by_scan(path)
    if got is None:
        # Given up only where tarfile needs its own words: the first member's headers are cut.
        first_chain = _first_chain_end(entries, fmt)
        assert len(data) < first_chain, (len(data), first_chain, want)
        return
    assert got == want


def _first_chain_end(entries, fmt: int) -> int:
    """Where the first member's headers (extended ones included) end in the whole tar."""
    whole = _tar(entries[:1], fmt)
    with tarfile.open(fileobj=io.BytesIO(whole), mode="r:") as tar:
        first = tar.next()
    return first.offset_data if first is not None else tarfile.BLOCKSIZE


@pytest.mark.parametrize("batch", [3, 4096])
def test_a_webdataset_tar_takes_the_fast_walk_and_lists_what_tarfile_lists(tmp_path, monkeypatch, batch):
    from pipeline.sources import write_wds_shards

    monkeypatch.setattr(tar_headers, "_BATCH", batch)  # headers checked a few at a time, or all at once

    write_wds_shards([(f"d/{i:04d}", b"\xff" * i, "jpg", i % 3) for i in range(40)], str(tmp_path), per_shard=40)
    path = tmp_path / "shard-000000.tar"
    with open(path, "rb") as f:
        assert b" mtime=" in f.read(2048)  # webdataset's pax header per member
    fd = os.open(path, os.O_RDONLY)
    try:
        fast = tar_headers._plain_tar(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)
    assert fast is not None
    assert [(n, int(o), int(s)) for n, o, s in zip(fast.name_list(), fast.offsets, fast.sizes, strict=True)] == \
        _by_tarfile(path)
    data = bytearray(path.read_bytes())
    data[int(fast.offsets[30]) - 512 + 5] ^= 0xFF  # a header late in the tar fails its checksum
    path.write_bytes(bytes(data))
    fd = os.open(path, os.O_RDONLY)
    try:
        assert tar_headers._plain_tar(fd, len(data)) is None  # left to the exact loop, which stops there
    finally:
        os.close(fd)
    assert _by_scan(path) == _by_tarfile(path) and len(_by_tarfile(path)) == 30


def test_scan_gives_up_where_tarfile_raises(tmp_path):
    for data in (b"", b"x" * 100, b"not a tar" + bytes(600)):
        path = tmp_path / "bad.tar"
        path.write_bytes(data)
        assert isinstance(_by_tarfile(path), str)  # tarfile raises: the caller lets it, for its message
        assert tar_headers.scan(str(path)) is None


def test_a_damaged_header_after_the_first_ends_the_listing_there(tmp_path):
    data = bytearray(_tar([("file", "a.jpg", 10), ("file", "b.jpg", 10), ("file", "c.jpg", 10)],
                          tarfile.GNU_FORMAT))
    data[1024 + 5] ^= 0xFF  # b.jpg's header: its checksum no longer holds
    path = tmp_path / "t.tar"
    path.write_bytes(bytes(data))
    assert _by_scan(path) == _by_tarfile(path) == [("a.jpg", 512, 10)]


def test_sparse_and_global_pax_headers_are_left_to_tarfile(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "g"}) as tar:
        info = tarfile.TarInfo("a.jpg")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    path = tmp_path / "g.tar"
    path.write_bytes(buf.getvalue())
    assert tar_headers.scan(str(path)) is None
    assert _by_tarfile(path) == [("a.jpg", 1536, 3)]


# ---- sources._index_tar: the same rows and the same first error with either reader --------------
_WDS_MEMBER = st.tuples(
    st.sampled_from(["s1", "s2", "d/s3", "d//s4", "s5.x", "long/" * 30 + "s6", "é" * 60]),
    st.sampled_from([".jpg", ".JPG", ".png", ".cls", ".cls", ".txt", ".b.cls", ""]),
    st.one_of(st.sampled_from([b"3", b" 7\n", b"-1", b"x", b"", b"12" * 40, b"1048577", b"1" * 9000]),
              st.binary(max_size=700)))


def _index_either(path, checksums: bool, *, fast: bool, monkeypatch):
    from pipeline.sources import tar as sources  # its _index_tar and the SourceError it raises
    with monkeypatch.context() as m:
        if not fast:
            m.setattr(tar_headers, "scan", lambda p: None)
        try:
            return sources._index_tar(str(path), checksums)
        except sources.SourceError as e:
            return f"{type(e).__name__}: {e}"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(members=st.lists(_WDS_MEMBER, max_size=10), fmt=st.sampled_from([tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]),
       cut=st.one_of(st.none(), st.floats(0.05, 1)))
def test_index_tar_gives_the_same_rows_and_errors_as_the_tarfile_loop(tmp_path, monkeypatch, members, fmt, cut):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for i, (key, ext, data) in enumerate(members):
            info = tarfile.TarInfo(key + ext)
            info.mtime = 1.5e9 + i / 3 if i % 2 else 0
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    if cut is not None:
        data = data[:max(int(len(data) * cut), 512)]
    path = tmp_path / "w.tar"
    path.write_bytes(data)
    # names only: the header walk against the tarfile loop (with checksums, index_tar leaves every tar to
    # tarfile's one streaming pass: the test below)
    want = _index_either(path, False, fast=False, monkeypatch=monkeypatch)
    assert _index_either(path, False, fast=True, monkeypatch=monkeypatch) == want


def test_an_index_with_checksums_reads_each_byte_once_through_tarfile(tmp_path):
    """The header walk reads small members' data along with their headers; checksumming after it would read
    them twice, so with checksums index_tar hands the tar to tarfile's single streaming pass."""
    from pipeline.sources import write_wds_shards
    from pipeline.sources.tar import _index_tar
    from pipeline.sources.tar_index import index_tar

    (path,) = write_wds_shards([(f"s{i}", bytes([i]) * 300, "jpg", i % 3) for i in range(5)], str(tmp_path),
                               per_shard=5)
    assert index_tar(path, checksums=True) is None and index_tar(path, checksums=False) is not None
    rows = _index_tar(path, checksums=True)
    assert [r[5] for r in rows] == [crc32c.crc32c(bytes([i]) * 300) for i in range(5)]


# ---- tar_index._columns: the usual tar, column-wise, without the per-member loop ---------------------
_KEY = st.text(alphabet="abcxyz019_-é", min_size=1, max_size=12).filter(lambda s: not s.startswith("-"))
_DIR = st.sampled_from(["", "d/", "d.x/e/", "long/" * 25])


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(samples=st.lists(st.tuples(_DIR, _KEY, st.sampled_from([".jpg", ".JPEG", ".png", ".webp", ".Png"]),
                                  st.integers(0, 25_000), st.sampled_from(["{}", "{}\n", "00{}"]),
                                  st.booleans(), st.booleans(), st.integers(0, 3000)),
                        min_size=1, max_size=12, unique_by=lambda s: s[0] + s[1]),
       fmt=st.sampled_from([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]))
def test_the_column_wise_index_of_a_usual_tar_is_the_loops(tmp_path, samples, fmt):
    """Images and labels in either order, an extra .json before or after, names in directories, long
    (ustar prefix) and non-ASCII: the column-wise path takes every such tar and gives the loop's rows."""
    from pipeline.sources import tar_index

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for d, key, ext, label, text, label_first, json_first, size in samples:
            members = [(key + ext, bytes([size % 251]) * size), (key + ".cls", text.format(label).encode())]
            members = members[::-1] if label_first else members
            members.insert(0 if json_first else 2, (key + ".json", b"{}"))
            for name, data in members:
                info = tarfile.TarInfo(d + name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    path = tmp_path / "w.tar"
    path.write_bytes(buf.getvalue())
    members = tar_headers.scan(str(path))
    assert members is not None
    fd = os.open(path, os.O_RDONLY)
    try:
        fast = tar_index._columns(members, tar_headers.Blocks(fd, members.file_size))
        loop = tar_index._samples(str(path), members, tar_headers.Blocks(fd, members.file_size))
    finally:
        os.close(fd)
    # GNU longnames and pax path records: the general walk names those members (a list, not the column-wise
    # path); a ustar tar keeps every name in its headers
    assert (fast is not None) == (fmt == tarfile.USTAR_FORMAT or not isinstance(members.names, list))
    if fast is None:
        return
    assert fast.tuples() == loop
    assert [r[0] for r in loop] == [d + k for d, k, *_ in samples]  # each sample once, in tar order
    assert [r[4] for r in loop] == [s[3] for s in samples]


def test_a_member_before_the_image_does_not_list_its_sample_twice(tmp_path):
    """A .json (or any member) written before a sample's image made the key's first appearance count once
    for it and once for the image: every such sample was indexed twice. Each reader, both ways round."""
    from pipeline.sources import tar as sources

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in [("a.json", b"{}"), ("a.jpg", b"xx"), ("a.cls", b"1"), ("b.txt", b"z"), ("b.png", b"yy"),
                           ("b.cls", b"2"), ("c.cls", b"0"), ("c.jpg", b"q"), ("c.json", b"{}")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path = tmp_path / "w.tar"
    path.write_bytes(buf.getvalue())
    for checksums in (False, True):
        for fast in (True, False):
            rows = sources._index_tar(str(path), checksums, fast=fast)
            assert [(r[0], r[1], r[4]) for r in rows] == [("a", "a.jpg", 1), ("b", "b.png", 2), ("c", "c.jpg", 0)]
