"""ImageNet-21k scale (issue 22), tested by counting (allocations, calls, syscalls), never by timing.

- class_diversity: [classes x distinct shard sizes], not [classes x shards]; same floats as that.
- Manifest.read_sample: the shard table is one bincount per manifest, not two per call.
- precompute's endgame poll: one listing of units/ and one of leases/, not a stat per unit.
"""

from __future__ import annotations

import os
import tracemalloc

import numpy as np
import pyarrow as pa
import pytest
from conftest import write_imagefolder
from hypothesis import given, settings
from hypothesis import strategies as st
from test_storage_support import tiny_spec, unit_data

from pipeline.sources import Manifest, class_diversity, index_source
from pipeline.stage1.fleet import any_free, pending
from storage import create_store
from storage.leases import Leases


def _manifest(shard_of_sample, label_of_sample, num_shards: int, num_classes: int) -> Manifest:
    """A manifest of just the columns the shard table and class_diversity read (sorted by shard)."""
    order = np.argsort(np.asarray(shard_of_sample), kind="stable")
    samples = pa.table({"shard": pa.array(np.asarray(shard_of_sample, np.int64)[order]),
                        "label": pa.array(np.asarray(label_of_sample, np.int64)[order])})
    return Manifest(kind="imagefolder", root="", shards=[f"virtual-{i:06d}" for i in range(num_shards)],
                    class_names=[f"c{i}" for i in range(num_classes)], samples=samples)


def _expected_as_before(m: Manifest) -> np.ndarray:
    """class_diversity's expected as it was worked out before issue 22: the whole [classes x shards]."""
    label = m.samples.column("label").to_numpy().astype(np.int64)
    c = max(m.num_classes, int(label.max()) + 1 if len(label) else 1)
    p = np.bincount(label, minlength=c) / max(len(label), 1)
    p = p[p > 0]
    n = np.asarray(m.shard_sizes, dtype=np.float64)
    return (1.0 - np.power.outer(1.0 - p, n)).sum(axis=0)


def _random_manifest(rng, num_shards: int, distinct_sizes: int, num_classes: int) -> Manifest:
    sizes = rng.choice(rng.integers(1, 40, size=distinct_sizes), size=num_shards)
    shard = np.repeat(np.arange(num_shards), sizes)
    weights = rng.random(num_classes) ** 3  # skewed class frequencies, some classes nearly absent
    label = rng.choice(num_classes, size=len(shard), p=weights / weights.sum())
    return _manifest(shard, label, num_shards, num_classes)


@pytest.mark.parametrize("num_shards,distinct_sizes,num_classes", [
    (1, 1, 7),        # one shard
    (2, 1, 300),      # equal shards: one distinct size
    (50, 1, 1000),
    (50, 2, 1000),    # a short last shard
    (200, 5, 2000),
    (3, 3, 1),        # one class
])
def test_class_diversity_gives_the_same_floats_as_the_whole_table(num_shards, distinct_sizes, num_classes):
    m = _random_manifest(np.random.default_rng([num_shards, distinct_sizes, num_classes]),
                         num_shards, distinct_sizes, num_classes)
    assert np.array_equal(class_diversity(m).expected, _expected_as_before(m))


@settings(derandomize=True, deadline=None, max_examples=60)
@given(st.integers(1, 120), st.integers(1, 4), st.integers(1, 3000), st.integers(0, 2**32 - 1))
def test_class_diversity_is_bit_identical_on_drawn_sources(num_shards, distinct_sizes, num_classes, seed):
    m = _random_manifest(np.random.default_rng(seed), num_shards, distinct_sizes, num_classes)
    assert np.array_equal(class_diversity(m).expected, _expected_as_before(m))


def test_class_diversity_at_imagenet_21k_never_holds_classes_x_shards():
    """21,841 classes x 14,000 equal shards: the whole table would be 2.4 GB (twice, with 1 - x)."""
    classes, shards = 21_841, 14_000
    shard = np.repeat(np.arange(shards), 2)
    m = _manifest(shard, np.arange(len(shard)) % classes, shards, classes)
    tracemalloc.start()
    try:
        d = class_diversity(m)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 200 * 2**20, f"class_diversity peaked at {peak / 2**20:.0f} MiB"
    assert d.observed.shape == d.expected.shape == (shards,)
    # two samples a shard: 2 distinct classes seen, a little under 2 expected (a draw may repeat one)
    assert np.all(d.observed == 2) and np.all(d.expected == d.expected[0]) and 1.999 < d.expected[0] < 2


