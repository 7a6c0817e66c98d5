import os
import tarfile

import pytest
from conftest import CLASSES, write_imagefolder, write_wds

from pipeline.sources import Manifest, SourceError, check_same_classes, decode_image, index_source


def test_imagefolder_virtual_shards_mix_classes(tmp_path):
    root = write_imagefolder(tmp_path / "f", per_class=8)
    m = index_source(root, shard_size=6, seed=0)
    assert m.kind == "imagefolder" and m.class_names == CLASSES
    assert m.shard_sizes == (6, 6, 6, 6)
    for shard in range(4):
        assert len(set(m.labels(shard).tolist())) > 1, "a seeded shuffle before sharding mixes classes"
        assert [s.position for s in m.iter_shard(shard)] == list(range(6))
    # the same sample read by (shard, position) and by streaming the shard
    s = m.read_sample(2, 3)
    assert s.data == list(m.iter_shard(2))[3].data and s.label == m.labels(2)[3]
    assert decode_image(s.data).size == (40, 32)


def test_fingerprint_stable_and_sensitive(tmp_path):
    root = write_imagefolder(tmp_path / "f")
    a, b = index_source(root, shard_size=4), index_source(root, shard_size=4)
    assert a.fingerprint == b.fingerprint
    assert a.to_bytes() == b.to_bytes(), "indexing twice gives the same manifest bytes"
    assert index_source(root, shard_size=4, seed=1).fingerprint != a.fingerprint
    assert index_source(root, shard_size=5).fingerprint != a.fingerprint
    # a file added
    os.link(os.path.join(root, "circle", "circle_000.png"), os.path.join(root, "circle", "circle_999.png"))
    assert index_source(root, shard_size=4).fingerprint != a.fingerprint
    # a label changed (file moved to another class)
    os.remove(os.path.join(root, "circle", "circle_999.png"))
    os.rename(os.path.join(root, "circle", "circle_000.png"), os.path.join(root, "square", "circle_000.png"))
    assert index_source(root, shard_size=4).fingerprint != a.fingerprint


def test_manifest_roundtrip(wds_dir):
    m = index_source(wds_dir)
    back = Manifest.from_bytes(m.to_bytes())  # the bytes a store keeps as manifest.parquet
    assert back.fingerprint == m.fingerprint and back.shards == m.shards and back.class_names == m.class_names
    assert back.samples.equals(m.samples)


def test_wds_directory_glob_and_brace_agree(wds_dir):
    by_dir = index_source(wds_dir)
    by_glob = index_source(os.path.join(wds_dir, "shard-*.tar"))
    by_brace = index_source(os.path.join(wds_dir, "shard-{000000..000002}.tar"))
    assert by_dir.fingerprint == by_glob.fingerprint == by_brace.fingerprint
    assert by_dir.shard_sizes == (8, 8, 4) and by_dir.class_names == CLASSES
    seq = list(by_dir.iter_shard(1))
    assert [s.key for s in seq] == by_dir.keys(1)
    for s in seq:
        assert by_dir.read_sample(1, s.position).data == s.data
        assert decode_image(s.data).size == (40, 32)


def test_wds_fingerprint_changes_with_label(tmp_path):
    a = index_source(write_wds(tmp_path / "a", n=6, per_shard=6))
    b_dir = tmp_path / "b"
    os.makedirs(b_dir)
    # same images, one label changed
    with tarfile.open(tmp_path / "a" / "shard-000000.tar") as src, tarfile.open(b_dir / "shard-000000.tar", "w") as dst:
        for m in src:
            data = src.extractfile(m).read()
            if m.name == "s00002.cls":
                data = b"0"
                m.size = 1
            import io
            dst.addfile(m, io.BytesIO(data))
    b = index_source(str(b_dir))
    assert a.keys(0) == b.keys(0) and a.fingerprint != b.fingerprint


@pytest.mark.parametrize("case", ["missing", "empty_dir", "no_images", "no_labels", "not_a_tar"])
def test_bad_sources_are_one_line_errors(tmp_path, case):
    path = tmp_path / "src"
    if case == "empty_dir":
        os.makedirs(path)
    elif case == "no_images":
        os.makedirs(path / "cat")
        (path / "cat" / "notes.txt").write_text("x")
    elif case == "no_labels":
        os.makedirs(path)
        with tarfile.open(path / "a.tar", "w") as tar:
            img = tmp_path / "x.png"
            from conftest import make_image
            make_image(0, 0).save(img)
            tar.add(img, arcname="x.png")
    elif case == "not_a_tar":
        os.makedirs(path)
        (path / "a.tar").write_bytes(b"this is not a tar file" * 40)
    with pytest.raises(SourceError) as e:
        index_source(str(path))
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg


