"""Checkpoints: the one module that knows the train checkpoint's schema, writes it, and reads any
weights file (ours, timm's, DeiT's) as data.

A train checkpoint (``RUN/checkpoint.pth``) is a dict saved by ``torch.save``. Its keys are timm's
where timm has one (``model``, ``state_dict_ema``: ``timm.models.load_checkpoint(model, path,
use_ema=True)`` takes the EMA weights, and the raw ones when a run kept no EMA), ours for the rest:

    format, format_version    FORMAT, FORMAT_VERSION: mark the file as ours (written since version 1)
    model                     the raw weights of the bare model (no DDP/compile prefixes)
    state_dict_ema            the EMA weights, or None when the run kept none. Checkpoints before
                              this key held them under "ema", as ModelEmaV3's own state_dict
                              ("module." prefixes); TrainCheckpoint.from_dict reads both
    optimizer, scheduler, scaler   their state_dicts
    epoch, step               epochs done, optimizer steps done
    config                    the run's TrainConfig as a dict
    identity                  what a resumed run must match (source, epoch stream, store spec)
    recipe, class_names       what export and a teacher need without the source or the store

Checkpoints written before ``format`` existed are ours too when they carry ``identity`` and
``step``, keys no timm or DeiT checkpoint has, or a ``config`` dict (the rule the teacher read them
by before this module existed); they read as version 1.

storage/ imports neither pipeline/ nor student/: config, identity and recipe are plain dicts
here; student/resume.py makes a TrainConfig of the config, pipeline/stage1/weights.py a Recipe.
Every read is ``torch.load(weights_only=True)``: a checkpoint is data, and unpickling never runs
its code.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .errors import UserError
from .fsutil import atomic_file

FILENAME = "checkpoint.pth"
FORMAT = "deit-lockstep-train-checkpoint"
# 1: the keys below. A checkpoint from before the format key reads as 1.
FORMAT_VERSION = 1

FORMAT_KEY, VERSION_KEY = "format", "format_version"
MODEL, EMA, OLD_EMA = "model", "state_dict_ema", "ema"
OPTIMIZER, SCHEDULER, SCALER = "optimizer", "scheduler", "scaler"
EPOCH, STEP, CONFIG, IDENTITY = "epoch", "step", "config", "identity"
RECIPE, CLASS_NAMES = "recipe", "class_names"
# What resume needs (and the EMA weights, under either name); a checkpoint without them is refused
# before anything is read from it.
RESUME_KEYS = (MODEL, OPTIMIZER, SCHEDULER, SCALER, EPOCH, STEP, CONFIG, IDENTITY, EMA)

# Where the weights sit in the checkpoints a user may hand us, in the order we look: ours and DeiT's
# ("model", raw weights first: what a checkpoint's reported accuracy usually refers to), timm's
# ("state_dict"), then the EMA weights (DeiT's "model_ema", timm's "state_dict_ema", our old "ema").
CONTAINERS = (MODEL, "state_dict", "model_ema", EMA, OLD_EMA)
# Wrappers that rename every key: DistributedDataParallel and torch.compile (and ModelEmaV3's "module.").
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be read or lacks what its reader needs: one line, cause and fix."""


@dataclass
class TrainCheckpoint:
    """What ``cli.py train`` saves after each epoch (see the module doc for the keys)."""

    model: dict
    optimizer: dict
    scheduler: dict
    scaler: dict
    epoch: int
    step: int
    config: dict
    identity: dict
    ema: dict | None = None
    recipe: dict | None = None
    class_names: list[str] | None = None
    version: int = FORMAT_VERSION

    def to_dict(self) -> dict:
        return {FORMAT_KEY: FORMAT, VERSION_KEY: FORMAT_VERSION, MODEL: self.model, EMA: self.ema,
                OPTIMIZER: self.optimizer, SCHEDULER: self.scheduler, SCALER: self.scaler, EPOCH: self.epoch,
                STEP: self.step, CONFIG: self.config, IDENTITY: self.identity, RECIPE: self.recipe,
                CLASS_NAMES: self.class_names}

    @classmethod
    def from_dict(cls, obj: Mapping, path: str = "the checkpoint") -> TrainCheckpoint:
        """Any version of the dict; entries it lacks are None (callers check ``missing`` for what they need).
        A checkpoint of a newer format than this code's is refused."""
        version = obj.get(VERSION_KEY, 1)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise CheckpointError(f"{path} is a checkpoint of format version {version!r}, newer than this code's "
                                  f"{FORMAT_VERSION}; use the deit-lockstep version that wrote it")
        ema = obj.get(EMA)
        if ema is None and obj.get(OLD_EMA) is not None:  # ModelEmaV3's state_dict: "module." on every key
            ema = strip_wrapper_prefixes(dict(obj[OLD_EMA]))
        return cls(model=obj.get(MODEL), optimizer=obj.get(OPTIMIZER), scheduler=obj.get(SCHEDULER),
                   scaler=obj.get(SCALER), epoch=obj.get(EPOCH), step=obj.get(STEP), config=obj.get(CONFIG),
                   identity=obj.get(IDENTITY), ema=ema, recipe=obj.get(RECIPE), class_names=obj.get(CLASS_NAMES),
                   version=version)


