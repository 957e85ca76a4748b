"""Map-style corpora with each image's regions stored once: the task table, the image table, and their join.

**Layout.** A corpus folder is a `datasets.DatasetDict` folder (`dataset_dict.json`, one folder per split). Each
split folder holds two saved `Dataset`s:

    vqa/
      dataset_dict.json
      answer_vocab.json            (files a task writes beside its splits)
      train/                       the task table: one row per item (question, caption, pair, expression)
        data-00000-of-00001.arrow    with its task columns and `image_id` (`image_id_0`, `image_id_1` for NLVR2)
        images/                    the image table: one row per image its items use, keyed by `image_id`,
          data-00000-of-00001.arrow  holding its regions once, as `cmal_processing/schema.py`'s `REGION_FIELDS`
                                     store them (binary arrays with their `num_regions`, `feature_dim`)

The schema functions of `cmal_processing/schema.py` (`vqa_features`, ...) describe the *joined* row, which is what
`load_corpus` returns; `split_features` cuts such a `Features` into the two stored tables.

**Reading.** `load_corpus(path)` returns every split as the task table with a `RegionJoin` transform: a row (or a
batch) read from it carries its image's region columns, looked up by `image_id` in the image table, and every
column comes formatted as `with_format("numpy")` formats it, so the rows equal those of a single table holding
every column. `select`, `shuffle`, `filter` and `map` keep the join; `with_format(None)` drops it and reads the task
columns alone (fast, for labels). `corpus_features(rows)` is the `Features` of the joined rows. Folders written by
earlier versions read the same: an image table of `Array2D` region columns, or one table with the region columns in
every row (written before the image table existed).

**Writing.** `cmal_processing.builders.write_split` and the synthetic world write this layout; `save_corpus` saves a
`DatasetDict` of joined splits (keeping only the images each split uses) or of single-table splits.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
from datasets import Dataset, DatasetDict, Features, load_from_disk
from datasets.formatting import NumpyFormatter

from .schema import (REGION_COLUMNS, STORED_REGION_COLUMNS, decode_regions, encode_regions, image_table_features,
                     region_features)

__all__ = [
    "IMAGE_TABLE",
    "RegionJoin",
    "binary_image_table",
    "corpus_features",
    "image_feature_dim",
    "image_suffixes",
    "image_table",
    "join_regions",
    "joined_features",
    "load_corpus",
    "load_split",
    "save_corpus",
    "save_split",
    "separate_images",
    "split_features",
]

IMAGE_TABLE = "images"  # the image table's folder inside a split folder
_IMAGE_ID = re.compile(r"^image_id(_\d+)?$")
# The region columns a joined row gets from its image table (besides the key `image_id`).
_REGION_VALUES = tuple(name for name in REGION_COLUMNS if name != "image_id")
# Decoded from the stored binary buffers; the other region columns are read as they are stored.
_ARRAY_COLUMNS = ("visual_feats", "visual_pos")


def image_suffixes(features: Features | Sequence[str]) -> list[str]:
    """The image slots of a table: `[""]` for one image per row, `["_0", "_1"]` for NLVR2 (from its image id
    columns)."""
    return [match.group(1) or "" for name in features if (match := _IMAGE_ID.match(name))]


def split_features(features: Features) -> tuple[Features, Features]:
    """`(task table features, image table features)` of the joined row `features` (a `cmal_processing/schema.py`
    function's result): the task table keeps its own columns and each image slot's `image_id{suffix}`; the image
    table stores each image's regions once (`image_table_features()`)."""
    suffixes = image_suffixes(features)
    if not suffixes:
        raise ValueError(f"features have no image_id column (columns: {list(features)}); expected a task schema of "
                         "cmal_processing/schema.py")
    regions = {f"{name}{suffix}" for suffix in suffixes for name in _REGION_VALUES}
    task = Features({name: value for name, value in features.items() if name not in regions})
    return task, image_table_features()


def separate_images(rows: Iterable[Mapping], suffixes: Sequence[str] = ("",)) -> tuple[list[dict], list[dict]]:
    """Joined rows (each with its images' region columns) → `(task rows, image rows)`: each image once, in order of
    first use, as stored (`encode_regions`). For corpora built in memory (the synthetic world); `write_split`
    streams the same split."""
    task_rows, image_rows, seen = [], [], set()
    for row in rows:
        task_row = dict(row)
        for suffix in suffixes:
            image = {name: task_row.pop(f"{name}{suffix}") for name in _REGION_VALUES}
            image_id = task_row[f"image_id{suffix}"]
            if image_id not in seen:
                seen.add(image_id)
                image_rows.append(encode_regions({"image_id": image_id, **image}))
        task_rows.append(task_row)
    return task_rows, image_rows


def _stores_binary(images: Dataset) -> bool:
    """Whether an image table stores its arrays as binary buffers (`REGION_FIELDS`); else as `Array2D` columns,
    as corpus folders written before did."""
    return all(name in images.column_names for name in STORED_REGION_COLUMNS) and \
        images.features["visual_feats"].dtype == "binary"


def image_feature_dim(images: Dataset) -> int | None:
    """The region feature width (Dv) of an image table; None for an empty table of the binary layout."""
    if not _stores_binary(images):
        return images.features["visual_feats"].shape[1]
    return int(images.with_format(None)[0]["feature_dim"]) if images.num_rows else None


def joined_features(task_features: Features, images: Dataset) -> Features:
    """The `Features` of joined rows, in the order of `cmal_processing/schema.py`: each image slot's region columns
    as read (`region_features`), then the task columns. For an empty image table of the binary layout, whose
    feature width is unknown, the region columns are given as stored."""
    feature_dim = image_feature_dim(images)
    joined = {}
    for suffix in image_suffixes(task_features):
        if _stores_binary(images) and feature_dim is not None:
            joined.update(region_features(feature_dim, suffix))
        else:
            joined.update({f"{name}{suffix}": images.features[name] for name in REGION_COLUMNS})
    joined.update({name: value for name, value in task_features.items() if name not in joined})
    return Features(joined)


def binary_image_table(images: Dataset) -> Dataset:
    """An image table in the binary layout of `REGION_FIELDS`: `images` itself when it is, else its rows re-encoded
    (an image table of `Array2D` region columns, as corpus folders written by earlier versions hold)."""
    if _stores_binary(images):
        return images
    return images.with_format("numpy").map(encode_regions, features=image_table_features(),
                                           remove_columns=images.column_names, desc="image table re-encoded")


def _as_batch(arrays: list[np.ndarray]) -> np.ndarray:
    """One column of decoded arrays as `with_format("numpy")` gives an `Array2D` column: stacked when every array
    has the same shape, else a 1-d object array of them."""
    if arrays and all(array.shape == arrays[0].shape for array in arrays):
        return np.stack(arrays)
    column = np.empty(len(arrays), dtype=object)
    for index, array in enumerate(arrays):
        column[index] = array
    return column


class RegionJoin:
    """The `with_transform` of a joined split: adds each row's region columns from `images` by `image_id` (per
    image slot, with its suffix) and formats every column as `with_format("numpy")` would.

    Args:
        images: the image table (one row per image: its regions as `REGION_FIELDS` store them, or the `Array2D`
            region columns of earlier corpus folders).
        task_features: the `Features` of the task table the transform is set on.

    Raises `KeyError` naming the image for a row whose image the image table lacks.
    """

    def __init__(self, images: Dataset, task_features: Features):
        self.binary = _stores_binary(images)
        expected = STORED_REGION_COLUMNS if self.binary else REGION_COLUMNS
        missing = [name for name in expected if name not in images.column_names]
        if missing:
            raise ValueError(f"the image table lacks the columns {missing}; expected {list(expected)}")
        self.images = images
        self.suffixes = image_suffixes(task_features)
        if not self.suffixes:
            raise ValueError(f"the task table has no image_id column (columns: {list(task_features)})")
        self._rows = None  # image id -> image table row, built on first use (and in each loader worker)
        self._numpy_images = None  # the image table's region columns, numpy-formatted (the arrays apart)
        self._stored_arrays = None  # the image table's binary arrays with their shapes, as stored
        self._task_formatter = NumpyFormatter()  # task columns need no decoding (no Image or Audio features)
        # Arrow types of the task columns; a column added later (map, add_column) has its type inferred.
        self._arrow_types = {field.name: field.type for field in task_features.arrow_schema}

    def row_of(self, image_ids: Sequence[str]) -> list[int]:
        """Image table rows of `image_ids`."""
        if self._rows is None:
            ids = self.images.with_format(None)["image_id"]
            self._rows = {image_id: row for row, image_id in reversed(list(enumerate(ids)))}
        try:
            return [self._rows[str(image_id)] for image_id in image_ids]
        except KeyError as error:
            raise KeyError(f"image {error.args[0]!r} is referred to by a row but missing from the image table "
                           f"({len(self._rows)} images); rebuild the corpus") from None

    def __call__(self, batch: dict) -> dict:
        table = pa.Table.from_pydict({name: pa.array(values, type=self._arrow_types.get(name))
                                      for name, values in batch.items()})
        task = self._task_formatter.format_batch(table)
        joined = {}
        for suffix in self.suffixes:
            if f"image_id{suffix}" not in batch:
                continue
            regions = self.regions(self.row_of(batch[f"image_id{suffix}"]))
            joined[f"image_id{suffix}"] = task[f"image_id{suffix}"]
            joined.update({f"{name}{suffix}": regions[name] for name in _REGION_VALUES})
        joined.update({name: value for name, value in task.items() if name not in joined})
        return joined

    def regions(self, rows: list[int]) -> dict:
        """The region columns (`image_id` apart) of image table `rows`, numpy-formatted, arrays decoded."""
        if self._numpy_images is None:
            plain = [name for name in _REGION_VALUES if not (self.binary and name in _ARRAY_COLUMNS)]
            self._numpy_images = self.images.with_format("numpy", columns=plain)
            if self.binary:
                self._stored_arrays = self.images.with_format(
                    "arrow", columns=["num_regions", "feature_dim", *_ARRAY_COLUMNS])
        regions = dict(self._numpy_images[rows])
        if self.binary:
            stored = self._stored_arrays[rows].to_pydict()
            decoded = [decode_regions(*values) for values in zip(*(stored[name] for name in (
                "num_regions", "feature_dim", *_ARRAY_COLUMNS)))]
            for index, name in enumerate(_ARRAY_COLUMNS):
                regions[name] = _as_batch([arrays[index] for arrays in decoded])
        return regions

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_rows": None, "_numpy_images": None, "_stored_arrays": None}  # rebuilt where used


def join_regions(rows: Dataset, images: Dataset) -> Dataset:
    """The task table `rows` with each row's region columns joined from the image table `images` (`RegionJoin`)."""
    return rows.with_format(None).with_transform(RegionJoin(images, rows.features))


def _join_of(rows: Dataset) -> RegionJoin | None:
    transform = rows.format.get("format_kwargs", {}).get("transform") if rows.format.get("type") == "custom" else None
    return transform if isinstance(transform, RegionJoin) else None


def image_table(rows: Dataset) -> Dataset | None:
    """The image table a joined split reads its regions from; None for a single-table split."""
    join = _join_of(rows)
    return None if join is None else join.images


def corpus_features(rows: Dataset) -> Features:
    """The `Features` of the rows as read: the task table's current columns joined with the image table's region
    columns for a joined split, else `rows.features`."""
    join = _join_of(rows)
    return rows.features if join is None else joined_features(rows.features, join.images)


def load_split(path) -> Dataset:
    """One split folder: the task table joined with its image table (`<path>/images`), or a single-table split
    written before the image table existed, formatted as numpy. Raises `FileNotFoundError` / `ValueError` naming
    the folder when it is neither."""
    path = Path(path)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"{str(path)!r} is not a split folder written by processing (no state.json)")
    rows = load_from_disk(str(path))
    if (path / IMAGE_TABLE / "state.json").is_file():
        return join_regions(rows, load_from_disk(str(path / IMAGE_TABLE)))
    if not any(name.startswith("visual_feats") for name in rows.column_names):
        raise ValueError(f"split {str(path)!r} has no region columns and no image table ({IMAGE_TABLE}/): rebuild it "
                         "with python -m cmal_processing build (or the synthetic world)")
    return rows.with_format("numpy")


