"""Fine-tune CMAL on NLVR2 (or the synthetic two-image reasoning task) with `transformers.Trainer`.

    python examples/finetune_nlvr2.py --model_name_or_path runs/cmal --dataset_path DATA/nlvr2 \
        --output_dir runs/cmal-nlvr2 --num_train_epochs 10 --per_device_train_batch_size 32 --learning_rate 5e-5 \
        --do_train --do_eval --do_predict

`--dataset_path` is a folder written by `cmal_processing` (NLVR2 builder or `python -m cmal_processing.synthetic`): one
sentence and two images per row (region columns with the suffixes `_0` and `_1`), `label` False / True. The
sentence is encoded with each image; the two pooled outputs are classified together. The metric is accuracy
(test-P when the `test` split is the public test set); `predictions.jsonl` holds one `{"identifier", "label",
"score"}` per example. The saved folder loads without this package through
`get_class_from_dynamic_module("modeling_cmal.CmalForVisualReasoning", folder)` (no Auto class fits two images).

The task (columns, labels, metric, prediction records) is `cmal_examples.tasks.Nlvr2Task`.
"""

from __future__ import annotations

from cmal_examples.finetuning import run_finetuning
from cmal_examples.tasks import Nlvr2Task

if __name__ == "__main__":
    run_finetuning(Nlvr2Task())
