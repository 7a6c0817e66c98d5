"""A PUT cut in the middle of its body: the connection dropped, or the server SIGKILLed, with part of an
object sent (tests/cut_proxy.py stands between the client and a real SeaweedFS, a weed of the test's own).

What a cut does, as measured here: obstore sends a plain PUT (a chunk, a unit's tar, a marker) again at once,
whole, and the run goes on; with the server dead it sends it again until its bounded retry ends, then the run
ends in one line, exit 2. A conditional create (store.json, an array's zarr.json, a lease) obstore never sends
again, so ObjPath.create does, with the same bound: cut mid-body, the run completes; with only its answer lost,
the resend is refused by our own first create and the run knows it as its own; cut every time, one line, exit 2
after the bounded retry. Either way no object is ever torn:
every object listed reads whole, with the size its listing and HEAD give and, for chunks, the size and
crc32c its marker recorded (assert_no_torn_object); a store whose store.json or last marker did not land is
not reported complete; and rerunning the same precompute completes a store equal, object for file, to one
process's on disk, which `verify --full` passes."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from cut_proxy import CutProxy
from s3_support import BUCKET
from test_bucket import assert_no_torn_object
from test_faults import ENV, ROOT, invoke, pconfig, pflags, precompute
from test_storage_support import snapshot

from storage import open_store
from storage.bucket import RETRIES, RETRY_SECONDS, as_path

pytestmark = pytest.mark.bucket

OUT = f"s3://{BUCKET}/store"  # a weed of the test's own: the bucket is the test's


@pytest.fixture
def wds_source(tmp_path):
    from conftest import write_wds

    return write_wds(tmp_path / "wds", n=24, per_shard=8)  # 3 shards x 2 views: 6 units


@pytest.fixture
def cut(own_weed, monkeypatch):
    """make(**CutProxy kwargs): a proxy in front of this test's weed, the environment's endpoint set to it."""
    made = []

    def make(**kw) -> CutProxy:
        proxy = CutProxy(own_weed.endpoint, **kw)
        made.append(proxy)
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        return proxy
    yield make
    for p in made:
        p.close()


def straight(monkeypatch, weed) -> None:
    """The environment's endpoint back on the server itself (no proxy)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", weed.endpoint)


def args(data, teacher, backend="zarr") -> list[str]:
    return ["precompute", *pflags(pconfig(data, OUT, teacher, views=2)), "--format", backend]


def assert_mid_body(proxy: CutProxy):
    v = proxy.victim
    assert v is not None, "the PUT to cut was never sent"
    assert 0 < v.sent < v.length, f"cut mid-body: {v.sent} of {v.length} bytes forwarded"
    return v


def assert_one_line(code, err: str, *fragments):
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    for f in fragments:
        assert f in errors[0], (f, errors[0])
    return errors[0]


def assert_equals_disk(ref, backend="zarr"):
    """The store on the bucket: complete, whole, object for file the disk store, `verify --full` passes."""
    r = open_store(OUT)
    assert r.completed_units() == r.spec.units() and r.check(full=True) == []
    objects = assert_no_torn_object(OUT, finished=backend == "zarr")
    assert [k for k in objects if k.startswith("leases/")] == [], "every lease released"
    a = snapshot(ref)
    assert sorted(a) == sorted(objects)
    assert {k: v for k, v in a.items() if k != "store.json"} == {k: v for k, v in objects.items() if k != "store.json"}
    return objects


def verify_full(data):
    code, lines, crashed, _ = invoke("verify", OUT, "--data", data, "--n", 4, "--full", "--device", "cpu")
    assert (code, crashed) == (0, None), lines


