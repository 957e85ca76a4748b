"""Streamed corpora: each image's regions stored once, in Parquet shards that `datasets` streams and splits per process.

**Layout** (a folder on local disk or under any fsspec URL: `s3://`, `gs://`, `hf://`, ...):

    corpus/
      corpus_info.json          feature_dim, the processor's identity, shard list with row counts
      images-00000.parquet      one row per image (the image table), row groups of ROW_GROUP_IMAGES images
      images-00001.parquet
      ...

One row per image holds its regions once, however many captions refer to it, plus those captions already
tokenised and anchored by the corpus' processor:

- `image_id` string, `image_width` / `image_height` int32 (pixels, 0 when unknown), `num_regions` int32 (M);
- `visual_feats` binary: float16 `[M, Dv]` row-major little-endian; `visual_pos` binary: float32 `[M, 4]`
  normalised `x1, y1, x2, y2`; `tags` M strings; `scores` M float32. These are the regions *after* the processor's
  selection (top `max_regions` by score), so region indices in anchors need no second selection;
- `captions` list of strings; per caption `input_ids` (int32 pieces with the special tokens, truncated to the
  build's `max_length`), `word_ids` (int32 per piece: index into that caption's `words`, -1 for special tokens and
  words cut by truncation), `words` (the caption's words as the tokenizer split them) and `anchor_rows` (int32,
  flattened `(piece position, region index, concept id)` triples of `CmalProcessor`'s anchors);
- `processor_identity`: `processing_cmal.processor_identity(processor)` (tokenizer vocabulary + lexicon hash).

Binary columns keep decoding to one `np.frombuffer` per image (no Python lists of floats on the loader's hot path).
`open_streaming_corpus` expands each image row into one row per caption (the features shared, not copied), and
`CmalPretrainingCollator` takes those rows as they come.

Writing is resumable: a shard is written as `.images-0000i.parquet.tmp-*` and renamed when complete, and
`write_image_shards(..., resume=True)` skips the images of shards already complete.
"""

from __future__ import annotations

import atexit
import gc
import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from modeling_cmal.processing_cmal import anchor_rows_of_words, processor_identity, words_of_encoding

from .schema import REGION_FIELDS, encode_regions, write_parquet_shard

__all__ = [
    "CORPUS_INFO_FILE",
    "IMAGE_TABLE_SCHEMA",
    "ShardWriter",
    "caption_columns",
    "corpus_shard_files",
    "image_row",
    "open_streaming_corpus",
    "read_corpus_info",
    "write_image_shards",
]

# A streamed corpus reads its shards through pyarrow's dataset scanner. Scanner iterators left in reference cycles
# are freed by the interpreter's last garbage collection, after Arrow's runtime is gone, and their threads then
# abort the process ("terminate called without an active exception", exit -6) once the work is done
# (apache/arrow#45214, huggingface/datasets#7566; seen here in a two-process read on a loaded machine). Collecting
# at exit, while Arrow is alive, frees them in order.
atexit.register(gc.collect)

CORPUS_INFO_FILE = "corpus_info.json"
SHARD_NAME = "images-{index:05d}.parquet"
FORMAT_VERSION = 1
# About 32 MB of 36 x 2048 float16 features per row group: what a streaming reader fetches at once.
ROW_GROUP_IMAGES = 200
# About 1 GB per shard at 36 x 2048 float16: enough shards for many processes, few enough for object stores.
DEFAULT_IMAGES_PER_SHARD = 4000

IMAGE_TABLE_SCHEMA = pa.schema([
    *REGION_FIELDS,
    ("captions", pa.list_(pa.string())),
    ("input_ids", pa.list_(pa.list_(pa.int32()))),
    ("word_ids", pa.list_(pa.list_(pa.int32()))),
    ("words", pa.list_(pa.list_(pa.string()))),
    ("anchor_rows", pa.list_(pa.list_(pa.int32()))),
    ("processor_identity", pa.string()),
])


