"""Caption corpora (pre-training data) → `datasets`: one row per (image, caption) as read, columns of
`cmal_processing.schema.pretrain_features` (the region columns + `text`; stored as `image_id` + `text` with each image's
regions once in the split's image table, `cmal_processing/corpus.py`).

Two caption formats:

- COCO captions JSON (`captions_train2014.json`): `{"images": [{"id", "file_name", "width", "height"}],
  "annotations": [{"image_id", "id", "caption"}]}`. `image_id_format` sees `image_id` (the COCO id) and
  `file_stem` (`file_name` without extension); the default `"{file_stem}"` matches LXMERT's `.tsv`
  (`COCO_train2014_000000000009`) and bottom-up-attention.pytorch's `.npz` names.
- JSON lines (`.jsonl`), one `{"image_id", "caption"}` per line; `image_id_format` sees `image_id`, default
  `"{image_id}"`.

Skip reasons: `malformed_record`, `empty_text`, `unknown_image` (a COCO caption whose image is not in `images`),
`bad_image_id`, plus `missing_features` / `corrupt_features` (see `cmal_processing.builders`).

    python -m cmal_processing build captions --captions captions_train2014.json --features train2014_obj36.tsv \\
        --split train --output DATA/pretrain
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from .builders import (
    BuildSummary,
    SkipItem,
    check_image_id_format,
    collect_items,
    format_image_id,
    read_json,
    read_jsonl,
    record_id,
    require_fields,
    text_field,
    write_split,
)
from .readers import PathLike, TagVocab
from .schema import pretrain_features
from .skips import SkipCounter

__all__ = ["build_captions", "caption_groups"]


def _coco_records(path: Path) -> tuple[dict, Iterator[tuple[str, object]]]:
    """COCO image id → file stem (images without a usable id are left out: their captions become
    `unknown_image`), and `(where, annotation)` pairs."""
    data = read_json(path, "captions", list_keys=("images", "annotations"))
    file_stems = {image["id"]: Path(str(image.get("file_name", ""))).stem for image in data["images"]
                  if isinstance(image, dict) and isinstance(image.get("id"), (int, str))}
    records = ((f"{path.name} annotation {ann.get('id', position) if isinstance(ann, dict) else position}", ann)
               for position, ann in enumerate(data["annotations"]))
    return file_stems, records


def build_captions(
    captions: PathLike,
    region_features: PathLike | Sequence[PathLike],
    output: PathLike,
    *,
    split: str,
    image_id_format: str | None = None,
    # From here on write_split's keywords, spelled out in every builder's signature on purpose (its documentation).
    tag_vocab: TagVocab = None,
    id_offset: int = 0,
    num_shards: int = 1,
    shard_index: int = 0,
    lexicon=None,
    progress: bool = True,
) -> BuildSummary:
    """Write one split of a caption corpus; returns the `BuildSummary`.

    Args:
        captions: a COCO captions `.json` or a `.jsonl` of `{"image_id", "caption"}` (format by suffix).
        image_id_format: caption's image → feature image id (defaults in the module docstring).
        region_features, output, split, tag_vocab, id_offset, num_shards, shard_index, lexicon, progress: see
            `cmal_processing.builders.write_split`.
    """
    refused = SkipCounter("skipped items")
    groups = caption_groups(captions, image_id_format, refused)
    return write_split(
        task="captions",
        groups=groups,
        features=pretrain_features,
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


def caption_groups(captions: PathLike, image_id_format: str | None, refused: SkipCounter) -> list:
    """The `ItemGroup`s of a captions file (one per feature image, items `{"text"}`); refused records are counted
    in `refused`. Shared by `build_captions` and `cmal_processing.shards.build_streamed_captions`."""
    captions = Path(captions)
    if captions.suffix == ".json":
        template = check_image_id_format(image_id_format or "{file_stem}", ("image_id", "file_stem"))
        file_stems, records = _coco_records(captions)

        def make_item(record):
            coco_image_id = record_id(require_fields(record, ("image_id", "caption")), "image_id")
            if coco_image_id not in file_stems:
                raise SkipItem("unknown_image", f"image_id {coco_image_id!r} is not in the 'images' list")
            image_id = format_image_id(template, image_id=coco_image_id, file_stem=file_stems[coco_image_id])
            return (image_id,), {"text": text_field(record["caption"])}

    elif captions.suffix == ".jsonl":
        template = check_image_id_format(image_id_format or "{image_id}", ("image_id",))
        records = read_jsonl(captions, "captions", refused)

        def make_item(record):
            record = require_fields(record, ("image_id", "caption"))
            return (format_image_id(template, image_id=record["image_id"]),), {"text": text_field(record["caption"])}

    else:
        raise ValueError(f"captions {str(captions)!r} must be a COCO captions .json or a .jsonl file")
    return collect_items(records, make_item, refused)
