"""Conformance suite for label stores: every test runs against both backends (zarr, wds); those taking
``root`` run on a local disk and on an S3 bucket (a real server, tests/s3_support.py).

Every test that makes a store takes ``root`` but one: test_wds_tar_is_a_webdataset_shard hands webdataset
a local file name (webdataset opens URLs through its own gopen, which has no s3:// of ours); a bucket's
tar is the disk's byte for byte (tests/test_bucket.py::test_a_bucket_store_holds_the_bytes_of_the_disk_store),
so the property carries over. The rest make no store (values encoding, soft and hard targets, the CLI's
format choices). What only a bucket has (conditional-create leases, the server's clock, a server killed
and restarted mid-run, bad-URL lines) is in tests/test_bucket.py; the zarr reader's label cache runs on
both roots in tests/test_label_cache.py."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import torch
from test_storage_support import (
    ROOT,
    listdir,
    read_bytes,
    remove,
    snapshot,
    tiny_spec,
    unit_data,
    write_all,
    write_bytes,
)

from storage import (
    BACKENDS,
    INVALID,
    WRITTEN,
    StoreError,
    StoreMismatch,
    create_store,
    hard_targets,
    open_store,
    soft_targets,
    topk_logprobs,
)
from storage.encoding import decode_values, encode_values

SUPPORT = os.path.join(ROOT, "tests", "test_storage_support.py")


def _expected(spec, view, shard, seed=0):
    """What read(view, shard) must return, from the deterministic unit labels."""
    block = spec.block_of(view)
    d = unit_data(spec, shard, block, seed)
    i = view - spec.block_views(block).start
    bad = d["valid"][i] != WRITTEN
    ids = d["ids"][i].astype(spec.id_dtype)
    ids[bad] = 0
    values = None
    if d["values"] is not None:
        values = d["values"][i].copy()
        values[bad] = 0
    return values, ids, d["valid"][i]


def _assert_same(labels, expected):
    values, ids, valid = expected
    assert labels.valid.dtype == np.uint8 and labels.valid.tobytes() == valid.tobytes()
    assert labels.ids.dtype == ids.dtype and labels.ids.tobytes() == ids.tobytes()
    if values is None:
        assert labels.values is None
    else:
        assert labels.values.dtype == np.float16 and labels.values.tobytes() == values.tobytes()


@pytest.fixture(params=list(BACKENDS))
def backend(request):
    return request.param


@pytest.mark.parametrize("mode", ["topk", "hard"])
def test_round_trip_and_addressing(root, backend, mode):
    spec = tiny_spec(mode)
    w = create_store(root / "s", spec, backend=backend, manifest=b"PAR1 manifest", meta={"who": "test"})
    w.set_meta("probes", {"0/0/0": "deadbeef"})
    write_all(w)
    r = open_store(root / "s", expect=spec)
    assert r.spec == spec and r.backend == backend
    assert r.manifest_bytes == b"PAR1 manifest"
    assert r.meta["who"] == "test" and r.meta["probes"] == {"0/0/0": "deadbeef"}
    assert r.completed_units() == spec.units() and r.versions["zarr"]
    for view in range(spec.views):
        for shard in range(spec.num_shards):
            _assert_same(r.read(view, shard), _expected(spec, view, shard))
        shards = [s for s, _ in r.read_view(view)]
        assert shards == list(range(spec.num_shards))
        flat = r.read_view_flat(view)
        assert len(flat) == sum(spec.shard_sizes)
        off = r.spec.shard_starts
        _assert_same(flat[off[2] : off[2] + 9], _expected(spec, view, 2))
    one = r.read_slot(3, 2, 8)
    values, ids, valid = _expected(spec, 3, 2)
    _assert_same(one, (None if values is None else values[8:9], ids[8:9], valid[8:9]))
    assert (r.read(0, 0).valid == INVALID).any()  # invalid images are kept as flags
    assert r.check() == [] and r.nbytes() > 0
    with pytest.raises(StoreError, match="slot 9"):
        r.read_slot(0, 2, 9)


def test_int32_ids_for_many_classes(root, backend):
    spec = tiny_spec(num_classes=40000, class_names=(), shard_sizes=(3,), views=2)
    w = create_store(root / "s", spec, backend=backend)
    write_all(w)
    r = open_store(root / "s")
    assert r.read(1, 0).ids.dtype == np.int32
    _assert_same(r.read(1, 0), _expected(spec, 1, 0))


def test_incomplete_units_refused(root, backend):
    spec = tiny_spec()
    w = create_store(root / "s", spec, backend=backend)
    w.write_unit(0, 0, **unit_data(spec, 0, 0))
    r = open_store(root / "s")
    assert r.completed_units() == [(0, 0)] and r.is_complete(0, 0) and not r.is_complete(1, 0)
    r.read(1, 0)
    with pytest.raises(StoreError, match=r"unit \(shard=1, view_block=0\) is not complete"):
        r.read(0, 1)
    with pytest.raises(StoreError, match="not complete"):
        list(r.read_view(0))


def test_rewrite_is_byte_identical(root, backend):
    spec = tiny_spec()
    w = create_store(root / "s", spec, backend=backend)
    write_all(w)
    before = snapshot(root / "s")
    w2 = create_store(root / "s", spec, backend=backend)  # a resumed run reopens it
    write_all(w2)
    assert snapshot(root / "s") == before
    # an independent store written in another order holds the same bytes, unit for unit
    w3 = create_store(root / "t", spec, backend=backend)
    for s, b in reversed(spec.units()):
        w3.write_unit(s, b, **unit_data(spec, s, b))
    other = snapshot(root / "t")
    assert {k: v for k, v in other.items() if k != "store.json"} == {
        k: v for k, v in before.items() if k != "store.json"
    }


def test_rewrite_with_other_labels_replaces_unit(root, backend):
    spec = tiny_spec()
    w = create_store(root / "s", spec, backend=backend)
    w.write_unit(0, 0, **unit_data(spec, 0, 0, seed=0))
    w.write_unit(0, 0, **unit_data(spec, 0, 0, seed=7))
    r = open_store(root / "s")
    _assert_same(r.read(1, 0), _expected(spec, 1, 0, seed=7))
    assert r.check() == []


def test_spec_mismatch_names_the_field(root, backend):
    spec = tiny_spec()
    create_store(root / "s", spec, backend=backend)
    msg = r"made with seed=0, you asked for seed=1; use a new --out or --overwrite"
    with pytest.raises(StoreMismatch, match=msg):
        create_store(root / "s", tiny_spec(seed=1), backend=backend)
    with pytest.raises(StoreMismatch, match=r"recipe\.mixup=0\.8, you asked for recipe\.mixup=0\.5"):
        create_store(root / "s", tiny_spec(recipe={"preset": "deit", "mixup": 0.5}), backend=backend)
    with pytest.raises(StoreMismatch, match=r"with k=5, you asked for k=10"):
        open_store(root / "s", expect=tiny_spec(k=10))
    other = "wds" if backend == "zarr" else "zarr"
    with pytest.raises(StoreMismatch, match=f"backend={backend}"):
        create_store(root / "s", spec, backend=other)
    w = create_store(root / "s", tiny_spec(seed=1), backend=backend, overwrite=True)
    assert w.spec.seed == 1 and open_store(root / "s").spec.seed == 1


def test_bad_inputs_are_refused(root, backend):
    spec = tiny_spec()
    w = create_store(root / "s", spec, backend=backend)
    d = unit_data(spec, 0, 0)
    with pytest.raises(StoreError, match="not raw logits"):
        w.write_unit(0, 0, values=(d["values"] + 20).astype(np.float16), ids=d["ids"], valid=d["valid"])
    with pytest.raises(StoreError, match="shape"):
        w.write_unit(0, 0, values=d["values"][:, :3], ids=d["ids"][:, :3], valid=d["valid"][:, :3])
    with pytest.raises(StoreError, match="outside the store"):
        w.write_unit(3, 0, **d)
    with pytest.raises(StoreError, match="not a label store"):
        open_store(root / "nothing")


def _run_children(args_list, timeout=60):
    procs = [
        subprocess.Popen(
            [sys.executable, SUPPORT, *map(str, a)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for a in args_list
    ]
    outs = [p.communicate(timeout=timeout) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err


def test_concurrent_create_from_processes(root, backend):
    path = root / "s"
    start = time.time() + 1.0  # all children call create_store at the same moment
    _run_children([("child_create_and_write", path, backend, start, shard) for shard in range(3)])
    r = open_store(path, expect=tiny_spec())
    assert r.completed_units() == tiny_spec().units() and r.check() == []
    assert r.manifest_bytes == b"manifest"
    assert [p for p in listdir(root) if p != "s"] == []  # the losers cleaned up their temp dirs (a bucket has none)
    for shard in range(3):
        _assert_same(r.read(4, shard), _expected(r.spec, 4, shard))


def test_writer_killed_mid_unit_leaves_unit_absent(root, backend):
    from storage.bucket import ObjPath

    path = root / "s"
    p = subprocess.Popen(
        [sys.executable, SUPPORT, "child_hang_before_commit", str(path), backend, "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert p.stdout.readline().strip() == "READY", p.stderr.read()
        os.kill(p.pid, signal.SIGKILL)  # data written and fsynced, commit not yet done
        p.wait(timeout=10)
    finally:
        p.kill()
    r = open_store(path)
    assert not r.is_complete(1, 0) and r.completed_units() == []
    # it really died mid-commit: a temporary on a disk; on a bucket the zarr unit's chunks, put before its
    # marker (a wds unit is one PUT, its tar: nothing of it can be there)
    if not isinstance(path, ObjPath):
        assert any(".tmp" in name for name in os.listdir(path / "units"))
    elif backend == "zarr":
        assert [k for k in snapshot(path) if "/c/0/1/" in k] and listdir(path / "units") == []
    else:
        assert listdir(path / "units") == []
    with pytest.raises(StoreError, match="not complete"):
        r.read(0, 1)
    assert r.check() == []
    # the restarted worker finishes the unit, identical to an uninterrupted run
    w = create_store(path, tiny_spec(), backend=backend)
    w.write_unit(1, 0, **unit_data(w.spec, 1, 0))
    _assert_same(open_store(path).read(1, 1), _expected(w.spec, 1, 1))


def test_writer_killed_at_random_moments_never_tears(root, backend):
    path = root / "s"
    spec = tiny_spec(shard_sizes=(300, 200, 300))
    rng = np.random.default_rng(1)
    for _ in range(3):
        p = subprocess.Popen(
            [sys.executable, SUPPORT, "child_write_forever", str(path), backend],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert p.stdout.readline().strip() == "READY", p.stderr.read()
        time.sleep(rng.uniform(0.05, 0.4))
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=10)
        r = open_store(path)
        assert r.check() == []
        for shard, block in r.completed_units():  # every visible unit is wholly one run's labels
            view = spec.block_views(block).start
            got = r.read(view, shard)
            matches = [got.ids.tobytes() == _expected(spec, view, shard, s)[1].tobytes() for s in (0, 1)]
            assert any(matches)
            seed = matches.index(True)
            for v in spec.block_views(block):
                _assert_same(r.read(v, shard), _expected(spec, v, shard, seed))


def _damage(path, backend, unit, how, array="ids"):
    """Flip one byte in, or drop, one array's data (ids by default) of one unit (a file, or an object).

    The one place in the tests that knows each backend's files: a new backend adds its case here."""
    name = f"{unit[0]:06d}_{unit[1]:04d}"
    if backend == "zarr":
        key = f"labels.zarr/{array}/c/{unit[1]}/{unit[0]}/" + "/".join(["0"] * (2 if array == "ids" else 1))
        target = path / key
        if how == "drop":
            remove(target)
            return
        offset = len(read_bytes(target)) // 2
    elif backend == "wds":
        target = path / "units" / f"{name}.tar"
        with tarfile.open(fileobj=io.BytesIO(read_bytes(target))) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith(f".{array}.blosc"))
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers() if m is not member]
        if how == "drop":  # rewrite the tar without that member: a lost chunk
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as tar:
                for m, data in members:
                    tar.addfile(m, io.BytesIO(data))
            write_bytes(target, buf.getvalue())
            return
        offset = member.offset_data + member.size // 2
    else:
        raise AssertionError(f"_damage knows no files of backend {backend!r}: add them")
    data = bytearray(read_bytes(target))
    data[offset] ^= 0x10
    write_bytes(target, bytes(data))


