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

from tqdm.contrib.logging import logging_redirect_tqdm

from .builders import merge_shards
from .captions import build_captions
from .nlvr2 import build_nlvr2
from .refcoco import build_refcoco
from .snli_ve import build_snli_ve
from .vqa import DEFAULT_TOP_K, build_vqa


def _common_arguments(parser: argparse.ArgumentParser, image_id_default: str | None, image_id_help: str) -> None:
    parser.add_argument("--features", nargs="+", required=True, metavar="SRC",
                        help="BUTD .tsv file(s) and/or folder(s) of per-image .npz (searched in order)")
    parser.add_argument("--output", required=True, help="DatasetDict folder; each split lands in OUTPUT/SPLIT")
    parser.add_argument("--split", required=True, help="split name to write, e.g. train, validation, test")
    parser.add_argument("--image_id_format", default=image_id_default, help=image_id_help)
    parser.add_argument("--tag_vocab", default=None,
                        help="object class names, one per line (default: the Visual Genome 1600 classes)")
    parser.add_argument("--id_offset", type=int, default=0,
                        help="subtracted from object ids before the vocabulary lookup (1 if id 0 is background)")
    parser.add_argument("--num_shards", type=int, default=1, help="number of machines sharing this split")
    parser.add_argument("--shard_index", type=int, default=0, help="this machine's shard, in [0, num_shards)")
    parser.add_argument("--lexicon", default=None,
                        help="concept lexicon JSON (ConceptLexicon.save) for the anchor statistics (default: built-in)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cmal_processing",
                                     description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="write one split of a corpus").add_subparsers(dest="task", required=True)

    captions = build.add_parser("captions", help="caption corpus (COCO captions .json or .jsonl)")
    captions.add_argument("--captions", required=True, help="COCO captions .json or .jsonl of {image_id, caption}")
    _common_arguments(captions, None, "default: {file_stem} for COCO .json (fields image_id, file_stem), "
                                      "{image_id} for .jsonl")

    vqa = build.add_parser("vqa", help="VQA v2")
    vqa.add_argument("--questions", required=True, help="official questions JSON")
    vqa.add_argument("--annotations", default=None, help="official annotations JSON (leave out for test splits)")
    vqa.add_argument("--answer_vocab", default=None,
                     help="answer_vocab.json to reuse (e.g. the training split's); default: top_k of --annotations")
    vqa.add_argument("--top_k", type=int, default=DEFAULT_TOP_K, help="answer vocabulary size when computed")
    _common_arguments(vqa, "{image_id}", "COCO image id -> feature id, e.g. COCO_val2014_{image_id:012d}")

    nlvr2 = build.add_parser("nlvr2", help="NLVR2")
    nlvr2.add_argument("--annotations", required=True, help="official .json lines file of the split")
    _common_arguments(nlvr2, "{image_id}", "NLVR2 image id (dev-850-0-img0) -> feature id")

    snli_ve = build.add_parser("snli_ve", help="SNLI-VE")
    snli_ve.add_argument("--annotations", required=True, help="official .jsonl file of the split")
    _common_arguments(snli_ve, "{image_id}", "Flickr30k id (1234 from 1234.jpg) -> feature id")

    refcoco = build.add_parser("refcoco", help="RefCOCO+ (or RefCOCO / RefCOCOg)")
    refcoco.add_argument("--refs", required=True, help="refs(unc).p (read with a restricted unpickler) or a .json dump")
    refcoco.add_argument("--instances", required=True, help="instances.json of the same dataset")
    refcoco.add_argument("--refs_split", default=None,
                         help="refs split to take: train, val, testA, testB (default: --split, validation -> val)")
    _common_arguments(refcoco, "{image_id}", "COCO image id -> feature id, e.g. COCO_train2014_{image_id:012d}")

    merge = commands.add_parser("merge", help="concatenate the shards of a split into OUTPUT/SPLIT")
    merge.add_argument("--output", required=True, help="the --output the shards were built with")
    merge.add_argument("--split", required=True, help="split to merge")
    extract = commands.add_parser("extract", help="detect regions in a folder or list of photos (the image table)")
    extract.add_argument("--images", required=True, help="folder of images, or a text file listing image paths")
    extract.add_argument("--detector", required=True, help="folder of a transformers object detector (DETR family)")
    extract.add_argument("--output", required=True, help="image table folder (regions-*.parquet; reruns resume)")
    extract.add_argument("--batch_size", type=int, default=8, help="images per forward pass")
    extract.add_argument("--images_per_shard", type=int, default=1000, help="images per shard (unit of resuming)")
    extract.add_argument("--score_threshold", type=float, default=0.2, help="detections scoring at most this dropped")
    extract.add_argument("--top_k", type=int, default=36, help="at most this many regions per image")
    extract.add_argument("--min_size", type=int, default=16, help="images with a side below this are skipped")
    shards = commands.add_parser("shards", help="streamed pre-training corpus: images once, captions pre-tokenised")
    source = shards.add_mutually_exclusive_group(required=True)
    source.add_argument("--captions", help="COCO captions .json or .jsonl of {image_id, caption} (with --features)")
    source.add_argument("--dataset", help="a map-style caption split folder to convert (e.g. corpus/pretrain/train)")
    shards.add_argument("--features", nargs="+", metavar="SRC", help="BUTD .tsv, .npz folders or extract's table")
    shards.add_argument("--processor", required=True, help="CmalProcessor folder (tokenizer + lexicon) to tokenise")
    shards.add_argument("--output", required=True, help="corpus folder or fsspec URL")
    shards.add_argument("--image_id_format", default=None, help="as for build captions")
    shards.add_argument("--max_length", type=int, default=None, help="caption pieces (default: the tokenizer's)")
    shards.add_argument("--images_per_shard", type=int, default=4000, help="images per Parquet shard")
    return parser


