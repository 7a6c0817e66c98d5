"""``inspect STORE --export OUT.parquet``: one row per stored view with its whole stored label."""

from __future__ import annotations

import os

import numpy as np

from storage import WRITTEN
from storage.outputs import check_output_path

from .lookup import stored_manifest


# ---- export --------------------------------------------------------------------------------
def export_parquet(reader, out: str) -> int:
    """One row per stored view (complete units only), streamed one view at a time. Returns rows.
    Refuses (OutputError) an out that is not .parquet or lies inside the store before writing anything."""
    check_output_path(out, "parquet", option="--export", inputs=(str(reader.path),))
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..recipes import Recipe
    from ..views import ViewRenderer

    spec = reader.spec
    renderer = ViewRenderer(Recipe.from_dict(spec.recipe))
    manifest = stored_manifest(reader)
    done = set(reader.completed_units())
    schema = pa.schema([
        ("view", pa.int32()), ("shard", pa.int32()), ("slot", pa.int32()), ("key", pa.string()),
        ("gt", pa.int32()), ("partner_key", pa.string()), ("mix", pa.string()), ("lam", pa.float32()),
        ("top1", pa.int32()), ("top1_prob", pa.float32()), ("tail_mass", pa.float32()), ("valid", pa.uint8()),
        # The whole stored label: the teacher's top-k ids and probabilities, best first (a hard store: its argmax,
        # no probabilities). Fixed-size lists of k; null on invalid views.
        ("topk_ids", pa.list_(pa.int32(), max(spec.k, 1))), ("topk_probs", pa.list_(pa.float32(), max(spec.k, 1))),
    ])
    shard_keys = {s: np.asarray(manifest.keys(s), dtype=object) for s in range(spec.num_shards)}
    shard_labels = {s: manifest.labels(s) for s in range(spec.num_shards)}
    # Written beside and renamed into place: an interrupted export leaves no half table under the name.
    tmp = os.path.join(os.path.dirname(os.path.abspath(out)), f".{os.path.basename(out)}.{os.getpid()}.tmp")
    rows = 0
    try:
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            for view in range(spec.views):
                parts = []
                for shard in range(spec.num_shards):
                    if (shard, spec.block_of(view)) not in done or spec.shard_sizes[shard] == 0:
                        continue
                    parts.append(_export_block(reader, renderer, view, shard, shard_keys[shard],
                                               shard_labels[shard], schema))
                if parts:
                    table = pa.concat_tables(parts)
                    writer.write_table(table)
                    rows += table.num_rows
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return rows


def _export_block(reader, renderer, view, shard, keys, labels, schema):
    import pyarrow as pa

    spec = reader.spec
    lab = reader.read(view, shard)
    plan = renderer.plan(spec.seed, view, shard, spec.shard_sizes[shard])
    pos = np.array([sv.position for sv in plan])
    mixed = [sv.mix.mode != "none" and sv.partner_position is not None for sv in plan]
    top1 = lab.ids[:, 0] if lab.ids.ndim == 2 else lab.ids
    ok = lab.valid == WRITTEN
    if lab.values is not None:
        p = np.exp(lab.values.astype(np.float32))
        prob = pa.array(p[:, 0], mask=~ok)
        tail = pa.array(np.clip(1.0 - p.sum(axis=1), 0.0, 1.0), mask=~ok)
    else:
        prob = tail = pa.nulls(len(plan), pa.float32())
    ids = lab.ids.reshape(len(plan), -1).astype(np.int32)
    mask = pa.array(~ok)
    topk_ids = pa.FixedSizeListArray.from_arrays(pa.array(ids.ravel()), ids.shape[1], mask=mask)
    if lab.values is not None:
        topk_probs = pa.FixedSizeListArray.from_arrays(pa.array(p.ravel()), p.shape[1], mask=mask)
    else:
        topk_probs = pa.nulls(len(plan), schema.field("topk_probs").type)
    cols = {
        "view": np.full(len(plan), view, np.int32), "shard": np.full(len(plan), shard, np.int32),
        "slot": np.arange(len(plan), dtype=np.int32), "key": keys[pos].tolist(), "gt": labels[pos].astype(np.int32),
        "partner_key": [keys[sv.partner_position] if m else None for sv, m in zip(plan, mixed, strict=True)],
        "mix": [sv.mix.mode if m else "none" for sv, m in zip(plan, mixed, strict=True)],
        "lam": np.array([sv.mix.lam if m else 1.0 for sv, m in zip(plan, mixed, strict=True)], np.float32),
        "top1": pa.array(top1.astype(np.int32), mask=~ok), "top1_prob": prob, "tail_mass": tail,
        "valid": lab.valid.astype(np.uint8), "topk_ids": topk_ids, "topk_probs": topk_probs,
    }
    return pa.table(cols, schema=schema)
