"""Controls for evaluating vision-language heads: the same rows with each sample's image taken from another image.

A head that scores the same with shuffled images does not use the image; the gap between a model's score on the
real rows and on `images_shuffled` rows measures how much it does. Used by the quickstart and the ablation study.
"""

from __future__ import annotations

import numpy as np
from datasets import Dataset, concatenate_datasets

from .corpus import image_suffixes, image_table, join_regions
from .refcoco import box_iou

# The columns that describe an image in every task schema (`cmal_processing/schema.py`); NLVR2 has them once per image,
# with the suffixes `_0` and `_1`.
IMAGE_COLUMNS = ("image_id", "image_width", "image_height", "visual_feats", "visual_pos", "tags", "scores")


def _image_suffixes(dataset: Dataset) -> list[str]:
    suffixes = [suffix for suffix in ("", "_0", "_1") if f"visual_feats{suffix}" in dataset.column_names]
    if not suffixes:
        raise ValueError(f"dataset has no visual_feats column (columns: {dataset.column_names}); expected a task "
                         "split written by processing")
    return suffixes


def _partners(image_ids: list[str], rng: np.random.Generator) -> dict[str, str]:
    """Each image's partner: the distinct images are put in a random cycle and each image takes the next one's
    regions, so no row keeps its own image (whatever the number of rows per image)."""
    distinct = list(dict.fromkeys(image_ids))
    if len(distinct) < 2:
        raise ValueError(f"images_shuffled needs rows of at least 2 different images, got {len(distinct)}")
    order = rng.permutation(len(distinct))
    return {distinct[order[i]]: distinct[order[(i + 1) % len(order)]] for i in range(len(order))}


def _partner_rows(image_ids: list[str], rng: np.random.Generator) -> np.ndarray:
    """For every row, the first row of its image's partner (`_partners`)."""
    partner = _partners(image_ids, rng)
    first_row = {}
    for row, image_id in enumerate(image_ids):
        first_row.setdefault(image_id, row)
    return np.asarray([first_row[partner[image_id]] for image_id in image_ids], dtype=np.int64)


def images_shuffled(dataset: Dataset, seed: int = 0) -> Dataset:
    """`dataset` with every row's image columns (regions, boxes, tags, scores, ids, sizes) replaced by those of a
    row of another image; text and labels stay. Each image column set (`_0`, `_1` for NLVR2) is shuffled on its
    own. Referring-expression rows (`target_box`, `region_ious`) get `region_ious` and `label` recomputed against
    the new image's boxes (the referred box, in normalised coordinates, stays where it was).

    A split read with `cmal_processing.corpus.load_corpus` (each image's regions in its image table) comes back the same
    way, with only the rows' image ids exchanged; a seed shuffles it as it shuffles the single table of the same rows.

    Deterministic for `seed`. Raises `ValueError` for a split without image columns or with a single image.
    """
    if not isinstance(dataset, Dataset):
        raise ValueError(f"dataset must be a datasets.Dataset (one split), got {type(dataset).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    rng = np.random.default_rng(seed)
    images = image_table(dataset)
    if images is not None:
        return _references_shuffled(dataset, images, rng)
    shuffled = dataset
    for suffix in _image_suffixes(dataset):
        columns = [f"{name}{suffix}" for name in IMAGE_COLUMNS if f"{name}{suffix}" in dataset.column_names]
        id_column = f"image_id{suffix}"
        image_ids = ([str(value) for value in dataset[id_column]] if id_column in dataset.column_names
                     else [str(row) for row in range(len(dataset))])
        source = dataset.select(_partner_rows(image_ids, rng)).select_columns(columns)
        shuffled = concatenate_datasets([shuffled.remove_columns(columns), source], axis=1)
    if "target_box" in shuffled.column_names and "region_ious" in shuffled.column_names:
        def relabel(row):
            ious = box_iou(np.asarray(row["visual_pos"]).reshape(-1, 4), row["target_box"])
            return {"region_ious": ious.tolist(), "label": int(np.argmax(ious)) if len(ious) else 0}

        shuffled = shuffled.map(relabel, desc="referred boxes against the new regions")
    return shuffled.select_columns(dataset.column_names)


def _references_shuffled(dataset: Dataset, images: Dataset, rng: np.random.Generator) -> Dataset:
    """`images_shuffled` of a split joined with its image table: only the rows' image ids change (drawn as for a
    single table, so a seed shuffles both layouts alike), and the regions follow through the join."""
    task = dataset.with_format(None)
    for suffix in image_suffixes(task.features):
        column = f"image_id{suffix}"
        partner = _partners([str(value) for value in task[column]], rng)
        task = task.map(lambda batch, c=column, p=partner: {c: [p[str(value)] for value in batch[c]]}, batched=True,
                        keep_in_memory=True, desc=f"{column} shuffled")
    if "target_box" in task.column_names and "region_ious" in task.column_names:
        joined = join_regions(task.select_columns(["image_id", "target_box"]), images)
        ious = [box_iou(np.asarray(boxes).reshape(-1, 4), target) for batch in joined.iter(batch_size=256)
                for boxes, target in zip(batch["visual_pos"], batch["target_box"])]
        labels = [int(np.argmax(values)) if len(values) else 0 for values in ious]
        task = task.map(lambda _, index: {"region_ious": ious[index].tolist(), "label": labels[index]},
                        with_indices=True, keep_in_memory=True, desc="referred boxes against the new regions")
    return join_regions(task, images)


__all__ = ["IMAGE_COLUMNS", "images_shuffled"]
