"""Hub-ready folders: weights, config (full `auto_map` and `custom_pipelines`), processor, code and model card.

    python -m cmal_examples.hub_export --model outputs/vqa --output outputs/vqa-hub [--task cmal-vqa]
        [--metrics eval_results.json --metrics_source "synthetic scenes, validation split"]

A tool of the example programs, not of the runtime package: `write_hub_folder` saves a model and its processor with
`save_pretrained` and adds the Hub files; `add_hub_files` adds them to a folder already saved (what the fine-tuning
programs do after `Trainer.save_model`). The Hub files are the config's `auto_map` for every CMAL head and its
`custom_pipelines` (written from a copy of the saved config, so the model's own config is left alone), the code files
that `trust_remote_code=True` runs, and the model card (`huggingface_hub.ModelCard` from the Jinja template
`model_card_template.md` beside this file, with `ModelCardData` as its YAML header).

The folder loads where this package is not installed (`AutoModel*.from_pretrained(folder, trust_remote_code=True)`,
`AutoProcessor`, `pipeline(task, model=folder, trust_remote_code=True)`) and is ready for `push_to_hub` /
`huggingface_hub.upload_folder` (nothing is pushed here).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import jinja2.meta
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from transformers.dynamic_module_utils import get_relative_import_files

import modeling_cmal
from modeling_cmal.configuration_cmal import CmalConfig
from modeling_cmal.modeling_cmal import CMAL_AUTO_MAP
from modeling_cmal.pipelines_cmal import CMAL_PIPELINES, custom_pipelines_entry

from .arguments import parse_arguments
from .checkpoints import safetensors_shapes

PACKAGE_DIR = Path(modeling_cmal.__file__).resolve().parent
DEFAULT_MODEL_CARD = Path(__file__).resolve().parent / "model_card_template.md"
# The modules a folder's remote code starts from; their relative imports (anchoring, region extraction, ...) follow.
ENTRY_MODULES = ("configuration_cmal.py", "modeling_cmal.py", "processing_cmal.py", "pipelines_cmal.py")
# Heads whose folder serves every pipeline task (the pre-trained model's ITM head gives zero-shot matching; the
# other task heads start untrained from it).
MULTI_TASK_CLASSES = ("CmalModel", "CmalForPreTraining")
HEAD_TASKS = {pipeline_class.head_class_name: task for task, pipeline_class in CMAL_PIPELINES.items()}
HUB_PIPELINE_TAGS = {
    "cmal-vqa": "visual-question-answering",
    "cmal-referring-expression": "zero-shot-object-detection",
    "cmal-visual-entailment": "other",
    "cmal-visual-reasoning": "other",
    "cmal-image-text-matching": "other",
}
TASK_SUMMARIES = {
    "cmal-vqa": "visual question answering",
    "cmal-visual-entailment": "visual entailment",
    "cmal-visual-reasoning": "visual reasoning over image pairs (NLVR2)",
    "cmal-referring-expression": "referring expression comprehension",
    "cmal-image-text-matching": "image-text matching and retrieval",
}
TASK_CALLS = {
    "cmal-vqa": ('text="what color is the cup?", regions=regions, top_k=3', '[{"answer": ..., "score": ...}, ...]'),
    "cmal-visual-entailment": ('text="there is a drink on the table", regions=regions',
                               '[{"label": ..., "score": ...}]'),
    "cmal-visual-reasoning": ('text="both images show a cup", regions=(left_regions, right_regions)',
                              '{"label": ..., "score": ...}'),
    "cmal-referring-expression": ('text="the red cup", regions=regions',
                                  '{"box": [x1, y1, x2, y2], "score": ..., "region_index": ..., "normalized": ...}'),
    "cmal-image-text-matching": ('text="a cup on a saucer", regions=regions',
                                 '{"match_probability": ..., "is_match": ...}'),
}
CARD_TAGS = ["vision-language", "cmal", "multimodal", "vqa", "custom_code"]
WEIGHT_FILE = re.compile(r"^(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?$")


def code_files() -> list[Path]:
    """The runtime package's module files a folder needs: the entry modules and, recursively, what they import
    relatively."""
    files = []
    for name in ENTRY_MODULES:
        entry = PACKAGE_DIR / name
        if not entry.is_file():
            raise FileNotFoundError(f"{entry} is missing from the modeling_cmal package")
        for path in [str(entry), *get_relative_import_files(entry)]:
            if Path(path) not in files:
                files.append(Path(path))
    return files


def resolve_tasks(head: str, pipeline_task: str | Sequence[str] | None) -> list[str]:
    """The pipeline tasks a folder of the model class `head` declares: `pipeline_task` (a name or a list), or by
    default the task of the head (all five for `CmalModel` / `CmalForPreTraining`). A task that needs another head
    is an error."""
    if head not in HEAD_TASKS and head not in MULTI_TASK_CLASSES:
        raise ValueError(f"model must be a CMAL model ({', '.join([*MULTI_TASK_CLASSES, *HEAD_TASKS])}), got {head}")
    if pipeline_task is None:
        return [HEAD_TASKS[head]] if head in HEAD_TASKS else list(CMAL_PIPELINES)
    tasks = [pipeline_task] if isinstance(pipeline_task, str) else list(pipeline_task)
    if not tasks:
        raise ValueError("pipeline_task must name at least one task, got an empty list")
    for task in tasks:
        if task not in CMAL_PIPELINES:
            raise ValueError(f"pipeline_task must be one of {sorted(CMAL_PIPELINES)}, got {task!r}")
        if head in HEAD_TASKS and HEAD_TASKS[head] != task:
            raise ValueError(f"pipeline_task {task!r} needs a {CMAL_PIPELINES[task].head_class_name}, but the model "
                             f"is a {head} (its task is {HEAD_TASKS[head]!r})")
    return tasks


# ------------------------------------------------------------------------------------------------------------------
# Model card
# ------------------------------------------------------------------------------------------------------------------


def _format_value(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


def _table(header: tuple[str, str], rows: Sequence[tuple[str, str]]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in rows]
    return "\n".join(lines)


def _config_table(config: CmalConfig, head: str, num_parameters: int) -> str:
    rows = [
        ("head", f"`{head}`"),
        ("parameters", _format_value(num_parameters)),
        ("hidden size / heads / feed-forward", f"{config.hidden_size} / {config.num_attention_heads} / "
                                               f"{config.intermediate_size}"),
        ("layers: text / region / unified", f"{config.num_text_layers} / {config.num_visual_layers} / "
                                            f"{config.num_unified_layers}"),
        ("region feature dimension (`visual_feat_dim`)", str(config.visual_feat_dim)),
        ("word-piece vocabulary", _format_value(config.vocab_size)),
        ("anchor concepts (AMC classes, lexicon size)", _format_value(config.num_anchor_concepts)),
        ("anchor action at inference", f"`{config.default_anchor_action}`"),
    ]
    if head in ("CmalForQuestionAnswering", "CmalForVisualEntailment", "CmalForVisualReasoning"):
        labels = [config.id2label[index] for index in sorted(config.id2label)]
        shown = ", ".join(f"`{label}`" for label in labels[:8]) + (", ..." if len(labels) > 8 else "")
        rows.append(("labels", f"{len(labels)}: {shown}"))
    return _table(("setting", "value"), rows)


def _usage(model_name: str, task: str) -> str:
    arguments, result = TASK_CALLS[task]
    return "\n".join([
        "```python",
        "from transformers import pipeline",
        "",
        f'pipe = pipeline("{task}", model="{model_name}", trust_remote_code=True)',
        'regions = {"visual_feats": features, "visual_pos": boxes, "image_size": (width, height), "tags": tags}',
        f"pipe({arguments})",
        f"# → {result}",
        "```",
        "",
        "With an image instead of regions, give the pipeline a region extractor (a transformers object-detection "
        "model wrapped by `CmalRegionExtractor`): `pipeline(..., region_extractor=extractor)`, then "
        "`pipe(text=..., image=\"photo.jpg\")`.",
    ])


def _measured_results(metrics: Mapping[str, float] | None, metrics_source: str | None) -> str:
    if not metrics:
        return "_No measured results were passed in for this checkpoint._"
    rows = [(f"`{name}`", _format_value(value)) for name, value in metrics.items()]
    return f"Source: {metrics_source}\n\n" + _table(("metric", "value"), rows)


def render_model_card(config: CmalConfig, num_parameters: int, tasks: Sequence[str], template: str, *,
                      model_name: str, code_file_names: Sequence[str], metrics: Mapping[str, float] | None = None,
                      metrics_source: str | None = None) -> ModelCard:
    """The card of a folder: `ModelCardData` (license, library, pipeline tag, tags, the measured `metrics` as
    `eval_results`) as its YAML header and the Jinja `template` filled from the config. Raises `ValueError` if the
    template uses a variable that is not known."""
    head = (config.architectures or ["CmalForPreTraining"])[0]
    pipeline_tag = HUB_PIPELINE_TAGS[tasks[0]] if len(tasks) == 1 else "visual-question-answering"
    eval_results = [EvalResult(task_type=pipeline_tag, dataset_type="custom", dataset_name=metrics_source,
                               metric_type=name, metric_value=value) for name, value in (metrics or {}).items()]
    card_data = ModelCardData(license="apache-2.0", library_name="transformers", pipeline_tag=pipeline_tag,
                              tags=[*CARD_TAGS, *tasks], model_name=model_name, eval_results=eval_results or None)
    variables = {
        "model_name": model_name,
        "head_class": head,
        "task_summary": ", ".join(TASK_SUMMARIES[task] for task in tasks),
        "config_table": _config_table(config, head, num_parameters),
        "code_files": ", ".join(f"`{name}`" for name in code_file_names),
        "usage": _usage(model_name, tasks[0]),
        "pipelines_table": _table(("task", "pipeline class"),
                                  [(f"`{task}`", f"`{CMAL_PIPELINES[task].__name__}`") for task in tasks]),
        "measured_results": _measured_results(metrics, metrics_source),
    }
    used = jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(template))
    unknown = sorted(used - {"card_data", *card_data.to_dict(), *variables})
    if unknown:
        raise ValueError(f"the model-card template uses unknown variables {unknown}; known: "
                         f"{sorted({'card_data', *card_data.to_dict(), *variables})}")
    return ModelCard.from_template(card_data, template_str=template, **variables)


# ------------------------------------------------------------------------------------------------------------------
# Folder
# ------------------------------------------------------------------------------------------------------------------


def _check_metrics(metrics: Mapping[str, float] | None, metrics_source: str | None) -> None:
    if not metrics:
        return
    if not metrics_source:
        raise ValueError("metrics need metrics_source: say what data and split they were measured on")
    for name, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"metrics[{name!r}] must be a number, got {value!r}")


def _count_parameters(folder: Path) -> int:
    """Parameters of the saved weights (read from the safetensors headers, so a sharded or FSDP-saved model counts
    whole; tied weights are saved, and counted, once)."""
    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        raise ValueError(f"{folder} has no model*.safetensors; save the model with save_pretrained first")
    return sum(math.prod(shape) for file in files for shape in safetensors_shapes(file).values())


def add_hub_files(folder: str | os.PathLike, *, pipeline_task: str | Sequence[str] | None = None,
                  model_card: str | os.PathLike | None = None, metrics: Mapping[str, float] | None = None,
                  metrics_source: str | None = None, repo_id: str | None = None) -> Path:
    """Adds the Hub files to a folder that `save_pretrained` (or `Trainer.save_model`) wrote: `config.json` with every
    CMAL head in `auto_map` and exactly the pipeline tasks in `custom_pipelines`, the code files, and `README.md`.
    Arguments as in `write_hub_folder`. Raises `ValueError` naming the argument for bad input."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"folder {str(folder)!r} has no config.json; expected a folder written by save_pretrained")
    config = CmalConfig.from_pretrained(folder)  # a copy: the model's own config is not touched
    tasks = resolve_tasks((config.architectures or ["CmalForPreTraining"])[0], pipeline_task)
    _check_metrics(metrics, metrics_source)
    template_path = Path(model_card) if model_card is not None else DEFAULT_MODEL_CARD
    if not template_path.is_file():
        raise ValueError(f"model_card must be a model-card template file, got {str(template_path)!r}, which is not a "
                         "file (the default is cmal_examples/model_card_template.md)")
    files = code_files()
    card = render_model_card(config, _count_parameters(folder), tasks, template_path.read_text(encoding="utf-8"),
                             model_name=repo_id or folder.name, code_file_names=[path.name for path in files],
                             metrics=metrics, metrics_source=metrics_source)
    for path in files:
        shutil.copyfile(path, folder / path.name)
    config.auto_map = {**(getattr(config, "auto_map", None) or {}), **CMAL_AUTO_MAP}
    config.custom_pipelines = {task: custom_pipelines_entry(task) for task in tasks}
    config.save_pretrained(folder)
    card.save(folder / "README.md")
    return folder


