"""What the figure programs (`visualize_attention.py`, `tsne.py`) share: synthetic scenes, the regions an object
detector gives for image files, and the model loading (their common flags are in `figure_arguments`)."""

from __future__ import annotations

from modeling_cmal import CmalModel, CmalRegionExtractor
from modeling_cmal.processing_cmal import CmalProcessor


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


def region_extractor(detector: str, score_threshold: float, feature_dim: int, max_regions: int) -> CmalRegionExtractor:
    """The transformers object detector of `--detector`, refused when its feature width is not the model's
    `feature_dim` (a CMAL is tied to its detector's features)."""
    try:
        extractor = CmalRegionExtractor.from_pretrained(detector, score_threshold=score_threshold, top_k=max_regions)
    except (OSError, ValueError) as error:
        raise SystemExit(f"--detector {detector!r} is not a transformers object detector: {error}") from None
    if extractor.feature_dim != feature_dim:
        raise SystemExit(f"--detector {detector!r} gives {extractor.feature_dim}-d region features but the model was "
                         f"trained on {feature_dim}-d ones (visual_feat_dim): a CMAL is tied to its detector's "
                         "feature width; use the detector its corpus was extracted with")
    return extractor


def image_file_regions(path, extractor: CmalRegionExtractor, flag: str = "--image"):
    """(the RGB image of the file at `path`, its regions from `extractor`, or None when nothing scored above the
    extractor's threshold). A file Pillow cannot read stops the program with a message naming `flag` and the file."""
    from modeling_cmal.region_extraction import load_rgb_image

    try:
        image = load_rgb_image(path, flag)
    except ValueError as error:
        raise SystemExit(f"{flag}: {str(path)!r} is not an image file Pillow can read ({error})") from None
    regions = extractor(image)
    return image, (regions if len(regions["tags"]) else None)
