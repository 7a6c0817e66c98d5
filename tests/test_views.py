"""The lockstep contract: a view is a pure function of (seed, recipe, view, shard, slot, image)."""

import hashlib
import math
import random
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import make_image
from PIL import Image

from pipeline.recipes import RecipeError, create_recipe
from pipeline.views import MixParams, Op, ViewRenderer, mixed_targets, ra_window, slot_order

ROOT = __file__.rsplit("/tests/", 1)[0]


def photo(i: int, size=(120, 90)) -> Image.Image:
    return make_image(i % 3, i, size)


def render_shard_view(renderer, seed, view, shard, images):
    """Every slot's final tensor of one view of one shard, rendered pair by pair."""
    plan = renderer.plan(seed, view, shard, len(images))
    out = []
    for sv in plan[::2]:
        img_b = images[sv.partner_position] if sv.partner_position is not None else None
        out.extend(renderer.render_pair(seed, sv, images[sv.position], img_b))
    return torch.stack(out)


def digest(x: torch.Tensor) -> str:
    return hashlib.sha256(x.contiguous().numpy().tobytes()).hexdigest()


@pytest.fixture(scope="module")
def deit():
    return ViewRenderer(create_recipe("deit", {"input_size": 64}))


def test_same_view_same_bytes_different_views_differ(deit):
    images = [photo(i) for i in range(7)]
    a = render_shard_view(deit, 0, 3, 1, images)
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)  # global generators must not matter
    b = render_shard_view(deit, 0, 3, 1, images)
    assert digest(a) == digest(b)
    assert digest(a) != digest(render_shard_view(deit, 0, 4, 1, images))   # another view
    assert digest(a) != digest(render_shard_view(deit, 1, 3, 1, images))   # another seed
    assert digest(a) != digest(render_shard_view(deit, 0, 3, 2, images))   # another shard
    assert len({digest(x) for x in a}) == len(images), "every slot differs"


def test_single_slot_render_equals_pair_render(deit):
    images = [photo(i) for i in range(5)]
    whole = render_shard_view(deit, 2, 0, 0, images)
    for sv in deit.plan(2, 0, 0, len(images)):
        p = images[sv.partner_position] if sv.partner_position is not None else None
        assert torch.equal(deit.render_slot(2, sv, images[sv.position], p), whole[sv.slot])


_CHILD = """
import sys, hashlib, torch
sys.path.insert(0, {root!r}); sys.path.insert(0, {root!r} + '/tests')
from test_views import photo, render_shard_view
from pipeline.recipes import create_recipe
from pipeline.views import ViewRenderer
x = render_shard_view(ViewRenderer(create_recipe('deit', {{'input_size': 64}})), 0, 3, 1, [photo(i) for i in range(7)])
print(hashlib.sha256(x.contiguous().numpy().tobytes()).hexdigest())
"""