# (backend, the key pattern of the PUT to cut, which match): a zarr chunk, a wds unit's tar, a marker
TARGETS = {
    "zarr-chunk": ("zarr", r"/labels\.zarr/.*/c/", 5),
    "wds-tar": ("wds", r"/units/\d+_\d+\.tar$", 3),
    "marker": ("zarr", r"/units/\d+_\d+\.json$", 4),
}


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_a_put_cut_mid_body_is_sent_again_whole_and_the_run_completes(cut, own_weed, monkeypatch, tmp_path,
                                                                      wds_source, tiny_teacher, target):
    """A chunk, a tar or a marker cut half way and both connections reset: obstore sends that PUT once more,
    whole (counted at the proxy), the run exits 0, and the store is the disk store's, nothing torn."""
    backend, match, nth = TARGETS[target]
    ref = tmp_path / "ref"
    precompute(wds_source, ref, tiny_teacher, views=2, backend=backend)
    proxy = cut(match=match, nth=nth, min_bytes=16)
    code, lines, crashed, _ = invoke(*args(wds_source, tiny_teacher, backend=backend))
    assert (code, crashed) == (0, None), lines
    v = assert_mid_body(proxy)
    again = proxy.puts_of(v.path)
    assert [(r.cut, r.sent) for r in again] == [(True, v.sent), (False, v.length)], again  # one more, whole
    straight(monkeypatch, own_weed)
    assert_equals_disk(ref, backend)
    code, lines, crashed, _ = invoke(*args(wds_source, tiny_teacher, backend=backend))  # a rerun: nothing to do
    assert (code, crashed) == (0, None), lines
    assert_equals_disk(ref, backend)
    verify_full(wds_source)


# the last object a store's making creates, an array's metadata created before it, a unit's lease
CREATES = {"store.json": (r"/store\.json$", 1), "zarr.json": (r"/labels\.zarr/[^/]+/zarr\.json$", 2),
           "lease": (r"/leases/\d+_\d+\.json$", 3)}


@pytest.mark.parametrize("what", sorted(CREATES))
def test_a_conditional_create_cut_mid_body_is_sent_again_and_the_run_completes(cut, own_weed, monkeypatch, tmp_path,
                                                                               wds_source, tiny_teacher, what):
    """store.json, an array's zarr.json and a lease are conditional creates, which obstore never sends twice;
    ObjPath.create sends one whose connection dropped again itself (counted at the proxy: the cut one, then one
    whole), and the run completes, equal to the disk store, nothing torn."""
    match, nth = CREATES[what]
    ref = tmp_path / "ref"
    precompute(wds_source, ref, tiny_teacher, views=2)
    proxy = cut(match=match, nth=nth, min_bytes=16)
    code, lines, crashed, _ = invoke(*args(wds_source, tiny_teacher))
    assert (code, crashed) == (0, None), lines
    v = assert_mid_body(proxy)
    assert [(r.cut, r.sent) for r in proxy.puts_of(v.path)] == [(True, v.sent), (False, v.length)]
    straight(monkeypatch, own_weed)
    assert_equals_disk(ref)
    verify_full(wds_source)


