"""What the figure programs (`visualize_attention.py`, `tsne.py`) share: their common flags and the model loading."""

from __future__ import annotations

import argparse
from pathlib import Path

from modeling_cmal import CmalModel
from modeling_cmal.processing_cmal import CmalProcessor


def add_figure_arguments(parser: argparse.ArgumentParser) -> None:
    """`--model_name_or_path` (a saved CMAL folder) and `--output` (the PNG to write)."""
    parser.add_argument("--model_name_or_path", required=True, help="a CMAL folder (pre-trained or fine-tuned)")
    parser.add_argument("--output", required=True, help="PNG file to write (its folder is created)")


def check_figure_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--model_name_or_path must be a saved CMAL folder, --output a .png path; `parser.error` names the flag."""
    folder = Path(args.model_name_or_path)
    if not (folder / "config.json").is_file():
        parser.error(f"--model_name_or_path {args.model_name_or_path!r} is not a saved CMAL folder (no config.json); "
                     "give a folder written by save_pretrained, e.g. the quickstart's outputs/quickstart/pretrained")
    if Path(args.output).suffix.lower() != ".png":
        parser.error(f"--output must be a .png file, got {args.output!r}")
    if Path(args.output).is_dir():
        parser.error(f"--output {args.output!r} is a folder; give a .png file name")


def synthetic_scene(rng, feature_dim: int):
    """(scene, rendered image, regions) of one synthetic scene drawn from `rng`, the regions under the processor's
    names (`scene_regions` may still name the arrays `features` / `boxes`, the deprecated ones)."""
    from cmal_processing.synthetic import generate_scene, render_scene, scene_regions

    scene = generate_scene(rng)
    image = render_scene(scene)
    renamed = {"features": "visual_feats", "boxes": "visual_pos"}
    regions = scene_regions(scene, image, feature_dim)
    return scene, image, {renamed.get(key, key): value for key, value in regions.items()}


def load_model_and_processor(folder: str, **model_kwargs) -> tuple[CmalModel, CmalProcessor]:
    """The trunk (whatever head the folder was saved with) in eval mode, and the folder's processor."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the heads' weights a trunk does not use are expected, not news
    hf_logging.disable_progress_bar()
    try:
        model = CmalModel.from_pretrained(folder, **model_kwargs).eval()
    finally:
        hf_logging.set_verbosity(verbosity)
    processor = CmalProcessor.from_pretrained(folder)
    if len(processor.lexicon) != model.config.num_anchor_concepts:
        raise SystemExit(f"{folder}: the processor's lexicon has {len(processor.lexicon)} concepts but the model's "
                         f"num_anchor_concepts is {model.config.num_anchor_concepts}")
    return model, processor
