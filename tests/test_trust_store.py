"""Trust, round two (issue 20): what a store reads back from its own files proves what it claims.

1. a chunk (zarr) or tar (wds) of another unit copied over a unit's: verify --full FAILs naming it,
   train refuses in one line, a resumed precompute repairs it byte for byte
2. a marker's chunk key is compared with the spec's, never opened (another unit's chunk, /dev/zero)
3. a FIFO, a directory or a symlink where the store keeps a file: refused unread, one line, no hang
4. store.json, markers, zarr.json, meta/*.json and the manifest are checked before use
5. leases: future-dated, malformed, absurd fields
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest
from cli_support import escaped, invoke, one_line_error
from test_faults import ENV, ROOT, TINY, assert_same_store
from test_inspect import BACKENDS, make_stores

from storage import StoreError, open_store
from storage.fsutil import NotRegularFile, read_regular
from storage.leases import Leases
from storage.schema import MAX_VIEWS

STUDENT = "deit_tiny_distilled_patch16_224"
# A precompute of the tiny stores here peaks at ~1.2 GB resident (torch, timm, the teacher): a command may
# use 1 GB more than that before the guard calls it a runaway allocation.
BASELINE_RSS = 3 << 29


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """Clean stores of both backends (4 views in blocks of 2, 3 shards: 6 units) and their source."""
    return make_stores(tmp_path_factory.mktemp("trust"))


def copy_of(clean, backend, tmp_path, name="store") -> str:
    out = str(tmp_path / name)
    shutil.copytree(clean[backend], out)
    return out


def swap_in_another_units_labels(store: str, backend: str) -> None:
    """Unit (shard 0, view block 0) gets the labels of unit (shard 0, view block 1): the issue's cp."""
    if backend == "zarr":
        chunks = os.path.join(store, "labels.zarr/values/c")
        shutil.copy(os.path.join(chunks, "1/0/0/0"), os.path.join(chunks, "0/0/0/0"))
    else:
        shutil.copy(os.path.join(store, "units/000000_0001.tar"), os.path.join(store, "units/000000_0000.tar"))


def precompute_args(clean, out, *extra) -> list:
    return ["precompute", "--data", clean["data"], "--out", out, "--teacher", "resnet10t",
            "--teacher-weights", clean["weights"], "--model-kwargs", '{"num_classes": 3}', "--views", 4,
            "--views-per-unit", 2, "--topk", 3, "--input-size", 32, "--batch-size", 16, "--workers", 0,
            "--set", "repeats=1", "--format", "wds" if "wds" in str(out) else "zarr", *extra]


def train_args(clean, store, run) -> list:
    return ["train", "--data", clean["data"], "--labels", store, "--out", run, "--model", STUDENT,
            "--model-kwargs", json.dumps(TINY), "--distillation", "soft", "--epochs", 1, "--batch-size", 8,
            "--workers", 0, "--warmup-epochs", 0, "--max-steps-per-epoch", 1]


# ---- 1. a chunk of another unit ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_another_units_labels_are_found_by_verify_train_and_precompute(clean, backend, tmp_path):
    store = copy_of(clean, backend, tmp_path, f"swapped_{backend}")
    swap_in_another_units_labels(store, backend)

    res = invoke("verify", store, "--data", clean["data"], "--n", 0, "--full")
    assert escaped(res) is None and res.exit_code == 1, res.output
    assert res.output.splitlines()[-1].startswith("FAIL: bad units: 000000_0000 (shard=0, view_block=0); rerun the "
                                                  "same precompute command"), res.output

    run = str(tmp_path / "run")
    one_line_error(invoke(*train_args(clean, store, run)), "damaged", "shard=0, view_block=0")
    assert not os.path.exists(os.path.join(run, "checkpoint.pth")), "not one step on another unit's labels"

    with pytest.raises(StoreError, match="shard=0, view_block=0"):  # every read path refuses it
        open_store(store).read(0, 0)
    with pytest.raises(StoreError, match="shard=0, view_block=0"):
        list(open_store(store).read_view(1))

    res = invoke(*precompute_args(clean, store))
    assert escaped(res) is None and res.exit_code == 0, res.output
    assert_same_store(store, clean[backend])  # repaired, byte for byte