def test_train_and_val_classes_must_match(tmp_path):
    train = index_source(write_imagefolder(tmp_path / "train"))
    val = index_source(write_imagefolder(tmp_path / "val", classes=["circle", "square", "zigzag"]))
    check_same_classes(train, index_source(write_imagefolder(tmp_path / "val2")), val_src="val2")
    with pytest.raises(SourceError, match="zigzag"):
        check_same_classes(train, val, val_src=str(tmp_path / "val"))


# ---- shard layout: class-sorted tars re-cut into seeded virtual shards -------------------------
def write_sorted_wds(root, n=24, per_shard=8):
    """Tars written in class order (labels 0.. then 1.. then 2..): every tar holds one class."""
    from conftest import encode, make_image

    from pipeline.sources import write_wds_shards

    k = len(CLASSES)
    samples = [(f"s{i:05d}", encode(make_image(i * k // n, i)), "png", i * k // n) for i in range(n)]
    write_wds_shards(samples, str(root), per_shard=per_shard, class_names=list(CLASSES))
    return str(root)


def test_class_sorted_tars_are_recut_by_default(tmp_path):
    from pipeline.sources import class_diversity

    src = write_sorted_wds(tmp_path / "sorted")
    as_is = index_source(src, shards="as-is")
    assert as_is.layout == "as-is" and class_diversity(as_is).observed.tolist() == [1, 1, 1]
    m = index_source(src, shard_size=6, seed=3)  # auto: one class per tar, a random 8 would hold ~3
    assert m.layout == "shuffle" and m.files == as_is.shards and m.shard_sizes == (6, 6, 6, 6)
    assert m.shards == [f"virtual-{i:06d}" for i in range(4)]
    assert sum(len(set(m.labels(j).tolist())) for j in range(4)) > 4, "virtual shards mix classes"
    # every sample once, its bytes read by a seek into its own tar, in position order when streamed
    by_key = {s.key: s for j in range(3) for s in list(as_is.iter_shard(j))}
    assert sorted(m.samples.column("key").to_pylist()) == sorted(by_key)
    for j in range(4):
        seq = list(m.iter_shard(j))
        assert [s.position for s in seq] == list(range(6)) and [s.key for s in seq] == m.keys(j)
        for s in seq:
            assert s.data == by_key[s.key].data and s.label == by_key[s.key].label
            assert m.read_sample(j, s.position).data == s.data
    # seeded, and the layout is part of the fingerprint: a store made as-is is not one for the re-cut
    assert index_source(src, shard_size=6, seed=3).to_bytes() == m.to_bytes()
    assert index_source(src, shard_size=6, seed=4).fingerprint != m.fingerprint
    assert index_source(src, shards="shuffle", shard_size=8, seed=0).fingerprint != as_is.fingerprint
    back = Manifest.from_bytes(m.to_bytes())
    assert back.fingerprint == m.fingerprint and back.layout == "shuffle" and back.files == m.files


def test_shuffled_tars_stay_as_they_are_unless_asked(wds_dir):
    m = index_source(wds_dir)  # labels i % 3: every tar already mixes classes
    assert m.layout == "as-is" and not m.files and m.shards == ["shard-000000.tar", "shard-000001.tar",
                                                                "shard-000002.tar"]
    forced = index_source(wds_dir, shards="shuffle", shard_size=5)
    assert forced.layout == "shuffle" and forced.shard_sizes == (5, 5, 5, 5)
    with pytest.raises(SourceError, match="--shards 'sideways' is not one of auto, as-is, shuffle"):
        index_source(wds_dir, shards="sideways")


def test_imagefolder_as_is_keeps_folder_order(tmp_path):
    root = write_imagefolder(tmp_path / "f", per_class=8)
    m = index_source(root, shard_size=8, shards="as-is")
    assert m.layout == "as-is" and [len(set(m.labels(j).tolist())) for j in range(3)] == [1, 1, 1]
    assert m.fingerprint != index_source(root, shard_size=8).fingerprint


def test_cli_shard_layouts_are_the_sources_own():
    """cli.py spells the --shards choices out (it imports no data code to parse); they must be these."""
    import click

    import cli
    from pipeline.sources import SHARD_LAYOUTS

    for command in (cli.precompute, cli.train):
        option = next(p for p in command.params if p.name == "shards")
        assert isinstance(option.type, click.Choice) and tuple(option.type.choices) == SHARD_LAYOUTS
