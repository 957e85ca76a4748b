"""Command line of the corpus builders: `python -m cmal_processing ...` from the repository root; once installed (the
package installs as `cmal_processing`) also `python -m cmal_processing ...` or the console script `cmal-processing ...`.

    python -m cmal_processing build captions --captions FILE --features SRC [SRC ...] --output DIR --split NAME
    python -m cmal_processing build vqa      --questions FILE [--annotations FILE] [--answer_vocab FILE] [--top_k K] ...
    python -m cmal_processing build nlvr2    --annotations FILE ...
    python -m cmal_processing build snli_ve  --annotations FILE ...
    python -m cmal_processing build refcoco  --refs FILE --instances FILE [--refs_split NAME] ...
    python -m cmal_processing merge --output DIR --split NAME
    python -m cmal_processing extract --images DIR_OR_LIST --detector DIR --output DIR   (also under accelerate launch)
    python -m cmal_processing shards --captions FILE --features SRC [SRC ...] --processor DIR --output DIR
    python -m cmal_processing shards --dataset SPLIT_DIR --processor DIR --output DIR   (from a map-style caption split)

Every `build` takes `--features` (BUTD `.tsv` files and/or `.npz` folders), `--output` (a DatasetDict folder; run
once per split into the same folder), `--split`, `--image_id_format` (how the annotation's image id becomes the
feature files' id, e.g. "COCO_train2014_{image_id:012d}"), `--tag_vocab`, `--id_offset`, `--lexicon` (a
`ConceptLexicon` JSON for the anchor statistics), and `--num_shards N --shard_index I` to build one of N parts on
one machine (into `DIR/shard-0000I-of-0000N`; `merge` joins them once all are done). A build prints its summary
(rows written, skipped items and region rows by reason, anchor statistics) and exits with status 1 when it wrote
no row.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, field

from tqdm.contrib.logging import logging_redirect_tqdm
from transformers import HfArgumentParser

from .arguments import parse_dataclasses
from .builders import merge_shards
from .captions import build_captions
from .nlvr2 import build_nlvr2
from .refcoco import build_refcoco
from .snli_ve import build_snli_ve
from .vqa import DEFAULT_TOP_K, build_vqa

PROG = "python -m cmal_processing"
COCO_IMAGE_ID_HELP = "COCO image id -> feature id, e.g. COCO_train2014_{image_id:012d}"


@dataclass
class BuildArguments:
    """The flags every `build` task takes (after its own: `CaptionsArguments`, `VqaArguments`, ...)."""

    features: list[str] = field(metadata={
        "metavar": "SRC", "help": "BUTD .tsv file(s) and/or folder(s) of per-image .npz (searched in order)"})
    output: str = field(metadata={"help": "DatasetDict folder; each split lands in OUTPUT/SPLIT"})
    split: str = field(metadata={"help": "split name to write, e.g. train, validation, test"})
    tag_vocab: str | None = field(default=None, metadata={
        "help": "object class names, one per line (default: the Visual Genome 1600 classes)"})
    id_offset: int = field(default=0, metadata={
        "help": "subtracted from object ids before the vocabulary lookup (1 if id 0 is background)"})
    num_shards: int = field(default=1, metadata={"help": "number of machines sharing this split"})
    shard_index: int = field(default=0, metadata={"help": "this machine's shard, in [0, num_shards)"})
    lexicon: str | None = field(default=None, metadata={
        "help": "concept lexicon JSON (ConceptLexicon.save) for the anchor statistics (default: built-in)"})


@dataclass
class CaptionsArguments:
    """`build captions`."""

    captions: str = field(metadata={"help": "COCO captions .json or .jsonl of {image_id, caption}"})
    image_id_format: str | None = field(default=None, metadata={
        "help": "default: {file_stem} for COCO .json (fields image_id, file_stem), {image_id} for .jsonl"})


@dataclass
class VqaArguments:
    """`build vqa`."""

    questions: str = field(metadata={"help": "official questions JSON"})
    annotations: str | None = field(default=None, metadata={
        "help": "official annotations JSON (leave out for test splits)"})
    answer_vocab: str | None = field(default=None, metadata={
        "help": "answer_vocab.json to reuse (e.g. the training split's); default: top_k of --annotations"})
    top_k: int = field(default=DEFAULT_TOP_K, metadata={"help": "answer vocabulary size when computed"})
    image_id_format: str = field(default="{image_id}", metadata={
        "help": "COCO image id -> feature id, e.g. COCO_val2014_{image_id:012d}"})


@dataclass
class Nlvr2Arguments:
    """`build nlvr2`."""

    annotations: str = field(metadata={"help": "official .json lines file of the split"})
    image_id_format: str = field(default="{image_id}", metadata={
        "help": "NLVR2 image id (dev-850-0-img0) -> feature id"})


@dataclass
class SnliVeArguments:
    """`build snli_ve`."""

    annotations: str = field(metadata={"help": "official .jsonl file of the split"})
    image_id_format: str = field(default="{image_id}", metadata={
        "help": "Flickr30k id (1234 from 1234.jpg) -> feature id"})


@dataclass
class RefcocoArguments:
    """`build refcoco`."""

    refs: str = field(metadata={"help": "refs(unc).p (read with a restricted unpickler) or a .json dump"})
    instances: str = field(metadata={"help": "instances.json of the same dataset"})
    refs_split: str | None = field(default=None, metadata={
        "help": "refs split to take: train, val, testA, testB (default: --split, validation -> val)"})
    image_id_format: str = field(default="{image_id}", metadata={"help": COCO_IMAGE_ID_HELP})


@dataclass
class MergeArguments:
    """`merge`."""

    output: str = field(metadata={"help": "the --output the shards were built with"})
    split: str = field(metadata={"help": "split to merge"})


@dataclass
class ExtractArguments:
    """`extract`."""

    images: str = field(metadata={"help": "folder of images, or a text file listing image paths"})
    detector: str = field(metadata={"help": "folder of a transformers object detector (DETR family)"})
    output: str = field(metadata={"help": "image table folder (regions-*.parquet; reruns resume)"})
    batch_size: int = field(default=8, metadata={"help": "images per forward pass"})
    images_per_shard: int = field(default=1000, metadata={"help": "images per shard (unit of resuming)"})
    score_threshold: float = field(default=0.2, metadata={"help": "detections scoring at most this dropped"})
    top_k: int = field(default=36, metadata={"help": "at most this many regions per image"})
    min_size: int = field(default=16, metadata={"help": "images with a side below this are skipped"})


@dataclass
class ShardsArguments:
    """`shards`: exactly one of `--captions` (with `--features`) and `--dataset`."""

    processor: str = field(metadata={"help": "CmalProcessor folder (tokenizer + lexicon) to tokenise"})
    output: str = field(metadata={"help": "corpus folder or fsspec URL"})
    captions: str | None = field(default=None, metadata={
        "help": "COCO captions .json or .jsonl of {image_id, caption} (with --features)"})
    dataset: str | None = field(default=None, metadata={
        "help": "a map-style caption split folder to convert (e.g. corpus/pretrain/train)"})
    features: list[str] | None = field(default=None, metadata={
        "metavar": "SRC", "help": "BUTD .tsv, .npz folders or extract's table"})
    image_id_format: str | None = field(default=None, metadata={"help": "as for build captions"})
    max_length: int | None = field(default=None, metadata={"help": "caption pieces (default: the tokenizer's)"})
    images_per_shard: int = field(default=4000, metadata={"help": "images per Parquet shard"})

    def __post_init__(self):
        if self.captions is None and self.dataset is None:
            raise ValueError("one of the arguments --captions --dataset is required")
        if self.captions is not None and self.dataset is not None:
            raise ValueError("argument --dataset: not allowed with argument --captions")
        if self.captions is not None and not self.features:
            raise ValueError("--captions needs --features")


# The command tree: each command's help line and either its dataclasses or its own commands (those of `build`).
COMMANDS = {
    "build": ("write one split of a corpus", {
        "captions": ("caption corpus (COCO captions .json or .jsonl)", (CaptionsArguments, BuildArguments)),
        "vqa": ("VQA v2", (VqaArguments, BuildArguments)),
        "nlvr2": ("NLVR2", (Nlvr2Arguments, BuildArguments)),
        "snli_ve": ("SNLI-VE", (SnliVeArguments, BuildArguments)),
        "refcoco": ("RefCOCO+ (or RefCOCO / RefCOCOg)", (RefcocoArguments, BuildArguments)),
    }),
    "merge": ("concatenate the shards of a split into OUTPUT/SPLIT", (MergeArguments,)),
    "extract": ("detect regions in a folder or list of photos (the image table)", (ExtractArguments,)),
    "shards": ("streamed pre-training corpus: images once, captions pre-tokenised", (ShardsArguments,)),
}


def command_parsers() -> dict[tuple[str, ...], HfArgumentParser]:
    """Every parser of the command tree by its path of command names: `()` the top one (its `--help` lists the
    commands), `("build",)` the one listing the build tasks, `("build", "vqa")` a leaf with its dataclasses."""
    parsers = {(): HfArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                    formatter_class=argparse.HelpFormatter)}

    def add(path: tuple[str, ...], commands: dict) -> None:
        choices = parsers[path].add_subparsers(dest="task" if path else "command", required=True)
        for name, (help_line, content) in commands.items():
            leaf = not isinstance(content, dict)
            parsers[(*path, name)] = choices.add_parser(name, help=help_line,
                                                        dataclass_types=content if leaf else None,
                                                        formatter_class=argparse.HelpFormatter)
            if not leaf:
                add((*path, name), content)

    add((), COMMANDS)
    return parsers


def build_parser() -> HfArgumentParser:
    """The top parser of the command tree (`command_parsers()[()]`)."""
    return command_parsers()[()]


def parse_command(argv: list[str] | None = None) -> tuple[tuple[str, ...], tuple]:
    """The command path (`("build", "vqa")`, `("extract",)`, ...) from the first arguments, and the dataclasses of
    that command from the rest. A missing or unknown command is argparse's help or error (exit status 2)."""
    parsers = command_parsers()
    argv = sys.argv[1:] if argv is None else list(argv)
    path: tuple[str, ...] = ()
    while not parsers[path].dataclass_types:
        if not argv or (*path, argv[0]) not in parsers:
            parsers[path].parse_args(argv[:1])  # --help, or the error naming the missing or unknown command
            parsers[path].error(f"unrecognized arguments: {' '.join(argv)}")  # not reached: a command is required
        path, argv = (*path, argv[0]), argv[1:]
    return path, parse_dataclasses(parsers[path], argv)


