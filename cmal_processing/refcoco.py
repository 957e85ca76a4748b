"""RefCOCO+ (and RefCOCO / RefCOCOg, same files) → `datasets`: one row per referring sentence, columns of
`cmal_processing.schema.refcoco_features`.

Inputs:

- refs: the `refs(unc).p` pickle of the refer toolkit — a list of `{"ref_id", "ann_id", "image_id", "split",
  "sentences": [{"sent", ...}]}` — read with the restricted unpickler of `cmal_processing.safe_pickle` (Python 2 text
  decoded as UTF-8), or a JSON dump of the same list (`.json`).
- instances: `instances.json`, COCO `annotations` (`id`, `image_id`, `bbox` [x, y, w, h] pixels) and `images`
  (`id`, `width`, `height`).

Rows of the refs `split` named by `refs_split` (`train`, `val`, `testA`, `testB`; default: the output split, with
`validation` → `val`) are written. Per row: `target_box` is the referred box x1, y1, x2, y2 normalised like
`visual_pos`; `region_ious` the IoU of every detected region with it (pixels); `label` the region of highest IoU
(first on ties). The summary reports how often that region reaches IoU >= 0.5, the accuracy ceiling of the
detections. `image_id_format` maps the COCO image id to the feature files' id, e.g.
`"COCO_train2014_{image_id:012d}"` (default `"{image_id}"`).

Skip reasons: `malformed_record`, `empty_text`, `missing_annotation` (ann_id not in instances), `unknown_image`,
`bad_box`, `image_size_mismatch` (instances and features disagree on the image size, so boxes would not compare),
`bad_image_id`, `missing_features`, `corrupt_features`.

    python -m cmal_processing build refcoco --refs "refcoco+/refs(unc).p" --instances refcoco+/instances.json \\
        --features train2014_obj36.tsv --image_id_format "COCO_train2014_{image_id:012d}" \\
        --split validation --output DATA/refcoco
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .builders import (
    BuildSummary,
    SkipItem,
    check_image_id_format,
    collect_items,
    format_image_id,
    read_json,
    record_id,
    require_fields,
    text_field,
    write_split,
)
from .readers import PathLike, TagVocab
from .safe_pickle import UnsafePickleError, safe_load
from .schema import refcoco_features
from .skips import SkipCounter

__all__ = ["box_iou", "build_refcoco", "load_refs"]

IOU_THRESHOLD = 0.5
PICKLE_SUFFIXES = (".p", ".pkl", ".pickle")


def box_iou(boxes: np.ndarray, box: np.ndarray) -> np.ndarray:
    """IoU of each of `boxes` [M, 4] with `box` [4], all x1, y1, x2, y2 in one coordinate frame → [M] float32."""
    boxes = np.asarray(boxes, dtype=np.float64)
    box = np.asarray(box, dtype=np.float64)
    width = np.clip(np.minimum(boxes[:, 2], box[2]) - np.maximum(boxes[:, 0], box[0]), 0.0, None)
    height = np.clip(np.minimum(boxes[:, 3], box[3]) - np.maximum(boxes[:, 1], box[1]), 0.0, None)
    intersection = width * height
    areas = np.clip(boxes[:, 2] - boxes[:, 0], 0.0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0.0, None)
    union = areas + (box[2] - box[0]) * (box[3] - box[1]) - intersection
    return np.where(union > 0, intersection / np.where(union > 0, union, 1.0), 0.0).astype(np.float32)


def load_refs(path: PathLike) -> list:
    """The refs list from `refs(*).p` (restricted unpickling) or its JSON dump (`.json`)."""
    path = Path(path)
    if path.suffix == ".json":
        refs = read_json(path, "refs")
    elif path.suffix in PICKLE_SUFFIXES:
        if not path.is_file():
            raise FileNotFoundError(f"refs {str(path)!r} is not a file")
        with open(path, "rb") as file:
            try:
                refs = safe_load(file, encoding="utf-8", errors="replace")
            except UnsafePickleError:
                raise
            except Exception as error:  # a broken pickle stream raises whatever its opcodes run into
                raise ValueError(f"refs {str(path)!r} is not a readable pickle ({error!r})") from None
    else:
        raise ValueError(f"refs {str(path)!r} must be a refs pickle ({', '.join(PICKLE_SUFFIXES)}) or a .json dump")
    if not isinstance(refs, list):
        raise ValueError(f"refs {str(path)!r} must hold a list of refs, got a {type(refs).__name__}")
    return refs


def _pixel_box(bbox: object) -> np.ndarray:
    """COCO [x, y, w, h] → x1, y1, x2, y2; `SkipItem("bad_box")` unless 4 finite numbers with w, h > 0."""
    try:
        x, y, width, height = (float(value) for value in bbox)
    except (TypeError, ValueError):
        raise SkipItem("bad_box", f"bbox {bbox!r} is not 4 numbers [x, y, w, h]") from None
    if not np.isfinite([x, y, width, height]).all() or width <= 0 or height <= 0:
        raise SkipItem("bad_box", f"bbox {bbox!r} needs finite values and a positive width and height")
    return np.array([x, y, x + width, y + height], dtype=np.float32)


def build_refcoco(
    refs: PathLike,
    instances: PathLike,
    region_features: PathLike | Sequence[PathLike],
    output: PathLike,
    *,
    split: str,
    refs_split: str | None = None,
    image_id_format: str = "{image_id}",
    # From here on write_split's keywords, spelled out in every builder's signature on purpose (its documentation).
    tag_vocab: TagVocab = None,
    id_offset: int = 0,
    num_shards: int = 1,
    shard_index: int = 0,
    lexicon=None,
    progress: bool = True,
) -> BuildSummary:
    """Write one RefCOCO+ split; returns the `BuildSummary`.

    Args:
        refs: `refs(unc).p` or its `.json` dump.
        instances: the `instances.json` of the same dataset.
        refs_split: the refs' `split` value to take (default: `split`, with "validation" → "val").
        image_id_format: COCO image id → feature image id.
        region_features, output, split, tag_vocab, id_offset, num_shards, shard_index, lexicon, progress: see
            `cmal_processing.builders.write_split`.
    """
    template = check_image_id_format(image_id_format, ("image_id",))
    refs_split = refs_split if refs_split is not None else {"validation": "val"}.get(split, split)
    ref_list = load_refs(refs)
    coco = read_json(instances, "instances", list_keys=("annotations", "images"))
    annotations = {ann["id"]: ann for ann in coco["annotations"]
                   if isinstance(ann, dict) and isinstance(ann.get("id"), (int, str))}
    images = {image["id"]: image for image in coco["images"]
              if isinstance(image, dict) and isinstance(image.get("id"), (int, str))}
    refused = SkipCounter("skipped items")

    def records():
        for position, ref in enumerate(ref_list):
            if not isinstance(ref, dict):
                refused.add("malformed_record", f"{Path(refs).name} ref {position}: a {type(ref).__name__}")
                continue
            if ref.get("split") != refs_split:
                continue
            sentences = ref.get("sentences")
            for number, sentence in enumerate(sentences if isinstance(sentences, list) else [None]):
                yield f"{Path(refs).name} ref_id {ref.get('ref_id')} sentence {number}", (ref, sentence)

    def make_item(record):
        ref, sentence = record
        require_fields(ref, ("ref_id", "ann_id", "image_id", "sentences"))
        text = text_field(require_fields(sentence, ("sent",))["sent"])
        annotation = annotations.get(record_id(ref, "ann_id"))
        if annotation is None:
            raise SkipItem("missing_annotation", f"ann_id {ref['ann_id']!r} is not in the instances annotations")
        image = images.get(record_id(ref, "image_id"))
        if image is None or not {"width", "height"} <= image.keys():
            raise SkipItem("unknown_image", f"image_id {ref['image_id']!r} has no width/height in instances images")
        item = {"ref_id": str(ref["ref_id"]), "text": text, "box": _pixel_box(annotation.get("bbox")),
                "size": (image["width"], image["height"])}
        return (format_image_id(template, image_id=ref["image_id"]),), item

    groups = collect_items(records(), make_item, refused)
    reaching_threshold = f"rows whose best region has IoU >= {IOU_THRESHOLD}"
    statistics = {reaching_threshold: 0}

    def task_columns(item, regions):
        (image,) = regions
        width, height = image["image_size"]
        if tuple(item["size"]) != (width, height):
            raise SkipItem("image_size_mismatch", f"instances say {item['size'][0]}x{item['size'][1]}, the region "
                           f"features {width}x{height}")
        ious = box_iou(image["visual_pos"], item["box"])
        label = int(np.argmax(ious))
        statistics[reaching_threshold] += int(ious[label] >= IOU_THRESHOLD)
        scale = np.array([width, height, width, height], dtype=np.float32)
        return {"ref_id": item["ref_id"], "text": item["text"],
                "target_box": np.clip(item["box"] / scale, 0.0, 1.0).tolist(), "region_ious": ious, "label": label}

    return write_split(
        task="refcoco",
        groups=groups,
        task_columns=task_columns,
        features=refcoco_features,
        refused=refused,
        region_features=region_features,
        output=output,
        split=split,
        statistics=statistics,
        tag_vocab=tag_vocab,
        id_offset=id_offset,
        num_shards=num_shards,
        shard_index=shard_index,
        lexicon=lexicon,
        progress=progress,
    )
