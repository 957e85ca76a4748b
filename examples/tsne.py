"""t-SNE of CMAL's two hyperspheres: anchor words and anchor regions, coloured by their anchor concept.

    python examples/tsne.py --model_name_or_path outputs/quickstart/pretrained --output tsne.png
    python examples/tsne.py args.json      (one JSON file of the flags, their names as keys)
    python examples/tsne.py --model_name_or_path DIR --output mine.png --images photos.jsonl --detector DETECTOR_DIR

Scenes of the synthetic world (`cmal_processing.synthetic`) are encoded by the model; every anchor pair (a caption word
and the region that names the same concept) gives two points: the word's `text_embeds` (mean of its pieces,
renormalised onto the unit sphere) and the region's `image_embeds`. Both sets go through one scikit-learn t-SNE and
are drawn in one plot: colour = concept, circle = word, triangle = region. After pre-training with AMC, words and
regions of one concept should gather by concept, each modality on its own hypersphere.

With `--images FILE`, the points come from image files instead: a JSON Lines file of `{"image": path, "caption":
text}` (paths relative to the file's folder), the regions of each image from the transformers object detector of
`--detector` (the one the model's features come from; its feature width must equal `visual_feat_dim`). Images
without any detection above `--score_threshold` are skipped and counted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from cmal_examples.figure_arguments import FigureArguments, parse_figure_arguments
from cmal_examples.figures import image_file_regions, load_model_and_processor, region_extractor, synthetic_scene
from torch.nn import functional as F
from tqdm.auto import tqdm

from modeling_cmal import CmalModel
from modeling_cmal.processing_cmal import CmalProcessor

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "visual_feats", "visual_pos", "visual_attention_mask",
                "anchor_pairs")


@dataclass
class TsneArguments(FigureArguments):
    """The program's flags (`HfArgumentParser` turns the fields into flags); `__post_init__` checks every value and
    raises `ValueError` naming the flag, the value and what was expected. `--model_name_or_path`, `--output` and
    `--seed` are checked by `cmal_examples.figure_arguments.FigureArguments`, shared with visualize_attention.py."""

    num_scenes: int = field(default=120, metadata={"help": "synthetic scenes to encode"})
    seed: int = field(default=0, metadata={"help": "seed of the scenes and of t-SNE (>= 0)"})
    perplexity: float = field(default=30.0, metadata={"help": "t-SNE perplexity (capped by the points)"})
    batch_size: int = field(default=32, metadata={"help": "scenes encoded per forward pass"})
    images: str | None = field(default=None, metadata={
        "help": 'a JSON Lines file of {"image": path, "caption": text} to encode instead of synthetic scenes'})

    def __post_init__(self):
        super().__post_init__()
        self.positive_integers("num_scenes", "batch_size")
        if self.seed >= 2**32:
            self._refuse("seed", "an integer in [0, 2**32) (scikit-learn's random_state)")
        if not self.perplexity > 0:  # also refuses nan
            self._refuse("perplexity", "a positive number")
        if self.images is not None and not Path(self.images).is_file():
            self._refuse("images", 'a JSON Lines file of {"image": path, "caption": text}')
        self._check_detector(self.images is not None, "--images",
                             "left unset without --images (it applies to image files)")


def parse_args(argv: list[str] | None = None) -> TsneArguments:
    """The flags, or one JSON file holding them (as in the transformers examples). A bad value stops the program
    with exit status 2 and a message naming the flag and the value."""
    return parse_figure_arguments(TsneArguments, __doc__, argv)


def synthetic_examples(num_scenes: int, feature_dim: int, seed: int) -> list[tuple[str, dict]]:
    """(caption, regions) of `num_scenes` synthetic scenes."""
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(num_scenes):
        scene, _, regions = synthetic_scene(rng, feature_dim)
        examples.append((scene["captions"][0], regions))
    return examples


def image_file_examples(listing: str, extractor) -> list[tuple[str, dict]]:
    """(caption, regions) of every line of the JSON Lines file `listing` whose image has a detection; the skipped
    images are counted in a message."""
    examples, skipped = [], []
    root = Path(listing).parent
    lines = Path(listing).read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(tqdm(lines, desc="detecting regions", unit="image"), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as error:
            raise SystemExit(f"--images {listing!r} line {number} is not JSON: {error}") from None
        if not (isinstance(item, dict) and isinstance(item.get("image"), str) and isinstance(item.get("caption"), str)
                and item["caption"].strip()):
            raise SystemExit(f"--images {listing!r} line {number} must be an object with an \"image\" path and a "
                             f"non-empty \"caption\", got {line[:120]!r}")
        _, regions = image_file_regions(root / item["image"], extractor, flag=f"--images {listing!r} line {number}")
        if regions is None:
            skipped.append(item["image"])
        else:
            examples.append((item["caption"], regions))
    if skipped:
        print(f"skipped {len(skipped)} image(s) without a detection above --score_threshold: {skipped[:5]}"
              f"{' ...' if len(skipped) > 5 else ''}")
    if not examples:
        raise SystemExit(f"--images {listing!r}: no image with a detection above --score_threshold; lower it")
    return examples


def anchor_embeddings(model: CmalModel, processor: CmalProcessor, examples, batch_size: int):
    """Returns (points `[P, H]`, concept ids `[P]`, is-word `[P]`): one word point and one region point per anchor."""
    points, concepts, is_word = [], [], []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        encoding = processor(text=[caption for caption, _ in chunk], regions=[regions for _, regions in chunk],
                             return_tensors="pt")
        inputs = {name: encoding[name] for name in MODEL_INPUTS if name in encoding}
        with torch.no_grad():
            outputs = model(**inputs)
        for row, (pairs, concept_ids) in enumerate(zip(inputs["anchor_pairs"].tolist(),
                                                        encoding["anchor_concept_ids"].tolist())):
            anchors: dict[int, tuple[list[int], int]] = {}
            for (piece, region), concept in zip(pairs, concept_ids):
                if piece >= 0:
                    anchors.setdefault(region, ([], concept))[0].append(piece)
            for region, (pieces, concept) in anchors.items():
                word = F.normalize(outputs.text_embeds[row, pieces].mean(0), dim=-1)
                points += [word, outputs.image_embeds[row, region]]
                concepts += [concept, concept]
                is_word += [True, False]
    if not points:
        raise SystemExit("no anchors in these scenes: the processor paired no caption word with a region")
    return torch.stack(points).numpy(), np.asarray(concepts), np.asarray(is_word)


def draw(coordinates: np.ndarray, concepts: np.ndarray, is_word: np.ndarray, names: list[str], title: str,
         output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    figure, axis = plt.subplots(figsize=(8, 6.5))
    colours = plt.get_cmap("tab20")
    handles = []
    for rank, concept in enumerate(sorted(set(concepts.tolist()))):
        colour = colours(rank % 20)
        for word, marker in ((True, "o"), (False, "^")):
            chosen = (concepts == concept) & (is_word == word)
            axis.scatter(coordinates[chosen, 0], coordinates[chosen, 1], color=colour, marker=marker, s=26,
                         alpha=0.8, edgecolors="none")
        handles.append(Line2D([], [], color=colour, marker="s", linestyle="", label=names[concept]))
    handles += [Line2D([], [], color="black", marker="o", linestyle="", label="word (text_embeds)"),
                Line2D([], [], color="black", marker="^", linestyle="", label="region (image_embeds)")]
    axis.legend(handles=handles, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    axis.set(title=title, xticks=[], yticks=[])
    figure.tight_layout()
    figure.savefig(output, dpi=110)
    plt.close(figure)


def main(argv=None) -> Path:
    args = parse_args(argv)
    from sklearn.manifold import TSNE

    model, processor = load_model_and_processor(args.model_name_or_path)
    if args.images is None:
        examples = synthetic_examples(args.num_scenes, model.config.visual_feat_dim, args.seed)
    else:
        extractor = region_extractor(args.detector, args.score_threshold, model.config.visual_feat_dim,
                                     processor.max_regions)
        examples = image_file_examples(args.images, extractor)
    points, concepts, is_word = anchor_embeddings(model, processor, examples, args.batch_size)
    if len(points) < 5:
        raise SystemExit(f"only {len(points)} anchor points; encode more scenes (--num_scenes) or images (--images)")
    perplexity = min(args.perplexity, (len(points) - 1) / 3)
    coordinates = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=args.seed).fit_transform(points)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    draw(coordinates, concepts, is_word, processor.lexicon.concept_names,
         f"t-SNE of anchor embeddings: {int(is_word.sum())} words, {int((~is_word).sum())} regions, "
         f"{len(set(concepts.tolist()))} concepts", output)
    print(f"wrote {output} ({len(points)} points)")
    return output


if __name__ == "__main__":
    main()
