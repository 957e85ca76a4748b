"""Fine-tune CMAL on RefCOCO+ (or the synthetic referring-expression task) with `transformers.Trainer`.

    python examples/finetune_refcoco.py --model_name_or_path runs/cmal --dataset_path DATA/refcoco \
        --output_dir runs/cmal-refcoco --num_train_epochs 10 --per_device_train_batch_size 64 --learning_rate 5e-5

`--dataset_path` is a folder written by `processing` (RefCOCO+ builder or `python -m processing.synthetic`): an
expression per row, the image's regions, `region_ious` (IoU of every region with the referred box) and `label`
(the region of highest IoU). The head scores every region and is trained with cross-entropy towards `label`; the
metric (`iou_accuracy`) counts a prediction correct when the chosen region's IoU with the referred box is ≥ 0.5.
`predictions.jsonl` holds `{"ref_id", "region", "box", "box_pixels", "score"}`: the chosen region (its index in
the row's regions), its box normalised to [0, 1] and in pixels.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import EvalPrediction

from cmal_examples.finetuning import FinetuneTask, run_finetuning
from modeling_cmal import CmalForReferringExpression, select_top_regions

IOU_THRESHOLD = 0.5


class RefcocoTask(FinetuneTask):
    model_class = CmalForReferringExpression
    metric_name = "iou_accuracy"
    metric_names = ("iou_accuracy", "mean_iou")
    id_column = "ref_id"
    task_columns = ("text", "label", "region_ious", "image_width", "image_height")
    corpus_name = "RefCOCO+"
    build_command = "python -m processing build refcoco --refs FILE ..."
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


if __name__ == "__main__":
    run_finetuning(RefcocoTask())