def caption_columns(processor, caption: str, tags: Sequence[str] | None, scores: Sequence[float] | None,
                    max_length: int | None = None) -> dict:
    """`input_ids`, `word_ids`, `words` and `anchor_rows` of one caption for regions with these `tags` / `scores`
    (the regions already selected): what `CmalProcessor` computes for the pair, stored once.

    `anchor_rows` is `[3 K]` flattened `(piece position, region index, concept id)`; the same as
    `processor(text=caption, regions=...)["anchor_pairs"]` / `["anchor_concept_ids"]` without padding.
    """
    if not isinstance(caption, str):
        raise ValueError(f"caption must be a str, got {caption!r}")
    encoding = processor.tokenizer(caption, truncation=True, max_length=max_length).encodings[0]
    words, word_ids = words_of_encoding(encoding, caption)
    return {"input_ids": list(encoding.ids), "word_ids": word_ids, "words": words,
            "anchor_rows": anchor_rows_of_words(words, word_ids, tags, scores, processor.lexicon)}


def image_row(processor, regions: Mapping, captions: Sequence[str], *, max_length: int | None = None,
              identity: str | None = None) -> dict:
    """One image-table row: `regions` (a `regions` dict as `CmalProcessor` takes it: `visual_feats` `[M, Dv]`,
    `visual_pos` `[M, 4]` in pixels with `image_size` or normalised, `tags`, `scores`, `image_id`) selected by the
    processor, and its `captions` tokenised and anchored."""
    if not isinstance(regions, Mapping) or "image_id" not in regions:
        raise ValueError(f"regions must be a regions dict with an image_id, got {type(regions).__name__}")
    if isinstance(captions, str) or not all(isinstance(caption, str) for caption in captions):
        raise ValueError(f"captions of image {regions['image_id']!r} must be a list of str, got {captions!r}")
    (selection,) = processor.image_processor.select([regions])
    width, height = regions.get("image_size") or (0, 0)
    per_caption = [caption_columns(processor, caption, selection.tags, selection.scores, max_length)
                   for caption in captions]
    return {
        **encode_regions({"image_id": str(regions["image_id"]), "image_width": width, "image_height": height,
                          "visual_feats": selection.visual_feats, "visual_pos": selection.visual_pos,
                          "tags": selection.tags, "scores": selection.scores}),
        "captions": list(captions),
        **{name: [columns[name] for columns in per_caption]
           for name in ("input_ids", "word_ids", "words", "anchor_rows")},
        "processor_identity": identity or processor_identity(processor),
    }


@dataclass
class ShardWriter:
    """Writes image rows into numbered Parquet shards under `output` (a local folder or an fsspec URL).

    Each shard is written to a temporary name and renamed when complete (`write_image_shards` writes
    `corpus_info.json` once every shard is)."""

    output: str
    images_per_shard: int = DEFAULT_IMAGES_PER_SHARD

    def __post_init__(self):
        import fsspec

        if isinstance(self.images_per_shard, bool) or not isinstance(self.images_per_shard, int) or \
                self.images_per_shard < 1:
            raise ValueError(f"images_per_shard must be an int >= 1, got {self.images_per_shard!r}")
        self.output = str(self.output)
        self._fs, self._root = fsspec.core.url_to_fs(self.output)
        self._fs.makedirs(self._root, exist_ok=True)

    def shard_name(self, index: int) -> str:
        return SHARD_NAME.format(index=index)

    def is_complete(self, index: int) -> bool:
        return self._fs.exists(f"{self._root}/{self.shard_name(index)}")

    def write(self, index: int, rows: list[dict]) -> None:
        """Write shard `index` from `rows` (atomically: a temporary file renamed when complete)."""
        write_parquet_shard(pa.Table.from_pylist(rows, schema=IMAGE_TABLE_SCHEMA),
                            f"{self._root}/{self.shard_name(index)}", row_group_size=ROW_GROUP_IMAGES,
                            filesystem=self._fs)


