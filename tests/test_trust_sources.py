"""Issue 20, sources: what a hostile or mistyped source did to the stages that trust it.

A brace pattern naming a file twice (every sample twice, exit 0), a pattern of 10**8 names (10 GB
before "no such file"), a store written inside its own ImageFolder (one more class), labels that
size allocations (2**31, 10**12, a uint64 of 2**63), class names that are terminal escapes, image
bytes that make Pillow raise anything but OSError (a probe slot that stopped every run), a
parquet row-group cache sized by count, a cut or foreign manifest.parquet, and open_lockstep's
arguments. Each test fails on the code before the fix.
"""

from __future__ import annotations

import io
import os
import struct
import tarfile
import time
import types
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli_support import invoke, one_line_error, one_line_message
from conftest import CLASSES, encode, make_image, write_imagefolder, write_wds
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.sources import (
    MAX_CLASSES,
    Manifest,
    ManifestError,
    SourceError,
    Undecodable,
    brace_count,
    decode_image,
    index_source,
    write_wds_shards,
)
from storage.errors import printable

PRECOMPUTE = ("--teacher", "resnet10t", "--random-teacher", "--model-kwargs", '{"num_classes": 3}', "--views", "2",
              "--views-per-unit", "1", "--topk", "3", "--input-size", "32", "--batch-size", "8", "--workers", "0",
              "--set", "repeats=1")


# ---- 1, 2: brace patterns ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["tar", "parquet"])
def test_a_pattern_naming_a_file_twice_is_refused_naming_it(tmp_path, kind):
    if kind == "tar":
        root = write_wds(tmp_path / "src", n=12, per_shard=6)
        pattern, twice = os.path.join(root, "shard-{000000,000000,000001}.tar"), "shard-000000.tar"
    else:
        root = str(tmp_path / "src")
        os.makedirs(root)
        for f in range(2):
            _parquet(os.path.join(root, f"train-{f:05d}.parquet"), [0, 1, 2])
        pattern, twice = os.path.join(root, "train-{00000,00000,00001}.parquet"), "train-00000.parquet"
    with pytest.raises(SourceError) as e:
        index_source(pattern)
    msg = one_line_message(e)
    assert twice in msg and "twice" in msg and "name every file once" in msg
    # the same file by two spellings is the same file
    with pytest.raises(SourceError, match="twice"):
        index_source(os.path.join(root, "{.,sub/..}", os.path.basename(pattern).replace(
            "{000000,000000,000001}", "000000").replace("{00000,00000,00001}", "00000")))


def test_a_huge_range_is_refused_at_once_without_expanding_it(tmp_path):
    t = time.perf_counter()
    with pytest.raises(SourceError) as e:
        index_source(str(tmp_path / "{0..99999999}.parquet"))
    assert time.perf_counter() - t < 5  # before: 100 s and 10 GB of names, then "no such file"
    msg = one_line_message(e)
    assert "100,000,000 files" in msg and "check its ranges" in msg


def test_a_pattern_of_missing_files_names_the_first(tmp_path):
    with pytest.raises(SourceError) as e:
        index_source(str(tmp_path / "shard-{000..999}.tar"))
    assert "shard-000.tar: no such file" in one_line_message(e)


def test_unbalanced_braces_are_one_line(tmp_path):
    line = one_line_error(invoke("precompute", "--data", "{a,b", "--out", tmp_path / "store", *PRECOMPUTE),
                          "unbalanced braces", "{a,b")
    assert "Traceback" not in line and not (tmp_path / "store").exists()


@pytest.mark.parametrize("pattern", ["a{1..3}b", "{a,b}{c,d,e}", "x{07..10..2}", "{a..e}", "{1{2,3}}", "{}", "{a}",
                                     "p{x,{1..4},y}q", r"a\{1,2\}", r"{1\,2,3}", "{5..1}", "{-2..2}", "{a,}",
                                     "{Z..c}", "{{a,b}}"])
def test_brace_count_is_what_braceexpand_yields(pattern):
    from braceexpand import braceexpand

    assert brace_count(pattern) == len(list(braceexpand(pattern)))