def _run_shards(arguments: ShardsArguments) -> int:
    from modeling_cmal.processing_cmal import CmalProcessor

    from .shards import build_streamed_captions, convert_caption_dataset

    processor = CmalProcessor.from_pretrained(arguments.processor)
    options = dict(max_length=arguments.max_length, images_per_shard=arguments.images_per_shard)
    if arguments.dataset is not None:
        info = convert_caption_dataset(arguments.dataset, arguments.output, processor, **options)
    else:
        info = build_streamed_captions(arguments.captions, arguments.features, processor, arguments.output,
                                       image_id_format=arguments.image_id_format, **options)
    print(f"streamed corpus -> {arguments.output}: {info['images']} images, {info['captions']} captions, "
          f"{len(info['shards'])} shards, {info['feature_dim']}-d features; skipped {info.get('skipped', {})}")
    return 0 if info["captions"] else 1


def _run_extract(arguments: ExtractArguments) -> int:
    from .extract import extract_regions

    summary = extract_regions(arguments.images, arguments.detector, arguments.output,
                              batch_size=arguments.batch_size, images_per_shard=arguments.images_per_shard,
                              score_threshold=arguments.score_threshold, top_k=arguments.top_k,
                              min_size=arguments.min_size)
    print(summary.format())
    return 0 if summary.rows_written or summary.shards_kept else 1