def write_image_shards(images: Iterable[tuple[Mapping, Sequence[str]]], output, processor, *,
                       max_length: int | None = None, images_per_shard: int = DEFAULT_IMAGES_PER_SHARD,
                       resume: bool = False, progress: bool = True, total: int | None = None) -> dict:
    """Write a streamed corpus: `images` yields `(regions, captions)` per image; each image's regions are stored
    once and its captions tokenised and anchored by `processor` (see the module docstring).

    Args:
        images: `(regions dict, list of captions)` per image, in corpus order.
        output: folder or fsspec URL of the corpus.
        processor: the `CmalProcessor` whose tokenizer, lexicon and `max_regions` the corpus is built for.
        max_length: caption length in pieces (default: the tokenizer's `model_max_length`).
        images_per_shard: images per Parquet shard.
        resume: keep shards already complete under `output` (their images are read past, not processed).
    Returns the corpus info written to `corpus_info.json`.
    """
    if not all(hasattr(processor, name) for name in ("tokenizer", "lexicon", "image_processor")):
        raise ValueError(f"processor must be a CmalProcessor (tokenizer, lexicon, image_processor), got "
                         f"{type(processor).__name__}")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2):
        raise ValueError(f"max_length must be None or an int >= 2 (the special tokens), got {max_length!r}")
    writer = ShardWriter(output, images_per_shard)
    identity = processor_identity(processor)
    info_path = f"{writer._root}/{CORPUS_INFO_FILE}"
    if writer._fs.exists(info_path) and not resume:
        raise ValueError(f"output {output!r} already holds a corpus ({CORPUS_INFO_FILE}); pass resume=True to "
                         "continue it or use a new folder")
    shards, rows, index, feature_dim, count = [], [], 0, None, 0

    def flush():
        nonlocal rows, index
        if rows:
            if not (resume and writer.is_complete(index)):
                writer.write(index, rows)
            shards.append({"file": writer.shard_name(index), "images": len(rows),
                           "captions": sum(len(row["captions"]) for row in rows)})
            rows, index = [], index + 1

    for regions, captions in tqdm(images, desc="corpus images", unit=" images", total=total, disable=not progress):
        count += 1
        if resume and writer.is_complete(index):
            rows.append({"captions": list(captions)})  # only counted: the shard is on disk
        else:
            row = image_row(processor, regions, captions, max_length=max_length, identity=identity)
            if feature_dim is None:
                feature_dim = row["feature_dim"]
            elif row["feature_dim"] != feature_dim:
                raise ValueError(f"image {row['image_id']!r} has {row['feature_dim']}-d features but earlier images "
                                 f"{feature_dim}-d; expected one detector's feature size for the whole corpus")
            rows.append(row)
        if len(rows) == images_per_shard:
            flush()
    flush()
    if feature_dim is None and shards:  # every shard was already complete
        feature_dim = _first_feature_dim(writer, shards[0]["file"])
    info = {"format_version": FORMAT_VERSION, "feature_dim": feature_dim, "processor_identity": identity,
            "max_length": max_length, "images": count, "captions": sum(shard["captions"] for shard in shards),
            "shards": shards}
    with writer._fs.open(info_path, "w") as file:
        file.write(json.dumps(info, indent=2))
    return info


def _first_feature_dim(writer: ShardWriter, name: str) -> int:
    with writer._fs.open(f"{writer._root}/{name}", "rb") as file:
        return int(pq.read_table(file, columns=["feature_dim"]).column(0)[0].as_py())


