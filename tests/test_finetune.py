"""Fine-tuning with distillation (`train --finetune`) and `--repeats` on precompute and train.

A tiny DeiT trained at 32 px is fine-tuned at 48 px from a store the teacher labelled at 48 px:
its position embedding is the checkpoint's resampled exactly as DeiT's main.py does (bicubic, no
antialias; compared byte for byte with DeiT's formula written out), every other tensor is the
checkpoint's, and the run trains. A checkpoint with another class count starts with both heads
freshly initialised and the body loaded. Repeated augmentation (repeats=3) replays the same bytes
for any worker count and world size, and a store's repeats cannot be silently overridden.
"""

import collections
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import TINY_TEACHER_KWARGS, write_wds
from timm.layers import resample_abs_pos_embed

from pipeline.views import ViewRenderer
from storage import open_store
from student.data import LockstepLoader, open_train_data
from student.errors import TrainError
from student.finetune import (
    FINETUNE_DEFAULTS,
    adapt_state_dict,
    load_finetune,
    read_state_dict,
    resample_pos_embed,
)
from student.model import create_student
from student.train import TrainConfig, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "deit_tiny_distilled_patch16_224"
TINY32 = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2}
TINY48 = {**TINY32, "img_size": 48}


def cli(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "cli.py", *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def precompute(data, out, weights, *, size, repeats, views=2):
    """`cli.py precompute` with the flags under test (--input-size, --repeats), hard labels."""
    r = cli("precompute", "--data", data, "--out", out, "--teacher", "resnet10t", "--teacher-weights", weights,
            "--model-kwargs", json.dumps(TINY_TEACHER_KWARGS), "--views", views, "--views-per-unit", 1, "--hard",
            "--input-size", size, "--repeats", repeats, "--workers", 0, "--batch-size", 16)
    assert r.returncode == 0, r.stderr[-2000:]
    return str(out)


def pretrain(data, out, **kw):
    """A 32 px source checkpoint: plain training (no store), two steps."""
    cfg = dict(data=data, out=str(out), model=MODEL, model_kwargs=TINY32, recipe="crop-flip", input_size=32,
               distillation="none", epochs=1, max_steps_per_epoch=2, batch_size=8, lr=0.05, warmup_epochs=0,
               workers=0, ema=False, progress=False)
    train(TrainConfig(**{**cfg, **kw}))
    return os.path.join(out, "checkpoint.pth")


@pytest.fixture(scope="module")
def ft(tmp_path_factory, tiny_teacher):
    """24 samples of 3 classes, a 48 px repeats=3 hard store, 32 px checkpoints with 3 and 4 classes."""
    root = tmp_path_factory.mktemp("finetune")
    data = write_wds(root / "wds", n=24, per_shard=8)
    four = write_wds(root / "wds4", n=16, per_shard=8, classes=["a", "b", "c", "d"])
    return {"root": root, "data": data, "weights": tiny_teacher,
            "store48": precompute(data, root / "store48", tiny_teacher, size=48, repeats=3),
            "src": pretrain(data, root / "src"), "src4": pretrain(four, root / "src4")}


def config(ft, out, **kw) -> TrainConfig:
    """A fine-tune that moves no weight (lr 0 everywhere): the run's weights are what --finetune loaded."""
    base = dict(data=ft["data"], labels=ft["store48"], out=str(out), model=MODEL, model_kwargs=TINY48,
                finetune=ft["src"], distillation="hard", epochs=1, max_steps_per_epoch=1, batch_size=8,
                lr=0.0, min_lr=0.0, warmup_lr=0.0, warmup_epochs=0, drop_path=0.0, workers=0, ema=False,
                progress=False)
    return TrainConfig(**{**base, **kw})


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def refusal(cfg) -> str:
    with pytest.raises(TrainError) as e:
        train(cfg)
    assert "\n" not in str(e.value)
    return str(e.value)


# ---- fine-tuning -------------------------------------------------------------------------------
def deit_interpolate_pos_embed(pos_embed_checkpoint, new_size: int, num_extra_tokens: int):
    """DeiT's main.py ``--finetune`` block (facebookresearch/deit), written out: class and distillation
    tokens kept, the grid tokens resized by plain bicubic (no antialias), align_corners=False."""
    embedding_size = pos_embed_checkpoint.shape[-1]
    orig_size = int((pos_embed_checkpoint.shape[-2] - num_extra_tokens) ** 0.5)
    extra_tokens = pos_embed_checkpoint[:, :num_extra_tokens]
    pos_tokens = pos_embed_checkpoint[:, num_extra_tokens:]
    pos_tokens = pos_tokens.reshape(-1, orig_size, orig_size, embedding_size).permute(0, 3, 1, 2)
    pos_tokens = torch.nn.functional.interpolate(
        pos_tokens, size=(new_size, new_size), mode='bicubic', align_corners=False)
    pos_tokens = pos_tokens.permute(0, 2, 3, 1).flatten(1, 2)
    return torch.cat((extra_tokens, pos_tokens), dim=1)


@pytest.mark.parametrize("old_img,new_img", [(56, 32), (32, 56), (96, 64), (64, 96)])
def test_pos_embed_resample_is_deits_byte_for_byte_shrinking_and_growing(old_img, new_img):
    """Random position embeddings (a trained one is smoother, so differences would hide), patch 8:
    our resample equals DeiT's formula bytes for bytes; timm's default (antialias=True) does not."""
    g = torch.Generator().manual_seed(old_img * 1000 + new_img)
    old_grid, new_grid = old_img // 8, new_img // 8
    pos = torch.randn(1, 2 + old_grid * old_grid, 64, generator=g)
    model = create_student(MODEL, num_classes=3, model_kwargs={**TINY32, "img_size": new_img})
    ours, old = resample_pos_embed(pos, model)
    deit = deit_interpolate_pos_embed(pos, new_grid, num_extra_tokens=2)
    assert old == [old_grid, old_grid] and ours.shape == deit.shape == model.pos_embed.shape
    assert ours.numpy().tobytes() == deit.numpy().tobytes()
    timm_default = resample_abs_pos_embed(pos, [new_grid, new_grid], num_prefix_tokens=2)  # antialias=True
    assert not torch.equal(timm_default, deit)  # the old behaviour: a different kernel, shrinking or growing


def test_32_to_48_px_loads_timm_resampled_pos_embed_and_trains_from_the_48_px_store(ft, tmp_path):
    src = weights(ft["src"])
    summary = train(config(ft, tmp_path / "zero"))
    assert summary.step == 1 and summary.distillation == "hard"
    assert "4x4 -> 6x6" in summary.finetune and "re-initialised" not in summary.finetune
    got = weights(tmp_path / "zero" / "checkpoint.pth")
    # 32 px / patch 8 = 4x4 grid -> 48 px = 6x6, plus the class and distillation tokens
    assert src["pos_embed"].shape == (1, 2 + 16, 64) and got["pos_embed"].shape == (1, 2 + 36, 64)
    expected = deit_interpolate_pos_embed(src["pos_embed"], 6, num_extra_tokens=2)
    assert torch.equal(got["pos_embed"], expected)
    assert torch.equal(got["pos_embed"][:, :2], src["pos_embed"][:, :2])  # cls and dist tokens kept as they are
    for k in src:  # everything else, heads included (same classes), is the checkpoint's
        if k != "pos_embed":
            assert torch.equal(got[k], src[k]), k

    # Through the CLI with DeiT's fine-tuning defaults: an explicit flag (--epochs) wins, the rest
    # (lr, min lr, weight decay, no warmup) are the recipe's; the student learns from the 48 px labels.
    run = tmp_path / "cli"
    r = cli("train", "--data", ft["data"], "--labels", ft["store48"], "--out", run, "--model", MODEL,
            "--model-kwargs", json.dumps(TINY48), "--finetune", ft["src"], "--epochs", 3, "--stop-after-epochs", 1,
            "--max-steps-per-epoch", 2, "--batch-size", 8, "--workers", 0, "--no-ema", "--log-every", 1)
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = torch.load(run / "checkpoint.pth", map_location="cpu", weights_only=True)
    c = ckpt["config"]
    assert c["epochs"] == 3 and c["finetune"] == ft["src"]
    assert (c["lr"], c["weight_decay"], c["warmup_epochs"]) == (5e-6, 1e-8, 0) == tuple(
        FINETUNE_DEFAULTS[k] for k in ("lr", "weight_decay", "warmup_epochs"))
    assert c["min_lr"] == 5e-6 * 8 / 512  # the scaled lr: a flat schedule, as DeiT's lr == min-lr at batch 512
    assert ckpt["step"] == 2
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(5e-6 * 8 / 512, rel=1e-9)
    moved = (ckpt["model"]["pos_embed"] - expected).abs().max().item()
    assert 0 < moved < 1e-3  # two AdamW steps at lr 7.8e-8 move weights by about 1.6e-7 each
    summary = json.loads((run / "summary.json").read_text())
    assert summary["distillation"] == "hard" and summary["finetune"].endswith("4x4 -> 6x6 patches")


def test_new_class_count_resets_both_heads_and_loads_the_body(ft, tmp_path):
    src4 = weights(ft["src4"])  # 4 classes at 32 px, fine-tuned on 3 classes at 48 px
    summary = train(config(ft, tmp_path / "run", finetune=ft["src4"]))
    heads = ["head.bias", "head.weight", "head_dist.bias", "head_dist.weight"]
    assert f"re-initialised (new class count): {', '.join(heads)}" in summary.finetune
    got = weights(tmp_path / "run" / "checkpoint.pth")
    torch.manual_seed(0)  # the store's seed: train() builds the student under it, heads included
    fresh = create_student(MODEL, num_classes=3, model_kwargs=TINY48, drop_path_rate=0.0).state_dict()
    for k in heads:
        assert src4[k].shape[0] == 4 and got[k].shape[0] == 3
        assert torch.equal(got[k], fresh[k]), k  # timm's fresh initialisation, not the checkpoint's
    assert got["head.weight"].abs().sum() > 0 and not torch.equal(got["head.weight"], got["head_dist.weight"])
    for k in src4:
        if k not in heads and k != "pos_embed":
            assert torch.equal(got[k], src4[k]), k
            if k.startswith("blocks."):
                assert not torch.equal(got[k], fresh[k]), k  # the body really is the checkpoint's
    assert torch.equal(got["pos_embed"], deit_interpolate_pos_embed(src4["pos_embed"], 6, num_extra_tokens=2))


def test_timm_and_deit_checkpoint_files_load_alike(ft, tmp_path):
    """A bare state_dict, one under "state_dict", one with DDP's "module." prefix: the same start as ours."""
    state = weights(ft["src"])
    files = {"bare.pth": state, "nested.pth": {"state_dict": state, "epoch": 3},
             "ddp.pth": {"model": {f"module.{k}": v for k, v in state.items()}}}
    model = create_student(MODEL, num_classes=3, model_kwargs=TINY48)
    ours = dict(adapt_state_dict(read_state_dict(ft["src"]), model)[0])
    for name, obj in files.items():
        torch.save(obj, tmp_path / name)
        got, start = adapt_state_dict(read_state_dict(str(tmp_path / name)), model)
        assert got.keys() == ours.keys() and all(torch.equal(got[k], ours[k]) for k in ours), name
        assert start.pos_embed == ([4, 4], [6, 6]) and not start.reset_heads
    from safetensors.torch import save_file

    save_file(state, tmp_path / "w.safetensors")
    m1, m2 = (create_student(MODEL, num_classes=3, model_kwargs=TINY48) for _ in range(2))
    load_finetune(m1, ft["src"], 48)
    load_finetune(m2, str(tmp_path / "w.safetensors"), 48)
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values(), strict=True))


