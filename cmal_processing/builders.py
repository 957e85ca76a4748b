"""What every corpus builder shares: items grouped by image, sharding, atomic writing of one split, the summary.

A task builder (`captions.py`, `vqa.py`, `nlvr2.py`, `snli_ve.py`, `refcoco.py`) reads its text-side annotations
into `ItemGroup`s — the items that need the same image(s), in order of first appearance — and hands them to
`write_split` with a function that turns one item and its images' `regions` dicts into the task's columns.
`write_split` then

- takes this shard's contiguous block of groups (`num_shards`, `shard_index`): the concatenation of all shards in
  index order is exactly the unsharded dataset, and every image is decoded by one shard only;
- decodes each group's images once through a `RegionFeatureIndex` (one image in memory at a time) and streams
  the task rows into `datasets.Dataset.from_generator` and each image used by a written row, once, into the
  split's image table (`cmal_processing/corpus.py`), with the explicit `Features` of `cmal_processing/schema.py` cut by
  `split_features` (`visual_feats` float16, `visual_pos` = boxes / (width, height, width, height) clipped to
  [0, 1]; every box that reached past the image edge is counted in the summary's `clipped_boxes`, the first one
  logged as a warning);
- skips and counts, never raises on, bad data: an image without features (`missing_features`), with corrupt
  features (`corrupt_features`, the row's own reason in `region_errors`), or an item the task refuses;
- writes into a temporary sibling `.<split>.tmp-<token>` and renames it into place only when complete, so an
  interrupted run leaves no split folder behind (a rerun removes stale temporaries first);
- keeps the output a `DatasetDict` folder: `<output>/<split>/` (the task table, with the image table in
  `<output>/<split>/images/`) plus `dataset_dict.json` listing every split present.

**Splits.** Each run writes one split; run the builder once per split with the same `--output` and the splits
accumulate in one `DatasetDict` (`cmal_processing.corpus.load_corpus(output)` gives them all, regions joined). Splits
of one folder must share their features (same feature dimension), and files written beside them (VQA's
`answer_vocab.json`) must agree.

**Shards.** With `num_shards > 1` shard `i` writes `<output>/shard-0000i-of-0000N/` (a `DatasetDict` folder of its
own). Once all shards are done, `merge_shards(output, split)` (CLI: `python -m cmal_processing merge`) concatenates
their task tables and their image tables (an image two shards hold, as NLVR2 pairs can, keeps one row) into
`<output>/<split>/`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import string
import textwrap
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from datasets import Dataset, Features, NamedSplit, concatenate_datasets, load_from_disk
from datasets.arrow_writer import ArrowWriter
from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
from tqdm.auto import tqdm

from .corpus import IMAGE_TABLE, binary_image_table, image_suffixes, joined_features, split_features
from .readers import CorruptRegionsError, PathLike, RegionFeatureIndex, TagVocab
from .schema import FLOAT16_MAX, encode_regions
from .skips import SkipCounter

__all__ = [
    "BuildSummary",
    "ItemGroup",
    "SkipItem",
    "check_image_id_format",
    "class_label",
    "collect_items",
    "dataset_root",
    "format_image_id",
    "image_columns",
    "merge_shards",
    "read_json",
    "read_jsonl",
    "record_id",
    "require_fields",
    "shard_bounds",
    "text_field",
    "write_split",
]

DATASET_DICT_FILE = "dataset_dict.json"
SPLIT_ORDER = ("train", "validation", "test")
SHARD_FOLDER = re.compile(r"^shard-(\d{5})-of-(\d{5})$")
# Rows buffered before each Arrow flush: 100 rows of 100 regions x 2048 float16 features are about 40 MB.
WRITER_BATCH_SIZE = 100


class SkipItem(Exception):
    """Raised by a task's column function to leave one item out; `reason` is the `SkipCounter` key."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class ItemGroup:
    """Items that need the same image(s). `image_ids` has one feature image id per image slot of the task
    (one, or two for NLVR2); every item is a dict of task-side fields with a `where` key naming its source record."""

    image_ids: tuple[str, ...]
    items: list[dict] = field(default_factory=list)


