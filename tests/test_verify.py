"""cli.py verify: PASS on a good store, FAIL naming the unit on a flipped byte or a wrong label; both backends."""

import json
import os
import shutil

import numpy as np
import pytest
import timm
import torch
from click.testing import CliRunner
from conftest import write_wds
from test_inspect import BACKENDS, make_stores

from cli import main
from storage import create_store, open_store


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    return make_stores(tmp_path_factory.mktemp("verify"))


def verify(*args):
    return CliRunner().invoke(main, ["verify", *[str(a) for a in args]])


def flip_byte(path: str) -> None:
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x40
    open(path, "wb").write(bytes(data))


def chunk_file(store: str, backend: str, shard: int, block: int) -> str:
    """The bytes of one unit: its zarr values chunk (named in the marker), or its tar."""
    name = f"{shard:06d}_{block:04d}"
    if backend == "wds":
        return os.path.join(store, "units", f"{name}.tar")
    record = json.load(open(os.path.join(store, "units", f"{name}.json")))
    return os.path.join(store, record["chunks"]["values"]["key"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_good_store_passes(stores, backend):
    res = verify(stores[backend], "--data", stores["data"], "--n", 24, "--full")
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[-1] == "PASS"
    assert "probes      8/8 re-render identically" in res.output
    assert "recompute   24 views: top-1 agreement 24/24" in res.output
    assert "chunks      all complete units intact" in res.output


@pytest.mark.parametrize("backend", BACKENDS)
def test_flipped_byte_fails_naming_the_unit(stores, backend, tmp_path):
    store = str(tmp_path / "damaged")
    shutil.copytree(stores[backend], store)
    flip_byte(chunk_file(store, backend, 1, 1))
    res = verify(store, "--data", stores["data"], "--n", 0, "--full")
    assert res.exit_code == 1, res.output
    last = res.output.splitlines()[-1]
    assert last.startswith("FAIL: bad units: 000001_0001 (shard=1, view_block=1)") and last.count("shard=") == 1
    assert "unit (shard=1, view_block=1):" in res.output


@pytest.mark.parametrize("backend", BACKENDS)
def test_wrong_stored_label_fails_on_recompute(stores, backend, tmp_path):
    store = str(tmp_path / "tampered")
    shutil.copytree(stores[backend], store)
    reader = open_store(store)
    lab = [reader.read(v, 2) for v in (2, 3)]  # unit (shard=2, view_block=1): 2 views x 4 slots
    ids = np.stack([x.ids for x in lab]).copy()
    values = np.stack([x.values for x in lab]).copy()
    values[1, 0, 1] = values[1, 0, 0]  # one view's second class now as likely as its first
    writer = create_store(store, reader.spec, backend=backend)  # checksums stay consistent: only recompute sees it
    writer.write_unit(2, 1, values=values, ids=ids, valid=np.stack([x.valid for x in lab]))
    res = verify(store, "--data", stores["data"], "--n", 80, "--full")
    assert res.exit_code == 1, res.output
    assert "bad unit (shard=2, view_block=1): view 3 shard 2 slot 0" in res.output
    assert res.output.splitlines()[-1] == "FAIL: bad units: 000002_0001 (shard=2, view_block=1)"


def test_probe_drift_fails(stores, tmp_path):
    store = str(tmp_path / "drifted")
    shutil.copytree(stores["zarr"], store)
    probes_path = os.path.join(store, "meta", "probes.json")
    probes = json.load(open(probes_path))
    probes["0/0/1"] = "0" * 64
    json.dump(probes, open(probes_path, "w"))
    res = verify(store, "--data", stores["data"], "--n", 4)
    assert res.exit_code == 1 and "DRIFT in 0/0/1" in res.output
    assert res.output.splitlines()[-1] == "FAIL: probe drift"


def test_foreign_source_and_other_teacher_are_one_line_errors(stores, tmp_path):
    other = write_wds(tmp_path / "other", n=12, per_shard=8)
    res = verify(stores["zarr"], "--data", other)
    assert res.exit_code == 2 and "not the source this store was made from" in res.output
    assert res.output.count("\n") == 1
    torch.manual_seed(1)
    path = str(tmp_path / "other.pth")
    torch.save(timm.create_model("resnet10t", num_classes=3).state_dict(), path)
    res = verify(stores["zarr"], "--data", stores["data"], "--teacher-weights", path)
    assert res.exit_code == 2 and "is not the store's teacher" in res.output and "--teacher-weights" in res.output
    assert res.output.count("\n") == 1


@pytest.mark.parametrize("flags, fragment", [
    (["--device", "bogus"], "'bogus' is not a device"),
    (["--batch-size", "0"], "--batch-size"),
    (["--n", "-1"], "--n"),
    (["--atol", "nan"], "--atol must be a finite number"),
    (["--seed", "-1"], "--seed"),
])
def test_bad_options_are_one_line(stores, flags, fragment):
    from cli_support import one_line_error

    one_line_error(verify(stores["zarr"], "--data", stores["data"], *flags), fragment)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cuda_without_a_gpu_is_one_line(stores):
    from cli_support import one_line_error

    one_line_error(verify(stores["zarr"], "--data", stores["data"], "--device", "cuda"), "no CUDA GPU is visible")


def _store_with_weights(root, weights: str, data: str) -> str:
    """A tiny store whose teacher came from `weights` (as given: relative paths stay relative)."""
    from pipeline.stage1.precompute import PrecomputeConfig, run_precompute

    out = str(root / "store")
    run_precompute(PrecomputeConfig(
        data=data, out=out, teacher="resnet10t", teacher_weights=weights, model_kwargs={"num_classes": 3},
        views=2, views_per_unit=2, topk=3, input_size=32, batch_size=16, workers=0,
        overrides=["repeats=1"], progress=False))
    return out


def test_verify_without_teacher_weights_uses_the_recorded_file(tmp_path, monkeypatch):
    """precompute ran with a relative --teacher-weights in one directory; verify, from another one and
    without --teacher-weights, rebuilds that very teacher (the recorded path, its sha256 checked) and
    passes, instead of rebuilding a teacher with random weights."""
    data = write_wds(tmp_path / "wds", n=12, per_shard=6)
    work = tmp_path / "work"
    work.mkdir()
    torch.manual_seed(2)
    torch.save(timm.create_model("resnet10t", num_classes=3).state_dict(), work / "teacher.pth")
    monkeypatch.chdir(work)
    store = _store_with_weights(tmp_path, "teacher.pth", data)
    monkeypatch.chdir(tmp_path)
    res = verify(store, "--data", data, "--n", 8)
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[-1] == "PASS"
    assert "recompute   8 views: top-1 agreement 8/8" in res.output


def test_verify_without_teacher_weights_names_a_missing_or_changed_file(tmp_path):
    from cli_support import one_line_error

    data = write_wds(tmp_path / "wds", n=12, per_shard=6)
    weights = str(tmp_path / "teacher.pth")
    torch.manual_seed(3)
    torch.save(timm.create_model("resnet10t", num_classes=3).state_dict(), weights)
    store = _store_with_weights(tmp_path, weights, data)
    torch.manual_seed(4)
    torch.save(timm.create_model("resnet10t", num_classes=3).state_dict(), weights)  # other bytes, same path
    one_line_error(verify(store, "--data", data, "--n", 4), weights, "has changed since precompute",
                   "--teacher-weights")
    os.remove(weights)
    one_line_error(verify(store, "--data", data, "--n", 4), weights, "is not there any more", "--teacher-weights")
