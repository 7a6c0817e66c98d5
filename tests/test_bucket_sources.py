"""WebDataset sources on an S3 bucket (a real SeaweedFS server, tests/s3_support.py): ``--data s3://...``
indexes to the manifest of the local copy, reads a loader batch in few range requests (counted, never
timed), and precompute and train from the bucket give the bytes they give from the disk."""

from __future__ import annotations

import os
import random

import pytest
from test_storage_support import snapshot

from pipeline.sources import SampleReader, SourceChanged, SourceError, index_source
from pipeline.sources.bucket_files import BucketTars, RangeFile, coalesce
from storage.bucket import as_path

pytestmark = pytest.mark.bucket


def upload(local: str, prefix) -> str:
    """Every file of a local source folder as an object under ``prefix`` (an ObjPath); its URL."""
    for name in sorted(os.listdir(local)):
        with open(os.path.join(local, name), "rb") as f:
            (prefix / name).put(f.read())
    return str(prefix)


@pytest.fixture
def wds_pair(tmp_path, s3_root):
    """(local folder, its copy's URL): 3 tars of 8 samples (the last 4), 128x128 PNGs (~50 KB, an ImageNet
    JPEG's order: a member's headers are a small part of it), classes.txt."""
    from conftest import write_wds

    local = write_wds(tmp_path / "wds", n=20, per_shard=8, size=(128, 128))
    return local, upload(local, s3_root / "wds")


def columns(m) -> dict:
    return {c: m.samples.column(c).to_pylist() for c in m.samples.column_names}


def test_a_bucket_source_by_brace_pattern_prefix_or_glob_is_its_local_copys_manifest(wds_pair):
    local, url = wds_pair
    want = index_source(local, shards="as-is")
    for src in (url + "/shard-{000000..000002}.tar", url, url + "/", url + "/*.tar"):
        got = index_source(src, shards="as-is")
        assert got.fingerprint == want.fingerprint, src
        assert (got.kind, got.shards, got.class_names) == ("wds", want.shards, want.class_names)
        assert got.root == url and columns(got) == columns(want), src  # offsets, sizes and crc32c too
    one = index_source(url + "/shard-000001.tar", shards="as-is")
    assert one.shards == ["shard-000001.tar"] and one.num_samples == 8
    names_only = index_source(url, shards="as-is", checksums=False)
    assert names_only.fingerprint == want.fingerprint


def test_a_missing_object_or_no_such_bucket_is_one_line(wds_pair, s3_root):
    _, url = wds_pair
    with pytest.raises(SourceError, match=r"shard-000003\.tar: no such object") as e:
        index_source(url + "/shard-{000000..000003}.tar")
    assert "\n" not in str(e.value)
    with pytest.raises(SourceError, match=r"no \.tar, \.parquet objects there.*cannot be read from a bucket"):
        index_source(str(s3_root / "nothing-here"))
    with pytest.raises(SourceError, match=r"s3://no-such-bucket-for-sources: no such bucket"):
        index_source("s3://no-such-bucket-for-sources/wds/")


def test_precompute_of_a_missing_bucket_exits_2_in_one_line(s3_env, tmp_path, tiny_teacher):
    from test_faults import invoke, one_line_error, pconfig, pflags

    flags = pflags(pconfig("s3://no-such-bucket-for-sources/wds/", tmp_path / "s", tiny_teacher))
    code, lines, crashed, _ = invoke("precompute", *flags)
    one_line_error(code, lines, crashed, 2, "no such bucket")


def test_indexing_reads_headers_by_range_not_whole_objects(tmp_path, s3_root):
    """Names-only indexing of a tar of large members reads each header and skips the data by offset."""
    from pipeline.sources import write_wds_shards
    from pipeline.sources.tar import _index_tar

    rng = random.Random(0)
    samples = [(f"k{i}", rng.randbytes(300_000), "png", i % 3) for i in range(6)]
    (path,) = write_wds_shards(samples, str(tmp_path / "big"), per_shard=6)
    url = str(s3_root / "big.tar")
    as_path(url).put(open(path, "rb").read())
    f = RangeFile(url)
    got = _index_tar(url, False, f)
    assert got == _index_tar(path, False)
    size = os.path.getsize(path)
    assert f.bytes_read < size / 4, (f.bytes_read, size)  # headers and .cls blocks, not the images
    assert f.requests <= 1 + 2 * len(samples) + 1, f.requests  # the HEAD, a block per image header, the end


