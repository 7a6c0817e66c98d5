"""cli.py inspect: summary (text and JSON), one sample, contact sheet, parquet export; both backends."""

import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import timm
import torch
from click.testing import CliRunner
from conftest import write_wds
from PIL import Image

from cli import main
from pipeline.recipes import Recipe
from pipeline.stage1.precompute import PrecomputeConfig, run_precompute
from pipeline.tools.lookup import dominant_targets, stored_manifest
from pipeline.tools.summary import summarize
from pipeline.views import ViewRenderer, slot_order
from storage import BACKENDS as _REGISTRY
from storage import INVALID, WRITTEN, StoreSpec, create_store, open_store

BACKENDS = tuple(_REGISTRY)


def make_stores(root) -> dict:
    """A tiny wds source (20 samples, 3 shards), a saved random teacher, and a store per backend
    (4 views in blocks of 2: 6 units, 80 views, deit recipe at 32 px without repeated augmentation,
    so every view holds every sample once; top-3)."""
    data = write_wds(root / "wds", n=20, per_shard=8)
    torch.manual_seed(0)
    weights = str(root / "teacher.pth")
    torch.save(timm.create_model("resnet10t", num_classes=3).state_dict(), weights)
    stores = {}
    for backend in BACKENDS:
        out = str(root / f"store_{backend}")
        run_precompute(PrecomputeConfig(
            data=data, out=out, teacher="resnet10t", teacher_weights=weights, model_kwargs={"num_classes": 3},
            views=4, views_per_unit=2, topk=3, input_size=32, batch_size=16, workers=0, backend=backend,
            overrides=["repeats=1"], progress=False))
        stores[backend] = out
    return {"data": data, "weights": weights, **stores}


@pytest.fixture(scope="session")
def stores(tmp_path_factory):
    return make_stores(tmp_path_factory.mktemp("inspect"))


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def remove_unit(store: str, shard: int, block: int) -> None:
    units = os.path.join(store, "units")
    (name,) = [f for f in os.listdir(units) if f.startswith(f"{shard:06d}_{block:04d}.")]
    os.remove(os.path.join(units, name))


@pytest.mark.parametrize("backend", BACKENDS)
def test_summary_text_and_json(stores, backend):
    res = run_cli("inspect", stores[backend])
    assert res.exit_code == 0, res.output
    for want in (f"({backend})", "top-3 log-probabilities, 3 classes", "80 views = 4 views x 20 samples in 3 shards",
                 "6/6 units (complete)", "complete views: 0-3", "0 views", "agreement", "teacher     resnet10t",
                 "rand-m9-mstd0.5-inc1", "timm 1.0.31"):
        assert want in res.output, (want, res.output)
    d = json.loads(run_cli("inspect", stores[backend], "--json").output)
    assert (d["backend"], d["units_complete"], d["units_total"]) == (backend, 6, 6)
    assert d["stored_views"] == d["written_views"] == 80 and d["invalid_views"] == 0
    assert d["missing_units"] == [] and d["complete_views"] == [0, 1, 2, 3]
    assert d["sample_views"] == 80 == d["unmixed"]["views"] + d["mixed"]["views"]
    assert 0 < d["mean_top1_prob"] <= 1 and 0 <= d["mean_tail_mass"] < 0.01
    assert d["nbytes"] == open_store(stores[backend]).nbytes() and d["bytes_per_view"] == d["nbytes"] / 80
    assert d["teacher"]["model_kwargs"] == {"num_classes": 3}
    # labels i % 3 in shards of 8, 8, 4: every shard holds all 3 classes; random shards of those sizes
    # would hold 3 (1 - (2/3)^n) on average (2.88, 2.88, 2.41 with these class frequencies, about)
    assert "shards      layout as-is; distinct classes per shard mean 3.0 (min 3)" in res.output, res.output
    assert d["shard_layout"] == "as-is" and d["classes_per_shard"] == 3.0
    assert (d["source_kind"], d["source_files"]) == ("wds", 3)  # its 3 tars, used as they are
    assert abs(d["classes_per_shard_random"] - (2 * 3 * (1 - (2 / 3) ** 8) + 3 * (1 - (2 / 3) ** 4)) / 3) < 0.02


@pytest.mark.parametrize("backend", BACKENDS)
def test_summary_names_missing_units(stores, backend, tmp_path):
    store = str(tmp_path / "partial")
    shutil.copytree(stores[backend], store)
    remove_unit(store, 1, 0)
    res = run_cli("inspect", store)
    assert "5/6 units (INCOMPLETE)" in res.output and "complete views: 2-3" in res.output
    assert "missing     units (shard,view_block): (1,0)" in res.output
    d = json.loads(run_cli("inspect", store, "--json").output)
    assert d["missing_units"] == [[1, 0]] and d["stored_views"] == 80 - 2 * 8 == d["written_views"]