def test_fresh_process_renders_the_same_bytes(deit):
    here = digest(render_shard_view(deit, 0, 3, 1, [photo(i) for i in range(7)]))
    out = subprocess.run([sys.executable, "-c", _CHILD.format(root=ROOT)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == here


class PairDataset(torch.utils.data.Dataset):
    """Item m = both slots of pair m of one view: what a DataLoader worker would render."""

    def __init__(self, renderer, images, seed=0, view=5, shard=0):
        self.r, self.images, self.seed = renderer, images, seed
        self.plan = renderer.plan(seed, view, shard, len(images))[::2]

    def __len__(self):
        return len(self.plan)

    def __getitem__(self, m):
        sv = self.plan[m]
        # a worker that drew from a global RNG here would break byte-equality across worker counts
        random.random()
        np.random.random()
        torch.rand(1)
        b = self.images[sv.partner_position] if sv.partner_position is not None else None
        return torch.stack(self.r.render_pair(self.seed, sv, self.images[sv.position], b))


@pytest.mark.parametrize("workers,batch", [(0, 1), (1, 4), (3, 3)])
def test_dataloader_workers_and_batch_sizes_do_not_change_views(deit, workers, batch):
    images = [photo(i) for i in range(12)]
    reference = render_shard_view(deit, 0, 5, 0, images)
    loader = torch.utils.data.DataLoader(PairDataset(deit, images), batch_size=batch, num_workers=workers)
    got = torch.cat([b.flatten(0, 1) for b in loader])
    assert digest(got) == digest(reference)


def test_slot_order_is_a_permutation():
    order = slot_order(0, 1, 2, 1000)
    assert sorted(order.tolist()) == list(range(1000))
    assert not np.array_equal(order, slot_order(0, 2, 2, 1000))


def test_augmentation_statistics_match_the_recipe(deit):
    n, size = 4000, (500, 375)
    params = [deit.slot_params(0, v, 0, s, size) for v in range(4) for s in range(n // 4)]
    # RandomResizedCrop: area fraction in [0.08, 1], aspect in [3/4, 4/3] (up to pixel rounding)
    area = np.array([p.crop.width * p.crop.height / (size[0] * size[1]) for p in params])
    aspect = np.array([p.crop.width / p.crop.height for p in params])
    assert area.min() >= 0.075 and area.max() <= 1.0
    assert aspect.min() >= 0.74 and aspect.max() <= 1.35
    # the same distribution as timm's own sampler (its draws come from the global `random`)
    from timm.data.transforms import RandomResizedCropAndInterpolation as RRC
    random.seed(0)
    ref = [RRC.get_params(Image.new("RGB", size), (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(n)]
    ref_area = np.array([h * w / (size[0] * size[1]) for _, _, h, w in ref])
    assert abs(area.mean() - ref_area.mean()) < 0.02
    assert np.allclose(np.quantile(area, [0.1, 0.5, 0.9]), np.quantile(ref_area, [0.1, 0.5, 0.9]), atol=0.04)
    assert abs(np.mean([p.flip for p in params]) - 0.5) < 0.03
    # RandAugment rand-m9-mstd0.5-inc1: 2 layers of 15 ops, each fires with p 0.5, magnitude N(9, 0.5) clipped to 10
    ops = [op for p in params for op in p.ops]
    assert abs(len(ops) / n - 1.0) < 0.05
    names = {op.name for op in ops}
    assert len(names) == 15 and "PosterizeIncreasing" in names
    counts = np.array([sum(op.name == name for op in ops) for name in names])
    assert counts.min() > 0.7 * len(ops) / 15 and counts.max() < 1.3 * len(ops) / 15
    mags = np.array([op.magnitude for op in ops])
    assert abs(mags.mean() - 8.99) < 0.05 and mags.max() <= 10.0 and abs(mags.std() - 0.49) < 0.05
    assert abs(np.mean([op.sign for op in ops])) < 0.06
    # random erasing p 0.25, one box of 2%..33% of the image
    erased = [p.erase for p in params if p.erase]
    assert abs(len(erased) / n - 0.25) < 0.025
    frac = np.array([e[0].width * e[0].height / 64 ** 2 for e in erased])
    assert frac.min() > 0.015 and frac.max() < 0.35
    # mixing: mixup vs cutmix half-half, lambda mean 1/2
    mixes = [deit.mix_params(0, v, 0, m) for v in range(4) for m in range(500)]
    cut = np.mean([mx.mode == "cutmix" for mx in mixes])
    assert abs(cut - 0.5) < 0.04 and all(mx.mode in ("mixup", "cutmix") for mx in mixes)
    lam = np.array([mx.lam for mx in mixes])
    assert lam.min() >= 0 and lam.max() <= 1
    # timm's own Mixup (global numpy RNG) for reference: cutmix's corrected lambda sits above 1/2
    from timm.data.mixup import Mixup, cutmix_bbox_and_lam
    np.random.seed(0)
    timm_mix = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=10)
    ref = []
    for _ in range(len(mixes)):
        ref_lam, use_cutmix = timm_mix._params_per_batch()
        if use_cutmix:
            _, ref_lam = cutmix_bbox_and_lam((1, 3, 64, 64), ref_lam, correct_lam=True)
        ref.append(ref_lam)
    assert abs(lam.mean() - np.mean(ref)) < 0.025
    for mx in mixes:
        if mx.mode == "cutmix":
            y0, y1, x0, x1 = mx.box
            assert math.isclose(mx.lam, 1 - (y1 - y0) * (x1 - x0) / 64 ** 2)


def test_crop_flip_recipe_draws_nothing_else():
    r = ViewRenderer(create_recipe("crop-flip", {"input_size": 32}))
    p = r.slot_params(0, 0, 0, 0, (50, 40))
    assert p.ops == () and p.erase == ()
    assert r.mix_params(0, 0, 0, 0) == MixParams()


def test_targets_are_distributions_mixed_with_lambda(deit):
    for sv in deit.plan(0, 0, 0, 9):
        pl = None if sv.partner_position is None else 2
        lam = np.nan if pl is None or sv.mix.mode == "none" else sv.mix.lam
        partner = np.array([-1 if pl is None else pl])
        t = torch.from_numpy(mixed_targets(np.array([1]), partner, np.array([lam]), 10, 0.1)[0])
        assert torch.isclose(t.sum(), torch.tensor(1.0))
        if pl is not None and sv.mix.mode != "none":
            assert torch.isclose(t[1], torch.tensor(sv.mix.lam * 0.9 + 0.01))
            assert torch.isclose(t[2], torch.tensor((1 - sv.mix.lam) * 0.9 + 0.01))


def test_partners_see_each_other(deit):
    a, b = photo(0), photo(1)
    plan = deit.plan(0, 0, 0, 2)
    x0, x1 = deit.render_pair(0, plan[0], a, b)
    mix = plan[0].mix
    pa, pb = (deit.slot_params(0, 0, 0, s, a.size) for s in (0, 1))
    own_a, own_b = deit.apply(a, pa), deit.apply(b, pb)
    if mix.mode == "mixup":
        assert torch.allclose(x0, mix.lam * own_a + (1 - mix.lam) * own_b, atol=1e-6)
        assert torch.allclose(x1, mix.lam * own_b + (1 - mix.lam) * own_a, atol=1e-6)
    else:
        y0, y1, x0_, x1_ = mix.box
        assert torch.equal(x0[:, y0:y1, x0_:x1_], own_b[:, y0:y1, x0_:x1_])
        assert torch.equal(x1[:, y0:y1, x0_:x1_], own_a[:, y0:y1, x0_:x1_])


@pytest.mark.parametrize("name", ["Rotate", "ShearX", "TranslateYRel", "ColorIncreasing", "SolarizeAdd",
                                  "Equalize", "SharpnessIncreasing"])
def test_ops_are_timms_own(deit, name):
    """Our op with the sign timm's coin would draw equals timm's AugmentOp output."""
    img = photo(4, (64, 64))
    aug = deit._ops_by_name[name]
    from timm.data.auto_augment import AugmentOp
    timm_op = AugmentOp(name, prob=1.0, magnitude=7, hparams={**aug.hparams, "magnitude_std": 0})
    for state in range(6):
        random.seed(state)
        coin = random.random()
        random.seed(state)
        want = np.asarray(timm_op(img))
        sign = -1 if coin > 0.5 else 1
        got = np.asarray(deit._apply_op(img, Op(name, 7.0, sign)))
        assert np.array_equal(got, want), (name, sign)


def test_posterize_zero_bits_is_black_not_a_crash(deit):
    img = photo(0, (32, 32))
    out = deit._apply_op(img, Op("PosterizeIncreasing", 10.0))
    assert np.asarray(out).max() == 0 and out.size == img.size


def test_recipe_overrides_are_checked():
    r = create_recipe("deit", ["re_prob=0", "scale=0.2,1", "auto_augment=none", "input_size=96"])
    assert r.re_prob == 0.0 and r.scale == (0.2, 1.0) and r.auto_augment is None and r.input_size == 96
    with pytest.raises(RecipeError, match="unknown recipe key 'colour_jitter'"):
        create_recipe("deit", ["colour_jitter=0.4"])
    with pytest.raises(RecipeError, match="unknown recipe 'fancy'"):
        create_recipe("fancy")
    with pytest.raises(RecipeError, match="expected float"):
        create_recipe("deit", ["re_prob=lots"])
    assert create_recipe("deit").to_dict() == type(r).from_dict(create_recipe("deit").to_dict()).to_dict()


# ---- repeated augmentation ----------------------------------------------------------------
def _official_epoch(n: int, epoch: int, repeats: int = 3, world: int = 4) -> np.ndarray:
    """Indices one epoch of timm's RepeatAugSampler (DeiT's RASampler) draws, over all ranks."""
    from timm.data.distributed_sampler import RepeatAugSampler
    out = []
    for rank in range(world):
        s = RepeatAugSampler(list(range(n)), num_replicas=world, rank=rank, num_repeats=repeats)
        s.set_epoch(epoch)
        out.extend(list(s))
    return np.asarray(out)


def test_repeats_match_the_official_sampler_statistics():
    n, epochs = 1024, 6
    ours = [slot_order(0, v, 0, n, 3) for v in range(epochs)]
    theirs = [_official_epoch(n, e) for e in range(epochs)]
    for o, t in zip(ours, theirs, strict=True):
        # the same number of draws per epoch, about 1/3 of the samples, each seen (about) 3 times
        assert len(o) == n and abs(len(t) - n) <= 8
        assert abs(np.unique(o).size - np.unique(t).size) <= 8
        # only the last, partial window (n mod 12 slots, at most w = 4 samples) departs from 3 copies
        assert abs(np.unique(o).size - n / 3) <= 4
        assert np.bincount(np.bincount(o))[3] >= np.unique(o).size - 4
    # which samples an epoch picks changes from epoch to epoch (a fresh draw, not a fixed third)
    overlap = len(set(ours[0]) & set(ours[1])) / np.unique(ours[0]).size
    assert 0.2 < overlap < 0.5


def test_repeats_are_distinct_views_never_mixed_with_themselves():
    r = ViewRenderer(create_recipe("deit", {"input_size": 48, "repeats": 3}))
    images = [photo(i) for i in range(9)]
    for view in range(20):
        plan = r.plan(0, view, 0, 9)
        for sv in plan:
            assert sv.partner_position != sv.position
    plan = r.plan(0, 0, 0, 9)
    x = render_shard_view(r, 0, 0, 0, images)
    by_sample = {}
    for sv in plan:
        by_sample.setdefault(sv.position, []).append(digest(x[sv.slot]))
    assert any(len(h) == 3 for h in by_sample.values())
    for hashes in by_sample.values():
        assert len(set(hashes)) == len(hashes), "each repeat is its own augmentation"


@pytest.mark.parametrize("repeats", [2, 3, 4, 5])
def test_repeats_sit_in_one_window_each_with_another_partner(repeats):
    """The R copies of a sample are at most one window (R * w slots) apart, in one window, and
    every copy has another mixing partner (a round-robin schedule), never itself."""
    w, template = ra_window(repeats)
    assert w == (repeats + 1 if repeats % 2 else repeats + 2) and len(template) == repeats * w
    for n in (1, 2, 3, 7, 12, 13, 100, 1024):
        order = slot_order(3, 1, 2, n, repeats)
        assert len(order) == n and order.max() < n
        for pos in np.unique(order):
            slots = np.flatnonzero(order == pos)
            assert len(slots) <= repeats
            assert slots[0] // len(template) == slots[-1] // len(template), "copies in one window"
            partners = [order[s ^ 1] for s in slots if (s ^ 1) < n]
            assert pos not in partners and len(set(partners)) == len(partners)
        full = n // len(template) * len(template)
        assert (np.bincount(order[:full]) % repeats == 0).all()  # every sample of a full window: R copies


def test_repeats_one_is_the_plain_permutation():
    assert np.array_equal(slot_order(5, 2, 1, 100, 1), slot_order(5, 2, 1, 100))
    assert sorted(slot_order(5, 2, 1, 100, 1).tolist()) == list(range(100))
    assert create_recipe("crop-flip").repeats == 1 and create_recipe("deit").repeats == 3
    with pytest.raises(RecipeError, match=re.escape("repeats must lie in [1, 64]")):
        create_recipe("deit", ["repeats=0"])


def test_batched_targets_are_timms_mixup_targets_whatever_the_batch_mates():
    """The loader builds a batch's targets at once (mixed_targets): each row is timm's mixup_target for
    that slot (to float32 rounding: timm adds the smoothing terms in another order), and the same bytes
    whichever views share its batch (a view's target must not depend on the worker count or batch size)."""
    from timm.data.mixup import mixup_target

    g = np.random.Generator(np.random.Philox(key=9))
    for num_classes, smoothing in ((10, 0.1), (1000, 0.1), (3, 0.0)):
        n = 64
        labels, partners = g.integers(0, num_classes, n), g.integers(-1, num_classes, n)
        lams = np.where(g.random(n) < 0.2, np.nan, g.beta(0.8, 0.8, n))
        batch = mixed_targets(labels, partners, lams, num_classes, smoothing)
        for i in range(n):
            alone = mixed_targets(labels[i:i + 1], partners[i:i + 1], lams[i:i + 1], num_classes, smoothing)[0]
            assert alone.tobytes() == batch[i].tobytes(), i
            unmixed = np.isnan(lams[i]) or partners[i] < 0
            pair = torch.tensor([labels[i], labels[i] if unmixed else partners[i]])  # timm mixes with the flip
            want = mixup_target(pair, num_classes, 1.0 if unmixed else float(lams[i]), smoothing)[0]
            torch.testing.assert_close(torch.from_numpy(batch[i]), want, rtol=0, atol=1.2e-7)


@pytest.mark.parametrize("override, fragment", [
    ("scale=2,1", "recipe scale"), ("scale=0,1", "recipe scale"), ("scale=0.5,0.2", "recipe scale"),
    ("ratio=0,0", "recipe ratio"), ("ratio=2,1", "recipe ratio"), ("ratio=nan,1", "finite"),
    ("interpolation=foo", "interpolation 'foo'"), ("interpolation=random", "interpolation 'random'"),
    ("auto_augment=garbage", "auto_augment 'garbage'"), ("auto_augment=rand-x9", "auto_augment"),
    ("auto_augment=rand-n99", "choose 0 to"),
    ("hflip=1.5", "hflip"), ("hflip=-0.1", "hflip"), ("re_prob=2", "re_prob"), ("re_count=0", "re_count"),
    ("re_min_area=0", "re_min_area"), ("re_max_area=0.01", "re_max_area"), ("re_max_area=1.5", "re_max_area"),
    ("re_min_aspect=0", "re_min_aspect"), ("re_min_aspect=3", "re_min_aspect"),
    ("mixup_alpha=-1", "mixup_alpha"), ("cutmix_alpha=inf", "cutmix_alpha"), ("mix_prob=1.1", "mix_prob"),
    ("switch_prob=-1", "switch_prob"), ("label_smoothing=1", "label_smoothing"),
    ("label_smoothing=-0.1", "label_smoothing"), ("mean=0.5,0.5", "mean"), ("mean=2,0,0", "recipe mean"),
    ("std=0,1,1", "recipe std"), ("std=nan,1,1", "finite"), ("input_size=0", "input_size"),
    ("input_size=7", "input_size"), ("repeats=0", "repeats"), ("repeats=65", "repeats"),
    ("eval_crop_pct=0", "eval_crop_pct"), ("eval_crop_pct=1.2", "eval_crop_pct"),
])
def test_every_recipe_value_is_checked_against_its_range(override, fragment):
    with pytest.raises(RecipeError, match=re.escape(fragment)) as e:
        create_recipe("deit", [override])
    assert "\n" not in str(e.value)


def test_recipe_boundaries_are_accepted_and_a_stored_bad_recipe_is_refused():
    r = create_recipe("deit", ["scale=1,1", "ratio=1,1", "hflip=1", "re_prob=0", "label_smoothing=0",
                               "mixup_alpha=0", "cutmix_alpha=0", "eval_crop_pct=1", "input_size=8",
                               "auto_augment=rand-n0", "interpolation=nearest", "re_max_area=1"])
    assert r.scale == (1.0, 1.0) and r.auto_augment == "rand-n0" and not r.mixes
    assert create_recipe("deit", ["auto_augment="]).auto_augment is None
    d = create_recipe("deit").to_dict()
    with pytest.raises(RecipeError, match="recipe scale"):
        type(r).from_dict({**d, "scale": [2, 1]})          # e.g. a store.json edited by hand
    with pytest.raises(RecipeError, match="integer"):
        type(r).from_dict({**d, "re_count": 1.5})