def _run_build(task: str, arguments, common: BuildArguments):
    lexicon = None
    if common.lexicon is not None:
        from modeling_cmal.anchoring import ConceptLexicon

        lexicon = ConceptLexicon.load(common.lexicon)
    options = dict(
        region_features=common.features, output=common.output, split=common.split, tag_vocab=common.tag_vocab,
        id_offset=common.id_offset, num_shards=common.num_shards, shard_index=common.shard_index, lexicon=lexicon,
        image_id_format=arguments.image_id_format,
    )
    if task == "captions":
        return build_captions(arguments.captions, **options)
    if task == "vqa":
        return build_vqa(arguments.questions, annotations=arguments.annotations,
                         answer_vocab=arguments.answer_vocab, top_k=arguments.top_k, **options)
    if task == "nlvr2":
        return build_nlvr2(arguments.annotations, **options)
    if task == "snli_ve":
        return build_snli_ve(arguments.annotations, **options)
    return build_refcoco(arguments.refs, arguments.instances, refs_split=arguments.refs_split, **options)


def main(argv: list[str] | None = None) -> int:
    path, arguments = parse_command(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if path == ("extract",):
            return _run_extract(*arguments)
        if path == ("shards",):
            return _run_shards(*arguments)
        if path == ("merge",):
            (merge,) = arguments
            print(f"merged into {merge_shards(merge.output, merge.split)}")
            return 0
        with logging_redirect_tqdm():  # skip warnings print above the progress bar, not through it
            summary = _run_build(path[1], *arguments)
    except (ValueError, FileNotFoundError) as error:
        build_parser().exit(2, f"error: {error}\n")
    print(summary.format())
    if summary.rows_written == 0:
        print("error: no row was written (see the skipped items above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