def _synthetic_store(tmp_path, backend, stores):
    """A store over the real source whose labels we choose: top-1 = each slot's dominant ground truth,
    except every third slot of view 1, which is flagged invalid."""
    reader = open_store(stores["zarr"])
    spec = StoreSpec.from_json({**reader.spec.to_json(), "views": 2, "views_per_unit": 1})
    out = tmp_path / f"synthetic_{backend}"
    writer = create_store(out, spec, backend=backend, manifest=reader.manifest_bytes)
    manifest = stored_manifest(reader)
    renderer = ViewRenderer(Recipe.from_dict(spec.recipe))
    invalid = 0
    for shard, n in enumerate(spec.shard_sizes):
        for view in range(2):
            target, _ = dominant_targets(manifest.labels(shard), renderer.plan(spec.seed, view, shard, n))
            ids = np.stack([target, (target + 1) % 3, (target + 2) % 3], axis=1)[None]
            values = np.log(np.array([[0.7, 0.2, 0.05]] * n, np.float32)).astype(np.float16)[None]
            valid = np.full((1, n), WRITTEN, np.uint8)
            if view == 1:
                valid[0, ::3] = INVALID
                invalid += len(valid[0, ::3])
            writer.write_unit(shard, view, values=values, ids=ids, valid=valid)
    return str(out), invalid


