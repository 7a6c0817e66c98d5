"""Helpers for test_faults.py, run as a script in its own process.

    python tests/faults_support.py kill-precompute CONFIG.json KILLS SEED
    python tests/faults_support.py cli HOOK N PRECOMPUTE-ARGS...   (one CLI run with one hook: cli())

A "zygote": imports torch, timm and the pipeline once, then forks one precompute worker per
attempt and SIGKILLs it, either at a random time (from the parent, like an OOM killer or a
preempted node) or at a named moment the child reaches (the child SIGKILLs itself there, so the
moment is exact and the test does not depend on timing):

    decode        inside the decode of the n-th image
    forward       inside the teacher's n-th forward (a hook on one of its stages)
    chunk-tmp     a zarr chunk fully written to its temporary file, not yet renamed into place
    chunk-fsync   a chunk in place, other chunks of the unit (or its fsyncs) not yet done
    marker        every chunk of a unit durable, its completion marker not yet written

Forking avoids paying the torch/timm import for each of the 20 attempts. No product code is
changed: the hooks are monkeypatches inside the forked child only. Prints one JSON line:
the list of (how, n, outcome) per attempt, outcome = "killed" or "finished".
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

POINTS = ("decode", "forward", "chunk-tmp", "chunk-fsync", "marker")


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def _install(point: str, n: int) -> None:
    """Monkeypatch the forked child so that it SIGKILLs itself at the n-th time it reaches point."""
    import pathlib

    import pipeline.stage1.precompute as pc
    import pipeline.stage1.units as units
    import storage.zarr_backend as zb

    hits = [0]

    def hit():
        hits[0] += 1
        if hits[0] >= n:
            _die()

    if point == "decode":
        orig = units.decode_image

        def decode(data):
            hit()
            return orig(data)
        units.decode_image = decode
    elif point == "forward":
        orig_create = pc.create_teacher

        def create(*a, **kw):
            t = orig_create(*a, **kw)
            stage = [m for m in t.model.children()][len(list(t.model.children())) // 2]
            stage.register_forward_hook(lambda *_: hit())
            return t
        pc.create_teacher = create
    elif point == "chunk-tmp":
        orig_replace = pathlib.Path.replace

        def replace(self, target):
            if str(self).endswith(".partial"):
                hit()
            return orig_replace(self, target)
        pathlib.Path.replace = replace
    elif point == "chunk-fsync":
        orig_fsync = zb.fsync_path

        def fsync(path):
            hit()
            return orig_fsync(path)
        zb.fsync_path = fsync
    elif point == "marker":
        orig_aw = zb.atomic_write

        def aw(path, data):
            hit()
            return orig_aw(path, data)
        zb.atomic_write = aw
    else:
        raise ValueError(point)


def kill_precompute(config_path: str, kills: int, seed: int, max_delay: float = 0.8) -> list:
    import torch

    from pipeline.stage1.precompute import PrecomputeConfig, run_precompute

    cfg = PrecomputeConfig(**json.load(open(config_path)))
    rng = random.Random(seed)
    # n is drawn within about two units' worth of hits (a unit of 8 samples: 8 decodes, one forward
    # of 8 views, 3 chunks, 6 fsyncs, one marker), so each attempt adds a unit or two and the 20
    # attempts spread over the whole run instead of finishing it early.
    limits = {"decode": 16, "forward": 2, "chunk-tmp": 6, "chunk-fsync": 12, "marker": 2, "random": 0}
    plan = [POINTS[i % len(POINTS)] for i in range(kills // 2)] + ["random"] * (kills - kills // 2)
    rng.shuffle(plan)
    outcomes = []
    for how in plan:
        n = rng.randint(1, limits[how]) if how != "random" else 0
        delay = rng.uniform(0.05, max_delay)
        pid = os.fork()
        if pid == 0:  # the precompute worker
            code = 0
            try:
                torch.set_num_threads(1)
                if how != "random":
                    _install(how, n)
                run_precompute(cfg)
            except BaseException as e:  # noqa: BLE001 -- report, never return into the parent's loop
                print(f"child failed: {type(e).__name__}: {e}", file=sys.stderr)
                code = 3
            finally:
                os._exit(code)
        if how == "random":
            time.sleep(delay)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            outcome = "killed" if os.WTERMSIG(status) == signal.SIGKILL else f"signal {os.WTERMSIG(status)}"
        else:
            outcome = "finished" if os.WEXITSTATUS(status) == 0 else f"exit {os.WEXITSTATUS(status)}"
        units = os.path.join(cfg.out, "units")
        done = len([f for f in os.listdir(units) if not f.startswith(".")]) if os.path.isdir(units) else 0
        outcomes.append([how, n, round(delay, 3) if how == "random" else None, outcome, done])
    return outcomes


def slow_precompute(config_path: str, seconds: float) -> None:
    """A fleet member whose teacher takes `seconds` longer per batch: a slow GPU, so that other
    processes can act while it is still writing."""
    import pipeline.stage1.labelling as lab
    import pipeline.stage1.precompute as pc

    cfg = pc.PrecomputeConfig(**json.load(open(config_path)))
    orig = lab._label

    def label(*a, **kw):
        time.sleep(seconds)
        return orig(*a, **kw)
    lab._label = label
    print(pc.run_precompute(cfg).report())


def pause_at_chunk(n: int) -> None:
    """Hold this process as it is about to write the n-th zarr chunk of its run (the chunks before it PUT or
    written, the unit's marker not): print PAUSED, wait for a line on stdin, go on. The parent acts (kills
    the server) while the worker is mid-unit, at a known point."""
    import zarr

    orig, calls = zarr.Array.__setitem__, [0]

    def setitem(self, *a, **kw):
        calls[0] += 1
        if calls[0] == n:
            print("PAUSED", flush=True)
            sys.stdin.readline()
        return orig(self, *a, **kw)
    zarr.Array.__setitem__ = setitem


def cli(hook: str, n: int, args: list) -> None:
    """The deit-lockstep CLI itself (its error reporting and exit codes) with one hook installed: a precompute
    point of POINTS where it SIGKILLs itself the n-th time, "pause" before the n-th chunk (pause_at_chunk), or
    "slow-index" (n seconds more to index the source)."""
    from cli import main

    if hook == "pause":
        pause_at_chunk(n)
    elif hook == "slow-index":  # the source takes n seconds longer to index: others arrive while it does
        import pipeline.stage1.index_once as index_once

        real = index_once._index
        index_once._index = lambda cfg: (time.sleep(n), real(cfg))[1]
    else:
        _install(hook, n)
    main(args)


def _install_train(how: str, n: int) -> None:
    import io

    import torch

    import student.train as st

    hits = [0]

    def hit():
        hits[0] += 1
        return hits[0] >= n

    if how == "step":  # inside an epoch: the n-th training step's loss
        orig_loss = st.deit_loss_terms

        def loss(*a, **kw):
            if hit():
                _die()
            return orig_loss(*a, **kw)
        st.deit_loss_terms = loss
    elif how == "torn-checkpoint":  # the n-th checkpoint half written, then the kill
        orig_save = torch.save

        def save(obj, f, *a, **kw):
            if not hit():
                return orig_save(obj, f, *a, **kw)
            buf = io.BytesIO()
            orig_save(obj, buf, *a, **kw)
            half = buf.getvalue()[: len(buf.getvalue()) // 2]
            if hasattr(f, "write"):  # storage.checkpoint streams into its temporary's open file
                f.write(half)
                f.flush()
            else:
                with open(f, "wb") as out:
                    out.write(half)
                    out.flush()
            _die()
        torch.save = save
    elif how == "before-replace":  # the n-th checkpoint whole in its temporary, not yet in place
        orig_replace = os.replace

        def replace(src, dst, *a, **kw):
            if str(dst).endswith("checkpoint.pth") and hit():
                _die()
            return orig_replace(src, dst, *a, **kw)
        os.replace = replace
    elif how != "none":
        raise ValueError(how)


def kill_train(config_path: str, plan: list) -> list:
    """Run train (resume=True) once per (how, n) in plan, each in a forked child killed at that
    moment; returns (how, outcome, checkpoint epoch afterwards) per attempt."""
    import torch

    from student.train import TrainConfig, train

    cfg = TrainConfig(**json.load(open(config_path)))
    out = []
    for how, n in plan:
        pid = os.fork()
        if pid == 0:
            code = 0
            try:  # torch's default threads, as the uninterrupted run: other sums would round otherwise
                _install_train(how, n)
                # --resume once there is a checkpoint: with none it is an error, not a fresh start
                train(dataclasses.replace(cfg, resume=os.path.exists(os.path.join(cfg.out, "checkpoint.pth"))))
            except BaseException as e:  # noqa: BLE001
                print(f"child failed: {type(e).__name__}: {e}", file=sys.stderr)
                code = 3
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            outcome = "killed" if os.WTERMSIG(status) == signal.SIGKILL else f"signal {os.WTERMSIG(status)}"
        else:
            outcome = "finished" if os.WEXITSTATUS(status) == 0 else f"exit {os.WEXITSTATUS(status)}"
        path = os.path.join(cfg.out, "checkpoint.pth")
        epoch = torch.load(path, map_location="cpu", weights_only=True)["epoch"] if os.path.exists(path) else None
        out.append([how, outcome, epoch])
    return out


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "kill-precompute":
        print(json.dumps(kill_precompute(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
    elif cmd == "slow-precompute":
        slow_precompute(sys.argv[2], float(sys.argv[3]))
    elif cmd == "cli":  # cli HOOK N ARGS...
        cli(sys.argv[2], int(sys.argv[3]), sys.argv[4:])
    elif cmd == "kill-train":
        print(json.dumps(kill_train(sys.argv[2], json.loads(sys.argv[3]))))
    else:
        raise SystemExit(f"unknown command {cmd}")