def test_a_unit_swapped_with_its_marker_is_refused_too(clean, tmp_path):
    """Chunk and marker of another unit copied together: the marker names its own unit, not this one."""
    store = copy_of(clean, "zarr", tmp_path)
    for array in ("ids", "values", "valid"):
        tail = "/0" * (2 if array != "valid" else 1)
        shutil.copy(f"{store}/labels.zarr/{array}/c/1/0{tail}", f"{store}/labels.zarr/{array}/c/0/0{tail}")
    shutil.copy(f"{store}/units/000000_0001.json", f"{store}/units/000000_0000.json")
    problems = open_store(store).check(full=False)
    assert [p.unit for p in problems] == [(0, 0)] and "marker of unit [0, 1]" in str(problems[0]), problems


def test_old_markers_without_a_content_checksum_are_recomputed(clean, tmp_path):
    """A marker written before data_crc32c proves nothing: the unit reads as damaged, naming the fix, and a
    resumed precompute recomputes it into the store a clean run makes."""
    store = copy_of(clean, "zarr", tmp_path)
    marker = f"{store}/units/000002_0001.json"
    record = json.load(open(marker))
    for c in record["chunks"].values():
        del c["data_crc32c"]
    open(marker, "w").write(json.dumps(record))
    (problem,) = open_store(store).check(full=False)
    assert problem.unit == (2, 1) and "older deit-lockstep" in problem.what and "rerun precompute" in problem.what
    res = invoke(*precompute_args(clean, store))
    assert escaped(res) is None and res.exit_code == 0, res.output
    assert_same_store(store, clean["zarr"])


# ---- 2. a marker never names a file to open ---------------------------------------------------------------
def test_a_marker_key_pointing_at_another_units_chunk_is_refused(clean, tmp_path):
    store = copy_of(clean, "zarr", tmp_path)
    marker = f"{store}/units/000000_0000.json"
    record, other = json.load(open(marker)), json.load(open(f"{store}/units/000000_0001.json"))
    record["chunks"]["values"] = other["chunks"]["values"]  # key, size and checksums: all another unit's
    open(marker, "w").write(json.dumps(record))
    (problem,) = open_store(store).check(full=True)
    assert problem.unit == (0, 0) and "not the unit's chunk" in problem.what, problem


