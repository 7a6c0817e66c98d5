"""Helpers for tests/test_storage.py, importable by the writer subprocesses those tests start.

Holds no tests. Labels are a pure function of (seed, shard, block) so that a child process and
the test agree on what a unit must contain without talking to each other.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from storage import StoreSpec  # noqa: E402


def tiny_spec(mode="topk", num_classes=50, **kw) -> StoreSpec:
    base = dict(
        mode=mode,
        k=5 if mode == "topk" else 0,
        num_classes=num_classes,
        class_names=tuple(f"c{i}" for i in range(num_classes)),
        views=5,
        shard_sizes=(7, 4, 9),
        views_per_unit=2,
        recipe={"preset": "deit", "mixup": 0.8},
        seed=0,
        manifest_fingerprint="abc123",
        teacher={"name": "toy", "weights_sha256": "00", "input_size": 224},
    )
    base.update(kw)
    return StoreSpec(**base)


def unit_data(spec: StoreSpec, shard: int, block: int, seed: int = 0, invalid_every: int = 5):
    """Deterministic labels for one unit, in the writer's input format (slot order)."""
    vb, n = len(spec.block_views(block)), spec.shard_sizes[shard]
    rng = np.random.default_rng([seed, shard, block])
    logits = rng.standard_normal((vb, n, spec.num_classes)).astype(np.float32) * 3
    logp = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    valid = np.ones((vb, n), np.uint8)
    valid.flat[::invalid_every] = 2  # some unreadable images
    if spec.mode == "hard":
        return dict(values=None, ids=logp.argmax(-1), valid=valid)
    ids = np.argsort(-logp, axis=-1, kind="stable")[..., : spec.k]
    values = np.take_along_axis(logp, ids, -1).astype(np.float16)
    out = dict(values=values, ids=ids, valid=valid)
    if spec.taus:  # the tempered tail's log-sum-exp per tau, from the full logits (storage/soft.py)
        from storage import tail_logsumexp

        flat = tail_logsumexp(logits.reshape(vb * n, -1), ids.reshape(vb * n, -1), spec.taus)
        out["tail_lse"] = flat.reshape(vb, n, len(spec.taus))
    return out


def write_all(writer, seed: int = 0):
    for shard, block in writer.units():
        writer.write_unit(shard, block, **unit_data(writer.spec, shard, block, seed))


def snapshot(path) -> dict[str, bytes]:
    """Every file under a store (or object under its prefix in a bucket), by relative path: stores are
    compared byte for byte."""
    from storage.bucket import ObjPath

    out = {}
    if isinstance(path, ObjPath):
        for o in path.walk_objects():
            out[o["path"][len(path.key) + 1:]] = read_bytes(ObjPath(path.scheme, path.bucket, o["path"]))
        return out
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, path)] = open(p, "rb").read()
    return out


def read_bytes(path) -> bytes:
    """A file's or an object's bytes (a test's own look, not the store's checked read)."""
    from storage.bucket import ObjPath

    return path.read() if isinstance(path, ObjPath) else open(path, "rb").read()


def write_bytes(path, data: bytes) -> None:
    from storage.bucket import ObjPath

    if isinstance(path, ObjPath):
        path.put(data)
    else:
        with open(path, "wb") as f:
            f.write(data)


def remove(path) -> None:
    from storage.bucket import ObjPath

    path.unlink() if isinstance(path, ObjPath) else os.unlink(path)


def listdir(path) -> list[str]:
    from storage.fsutil import listdir as _listdir

    return _listdir(path)


def child_create_and_write(path, backend, start_at, shard):
    """Fleet member: wait for a common start time, create the store, write one shard's units."""
    from storage import create_store

    while time.time() < start_at:
        time.sleep(0.001)
    writer = create_store(path, tiny_spec(), backend=backend, manifest=b"manifest")
    for s, b in writer.units():
        if s == shard:
            writer.write_unit(s, b, **unit_data(writer.spec, s, b))


def child_hang_before_commit(path, backend, seed):
    """Writer that writes a unit's data, then hangs just before making it visible (the commit: a rename on
    a disk, the PUT of the marker (zarr) or of the tar itself (wds) on a bucket)."""
    from pathlib import Path

    from storage import create_store
    from storage.bucket import ObjPath

    writer = create_store(path, tiny_spec(), backend=backend)
    real_replace, real_put = os.replace, ObjPath.put

    def hang():
        print("READY", flush=True)
        time.sleep(3600)

    def replace(src, dst):
        if Path(dst).parent.name == "units":  # the marker (zarr) or the tar itself (wds)
            hang()
        real_replace(src, dst)

    def put(self, data):
        if self.parent.name == "units":
            hang()
        real_put(self, data)

    os.replace, ObjPath.put = replace, put
    writer.write_unit(1, 0, **unit_data(writer.spec, 1, 0, seed))


def child_write_forever(path, backend):
    """Rewrites every unit with alternating labels, forever: killed at random moments by the test."""
    from storage import create_store

    writer = create_store(path, tiny_spec(shard_sizes=(300, 200, 300)), backend=backend)
    print("READY", flush=True)
    seed = 0
    while True:
        for s, b in writer.units():
            writer.write_unit(s, b, **unit_data(writer.spec, s, b, seed))
        seed = 1 - seed


if __name__ == "__main__":
    fn = globals()[sys.argv[1]]
    args = [int(a) if a.lstrip("-").isdigit() else a for a in sys.argv[2:]]
    if sys.argv[1] == "child_create_and_write":
        args[2] = float(sys.argv[4])
    fn(*args)