def test_refusals_are_one_line(ft, tmp_path):
    msg = refusal(config(ft, tmp_path / "r", model_kwargs={**TINY48, "depth": 3}))
    assert "blocks.2." in msg and "does not fit --model" in msg
    msg = refusal(config(ft, tmp_path / "r", model_kwargs={**TINY48, "embed_dim": 32}))
    assert "cls_token is [1, 1, 64] in the checkpoint, [1, 1, 32] in the model" in msg
    assert 'add "img_size": 48' in refusal(config(ft, tmp_path / "r", model_kwargs=TINY32))
    assert "no such file" in refusal(config(ft, tmp_path / "r", finetune=str(tmp_path / "missing.pth")))
    torch.save({"epoch": 1, "args": "x"}, tmp_path / "empty.pth")
    assert "no state_dict" in refusal(config(ft, tmp_path / "r", finetune=str(tmp_path / "empty.pth")))
    assert "pass one of them" in refusal(config(ft, tmp_path / "r", resume=True))
    r = cli("train", "--data", ft["data"], "--labels", ft["store48"], "--out", tmp_path / "c", "--model", MODEL,
            "--model-kwargs", json.dumps(TINY48), "--finetune", ft["src"], "--resume")
    assert r.returncode == 2 and r.stderr.startswith("error: --finetune") and r.stderr.strip().count("\n") == 0


