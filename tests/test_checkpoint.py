"""storage/checkpoint.py, the one seam for checkpoints: its schema read by train (resume), export and the
teacher, one state-dict unwrapping for the teacher, fine-tuning and the EMA weights, the atomic fsynced
save, and checkpoints written before the schema had a version."""

import dataclasses
import os

import pytest
import timm
import torch
from cli_support import one_line_message
from timm.utils import ModelEmaV3

from pipeline.stage1.teacher import TeacherError, create_teacher, load_state_dict_file
from storage import checkpoint
from storage.checkpoint import CONTAINERS, TrainCheckpoint
from student.errors import TrainError
from student.finetune import read_state_dict
from student.train import TrainConfig, load_checkpoint, load_ema

TEACHER = "resnet10t"


@pytest.fixture(scope="module")
def teacher_state():
    torch.manual_seed(0)
    return timm.create_model(TEACHER, num_classes=3).state_dict()


def _bytes(state: dict) -> dict:
    return {k: v.numpy().tobytes() for k, v in state.items()}


def _parts(seed=0):
    """A tiny model, its EMA (decay 0.5 after one update: different weights), optimizer, schedule, scaler."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    ema = ModelEmaV3(model, decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model, step=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    return model, ema, optimizer, scheduler, scaler


def _config(out, **kw) -> dict:
    return dataclasses.asdict(TrainConfig(data="src", out=str(out), model="m", model_kwargs={"depth": 2}, **kw))


def _main_dict(out, ema_key="state_dict_ema", **config):
    """A checkpoint exactly as student/train.py wrote it before this module: literal keys, no format."""
    model, ema, optimizer, scheduler, scaler = _parts()
    identity = {"source": "fp", "store": None, "stream": {"group_shards": 1, "window_slots": 3}}
    ema_state = ema.module.state_dict() if ema_key == "state_dict_ema" else ema.state_dict()
    return {"model": model.state_dict(), ema_key: ema_state,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "epoch": 1, "step": 7,
            "config": _config(out, **config), "identity": identity,
            "recipe": {"preset": "deit"}, "class_names": ["a", "b", "c"]}, ema


# ---- checkpoints from before the schema --------------------------------------------------------------
@pytest.mark.parametrize("ema_key", ["state_dict_ema", "ema"])
def test_a_checkpoint_written_the_old_way_still_resumes(tmp_path, ema_key):
    """Literal keys as train.py wrote them (and the older "ema" layout, ModelEmaV3's "module." keys): resume
    reads every entry, and the EMA weights land in the EMA model byte for byte."""
    old, ema = _main_dict(tmp_path, ema_key, epochs=5)
    torch.save(old, tmp_path / "checkpoint.pth")
    cfg, ckpt = load_checkpoint(TrainConfig(data="elsewhere", out=str(tmp_path), model="m",
                                            model_kwargs={"depth": 2}, resume=True))
    assert isinstance(ckpt, TrainCheckpoint) and ckpt.version == 1
    assert (ckpt.epoch, ckpt.step, ckpt.identity, ckpt.class_names) == (1, 7, old["identity"], ["a", "b", "c"])
    assert cfg.epochs == 5 and cfg.data == "elsewhere"  # the checkpoint's settings win, runtime ones do not
    assert _bytes(ckpt.model) == _bytes(old["model"])
    assert ckpt.optimizer["state"][0]["exp_avg"].equal(old["optimizer"]["state"][0]["exp_avg"])
    fresh = ModelEmaV3(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)), decay=0.5)
    load_ema(fresh, ckpt)
    assert _bytes(fresh.module.state_dict()) == _bytes(ema.module.state_dict())


def test_ctrl_c_during_a_save_arrives_after_the_checkpoint_is_whole(tmp_path, monkeypatch):
    """Ctrl-C as torch.save writes (the first-hour ctrl-c test hit it: exit 1, "unexpected pos"): the save
    ends, the checkpoint is whole, then the KeyboardInterrupt the run turns into "interrupted" and 130."""
    import signal

    old, _ = _main_dict(tmp_path)
    ckpt = TrainCheckpoint.from_dict(old)
    real_save = torch.save

    def interrupted_save(obj, f):
        os.kill(os.getpid(), signal.SIGINT)  # delivered at the next bytecode, inside the write
        real_save(obj, f)

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path / "c.pth", ckpt)
    obj = torch.load(tmp_path / "c.pth", weights_only=True)
    assert _bytes(TrainCheckpoint.from_dict(obj).model) == _bytes(ckpt.model)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_new_checkpoint_round_trips_and_is_marked(tmp_path):
    old, _ = _main_dict(tmp_path)
    ckpt = TrainCheckpoint.from_dict(old)
    checkpoint.save(tmp_path / "c.pth", ckpt)
    obj = torch.load(tmp_path / "c.pth", weights_only=True)
    assert obj["format"] == checkpoint.FORMAT and obj["format_version"] == checkpoint.FORMAT_VERSION
    assert set(old) <= set(obj) and checkpoint.missing(obj) == [] and checkpoint.is_train_checkpoint(obj)
    again = TrainCheckpoint.from_dict(obj)
    assert _bytes(again.model) == _bytes(ckpt.model) and _bytes(again.ema) == _bytes(ckpt.ema)
    assert (again.config, again.identity, again.recipe) == (ckpt.config, ckpt.identity, ckpt.recipe)


def test_a_newer_format_and_a_partial_checkpoint_are_refused_in_one_line(tmp_path):
    old, _ = _main_dict(tmp_path)
    torch.save({**old, "format": checkpoint.FORMAT, "format_version": 99}, tmp_path / "checkpoint.pth")
    cfg = TrainConfig(data="src", out=str(tmp_path), model="m", model_kwargs={"depth": 2}, resume=True)
    with pytest.raises(checkpoint.CheckpointError) as e:
        load_checkpoint(cfg)
    assert "format version 99, newer than this code's 1" in one_line_message(e)
    torch.save({k: v for k, v in old.items() if k not in ("optimizer", "state_dict_ema")}, tmp_path / "checkpoint.pth")
    with pytest.raises(TrainError) as e:
        load_checkpoint(cfg)
    assert "it lacks optimizer, state_dict_ema" in one_line_message(e)


# ---- the teacher reads train checkpoints through the schema -----------------------------------------
def _train_checkpoint(path, state, *, marked=True, drop=(), **config):
    obj = {"model": state, "state_dict_ema": None, "optimizer": {}, "scheduler": {}, "scaler": {}, "epoch": 1,
           "step": 3, "config": _config(path.parent, **config), "identity": {"source": "fp", "store": None}}
    if marked:
        obj.update(format=checkpoint.FORMAT, format_version=checkpoint.FORMAT_VERSION)
    torch.save({k: v for k, v in obj.items() if k not in drop}, path)
    return path


@pytest.mark.parametrize("marked", [True, False], ids=["marked", "written-before-the-format-key"])
def test_teacher_labels_at_the_size_its_checkpoint_was_trained_at(tmp_path, teacher_state, marked):
    path = _train_checkpoint(tmp_path / "t.pth", teacher_state, marked=marked, input_size=48)
    teacher = create_teacher(TEACHER, weights=path)
    assert teacher.input_size == 48 and teacher.mean == pytest.approx((0.485, 0.456, 0.406))


@pytest.mark.parametrize("marked", [True, False], ids=["marked", "written-before-the-format-key"])
def test_teacher_refuses_its_train_checkpoint_without_config_in_one_line(tmp_path, teacher_state, marked):
    """Before, such a file was silently labelled at the architecture's default size (176 px here)."""
    path = _train_checkpoint(tmp_path / "t.pth", teacher_state, marked=marked, drop=("config",))
    with pytest.raises(TeacherError) as e:
        create_teacher(TEACHER, weights=path)
    msg = one_line_message(e)
    assert "a `cli.py train` checkpoint without its config" in msg
    assert str(path) in msg and "restore the checkpoint" in msg
    # All three given: the config is not needed, and not asked for.
    given = create_teacher(TEACHER, weights=path, input_size=40, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert given.input_size == 40


def test_teacher_refuses_its_train_checkpoint_with_an_unreadable_recipe(tmp_path, teacher_state):
    path = _train_checkpoint(tmp_path / "t.pth", teacher_state, recipe="no-such-preset")
    with pytest.raises(TeacherError) as e:
        create_teacher(TEACHER, weights=path)
    msg = one_line_message(e)
    assert "checkpoint whose recipe does not read" in msg and "no-such-preset" in msg


def test_teacher_takes_other_files_at_the_architectures_size(tmp_path, teacher_state):
    """Bare state_dicts, safetensors and other tools' checkpoints are not ours: no config is looked for."""
    from safetensors.torch import save_file

    files = {"bare.pth": teacher_state, "deit.pth": {"model": teacher_state, "epoch": 3, "args": {}},
             "timm.pth": {"state_dict": teacher_state, "epoch": 3, "arch": TEACHER, "optimizer": {}}}
    for name, obj in files.items():
        torch.save(obj, tmp_path / name)
    save_file(teacher_state, tmp_path / "w.safetensors")
    for name in [*files, "w.safetensors"]:
        assert create_teacher(TEACHER, weights=tmp_path / name).input_size == 176, name


# ---- one unwrapping for the teacher, fine-tuning and the EMA weights --------------------------------
@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."])
@pytest.mark.parametrize("container", [None, *CONTAINERS])
def test_one_unwrapping_for_teacher_finetune_and_ema(tmp_path, teacher_state, container, prefix):
    wrapped = {prefix + k: v for k, v in teacher_state.items()}
    obj = wrapped if container is None else {container: wrapped, "epoch": 3, "optimizer": {"lr": 0.1}}
    torch.save(obj, tmp_path / "w.pth")
    want = _bytes(teacher_state)
    assert _bytes(load_state_dict_file(tmp_path / "w.pth")) == want
    assert _bytes(read_state_dict(str(tmp_path / "w.pth"))) == want
    assert _bytes(checkpoint.unwrap_state_dict(obj)) == want
    if container == "ema":  # the train checkpoint's old EMA entry, read by resume and export
        assert _bytes(TrainCheckpoint.from_dict(obj).ema) == want


def test_unwrapping_prefers_raw_weights_and_keeps_a_prefix_only_some_keys_carry(teacher_state):
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in teacher_state.items()}
    got = checkpoint.unwrap_state_dict({"state_dict_ema": ema, "model": teacher_state, "model_ema": ema})
    assert _bytes(got) == _bytes(teacher_state)
    mixed = {"module.weight": torch.zeros(1), "bias": torch.zeros(1)}  # a submodule really named "module"
    assert list(checkpoint.unwrap_state_dict(mixed)) == ["module.weight", "bias"]
    assert checkpoint.unwrap_state_dict({"model": {}, "optimizer": {"lr": 0.1}}) is None
    assert checkpoint.unwrap_state_dict([1, 2]) is None


# ---- the save: atomic and durable ----------------------------------------------------------------------
def test_an_interrupted_save_leaves_the_previous_checkpoint_and_no_temporary(tmp_path, monkeypatch):
    first = TrainCheckpoint.from_dict(_main_dict(tmp_path)[0])
    path = tmp_path / "checkpoint.pth"
    checkpoint.save(path, first)
    before = path.read_bytes()
    second = dataclasses.replace(first, step=8, model={k: v + 1 for k, v in first.model.items()})

    def refuse(*_a, **_k):
        raise OSError("rename refused")

    with monkeypatch.context() as m:
        m.setattr(os, "replace", refuse)
        with pytest.raises(OSError, match="rename refused"):
            checkpoint.save(path, second)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["checkpoint.pth"]

    def torn(obj, f, *a, **k):  # a kill in the middle of torch.save: half the bytes written
        f.write(before[: len(before) // 2])
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(torch, "save", torn)
        with pytest.raises(KeyboardInterrupt):
            checkpoint.save(path, second)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["checkpoint.pth"]
    checkpoint.save(path, second)
    assert torch.load(path, weights_only=True)["step"] == 8


def test_the_save_is_fsynced_file_and_directory(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    checkpoint.save(tmp_path / "checkpoint.pth", TrainCheckpoint.from_dict(_main_dict(tmp_path)[0]))
    assert synced[-1] == os.path.realpath(tmp_path)  # the rename made durable
    assert any(os.path.basename(p).startswith(".checkpoint.pth.") for p in synced[:-1])  # the bytes, before it


def test_wds_shards_are_written_atomically(tmp_path, monkeypatch):
    """pipeline.sources.write_wds_shards (demo and tests) goes through the same atomic, fsynced write."""
    from pipeline.sources import write_wds_shards

    samples = [(f"s{i}", b"\x89PNG fake", "png", i % 2) for i in range(4)]
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    paths = write_wds_shards(samples, str(tmp_path / "a"), per_shard=2, class_names=["x", "y"])
    assert len(paths) == 2 and len(synced) == 2 * 3  # each tar and classes.txt: file, then directory
    def refuse(*_a, **_k):
        raise OSError("rename refused")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="rename refused"):
        write_wds_shards(samples, str(tmp_path / "b"), per_shard=2)
    assert os.listdir(tmp_path / "b") == []
