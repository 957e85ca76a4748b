"""Region extraction at corpus scale: a folder (or list) of photos → the image table, through a transformers detector.

    python -m cmal_processing extract --images DIR_OR_LIST --detector DIR --output DIR [--batch_size 8] [--top_k 36]
    accelerate launch -m cmal_processing extract ...          # one process per GPU, each its own shards

`extract_regions` runs `modeling_cmal.region_extraction.CmalRegionExtractor` (any DETR-family detector saved with
`save_pretrained`: DETR, Conditional / Deformable DETR, YOLOS, RT-DETR, ...) over the images in batches, on the
process' accelerator when there is one (`accelerate.PartialState().device`). The image list is cut into shards of
`images_per_shard` images in a fixed order; process `r` of `n` takes shards `r, r + n, ...`. A finished shard is a
file `regions-0000i.parquet` (written under a temporary name, renamed when complete), so a rerun after a crash
skips it: work resumes at the first unfinished shard.

**The image table** (the output, one row per image: what `cmal_processing.readers.RegionFeatureIndex` reads in place of
BUTD files, so every builder accepts `--features OUTPUT`): `image_id` (the file's stem, or its path relative to
the folder with `/` replaced by `__` when stems repeat), `image_width` / `image_height` (pixels), `num_regions` (M),
`feature_dim` (Dv, the detector's hidden size), `visual_feats` binary float16 `[M, Dv]`, `visual_pos` binary
float32 `[M, 4]` pixel boxes `x1, y1, x2, y2`, `tags` (M class names of the detector's `id2label`), `scores`
(M float32), `source` (the image's path).

Images that give no row are counted by reason and summarised at the end: `unreadable` (PIL cannot open it),
`too_small` (a side below `min_size` pixels, or too small for the detector's image processor), `empty` (no detection
above `score_threshold`), `float16_overflow` (a feature beyond float16's range, which the table would store as
infinity).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import torch
from tqdm.auto import tqdm

# The table's readers live with the other readers; this module writes the table (and re-exports them).
from .readers import decode_region_row, read_region_table  # noqa: F401
from .schema import REGION_FIELDS, encode_regions, write_parquet_shard
from .skips import SkipCounter

logger = logging.getLogger(__name__)

__all__ = ["IMAGE_EXTENSIONS", "REGION_TABLE_SCHEMA", "ExtractionSummary", "extract_regions", "list_images",
           "read_region_table"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SHARD_NAME = "regions-{index:05d}.parquet"
INFO_FILE = "region_table.json"
DEFAULT_IMAGES_PER_SHARD = 1000
DEFAULT_MIN_SIZE = 16

REGION_TABLE_SCHEMA = pa.schema([*REGION_FIELDS, ("source", pa.string())])


def list_images(images) -> list[tuple[str, Path]]:
    """`(image_id, path)` of every image of a folder (recursively, extensions `IMAGE_EXTENSIONS`), of a text file
    listing image paths (one per line, relative to the file's folder or absolute), or of a list of paths; sorted by
    path. Ids are file stems, or relative paths (`a/b.jpg` → `a__b`) when two files share a stem."""
    if isinstance(images, (str, os.PathLike)):
        source = Path(images)
        if source.is_dir():
            paths = sorted(path for path in source.rglob("*") if path.suffix.lower() in IMAGE_EXTENSIONS
                           and path.is_file())
            base = source
        elif source.is_file():
            lines = [line.strip() for line in source.read_text(encoding="utf-8").splitlines()]
            paths = [Path(line) if Path(line).is_absolute() else source.parent / line for line in lines if line]
            base = source.parent
        else:
            raise FileNotFoundError(f"images {str(source)!r} is neither a folder of images nor a file listing them")
    elif isinstance(images, Sequence) and all(isinstance(path, (str, os.PathLike)) for path in images):
        paths, base = sorted(Path(path) for path in images), None
    else:
        raise ValueError(f"images must be a folder, a file listing image paths or a list of paths, got {images!r}")
    if not paths:
        raise ValueError(f"images {str(images)!r} holds no image file (extensions {', '.join(IMAGE_EXTENSIONS)})")
    stems = [path.stem for path in paths]
    if len(set(stems)) == len(stems):
        return list(zip(stems, paths))
    ids = []
    for path in paths:
        try:
            relative = path.relative_to(base) if base is not None else path
        except ValueError:
            relative = path
        ids.append("__".join(relative.with_suffix("").parts).lstrip("_"))
    if len(set(ids)) != len(ids):
        raise ValueError(f"images {str(images)!r} lists some image twice; expected each file once")
    return list(zip(ids, paths))


@dataclass
class ExtractionSummary:
    """What one process did: images of its shards, rows written, shards written / kept from an earlier run, and the
    images skipped by reason (`unreadable`, `too_small`, `empty`, `float16_overflow`)."""

    output: Path
    images: int = 0
    rows_written: int = 0
    shards_written: int = 0
    shards_kept: int = 0
    skipped: SkipCounter = field(default_factory=lambda: SkipCounter("images skipped"))

    def format(self) -> str:
        return "\n".join([f"region extraction -> {self.output}",
                          f"images: {self.images}   rows written: {self.rows_written}   shards written: "
                          f"{self.shards_written}   shards kept from an earlier run: {self.shards_kept}",
                          self.skipped.format()])


def _open_image(path: Path):
    from modeling_cmal.region_extraction import load_rgb_image

    try:
        return load_rgb_image(path, "image")
    except ValueError as error:
        raise _Skip("unreadable", str(error)) from None


class _Skip(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _rows_of_batch(extractor, batch: list[tuple[str, Path, object]], skipped: SkipCounter) -> list[dict]:
    """Detect regions in a batch of opened images; an image the detector cannot take is retried alone and skipped."""
    try:
        detections = extractor([image for _, _, image in batch])
    except ValueError:
        if len(batch) == 1:
            image_id, path, image = batch[0]
            skipped.add("too_small", f"{path}: {image.width}x{image.height} pixels is too small for the detector")
            return []
        return [row for item in batch for row in _rows_of_batch(extractor, [item], skipped)]
    rows = []
    for (image_id, path, image), regions in zip(batch, detections):
        count = len(regions["tags"])
        if count == 0:
            skipped.add("empty", f"{path}: no detection above score_threshold {extractor.score_threshold}")
            continue
        try:
            row = encode_regions({**regions, "image_id": image_id, "image_width": image.width,
                                  "image_height": image.height})
        except ValueError as error:  # features beyond float16's range: stored they would read as infinity
            skipped.add("float16_overflow", f"{path}: {error}")
            continue
        rows.append({**row, "source": str(path)})
    return rows


def extract_regions(images, detector, output, *, batch_size: int = 8, images_per_shard: int = DEFAULT_IMAGES_PER_SHARD,
                    score_threshold: float = 0.2, top_k: int = 36, min_size: int = DEFAULT_MIN_SIZE,
                    progress: bool = True) -> ExtractionSummary:
    """Write this process' shards of the image table of `images` under `output` (see the module docstring).

    Args:
        images: a folder of images, a text file listing image paths, or a list of paths (`list_images`).
        detector: folder (or Hub id) of a transformers object detector with its image processor, or a
            `CmalRegionExtractor`.
        output: folder of the image table.
        batch_size: images per forward pass; images_per_shard: images per Parquet shard (the unit of resuming).
        score_threshold, top_k: `CmalRegionExtractor`'s (detections kept per image).
        min_size: images with a side below this many pixels are skipped (`too_small`).
    Returns this process' `ExtractionSummary`. Under `accelerate launch` every process calls it; each takes its
    shards and the main process writes `region_table.json` once all are done.
    """
    from accelerate import PartialState

    from modeling_cmal.region_extraction import CmalRegionExtractor

    for name, value, least in (("batch_size", batch_size, 1), ("images_per_shard", images_per_shard, 1),
                               ("min_size", min_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    listed = list_images(images)
    # Under torchrun-style launchers without a GPU (examples/accelerate_configs/cpu_2proc.yaml) accelerate needs
    # cpu=True to join the processes over gloo.
    state = PartialState(cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1)
    if isinstance(detector, CmalRegionExtractor):
        extractor = detector
    else:
        if isinstance(detector, (str, os.PathLike)) and not Path(detector).is_dir() and os.sep in str(detector):
            raise FileNotFoundError(f"detector {str(detector)!r} is not a folder; expected a detector saved with "
                                    "save_pretrained (config.json, weights, preprocessor_config.json)")
        extractor = CmalRegionExtractor.from_pretrained(str(detector), score_threshold=score_threshold, top_k=top_k,
                                                        batch_size=batch_size)
    extractor.model.to(state.device)
    root = Path(output)
    root.mkdir(parents=True, exist_ok=True)
    summary = ExtractionSummary(output=root)
    num_shards = -(-len(listed) // images_per_shard)
    mine = list(range(state.process_index, num_shards, state.num_processes))
    total = sum(len(listed[index * images_per_shard:(index + 1) * images_per_shard]) for index in mine)
    with tqdm(total=total, desc=f"regions (process {state.process_index})", unit=" images",
              disable=not progress) as bar:
        for index in mine:
            shard_images = listed[index * images_per_shard:(index + 1) * images_per_shard]
            summary.images += len(shard_images)
            target = root / SHARD_NAME.format(index=index)
            if target.is_file():
                summary.shards_kept += 1
                bar.update(len(shard_images))
                continue
            rows = _extract_shard(extractor, shard_images, min_size, batch_size, summary.skipped, bar)
            write_parquet_shard(pa.Table.from_pylist(rows, schema=REGION_TABLE_SCHEMA), str(target), row_group_size=200)
            summary.rows_written += len(rows)
            summary.shards_written += 1
            bar.set_postfix(skipped=summary.skipped.total, refresh=False)
    state.wait_for_everyone()
    if state.is_main_process:
        done = sorted(path.name for path in root.glob("regions-*.parquet"))
        (root / INFO_FILE).write_text(json.dumps({"shards": done, "images_listed": len(listed),
                                                  "feature_dim": extractor.feature_dim,
                                                  "detector": str(getattr(detector, "name_or_path", detector))},
                                                 indent=2), encoding="utf-8")
    return summary


def _extract_shard(extractor, shard_images, min_size: int, batch_size: int, skipped: SkipCounter, bar) -> list[dict]:
    rows, batch = [], []
    for image_id, path in shard_images:
        try:
            image = _open_image(path)
            if min(image.size) < min_size:
                raise _Skip("too_small", f"{path}: {image.width}x{image.height} pixels, a side below min_size "
                                         f"{min_size}")
            batch.append((image_id, path, image))
        except _Skip as skip:
            skipped.add(skip.reason, str(skip))
        if len(batch) == batch_size:
            rows += _rows_of_batch(extractor, batch, skipped)
            batch = []
        bar.update(1)
    if batch:
        rows += _rows_of_batch(extractor, batch, skipped)
    return rows