# ---- repeated augmentation ----------------------------------------------------------------------
def batches(data, epoch, **kw):
    return list(LockstepLoader(data, **kw).epoch(epoch))


@pytest.mark.parametrize("rank,world", [(0, 1), (1, 2)])
def test_repeats_3_replays_the_same_bytes_for_0_1_3_workers(ft, rank, world):
    data = open_train_data(ft["data"], labels=ft["store48"], repeats=3)  # agreeing with the store is fine
    assert data.recipe.repeats == 3 and data.recipe.input_size == 48
    runs = [batches(data, 1, batch_size=4, rank=rank, world=world, workers=w) for w in (0, 1, 3)]
    assert len(runs[0]) == 24 // (4 * world)
    for other in runs[1:]:
        assert len(other) == len(runs[0])
        for a, b in zip(runs[0], other, strict=True):
            assert a.step == b.step
            for field in ("images", "targets", "rows", "teacher_ids"):
                x, y = getattr(a, field), getattr(b, field)
                assert x.dtype == y.dtype and x.numpy().tobytes() == y.numpy().tobytes(), field


def test_repeats_3_epoch_holds_each_chosen_sample_three_times_in_any_world_size(ft):
    data = open_train_data(ft["data"], labels=ft["store48"])
    one = batches(data, 0, batch_size=8, workers=0)
    two = [batches(data, 0, batch_size=4, rank=r, world=2, workers=0) for r in (0, 1)]
    for t, whole in enumerate(one):  # the same global batch for 1 and 2 processes
        for field in ("images", "targets", "rows", "teacher_ids"):
            halves = torch.cat([getattr(two[0][t], field), getattr(two[1][t], field)])
            assert halves.numpy().tobytes() == getattr(whole, field).numpy().tobytes(), field
    renderer = ViewRenderer(data.recipe)
    rows = torch.cat([b.rows for b in one]).tolist()
    images = torch.cat([b.images for b in one])
    by_sample = collections.defaultdict(list)
    for i, (shard, slot) in enumerate(rows):
        by_sample[shard, renderer.plan(data.seed, 0, shard, 8)[slot].position].append(i)
    # 8 slots per shard: the first 8 of a 12-slot window (4 samples x 3 copies), so 4 samples per shard,
    # each twice this epoch (a shard of 1024 holds 85 whole windows: 340 samples x 3, plus a cut one)
    assert len(by_sample) == 12 and sorted(collections.Counter(map(len, by_sample.values())).items()) == [(2, 12)]
    for appearances in by_sample.values():  # every appearance a different view
        views = {images[i].numpy().tobytes() for i in appearances}
        assert len(views) == len(appearances)


