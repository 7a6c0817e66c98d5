"""`cli.py export`: a distilled student, exported, loaded by timm alone in a fresh process, predicts the
very logits (bytes) that train's evaluation computed, for the class, distillation and averaged heads."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import CLASSES, encode, make_image, write_wds
from test_loader import make_store, make_teacher_weights

from pipeline.sources import index_source, write_wds_shards
from student.data import EvalImages
from student.model import create_student, eval_logits
from student.train import TrainConfig, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2}
MODEL = "deit_tiny_distilled_patch16_224"

# What a timm user runs: no import from this project. Transforms the PNGs with the preprocessing the
# config declares and writes every head's logits.
TIMM_ONLY = r"""
import json, sys
import timm, torch
from PIL import Image
weights, config, out, *images = sys.argv[1:]
cfg = json.load(open(config))
model = timm.create_model(cfg["architecture"], pretrained=True,
                          pretrained_cfg_overlay=dict(cfg["pretrained_cfg"], file=weights), **cfg["model_args"]).eval()
folder = timm.create_model("local-dir:" + config.rsplit("/", 1)[0], pretrained=True).eval()
transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
x = torch.stack([transform(Image.open(p).convert("RGB")) for p in images])
with torch.no_grad():
    tokens = model.forward_features(x)
    heads = {"cls": model.head(tokens[:, 0]), "dist": model.head_dist(tokens[:, 1]), "avg": model(x),
             "folder_avg": folder(x), "images": x}
torch.save(heads, out)
print(json.dumps({"label_names": cfg["label_names"], "classes": model.num_classes}))
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """1 epoch of hard distillation from a 1-view store, EMA kept (decay 0.5, so it differs from the raw
    weights), evaluated each epoch on 12 held-out images, which are also written as plain PNG files."""
    root = tmp_path_factory.mktemp("export")
    data = write_wds(root / "wds", n=24, per_shard=8)
    weights = make_teacher_weights(root / "teacher.pth")
    store = make_store(data, root / "store", weights, views=1, hard=True)
    val = [(f"v{i:03d}", encode(make_image(i % 3, 500 + i)), "png", i % 3) for i in range(12)]
    write_wds_shards(val, str(root / "val"), per_shard=12, class_names=CLASSES)
    pngs = root / "pngs"
    pngs.mkdir()
    for key, png, _, _ in val:
        (pngs / f"{key}.png").write_bytes(png)
    cfg = TrainConfig(data=data, labels=store, val=str(root / "val"), out=str(root / "run"), model=MODEL,
                      model_kwargs=TINY, distillation="hard", epochs=1, batch_size=8, workers=0, warmup_epochs=0,
                      lr=0.05, model_ema_decay=0.5, progress=False)
    train(cfg)
    return {"root": root, "run": str(root / "run"), "val": str(root / "val"),
            "pngs": [str(pngs / f"{key}.png") for key, *_ in val]}


def train_side_logits(run, which):
    """What train's evaluation computes: its model in eval mode, eval_logits, on EvalImages' tensors."""
    ckpt = torch.load(os.path.join(run["run"], "checkpoint.pth"), map_location="cpu", weights_only=True)
    model = create_student(MODEL, num_classes=3, model_kwargs=TINY)
    model.load_state_dict(ckpt["state_dict_ema" if which == "ema" else "model"])
    model.eval()
    from pipeline.recipes import Recipe

    images = EvalImages(index_source(run["val"]), Recipe.from_dict(ckpt["recipe"]))
    x = torch.stack([images[i][0] for i in range(len(images))])
    return x, eval_logits(model, x)


def export_and_load(run, tmp_path, *flags):
    out = tmp_path / "model" / "model.safetensors"
    r = subprocess.run([sys.executable, "cli.py", "export", run["run"], "--out", str(out), *flags], cwd=ROOT,
                       capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    script = tmp_path / "timm_only.py"
    script.write_text(TIMM_ONLY)
    logits = tmp_path / "logits.pt"
    # A fresh interpreter outside the repository: only timm, torch and Pillow are importable from here.
    p = subprocess.run([sys.executable, str(script), str(out), str(out.parent / "config.json"), str(logits),
                        *run["pngs"]], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""})
    assert p.returncode == 0, p.stderr[-3000:]
    return r.stdout, json.loads(p.stdout.strip().splitlines()[-1]), torch.load(logits, weights_only=True)


