"""The first hour with `cli.py train` (issue 24): a run is never mixed into another silently, the console
says what the run is, does and reached (raw and EMA), settings that surprise are said once, Ctrl-C says
what is kept and how to go on (exit 130), --workers fits the machine, and timm's spellings work."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch
from cli_support import invoke, one_line_error
from conftest import write_wds
from test_loader import make_store, make_teacher_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2}
TINY_WORDS = ["img_size=32", "patch_size=8", "depth=2", "embed_dim=64", "num_heads=2"]
MODEL = "deit_tiny_distilled_patch16_224"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """24 samples in 3 wds shards, 12 held-out ones, a random resnet10t teacher and a 2-view top-3 store."""
    root = tmp_path_factory.mktemp("first_hour")
    data = write_wds(root / "wds", n=24, per_shard=8)
    weights = make_teacher_weights(root / "teacher.pth")
    return {"root": root, "data": data, "weights": weights, "store": make_store(data, root / "store", weights),
            "val": write_wds(root / "val", n=12, per_shard=12)}


def flags(tiny, *extra, model=MODEL):
    return ["train", "--data", tiny["data"], "--labels", tiny["store"], "--model", model,
            "--model-kwargs", json.dumps(TINY), "--batch-size", "8", "--workers", "0", "--max-steps-per-epoch", "1",
            *extra]


def ok(res):
    assert res.exit_code == 0, (res.exit_code, res.output, res.exception)
    return res.stderr


def lines_of(run, name):
    return (run / name).read_text().splitlines()


def ckpt_config(run) -> dict:
    return torch.load(run / "checkpoint.pth", map_location="cpu", weights_only=True)["config"]


# ---- 1. a new run never lands in another run's folder ------------------------------------------
def test_an_out_holding_a_run_is_refused_and_nothing_in_it_changes(tiny, tmp_path):
    run = tmp_path / "run"
    ok(invoke(*flags(tiny, "--out", run, "--epochs", "1")))
    before = {name: (run / name).read_bytes() for name in os.listdir(run)}
    one_line_error(invoke(*flags(tiny, "--out", run, "--epochs", "1")), "already holds a run", "checkpoint.pth",
                   "--resume", "--overwrite")
    assert {name: (run / name).read_bytes() for name in os.listdir(run)} == before


def test_overwrite_deletes_only_the_run_files_and_starts_a_clean_run(tiny, tmp_path):
    run = tmp_path / "run"
    ok(invoke(*flags(tiny, "--out", run, "--epochs", "2")))
    (run / "notes.txt").write_text("mine")
    err = ok(invoke(*flags(tiny, "--out", run, "--epochs", "1", "--overwrite")))
    assert "--overwrite: deleted the previous run's checkpoint.pth, metrics.jsonl, summary.csv, summary.json" in err
    assert (run / "notes.txt").read_text() == "mine"
    assert [json.loads(x)["epoch"] for x in lines_of(run, "metrics.jsonl")] == [0]  # not 0, 1, 0
    assert len(lines_of(run, "summary.csv")) == 2  # header and one epoch
    assert ckpt_config(run)["epochs"] == 1


def test_overwrite_on_a_bad_command_keeps_the_old_run(tiny, tmp_path):
    """The old run goes only once every check of the new one has passed."""
    run = tmp_path / "run"
    ok(invoke(*flags(tiny, "--out", run, "--epochs", "1")))
    before = (run / "checkpoint.pth").read_bytes()
    one_line_error(invoke(*flags(tiny, "--out", run, "--overwrite", "--input-size", "64")), "input_size")
    assert (run / "checkpoint.pth").read_bytes() == before


def test_resume_without_a_checkpoint_is_one_line_and_with_overwrite_too(tiny, tmp_path):
    run = tmp_path / "empty"
    one_line_error(invoke(*flags(tiny, "--out", run, "--resume")), "--resume", "no checkpoint",
                   str(run / "checkpoint.pth"))
    assert not run.exists() or not os.listdir(run)
    one_line_error(invoke(*flags(tiny, "--out", run, "--resume", "--overwrite")), "--resume", "--overwrite")


# ---- 2, 3, 4. what the console says -------------------------------------------------------------
def test_banner_epoch_lines_and_the_final_line_report_raw_and_ema_of_both_heads(tiny, tmp_path):
    err = ok(invoke(*flags(tiny, "--out", tmp_path / "run", "--epochs", "2", "--val", tiny["val"])))
    banner = [ln for ln in err.splitlines() if ln.startswith("train: ")]
    text = "\n".join(banner)
    for fragment in (f"model {MODEL}, 0.11M parameters, with a distillation token, 3 classes",
                     f"data {tiny['data']}: 24 samples, 32 px", f"labels {tiny['store']} (2 views",
                     "2 epochs x 1 step, global batch 8 (8 x 1 process), lr 7.81e-06 (--lr 0.0005 x 8/512)",
                     "EMA on", "device cpu, 0 workers"):
        assert fragment in text, (fragment, text)
    epochs = [ln for ln in banner if ln.startswith("train: epoch ")]
    assert [ln.split(":")[1] for ln in epochs] == [" epoch 0 (1 of 2)", " epoch 1 (2 of 2)"], epochs
    assert all("val top-1 raw " in ln and ", EMA " in ln and "(cls " in ln and "dist " in ln for ln in epochs)
    res = invoke(*flags(tiny, "--out", tmp_path / "r2", "--epochs", "1", "--val", tiny["val"]))
    ok(res)
    final = res.stdout.splitlines()
    summary = json.loads((tmp_path / "r2" / "summary.json").read_text())
    ema = summary["final"]["val_ema"]
    assert summary["distillation_token"] is True
    report = [ln for ln in final if ln.startswith("train: 1 epoch,")]  # not "1 epochs"
    assert len(report) == 1 and f"EMA {ema['avg_top1']:.2f} (cls {ema['cls_top1']:.2f}, dist " in report[0]


def test_a_model_without_a_distillation_token_reports_one_accuracy(tiny, tmp_path):
    res = invoke(*flags(tiny, "--out", tmp_path / "run", "--epochs", "1", "--val", tiny["val"], "--distillation",
                        "none", "--no-ema", model="deit_tiny_patch16_224"))
    err = ok(res)
    val = json.loads((tmp_path / "run" / "summary.json").read_text())["final"]["val"]
    assert "one head, no distillation token" in err
    assert res.stdout.strip().endswith(f"; val top-1 {val['cls_top1']:.2f}"), res.stdout
    assert "cls/dist/avg" not in res.output and "dist " not in res.stdout


def test_warm_up_longer_than_the_run_and_reused_views_are_said_once(tiny, tmp_path):
    err = ok(invoke(*flags(tiny, "--out", tmp_path / "run", "--epochs", "3")))  # default --warmup-epochs 5
    warnings = [ln for ln in err.splitlines() if ln.startswith("train: warning: ")]
    assert len(warnings) == 2, err
    assert "--epochs 3 <= --warmup-epochs 5: the whole run is warm-up" in warnings[0]
    assert "--epochs 3 > the store's 2 views" in warnings[1] and "precompute --views 3" in warnings[1]
    quiet = ok(invoke(*flags(tiny, "--out", tmp_path / "quiet", "--epochs", "2", "--warmup-epochs", "1")))
    assert "warning" not in quiet


def test_a_resumed_run_says_where_it_resumes_from(tiny, tmp_path):
    run = tmp_path / "run"
    ok(invoke(*flags(tiny, "--out", run, "--epochs", "2", "--stop-after-epochs", "1")))
    err = ok(invoke(*flags(tiny, "--out", run, "--epochs", "2", "--resume")))
    assert f"train: resuming at epoch 1 of 2 from {run / 'checkpoint.pth'}" in err


def test_the_finetune_resample_is_said_on_the_console(tiny, tmp_path):
    run = tmp_path / "run"
    ok(invoke(*flags(tiny, "--out", run, "--epochs", "1")))
    plain = ["train", "--data", tiny["data"], "--model", MODEL, "--model-kwargs", *TINY_WORDS, "img_size=48",
             "--recipe", "crop-flip", "--input-size", "48", "-b", "8", "-j", "0", "--max-steps-per-epoch", "1",
             "--epochs", "1", "--out", tmp_path / "ft", "--finetune", run / "checkpoint.pth"]
    assert "train: --finetune: " in (err := ok(invoke(*plain)))
    assert "position embedding resampled 4x4 -> 6x6 patches" in err


# ---- 5. Ctrl-C ------------------------------------------------------------------------------------
def _interrupt_when(cmd, ready, timeout=180):
    """Start `python cli.py CMD`, send SIGINT once ready() holds, return (exit code, stderr)."""
    p = subprocess.Popen([sys.executable, "cli.py", *map(str, cmd)], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + timeout
    while not ready() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert p.poll() is None, p.communicate()[1][-2000:]
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    return p.returncode, err


def test_ctrl_c_in_train_keeps_the_checkpoint_names_the_resume_command_and_exits_130(tiny, tmp_path):
    run = tmp_path / "run"
    cmd = flags(tiny, "--out", run, "--epochs", "1000", "--warmup-epochs", "0", "--overwrite")
    code, err = _interrupt_when(cmd, lambda: (run / "metrics.jsonl").exists())
    assert code == 130, err[-2000:]
    assert "Traceback" not in err and "error: aborted" not in err
    said = [ln for ln in err.splitlines() if ln.startswith("interrupted: ")]
    assert len(said) == 1 and f"the last checkpoint, {run / 'checkpoint.pth'} (after epoch " in said[0], err[-2000:]
    resume = shlex.split(said[0].split("resume with: ", 1)[1])
    assert resume[:2] == ["python", "cli.py"] and resume[-1] == "--resume" and "--overwrite" not in resume
    epochs_done = len(lines_of(run, "metrics.jsonl"))
    r = subprocess.run([sys.executable, *resume[1:], "--stop-after-epochs", "1"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(lines_of(run, "metrics.jsonl")) == epochs_done + 1  # the command goes on where it stopped


def test_ctrl_c_in_precompute_keeps_finished_units_and_says_rerun_exit_130(tiny, tmp_path):
    store = tmp_path / "store"
    cmd = ["precompute", "--data", tiny["data"], "--out", store, "--teacher", "resnet10t", "--teacher-weights",
           tiny["weights"], "--views", "500", "--views-per-unit", "1", "--topk", "3", "--input-size", "32",
           "-b", "8", "-j", "0", "--model-kwargs", "num_classes=3", "--overwrite"]
    code, err = _interrupt_when(cmd, lambda: (store / "units").is_dir() and any((store / "units").iterdir()))
    assert code == 130, err[-2000:]
    said = [ln for ln in err.splitlines() if ln.startswith("interrupted: ")]
    assert len(said) == 1 and "units already finished are kept" in said[0], err[-2000:]
    rerun = shlex.split(said[0].split("to resume: ", 1)[1])
    assert rerun[:3] == ["python", "cli.py", "precompute"] and "--overwrite" not in rerun  # it would delete them


def test_the_resume_command_continues_the_run_whatever_started_it(monkeypatch):
    """--overwrite would delete the kept run, --finetune refuses --resume, a generated --output name and a
    --resume PATH elsewhere would point at another folder: the command names RUN and --resume alone."""
    from cli import rerun_command

    monkeypatch.setattr(sys, "argv", ["cli.py", "train", "--data", "d", "--output=o", "--experiment", "e",
                                      "--finetune", "f.pth", "--resume", "x/checkpoint.pth", "--overwrite", "-b", "8",
                                      "--resume", "--epochs", "3"])
    got = rerun_command(drop={"--overwrite", "--resume", "--out", "--output", "--experiment", "--finetune"},
                        add=("--out", "o/e", "--resume"))
    assert got == "python cli.py train --data d -b 8 --epochs 3 --out o/e --resume"


# ---- 6. --workers fits the machine ---------------------------------------------------------------
def test_default_workers_are_this_machines_cpus_capped(monkeypatch):
    import pipeline.options as options
    from pipeline.options import WORKERS_CAP, default_workers

    monkeypatch.setattr(options.os, "sched_getaffinity", lambda _pid: {0, 1}, raising=False)
    assert default_workers() == 2
    monkeypatch.setattr(options.os, "sched_getaffinity", lambda _pid: set(range(96)), raising=False)
    assert default_workers() == WORKERS_CAP


@pytest.mark.parametrize("command", ["train", "precompute"])
def test_workers_help_names_the_machine_default(command):
    from pipeline.options import default_workers

    res = invoke(command, "--help")
    assert "-j, --workers" in res.output and f"{default_workers()}: this machine's CPUs" in res.output
    assert "-b, --batch-size" in res.output


def test_train_without_workers_uses_the_machine_default(tiny, tmp_path):
    from pipeline.options import default_workers

    args = [a for a in flags(tiny, "--out", tmp_path / "run", "--epochs", "1") if a != "--workers"]
    args.remove("0")
    ok(invoke(*args))
    assert ckpt_config(tmp_path / "run")["workers"] == default_workers()


# ---- 7. timm's spellings ---------------------------------------------------------------------------
def test_model_kwargs_are_read_as_timm_reads_them():
    from pipeline.options import parse_model_kwargs

    assert parse_model_kwargs(["depth=2", "drop_rate=0.1", "class_token=False", "global_pool=avg", "x=(4, 4)"]) == \
        {"depth": 2, "drop_rate": 0.1, "class_token": False, "global_pool": "avg", "x": (4, 4)}
    assert parse_model_kwargs(['{"depth": 2, "embed_dim": 64}', "depth=3"]) == {"depth": 3, "embed_dim": 64}


@pytest.mark.parametrize("bad, fragment", [("depth", "neither key=value nor a JSON object"),
                                           ("=2", "neither key=value"), ("{depth: 2}", "is not JSON"),
                                           ("[1, 2]", "neither"), ('{"a": 1', "is not JSON")])
def test_bad_model_kwargs_are_one_line(tiny, tmp_path, bad, fragment):
    one_line_error(invoke("train", "--data", tiny["data"], "--out", tmp_path / "r", "--model-kwargs", bad),
                   "--model-kwargs", fragment)


def test_timm_spellings_train_the_same_run(tiny, tmp_path):
    """-b, -j, --model-kwargs key=value..., --output/--experiment, --resume PATH."""
    cmd = ["train", "--data", tiny["data"], "--labels", tiny["store"], "--model", MODEL, "--model-kwargs",
           *TINY_WORDS, "-b", "8", "-j", "0", "--max-steps-per-epoch", "1", "--epochs", "2"]
    ok(invoke(*cmd, "--output", tmp_path / "output", "--experiment", "tiny", "--stop-after-epochs", "1"))
    run = tmp_path / "output" / "tiny"
    config = ckpt_config(run)
    assert config["model_kwargs"] == TINY and config["batch_size"] == 8 and config["workers"] == 0
    err = ok(invoke(*cmd, "--resume", run / "checkpoint.pth"))  # no --out: the checkpoint's folder
    assert f"resuming at epoch 1 of 2 from {run / 'checkpoint.pth'}" in err
    assert [json.loads(x)["epoch"] for x in lines_of(run, "metrics.jsonl")] == [0, 1]
    one_line_error(invoke(*cmd, "--out", tmp_path / "x", "--output", tmp_path / "y"), "--out", "--output")
    one_line_error(invoke(*cmd), "--out RUN")


def test_precompute_takes_timm_spellings(tiny, tmp_path, monkeypatch):
    seen = {}

    def capture(cfg):
        seen["cfg"] = cfg

    monkeypatch.setattr("pipeline.stage1.precompute.run_precompute", capture)
    ok(invoke("precompute", "--data", tiny["data"], "--out", tmp_path / "s", "--teacher", "resnet10t", "-b", "16",
              "-j", "1", "--model-kwargs", "num_classes=3", "drop_rate=0.0"))
    cfg = seen["cfg"]
    assert (cfg.batch_size, cfg.workers, cfg.model_kwargs) == (16, 1, {"num_classes": 3, "drop_rate": 0.0})


def test_train_help_names_every_run_file():
    assert "summary.csv" in invoke("train", "--help").output
