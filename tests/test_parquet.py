"""Parquet sources in the Hugging Face `datasets` layout, written by the `datasets` library itself.

Indexing (glob, directory, one file, brace pattern), class names (ClassLabel metadata, classes.txt),
reads by row group, the re-cut of class-sorted files, precompute + train end to end, labels equal
to those of the same images as WebDataset tars, and hostile files refused in one line."""

import json
import os

import datasets  # a dev dependency (pyproject.toml, constraints.txt): make test installs it; never skipped
import numpy as np
import pytest
from conftest import CLASSES, encode, make_image, write_wds
from test_loader import make_store, make_teacher_weights

from pipeline.sources import SampleReader, SourceError, index_source

Features, Image, ClassLabel, Value = datasets.Features, datasets.Image, datasets.ClassLabel, datasets.Value

TINY = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2}


def sample_bytes(i: int) -> bytes:
    """Sample i: the same picture conftest.write_wds puts in its tars (class i % 3, PNG)."""
    return encode(make_image(i % len(CLASSES), i))


def write_parquet(root, n=20, per_file=8, *, order=None, row_group=3, label_feature=None, prefix="train",
                  image_of=sample_bytes) -> str:
    """Samples `order` (default 0..n-1) as parquet files of `per_file` rows, row groups of `row_group`
    rows, through datasets.Dataset.to_parquet (ClassLabel names in the schema metadata)."""
    os.makedirs(root, exist_ok=True)
    order = list(range(n)) if order is None else list(order)
    feature = label_feature or ClassLabel(names=list(CLASSES))
    for f, start in enumerate(range(0, len(order), per_file)):
        idx = order[start:start + per_file]
        columns = {"image": [{"bytes": image_of(i), "path": f"s{i:05d}.png"} for i in idx],
                   "label": [i % len(CLASSES) for i in idx]}
        ds = datasets.Dataset.from_dict(columns, features=Features({"image": Image(), "label": feature}))
        ds.to_parquet(os.path.join(root, f"{prefix}-{f:05d}.parquet"), batch_size=row_group)
    return str(root)


@pytest.fixture(scope="module")
def pq_dir(tmp_path_factory):
    return write_parquet(tmp_path_factory.mktemp("pq") / "pq")