# ---- 3: an output folder inside its own source --------------------------------------------------------
def test_a_store_or_run_inside_its_imagefolder_is_refused(tmp_path):
    src = write_imagefolder(tmp_path / "src", per_class=2)
    store = os.path.join(src, "store")
    one_line_error(invoke("precompute", "--data", src, "--out", store, *PRECOMPUTE),
                   "--out", "inside the source", "put --out outside")
    assert not os.path.exists(store)  # nothing written: the source still has its 3 classes
    run = os.path.join(src, "circle", "runs", "r1")  # deeper, and through a class folder
    one_line_error(invoke("train", "--data", src, "--out", run, "--epochs", 1, "--batch-size", 2, "--workers", 0),
                   "inside the source")
    assert not os.path.exists(os.path.join(src, "circle", "runs"))
    assert index_source(src).class_names == CLASSES


# ---- 4: labels that size allocations ------------------------------------------------------------------
def _parquet(path, labels, label_type=None, metadata=None):
    images = [{"bytes": encode(make_image(i % 3, i)), "path": f"s{i}.png"} for i in range(len(labels))]
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"image": pa.array(images, image_type), "label": pa.array(labels, label_type or pa.int64())})
    if metadata:
        table = table.replace_schema_metadata(metadata)
    pq.write_table(table, path)  # pyarrow's defaults: one row group, no ClassLabel names


@pytest.mark.parametrize("label,label_type", [(2_000_000, pa.int64()), (2**63, pa.uint64()), (10**12, pa.int64())])
def test_a_huge_parquet_label_is_refused_before_anything_is_sized_by_it(tmp_path, label, label_type):
    os.makedirs(tmp_path / "pq")
    _parquet(str(tmp_path / "pq" / "train-00000.parquet"), [0, 1, label, 2], label_type)
    for checksums in (True, False):
        with pytest.raises(SourceError) as e:
            index_source(str(tmp_path / "pq"), checksums=checksums)
        msg = one_line_message(e)
        assert f"row 2 has label {label}," in msg and "train-00000.parquet" in msg  # never a negative number
        assert f"{MAX_CLASSES:,} classes" in msg


@pytest.mark.parametrize("label", [2_000_000, 10**12])
def test_a_huge_tar_label_is_refused_naming_file_and_sample(tmp_path, label):
    samples = [(f"s{i}", encode(make_image(i % 3, i)), "png", i % 3) for i in range(4)]
    samples[1] = ("s1", samples[1][1], "png", label)
    write_wds_shards(samples, str(tmp_path / "wds"), per_shard=4)
    with pytest.raises(SourceError) as e:
        index_source(str(tmp_path / "wds"))
    msg = one_line_message(e)
    assert "shard-000000.tar" in msg and "'s1'" in msg and f"label {label}," in msg