def val_top1(run, key):
    rows = [json.loads(x) for x in open(os.path.join(run["run"], "metrics.jsonl"))]
    return rows[-1][key]


@pytest.mark.parametrize("which,flags,metrics_key", [("ema", (), "val_ema"), ("model", ("--no-ema",), "val")])
def test_timm_alone_predicts_the_logits_train_evaluated(run, tmp_path, which, flags, metrics_key):
    said, meta, timm_out = export_and_load(run, tmp_path, *flags)
    assert f"({which} weights of {MODEL}" in said
    assert meta == {"label_names": CLASSES, "classes": 3}
    x, ours = train_side_logits(run, which)
    # timm's transform from the exported config makes the very tensors our evaluation made ...
    assert timm_out["images"].numpy().tobytes() == x.numpy().tobytes()
    # ... and the loaded model gives every head's logits to the byte (the folder form too).
    for head in ("cls", "dist", "avg"):
        assert timm_out[head].numpy().tobytes() == ours[head].numpy().tobytes(), head
    assert timm_out["folder_avg"].numpy().tobytes() == ours["avg"].numpy().tobytes()
    # The accuracy train logged for these weights is the accuracy of the exported model.
    labels = torch.tensor([i % 3 for i in range(12)])
    metrics = val_top1(run, metrics_key)
    for head in ("cls", "dist", "avg"):
        hits = int((timm_out[head].argmax(1) == labels).sum())
        assert 100 * hits / 12 == pytest.approx(metrics[f"{head}_top1"], abs=1e-9), head


def test_ema_and_raw_exports_hold_those_weights_and_bad_input_is_one_line(run, tmp_path):
    from click.testing import CliRunner
    from safetensors.torch import load_file

    from cli import main

    ckpt = torch.load(os.path.join(run["run"], "checkpoint.pth"), map_location="cpu", weights_only=True)
    for flags, key in (((), "state_dict_ema"), (("--no-ema",), "model")):
        out = tmp_path / f"{key}.safetensors"
        res = CliRunner().invoke(main, ["export", run["run"], "--out", str(out), *flags])
        assert res.exit_code == 0, res.output
        saved = load_file(str(out))
        assert {k: v.numpy().tobytes() for k, v in saved.items()} == {
            k: v.numpy().tobytes() for k, v in ckpt[key].items()}, key
    config = json.loads((tmp_path / "config.json").read_text())
    # A run from before this version: EMA under "ema" (ModelEmaV3's keys), no saved recipe or class names.
    old = tmp_path / "old-run"
    old.mkdir()
    legacy = {k: v for k, v in ckpt.items() if k not in ("state_dict_ema", "recipe", "class_names")}
    legacy["ema"] = {f"module.{k}": v for k, v in ckpt["state_dict_ema"].items()}
    torch.save(legacy, old / "checkpoint.pth")
    exported = tmp_path / "old-export"  # beside the run folder: nothing is written into a run (tests/test_outputs.py)
    res = CliRunner().invoke(main, ["export", str(old), "--out", str(exported / "m.safetensors")])
    assert res.exit_code == 0, res.output
    assert json.loads((exported / "config.json").read_text()) == config
    assert {k: v.numpy().tobytes() for k, v in load_file(str(exported / "m.safetensors")).items()} == {
        k: v.numpy().tobytes() for k, v in ckpt["state_dict_ema"].items()}
    for args, words in (([str(tmp_path / "nowhere"), "--out", str(tmp_path / "m.safetensors")], "no checkpoint.pth"),
                        ([run["run"], "--out", str(tmp_path / "m.pth")], "must end in .safetensors")):
        res = CliRunner().invoke(main, ["export", *args])
        assert res.exit_code == 2 and res.output.strip().count("\n") == 0 and words in res.output, res.output
    assert not (tmp_path / "m.pth").exists() and not list(tmp_path.glob("*.tmp*"))
