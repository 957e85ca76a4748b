"""Fine-tune CMAL on SNLI-VE (or the synthetic entailment task) with `transformers.Trainer`.

    python examples/finetune_snli_ve.py --model_name_or_path runs/cmal --dataset_path DATA/snli_ve \
        --output_dir runs/cmal-snli-ve --num_train_epochs 2 --per_device_train_batch_size 64 --learning_rate 5e-5 \
        --do_train --do_eval --do_predict

`--dataset_path` is a folder written by `cmal_processing` (SNLI-VE builder or `python -m cmal_processing.synthetic`):
the image is the premise, the `text` column the hypothesis, `label` one of entailment / neutral / contradiction.
The metric is accuracy; `predictions.jsonl` holds one `{"pair_id", "label", "score"}` per pair.

The task (columns, labels, metric, prediction records) is `cmal_examples.tasks.SnliVeTask`.
"""

from __future__ import annotations

from cmal_examples.finetuning import run_finetuning
from cmal_examples.tasks import SnliVeTask

if __name__ == "__main__":
    run_finetuning(SnliVeTask())
