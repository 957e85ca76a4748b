"""The four downstream tasks of the fine-tuning programs, as `FinetuneTask`s: head, columns, labels, metric and
prediction records. `finetune_<task>.py` runs one of them through `run_finetuning`; the ablation study
(`examples/ablation.py`) fine-tunes all four; `vqa_question_types` scores VQA predictions per question type.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch
from cmal_processing.corpus import load_corpus
from cmal_processing.schema import ANSWER_VOCAB_FILE
from transformers import EvalPrediction

from modeling_cmal import (CmalForQuestionAnswering, CmalForReferringExpression, CmalForVisualEntailment,
                           CmalForVisualReasoning, select_top_regions)

from .finetuning import PREDICTIONS_FILE, FinetuneTask

IOU_THRESHOLD = 0.5


class VqaTask(FinetuneTask):
    """VQA v2: soft-score BCE over the answer vocabulary saved beside the dataset; metric the official VQA accuracy."""

    model_class = CmalForQuestionAnswering
    metric_name = "vqa_accuracy"
    metric_names = ("vqa_accuracy",)
    id_column = "question_id"
    task_columns = ("text", "answer_ids", "answer_scores")
    corpus_name = "VQA"
    build_command = "python -m cmal_processing build vqa --questions FILE ..."
    synthetic_folder = "vqa"

    num_answers: int

    def setup(self, dataset, dataset_path: Path, processor) -> list[str]:
        """The answer vocabulary saved beside the dataset (`answer_ids` index it)."""
        vocabulary = dataset_path / ANSWER_VOCAB_FILE
        if not vocabulary.is_file():
            raise SystemExit(f"--dataset_path {str(dataset_path)!r} has no {ANSWER_VOCAB_FILE}: VQA needs the answer "
                             "vocabulary that the VQA builder writes beside the splits")
        answers = json.loads(vocabulary.read_text())
        self.num_answers = len(answers)
        return answers

    def labelled(self, rows):
        """A question whose answers all fall outside the vocabulary still counts (it scores 0 whatever is
        predicted); a split where no question has answers is a test split without annotations."""
        has_answers = any(len(answer_ids) for answer_ids in rows.with_format(None)["answer_ids"])
        return np.full(len(rows), has_answers)

    def targets(self, rows, batch):
        """Soft scores `[B, num_answers]`."""
        labels = torch.zeros(len(rows), self.num_answers)
        for index, row in enumerate(rows):
            answer_ids = torch.as_tensor(row["answer_ids"], dtype=torch.long)
            if answer_ids.numel() and int(answer_ids.max()) >= self.num_answers:
                raise ValueError(f"question {row.get('question_id')}: answer id {int(answer_ids.max())} is outside the "
                                 f"{self.num_answers} answers of {ANSWER_VOCAB_FILE}; the vocabulary beside the "
                                 "dataset is not the one its answer_ids index")
            labels[index, answer_ids] = torch.as_tensor(row["answer_scores"], dtype=torch.float)
        return {"labels": labels}

    def probabilities(self, logits):
        return logits.float().sigmoid()

    def metric_targets(self, predicted, labels, metric_inputs):
        """The soft score of the predicted answer: VQA accuracy of each question."""
        return labels.gather(1, predicted[:, None]).squeeze(1)

    def compute_metrics(self, prediction: EvalPrediction) -> dict[str, float]:
        return {self.metric_name: float(np.mean(prediction.label_ids))}

    def prediction_record(self, row, predicted, confidence, id2label):
        return {"question_id": str(row["question_id"]), "answer": id2label[predicted], "score": confidence}


class Nlvr2Task(FinetuneTask):
    """NLVR2: one sentence, two images (region columns `_0` / `_1`), `label` False / True; metric accuracy."""

    model_class = CmalForVisualReasoning
    id_column = "identifier"
    corpus_name = "NLVR2"
    build_command = "python -m cmal_processing build nlvr2 --annotations FILE ..."
    synthetic_folder = "nlvr2"
    image_suffixes = ("_0", "_1")


class SnliVeTask(FinetuneTask):
    """SNLI-VE: the image is the premise, `text` the hypothesis, three labels; metric accuracy."""

    model_class = CmalForVisualEntailment
    id_column = "pair_id"
    corpus_name = "SNLI-VE"
    build_command = "python -m cmal_processing build snli_ve --annotations FILE ..."
    synthetic_folder = "snli_ve"


class RefcocoTask(FinetuneTask):
    """RefCOCO+: a score per region, cross-entropy towards `label`; correct when the chosen region has IoU >= 0.5."""

    model_class = CmalForReferringExpression
    metric_name = "iou_accuracy"
    metric_names = ("iou_accuracy", "mean_iou")
    id_column = "ref_id"
    task_columns = ("text", "label", "region_ious", "image_width", "image_height")
    corpus_name = "RefCOCO+"
    build_command = "python -m cmal_processing build refcoco --refs FILE ..."
    synthetic_folder = "refcoco"
    metric_inputs = ("region_ious",)
    max_regions: int

    def setup(self, dataset, dataset_path, processor):
        self.max_regions = processor.max_regions
        return None

    def kept_regions(self, row) -> np.ndarray:
        """Indices of the row's regions that the model sees, in order: the processor's own selection."""
        return select_top_regions(row["scores"], self.max_regions)

    def targets(self, rows, batch):
        """`labels` (the referred region among the kept ones) and their `region_ious` `[B, M]`."""
        region_ious = torch.zeros(len(rows), batch["visual_feats"].shape[1])
        labels = torch.zeros(len(rows), dtype=torch.long)
        for index, row in enumerate(rows):
            kept = self.kept_regions(row)
            region_ious[index, : len(kept)] = torch.as_tensor(np.asarray(row["region_ious"], np.float32)[kept])
            # Where the processor dropped the labelled region, the best of those kept is the target.
            position = np.flatnonzero(kept == int(row["label"]))
            labels[index] = int(position[0]) if len(position) else int(region_ious[index, : len(kept)].argmax())
        return {"labels": labels, "region_ious": region_ious}

    def metric_targets(self, predicted, labels, metric_inputs):
        """The IoU of the predicted region with the referred box."""
        return metric_inputs["region_ious"].gather(1, predicted[:, None]).squeeze(1)

    def compute_metrics(self, prediction: EvalPrediction) -> dict[str, float]:
        ious = prediction.label_ids
        return {self.metric_name: float(np.mean(ious >= IOU_THRESHOLD)), "mean_iou": float(np.mean(ious))}

    def prediction_record(self, row, predicted, confidence, id2label):
        region = int(self.kept_regions(row)[predicted])
        box = [float(value) for value in np.asarray(row["visual_pos"])[region]]
        scale = [int(row["image_width"]), int(row["image_height"])] * 2
        return {"ref_id": str(row["ref_id"]), "region": region, "box": box,
                "box_pixels": [value * size for value, size in zip(box, scale)], "score": confidence}


TASKS = {"vqa": VqaTask, "nlvr2": Nlvr2Task, "snli_ve": SnliVeTask, "refcoco": RefcocoTask}


def vqa_question_types(dataset: Path, runs: dict[str, Path],
                       max_samples: int | None = None) -> dict[str, dict[str, float]]:
    """Per question type of a VQA dataset's validation split (its `question_type` column, as the synthetic world
    writes it: "what shape is the", ...): the accuracy of each run's predicted answers (`runs`: name → the output
    folder of a VQA fine-tuning run with `--do_predict` on that split, holding `predictions.jsonl`), chance (always
    the type's most frequent answer) and the number of questions. `max_samples`: only the split's first rows, as
    the fine-tuning scripts' `--max_eval_samples` / `--max_predict_samples` select them."""
    rows = load_corpus(dataset)["validation"].with_format(None)
    if max_samples is not None:
        rows = rows.select(range(min(max_samples, len(rows))))
    vocabulary = json.loads((Path(dataset) / ANSWER_VOCAB_FILE).read_text())
    truth, kinds = {}, defaultdict(list)
    for row in rows:
        best = max(range(len(row["answer_ids"])), key=lambda index: row["answer_scores"][index])
        truth[row["question_id"]] = vocabulary[row["answer_ids"][best]]
        kinds[row["question_type"]].append(row["question_id"])
    predicted = {name: {record["question_id"]: record["answer"]
                        for record in map(json.loads, (Path(run) / PREDICTIONS_FILE).read_text().splitlines())}
                 for name, run in runs.items()}
    table = {}
    for kind, questions in sorted(kinds.items()):
        table[kind] = {name: sum(answers[question] == truth[question] for question in questions) / len(questions)
                       for name, answers in predicted.items()}
        table[kind]["chance"] = Counter(truth[question] for question in questions).most_common(1)[0][1] / len(questions)
        table[kind]["questions"] = len(questions)
    return table
