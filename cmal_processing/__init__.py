"""Corpus-scale data preparation for CMAL: region-feature readers and dataset builders.

- `read_region_features(path)` yields the `regions` dict of every image of a bottom-up-attention `.tsv` (LXMERT)
  or a folder of per-image `.npz` (bottom-up-attention.pytorch); `RegionFeatureIndex` looks images up by id.
- `build_captions`, `build_vqa`, `build_nlvr2`, `build_snli_ve`, `build_refcoco` write one split of a corpus as a
  `datasets.DatasetDict` folder in the column layout of `cmal_processing.schema`, streaming the features, each image's
  regions once (`cmal_processing.corpus`: task table + image table; `load_corpus` reads them joined); `merge_shards`
  joins the shards of a split built on several machines. The same from the shell:
  `python -m cmal_processing build {captions,vqa,nlvr2,snli_ve,refcoco} ...` and `python -m cmal_processing merge ...`
  (`python -m cmal_processing build vqa --help` lists the flags).
- `cmal_processing.extract.extract_regions` (`python -m cmal_processing extract`) runs a transformers detector over
  a folder of photos into the image table (regions once per image); `RegionFeatureIndex`, so every builder, reads it.
- `cmal_processing.shards.write_image_shards` / `build_streamed_captions` (`python -m cmal_processing shards`) write
  a streamed pre-training corpus (Parquet shards, one row per image with its captions pre-tokenised and anchored);
  `cmal_processing.shards.open_streaming_corpus` reads this process' share as a `datasets.IterableDataset` with exact
  resume.
- Bad records never stop a build and never vanish: they are counted by reason in `SkipCounter`s and reported in
  the `BuildSummary` each builder returns.
"""

from .builders import BuildSummary, merge_shards
from .captions import build_captions
from .corpus import load_corpus, save_corpus
from .nlvr2 import build_nlvr2
from .readers import CorruptRegionsError, RegionFeatureIndex, load_tag_vocab, read_npz_regions, read_region_features
from .refcoco import build_refcoco
from .skips import SkipCounter
from .snli_ve import build_snli_ve
from .vqa import build_vqa, normalize_answer

__all__ = [
    "BuildSummary",
    "CorruptRegionsError",
    "RegionFeatureIndex",
    "SkipCounter",
    "build_captions",
    "build_nlvr2",
    "build_refcoco",
    "build_snli_ve",
    "build_vqa",
    "load_corpus",
    "load_tag_vocab",
    "merge_shards",
    "normalize_answer",
    "read_npz_regions",
    "read_region_features",
    "save_corpus",
]
