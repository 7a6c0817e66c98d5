"""The rule every command that writes a file checks first: an output never destroys an input.

``check_output_path(path, kind, inputs=...)`` refuses, in one line naming the option and the fix,
before any work is done:

* an output whose extension is not one of its kind's (``--export m.pth``: a parquet table named like
  a checkpoint, ``plot --out noext``), so that what a file holds is what its name says;
* an output that is an existing directory;
* an output that is one of the command's inputs (``export RUN --config RUN/checkpoint.pth``), the
  same file under another name included (symlinks, ``..``);
* an output inside a label store or a run folder (``inspect STORE --export STORE/manifest.parquet``):
  those folders hold only what precompute and train write, and a foreign file there is one that
  ``--overwrite`` and ``--resume`` would have to reckon with.

It sits in storage/ (which imports nothing of ours) so that stage-one tools and student/ share it.
"""

from __future__ import annotations

import os

from .base import STORE_JSON
from .errors import UserError

# What each kind of output may be named; the first is the one the fix suggests.
EXTENSIONS = {
    "parquet": (".parquet",),
    "json": (".json",),
    "figure": (".png", ".pdf", ".svg"),        # matplotlib figures (plot)
    "image": (".png", ".jpg", ".jpeg", ".webp"),  # Pillow images (inspect --render)
    "safetensors": (".safetensors",),
}
HOLDS = {"parquet": "a parquet table", "json": "JSON", "figure": "a figure", "image": "an image",
         "safetensors": "safetensors weights"}
# A folder holding one of these is a run folder of `cli.py train` (storage.checkpoint.FILENAME and
# student.results.METRICS_FILE, spelled here so that this check loads neither torch nor student/).
RUN_FILES = ("checkpoint.pth", "metrics.jsonl")


class OutputError(UserError, ValueError):
    """An output path that would overwrite an input or hide in a store or run: one line, exit 2."""


def _real(path: str) -> str:
    return os.path.realpath(os.path.expanduser(str(path)))


def enclosing_folder(path: str) -> tuple[str, str] | None:
    """("label store" | "run folder", folder) when path would land in one, else None: a store at any
    depth (every file under it is the store's), a run folder as the file's own folder (train writes
    nothing deeper)."""
    folder = os.path.dirname(_real(path))
    if any(os.path.isfile(os.path.join(folder, name)) for name in RUN_FILES):
        return "run folder", folder
    while True:
        if os.path.isfile(os.path.join(folder, STORE_JSON)):
            return "label store", folder
        parent = os.path.dirname(folder)
        if parent == folder:
            return None
        folder = parent


def check_output_path(path: str, kind: str, *, option: str = "--out", inputs=()) -> None:
    """Raise OutputError unless path may be written as an output of this kind (see the module doc).

    inputs: the paths the command reads (files or folders); a folder input also protects every file
    inside it."""
    allowed = EXTENSIONS[kind]
    ext = os.path.splitext(str(path))[1].lower()
    name = f"{option} {path}"
    real = _real(path)
    if os.path.isdir(real):
        raise OutputError(f"{name} is a directory; name a file in it, e.g. {option} "
                          f"{os.path.join(str(path), 'out' + allowed[0])}")
    given = [str(p) for p in inputs if p]
    for source in given:
        if real == _real(source):
            raise OutputError(f"{name} is the input {source}: writing it would destroy it; write it somewhere else")
    inside = enclosing_folder(real)
    if inside is not None:
        what, folder = inside
        beside = os.path.join(os.path.dirname(folder), os.path.basename(str(path)))
        raise OutputError(f"{name} is inside the {what} {folder}, which holds only what "
                          f"{'precompute' if what == 'label store' else 'train'} writes; write it beside the "
                          f"folder instead, e.g. {option} {beside}")
    for source in given:
        folder = _real(source)
        if os.path.isdir(folder) and real.startswith(folder.rstrip(os.sep) + os.sep):
            raise OutputError(f"{name} is inside the input folder {source}; write it outside it")
    if ext not in allowed:
        what = f", not {ext!r}" if ext else " (it has no extension)"
        names = allowed[0] if len(allowed) == 1 else f"{', '.join(allowed[:-1])} or {allowed[-1]}"
        raise OutputError(f"{name} must end in {names}{what}: the name says what the file holds ({HOLDS[kind]}); "
                          f"e.g. {option} {os.path.splitext(str(path))[0]}{allowed[0]}")