def test_a_cls_that_is_no_number_is_one_line_however_long_or_encoded(tmp_path):
    for i, text in enumerate([b"\xff\xfe", b"7" * 100_000]):
        path = tmp_path / f"shard-{i}.tar"
        with tarfile.open(path, "w") as tar:
            for name, data in (("a.png", encode(make_image(0, 0))), ("a.cls", text)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        with pytest.raises(SourceError) as e:
            index_source(str(path))
        msg = one_line_message(e)
        assert "non-integer label" in msg and len(msg) < 400


def test_too_many_classlabel_names_are_refused(tmp_path):
    import json

    names = [f"c{i}" for i in range(MAX_CLASSES + 1)]
    meta = {b"huggingface": json.dumps({"info": {"features": {"label": {"names": names}}}}).encode()}
    os.makedirs(tmp_path / "pq")
    _parquet(str(tmp_path / "pq" / "train-00000.parquet"), [0, 1], metadata=meta)
    with pytest.raises(SourceError, match="ClassLabel names 1,048,577 classes"):
        index_source(str(tmp_path / "pq"))


# ---- 5: text from the dataset, printed -------------------------------------------------------------
def test_printable_escapes_control_characters_and_bounds_length():
    assert printable("cat") == "cat" and printable("chat noir é 日本") == "chat noir é 日本"
    hostile = "\x1b[2J\x1b]0;pwned\x07evil\r\nname\u202e"
    safe = printable(hostile)
    assert all(c.isprintable() for c in safe) and "\\x1b" in safe and "\\u202e" in safe and "evil" in safe
    assert len(printable("x" * 10_000)) <= 123 and printable("x" * 10_000).endswith("...")


def test_class_names_and_keys_from_the_dataset_print_safely():
    from pipeline.tools.lookup import class_names
    from pipeline.tools.sample import SampleReport, format_sample

    spec = types.SimpleNamespace(num_classes=2, class_names=("\x1b[31mred\x1b[0m", "y" * 5000))
    names = class_names(spec)
    assert all(c.isprintable() for n in names for c in n) and len(names[1]) < 100
    text = format_sample(SampleReport("key\x1b[2J", 0, 0, names[0], (4, 4), []))
    assert "\x1b" not in text


def test_a_long_hostile_key_in_an_error_is_bounded(tmp_path):
    path = tmp_path / "shard-0.tar"
    key = "k\x1b[2J" + "x" * 5000
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:  # pax: names of any length
        data = encode(make_image(0, 0))
        info = tarfile.TarInfo(key + ".png")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(SourceError) as e:
        index_source(str(path))
    msg = one_line_message(e)
    assert "no .cls label" in msg and len(msg) < 500 and "\x1b" not in msg


# ---- 6: every decode failure is a value ---------------------------------------------------------------
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def decompression_bomb(side: int = 20000) -> bytes:
    """A valid PNG header for side x side pixels (1-bit gray) and a small IDAT: Pillow refuses to open
    it (DecompressionBombError, which is no OSError) long before decoding."""
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (side // 8 + 1) * 64, 9)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", rows) + _png_chunk(b"IEND", b"")


def test_a_decompression_bomb_decodes_to_undecodable():
    got = decode_image(decompression_bomb())
    assert isinstance(got, Undecodable) and got.reason == "DecompressionBombError"
    assert isinstance(decode_image(b""), Undecodable)
    assert decode_image(encode(make_image(0, 0))).size == (40, 32)


def _wds_with_bomb(root, n=8):
    samples = [(f"s{i}", encode(make_image(i % 3, i)), "png", i % 3) for i in range(n)]
    samples[0] = ("s0", decompression_bomb(), "png", 0)
    write_wds_shards(samples, str(root), per_shard=n, class_names=list(CLASSES))
    return str(root)


def test_a_bomb_in_a_probe_slot_is_skipped_not_raised(tmp_path):
    from pipeline.probes import drifted_probes, probe_hashes
    from pipeline.recipes import create_recipe
    from pipeline.views import ViewRenderer

    m = index_source(_wds_with_bomb(tmp_path / "wds"))
    renderer = ViewRenderer(create_recipe("deit", ["input_size=32", "repeats=1"]))
    hashes = probe_hashes(renderer, m, 0, views=1, count=8)  # every slot of shard 0 is tried
    order = renderer.plan(0, 0, 0, 8)
    bomb_slots = {f"0/0/{sv.slot}" for sv in order if 0 in (sv.position, sv.partner_position)}
    assert bomb_slots and not bomb_slots & set(hashes) and len(hashes) == 8 - len(bomb_slots)
    assert drifted_probes(dict.fromkeys(bomb_slots, "0" * 64), renderer, m, 0) == sorted(bomb_slots)


def test_precompute_finishes_with_a_bomb_in_a_probe_slot(tmp_path, tiny_teacher):
    src = _wds_with_bomb(tmp_path / "wds")
    store = tmp_path / "store"
    res = invoke("precompute", "--data", src, "--out", store, *PRECOMPUTE, "--teacher-weights", tiny_teacher)
    assert res.exit_code == 0 and res.exception is None, (res.exception, res.output)
    from storage import INVALID, open_store

    reader = open_store(store)
    assert all(reader.is_complete(s, b) for s in range(reader.spec.num_shards) for b in range(2))
    assert (reader.read(0, 0).valid == INVALID).any()  # the bomb's views flagged, as promised


FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF", "QOI", "DDS", "JPEG2000", "ICO", "TGA", "PPM")


def _encoded(fmt: str) -> bytes:
    buf = io.BytesIO()
    make_image(1, 3, (24, 20)).save(buf, format=fmt)
    return buf.getvalue()


ENCODED = {f: _encoded(f) for f in FORMATS}
mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.integers(0, 255)),
    st.tuples(st.just("set"), st.integers(0, 10**6), st.sampled_from([0, 0x7F, 0x80, 0xFF])),
)