@pytest.mark.parametrize("how", ["flip", "drop"])
def test_check_finds_damage_and_names_unit(root, backend, how):
    spec = tiny_spec()
    w = create_store(root / "s", spec, backend=backend)
    write_all(w)
    _damage(root / "s", backend, (1, 2), how)
    r = open_store(root / "s")
    problems = r.check()
    assert [p.unit for p in problems] == [(1, 2)], problems
    assert "shard=1, view_block=2" in str(problems[0]) and "rerun precompute" in str(problems[0])
    assert [p.unit for p in r.check(full=False)] == [(1, 2)]
    with pytest.raises(StoreError):  # reading the damaged unit fails loudly, never silently
        r.read(4, 1)
    r.read(4, 0)


def _expected_flags(spec, units):
    written = invalid = 0
    for shard, block in units:
        valid = unit_data(spec, shard, block)["valid"]
        written, invalid = written + int((valid == WRITTEN).sum()), invalid + int((valid == INVALID).sum())
    return written, invalid


def test_count_flags_counts_exactly_from_the_flags_alone(root, backend):
    spec = tiny_spec()
    w = create_store(root / "s", spec, backend=backend)
    write_all(w)
    r = open_store(root / "s")
    f = r.count_flags()
    assert (f.written, f.invalid, f.unreadable) == (*_expected_flags(spec, spec.units()), [])
    assert f.invalid > 0 and f.written > 0
    some = [(0, 0), (2, 1), (1, 2)]
    g = r.count_flags(some)
    assert (g.written, g.invalid, g.unreadable) == (*_expected_flags(spec, some), [])
    with pytest.raises(StoreError):
        r.count_flags([(3, 0)])  # no shard 3


