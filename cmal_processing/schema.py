"""Column layout shared by every dataset that `cmal_processing` writes (real formats and the synthetic world).

Column names are the model's input names where one exists. Region columns describe one image:

- ``image_id`` (string), ``image_width`` / ``image_height`` (int32, pixels)
- ``visual_feats``: float16 ``[M, Dv]`` region features
- ``visual_pos``: float32 ``[M, 4]`` boxes ``x1, y1, x2, y2`` normalised to ``[0, 1]``
- ``tags``: ``M`` detector class names; ``scores``: ``M`` detector confidences (float32)

Tasks that see two images (NLVR2) have the region columns twice with the suffixes ``_0`` and ``_1``.
The functions below give the columns of a row *as read* (`cmal_processing.corpus.load_corpus`); on disk each split
stores its task columns with ``image_id`` (per image slot) in the task table and each image's region columns once
in its image table (`cmal_processing.corpus.split_features` cuts one of these `Features` into the two). Every builder
saves a ``datasets.DatasetDict`` with ``save_to_disk``; splits are ``train``, ``validation`` and, where the source
has one, ``test``.

**One on-disk encoding of an image's regions** (`REGION_FIELDS`, `encode_regions` / `decode_regions`): every table
that stores images — a corpus split's image table, the image table of ``python -m cmal_processing extract`` and the
rows of a streamed corpus — holds one row per image with ``num_regions`` (M) and ``feature_dim`` (Dv) and the two
arrays as little-endian binary buffers, ``visual_feats`` float16 ``[M, Dv]`` and ``visual_pos`` float32 ``[M, 4]``,
so reading an image is one ``np.frombuffer`` per array. The boxes are normalised everywhere but in extract's table,
which keeps the detector's pixel boxes with the image size. Corpus folders written before (``Array2D`` columns)
still read.

Parquet shards (region tables, streamed corpora) are written by `write_parquet_shard`: whole or not at all.
"""

from __future__ import annotations

import os
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Array2D, ClassLabel, Features, Sequence, Value

# The region columns of a row as read (`region_features`).
REGION_COLUMNS = ("image_id", "image_width", "image_height", "visual_feats", "visual_pos", "tags", "scores")
SNLI_VE_LABELS = ("entailment", "neutral", "contradiction")
NLVR2_LABELS = ("False", "True")
# Folder names under a corpus root (see docs/data.md).
TASK_FOLDERS = {"pretrain": "pretrain", "vqa": "vqa", "nlvr2": "nlvr2", "snli_ve": "snli_ve", "refcoco": "refcoco"}
ANSWER_VOCAB_FILE = "answer_vocab.json"


# An image's regions as stored: the one schema of every image table (see the module docstring).
REGION_FIELDS = [
    ("image_id", pa.string()),
    ("image_width", pa.int32()),
    ("image_height", pa.int32()),
    ("num_regions", pa.int32()),
    ("feature_dim", pa.int32()),
    ("visual_feats", pa.binary()),
    ("visual_pos", pa.binary()),
    ("tags", pa.list_(pa.string())),
    ("scores", pa.list_(pa.float32())),
]
STORED_REGION_COLUMNS = tuple(name for name, _ in REGION_FIELDS)
FLOAT16_MAX = float(np.finfo(np.float16).max)


def image_table_features() -> Features:
    """The `Features` of an image table as stored (`REGION_FIELDS`)."""
    return Features.from_arrow_schema(pa.schema(REGION_FIELDS))


def encode_regions(columns) -> dict:
    """One image's region columns as read (``image_id``, ``image_width``, ``image_height``, ``visual_feats``
    ``[M, Dv]``, ``visual_pos`` ``[M, 4]``, ``tags``, ``scores`` (None: none), no suffix) → its stored row
    (`REGION_FIELDS`).

    Raises `ValueError` naming the image when the arrays' shapes disagree or a feature is beyond float16's range
    (it would be stored as infinity)."""
    image_id = columns["image_id"]
    features = np.asarray(columns["visual_feats"])
    boxes = np.asarray(columns["visual_pos"], dtype=np.float32)
    if features.ndim != 2 or boxes.shape != (len(features), 4):
        raise ValueError(f"image {image_id!r}: visual_feats must be [M, Dv] and visual_pos [M, 4], got shapes "
                         f"{features.shape} and {boxes.shape}")
    if features.size and np.abs(features).max() > FLOAT16_MAX:
        raise ValueError(f"image {image_id!r}: visual_feats reach {np.abs(features).max():.4g}, beyond float16's "
                         f"{FLOAT16_MAX:.4g}")
    return {
        "image_id": image_id,
        "image_width": int(columns["image_width"]),
        "image_height": int(columns["image_height"]),
        "num_regions": int(features.shape[0]),
        "feature_dim": int(features.shape[1]),
        "visual_feats": np.ascontiguousarray(features, dtype="<f2").tobytes(),
        "visual_pos": np.ascontiguousarray(boxes, dtype="<f4").tobytes(),
        "tags": [str(tag) for tag in _present(columns.get("tags"))],
        "scores": np.asarray(_present(columns.get("scores")), dtype=np.float32).tolist(),
    }


