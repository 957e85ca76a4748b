"""Attention between anchor words and image regions, drawn over the image (the paper's attention figure).

    python examples/visualize_attention.py --model_name_or_path outputs/quickstart/pretrained --output attention.png
    python examples/visualize_attention.py --model_name_or_path DIR --output coffee.png --image coffee
    python examples/visualize_attention.py --model_name_or_path DIR --output mine.png --image photo.jpg \
        --detector DETECTOR_DIR --caption "a dog on a couch"
    python examples/visualize_attention.py args.json      (one JSON file of the flags, their names as keys)

The model runs with eager attention and `output_attentions=True`; for every anchor word of the caption (a word the
processor paired with a region naming the same concept) the unified encoder's attention from the word's pieces to
the region slots is averaged over the pieces and the heads of one layer (`--layer`, default the last) and
normalised over the regions. Each panel draws the image with every region's box, line width and opacity growing
with the share of the word's attention that the region receives; the anchor's own region is labelled.

Images: `--image synthetic` (default) renders a scene of the synthetic world (`cmal_processing.synthetic`) with exact
boxes and tags; `--image coffee` uses scikit-image's public-domain photo `skimage.data.coffee()` with the
hand-written caption, boxes and tags of `examples/data/real_image_seeds.json`. Region features come from the
pixels inside each box (`cmal_processing.synthetic.region_features_from_pixels`), the detector-free featuriser the
synthetic world uses, so the model must have been trained on such features (`visual_feat_dim` must match).
`--image PATH` takes any image file Pillow reads: its regions (boxes, tags, features) come from the transformers
object detector of `--detector` (`CmalRegionExtractor`, the extractor of `python -m cmal_processing extract`), which
must be the detector whose features the model was trained on (its feature width must equal `visual_feat_dim`), and the
caption from `--caption`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from cmal_examples.figure_arguments import FigureArguments, parse_figure_arguments
from cmal_examples.figures import image_file_regions, load_model_and_processor, region_extractor, synthetic_scene

from modeling_cmal import CmalModel, select_top_regions
from modeling_cmal.processing_cmal import CmalProcessor

REAL_IMAGE_SEEDS = Path(__file__).resolve().parent / "data" / "real_image_seeds.json"
BUILT_IN_IMAGES = ("synthetic", "coffee")


@dataclass
class AttentionArguments(FigureArguments):
    """The program's flags (`HfArgumentParser` turns the fields into flags); `__post_init__` checks every value and
    raises `ValueError` naming the flag, the value and what was expected. `--model_name_or_path`, `--output` and
    `--seed` are checked by `cmal_examples.figure_arguments.FigureArguments`, shared with tsne.py."""

    image: str = field(default="synthetic", metadata={
        "help": "synthetic: a scene of the synthetic world; coffee: scikit-image's coffee() photo; or the path of "
                "an image file (with --detector and --caption)"})
    caption: str | None = field(default=None, metadata={
        "help": "caption to use instead of the scene's (or the photo's first) caption"})
    seed: int = field(default=0, metadata={"help": "which synthetic scene (>= 0)"})
    layer: int = field(default=-1, metadata={"help": "unified-encoder layer (negative counts from the end)"})
    real_image_seeds: str = field(default=str(REAL_IMAGE_SEEDS), metadata={"help": "the annotations of the photos"})

    def __post_init__(self):
        super().__post_init__()
        if self.caption is not None and not self.caption.strip():
            self._refuse("caption", "a non-empty caption")
        image_file = self.image not in BUILT_IN_IMAGES
        if image_file and not Path(self.image).is_file():
            self._refuse("image", f"one of {list(BUILT_IN_IMAGES)} or an image file")
        self._check_detector(image_file, "--image PATH",
                             f"left unset with --image {self.image} (it applies to an image file)")
        if image_file and self.caption is None:
            self._refuse("caption", "given with --image PATH (a caption naming something in the photo)")
        if self.image == "coffee" and not Path(self.real_image_seeds).is_file():
            self._refuse("real_image_seeds", "a file with --image coffee (the annotations of the photos, "
                         "examples/data/real_image_seeds.json of the repository)")


def parse_args(argv: list[str] | None = None) -> AttentionArguments:
    """The flags, or one JSON file holding them (as in the transformers examples). A bad value stops the program
    with exit status 2 and a message naming the flag and the value."""
    return parse_figure_arguments(AttentionArguments, __doc__, argv)


# ----------------------------------------------------------------------------------------------------------------
# Examples: (image, regions dict with pixel boxes and image_size, caption)
# ----------------------------------------------------------------------------------------------------------------


def synthetic_example(feature_dim: int, seed: int):
    scene, image, regions = synthetic_scene(np.random.default_rng(seed), feature_dim)
    return image, regions, scene["captions"][0]


def coffee_example(feature_dim: int, seeds_path: str | Path):
    from PIL import Image
    from skimage import data

    from cmal_processing.synthetic import region_features_from_pixels

    seeds = json.loads(Path(seeds_path).read_text())
    pixels = data.coffee()
    boxes = np.asarray([region["box"] for region in seeds["regions"]["coffee"]], dtype=np.float32)
    regions = {
        "visual_feats": region_features_from_pixels(pixels, boxes, feature_dim=feature_dim),
        "visual_pos": boxes,
        "tags": [region["tag"] for region in seeds["regions"]["coffee"]],
        "image_size": (pixels.shape[1], pixels.shape[0]),
    }
    return Image.fromarray(pixels), regions, seeds["captions"]["coffee"][0]


def photo_example(path: str, detector: str, score_threshold: float, feature_dim: int, max_regions: int):
    """An image file and the regions of the object detector at `detector` (at most `max_regions`)."""
    image, regions = image_file_regions(path, region_extractor(detector, score_threshold, feature_dim, max_regions))
    if regions is None:
        raise SystemExit(f"--detector {detector!r} found no region in {path!r} scoring above --score_threshold "
                         f"{score_threshold}: lower it")
    return image, regions


# ----------------------------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------------------------


def keep_top_regions(regions: dict, max_regions: int) -> dict:
    """The regions the processor keeps (`select_top_regions`, the package's one selection), cut here already so that
    the region slots of the model line up with `regions["tags"]` for the labels of the figure."""
    keep = select_top_regions(regions.get("scores"), max_regions, len(regions["visual_feats"]))
    return {key: ([value[index] for index in keep] if isinstance(value, list) else np.asarray(value)[keep])
            if key in ("visual_feats", "visual_pos", "tags", "scores") and value is not None else value
            for key, value in regions.items()}


def anchor_word_attention(model: CmalModel, processor: CmalProcessor, regions: dict, caption: str, layer: int):
    """For every anchor word: its text, its concept, its region and the share of its attention (over the heads of
    `layer` and its pieces) that each region receives. Also returns the region boxes in pixels, in slot order."""
    encoding = processor(text=[caption], regions=[regions], return_tensors="pt")
    inputs = {name: encoding[name] for name in ("input_ids", "attention_mask", "token_type_ids", "visual_feats",
                                                "visual_pos", "visual_attention_mask", "anchor_pairs") if name in encoding}
    with torch.no_grad():
        outputs = model(**inputs, output_attentions=True)
    text_length = inputs["input_ids"].shape[1]
    num_regions = int(inputs["visual_attention_mask"][0].sum())
    attention = outputs.attentions[layer][0].mean(0)  # [L, L], mean over heads
    pieces_by_region: dict[int, list[int]] = {}
    for piece, region in inputs["anchor_pairs"][0].tolist():
        if piece >= 0:
            pieces_by_region.setdefault(region, []).append(piece)
    lexicon = processor.lexicon
    concept_by_region = {
        int(region): int(concept)
        for (piece, region), concept in zip(inputs["anchor_pairs"][0].tolist(), encoding["anchor_concept_ids"][0].tolist())
        if piece >= 0
    }
    tokens = processor.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0].tolist())
    words = []
    for region, pieces in sorted(pieces_by_region.items(), key=lambda item: min(item[1])):
        to_regions = attention[pieces][:, text_length:text_length + num_regions].mean(0)
        words.append({
            "word": "".join(tokens[piece].removeprefix("##") for piece in sorted(pieces)),
            "concept": lexicon.concept_names[concept_by_region[region]],
            "region": region,
            "share": (to_regions / to_regions.sum()).numpy(),
        })
    width, height = regions.get("image_size", (1, 1))
    boxes = inputs["visual_pos"][0, :num_regions].numpy() * np.array([width, height, width, height])
    return words, boxes


def draw(image, boxes: np.ndarray, tags: list[str], words: list[dict], title: str, output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    height, width = np.asarray(image).shape[:2]
    figure, axes = plt.subplots(1, len(words), figsize=(4.2 * len(words), 4.2 * height / width + 0.9), squeeze=False)
    colours = plt.get_cmap("tab10")
    for axis, word in zip(axes[0], words):
        axis.imshow(image)
        axis.set_axis_off()
        strongest = word["share"].max()
        for index, (box, share) in enumerate(zip(boxes, word["share"])):
            strength = share / strongest
            x1, y1, x2, y2 = box
            axis.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colours(index % 10),
                                     linewidth=0.5 + 5.5 * strength, alpha=0.15 + 0.85 * strength))
            label = f"{tags[index]} {share:.2f}" if index < len(tags) else f"{share:.2f}"
            if index == word["region"]:
                label = f"★ {label}"
            axis.text(x1 + 2, y1 + 2, label, fontsize=7, va="top", color="white",
                      bbox=dict(facecolor=colours(index % 10), alpha=0.15 + 0.6 * strength, pad=1, linewidth=0))
        axis.set_title(f"“{word['word']}” (concept {word['concept']})", fontsize=10)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(output, dpi=110)
    plt.close(figure)


def main(argv=None) -> Path:
    args = parse_args(argv)
    model, processor = load_model_and_processor(args.model_name_or_path, attn_implementation="eager")
    num_layers = model.config.num_unified_layers
    if num_layers == 0:
        raise SystemExit(f"{args.model_name_or_path} has no unified encoder (num_unified_layers=0): there is no "
                         "word-to-region attention to draw")
    if not -num_layers <= args.layer < num_layers:
        raise SystemExit(f"--layer {args.layer} is out of range: the model's unified encoder has {num_layers} layers "
                         f"(use {-num_layers}..{num_layers - 1})")
    feature_dim = model.config.visual_feat_dim
    if args.image == "synthetic":
        image, regions, caption = synthetic_example(feature_dim, args.seed)
    elif args.image == "coffee":
        image, regions, caption = coffee_example(feature_dim, args.real_image_seeds)
    else:
        image, regions = photo_example(args.image, args.detector, args.score_threshold, feature_dim,
                                       processor.max_regions)
        caption = None
    caption = args.caption or caption
    regions = keep_top_regions(regions, processor.max_regions)
    words, boxes = anchor_word_attention(model, processor, regions, caption, args.layer)
    if not words:
        raise SystemExit(f"the caption {caption!r} has no anchor word for the tags {list(regions['tags'])}: "
                         "give a caption that names one of them (--caption)")
    layer = args.layer % num_layers
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    draw(image, boxes, list(regions["tags"]), words,
         f"“{caption}” — unified-encoder layer {layer + 1} of {num_layers}, word → region attention "
         "(mean over heads)", output)
    print(f"wrote {output} ({len(words)} anchor words)")
    return output


if __name__ == "__main__":
    main()