def save(path, ckpt: TrainCheckpoint) -> None:
    """Write the checkpoint durably: a kill or a full disk at any moment leaves the previous one or this
    one, whole, and no temporary (storage.fsutil.atomic_file: fsync, rename, fsync the directory).

    Ctrl-C is held while it writes and arrives right after: raised inside torch's zip writer, a
    KeyboardInterrupt surfaces as a RuntimeError ("unexpected pos"), a traceback and exit 1 instead of
    the run's "interrupted: ... resume with" line and exit 130."""
    with _sigint_held(), atomic_file(path) as f:
        torch.save(ckpt.to_dict(), f)


@contextlib.contextmanager
def _sigint_held():
    """Ctrl-C noted, not raised, while the block runs; raised (by the handler that was there) at its end."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread gets signals
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            if callable(previous):
                previous(signal.SIGINT, caught[0])  # Python's default handler raises KeyboardInterrupt here
            elif previous == signal.SIG_DFL:
                os.kill(os.getpid(), signal.SIGINT)


def load_data(path, *, context: str, fix: str, error: type[Exception] = CheckpointError) -> Any:
    """The object in a .pth/.pt file (``torch.load(weights_only=True)``: data, never code) or a
    .safetensors file. Any failure is ``error(f"{context} (<cause>); {fix}")``, one line, without
    torch's advice to retry with unpickling switched on."""
    path = os.fspath(path)
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path, device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch/safetensors raise many types for bad files
        raise error(f"{context} ({type(e).__name__}: {load_error_cause(e)}); {fix}") from None


def is_train_checkpoint(obj: Any) -> bool:
    """True for a dict ``cli.py train`` wrote, of any version (see the module doc); False for bare
    state_dicts, safetensors and other tools' checkpoints."""
    if not isinstance(obj, Mapping):
        return False
    # Older versions carry no marker: theirs is the identity with a step, or (as the teacher always
    # read them) a config dict.
    return obj.get(FORMAT_KEY) == FORMAT or (IDENTITY in obj and STEP in obj) or isinstance(obj.get(CONFIG), Mapping)


def missing(obj: Any, need=RESUME_KEYS) -> list[str]:
    """The keys of ``need`` that obj lacks, in order. The EMA weights count under either name; a
    config that is not a dict counts as missing."""
    if not isinstance(obj, Mapping):
        return list(need)
    out = []
    for key in need:
        if key == EMA:
            if EMA not in obj and OLD_EMA not in obj:
                out.append(key)
        elif key not in obj or (key == CONFIG and not isinstance(obj[key], Mapping)):
            out.append(key)
    return out


def unwrap_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    """The state_dict in a loaded file: the object itself when it is one, else the first of CONTAINERS
    that holds one; DDP's ``module.`` and torch.compile's ``_orig_mod.`` prefixes removed. None when
    there is none."""
    if not isinstance(obj, Mapping):
        return None
    if not _is_state_dict(obj):
        obj = next((obj[k] for k in CONTAINERS if isinstance(obj.get(k), Mapping) and _is_state_dict(obj[k])), None)
        if obj is None:
            return None
    return strip_wrapper_prefixes(dict(obj))


def strip_wrapper_prefixes(state: dict) -> dict:
    """Remove wrapper prefixes that every key carries, in any nesting (DDP of a compiled model...). A
    prefix only some keys carry is a real module name and stays."""
    changed = True
    while changed and state:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


def _is_state_dict(d: Mapping) -> bool:
    return bool(d) and all(isinstance(v, torch.Tensor) for v in d.values())


def load_error_cause(e: BaseException) -> str:
    """Why torch.load (or safetensors) refused a file, in one line, leaving out torch's advice to
    retry with unpickling switched on: that would run the file's code, which this tool never does."""
    advice = ("weights_only", "trusted source", "documentation", "add_safe_globals", "safe_globals")
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    cause = next((ln for ln in lines if not any(a in ln for a in advice)), type(e).__name__)
    if "Weights only load failed" in str(e):
        cause = f"it holds Python objects, not only tensors, and is never unpickled ({cause})"
    return cause if len(cause) <= 200 else cause[:197] + "..."
