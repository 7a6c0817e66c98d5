"""Fault injection: each reliability promise of docs/DESIGN.md, attacked (issue 8).

1. precompute SIGKILLed at 20 moments, resumed: the store equals an uninterrupted run's, byte for byte
2. train SIGKILLed mid-epoch and mid-checkpoint, resumed: the uninterrupted run's weights, byte for byte
3. two fleets on one store: same settings -> one valid store; other settings -> refused, nothing written
4. corrupt input data: flagged and counted (inspect shows the counts), or one line naming the key
5. corrupt store: verify --full names the unit, train refuses in one line, precompute repairs it
6. wrong inputs: one line naming the cause, exit 2 (usage) or 1 (runtime), no traceback, nothing written
7. a training run with 3 workers beside a fleet still writing later views reads only complete units

Other tests already cover neighbours of these (test_precompute: 2-process fleet, one SIGKILL,
zero-byte and truncated JPEG flags, --views 0 / --topk > classes; test_storage: a writer killed
mid-unit, concurrent create, check(); test_train: one SIGKILL at the first checkpoint, refusals of
foreign sources, recipe, seed and probes). These go further, and compare bytes.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time

import pytest
import torch
from click.testing import CliRunner
from conftest import encode, make_image, write_wds
from test_storage_support import snapshot

from cli import main
from pipeline.sources import write_wds_shards
from pipeline.stage1.precompute import PrecomputeConfig, run_precompute
from storage import open_store
from student.train import TrainConfig, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUPPORT = os.path.join(ROOT, "tests", "faults_support.py")
TINY = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2}
STUDENT = "deit_tiny_distilled_patch16_224"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT}


# ---- helpers -------------------------------------------------------------------------------
def pconfig(data, out, teacher, **kw) -> dict:
    base = dict(data=str(data), out=str(out), teacher="resnet10t", teacher_weights=teacher, views=2,
                views_per_unit=1, topk=3, input_size=32, batch_size=8, workers=0,
                model_kwargs={"num_classes": 3}, progress=False)
    return {**base, **kw}


def precompute(data, out, teacher, **kw):
    return run_precompute(PrecomputeConfig(**pconfig(data, out, teacher, **kw)))


def pflags(cfg: dict) -> list[str]:
    """The CLI flags of a pconfig dict."""
    out = []
    for k, v in cfg.items():
        if k == "progress":
            continue
        flag = "--" + k.replace("_", "-")
        if k == "model_kwargs":
            out += [flag, json.dumps(v)]
        elif isinstance(v, bool):
            out += [flag] if v else []
        elif isinstance(v, list):
            for x in v:
                out += ["--set" if k == "overrides" else flag, str(x)]
        elif v is not None:
            out += [flag, str(v)]
    return out


def tconfig(data, labels, out, **kw) -> TrainConfig:
    base = dict(data=str(data), labels=str(labels), out=str(out), model=STUDENT, model_kwargs=TINY,
                distillation="soft", epochs=3, batch_size=8, workers=0, warmup_epochs=1, progress=False)
    return TrainConfig(**{**base, **kw})


def tflags(cfg: TrainConfig) -> list[str]:
    return ["--data", cfg.data, "--labels", cfg.labels, "--out", cfg.out, "--model", cfg.model,
            "--model-kwargs", json.dumps(cfg.model_kwargs), "--distillation", cfg.distillation,
            "--epochs", str(cfg.epochs), "--batch-size", str(cfg.batch_size), "--workers", str(cfg.workers),
            "--warmup-epochs", str(cfg.warmup_epochs)]


def store_files(path) -> dict[str, bytes]:
    """Every file a reader trusts (unit markers/tars and zarr chunks), by relative path, as bytes.
    Temporaries a killed writer left behind (.partial, dot files) are not part of the store."""
    out = {}
    for sub in ("units", "labels.zarr"):
        for root, _, files in os.walk(os.path.join(path, sub)):
            for f in files:
                if f.startswith(".") or f.endswith(".partial"):
                    continue
                p = os.path.join(root, f)
                out[os.path.relpath(p, path)] = open(p, "rb").read()
    return out


def labels_bytes(path) -> dict:
    r = open_store(path)
    out = {}
    for shard, block in r.completed_units():
        for view in r.spec.block_views(block):
            lab = r.read(view, shard)
            out[view, shard] = (None if lab.values is None else lab.values.tobytes(), lab.ids.tobytes(),
                                lab.valid.tobytes())
    return out


def assert_same_store(path, ref):
    r = open_store(path)
    assert r.completed_units() == open_store(ref).completed_units() == r.spec.units()
    assert r.check(full=True) == []
    assert labels_bytes(path) == labels_bytes(ref), "value for value"
    assert store_files(path) == store_files(ref), "byte for byte, markers included"


def weights_bytes(run) -> dict:
    ckpt = torch.load(os.path.join(run, "checkpoint.pth"), map_location="cpu", weights_only=True)
    return {"epoch": ckpt["epoch"], "step": ckpt["step"],
            **{f"model.{k}": v.numpy().tobytes() for k, v in ckpt["model"].items()},
            **{f"ema.{k}": v.numpy().tobytes() for k, v in (ckpt["state_dict_ema"] or {}).items()}}


def invoke(*args):
    """The CLI in this process (fast); returns (exit code, stderr lines, the exception if not SystemExit)."""
    res = CliRunner().invoke(main, [str(a) for a in args])
    crashed = None if res.exception is None or isinstance(res.exception, SystemExit) else res.exception
    return res.exit_code, res.stderr.strip().splitlines(), crashed, res


def one_line_error(code, lines, crashed, expect_code, *fragments):
    assert crashed is None, f"uncaught {type(crashed).__name__}: {crashed}"
    assert code == expect_code, lines
    text = "\n".join(lines)
    # a progress bar may precede the error on the terminal (tqdm ends its line with \r): the error
    # itself is one line, the last, and the only one
    assert text.count("error: ") == 1 and "Traceback" not in text, lines
    error = text[text.index("error: "):]
    assert "\n" not in error, lines
    for f in fragments:
        assert f in error, (f, error)


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_teacher):
    """24 samples in 3 wds shards and a complete 2-view top-3 store (6 units) made from them."""
    root = tmp_path_factory.mktemp("faults")
    data = write_wds(root / "wds", n=24, per_shard=8)
    store = str(root / "store")
    precompute(data, store, tiny_teacher)
    return {"root": root, "data": data, "store": store, "teacher": tiny_teacher}


# ---- 1. precompute: SIGKILL at 20 moments -------------------------------------------------------
@pytest.mark.slow
def test_precompute_killed_at_20_moments_resumes_to_the_uninterrupted_store(base, tmp_path):
    """20 SIGKILLs of a precompute worker, 10 at named moments (decode, teacher forward, a chunk in its
    temporary, between chunks, between data and marker) and 10 at random times; each attempt resumes
    the last one's store. The final store equals an uninterrupted run's: labels, chunk files, markers."""
    cfg = pconfig(base["data"], tmp_path / "killed", base["teacher"], views=8)
    ref = tmp_path / "ref"
    precompute(base["data"], ref, base["teacher"], views=8)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    p = subprocess.run([sys.executable, SUPPORT, "kill-precompute", str(tmp_path / "cfg.json"), "20", "8"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    attempts = json.loads(p.stdout.strip().splitlines()[-1])
    assert len(attempts) == 20
    killed = [a for a in attempts if a[3] == "killed"]
    assert len(killed) >= 18, attempts  # a kill that lands after the last unit is allowed, twice
    assert {a[0] for a in killed} >= {"decode", "forward", "chunk-tmp", "chunk-fsync", "marker", "random"}
    done = [a[4] for a in attempts]
    assert done == sorted(done) and done[-1] < 24, f"no unit lost, the kills spread over the run: {done}"
    summary = precompute(base["data"], cfg["out"], base["teacher"], views=8)
    assert summary.units_skipped == done[-1] and summary.units_done == 24 - done[-1], "none written twice"
    assert_same_store(cfg["out"], ref)


# ---- 2. train: SIGKILL mid-epoch and mid-checkpoint ------------------------------------------
@pytest.mark.slow
def test_train_killed_mid_epoch_and_mid_checkpoint_resumes_to_the_same_weights(base, tmp_path):
    """Kills: during epoch 1's second step; while epoch 1's checkpoint is half written (a torn
    temporary); after epoch 2's checkpoint is written but before it replaces epoch 1's. Each
    resume starts from the last whole checkpoint and the end is the uninterrupted run, bytes."""
    straight = tconfig(base["data"], base["store"], tmp_path / "straight", epochs=4)
    train(straight)
    cfg = tconfig(base["data"], base["store"], tmp_path / "killed", epochs=4)
    cfg_path = tmp_path / "train.json"
    cfg_path.write_text(json.dumps({**cfg.__dict__, "resume": True}))
    plan = [("step", 5), ("torn-checkpoint", 1), ("before-replace", 2), ("none", 0)]
    p = subprocess.run([sys.executable, SUPPORT, "kill-train", str(cfg_path), json.dumps(plan)], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    outcomes = json.loads(p.stdout.strip().splitlines()[-1])
    # (how, outcome, checkpoint epoch after the attempt)
    assert [o[1] for o in outcomes] == ["killed", "killed", "killed", "finished"], outcomes
    assert [o[2] for o in outcomes] == [1, 1, 2, 4], "each resume starts from the last whole checkpoint"
    assert weights_bytes(cfg.out) == weights_bytes(straight.out)


def test_a_torn_checkpoint_is_never_loaded(base, tmp_path):
    """A checkpoint.pth cut short (a copy gone wrong, a full disk under a non-atomic writer): --resume
    refuses in one line naming the file instead of loading it or printing torch's traceback."""
    cfg = tconfig(base["data"], base["store"], tmp_path / "run", epochs=2, stop_after_epochs=1,
                  max_steps_per_epoch=1)
    train(cfg)
    ckpt = os.path.join(cfg.out, "checkpoint.pth")
    data = open(ckpt, "rb").read()
    open(ckpt, "wb").write(data[: len(data) // 2])
    code, lines, crashed, _ = invoke("train", *tflags(cfg), "--resume", "--max-steps-per-epoch", "1")
    one_line_error(code, lines, crashed, 2, "checkpoint.pth")


# ---- 3. two fleets on one store ---------------------------------------------------------------
@pytest.mark.slow
def test_two_fleets_with_the_same_settings_make_one_valid_store(base, tmp_path):
    out = tmp_path / "shared"
    cfg = pconfig(base["data"], out, base["teacher"], views=2)
    ref = tmp_path / "ref"
    precompute(base["data"], ref, base["teacher"], views=2)
    cmd = [sys.executable, os.path.join(ROOT, "cli.py"), "precompute", *pflags(cfg)]
    fleets = [subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(2)]
    results = [f.communicate(timeout=300) for f in fleets]
    assert [f.returncode for f in fleets] == [0, 0], [r[1][-2000:] for r in results]
    assert_same_store(out, ref)


@pytest.mark.slow
def test_a_second_fleet_with_other_settings_refuses_before_writing(base, tmp_path):
    out = tmp_path / "shared"
    cfg = pconfig(base["data"], out, base["teacher"], views=4)
    ref = tmp_path / "ref"
    precompute(base["data"], ref, base["teacher"], views=4)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    first = subprocess.Popen([sys.executable, SUPPORT, "slow-precompute", str(tmp_path / "cfg.json"), "0.3"],
                             cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        units = out / "units"
        deadline = time.monotonic() + 120
        while (not units.is_dir() or not os.listdir(units)) and time.monotonic() < deadline:
            time.sleep(0.05)
        for flag, value, field in [("--seed", "1", "seed"), ("--topk", "2", "k"), ("--views", "2", "views")]:
            before = snapshot(out / "meta"), snapshot(out / "labels.zarr"), open(out / "store.json", "rb").read()
            code, lines, crashed, _ = invoke("precompute", *pflags(cfg), flag, value)
            one_line_error(code, lines, crashed, 2, f"made with {field}=")
            after = snapshot(out / "meta"), snapshot(out / "labels.zarr"), open(out / "store.json", "rb").read()
            assert all(set(a.items()) >= set(b.items()) if isinstance(a, dict) else a == b
                       for a, b in zip(after, before, strict=True)), "the refused fleet changed nothing"
        assert first.poll() is None, "the refusals came while the first fleet was writing"
    finally:
        stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-2000:]
    assert_same_store(out, ref)


# ---- 4. corrupt input data --------------------------------------------------------------------
def _cut_tar(path, member: str):
    """Cut a tar inside the data of a member, as a failed copy would."""
    with tarfile.open(path) as tar:
        m = tar.getmember(member)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: m.offset_data + m.size // 2])


def test_corrupt_images_are_flagged_counted_and_shown_by_inspect(base, tmp_path):
    """A zero-byte file, a truncated JPEG, a PNG named .jpg and a tar cut off mid-member: the run
    finishes, the PNG decodes, the broken samples' views are flagged and inspect shows the count."""
    samples = [(f"s{i:03d}", encode(make_image(i % 3, i)), "png", i % 3) for i in range(16)]
    samples[2] = ("s002", b"", "png", 2)                                          # zero bytes
    samples[5] = ("s005", encode(make_image(2, 5), "JPEG")[:150], "jpg", 2)       # truncated JPEG
    samples[6] = ("s006", encode(make_image(0, 6), "PNG"), "jpg", 0)              # PNG named .jpg
    src = tmp_path / "src"
    write_wds_shards(samples, str(src), per_shard=8)
    _cut_tar(src / "shard-000001.tar", "s013.png")  # s013's image cut in half, s014 and s015 gone
    out = tmp_path / "store"
    # repeats=1: every sample is in every view (with DeiT's repeated augmentation a view holds a third)
    cfg = pconfig(src, out, base["teacher"], views=3, overrides=["repeats=1"])
    code, lines, crashed, res = invoke("precompute", *pflags(cfg))
    assert crashed is None and code == 0, res.output
    r = open_store(out)
    assert r.completed_units() == r.spec.units()
    from pipeline.recipes import Recipe
    from pipeline.sources import Manifest
    from pipeline.views import ViewRenderer
    m = Manifest.from_bytes(r.manifest_bytes)
    keys = [m.keys(s) for s in range(len(m.shards))]
    assert keys == [[f"s{i:03d}" for i in range(8)], [f"s{i:03d}" for i in range(8, 14)]], \
        "the PNG named .jpg, and the tar's members up to the cut, are indexed"
    bad = {"s002", "s005", "s013"}
    renderer, invalid = ViewRenderer(Recipe.from_dict(r.spec.recipe)), 0
    for view in range(3):
        for s in range(2):
            flags = r.read(view, s).valid
            for sv in renderer.plan(r.spec.seed, view, s, len(keys[s])):
                shows = {keys[s][sv.position]} | ({keys[s][sv.partner_position]} if sv.partner_position is not None
                                                  else set())
                assert flags[sv.slot] == (2 if shows & bad else 1), (view, s, sv)
            invalid += int((flags == 2).sum())
    shown = [ln for ln in res.stdout.splitlines() if ln.startswith("invalid:")]
    assert shown and f"invalid: {invalid} views" in shown[0], res.stdout
    assert all(k in shown[0] for k in sorted(bad)) and "s006" not in shown[0], res.stdout
    code, lines, crashed, res = invoke("inspect", out)
    assert code == 0, res.output
    assert f"invalid     {invalid} views" in res.stdout, res.stdout


def test_a_sample_without_a_label_is_one_line_naming_the_key(base, tmp_path):
    src = tmp_path / "src"
    write_wds_shards([(f"s{i:03d}", encode(make_image(i % 3, i)), "png", i % 3) for i in range(8)], str(src),
                     per_shard=8)
    tar = src / "shard-000000.tar"
    buf = io.BytesIO()
    with tarfile.open(tar) as old, tarfile.open(fileobj=buf, mode="w") as new:
        for m in old.getmembers():
            if m.name != "s004.cls":
                new.addfile(m, old.extractfile(m))
    tar.write_bytes(buf.getvalue())
    out = tmp_path / "store"
    code, lines, crashed, _ = invoke("precompute", *pflags(pconfig(src, out, base["teacher"])))
    one_line_error(code, lines, crashed, 2, "'s004'", ".cls")
    assert not out.exists()


# ---- 5. corrupt store -------------------------------------------------------------------------
def _damage(store, how):
    """Damage unit (shard=1, view_block=1) of a zarr store."""
    marker = os.path.join(store, "units", "000001_0001.json")
    record = json.load(open(marker))
    chunk = os.path.join(store, record["chunks"]["ids"]["key"])
    if how == "flipped-byte":
        data = bytearray(open(chunk, "rb").read())
        data[len(data) // 2] ^= 0x10
        open(chunk, "wb").write(bytes(data))
    elif how == "deleted-chunk":
        os.unlink(chunk)
    elif how == "truncated-marker":
        data = open(marker, "rb").read()
        open(marker, "wb").write(data[: len(data) // 3])


@pytest.mark.parametrize("how", ["flipped-byte", "deleted-chunk", "truncated-marker"])
def test_a_corrupt_store_is_named_refused_and_repaired(base, tmp_path, how):
    store = str(shutil.copytree(base["store"], tmp_path / "store"))
    _damage(store, how)
    # verify --full names the unit
    code, _, crashed, res = invoke("verify", store, "--data", base["data"], "--n", "0", "--full")
    assert crashed is None and code == 1, res.output
    assert res.stdout.splitlines()[-1] == ("FAIL: bad units: 000001_0001 (shard=1, view_block=1); rerun the same "
                                           "precompute command: it re-checks every complete unit and recomputes the "
                                           "damaged ones"), res.stdout
    # train refuses before its first step, one line naming the unit
    run = tmp_path / "run"
    code, lines, crashed, _ = invoke("train", *tflags(tconfig(base["data"], store, run, epochs=2)))
    one_line_error(code, lines, crashed, 2, "shard=1, view_block=1")
    assert not (run / "checkpoint.pth").exists()
    # the same precompute command, rerun, rewrites the damaged unit (and only it)
    cfg = pconfig(base["data"], store, base["teacher"])
    code, lines, crashed, res = invoke("precompute", *pflags(cfg))
    assert crashed is None and code == 0, res.output
    assert "labelled 1 unit (" in res.stdout and "5 units were already complete" in res.stdout, res.stdout
    assert_same_store(store, base["store"])


def test_a_truncated_array_metadata_file_is_one_line(base, tmp_path):
    store = str(shutil.copytree(base["store"], tmp_path / "store"))
    meta = os.path.join(store, "labels.zarr", "ids", "zarr.json")
    data = open(meta, "rb").read()
    open(meta, "wb").write(data[: len(data) // 2])
    code, lines, crashed, _ = invoke("train", *tflags(tconfig(base["data"], store, tmp_path / "run")))
    one_line_error(code, lines, crashed, 2, "zarr.json")
    code, lines, crashed, _ = invoke("verify", store, "--data", base["data"], "--full")
    one_line_error(code, lines, crashed, 2, "zarr.json")


# ---- 6. wrong inputs ----------------------------------------------------------------------------
def _teacher(root, classes: int) -> str:
    import timm

    torch.manual_seed(0)
    path = str(root / f"teacher{classes}.pth")
    torch.save(timm.create_model("resnet10t", num_classes=classes).state_dict(), path)
    return path


def _other_source(root, name, **kw):
    return write_wds(root / name, **{"n": 24, "per_shard": 8, **kw})


@pytest.mark.parametrize("case", ["foreign-source", "recipe", "seed", "k", "class-count", "teacher-classes",
                                  "negative-views", "zero-views-per-unit", "missing-data", "missing-weights"])
def test_wrong_precompute_inputs_are_one_line_and_write_nothing(base, tmp_path, case):
    store = str(shutil.copytree(base["store"], tmp_path / "store"))
    cfg = pconfig(base["data"], store, base["teacher"])
    expect = {
        "foreign-source": ({"data": _other_source(tmp_path, "o", n=20)}, "shard_sizes="),
        "recipe": ({"overrides": ["re_prob=0.5"]}, "recipe.re_prob="),
        "seed": ({"seed": 3}, "seed="),
        "k": ({"topk": 2}, "k="),
        "class-count": ({"data": _other_source(tmp_path, "four", classes=["a", "b", "c", "d"]),
                         "teacher_weights": _teacher(tmp_path, 4), "model_kwargs": {"num_classes": 4}},
                        "num_classes=3, you asked for num_classes=4"),
        "teacher-classes": ({"model_kwargs": {"num_classes": 5}}, "5 classes"),
        "negative-views": ({"views": -2}, "--views must be >= 1"),
        "zero-views-per-unit": ({"views_per_unit": 0}, "--views-per-unit must be >= 1"),
        "missing-data": ({"data": str(tmp_path / "nowhere")}, "nowhere"),
        "missing-weights": ({"teacher_weights": str(tmp_path / "nope.pth")}, "nope.pth"),
    }[case]
    before = snapshot(store)
    code, lines, crashed, _ = invoke("precompute", *pflags({**cfg, **expect[0]}))
    one_line_error(code, lines, crashed, 2, expect[1])
    assert snapshot(store) == before, "nothing written"


def test_drifted_probe_from_a_changed_recipe_number(base, tmp_path):
    """One recipe number edited in store.json (what a different augmentation library would amount to):
    train refuses naming the drift, verify fails on the probes, precompute refuses to resume."""
    store = str(shutil.copytree(base["store"], tmp_path / "store"))
    path = os.path.join(store, "store.json")
    d = json.load(open(path))
    d["spec"]["recipe"]["scale"] = [0.3, 1.0]
    json.dump(d, open(path, "w"))
    code, lines, crashed, _ = invoke("train", *tflags(tconfig(base["data"], store, tmp_path / "run")))
    one_line_error(code, lines, crashed, 2, "views no longer render the same")
    code, _, crashed, res = invoke("verify", store, "--data", base["data"], "--n", "0")
    assert crashed is None and code == 1 and res.stdout.splitlines()[-1] == "FAIL: probe drift", res.output
    code, lines, crashed, _ = invoke("precompute", *pflags(pconfig(base["data"], store, base["teacher"])))
    one_line_error(code, lines, crashed, 2, "recipe.scale=")


def test_missing_store_and_unwritable_output(base, tmp_path):
    code, lines, crashed, _ = invoke("train", *tflags(tconfig(base["data"], tmp_path / "nostore", tmp_path / "r")))
    one_line_error(code, lines, crashed, 2, "nostore", "not a label store")
    code, lines, crashed, _ = invoke("verify", tmp_path / "nostore", "--data", base["data"])
    one_line_error(code, lines, crashed, 2, "not a label store")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    cfg = pconfig(base["data"], blocker / "store", base["teacher"])
    code, lines, crashed, _ = invoke("precompute", *pflags(cfg))
    one_line_error(code, lines, crashed, 1, "a-file")
    code, lines, crashed, _ = invoke("train", *tflags(tconfig(base["data"], base["store"], blocker / "run")),
                                     "--max-steps-per-epoch", "1")
    one_line_error(code, lines, crashed, 1, "a-file")
    assert blocker.read_text() == "not a directory"


def test_a_full_disk_is_one_line_exit_1_and_resumable(base, tmp_path, monkeypatch):
    """ENOSPC from the second unit's first chunk on (a patched write: tmpfs needs root): exit 1 in one line, no
    unit marked complete that is not whole, and the same command later finishes the same store."""
    import zarr.storage._local as local

    real, calls = local._put, [0]

    def put(path, value, exclusive=False):
        calls[0] += f"{os.sep}c{os.sep}" in str(path)  # chunk writes (zarr.json files are not counted)
        if calls[0] > 3:  # the first unit's 3 chunks are written, the disk is full from then on
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, value, exclusive)

    monkeypatch.setattr(local, "_put", put)
    out = tmp_path / "store"
    cfg = pconfig(base["data"], out, base["teacher"])
    code, lines, crashed, _ = invoke("precompute", *pflags(cfg))
    one_line_error(code, lines, crashed, 1, "No space left on device")
    r = open_store(out)
    assert len(r.completed_units()) == 1 and r.check(full=True) == []
    monkeypatch.setattr(local, "_put", real)
    code, lines, crashed, res = invoke("precompute", *pflags(cfg))
    assert code == 0 and crashed is None, res.output
    assert_same_store(out, base["store"])


# ---- 7. concurrent readers --------------------------------------------------------------------
@pytest.mark.slow
def test_training_beside_a_fleet_writing_later_views_reads_only_complete_units(base, tmp_path):
    """A 4-view store whose views 0-1 are complete; a (slowed) fleet writes views 2-3 while a
    3-worker training run does its first 2 epochs (--stop-after-epochs 2), then resumes for epochs
    2-3 once the fleet is done. Same weights as training on the finished store."""
    full = tmp_path / "full"
    precompute(base["data"], full, base["teacher"], views=4)
    straight = tconfig(base["data"], full, tmp_path / "straight", epochs=4, workers=3)
    train(straight)

    out = tmp_path / "growing"
    precompute(base["data"], out, base["teacher"], views=4, rank=0, world_size=2, claim=False)  # units 0, 2, 4, ...
    # units are shard-major, (shard, block) for 4 blocks: rank 0 of 2 owns blocks 0 and 2 of every
    # shard; copy blocks 1 from the full store to get views 0-1 complete and views 2-3 half there.
    for s in range(3):
        name = f"{s:06d}_0001"
        rec = json.load(open(full / "units" / f"{name}.json"))
        for c in rec["chunks"].values():
            os.makedirs((out / c["key"]).parent, exist_ok=True)
            shutil.copyfile(full / c["key"], out / c["key"])
        shutil.copyfile(full / "units" / f"{name}.json", out / "units" / f"{name}.json")
    (tmp_path / "cfg.json").write_text(json.dumps(pconfig(base["data"], out, base["teacher"], views=4)))
    fleet = subprocess.Popen([sys.executable, SUPPORT, "slow-precompute", str(tmp_path / "cfg.json"), "3"],
                             cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        run = tconfig(base["data"], out, tmp_path / "run", epochs=4, workers=3)
        code, lines, crashed, res = invoke("train", *tflags(run), "--stop-after-epochs", "2")
        assert crashed is None and code == 0, res.output
        still_writing = fleet.poll() is None
        assert len(open_store(out).completed_units()) < 12 and still_writing, "trained while the fleet wrote"
        code, lines, crashed, _ = invoke("train", *tflags(run), "--resume")
        if fleet.poll() is None:  # the later epochs' views are not all there yet: a one-line refusal
            one_line_error(code, lines, crashed, 2, "missing")
    finally:
        _, stderr = fleet.communicate(timeout=300)
    assert fleet.returncode == 0, stderr[-2000:]
    code, lines, crashed, res = invoke("train", *tflags(run), "--resume")
    assert crashed is None and code == 0, res.output
    assert weights_bytes(run.out) == weights_bytes(straight.out)