def test_a_loader_batch_is_the_local_bytes_in_few_coalesced_requests(wds_pair):
    local, url = wds_pair
    disk, bucket = SampleReader(index_source(local, shards="as-is")), SampleReader(index_source(url, shards="as-is"))
    assert isinstance(bucket.file_reader, BucketTars)
    batch = [(s, p) for s in (0, 1) for p in range(8)] + [(2, 1), (2, 0)]
    random.Random(1).shuffle(batch)
    got = bucket.read_many(batch)
    assert got == disk.read_many(batch) and all(got.values())
    used = sum(len(b) for b in got.values())
    r = bucket.file_reader
    assert r.requests / len(batch) <= 0.2, r.requests  # one request per tar: 3 for 18 samples
    assert r.bytes_read / used <= 1.5, (r.bytes_read, used)  # the .cls members and headers between
    # a sample alone is one request of its own bytes
    r.requests = r.bytes_read = 0
    assert bucket.read(1, 5) == disk.read(1, 5) and (r.requests, r.bytes_read) == (1, len(got[(1, 5)]))


def test_coalesce_merges_neighbours_within_the_gap_and_span():
    assert coalesce([(0, 10), (20, 10), (100, 5)], gap=10, span=1000) == [(0, 30, [0, 1]), (100, 105, [2])]
    assert coalesce([(50, 10), (0, 10)], gap=100, span=40) == [(0, 10, [1]), (50, 60, [0])]  # over the span
    assert coalesce([(0, 10), (5, 10)], gap=0, span=100) == [(0, 15, [0, 1])]  # overlapping: one read


def test_an_object_gone_after_indexing_is_a_changed_source_or_undecodable_as_on_disk(wds_pair):
    _, url = wds_pair
    m = index_source(url, shards="as-is")
    bare = index_source(url, shards="as-is", checksums=False)
    as_path(url + "/shard-000001.tar").unlink()
    with pytest.raises(SourceChanged, match=r"shard-000001\.tar changed since it was indexed"):
        SampleReader(m).read_many([(1, 0), (1, 1)])
    got = SampleReader(bare).read_many([(0, 0), (1, 0)])  # no checksums recorded: undecodable, not fatal
    assert got[(1, 0)] == b"" and got[(0, 0)] == SampleReader(m).read(0, 0)


def test_precompute_and_train_from_a_bucket_source_give_the_bytes_of_the_local_copy(wds_pair, tmp_path,
                                                                                   tiny_teacher):
    """precompute --data s3://... makes the store the local copy makes (the manifest differs in its root
    only); train --data s3://... from it gives the weights train gives from the local copy, byte for byte."""
    from test_faults import precompute, tconfig, weights_bytes

    from pipeline.sources import Manifest
    from student.train import train

    local, url = wds_pair
    stores = {"d": tmp_path / "store-d", "b": tmp_path / "store-b"}
    precompute(local, stores["d"], tiny_teacher, views=3)
    # (2 workers: forkserver, since this process used the bucket; a forked worker could hang on its client)
    precompute(url + "/shard-{000000..000002}.tar", stores["b"], tiny_teacher, views=3, workers=2)
    a, b = snapshot(stores["d"]), snapshot(stores["b"])
    assert sorted(a) == sorted(b)
    same = lambda snap: {k: v for k, v in snap.items() if k not in ("store.json", "manifest.parquet")}
    assert same(a) == same(b)
    ma, mb = (Manifest.from_bytes(s["manifest.parquet"]) for s in (a, b))
    assert (ma.root, mb.root) == (local, url) and ma.fingerprint == mb.fingerprint
    assert columns(ma) == columns(mb)
    runs = [tconfig(src, stores[name], tmp_path / f"run-{name}", epochs=2) for src, name in ((local, "d"), (url, "b"))]
    for cfg in runs:
        train(cfg)
    assert weights_bytes(runs[0].out) == weights_bytes(runs[1].out)
    # DataLoader workers on a bucket source (forkserver: obstore's runtime does not survive a fork): the same
    # batches, hence the same weights, as the main process reading alone
    with_workers = tconfig(url, stores["b"], tmp_path / "run-w", epochs=2, workers=2)
    train(with_workers)
    assert weights_bytes(with_workers.out) == weights_bytes(runs[1].out)


def epoch_batches(loader, epoch=0):
    return [(b.step, b.rows.numpy().tobytes(), b.images.numpy().tobytes(), b.targets.numpy().tobytes(), b.skipped)
            for b in loader.epoch(epoch)]