@pytest.mark.parametrize("what", ["store.json", "lease"])
def test_a_conditional_create_whose_answer_is_lost_is_refused_on_resend_and_taken_as_its_own(
        cut, own_weed, monkeypatch, tmp_path, wds_source, tiny_teacher, what):
    """The whole body of store.json (or a lease) reaches the server, which creates the object; the connections
    are reset before its answer reaches the client. The create sent again is refused (412: the first landed),
    and the run reads back what is there and knows its own (store.json: a store of the same settings; the
    lease: its worker's): it completes in one go, equal to the disk store."""
    match, nth = CREATES[what]
    ref = tmp_path / "ref"
    precompute(wds_source, ref, tiny_teacher, views=2)
    proxy = cut(match=match, nth=nth, min_bytes=16, cut_at=1.0)
    env = {**ENV, **{k: v for k, v in os.environ.items() if k.startswith("AWS_")}}
    done = subprocess.run([sys.executable, os.path.join(ROOT, "cli.py"), *args(wds_source, tiny_teacher)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)  # its own process: the lease's pid
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    v = proxy.victim
    assert v is not None and v.sent == v.length and v.answered.startswith("HTTP/1.1 200"), v  # landed, unheard
    again = proxy.puts_of(v.path)
    assert len(again) == 2 and not again[1].cut, again  # sent again once, and refused (the key is taken: ours)
    straight(monkeypatch, own_weed)
    assert_equals_disk(ref)
    verify_full(wds_source)


def test_a_create_whose_connection_drops_every_time_is_one_line_after_a_bounded_retry(cut, tmp_path, wds_source,
                                                                                      tiny_teacher):
    """Every PUT of store.json cut mid-body: the create is tried again with backoff for up to RETRY_SECONDS,
    then one line (exit 2) saying the connection dropped, how often it was tried, and to run the command again;
    no store.json is there, half or whole."""
    proxy = cut(match=CREATES["store.json"][0], nth=0, min_bytes=16)
    code, lines, crashed, _ = invoke(*args(wds_source, tiny_teacher))
    assert crashed is None
    v = assert_mid_body(proxy)
    tries = proxy.puts_of(v.path)
    assert len(tries) > 2 and all(r.cut for r in tries), tries
    key = v.path.split("?")[0].removeprefix(f"/{BUCKET}/")
    assert_one_line(code, "\n".join(lines), f"s3://{BUCKET}/{key}: the connection to {proxy.endpoint} was dropped "
                    "before it answered", f"tried {len(tries)} times", "run the command again")
    assert as_path(f"s3://{BUCKET}/{key}").head() is None, "no half object"


def _run_and_kill_mid_put(proxy: CutProxy, weed, argv: list) -> tuple[subprocess.CompletedProcess, float]:
    """Run the CLI in its own process through the holding proxy; when the victim PUT is half sent, SIGKILL weed,
    then let the proxy reset the connections. Returns the finished process and seconds from the kill."""
    env = {**ENV, **{k: v for k, v in os.environ.items() if k.startswith("AWS_")}}
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "cli.py"), *argv], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not proxy.reached.wait(0.2):
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()[1][-3000:] if p.poll() else ""
        assert_mid_body(proxy)
        weed.kill()  # while the server holds a half body
        start = time.monotonic()
        proxy.go.set()
        out, err = p.communicate(timeout=120 + 4 * RETRY_SECONDS)
    finally:
        if p.poll() is None:
            p.kill()
    return subprocess.CompletedProcess(p.args, p.returncode, out, err), time.monotonic() - start


@pytest.mark.slow  # as test_bucket's other kill-and-restart test: weed started twice, a CLI in its own process
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_the_server_killed_mid_put_then_restarted_rerun_completes_the_store(cut, own_weed, monkeypatch, tmp_path,
                                                                           wds_source, tiny_teacher, target):
    """weed SIGKILLed while it holds half of a chunk's, a unit tar's (or the last unit's marker's) body: obstore
    sends the PUT again into a dead server until its bounded retry ends, then the run exits 2 in one line naming
    the object. After the restart the half object is nowhere, the unit whose PUT was cut is not complete (for the
    marker: the store is not reported complete), and the rerun completes the store equal to the disk store."""
    backend, match, nth = TARGETS[target]
    if target == "marker":
        nth = 6  # the last unit's: every chunk of the store is there, only its marker is not
    ref = tmp_path / "ref"
    precompute(wds_source, ref, tiny_teacher, views=2, backend=backend)
    proxy = cut(match=match, nth=nth, min_bytes=16, hold=True)
    argv = args(wds_source, tiny_teacher, backend)
    done, seconds = _run_and_kill_mid_put(proxy, own_weed, argv)
    v = proxy.victim
    key = v.path.split("?")[0].removeprefix(f"/{BUCKET}/")
    assert_one_line(done.returncode, done.stderr, f"s3://{BUCKET}/{key}", "does not answer")
    assert seconds < 4 * RETRY_SECONDS + 30, "a bounded retry, not a hang"
    tries = proxy.puts_of(v.path)
    assert tries[0] is v and all(r.refused for r in tries[1:]), tries
    assert 1 <= len(tries) - 1 <= RETRIES, f"sent again {len(tries) - 1} times into the dead server"

    own_weed.restart()
    straight(monkeypatch, own_weed)
    assert as_path(f"s3://{BUCKET}/{key}").head() is None, "the half-sent object is nowhere"
    r = open_store(OUT)
    assert r.completed_units() != r.spec.units() and r.check(full=True) == []
    if target == "marker":
        assert len(r.completed_units()) == len(r.spec.units()) - 1
    assert_no_torn_object(OUT, finished=False)
    code, lines, crashed, _ = invoke(*argv)
    assert (code, crashed) == (0, None), lines
    assert_equals_disk(ref, backend)
    verify_full(wds_source)
