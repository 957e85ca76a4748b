"""Fine-tune CMAL on VQA v2 (or the synthetic VQA task) with `transformers.Trainer`.

    python examples/finetune_vqa.py --model_name_or_path runs/cmal --dataset_path DATA/vqa --output_dir runs/cmal-vqa \
        --num_train_epochs 10 --per_device_train_batch_size 64 --learning_rate 5e-5

`--dataset_path` is a folder written by `processing` (VQA v2 builder or `python -m processing.synthetic`): a
DatasetDict with `train` / `validation` (/ `test`) splits and `answer_vocab.json` beside them. The head scores every
answer of the vocabulary with binary cross-entropy against the soft scores `min(#humans / 3, 1)`; the metric
(`vqa_accuracy`) is the official one: the mean over questions of the soft score of the predicted answer.
`predictions.jsonl` holds one `{"question_id", "answer", "score"}` per question.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from transformers import EvalPrediction

from cmal_examples.finetuning import FinetuneTask, run_finetuning
from modeling_cmal import CmalForQuestionAnswering
from cmal_processing.schema import ANSWER_VOCAB_FILE


class VqaTask(FinetuneTask):
    model_class = CmalForQuestionAnswering
    metric_name = "vqa_accuracy"
    metric_names = ("vqa_accuracy",)
    id_column = "question_id"
    task_columns = ("text", "answer_ids", "answer_scores")
    corpus_name = "VQA"
    build_command = "python -m processing build vqa --questions FILE ..."
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


if __name__ == "__main__":
    run_finetuning(VqaTask())
