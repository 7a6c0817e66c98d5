"""A store mutation fuzz (issue 20): one file of a small complete store damaged, then every command.

Take a complete store of each backend (tiny images, a tiny teacher, 4 views in blocks of 2, 3 shards)
and damage one of its files one way: truncate it at a drawn offset, flip a drawn byte, swap it with
another file of its kind, put a FIFO, a directory, a symlink to /dev/zero or to a copy outside the
store in its place, or rewrite one JSON value with another type or an absurd number. Then `inspect`,
`verify --full --n 0`, one `train` step and a resumed `precompute` must each either

- exit 0, every label any reader still serves being the clean store's (decoded and compared), and a
  resumed precompute leaving the clean store's labels everywhere; or
- exit 2 (1 for verify's FAIL) with one line naming the damaged file or its unit;

never a traceback, a hang, a PASS or a train step on other labels, or a runaway allocation.

The commands run in-process (click's CliRunner) for speed. Hangs: faulthandler kills the test run
with every thread's stack past HANG_S (a FIFO read that blocks is the old code's failure). Memory: the
process's peak resident size may not grow by more than 1 GB over a command. Derandomized, a fixed
number of examples sized so that this file takes a few minutes on two busy cores.
"""

from __future__ import annotations

import faulthandler
import json
import os
import re
import resource
import shutil
import tempfile

import pytest
from cli_support import escaped, invoke
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_faults import TINY, labels_bytes
from test_inspect import BACKENDS, make_stores

from storage import StoreError, open_store
from storage.base import unit_name

# per backend: ~15-25 s each on two busy cores; STORE_FUZZ_EXAMPLES=30 explores further (60 examples: ~10 min here)
EXAMPLES = int(os.environ.get("STORE_FUZZ_EXAMPLES", "8"))
HANG_S = 600  # one command; a loaded CI machine runs a tiny precompute in well under this
STUDENT = "deit_tiny_distilled_patch16_224"
KINDS = ("truncate", "flip", "swap", "fifo", "directory", "dev_zero", "outside", "json_value")


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    stores = make_stores(root)
    CLEAN_LABELS.update({b: labels_bytes(stores[b]) for b in BACKENDS})
    return {**stores, "root": str(root)}


CLEAN_LABELS: dict = {}  # backend -> the clean store's labels (not in the fixture: hypothesis prints those)


def store_file_list(store: str) -> list[str]:
    """Every file of a store, relative, sorted: what a mutation may hit."""
    out = []
    for root, _, files in os.walk(store):
        out += [os.path.relpath(os.path.join(root, f), store) for f in files]
    return sorted(out)


def kind_of(rel: str) -> str:
    """Files of one kind may be swapped: markers, tars, meta files, and each zarr array's chunks."""
    if rel.startswith("units/"):
        return "unit" + os.path.splitext(rel)[1]
    if rel.startswith("labels.zarr/") and "/c/" in rel:
        return "chunk:" + rel.split("/")[1]
    return os.path.dirname(rel) or rel


def unit_of(rel: str) -> tuple[int, int] | None:
    m = re.match(r"units/(\d+)_(\d+)\.", rel)
    if m:
        return int(m[1]), int(m[2])
    m = re.match(r"labels\.zarr/\w+/c/(\d+)/(\d+)/", rel)
    return (int(m[2]), int(m[1])) if m else None


def names_for(rel: str) -> list[str]:
    """What a one-line error may say to name the damaged file: its path, its name, or its unit."""
    out = [rel, os.path.basename(rel)]
    unit = unit_of(rel)
    if unit is not None:
        out += [f"shard={unit[0]}, view_block={unit[1]}", unit_name(*unit)]
    if rel == "store.json":
        out += ["was made with"]  # a spec value changed consistently: precompute names the differing setting
    return out


ABSURD = [None, True, "x", "3", [], {}, [1, 2], -1, 0, 10**23, 1e400, -1e400, 2**63, 0.5, "ab" * 3000]


