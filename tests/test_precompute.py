"""Stage one: the store's bytes do not depend on fleet size, workers or interruptions."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import TINY_TEACHER_KWARGS, encode, make_image, write_wds

from pipeline.recipes import Recipe
from pipeline.sources import Manifest, decode_image, write_wds_shards
from pipeline.stage1.precompute import PrecomputeConfig, run_precompute
from pipeline.stage1.teacher import create_teacher
from pipeline.views import ViewRenderer
from storage import INVALID, WRITTEN, open_store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(data, out, teacher, **kw):
    base = dict(data=data, out=out, teacher="resnet10t", teacher_weights=teacher, views=4, views_per_unit=2,
                topk=3, input_size=32, batch_size=8, workers=0, model_kwargs=TINY_TEACHER_KWARGS, progress=False)
    return PrecomputeConfig(**{**base, **kw})


def cli_args(data, out, teacher, *extra):
    return ["--data", data, "--out", out, "--teacher", "resnet10t", "--teacher-weights", teacher, "--views", "4",
            "--views-per-unit", "2", "--topk", "3", "--input-size", "32", "--batch-size", "8", "--workers", "0",
            "--model-kwargs", '{"num_classes": 3}', *extra]


def store_arrays(path):
    """Every stored view, unit by unit, as raw bytes (plus the unit list)."""
    r = open_store(path)
    out = {}
    for shard, block in sorted(r.completed_units()):
        for view in r.spec.block_views(block):
            lab = r.read(view, shard)
            out[(view, shard)] = (None if lab.values is None else lab.values.tobytes(), lab.ids.tobytes(),
                                  lab.valid.tobytes())
    return out


@pytest.fixture
def data(tmp_path):
    return write_wds(tmp_path / "wds", n=22, per_shard=8)


def test_workers_do_not_change_the_store(tmp_path, data, tiny_teacher):
    s0 = run_precompute(config(data, str(tmp_path / "a"), tiny_teacher, workers=0))
    run_precompute(config(data, str(tmp_path / "b"), tiny_teacher, workers=2, batch_size=5))
    a, b = store_arrays(tmp_path / "a"), store_arrays(tmp_path / "b")
    assert len(a) == 4 * 3 and s0.units_complete == s0.units_total == 6
    assert s0.views_written == 4 * 22 and s0.views_invalid == 0
    # batch size changes which views share a forward; stored labels must not care beyond fp16 rounding
    for key in a:
        assert a[key][1] == b[key][1] and a[key][2] == b[key][2]
        va = np.frombuffer(a[key][0], np.float16).astype(np.float32)
        vb = np.frombuffer(b[key][0], np.float16).astype(np.float32)
        assert np.abs(va - vb).max() <= 2e-3


def test_two_process_torchrun_writes_what_one_process_writes(tmp_path, data, tiny_teacher):
    run_precompute(config(data, str(tmp_path / "one"), tiny_teacher))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29531",
           os.path.join(ROOT, "cli.py"), "precompute", *cli_args(data, str(tmp_path / "two"), tiny_teacher)]
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT, timeout=300)
    one, two = store_arrays(tmp_path / "one"), store_arrays(tmp_path / "two")
    assert one.keys() == two.keys() and one == two, "same bytes, unit for unit"


def test_killed_run_resumes_to_the_same_store(tmp_path, data, tiny_teacher):
    ref = str(tmp_path / "ref")
    run_precompute(config(data, ref, tiny_teacher, views=6, views_per_unit=1))
    out = str(tmp_path / "killed")
    cmd = [sys.executable, os.path.join(ROOT, "cli.py"), "precompute",
           *cli_args(data, out, tiny_teacher, "--views", "6", "--views-per-unit", "1")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    units = os.path.join(out, "units")
    deadline = time.time() + 120
    while time.time() < deadline and (not os.path.isdir(units) or len(os.listdir(units)) < 4):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(open_store(out).completed_units())
    assert 0 < done_before < 18, "killed mid-way"
    summary = run_precompute(config(data, out, tiny_teacher, views=6, views_per_unit=1))
    assert summary.units_skipped == done_before and summary.units_done == 18 - done_before
    assert store_arrays(out) == store_arrays(ref)


def test_hard_and_topk_agree_on_argmax(tmp_path, data, tiny_teacher):
    run_precompute(config(data, str(tmp_path / "soft"), tiny_teacher))
    run_precompute(config(data, str(tmp_path / "hard"), tiny_teacher, hard=True))
    soft, hard = open_store(tmp_path / "soft"), open_store(tmp_path / "hard")
    assert hard.spec.mode == "hard" and soft.spec.mode == "topk"
    for view in range(4):
        for shard in range(3):
            assert np.array_equal(soft.read(view, shard).ids[:, 0], hard.read(view, shard).ids)


def test_wds_backend_stores_the_same_labels(tmp_path, data, tiny_teacher):
    run_precompute(config(data, str(tmp_path / "z"), tiny_teacher))
    run_precompute(config(data, str(tmp_path / "w"), tiny_teacher, backend="wds"))
    assert store_arrays(tmp_path / "z") == store_arrays(tmp_path / "w")


def test_corrupt_images_are_flagged_and_counted(tmp_path, tiny_teacher):
    good = [(f"s{i:03d}", encode(make_image(i % 3, i)), "png", i % 3) for i in range(10)]
    good[3] = ("s003", b"", "png", 0)                                   # zero-byte
    good[7] = ("s007", encode(make_image(1, 7), "JPEG")[:200], "jpg", 1)  # truncated JPEG
    write_wds_shards(good, str(tmp_path / "bad"), per_shard=10)
    # repeats=1: every view shows every sample, so both broken images show up in each view
    s = run_precompute(config(str(tmp_path / "bad"), str(tmp_path / "store"), tiny_teacher, views=2,
                              overrides=["repeats=1"]))
    assert s.units_complete == s.units_total
    assert sorted(k.split(" ")[0] for k in s.invalid_keys) == ["s003", "s007"]
    r = open_store(tmp_path / "store")
    manifest = Manifest.from_bytes(r.manifest_bytes)
    renderer = ViewRenderer(Recipe.from_dict(r.spec.recipe))
    flagged = 0
    for view in range(2):
        lab = r.read(view, 0)
        plan = renderer.plan(r.spec.seed, view, 0, 10)
        for sv in plan:
            shows_bad = {sv.position, sv.partner_position} & {3, 7}
            assert lab.valid[sv.slot] == (INVALID if shows_bad else WRITTEN)
        flagged += int((lab.valid == INVALID).sum())
        assert (lab.valid == INVALID).sum() >= 2
    assert s.views_invalid == flagged
    assert manifest.num_samples == 10


def test_stored_views_reproduce_the_teacher(tmp_path, data, tiny_teacher):
    """verify-style: re-render stored views from scratch and re-run the teacher."""
    out = str(tmp_path / "s")
    run_precompute(config(data, out, tiny_teacher))
    r = open_store(out)
    manifest = Manifest.from_bytes(r.manifest_bytes)
    recipe = Recipe.from_dict(r.spec.recipe)
    renderer = ViewRenderer(recipe)
    teacher = create_teacher("resnet10t", weights=tiny_teacher, model_kwargs=TINY_TEACHER_KWARGS)
    worst = 0.0
    for view, shard in [(0, 0), (3, 2), (1, 1)]:
        n = manifest.shard_sizes[shard]
        lab = r.read(view, shard)
        for sv in renderer.plan(r.spec.seed, view, shard, n)[:5]:
            img = decode_image(manifest.read_sample(shard, sv.position).data)
            partner = None if sv.partner_position is None else decode_image(
                manifest.read_sample(shard, sv.partner_position).data)
            x = renderer.render_slot(r.spec.seed, sv, img, partner)
            logp = torch.log_softmax(teacher(x[None], recipe.mean, recipe.std), dim=1)[0]
            assert int(logp.argmax()) == int(lab.ids[sv.slot, 0])
            stored = torch.from_numpy(lab.values[sv.slot].astype(np.float32))
            worst = max(worst, float((logp[torch.from_numpy(lab.ids[sv.slot].astype(np.int64))] - stored).abs().max()))
    assert worst <= 2e-3, f"max |log-prob difference| {worst} exceeds fp16 rounding"


@pytest.mark.parametrize("args,msg", [
    (["--views", "0"], "--views must be >= 1"),
    (["--topk", "5"], "--topk 5 is more than the source's 3 classes"),
    (["--set", "colour=1"], "unknown recipe key 'colour'"),
])
def test_bad_settings_are_one_line_exit_2(tmp_path, data, tiny_teacher, args, msg):
    out = str(tmp_path / "s")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "cli.py"), "precompute",
                        *cli_args(data, out, tiny_teacher, *args)], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2, p.stderr
    assert msg in p.stderr and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not os.path.exists(out), "nothing written"


def test_a_different_teacher_cannot_resume_a_store(tmp_path, data, tiny_teacher):
    out = str(tmp_path / "s")
    run_precompute(config(data, out, tiny_teacher, views=2))
    import timm
    other = tmp_path / "other.pth"
    torch.save(timm.create_model("resnet10t", num_classes=3).state_dict(), other)
    from storage import StoreMismatch
    with pytest.raises(StoreMismatch, match="teacher"):
        run_precompute(config(data, out, str(other), views=2))


# ---- bad values are refused before any work: one line, exit 2, no store ------------------------
def test_a_bad_recipe_value_is_refused_before_the_store_exists_and_the_fix_then_runs(tmp_path, data, tiny_teacher):
    from cli_support import escaped, invoke, one_line_error

    out = str(tmp_path / "store")
    for bad, fragment in [("interpolation=foo", "interpolation 'foo'"), ("auto_augment=garbage", "auto_augment"),
                          ("scale=2,1", "recipe scale"), ("ratio=0,0", "recipe ratio"), ("re_count=0", "re_count"),
                          ("std=0,0,0", "recipe std"), ("label_smoothing=1", "label_smoothing")]:
        one_line_error(invoke("precompute", *cli_args(data, out, tiny_teacher, "--set", bad)), fragment)
        assert not os.path.exists(out), bad  # nothing created: the corrected command is not "made with other settings"
    res = invoke("precompute", *cli_args(data, out, tiny_teacher, "--views", "2"))
    assert res.exit_code == 0 and escaped(res) is None, res.output
    assert open_store(out).spec.recipe["interpolation"] == "bicubic"


@pytest.mark.parametrize("flags, fragment", [
    (["--device", "bogus"], "'bogus' is not a device"),
    (["--input-size", "0"], "--input-size"),     # used to mean 224, silently
    (["--views", "0"], "--views"),
    (["--workers", "-1"], "--workers"),
    (["--seed", "-3"], "--seed"),
    (["--rank", "-1"], "--rank"),
])
def test_bad_options_are_one_line_errors_before_any_work(tmp_path, data, tiny_teacher, flags, fragment):
    from cli_support import invoke, one_line_error

    out = str(tmp_path / "store")
    one_line_error(invoke("precompute", *cli_args(data, out, tiny_teacher, *flags)), fragment)
    assert not os.path.exists(out)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cuda_without_a_gpu_is_one_line(tmp_path, data, tiny_teacher):
    from cli_support import invoke, one_line_error

    one_line_error(invoke("precompute", *cli_args(data, str(tmp_path / "s"), tiny_teacher, "--device", "cuda")),
                   "no CUDA GPU is visible", "--device cpu")


def test_teacher_kwargs_timm_cannot_build_are_one_line(tmp_path, data):
    from cli_support import invoke, one_line_error

    one_line_error(invoke("precompute", "--data", data, "--out", tmp_path / "s", "--teacher", "vit_tiny_patch16_224",
                          "--random-teacher", "--hard", "--workers", "0",
                          "--model-kwargs", '{"num_classes": 3, "embed_dim": 10}'),
                   "timm cannot build vit_tiny_patch16_224", "--model-kwargs")