def collect_items(
    records: Iterable[tuple[str, object]],
    make_item: Callable[[object], tuple[tuple[str, ...], dict]],
    refused: SkipCounter,
) -> list[ItemGroup]:
    """Turn `(where, record)` pairs into `ItemGroup`s, in order of first appearance of their images.

    `make_item(record)` returns `(feature image ids, item fields)` or raises `SkipItem`, which is counted in
    `refused` with `where` (the record's place in its file). Every item gets its `where`.
    """
    groups: dict[tuple[str, ...], ItemGroup] = {}
    for where, record in records:
        try:
            image_ids, item = make_item(record)
        except SkipItem as error:
            refused.add(error.reason, f"{where}: {error}")
            continue
        item["where"] = where
        groups.setdefault(image_ids, ItemGroup(image_ids)).items.append(item)
    return list(groups.values())


def check_image_id_format(template: str, fields: Sequence[str]) -> str:
    """Check that `template` (a `str.format` string turning a source's image reference into the feature files'
    image id, e.g. `"COCO_train2014_{image_id:012d}"`) uses only `fields`."""
    if not isinstance(template, str) or not template:
        raise ValueError(f"image_id_format must be a non-empty format string, got {template!r}")
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as error:
        raise ValueError(f"image_id_format {template!r} is not a valid format string ({error})") from None
    unknown = [name for name in names if re.split(r"[.\[]", name)[0] not in fields]
    if not names or unknown:
        raise ValueError(
            f"image_id_format {template!r} must use only the fields {{{'}, {'.join(fields)}}}; it uses {names}"
        )
    return template


def format_image_id(template: str, **fields) -> str:
    """`template.format(**fields)`; a value the template cannot format raises `SkipItem("bad_image_id")`."""
    try:
        return template.format(**fields)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as error:
        raise SkipItem("bad_image_id", f"image_id_format {template!r} cannot format {fields} ({error})") from None


def image_columns(regions: dict, suffix: str = "", clipped: SkipCounter | None = None) -> dict:
    """The region columns of `cmal_processing/schema.py` for one image's `regions` dict.

    `visual_feats` float16 [M, D]; `visual_pos` float32 [M, 4] = boxes / (width, height, width, height) clipped
    to [0, 1]. Every box that reaches past the image edge is counted in `clipped` (reason `box_past_edge`, one
    count per box) when one is given. Features beyond the float16 range raise
    `CorruptRegionsError("float16_overflow")`.
    """
    width, height = regions["image_size"]
    features = regions["visual_feats"]
    if np.abs(features).max() > FLOAT16_MAX:
        raise CorruptRegionsError("float16_overflow", f"features reach {np.abs(features).max():.4g} > float16 max")
    scale = np.array([width, height, width, height], dtype=np.float32)
    if clipped is not None:
        boxes = regions["visual_pos"]
        past = ((boxes < 0).any(axis=1) | (boxes[:, [0, 2]] > width).any(axis=1)
                | (boxes[:, [1, 3]] > height).any(axis=1))
        for index in np.flatnonzero(past).tolist():
            clipped.add("box_past_edge", f"image {regions['image_id']!r} box {index} {boxes[index].tolist()} clipped "
                                         f"to the {width}x{height} image")
    return {
        f"image_id{suffix}": regions["image_id"],
        f"image_width{suffix}": int(width),
        f"image_height{suffix}": int(height),
        f"visual_feats{suffix}": features.astype(np.float16),
        f"visual_pos{suffix}": np.clip(regions["visual_pos"] / scale, 0.0, 1.0).astype(np.float32),
        f"tags{suffix}": list(regions["tags"]),
        f"scores{suffix}": regions["scores"].astype(np.float32),
    }


def shard_bounds(num_items: int, num_shards: int, shard_index: int) -> tuple[int, int]:
    """`[start, end)` of shard `shard_index`'s contiguous block when `num_items` are cut into `num_shards`."""
    if not isinstance(num_shards, int) or num_shards < 1:
        raise ValueError(f"num_shards must be an int >= 1, got {num_shards!r}")
    if not isinstance(shard_index, int) or not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index must be an int in [0, {num_shards}), got {shard_index!r}")
    return num_items * shard_index // num_shards, num_items * (shard_index + 1) // num_shards


