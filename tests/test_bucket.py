"""Label stores on an S3 bucket: a real server (SeaweedFS, tests/s3_support.py), never a mock of the S3 API.

The store conformance tests run on the bucket too (tests/test_storage.py, the ``root`` fixture); here: a
bucket store is the disk store object for object, leases are conditional creates judged by the server's
clock, bad input on a bucket is one line naming the URL, the source is indexed once per bucket store, and
a server SIGKILLed mid-run and restarted on its data (a weed of the test's own, ``own_weed``) costs a
one-line exit of the worker it stranded, never a torn object, and a rerun completes the store."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
from s3_support import BUCKET, READER
from test_storage_support import ROOT, snapshot, tiny_spec, write_all

from storage import create_store, open_store
from storage.bucket import BucketError, as_path
from storage.leases import Leases

pytestmark = pytest.mark.bucket


@pytest.mark.parametrize("where", ["s3_root", "gcs_root"])  # SeaweedFS; fake-gcs-server (tests/gcs_support.py)
@pytest.mark.parametrize("backend", ["zarr", "wds"])
def test_a_bucket_store_holds_the_bytes_of_the_disk_store(request, tmp_path, backend, where):
    root = request.getfixturevalue(where)
    spec = tiny_spec()
    for place in (tmp_path / "s", root / "s"):
        write_all(create_store(place, spec, backend=backend, manifest=b"PAR1 manifest", meta={"who": "t"}))
    disk, bucket = snapshot(tmp_path / "s"), snapshot(root / "s")
    assert sorted(disk) == sorted(bucket)  # no temporaries, no extra keys
    assert {k: v for k, v in bucket.items() if k != "store.json"} == {k: v for k, v in disk.items()
                                                                      if k != "store.json"}
    r = open_store(str(root / "s"), expect=spec)  # a URL string, as the CLI passes it
    assert r.check() == [] and r.completed_units() == spec.units()
    assert r.nbytes() == sum(len(v) for v in bucket.values())


def test_overwrite_on_a_bucket_deletes_only_a_label_store(s3_root):
    spec = tiny_spec()
    write_all(create_store(s3_root / "s", spec))
    old = open_store(s3_root / "s").generation
    w = create_store(s3_root / "s", tiny_spec(seed=1), overwrite=True)
    assert w.generation != old and open_store(s3_root / "s").spec.seed == 1
    assert open_store(s3_root / "s").completed_units() == []
    (s3_root / "other" / "notes.txt").put(b"mine")
    with pytest.raises(Exception, match=r"--overwrite refused: s3://.*/other holds 'notes.txt'"):
        create_store(s3_root / "other", spec, overwrite=True)
    assert (s3_root / "other" / "notes.txt").read() == b"mine"


def test_an_old_writer_stops_after_overwrite_on_a_bucket(s3_root):
    from test_storage_support import unit_data

    from storage.base import StoreReplaced

    spec = tiny_spec()
    old = create_store(s3_root / "s", spec)
    create_store(s3_root / "s", spec, overwrite=True)  # another command rebuilt it
    with pytest.raises(StoreReplaced, match="rebuilt by another process"):
        old.write_unit(0, 0, **unit_data(spec, 0, 0))
    assert open_store(s3_root / "s").completed_units() == []


def test_an_object_larger_than_its_file_can_be_is_refused_unread(s3_root):
    from storage.base import RECORD_LIMIT

    spec = tiny_spec()
    write_all(create_store(s3_root / "s", spec))
    (s3_root / "s" / "units" / "000001_0002.json").put(b" " * (RECORD_LIMIT + 1))
    problems = open_store(s3_root / "s").check()
    assert [p.unit for p in problems] == [(1, 2)] and "more than the" in str(problems[0]), problems


# ---- leases --------------------------------------------------------------------------------------
def race_for_a_claim(root, unit, n: int):
    """``n`` books (workers w0..) claim ``unit`` of the store at ``root`` at once: (the books, the winners)."""
    books = [Leases(root, f"w{i}", ttl=60) for i in range(n)]
    wins, barrier = [], threading.Barrier(len(books))

    def claim(book):
        barrier.wait()
        wins.append((book.worker, book.claim(unit)))

    threads = [threading.Thread(target=claim, args=(b,)) for b in books]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return books, [w for w, won in wins if won]


def test_a_claim_is_a_conditional_create_one_of_racing_claimers_wins(s3_root):
    unit = (2, 1)
    books, winners = race_for_a_claim(s3_root / "s", unit, 6)
    assert len(winners) == 1 and books[0].read(unit).worker == winners[0]
    # the server refuses a second create of the lease object (412), whoever asks
    assert not (s3_root / "s" / "leases" / "000002_0001.json").create(b"{}")


@pytest.mark.parametrize("where", ["s3_root", "gcs_root"])  # on GCS renewal and take-over go by generation
def test_lease_age_is_the_servers_clock_so_a_skewed_host_cannot_take_or_hold(request, monkeypatch, where):
    s3_root = request.getfixturevalue(where)
    unit, ttl = (0, 0), 2.0
    holder, taker = Leases(s3_root / "s", "holder", ttl=ttl), Leases(s3_root / "s", "taker", ttl=ttl)
    assert holder.claim(unit)
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 3600)  # the taker's clock is an hour ahead
    assert not taker.free(unit) and not taker.claim(unit), "a fresh lease is not stale by a skewed clock"
    monkeypatch.setattr(time, "time", lambda: real() - 3600)  # ... or an hour behind: the holder renews
    time.sleep(1.2)  # Last-Modified has whole seconds
    renewed = holder.read(unit).renewed
    assert holder.renew() == 1 and holder.read(unit).renewed > renewed
    monkeypatch.setattr(time, "time", real)
    deadline = time.monotonic() + 20
    while not taker.claim(unit):  # not renewed for ttl by the server's clock: taken over
        assert time.monotonic() < deadline, "an expired lease was never taken over"
        time.sleep(0.5)
    assert taker.read(unit).worker == "taker" and holder.held() == []
    assert holder.renew() == 0, "the old holder's heartbeat cannot overwrite the taker's lease (If-Match)"
    holder.release(unit)
    assert taker.read(unit).worker == "taker"
    taker.release(unit)
    assert taker.read(unit) is None


def test_racing_takers_of_one_stale_lease_one_wins(s3_root):
    unit = (1, 0)
    assert Leases(s3_root / "s", "gone", ttl=1.0).claim(unit)
    time.sleep(2.2)
    takers = [Leases(s3_root / "s", f"t{i}", ttl=1.0) for i in range(4)]
    wins, barrier = [], threading.Barrier(len(takers))

    def take(t):
        barrier.wait()
        wins.append(t.claim(unit))

    threads = [threading.Thread(target=take, args=(t,)) for t in takers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(wins) == 1


# ---- bad input: one line naming the URL ----------------------------------------------------------
def _cli_inspect(url: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(ROOT, "cli.py"), "inspect", url], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def _one_line(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr[-2000:]
    return lines[0]


def test_no_such_bucket_or_store_is_one_line_naming_the_url(s3_env):
    env = dict(os.environ)
    line = _one_line(_cli_inspect("s3://no-such-bucket-here/stores/x", env))
    assert "s3://no-such-bucket-here" in line and "no such bucket" in line
    line = _one_line(_cli_inspect(f"s3://{BUCKET}/no/store/here", env))
    assert f"s3://{BUCKET}/no/store/here" in line and "not a label store" in line


def test_no_credentials_and_access_denied_are_one_line(s3_env, s3_root, monkeypatch):
    write_all(create_store(s3_root / "s", tiny_spec()))
    url = str(s3_root / "s")
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    line = _one_line(_cli_inspect(url, env))
    assert url.split("/")[2] in line and "no credentials" in line
    wrong = {**env, "AWS_ACCESS_KEY_ID": READER[0], "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    line = _one_line(_cli_inspect(url, wrong))
    assert url in line and "access denied" in line
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", READER[0])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", READER[1])
    assert open_store(url).check() == [], "the read-only key reads"
    with pytest.raises(BucketError, match=r"access denied"):
        create_store(as_path(url + "-new"), tiny_spec())


def test_an_unreachable_endpoint_is_one_line_after_a_bounded_retry(s3_env):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    start = time.monotonic()
    line = _one_line(_cli_inspect(f"s3://{BUCKET}/x", env))
    assert f"s3://{BUCKET}/x" in line and "does not answer" in line and f"127.0.0.1:{port}" in line
    assert time.monotonic() - start < 60


# ---- the pipeline on a bucket --------------------------------------------------------------------
@pytest.fixture
def wds_source(tmp_path):
    from conftest import write_wds

    return write_wds(tmp_path / "wds", n=24, per_shard=8)


def test_precompute_and_train_on_a_bucket_give_the_bytes_they_give_on_disk(s3_root, tmp_path, wds_source,
                                                                            tiny_teacher):
    """precompute --out s3://... writes the objects precompute writes as files; train --labels s3://... then
    gives the weights train gives from the store on disk, byte for byte (run folders stay local)."""
    from test_faults import precompute, tconfig, weights_bytes

    from student.train import train

    disk, bucket = tmp_path / "store", s3_root / "store"
    precompute(wds_source, disk, tiny_teacher, views=3)
    precompute(wds_source, str(bucket), tiny_teacher, views=3)
    a, b = snapshot(disk), snapshot(bucket)
    assert sorted(a) == sorted(b) and [k for k in a if k.startswith("leases/")] == []
    assert {k: v for k, v in a.items() if k != "store.json"} == {k: v for k, v in b.items() if k != "store.json"}
    assert open_store(str(bucket)).check(full=True) == []
    runs = [tconfig(wds_source, labels, tmp_path / name, epochs=2) for labels, name in ((disk, "d"), (bucket, "b"))]
    for cfg in runs:
        train(cfg)
    assert weights_bytes(runs[0].out) == weights_bytes(runs[1].out)
    # inspect, its table export and verify read the store on the bucket as on disk
    from test_faults import invoke

    for store in (disk, bucket):
        table = tmp_path / f"{store.name}-{'b' if store is bucket else 'd'}.parquet"
        code, lines, crashed, res = invoke("inspect", str(store), "--export", table)
        assert (code, crashed) == (0, None), lines
        code, lines, crashed, res = invoke("verify", str(store), "--data", wds_source, "--n", 4, "--device", "cpu")
        assert (code, crashed) == (0, None), lines
    assert (tmp_path / "store-d.parquet").read_bytes() == (tmp_path / "store-b.parquet").read_bytes()


def test_a_server_that_ignores_conditional_writes_is_refused_for_the_fleet_in_one_line(s3_env, monkeypatch):
    from s3_support import OPEN_BUCKET, HeaderStrippingProxy

    from storage.bucket import conditional_writes_honoured

    assert conditional_writes_honoured(as_path(f"s3://{BUCKET}/probe")), "SeaweedFS itself honours them"
    proxy = HeaderStrippingProxy(s3_env.endpoint)
    try:
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            monkeypatch.delenv(name)
        monkeypatch.setenv("AWS_SKIP_SIGNATURE", "true")
        url = f"s3://{OPEN_BUCKET}/ignored"
        monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env.endpoint)
        assert conditional_writes_honoured(as_path(url)), "the same bucket, straight: honoured"
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        assert not conditional_writes_honoured(as_path(url))
        write_all(create_store(url + "/s", tiny_spec()))  # a store, written by one process, still works
        assert open_store(url + "/s").check() == []
        with pytest.raises(BucketError, match=r"ignores conditional writes.*--no-claim") as e:
            Leases(url + "/s", "w").claim((0, 0))
        assert "\n" not in str(e.value) and url in str(e.value)
    finally:
        proxy.close()


@pytest.mark.slow
def test_four_workers_one_frozen_finish_a_bucket_store_equal_to_one_workers(s3_env, s3_root, tmp_path, wds_source,
                                                                             tiny_teacher):
    """The fleet test of tests/test_fleet.py on a bucket: rank 3 is frozen (SIGSTOP) holding a lease; the
    other three take its units over once the lease is ttl old by the server's clock, and the store equals
    the one a single process makes on disk, object for file."""
    import json
    import signal

    from test_faults import ENV, SUPPORT, pconfig, pflags, precompute

    ref, out = tmp_path / "ref", f"s3://{BUCKET}/store"  # a fresh server: the bucket is this test's
    precompute(wds_source, ref, tiny_teacher, views=4)
    env = {**ENV, **{k: v for k, v in os.environ.items() if k.startswith("AWS_")}}
    common = dict(views=4, lease_ttl=2.0)
    cfg = tmp_path / "r3.json"
    cfg.write_text(json.dumps(pconfig(wds_source, out, tiny_teacher, rank=3, world_size=4, **common)))
    frozen = subprocess.Popen([sys.executable, SUPPORT, "slow-precompute", str(cfg), "1.0"], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    others = []
    try:
        deadline, unit = time.monotonic() + 180, None
        while unit is None:
            assert time.monotonic() < deadline and frozen.poll() is None, "rank 3 never held a lease"
            held = [lease.unit for lease in Leases(out).all() if lease.pid == frozen.pid]
            unit = held[0] if held else time.sleep(0.05)
        os.kill(frozen.pid, signal.SIGSTOP)
        cmd = [sys.executable, os.path.join(ROOT, "cli.py"), "precompute"]
        others = [subprocess.Popen(cmd + pflags(pconfig(wds_source, out, tiny_teacher, rank=r, world_size=4,
                                                        **common)),
                                   cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                  for r in range(3)]
        results = [p.communicate(timeout=400) for p in others]
        assert [p.returncode for p in others] == [0, 0, 0], [r[1][-2000:] for r in results]
        assert frozen.poll() is None, "while rank 3 was still frozen"
        r = open_store(out)
        assert r.completed_units() == r.spec.units() and r.check(full=True) == []
        assert Leases(out).read(unit) is None, "its lease was taken over, and released after the commit"
    finally:
        os.kill(frozen.pid, signal.SIGCONT)
        _, err = frozen.communicate(timeout=300)
        for p in others:
            if p.poll() is None:
                p.kill()
    assert frozen.returncode == 0, err[-2000:]
    a, b = snapshot(ref), snapshot(as_path(out))
    assert {k: v for k, v in a.items() if k != "store.json"} == {k: v for k, v in b.items()
                                                                if k != "store.json" and not k.startswith("leases/")}


# ---- a worker killed, then the server itself killed and restarted mid-run ------------------------
def assert_no_torn_object(root, finished: bool = True) -> dict:
    """Every object under root, listed, is whole: its GET returns the size the listing and a HEAD give,
    every JSON object (store.json, markers, leases, zarr.json) parses, and every chunk a marker names is
    there with the size and crc32c the marker recorded. finished: also, every zarr chunk is one a marker
    names (a chunk without one is the leftover of an unfinished unit: after a finished run there is none).
    Returns {key: bytes}."""
    import json

    import crc32c

    objects = {}
    for meta in as_path(root).walk_objects():
        obj = as_path(f"s3://{BUCKET}/{meta['path']}")
        data = obj.read()
        assert len(data) == meta["size"] == obj.head()["size"], (obj, len(data), meta["size"])
        objects[obj.relative_to(as_path(root))] = data
    for key, data in objects.items():
        if key.endswith(".json"):
            json.loads(data)
    named = {}
    for key, data in objects.items():
        if key.startswith("units/") and key.endswith(".json"):
            for chunk in json.loads(data)["chunks"].values():
                named[chunk["key"]] = chunk
    chunks = {k: v for k, v in objects.items() if "/c/" in k}
    assert set(named) <= set(chunks), "every chunk a marker names is there"
    if finished:
        assert chunks and sorted(chunks) == sorted(named), "every chunk is one a marker names"
    for key, info in named.items():
        assert len(chunks[key]) == info["nbytes"] and crc32c.crc32c(chunks[key]) == info["crc32c"], key
    return objects


def test_a_writer_whose_server_died_says_so_and_writes_on_once_it_is_back(own_weed):
    """With the server killed, write_unit fails with the one-line "does not answer" (not "rebuilt by another
    process": store.json unreadable because the server is gone is no sign of a rebuilt store), for both
    backends; the unit stays absent, and the same writer commits it once the server is back."""
    from test_storage_support import unit_data

    writers = {b: create_store(as_path(f"s3://{BUCKET}/{b}"), tiny_spec(), backend=b) for b in ("zarr", "wds")}
    for w in writers.values():
        w.write_unit(0, 0, **unit_data(w.spec, 0, 0))
    own_weed.kill()
    for backend, w in writers.items():
        with pytest.raises(BucketError, match=rf"s3://{BUCKET}/{backend}/\S+: the endpoint .* does not answer"):
            w.write_unit(1, 0, **unit_data(w.spec, 1, 0))
    own_weed.restart()
    for backend, w in writers.items():
        r = open_store(w.path)
        assert r.completed_units() == [(0, 0)] and r.check(full=True) == [], backend
        w.write_unit(1, 0, **unit_data(w.spec, 1, 0))
        assert open_store(w.path).completed_units() == [(0, 0), (1, 0)], backend


@pytest.mark.slow
def test_a_worker_killed_mid_unit_then_the_server_killed_and_restarted_rerun_completes_the_store(
        own_weed, tmp_path, wds_source, tiny_teacher):
    """Issue 23 item 4 on a real server. A precompute worker is SIGKILLed mid-unit (its chunks PUT, its
    marker not); then, while a --join worker is between two chunk PUTs of a unit it holds, weed itself is
    SIGKILLed: that worker fails in one line naming the object it could not write (exit 2) after the
    bounded retry, instead of hanging or a traceback. weed restarts on the same data and ports, and
    rerunning the first command completes a store equal, object for file, to one process's on disk;
    `verify --full` passes; no object is torn (assert_no_torn_object)."""
    from test_faults import ENV, SUPPORT, invoke, labels_bytes, pconfig, pflags, precompute

    from storage.bucket import RETRY_SECONDS

    ref, out = tmp_path / "ref", f"s3://{BUCKET}/store"  # a fresh server: the bucket is this test's
    precompute(wds_source, ref, tiny_teacher, views=2)
    env = {**ENV, **{k: v for k, v in os.environ.items() if k.startswith("AWS_")}}
    args = ["precompute", *pflags(pconfig(wds_source, out, tiny_teacher, views=2))]
    support = [sys.executable, SUPPORT, "cli"]

    # 1. SIGKILLed at its second unit's marker: one unit committed, the second's chunks on the bucket
    killed = subprocess.run([*support, "marker", "2", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    r = open_store(out)
    assert len(r.completed_units()) == 1 and r.check() == []
    assert len([k for k in snapshot(as_path(out)) if "/c/" in k]) > 3, "the second unit's chunks are there"

    # 2. the server SIGKILLed while a --join worker is mid-unit: its first chunk PUT, its second not yet
    worker = subprocess.Popen([*support, "pause", "2", *args, "--join"], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert worker.stdout.readline().strip() == "PAUSED", worker.stderr.read()[-2000:]
        held = [lease.unit for lease in Leases(out).all() if lease.pid == worker.pid]
        assert len(held) == 1, held
        own_weed.kill()
        start = time.monotonic()
        worker.stdin.write("go\n")
        worker.stdin.flush()
        _, err = worker.communicate(timeout=120 + 4 * RETRY_SECONDS)
    finally:
        if worker.poll() is None:
            worker.kill()
    errors = [line for line in err.splitlines() if line.startswith("error: ")]  # after the start banner
    assert worker.returncode == 2 and errors == err.strip().splitlines()[-1:] and "Traceback" not in err, err[-3000:]
    assert f"{out}/labels.zarr/" in errors[0] and "does not answer" in errors[0], errors  # not a lease's
    assert time.monotonic() - start < 4 * RETRY_SECONDS + 30, "a bounded retry, not a hang"

    # 3. the server back on the same data: what was committed is still there and whole, nothing is torn
    own_weed.restart()
    r = open_store(out)
    assert len(r.completed_units()) == 1 and r.check(full=True) == []
    assert_no_torn_object(out, finished=False)
    assert Leases(out).read(held[0]) is not None, "the failed worker's lease outlived it (released by the rerun)"

    # 4. rerunning the first command completes the store (in this process: the CLI's own entry point)
    code, lines, crashed, _ = invoke(*args)
    assert (code, crashed) == (0, None), lines
    r = open_store(out)
    assert r.completed_units() == r.spec.units() and r.check(full=True) == []
    objects = assert_no_torn_object(out)
    assert [k for k in objects if k.startswith("leases/")] == [], "every lease released"
    a = snapshot(ref)
    assert sorted(a) == sorted(objects)
    assert {k: v for k, v in a.items() if k != "store.json"} == {k: v for k, v in objects.items() if k != "store.json"}
    assert labels_bytes(ref) == labels_bytes(out)
    code, lines, crashed, _ = invoke("verify", out, "--data", wds_source, "--n", 4, "--full", "--device", "cpu")
    assert (code, crashed) == (0, None), lines


def test_a_heartbeat_survives_errors_that_are_not_oserrors(s3_root, monkeypatch, capfd):
    """obstore raises its own errors (a 5xx after the retries: GenericError, no OSError): a heartbeat that
    meets one beats again, and prints nothing (a thread's death would print a traceback)."""
    from obstore.exceptions import GenericError

    from storage.leases import Heartbeat

    book = Leases(s3_root / "s", "w", ttl=0.2)
    assert book.claim((0, 0))
    real, beats = book.renew, []

    def renew():
        beats.append(1)
        if len(beats) <= 2:
            raise GenericError("Generic S3 error: 503 Service Unavailable")
        return real()
    monkeypatch.setattr(book, "renew", renew)
    with Heartbeat(book):
        deadline = time.monotonic() + 30
        while len(beats) < 4:
            assert time.monotonic() < deadline, "the heartbeat stopped beating"
            time.sleep(0.05)
    assert capfd.readouterr().err == ""


def test_a_run_on_a_bucket_store_takes_its_manifest_and_leaves_no_local_folder(s3_root, tmp_path, wds_source,
                                                                              tiny_teacher, monkeypatch):
    """The source is indexed once per store on a bucket too: a resumed run and a --join process take the
    store's manifest (the URL taken for a local path never existed, so each process read the whole source
    again), and the index lease is an object beside the store, not a folder named "s3:" in the cwd."""
    from test_faults import precompute

    import pipeline.stage1.index_once as index_once

    indexed, real = [], index_once._index
    monkeypatch.setattr(index_once, "_index", lambda cfg: indexed.append(cfg.out) or real(cfg))
    monkeypatch.chdir(tmp_path)
    out = str(s3_root / "store")
    precompute(wds_source, out, tiny_teacher, views=2, views_per_unit=2)
    assert len(indexed) == 1
    precompute(wds_source, out, tiny_teacher, views=2, views_per_unit=2)  # resumed: nothing to do
    precompute(wds_source, out, tiny_teacher, views=2, views_per_unit=2, join=True)
    assert len(indexed) == 1, "read from the store's manifest, not the source"
    assert [p for p in os.listdir(tmp_path) if p.startswith("s3")] == []
    assert [k for k in snapshot(s3_root) if ".indexing" in k] == [], "the index lease was released"


@pytest.mark.slow
def test_a_fresh_fleet_on_a_bucket_indexes_the_source_once(s3_env, s3_root, tmp_path, wds_source, tiny_teacher):
    """Two --join processes started together on a fresh bucket store: the one holding the index lease (an
    object beside the store) indexes and creates the store, the other waits for it and indexes nothing."""
    from test_faults import ENV, SUPPORT, pconfig, pflags

    out = str(s3_root / "store")
    env = {**ENV, **{k: v for k, v in os.environ.items() if k.startswith("AWS_")}}
    args = ["precompute", *pflags(pconfig(wds_source, out, tiny_teacher, views=2, views_per_unit=2)), "--join"]
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    procs = [subprocess.Popen([sys.executable, SUPPORT, "cli", "slow-index", "8", *args], cwd=cwd, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errs = [p.communicate(timeout=400)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for e in errs]
    indexing = ["precompute: indexing" in e for e in errs]
    waiting = ["precompute: waiting" in e and "to index" in e for e in errs]
    assert sorted(indexing) == [False, True] and waiting == [not i for i in indexing], [e[-2000:] for e in errs]
    r = open_store(out)
    assert r.completed_units() == r.spec.units() and r.check() == []
    assert [k for k in snapshot(s3_root) if ".indexing" in k] == [] and os.listdir(cwd) == []


def test_a_server_error_that_outlasts_the_retries_is_one_line():
    """A 5xx or SlowDown after obstore's bounded retries reached the user as obstore's own error text (a
    traceback where no handler knew it); it is one line naming the URL and the status. (obstore's own
    exception type with the text it writes; a real server cannot be made to fail on cue here.)"""
    from obstore import exceptions as ox

    from storage.bucket import BucketError, _explain

    text = ("Generic S3 error: Error performing GET http://127.0.0.1:1/b/k in 4.2s, after 8 retries, max_retries: 8, "
            "retry_timeout: 15s  - Server returned non-2xx status code: 503 Service Unavailable: <Error></Error>")
    got = _explain("s3://b/k", ox.GenericError(text))
    assert isinstance(got, BucketError) and "\n" not in str(got)
    assert str(got).startswith("s3://b/k: the server kept failing (503 Service Unavailable) after retries")
    other = ox.GenericError("Generic S3 error: something else")
    assert _explain("s3://b/k", other) is other  # (anything else is left as it is)
