"""Zero-shot image-text retrieval with CMAL's image-text matching (ITM) head: recall@1/5/10 in both directions.

    python examples/evaluate_retrieval.py --model_name_or_path runs/cmal --dataset_path DATA/pretrain \
        --split validation --max_images 100 --output_dir runs/cmal-retrieval

`--model_name_or_path` is a CMAL folder whose weights include `itm_head` (pre-trained by `examples/pretrain.py`,
or an image-text matching fine-tune); it loads as `CmalForImageTextMatching`. `--dataset_path` is a caption corpus
written by `cmal_processing` (one row per image and caption: region columns + `text`, e.g. `DATA/pretrain`). The first
`--max_images` images of the split and all their captions are scored against each other, every pair through the
cross-modal encoder (anchors computed for that pair), with the ITM margin `logits[:, 1] - logits[:, 0]`. Image →
text counts an image as found at k when one of its captions ranks in the top k; text → image when its image does.
Cost grows with images × captions, so keep the split small (the usual 1k-image test sets take a GPU).
The results are printed and written to `OUTPUT_DIR/retrieval_results.json`.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from cmal_examples.finetuning import region_inputs
from cmal_processing.corpus import corpus_features, load_corpus
from tqdm.auto import tqdm
from transformers import HfArgumentParser

from modeling_cmal import CmalForImageTextMatching
from modeling_cmal.processing_cmal import CmalProcessor

RECALL_AT = (1, 5, 10)


@dataclass
class RetrievalArguments:
    model_name_or_path: str = field(metadata={"help": "A CMAL folder with an ITM head (pre-trained or fine-tuned)."})
    dataset_path: str = field(metadata={"help": "A caption corpus written by processing (e.g. DATA/pretrain)."})
    output_dir: str | None = field(default=None, metadata={"help": "Where retrieval_results.json goes."})
    split: str = field(default="validation")
    max_images: int = field(default=100, metadata={"help": "Rank the first N images of the split and their captions."})
    batch_size: int = field(default=128, metadata={"help": "Image-caption pairs per forward pass."})
    device: str = field(default="cuda" if torch.cuda.is_available() else "cpu")

    def __post_init__(self):
        """Each error names its flag and value."""
        for flag, value in (("--max_images", self.max_images), ("--batch_size", self.batch_size)):
            if value < 1:
                raise ValueError(f"{flag} must be a positive number, got {value}")

    def check_paths(self) -> None:
        """The folders named exist (checked when a run starts, not when the flags are parsed)."""
        if not Path(self.model_name_or_path, "config.json").is_file():
            raise ValueError(f"--model_name_or_path {self.model_name_or_path!r} is not a CMAL folder (no config.json)")
        if not Path(self.dataset_path).is_dir():
            raise ValueError(f"--dataset_path {self.dataset_path!r} is not a folder; expected a caption corpus written "
                             "by `python -m cmal_processing build captions ...`")


def retrieval_recalls(scores: torch.Tensor, caption_image: torch.Tensor, ks=RECALL_AT) -> dict[str, float]:
    """Recall@k from a score matrix `[num_images, num_captions]` (higher = better match) and the index of each
    caption's image `[num_captions]`. Image → text: the best-ranked of an image's captions; text → image: the rank
    of the caption's image."""
    num_images, num_captions = scores.shape
    caption_rank = torch.empty_like(scores, dtype=torch.long)  # rank of each caption in each image's list
    caption_rank.scatter_(1, scores.argsort(dim=1, descending=True),
                          torch.arange(num_captions).expand(num_images, -1).contiguous())
    own_caption = caption_image[None, :] == torch.arange(num_images)[:, None]
    image_to_text = caption_rank.masked_fill(~own_caption, num_captions).min(dim=1).values
    image_rank = torch.empty_like(scores, dtype=torch.long)  # rank of each image in each caption's list
    image_rank.scatter_(0, scores.argsort(dim=0, descending=True),
                        torch.arange(num_images)[:, None].expand(-1, num_captions).contiguous())
    text_to_image = image_rank[caption_image, torch.arange(num_captions)]
    recalls = {}
    for k in ks:
        recalls[f"image_to_text_recall@{k}"] = (image_to_text < k).float().mean().item()
    for k in ks:
        recalls[f"text_to_image_recall@{k}"] = (text_to_image < k).float().mean().item()
    recalls["mean_recall"] = sum(recalls.values()) / len(recalls)
    return recalls


