"""Checks for what a store reads back from its own files (store.json, markers, leases, meta, tar headers).

Everything a store reads from disk is hostile until checked: a value of the wrong type, a huge number
or a NaN must stop at the file it came from with one line, never reach an allocation, a loop bound or
os.kill. Each function takes the parsed JSON value and a dotted name for the message
(``spec.views``), and returns the value converted (an int stays an int, a list becomes a tuple) or
raises Invalid. Callers add the file's path: ``Invalid`` never knows it.

The bounds are what a real store can need, with room, so that no value read from a file can make a
reader allocate or loop beyond what the store's real size implies.
"""

from __future__ import annotations

import math

from .errors import UserError

# num_classes, for stores and sources alike (pipeline.source_errors uses this bound): a label read from a file
# is range-checked against it before anything is sized by it (class names, one-hot targets of [batch, C], the
# classifier), so a label of 2**31 is one line, not an allocation per class until the OOM killer steps in.
# ImageNet-21k has 21,841 classes, face-ID sets ~0.7M identities; 2**20 leaves room and bounds a [64, C]
# float32 target at 256 MiB.
MAX_CLASSES = 2 ** 20
# views: the CLI's MAX_EPOCHS (pipeline.options; storage imports nothing of ours, tests check they agree):
# epoch e reads view e mod V, so no run can use more views than epochs.
MAX_VIEWS = 1_000_000
# samples per shard: a 16M-sample shard is already one shard for a whole ImageNet-21k; shards: ImageNet-21k
# in shards of 16 samples.
MAX_SHARD_SIZE = 2 ** 24
MAX_SHARDS = 2 ** 20
MAX_TEXT = 4096  # a class name, a worker id, a host name, a chunk key
MAX_SEED = 2 ** 63 - 1  # pipeline.options.SEED


class Invalid(UserError, ValueError):
    """A value read from a store file is not what the store writes there; the message names the field."""


class UnitDamaged(UserError):
    """A unit's record or data does not prove its labels; the message says what, without the fix (each
    backend's reader turns it into a StoreCorrupt naming the unit and the fix)."""


def obj(value, name: str) -> dict:
    if not isinstance(value, dict):
        raise Invalid(f"{name} is {_kind(value)}, expected a JSON object")
    return value


def field(d: dict, key: str, name: str):
    if key not in d:
        raise Invalid(f"{name} has no {key!r}")
    return d[key]


def integer(value, name: str, lo: int, hi: int) -> int:
    """A JSON integer (not a bool, not a float, not a string of digits) in [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise Invalid(f"{name} is {_kind(value)}, expected an integer")
    if not lo <= value <= hi:
        raise Invalid(f"{name}={_short(value)} is outside [{lo}, {hi}]")
    return value


def number(value, name: str, lo: float, hi: float) -> float:
    """A finite JSON number in [lo, hi] (NaN and infinities, which Python's json accepts, are refused)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Invalid(f"{name} is {_kind(value)}, expected a number")
    try:
        v = float(value)
    except OverflowError:  # an integer beyond float range
        raise Invalid(f"{name}={_short(value)} is outside [{lo:g}, {hi:g}]") from None
    if not math.isfinite(v) or not lo <= v <= hi:
        raise Invalid(f"{name}={_short(value)} is not a finite number in [{lo:g}, {hi:g}]")
    return v


def text(value, name: str, max_len: int = MAX_TEXT, printable: bool = True) -> str:
    if not isinstance(value, str):
        raise Invalid(f"{name} is {_kind(value)}, expected a string")
    if len(value) > max_len:
        raise Invalid(f"{name} is {len(value)} characters long, more than {max_len}")
    if printable and not value.isprintable():
        raise Invalid(f"{name}={_short(value)} holds unprintable characters")
    return value


def choice(value, name: str, allowed) -> str:
    if value not in tuple(allowed) or not isinstance(value, str):
        raise Invalid(f"{name}={_short(value)} is not one of {list(allowed)}")
    return value


def array(value, name: str, max_len: int, item, min_len: int = 0) -> tuple:
    """A JSON list of at most max_len items, each checked by item(value, name)."""
    if not isinstance(value, list):
        raise Invalid(f"{name} is {_kind(value)}, expected a list")
    if not min_len <= len(value) <= max_len:
        raise Invalid(f"{name} has {len(value)} items, expected {min_len} to {max_len}")
    return tuple(item(v, f"{name}[{i}]") for i, v in enumerate(value))


def int_pair(value, name: str, hi: int) -> tuple[int, int]:
    return array(value, name, 2, lambda v, n: integer(v, n, 0, hi), min_len=2)


def _kind(value) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__) + f" ({_short(value)})"


def _short(value, limit: int = 40) -> str:
    s = repr(value)
    return s if len(s) <= limit else s[: limit - 3] + "..."