def dataset_root(output: PathLike, num_shards: int = 1, shard_index: int = 0) -> Path:
    """The `DatasetDict` folder a run writes: `output`, or `output/shard-0000i-of-0000N` when sharded."""
    shard_bounds(0, num_shards, shard_index)
    output = Path(output)
    return output if num_shards == 1 else output / f"shard-{shard_index:05d}-of-{num_shards:05d}"


@dataclass
class BuildSummary:
    """What one builder run did (returned by every `build_*` function; `format()` is what the CLI prints).

    `items` counts this shard's text-side records; each is either written (`rows_written`) or counted in
    `skipped` by reason. `region_errors` counts the feature rows that could not be decoded, by reason.
    `clipped_boxes` counts the boxes that reached past the image edge and were clipped to it (reason
    `box_past_edge`), once per image decoded for this shard's rows however many rows use it.
    """

    task: str
    split: str
    dataset_path: Path
    items: int
    rows_written: int
    skipped: SkipCounter
    region_errors: SkipCounter
    statistics: dict[str, float] = field(default_factory=dict)
    images_written: int = 0
    anchor_statistics: object | None = None
    shard: tuple[int, int] = (0, 1)
    clipped_boxes: SkipCounter = field(default_factory=lambda: SkipCounter("boxes clipped to the image edge"))

    def format(self) -> str:
        shard_index, num_shards = self.shard
        lines = [
            f"{self.task} / {self.split}" + (f" (shard {shard_index} of {num_shards})" if num_shards > 1 else "")
            + f" -> {self.dataset_path}",
            f"items: {self.items}   rows written: {self.rows_written}   images written: {self.images_written}",
            self.skipped.format(),
            self.region_errors.format(),
            self.clipped_boxes.format(),
        ]
        lines += [f"{name}: {value}" for name, value in self.statistics.items()]
        if self.anchor_statistics is not None:
            lines += ["anchor statistics:", textwrap.indent(self.anchor_statistics.format(), "  ")]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# Folder housekeeping
# --------------------------------------------------------------------------------------------------------------


def _check_split_name(split: str) -> str:
    if not isinstance(split, str) or not re.fullmatch(r"\w+(\.\w+)*", split):
        raise ValueError(f"split must be a name of word characters like 'train' or 'validation', got {split!r}")
    return split


def _saved_splits(root: Path) -> list[str]:
    """Split folders present under a `DatasetDict` root, train / validation / test first."""
    if not root.is_dir():
        return []
    names = [p.name for p in root.iterdir() if not p.name.startswith(".") and (p / "state.json").is_file()]
    return sorted(names, key=lambda name: (SPLIT_ORDER.index(name) if name in SPLIT_ORDER else len(SPLIT_ORDER), name))


def _write_text_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def _write_dataset_dict_json(root: Path) -> None:
    _write_text_atomically(root / DATASET_DICT_FILE, json.dumps({"splits": _saved_splits(root)}))


def _remove_stale_temporaries(root: Path, name: str) -> None:
    """Leftovers of an interrupted run writing `name` (`.<name>.tmp-*`, `.<name>.old-*`)."""
    for path in root.glob(f".{name}.*-*"):
        if path.name.startswith((f".{name}.tmp-", f".{name}.old-")):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def _stored_features(split_folder: Path) -> Features:
    """The joined row `Features` of a saved split: its task table's with its image table's, or the single table's."""
    task = Features.from_dict(json.loads((split_folder / "dataset_info.json").read_text(encoding="utf-8"))["features"])
    if not (split_folder / IMAGE_TABLE / "dataset_info.json").is_file():
        return task
    return joined_features(task, load_from_disk(str(split_folder / IMAGE_TABLE)))


