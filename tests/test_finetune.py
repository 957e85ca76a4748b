"""Fine-tuning scripts (examples/finetune_*.py) and zero-shot retrieval (examples/evaluate_retrieval.py).

- the metrics and the collator, in process;
- every script end to end on tiny real-format fixtures built through the `cmal_processing` builders;
- on the synthetic tasks, each head fine-tuned from scratch (`tiny`) learns well above chance (chance and threshold
  stated per task), and its folder reloads through its Auto class with `trust_remote_code` in a fresh process
  where this package cannot be imported, and reproduces the evaluation metric.

The script runs are independent processes of one thread each, started together so that they share the cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT

EXAMPLES = REPO_ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))

SCRIPTS = {"vqa": "finetune_vqa.py", "nlvr2": "finetune_nlvr2.py", "snli_ve": "finetune_snli_ve.py",
           "refcoco": "finetune_refcoco.py"}
METRICS = {"vqa": "vqa_accuracy", "nlvr2": "accuracy", "snli_ve": "accuracy", "refcoco": "iou_accuracy"}
ID_COLUMNS = {"vqa": "question_id", "nlvr2": "identifier", "snli_ve": "pair_id", "refcoco": "ref_id"}


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1")
    env.pop("ACCELERATE_CONFIG_FILE", None)
    return env


def _run_together(commands: dict[str, list[str]], logs: Path, timeout: int = 600) -> dict[str, str]:
    """Runs the commands as parallel processes (logs in `logs/<name>.log`); returns {name: failure} of those that
    failed."""
    processes = {}
    for name, command in commands.items():
        with (logs / f"{name}.log").open("w") as log:
            processes[name] = subprocess.Popen(command, cwd=REPO_ROOT, env=_env(), stdout=log,
                                               stderr=subprocess.STDOUT)
    failures = {}
    for name, process in processes.items():
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            code = "timeout"
        if code != 0:
            tail = "\n".join((logs / f"{name}.log").read_text().splitlines()[-40:])
            failures[name] = f"{name} exited with {code}:\n{tail}"
    return failures


def _script(task: str, dataset: Path, output_dir: Path, *args: str) -> list[str]:
    return [sys.executable, str(EXAMPLES / SCRIPTS[task]), "--dataset_path", str(dataset), "--output_dir",
            str(output_dir), "--report_to", "none", "--disable_tqdm", "true", "--dataloader_pin_memory", "false",
            "--do_train", "--do_eval", "--do_predict", *args]


# --------------------------------------------------------------------------------------------------------------
# Tiny real-format fixtures, built through the processing builders
# --------------------------------------------------------------------------------------------------------------

REAL_FEATURE_DIM = 16


def _write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def _succeeded(runs: tuple[Path, dict], name: str) -> Path:
    """The root folder of a fixture's runs, once the run `name` is known to have succeeded."""
    root, failures = runs
    assert name not in failures, failures.get(name)
    return root


def _retrieval_command(model: Path, dataset: Path, max_images: int, batch_size: int, output: Path) -> list[str]:
    return [sys.executable, str(EXAMPLES / "evaluate_retrieval.py"), "--model_name_or_path", str(model),
            "--dataset_path", str(dataset), "--split", "validation", "--max_images", str(max_images),
            "--batch_size", str(batch_size), "--output_dir", str(output)]


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


