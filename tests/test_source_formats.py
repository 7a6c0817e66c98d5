"""Conformance of every source format in pipeline.sources.FORMATS (docs/DESIGN.md, "Adding a source format").

Each test runs once per format: a tiny source of that format is built (``BUILDERS``: the one line a new
format adds here), indexed with and without checksums, read through the one ``SampleReader`` (by batch in
file order, and by shard), re-cut, changed, cut off and pickled. Manifests written before the
format-neutral names (``tests/fixtures/manifest-cccf9cc-*.parquet``, written by the code of commit cccf9cc)
still open, with the fingerprint they were written with.
"""

from __future__ import annotations

import os
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import CLASSES, encode, make_image, write_imagefolder, write_wds
from test_parquet import write_parquet

from pipeline.sources import (
    FORMATS,
    NO_CRC,
    Manifest,
    SampleReader,
    SourceChanged,
    SourceError,
    Undecodable,
    decode_image,
    formats_in_words,
    index_source,
    write_wds_shards,
)

N = 18  # samples of a tiny source: 3 classes, 3 files of 6 where a format has files
DATA = os.path.join(os.path.dirname(__file__), "fixtures")


def picture(i: int, variant: int = 0) -> bytes:
    """Sample i's image bytes (class i % 3); another variant is another picture of the same sample."""
    return encode(make_image(i % len(CLASSES), i + 1000 * variant))


def _folder(root, image_of) -> str:
    for i in range(N):
        folder = os.path.join(root, CLASSES[i % len(CLASSES)])
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"img_{i:03d}.png"), "wb") as f:
            f.write(image_of(i))
    return str(root)


def _tar(root, image_of) -> str:
    write_wds_shards([(f"s{i:05d}", image_of(i), "png", i % len(CLASSES)) for i in range(N)], str(root),
                     per_shard=6, class_names=list(CLASSES))
    return str(root)


def _parquet(root, image_of) -> str:
    return write_parquet(root, n=N, per_file=6, row_group=4, image_of=image_of)


# kind -> build(root, image_of) -> the --data of a source of N samples, sample i holding image_of(i)
BUILDERS = {"imagefolder": _folder, "wds": _tar, "parquet": _parquet}


def test_every_format_has_a_builder_here():
    assert set(BUILDERS) == set(FORMATS), "a new format adds its builder to BUILDERS (and passes every test)"


@pytest.fixture(params=sorted(FORMATS))
def kind(request):
    return request.param


def build(kind, root, image_of=picture) -> str:
    return BUILDERS[kind](root, image_of)


def all_bytes(m: Manifest) -> list[bytes]:
    return [s.data for j in range(len(m.shards)) for s in m.iter_shard(j)]


# ---- indexing --------------------------------------------------------------------------------------------
def test_index_with_and_without_checksums(kind, tmp_path):
    src = build(kind, tmp_path / "src")
    m = index_source(src, shards="as-is", shard_size=6)
    bare = index_source(src, shards="as-is", shard_size=6, checksums=False)
    assert m.kind == kind and FORMATS[m.kind].kind == kind and m.num_samples == N and m.class_names == CLASSES
    assert bare.fingerprint == m.fingerprint, "content is no part of the fingerprint"
    crc, size = m.samples.column("crc32c").to_numpy(), m.samples.column("size").to_numpy()
    assert (crc != NO_CRC).all() and (bare.samples.column("crc32c").to_numpy() == NO_CRC).all()
    assert sorted(all_bytes(m)) == sorted(picture(i) for i in range(N))
    assert sorted(size.tolist()) == sorted(len(picture(i)) for i in range(N))
    bare_size = bare.samples.column("size").to_numpy()
    assert (bare_size == size).all() if FORMATS[kind].sizes_without_content else (bare_size == 0).all()
    # the checksums a store recorded make reads of a bare index checked
    assert all_bytes(bare.with_checksums_of(m)) == all_bytes(m)


def test_fingerprints_are_stable_and_survive_the_bytes(kind, tmp_path):
    src = build(kind, tmp_path / "src")
    a, b = index_source(src, shard_size=5, seed=1), index_source(src, shard_size=5, seed=1)
    assert a.fingerprint == b.fingerprint and a.to_bytes() == b.to_bytes()
    back = Manifest.from_bytes(a.to_bytes())
    assert back.fingerprint == a.fingerprint and back.files == a.files and back.samples.equals(a.samples)
    assert index_source(src, shard_size=5, seed=2, shards="shuffle").fingerprint != a.fingerprint


def test_a_source_of_no_format_names_every_format(tmp_path):
    with pytest.raises(SourceError) as e:
        index_source(str(tmp_path / "nothing-*.tar"))
    assert formats_in_words() in str(e.value)
    assert all(f.what in formats_in_words() for f in FORMATS.values())


# ---- reading ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["as-is", "shuffle"])
def test_read_many_in_file_order_equals_the_shard_read(kind, tmp_path, layout):
    src = build(kind, tmp_path / "src")
    m = index_source(src, shards=layout, shard_size=4, seed=3)
    if layout == "shuffle" and FORMATS[kind].recut:  # re-cut: virtual shards across the files
        assert m.files == index_source(src, shards="as-is").shards and m.shards[0] == "virtual-000000"
    assert sorted(all_bytes(m)) == sorted(picture(i) for i in range(N))
    reader = SampleReader(m)
    calls = []
    read = reader.file_reader.read
    reader.file_reader.read = lambda file, offset, size, path: calls.append((file, offset, path)) or read(
        file, offset, size, path)
    for j in range(len(m.shards)):
        by_shard = {(j, s.position): s.data for s in m.iter_shard(j)}
        want = list(by_shard)[::-1]  # a loader batch asks in any order
        calls.clear()
        assert reader.read_many(want) == by_shard
        assert [(f, o) for f, o, _ in calls] == sorted((f, o) for f, o, _ in calls), "file order"
        for p in range(m.shard_sizes[j]):
            s = m.read_sample(j, p)
            assert s.data == by_shard[(j, p)] and s.position == p and s.label == m.labels(j)[p]
            assert s.key == m.keys(j)[p]