def test_class_diversity_memory_does_not_grow_with_the_samples(monkeypatch):
    """Observed classes are counted a block of shards at a time: with blocks of 16k samples, 2M samples
    (ImageNet-21k's 14.2M would be 7x more) peak at a few MB; counting over the whole column at once
    (int64 copies of shard and label, a sort of all pairs) would hold ~80 MB."""
    import pipeline.sources.layout as layout

    n, classes, per_shard = 2_000_000, 21_841, 1024
    shard = (np.arange(n) // per_shard).astype(np.int32)
    label = (np.arange(n, dtype=np.int64) * 7919 % classes).astype(np.int32)
    m = _manifest(shard, label, int(shard[-1]) + 1, classes)
    m.shard_sizes, m.shard_starts  # noqa: B018 - the manifest's shard table, not class_diversity's
    monkeypatch.setattr(layout, "_BLOCK_SAMPLES", 1 << 14)
    tracemalloc.start()
    try:
        d = class_diversity(m)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, f"class_diversity peaked at {peak / 2**20:.1f} MiB"
    # the same counts as over the whole column: distinct (shard, class) pairs per shard
    pairs = np.unique(shard.astype(np.int64) * classes + label)
    assert np.array_equal(d.observed, np.bincount(pairs // classes, minlength=len(m.shards)))


@pytest.mark.parametrize("kind", ["imagefolder", "wds"])
def test_read_sample_works_out_the_shard_table_once_per_manifest(tmp_path, monkeypatch, kind, wds_dir):
    root = write_imagefolder(tmp_path / "f", per_class=8) if kind == "imagefolder" else wds_dir
    src = index_source(root, **({"shard_size": 6} if kind == "imagefolder" else {}))
    m = Manifest.from_bytes(src.to_bytes())  # a fresh manifest, as a store's reader opens it
    m.__dict__.pop("shard_sizes", None)  # however from_bytes checked it: count from nothing
    m.__dict__.pop("shard_starts", None)
    sizes = src.shard_sizes
    calls = []
    real = np.bincount
    monkeypatch.setattr(np, "bincount", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    reads = [(shard, i % sizes[shard]) for i, shard in enumerate(i % len(sizes) for i in range(100))]
    for shard, position in reads:
        assert m.read_sample(shard, position).position == position
    assert len(calls) <= 1, f"{len(calls)} bincounts for {len(reads)} read_sample calls"
    monkeypatch.undo()
    assert m.read_sample(1, 2).data == src.read_sample(1, 2).data


def test_replacing_the_samples_works_the_shard_table_out_again():
    m = _manifest([0, 0, 1], [0, 1, 0], 2, 2)
    assert m.shard_sizes == (2, 1) and m.shard_starts.tolist() == [0, 2]
    m.samples = _manifest([0, 1, 1], [0, 1, 0], 2, 2).samples
    assert m.shard_sizes == (1, 2) and m.shard_starts.tolist() == [0, 1]


class _Syscalls:
    """Counts stats and directory listings (Path.exists, Path.stat and Path.is_dir all end in os.stat)."""

    def __init__(self, monkeypatch):
        self.stats = self.listings = 0
        real_stat, real_listdir, real_scandir = os.stat, os.listdir, os.scandir

        def stat(*a, **kw):
            self.stats += 1
            return real_stat(*a, **kw)

        def listdir(*a, **kw):
            self.listings += 1
            return real_listdir(*a, **kw)

        def scandir(*a, **kw):
            self.listings += 1
            return real_scandir(*a, **kw)

        monkeypatch.setattr(os, "stat", stat)
        monkeypatch.setattr(os, "listdir", listdir)
        monkeypatch.setattr(os, "scandir", scandir)


def _poll_counts(tmp_path, monkeypatch, backend: str, num_units: int, complete: int) -> tuple[int, int, bool]:
    """Stats and listings of one poll of a store of num_units units (2 a shard): the first ``complete``
    committed, the last 3 leased by another live worker, any others free."""
    spec = tiny_spec(views=4, views_per_unit=2, shard_sizes=(1,) * (num_units // 2), num_classes=8)
    path = tmp_path / f"{backend}-{num_units}"
    writer = create_store(path, spec, backend=backend)
    units = spec.units()
    assert len(units) == num_units
    for unit in units[:complete]:
        writer.write_unit(*unit, **unit_data(spec, *unit))
    other = Leases(path, "another-worker-1-abcd")
    for unit in units[-3:]:
        assert other.claim(unit)
    ours = Leases(path, "this-worker")
    order = units[::-1]
    with monkeypatch.context() as m:
        calls = _Syscalls(m)
        left = pending(order, writer)
        free = any_free(ours, left)
    assert left == [u for u in order if not writer.is_complete(*u)], "the poll's answer is unchanged"
    assert free == any(ours.free(u) for u in left)
    return calls.stats, calls.listings, free


@pytest.mark.parametrize("backend", ["zarr", "wds"])
def test_an_endgame_poll_costs_two_listings_not_a_stat_per_unit(tmp_path, monkeypatch, backend):
    """The endgame: every unit complete but 3 that another worker holds; this rank waits on them."""
    small = _poll_counts(tmp_path, monkeypatch, backend, 50, complete=47)
    large = _poll_counts(tmp_path, monkeypatch, backend, 200, complete=197)
    assert not small[2] and not large[2], "units under a live lease are not free"
    assert large[:2] == small[:2], f"(stats, listings) at 50 units {small[:2]}, at 200 units {large[:2]}"
    assert large[1] <= 2, "one listing of units/, one of leases/"
    assert large[0] <= 3 + 1, "a stat per lease of a pending unit (3) and of units/, none per unit"


def test_a_poll_with_free_units_left_reads_no_lease(tmp_path, monkeypatch):
    small = _poll_counts(tmp_path, monkeypatch, "wds", 50, complete=10)
    large = _poll_counts(tmp_path, monkeypatch, "wds", 200, complete=10)
    assert small[2] and large[2], "units without a lease are free"
    assert large[:2] == small[:2] and large[1] <= 2 and large[0] <= 1, (small, large)