def mutate(data: bytes, ops) -> bytes:
    b = bytearray(data)
    for op, at, v in ops:
        i = at % (len(b) + 1)
        if op == "truncate":
            del b[i:]
        elif op == "insert":
            b[i:i] = bytes([v]) * (1 + at % 7)
        elif b and i < len(b):
            b[i] = b[i] ^ v if op == "flip" else v
    return bytes(b)


@settings(derandomize=True, max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fmt=st.sampled_from(FORMATS), ops=st.lists(mutation, min_size=1, max_size=4))
def test_decoding_mutated_images_returns_an_image_or_undecodable(fmt, ops):
    got = decode_image(mutate(ENCODED[fmt], ops))  # never raises, whatever Pillow's plugin does
    assert isinstance(got, Undecodable) or (isinstance(got, Image.Image) and got.mode == "RGB")


# ---- 7: the parquet row-group cache is bounded by bytes ------------------------------------------------
def test_parquet_row_groups_kept_are_bounded_by_bytes(tmp_path):
    from pipeline.sources.hf_parquet import ParquetRows

    names = []
    for f in range(4):  # single-row-group files, pyarrow's default
        names.append(f"train-{f:05d}.parquet")
        _parquet(str(tmp_path / names[-1]), [0, 1, 2, 0, 1, 2])
    one_group = pq.read_table(tmp_path / names[0], columns=["image"]).nbytes
    bounded = ParquetRows(str(tmp_path), names, cache_bytes=one_group * 3 // 2)
    free = ParquetRows(str(tmp_path), names, cache_bytes=1 << 40)
    for _ in range(2):
        for f in range(4):
            for row in (0, 5):
                assert bounded.image(f, row) == free.image(f, row)  # same bytes either way
                assert bounded.cached_bytes <= one_group * 3 // 2 and len(bounded._groups) == 1
    assert len(free._groups) == 4 and free.group_reads == 4 and bounded.group_reads == 8
    # a budget under one group still reads: the group being read is always kept
    tiny = ParquetRows(str(tmp_path), names, cache_bytes=1)
    assert tiny.image(2, 3) == free.image(2, 3) and len(tiny._groups) == 1


# ---- 8: a cut or foreign manifest.parquet ------------------------------------------------------------
@pytest.fixture(scope="module")
def manifest_bytes(tmp_path_factory):
    return index_source(write_wds(tmp_path_factory.mktemp("m") / "wds", n=12, per_shard=6), shards="shuffle",
                        shard_size=5).to_bytes()


def _rewrite(data: bytes, change) -> bytes:
    t = pq.read_table(io.BytesIO(data))
    t = change(t)
    sink = io.BytesIO()
    pq.write_table(t, sink)
    return sink.getvalue()


def _set(col, values):
    def change(t):
        i = t.schema.get_field_index(col)
        return t.set_column(i, t.schema.field(i), pa.array(values, t.schema.field(i).type))
    return change


BAD_MANIFESTS = {
    "cut": (lambda d: d[: len(d) // 2], "not a readable parquet file"),
    "empty": (lambda d: b"", "not a readable parquet file"),
    "foreign parquet": (lambda d: _rewrite(d, lambda t: t.replace_schema_metadata(None)), "no deit_lockstep metadata"),
    "no column": (lambda d: _rewrite(d, lambda t: t.drop_columns(["offset"])), "no column 'offset'"),
    "wrong dtype": (lambda d: _rewrite(d, lambda t: t.set_column(1, "label", t.column("label").cast(pa.int64()))),
                    "column 'label' is int64"),
    "label out of range": (lambda d: _rewrite(d, _set("label", [0] * 11 + [7])), "a label lies outside 0..2"),
    "shard out of range": (lambda d: _rewrite(d, _set("shard", [0] * 5 + [1] * 5 + [9] * 2)), "shard ids"),
    "negative offset": (lambda d: _rewrite(d, _set("offset", [-1] * 12)), "negative"),
    "file out of range": (lambda d: _rewrite(d, _set("file", [5] * 12)), "file ids"),
    "positions": (lambda d: _rewrite(d, _set("position", list(range(12)))), "positions"),
    "edited keys": (lambda d: _rewrite(d, _set("key", [f"x{i}" for i in range(12)])), "fingerprint"),
}


@pytest.mark.parametrize("case", sorted(BAD_MANIFESTS))
def test_a_damaged_manifest_is_one_line_naming_the_file(manifest_bytes, case):
    assert Manifest.from_bytes(manifest_bytes).num_samples == 12  # the undamaged one reads
    damage, fragment = BAD_MANIFESTS[case]
    with pytest.raises(ManifestError) as e:
        Manifest.from_bytes(damage(manifest_bytes), "STORE/manifest.parquet")
    msg = one_line_message(e)
    assert msg.startswith("STORE/manifest.parquet: ") and fragment in msg and "--overwrite" in msg


@pytest.fixture(scope="module")
def wds_store(tmp_path_factory, tiny_teacher):
    """A complete store made from 12 tar samples; tests copy it before they damage it."""
    root = tmp_path_factory.mktemp("made")
    src = write_wds(root / "wds", n=12, per_shard=6)
    res = invoke("precompute", "--data", src, "--out", root / "store", *PRECOMPUTE, "--teacher-weights", tiny_teacher)
    assert res.exit_code == 0, res.output
    return src, root / "store", tiny_teacher


def test_a_cut_manifest_is_one_line_in_inspect_verify_train_and_precompute(tmp_path, wds_store):
    import shutil

    src, made, teacher = wds_store
    store = tmp_path / "store"
    shutil.copytree(made, store)
    path = store / "manifest.parquet"
    path.write_bytes(path.read_bytes()[:100])
    for cmd in (("inspect", store), ("verify", store, "--data", src),
                ("train", "--data", src, "--labels", store, "--out", tmp_path / "run", "--epochs", 1),
                ("precompute", "--data", src, "--out", store, *PRECOMPUTE, "--teacher-weights", teacher)):
        one_line_error(invoke(*cmd), str(path), "damaged", "--overwrite")


def test_verify_reports_an_image_that_no_longer_decodes_instead_of_raising(wds_store, monkeypatch):
    src, store, _ = wds_store

    def no_plugin(*a, **kw):  # what Pillow's QOI/DDS/JPEG2000 plugins did on fuzzed bytes
        raise NotImplementedError("not supported")
    monkeypatch.setattr(Image, "open", no_plugin)
    res = invoke("verify", store, "--data", src, "--n", 4)
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert res.exit_code == 1 and "no longer decodes (NotImplementedError)" in res.output, res.output


# ---- 9: open_lockstep's arguments --------------------------------------------------------------------
@pytest.mark.parametrize("kw,fragment", [({"world": 0}, "world must be >= 1"),
                                         ({"workers": -1}, "workers must be >= 0"),
                                         ({"rank": 2, "world": 2}, "rank must lie in 0..1"),
                                         ({"rank": -1, "world": 2}, "rank must lie in 0..1"),
                                         ({"batch_size": 0}, "batch_size must be >= 1"),
                                         ({"rank": 0.5}, "rank must be an integer")])
def test_open_lockstep_checks_its_arguments_before_opening_anything(kw, fragment):
    from student.api import TrainError, open_lockstep

    args = {"batch_size": 2, **kw}
    with pytest.raises(TrainError) as e:
        open_lockstep("/nonexistent/source", None, **args)  # refused before the source is looked at
    assert fragment in one_line_message(e)


def test_open_lockstep_with_good_arguments_still_opens(tmp_path):
    from student.api import open_lockstep

    ls = open_lockstep(write_wds(tmp_path / "wds", n=8, per_shard=8), None, batch_size=2, rank=np.int64(1), world=2,
                       input_size=32)
    assert ls.num_classes == 3 and ls.steps_per_epoch == 2