def _prepare_root(root: Path, split: str, features: Features, extra_files: dict[str, str]) -> None:
    """Create `root`, remove stale temporaries and refuse to mix incompatible splits in one `DatasetDict`."""
    if (root / "state.json").is_file():
        raise ValueError(f"output {str(root)!r} holds a single Dataset; expected a DatasetDict folder or a new path")
    root.mkdir(parents=True, exist_ok=True)
    for name in (split, DATASET_DICT_FILE, *extra_files):
        _remove_stale_temporaries(root, name)
    others = [name for name in _saved_splits(root) if name != split]
    for other in others:
        other_features = _stored_features(root / other)
        if _feature_dim(other_features) is None and image_suffixes(other_features):
            # An empty split of the binary layout: its feature width is unknown, its columns are what count.
            same = split_features(other_features)[0] == split_features(features)[0]
        else:
            same = other_features == features
        if not same:
            raise ValueError(
                f"split {other!r} of {str(root)!r} has other columns than the {split!r} split being built (its region "
                f"features are {_feature_dim(other_features)}-d, these {_feature_dim(features)}-d, or it is another "
                f"task or layout): use a new output folder"
            )
    for name, text in extra_files.items():
        path = root / name
        if others and path.is_file() and path.read_text(encoding="utf-8") != text:
            raise ValueError(
                f"{str(path)!r} differs from the {name} of this {split!r} build and splits {others} use it: pass that "
                f"file to reuse it, or use a new output folder"
            )


def _feature_dim(features: Features) -> int | None:
    visual = next((value for name, value in features.items() if name.startswith("visual_feats")), None)
    return getattr(visual, "shape", (None, None))[1]


def _install_folder(source: Path, target: Path) -> None:
    """Move a complete folder into place, replacing `target` (briefly renamed aside, then deleted)."""
    aside = None
    if target.exists():
        aside = target.with_name(f".{target.name}.old-{uuid.uuid4().hex}")
        os.replace(target, aside)
    os.replace(source, target)
    if aside is not None:
        shutil.rmtree(aside)


@contextlib.contextmanager
def _own_progress_bar_only():
    """Silence `datasets`' progress bars while ours runs (restored afterwards)."""
    was_enabled = not are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            enable_progress_bars()


def _save_atomically(root: Path, split: str, make_dataset: Callable[[Path], tuple[Dataset, Dataset | None]],
                     extra_files: dict[str, str]):
    """Build a split in `.<split>.tmp-<token>`, then install its extra files and the split folder, in that order
    (a split is never visible without its extra files). `make_dataset` returns the task table and the image table
    (None for a single-table split), saved as the split folder and its `images/` folder in one rename. Nothing is
    left behind when `make_dataset` raises."""
    token = uuid.uuid4().hex
    temporary = root / f".{split}.tmp-{token}"
    try:
        tables = make_dataset(temporary)
        for dataset, folder in zip(tables, (temporary / "dataset", temporary / "dataset" / IMAGE_TABLE)):
            if dataset is not None:
                dataset.save_to_disk(str(folder), num_shards=1 if dataset.num_rows == 0 else None)
        del tables, dataset
        for name, text in extra_files.items():
            _write_text_atomically(root / name, text)
        _install_folder(temporary / "dataset", root / split)
        _write_dataset_dict_json(root)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------------
# Annotation files
# --------------------------------------------------------------------------------------------------------------


def read_json(path: PathLike, argument: str, list_keys: Sequence[str] = ()) -> object:
    """A whole JSON file; `list_keys` are top-level keys its object must have, each holding a list. Errors name
    `argument`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{argument} {str(path)!r} is not a file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{argument} {str(path)!r} is not valid JSON ({error})") from None
    missing = [key for key in list_keys if not isinstance(data, dict) or not isinstance(data.get(key), list)]
    if missing:
        raise ValueError(f"{argument} {str(path)!r} lacks the top-level lists {missing}; expected {list(list_keys)}")
    return data


def read_jsonl(path: PathLike, argument: str, refused: SkipCounter) -> Iterator[tuple[str, dict]]:
    """`(where, record)` for every JSON object line of a `.jsonl` file; other lines are counted as
    `malformed_record` in `refused`; blank lines are ignored."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{argument} {str(path)!r} is not a file")
    with open(path, encoding="utf-8") as file:
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            where = f"{path.name} line {line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                refused.add("malformed_record", f"{where}: not JSON ({error})")
                continue
            if not isinstance(record, dict):
                refused.add("malformed_record", f"{where}: a JSON {type(record).__name__}, expected an object")
                continue
            yield where, record


def require_fields(record: object, fields: Sequence[str]) -> dict:
    """`record` if it is a dict with all `fields`, else `SkipItem("malformed_record")` naming what is missing."""
    if not isinstance(record, dict):
        raise SkipItem("malformed_record", f"a {type(record).__name__}, expected an object with {list(fields)}")
    missing = [name for name in fields if name not in record]
    if missing:
        raise SkipItem("malformed_record", f"lacks {missing}; expected {list(fields)}")
    return record