@pytest.mark.parametrize("how", ["flip", "drop"])
def test_count_flags_names_a_unit_whose_flags_are_damaged(root, backend, how):
    """A flipped byte or a lost valid chunk/member: that unit is named unreadable, the others still count."""
    spec = tiny_spec()
    w = create_store(root / "s", spec, backend=backend)
    write_all(w)
    _damage(root / "s", backend, (1, 2), how, array="valid")
    f = open_store(root / "s").count_flags()
    rest = [u for u in spec.units() if u != (1, 2)]
    assert (f.written, f.invalid, f.unreadable) == (*_expected_flags(spec, rest), [(1, 2)])


def test_cli_format_choices_are_the_backend_registry():
    import click

    import cli

    option = next(p for p in cli.precompute.params if p.name == "backend")
    assert isinstance(option.type, click.Choice) and tuple(option.type.choices) == tuple(BACKENDS)
    assert option.default in BACKENDS


def test_wds_tar_is_a_webdataset_shard(tmp_path):
    import webdataset as wds

    spec = tiny_spec()
    w = create_store(tmp_path / "s", spec, backend="wds")
    write_all(w)
    samples = list(wds.WebDataset(str(tmp_path / "s" / "units" / "000001_0002.tar"), shardshuffle=False))
    assert samples[0]["__key__"] == "000001_0002"
    assert {"json", "ids.blosc", "values.blosc", "valid.blosc"} <= set(samples[0])


