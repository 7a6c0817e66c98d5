"""Issue 13, sources: silent wrong results, data loss and hangs when indexing and reading a source.

Each test reproduces a finding that passed silently (or hung) before the fix: a tar with two
members of one name, a label of -1, an unreadable folder or file, a 16-bit PNG, a FIFO named like
an image, and a sample whose bytes changed after precompute (swapped images).
"""

from __future__ import annotations

import builtins
import io
import logging
import os
import shutil
import signal
import struct
import tarfile
import zlib

import crc32c
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import encode, make_image, write_imagefolder, write_wds
from PIL import Image
from test_storage_support import snapshot, tiny_spec, unit_data

from cli import main
from pipeline.sources import SourceChanged, SourceError, decode_image, index_source
from storage import StoreError, create_store, open_store


def _append_member(tar_path, name: str, data: bytes) -> None:
    """What `tar -r` does: a second member of the same name at the end of a valid tar."""
    with tarfile.open(tar_path, "a") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def _one_line(err: Exception) -> str:
    msg = str(err)
    assert "\n" not in msg, msg
    return msg


# ---- a tar with two members of one name ----------------------------------------------------------
@pytest.mark.parametrize("member", ["s00001.png", "s00001.cls"])
def test_a_tar_with_a_member_twice_is_refused_naming_tar_and_member(tmp_path, member):
    src = write_wds(tmp_path / "wds", n=6, per_shard=6)
    tar = os.path.join(src, "shard-000000.tar")
    other = encode(make_image(2, 99)) if member.endswith(".png") else b"2"
    _append_member(tar, member, other)
    assert len([m for m in tarfile.open(tar).getmembers() if m.name == member]) == 2, "a valid tar, twice"
    with pytest.raises(SourceError) as e:
        index_source(src)
    msg = _one_line(e.value)
    assert tar in msg and repr(member) in msg and "twice" in msg and "rewrite the shard" in msg


# ---- labels out of range -------------------------------------------------------------------------
def test_a_negative_label_is_refused_at_indexing(tmp_path):
    from pipeline.sources import write_wds_shards

    samples = [(f"s{i}", encode(make_image(i % 3, i)), "png", i % 3) for i in range(4)]
    samples[2] = ("s2", samples[2][1], "png", -1)
    write_wds_shards(samples, str(tmp_path / "wds"), per_shard=4)
    with pytest.raises(SourceError) as e:
        index_source(str(tmp_path / "wds"))
    msg = _one_line(e.value)
    assert "'s2'" in msg and "label -1" in msg and "shard-000000.tar" in msg


def test_a_label_beyond_classes_txt_names_the_sample(tmp_path):
    from pipeline.sources import write_wds_shards

    samples = [(f"s{i}", encode(make_image(i % 3, i)), "png", i % 3) for i in range(4)]
    samples[3] = ("s3", samples[3][1], "png", 3)
    write_wds_shards(samples, str(tmp_path / "wds"), per_shard=4, class_names=["a", "b", "c"])
    with pytest.raises(SourceError) as e:
        index_source(str(tmp_path / "wds"))
    msg = _one_line(e.value)
    assert "'s3'" in msg and "label 3" in msg and "classes.txt" in msg


# ---- unreadable folders and files (tests run as root: permissions are simulated) -----------------
def test_an_unreadable_class_folder_is_an_error_not_a_vanished_class(tmp_path, monkeypatch):
    root = write_imagefolder(tmp_path / "f", per_class=2)
    locked = os.path.join(root, "square")
    real = os.scandir

    def scandir(path="."):
        if os.path.abspath(path) == locked:
            raise PermissionError(13, "Permission denied", path)
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)  # what os.walk lists folders with
    with pytest.raises(SourceError) as e:
        index_source(root, shard_size=4)
    msg = _one_line(e.value)
    assert locked in msg and "permission" in msg.lower()


