"""A fleet that always finishes: leases, workers frozen or killed mid-unit, --join, growing a store.

Every fleet store is compared byte for byte (unit markers or tars, zarr chunks and zarr.json) with a
store one process made alone."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import write_wds
from test_faults import ENV, ROOT, SUPPORT, assert_same_store, invoke, one_line_error, pconfig, pflags, precompute

from storage import open_store
from storage.leases import Leases

TTL = 2.0  # seconds: short, so a frozen worker's lease expires within the test


# ---- the lease book alone ------------------------------------------------------------------------
def test_a_lease_is_exclusive_until_it_expires_and_is_renewed_by_its_holder(tmp_path):
    a, b = Leases(tmp_path, "a", ttl=TTL), Leases(tmp_path, "b", ttl=TTL)
    unit = (3, 1)
    assert a.claim(unit) and a.claim(unit), "a claim is exclusive, and idempotent for its holder"
    assert not b.claim(unit) and a.held() == [unit] and b.held() == []
    assert b.read(unit).worker == "a" and b.read(unit).pid == os.getpid()
    old = time.time() - 10 * TTL
    os.utime(a.path(unit), (old, old))  # the holder stopped renewing long ago
    assert b.free(unit)
    a.renew()  # ... until it renews: alive again
    assert not b.free(unit) and not b.claim(unit)
    os.utime(a.path(unit), (old, old))
    assert b.claim(unit), "an expired lease is taken over"
    assert b.read(unit).worker == "b" and a.held() == [] and b.held() == [unit]
    a.release(unit)  # a woke up: it cannot free b's lease
    assert b.read(unit).worker == "b"
    b.release(unit)
    assert b.read(unit) is None and not os.listdir(b.dir)
    # takers racing for one expired lease: exactly one gets it
    assert a.claim(unit)
    os.utime(a.path(unit), (old, old))
    takers = [Leases(tmp_path, f"t{i}", ttl=TTL) for i in range(5)]
    assert sum(t.claim(unit) for t in takers) == 1


def _move_to_another_host(path, pid=None):
    """Rewrite a lease file as held on another host (mtime, the last renewal, kept)."""
    st = os.stat(path)
    body = json.loads(open(path).read())
    body["host"] = "a-lost-node"
    body["pid"] = body["pid"] if pid is None else pid
    open(path, "w").write(json.dumps(body))
    os.utime(path, (st.st_atime, st.st_mtime))


def test_a_lease_whose_holder_on_this_host_is_gone_is_stale_at_once(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that existed on this host and is gone now
    unit, forever = (0, 2), 1e9
    holder = Leases(tmp_path, "killed", ttl=forever)
    assert holder.claim(unit)
    body = json.loads(open(holder.path(unit)).read())
    open(holder.path(unit), "w").write(json.dumps(dict(body, pid=gone.pid)))
    taker = Leases(tmp_path, "rerun", ttl=forever)
    assert taker.read(unit).holder_gone() and taker.free(unit) and taker.claim(unit), \
        "a rerun on the same machine resumes at once, not after the ttl"
    assert taker.read(unit).worker == "rerun" and not taker.read(unit).holder_gone(), "a live holder is not gone"
    _move_to_another_host(taker.path(unit), pid=gone.pid)
    other = Leases(tmp_path, "third", ttl=forever)
    assert not other.free(unit) and not other.claim(unit), "a holder on another host is judged by its ttl alone"


# ---- real processes --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fleet_base(tmp_path_factory, tiny_teacher):
    """24 samples in 3 shards, 4 views of one view per unit: 12 units, and the store one process makes."""
    root = tmp_path_factory.mktemp("fleet")
    data = write_wds(root / "wds", n=24, per_shard=8)
    ref = root / "ref"
    precompute(data, ref, tiny_teacher, views=4)
    return {"root": root, "data": data, "teacher": tiny_teacher, "ref": ref}


def _lease_of(out, pid, deadline):
    """Wait until the process pid holds a lease on out; returns the unit."""
    leases = Leases(out)
    while time.monotonic() < deadline:
        for lease in leases.all():
            if lease.pid == pid:
                return lease.unit
        time.sleep(0.02)
    raise AssertionError(f"process {pid} never held a lease")


def _start_slow(tmp_path, name, cfg, seconds):
    """A fleet member whose teacher takes `seconds` more per batch (tests/faults_support.py)."""
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return subprocess.Popen([sys.executable, SUPPORT, "slow-precompute", str(path), str(seconds)], cwd=ROOT,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_four_workers_one_frozen_mid_unit_the_other_three_finish_the_same_bytes(fleet_base, tmp_path):
    out = tmp_path / "store"
    common = dict(views=4, lease_ttl=TTL)
    frozen = _start_slow(tmp_path, "r3", pconfig(fleet_base["data"], out, fleet_base["teacher"], rank=3,
                                                 world_size=4, **common), 1.0)
    others = []
    try:
        unit = _lease_of(out, frozen.pid, time.monotonic() + 180)
        os.kill(frozen.pid, signal.SIGSTOP)  # holding a lease on `unit`, half-way through it
        assert not open_store(out).is_complete(*unit)
        cmd = [sys.executable, os.path.join(ROOT, "cli.py"), "precompute"]
        others = [subprocess.Popen(cmd + pflags(pconfig(fleet_base["data"], out, fleet_base["teacher"], rank=r,
                                                        world_size=4, **common)),
                                   cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                  for r in range(3)]
        results = [p.communicate(timeout=300) for p in others]
        assert [p.returncode for p in others] == [0, 0, 0], [r[1][-2000:] for r in results]
        r = open_store(out)
        assert r.completed_units() == r.spec.units(), "the three finished everything, the frozen one's units too"
        assert frozen.poll() is None, "while rank 3 was still frozen"
        assert Leases(out).read(unit) is None, "its lease was taken over, and released after the commit"
        assert_same_store(out, fleet_base["ref"])
    finally:
        os.kill(frozen.pid, signal.SIGCONT)  # it wakes up, finishes its unit (same bytes: nothing written)
        _, err = frozen.communicate(timeout=300)
        for p in others:
            if p.poll() is None:
                p.kill()
    assert frozen.returncode == 0, err[-2000:]
    assert_same_store(out, fleet_base["ref"])


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["wds"])
def test_a_worker_killed_holding_a_lease_is_taken_over_once_it_expires(fleet_base, tmp_path, backend):
    ref = tmp_path / "ref"
    precompute(fleet_base["data"], ref, fleet_base["teacher"], views=4, backend=backend)
    out = tmp_path / "store"
    cfg = pconfig(fleet_base["data"], out, fleet_base["teacher"], views=4, backend=backend, join=True,
                  lease_ttl=TTL)
    victim = _start_slow(tmp_path, "victim", cfg, 1.0)
    unit = _lease_of(out, victim.pid, time.monotonic() + 180)
    victim.kill()  # SIGKILL: no cleanup, the lease stays behind
    victim.communicate(timeout=60)
    lease = Leases(out).read(unit)
    assert lease is not None and lease.pid == victim.pid and not open_store(out).is_complete(*unit)
    _move_to_another_host(Leases(out).path(unit))  # a lost node: its process cannot be asked, only its ttl
    summary = precompute(fleet_base["data"], out, fleet_base["teacher"], views=4, backend=backend, join=True,
                         lease_ttl=TTL)
    assert summary.units_complete == summary.units_total == 12 and summary.units_done == 12
    assert time.time() > lease.renewed + TTL, "it waited for the lease to expire"
    assert not [f for f in os.listdir(out / "leases") if not f.startswith(".")], "no lease left behind"
    assert_same_store(out, ref)


def test_rerunning_with_another_world_size_finishes_the_rest(fleet_base, tmp_path):
    out = tmp_path / "store"
    s = precompute(fleet_base["data"], out, fleet_base["teacher"], views=4, rank=0, world_size=3, claim=False)
    assert s.units_done == 4 and len(open_store(out).completed_units()) == 4, "static split: its third only"
    s = precompute(fleet_base["data"], out, fleet_base["teacher"], views=4, rank=1, world_size=2)
    assert s.units_complete == 12 and s.units_done == 8, "its own share, then rank 0's pending units"
    assert_same_store(out, fleet_base["ref"])


@pytest.mark.slow
def test_join_processes_started_at_different_times_share_one_store(fleet_base, tmp_path):
    out = tmp_path / "store"
    cfg = pconfig(fleet_base["data"], out, fleet_base["teacher"], views=4, join=True)
    cmd = [sys.executable, os.path.join(ROOT, "cli.py"), "precompute", *pflags(cfg)]
    first = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(3)
    second = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = [p.communicate(timeout=300) for p in (first, second)]
    assert [first.returncode, second.returncode] == [0, 0], [r[1][-2000:] for r in results]
    assert all("this process (worker " in r[0] and "the store is complete" in r[0] for r in results), \
        [r[0] for r in results]
    assert_same_store(out, fleet_base["ref"])


def test_join_refuses_a_rank_in_one_line(fleet_base, tmp_path):
    cfg = pconfig(fleet_base["data"], tmp_path / "s", fleet_base["teacher"], join=True, rank=0, world_size=2)
    code, lines, crashed, _ = invoke("precompute", *pflags(cfg))
    one_line_error(code, lines, crashed, 2, "--join takes no rank")
    assert not (tmp_path / "s").exists()


# ---- growing a store ----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["zarr", "wds"])
def test_a_grown_store_is_the_store_made_with_more_views_from_the_start(fleet_base, tmp_path, backend):
    data, teacher = fleet_base["data"], fleet_base["teacher"]
    fresh, out = tmp_path / "fresh", tmp_path / "grown"
    precompute(data, fresh, teacher, views=6, views_per_unit=2, backend=backend)
    # 3 views in blocks of 2: the last block (view 2) is short, and becomes views 2-3 when the store grows
    precompute(data, out, teacher, views=3, views_per_unit=2, backend=backend)
    s = precompute(data, out, teacher, views=6, views_per_unit=2, backend=backend)
    assert s.units_skipped == 3 and s.units_done == 6, "blocks 1 (now longer) and 2 computed, block 0 kept"
    assert_same_store(out, fresh)
    grown, made = open_store(out), open_store(fresh)
    assert grown.spec == made.spec and grown.meta["probes"] == made.meta["probes"]
    code, lines, crashed, _ = invoke("precompute", *pflags(pconfig(data, out, teacher, views=4, views_per_unit=2)),
                                     "--format", backend)
    one_line_error(code, lines, crashed, 2, "made with views=6", "only grows")
    assert_same_store(out, fresh)


def test_train_reads_the_views_a_store_grew(fleet_base, tmp_path):
    from test_faults import tconfig, weights_bytes

    from student.train import train

    data, teacher = fleet_base["data"], fleet_base["teacher"]
    grown = tmp_path / "grown"
    precompute(data, grown, teacher, views=2)
    precompute(data, grown, teacher, views=4)
    runs = {}
    for name, store in (("grown", grown), ("made", fleet_base["ref"])):  # ref: 4 views from the start
        cfg = tconfig(data, store, tmp_path / f"run-{name}", epochs=4, max_steps_per_epoch=1)
        train(cfg)
        runs[name] = weights_bytes(cfg.out)
    assert runs["grown"] == runs["made"], "epochs 2-3 read views 2-3, the ones the store grew"


# ---- watching the fleet ---------------------------------------------------------------------------------
def test_inspect_shows_units_complete_leased_pending_holders_rate_and_eta(fleet_base, tmp_path):
    out = tmp_path / "store"
    precompute(fleet_base["data"], out, fleet_base["teacher"], views=4, rank=0, world_size=3, claim=False)
    busy, gone = Leases(out, "gpu-node-7", ttl=60), Leases(out, "lost-node", ttl=TTL)
    assert busy.claim((1, 0)) and gone.claim((2, 2))
    old = time.time() - 10 * TTL
    os.utime(gone.path((2, 2)), (old, old))
    res = invoke("inspect", out, "--json")
    assert res[0] == 0, res[1]
    f = json.loads(res[3].output)["fleet"]
    assert (f["units_complete"], f["units_leased"], f["units_pending"]) == (4, 1, 7)
    holders = {tuple(x["unit"]): (x["worker"], x["expired"]) for x in f["leases"]}
    assert holders == {(1, 0): ("gpu-node-7", False), (2, 2): ("lost-node", True)}
    assert f["recent_units"] == 4 and f["views_per_s"] > 0
    assert f["views_left"] == 8 * 8 and f["eta_s"] == pytest.approx(f["views_left"] / f["views_per_s"])
    text = invoke("inspect", out)[3].output
    assert "fleet       4 units complete, 1 leased, 7 pending; 4 units in the last" in text, text
    assert "unit (1,0) held by gpu-node-7" in text and "unit (2,2) held by lost-node" in text and "EXPIRED" in text


@pytest.mark.parametrize("backend", ["zarr", "wds"])
def test_growing_retracts_a_short_last_block_and_stops_a_writer_of_the_old_views(root, backend):
    import numpy as np

    from storage import StoreError, StoreSpec, create_store
    from storage.api import grow_store

    spec = StoreSpec(mode="hard", k=0, num_classes=3, class_names=(), views=3, shard_sizes=(4, 4), views_per_unit=2)
    old = create_store(root / "s", spec, backend=backend)
    for shard, block in spec.units():
        vb = len(spec.block_views(block))
        old.write_unit(shard, block, values=None, ids=np.ones((vb, 4), np.int64), valid=np.ones((vb, 4), np.uint8))
    assert grow_store(root / "s", 6) and not grow_store(root / "s", 6), "grown once"
    r = open_store(root / "s")
    assert r.spec.views == 6 and r.completed_units() == [(0, 0), (1, 0)], "block 1 (view 2 of 3) is redone whole"
    with pytest.raises(StoreError, match="grown"):
        old.write_unit(0, 1, values=None, ids=np.ones((1, 4), np.int64), valid=np.ones((1, 4), np.uint8))
    assert open_store(root / "s").completed_units() == [(0, 0), (1, 0)]