def record_id(record: dict, key: str) -> int | str:
    """`record[key]` if it is an int or a str (an id to look up), else `SkipItem("malformed_record")`."""
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise SkipItem("malformed_record", f"{key} {value!r} is not an int or a str")
    return value


def class_label(record: dict, key: str, names: Sequence[str]) -> int:
    """Index of `str(record[key])` in `names`; -1 (no label, e.g. a hidden test split) when `key` is absent;
    `SkipItem("bad_label")` for any other value."""
    if key not in record:
        return -1
    value = str(record[key])
    if value not in names:
        raise SkipItem("bad_label", f"{key} {record[key]!r} is none of {list(names)}")
    return names.index(value)


def text_field(value: object) -> str:
    """A non-empty string (surrounding white space removed), else `SkipItem("empty_text")`."""
    if not isinstance(value, str) or not value.strip():
        raise SkipItem("empty_text", f"text {value!r} is empty or not a string")
    return value.strip()


# --------------------------------------------------------------------------------------------------------------
# Writing one split
# --------------------------------------------------------------------------------------------------------------


def _anchor_statistics(dataset_path: Path, image_suffixes: Sequence[str], lexicon):
    """Anchor statistics over the written split's `text` and its images' `tags`, streamed from disk."""
    from modeling_cmal.anchoring import anchor_statistics

    id_columns = [f"image_id{suffix}" for suffix in image_suffixes]
    dataset = load_from_disk(str(dataset_path)).select_columns(["text", *id_columns])
    images = load_from_disk(str(dataset_path / IMAGE_TABLE)).select_columns(["image_id", "tags"]).to_dict()
    tags_of = dict(zip(images["image_id"], images["tags"]))

    def captions() -> Iterator[str]:
        for batch in dataset.iter(batch_size=1000):
            yield from batch["text"]

    def tags() -> Iterator[list[str]]:
        for batch in dataset.iter(batch_size=1000):
            for image_ids in zip(*(batch[column] for column in id_columns)):
                yield [tag for image_id in image_ids for tag in tags_of[image_id]]

    return anchor_statistics(captions(), tags(), lexicon)


