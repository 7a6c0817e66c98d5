"""What a run folder holds and what --resume may continue: checked before anything is built.

A new run never writes into another run's folder (``check_run_folder``); --resume loads a
checkpoint as data only, refuses one of another model, source, store or epoch stream, and lets
the checkpoint's settings win over the command line's, except the run-time ones
(``RUNTIME_FIELDS``). ``cfg`` is a ``student.config.TrainConfig`` throughout.
"""

from __future__ import annotations

import dataclasses
import json
import os

from timm.utils import ModelEmaV3

from storage import checkpoint
from storage.checkpoint import TrainCheckpoint

from .errors import TrainError, console
from .results import METRICS_FILE, SUMMARY_CSV, SUMMARY_FILE

CHECKPOINT = checkpoint.FILENAME  # its schema, save and load: storage/checkpoint.py
# What a run writes in its folder: a folder holding any of them holds a run (--resume or --overwrite).
RUN_FILES = (CHECKPOINT, METRICS_FILE, SUMMARY_CSV, SUMMARY_FILE)

# Fields that may differ on --resume without changing what is trained.
RUNTIME_FIELDS = {"out", "resume", "overwrite", "workers", "device", "progress", "log_every", "stop_after_epochs",
                  "data", "labels", "val", "eval_batch_size", "compile", "source_cache", "source_cache_gib"}
# Fields whose change on --resume is an error, not an override.
IDENTITY_FIELDS = ("model", "model_kwargs")


def resume_path(cfg) -> str | None:
    """The checkpoint --resume continues from: RUN's own, or the one --resume PATH names; None for a new run."""
    if not cfg.resume:
        return None
    return cfg.resume if isinstance(cfg.resume, str) else os.path.join(cfg.out, CHECKPOINT)


def run_files(run: str) -> list[str]:
    """The run files (RUN_FILES) that the folder ``run`` holds."""
    return [name for name in RUN_FILES if os.path.exists(os.path.join(run, name))]


def check_run_folder(cfg) -> None:
    """A new run never writes into another run's folder: its checkpoint would be replaced and its
    metrics.jsonl and summary.csv appended to, so that `plot` draws the epochs of two runs as one."""
    if cfg.resume and cfg.overwrite:
        raise TrainError("--resume continues the run in --out, --overwrite deletes it: pass one of them")
    continues_here = cfg.resume and os.path.dirname(os.path.abspath(resume_path(cfg))) == os.path.abspath(cfg.out)
    found = run_files(cfg.out)
    if found and not continues_here and not cfg.overwrite:
        raise TrainError(f"--out {cfg.out} already holds a run ({', '.join(found)}); continue it with --resume, "
                         "start over with --overwrite (deletes those files, keeps the rest), or pass a new --out")


def clear_run_files(run: str) -> list[str]:
    """--overwrite: delete the previous run's files (only RUN_FILES; anything else in the folder stays)."""
    found = run_files(run)
    for name in found:
        os.remove(os.path.join(run, name))
    return found


def last_saved_epoch(run: str) -> int | None:
    """The epoch of the last line of RUN/metrics.jsonl (written right after its checkpoint), or None."""
    try:
        with open(os.path.join(run, METRICS_FILE)) as f:
            last = f.read().rstrip("\n").rpartition("\n")[2]
        return int(json.loads(last)["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_checkpoint(cfg, say=console) -> tuple:
    """With --resume: the checkpoint's config (which wins, a TrainConfig as ``cfg`` is) and its state
    (a TrainCheckpoint; None for a new run)."""
    path = resume_path(cfg)
    if path is None:
        return cfg, None
    if not os.path.isfile(path):
        raise TrainError(f"--resume: there is no checkpoint {path}; drop --resume to start a new run"
                         + ("" if isinstance(cfg.resume, str) else " in --out, or pass --resume RUN/checkpoint.pth"))
    # a torn, foreign or code-carrying file is never loaded: one line, not torch's advice
    obj = checkpoint.load_data(path, context=f"--resume: {path} is not a readable checkpoint of this tool",
                               fix="restore it or delete it to start over", error=TrainError)
    lacks = checkpoint.missing(obj)
    if lacks:
        raise TrainError(f"--resume: {path} is not a checkpoint written by `cli.py train` (it lacks "
                         f"{', '.join(lacks)}); use a new --out, or --finetune to start from its weights")
    ckpt = TrainCheckpoint.from_dict(obj, path)
    try:
        saved = type(cfg)(**ckpt.config)  # the class, not an import: train.py imports this module
    except TypeError as e:
        raise TrainError(f"--resume: {path} holds a config this version does not know ({e}); use a new --out") from None
    for name in IDENTITY_FIELDS:
        if getattr(saved, name) != getattr(cfg, name):
            raise TrainError(f"--resume: {cfg.out} was trained with {name}={getattr(saved, name)!r}, the command "
                             f"line says {getattr(cfg, name)!r}; use a new --out or the checkpoint's {name}")
    if (saved.labels is None) != (cfg.labels is None):
        raise TrainError(f"--resume: {cfg.out} was trained {'with --labels' if saved.labels else 'without --labels'}; "
                         "the command line differs; use a new --out or the same label store")
    merged = dataclasses.replace(saved, **{k: getattr(cfg, k) for k in RUNTIME_FIELDS})
    overridden = [f"{f.name}={getattr(saved, f.name)!r} (command line: {getattr(cfg, f.name)!r})"
                  for f in dataclasses.fields(cfg)
                  if f.name not in RUNTIME_FIELDS and getattr(saved, f.name) != getattr(cfg, f.name)]
    if overridden:
        say(f"warning: --resume: the checkpoint's settings win: {'; '.join(overridden)}")
    return merged, ckpt


def load_ema(ema: ModelEmaV3, ckpt: TrainCheckpoint) -> None:
    """The EMA weights of a checkpoint (under the current key or, unwrapped, the one older checkpoints used)."""
    if ckpt.ema is not None:
        ema.module.load_state_dict(ckpt.ema)
    else:
        raise TrainError("--resume: the checkpoint's config says ema=True but it holds no EMA weights; "
                         "restore the checkpoint or use a new --out")


def check_identity(ckpt: TrainCheckpoint, identity: dict, cfg) -> None:
    """A resumed run must read the same source and the same store, wherever they now live."""
    have = ckpt.identity
    if have["source"] != identity["source"]:
        raise TrainError(f"--resume: --data {cfg.data} is not the source {cfg.out} was trained on "
                         "(manifest fingerprint differs); point --data at that source")
    if have.get("stream") != identity["stream"]:
        raise TrainError(f"--resume: {cfg.out} was trained on another epoch stream ({have.get('stream')} vs "
                         f"{identity['stream']}, another deit-lockstep version); use a new --out")
    if have["store"] != identity["store"]:
        raise TrainError(f"--resume: --labels {cfg.labels} is not the label store {cfg.out} was trained from "
                         "(store spec differs); point --labels at that store")
