"""The zarr reader's label cache: keyed by view, bounded by bytes, and a block decoded once per the views
it can keep, not once per epoch (issue 22 item 5). Counted by wrapping the decoder, never timed."""

from __future__ import annotations

import pytest
from test_storage_support import tiny_spec, write_all

import storage.zarr_backend as zb
from storage import create_store, open_store


class CountingBlosc(zb.Blosc):
    decoded: list[int] = []  # bytes of each chunk decoded

    def decode(self, buf, out=None):
        CountingBlosc.decoded.append(out.nbytes)
        return super().decode(buf, out=out)


@pytest.fixture
def store(root, monkeypatch):
    """6 views in blocks of 3, 3 shards (7, 4, 9 samples), top-5, on a disk or a bucket; the decoder counted."""
    spec = tiny_spec(views=6, views_per_unit=3)
    write_all(create_store(root / "s", spec, backend="zarr", manifest=b"m"))
    monkeypatch.setattr(zb, "Blosc", CountingBlosc)
    CountingBlosc.decoded = []
    return root / "s"


def labels_bytes(reader, view) -> list[bytes]:
    return [a.tobytes() for _, lab in reader.read_view(view)
            for a in (lab.values, lab.ids, lab.valid) if a is not None]


def reader_with(path, views_fit: float):
    r = open_store(path)
    r.cache_bytes = int(views_fit * r.view_nbytes())
    return r


def epochs_decoding(reader, epochs) -> list[int]:
    """Chunks decoded by read_view in each of the given epochs (view e mod V)."""
    out = []
    for e in epochs:
        before = len(CountingBlosc.decoded)
        labels_bytes(reader, e % reader.spec.views)
        out.append(len(CountingBlosc.decoded) - before)
        assert reader.cached_bytes() <= reader.cache_bytes
    return out


def test_a_block_is_decoded_once_while_the_budget_holds_it(store):
    r = reader_with(store, 3)
    unit = 3 * 3  # chunks of one block: 3 shards x (values, ids, valid)
    assert epochs_decoding(r, range(12)) == [unit, 0, 0, unit, 0, 0] * 2
    assert r.cached_bytes() == 3 * r.view_nbytes()  # the last block's 3 views: the budget, not more


@pytest.mark.parametrize("fit,per_epoch", [(2, [9, 0, 9, 9, 0, 9]), (1, [9] * 6), (0.5, [9] * 6)])
def test_a_smaller_budget_keeps_the_next_views_that_fit(store, fit, per_epoch):
    """Budget of 2 views, blocks of 3: the block is decoded at views 0 and 2 (keeping 0-1, then 2),
    not at every view; 1 view: each epoch decodes (and keeps) its own; half a view: nothing kept."""
    r = reader_with(store, fit)
    assert epochs_decoding(r, range(6)) == per_epoch
    # the second read of the last view decodes nothing while the budget holds a view
    assert epochs_decoding(r, [5]) == ([0] if fit >= 1 else [9])
    assert r.cached_bytes() == (min(2, int(fit)) if fit >= 1 else 0) * r.view_nbytes()


def test_the_cache_returns_the_bytes_a_fresh_reader_decodes(store):
    small, fresh = reader_with(store, 2), reader_with(store, 0)
    for view in (0, 1, 2, 1, 5, 3, 4, 0):
        assert labels_bytes(small, view) == labels_bytes(fresh, view)
    for view in (0, 4):  # one shard of a cached view (read), and of one not cached
        for shard in range(3):
            a, b = small.read(view, shard), fresh.read(view, shard)
            assert a.ids.tobytes() == b.ids.tobytes() and a.values.tobytes() == b.values.tobytes()


def test_each_cached_view_is_its_own_array(store):
    """Bytes counted are bytes held: a cached view never keeps its decoded block alive."""
    r = reader_with(store, 3)
    labels_bytes(r, 0)
    for arrays in r._views.values():
        for a in arrays:
            if a is not None:
                assert a.base is None and a.flags.c_contiguous
    assert sum(a.nbytes for v in r._views.values() for a in v if a is not None) == r.cached_bytes()


def test_the_default_budget_holds_a_block_where_the_machines_share_can(monkeypatch):
    """At 14M samples (top-10, 21,841 classes) a block of 10 views is 5.4 GiB: held by one rank of a 24 GiB
    machine or 8 of a 256 GiB node (each block then decoded once per pass of its views), not by 8 ranks of
    64 GiB (2 GiB each, the floor); a small store's budget is the floor, never less."""
    from storage import StoreSpec

    spec = StoreSpec(mode="topk", k=10, num_classes=21_841, class_names=(), views=30,
                     shard_sizes=(1024,) * 13_865, views_per_unit=10)
    block = 10 * zb.view_nbytes(spec)
    assert 5.3 * 2**30 < block < 5.5 * 2**30
    gib = 2**30
    assert zb.label_cache_bytes(spec, memory=24 * gib, local_ranks=1) == block
    assert zb.label_cache_bytes(spec, memory=256 * gib, local_ranks=8) == block
    assert zb.label_cache_bytes(spec, memory=64 * gib, local_ranks=8) == zb.MIN_CACHE_BYTES
    assert zb.label_cache_bytes(spec, memory=32 * gib, local_ranks=1) == block
    assert zb.label_cache_bytes(spec, memory=16 * gib, local_ranks=1) == 4 * gib  # a quarter of 16 GiB
    assert zb.label_cache_bytes(tiny_spec(views=6, views_per_unit=3), memory=256 * gib) == zb.MIN_CACHE_BYTES
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # torchrun's: ranks sharing this machine
    assert zb.label_cache_bytes(spec, memory=64 * gib) == zb.MIN_CACHE_BYTES
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert zb.label_cache_bytes(spec, memory=64 * gib) == block


def test_a_reader_opened_without_a_budget_takes_the_default(store):
    r = open_store(store)
    assert r.cache_bytes == zb.label_cache_bytes(r.spec) >= zb.MIN_CACHE_BYTES
    assert zb.machine_memory() > 0
