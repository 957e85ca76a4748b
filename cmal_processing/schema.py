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

Parquet shards (region tables, streamed corpora) are written by `write_parquet_shard`: whole or not at all.
"""

from __future__ import annotations

import os
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Array2D, ClassLabel, Features, Sequence, Value

REGION_COLUMNS = ("image_id", "image_width", "image_height", "visual_feats", "visual_pos", "tags", "scores")
SNLI_VE_LABELS = ("entailment", "neutral", "contradiction")
NLVR2_LABELS = ("False", "True")
# Folder names under a corpus root (see docs/data.md).
TASK_FOLDERS = {"pretrain": "pretrain", "vqa": "vqa", "nlvr2": "nlvr2", "snli_ve": "snli_ve", "refcoco": "refcoco"}
ANSWER_VOCAB_FILE = "answer_vocab.json"


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