@pytest.mark.parametrize("backend", BACKENDS)
def test_summary_counts_invalid_and_agreement_exactly(stores, backend, tmp_path):
    store, invalid = _synthetic_store(tmp_path, backend, stores)
    s = summarize(open_store(store))
    assert s.invalid_views == invalid and s.written_views == 40 - invalid
    assert s.sample_views == 40 - invalid
    for a in (s.unmixed, s.mixed):
        assert a.views == 0 or (a.top1 == 1.0 and a.top5 is None)  # top-5 needs k >= 5
    assert s.mean_top1_prob == pytest.approx(0.7, abs=1e-3)
    assert s.mean_tail_mass == pytest.approx(0.05, abs=2e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_export_rows_equal_the_reader(stores, backend, tmp_path):
    out = tmp_path / "views.parquet"
    res = run_cli("inspect", stores[backend], "--export", out)
    assert res.exit_code == 0 and "80 rows" in res.output
    table = pq.read_table(out).to_pylist()
    assert len(table) == 80
    reader = open_store(stores[backend])
    manifest = stored_manifest(reader)
    by_key = {(r["view"], r["shard"], r["slot"]): r for r in table}
    for view in range(4):
        for shard, n in enumerate(reader.spec.shard_sizes):
            lab = reader.read(view, shard)
            order = slot_order(reader.spec.seed, view, shard, n, reader.spec.recipe["repeats"])
            keys, labels = manifest.keys(shard), manifest.labels(shard)
            for slot in range(n):
                row = by_key[(view, shard, slot)]
                assert row["key"] == keys[order[slot]] and row["gt"] == labels[order[slot]]
                assert row["top1"] == lab.ids[slot, 0] and row["valid"] == lab.valid[slot]
                p = np.exp(lab.values[slot].astype(np.float32))
                assert row["top1_prob"] == pytest.approx(p[0], rel=1e-6)
                assert row["tail_mass"] == pytest.approx(max(0.0, 1 - p.sum()), abs=1e-6)
                # the whole stored label, not only its top-1
                assert row["topk_ids"] == lab.ids[slot].tolist() and len(row["topk_ids"]) == 3
                assert np.float32(row["topk_probs"]).tobytes() == p.tobytes()
                partner = slot ^ 1
                if partner < n and row["mix"] != "none":
                    assert row["partner_key"] == keys[order[partner]] and 0 <= row["lam"] <= 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_sample_shows_params_and_labels(stores, backend):
    reader = open_store(stores[backend])
    renderer = ViewRenderer(Recipe.from_dict(reader.spec.recipe))
    shown = [v for v in range(4) if 1 in renderer.slot_order(reader.spec.seed, v, 1, 8)]
    v1, v2 = shown[:2]
    res = run_cli("inspect", stores[backend], "--sample", "s00009", "--view", v1, "--view", v2,
                  "--data", stores["data"])
    assert res.exit_code == 0, res.output
    out = res.output
    assert out.startswith("sample s00009 (shard 1, position 1), ground truth: circle, image 40x32")
    assert f"view {v1} (slot" in out and f"view {v2} (slot" in out
    assert not any(f"view {v} (slot" in out for v in range(4) if v not in (v1, v2))
    repeats = sum(int(np.sum(renderer.slot_order(reader.spec.seed, v, 1, 8) == 1)) for v in (v1, v2))
    assert out.count("  crop     top=") == repeats and "flip=" in out
    assert "magnitude=" in out and "sign=" in out  # RandAugment ops (deit recipe: two per view)
    assert "  erase    " in out and "lambda=" in out and "  teacher  " in out
    # the sample by index, and from the root the store recorded (no --data)
    assert run_cli("inspect", stores[backend], "--sample", "9", "--view", v1).output.splitlines()[:6] == \
        out.splitlines()[:6]


def test_sample_params_equal_the_view_contract(stores):
    reader = open_store(stores["zarr"])
    from pipeline.tools.sample import describe_sample

    rep = describe_sample(reader, "s00012", views=(2,))
    v = rep.views[0]
    renderer = ViewRenderer(Recipe.from_dict(reader.spec.recipe))
    assert v.params == renderer.slot_params(reader.spec.seed, 2, rep.shard, v.slot, (40, 32))
    assert renderer.slot_order(reader.spec.seed, 2, rep.shard, 8)[v.slot] == rep.position
    lab = reader.read_slot(2, rep.shard, v.slot)
    assert [p for _, p in v.top] == pytest.approx(np.exp(lab.values[0].astype(np.float32)).tolist())


def test_sample_errors_are_one_line(stores, tmp_path):
    res = CliRunner().invoke(main, ["inspect", stores["zarr"], "--sample", "nope"])
    assert res.exit_code == 2 and "no sample 'nope'" in res.output and res.output.count("\n") == 1
    other = write_wds(tmp_path / "other", n=10, per_shard=8)
    res = CliRunner().invoke(main, ["inspect", stores["zarr"], "--sample", "1", "--data", other])
    assert res.exit_code == 2 and "not the source this store was made from" in res.output


@pytest.mark.parametrize("backend", BACKENDS)
def test_render_contact_sheets(stores, backend, tmp_path):
    out = tmp_path / "sheet.png"
    res = run_cli("inspect", stores[backend], "--render", out, "--data", stores["data"], "--count", 4)
    assert res.exit_code == 0, res.output
    img = Image.open(out)
    # 4 tiles of 32 px enlarged x5 to 160, 2 x 2, each cell 160 + 2*4 wide and 160 + 6*13 + 2*4 high
    assert img.size == (2 * 168, 2 * 246)
    px = np.asarray(img.convert("RGB"))
    assert px[4:164, 4:164].std() > 10  # a real view, not a blank tile
    res = run_cli("inspect", stores[backend], "--render", out, "--sample", "s00003", "--data", stores["data"])
    assert "4 views" in res.output  # one sample across all 4 views


def test_sample_under_repeated_augmentation_lists_every_repeat(tmp_path, tiny_teacher):
    data = write_wds(tmp_path / "wds", n=12, per_shard=12)
    out = str(tmp_path / "store")
    run_precompute(PrecomputeConfig(
        data=data, out=out, teacher="resnet10t", teacher_weights=tiny_teacher, model_kwargs={"num_classes": 3},
        views=3, views_per_unit=3, topk=3, input_size=32, batch_size=16, workers=0, progress=False))
    reader = open_store(out)
    renderer = ViewRenderer(Recipe.from_dict(reader.spec.recipe))
    assert renderer.recipe.repeats == 3
    from pipeline.tools.lookup import InspectError
    from pipeline.tools.sample import describe_sample

    for key_index in range(12):
        counts = [int(np.sum(renderer.slot_order(0, v, 0, 12) == key_index)) for v in range(3)]
        if 0 in counts and sum(counts):
            break
    rep = describe_sample(reader, str(key_index), views=(0, 1, 2))
    assert len(rep.views) == sum(counts) and all(c in (0, 3) for c in counts)
    assert len({(v.view, v.slot) for v in rep.views}) == len(rep.views)
    absent = counts.index(0)
    with pytest.raises(InspectError, match="repeated augmentation"):
        describe_sample(reader, str(key_index), views=(absent,))


def test_export_carries_whole_labels_nulls_on_invalid_views_and_hard_stores(stores, tmp_path):
    store, invalid = _synthetic_store(tmp_path, "zarr", stores)
    out = tmp_path / "synthetic.parquet"
    assert run_cli("inspect", store, "--export", out).exit_code == 0
    rows = pq.read_table(out).to_pylist()
    bad = [r for r in rows if r["valid"] != WRITTEN]
    assert len(bad) == invalid > 0 and all(r["topk_ids"] is None and r["topk_probs"] is None for r in bad)
    for r in rows:
        if r["valid"] == WRITTEN:
            t = r["top1"]
            assert r["topk_ids"] == [t, (t + 1) % 3, (t + 2) % 3]
            want = np.exp(np.log(np.float32([0.7, 0.2, 0.05])).astype(np.float16).astype(np.float32))
            assert np.float32(r["topk_probs"]).tobytes() == want.tobytes()
    # A hard store: the argmax as a one-element list, no probabilities.
    hard = str(tmp_path / "hard")
    run_precompute(PrecomputeConfig(
        data=stores["data"], out=hard, teacher="resnet10t", teacher_weights=stores["weights"],
        model_kwargs={"num_classes": 3}, views=1, views_per_unit=1, hard=True, input_size=32, batch_size=16,
        workers=0, overrides=["repeats=1"], progress=False))
    assert run_cli("inspect", hard, "--export", tmp_path / "hard.parquet").exit_code == 0
    rows = pq.read_table(tmp_path / "hard.parquet").to_pylist()
    assert len(rows) == 20 and all(r["topk_ids"] == [r["top1"]] and r["topk_probs"] is None for r in rows)


# ---- messages that fit the case -------------------------------------------------------------------
@pytest.fixture(scope="module")
def flagged_store(tmp_path_factory):
    """8 samples in one shard, s003 a zero-byte image: precompute flags its views (and its partners') invalid."""
    from conftest import encode, make_image

    from pipeline.sources import write_wds_shards

    root = tmp_path_factory.mktemp("flagged")
    samples = [(f"s{i:03d}", encode(make_image(i % 3, i)), "png", i % 3) for i in range(8)]
    samples[3] = ("s003", b"", "png", 0)
    write_wds_shards(samples, str(root / "bad"), per_shard=8)
    torch.manual_seed(0)
    weights = str(root / "teacher.pth")
    torch.save(timm.create_model("resnet10t", num_classes=3).state_dict(), weights)
    run_precompute(PrecomputeConfig(
        data=str(root / "bad"), out=str(root / "store"), teacher="resnet10t", teacher_weights=weights,
        model_kwargs={"num_classes": 3}, views=2, views_per_unit=2, topk=3, input_size=32, batch_size=16,
        workers=0, overrides=["repeats=1"], progress=False))
    return {"data": str(root / "bad"), "store": str(root / "store")}


def test_a_flagged_image_is_named_as_such_not_a_missing_data(flagged_store, tmp_path):
    from cli_support import invoke, one_line_error

    store, data = flagged_store["store"], flagged_store["data"]
    for extra in ([], ["--data", data]):
        line = one_line_error(invoke("inspect", store, "--sample", "s003", *extra), "s003", "undecodable",
                              "as it was at precompute")
        assert "pass --data" not in line
    # the contact sheet shows the flagged views as grey INVALID tiles instead of failing
    res = invoke("inspect", store, "--render", tmp_path / "sheet.png", "--data", data, "--count", "8")
    assert res.exit_code == 0, res.output
    assert Image.open(tmp_path / "sheet.png").size[0] > 0


def test_a_file_damaged_after_precompute_says_so_when_data_is_passed(flagged_store, tmp_path):
    from cli_support import invoke, one_line_error

    data = tmp_path / "data"
    shutil.copytree(flagged_store["data"], data)
    shard = data / "shard-000000.tar"
    blob = bytearray(shard.read_bytes())
    start = blob.index(b"\x89PNG", blob.index(b"s005.png"))  # the PNG of s005, a decodable image
    blob[start:start + 64] = bytes(64)
    shard.write_bytes(bytes(blob))
    # The manifest's crc32c catches the edit before decoding: "source changed", not store damage.
    line = one_line_error(invoke("inspect", flagged_store["store"], "--sample", "s005", "--data", data),
                          "s005", "changed since it was indexed", "the label store is not damaged",
                          "restore the original file")
    assert "pass --data" not in line


def test_render_to_an_unknown_extension_and_export_into_a_directory_are_one_line(stores, tmp_path):
    from cli_support import invoke, one_line_error

    one_line_error(invoke("inspect", stores["zarr"], "--render", tmp_path / "x.xyz"), "'.xyz'", ".png")
    assert not (tmp_path / "x.xyz").exists()
    line = one_line_error(invoke("inspect", stores["zarr"], "--export", tmp_path), "is a directory")
    assert "resume" not in line
    one_line_error(invoke("inspect", stores["zarr"], "--count", "0", "--render", tmp_path / "y.png"), "--count")