def _publish(staging: Path, output_dir: Path) -> None:
    """Moves the staged folder into place: one rename when `output_dir` does not exist (or is empty); into an existing
    folder (e.g. a Trainer `output_dir` with checkpoints and logs) file by file, each replaced atomically, stale weight
    files removed, `config.json` last, other files left alone."""
    if output_dir.is_dir() and not any(output_dir.iterdir()):
        output_dir.rmdir()
    if not output_dir.exists():
        os.rename(staging, output_dir)
        return
    new_files = {path.name for path in staging.iterdir()}
    for stale in output_dir.iterdir():
        if stale.is_file() and WEIGHT_FILE.match(stale.name) and stale.name not in new_files:
            stale.unlink()
    for name in sorted(new_files, key=lambda name: name == "config.json"):
        target = output_dir / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(staging / name, target)
    staging.rmdir()


def write_hub_folder(
    model,
    processor,
    output_dir: str | os.PathLike,
    *,
    pipeline_task: str | Sequence[str] | None = None,
    model_card: str | os.PathLike | None = None,
    metrics: Mapping[str, float] | None = None,
    metrics_source: str | None = None,
    repo_id: str | None = None,
) -> Path:
    """Writes a complete Hub-ready folder and returns its path.

    Args:
        model: a CMAL model (`CmalModel`, `CmalForPreTraining` or a task head).
        processor: its `CmalProcessor` (tokenizer, lexicon; its lexicon size must equal
            `config.num_anchor_concepts`).
        output_dir: the folder to write. A new folder appears at once (built beside it, then renamed); into an
            existing one the files are replaced one by one and its other files are kept.
        pipeline_task: the `custom_pipelines` tasks of the config: a task name or a list of them; by default the
            task of the model's head, or all five for `CmalModel` / `CmalForPreTraining`.
        model_card: the Jinja model-card template (default: `cmal_examples/model_card_template.md`).
        metrics, metrics_source: our own measured results for the card (`{"vqa_accuracy": 0.71}`) and what they
            were measured on (required with `metrics`); without them the card says that none were given.
        repo_id: the Hub repository the folder is meant for (`"user/cmal-vqa"`), the name the card's title and
            usage snippet use (default: the folder's name).

    Contents: `model.safetensors`, `config.json` (every CMAL head in `auto_map`, `custom_pipelines`), the processor
    files, the code files (`configuration_cmal.py`, `modeling_cmal.py`, `processing_cmal.py`, `pipelines_cmal.py`
    and the modules they import) and `README.md`. Nothing is left behind when writing fails.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"output_dir {str(output_dir)!r} is a file; expected a folder to write (new or existing)")
    resolve_tasks(type(model).__name__, pipeline_task)
    if not callable(getattr(processor, "save_pretrained", None)):
        raise ValueError(f"processor must be a CmalProcessor, got {type(processor).__name__}")
    lexicon = getattr(processor, "lexicon", None)
    if lexicon is not None and len(lexicon) != model.config.num_anchor_concepts:
        raise ValueError(f"the processor's lexicon has {len(lexicon)} concepts but the model's "
                         f"config.num_anchor_concepts is {model.config.num_anchor_concepts}")
    _check_metrics(metrics, metrics_source)
    if model_card is not None and not Path(model_card).is_file():
        raise ValueError(f"model_card must be a model-card template file, got {str(model_card)!r}, which is not a "
                         "file (the default is cmal_examples/model_card_template.md)")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", suffix=".tmp", dir=output_dir.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        processor.save_pretrained(staging)
        add_hub_files(staging, pipeline_task=pipeline_task, model_card=model_card, metrics=metrics,
                      metrics_source=metrics_source, repo_id=repo_id or output_dir.name)
        _publish(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir


# ------------------------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------------------------


def load_trained_folder(folder: str | os.PathLike):
    """(model, processor) of a folder saved by the CMAL programs; the model class is the one its config names."""
    from modeling_cmal.processing_cmal import CmalProcessor

    config = CmalConfig.from_pretrained(folder)
    architectures = config.architectures or ["CmalForPreTraining"]
    model_class = getattr(modeling_cmal, architectures[0], None)
    if model_class is None or architectures[0] not in (*MULTI_TASK_CLASSES, *HEAD_TASKS):
        raise ValueError(f"{folder} holds a {architectures[0]}, which is not a CMAL model class")
    return model_class.from_pretrained(folder).eval(), CmalProcessor.from_pretrained(folder)


@dataclass
class HubExportArguments:
    """The flags of `python -m cmal_examples.hub_export` (`HfArgumentParser`)."""

    model: str = field(metadata={"help": "a trained CMAL folder (model, config, processor)"})
    output: str = field(metadata={"help": "the Hub-ready folder to write"})
    task: list[str] | None = field(default=None, metadata={
        "action": "extend", "choices": sorted(CMAL_PIPELINES), "metavar": "TASK",
        "help": "a pipeline task of the folder, one of " + ", ".join(sorted(CMAL_PIPELINES))
                + " (repeatable, or several after one --task; default: the task of the model's head)"})
    model_card: str | None = field(default=None, metadata={
        "help": "Jinja model-card template (default: cmal_examples/model_card_template.md)"})
    metrics: str | None = field(default=None, metadata={
        "help": "a JSON file of measured results, e.g. a Trainer eval_results.json"})
    metrics_source: str | None = field(default=None, metadata={
        "help": "what the metrics were measured on (required with --metrics)"})
    repo_id: str | None = field(default=None, metadata={
        "help": "the Hub repository the folder is for, as the card names it"})


def parse_args(argv: Sequence[str] | None = None) -> HubExportArguments:
    (args,) = parse_arguments(HubExportArguments, None if argv is None else list(argv),
                              prog="python -m cmal_examples.hub_export", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    return args


def export(argv: Sequence[str] | None = None) -> Path:
    """What the command line does, for Python callers: writes the folder of the flags in `argv` (default
    `sys.argv[1:]`) and returns its path."""
    args = parse_args(argv)
    metrics = None
    if args.metrics:
        try:
            metrics = json.loads(Path(args.metrics).read_text())
        except (OSError, ValueError) as error:
            raise SystemExit(f"--metrics {args.metrics!r} is not a readable JSON file: {error}") from None
        if not isinstance(metrics, dict):
            raise SystemExit(f"--metrics {args.metrics!r} must hold a JSON object of metric names and numbers")
        metrics = {name: value for name, value in metrics.items() if not isinstance(value, (str, list, dict))}
    if not (Path(args.model) / "config.json").is_file():
        raise SystemExit(f"--model {args.model!r} is not a saved CMAL folder (no config.json)")
    model, processor = load_trained_folder(args.model)
    try:
        folder = write_hub_folder(model, processor, args.output, pipeline_task=args.task, model_card=args.model_card,
                                  metrics=metrics, metrics_source=args.metrics_source, repo_id=args.repo_id)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    print(f"wrote {folder}: {', '.join(sorted(path.name for path in folder.iterdir()))}")
    return folder


def main(argv: Sequence[str] | None = None) -> int:
    """The console script `cmal-hub-export` (`sys.exit(main())`): 0 once the folder is written. `export` returns the
    folder."""
    export(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