@pytest.fixture(scope="session")
def real_format_corpus(tmp_path_factory) -> Path:
    """Official VQA v2 / NLVR2 / SNLI-VE / RefCOCO+ / COCO-captions files over 16-d region features (a BUTD `.tsv`
    for COCO and NLVR2 images, a folder of bottom-up-attention.pytorch `.npz` for Flickr30k), built into
    `<root>/{vqa,nlvr2,snli_ve,refcoco,captions}` (train, validation, test) by `cmal_processing` (SNLI-VE through the
    `python -m cmal_processing build` command line, the others through the builder functions it calls)."""
    from test_readers import butd_fields, make_regions, write_butd_tsv, write_npz

    from cmal_processing import build_captions, build_nlvr2, build_refcoco, build_vqa
    from cmal_processing.__main__ import main as processing_cli

    root = tmp_path_factory.mktemp("real_formats")
    coco = {number: make_regions(f"COCO_train2014_{number:012d}", 3 + number % 3, REAL_FEATURE_DIM, seed=number)
            for number in range(1, 9)}
    flickr = {name: make_regions(name, 4, REAL_FEATURE_DIM, seed=20 + index)
              for index, name in enumerate(["1001", "1002", "1003", "1004"])}
    nlvr2 = {f"{split}-{pair}-0-img{side}": make_regions(f"{split}-{pair}-0-img{side}", 3, REAL_FEATURE_DIM,
                                                       seed=40 + 2 * pair + side)
             for split in ("train", "dev", "test1") for pair in range(3) for side in (0, 1)}
    tsv = root / "obj36.tsv"
    write_butd_tsv(tsv, [butd_fields(regions) for regions in [*coco.values(), *nlvr2.values()]])
    flickr_npz = root / "flickr30k_npz"
    flickr_npz.mkdir()
    for regions in flickr.values():
        write_npz(flickr_npz, regions)
    coco_format = "COCO_train2014_{image_id:012d}"

    def caption(regions) -> str:
        return f"a {regions['tags'][0]} next to a {regions['tags'][1]}"

    # VQA v2: questions + annotations (10 answers each); the test split has no annotations.
    answers = ["yes", "no", "2", "red"]
    questions = {"questions": [{"image_id": n, "question": f"is there a {coco[n]['tags'][0]}?", "question_id": 10 * n + k}
                               for n in coco for k in range(2)]}
    annotations = {"annotations": [
        {"question_id": q["question_id"], "image_id": q["image_id"], "question_type": "is there",
         "answer_type": "yes/no", "multiple_choice_answer": answers[q["question_id"] % 4],
         "answers": [{"answer": answers[(q["question_id"] + (i > 6)) % 4], "answer_confidence": "yes",
                      "answer_id": i + 1} for i in range(10)]}
        for q in questions["questions"]]}
    questions_file = _write_json(root / "v2_OpenEnded_mscoco_questions.json", questions)
    annotations_file = _write_json(root / "v2_mscoco_annotations.json", annotations)
    build_vqa(questions_file, tsv, root / "vqa", split="train", annotations=annotations_file,
              image_id_format=coco_format, progress=False)
    vocabulary = root / "vqa" / "answer_vocab.json"
    build_vqa(questions_file, tsv, root / "vqa", split="validation", annotations=annotations_file,
              answer_vocab=vocabulary, image_id_format=coco_format, progress=False)
    build_vqa(questions_file, tsv, root / "vqa", split="test", answer_vocab=vocabulary, image_id_format=coco_format,
              progress=False)

    # NLVR2: one jsonl per split; identifiers name the two images.
    for split, name in (("train", "train"), ("validation", "dev"), ("test", "test1")):
        records = [{"identifier": f"{name}-{pair}-0-{k}", "sentence": f"both images show a {nlvr2[f'{name}-{pair}-0-img0']['tags'][0]}",
                    "label": ["True", "False"][(pair + k) % 2]} for pair in range(3) for k in range(2)]
        build_nlvr2(_write_jsonl(root / f"nlvr2_{name}.json", records), tsv, root / "nlvr2", split=split,
                    progress=False)

    # SNLI-VE: Flickr30k image = premise, sentence2 = hypothesis.
    labels = ["entailment", "neutral", "contradiction"]
    for split in ("train", "validation", "test"):
        records = [{"Flikr30kID": f"{name}.jpg", "pairID": f"{name}.jpg#{k}{split[0]}", "sentence1": caption(regions),
                    "sentence2": f"there is a {regions['tags'][k % 2]}", "gold_label": labels[(index + k) % 3]}
                   for index, (name, regions) in enumerate(flickr.items()) for k in range(2)]
        annotations_file = _write_jsonl(root / f"snli_ve_{split}.jsonl", records)
        assert processing_cli(["build", "snli_ve", "--annotations", str(annotations_file), "--features",
                               str(flickr_npz), "--output", str(root / "snli_ve"), "--split", split]) == 0

    # RefCOCO+: refs (the refer toolkit's list, as JSON) + instances; the referred box is one of the regions.
    width, height = coco[1]["image_size"]
    refs, boxes = [], []
    for n, regions in coco.items():
        for k in range(2):
            x1, y1, x2, y2 = (float(value) for value in regions["boxes"][k])
            boxes.append({"id": 100 * n + k, "image_id": n, "bbox": [x1, y1, x2 - x1, y2 - y1]})
            refs.append({"ref_id": 100 * n + k, "ann_id": 100 * n + k, "image_id": n,
                         "split": ["train", "train", "train", "train", "val", "val", "testA", "testA"][n - 1],
                         "sentences": [{"sent": f"the {regions['tags'][k]}"}]})
    refs_file = _write_json(root / "refs.json", refs)
    instances = _write_json(root / "instances.json", {
        "images": [{"id": n, "width": width, "height": height} for n in coco], "annotations": boxes})
    for split, refs_split in (("train", "train"), ("validation", "val"), ("test", "testA")):
        build_refcoco(refs_file, instances, tsv, root / "refcoco", split=split, refs_split=refs_split,
                      image_id_format=coco_format, progress=False)

    # COCO captions (retrieval): two captions per image.
    captions = {"images": [{"id": n, "file_name": f"COCO_train2014_{n:012d}.jpg", "width": width, "height": height}
                           for n in coco],
                "annotations": [{"image_id": n, "id": 10 * n + k, "caption": caption(regions) + ["", " here"][k]}
                                for n, regions in coco.items() for k in range(2)]}
    build_captions(_write_json(root / "captions.json", captions), tsv, root / "captions", split="validation",
                   progress=False)
    return root


