"""``train --source-cache DIR`` (pipeline/sources/local_copies.py): a bucket source's objects kept whole on
node-local disk across epochs. Counted against a real SeaweedFS bucket (tests/s3_support.py), never timed:
the batches are the local copy's bytes in every epoch, each object is read once per node (one HEAD, one GET),
and once the copies are whole an epoch asks nothing of the bucket."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from test_bucket_sources import epoch_batches

from pipeline.sources.local_copies import CopyFiller, copy_name, sweep_stale
from student.data import LockstepLoader, open_train_data

pytestmark = pytest.mark.bucket


def loaders(local: str, url: str, cache, workers=0, budget=None, rank=0, world=1):
    make = lambda src, **kw: LockstepLoader(open_train_data(src, input_size=32, shards="as-is"), batch_size=2,
                                            rank=rank, world=world, workers=workers, **kw)
    return make(local), make(url, source_cache=str(cache), source_cache_bytes=budget)


def object_bytes(local: str) -> dict[str, int]:
    return {n: os.path.getsize(os.path.join(local, n)) for n in os.listdir(local) if n.endswith((".tar", ".parquet"))}


@pytest.mark.parametrize("workers", [0, 2])
def test_kept_copies_give_the_local_batches_and_later_epochs_ask_nothing_of_the_bucket(wds_pair, tmp_path,
                                                                                        workers):
    local, url = wds_pair
    disk, bucket = loaders(local, url, tmp_path / "cache", workers=workers)
    fr, filler = bucket.files.file_reader, bucket.copy_filler
    assert epoch_batches(bucket, 0) == epoch_batches(disk, 0)  # the first epoch: the bucket while copies land
    filler.join(timeout=60)
    sizes = object_bytes(local)
    # each object once: a HEAD and one GET of the whole object
    assert filler.copies.totals() == (2 * len(sizes), sum(sizes.values()))
    assert sorted(os.path.getsize(filler.copies.path(f)) for f in range(len(sizes))) == sorted(sizes.values())
    for epoch in (1, 2):
        before = (fr.requests, fr.bytes_read)
        assert epoch_batches(bucket, epoch) == epoch_batches(disk, epoch)
        assert (fr.requests, fr.bytes_read) == before  # nothing asked of the bucket
    if bucket.read_ahead is not None:
        bucket.read_ahead.close()


def test_the_ranks_of_a_node_copy_each_object_once(wds_pair, tmp_path):
    """Two ranks with one folder: every object is copied by one of them (a claim), the other waits for it."""
    local, url = wds_pair
    ranks = [loaders(local, url, tmp_path / "cache", rank=r, world=2)[1] for r in (0, 1)]
    for r in ranks:
        epoch_batches(r, 0)
    for r in ranks:
        r.copy_filler.join(timeout=60)
    fillers = [r.copy_filler for r in ranks]
    assert sum(f.copied for f in fillers) == len(object_bytes(local))
    assert sum(f.copies.totals()[1] for f in fillers) == sum(object_bytes(local).values())  # each byte once
    assert all(bool(f.copies.ready.all()) for f in fillers)
    assert not [n for n in os.listdir(tmp_path / "cache") if n.endswith(".claim") or ".part-" in n]


def test_copies_stay_within_the_budget_and_the_rest_is_read_from_the_bucket(wds_pair, tmp_path):
    local, url = wds_pair
    sizes = sorted(object_bytes(local).values())
    budget = sizes[-1] + 1  # room for any one object, never two
    disk, bucket = loaders(local, url, tmp_path / "cache", budget=budget)
    assert epoch_batches(bucket, 0) == epoch_batches(disk, 0)
    bucket.copy_filler.join(timeout=60)
    kept = sum(os.path.getsize(tmp_path / "cache" / n) for n in os.listdir(tmp_path / "cache"))
    assert bucket.copy_filler.copied == 1 and kept <= budget
    fr = bucket.files.file_reader
    before = fr.requests
    assert epoch_batches(bucket, 1) == epoch_batches(disk, 1)
    assert fr.requests > before  # the objects not kept: still read from the bucket
    bucket.read_ahead.close()


def test_a_changed_object_gets_a_new_copy_and_the_old_one_is_never_read(wds_pair, tmp_path, s3_root):
    local, url = wds_pair
    cache = tmp_path / "cache"
    first = CopyFiller(str(cache), [f"{url}/{n}" for n in sorted(object_bytes(local))], shared=False)
    first.start([0, 1, 2])
    first.join(timeout=60)
    old = first.copies.path(0)
    name = sorted(object_bytes(local))[0]
    changed = b"\0" * 1024  # a new version of the object (any bytes: the copy must be of this one)
    (s3_root / "wds" / name).put(changed)
    again = CopyFiller(str(cache), [f"{url}/{n}" for n in sorted(object_bytes(local))], shared=False)
    again.start([0, 1, 2])
    again.join(timeout=60)
    assert again.copied == 1 and again.copies.path(0) != old  # the two unchanged ones were found, not copied
    assert again.copies.read([(0, 0, 1024)]) == [changed]


def test_a_killed_copiers_part_file_and_claim_are_removed_and_the_object_copied(wds_pair, tmp_path):
    import socket

    local, url = wds_pair
    cache = tmp_path / "cache"
    cache.mkdir()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    pid, host = int(gone.stdout), socket.gethostname()
    urls = [f"{url}/{n}" for n in sorted(object_bytes(local))]
    import obstore

    from storage.bucket import source_path

    p = source_path(urls[0])
    meta = obstore.head(p.store, p.key)
    name = copy_name(urls[0], int(meta["size"]), meta["e_tag"])
    (cache / f"{name}.part-{host}-{pid}").write_bytes(b"half")
    (cache / f"{name}.claim").write_text(f"{host} {pid}\n")
    (cache / f"other.part-{host}-{os.getpid()}").write_bytes(b"a live process's")
    filler = CopyFiller(str(cache), urls, shared=False)
    assert sorted(os.listdir(cache)) == [f"other.part-{host}-{os.getpid()}"]  # the dead one's: gone
    filler.start([0])
    filler.join(timeout=60)
    assert filler.copied == len(urls) and os.path.getsize(filler.copies.path(0)) == int(meta["size"])
    assert sweep_stale(str(cache), host) == []


def test_a_parquet_sources_images_are_read_from_its_copies(pq_pair, tmp_path):
    local, url = pq_pair
    disk, bucket = loaders(local, url, tmp_path / "cache")
    assert epoch_batches(bucket, 0) == epoch_batches(disk, 0)
    bucket.copy_filler.join(timeout=60)
    fr = bucket.files.file_reader
    before, reads = (fr.requests, fr.bytes_read), fr.rows.direct_reads
    assert epoch_batches(bucket, 1) == epoch_batches(disk, 1)
    assert (fr.requests, fr.bytes_read) == before and fr.rows.direct_reads == reads  # (files mapped in epoch 0)
    bucket.read_ahead.close()


def test_source_cache_with_a_local_source_is_one_line_exit_2(tmp_path):
    from conftest import write_wds

    local = write_wds(tmp_path / "wds", n=8, per_shard=4, size=(32, 32))
    for extra, says in ((["--source-cache", str(tmp_path / "c")], "is local already: drop --source-cache"),
                        (["--source-cache-gib", "2"], "pass --source-cache DIR too")):
        r = subprocess.run([sys.executable, "cli.py", "train", "--data", local, "--out", str(tmp_path / "run"),
                            "--model-kwargs", '{"depth": 1, "embed_dim": 32, "num_heads": 2, "img_size": 32}',
                            "--input-size", "32", "--epochs", "1", *extra],
                           cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), capture_output=True,
                           text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


def test_an_object_another_live_process_is_copying_is_waited_for_then_taken_over_when_it_dies(wds_pair, tmp_path):
    """A claim of a live process (another rank of the node): the filler copies nothing of that object and reads it
    once the other's copy appears; a claim whose process dies before its copy is whole: the filler copies it."""
    import socket
    import time

    import obstore

    from storage.bucket import source_path

    local, url = wds_pair
    cache = tmp_path / "cache"
    cache.mkdir()
    urls = [f"{url}/{n}" for n in sorted(object_bytes(local))]
    names = []
    for u in urls[:2]:
        meta = obstore.head(source_path(u).store, source_path(u).key)
        names.append(copy_name(u, int(meta["size"]), meta["e_tag"]))
    others = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(2)]
    try:
        for name, other in zip(names, others, strict=True):
            (cache / f"{name}.claim").write_text(f"{socket.gethostname()} {other.pid}\n")
        filler = CopyFiller(str(cache), urls, shared=False)
        filler.start([0, 1, 2])
        deadline = time.monotonic() + 60
        while not filler.copies.has(2) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert filler.copies.has(2) and not filler.copies.has(0) and not filler.copies.has(1)
        assert filler.copied == 1  # only the unclaimed one
        # the other process finishes object 0's copy and releases its claim; the one holding object 1 dies
        (cache / names[0]).write_bytes(open(os.path.join(local, sorted(object_bytes(local))[0]), "rb").read())
        (cache / f"{names[0]}.claim").unlink()
        others[1].kill()
        others[1].wait()
        filler.join(timeout=60)
        assert filler.copies.has(0) and filler.copies.has(1) and filler.copied == 2  # object 1 taken over
    finally:
        for p in others:
            p.kill()
            p.wait()


def test_a_copy_cut_short_or_replaced_by_a_link_is_made_again_not_read(wds_pair, tmp_path):
    local, url = wds_pair
    cache = tmp_path / "cache"
    urls = [f"{url}/{n}" for n in sorted(object_bytes(local))]
    first = CopyFiller(str(cache), urls, shared=False)
    first.start([0, 1, 2])
    first.join(timeout=60)
    whole = [open(first.copies.path(f), "rb").read() for f in range(3)]
    with open(first.copies.path(0), "r+b") as f:
        f.truncate(100)
    os.unlink(first.copies.path(1))
    os.symlink("/dev/zero", first.copies.path(1))
    again = CopyFiller(str(cache), urls, shared=False)
    again.start([0, 1, 2])
    again.join(timeout=60)
    assert again.copied == 2 and [open(again.copies.path(f), "rb").read() for f in range(3)] == whole
    assert not os.path.islink(again.copies.path(1))
