"""The demo: Fashion-MNIST end to end through the CLI (`python cli.py demo --quick`), and its parts.

The slow test is CI's check that the whole pipeline runs on real data. Missing Fashion-MNIST is a
failure with the install hint, never a skip: a skipped demo would hide a broken first command.
"""

import gzip
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _require_fashion_mnist():
    try:
        demo.check_dataset()
    except demo.DemoError as e:
        pytest.fail(f"{e} (CI: .ci/run installs it when run as root)")


def _write_idx(path, arr):
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


@pytest.fixture
def fake_fashion(tmp_path):
    """A Fashion-MNIST directory in the real file format: 30 train and 12 test images, labels i mod 10."""
    root = tmp_path / "fm"
    root.mkdir()
    g = np.random.Generator(np.random.Philox(key=7))
    for split, n in (("train", 30), ("test", 12)):
        images_file, labels_file = demo.FASHION_FILES[split]
        _write_idx(root / images_file, g.integers(0, 256, (n, 28, 28)))
        _write_idx(root / labels_file, np.arange(n) % 10)
    return root


def test_missing_dataset_names_the_package(tmp_path):
    with pytest.raises(demo.DemoError, match="apt-get install -y dataset-fashion-mnist"):
        demo.check_dataset(str(tmp_path))


def test_demo_command_fails_with_install_hint(tmp_path):
    env = {**os.environ, "FASHION_MNIST_DIR": str(tmp_path / "nowhere")}
    proc = subprocess.run([sys.executable, "cli.py", "demo", "--quick", "--out", str(tmp_path / "out")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "dataset-fashion-mnist" in proc.stderr


def test_shards_hold_the_idx_images_and_labels(fake_fashion, tmp_path):
    from pipeline.sources import decode_image, index_source

    dirs = demo.write_fashion_mnist(str(tmp_path / "out"), 25, 12, per_shard=10, root=str(fake_fashion))
    train = index_source(dirs["train"])
    assert train.class_names == demo.CLASS_NAMES
    assert train.num_samples == 25 and len(train.shards) == 3
    assert train.samples.column("label").to_pylist() == [i % 10 for i in range(25)]
    images = demo.read_idx(str(fake_fashion / demo.FASHION_FILES["train"][0]))
    keys = train.samples.column("key").to_pylist()
    # The shard's PNG decodes to the IDX pixels, grey replicated to RGB.
    import tarfile

    with tarfile.open(os.path.join(dirs["train"], train.shards[0])) as tar:
        png = tar.extractfile(f"{keys[3]}.png").read()
    rgb = np.asarray(decode_image(png))
    assert rgb.shape == (28, 28, 3)
    assert (rgb == images[3][:, :, None]).all()
    # A second call with the same counts keeps the shards; another count rewrites them.
    stamp = os.path.join(dirs["train"], train.shards[0])
    before = os.stat(stamp).st_mtime_ns
    demo.write_fashion_mnist(str(tmp_path / "out"), 25, 12, per_shard=10, root=str(fake_fashion))
    assert os.stat(stamp).st_mtime_ns == before
    demo.write_fashion_mnist(str(tmp_path / "out"), 20, 12, per_shard=10, root=str(fake_fashion))
    assert index_source(dirs["train"]).num_samples == 20


def test_read_idx_refuses_other_files(tmp_path):
    path = tmp_path / "x.gz"
    with gzip.open(path, "wb") as f:
        f.write(b"not an idx file")
    with pytest.raises(demo.DemoError, match="not an IDX file"):
        demo.read_idx(str(path))


def test_teacher_from_train_checkpoint_labels_at_its_training_size(tmp_path):
    """The seam between `train` and `precompute --teacher-weights`: a 32 px checkpoint labels at 32 px."""
    import timm
    import torch

    from pipeline.stage1.teacher import create_teacher

    model = timm.create_model("test_resnet", num_classes=10)
    ckpt = tmp_path / "checkpoint.pth"
    torch.save({"model": model.state_dict(), "ema": None, "epoch": 1,
                "config": {"recipe": None, "overrides": ["scale=0.35,1"], "input_size": 32, "labels": None},
                "identity": {"source": "x", "store": None}}, ckpt)
    t = create_teacher("test_resnet", weights=str(ckpt), num_classes=10, model_kwargs={"num_classes": 10})
    assert t.input_size == 32
    assert t.identity["input_size"] == 32
    plain = tmp_path / "plain.pth"
    torch.save(model.state_dict(), plain)
    assert create_teacher("test_resnet", weights=str(plain), num_classes=10,
                          model_kwargs={"num_classes": 10}).input_size != 32


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path):
    _require_fashion_mnist()
    out = tmp_path / "demo-out"
    proc = subprocess.run([sys.executable, "cli.py", "demo", "--quick", "--out", str(out), "--device", "cpu"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    rows = {}
    for name in ("teacher", "no distillation", "hard distillation"):
        m = re.search(rf"^\| [^|]*{name}[^|]*\|\s+([0-9.]+) \|\s+([0-9.]+) \|$", text, re.M)
        assert m, f"no table row for {name!r} in:\n{text[-2000:]}"
        rows[name] = (float(m.group(1)), float(m.group(2)))
    for name, (top1, wall) in rows.items():
        assert 0.0 <= top1 <= 100.0 and wall > 0, (name, top1, wall)
    # Ten classes: a trained ConvNet teacher is well above chance even in the quick run.
    assert rows["teacher"][0] > 30.0, rows
    m = re.search(r"label store: ([0-9.]+) bytes/view", text)
    assert m and 0 < float(m.group(1)) < 64, text[-2000:]
    png = out / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    # Every stage showed progress: the subprocesses' tqdm bars reach the terminal (stderr).
    assert "epoch 0" in proc.stderr and "precompute" in proc.stderr
