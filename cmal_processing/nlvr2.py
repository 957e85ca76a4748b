"""NLVR2 → `datasets`: one row per sentence with the region columns of both images (suffixes `_0` and `_1`),
columns of `cmal_processing.schema.nlvr2_features`.

Input: the official JSON lines (`train.json`, `dev.json`, `test1.json`), each `{"identifier", "sentence", "label"}`
with `label` "True" / "False" (a line without `label` gets -1, "no label"). The images of identifier
`<split>-<set>-<pair>-<sentence>` are `<split>-<set>-<pair>-img0` and `-img1` (the identifier minus its last `-N`);
`image_id_format` maps each to the feature files' image id (default `"{image_id}"`, as in LXMERT's NLVR2 `.tsv`).

Skip reasons: `malformed_record`, `malformed_identifier`, `empty_text`, `bad_label`, `bad_image_id`,
`missing_features`, `corrupt_features` (either image).

    python -m cmal_processing build nlvr2 --annotations dev.json --features valid_obj36.tsv --split validation \\
        --output DATA/nlvr2
"""

from __future__ import annotations

from collections.abc import Sequence

from .builders import (
    BuildSummary,
    SkipItem,
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
from .schema import NLVR2_LABELS, nlvr2_features
from .skips import SkipCounter

__all__ = ["build_nlvr2", "nlvr2_image_ids"]


def nlvr2_image_ids(identifier: str) -> tuple[str, str]:
    """`"dev-850-0-0"` → `("dev-850-0-img0", "dev-850-0-img1")`; `SkipItem("malformed_identifier")` otherwise."""
    pair, dash, sentence = identifier.rpartition("-") if isinstance(identifier, str) else ("", "", "")
    if not pair or not dash or not sentence.isdigit():
        raise SkipItem("malformed_identifier", f"identifier {identifier!r} is not '<split>-<set>-<pair>-<n>'")
    return f"{pair}-img0", f"{pair}-img1"


def build_nlvr2(
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
    """Write one NLVR2 split; returns the `BuildSummary`.

    Args:
        annotations: the official `.json` lines file of the split.
        image_id_format: NLVR2 image id (`"dev-850-0-img0"`) → feature image id.
        region_features, output, split, tag_vocab, id_offset, num_shards, shard_index, lexicon, progress: see
            `cmal_processing.builders.write_split`.
    """
    template = check_image_id_format(image_id_format, ("image_id",))
    refused = SkipCounter("skipped items")

    def make_item(record):
        record = require_fields(record, ("identifier", "sentence"))
        image_ids = tuple(format_image_id(template, image_id=image_id)
                          for image_id in nlvr2_image_ids(record["identifier"]))
        item = {"identifier": str(record["identifier"]), "text": text_field(record["sentence"]),
                "label": class_label(record, "label", NLVR2_LABELS)}
        return image_ids, item

    groups = collect_items(read_jsonl(annotations, "annotations", refused), make_item, refused)
    return write_split(
        task="nlvr2",
        groups=groups,
        features=nlvr2_features,
        refused=refused,
        region_features=region_features,
        output=output,
        split=split,
        image_suffixes=("_0", "_1"),
        tag_vocab=tag_vocab,
        id_offset=id_offset,
        num_shards=num_shards,
        shard_index=shard_index,
        lexicon=lexicon,
        progress=progress,
    )
