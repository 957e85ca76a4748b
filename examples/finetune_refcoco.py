"""Fine-tune CMAL on RefCOCO+ (or the synthetic referring-expression task) with `transformers.Trainer`.

    python examples/finetune_refcoco.py --model_name_or_path runs/cmal --dataset_path DATA/refcoco \
        --output_dir runs/cmal-refcoco --num_train_epochs 10 --per_device_train_batch_size 64 --learning_rate 5e-5 \
        --do_train --do_eval --do_predict

`--dataset_path` is a folder written by `cmal_processing` (RefCOCO+ builder or `python -m cmal_processing.synthetic`):
an expression per row, the image's regions, `region_ious` (IoU of every region with the referred box) and `label`
(the region of highest IoU). The head scores every region and is trained with cross-entropy towards `label`; the
metric (`iou_accuracy`) counts a prediction correct when the chosen region's IoU with the referred box is ≥ 0.5.
`predictions.jsonl` holds `{"ref_id", "region", "box", "box_pixels", "score"}`: the chosen region (its index in
the row's regions), its box normalised to [0, 1] and in pixels.

The task (columns, labels, metric, prediction records) is `cmal_examples.tasks.RefcocoTask`.
"""

from __future__ import annotations

from cmal_examples.finetuning import run_finetuning
from cmal_examples.tasks import RefcocoTask

if __name__ == "__main__":
    run_finetuning(RefcocoTask())