def leaves(value, path=()):
    """(path, value) of every leaf (and every container) in a JSON document."""
    yield path, value
    if isinstance(value, dict):
        for k, v in value.items():
            yield from leaves(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from leaves(v, path + (i,))


def set_at(doc, path, new):
    if not path:
        return new
    target = doc
    for p in path[:-1]:
        target = target[p]
    target[path[-1]] = new
    return doc


@st.composite
def mutations(draw, files_of):
    backend = draw(st.sampled_from(BACKENDS))
    files = dict(files_of)[backend]
    rel = draw(st.sampled_from(files))
    kind = draw(st.sampled_from(KINDS))
    plan = {"backend": backend, "file": rel, "kind": kind}
    if kind in ("truncate", "flip"):
        plan["at"] = draw(st.floats(0, 1, exclude_max=True))
    elif kind == "swap":
        same = [f for f in files if kind_of(f) == kind_of(rel) and f != rel]
        if not same:
            plan["kind"] = "truncate"
            plan["at"] = draw(st.floats(0, 1, exclude_max=True))
        else:
            plan["other"] = draw(st.sampled_from(same))
    elif kind == "json_value":
        if not rel.endswith(".json") or not rel.endswith("json"):
            plan["kind"], plan["at"] = "flip", draw(st.floats(0, 1, exclude_max=True))
        else:
            plan["leaf"] = draw(st.integers(0, 10**6))
            plan["value"] = draw(st.sampled_from(ABSURD))
    return plan


def mutate(store: str, plan: dict, outside: str) -> str:
    """Apply the plan; returns what was done, in words."""
    path = os.path.join(store, plan["file"])
    kind = plan["kind"]
    if kind == "truncate":
        data = open(path, "rb").read()
        open(path, "wb").write(data[: int(plan["at"] * len(data))])
    elif kind == "flip":
        data = bytearray(open(path, "rb").read())
        if data:
            data[int(plan["at"] * len(data))] ^= 0x5A
        open(path, "wb").write(bytes(data))
    elif kind == "swap":
        other = os.path.join(store, plan["other"])
        a, b = open(path, "rb").read(), open(other, "rb").read()
        open(path, "wb").write(b)
        open(other, "wb").write(a)
    elif kind in ("fifo", "directory", "dev_zero", "outside"):
        copy = os.path.join(outside, os.path.basename(path))
        shutil.copy(path, copy)
        os.unlink(path)
        {"fifo": os.mkfifo, "directory": os.mkdir}.get(kind, lambda p: None)(path)
        if kind == "dev_zero":
            os.symlink("/dev/zero", path)
        elif kind == "outside":
            os.symlink(copy, path)
    elif kind == "json_value":
        doc = json.load(open(path))
        spots = list(leaves(doc))
        where, _ = spots[plan["leaf"] % len(spots)]
        plan["path"] = list(where)
        doc = set_at(doc, where, plan["value"])
        open(path, "w").write(json.dumps(doc))  # 1e400 is written as Infinity, which Python's json reads back
    return json.dumps(plan, default=str)


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run(*args):
    """One command in-process, under the hang and memory guards."""
    before = peak_rss()
    faulthandler.dump_traceback_later(HANG_S, exit=True)
    try:
        res = invoke(*args)
    finally:
        faulthandler.cancel_dump_traceback_later()
    assert peak_rss() - before < 1 << 30, f"{args[0]} grew the peak resident size by {peak_rss() - before} bytes"
    return res


def assert_outcome(res, command: str, plan: dict) -> None:
    """Exit 0; or 2 (bad input) or 1 (a runtime failure) with one line naming the damaged file or its unit;
    or verify's FAIL naming them (or probe drift, for damaged probes)."""
    what = f"{command} after {plan}"
    assert escaped(res) is None, f"traceback in {what}: {res.exception!r}"
    assert "Traceback" not in res.output, what
    assert res.exit_code in (0, 1, 2), (what, res.exit_code, res.output[-2000:])
    if res.exit_code == 0:
        return
    names = names_for(plan["file"]) + (names_for(plan["other"]) if "other" in plan else [])
    errors = [ln for ln in res.stderr.replace("\r", "\n").splitlines() if ln.startswith("error:")]
    if command == "verify" and res.exit_code == 1 and not errors:
        last = res.stdout.splitlines()[-1]
        assert last.startswith("FAIL") and any(n in last for n in names + ["probe drift"]), (what, last)
        return
    assert len(errors) == 1, (what, res.stderr)
    assert any(n in errors[0] for n in names), (what, errors[0])


def readable_labels_are_clean(store: str, clean_labels: dict) -> None:
    """Every label a reader still serves is the clean store's (a unit it refuses is fine)."""
    try:
        reader = open_store(store)
        units = reader.completed_units()
    except StoreError:
        return
    for shard, block in units:
        for view in reader.spec.block_views(block):
            try:
                lab = reader.read(view, shard)
            except StoreError:
                continue
            got = (None if lab.values is None else lab.values.tobytes(), lab.ids.tobytes(), lab.valid.tobytes())
            assert got == clean_labels[view, shard], f"view {view} shard {shard} serves other labels"


def fuzz_commands(clean, plan, store, run_dir):
    backend, data = plan["backend"], clean["data"]
    res = run("inspect", store)
    assert_outcome(res, "inspect", plan)
    res = run("verify", store, "--data", data, "--n", 0, "--full")
    assert_outcome(res, "verify", plan)
    readable_labels_are_clean(store, CLEAN_LABELS[backend])  # after a PASS above all: no other labels served
    res = run("train", "--data", data, "--labels", store, "--out", run_dir, "--model", STUDENT,
              "--model-kwargs", json.dumps(TINY), "--distillation", "soft", "--epochs", 1, "--batch-size", 8,
              "--workers", 0, "--warmup-epochs", 0, "--max-steps-per-epoch", 1)
    assert_outcome(res, "train", plan)
    res = run("precompute", "--data", data, "--out", store, "--teacher", "resnet10t",
              "--teacher-weights", clean["weights"], "--model-kwargs", '{"num_classes": 3}', "--views", 4,
              "--views-per-unit", 2, "--topk", 3, "--input-size", 32, "--batch-size", 16, "--workers", 0,
              "--set", "repeats=1", "--format", backend)
    assert_outcome(res, "precompute", plan)
    if res.exit_code == 0:  # resumed: the clean store's labels, all of them
        assert labels_bytes(store) == CLEAN_LABELS[backend], f"precompute after {plan} left other labels"


@pytest.fixture(scope="module")
def files_of(clean):
    return tuple((b, tuple(store_file_list(clean[b]))) for b in BACKENDS)


@settings(derandomize=True, max_examples=EXAMPLES * len(BACKENDS), deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_one_damaged_file_never_crashes_hangs_or_serves_other_labels(clean, files_of, data):
    plan = data.draw(mutations(files_of))
    with tempfile.TemporaryDirectory(dir=clean["root"]) as work:
        store, outside = os.path.join(work, "store"), os.path.join(work, "outside")
        shutil.copytree(clean[plan["backend"]], store, symlinks=True)
        os.mkdir(outside)
        mutate(store, plan, outside)
        fuzz_commands(clean, plan, store, os.path.join(work, "run"))
