"""Runs as a table and a picture: timm's summary.csv beside metrics.jsonl (same numbers, resumes append
under one header) and `cli.py plot` drawing several runs on one figure."""

import csv
import json
import os

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import CLASSES, encode, make_image, write_wds
from test_loader import make_store, make_teacher_weights

from cli import main
from pipeline.sources import write_wds_shards
from student.train import TrainConfig, train

TINY = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2}
MODEL = "deit_tiny_distilled_patch16_224"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two 3-epoch runs on one store and one val set: hard distillation (stopped after 2 epochs, then
    resumed) and no distillation."""
    root = tmp_path_factory.mktemp("curves")
    data = write_wds(root / "wds", n=24, per_shard=8)
    store = make_store(data, root / "store", make_teacher_weights(root / "t.pth"), views=3, hard=True)
    val = [(f"v{i:03d}", encode(make_image(i % 3, 700 + i)), "png", i % 3) for i in range(12)]
    write_wds_shards(val, str(root / "val"), per_shard=12, class_names=CLASSES)
    base = dict(data=data, labels=store, val=str(root / "val"), model=MODEL, model_kwargs=TINY, epochs=3,
                batch_size=8, workers=0, warmup_epochs=0, lr=0.05, drop_path=0.0, progress=False, ema=False)
    hard = str(root / "hard")
    train(TrainConfig(out=hard, distillation="hard", stop_after_epochs=2, **base))
    train(TrainConfig(out=hard, distillation="hard", resume=True, **base))
    none = str(root / "none")
    train(TrainConfig(out=none, distillation="none", **base))
    return {"root": root, "hard": hard, "none": none}


def test_summary_csv_is_timms_table_of_the_metrics(runs):
    text = open(os.path.join(runs["hard"], "summary.csv")).read()
    assert text.count("epoch,") == 1  # the resumed run appended under the first header
    rows = list(csv.DictReader(text.splitlines()))
    metrics = [json.loads(x) for x in open(os.path.join(runs["hard"], "metrics.jsonl"))]
    assert [int(r["epoch"]) for r in rows] == [m["epoch"] for m in metrics] == [0, 1, 2]
    for row, m in zip(rows, metrics, strict=True):
        assert float(row["train_loss"]) == m["loss"] and float(row["train_kd"]) == m["kd"]
        assert float(row["lr"]) == m["lr"]
        for head in ("cls", "dist", "avg"):
            assert float(row[f"eval_{head}_top1"]) == m["val"][f"{head}_top1"]
            assert float(row[f"eval_{head}_top5"]) == m["val"][f"{head}_top5"]
        # timm's own column names carry DeiT's test-time rule, the averaged heads
        assert float(row["eval_top1"]) == m["val"]["avg_top1"]
    # The header is the one timm's train.py writes: epoch first, train_ then eval_ columns, lr last.
    header = text.splitlines()[0].split(",")
    assert header[0] == "epoch" and header[-1] == "lr" and header[1].startswith("train_")


def test_summary_csv_stays_one_table_when_a_resume_adds_val(runs, tmp_path):
    """--val is a runtime option: epoch 0 without it, epoch 1 with it. The columns grow; the table is
    rewritten under one header with blanks, never appended misaligned."""
    base = dict(data=os.path.join(runs["root"], "wds"), labels=os.path.join(runs["root"], "store"), model=MODEL,
                model_kwargs=TINY, epochs=2, batch_size=8, workers=0, warmup_epochs=0, lr=0.05, drop_path=0.0,
                progress=False, ema=False, out=str(tmp_path / "run"), max_steps_per_epoch=1)
    train(TrainConfig(stop_after_epochs=1, **base))
    first = open(tmp_path / "run" / "summary.csv").read().splitlines()
    assert not any(c.startswith("eval_") for c in first[0].split(","))
    train(TrainConfig(resume=True, val=os.path.join(runs["root"], "val"), **base))
    rows = list(csv.DictReader(open(tmp_path / "run" / "summary.csv")))
    assert [r["epoch"] for r in rows] == ["0", "1"]
    assert rows[0]["eval_avg_top1"] == "" and float(rows[1]["eval_avg_top1"]) >= 0
    assert rows[0]["train_loss"] == first[1].split(",")[1]  # epoch 0's numbers kept as they were written
    assert all(None not in r for r in rows)  # no row longer than the header


def test_plot_draws_several_runs_on_one_figure(runs, tmp_path):
    from PIL import Image

    out = tmp_path / "curves.png"
    res = CliRunner().invoke(main, ["plot", runs["hard"], runs["none"], "--out", str(out), "--title", "tiny"])
    assert res.exit_code == 0, res.output
    img = Image.open(out)
    assert img.size == (1200, 504)
    # Not a blank canvas: lines in at least two run colours (matplotlib's C0 blue and C1 orange).
    pixels = {tuple(p) for p in np.unique(np.asarray(img.convert("RGB")).reshape(-1, 3), axis=0).tolist()}
    assert (31, 119, 180) in pixels and (255, 127, 14) in pixels


def test_plot_refuses_a_directory_that_is_not_a_run(runs, tmp_path):
    res = CliRunner().invoke(main, ["plot", runs["hard"], str(tmp_path), "--out", str(tmp_path / "x.png")])
    assert res.exit_code == 2 and "has no metrics.jsonl" in res.output and res.output.strip().count("\n") == 0
    assert not (tmp_path / "x.png").exists()


def test_the_run_files_keep_the_keys_and_order_earlier_versions_wrote(runs):
    """metrics.jsonl and summary.json are written from dataclasses (student/results.py); their keys, in
    order, are the files' format that old runs and other tools read: spelled out here as they were."""
    from student.results import TrainSummary

    rows = [json.loads(x) for x in open(os.path.join(runs["hard"], "metrics.jsonl"))]
    assert [list(r) for r in rows] == [["epoch", "step", "steps", "images", "seconds", "img_per_s", "loss", "base",
                                        "kd", "lr", "invalid_views", "skipped_views", "val"]] * 3
    with open(os.path.join(runs["none"], "summary.json")) as f:
        summary = json.load(f)
    assert list(summary) == ["model", "distillation", "epochs", "epochs_this_run", "finished", "step", "global_batch",
                             "world", "rank", "device", "images", "wall_seconds", "train_seconds", "img_per_s",
                             "invalid_views_skipped", "first_step_loss", "final", "finetune", "soft_targets",
                             "distillation_token"]  # appended (issue 24): older readers ignore it
    assert list(summary["final"]) == ["loss", "val", "val_ema"] and summary["final"]["val_ema"] is None
    last = [json.loads(x) for x in open(os.path.join(runs["none"], "metrics.jsonl"))][-1]
    assert summary["final"]["loss"] == last["loss"] and summary["final"]["val"] == last["val"]
    read = TrainSummary.read(runs["none"])
    assert read.to_json() == summary and read.final.val["avg_top1"] == summary["final"]["val"]["avg_top1"]
