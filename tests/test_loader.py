"""The lockstep loader: the views the teacher labelled, the same bytes for any worker count, the same
global batch for any world size, epochs replaying view e mod V, invalid views skipped and counted."""

import pytest
import torch
from conftest import encode, make_image, write_wds

from pipeline.sources import write_wds_shards
from pipeline.stage1.precompute import PrecomputeConfig, run_precompute
from pipeline.stage1.teacher import create_teacher
from pipeline.views import ViewRenderer
from student.data import LockstepLoader, open_train_data
from student.errors import TrainError

TEACHER = "resnet10t"


def make_teacher_weights(path):
    import timm

    torch.manual_seed(0)
    torch.save(timm.create_model(TEACHER, num_classes=3).state_dict(), path)
    return str(path)


def make_store(data, out, weights, *, views=2, hard=False, topk=3, rank=None, world_size=None, **kw):
    """A label store from the real precompute path (tiny: 32 px views)."""
    cfg = PrecomputeConfig(data=str(data), out=str(out), teacher=TEACHER, teacher_weights=weights, views=views,
                           views_per_unit=1, topk=topk, hard=hard, input_size=32, batch_size=16, workers=0,
                           model_kwargs={"num_classes": 3}, progress=False, rank=rank, world_size=world_size, **kw)
    run_precompute(cfg)
    return str(out)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """24 samples in 3 wds shards of 8, a random resnet10t teacher and a 2-view top-3 store."""
    root = tmp_path_factory.mktemp("tiny")
    data = write_wds(root / "wds", n=24, per_shard=8)
    weights = make_teacher_weights(root / "teacher.pth")
    store = make_store(data, root / "store", weights)
    return {"root": root, "data": data, "weights": weights, "store": store}


def epoch_batches(data, epoch, **kw):
    return list(LockstepLoader(data, **kw).epoch(epoch))


def cat(batches, field):
    return torch.cat([getattr(b, field) for b in batches])


def test_views_are_the_views_the_teacher_labelled(tiny):
    """Re-running the teacher on the loader's images gives back the stored top-k: same views, same join."""
    data = open_train_data(tiny["data"], labels=tiny["store"])
    teacher = create_teacher(TEACHER, weights=tiny["weights"], num_classes=3, model_kwargs={"num_classes": 3},
                             device=torch.device("cpu"))
    for epoch in (0, 1):
        batches = epoch_batches(data, epoch, batch_size=6)
        x = cat(batches, "images")
        assert x.shape == (24, 3, 32, 32)
        logp = torch.log_softmax(teacher(x, data.recipe.mean, data.recipe.std).float(), dim=1)
        values, ids = logp.topk(3, dim=1)
        assert torch.equal(ids, cat(batches, "teacher_ids"))
        assert torch.equal(values.half(), cat(batches, "teacher_values"))


def test_targets_are_mixed_smoothed_ground_truth(tiny):
    data = open_train_data(tiny["data"], labels=tiny["store"])
    b = epoch_batches(data, 0, batch_size=24)[0]
    t = b.targets
    assert torch.allclose(t.sum(1), torch.ones(24))
    assert t.min() >= 0.1 / 3 - 1e-6  # label smoothing's floor, 0.1 / C
    assert (t.max(1).values <= 1 - 0.1 + 0.1 / 3 + 1e-6).all()
    # DeiT's recipe mixes every pair (mix_prob 1): the two partners' targets hold the same two
    # classes with weights lam and 1 - lam, so their sum is the sum of the two smoothed one-hots.
    labels = torch.tensor(data.manifest.samples.column("label").to_pylist())
    starts = torch.tensor([0, 8, 16])
    order = {(shard, slot): i for i, (shard, slot) in enumerate(b.rows.tolist())}

    def smooth(shard, position):
        return torch.nn.functional.one_hot(labels[starts[shard] + int(position)], 3) * 0.9 + 0.1 / 3

    renderer = ViewRenderer(data.recipe)
    for (shard, slot), i in order.items():
        sv = renderer.plan(data.seed, 0, shard, 8)[slot]
        if slot % 2 == 0:
            pair_sum = t[i] + t[order[shard, slot + 1]]
            assert torch.allclose(pair_sum, smooth(shard, sv.position) + smooth(shard, sv.partner_position), atol=1e-6)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("rank,world", [(0, 1), (1, 2)])
def test_same_bytes_for_0_1_3_workers(tiny, rank, world):
    data = open_train_data(tiny["data"], labels=tiny["store"])
    runs = [epoch_batches(data, 1, batch_size=4, rank=rank, world=world, workers=w) for w in (0, 1, 3)]
    assert len(runs[0]) == 24 // (4 * world)
    for other in runs[1:]:
        assert len(other) == len(runs[0])
        for a, b in zip(runs[0], other, strict=True):
            assert a.step == b.step
            for field in ("images", "targets", "rows", "teacher_ids", "teacher_values"):
                x, y = getattr(a, field), getattr(b, field)
                assert x.dtype == y.dtype and x.numpy().tobytes() == y.numpy().tobytes(), field


