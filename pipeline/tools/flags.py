"""Reading only the validity flags of a store, without decoding its labels (for the summary).

The flags are the smallest array of a store (one byte per view), so counting invalid views
exactly stays cheap on a store of any size: zarr reads the ``valid`` array alone, the webdataset
backend extracts only each unit tar's ``valid`` member. Both verify the member's crc32c before
trusting it; a unit whose flags do not decode is reported as unreadable.
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass, field

import crc32c
import numpy as np

from storage import INVALID, WRITTEN
from storage.base import unit_name


@dataclass
class Flags:
    written: int = 0
    invalid: int = 0
    unreadable: list[tuple[int, int]] = field(default_factory=list)

    def add(self, valid: np.ndarray) -> None:
        counts = np.bincount(valid.ravel(), minlength=3)
        self.written += int(counts[WRITTEN])
        self.invalid += int(counts[INVALID])


def count_flags(reader, units: set[tuple[int, int]]) -> Flags:
    """Written and invalid view counts over the given (complete) units."""
    if reader.backend == "zarr":
        return _zarr_flags(reader, units)
    if reader.backend == "wds":
        return _wds_flags(reader, units)
    raise ValueError(f"unknown store backend {reader.backend!r}")


def _zarr_flags(reader, units) -> Flags:
    import zarr

    from storage.zarr_backend import ARRAYS_DIR

    spec, out = reader.spec, Flags()
    arr = zarr.open_array(str(reader.path / ARRAYS_DIR), path="valid", mode="r")
    for block in range(spec.num_blocks):
        shards = [s for s in range(spec.num_shards) if (s, block) in units]
        if not shards:
            continue
        vs = spec.block_views(block)
        try:
            flags = arr[vs.start:vs.stop]  # one read of the whole block: every shard's chunk at once
        except Exception:  # a damaged chunk: count shard by shard to name it
            for s in shards:
                try:
                    out.add(arr[vs.start:vs.stop, s])
                except Exception:
                    out.unreadable.append((s, block))
            continue
        out.add(flags[:, shards])
    return out


def _wds_flags(reader, units) -> Flags:
    from storage.wds_backend import _BLOSC

    out = Flags()
    for shard, block in sorted(units):
        name = unit_name(shard, block)
        try:
            with tarfile.open(reader.units_dir / f"{name}.tar", mode="r") as tar:
                header = json.loads(tar.extractfile(f"{name}.json").read())
                blob = tar.extractfile(f"{name}.valid.blosc").read()
            info = header["arrays"]["valid"]
            if crc32c.crc32c(blob) != info["crc32c"]:
                raise ValueError("valid checksum mismatch")
            out.add(np.frombuffer(_BLOSC.decode(blob), dtype=info["dtype"]))
        except Exception:
            out.unreadable.append((shard, block))
    return out