def write_split(
    *,
    task: str,
    groups: Sequence[ItemGroup],
    features: Callable[[int], Features],
    refused: SkipCounter,
    region_features: PathLike | Sequence[PathLike],
    output: PathLike,
    split: str,
    statistics: dict[str, float] | None = None,
    extra_files: dict[str, str] | None = None,
    image_suffixes: Sequence[str] = ("",),
    tag_vocab: TagVocab = None,
    id_offset: int = 0,
    num_shards: int = 1,
    shard_index: int = 0,
    lexicon=None,
    progress: bool = True,
    task_columns: Callable[[dict, list[dict]], dict] | None = None,
) -> BuildSummary:
    """Write this shard's rows of one split and return the `BuildSummary` (see the module docstring).

    Args:
        task: name for the progress bar and summary (e.g. "vqa").
        groups: every `ItemGroup` of the split (all shards); this shard takes its contiguous block.
        features: `feature_dim -> Features` of the task (from `cmal_processing/schema.py`).
        refused: records the task refused while reading its annotations (malformed, unknown image, ...). They
            belong to no group, so shard 0 alone reports them: the shards' summaries add up to the whole split.

    Arguments every builder passes on from its caller:
        region_features: BUTD `.tsv` file(s) and/or `.npz` folder(s) (`RegionFeatureIndex`); images are looked up
            by the feature files' image id, which the builder derives with its `image_id_format`.
        output: the `DatasetDict` folder; split: the split name written there (e.g. "train", "validation").
        tag_vocab, id_offset: as for `read_region_features`.
        num_shards, shard_index: write only this shard's part, to `dataset_root(output, num_shards, shard_index)`.
        statistics: task numbers (e.g. counts that `task_columns` updates), reported in the summary.
        extra_files: file name → text, written beside the splits (e.g. VQA's `answer_vocab.json`).
        image_suffixes: `("",)` for one image per row, `("_0", "_1")` for NLVR2.
        task_columns: `(item, regions of each image) -> task columns`, may raise `SkipItem`; default: the item's
            fields except `where`.
        lexicon: the `modeling_cmal.anchoring.ConceptLexicon` of the anchor statistics (None: the default one).
        progress: show a tqdm bar over the items.
    """
    task_split = _check_split_name(split)
    root = dataset_root(output, num_shards, shard_index)
    extra_files = dict(extra_files or {})
    start, end = shard_bounds(len(groups), num_shards, shard_index)
    shard_groups = groups[start:end]
    num_items = sum(len(group.items) for group in shard_groups)
    skipped = SkipCounter("skipped items")
    if shard_index == 0:
        skipped.update(refused)
    feature_index = RegionFeatureIndex(
        region_features, tag_vocab, id_offset=id_offset, errors=SkipCounter("region rows skipped")
    )
    dataset_features = features(feature_index.feature_dim())
    task_features, image_features = split_features(dataset_features)
    _prepare_root(root, task_split, dataset_features, extra_files)
    rows_written = 0
    clipped_boxes = SkipCounter("boxes clipped to the image edge")
    clipped_images: set[str] = set()  # images whose boxes are already counted
    written_images: set[str] = set()  # images already in the image table
    if task_columns is None:
        task_columns = _item_fields

    def group_rows(group: ItemGroup, image_writer: ArrowWriter) -> Iterator[dict]:
        """The task rows of one group's items (every item left out is counted in `skipped`); the group's images
        go to the image table the first time a written row uses them."""
        try:
            images = [_image(image_id, feature_index, clipped_boxes, clipped_images) for image_id in group.image_ids]
        except SkipItem as error:
            for item in group.items:
                skipped.add(error.reason, f"{item['where']}: {error}")
            return
        regions = [image_regions for image_regions, _ in images]
        references = {f"image_id{suffix}": image_id
                      for image_id, suffix in zip(group.image_ids, image_suffixes, strict=True)}
        for item in group.items:
            try:
                row = {**references, **task_columns(item, regions)}
            except SkipItem as error:
                skipped.add(error.reason, f"{item['where']}: {error}")
                continue
            for image_id, (_, columns) in zip(group.image_ids, images):
                if image_id not in written_images:
                    written_images.add(image_id)
                    image_writer.write(image_features.encode_example(encode_regions(columns)))
            yield row

    def rows(image_writer: ArrowWriter) -> Iterator[dict]:
        nonlocal rows_written
        with tqdm(total=num_items, desc=f"{task} {task_split}", unit=" items", disable=not progress) as bar:
            for group in shard_groups:
                for row in group_rows(group, image_writer):
                    rows_written += 1
                    yield row
                bar.update(len(group.items))
                bar.set_postfix(skipped=skipped.total, refresh=False)

    def make_dataset(temporary: Path) -> tuple[Dataset, Dataset]:
        """The task table, built by `datasets` from the rows; the image table, written alongside as they come."""
        temporary.mkdir(parents=True)
        image_file = temporary / "images.arrow"
        with ArrowWriter(features=image_features, path=str(image_file), writer_batch_size=WRITER_BATCH_SIZE) as writer:
            row_iterator = rows(writer)
            first_row = next(row_iterator, None)
            if first_row is None:  # `datasets` refuses to build a split of no rows from a generator
                empty = {name: [] for name in task_features}
                task_table = Dataset.from_dict(empty, features=task_features, split=NamedSplit(task_split))
            else:
                task_table = Dataset.from_generator(
                    lambda: itertools.chain([first_row], row_iterator),
                    features=task_features,
                    cache_dir=str(temporary / "cache"),
                    fingerprint=uuid.uuid4().hex,
                    split=NamedSplit(task_split),
                    writer_batch_size=WRITER_BATCH_SIZE,
                )
            writer.finalize()
        return task_table, Dataset.from_file(str(image_file), split=NamedSplit(task_split))

    with _own_progress_bar_only():
        _save_atomically(root, task_split, make_dataset, extra_files)
    return BuildSummary(
        task=task,
        split=task_split,
        dataset_path=root / task_split,
        items=num_items + (refused.total if shard_index == 0 else 0),
        rows_written=rows_written,
        images_written=len(written_images),
        skipped=skipped,
        region_errors=feature_index.errors,
        statistics=dict(statistics or {}),
        anchor_statistics=_anchor_statistics(root / task_split, image_suffixes, lexicon),
        shard=(shard_index, num_shards),
        clipped_boxes=clipped_boxes,
    )


