"""WebDataset sources on an S3 bucket (a real SeaweedFS server, tests/s3_support.py): ``--data s3://...``
indexes to the manifest of the local copy, reads a loader batch in few range requests (counted, never
timed), and precompute and train from the bucket give the bytes they give from the disk."""

from __future__ import annotations

import os
import random
import time

import pytest
from conftest import upload
from test_storage_support import snapshot

from pipeline.sources import SampleReader, SourceChanged, SourceError, index_source
from pipeline.sources.bucket_files import BucketTars, RangeFile, coalesce
from storage.bucket import as_path

pytestmark = pytest.mark.bucket


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
    # precompute reads a shard front to back (iter_shard): its neighbours merged too, not a request per sample
    r.requests = 0
    assert [s.data for s in bucket.iter_shard(0)] == [s.data for s in disk.iter_shard(0)]
    assert r.requests == 1, r.requests


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
    # --source-cache: the objects kept whole on local disk from the first epoch on; the same weights
    cached = tconfig(url, stores["b"], tmp_path / "run-c", epochs=2, workers=2, source_cache=str(tmp_path / "copies"))
    train(cached)
    assert weights_bytes(cached.out) == weights_bytes(runs[1].out)
    kept = lambda: len([n for n in os.listdir(tmp_path / "copies") if len(n) == 40])
    deadline = time.monotonic() + 60  # (the copier may finish after a run this short: not a timing assertion)
    while kept() < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert kept() == 3  # each object, whole


def epoch_batches(loader, epoch=0):
    return [(b.step, b.rows.numpy().tobytes(), b.images.numpy().tobytes(), b.targets.numpy().tobytes(), b.skipped)
            for b in loader.epoch(epoch)]


def used_by_steps(loader, epoch=0, sizes=None):
    """(images read, bytes used) by one epoch's steps: each step's distinct samples, as render reads them;
    ``sizes``: each row's bytes where the manifest has none (a parquet source indexed names only)."""
    import numpy as np

    from pipeline.views import ViewRenderer
    from student.loader import step_needs

    rows = loader.epoch(epoch).rows
    steps, needed = step_needs(loader.files, ViewRenderer(loader.data.recipe), loader.data.seed, epoch, rows,
                               loader.batch_size)
    pairs = np.unique(np.stack([steps, needed], axis=1), axis=0)
    return len(pairs), int((loader.files.nbytes if sizes is None else sizes)[pairs[:, 1]].sum())


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


# ---- Hugging Face parquet on a bucket ------------------------------------------------------------------------
def test_a_parquet_source_on_a_bucket_is_its_local_copys_manifest(pq_pair):
    local, url = pq_pair
    want = index_source(local, shards="as-is")
    for src in (url, url + "/", url + "/*.parquet", url + "/train-{00000..00002}.parquet"):
        got = index_source(src, shards="as-is")
        assert (got.kind, got.root, got.shards, got.class_names) == ("parquet", url, want.shards, want.class_names)
        assert got.fingerprint == want.fingerprint and columns(got) == columns(want), src  # sizes, crc32c too
    recut, recut_here = index_source(url, shard_size=6), index_source(local, shard_size=6)
    assert recut.files == recut_here.files and columns(recut) == columns(recut_here)


def test_parquet_indexing_on_a_bucket_reads_footers_and_labels_not_images(pq_pair):
    """Names only: per object a HEAD, its footer (one small tail read) and the label and image.path column
    chunks, by range requests; never the image bytes (counted by the bucket client, all requests)."""
    from pipeline.sources.bucket_files import COUNTS

    local, url = pq_pair
    total = sum(os.path.getsize(os.path.join(local, f)) for f in os.listdir(local))
    before = (COUNTS.requests, COUNTS.bytes_read)
    m = index_source(url, shards="as-is", checksums=False)
    requests, nbytes = COUNTS.requests - before[0], COUNTS.bytes_read - before[1]
    assert m.fingerprint == index_source(local, shards="as-is").fingerprint
    assert nbytes < total / 5, (nbytes, total)
    assert requests <= 2 + 3 * (2 + 2 * 3), requests  # listing, classes.txt; per file HEAD, footer, 2 per group