@torch.no_grad()
def itm_scores(model, processor, regions: list[dict], captions: list[str], batch_size: int, device: str) -> torch.Tensor:
    """ITM margin of every (image, caption) pair, `[len(regions), len(captions)]`."""
    pairs = list(itertools.product(range(len(regions)), range(len(captions))))
    scores = torch.empty(len(regions), len(captions))
    for start in tqdm(range(0, len(pairs), batch_size), desc="image-text pairs", unit="batch"):
        images, texts = zip(*pairs[start:start + batch_size])
        inputs = processor(text=[captions[t] for t in texts], regions=[regions[i] for i in images], return_tensors="pt")
        logits = model(**{key: value.to(device) for key, value in inputs.items()}).logits.float()
        scores[list(images), list(texts)] = (logits[:, 1] - logits[:, 0]).cpu()
    return scores


def load_images_and_captions(args: RetrievalArguments) -> tuple[list[dict], list[str], list[int]]:
    """The regions of the first `--max_images` images of the split, all their captions, and each caption's image."""
    try:
        dataset = load_corpus(args.dataset_path)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"--dataset_path: {error}") from None
    if args.split not in dataset:
        raise SystemExit(f"--split {args.split!r} is not a split of --dataset_path {args.dataset_path!r} "
                         f"(its splits: {', '.join(dataset)})")
    rows = dataset[args.split]
    missing = {"image_id", "text", "visual_feats", "visual_pos", "tags", "scores"} - set(corpus_features(rows))
    if missing:
        raise SystemExit(f"--dataset_path {args.dataset_path!r} is not a caption corpus: its {args.split!r} split "
                         f"lacks the columns {sorted(missing)}")
    image_index, regions, captions, caption_image = {}, [], [], []
    for row in rows:
        image_id = str(row["image_id"])
        if image_id not in image_index:
            if len(image_index) == args.max_images:
                continue
            image_index[image_id] = len(regions)
            regions.append(region_inputs(row))
        captions.append(str(row["text"]))
        caption_image.append(image_index[image_id])
    if not regions:
        raise SystemExit(f"--split {args.split!r} of --dataset_path {args.dataset_path!r} is empty")
    return regions, captions, caption_image


def load_model(args: RetrievalArguments, visual_feat_dim: int):
    """`CmalForImageTextMatching` with its trained `itm_head` (a folder without one would rank at random)."""
    model, info = CmalForImageTextMatching.from_pretrained(args.model_name_or_path, output_loading_info=True)
    untrained = (model.config.architectures == ["CmalForPreTraining"] and model.config.itm_loss_weight == 0)
    if untrained or {"itm_head.weight", "itm_head.bias"} & set(info["missing_keys"]):
        raise SystemExit(f"--model_name_or_path {args.model_name_or_path!r} has no trained ITM head (itm_head): "
                         "zero-shot retrieval needs a folder pre-trained with ITM (examples/pretrain.py with "
                         "itm_loss_weight > 0) or fine-tuned for image-text matching")
    if model.config.visual_feat_dim != visual_feat_dim:
        raise SystemExit(f"--model_name_or_path {args.model_name_or_path!r} expects region features of dimension "
                         f"{model.config.visual_feat_dim} but --dataset_path {args.dataset_path!r} has "
                         f"{visual_feat_dim}")
    return model.eval().to(args.device)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Parse, load the images and captions and the model, score every pair, write the recalls."""
    try:
        (args,) = HfArgumentParser(RetrievalArguments).parse_args_into_dataclasses(args=argv)
        args.check_paths()
    except ValueError as error:
        raise SystemExit(str(error)) from None
    regions, captions, caption_image = load_images_and_captions(args)
    model = load_model(args, regions[0]["visual_feats"].shape[-1])
    processor = CmalProcessor.from_pretrained(args.model_name_or_path)
    print(f"Scoring {len(regions)} images x {len(captions)} captions with the ITM head of {args.model_name_or_path}")
    scores = itm_scores(model, processor, regions, captions, args.batch_size, args.device)
    results = {**retrieval_recalls(scores, torch.tensor(caption_image)), "num_images": len(regions),
               "num_captions": len(captions)}
    print(json.dumps(results, indent=2))
    if args.output_dir:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(args.output_dir) / "retrieval_results.json").write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