def test_repeats_flag_sets_the_recipe_and_must_agree_with_the_store(ft, tmp_path):
    assert open_store(ft["store48"]).spec.recipe["repeats"] == 3
    two = precompute(ft["data"], tmp_path / "store2", ft["weights"], size=32, repeats=2, views=1)
    assert open_store(two).spec.recipe["repeats"] == 2
    assert open_train_data(ft["data"], labels=two).recipe.repeats == 2
    assert open_train_data(ft["data"], repeats=1).recipe.repeats == 1  # without a store it sets the recipe
    msg = refusal(config(ft, tmp_path / "r", repeats=1))
    assert "recipe.repeats=1 on the command line" in msg and "recipe.repeats=3" in msg and "--repeats" in msg
    r = cli("train", "--data", ft["data"], "--labels", two, "--out", tmp_path / "c", "--model", MODEL,
            "--model-kwargs", json.dumps(TINY32), "--repeats", 3, "--workers", 0)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "recipe.repeats=3" in r.stderr
    r = cli("precompute", "--data", ft["data"], "--out", tmp_path / "bad", "--teacher", "resnet10t",
            "--teacher-weights", ft["weights"], "--repeats", 0)
    assert r.returncode == 2 and "repeats must be >= 1" in r.stderr and r.stderr.strip().count("\n") == 0


def test_code_carrying_checkpoint_is_refused_naming_the_cause_not_torchs_advice(tmp_path):
    from student.errors import TrainError
    from student.finetune import read_state_dict

    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    torch.save({"model": RunsCode()}, tmp_path / "crafted.pth")
    with pytest.raises(TrainError) as e:
        read_state_dict(str(tmp_path / "crafted.pth"))
    msg = str(e.value)
    assert not (tmp_path / "ran").exists() and "\n" not in msg
    assert "never unpickled" in msg and "weights_only" not in msg and "Re-running" not in msg