def _item_fields(item: dict, regions: list[dict]) -> dict:
    return {name: value for name, value in item.items() if name != "where"}


def _image(
    image_id: str, feature_index: RegionFeatureIndex, clipped: SkipCounter, clipped_images: set[str]
) -> tuple[dict, dict]:
    """`(regions, image table columns)` of one image; `SkipItem` when it has no features or corrupt ones (the row's
    own reason is counted in `feature_index.errors`). Boxes clipped to the image edge are counted in `clipped`
    the first time the image is used (`clipped_images` holds the images already counted)."""
    if image_id not in feature_index:
        raise SkipItem("missing_features", f"no region features for image {image_id!r}")
    regions = feature_index.get(image_id)
    if regions is not None:
        try:
            columns = image_columns(regions, "", None if image_id in clipped_images else clipped)
            clipped_images.add(image_id)
            return regions, columns
        except CorruptRegionsError as error:
            feature_index.errors.add(error.reason, f"image {image_id!r}: {error}")
    raise SkipItem("corrupt_features", f"the region features of image {image_id!r} are corrupt")


# --------------------------------------------------------------------------------------------------------------
# Merging shards
# --------------------------------------------------------------------------------------------------------------


def merge_shards(output: PathLike, split: str) -> Path:
    """Concatenate `output/shard-*-of-N/<split>` in shard order into `output/<split>` (atomically), copy the files
    the shards wrote beside their splits (they must agree) and list the split in `output/dataset_dict.json`.

    Raises `ValueError` if shards are missing, disagree on N or on those files. Returns the split folder.
    """
    output = Path(output)
    split = _check_split_name(split)
    shards = {}
    for path in output.iterdir() if output.is_dir() else ():
        match = SHARD_FOLDER.match(path.name)
        if match and path.is_dir():
            shards[int(match.group(1))] = (int(match.group(2)), path)
    counts = {count for count, _ in shards.values()}
    if len(counts) != 1:
        raise ValueError(f"output {str(output)!r} must hold shard folders of one run, found totals {sorted(counts)}")
    (num_shards,) = counts
    missing = [index for index in range(num_shards)
               if index not in shards or split not in _saved_splits(shards[index][1])]
    if missing:
        raise ValueError(f"shards {missing} of {num_shards} have no {split!r} split under {str(output)!r}")
    folders = [shards[index][1] for index in range(num_shards)]
    extra_files = {}
    for folder in folders:
        for path in folder.iterdir():
            if path.is_file() and not path.name.startswith(".") and path.name != DATASET_DICT_FILE:
                text = path.read_text(encoding="utf-8")
                if extra_files.setdefault(path.name, text) != text:
                    raise ValueError(f"{path.name} differs between the shards of {str(output)!r}")
    merged = concatenate_datasets([load_from_disk(str(folder / split)) for folder in folders])
    with_images = [(folder / split / IMAGE_TABLE / "state.json").is_file() for folder in folders]
    if any(with_images) and not all(with_images):
        raise ValueError(f"the shards of {str(output)!r} mix layouts (image table in shards "
                         f"{[index for index, has in enumerate(with_images) if has]} only): rebuild the others")
    images = None
    if all(with_images):
        # An image can be used by items of two shards (NLVR2 pairs): the merged table keeps its first row.
        images = concatenate_datasets([binary_image_table(load_from_disk(str(folder / split / IMAGE_TABLE)))
                                       for folder in folders])
        first_row: dict[str, int] = {}
        for row, image_id in enumerate(images.with_format(None)["image_id"]):
            first_row.setdefault(image_id, row)
        if len(first_row) < len(images):
            images = images.select(np.fromiter(first_row.values(), dtype=np.int64, count=len(first_row)))
    features = merged.features if images is None else joined_features(merged.features, images)
    _prepare_root(output, split, features, extra_files)
    with _own_progress_bar_only():
        _save_atomically(output, split, lambda temporary: (merged, images), extra_files)
    return output / split