def guarded(args, timeout=120.0, max_rss=BASELINE_RSS + (1 << 30)):
    """cli.py args in a subprocess, killed past timeout seconds or max_rss bytes of memory:
    (exit code or 'hang'/'memory', stdout, stderr)."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "cli.py"), *map(str, args)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    verdict = {}

    def watch():
        deadline = time.monotonic() + timeout
        while proc.poll() is None:
            try:
                rss = int(next(ln for ln in open(f"/proc/{proc.pid}/status") if ln.startswith("VmRSS")).split()[1])
            except (OSError, StopIteration):
                rss = 0
            if rss * 1024 > max_rss or time.monotonic() > deadline:
                verdict["why"] = "memory" if rss * 1024 > max_rss else "hang"
                proc.kill()
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    out, err = proc.communicate()
    watcher.join()
    return verdict.get("why", proc.returncode), out, err


def assert_one_line(result, code, *fragments):
    rc, out, err = result
    assert rc == code, (rc, out, err)
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error:"), err
    for f in fragments:
        assert f in last, (f, last)


def test_a_marker_key_of_dev_zero_is_never_opened(clean, tmp_path):
    store = copy_of(clean, "zarr", tmp_path)
    marker = f"{store}/units/000001_0000.json"
    record = json.load(open(marker))
    record["chunks"]["ids"]["key"] = "/dev/zero"
    record["chunks"]["ids"]["nbytes"] = 10**12
    open(marker, "w").write(json.dumps(record))
    (problem,) = open_store(store).check(full=False)  # in-process: it would allocate until killed
    assert problem.unit == (1, 0) and "marker" in problem.what
    with pytest.raises(StoreError, match="shard=1, view_block=0"):
        open_store(store).read(0, 1)


# ---- 3. store files are read only if regular -------------------------------------------------------------
def test_read_regular_refuses_what_could_block_or_exhaust(tmp_path):
    fifo, big, link, plain = tmp_path / "fifo", tmp_path / "big", tmp_path / "link", tmp_path / "plain"
    os.mkfifo(fifo)
    big.write_bytes(b"x" * 100)
    link.symlink_to("/dev/zero")
    plain.write_bytes(b"ok")
    for path, why in ((fifo, "FIFO"), (tmp_path, "directory"), (link, "symlink"), ("/dev/zero", "character device")):
        with pytest.raises(NotRegularFile, match=why):
            read_regular(path)
    with pytest.raises(NotRegularFile, match="more than the 10"):
        read_regular(big, 10)
    assert read_regular(plain) == b"ok" and read_regular(big, 100) == b"x" * 100


def fifo_in_place(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)
    os.mkfifo(path)


@pytest.mark.parametrize("target", ["store.json", "meta/probes.json", "manifest.parquet", "units/000001_0001.json",
                                    "labels.zarr/ids/c/1/1/0/0", "labels.zarr/valid/zarr.json"])
def test_a_fifo_in_a_stores_place_is_one_line_not_a_hang(clean, tmp_path, target):
    store = copy_of(clean, "zarr", tmp_path)
    fifo_in_place(os.path.join(store, target))
    res = invoke("inspect", store)  # in-process: the reads never block (a hang here is the old code)
    assert escaped(res) is None, res.exception
    if res.exit_code == 0:  # a unit whose file is unreadable is reported, not trusted
        assert "unreadable" in res.output or "damaged" in res.output, res.output
    else:
        one_line_error(res, os.path.basename(target) if "c/" not in target else "shard=1")


def test_a_fifo_lease_does_not_hang_join(clean, tmp_path):
    store = copy_of(clean, "zarr", tmp_path, "fifo_lease_zarr")
    os.unlink(f"{store}/units/000002_0001.json")  # one unit left to do
    os.makedirs(f"{store}/leases", exist_ok=True)
    os.mkfifo(f"{store}/leases/000002_0001.json")
    rc, out, err = guarded(precompute_args(clean, store, "--join"), timeout=240)
    assert rc == 0 and "Traceback" not in err, (rc, err)
    assert "malformed" in err, err
    assert_same_store(store, clean["zarr"])


# ---- 4. every field is checked before use -----------------------------------------------------------------
def edit_json(path: str, edit) -> None:
    d = json.load(open(path))
    edit(d)
    open(path, "w").write(json.dumps(d))


@pytest.mark.parametrize("edit,fragment", [
    (lambda d: d["spec"].update(k="3"), "spec.k is a string"),
    (lambda d: d["spec"].update(seed="x"), "spec.seed is a string"),
    (lambda d: d["spec"].update(views=10**10), "spec.views=10000000000 is outside"),
    (lambda d: d["spec"].update(num_classes=10**9), "spec.num_classes=1000000000 is outside"),
    (lambda d: d["spec"].update(shard_sizes=[8, 8, "4"]), "spec.shard_sizes[2] is a string"),
    (lambda d: d["spec"].update(taus=[float("nan")]), "spec.taus[0]=nan"),
    (lambda d: d.update(spec=[1]), "spec is a list"),
])
def test_a_store_json_field_of_the_wrong_type_or_range_is_one_line(clean, tmp_path, edit, fragment):
    store = copy_of(clean, "wds", tmp_path)
    edit_json(f"{store}/store.json", edit)
    for args in (("inspect", store), ("verify", store, "--data", clean["data"], "--n", 0)):
        one_line_error(invoke(*args), "store.json", fragment)


def test_a_store_json_that_is_a_list_is_one_line(clean, tmp_path):
    store = copy_of(clean, "zarr", tmp_path)
    open(f"{store}/store.json", "w").write("[1, 2]")
    one_line_error(invoke("inspect", store), "not a deit-lockstep-labels store")


def test_spec_and_arrays_or_manifest_that_disagree_are_one_line(clean, tmp_path):
    store = copy_of(clean, "zarr", tmp_path)
    edit_json(f"{store}/store.json", lambda d: d["spec"].update(views=6))  # arrays hold 4
    one_line_error(invoke("inspect", store), "labels.zarr/valid/zarr.json", "shape")
    store = copy_of(clean, "wds", tmp_path, "wds")
    edit_json(f"{store}/store.json", lambda d: d["spec"].update(shard_sizes=[8, 8, 5]))  # the manifest's are 8, 8, 4
    for args in (("inspect", store), ("verify", store, "--data", clean["data"], "--n", 0, "--full")):
        one_line_error(invoke(*args), "manifest.parquet", "disagrees")


def test_a_truncated_meta_file_is_named(clean, tmp_path):
    store = copy_of(clean, "zarr", tmp_path)
    path = f"{store}/meta/probes.json"
    open(path, "w").write(open(path).read()[:20])
    one_line_error(invoke("inspect", store), "meta/probes.json", "not valid JSON")
    edit_json(path, lambda d: None) if False else open(path, "w").write('{"9/0/0": "ab"}')  # view 9 of 4
    one_line_error(invoke("inspect", store), "meta/probes.json", "view")


def test_max_views_is_the_clis_max_epochs():
    from pipeline.options import MAX_EPOCHS

    assert MAX_VIEWS == MAX_EPOCHS


# ---- 5. leases ---------------------------------------------------------------------------------------------
def write_lease(book: Leases, unit, **body) -> None:
    book.dir.mkdir(parents=True, exist_ok=True)
    base = {"worker": "elsewhere-1", "host": "another-host", "pid": 7, "since": time.time(), "ttl": 120.0}
    book.path(unit).write_text(json.dumps({**base, **body}))


def test_a_lease_from_a_clock_a_day_ahead_is_taken_over_after_the_ttl(tmp_path, caplog):
    book = Leases(tmp_path, "me", ttl=0.5)
    write_lease(book, (0, 0))
    day = time.time() + 86400
    os.utime(book.path((0, 0)), (day, day))  # renewed "tomorrow"
    with caplog.at_level(logging.WARNING, logger="storage.leases"):
        assert not book.free((0, 0)), "a lease just renewed (by its clock) is held"
        assert "in the future" in caplog.text
        time.sleep(0.6)
        assert book.free((0, 0)) and book.claim((0, 0)), "not renewed since we first saw it: taken over"
    assert book.read((0, 0)).worker == "me"


@pytest.mark.parametrize("body", [{"pid": 10**23}, {"since": float("nan")}, {"ttl": float("inf")}, {"pid": "7"},
                                  {"worker": "x" * 10_000}, {"worker": "a\x00b"}, {"host": 3}])
def test_a_malformed_lease_is_stale_with_a_log_line_never_a_traceback(tmp_path, caplog, body):
    book = Leases(tmp_path, "me", ttl=1e9)
    write_lease(book, (1, 0), **{"host": socket.gethostname(), **body})  # this host: os.kill is asked
    with caplog.at_level(logging.WARNING, logger="storage.leases"):
        assert book.free((1, 0)) and book.claim((1, 0))
    assert "malformed" in caplog.text
    assert book.read((1, 0)).worker == "me"


def test_inspect_shows_a_store_with_a_malformed_lease(clean, tmp_path):
    store = copy_of(clean, "wds", tmp_path)
    os.unlink(f"{store}/units/000000_0001.tar")  # a pending unit, whose lease inspect judges
    write_lease(Leases(store), (0, 1), host=socket.gethostname(), pid=10**23, since=float("nan"), ttl=float("inf"))
    res = invoke("inspect", store, "--json")
    assert escaped(res) is None and res.exit_code == 0, res.output
    fleet = json.loads(res.output)["fleet"]
    assert (fleet["units_leased"], fleet["units_pending"]) == (0, 1), "a malformed lease holds nothing"