# ---- values encoding and soft targets --------------------------------------------------------


def test_values_encoding_is_lossless():
    rng = np.random.default_rng(0)
    v = -np.sort(np.abs(rng.standard_normal((100, 10)) * 5), axis=-1).astype(np.float16)
    v[0] = 0
    v[1] = np.float16(-65504)
    assert decode_values(encode_values(v)).tobytes() == v.tobytes()


def _peaked_logits(n=64, c=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g) * 3 + torch.randn(n, 1, generator=g)


def test_soft_targets_exact_at_tau_1():
    logits, k, c = _peaked_logits(), 10, 100
    values, ids = topk_logprobs(logits, k)
    t = soft_targets(values, ids, c, tau=1.0)
    p = torch.softmax(logits, dim=-1)
    assert t.dtype == torch.float32 and t.shape == (64, c)
    torch.testing.assert_close(t.gather(1, ids), p.gather(1, ids), rtol=2e-3, atol=1e-6)  # fp16 rounding only
    tail = 1 - p.gather(1, ids).sum(1)
    torch.testing.assert_close(t.sum(1) - t.gather(1, ids).sum(1), tail, rtol=0, atol=2e-3)
    torch.testing.assert_close(t.sum(1), torch.ones(64))
    # numpy in, numpy out
    tn = soft_targets(values.numpy(), ids.numpy(), c)
    assert isinstance(tn, np.ndarray) and np.allclose(tn, t.numpy())


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0, 4.0])
def test_soft_targets_k_equals_c_is_exact_softmax(tau):
    logits = _peaked_logits(c=20)
    values, ids = topk_logprobs(logits, 20)
    t = soft_targets(values, ids, 20, tau=tau)
    torch.testing.assert_close(t, torch.softmax(logits / tau, dim=-1), rtol=0, atol=2e-3 / tau)


