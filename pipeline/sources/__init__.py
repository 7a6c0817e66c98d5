"""Sources -> manifests: the fixed list of shards and samples every later stage addresses, and the one
reader of their bytes.

A source is an ImageFolder directory (one sub-folder per class), WebDataset tar shards (a directory of
``.tar`` files, a glob, or a brace pattern) or parquet files in the Hugging Face ``datasets`` layout (the
same ways). Each format is one module here (``folder``, ``tar``, ``hf_parquet``) implementing
``base.SourceFormat``, listed in ``registry.FORMATS``; the rest is format-neutral:

- ``manifest``: the ``Manifest`` (shards, samples, classes, fingerprint) and its bytes in a label store,
- ``layout``: files as-is or re-cut into seeded virtual shards, and ``index_source``,
- ``reader``: the one ``SampleReader`` (stage one, the loader, probes, verify and inspect read through it),
- ``decode``: bytes -> RGB image or ``Undecodable``; ``paths``: --data patterns.

Indexing refuses what it cannot index faithfully, in one line; a sample whose bytes differ from those
indexed is ``SourceChanged``, never labels of another image nor "store damage". Import from here:
``from pipeline.sources import index_source``.
"""

from ..source_errors import (
    MAX_CLASSES,
    ManifestError,
    SourceChanged,
    SourceError,
    check_class_count,
    check_label_bound,
    permission_error,
)
from .base import IMAGE_EXTS, NO_CRC, SCHEMA, FileReader, Indexed, SourceFormat, read_regular_file
from .check import unchanged_source
from .decode import Undecodable, decode_image
from .layout import (
    SHARD_LAYOUTS,
    SKEW_THRESHOLD,
    ClassDiversity,
    apply_layout,
    class_diversity,
    index_source,
    is_class_skewed,
    layout_for_store,
    recut_shards,
)
from .manifest import MANIFEST_VERSION, Manifest, check_same_classes, stored_manifest
from .paths import MAX_PATTERN_FILES, brace_count, check_outside_source, expand_braces
from .reader import Sample, SampleReader, check_sample, source_errors_in_one_line
from .registry import FORMATS, expand_files, formats_in_words
from .tar import write_wds_shards

__all__ = [
    "FORMATS", "IMAGE_EXTS", "MANIFEST_VERSION", "MAX_CLASSES", "MAX_PATTERN_FILES", "NO_CRC", "SCHEMA",
    "SHARD_LAYOUTS", "SKEW_THRESHOLD", "ClassDiversity", "FileReader", "Indexed", "Manifest", "ManifestError",
    "Sample", "SampleReader", "SourceChanged", "SourceError", "SourceFormat", "Undecodable", "apply_layout",
    "brace_count", "check_class_count", "check_label_bound", "check_outside_source", "check_same_classes",
    "check_sample", "class_diversity", "decode_image", "expand_braces", "expand_files", "formats_in_words",
    "index_source", "is_class_skewed", "layout_for_store", "permission_error", "read_regular_file",
    "recut_shards", "source_errors_in_one_line", "stored_manifest", "unchanged_source", "write_wds_shards",
]