def _run_shards(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from modeling_cmal.processing_cmal import CmalProcessor

    from .shards import build_streamed_captions, convert_caption_dataset

    processor = CmalProcessor.from_pretrained(args.processor)
    options = dict(max_length=args.max_length, images_per_shard=args.images_per_shard)
    if args.dataset is not None:
        info = convert_caption_dataset(args.dataset, args.output, processor, **options)
    else:
        if not args.features:
            parser.error("--captions needs --features")
        info = build_streamed_captions(args.captions, args.features, processor, args.output,
                                       image_id_format=args.image_id_format, **options)
    print(f"streamed corpus -> {args.output}: {info['images']} images, {info['captions']} captions, "
          f"{len(info['shards'])} shards, {info['feature_dim']}-d features; skipped {info.get('skipped', {})}")
    return 0 if info["captions"] else 1


def _run_extract(args: argparse.Namespace) -> int:
    from .extract import extract_regions

    summary = extract_regions(args.images, args.detector, args.output, batch_size=args.batch_size,
                              images_per_shard=args.images_per_shard, score_threshold=args.score_threshold,
                              top_k=args.top_k, min_size=args.min_size)
    print(summary.format())
    return 0 if summary.rows_written or summary.shards_kept else 1


def _run_build(args: argparse.Namespace):
    lexicon = None
    if args.lexicon is not None:
        from modeling_cmal.anchoring import ConceptLexicon

        lexicon = ConceptLexicon.load(args.lexicon)
    common = dict(
        region_features=args.features, output=args.output, split=args.split, tag_vocab=args.tag_vocab,
        id_offset=args.id_offset, num_shards=args.num_shards, shard_index=args.shard_index, lexicon=lexicon,
    )
    if args.task == "captions":
        return build_captions(args.captions, image_id_format=args.image_id_format, **common)
    if args.task == "vqa":
        return build_vqa(args.questions, annotations=args.annotations, answer_vocab=args.answer_vocab,
                         top_k=args.top_k, image_id_format=args.image_id_format, **common)
    if args.task == "nlvr2":
        return build_nlvr2(args.annotations, image_id_format=args.image_id_format, **common)
    if args.task == "snli_ve":
        return build_snli_ve(args.annotations, image_id_format=args.image_id_format, **common)
    return build_refcoco(args.refs, args.instances, refs_split=args.refs_split,
                         image_id_format=args.image_id_format, **common)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "extract":
            return _run_extract(args)
        if args.command == "shards":
            return _run_shards(args, parser)
        if args.command == "merge":
            print(f"merged into {merge_shards(args.output, args.split)}")
            return 0
        with logging_redirect_tqdm():  # skip warnings print above the progress bar, not through it
            summary = _run_build(args)
    except (ValueError, FileNotFoundError) as error:
        parser.exit(2, f"error: {error}\n")
    print(summary.format())
    if summary.rows_written == 0:
        print("error: no row was written (see the skipped items above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