def test_the_reader_holds_arrays_not_python_objects_per_sample(kind, tmp_path):
    """A forked loader worker shares the reader's pages: nothing per sample may be a Python object."""
    reader = SampleReader(index_source(build(kind, tmp_path / "src")))
    for name, value in vars(reader).items():
        if isinstance(value, np.ndarray):
            assert value.dtype != object, name
        assert not isinstance(value, list | dict) or len(value) < N, name
    assert isinstance(reader.keys, pa.Array) and isinstance(reader.paths, pa.Array)


def test_the_reader_pickles(kind, tmp_path):
    m = index_source(build(kind, tmp_path / "src"), shard_size=4)
    reader = SampleReader(m)
    want = {(0, p): reader.read(0, p) for p in range(m.shard_sizes[0])}  # files now open, caches full
    copy = pickle.loads(pickle.dumps(reader))
    assert copy.read_many(list(want)) == want
    assert pickle.loads(pickle.dumps(m)).read_sample(1, 0).data == m.read_sample(1, 0).data


# ---- a changed or unreadable source ----------------------------------------------------------------------
def test_a_changed_sample_is_source_changed(kind, tmp_path):
    m = index_source(build(kind, tmp_path / "src"), shards="as-is")
    other = build(kind, tmp_path / "other", lambda i: picture(i, variant=int(i == 7)))  # sample 7 redrawn
    now = index_source(other, shards="as-is", checksums=False)
    assert now.fingerprint == m.fingerprint, "same names and labels: the same source by its fingerprint"
    changed = now.with_checksums_of(m)
    row = _row_of(m, picture(7))
    shard, pos = int(m.samples.column("shard")[row].as_py()), int(m.samples.column("position")[row].as_py())
    with pytest.raises(SourceChanged, match="changed since it was indexed"):
        changed.read_sample(shard, pos)
    with pytest.raises(SourceChanged):
        list(changed.iter_shard(shard))
    with pytest.raises(SourceChanged):
        SampleReader(changed).read_many([(shard, p) for p in range(changed.shard_sizes[shard])])


def _row_of(m: Manifest, data: bytes) -> int:
    return next(i for i in range(m.num_samples)
                if m.read_sample(int(m.samples.column("shard")[i].as_py()),
                                 int(m.samples.column("position")[i].as_py())).data == data)


def test_a_file_gone_reads_empty_undecodable_or_changed(kind, tmp_path):
    src = build(kind, tmp_path / "src")
    checked = index_source(src, shards="as-is")
    bare = index_source(src, shards="as-is", checksums=False)
    reader = SampleReader(bare)
    gone = reader.file_reader.where(int(reader.file_index[0]), reader.paths[0].as_py())
    os.remove(gone)
    got = SampleReader(bare).read_many([(0, 0)])[(0, 0)]
    assert got == b"" and isinstance(decode_image(got), Undecodable)
    assert bare.read_sample(0, 0).data == b""
    assert [s.data for s in bare.iter_shard(0)][0] == b"", "the shard read goes on: its views get flagged"
    with pytest.raises(SourceChanged):  # bytes recorded and now gone: the source changed
        checked.read_sample(0, 0)


# ---- stores written before the format-neutral names ------------------------------------------------------
OLD = {  # fixture -> how commit cccf9cc's code indexed it (tests/fixtures/manifest-cccf9cc-*.parquet)
    "wds-recut": lambda tmp: index_source(write_wds(tmp / "w"), shards="shuffle", shard_size=6, seed=7),
    "wds-as-is": lambda tmp: index_source(write_wds(tmp / "w"), shards="as-is"),
    "parquet-recut": lambda tmp: index_source(write_parquet(tmp / "p"), shards="shuffle", shard_size=5, seed=3),
    "imagefolder": lambda tmp: index_source(write_imagefolder(tmp / "f"), shard_size=4, seed=2),
}


@pytest.mark.parametrize("name", sorted(OLD))
def test_a_manifest_written_with_the_old_names_opens_with_its_fingerprint(name, tmp_path):
    data = open(os.path.join(DATA, f"manifest-cccf9cc-{name}.parquet"), "rb").read()
    old = Manifest.from_bytes(data)  # checks the rows hash to the fingerprint recorded with them
    now = OLD[name](tmp_path)
    assert old.fingerprint == now.fingerprint, "the same source has the fingerprint its old store carries"
    assert old.files == now.files and old.samples.column_names == now.samples.column_names
    assert old.samples.equals(now.samples.select(old.samples.column_names))
    if "recut" in name:
        raw = pq.read_table(pa.BufferReader(data))
        assert "tar" in raw.column_names and b'"tars"' in raw.schema.metadata[b"deit_lockstep"], "old names"
        assert old.files and "file" in old.samples.column_names
    assert Manifest.from_bytes(old.to_bytes()).fingerprint == old.fingerprint
