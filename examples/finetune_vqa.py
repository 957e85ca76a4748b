"""Fine-tune CMAL on VQA v2 (or the synthetic VQA task) with `transformers.Trainer`.

    python examples/finetune_vqa.py --model_name_or_path runs/cmal --dataset_path DATA/vqa --output_dir runs/cmal-vqa \
        --num_train_epochs 10 --per_device_train_batch_size 64 --learning_rate 5e-5 --do_train --do_eval --do_predict

`--dataset_path` is a folder written by `cmal_processing` (VQA v2 builder or `python -m cmal_processing.synthetic`): a
DatasetDict with `train` / `validation` (/ `test`) splits and `answer_vocab.json` beside them. The head scores every
answer of the vocabulary with binary cross-entropy against the soft scores `min(#humans / 3, 1)`; the metric
(`vqa_accuracy`) is the official one: the mean over questions of the soft score of the predicted answer.
`predictions.jsonl` holds one `{"question_id", "answer", "score"}` per question.

The task (columns, labels, metric, prediction records) is `cmal_examples.tasks.VqaTask`.
"""

from __future__ import annotations

from cmal_examples.finetuning import run_finetuning
from cmal_examples.tasks import VqaTask

if __name__ == "__main__":
    run_finetuning(VqaTask())