def test_an_unreadable_image_is_a_permission_error_at_indexing(tmp_path, monkeypatch):
    root = write_imagefolder(tmp_path / "f", per_class=2)
    locked = os.path.join(root, "circle", "circle_001.png")
    real_os_open, real_open = os.open, builtins.open

    def denied(path):
        if os.path.abspath(str(path)) == locked:
            raise PermissionError(13, "Permission denied", str(path))

    def os_open(path, *a, **kw):
        denied(path)
        return real_os_open(path, *a, **kw)

    def open_(path, *a, **kw):
        if not isinstance(path, int):
            denied(path)
        return real_open(path, *a, **kw)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", open_)
    with pytest.raises(SourceError) as e:
        index_source(root, shard_size=4)
    msg = _one_line(e.value)
    assert locked in msg and "permission denied" in msg and not isinstance(e.value, SourceChanged)


# ---- 16-bit PNGs ---------------------------------------------------------------------------------
def _png16(a: np.ndarray) -> bytes:
    """A 16-bit PNG written by hand (Pillow writes 16-bit grayscale only): gray, gray+alpha, RGB, RGBA."""
    h, w = a.shape[:2]
    channels = 1 if a.ndim == 2 else a.shape[2]
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    raw = b"".join(b"\0" + a[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_16_bit_pngs_decode_to_their_high_byte(channels):
    g = np.random.Generator(np.random.Philox(key=[16, channels]))
    a = g.integers(0, 65536, (6, 7) + ((channels,) if channels > 1 else ()), dtype=np.uint16)
    rgb = np.asarray(decode_image(_png16(a)))
    high = (a >> 8).astype(np.uint8)
    if channels <= 2:  # gray (+ alpha): the gray level in all three channels
        gray = high if channels == 1 else high[..., 0]
        expected = np.repeat(gray[..., None], 3, axis=2)
    else:
        expected = high[..., :3]
    assert rgb.dtype == np.uint8 and rgb.shape == (6, 7, 3)
    np.testing.assert_array_equal(rgb, expected)


def test_a_16_bit_grayscale_png_from_pillow_is_not_white():
    a = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode == "I;16"
    rgb = np.asarray(decode_image(buf.getvalue()))
    np.testing.assert_array_equal(rgb[..., 0], (a >> 8).astype(np.uint8))
    assert (rgb[..., 0] == rgb[..., 2]).all() and rgb.min() == 0


# ---- non-regular files ---------------------------------------------------------------------------
def test_a_fifo_named_like_an_image_is_skipped_counted_and_never_opened(tmp_path, caplog):
    root = write_imagefolder(tmp_path / "f", per_class=2)
    fifo = os.path.join(root, "circle", "x.png")
    os.mkfifo(fifo)
    signal.alarm(60)  # opening the FIFO would block forever: fail instead of hanging the suite
    try:
        with caplog.at_level(logging.WARNING, logger="deit_lockstep.sources"):
            m = index_source(root, shard_size=4)
        assert m.skipped == (os.path.join("circle", "x.png"),)
        assert "circle/x" not in m.samples.column("key").to_pylist() and m.num_samples == 6
        assert "skipped 1 non-regular file" in caplog.text and "circle/x.png" in caplog.text
        for shard in range(len(m.shards)):
            assert len(list(m.iter_shard(shard))) == m.shard_sizes[shard]
    finally:
        signal.alarm(0)


# ---- content: size and crc32c of every sample ----------------------------------------------------
def test_the_manifest_records_size_and_crc32c_of_every_sample(tmp_path):
    root = write_imagefolder(tmp_path / "f", per_class=2)
    m = index_source(root, shard_size=4)
    for row in m.samples.to_pylist():
        data = open(os.path.join(root, row["path"]), "rb").read()
        assert (row["size"], row["crc32c"]) == (len(data), crc32c.crc32c(data))
    w = index_source(write_wds(tmp_path / "wds", n=6, per_shard=6))
    with tarfile.open(tmp_path / "wds" / "shard-000000.tar") as tar:
        for row in w.samples.to_pylist():
            data = tar.extractfile(row["path"]).read()
            assert (row["size"], row["crc32c"]) == (len(data), crc32c.crc32c(data))
    # names-only indexing (a train start) has the same fingerprint: content is checked on read
    assert index_source(root, shard_size=4, checksums=False).fingerprint == m.fingerprint


def _swap(a, b):
    da, db = open(a, "rb").read(), open(b, "rb").read()
    open(a, "wb").write(db)
    open(b, "wb").write(da)


def _invoke(*args):
    res = CliRunner().invoke(main, [str(a) for a in args])
    crashed = None if res.exception is None or isinstance(res.exception, SystemExit) else res.exception
    assert crashed is None, f"uncaught {type(crashed).__name__}: {crashed}"
    return res.exit_code, res.stderr.strip()


def _assert_source_changed(code, err):
    assert code == 2, err
    assert err.count("error: ") == 1 and "Traceback" not in err, err
    line = err[err.index("error: "):]
    assert "\n" not in line, err
    assert "source changed" in line and "re-run precompute" in line and "damaged" not in line.replace(
        "is not damaged", ""), line


@pytest.fixture(scope="module")
def swapped(tmp_path_factory, tiny_teacher):
    """A complete store made from an ImageFolder, then two images of different classes swap bytes."""
    root = tmp_path_factory.mktemp("swap")
    src = write_imagefolder(root / "src", per_class=4)
    store = root / "store"
    code, err = _invoke("precompute", "--data", src, "--out", store, "--teacher", "resnet10t", "--teacher-weights",
                        tiny_teacher, "--model-kwargs", '{"num_classes": 3}', "--views", "2", "--views-per-unit", "1",
                        "--topk", "3", "--input-size", "32", "--batch-size", "8", "--workers", "0",
                        "--shard-size", "6", "--set", "repeats=1")  # repeats=1: every epoch reads every image
    assert code == 0, err
    clean = root / "clean"
    shutil.copytree(src, clean)
    _swap(os.path.join(src, "circle", "circle_001.png"), os.path.join(src, "square", "square_002.png"))
    return {"src": src, "clean": str(clean), "store": str(store), "teacher": tiny_teacher, "root": root}


def test_swapped_images_stop_train_as_source_changed(swapped, tmp_path):
    args = ["--data", swapped["src"], "--labels", swapped["store"], "--out", tmp_path / "run",
            "--model", "deit_tiny_distilled_patch16_224", "--model-kwargs",
            '{"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2}',
            "--distillation", "hard", "--epochs", "1", "--batch-size", "4", "--warmup-epochs", "1"]
    for workers in ("0", "1"):  # in a DataLoader worker too: one line, not torch's traceback text
        _assert_source_changed(*_invoke("train", *args, "--workers", workers))
    assert not (tmp_path / "run" / "checkpoint.pth").exists()
    # the untouched source trains (the store itself is fine)
    code, err = _invoke("train", *[swapped["clean"] if a == swapped["src"] else a for a in args], "--workers", "0",
                        "--max-steps-per-epoch", "1")
    assert code == 0, err


def test_swapped_images_are_source_changed_for_verify_inspect_and_precompute(swapped):
    code, err = _invoke("verify", swapped["store"], "--data", swapped["src"], "--n", "64")
    _assert_source_changed(code, err)
    code, err = _invoke("verify", swapped["store"], "--data", swapped["clean"], "--n", "16")
    assert code == 0, err
    sheet = swapped["root"] / "sheet.png"
    code, err = _invoke("inspect", swapped["store"], "--render", sheet, "--data", swapped["src"], "--count", "12")
    _assert_source_changed(code, err)
    # a resumed precompute (units still to do) reads names only and checks each sample it reads
    resumed = swapped["root"] / "resumed"
    shutil.copytree(swapped["store"], resumed)
    for f in os.listdir(resumed / "units"):
        os.unlink(resumed / "units" / f)
    code, err = _invoke("precompute", "--data", swapped["src"], "--out", resumed, "--teacher", "resnet10t",
                        "--teacher-weights", swapped["teacher"], "--model-kwargs", '{"num_classes": 3}', "--views",
                        "2", "--views-per-unit", "1", "--topk", "3", "--input-size", "32", "--batch-size", "8",
                        "--workers", "0", "--shard-size", "6", "--set", "repeats=1")
    _assert_source_changed(code, err)


# ==== stores: --overwrite under a running writer, foreign folders, symlinks, full disk, read-only =====
@pytest.fixture(params=["zarr", "wds"])
def backend(request):
    return request.param


def test_a_writer_stops_when_its_store_is_rebuilt_under_it(tmp_path, backend):
    """The old writer keeps committing units after --overwrite rebuilt the store with other settings:
    its labels (seed 0) would sit in a store that says seed 1. It must stop and commit nothing there."""
    path = tmp_path / "s"
    old = create_store(path, tiny_spec(seed=0), backend=backend)
    old.write_unit(0, 0, **unit_data(old.spec, 0, 0, seed=0))
    new = create_store(path, tiny_spec(seed=1), backend=backend, overwrite=True)
    with pytest.raises(StoreError, match="rebuilt by another process") as e:
        old.write_unit(0, 1, **unit_data(old.spec, 0, 1, seed=0))
    assert "\n" not in str(e.value)
    r = open_store(path)
    assert r.spec.seed == 1 and r.completed_units() == [], "nothing of the old writer in the new store"
    new.write_unit(0, 1, **unit_data(new.spec, 0, 1, seed=1))
    assert open_store(path).completed_units() == [(0, 1)] and open_store(path).check(full=True) == []


def test_a_commit_racing_the_rebuild_is_taken_back(tmp_path, backend, monkeypatch):
    """The rebuild lands after the writer's last check, while it writes its completion record (zarr: the
    marker, wds: the unit's tar): that record lands in the new store and must be taken back."""
    import storage.wds_backend as wb
    import storage.zarr_backend as zb

    mod = zb if backend == "zarr" else wb
    path = tmp_path / "s"
    old = create_store(path, tiny_spec(seed=0), backend=backend)
    real = mod.atomic_write

    def rebuild_then_write(p, data):
        create_store(path, tiny_spec(seed=1), backend=backend, overwrite=True)
        monkeypatch.setattr(mod, "atomic_write", real)
        return real(p, data)

    monkeypatch.setattr(mod, "atomic_write", rebuild_then_write)
    with pytest.raises(StoreError, match="rebuilt by another process"):
        old.write_unit(1, 0, **unit_data(old.spec, 1, 0, seed=0))
    r = open_store(path)
    assert r.spec.seed == 1 and r.completed_units() == []


def test_overwrite_rebuilds_a_half_made_store_but_refuses_a_foreign_folder(tmp_path, backend):
    half = tmp_path / "half"  # what a killed race left: no store.json, orphan units and chunks
    (half / "units").mkdir(parents=True)
    (half / "units" / "000000_0000.json").write_text("{}")
    (half / "labels.zarr" / "ids" / "c").mkdir(parents=True)
    with pytest.raises(StoreError, match="half-made label store.*--overwrite"):
        create_store(half, tiny_spec(), backend=backend)
    w = create_store(half, tiny_spec(), backend=backend, overwrite=True)
    assert w.completed_units() == [] and open_store(half).spec == tiny_spec()

    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    with pytest.raises(StoreError, match="refused.*'thesis.tex'") as e:
        create_store(foreign, tiny_spec(), backend=backend, overwrite=True)
    assert "\n" not in str(e.value) and (foreign / "thesis.tex").read_text() == "years of work"
    other = tmp_path / "other-format"
    other.mkdir()
    (other / "store.json").write_text('{"format": "something-else"}')
    with pytest.raises(StoreError, match="refused"):
        create_store(other, tiny_spec(), backend=backend, overwrite=True)
    assert (other / "store.json").exists()


def test_overwrite_through_a_symlink_rebuilds_the_target_and_keeps_the_link(tmp_path, backend):
    real = tmp_path / "big-disk" / "store"
    create_store(real, tiny_spec(seed=0), backend=backend).write_unit(0, 0, **unit_data(tiny_spec(), 0, 0))
    link = tmp_path / "store"
    link.symlink_to(real, target_is_directory=True)
    w = create_store(link, tiny_spec(seed=1), backend=backend, overwrite=True)
    assert link.is_symlink() and os.path.realpath(link) == str(real)
    assert open_store(link).spec.seed == 1 and open_store(real).completed_units() == []
    w.write_unit(0, 0, **unit_data(w.spec, 0, 0, seed=1))
    assert open_store(link).completed_units() == [(0, 0)]


def test_equal_metadata_is_not_rewritten(tmp_path, backend, monkeypatch):
    """Resuming a complete store on a read-only disk must not fail rewriting meta/probes.json."""
    import storage.base as sb

    w = create_store(tmp_path / "s", tiny_spec(), backend=backend)
    w.set_meta("probes", {"0/0/0": "ab"})

    def read_only(path, data):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(sb, "atomic_write", read_only)
    before = snapshot(tmp_path / "s")
    w.set_meta("probes", {"0/0/0": "ab"})
    assert snapshot(tmp_path / "s") == before
    with pytest.raises(PermissionError):
        w.set_meta("probes", {"0/0/0": "cd"})


def test_a_full_disk_names_the_disk_and_leaves_no_temporary(tmp_path, monkeypatch):
    import errno

    import storage.fsutil as fs

    w = create_store(tmp_path / "s", tiny_spec(), backend="zarr")
    real_open = builtins.open

    class Full:
        """A file on a full disk: opening works, writing fails with a bare ENOSPC (no file name)."""

        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def flush(self):
            self.f.flush()

        def fileno(self):
            return self.f.fileno()

    def full_open(path, mode="r", *a, **kw):
        f = real_open(path, mode, *a, **kw)
        return Full(f) if "w" in mode else f

    monkeypatch.setattr(fs, "open", full_open, raising=False)
    with pytest.raises(OSError) as e:
        w.set_meta("probes", {"0/0/0": "ab"})
    err = e.value
    assert err.errno == errno.ENOSPC and "\n" not in err.strerror
    assert "No space left on device" in err.strerror and "mounted at /" in err.strerror
    assert "free space there" in err.strerror and err.filename.endswith("probes.json")
    assert os.listdir(tmp_path / "s" / "meta") == [], "no .probes.json.*.tmp left behind"


def test_precompute_resumes_a_complete_read_only_store(tmp_path, tiny_teacher, monkeypatch):
    """A complete store on a read-only mount (simulated: every atomic write fails as root ignores modes):
    rerunning the same precompute writes nothing and succeeds."""
    import storage.base as sb
    import storage.fsutil as fs
    import storage.zarr_backend as zb

    src = write_wds(tmp_path / "wds", n=8, per_shard=8)
    args = ["precompute", "--data", src, "--out", tmp_path / "store", "--teacher", "resnet10t", "--teacher-weights",
            tiny_teacher, "--model-kwargs", '{"num_classes": 3}', "--views", "2", "--views-per-unit", "1",
            "--topk", "3", "--input-size", "32", "--batch-size", "8", "--workers", "0"]
    code, err = _invoke(*args)
    assert code == 0, err
    before = snapshot(tmp_path / "store")

    def read_only(path, data):
        raise PermissionError(13, "Permission denied (read-only)", str(path))

    for mod in (sb, fs, zb):
        monkeypatch.setattr(mod, "atomic_write", read_only)
    import pipeline.stage1.index_once as index_once

    indexed, real_index = [], index_once.index_source

    def index_source_(*a, **kw):
        indexed.append(kw.get("checksums", True))
        return real_index(*a, **kw)

    monkeypatch.setattr(index_once, "index_source", index_source_)
    code, err = _invoke(*args)
    assert code == 0, err
    assert snapshot(tmp_path / "store") == before
    # a resume takes the store's manifest: with every tar's stamp holding nothing is indexed; a tar stamped
    # within a coarse mtime tick is re-indexed alone (never through index_source); never with checksums
    assert indexed in ([], [False]), "a resume indexes names only, at most, and takes the checksums from the store"


SLOW_CLI = """
import sys, time
sys.path.insert(0, {root!r})
import pipeline.stage1.labelling as lab
real = lab._label
def slow(*a, **kw):
    time.sleep({seconds})  # a slow GPU: the other process acts while this one still writes
    return real(*a, **kw)
lab._label = slow
from cli import main
main(sys.argv[1:], prog_name="cli.py")
"""


def test_overwrite_while_another_precompute_writes_the_store(tmp_path, tiny_teacher):
    """The reproduction with real processes: precompute (seed 0) is writing when `precompute --overwrite
    --seed 1` rebuilds the store. Before: both exit 0, store.json says seed 1 and units hold seed-0 labels.
    Now: the old writer stops with one line, and the store is exactly a clean seed-1 store."""
    import subprocess
    import sys
    import time

    from test_faults import ENV, ROOT, labels_bytes

    src = write_wds(tmp_path / "wds", n=24, per_shard=8)
    common = ["--data", src, "--teacher", "resnet10t", "--teacher-weights", tiny_teacher, "--model-kwargs",
              '{"num_classes": 3}', "--views", "4", "--views-per-unit", "1", "--topk", "3", "--input-size", "32",
              "--batch-size", "8", "--workers", "0"]
    out = tmp_path / "store"
    old = subprocess.Popen([sys.executable, "-c", SLOW_CLI.format(root=ROOT, seconds=0.7), "precompute", "--out",
                            str(out), *common], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "units").is_dir() or not os.listdir(out / "units"):
            assert time.monotonic() < deadline and old.poll() is None, "the first precompute never committed"
            time.sleep(0.05)
        code, err = _invoke("precompute", "--out", out, *common, "--seed", "1", "--overwrite")
        assert code == 0, err
    finally:
        _, stderr = old.communicate(timeout=300)
    assert old.returncode == 2, stderr[-2000:]
    line = stderr.strip().splitlines()[-1]
    assert stderr.count("error: ") == 1 and "Traceback" not in stderr, stderr[-2000:]
    assert line.startswith("error: ") and "rebuilt by another process" in line, line
    code, err = _invoke("precompute", "--out", tmp_path / "ref", *common, "--seed", "1")
    assert code == 0, err
    r = open_store(out)
    assert r.spec.seed == 1 and r.completed_units() == r.spec.units() and r.check(full=True) == []
    assert labels_bytes(out) == labels_bytes(tmp_path / "ref"), "every unit holds seed-1 labels"


def test_a_full_disk_during_precompute_is_one_line_naming_the_disk(tmp_path, tiny_teacher, monkeypatch):
    """Before: `error: No space left on device ()` and a meta/.probes.json.*.tmp left behind."""
    import errno

    import storage.fsutil as fs

    def full_open(path, mode="r", *a, **kw):
        if "w" in mode:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # no file name, as a real full disk
        return builtins.open(path, mode, *a, **kw)

    src = write_wds(tmp_path / "wds", n=8, per_shard=8)  # the source is written before the disk fills
    monkeypatch.setattr(fs, "open", full_open, raising=False)
    out = tmp_path / "store"
    res = CliRunner().invoke(main, ["precompute", "--data", src, "--out", str(out), "--teacher", "resnet10t",
                                    "--teacher-weights", tiny_teacher, "--model-kwargs", '{"num_classes": 3}',
                                    "--views", "2", "--topk", "3", "--input-size", "32", "--workers", "0"])
    assert res.exit_code == 1, res.output
    err = res.stderr.strip()
    assert err.count("error: ") == 1 and "\n" not in err[err.index("error: "):], err
    assert "No space left on device" in err and "mounted at /" in err and "()" not in err, err
    assert "probes.json" in err and "free space there" in err, err
    assert [f for f in os.listdir(out / "meta") if f.endswith(".tmp")] == [], "no temporary left behind"


def test_an_unreadable_validation_image_is_an_error_not_a_dropped_image(tmp_path, monkeypatch):
    """Validation indexes names only; its reader must not swallow a permission error as an undecodable image."""
    train_src = write_wds(tmp_path / "wds", n=8, per_shard=8)
    val = write_imagefolder(tmp_path / "val", per_class=2)
    locked = os.path.join(val, "square", "square_001.png")
    real_os_open, real_open = os.open, builtins.open

    def denied(path):
        if not isinstance(path, int) and os.path.abspath(str(path)) == locked:
            raise PermissionError(13, "Permission denied", str(path))

    def os_open(path, *a, **kw):
        denied(path)
        return real_os_open(path, *a, **kw)

    def open_(path, *a, **kw):
        denied(path)
        return real_open(path, *a, **kw)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", open_)  # whichever call a reader uses
    code, err = _invoke("train", "--data", train_src, "--val", val, "--out", tmp_path / "run", "--model",
                        "deit_tiny_distilled_patch16_224", "--model-kwargs",
                        '{"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2}',
                        "--distillation", "none", "--epochs", "1", "--batch-size", "4", "--warmup-epochs", "1",
                        "--workers", "0", "--max-steps-per-epoch", "1", "--input-size", "32")
    assert code == 2, err
    line = err[err.index("error: "):]
    assert "\n" not in line and locked in line and "permission denied" in line, err
