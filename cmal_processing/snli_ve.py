"""SNLI-VE → `datasets`: one row per (image premise, hypothesis), columns of `cmal_processing.schema.snli_ve_features`
(`premise` is SNLI's text premise, kept for reference; `text` is the hypothesis the model reads).

Input: the official JSON lines (`snli_ve_train.jsonl`, `snli_ve_dev.jsonl`, `snli_ve_test.jsonl`), each with
`Flikr30kID` (sic; `"1234.jpg"` → image id `"1234"`), `pairID`, `sentence1`, `sentence2` and `gold_label`
(entailment / neutral / contradiction; a line without `gold_label` gets -1, "no label"). `image_id_format` maps
the Flickr30k id to the feature files' image id (default `"{image_id}"`).

Skip reasons: `malformed_record`, `empty_text`, `bad_label`, `bad_image_id`, `missing_features`,
`corrupt_features`.

    python -m cmal_processing build snli_ve --annotations snli_ve_train.jsonl --features flickr30k_obj36.tsv \\
        --split train --output DATA/snli_ve
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import PurePosixPath

from .builders import (
    BuildSummary,
    check_image_id_format,
    class_label,
    collect_items,
    format_image_id,
    read_jsonl,
    require_fields,
    text_field,
    write_split,
)
from .readers import PathLike, TagVocab
from .schema import SNLI_VE_LABELS, snli_ve_features
from .skips import SkipCounter

__all__ = ["build_snli_ve"]


def build_snli_ve(
    annotations: PathLike,
    region_features: PathLike | Sequence[PathLike],
    output: PathLike,
    *,
    split: str,
    image_id_format: str = "{image_id}",
    # From here on write_split's keywords, spelled out in every builder's signature on purpose (its documentation).
    tag_vocab: TagVocab = None,
    id_offset: int = 0,
    num_shards: int = 1,
    shard_index: int = 0,
    lexicon=None,
    progress: bool = True,
) -> BuildSummary:
    """Write one SNLI-VE split; returns the `BuildSummary`.

    Args:
        annotations: the official `.jsonl` file of the split.
        image_id_format: Flickr30k image id (`"1234"`) → feature image id.
        region_features, output, split, tag_vocab, id_offset, num_shards, shard_index, lexicon, progress: see
            `cmal_processing.builders.write_split`.
    """
    template = check_image_id_format(image_id_format, ("image_id",))
    refused = SkipCounter("skipped items")

    def make_item(record):
        record = require_fields(record, ("Flikr30kID", "pairID", "sentence1", "sentence2"))
        image_id = format_image_id(template, image_id=PurePosixPath(str(record["Flikr30kID"])).stem)
        item = {"pair_id": str(record["pairID"]), "premise": text_field(record["sentence1"]),
                "text": text_field(record["sentence2"]), "label": class_label(record, "gold_label", SNLI_VE_LABELS)}
        return (image_id,), item

    groups = collect_items(read_jsonl(annotations, "annotations", refused), make_item, refused)
    return write_split(
        task="snli_ve",
        groups=groups,
        features=snli_ve_features,
        refused=refused,
        region_features=region_features,
        output=output,
        split=split,
        tag_vocab=tag_vocab,
        id_offset=id_offset,
        num_shards=num_shards,
        shard_index=shard_index,
        lexicon=lexicon,
        progress=progress,
    )