def test_a_parquet_batch_on_a_bucket_is_the_local_bytes_by_page_map_and_coalesced_requests(pq_pair):
    from pipeline.sources.hf_parquet import BucketParquet

    local, url = pq_pair
    disk, bucket = SampleReader(index_source(local, shards="as-is")), SampleReader(index_source(url, shards="as-is"))
    r = bucket.file_reader
    assert isinstance(r, BucketParquet)
    batch = [(s, p) for s in (0, 1) for p in range(8)] + [(2, 3), (2, 0)]
    random.Random(1).shuffle(batch)
    got = bucket.read_many(batch)
    assert got == disk.read_many(batch) and all(got.values())
    used = sum(len(b) for b in got.values())
    assert r.rows.group_reads == 0  # every image read alone, by the page map
    # mapping three files (HEAD, footer with the offset index in its tail read, a page header per row group
    # to check it: the sizes come from the manifest), then one request per file for the batch's images
    assert r.rows.offset_index_maps == 3
    assert r.requests <= 3 * (2 + 3) + 3, r.requests
    assert r.bytes_read / used <= 1.3, (r.bytes_read, used)
    r.counts.requests = r.counts.bytes_read = 0  # mapped: a batch is its images' bytes, neighbours merged
    again = bucket.read_many(batch)
    # (file 2's rows 1 and 2 lie between rows 0 and 3, within the gap: read too)
    assert again == got and r.requests == 3 and r.bytes_read / used <= 1.2, (r.requests, r.bytes_read, used)
    # a manifest without sizes (names only) maps by each value's length: more requests, the same bytes
    names_only = SampleReader(index_source(url, shards="as-is", checksums=False))
    assert names_only.read_many(batch) == got


@pytest.mark.parametrize("workers", [0, 2])
def test_the_loaders_read_ahead_on_a_parquet_source_gives_the_local_batches_in_few_requests(pq_pair, workers):
    """The rank's read-ahead on parquet: the main process maps every file (footer, offset index) and plans the
    images' byte ranges as for tars; the batches are the local copy's, and (no workers: the maps are made once)
    an epoch costs at most 0.2 requests per sample (repeats=1) within 1.5 bytes read per byte used."""
    from student.data import LockstepLoader, open_train_data

    local, url = pq_pair
    make = lambda src, **kw: LockstepLoader(open_train_data(src, input_size=32, repeats=1, shards="as-is"),
                                            batch_size=4, workers=workers, **kw)
    disk, bucket, alone = make(local), make(url), make(url, read_ahead=False)
    assert bucket.read_ahead is not None and alone.read_ahead is None
    for epoch in (0, 1):
        before = {r: (r.files.file_reader.requests, r.files.file_reader.bytes_read) for r in (bucket, alone)}
        assert epoch_batches(bucket, epoch) == epoch_batches(disk, epoch) == epoch_batches(alone, epoch)
        if workers:
            continue
        fr = bucket.files.file_reader
        sizes = fr.byte_addresses(bucket.files.file_index, bucket.files.offsets)[1]
        samples, used = used_by_steps(bucket, epoch, sizes)
        n, b = (x - y for x, y in zip((bucket.files.file_reader.requests, bucket.files.file_reader.bytes_read),
                                      before[bucket], strict=True))
        n_alone = alone.files.file_reader.requests - before[alone][0]
        assert 3 <= n <= 0.2 * samples < n_alone, (n, samples, n_alone)  # a request per file; per batch: more
        assert used <= b <= 1.5 * used, (b, used)
    bucket.read_ahead.close()


def test_a_parquet_object_rewritten_after_indexing_is_a_changed_source(pq_pair):
    local, url = pq_pair
    m = index_source(url, shards="as-is")
    with open(os.path.join(local, "train-00000.parquet"), "rb") as f:
        other = f.read()
    as_path(url + "/train-00001.parquet").put(other)  # another file's rows under its name
    with pytest.raises(SourceChanged, match=r"train-00001\.parquet changed since it was indexed"):
        SampleReader(m).read_many([(1, 0), (1, 1)])
    as_path(url + "/train-00001.parquet").unlink()  # gone: the same, read by a fresh reader
    with pytest.raises(SourceChanged, match=r"train-00001\.parquet changed since it was indexed"):
        SampleReader(m).read_many([(0, 0), (1, 0)])
    assert SampleReader(m).read_many([(0, 0)])[(0, 0)]


