"""The on-disk format of a shard directory: versions, limits and types that the writer (``ssau.shard``) and the
reader (``ssau.data``) share.

Per-sample json, schema version 2 (``SCHEMA_VERSION``; a sample without ``schema_version`` is version 1). Every
sample of every format has exactly these keys with these types, so a mixed list of shards reads as one table;
"absent" is a value of the key's own type, never a missing key or a null:

    key              type          absent   meaning
    schema_version   int           -        2
    corpus           str           -        bp4d | disfa | emotionet | csv | rafdb | folder
    key              str           -        the sample's key (tar member names are ``<key>.<ext>``)
    source           str           -        the input, relative to dataset.json ``images_root``, POSIX separators;
                                            a video frame is ``<video>#<0-based frame index>``
    subject          str           ""
    sequence         str           ""       task / video / sequence id
    frame            int           -1       the corpus's frame number
    split            str           ""       the corpus's split (RAF-DB train / test)
    fold             int           0        0 = no --folds
    aus              list[int]     []       the corpus's AU ids (1 = AU01), the order of the lists below
    au_names         list[str]     []       the same AUs named as in the index and MLflow: "AU01", ...
    occurrence       list[int]     []       per AU: 1 present, 0 absent, -1 unknown (not coded)
    mask             list[int]     []       per AU: 1 coded, 0 unknown (= occurrence != -1)
    intensity        list[float]   []       per AU: 0-5, -1.0 unknown (every AU of a corpus without intensities)
    expression       int           -1       index into ssau.aus.EXPRESSIONS
    expression_name  str           ""       its name
    width, height    int           -        the stored image's size
    aligned          str           -        how the face was placed: landmarks | bbox | detector | none
    align_margin     float         -1.0     --align's margin; -1.0 when the shard was not aligned
    landmarks        list[[x, y]]  []       68 iBUG points (float) in the stored image's pixels
    bbox             list[float]   []       the sidecar's face box x, y, w, h in stored pixels (not aligned)
    flow_partner     str           ""       the key of frame t+K whose flow ``flow.npy`` holds

Typed readers that infer column types from a few samples read an empty list as null and then fail on a later
non-empty one (Hugging Face ``datasets`` infers from the first 5 samples of the first tar, so shards whose first
samples have no landmarks or box fail with "Couldn't cast array of type double to null"): ``sample_arrow_type()``
is this table as an Arrow struct to hand them instead, and ``hf_features()`` the whole sample as ``datasets``
Features: ``load_dataset("webdataset", data_files=..., features=hf_features())``.

Version 1 (before issue 13) left out ``aus``/``occurrence``/``mask``/``intensity`` for corpora without AUs, stored
``intensity: null`` for BP4D, ``expression_name: null``, omitted landmarks, bbox, align_margin, flow_partner and
au_names when absent, wrote 0 (with mask 0) for unknown occurrences and an absolute ``source``. ssau's reader
(``ssau.data.decode``) reads both alike.

Index (``index.parquet``): one row per sample; ``position`` is the sample's 0-based position in its shard (called
``offset`` before issue 13), ``tar_offset`` the byte offset in the shard of the sample's first tar member's header
and ``tar_size`` the bytes its members take, headers and padding included: ``f.seek(tar_offset)`` then
``f.read(tar_size)`` is a small tar of that sample alone.
"""

from __future__ import annotations

import pyarrow as pa

STATE_DIR = ".ssau"


def sample_arrow_type() -> pa.StructType:
    """The per-sample json of schema version 2 (module doc) as an Arrow struct, fields in the json's (sorted) order."""
    i64, f64, text = pa.int64(), pa.float64(), pa.string()
    kinds = {"schema_version": i64, "corpus": text, "key": text, "source": text, "subject": text, "sequence": text,
             "frame": i64, "split": text, "fold": i64, "aus": pa.list_(i64), "au_names": pa.list_(text),
             "occurrence": pa.list_(i64), "mask": pa.list_(i64), "intensity": pa.list_(f64), "expression": i64,
             "expression_name": text, "width": i64, "height": i64, "aligned": text, "align_margin": f64,
             "landmarks": pa.list_(pa.list_(f64)), "bbox": pa.list_(f64), "flow_partner": text}
    return pa.struct(sorted(kinds.items()))


def hf_features(flow_shape: tuple[int, int, int] | None = None):
    """A shard sample as Hugging Face ``datasets`` Features (its ``webdataset`` builder's fields: ``__key__``,
    ``__url__``, the image ``jpg``, the ``json`` doc typed as ``sample_arrow_type()``; ``flow.npy`` as a float16
    Array3D of ``flow_shape`` = (2, h, w) for shards written with --flow). Needs the ``datasets`` package."""
    import datasets

    doc = datasets.Features.from_arrow_schema(pa.schema(list(sample_arrow_type())))
    out = {"__key__": datasets.Value("string"), "__url__": datasets.Value("string"), "jpg": datasets.Image(),
           "json": dict(doc)}
    if flow_shape is not None:
        out["flow.npy"] = datasets.Array3D(shape=tuple(flow_shape), dtype="float16")
    return datasets.Features(out)


# Decompression-bomb guard: far above any face image, far below what would exhaust a worker's memory.
MAX_PIXELS = 64_000_000


SCHEMA_VERSION = 2  # of the per-sample json a shard stores (table: module doc); absent = 1


# 2 since issue 13: index column ``offset`` renamed ``position``, ``tar_offset`` and ``tar_size`` added, dataset.json
# gained ``schema_version`` (of the per-sample json) and ``images_root``.
FORMAT_VERSION = 2