def used_by_steps(loader, epoch=0):
    """(images read, bytes used) by one epoch's steps: each step's distinct samples, as render reads them."""
    import numpy as np

    from pipeline.views import ViewRenderer
    from student.loader import step_needs

    rows = loader.epoch(epoch).rows
    steps, needed = step_needs(loader.files, ViewRenderer(loader.data.recipe), loader.data.seed, epoch, rows,
                               loader.batch_size)
    pairs = np.unique(np.stack([steps, needed], axis=1), axis=0)
    return len(pairs), int(loader.files.nbytes[pairs[:, 1]].sum())


@pytest.mark.parametrize("workers", [0, 2])
def test_the_loaders_read_ahead_gives_the_local_batches_in_few_requests(wds_pair, workers):
    """The rank's read-ahead (pipeline.sources.bucket_cache): the batches of the local copy, byte for byte, for 0
    and 2 workers; over one epoch at most 0.2 requests per sample read and 1.5 bytes read per byte used, counted
    by the loader's reader (the read-ahead's requests plus any direct read of a worker)."""
    from student.data import LockstepLoader, open_train_data

    local, url = wds_pair
    make = lambda src: LockstepLoader(open_train_data(src, input_size=32, repeats=1, shards="as-is"), batch_size=4,
                                      workers=workers)
    disk, bucket = make(local), make(url)
    assert bucket.read_ahead is not None and disk.read_ahead is None  # local files: read directly
    for epoch in (0, 1):
        fr = bucket.files.file_reader
        fr.requests = fr.bytes_read = 0
        assert epoch_batches(bucket, epoch) == epoch_batches(disk, epoch)
        samples, used = used_by_steps(bucket, epoch)
        assert samples == 20  # every sample once (repeats=1)
        assert 3 <= fr.requests <= 0.2 * samples, fr.requests  # a request per tar
        assert used <= fr.bytes_read <= 1.5 * used, (fr.bytes_read, used)
    bucket.read_ahead.close()


def test_a_sample_whose_read_ahead_never_arrives_is_read_directly(wds_pair):
    """A read-ahead that fetches nothing (stopped before it started): each consumer waits its ``wait_s`` for the
    pending samples, then reads them itself; the batches are the local copy's and the direct reads counted."""
    import functools

    from student.data import LockstepLoader, open_train_data

    local, url = wds_pair
    make = lambda src: LockstepLoader(open_train_data(src, input_size=32, shards="as-is"), batch_size=4)
    disk, bucket = make(local), make(url)
    ra = bucket.read_ahead
    ra.start = functools.partial(ra.start, paused=True)
    ra.view.wait_s = 0.05
    assert epoch_batches(bucket) == epoch_batches(disk)
    fr = bucket.files.file_reader
    assert ra.view._counts[0].tolist() == [0, 0] and fr.requests > 0  # no prefetch; the fallback's reads counted
    assert fr.requests == int(ra.view._counts[1:].sum(axis=0)[0])
    # stopped midway: what it had cached is deleted, the rest read directly
    ra.start = ra.start.func
    epoch = iter(bucket.epoch(1))
    first = next(epoch)
    ra.stop()
    got = [first.images.numpy().tobytes()] + [b.images.numpy().tobytes() for b in epoch]
    assert got == [b.images.numpy().tobytes() for b in disk.epoch(1)]
    ra.close()


def test_plan_ranges_merges_the_smallest_gaps_within_the_budget_and_horizon():
    import numpy as np

    from pipeline.sources.bucket_cache import plan_ranges

    # file 0: samples of 100 bytes at 0, 110, 400, 1000; file 1: one at 0
    files, offsets = np.array([0, 0, 0, 0, 1]), np.array([0, 110, 400, 1000, 0])
    sizes = np.full(5, 100)
    first = last = np.array([0, 1, 2, 3, 0])
    ranges, member = plan_ranges(files, offsets, sizes, first, last, budget=250)  # 250 bytes of gaps
    assert ranges[:, :3].tolist() == [[0, 0, 500], [1, 0, 100], [0, 1000, 1100]]  # gaps 10 + 190 fit, 500 not
    assert member.tolist() == [0, 0, 0, 2, 1] and ranges[:, 3:].tolist() == [[0, 2], [0, 0], [3, 3]]
    near, _ = plan_ranges(files, offsets, sizes, first, last, budget=250, horizon=1)
    assert near[:, :3].tolist() == [[0, 0, 210], [1, 0, 100], [0, 400, 500], [0, 1000, 1100]]