def read_corpus_info(path) -> dict:
    """`corpus_info.json` of a streamed corpus at `path` (folder or fsspec URL). A map-style `datasets` corpus folder
    is refused with how to convert it."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(path))
    info_path = f"{root}/{CORPUS_INFO_FILE}"
    if not fs.exists(info_path):
        if fs.exists(f"{root}/dataset_dict.json") or fs.exists(f"{root}/state.json"):
            raise ValueError(
                f"path {str(path)!r} is a map-style corpus (a datasets folder, what pretrain.py reads without "
                "--streaming), not a streamed one; rebuild it as a streamed corpus with "
                "`python -m cmal_processing shards --dataset "
                f"{path} --processor PROCESSOR_DIR --output NEW_DIR` (cmal_processing.shards.convert_caption_dataset)")
        raise FileNotFoundError(f"path {str(path)!r} has no {CORPUS_INFO_FILE}; expected a corpus written by "
                                "cmal_processing.shards.write_image_shards")
    with fs.open(info_path, "r") as file:
        info = json.loads(file.read())
    if info.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{info_path!r} has format_version {info.get('format_version')!r}; expected {FORMAT_VERSION}")
    return info


def corpus_shard_files(path) -> list[str]:
    """URLs of the shards of the corpus at `path`, in corpus order."""
    info = read_corpus_info(path)
    base = str(path).rstrip("/")
    return [f"{base}/{shard['file']}" for shard in info["shards"]]


def _expand_captions(batch: dict, shuffle_seed: int | None = None) -> dict:
    """Image rows → one row per caption; the image's binary columns are shared, not copied. With `shuffle_seed`, the
    captions of the window are put in an order drawn from the seed and the window's first image id (the same on
    every run, so a resumed reader continues exactly)."""
    out = {name: [] for name in ("image_id", "text", "input_ids", "word_ids", "words", "anchor_rows", "visual_feats",
                                 "visual_pos", "num_regions", "feature_dim", "tags", "scores", "processor_identity")}
    for index, captions in enumerate(batch["captions"]):
        for number, caption in enumerate(captions):
            out["text"].append(caption)
            for name in ("input_ids", "word_ids", "words", "anchor_rows"):
                out[name].append(batch[name][index][number])
            for name in ("image_id", "visual_feats", "visual_pos", "num_regions", "feature_dim", "tags", "scores",
                         "processor_identity"):
                out[name].append(batch[name][index])
    if shuffle_seed is not None and out["text"]:
        window = int.from_bytes(hashlib.blake2b(str(batch["image_id"][0]).encode(), digest_size=8).digest(), "little")
        order = np.random.default_rng([shuffle_seed, window]).permutation(len(out["text"])).tolist()
        out = {name: [values[position] for position in order] for name, values in out.items()}
    return out


def open_streaming_corpus(path, *, rank: int = 0, world_size: int = 1, processor=None, shuffle_seed: int | None = None,
                          shuffle_buffer: int = 1000):
    """The caption pairs of a streamed corpus as a `datasets.IterableDataset`, this process' share only.

    Args:
        path: corpus folder or fsspec URL (`write_image_shards`' `output`).
        rank, world_size: this process and the number of processes; `datasets.distributed.split_dataset_by_node`
            gives each process whole shards when the shard count divides by `world_size` (each reads only its
            files), otherwise every `world_size`-th row.
        processor: when given, a corpus built with another tokenizer or lexicon is refused.
        shuffle_seed: shuffle the shard order and, within windows of `shuffle_buffer` images, the caption rows, with
            this seed (deterministic, so that resuming is exact; `datasets`' own shuffle buffer is not restored by
            `load_state_dict`); None keeps the corpus order. Rows of one window come from nearby images: shards
            written in a shuffled image order mix best.

    Rows: `image_id`, `text`, `input_ids` / `word_ids` / `words` / `anchor_rows` (see the module docstring),
    `visual_feats` / `visual_pos` (binary), `num_regions`, `feature_dim`, `tags`, `scores`, `processor_identity`:
    what `CmalPretrainingCollator` takes. Exact resume: `dataset.state_dict()` after a step, and
    `load_state_dict(state)` on a reader opened with the same arguments, continues at the next row.
    """
    from datasets import load_dataset
    from datasets.distributed import split_dataset_by_node

    for name, value in (("rank", rank), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an int, got {value!r}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size) with world_size >= 1, got rank {rank}, world_size "
                         f"{world_size}")
    info = read_corpus_info(path)
    if processor is not None and info["processor_identity"] != processor_identity(processor):
        raise ValueError(f"the corpus at {str(path)!r} was tokenised and anchored with processor "
                         f"{info['processor_identity']}, not this processor ({processor_identity(processor)}: another "
                         "tokenizer vocabulary or lexicon); rebuild it with this processor")
    files = corpus_shard_files(path)
    if not files:
        raise ValueError(f"the corpus at {str(path)!r} has no shards")
    if isinstance(shuffle_buffer, bool) or not isinstance(shuffle_buffer, int) or shuffle_buffer < 1:
        raise ValueError(f"shuffle_buffer must be an int >= 1 (images), got {shuffle_buffer!r}")
    if shuffle_seed is not None:
        if isinstance(shuffle_seed, bool) or not isinstance(shuffle_seed, int) or shuffle_seed < 0:
            raise ValueError(f"shuffle_seed must be None or an int >= 0, got {shuffle_seed!r}")
        files = [files[index] for index in np.random.default_rng(shuffle_seed).permutation(len(files))]
    dataset = load_dataset("parquet", data_files={"train": files}, split="train", streaming=True)
    dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
    return dataset.map(_expand_captions, batched=True, batch_size=1 if shuffle_seed is None else shuffle_buffer,
                       fn_kwargs={"shuffle_seed": shuffle_seed},
                       remove_columns=["captions", "image_width", "image_height"])


def convert_caption_dataset(dataset, output, processor, *, max_length: int | None = None,
                            images_per_shard: int = DEFAULT_IMAGES_PER_SHARD, progress: bool = True) -> dict:
    """A map-style caption corpus split (what `python -m cmal_processing build captions` and the synthetic world's
    `pretrain` write: a task table with its image table, or the older single table with the regions in every row)
    → a streamed corpus, each image stored once with all its captions. `dataset` is a `datasets.Dataset` (as
    `cmal_processing.corpus.load_split` reads it, or a single table) or the path of a saved split. Images come in the
    order of their first caption."""
    from datasets import Dataset

    from .corpus import corpus_features, load_split

    if not isinstance(dataset, Dataset):
        path = dataset
        if not os.path.isdir(str(path)):
            raise FileNotFoundError(f"dataset {str(path)!r} is not a folder")
        if os.path.isfile(os.path.join(str(path), "dataset_dict.json")):
            raise ValueError(f"dataset {str(path)!r} is a DatasetDict; pass one split's folder (e.g. {path}/train)")
        dataset = load_split(path)
    elif dataset.format.get("type") != "custom":
        dataset = dataset.with_format("numpy")
    missing = [name for name in ("image_id", "text", "visual_feats", "visual_pos", "tags", "scores")
               if name not in corpus_features(dataset)]
    if missing:
        raise ValueError(f"dataset lacks the columns {missing}; expected a caption corpus (cmal_processing/schema.py)")
    task_columns = dataset.with_format(None)
    first_row: dict[str, int] = {}
    captions: dict[str, list[str]] = {}
    for row, (image_id, text) in enumerate(zip(task_columns["image_id"], task_columns["text"])):
        first_row.setdefault(image_id, row)
        captions.setdefault(image_id, []).append(text)

    def images() -> Iterator[tuple[dict, list[str]]]:
        for image_id, row in first_row.items():
            first = dataset[row]
            regions = {"image_id": image_id, "visual_feats": first["visual_feats"], "visual_pos": first["visual_pos"],
                       "tags": [str(tag) for tag in first["tags"]], "scores": first["scores"]}
            yield regions, captions[image_id]

    return write_image_shards(images(), output, processor, max_length=max_length, images_per_shard=images_per_shard,
                              progress=progress, total=len(first_row))


def build_streamed_captions(captions, region_features, processor, output, *, image_id_format: str | None = None,
                            tag_vocab=None, id_offset: int = 0, max_length: int | None = None,
                            images_per_shard: int = DEFAULT_IMAGES_PER_SHARD, progress: bool = True) -> dict:
    """A caption file (COCO captions `.json` or `.jsonl`, as `build_captions`) with region features (BUTD `.tsv`,
    `.npz` folders, or the image table of `python -m cmal_processing extract`) → a streamed corpus, each image once
    with all its captions. Images without (or with corrupt) features are skipped; the returned corpus info has
    `skipped` (items by reason) and `region_errors`."""
    from .captions import caption_groups
    from .readers import RegionFeatureIndex
    from .skips import SkipCounter

    refused = SkipCounter("skipped items")
    groups = caption_groups(captions, image_id_format, refused)
    index = RegionFeatureIndex(region_features, tag_vocab, id_offset=id_offset)

    def images() -> Iterator[tuple[Mapping, list[str]]]:
        for group in groups:
            (image_id,) = group.image_ids
            regions = index.get(image_id) if image_id in index else None
            if regions is None:
                reason = "missing_features" if image_id not in index else "corrupt_features"
                for item in group.items:
                    refused.add(reason, f"{item['where']}: no usable region features for image {image_id!r}")
                continue
            yield regions, [item["text"] for item in group.items]

    info = write_image_shards(images(), output, processor, max_length=max_length, images_per_shard=images_per_shard,
                              progress=progress, total=len(groups))
    info["skipped"], info["region_errors"] = dict(refused.counts), dict(index.errors.counts)
    return info