def test_soft_targets_tempered_topk_keep_relative_weights():
    logits, k, c, tau = _peaked_logits(), 5, 100, 3.0
    values, ids = topk_logprobs(logits, k)
    t = soft_targets(values, ids, c, tau=tau)
    q = torch.softmax(logits / tau, dim=-1).gather(1, ids)
    top = t.gather(1, ids)
    torch.testing.assert_close(top / top[:, :1], q / q[:, :1], rtol=3e-3, atol=0)
    # uniform tail is an upper bound on the tempered tail mass for tau > 1 (Jensen)
    assert (1 - top.sum(1) >= 1 - q.sum(1) - 1e-4).all()


def test_hard_targets():
    logits = _peaked_logits()
    _, ids = topk_logprobs(logits, 5)
    assert torch.equal(hard_targets(ids), logits.argmax(1))
    assert np.array_equal(hard_targets(ids[:, 0].numpy().astype(np.int16)), logits.argmax(1).numpy())


@pytest.mark.parametrize("mode", ["topk", "hard"])
def test_all_zero_unit_is_written_whole(root, backend, mode):
    """A unit whose labels are all zero (every argmax class 0) is still a complete, checkable unit.

    zarr skips chunks equal to the fill value unless told otherwise; the marker would then point
    at a chunk that was never written.
    """
    spec = tiny_spec(mode, shard_sizes=(4,), views=2)
    w = create_store(root / "s", spec, backend=backend)
    shape = (len(spec.block_views(0)), 4)
    values = np.zeros((*shape, spec.k), np.float16) if mode == "topk" else None
    ids = np.zeros((*shape, spec.k) if mode == "topk" else shape, np.int64)
    if mode == "topk":
        ids[..., :] = np.arange(spec.k)  # sorted log-probs of 0 are allowed; ids must differ only in order
    w.write_unit(0, 0, values=values, ids=ids, valid=np.ones(shape, np.uint8))
    r = open_store(root / "s")
    assert r.is_complete(0, 0) and r.check() == []
    assert (r.read(0, 0).valid == WRITTEN).all()


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_a_format_1_store_is_refused_with_one_line_to_recompute(root, backend):
    """Format 2 laid repeated augmentation out in windows: a format-1 store's labels sit at other slots."""
    import json

    path = root / "s"
    write_all(create_store(str(path), tiny_spec(), backend=backend))
    meta = json.loads(read_bytes(path / "store.json"))
    assert meta["format_version"] == 2
    write_bytes(path / "store.json", json.dumps({**meta, "format_version": 1}).encode())
    with pytest.raises(StoreError, match=r"format version 1, older than this code's 2 .*re-run precompute") as e:
        open_store(str(path))
    assert "\n" not in str(e.value)
