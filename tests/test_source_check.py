"""No re-index at start (issue 22 item 1): a store's manifest stands for its tar source while each file's
stamp (name, size, mtime_ns) holds. Counted, not timed: one stat per source file and not a byte of a tar
read when nothing changed; a touched file re-indexed alone; a changed one refused as before."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tarfile
from collections import Counter

import pytest
from conftest import write_wds
from test_loader import make_store, make_teacher_weights

from pipeline.sources import Manifest, ManifestError, stored_manifest, tar_headers, write_wds_shards
from pipeline.sources import check as source_check
from storage import open_store
from student.data import open_train_data
from student.errors import TrainError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("source_check")
    data = write_wds(root / "wds", n=24, per_shard=8)
    _age(data)  # written a day ago: not "racy" (within an mtime tick of the store's stamps)
    return {"data": data, "store": make_store(data, root / "store", make_teacher_weights(root / "teacher.pth"))}


def _age(folder, seconds: int = 86400):
    for f in os.listdir(folder):
        st = os.stat(os.path.join(folder, f))
        os.utime(os.path.join(folder, f), ns=(st.st_atime_ns, st.st_mtime_ns - seconds * 10**9))


@pytest.fixture
def copy(tiny, tmp_path):
    """The store's source copied elsewhere with its mtimes (shutil.copy2): the same files by their stamps."""
    return shutil.copytree(tiny["data"], tmp_path / "copy")


def _tars(d) -> list[str]:
    return sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".tar"))


class _Counts:
    """os.stat calls on paths under ``root`` and the tars whose headers are read (tar_headers, tarfile)."""

    def __init__(self, monkeypatch, root):
        self.stats, self.scanned, self.bytes_read = Counter(), [], 0
        real_stat, real_scan, real_read = os.stat, tar_headers.scan, tar_headers.read_at
        root = os.path.realpath(root)

        def stat(path, *a, **kw):
            p = os.fspath(path)
            if isinstance(p, str) and os.path.realpath(p).startswith(root):
                self.stats[os.path.basename(p)] += 1
            return real_stat(path, *a, **kw)

        def scan(path):
            self.scanned.append(os.path.basename(path))
            return real_scan(path)

        def read_at(fd, n, pos):
            got = real_read(fd, n, pos)
            self.bytes_read += len(got)
            return got

        def no_tarfile(*a, **kw):
            raise AssertionError("tarfile read a tar")

        monkeypatch.setattr(os, "stat", stat)
        monkeypatch.setattr(tar_headers, "scan", scan)
        monkeypatch.setattr(tar_headers, "read_at", read_at)
        monkeypatch.setattr(tarfile, "open", no_tarfile)


def test_an_unchanged_tar_source_costs_one_stat_per_file_and_no_tar_byte(tiny, copy, monkeypatch):
    counts = _Counts(monkeypatch, copy)
    data = open_train_data(str(copy), labels=tiny["store"])
    tars = [os.path.basename(t) for t in _tars(copy)]
    assert counts.scanned == [] and counts.bytes_read == 0
    assert all(counts.stats[t] == 1 for t in tars), counts.stats
    assert sum(counts.stats.values()) <= len(tars) + 2, counts.stats  # + classes.txt and the folder itself
    stored = stored_manifest(open_store(tiny["store"]))
    assert data.manifest.root == str(copy) and data.manifest.fingerprint == stored.fingerprint
    monkeypatch.undo()
    assert data.manifest.read_sample(0, 0).data  # reads come from the copy, checked by crc32c


def test_a_touched_tar_is_reindexed_alone_and_the_start_goes_on(tiny, copy, monkeypatch):
    touched = _tars(copy)[1]
    st = os.stat(touched)
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same bytes, other mtime
    counts = _Counts(monkeypatch, copy)
    data = open_train_data(str(copy), labels=tiny["store"])
    assert counts.scanned == [os.path.basename(touched)]
    assert data.manifest.fingerprint == stored_manifest(open_store(tiny["store"])).fingerprint


def test_a_rewritten_tar_with_other_labels_is_refused_as_before(tiny, copy):
    victim = _tars(copy)[0]
    with tarfile.open(victim) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    samples = {}
    for m, blob in members:
        key, ext = m.name.split(".", 1)
        samples.setdefault(key, {})[ext] = blob
    rows = [(k, v["png"], "png", (int(v["cls"]) + 1) % 3) for k, v in samples.items()]
    os.remove(victim)
    write_wds_shards(rows, str(copy), per_shard=len(rows), prefix="tmp")
    os.replace(os.path.join(copy, "tmp-000000.tar"), victim)
    with pytest.raises(TrainError, match="is not the source the store"):
        open_train_data(str(copy), labels=tiny["store"])


def test_a_source_written_just_before_its_store_is_reindexed_per_file(tiny, copy, monkeypatch):
    stored = stored_manifest(open_store(tiny["store"]))
    now = stored.stamps["at"]
    victim = os.path.join(copy, stored.shards[1])
    os.utime(victim, ns=(now, now - 10**9))  # file 1 as if written a second before it was stamped
    files = [list(f) for f in stored.stamps["files"]]
    files[1][2] = now - 10**9
    fresh = {**stored.stamps, "files": files}
    counts = _Counts(monkeypatch, copy)
    assert source_check.unchanged_source(dataclasses.replace(stored, stamps=fresh), str(copy)) is not None
    assert counts.scanned == [stored.shards[1]]  # its stamp proves nothing: its rows were compared


def test_another_source_and_a_manifest_without_stamps_are_indexed_in_full(tiny, copy, tmp_path):
    stored = stored_manifest(open_store(tiny["store"]))
    assert source_check.unchanged_source(stored, str(copy)) is not None
    assert source_check.unchanged_source(dataclasses.replace(stored, stamps=None), str(copy)) is None
    other = write_wds(tmp_path / "other", n=24, per_shard=12)  # other files
    assert source_check.unchanged_source(stored, other) is None
    with pytest.raises(TrainError, match="is not the source the store"):
        open_train_data(other, labels=tiny["store"])
    os.remove(os.path.join(copy, "classes.txt"))  # the class names change: a full index says how
    assert source_check.unchanged_source(stored, str(copy)) is None


def test_stamps_travel_in_store_json_not_in_the_manifest_and_bad_ones_are_damage(tiny, tmp_path):
    """The stamps are the store's (store.json's creation meta): a manifest's bytes stay the same for every copy
    of a source, and a store made from a copy has the same manifest.parquet; damaged stamps are one line."""
    import json
    import shutil

    from storage.meta import SOURCE_STAMPS

    stored = stored_manifest(open_store(tiny["store"]))
    assert [s[0] for s in stored.stamps["files"]] == stored.shards and stored.stamps["classes"] is not None
    assert Manifest.from_bytes(stored.to_bytes()).stamps is None  # not in the manifest's bytes
    assert stored.to_bytes() == dataclasses.replace(stored, stamps=None).to_bytes()
    broken = tmp_path / "store"
    shutil.copytree(tiny["store"], broken)
    d = json.loads((broken / "store.json").read_text())
    d["meta"][SOURCE_STAMPS] = {"files": [["a.tar", "big", 0]], "classes": None}
    (broken / "store.json").write_text(json.dumps(d))
    with pytest.raises(ManifestError, match="stamps"):
        stored_manifest(open_store(broken))
