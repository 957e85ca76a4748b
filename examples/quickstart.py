"""CMAL quickstart — the project's main job, on the embedded synthetic world (no downloads, a laptop CPU).

    python examples/quickstart.py                     # about 9 minutes on an idle 2-core CPU
    python examples/quickstart.py --preset smoke      # a few minutes: the same steps, tiny sizes

Steps: build a synthetic world in VLP's regime (1,000 task scenes with labels, 6,000 more scenes whose captions
only pre-training sees, the world's own word-piece vocabulary) → pre-train a small CMAL (AMC + MLM + ITM, plus MRFR
and ITC) with `examples/pretrain.py` → reload it through `AutoModelForPreTraining` with `trust_remote_code` in a
process where this package cannot be imported and measure AMC accuracy against chance → fine-tune each of the four
tasks (VQA, NLVR2, SNLI-VE, RefCOCO+) with Trainer, from the pre-trained model and from the same architecture
freshly initialised, at two label budgets (full: 3,000 samples × 8 epochs; scarce: 300 samples × 20 epochs; the two
starting points of a budget side by side, one core each) → evaluate each pre-trained fine-tuned model again with
the validation images shuffled across samples (how much the head uses the image) → score VQA per question type →
answer a few questions through the `cmal-vqa` pipeline. Everything lands in `--output_dir` (default
`outputs/quickstart`), including `loss_curves.png` and `summary.json`:
`summary["tasks"][task] = {"pretrained", "scratch", "images_shuffled"}` (full labels),
`summary["scarce"][task] = {"pretrained", "scratch", "labels"}`, `summary["vqa_types"][question_type] =
{"pretrained", "scratch", "chance", "questions"}` (full labels), `summary["pretraining"] = {"step", "itm_accuracy",
"amc_accuracy", "mlm_accuracy"}` (held-out, at the last step); scores in [0, 1]. Deterministic for `--seed`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cmal_examples.arguments import parse_arguments
from cmal_examples.main_job import BUDGETS, FINETUNE_WARMUP_STEPS, MODEL_FIELDS, PRESETS

REPO_ROOT = Path(__file__).resolve().parents[1]

@dataclass
class QuickstartArguments:
    """The flags of the main job (`HfArgumentParser`)."""

    output_dir: str = field(default="outputs/quickstart", metadata={"help": "where everything is written"})
    preset: str = field(default="default", metadata={
        "help": "default: the main job (about 9 minutes on 2 cores); smoke: a minute-long check of the plumbing",
        "choices": sorted(PRESETS)})
    seed: int = field(default=0, metadata={"help": "the world, pre-training and fine-tuning seed"})

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"--preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        if self.seed < 0:
            raise ValueError(f"--seed must be an int >= 0, got {self.seed}")


def parse_args(argv: list[str] | None = None) -> QuickstartArguments:
    (args,) = parse_arguments(QuickstartArguments, argv, description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    return args


def run_step(title: str, command: list[str], log_file: Path) -> float:
    """Runs one stage as its own process (as a user would), streaming to a log; returns seconds taken."""
    return run_side_by_side([(title, command, log_file)])[0]


def run_side_by_side(steps: list[tuple[str, list[str], Path]]) -> list[float]:
    """Runs stages as processes at the same time, the machine's cores shared out between them (`OMP_NUM_THREADS`:
    the tiny models of the main job gain little from a second thread, so two one-thread runs side by side take about
    0.7 of the time of the two in turn on 2 cores); returns each one's seconds. Each stage streams to its log."""
    threads = str(max(1, (os.cpu_count() or 1) // len(steps)))
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false",
               **({"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads} if len(steps) > 1 else {}))
    for title, command, _ in steps:
        print(f"\n=== {title}\n$ {' '.join(command)}", flush=True)
    started, running = time.perf_counter(), []
    for title, command, log_file in steps:
        log = log_file.open("w")
        running.append((title, log_file, log,
                        subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)))
    elapsed, failures = [], []
    for title, log_file, log, process in running:
        returncode = process.wait()
        log.close()
        elapsed.append(time.perf_counter() - started)
        if returncode != 0:
            tail = "\n".join(log_file.read_text().splitlines()[-40:])
            failures.append(f"{title} failed (exit {returncode}); last lines of {log_file}:\n{tail}")
        else:
            print(f"    {title}: done in {elapsed[-1]:.0f}s (log: {log_file})", flush=True)
    if failures:
        raise SystemExit("\n\n".join(failures))
    return elapsed


# The four downstream tasks: fine-tuning script and metric (each in [0, 1]).
TASKS = {
    "vqa": dict(script="examples/finetune_vqa.py", metric="vqa_accuracy"),
    "nlvr2": dict(script="examples/finetune_nlvr2.py", metric="accuracy"),
    "snli_ve": dict(script="examples/finetune_snli_ve.py", metric="accuracy"),
    "refcoco": dict(script="examples/finetune_refcoco.py", metric="iou_accuracy"),
}
RELOAD_AND_SCORE = """
import json, sys
# As on a machine that has transformers but not this package: the model must come from the folder's code.
sys.modules["modeling_cmal"] = None
sys.modules["cmal_processing"] = None
import torch
from transformers import AutoModelForPreTraining

folder, batches_file = sys.argv[1], sys.argv[2]
model = AutoModelForPreTraining.from_pretrained(folder, trust_remote_code=True).eval()
correct = total = 0
with torch.no_grad():
    for batch in torch.load(batches_file, weights_only=True):
        outputs = model(**batch)
        targeted = outputs.amc_labels != -100
        correct += ((outputs.amc_logits.argmax(-1) == outputs.amc_labels) & targeted).sum().item()
        total += targeted.sum().item()
print(json.dumps({"correct": correct, "total": total,
                  "model_class": type(model).__module__ + "." + type(model).__name__}))
"""


def amc_accuracy_after_reload(pretrained_dir: Path, validation_path: Path, seed: int, work_dir: Path) -> dict:
    """Reloads the pre-trained folder through `AutoModelForPreTraining` with `trust_remote_code` in a fresh process
    where this package cannot be imported, and measures AMC accuracy on the held-out split against chance (always
    predicting the most frequent concept). The batches (anchor actions drawn by the collator) are made here."""
    import torch
    from cmal_processing.corpus import load_corpus
    from transformers import AutoConfig

    from modeling_cmal.collator_cmal import CmalPretrainingCollator
    from modeling_cmal.configuration_cmal import ANCHOR_ACTIONS
    from modeling_cmal.processing_cmal import CmalProcessor

    amc_actions = torch.tensor([ANCHOR_ACTIONS.index("mask_text"), ANCHOR_ACTIONS.index("mask_region")])

    config = AutoConfig.from_pretrained(pretrained_dir)
    collator = CmalPretrainingCollator(CmalProcessor.from_pretrained(pretrained_dir), config, seed=seed)
    validation = load_corpus(validation_path)["validation"]
    batches = [collator([validation[i] for i in range(start, min(start + 64, len(validation)))])
               for start in range(0, len(validation), 64)]
    batches_file = work_dir / "amc_validation_batches.pt"
    torch.save(batches, batches_file)
    counts = torch.zeros(config.num_anchor_concepts)
    for batch in batches:  # AMC targets: one concept per mask-text or mask-region anchor (sample, region)
        active = (batch["anchor_pairs"][..., 0] >= 0) & torch.isin(batch["anchor_actions"], amc_actions)
        anchors = {(sample, region): concept for sample, (_, region), concept in zip(
            active.nonzero()[:, 0].tolist(), batch["anchor_pairs"][active].tolist(),
            batch["anchor_concept_ids"][active].tolist())}
        for concept in anchors.values():
            counts[concept] += 1
    result = subprocess.run([sys.executable, "-c", RELOAD_AND_SCORE, str(pretrained_dir), str(batches_file)],
                            cwd=work_dir, capture_output=True, text=True,
                            env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    if result.returncode != 0:
        raise SystemExit(f"reloading {pretrained_dir} with trust_remote_code failed:\n{result.stderr[-3000:]}")
    scored = json.loads(result.stdout.strip().splitlines()[-1])
    return {"amc_accuracy": scored["correct"] / max(scored["total"], 1),
            "amc_chance": (counts.max() / counts.sum().clamp(min=1)).item(), "amc_slots": scored["total"],
            "model_class": scored["model_class"]}


def write_untrained_copy(pretrained_dir: Path, target: Path, seed: int) -> Path:
    """The same architecture, configuration and processor as the pre-trained folder, freshly initialised: the
    "without pre-training" arm of the VQA comparison differs from the other in the weights only."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoProcessor

    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(pretrained_dir, trust_remote_code=True)
    AutoModel.from_config(config, trust_remote_code=True).save_pretrained(target)
    AutoProcessor.from_pretrained(pretrained_dir, trust_remote_code=True).save_pretrained(target)
    return target


def read_eval_score(finetune_dir: Path, task: str) -> float:
    """The task's metric in [0, 1], from the `eval_results.json` the fine-tuning script wrote."""
    results = json.loads((finetune_dir / "eval_results.json").read_text())
    return float(results[f"eval_{TASKS[task]['metric']}"])


def write_shuffled_validation(task_dir: Path, target: Path, seed: int) -> Path:
    """The task's validation split with every sample's image taken from another image (`images_shuffled`), as a
    task folder the fine-tuning script evaluates: one training row (the script reads the schema from it), the
    answer vocabulary where there is one."""
    import shutil

    from cmal_processing.controls import images_shuffled
    from cmal_processing.corpus import load_corpus, save_corpus
    from cmal_processing.schema import ANSWER_VOCAB_FILE
    from datasets import disable_progress_bars

    disable_progress_bars()  # the stage's own line says what happens; four bars per task would bury the table
    dataset = load_corpus(task_dir)
    save_corpus({"train": dataset["train"].select(range(1)),
                 "validation": images_shuffled(dataset["validation"], seed=seed)}, target)
    if (task_dir / ANSWER_VOCAB_FILE).is_file():
        shutil.copy(task_dir / ANSWER_VOCAB_FILE, target / ANSWER_VOCAB_FILE)
    return target


# The losses pre-training logs (`train/<key>`), the total first; an objective that is off logs none.
LOSS_KEYS = ("loss", "amc_loss", "mlm_loss", "itm_loss", "itc_loss", "mrfr_loss")


def plot_curves(metrics_file: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    train = [row for row in rows if "train/loss" in row]
    evals = [row for row in rows if "eval/amc_accuracy" in row]
    figure, (losses, accuracy) = plt.subplots(1, 2, figsize=(11, 4))
    for key in LOSS_KEYS:
        if f"train/{key}" not in train[0]:  # an objective that is off
            continue
        losses.plot([row["step"] for row in train], [row[f"train/{key}"] for row in train], label=key)
    losses.set(xlabel="optimizer step", ylabel="loss", title="CMAL pre-training losses")
    losses.legend()
    for key in ("eval/amc_accuracy", "eval/mlm_accuracy", "eval/itm_accuracy"):
        accuracy.plot([row["step"] for row in evals], [row[key] for row in evals], marker="o", label=key.split("/")[1])
    accuracy.set(xlabel="optimizer step", ylabel="held-out accuracy", title="Held-out accuracy", ylim=(0, 1))
    accuracy.legend()
    figure.tight_layout()
    figure.savefig(png, dpi=120)
    plt.close(figure)


def loss_curve_lines(metrics_file: Path, points: int = 6) -> list[str]:
    """The pre-training losses at a few steps, as text (the PNG has every logged step)."""
    rows = [row for row in map(json.loads, metrics_file.read_text().splitlines()) if "train/loss" in row]
    picked = [rows[round(i * (len(rows) - 1) / (points - 1))] for i in range(points)] if len(rows) >= points else rows
    keys = [key for key in LOSS_KEYS if f"train/{key}" in rows[0]]
    lines = ["    step  " + "".join(f"{key:>10}" for key in keys)]
    lines += [f"    {row['step']:>4}  " + "".join(f"{row.get('train/' + key, float('nan')):>10.3f}" for key in keys)
              for row in picked]
    return lines


def answer_questions(vqa_dir: Path, vqa_path: Path, count: int = 5) -> list[dict]:
    """A few test questions through the `cmal-vqa` pipeline, loaded from the folder with remote code."""
    import numpy as np
    from cmal_processing.corpus import load_corpus
    from transformers import pipeline

    test = load_corpus(vqa_path)["validation"]
    answers = json.loads((vqa_path / "answer_vocab.json").read_text())
    vqa = pipeline("cmal-vqa", model=str(vqa_dir), trust_remote_code=True)
    shown = []
    for row in test.select(range(min(count, len(test)))):
        regions = {"visual_feats": np.asarray(row["visual_feats"], dtype=np.float32),
                   "visual_pos": np.asarray(row["visual_pos"], dtype=np.float32),
                   "tags": [str(tag) for tag in row["tags"]], "scores": np.asarray(row["scores"], dtype=np.float32)}
        prediction = vqa(text=str(row["text"]), regions=regions, top_k=1)[0]
        truth = answers[row["answer_ids"][int(np.argmax(row["answer_scores"]))]]
        shown.append({"question": str(row["text"]), "predicted": prediction["answer"], "score": prediction["score"],
                      "truth": truth})
    return shown


def finetune_command(task: str, start: Path, dataset: Path, target: Path, preset: dict, seed: int,
                     budget: str = "full") -> list[str]:
    """One fine-tuning run: the same budget from any starting point; the last step is evaluated on the whole
    validation split (no checkpoint selection on it). VQA also writes its validation predictions (per question
    type)."""
    samples, epochs = (preset[key] for key in BUDGETS[budget])
    return [sys.executable, TASKS[task]["script"], "--model_name_or_path", str(start), "--dataset_path", str(dataset),
            "--output_dir", str(target), "--num_train_epochs", str(epochs), "--max_train_samples", str(samples),
            "--per_device_train_batch_size", "32", "--per_device_eval_batch_size", "64", "--learning_rate",
            str(preset["finetune_learning_rate"]), "--warmup_steps", str(FINETUNE_WARMUP_STEPS), "--eval_strategy", "no", "--save_strategy",
            "no", "--seed", str(seed), "--report_to", "none", "--do_train", "--do_eval",
            *(["--do_predict"] if task == "vqa" else [])]


def last_pretraining_accuracies(metrics_file: Path) -> dict[str, float]:
    """The held-out ITM, AMC and MLM accuracies of pre-training's last evaluation."""
    evaluations = [row for row in map(json.loads, metrics_file.read_text().splitlines()) if "eval/itm_accuracy" in row]
    last = evaluations[-1]
    return {"step": last["step"],
            **{f"{name}_accuracy": last[f"eval/{name}_accuracy"] for name in ("itm", "amc", "mlm")}}


def evaluate_command(task: str, model: Path, dataset: Path, target: Path) -> list[str]:
    return [sys.executable, TASKS[task]["script"], "--model_name_or_path", str(model), "--dataset_path", str(dataset),
            "--output_dir", str(target), "--per_device_eval_batch_size", "64", "--report_to", "none", "--do_eval"]


def task_table(scores: dict[str, dict[str, float]], control: str = "images_shuffled") -> list[str]:
    """A closing table: per task, pre-trained, scratch and the control column (images shuffled, or the labels of a
    budget), with the differences that matter."""
    with_shuffled = control == "images_shuffled"
    lines = [f"    {'task':<9}{'pre-trained':>13}{'scratch':>10}{'images shuffled' if with_shuffled else 'labels':>17}"
             f"{'pre − scratch':>15}{'pre − shuffled' if with_shuffled else '':>16}"]
    for task, row in scores.items():
        control_value = f"{row[control]:>17.3f}" if with_shuffled else f"{row[control]:>17,}"
        lines.append(f"    {task:<9}{row['pretrained']:>13.3f}{row['scratch']:>10.3f}{control_value}"
                     f"{row['pretrained'] - row['scratch']:>+15.3f}"
                     + (f"{row['pretrained'] - row['images_shuffled']:>+16.3f}" if with_shuffled else ""))
    mean_gain = sum(row["pretrained"] - row["scratch"] for row in scores.values()) / len(scores)
    lines.append(f"    mean over tasks of pre-trained − scratch: {mean_gain:+.3f}")
    return lines


def question_type_table(types: dict[str, dict[str, float]]) -> list[str]:
    lines = [f"    {'question type':<20}{'questions':>10}{'pre-trained':>13}{'scratch':>10}{'chance':>9}"
             f"{'pre − scratch':>15}"]
    for kind, row in types.items():
        lines.append(f"    {kind:<20}{row['questions']:>10}{row['pretrained']:>13.3f}{row['scratch']:>10.3f}"
                     f"{row['chance']:>9.3f}{row['pretrained'] - row['scratch']:>+15.3f}")
    return lines


def main(argv=None) -> None:
    args = parse_args(argv)
    preset = PRESETS[args.preset]
    output = Path(args.output_dir).resolve()
    logs = output / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    data, pretrained, tokenizer = output / "data", output / "pretrained", output / "tokenizer"
    timings = {}
    started = time.perf_counter()

    timings["data"] = run_step("1/6 Build the synthetic world", [
        sys.executable, "-m", "cmal_processing.synthetic", "--output", str(data), "--num-scenes",
        str(preset["num_scenes"]),
        "--validation-fraction", str(preset["validation_fraction"]), "--questions-per-scene",
        str(preset["questions_per_scene"]), "--pretrain-scenes", str(preset["pretrain_scenes"]),
        "--partial-caption-probability", str(preset["partial_caption_probability"]),
        "--tokenizer-output", str(tokenizer), "--seed", str(args.seed)], logs / "data.log")
    world = json.loads((data / "synthetic_config.json").read_text())["rows"]
    labelled = {task: world[task]["train"] for task in TASKS}
    print(f"    pre-training captions {world['pretrain']['train']:,}; labelled train rows "
          + ", ".join(f"{task} {count:,}" for task, count in labelled.items()))

    model_config = output / "model_config.json"
    model_config.write_text(json.dumps({field: preset[field] for field in MODEL_FIELDS}))
    pretrain_command = [
        sys.executable, "examples/pretrain.py", "--dataset_path", str(data / "pretrain"), "--output_dir",
        str(pretrained), "--model_config", str(model_config), "--tokenizer_name", str(tokenizer), "--max_steps",
        str(preset["pretrain_steps"]), "--per_device_batch_size", "32", "--learning_rate",
        str(preset["pretrain_learning_rate"]), "--logging_steps", "10", "--eval_steps",
        str(max(10, preset["pretrain_steps"] // 10)), "--checkpointing_steps", str(preset["pretrain_steps"]),
        "--seed", str(args.seed), "--max_text_length", "40"]
    # Only the widths (and MRFR's and ITC's weights) come from the preset: the script sizes the vocabulary, lexicon
    # and features from the data.
    timings["pretrain"] = run_step("2/6 Pre-train CMAL (AMC + MLM + ITM + MRFR + ITC)", pretrain_command,
                                   logs / "pretrain.log")
    plot_curves(pretrained / "metrics.jsonl", output / "loss_curves.png")
    for line in loss_curve_lines(pretrained / "metrics.jsonl"):
        print(line)
    pretraining = last_pretraining_accuracies(pretrained / "metrics.jsonl")

    print("\n=== 3/6 Reload through AutoModelForPreTraining(trust_remote_code=True), AMC on held-out captions")
    amc = amc_accuracy_after_reload(pretrained, data / "pretrain", args.seed, output)
    print(f"    AMC accuracy {amc['amc_accuracy']:.3f} vs chance {amc['amc_chance']:.3f} over {amc['amc_slots']} slots")

    scratch = write_untrained_copy(pretrained, output / "scratch", args.seed)
    scores: dict[str, dict[str, float]] = {}
    scarce: dict[str, dict[str, float]] = {}
    for task in TASKS:
        scores[task], scarce[task] = {}, {"labels": min(preset["scarce_samples"], labelled[task])}
        for budget, table in (("full", scores), ("scarce", scarce)):
            suffix = "" if budget == "full" else "_scarce"
            runs = [(name, start, output / f"{task}_{name}{suffix}") for name, start in (("pretrained", pretrained),
                                                                                        ("scratch", scratch))]
            # The two starting points of one budget run side by side (same data, same steps, one seed).
            seconds = run_side_by_side([
                (f"4/6 Fine-tune {task} from {name} ({budget} labels: {preset[BUDGETS[budget][0]]:,} samples × "
                 f"{preset[BUDGETS[budget][1]]} epochs)",
                 finetune_command(task, start, data / task, target, preset, args.seed, budget),
                 logs / f"{task}_{name}{suffix}.log") for name, start, target in runs])
            for (name, _, target), elapsed in zip(runs, seconds, strict=True):
                timings[f"{task}_{name}{suffix}"] = elapsed
                table[task][name] = read_eval_score(target, task)
        shuffled_data = write_shuffled_validation(data / task, output / "data_images_shuffled" / task, args.seed)
        target = output / f"{task}_pretrained_images_shuffled"
        timings[f"{task}_images_shuffled"] = run_step(
            f"5/6 Evaluate the pre-trained {task} model with the validation images shuffled",
            evaluate_command(task, output / f"{task}_pretrained", shuffled_data, target), logs / f"{task}_shuffled.log")
        scores[task]["images_shuffled"] = read_eval_score(target, task)
    from cmal_examples.tasks import vqa_question_types

    vqa_types = vqa_question_types(data / "vqa", {"pretrained": output / "vqa_pretrained",
                                                  "scratch": output / "vqa_scratch"})

    print("\n=== 6/6 Answer questions through pipeline('cmal-vqa', trust_remote_code=True)")
    examples = answer_questions(output / "vqa_pretrained", data / "vqa")
    for item in examples:
        print(f"    Q: {item['question']:<45} predicted: {item['predicted']:<8} truth: {item['truth']}")

    timings["total"] = time.perf_counter() - started
    summary = {"preset": args.preset, "seed": args.seed, **amc, "pretraining": pretraining, "tasks": scores,
               "scarce": scarce, "vqa_types": vqa_types, "world": {"pretrain_captions": world["pretrain"]["train"],
                                                                   "labelled": labelled},
               "examples": examples, "seconds": {key: round(value, 1) for key, value in timings.items()}}
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n=== Summary (validation split, whole)")
    print(f"    pre-training, held-out at step {pretraining['step']}: ITM {pretraining['itm_accuracy']:.3f}, AMC "
          f"{pretraining['amc_accuracy']:.3f}, MLM {pretraining['mlm_accuracy']:.3f}; AMC after the remote-code "
          f"reload {amc['amc_accuracy']:.3f} (chance {amc['amc_chance']:.3f})")
    print(f"    full labels ({preset['finetune_samples']:,} samples × {preset['finetune_epochs']} epochs):")
    for line in task_table(scores):
        print(line)
    print(f"    scarce labels ({preset['scarce_samples']:,} samples × {preset['scarce_epochs']} epochs):")
    for line in task_table(scarce, control="labels"):
        print(line)
    print("    VQA per question type (full labels):")
    for line in question_type_table(vqa_types):
        print(line)
    print(f"    {timings['total']:.0f} s in all.   Loss curves: {output / 'loss_curves.png'}   "
          f"Summary: {output / 'summary.json'}")


if __name__ == "__main__":
    main()