def load_corpus(path) -> DatasetDict:
    """Every split of a corpus folder (`dataset_dict.json` + split folders), each as `load_split` reads it."""
    path = Path(path)
    if not (path / "dataset_dict.json").is_file():
        hint = " (it is one split: use load_split)" if (path / "state.json").is_file() else ""
        raise FileNotFoundError(f"{str(path)!r} is not a corpus folder written by processing (no dataset_dict.json)"
                                f"{hint}")
    splits = load_from_disk(str(path))
    return DatasetDict({name: load_split(path / name) for name in splits})


def save_split(rows: Dataset, path) -> None:
    """Save one split as `load_split` reads it: a joined split as its task table plus the images its rows use, a
    single-table split as one table."""
    path = Path(path)
    join = _join_of(rows)
    if join is None:
        rows.with_format(None).save_to_disk(str(path))
        return
    task = rows.with_format(None)
    used = sorted(set(join.row_of([image_id for suffix in join.suffixes for image_id in task[f"image_id{suffix}"]])))
    task.save_to_disk(str(path))
    join.images.select(np.asarray(used, dtype=np.int64)).save_to_disk(str(path / IMAGE_TABLE))


def save_corpus(corpus: Mapping[str, Dataset], path) -> None:
    """Save splits (a `DatasetDict` or a dict of split name → `Dataset`) as a corpus folder `load_corpus` reads."""
    import json

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for name, rows in corpus.items():
        save_split(rows, path / name)
    (path / "dataset_dict.json").write_text(json.dumps({"splits": list(corpus)}), encoding="utf-8")
