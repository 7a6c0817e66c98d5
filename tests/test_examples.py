"""The own-loop API (student/api.py) and examples/own_loop.py: the batches are the trainer's, the loss is
the trainer's, and the ~50-line example runs on a tiny store and takes the trainer's first step."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import write_wds
from test_loader import make_store, make_teacher_weights

from student.api import open_lockstep
from student.data import LockstepLoader, open_train_data
from student.errors import TrainError
from student.losses import TeacherLabels, deit_loss_terms
from student.train import TrainConfig, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2}
MODEL = "deit_tiny_distilled_patch16_224"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("examples")
    data = write_wds(root / "wds", n=24, per_shard=8)
    weights = make_teacher_weights(root / "teacher.pth")
    return {"root": root, "data": data, "store": make_store(data, root / "store", weights, views=2),
            "hard": make_store(data, root / "hard", weights, views=1, hard=True)}


def test_api_batches_are_the_loaders_and_its_loss_is_deit_loss_terms(tiny):
    ls = open_lockstep(tiny["data"], tiny["store"], 4, rank=1, world=2, distillation="soft", tau=2.0)
    ref = list(LockstepLoader(open_train_data(tiny["data"], labels=tiny["store"]), batch_size=4, rank=1,
                              world=2).epoch(1))
    got = list(ls.epoch(1))
    assert len(got) == len(ref) == ls.steps_per_epoch == 3 and ls.num_classes == 3 and ls.input_size == 32
    for a, b in zip(got, ref, strict=True):
        for name in ("images", "targets", "rows", "teacher_ids", "teacher_values"):
            assert getattr(a, name).numpy().tobytes() == getattr(b, name).numpy().tobytes(), name
    g = torch.Generator().manual_seed(0)
    outputs = (torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g))
    b = got[0]
    teacher = TeacherLabels.from_topk(b.teacher_values, b.teacher_ids, 3, tau=2.0)
    want, _, _ = deit_loss_terms(outputs, b.targets, teacher, mode="soft", tau=2.0)
    assert ls.loss(outputs, b).item() == want.item()
    hard = open_lockstep(tiny["data"], tiny["store"], 4)  # the trainer's default: hard, from the top-1 id
    want, _, _ = deit_loss_terms(outputs, b.targets, TeacherLabels.hard(b.teacher_ids[:, 0]), mode="hard")
    assert hard.mode == "hard" and hard.loss(outputs, b).item() == want.item()



def test_api_step_is_the_loss_then_plain_backward_and_step(tiny):
    """ls.step (student.step.train_step, the trainer's step) equals the own loop's four lines, byte for byte:
    the same loss, and the same weights after the optimizer step."""
    ls = open_lockstep(tiny["data"], tiny["store"], 4, distillation="soft", tau=2.0)
    b = next(iter(ls.epoch(0)))
    models, opts = [], []
    for _ in range(2):
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 3))
        models.append(m)
        opts.append(torch.optim.AdamW(m.parameters(), lr=1e-2))
    before = models[0][1].weight.detach().clone()
    stepped = ls.step(models[0], b, opts[0], clip_grad=0.5)
    loss = ls.loss(models[1](b.images), b)
    opts[1].zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(models[1].parameters(), 0.5)
    opts[1].step()
    assert stepped.item() == loss.item()
    for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert p.detach().numpy().tobytes() == q.detach().numpy().tobytes()
    assert not torch.equal(models[0][1].weight, before)  # it did step

def test_api_refuses_in_one_line(tiny, tmp_path):
    with pytest.raises(TrainError, match="holds hard labels only"):
        open_lockstep(tiny["data"], tiny["hard"], 4, distillation="soft")
    with pytest.raises(TrainError, match="needs teacher labels"):
        open_lockstep(tiny["data"], None, 4, distillation="hard", input_size=32)
    other = write_wds(tmp_path / "other", n=30, per_shard=8)
    with pytest.raises(TrainError, match="not the source the store"):
        open_lockstep(other, tiny["store"], 4)
    half = make_store(tiny["data"], tmp_path / "half", make_teacher_weights(tmp_path / "t.pth"), views=2, rank=0,
                      world_size=2, claim=False)  # the static split: rank 0 leaves rank 1's units
    ls = open_lockstep(tiny["data"], half, 4)
    with pytest.raises(TrainError, match=r"missing \d+ of the units epochs 1-1 read .*\(shard 1, views 1-1\)"):
        for epoch in (0, 1):  # the half a rank of two wrote: some view-1 units are missing
            ls.epoch(epoch)


def test_own_loop_example_runs_and_takes_the_trainers_first_step(tiny, tmp_path):
    out = tmp_path / "weights.pth"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "own_loop.py"), "--data", tiny["data"],
                        "--labels", tiny["store"], "--model", MODEL, "--model-kwargs", json.dumps(TINY),
                        "--epochs", "2", "--batch-size", "8", "--workers", "0", "--lr", "1e-3", "--out", str(out)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT})
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert [x.split(":")[0] for x in lines[1:]] == ["epoch 0", "epoch 1"] and "3 steps" in lines[1]
    assert out.exists()
    # `cli.py train`'s first step on the same store, seed and model: the same loss.
    summary = train(TrainConfig(data=tiny["data"], labels=tiny["store"], out=str(tmp_path / "run"), model=MODEL,
                                model_kwargs=TINY, epochs=1, batch_size=8, workers=0, drop_path=0.0, ema=False,
                                max_steps_per_epoch=1, progress=False))
    first = float(lines[0].removeprefix("first step loss "))
    assert first == pytest.approx(summary.first_step_loss, rel=1e-6)