def _present(values):
    return () if values is None else values


def decode_regions(num_regions: int, feature_dim: int, visual_feats: bytes, visual_pos: bytes) -> tuple:
    """`(visual_feats, visual_pos)` of a stored row: float32 ``[M, Dv]`` and ``[M, 4]`` arrays of their own
    (writable). Raises `ValueError` when a buffer's size disagrees with ``num_regions`` x its width."""
    count, dim = int(num_regions), int(feature_dim)
    features = np.frombuffer(visual_feats, "<f2")
    boxes = np.frombuffer(visual_pos, "<f4")
    if features.size != count * dim or boxes.size != count * 4:
        raise ValueError(f"stored regions hold {features.size} feature and {boxes.size} box values; expected "
                         f"num_regions {count} x feature_dim {dim} and {count} x 4")
    return features.reshape(count, dim).astype(np.float32), boxes.reshape(count, 4).copy()


def region_features(feature_dim: int, suffix: str = "") -> dict:
    """Features of the region columns of one image; ``suffix`` is ``""`` or ``"_0"`` / ``"_1"``."""
    if not isinstance(feature_dim, int) or feature_dim <= 0:
        raise ValueError(f"feature_dim must be a positive int, got {feature_dim!r}")
    return {
        f"image_id{suffix}": Value("string"),
        f"image_width{suffix}": Value("int32"),
        f"image_height{suffix}": Value("int32"),
        f"visual_feats{suffix}": Array2D(shape=(None, feature_dim), dtype="float16"),
        f"visual_pos{suffix}": Array2D(shape=(None, 4), dtype="float32"),
        f"tags{suffix}": Sequence(Value("string")),
        f"scores{suffix}": Sequence(Value("float32")),
    }


def pretrain_features(feature_dim: int) -> Features:
    """Caption corpus: one row per (image, caption)."""
    return Features({**region_features(feature_dim), "text": Value("string")})


def vqa_features(feature_dim: int) -> Features:
    """VQA v2: ``answer_ids`` index the answer vocabulary saved beside the dataset, ``answer_scores`` are the
    official soft scores ``min(#humans / 3, 1)`` (after the official normalisation of answers)."""
    return Features(
        {
            **region_features(feature_dim),
            "question_id": Value("string"),
            "text": Value("string"),
            "question_type": Value("string"),
            "answer_ids": Sequence(Value("int32")),
            "answer_scores": Sequence(Value("float32")),
        }
    )


def nlvr2_features(feature_dim: int) -> Features:
    return Features(
        {
            **region_features(feature_dim, "_0"),
            **region_features(feature_dim, "_1"),
            "identifier": Value("string"),
            "text": Value("string"),
            "label": ClassLabel(names=list(NLVR2_LABELS)),
        }
    )


def snli_ve_features(feature_dim: int) -> Features:
    return Features(
        {
            **region_features(feature_dim),
            "pair_id": Value("string"),
            "premise": Value("string"),
            "text": Value("string"),
            "label": ClassLabel(names=list(SNLI_VE_LABELS)),
        }
    )


def refcoco_features(feature_dim: int) -> Features:
    """RefCOCO+: ``target_box`` is the referred box normalised like ``visual_pos``; ``region_ious`` the IoU of
    every region with it; ``label`` the index of the region of highest IoU."""
    return Features(
        {
            **region_features(feature_dim),
            "ref_id": Value("string"),
            "text": Value("string"),
            "target_box": Sequence(Value("float32"), length=4),
            "region_ious": Sequence(Value("float32")),
            "label": Value("int32"),
        }
    )


def write_parquet_shard(table: pa.Table, path: str, *, row_group_size: int, filesystem=None) -> None:
    """Write `table` to `path` as one Parquet shard (uncompressed: the region features do not compress), atomically:
    into a temporary sibling `.<name>.tmp-<token>` renamed when complete, so a killed writer leaves no shard that
    looks finished (its leftover is hidden and overwritten by the next run). `filesystem` is an fsspec filesystem
    (a local path without one)."""
    folder, _, name = str(path).rpartition("/")
    temporary = f"{folder}/.{name}.tmp-{uuid.uuid4().hex}"
    if filesystem is None:
        pq.write_table(table, temporary, row_group_size=row_group_size, compression="none")
        os.replace(temporary, path)
        return
    with filesystem.open(temporary, "wb") as file:
        pq.write_table(table, file, row_group_size=row_group_size, compression="none")
    filesystem.mv(temporary, str(path))