def test_precompute_and_train_from_a_parquet_bucket_give_the_bytes_of_the_local_copy(pq_pair, tmp_path,
                                                                                     tiny_teacher):
    from test_faults import precompute, tconfig, weights_bytes

    from student.train import train

    local, url = pq_pair
    stores = {"d": tmp_path / "store-d", "b": tmp_path / "store-b"}
    precompute(local, stores["d"], tiny_teacher, views=2)
    precompute(url, stores["b"], tiny_teacher, views=2, workers=2)
    a, b = snapshot(stores["d"]), snapshot(stores["b"])
    same = lambda snap: {k: v for k, v in snap.items() if k not in ("store.json", "manifest.parquet")}
    assert sorted(a) == sorted(b) and same(a) == same(b)
    # a second run on the finished store resumes from the bucket (its root the prefix, not a local folder
    # named "s3:": the samples it checks were read from the bucket, not found missing)
    precompute(url, stores["b"], tiny_teacher, views=2)
    assert snapshot(stores["b"]) == b
    runs = [tconfig(src, stores[name], tmp_path / f"run-{name}", epochs=1) for src, name in ((local, "d"), (url, "b"))]
    for cfg in runs:
        train(cfg)
    assert weights_bytes(runs[0].out) == weights_bytes(runs[1].out)


# ---- a web server's files (http:// here; their stamps and https over real TLS: tests/test_web_sources.py) ------
@pytest.fixture
def web_wds(tmp_path, s3_env):
    """(local folder, the http:// URL prefix of its copy): the tars in SeaweedFS's public-read bucket, served
    by its S3 gateway to plain unsigned GETs (with Range) as any web server's files."""
    import uuid

    from conftest import write_wds
    from s3_support import OPEN_BUCKET

    local = write_wds(tmp_path / "wds", n=20, per_shard=8, size=(128, 128))
    key = uuid.uuid4().hex[:12]
    upload(local, as_path(f"s3://{OPEN_BUCKET}/{key}"))
    return local, f"{s3_env.endpoint}/{OPEN_BUCKET}/{key}"


def test_an_http_source_by_brace_pattern_is_its_local_copy(web_wds):
    local, web = web_wds
    want = index_source(local, shards="as-is")
    got = index_source(web + "/shard-{000000..000002}.tar", shards="as-is")
    assert got.root == web and got.fingerprint == want.fingerprint and columns(got) == columns(want)
    assert got.stamps is not None  # from the HEAD naming each file (tests/test_web_sources.py)
    reader = SampleReader(got)
    batch = [(0, 1), (0, 2), (1, 0), (2, 3)]
    assert reader.read_many(batch) == SampleReader(want).read_many(batch)
    assert reader.file_reader.requests == 3  # one per tar
    with pytest.raises(SourceError, match=r"shard-000003\.tar: no such object"):
        index_source(web + "/shard-{000000..000003}.tar")


def test_an_http_parquet_source_is_its_local_copy(tmp_path, s3_env):
    import uuid

    from s3_support import OPEN_BUCKET
    from test_parquet import write_parquet

    local = write_parquet(tmp_path / "pq", n=12, per_file=6)
    key = uuid.uuid4().hex[:12]
    upload(local, as_path(f"s3://{OPEN_BUCKET}/{key}"))
    web = f"{s3_env.endpoint}/{OPEN_BUCKET}/{key}"
    want = index_source(local, shards="as-is")
    got = index_source(web + "/train-{00000..00001}.parquet", shards="as-is")
    assert got.fingerprint == want.fingerprint and columns(got) == columns(want)
    batch = [(0, 5), (1, 0), (0, 1)]
    assert SampleReader(got).read_many(batch) == SampleReader(want).read_many(batch)


@pytest.mark.parametrize("tail", ["/*.tar", "/", ""])
def test_a_glob_or_a_folder_on_a_web_server_is_one_line_exit_2(web_wds, tmp_path, tiny_teacher, tail):
    from test_faults import invoke, one_line_error, pconfig, pflags

    _, web = web_wds
    code, lines, crashed, _ = invoke("precompute", *pflags(pconfig(web + tail, tmp_path / "s", tiny_teacher)))
    one_line_error(code, lines, crashed, 2, "cannot list its files", "brace pattern")