@pytest.fixture(scope="session")
def pretrained_folder(tmp_path_factory, bert_dir) -> Path:
    """A folder as examples/pretrain.py leaves it: CmalForPreTraining weights (random: the scripts' mechanics are
    under test here, not pre-training) and the processor."""
    from transformers import BertTokenizer

    from modeling_cmal import CmalConfig, CmalForPreTraining
    from modeling_cmal.processing_cmal import CmalProcessor

    folder = tmp_path_factory.mktemp("pretrained")
    processor = CmalProcessor(tokenizer=BertTokenizer.from_pretrained(str(bert_dir), model_max_length=32))
    config = CmalConfig.from_size("tiny", vocab_size=len(processor.tokenizer), visual_feat_dim=REAL_FEATURE_DIM,
                                  num_anchor_concepts=len(processor.lexicon))
    torch.manual_seed(0)
    CmalForPreTraining(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------------------------------------------
# In-process: metrics, collator, recall
# --------------------------------------------------------------------------------------------------------------


def test_recall_at_k_on_a_known_score_matrix():
    from evaluate_retrieval import retrieval_recalls

    # 3 images, 4 captions (image 0 has captions 0 and 1).
    scores = torch.tensor([[0.9, 0.1, 0.8, 0.0],
                           [0.2, 0.3, 0.7, 0.1],
                           [0.5, 0.6, 0.4, 0.2]])
    recalls = retrieval_recalls(scores, torch.tensor([0, 0, 1, 2]), ks=(1, 2))
    # image → text: image 0 ranks caption 0 first; image 1 ranks caption 2 first; image 2 ranks caption 3 last (4th)
    assert recalls["image_to_text_recall@1"] == pytest.approx(2 / 3)
    assert recalls["image_to_text_recall@2"] == pytest.approx(2 / 3)
    # text → image: caption 0 → image 0 first; caption 1 → image 0 third; caption 2 → image 0 (0.8) beats image 1
    # (0.7): second; caption 3 → image 2 first
    assert recalls["text_to_image_recall@1"] == pytest.approx(2 / 4)
    assert recalls["text_to_image_recall@2"] == pytest.approx(3 / 4)
    assert recalls["mean_recall"] == pytest.approx((2 / 3 + 2 / 3 + 2 / 4 + 3 / 4) / 4)


def _eval_prediction(predicted, confidence, targets):
    from transformers import EvalPrediction

    return EvalPrediction(predictions=np.stack([predicted, confidence], axis=1).astype(np.float32),
                          label_ids=np.asarray(targets, dtype=np.float32))


def test_vqa_accuracy_is_the_soft_score_of_the_predicted_answer():
    from cmal_examples.tasks import VqaTask

    task = VqaTask()
    task.num_answers = 4
    rows = [{"answer_ids": np.array([0, 2]), "answer_scores": np.array([1.0, 1 / 3])},
            {"answer_ids": np.array([], dtype=np.int64), "answer_scores": np.array([])},  # no answer in vocabulary
            {"answer_ids": np.array([3]), "answer_scores": np.array([2 / 3])}]
    labels = task.targets(rows, {})["labels"]
    torch.testing.assert_close(labels, torch.tensor([[1, 0, 1 / 3, 0], [0, 0, 0, 0], [0, 0, 0, 2 / 3]]))
    predicted = torch.tensor([2, 1, 3])
    targets = task.metric_targets(predicted, labels, {})
    torch.testing.assert_close(targets, torch.tensor([1 / 3, 0, 2 / 3]))
    metrics = task.compute_metrics(_eval_prediction(predicted.numpy(), np.ones(3), targets.numpy()))
    assert metrics == {"vqa_accuracy": pytest.approx(1 / 3)}


def test_refcoco_accuracy_counts_predicted_regions_at_iou_half():
    from cmal_examples.tasks import RefcocoTask

    task = RefcocoTask()
    task.max_regions = 3
    rows = [{"region_ious": np.array([0.2, 0.7, 0.5], np.float32), "scores": np.ones(3), "label": 1},
            {"region_ious": np.array([0.9, 0.1], np.float32), "scores": np.ones(2), "label": 0}]
    targets = task.targets(rows, {"visual_feats": torch.zeros(2, 3, 4)})
    torch.testing.assert_close(targets["labels"], torch.tensor([1, 0]))
    torch.testing.assert_close(targets["region_ious"], torch.tensor([[0.2, 0.7, 0.5], [0.9, 0.1, 0.0]]))
    ious = task.metric_targets(torch.tensor([2, 1]), targets["labels"], targets)  # IoU 0.5 counts, 0.1 does not
    torch.testing.assert_close(ious, torch.tensor([0.5, 0.1]))
    metrics = task.compute_metrics(_eval_prediction(np.array([2, 1]), np.ones(2), ious.numpy()))
    assert metrics == {"iou_accuracy": pytest.approx(0.5), "mean_iou": pytest.approx(0.3)}


def test_refcoco_targets_follow_the_regions_the_processor_keeps(pretrained_folder):
    from cmal_examples.finetuning import region_inputs
    from cmal_examples.tasks import RefcocoTask

    from modeling_cmal.processing_cmal import CmalProcessor

    processor = CmalProcessor.from_pretrained(pretrained_folder)
    processor.max_regions = 3
    task = RefcocoTask()
    task.setup(None, None, processor)
    boxes = np.array([[0.0, 0.0, 0.1 * (k + 1), 0.1 * (k + 1)] for k in range(5)], np.float32)
    row = {"text": "the dog", "visual_feats": np.eye(5, REAL_FEATURE_DIM, dtype=np.float16), "visual_pos": boxes,
           "tags": ["dog", "cat", "car", "dog", "tree"], "scores": np.array([0.9, 0.2, 0.8, 0.8, 0.1], np.float32),
           "region_ious": np.array([0.1, 0.9, 0.3, 0.6, 0.0], np.float32), "label": 1, "ref_id": "7",
           "image_width": 100, "image_height": 50}
    batch = processor(text=[row["text"]], regions=[region_inputs(row)], return_tensors="pt")
    np.testing.assert_array_equal(task.kept_regions(row), [0, 2, 3])
    torch.testing.assert_close(batch["visual_pos"][0], torch.as_tensor(boxes[[0, 2, 3]]))
    targets = task.targets([row], batch)
    torch.testing.assert_close(targets["region_ious"], torch.tensor([[0.1, 0.3, 0.6]]))
    assert targets["labels"].tolist() == [2]  # region 1 was dropped: the best kept one (region 3) is the target
    record = task.prediction_record(row, 2, 0.5, {})
    assert record["region"] == 3 and record["box"] == pytest.approx(boxes[3].tolist())
    assert record["box_pixels"] == pytest.approx([0, 0, 40, 20])


def test_nlvr2_collator_stacks_both_images_of_a_row(real_format_corpus, pretrained_folder):
    from cmal_examples.finetuning import CmalTaskCollator, region_inputs
    from cmal_examples.tasks import Nlvr2Task
    from cmal_processing.corpus import load_corpus

    from modeling_cmal.processing_cmal import CmalProcessor

    processor = CmalProcessor.from_pretrained(pretrained_folder)
    rows = load_corpus(real_format_corpus / "nlvr2")["train"]
    batch = CmalTaskCollator(processor, Nlvr2Task())([rows[index] for index in range(4)])
    batch_size, num_regions = 4, batch["visual_feats"].shape[2]
    assert batch["input_ids"].shape[0] == batch_size and batch["input_ids"].dim() == 2
    assert batch["visual_feats"].shape == (batch_size, 2, num_regions, REAL_FEATURE_DIM)
    assert batch["visual_pos"].shape == (batch_size, 2, num_regions, 4)
    assert batch["visual_attention_mask"].shape == (batch_size, 2, num_regions)
    assert batch["anchor_pairs"].shape[:2] == (batch_size, 2) and batch["anchor_pairs"].shape[-1] == 2
    torch.testing.assert_close(batch["labels"], torch.as_tensor([int(rows[index]["label"]) for index in range(4)]))
    for side in (0, 1):  # each image encoded alone gives the same inputs as its slice of the stacked batch
        alone = processor(text=[str(rows[0]["text"])], regions=[region_inputs(rows[0], f"_{side}")],
                          return_tensors="pt")
        count = int(alone["visual_attention_mask"].sum())
        torch.testing.assert_close(batch["visual_feats"][0, side, :count], alone["visual_feats"][0, :count])
        assert int(batch["visual_attention_mask"][0, side].sum()) == count



@pytest.mark.parametrize("flags, message", [
    (["--model_name_or_path", "huge"], "--model_name_or_path must be one of .* got 'huge'"),
    (["--dataset_path", "/nonexistent/snli_ve"], "--dataset_path '/nonexistent/snli_ve' is not a folder"),
    (["--max_train_samples", "0"], "--max_train_samples must be a positive number, got 0"),
    (["--max_regions", "-1"], "--max_regions must be a positive number, got -1"),
    (["--metric_for_best_model", "f1"], "--metric_for_best_model must be one of .* got 'f1'"),
    (["--tokenizer_name", "/nonexistent/tokenizer"], "--tokenizer_name '/nonexistent/tokenizer' is not"),
    (["--eval_split", "dev"], "--eval_split: --dataset_path .* has no split 'dev'"),
    (["--do_predict", "--predict_split", "testB"], "--predict_split: --dataset_path .* has no split 'testB'"),
])
def test_invalid_arguments_stop_the_run_naming_flag_and_value(flags, message, real_format_corpus, tmp_path):
    from cmal_examples.finetuning import run_finetuning
    from cmal_examples.tasks import SnliVeTask

    # (a flag given twice takes its later value)
    argv = ["--model_name_or_path", "tiny", "--dataset_path", str(real_format_corpus / "snli_ve"),
            "--output_dir", str(tmp_path), "--report_to", "none", "--do_train", "--do_eval"]
    with pytest.raises(SystemExit, match=message):
        run_finetuning(SnliVeTask(), [*argv, *flags])


@pytest.mark.parametrize("task_name", ["vqa", "nlvr2", "snli_ve", "refcoco"])
def test_a_corpus_of_another_task_is_refused_naming_the_corpus_and_its_builder(task_name, synthetic_corpus, tmp_path):
    """A pre-training corpus (or another task's) used to end in a raw `Column 'answer_ids' doesn't exist`."""
    from cmal_examples.finetuning import run_finetuning
    from cmal_examples.tasks import TASKS

    task = TASKS[task_name]()
    argv = ["--model_name_or_path", "tiny", "--dataset_path", str(synthetic_corpus / "pretrain"),
            "--output_dir", str(tmp_path), "--report_to", "none", "--do_train", "--do_eval"]
    with pytest.raises(SystemExit) as raised:
        run_finetuning(task, argv)
    message = str(raised.value)
    assert message.startswith(f"--dataset_path {str(synthetic_corpus / 'pretrain')!r}: the 'train' split has no column")
    assert f"needs a {task.corpus_name} corpus" in message and f"python -m cmal_processing build {task_name}" in message
    assert f"{task_name}/ folder of `python -m cmal_processing.synthetic" in message


def test_argument_defaults_json_file_and_no_evaluation(tmp_path):
    from cmal_examples.finetuning import parse_arguments
    from cmal_examples.tasks import RefcocoTask

    base = {"model_name_or_path": "tiny", "dataset_path": str(tmp_path), "output_dir": str(tmp_path / "out")}
    flags = [f"--{k}={v}" for k, v in base.items()]
    # each step only when asked for, as in transformers' examples; none at all is refused
    with pytest.raises(SystemExit, match="nothing to do: give --do_train, --do_eval and/or --do_predict"):
        parse_arguments(RefcocoTask(), flags)
    every_step = ["--do_train", "--do_eval", "--do_predict"]
    _, data_args, training_args = parse_arguments(RefcocoTask(), [*flags, *every_step])
    assert training_args.load_best_model_at_end and training_args.metric_for_best_model == "iou_accuracy"
    assert training_args.greater_is_better and training_args.eval_strategy == "epoch"
    assert training_args.do_train and training_args.do_eval and training_args.do_predict
    assert not training_args.remove_unused_columns and data_args.eval_split == "validation"
    # one JSON file instead of flags, as in the transformers examples
    arguments = _write_json(tmp_path / "args.json", {**base, "do_eval": True, "metric_for_best_model": "mean_iou",
                                                     "max_eval_samples": 5, "label_names": ["labels"],
                                                     "report_to": ["none"]})
    _, data_args, training_args = parse_arguments(RefcocoTask(), [str(arguments)])
    assert data_args.max_eval_samples == 5 and training_args.metric_for_best_model == "mean_iou"
    assert training_args.do_eval and not training_args.do_train
    # lists stay lists (a JSON file turned into argv used to make ["labels"] the string "['labels']")
    assert training_args.label_names == ["labels"] and "['none']" not in str(training_args.report_to)
    # the task's defaults hold for a JSON file as for flags
    _, _, training_args = parse_arguments(RefcocoTask(),
                                          [str(_write_json(tmp_path / "plain.json", {**base, "do_train": True}))])
    assert training_args.metric_for_best_model == "iou_accuracy" and training_args.do_train
    with pytest.raises(SystemExit, match="must hold one JSON object"):
        parse_arguments(RefcocoTask(), [str(_write_json(tmp_path / "list.json", [1, 2]))])
    # only the steps asked for (TrainingArguments alone would switch evaluation on with the eval strategy)
    _, _, training_args = parse_arguments(RefcocoTask(), [*flags, "--do_predict"])
    assert training_args.do_predict and not training_args.do_eval and not training_args.do_train
    assert training_args.eval_strategy == "no" and not training_args.load_best_model_at_end
    _, _, training_args = parse_arguments(RefcocoTask(), [*flags, "--do_train", "--do_eval=false"])
    assert training_args.do_train and not training_args.do_eval and not training_args.do_predict
    # no evaluation during training: no best checkpoint to select
    _, _, training_args = parse_arguments(RefcocoTask(), [*flags, *every_step, "--eval_strategy", "no"])
    assert not training_args.load_best_model_at_end


def test_documented_command_lines_parse():
    """Every `python examples/...py` command of docs/finetuning.md uses flags that exist (transformers renames
    TrainingArguments flags between versions: `--warmup_ratio` is gone in 5.x)."""
    import re
    import shlex

    from evaluate_retrieval import RetrievalArguments
    from cmal_examples.finetuning import DataArguments, FinetuningArguments, ModelArguments
    from transformers import HfArgumentParser

    text = (REPO_ROOT / "docs" / "finetuning.md").read_text(encoding="utf-8")
    commands = [" ".join(command.replace("\\\n", " ").split())
                for command in re.findall(r"^python (examples/\w+\.py .*?)(?:\n```|\n\n)", text, re.M | re.S)]
    scripts = [command.split()[0] for command in commands]
    assert {f"examples/{name}" for name in [*SCRIPTS.values(), "evaluate_retrieval.py"]} <= set(scripts), scripts
    for command in commands:
        script, *argv = shlex.split(command)
        argv = [flag for flag in argv if flag != "--bf16"]  # (needs a bf16 device to parse)
        if script.endswith("evaluate_retrieval.py"):
            HfArgumentParser(RetrievalArguments).parse_args_into_dataclasses(args=argv)
        else:
            HfArgumentParser((ModelArguments, DataArguments, FinetuningArguments)).parse_args_into_dataclasses(args=argv)


def test_retrieval_refuses_a_folder_without_a_trained_itm_head(real_format_corpus, pretrained_folder, tmp_path):
    from evaluate_retrieval import main

    from modeling_cmal import CmalConfig, CmalModel

    CmalModel(CmalConfig.from_pretrained(pretrained_folder)).save_pretrained(tmp_path / "trunk")
    with pytest.raises(SystemExit, match="--model_name_or_path .* has no trained ITM head"):
        main(["--model_name_or_path", str(tmp_path / "trunk"), "--dataset_path", str(real_format_corpus / "captions")])
    with pytest.raises(SystemExit, match="--split 'test' is not a split of --dataset_path"):
        main(["--model_name_or_path", str(pretrained_folder), "--dataset_path", str(real_format_corpus / "captions"),
              "--split", "test"])
    with pytest.raises(SystemExit, match="--max_images must be a positive number, got 0"):
        main(["--model_name_or_path", str(pretrained_folder), "--dataset_path", str(real_format_corpus / "captions"),
              "--max_images", "0"])


# --------------------------------------------------------------------------------------------------------------
# End to end on the real formats: every script from a pre-trained folder, a few steps
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def real_format_runs(real_format_corpus, pretrained_folder, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """Every fine-tuning script (2 steps) and the retrieval evaluation, run together as separate processes."""
    root = tmp_path_factory.mktemp("real_format_runs")
    commands = {
        task: _script(task, real_format_corpus / task, root / task, "--model_name_or_path", str(pretrained_folder),
                      "--max_steps", "2", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8",
                      "--learning_rate", "1e-3", "--eval_strategy", "steps", "--eval_steps", "1",
                      "--save_strategy", "steps", "--save_steps", "1", "--seed", "0")
        for task in SCRIPTS
    }
    retrieval = _retrieval_command(pretrained_folder, real_format_corpus / "captions", 6, 16, root / "retrieval")
    return root, _run_together({**commands, "retrieval": retrieval}, root)


@pytest.mark.smoke
@pytest.mark.slow
@pytest.mark.parametrize("task", list(SCRIPTS))
def test_script_runs_end_to_end_on_real_formats(task, real_format_runs, real_format_corpus):
    from cmal_processing.corpus import load_corpus

    root = _succeeded(real_format_runs, task)
    output = root / task
    metric = json.loads((output / "eval_results.json").read_text())[f"eval_{METRICS[task]}"]
    assert 0.0 <= metric <= 1.0
    state = json.loads((output / "trainer_state.json").read_text())
    assert state["best_metric"] is not None and state["global_step"] == 2
    # the folder: weights, config with the auto_map of every head, code files and the processor
    config = json.loads((output / "config.json").read_text())
    assert "AutoModelForVisualQuestionAnswering" in config["auto_map"] and "CmalForVisualReasoning" in config["auto_map"]
    assert (output / "model.safetensors").is_file() and (output / "modeling_cmal.py").is_file()
    assert (output / "processor_config.json").is_file() or (output / "preprocessor_config.json").is_file()
    # predictions: one line per row of the test split, in order
    test = load_corpus(real_format_corpus / task)["test"]
    records = [json.loads(line) for line in (output / "predictions.jsonl").read_text().splitlines()]
    assert [record[ID_COLUMNS[task]] for record in records] == [str(value) for value in test[ID_COLUMNS[task]]]
    if task == "vqa":
        answers = json.loads((real_format_corpus / "vqa" / "answer_vocab.json").read_text())
        assert config["id2label"] == {str(index): answer for index, answer in enumerate(answers)}
        assert all(record["answer"] in answers for record in records)
        # VQA test splits have no answers: predictions only, no test metric
        assert not (output / "predict_results.json").exists()
    else:
        assert f"predict_{METRICS[task]}" in json.loads((output / "predict_results.json").read_text())
    if task == "refcoco":
        for record, row in zip(records, test):
            np.testing.assert_allclose(record["box"], row["visual_pos"][record["region"]], rtol=1e-6)
            assert record["box_pixels"][2] == pytest.approx(record["box"][2] * row["image_width"], rel=1e-5)


@pytest.mark.slow
def test_a_finetuned_folder_keeps_its_head_only_for_the_same_labels(real_format_runs, real_format_corpus):
    from cmal_examples.finetuning import ModelArguments, load_processor_and_model
    from cmal_processing.corpus import load_corpus
    from cmal_examples.tasks import VqaTask
    from safetensors.torch import load_file

    root = _succeeded(real_format_runs, "vqa")
    dataset_path = real_format_corpus / "vqa"
    dataset = load_corpus(dataset_path)
    saved = load_file(str(root / "vqa" / "model.safetensors"))

    class OtherAnswers(VqaTask):  # another answer vocabulary of the same size
        def setup(self, *args):
            return [f"not {answer}" for answer in super().setup(*args)]

    class FewerAnswers(VqaTask):  # a vocabulary of another size: the head's tensors have other shapes
        def setup(self, *args):
            return super().setup(*args)[:-1]

    with pytest.raises(SystemExit, match="holds tensors of other shapes .* pass --ignore_mismatched_sizes"):
        load_processor_and_model(FewerAnswers(), ModelArguments(str(root / "vqa")), dataset, dataset_path)
    _, fewer = load_processor_and_model(FewerAnswers(), ModelArguments(str(root / "vqa"), ignore_mismatched_sizes=True),
                                        dataset, dataset_path)
    assert fewer.config.num_labels == len(saved["answer_head.out_proj.weight"]) - 1
    _, same = load_processor_and_model(VqaTask(), ModelArguments(str(root / "vqa")), dataset, dataset_path)
    _, other = load_processor_and_model(OtherAnswers(), ModelArguments(str(root / "vqa")), dataset, dataset_path)
    head = "answer_head.out_proj.weight"
    torch.testing.assert_close(same.state_dict()[head], saved[head])
    assert not torch.allclose(other.state_dict()[head], saved[head])
    assert other.config.id2label[0].startswith("not ")
    for name, value in other.cmal.state_dict().items():  # the trunk is kept
        torch.testing.assert_close(value, saved[f"cmal.{name}"])


@pytest.mark.slow
def test_zero_shot_retrieval_from_a_pretrained_folder(real_format_runs):
    root = _succeeded(real_format_runs, "retrieval")
    results = json.loads((root / "retrieval" / "retrieval_results.json").read_text())
    assert results["num_images"] == 6 and results["num_captions"] == 12
    for direction in ("image_to_text", "text_to_image"):
        recalls = [results[f"{direction}_recall@{k}"] for k in (1, 5, 10)]
        assert all(0.0 <= value <= 1.0 for value in recalls) and recalls == sorted(recalls)
    # with 6 images every caption's image is in its top 10; every image has a caption in the top 10 of 12
    assert results["text_to_image_recall@10"] == 1.0 and results["image_to_text_recall@10"] == 1.0


# --------------------------------------------------------------------------------------------------------------
# Synthetic tasks: each head learns from scratch, and its folder reproduces the metric with remote code only
# --------------------------------------------------------------------------------------------------------------

EVAL_BATCH_SIZE = 64
# Per task: the flags of a short run from scratch (`tiny`), and the margin over chance the metric must clear.
SYNTHETIC_RUNS = {
    # VQA at 5e-4: at 1e-3 and 2e-3 the tiny model answers every colour question alike (measured 0.16 / 0.19 on
    # "what color is the", 0.98 at 5e-4); test_vqa_head_answers_the_colour_question_type_well_above_its_chance.
    "vqa": (["--num_train_epochs", "8", "--learning_rate", "5e-4"], 0.15),
    "nlvr2": (["--num_train_epochs", "8", "--learning_rate", "2e-3"], 0.10),
    "snli_ve": (["--num_train_epochs", "8", "--learning_rate", "2e-3"], 0.15),
    "refcoco": (["--num_train_epochs", "8", "--learning_rate", "2e-3"], 0.15),
}


def chance_level(task: str, rows) -> float:
    """The best metric a model blind to the input reaches on `rows`: always the most frequent answer or class, or
    for RefCOCO+ the better of a uniformly random region and always the same region index."""
    if task == "vqa":
        totals: dict[int, float] = {}
        for answer_ids, scores in zip(rows["answer_ids"], rows["answer_scores"]):
            for answer, score in zip(answer_ids, scores):
                totals[answer] = totals.get(answer, 0.0) + score
        return max(totals.values()) / len(rows)
    if task == "refcoco":
        hits = [np.asarray(ious) >= 0.5 for ious in rows["region_ious"]]
        random_region = float(np.mean([hit.mean() for hit in hits]))
        same_index = max(np.mean([len(hit) > k and hit[k] for hit in hits]) for k in range(max(map(len, hits))))
        return max(random_region, float(same_index))
    return float(np.bincount(rows["label"]).max() / len(rows))


def image_blind_baseline(task: str, train, validation) -> float:
    """The metric of a model that reads the text but never the image, trained on `train`: logistic regression on
    the word 1- to 3-grams of the text (for VQA the better of that and the answer of highest total score per
    question type, the classic "per Q-type prior"). RefCOCO+ has none: regions are shuffled, so text alone cannot
    name a region index (its chance level already covers fixed indices)."""
    if task == "refcoco":
        return chance_level(task, validation)
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression

    if task == "vqa":
        def best_answer(ids, scores):
            return int(ids[int(np.argmax(scores))]) if len(ids) else -1
        targets = [best_answer(ids, scores) for ids, scores in zip(train["answer_ids"], train["answer_scores"])]
        per_type: dict[str, dict[int, float]] = {}
        for question_type, ids, scores in zip(train["question_type"], train["answer_ids"], train["answer_scores"]):
            for answer, score in zip(ids, scores):
                per_type.setdefault(question_type, {}).setdefault(answer, 0.0)
                per_type[question_type][answer] += score
        prior = {question_type: max(totals, key=totals.get) for question_type, totals in per_type.items()}
    else:
        targets = list(train["label"])
    texts = [text for text, target in zip(train["text"], targets) if target >= 0]
    vectorizer = CountVectorizer(ngram_range=(1, 3)).fit(texts)
    classifier = LogisticRegression(max_iter=5000, C=10.0).fit(vectorizer.transform(texts),
                                                                [target for target in targets if target >= 0])
    predicted = classifier.predict(vectorizer.transform(validation["text"]))
    if task != "vqa":
        return float(np.mean(predicted == np.asarray(validation["label"])))

    def vqa_score(predictions) -> float:
        return float(np.mean([dict(zip(ids, scores)).get(int(answer), 0.0) for answer, ids, scores in
                              zip(predictions, validation["answer_ids"], validation["answer_scores"])]))
    return max(vqa_score(predicted), vqa_score([prior.get(question_type, -1)
                                                for question_type in validation["question_type"]]))


@pytest.fixture(scope="session")
def synthetic_pretrained_folder(synthetic_corpus_info, tmp_path_factory, bert_dir) -> Path:
    """A (randomly initialised) pre-training folder for the synthetic region features, for the retrieval script."""
    from transformers import BertTokenizer

    from modeling_cmal import CmalConfig, CmalForPreTraining
    from modeling_cmal.processing_cmal import CmalProcessor

    folder = tmp_path_factory.mktemp("synthetic_pretrained")
    processor = CmalProcessor(tokenizer=BertTokenizer.from_pretrained(str(bert_dir), model_max_length=32))
    config = CmalConfig.from_size("tiny", vocab_size=len(processor.tokenizer),
                                  num_anchor_concepts=len(processor.lexicon),
                                  visual_feat_dim=synthetic_corpus_info["feature_dim"])
    torch.manual_seed(0)
    CmalForPreTraining(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def synthetic_runs(synthetic_corpus, synthetic_pretrained_folder, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """Each head fine-tuned from scratch (`tiny`) on its synthetic task, and the retrieval script on the synthetic
    caption corpus; the runs share the cores."""
    root = tmp_path_factory.mktemp("synthetic_runs")
    commands = {
        task: _script(task, synthetic_corpus / task, root / task, "--model_name_or_path", "tiny",
                      "--per_device_train_batch_size", "32", "--per_device_eval_batch_size", str(EVAL_BATCH_SIZE),
                      "--seed", "0", "--logging_steps", "20", *flags)
        for task, (flags, _) in SYNTHETIC_RUNS.items()
    }
    commands["retrieval"] = _retrieval_command(synthetic_pretrained_folder, synthetic_corpus / "pretrain", 12, 64,
                                               root / "retrieval")
    return root, _run_together(commands, root)  # the caption corpus' retrieval runs beside the four tasks


@pytest.mark.slow
@pytest.mark.parametrize("task", list(SYNTHETIC_RUNS))
def test_head_learns_synthetic_task_well_above_chance(task, synthetic_runs, synthetic_corpus):
    from datasets import load_from_disk

    root = _succeeded(synthetic_runs, task)
    validation = load_from_disk(str(synthetic_corpus / task))["validation"]
    chance = chance_level(task, validation)
    threshold = chance + SYNTHETIC_RUNS[task][1]
    metric = json.loads((root / task / "eval_results.json").read_text())[f"eval_{METRICS[task]}"]
    assert metric >= threshold, f"{task}: {METRICS[task]} {metric:.3f} < chance {chance:.3f} + margin = {threshold:.3f}"


# A head that answers a whole question type with one constant fails here, whatever its overall score. "What color
# is the <shape>?" needs the named object's region: with the heads' anchored-word summary (config.task_pooling)
# the tiny model learns it from scratch; with the [CLS]-queried summary it answered every colour question alike.
ATTRIBUTE_MARGIN = 0.30


@pytest.mark.slow
def test_vqa_head_answers_the_colour_question_type_well_above_its_chance(synthetic_runs, synthetic_corpus):
    from collections import Counter

    from datasets import load_from_disk

    root = _succeeded(synthetic_runs, "vqa")
    validation = load_from_disk(str(synthetic_corpus / "vqa"))["validation"].with_format(None)
    vocabulary = json.loads((synthetic_corpus / "vqa" / "answer_vocab.json").read_text())
    truth = {row["question_id"]: vocabulary[row["answer_ids"][int(np.argmax(row["answer_scores"]))]]
             for row in validation if row["question_type"] == "what color is the"}
    predicted = {row["question_id"]: row["answer"]
                 for row in map(json.loads, (root / "vqa" / "predictions.jsonl").read_text().splitlines())}
    assert len(truth) >= 20 and set(truth) <= set(predicted)
    accuracy = float(np.mean([predicted[question] == answer for question, answer in truth.items()]))
    chance = Counter(truth.values()).most_common(1)[0][1] / len(truth)
    answers = Counter(predicted[question] for question in truth)
    assert accuracy >= chance + ATTRIBUTE_MARGIN, (
        f"'what color is the': accuracy {accuracy:.3f} < chance {chance:.3f} + {ATTRIBUTE_MARGIN} over {len(truth)} "
        f"questions; answers given: {dict(answers)}")


# Every head must beat a text-only model by 0.10. Until the redesign of issue 14 three of them did not (strict
# expected failures: VQA learned the per-question-type prior, NLVR2 and SNLI-VE stayed near their text-only
# baselines of about 0.57 and 0.65); the heads now read an attention summary of every slot with [CLS] and each
# anchored word carries its region's state (fill text, the model's one anchor policy), and all four clear it.
@pytest.mark.slow
@pytest.mark.parametrize("task", list(SYNTHETIC_RUNS))
def test_head_beats_an_image_blind_baseline(task, synthetic_runs, synthetic_corpus):
    """Above chance is not yet grounding: the head must also beat a text-only model by a margin (0.10)."""
    pytest.importorskip("sklearn")
    from datasets import load_from_disk

    root = _succeeded(synthetic_runs, task)
    dataset = load_from_disk(str(synthetic_corpus / task))
    blind = image_blind_baseline(task, dataset["train"], dataset["validation"])
    metric = json.loads((root / task / "eval_results.json").read_text())[f"eval_{METRICS[task]}"]
    assert metric >= blind + 0.10, f"{task}: {METRICS[task]} {metric:.3f} < image-blind baseline {blind:.3f} + 0.10"


@pytest.mark.slow
def test_retrieval_runs_on_the_synthetic_caption_corpus(synthetic_runs):
    root = _succeeded(synthetic_runs, "retrieval")
    results = json.loads((root / "retrieval" / "retrieval_results.json").read_text())
    assert results["num_images"] == 12 and results["num_captions"] >= 12
    assert all(0.0 <= results[f"{direction}_recall@{k}"] <= 1.0
               for direction in ("image_to_text", "text_to_image") for k in (1, 5, 10))


REPRODUCE = textwrap.dedent("""
    import json, sys
    # CI installs the package in editable mode: hide it, as on a machine that only has transformers.
    sys.modules["modeling_cmal"] = None
    sys.modules["cmal_processing"] = sys.modules["cmal_examples"] = None
    import numpy as np, torch
    from datasets import load_from_disk
    from transformers import AutoModelForSequenceClassification, AutoModelForVisualQuestionAnswering, AutoProcessor
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    AUTO = {"vqa": AutoModelForVisualQuestionAnswering, "snli_ve": AutoModelForSequenceClassification}
    # Heads without a fitting transformers Auto class are reached through their own auto_map key.
    OWN_KEY = {"nlvr2": "CmalForVisualReasoning", "refcoco": "CmalForReferringExpression"}
    TEXT = ("input_ids", "attention_mask", "token_type_ids")

    def regions(row, suffix=""):  # the image table's binary arrays (schema.REGION_FIELDS), decoded with numpy alone
        count, width = int(row["num_regions" + suffix]), int(row["feature_dim" + suffix])
        return {"visual_feats": np.frombuffer(row["visual_feats" + suffix], "<f2").reshape(count, width),
                "visual_pos": np.frombuffer(row["visual_pos" + suffix], "<f4").reshape(count, 4),
                "tags": [str(tag) for tag in row["tags" + suffix]],
                "scores": np.asarray(row["scores" + suffix], np.float32)}

    def joined_rows(split_folder):  # a split's rows with each image's regions from its image table, datasets alone
        images = load_from_disk(split_folder + "/images").with_format(None)
        row_of = {str(image_id): row for row, image_id in enumerate(images.with_format(None)["image_id"])}
        for row in load_from_disk(split_folder).with_format("numpy"):
            for suffix in [name[len("image_id"):] for name in row if name.startswith("image_id")]:
                image = images[row_of[str(row["image_id" + suffix])]]
                row.update({name + suffix: value for name, value in image.items() if name != "image_id"})
            yield row

    def score(task, row, predicted):
        if task == "vqa":
            return dict(zip(row["answer_ids"].tolist(), row["answer_scores"].tolist())).get(predicted, 0.0)
        if task == "refcoco":
            return float(row["region_ious"][predicted] >= 0.5)
        return float(predicted == int(row["label"]))

    for task, folder, dataset, batch_size in json.loads(sys.argv[1]):
        if task in OWN_KEY:
            model = get_class_from_dynamic_module(f"modeling_cmal.{OWN_KEY[task]}", folder).from_pretrained(folder)
        else:
            model = AUTO[task].from_pretrained(folder, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        rows = list(joined_rows(dataset + "/validation"))
        scores = []
        for start in range(0, len(rows), batch_size):
            batch = [rows[index] for index in range(start, min(start + batch_size, len(rows)))]
            if task == "nlvr2":  # the sentence with each image, then an image axis [B, 2, ...]
                inputs = processor(text=[str(row["text"]) for row in batch for _ in range(2)],
                                   regions=[regions(row, side) for row in batch for side in ("_0", "_1")],
                                   return_tensors="pt")
                inputs = {key: value[::2] if key in TEXT else value.view(len(batch), 2, *value.shape[1:])
                          for key, value in inputs.items()}
            else:
                inputs = processor(text=[str(row["text"]) for row in batch], regions=[regions(row) for row in batch],
                                   return_tensors="pt")
            with torch.no_grad():
                predicted = model.eval()(**inputs).logits.argmax(-1).tolist()
            scores += [score(task, row, index) for row, index in zip(batch, predicted)]
        print(json.dumps({"task": task, "metric": float(np.mean(scores))}))
""")


@pytest.mark.slow
def test_finetuned_folders_reload_with_remote_code_and_reproduce_the_metric(synthetic_runs, synthetic_corpus,
                                                                             tmp_path):
    root, failures = synthetic_runs
    assert not failures, failures
    runs = [(task, str(root / task), str(synthetic_corpus / task), EVAL_BATCH_SIZE) for task in SYNTHETIC_RUNS]
    env = {key: value for key, value in _env().items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", REPRODUCE, json.dumps(runs)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    measured = {row["task"]: row["metric"] for row in
                (json.loads(line) for line in result.stdout.splitlines() if line.startswith('{"task"'))}
    for task in SYNTHETIC_RUNS:
        expected = json.loads((root / task / "eval_results.json").read_text())[f"eval_{METRICS[task]}"]
        assert measured[task] == pytest.approx(expected, abs=1e-6), task


def test_the_trainer_decays_what_pre_training_decays():
    """Fine-tuning's weight decay leaves out what pre-training's `parameter_groups` leaves out: biases, LayerNorm
    weights, the hypersphere scales and the mask embeddings (Trainer's own rule would decay the last two)."""
    from cmal_examples.finetuning import CmalTrainer
    from cmal_examples.models import parameter_groups

    from modeling_cmal import CmalConfig, CmalForQuestionAnswering

    model = CmalForQuestionAnswering(CmalConfig(vocab_size=40, hidden_size=16, num_attention_heads=2,
                                                intermediate_size=32, visual_feat_dim=6, num_anchor_concepts=5,
                                                num_labels=3))
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    decayed = set(CmalTrainer.get_decay_parameter_names(None, model))
    assert decayed == {names[id(parameter)] for parameter in parameter_groups(model, 0.01)[0]["params"]}
    exempt = set(names.values()) - decayed
    assert "cmal.visual_embeddings.mask_embedding" in exempt
    assert any(name.endswith("hypersphere.scale") for name in exempt)