def test_global_batch_is_the_same_for_any_world_size(tiny):
    """Two ranks with batch 4 see, step by step, exactly one rank's batch of 8: same views, same order."""
    data = open_train_data(tiny["data"], labels=tiny["store"])
    one = epoch_batches(data, 0, batch_size=8)
    two = [epoch_batches(data, 0, batch_size=4, rank=r, world=2) for r in (0, 1)]
    assert len(one) == len(two[0]) == len(two[1]) == 3
    for t, whole in enumerate(one):
        for field in ("images", "targets", "rows", "teacher_ids", "teacher_values"):
            halves = torch.cat([getattr(two[0][t], field), getattr(two[1][t], field)])
            assert halves.numpy().tobytes() == getattr(whole, field).numpy().tobytes(), field


def test_every_rank_gets_the_same_number_of_batches_and_no_view_twice(tiny):
    data = open_train_data(tiny["data"], labels=tiny["store"])
    ranks = [epoch_batches(data, 0, batch_size=2, rank=r, world=5) for r in range(5)]
    assert {len(r) for r in ranks} == {24 // 10}  # the tail that cannot fill a global batch is dropped
    rows = torch.cat([cat(r, "rows") for r in ranks])
    assert len({tuple(x) for x in rows.tolist()}) == len(rows) == 20


def test_epoch_e_replays_view_e_mod_v_in_a_new_shard_order(tiny):
    data = open_train_data(tiny["data"], labels=tiny["store"])
    assert data.views == 2
    e0, e1, e2 = (epoch_batches(data, e, batch_size=24)[0] for e in (0, 1, 2))
    by_row = lambda b: {tuple(r): i for i, r in enumerate(b.rows.tolist())}  # noqa: E731
    r0, r1, r2 = by_row(e0), by_row(e1), by_row(e2)
    assert set(r0) == set(r2) == set(r1)
    # Epoch 2 is view 0 again: each (shard, slot) is the same tensor and label as in epoch 0 ...
    for row, i in r0.items():
        assert torch.equal(e0.images[i], e2.images[r2[row]])
        assert torch.equal(e0.teacher_ids[i], e2.teacher_ids[r2[row]])
    # ... visited in another shard order; epoch 1 is another view.
    assert e0.rows[:, 0].tolist() != e2.rows[:, 0].tolist()
    assert not torch.equal(e0.images[r0[(0, 0)]], e1.images[r1[(0, 0)]])


def test_plain_training_renders_from_recipe_and_seed(tiny):
    """Without a store the same loader draws views from --recipe/--seed, a new view every epoch."""
    plain = open_train_data(tiny["data"], recipe="deit", input_size=32, seed=0)
    labelled = open_train_data(tiny["data"], labels=tiny["store"])
    a = epoch_batches(plain, 1, batch_size=24)[0]
    b = epoch_batches(labelled, 1, batch_size=24)[0]
    assert a.teacher_ids is None and a.images.numpy().tobytes() == b.images.numpy().tobytes()
    assert plain.view_of(7) == 7 and labelled.view_of(7) == 1
    other_seed = epoch_batches(open_train_data(tiny["data"], recipe="deit", input_size=32, seed=1), 1, batch_size=24)[0]
    assert not torch.equal(other_seed.images, a.images)


@pytest.fixture(scope="module")
def broken(tmp_path_factory, tiny):
    """16 samples in 2 shards, sample 5 not an image; a 1-view store that flagged it."""
    root = tmp_path_factory.mktemp("broken")
    samples = [(f"b{i:03d}", b"not an image" if i == 5 else encode(make_image(i % 3, i)), "png", i % 3)
               for i in range(16)]
    write_wds_shards(samples, str(root / "wds"), per_shard=8, class_names=["circle", "square", "stripes"])
    store = make_store(root / "wds", root / "store", tiny["weights"], views=1, hard=True)
    return {"data": str(root / "wds"), "store": store}


def test_invalid_views_are_skipped_and_counted(broken):
    data = open_train_data(broken["data"], labels=broken["store"])
    it = LockstepLoader(data, batch_size=3).epoch(0)
    batches = list(it)
    # Every view showing the broken image (each repeat, and each mixing partner) was flagged by precompute.
    flagged = sum(int((data.reader.read(0, j).valid != 1).sum()) for j in range(2))
    assert it.invalid == flagged >= 2
    assert len(batches) == (16 - flagged) // 3 and all(len(b) == 3 for b in batches)
    assert batches[0].teacher_ids.shape == (3,)
    # Without a store the broken image is found at decode time: dropped from its batch, counted.
    plain = open_train_data(broken["data"], recipe="deit", input_size=32)
    it = LockstepLoader(plain, batch_size=4, workers=2).epoch(0)
    sizes = [len(b) for b in it]
    assert it.skipped == flagged and sum(sizes) == 16 - flagged and min(sizes) < 4


@pytest.fixture(scope="module")
def recut(tmp_path_factory, tiny):
    """24 samples in 3 tars written in class order: auto re-cuts them into virtual shards of 8."""
    from test_sources import write_sorted_wds

    root = tmp_path_factory.mktemp("recut")
    data = write_sorted_wds(root / "wds")
    store = make_store(data, root / "store", tiny["weights"], shard_size=8)
    return {"data": data, "store": store}


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_a_recut_source_replays_the_labelled_views_across_tars(recut, tiny):
    data = open_train_data(recut["data"], labels=recut["store"])
    assert data.manifest.layout == "shuffle" and len(data.manifest.files) == 3
    teacher = create_teacher(TEACHER, weights=tiny["weights"], num_classes=3, model_kwargs={"num_classes": 3},
                             device=torch.device("cpu"))
    runs = [epoch_batches(data, 1, batch_size=6, workers=w) for w in (0, 2)]
    x = cat(runs[0], "images")
    values, ids = torch.log_softmax(teacher(x, data.recipe.mean, data.recipe.std).float(), dim=1).topk(3, dim=1)
    assert torch.equal(ids, cat(runs[0], "teacher_ids")) and torch.equal(values.half(), cat(runs[0], "teacher_values"))
    assert cat(runs[0], "images").numpy().tobytes() == cat(runs[1], "images").numpy().tobytes()
    # a batch spans shards (the interleave), and its labels are not all one class
    assert any(len(set(b.rows[:, 0].tolist())) > 1 for b in runs[0])
    assert all(len(set(b.targets.argmax(1).tolist())) > 1 for b in runs[0])
    # the same tars indexed as-is cannot match the store: refused, naming the store's layout
    with pytest.raises(TrainError, match="was made with --shards shuffle, not --shards as-is"):
        open_train_data(recut["data"], labels=recut["store"], shards="as-is")


def fields_bytes(batches):
    return [(b.step, *(getattr(b, f).numpy().tobytes() for f in ("images", "targets", "rows", "teacher_ids",
                                                                  "teacher_values"))) for b in batches]


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("workers", [1, 3])
def test_persistent_workers_give_the_same_bytes_over_two_epochs(tiny, workers):
    """One loader, epochs 0 and 1 (two views), workers forked once and kept: the bytes of workers=0."""
    data = open_train_data(tiny["data"], labels=tiny["store"])
    want = [fields_bytes(epoch_batches(data, e, batch_size=4)) for e in (0, 1)]
    loader = LockstepLoader(data, batch_size=4, workers=workers)
    got, pids = [], []
    for e in (0, 1):
        got.append(fields_bytes(list(loader.epoch(e))))
        pids.append([w.pid for w in loader._dl._iterator._workers])  # torch's own worker processes
    assert got == want and want[0] != want[1]
    assert pids[0] == pids[1] and len(set(pids[0])) == workers  # not re-forked for epoch 1


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_an_abandoned_epoch_leaves_the_next_one_intact_and_cannot_be_read_on(tiny):
    data = open_train_data(tiny["data"], labels=tiny["store"])
    want = fields_bytes(epoch_batches(data, 1, batch_size=4))
    for workers in (0, 2):
        loader = LockstepLoader(data, batch_size=4, workers=workers)
        first = iter(loader.epoch(0))
        next(first)  # epoch 0 left after one batch, its workers still prefetching
        assert fields_bytes(list(loader.epoch(1))) == want
        with pytest.raises(TrainError, match="read on after a later epoch's started"):
            next(first)


def reachable_objects(root) -> int:
    """Python objects reachable from root (what a forked worker may touch, and so copy, when it reads);
    ints left out: the batch size itself is one, shared or not with another attribute's value."""
    import gc

    seen, todo = set(), [root]
    while todo:
        o = todo.pop()
        if id(o) not in seen and not isinstance(o, (type, int)):
            seen.add(id(o))
            todo.extend(gc.get_referents(o))
    return len(seen)


def test_workers_get_one_array_of_rows_not_an_object_per_step(tiny):
    """The dataset handed to workers holds the epoch as one int64 array: 24 steps cost the objects of 6."""
    import numpy as np

    data = open_train_data(tiny["data"], labels=tiny["store"])
    counts = []
    for batch_size in (1, 4):
        loader = LockstepLoader(data, batch_size=batch_size)
        batches = list(loader.epoch(0))
        assert len(batches) == 24 // batch_size
        epoch = loader._dl.dataset.epochs.current()
        assert isinstance(epoch.rows, np.ndarray) and epoch.rows.shape == (24, 2)
        counts.append(reachable_objects(loader._dl.dataset))
    assert counts[0] == counts[1]