# ---- stamps of bucket objects: no re-index at start -------------------------------------------------------------
@pytest.fixture
def bucket_store(wds_pair, tmp_path):
    from test_loader import make_store, make_teacher_weights

    local, url = wds_pair
    return url, make_store(url, tmp_path / "store", make_teacher_weights(tmp_path / "teacher.pth"))


def test_a_store_from_a_bucket_records_sizes_and_etags_and_an_unchanged_source_costs_one_listing(bucket_store):
    from pipeline.sources import stored_manifest, unchanged_source
    from pipeline.sources.bucket_files import COUNTS
    from storage import open_store
    from student.data import open_train_data

    url, store = bucket_store
    stored = stored_manifest(open_store(store))
    assert [s[0] for s in stored.stamps["files"]] == stored.shards
    assert all(isinstance(s[1], int) and s[2] for s in stored.stamps["files"]) and stored.stamps["classes"][1]
    before = (COUNTS.requests, COUNTS.bytes_read)
    m = unchanged_source(stored, url)
    assert m is not None and m.root == url
    assert (COUNTS.requests - before[0], COUNTS.bytes_read - before[1]) == (1, 0)  # one listing, no byte read
    before = COUNTS.requests
    assert unchanged_source(stored, url + "/shard-{000000..000002}.tar") is not None
    assert COUNTS.requests - before == 1  # a brace pattern too: one listing of its prefix, not one per name
    data = open_train_data(url, labels=store)
    assert data.manifest.fingerprint == stored.fingerprint


def test_a_changed_bucket_object_is_caught_at_train_start_by_its_stamp(bucket_store, tmp_path):
    """Other labels under a tar's name: its ETag differs, it is re-indexed alone and refused, as on disk. The
    same names and labels with other image bytes: the start goes on (re-indexing that object only) and the
    first read of it is "changed since it was indexed"."""
    import pyarrow.compute as pc
    from conftest import relabelled_shard

    from pipeline.sources import stored_manifest, unchanged_source
    from pipeline.sources.bucket_files import COUNTS
    from storage import open_store
    from student.data import open_train_data
    from student.errors import TrainError

    url, store = bucket_store
    stored = stored_manifest(open_store(store))
    # the same members, one byte of a picture changed: a content change only (its stamp, the ETag, differs)
    blob = bytearray(as_path(url + "/shard-000001.tar").read())
    first = stored.samples.filter(pc.equal(stored.samples.column("shard"), 1)).slice(0, 1).to_pylist()[0]
    blob[first["offset"] + first["size"] // 2] ^= 0xFF
    as_path(url + "/shard-000001.tar").put(bytes(blob))
    before = COUNTS.requests
    m = unchanged_source(stored, url)
    assert m is not None  # its rows (names, labels) are the same: the start goes on ...
    assert COUNTS.requests - before <= 1 + 1 + 2 * 8 + 1  # ... a listing, then that one tar's headers
    with pytest.raises(SourceChanged, match=r"shard-000001\.tar changed since it was indexed"):
        SampleReader(m).read(1, 0)
    # other labels: refused at start
    as_path(url + "/shard-000002.tar").put(relabelled_shard(tmp_path))
    assert unchanged_source(stored, url) is None
    with pytest.raises(TrainError, match="is not the source the store"):
        open_train_data(url, labels=store)


def test_a_killed_runs_read_ahead_cache_is_removed_at_the_next_start(tmp_path):
    """The cache lives in /dev/shm (memory) and is removed by a finalizer; a run killed (SIGKILL) left it
    there for good. The next start removes the folders of processes that are gone, and only those."""
    import subprocess
    import sys

    from pipeline.sources import bucket_cache

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f"deit-readahead-{int(gone.stdout)}-abc"
    mine = tmp_path / f"deit-readahead-{os.getpid()}-def"
    other = tmp_path / "deit-readahead-notapid"
    for d in (dead, mine, other):
        d.mkdir()
        (d / "1").write_bytes(b"x" * 100)
    assert bucket_cache.sweep_dead(str(tmp_path)) == [dead.name]
    assert not dead.exists() and mine.exists() and other.exists()
    made = bucket_cache.cache_dir()
    try:
        assert os.path.basename(made).startswith(f"deit-readahead-{os.getpid()}-")
    finally:
        os.rmdir(made)