# ---- indexing and reading ---------------------------------------------------------------------
def test_index_by_glob_directory_file_and_brace(pq_dir):
    m = index_source(os.path.join(pq_dir, "train-*.parquet"), shards="as-is")
    assert m.kind == "parquet" and m.class_names == CLASSES  # the ClassLabel names datasets stored
    assert m.shards == ["train-00000.parquet", "train-00001.parquet", "train-00002.parquet"]
    assert m.shard_sizes == (8, 8, 4)
    t = m.samples.to_pydict()
    assert t["key"][:2] == ["train-00000/0", "train-00000/1"] and t["key"][8] == "train-00001/0"
    assert t["label"] == [i % 3 for i in range(20)] and t["path"][9] == "s00009.png"
    assert t["offset"][8:11] == [0, 1, 2]  # the row within its file
    for i in (0, 9, 19):
        s = m.read_sample(i // 8, i % 8)
        assert s.data == sample_bytes(i) and s.label == i % 3
    assert index_source(pq_dir, shards="as-is").fingerprint == m.fingerprint
    brace = index_source(os.path.join(pq_dir, "train-0000{0,1,2}.parquet"), shards="as-is")
    assert brace.fingerprint == m.fingerprint
    one = index_source(os.path.join(pq_dir, "train-00001.parquet"))
    assert one.num_samples == 8 and one.class_names == CLASSES
    # a train start indexes labels and paths only (no image bytes): same source, same fingerprint
    assert index_source(pq_dir, shards="as-is", checksums=False).fingerprint == m.fingerprint


@pytest.mark.parametrize("pages", [True, False], ids=["by-page-map", "by-row-group"])
def test_a_shard_is_read_once_per_row_group_and_checked(pq_dir, pages):
    """By page map (datasets' files): each image read alone, no row group read; by row group (files
    the map refuses): each row group once, not once per sample."""
    from pipeline.sources import SourceChanged

    m = index_source(pq_dir, shards="as-is")
    m.reader().file_reader.rows.pages = pages
    samples = list(m.iter_shard(0))  # 8 rows in row groups of 3: 3 row groups
    assert [s.data for s in samples] == [sample_bytes(i) for i in range(8)]
    assert (m.reader().file_reader.rows.group_reads, m.reader().file_reader.rows.direct_reads) == (
        (0, 8) if pages else (3, 0))
    files = SampleReader(m)  # the loader's own copy
    files.file_reader.rows.pages = pages
    got = files.read_many([(1, p) for p in (7, 0, 4, 1, 2, 3)])  # a loader batch, any order
    assert got == {(1, p): sample_bytes(8 + p) for p in (7, 0, 4, 1, 2, 3)}
    assert (files.file_reader.rows.group_reads, files.file_reader.rows.direct_reads) == (
        (0, 6) if pages else (3, 0))
    # bytes other than those indexed are a changed source, not another image's labels
    stale = m.with_checksums_of(m)
    stale.samples = stale.samples.set_column(7, "crc32c", m.samples.column("crc32c").take(
        np.roll(np.arange(m.num_samples), 1)))
    with pytest.raises(SourceChanged, match="changed since it was indexed"):
        stale.read_sample(0, 1)


def test_class_names_from_classes_txt_or_numbers(tmp_path):
    root = write_parquet(tmp_path / "plain", n=9, per_file=9, label_feature=Value("int64"))
    assert index_source(root).class_names == ["0", "1", "2"]
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.write("\n".join(["disc", "box", "lines"]) + "\n")
    assert index_source(root).class_names == ["disc", "box", "lines"]


@pytest.mark.parametrize("pages", [True, False], ids=["by-page-map", "by-row-group"])
def test_class_sorted_files_are_recut(tmp_path, pages):
    """Files written in class order (as some exports are) hold one class each: --shards auto re-cuts
    them into seeded virtual shards addressed by (file, row); as-is keeps them. Read by page map,
    each sample is one read of its image; by row group, each row group is read once."""
    by_class = sorted(range(24), key=lambda i: (i % 3, i))
    root = write_parquet(tmp_path / "sorted", n=24, per_file=8, order=by_class)
    kept = index_source(root, shards="as-is")
    assert [len(set(kept.labels(j))) for j in range(3)] == [1, 1, 1]
    m = index_source(root, shard_size=8)
    assert m.layout == "shuffle" and m.files == kept.shards and m.shards[0] == "virtual-000000"
    assert min(len(set(m.labels(j))) for j in range(len(m.shards))) >= 2
    assert m.fingerprint != kept.fingerprint
    for shard in range(len(m.shards)):
        reader = SampleReader(m)  # a fresh reader: count this shard's reads
        reader.file_reader.rows.pages = pages
        for s in list(reader.iter_shard(shard)):  # every sample is its own bytes, in position order
            file, row = s.key.split("/")
            assert s.data == sample_bytes(by_class[int(file[-1]) * 8 + int(row)])
        t = m.shard_table(shard).to_pydict()
        groups = {(f, r // 3) for f, r in zip(t["file"], t["offset"], strict=True)}  # row groups of 3 rows
        rows = reader.file_reader.rows
        if pages:  # each image alone, no row group
            assert (rows.group_reads, rows.direct_reads) == (0, len(t["offset"]))
        else:
            assert rows.group_reads == len(groups)  # each row group once, not once per sample
    assert index_source(root, shard_size=8, checksums=False).fingerprint == m.fingerprint


# ---- precompute and train end to end ------------------------------------------------------------
def test_precompute_labels_equal_those_of_the_same_images_as_tars(tmp_path):
    """The same 24 images in the same files order as tars and as parquet: the same views, so the
    stored teacher labels are the same bytes (only the manifests differ)."""
    weights = make_teacher_weights(tmp_path / "teacher.pth")
    tars = make_store(write_wds(tmp_path / "wds", n=24, per_shard=8), tmp_path / "s_wds", weights)
    pq = make_store(write_parquet(tmp_path / "pq", n=24, per_file=8), tmp_path / "s_pq", weights)
    from storage import open_store

    a, b = open_store(tars), open_store(pq)
    assert a.spec.manifest_fingerprint != b.spec.manifest_fingerprint
    for view in range(2):
        x, y = a.read_view_flat(view), b.read_view_flat(view)
        assert x.ids.tobytes() == y.ids.tobytes() and x.values.tobytes() == y.values.tobytes()
        assert x.valid.tobytes() == y.valid.tobytes() and (x.valid == 1).all()


def test_precompute_train_inspect_verify_on_parquet(tmp_path):
    from cli_support import invoke, one_line_error

    data = os.path.join(write_parquet(tmp_path / "pq", n=24, per_file=8), "train-*.parquet")
    weights = make_teacher_weights(tmp_path / "teacher.pth")
    store = str(tmp_path / "store")
    res = invoke("precompute", "--data", data, "--out", store, "--teacher", "resnet10t", "--teacher-weights", weights,
                 "--views", 2, "--views-per-unit", 1, "--topk", 3, "--input-size", 32, "--batch-size", 16,
                 "--workers", 2)  # workers get the manifest pickled, without its open parquet files
    assert res.exit_code == 0, res.output
    res = invoke("inspect", store)
    assert res.exit_code == 0 and "3 shards" in res.output, res.output
    res = invoke("verify", store, "--data", data, "--n", 8)
    assert res.exit_code == 0 and res.output.splitlines()[-1] == "PASS", res.output
    run = str(tmp_path / "run")
    res = invoke("train", "--data", data, "--labels", store, "--out", run, "--model",
                 "deit_tiny_distilled_patch16_224", "--model-kwargs", json.dumps(TINY), "--epochs", 2,
                 "--batch-size", 8, "--workers", 2, "--warmup-epochs", 1, "--val", data)
    assert res.exit_code == 0, res.output
    metrics = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert [m["epoch"] for m in metrics] == [0, 1] and all(m["steps"] == 3 for m in metrics)
    assert all(np.isfinite(m["loss"]) and m["skipped_views"] == 0 for m in metrics)
    assert metrics[-1]["val"]["n"] == 24  # the parquet source as validation set too
    # Other pictures under the same rows, paths and labels: the same fingerprint, so only the
    # crc32c precompute recorded tells; train stops on "source changed", never on other images' labels.
    write_parquet(tmp_path / "pq", n=24, per_file=8, image_of=lambda i: encode(make_image(i % 3, i + 100)))
    line = one_line_error(invoke("train", "--data", data, "--labels", store, "--out", str(tmp_path / "run2"),
                                 "--model", "deit_tiny_distilled_patch16_224", "--model-kwargs", json.dumps(TINY),
                                 "--epochs", 1, "--batch-size", 8, "--workers", 0), "changed since it was indexed")
    assert ".parquet" in line and "re-run precompute" in line


# ---- hostile input: files the datasets library writes, which are no image-classification source --------
def _png(i=0):
    return sample_bytes(i)


def _rows(labels, images=None, feature=None):
    """A writer of one datasets-made parquet file with these labels (and images: None = null)."""
    def write(root):
        imgs = images if images is not None else [{"bytes": _png(i), "path": None} for i in range(len(labels))]
        _plain(root, {"image": imgs, "label": labels},
               Features({"image": Image(), "label": feature or ClassLabel(names=list(CLASSES))}))
    return write


def _out_of_range(root):
    _rows([0, 7, 1], feature=Value("int64"))(root)
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.write("a\nb\nc\n")


def _text(root):
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "train-00000.parquet"), "w") as f:
        f.write("this is a csv file,really\n")


HOSTILE = {
    "no image column": (lambda root: _plain(root, {"img": [{"bytes": _png(), "path": None}] * 3, "label": [0, 1, 2]},
                                            Features({"img": Image(), "label": ClassLabel(names=list(CLASSES))})),
                        ["no 'image' column", "columns: img, label", "rename_column('img', 'image')"]),
    "image not an Image": (lambda root: _plain(root, {"image": ["a.png"] * 3, "label": [0, 1, 2]},
                                              Features({"image": Value("string"), "label": Value("int64")})),
                           ["column 'image' is string", "cast_column('image', Image())"]),
    "label not integer": (lambda root: _plain(root, {"image": [{"bytes": _png(), "path": None}] * 3,
                                                     "label": ["cat", "dog", "cat"]},
                                              Features({"image": Image(), "label": Value("string")})),
                          ["column 'label' is string", "class_encode_column"]),
    "label -1": (_rows([0, -1, 1]), ["row 1 has label -1", "labelled split"]),
    "label out of range": (_out_of_range, ["row 1 has label 7", "classes.txt names 3 classes", "fix the label"]),
    "null label": (_rows([0, 1, None], feature=Value("int64")), ["row 2 has no label (null)"]),
    "null image": (_rows([0, 1, 2], images=[{"bytes": _png(), "path": None}, None, {"bytes": _png(), "path": None}]),
                   ["row 1 has no image bytes", "embed the images"]),
    "not parquet": (_text, ["not a readable parquet file", "re-download or re-write it"]),
}


def _plain(root, columns, features):
    os.makedirs(root, exist_ok=True)
    datasets.Dataset.from_dict(columns, features=features).to_parquet(os.path.join(root, "train-00000.parquet"))


def test_parquet_mixed_with_tars_is_refused(tmp_path, pq_dir):
    tar = write_wds(tmp_path / "wds", n=3, per_shard=3)
    with pytest.raises(SourceError, match="mixes .parquet files with others"):
        index_source(f"{{{pq_dir}/train-00000.parquet,{tar}/shard-000000.tar}}")


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_parquet_is_one_line_exit_2(tmp_path, case):
    from cli_support import invoke, one_line_error

    make, fragments = HOSTILE[case]
    root = str(tmp_path / "bad")
    make(root)
    for checksums in (True, False):  # a precompute, and a train start that reads no image bytes
        with pytest.raises(SourceError):
            index_source(root, checksums=checksums)
    out = str(tmp_path / "store")
    line = one_line_error(invoke("precompute", "--data", root, "--out", out, "--teacher", "resnet10t",
                                 "--random-teacher", "--input-size", 32), *fragments)
    assert ".parquet" in line  # names the file
    assert not os.path.exists(out)  # nothing half-written
