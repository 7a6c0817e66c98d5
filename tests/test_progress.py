"""Progress in a log file is plain lines (pipeline/progress.py): the line bar's lines under a fake clock, the
choice between it and tqdm, and a real precompute and train with stderr to a pipe (no carriage return)."""

import io
import json
import os
import subprocess
import sys

from tqdm import tqdm

from pipeline.progress import LineProgress, progress_bar

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def lines_of(out: io.StringIO) -> list[str]:
    return out.getvalue().splitlines()


def test_a_line_at_the_first_update_then_at_most_every_interval_then_at_close():
    clock, out = FakeClock(), io.StringIO()
    bar = LineProgress(4800, "precompute", "view", every=10, file=out, clock=clock)
    bar.update(0)  # a fresh run's first call: the line that says a run started, and its size
    assert lines_of(out) == ["precompute: 0/4800 views (0%)"]
    for _ in range(3):  # 3 s of work: no new line before 10 s
        clock.now += 1
        bar.update(100)
    assert len(lines_of(out)) == 1
    clock.now += 7
    bar.update(900)  # 1200 views 10 s after the first line
    assert lines_of(out)[-1] == "precompute: 1200/4800 views (25%) 120.0 view/s ETA 0:00:30"
    clock.now += 10
    bar.set_postfix(loss="0.1234", lr="1.00e-03")
    bar.update(3600)
    assert lines_of(out)[-1] == "precompute: 4800/4800 views (100%) 360.0 view/s, loss=0.1234, lr=1.00e-03"
    bar.close()  # nothing moved since that line: no repeat
    bar.close()
    assert len(lines_of(out)) == 3


def test_close_gives_the_mean_rate_since_the_first_line_and_the_time_in_all():
    clock, out = FakeClock(), io.StringIO()
    with LineProgress(50, "epoch 0", "step", every=30, file=out, clock=clock) as bar:
        clock.now += 2  # the time before the first step (loader start) counts in "in all", not in the rate
        bar.update()
        for _ in range(9):
            clock.now += 0.5
            bar.update()
    assert lines_of(out) == ["epoch 0: 1/50 steps (2%)", "epoch 0: 10/50 steps (20%) 2.0 step/s, 0:00:06 in all"]


def test_a_resumed_runs_first_jump_does_not_inflate_the_rate():
    clock, out = FakeClock(), io.StringIO()
    bar = LineProgress(1000, "precompute", "view", every=5, file=out, clock=clock)
    bar.update(900)  # the views already stored, counted at once
    clock.now += 5
    bar.update(50)
    assert lines_of(out)[-1] == "precompute: 950/1000 views (95%) 10.0 view/s ETA 0:00:05"


def test_the_fleet_moves_n_and_refreshes_within_the_interval_rule():
    # precompute's show_fleet sets bar.n to the fleet's count and calls refresh()
    clock, out = FakeClock(), io.StringIO()
    bar = LineProgress(100, "precompute", "view", every=10, file=out, clock=clock)
    bar.update(0)
    clock.now += 4
    bar.n = 40
    bar.refresh()
    assert len(lines_of(out)) == 1
    clock.now += 6
    bar.refresh()
    assert lines_of(out)[-1] == "precompute: 40/100 views (40%) 4.0 view/s ETA 0:00:15"


def test_disabled_prints_nothing_and_write_prints_a_line():
    clock, out = FakeClock(), io.StringIO()
    bar = LineProgress(10, "epoch 0", "step", disable=True, file=out, clock=clock)
    bar.update(10)
    bar.write("hello")
    bar.close()
    assert out.getvalue() == ""
    bar = LineProgress(None, "epoch 0", "step", file=out, clock=clock)
    bar.write("a message")
    bar.update(3)
    assert lines_of(out) == ["a message", "epoch 0: 3 steps"]


def test_tqdm_on_a_terminal_lines_elsewhere():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    bar = progress_bar(10, "precompute", "view", file=Terminal(), dynamic_ncols=True, smoothing=0.05)
    assert isinstance(bar, tqdm)
    bar.close()
    assert isinstance(progress_bar(10, "precompute", "view", file=io.StringIO(), dynamic_ncols=True), LineProgress)


# ---- the real thing: stage one and stage two with stderr to a pipe ------------------------------------------
def test_precompute_and_train_log_plain_lines_to_a_pipe(tmp_path, wds_dir, tiny_teacher):
    """What a SLURM log or `make demo > log 2>&1` gets: progress lines, none holding a carriage return."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def run(*args):
        # bytes, not text=True: universal newlines would turn tqdm's carriage returns into line ends
        p = subprocess.run([sys.executable, "cli.py", *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                           timeout=600)
        assert p.returncode == 0, p.stderr[-3000:].decode(errors="replace")
        assert b"\r" not in p.stderr and b"\r" not in p.stdout, p.stderr[-500:]
        return p.stderr.decode().split("\n")

    store = tmp_path / "store"
    lines = run("precompute", "--data", wds_dir, "--out", store, "--teacher", "resnet10t", "--teacher-weights",
                tiny_teacher, "--model-kwargs", json.dumps({"num_classes": 3}), "--views", "2", "--topk", "3",
                "--input-size", "32", "--batch-size", "8", "--workers", "0", "--device", "cpu")
    progress = [ln for ln in lines if ln.startswith("precompute: ")]
    assert progress and progress[-1].startswith("precompute: 40/40 views (100%)"), lines
    lines = run("train", "--data", wds_dir, "--labels", store, "--out", tmp_path / "run", "--model",
                "deit_tiny_distilled_patch16_224", "--model-kwargs",
                json.dumps({"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}),
                "--distillation", "soft", "--epochs", "1", "--batch-size", "8", "--workers", "0", "--device", "cpu")
    progress = [ln for ln in lines if ln.startswith("epoch 0: ")]
    assert progress and "steps (100%)" in progress[-1] and "loss=" in progress[-1], lines
