"""Label stores: the teacher's labels for every (view, shard, slot), written by unit, read by view.

Two backends behind one interface: zarr v3 (default) and webdataset tars. See docs/DESIGN.md,
"The label store".
"""

from .api import BACKENDS, DEFAULT_BACKEND, create_store, open_store
from .base import StoreReader, StoreWriter
from .soft import hard_targets, soft_targets, tail_logsumexp, target_error, topk_logprobs
from .spec import (
    INVALID,
    PADDING,
    WRITTEN,
    Flags,
    Labels,
    Problem,
    StoreCorrupt,
    StoreError,
    StoreMismatch,
    StoreSpec,
    id_dtype,
)

__all__ = [
    "BACKENDS",
    "DEFAULT_BACKEND",
    "INVALID",
    "PADDING",
    "WRITTEN",
    "Flags",
    "Labels",
    "Problem",
    "StoreCorrupt",
    "StoreError",
    "StoreMismatch",
    "StoreReader",
    "StoreSpec",
    "StoreWriter",
    "create_store",
    "hard_targets",
    "id_dtype",
    "open_store",
    "soft_targets",
    "tail_logsumexp",
    "target_error",
    "topk_logprobs",
]
