"""Shared fixtures: tiny real images made in the test (no downloads), as ImageFolder and WebDataset."""

import io
import os

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest_plugins = ["fast_subset"]  # the `fast` marker of `make test-fast`

CLASSES = ["circle", "square", "stripes"]


def make_image(label: int, index: int, size=(40, 32)) -> Image.Image:
    """A small picture whose class is visible: a disc, a square or stripes, with seeded colour noise."""
    g = np.random.Generator(np.random.Philox(key=[label, index]))
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = g.integers(0, 80, (h, w, 3))
    cy, cx, r = h / 2 + g.integers(-4, 5), w / 2 + g.integers(-4, 5), min(h, w) / 3
    if label == 0:
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2
    elif label == 1:
        mask = (abs(yy - cy) < r) & (abs(xx - cx) < r)
    else:
        mask = (xx // 4) % 2 == 0
    colour = g.integers(150, 256, 3)
    base[mask] = colour
    return Image.fromarray(base.astype(np.uint8))


def encode(img: Image.Image, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def write_imagefolder(root, per_class=6, classes=CLASSES, size=(40, 32)):
    for label, name in enumerate(classes):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(per_class):
            make_image(label, i, size).save(os.path.join(root, name, f"{name}_{i:03d}.png"))
    return str(root)


def write_wds(root, n=20, per_shard=8, classes=CLASSES, size=(40, 32), fmt="PNG"):
    from pipeline.sources import write_wds_shards

    ext = "png" if fmt == "PNG" else "jpg"
    samples = [(f"s{i:05d}", encode(make_image(i % len(classes), i, size), fmt), ext, i % len(classes))
               for i in range(n)]
    write_wds_shards(samples, str(root), per_shard=per_shard, class_names=list(classes))
    return str(root)


@pytest.fixture
def imagefolder(tmp_path):
    return write_imagefolder(tmp_path / "imagefolder")


@pytest.fixture
def wds_dir(tmp_path):
    return write_wds(tmp_path / "wds")


TINY_TEACHER_KWARGS = {"num_classes": 3}


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """A small timm ConvNet teacher (random weights, saved to a file so every process loads the same)."""
    import timm
    import torch

    path = tmp_path_factory.mktemp("teacher") / "resnet10t.pth"
    g = torch.Generator().manual_seed(0)
    model = timm.create_model("resnet10t", **TINY_TEACHER_KWARGS)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    torch.save(model.state_dict(), path)
    return str(path)


# --- A real S3 server (SeaweedFS) for the bucket tests: started once per session, on first use.

@pytest.fixture(scope="session")
def weed_server(tmp_path_factory):
    from s3_support import start_weed

    server = start_weed(tmp_path_factory.mktemp("weed"))
    yield server
    server.stop()


@pytest.fixture
def s3_env(weed_server, monkeypatch):
    """The environment pointing at the test server with the writer's keys (a clean one: no profile)."""
    from s3_support import point_env_at

    point_env_at(weed_server, monkeypatch)
    return weed_server


@pytest.fixture
def s3_root(s3_env):
    """A fresh prefix in the test bucket, as an ObjPath (``s3_root / "s"`` is a store's URL)."""
    import uuid

    from s3_support import BUCKET

    from storage.bucket import as_path

    return as_path(f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}")


@pytest.fixture
def own_weed(tmp_path, monkeypatch):
    """A weed of this test's own (the session's serves every other test, so this one may not be killed),
    the environment pointing at it; stopped at teardown, each of its process groups checked gone."""
    from s3_support import point_env_at, start_weed

    server = start_weed(tmp_path / "weed")
    try:
        point_env_at(server, monkeypatch)
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["disk", pytest.param("bucket", marks=pytest.mark.bucket)])
def root(request, tmp_path):
    """Where a conformance test makes its stores: a local folder, or a prefix in an S3 bucket."""
    if request.param == "disk":
        return tmp_path
    return request.getfixturevalue("s3_root")


# ---- a source folder and its copy in the bucket (test_bucket_sources, test_source_copies) ----------------
def upload(local: str, prefix) -> str:
    """Every file of a local source folder as an object under ``prefix`` (an ObjPath); its URL."""
    for name in sorted(os.listdir(local)):
        with open(os.path.join(local, name), "rb") as f:
            (prefix / name).put(f.read())
    return str(prefix)


@pytest.fixture
def wds_pair(tmp_path, s3_root):
    """(local folder, its copy's URL): 3 tars of 8 samples (the last 4), 128x128 PNGs (~50 KB, an ImageNet
    JPEG's order: a member's headers are a small part of it), classes.txt."""
    local = write_wds(tmp_path / "wds", n=20, per_shard=8, size=(128, 128))
    return local, upload(local, s3_root / "wds")


@pytest.fixture
def pq_pair(tmp_path, s3_root):
    """(local folder, its copy's URL): 20 rows in 3 parquet files as ``datasets`` writes them (8, 8, 4 rows,
    row groups of 3), 128x128 PNGs (~50 KB: an image is most of what a page holds)."""
    from test_parquet import write_parquet

    local = write_parquet(tmp_path / "pq", n=20, per_file=8,
                          image_of=lambda i: encode(make_image(i % 3, i, (128, 128))))
    return local, upload(local, s3_root / "pq")


def relabelled_shard(tmp_path, name: str = "shard-000002.tar") -> bytes:
    """write_wds's shard ``name`` (n=20, per_shard=8) with every label moved by one: the same names and images,
    other labels (a source changed where the store's stamps must catch it)."""
    import tarfile

    from pipeline.sources import write_wds_shards

    other = write_wds(tmp_path / "other", n=20, per_shard=8)
    with tarfile.open(os.path.join(other, name)) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    rows = [(n.split(".")[0], blob, "png", (int(members[n.split(".")[0] + ".cls"]) + 1) % 3)
            for n, blob in members.items() if n.endswith(".png")]
    (path,) = write_wds_shards(rows, str(tmp_path / "relabelled"), per_shard=len(rows))
    with open(path, "rb") as f:
        return f.read()


# --- A real GCS emulator (fake-gcs-server) for the gs:// tests: started once per session, on first use.

@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
    from gcs_support import start_fake_gcs

    server = start_fake_gcs(tmp_path_factory.mktemp("gcs"))
    yield server
    server.stop()


@pytest.fixture
def gcs_root(gcs_server, monkeypatch):
    """A fresh prefix in the emulator's bucket, as an ObjPath, with the environment pointing at it."""
    import uuid

    from gcs_support import BUCKET, point_env_at

    from storage.bucket import as_path

    point_env_at(gcs_server, monkeypatch)
    return as_path(f"gs://{BUCKET}/{uuid.uuid4().hex[:12]}")
